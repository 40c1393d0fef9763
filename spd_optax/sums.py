"""SPD's sums over a layer's elements: the one place where the step's
formulation depends on the backend.

XLA:TPU and XLA:GPU fuse plain sibling sums into the pass that updates the
moments, where a variadic reduction becomes a pass of its own; XLA:CPU is
faster with one variadic reduction, which reads the operands' inputs once
for all (benchmarks/NOTES.md). `lax.platform_dependent` picks per backend.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from spd_optax import sharding

# Elements per block of XLA:CPU's sums (see `cpu_sums`).
CPU_BLOCK = 4096


def acc_dtype(dtype) -> jnp.dtype:
  """The dtype SPD sums in: at least float32 (sums over millions of
  bfloat16 elements lose the signal), float64 for float64 params (the
  float64 golden runs agree to 1e-9)."""
  return jnp.promote_types(dtype, jnp.float32)


def terms(g, d, u):
  """The per-element terms of ⟨g, d⟩, ‖d‖² and s = ⟨u, 2d + u⟩."""
  return g * d, d * d, u * (2 * d + u)


def frobenius_plain(g, d, u, axes):
  """`frobenius` as plain sums (XLA:TPU, XLA:GPU)."""
  return tuple(jnp.sum(t, axis=axes) for t in terms(g, d, u))


def frobenius_cpu(g, d, u, axes):
  """`frobenius` as one blocked variadic reduction (XLA:CPU)."""
  gd, dd, du, uu = cpu_sums((g * d, d * d, d * u, u * u), axes)
  return gd, dd, 2 * du + uu


def frobenius(g, d, u, axes):
  r"""$\langle g, d\rangle$, $\|d\|^2$ and $s = \langle u, 2d + u\rangle
  = \|d + u\|^2 - \|d\|^2$ over `axes`, summed per element (no
  cancellation), in the backend's formulation."""
  return lax.platform_dependent(
      g, d, u, cpu=functools.partial(frobenius_cpu, axes=axes),
      default=functools.partial(frobenius_plain, axes=axes))


def rows_plain(g, d, u, within):
  """`rows` as plain sums (XLA:TPU, XLA:GPU)."""
  new = jnp.abs(d + u)
  return (jnp.sum(g * d, axis=within), jnp.sum(new, axis=within),
          jnp.sum(new - jnp.abs(d), axis=within), jnp.sum(jnp.square(d + u), axis=within))


def rows_cpu(g, d, u, within):
  """`rows` as one blocked variadic reduction (XLA:CPU)."""
  new = jnp.abs(d + u)
  return cpu_sums((g * d, new, new - jnp.abs(d), jnp.square(d + u)), within)


def rows(g, d, u, within):
  """Per row, over its axes `within`: ⟨g, d⟩, ‖d + u‖₁, ‖d + u‖₁ - ‖d‖₁
  (summed per element) and ‖d + u‖², in the backend's formulation."""
  return lax.platform_dependent(
      g, d, u, cpu=functools.partial(rows_cpu, within=within),
      default=functools.partial(rows_plain, within=within))


def _add(a, b):
  return tuple(x + y for x, y in zip(a, b))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _variadic_sums(xs, axes):
  zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
  return lax.reduce(xs, zeros, _add, axes)


@_variadic_sums.defjvp
def _variadic_sums_jvp(axes, primals, tangents):
  # A variadic reduction has no JVP or transpose in JAX; the sums are
  # linear, so their tangents are sums too, as ordinary (transposable) ones.
  (xs,), (dxs,) = primals, tangents
  return _variadic_sums(xs, axes), tuple(jnp.sum(dx, axis=axes) for dx in dxs)


def cpu_sums(xs, axes):
  """Sums of every x in `xs` over `axes` from variadic reductions, accurate
  to float32's rounding whatever the shape.

  XLA:CPU accumulates a reduction in sequence, so one float32 sum over a
  long axis loses digits (2^21 squares: 1.5e-3 of ‖d‖², 8M: 1.2e-2). The
  reduced axes are summed as one, in blocks of CPU_BLOCK elements, then
  the blocks' sums in blocks again (2e-7 on the same leaves; the same step
  time, benchmarks/NOTES.md). Not where XLA splits the leaf over devices:
  there each device sums its part, and blocks would be sent between them.
  """
  if sharding.partitioned(xs[0]):
    return _variadic_sums(xs, axes)
  if sharding.explicit_mesh(xs[0]) is not None:
    # A one-device Explicit mesh: the leaf's type is sharded, and merging a
    # sharded axis in a reshape is a type error; on one device, replicated
    # is the same layout.
    xs = tuple(sharding.replicated(x, x) for x in xs)
  kept = tuple(i for i in range(xs[0].ndim) if i not in axes)
  xs = tuple(jnp.moveaxis(x, kept, tuple(range(len(kept)))) for x in xs)
  lead = xs[0].shape[:len(kept)]
  xs = tuple(x.reshape(*lead, math.prod(x.shape[len(kept):])) for x in xs)
  while xs[0].shape[-1] > CPU_BLOCK:
    n = xs[0].shape[-1]
    whole = n - n % CPU_BLOCK
    blocks = _variadic_sums(tuple(x[..., :whole].reshape(*lead, whole // CPU_BLOCK, CPU_BLOCK)
                                  for x in xs), (len(lead) + 1,))
    if whole < n:
      rest = _variadic_sums(tuple(x[..., whole:] for x in xs), (len(lead),))
      blocks = tuple(jnp.concatenate([b, r[..., None]], -1) for b, r in zip(blocks, rest))
    xs = blocks
  return _variadic_sums(xs, (len(lead),))
