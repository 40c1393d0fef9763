"""A LLaMA-style causal language model in Flax NNX (SmolLM2 shapes by default).

Weights follow the Hugging Face layout: Q and K rows are ordered for
"rotate-half" RoPE (first half of each head paired with the second half).
GGUF files store Q and K permuted for llama.cpp's adjacent-pair RoPE;
`convert.py` undoes that permutation, and the tests prove the two agree.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 49152
  dim: int = 576
  n_layers: int = 30
  n_heads: int = 9
  n_kv_heads: int = 3
  ffn_dim: int = 1536
  rope_base: float = 100000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * self.weight[...]


def _linear(d_in, d_out, lora_rank, rngs):
  # LoRALinear keeps the base weight under `kernel` (an nnx.Param, frozen by
  # training only wrt nnx.LoRAParam) and adds `lora.lora_a`/`lora.lora_b`;
  # lora_b starts at zero, so the adapted model starts equal to the base one.
  if lora_rank:
    return nnx.LoRALinear(d_in, d_out, lora_rank=lora_rank, use_bias=False, rngs=rngs)
  return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)


def rope_tables(seq_len: int, head_dim: int, base: float):
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Rotate-half RoPE on x of shape [batch, seq, heads, head_dim]."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, lora_rank: int, lora_attn: bool, rngs):
    r = lora_rank if lora_attn else 0
    hd = cfg.head_dim
    self.cfg = cfg
    self.q_proj = _linear(cfg.dim, cfg.n_heads * hd, r, rngs)
    self.k_proj = _linear(cfg.dim, cfg.n_kv_heads * hd, r, rngs)
    self.v_proj = _linear(cfg.dim, cfg.n_kv_heads * hd, r, rngs)
    self.o_proj = _linear(cfg.n_heads * hd, cfg.dim, r, rngs)

  def __call__(self, x, cos, sin):
    b, t, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Grouped-query attention: dot_product_attention shares each K/V head
    # across n_heads // n_kv_heads query heads without materialising copies.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim))


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, lora_rank: int, lora_mlp: bool, rngs):
    r = lora_rank if lora_mlp else 0
    self.gate_proj = _linear(cfg.dim, cfg.ffn_dim, r, rngs)
    self.up_proj = _linear(cfg.dim, cfg.ffn_dim, r, rngs)
    self.down_proj = _linear(cfg.ffn_dim, cfg.dim, r, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg, lora_rank, lora_attn, lora_mlp, rngs):
    self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.self_attn = Attention(cfg, lora_rank, lora_attn, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.mlp = MLP(cfg, lora_rank, lora_mlp, rngs)

  def __call__(self, x, cos, sin):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """Decoder-only LLaMA. `lora_rank > 0` wraps the chosen projections of the
  top `lora_layers` blocks (default: all) in nnx.LoRALinear; the adapters are
  the model's only nnx.LoRAParam leaves. Adapting only the top blocks is what
  makes CPU fine-tuning affordable: backpropagation stops below the lowest
  adapter instead of running through all blocks."""

  def __init__(self, cfg: LlamaConfig, *, lora_rank: int = 0, lora_attn: bool = True,
               lora_mlp: bool = True, lora_layers: int | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    first_lora = 0 if lora_layers is None else cfg.n_layers - lora_layers
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
    self.layers = nnx.List([
        Block(cfg, lora_rank if i >= first_lora else 0, lora_attn, lora_mlp, rngs)
        for i in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    """tokens: int [batch, seq] -> float32 logits [batch, seq, vocab]."""
    cos, sin = rope_tables(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_base)
    x = self.embed_tokens(tokens)
    for layer in self.layers:
      x = layer(x, cos, sin)
    x = self.norm(x)
    if self.cfg.tie_embeddings:
      return self.embed_tokens.attend(x)
    return self.lm_head(x)


def window_nll(logits, tokens):
  """[batch] mean negative log-likelihood of each window's tokens[1:] given
  the logits before them (the study's unit of test data)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -jnp.mean(picked, axis=1)


def next_token_nll(logits, tokens):
  """Mean negative log-likelihood of tokens[:, 1:] given the logits before them."""
  return jnp.mean(window_nll(logits, tokens))
