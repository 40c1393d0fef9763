"""A whole training step over benchmarks/aot.py's block sets: forward,
backward and the optimizer, for the compile-only share of SPD in a step.

The sets hold a model's blocks without its embedding and head, so the step
runs the blocks on embedded inputs and takes the mean square of their
output as the loss. The blocks are the models' own: a LLaMA block (RMSNorm,
causal attention with 128-wide heads, SwiGLU) and a ViT block (LayerNorm,
attention with 64-wide heads, GELU MLP). Params are float32; the blocks
compute in bfloat16, each block rematerialized in the backward pass, as
large models are trained. Stacked sets are indexed layer by layer (the
blocks unrolled), so that XLA:TPU's estimate covers every kernel: the
estimate of a loop is not counted (benchmarks/aot.py).
"""

import re

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

# Tokens per example and examples per data shard: LLaMA at 2048 tokens, ViT
# at 224 px (196 patches and the class token).
TOKENS = {"llama": 2048, "vit": 197}
EXAMPLES_PER_SHARD = {"llama": 8, "vit": 128}


def model_of(shapes) -> str:
  return "llama" if any(k.startswith("layer") for k in shapes) else "vit"


def blocks(params) -> list[dict]:
  """Each block's leaves by their short name (``q``, ``fc1/w``), from
  ``layer3/q`` (unstacked) or ``layers/q`` (stacked, indexed per block)."""
  out = {}
  for key, x in params.items():
    m = re.fullmatch(r"(layer|block)(\d+|s)/(.+)", key)
    if m[2] == "s":
      for i in range(x.shape[0]):
        out.setdefault(i, {})[m[3]] = x[i]
    else:
      out.setdefault(int(m[2]), {})[m[3]] = x
  return [out[i] for i in sorted(out)]


def _attention(q, k, v, heads, causal):
  split = lambda x: x.reshape(*x.shape[:2], heads, -1)
  o = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal)
  return o.reshape(q.shape)


def _rms(x, w):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
          * w).astype(x.dtype)


def _layer_norm(x, w, b):
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
  return ((x32 - mu) * jax.lax.rsqrt(var + 1e-6) * w + b).astype(x.dtype)


def llama_block(p, x):
  p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p)
  h = _rms(x, p["attn_norm"])
  x = x + _attention(h @ p["q"], h @ p["k"], h @ p["v"], x.shape[-1] // 128, True) @ p["o"]
  h = _rms(x, p["mlp_norm"])
  return x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]


def vit_block(p, x):
  p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p)
  h = _layer_norm(x, p["ln1/w"], p["ln1/b"])
  q, k, v = jnp.split(h @ p["qkv/w"] + p["qkv/b"], 3, axis=-1)
  x = x + _attention(q, k, v, x.shape[-1] // 64, False) @ p["proj/w"] + p["proj/b"]
  h = _layer_norm(x, p["ln2/w"], p["ln2/b"])
  return x + jax.nn.gelu(h @ p["fc1/w"] + p["fc1/b"]) @ p["fc2/w"] + p["fc2/b"]


def loss(params, x):
  block = jax.checkpoint(llama_block if model_of(params) == "llama" else vit_block)
  for p in blocks(params):
    x = block(p, x)
  return jnp.mean(jnp.square(x.astype(jnp.float32)))


def inputs(shapes, mesh):
  """The embedded inputs, split over the mesh's "data" axis."""
  model = model_of(shapes)
  width = next(s[-1] for k, s in shapes.items() if k.endswith(("/q", "proj/w")))
  batch = EXAMPLES_PER_SHARD[model] * mesh.shape["data"]
  return jax.ShapeDtypeStruct((batch, TOKENS[model], width), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("data")))


def make(tx):
  """``params, state, loss = step(params, state, x)``."""
  def step(params, state, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value
  return step
