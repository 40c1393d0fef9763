"""A fused first pass of Adam-SPD for GPUs, in Pallas (Triton lowering).

SPD needs four sums over a leaf before it can finish any element of it, so
one step takes two passes over memory. XLA forms the first pass (new Adam
moments and the sums) as a multi-output reduction that runs well below the
GPU's memory bandwidth (benchmarks/NOTES.md); this kernel does it as one
streaming pass: it reads g, θ_{t-1}, θ_0, m, v once, writes m_t, v_t, and one
partial sum of each product per block. The second pass (the projection,
which XLA fuses with `optax.apply_updates`) stays in XLA.

`adam_spd` uses it on a single GPU (``fused=None``); the pure-JAX path is the
reference it is tested against, in Pallas' interpreter on a CPU.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 4096           # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def supported(*arrays) -> bool:
  """Whether the kernel handles these arrays' dtypes (float64 does not fit
  the float32 arithmetic of the kernel; the JAX path takes it)."""
  return all(jnp.dtype(x.dtype) in map(jnp.dtype, FLOATS) for x in arrays)


def adam_moments_and_sums(g, p, a, m, v, neg_lr, bc1, bc2, *, b1, b2, eps,
                          interpret=False):
  r"""New Adam moments and SPD's four sums for one leaf, in one pass.

  $$
  m_t = (1-\beta_1) g + \beta_1 m, \quad v_t = (1-\beta_2) g^2 + \beta_2 v,
  \quad u = -\eta\, \frac{m_t / c_1}{\sqrt{v_t / c_2} + \epsilon},
  \quad d = \theta_{t-1} - \theta_0
  $$

  returning $m_t$, $v_t$ (in m's and v's dtypes) and
  $(\langle g, d\rangle, \|d\|^2, \langle d, u\rangle, \|u\|^2)$ in float32.
  The arithmetic is float32 whatever the inputs' dtypes.

  Args:
    g, p, m, v: arrays of one shape; ``a`` the same or None (θ_0 = 0).
    neg_lr, bc1, bc2: -η and the bias corrections $c_1 = 1-\beta_1^t$,
      $c_2 = 1-\beta_2^t$, float32 scalars (traced values are fine).
    b1, b2, eps: Adam's constants (floats or traced scalars).
    interpret: run in Pallas' interpreter (CPUs, tests).
  """
  n = g.size
  blocks = pl.cdiv(n, BLOCK)
  has_anchor = a is not None
  # Under optax.inject_hyperparams even b1, b2 and eps are traced values, and
  # a kernel may not close over those: they travel in one small operand.
  # 1 - b is formed here, as optax forms it: in double precision for a
  # Python float (in float32, 1 - 0.999 is off by 1e-5 relative).
  coef = jnp.stack([jnp.asarray(c, jnp.float32)
                    for c in (neg_lr, bc1, bc2, b1, 1 - b1, b2, 1 - b2, eps)])
  inputs = [g, p] + ([a] if has_anchor else []) + [m, v]
  flat = [x.reshape(-1) for x in inputs]

  def kernel(coef_ref, *refs):
    g_ref, p_ref, *refs = refs
    a_ref = refs.pop(0) if has_anchor else None
    m_ref, v_ref, m_out, v_out, *sum_refs = refs
    # The last block runs past the leaf's end: masked lanes load zeros,
    # which add nothing to any sum, and are not stored.
    valid = pl.program_id(0) * BLOCK + jnp.arange(BLOCK) < n
    load = lambda r: plgpu.load(r, mask=valid, other=0.0).astype(jnp.float32)
    g, p, m, v = load(g_ref), load(p_ref), load(m_ref), load(v_ref)
    d = p - load(a_ref) if has_anchor else p
    neg_lr, bc1, bc2, b1, c1, b2, c2, eps = (coef_ref[i] for i in range(8))
    m = c1 * g + b1 * m
    v = c2 * (g * g) + b2 * v
    plgpu.store(m_out, m.astype(m_out.dtype), mask=valid)
    plgpu.store(v_out, v.astype(v_out.dtype), mask=valid)
    u = neg_lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps))
    for ref, x in zip(sum_refs, (g * d, d * d, d * u, u * u)):
      ref[...] = jnp.sum(x)

  block = pl.BlockSpec((BLOCK,), lambda i: (i,))
  partial = pl.BlockSpec((None,), lambda i: (i,))
  m_new, v_new, *partials = pl.pallas_call(
      kernel,
      grid=(blocks,),
      in_specs=[pl.BlockSpec((8,), lambda i: (0,))] + [block] * len(flat),
      out_specs=[block, block] + [partial] * 4,
      out_shape=[jax.ShapeDtypeStruct((n,), m.dtype),
                 jax.ShapeDtypeStruct((n,), v.dtype)]
                + [jax.ShapeDtypeStruct((blocks,), jnp.float32)] * 4,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=NUM_WARPS),
      interpret=interpret,
      name="adam_spd_first_pass",
  )(coef, *flat)
  sums = tuple(jnp.sum(s) for s in partials)
  return m_new.reshape(m.shape), v_new.reshape(v.shape), sums
