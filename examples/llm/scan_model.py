"""SmolLM2 (LLaMA) with its blocks stacked under `nnx.scan`, for full
fine-tuning on a device mesh.

The blocks are made once by `nnx.vmap` and run by `nnx.scan`, both with
`transform_metadata={nnx.PARTITION_NAME: "layers"}`: every block param is one
leaf `[L, ...]` whose sharding names carry "layers" at the layer axis, which
is what `spd_optax.layer_axes_from_names` reads. `layer_axis=1` stacks the
layers at axis 1 instead (MaxText's `param_scan_axis=1`), to show a
non-leading layer axis.

Every param carries logical axis names ("vocab", "embed", "heads", "kv",
"mlp"); `param_specs` maps them to a mesh (FSDP: "embed" over the mesh's
axis). The forward pass gathers each weight right before it is used
(`reshard(w, P())` on an Explicit mesh: the all-gather of FSDP, whose
transpose in the backward pass is the reduce-scatter of the gradient), while
activations stay sharded along the batch.

Same maths as `model.Llama` (tested equal, logits to float32 rounding);
weights come from the same HF-named dict `convert.read_gguf` produces.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from examples.llm.model import LlamaConfig, apply_rope, rope_tables

LAYERS = "layers"


def _explicit():
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types)


def _gathered(w):
  """The whole weight on every device (FSDP's all-gather), where a mesh with
  Explicit axes is set; elsewhere (one device, Auto axes) the value itself."""
  if _explicit():
    w = jax.sharding.reshard(w, P())
  return w


def _lookup(embed, tokens):
  """embed[tokens], sharded like the tokens (along the batch).

  On an Explicit mesh the lookup reads the FSDP-sharded table itself (every
  device its slice of the "embed" axis, for all the batch's tokens, then an
  all-to-all to batch-sharded rows) instead of the all-gathered one: the
  table's gradient is then a scatter into each device's own slice, where a
  lookup in the gathered table would build a dense vocab x dim gradient on
  every device and all-reduce it (108 MiB per device at SmolLM2's shape)."""
  if not _explicit():
    return jnp.take(embed, tokens, axis=0)
  spec = jax.typeof(tokens).sharding.spec
  rows = embed.at[jax.sharding.reshard(tokens, P())].get(
      out_sharding=P(None, None, *jax.typeof(embed).sharding.spec[1:]))
  return jax.sharding.reshard(rows, P(*spec, None))


def _param(rngs, shape, names, scale=0.02):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


def _rms_norm(x, weight, eps):
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(var + eps) * weight


class Block(nnx.Module):
  """One LLaMA block; kernels are [in, out] as in nnx.Linear."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    hd = cfg.head_dim
    self.cfg = cfg
    self.input_layernorm = nnx.Param(jnp.ones((cfg.dim,)), out_sharding=("embed",))
    self.post_attention_layernorm = nnx.Param(jnp.ones((cfg.dim,)), out_sharding=("embed",))
    self.q_proj = _param(rngs, (cfg.dim, cfg.n_heads * hd), ("embed", "heads"))
    self.k_proj = _param(rngs, (cfg.dim, cfg.n_kv_heads * hd), ("embed", "kv"))
    self.v_proj = _param(rngs, (cfg.dim, cfg.n_kv_heads * hd), ("embed", "kv"))
    self.o_proj = _param(rngs, (cfg.n_heads * hd, cfg.dim), ("heads", "embed"))
    self.gate_proj = _param(rngs, (cfg.dim, cfg.ffn_dim), ("embed", "mlp"))
    self.up_proj = _param(rngs, (cfg.dim, cfg.ffn_dim), ("embed", "mlp"))
    self.down_proj = _param(rngs, (cfg.ffn_dim, cfg.dim), ("mlp", "embed"))

  def __call__(self, x, cos, sin):
    cfg = self.cfg
    w = lambda p: _gathered(p[...])
    b, t, _ = x.shape
    h = _rms_norm(x, w(self.input_layernorm), cfg.norm_eps)
    q = (h @ w(self.q_proj)).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = (h @ w(self.k_proj)).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ w(self.v_proj)).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + att.reshape(b, t, -1) @ w(self.o_proj)
    h = _rms_norm(x, w(self.post_attention_layernorm), cfg.norm_eps)
    return x + (jax.nn.silu(h @ w(self.gate_proj)) * (h @ w(self.up_proj))) @ w(self.down_proj)


# What the backward pass keeps from the forward, per block. "dots" keeps the
# matmuls' outputs (activations) and recomputes the rest, the all-gathered
# weights included: FSDP's gather again in the backward pass, instead of all
# L blocks' full weights staying alive on every device until then (on a CPU
# mesh of 8 devices, 8 copies of the model in host RAM). A policy that saves
# everything but a name given to the gathered weight does not do this: the
# same value, unnamed, as the all-gather's output, is saved instead.
REMAT = {"none": None,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         "full": jax.checkpoint_policies.nothing_saveable}


class ScanLlama(nnx.Module):
  """Decoder-only LLaMA whose `blocks` hold all L blocks stacked along
  `layer_axis` (0, or 1 as MaxText stores them)."""

  def __init__(self, cfg: LlamaConfig, *, layer_axis: int = 0, remat: str = "dots",
               rngs: nnx.Rngs):
    if layer_axis not in (0, 1):
      raise ValueError(f"layer_axis must be 0 or 1 (MaxText), got {layer_axis!r}")
    if remat not in REMAT:
      raise ValueError(f"remat must be one of {sorted(REMAT)}, got {remat!r}")
    self.cfg = cfg
    self.layer_axis = layer_axis
    # "full" recomputes whole blocks, as large models do (MaxText's remat);
    # the memory plan uses it at 1B/8B shapes.
    self.remat = remat
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"))
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"))
    self.norm = nnx.Param(jnp.ones((cfg.dim,)), out_sharding=("embed",))

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=layer_axis,
              transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(rngs):
      return Block(cfg, rngs)

    self.blocks = make(rngs)

  def __call__(self, tokens):
    """tokens: int [batch, seq] -> float32 logits [batch, seq, vocab]."""
    cos, sin = rope_tables(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_base)
    x = _lookup(self.embed_tokens[...], tokens)

    def run_block(block, x):
      return block(x, cos, sin)
    if self.remat != "none":
      run_block = nnx.remat(run_block, policy=REMAT[self.remat])

    @nnx.scan(in_axes=(self.layer_axis, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def body(block, x):
      return run_block(block, x)

    x = body(self.blocks, x)
    x = _rms_norm(x, _gathered(self.norm[...]), self.cfg.norm_eps)
    if self.cfg.tie_embeddings:
      return x @ _gathered(self.embed_tokens[...]).T
    return x @ _gathered(self.lm_head[...])


_BLOCK_NAMES = ["input_layernorm", "post_attention_layernorm",
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def build_scan_model(cfg: LlamaConfig, weights: dict, *, n_layers: int | None = None,
                     layer_axis: int = 0) -> ScanLlama:
  """A ScanLlama holding the HF-named [out, in] `weights` (convert.read_gguf's
  dict), each block weight stacked along `layer_axis`. `n_layers` keeps only
  the first blocks (smoke runs). Every weight the model has must be given and
  every given weight (of the kept blocks) used."""
  n_layers = cfg.n_layers if n_layers is None else min(n_layers, cfg.n_layers)
  cfg = dataclasses.replace(cfg, n_layers=n_layers)
  # Random init is thrown away; abstract creation would skip it, but then the
  # Variables would need values built per leaf anyway.
  with nnx.use_eager_sharding(False):
    model = ScanLlama(cfg, layer_axis=layer_axis, rngs=nnx.Rngs(0))
  used = set()

  def take(name):
    if name not in weights:
      raise KeyError(f"checkpoint has no {name}")
    used.add(name)
    return np.asarray(weights[name], np.float32)

  def put(variable, value):
    if variable.shape != value.shape:
      raise ValueError(f"shape {value.shape} does not fit {variable.shape}")
    variable[...] = jnp.asarray(value)

  put(model.embed_tokens, take("model.embed_tokens.weight"))
  put(model.norm, take("model.norm.weight"))
  if not cfg.tie_embeddings:
    put(model.lm_head, take("lm_head.weight").T)
  for name in _BLOCK_NAMES:
    per_layer = [take(f"model.layers.{i}.{name}.weight") for i in range(n_layers)]
    if per_layer[0].ndim == 2:  # Linear [out, in] -> kernel [in, out]
      per_layer = [w.T for w in per_layer]
    put(getattr(model.blocks, name.split(".")[-1]), np.stack(per_layer, axis=layer_axis))
  expected = {k for k in weights
              if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
  if unused := expected - used:
    raise ValueError(f"checkpoint weights not used: {sorted(unused)[:5]}...")
  return model


def param_specs(params_state, rules):
  """PartitionSpecs for an `nnx.State` of named params, by logical-name
  `rules` such as {"embed": "fsdp"} (names without a rule, "layers"
  included, stay unsharded)."""
  def spec(v):
    names = v.get_metadata().get("out_sharding") or (None,) * v.ndim
    return P(*(rules.get(n) for n in names))
  return jax.tree.map(spec, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
