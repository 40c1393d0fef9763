"""A DINOv2-style ViT (pre-norm blocks with LayerScale) in Flax NNX.

The layout follows Hugging Face's `Dinov2Model` so that weights from either
the ONNX export or an HF safetensors file map one-to-one (see convert.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  dim: int = 384
  num_layers: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 14
  grid: tuple[int, int] = (2, 2)   # patches per side at the image size used
  layer_norm_eps: float = 1e-6
  num_classes: int = 0             # 0: backbone only, no head


class Block(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.num_heads = cfg.num_heads
    self.norm1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)
    self.ls1 = nnx.Param(jnp.ones((d,)))
    self.norm2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.fc1 = nnx.Linear(d, cfg.mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_dim, d, rngs=rngs)
    self.ls2 = nnx.Param(jnp.ones((d,)))

  def attention(self, x):
    b, n, d = x.shape
    h = self.num_heads
    split = lambda t: t.reshape(b, n, h, d // h)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d)
    return self.out(y)

  def __call__(self, x):
    x = x + self.ls1[...] * self.attention(self.norm1(x))
    # DINOv2 uses the exact (erf) GELU; the tanh approximation drifts past 1e-4.
    return x + self.ls2[...] * self.fc2(
        jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class ViT(nnx.Module):
  """Image [B, H, W, 3] -> final-norm tokens [B, 1 + gh*gw, dim] (or logits)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.dim, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, kernel_size=(p, p), strides=(p, p),
                                padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
    # Stored already resized to the grid used, so the forward pass does no
    # interpolation and the fine-tuned embedding is a plain parameter.
    self.pos_embed = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, 1 + cfg.grid[0] * cfg.grid[1], d)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    if cfg.num_classes:
      # DINOv2's linear-probe recipe reads the class token and the mean patch
      # token; with only a handful of patches both carry signal.
      self.head = nnx.Linear(2 * d, cfg.num_classes,
                             kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    else:
      self.head = None

  def features(self, images):
    x = self.patch_embed(images)
    b, gh, gw, d = x.shape
    if (gh, gw) != self.cfg.grid:
      raise ValueError(f"images give a {gh}x{gw} patch grid, the model was built "
                       f"for {self.cfg.grid}")
    x = x.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def __call__(self, images):
    tokens = self.features(images)
    if self.head is None:
      return tokens
    pooled = jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
    return self.head(pooled)
