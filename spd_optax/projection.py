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
def _variadic_sums(xs, axes):
  """Sums of every x in `xs` over `axes`, from one variadic reduction, so
  XLA:CPU reads the operands' inputs once for all (separate sums read them
  once each there)."""
  zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
  return lax.reduce(xs, zeros, _add, axes)


@_variadic_sums.defjvp
def _variadic_sums_jvp(axes, primals, tangents):
  # A variadic reduction has no JVP or transpose in JAX; the sums are
  # linear, so their tangents are sums too, as ordinary (transposable) ones.
  (xs,), (dxs,) = primals, tangents
  return _variadic_sums(xs, axes), tuple(jnp.sum(dx, axis=axes) for dx in dxs)


def _sums_cpu(g, d, u, axes):
  gd, dd, du, uu = _variadic_sums((g * d, d * d, d * u, u * u), axes)
  return gd, dd, 2 * du + uu


def _sums_plain(g, d, u, axes):
  # XLA:TPU and XLA:GPU fuse plain sibling sums into the pass that updates
  # the moments; a variadic reduction there becomes a pass of its own.
  return (jnp.sum(g * d, axis=axes), jnp.sum(d * d, axis=axes),
          jnp.sum(u * (2 * d + u), axis=axes))


def _sums(g, d, u, axes):
  r"""$\langle g, d\rangle$, $\|d\|^2$ and $s = \langle u, 2d + u\rangle
  = \|d + u\|^2 - \|d\|^2$ over `axes`, summed per element (no
  cancellation). The one per-backend choice of the step: XLA:CPU is faster
  with one variadic reduction, XLA:TPU and XLA:GPU with plain sums
  (benchmarks/NOTES.md)."""
  return lax.platform_dependent(
      g, d, u, cpu=functools.partial(_sums_cpu, axes=axes),
      default=functools.partial(_sums_plain, axes=axes))


def _sqrt(x):
  # sqrt with a finite derivative at 0 (at step 1 nothing has moved yet).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def project(g, p, a, u, lam, axes, psum_axes=()):
  r"""SPD for one leaf whose layers index `axes`.

  With $d = \theta_{t-1} - \theta_0$ and $s = \langle u, 2d + u\rangle$
  (so $\|\tilde\theta_t - \theta_0\|^2 = \|d\|^2 + s$):

  $$
  c = -\langle g, d\rangle, \quad
  r = [c < 0]\,\operatorname{clip}\Big(\frac{s}{(\|\tilde\theta_t - \theta_0\|
      + \|d\|)\,\|\tilde\theta_t - \theta_0\|}, 0, 1\Big), \quad
  \theta_t = \tilde\theta_t - \lambda r\,(\tilde\theta_t - \theta_0)
  $$

  per layer; the first fraction is the reference's
  $(\|\tilde\theta_t-\theta_0\| - \|d\|)/\|\tilde\theta_t-\theta_0\|$
  without subtracting the norms.

  Returns (update, condition, ratio, deviation), the last three of the
  shape of those axes; ``update`` is $\theta_t - \theta_{t-1}$ for
  `optax.apply_updates`, and exactly ``u`` on layers SPD leaves alone.
  Inside `jax.shard_map`, the per-layer sums are added over `psum_axes`.
  """
  acc = acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  d = p_acc if a is None else p_acc - a.astype(acc)  # θ_{t-1} - θ_0
  sums = _sums(g.astype(acc), d, u_acc, reduced)
  if psum_axes:  # inside shard_map, each device summed its part of the leaf
    sums = lax.psum(sums, psum_axes)
  gd, dd, s = sums
  condition = -gd
  norm_prev = _sqrt(dd)
  norm_new = _sqrt(dd + s)  # ‖θ̃_t - θ_0‖
  # ‖θ̃-θ_0‖ - ‖θ_{t-1}-θ_0‖ without the cancellation of subtracting norms.
  growth = s / jnp.where(norm_new + norm_prev > 0, norm_new + norm_prev, 1)
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
  # θ̃ - θ_0 from p and a again, not as d + u: on TPU and GPU, XLA would
  # otherwise keep d from the first pass, a param-sized buffer more.
  tilde = p_acc + u_acc
  away = tilde if a is None else tilde - a.astype(acc)
  update = jnp.where(jnp.expand_dims(applied, reduced),
                     (tilde - scale_b * away - p_acc).astype(u.dtype), u)
  deviation = jnp.abs(1 - scale) * norm_new
  return update, condition, ratio, deviation


def anchor_to_device(anchor, after=None):
  """One leaf's host anchor in device memory, held back until `after` exists.

  Moving every leaf's anchor in at the start of a step keeps all of them
  on the device together, which raises the device peak above keeping the
  anchor there (XLA:TPU's memory analysis, benchmarks/NOTES.md). Called
  per leaf with the previous leaf's result as `after`, the moved copy is
  tied to that result by `lax.optimization_barrier`, so XLA cannot start
  the leaf's work (and hold its anchor) before the previous leaf is done.
  The values are exactly `anchor`'s.

  Args:
    anchor: one leaf of the anchor, in host memory (or device memory: the
      move is then a no-op); None (the zero anchor) and `optax.MaskedNode`
      pass through.
    after: an array or tree to wait for, e.g. the previous leaf's update;
      None for the first leaf.
  """
  if anchor is None or not hasattr(anchor, "shape"):
    return anchor
  anchor = jax.device_put(anchor, jax.memory.Space.Device)
  if after is not None:
    # The barrier on the moved copy, not on the host value: XLA's host
    # offloading moves a barrier's host operands to the device first.
    anchor, _ = lax.optimization_barrier((anchor, after))
  return anchor
