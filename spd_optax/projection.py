"""The per-layer SPD projection of one leaf: the step's arithmetic."""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def acc_dtype(dtype) -> jnp.dtype:
  # Sums over millions of bfloat16 elements lose the signal; float64 params
  # keep float64 so the float64 golden runs agree to 1e-9.
  return jnp.promote_types(dtype, jnp.float32)


def _add(a, b):
  return tuple(x + y for x, y in zip(a, b))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sums(xs, axes):
  """Sums of every x in `xs` over `axes`, from one variadic reduction, so
  XLA reads the operands' inputs once for all (separate sums read them once
  each)."""
  zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
  return lax.reduce(xs, zeros, _add, axes)


@_sums.defjvp
def _sums_jvp(axes, primals, tangents):
  # A variadic reduction has no JVP or transpose in JAX; the sums are
  # linear, so their tangents are sums too, as ordinary (transposable) ones.
  (xs,), (dxs,) = primals, tangents
  return _sums(xs, axes), tuple(jnp.sum(dx, axis=axes) for dx in dxs)


def _sqrt(x):
  # sqrt with a finite derivative at 0 (at step 1 nothing has moved yet).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def project(g, p, a, u, lam, axes, psum_axes=()):
  """SPD for one leaf whose layers index `axes`. Returns (update, condition,
  ratio, deviation), the last three of the shape of those axes. Inside
  `jax.shard_map`, the per-layer sums are added over `psum_axes`."""
  acc = acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  d = p_acc if a is None else p_acc - a.astype(acc)  # θ_{t-1} - θ_0
  sums = _sums((g.astype(acc) * d, d * d, d * u_acc, u_acc * u_acc), reduced)
  if psum_axes:  # inside shard_map, each device summed its part of the leaf
    sums = lax.psum(sums, psum_axes)
  gd, dd, du, uu = sums
  condition = -gd
  norm_prev = _sqrt(dd)
  norm_new = _sqrt(dd + 2 * du + uu)  # ‖θ̃_t - θ_0‖
  # ‖θ̃-θ_0‖ - ‖θ_{t-1}-θ_0‖ without the cancellation of subtracting norms.
  growth = (2 * du + uu) / jnp.where(norm_new + norm_prev > 0, norm_new + norm_prev, 1)
  # The reference divides by ‖θ̃ - θ_0‖ unguarded; where it is 0 nothing moved
  # away from the anchor, so there is nothing to decay.
  ratio = jnp.where(norm_new > 0,
                    jnp.clip(growth / jnp.where(norm_new > 0, norm_new, 1), 0, 1), 0)
  ratio = jnp.where(condition < 0, ratio, 0)
  scale = lam.astype(acc) * ratio
  # `!= 0` rather than `> 0`: a NaN strength (traced, so it cannot raise)
  # must show in the result, not silently switch SPD off.
  applied = scale != 0
  ratio = jnp.where(applied, ratio, 0)
  scale_b = jnp.expand_dims(scale, reduced)
  # θ_t = θ̃_t - scale·(θ̃_t - θ_0), formed as the reference forms it, then
  # expressed as an update. `where`, not arithmetic, so a leaf SPD leaves
  # alone gets the inner update bit for bit (θ̃ - θ_{t-1} would round).
  tilde = p_acc + u_acc
  update = jnp.where(jnp.expand_dims(applied, reduced),
                     (tilde - scale_b * (d + u_acc) - p_acc).astype(u.dtype), u)
  deviation = jnp.abs(1 - scale) * norm_new
  return update, condition, ratio, deviation
