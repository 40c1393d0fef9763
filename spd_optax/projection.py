r"""SPD's arithmetic for one leaf, in three pure stages.

With $d = \theta_{t-1} - \theta_0$ and $s = \langle u, 2d + u\rangle$ (so
$\|\tilde\theta_t - \theta_0\|^2 = \|d\|^2 + s$), per layer:

$$
c = -\langle g, d\rangle, \quad
r = [c < 0]\,\operatorname{clip}\Big(\frac{s}{(\|\tilde\theta_t - \theta_0\|
    + \|d\|)\,\|\tilde\theta_t - \theta_0\|}, 0, 1\Big), \quad
\theta_t = \tilde\theta_t - \lambda r\,(\tilde\theta_t - \theta_0),
$$

where the first fraction is the reference's
$(\|\tilde\theta_t-\theta_0\| - \|d\|)/\|\tilde\theta_t-\theta_0\|$ without
subtracting the norms (docs/algorithm.md). `layer_sums` is the first pass
over a leaf, `layer_values` the per-layer scalars, `apply_scale` the second
pass.

With ``norm="rows_l1"`` (the authors' later ``norm_type="mars"``, from their
``AdamH`` / MAPS code) the norms are per row of each layer,
$\|x\|_i = \sum_j |x_{ij}| + 10^{-8}$ over the row's other axes, and each
row is pulled back by its own ratio; the condition stays per layer.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from spd_optax import sharding

# Added to every row's L1 norm, as the authors' "mars" norm adds it: it keeps
# the ratio's denominator positive, so a row that has not moved gets r = 0.
ROW_NORM_EPS = 1e-8
# Elements per block of XLA:CPU's sums (see `_blocked_sums`).
CPU_BLOCK = 4096


def acc_dtype(dtype) -> jnp.dtype:
  """The dtype SPD sums in: at least float32 (sums over millions of
  bfloat16 elements lose the signal), float64 for float64 params (the
  float64 golden runs agree to 1e-9)."""
  return jnp.promote_types(dtype, jnp.float32)


def reduced_axes(ndim: int, axes, norm: str) -> tuple[int, ...]:
  """The axes a leaf's sums run over: all but its layer axes `axes`; for
  ``rows_l1`` also all but the row axis, a layer's first axis (the first
  that is not a layer axis, as in the authors' norm of the tensor they are
  given). A layer of fewer than two axes (a bias) is one row."""
  rest = tuple(i for i in range(ndim) if i not in axes)
  return rest[1:] if norm == "rows_l1" and len(rest) >= 2 else rest


def layer_sums(g, p, a, u, axes, norm="frobenius", psum_axes=(), layer_split=()):
  """Pass 1 over a leaf, in `acc_dtype`, with the reduced axes kept as size
  1 (so the results broadcast onto the leaf). ``frobenius``: ⟨g, d⟩, ‖d‖²
  and s per layer. ``rows_l1``: per row, ⟨g, d⟩, ‖d + u‖₁, ‖d + u‖₁ - ‖d‖₁
  (summed per element, no cancellation) and ‖d + u‖². Inside
  `jax.shard_map`, made the whole leaf's (`sharding.across_devices`)."""
  acc = acc_dtype(p.dtype)
  d = p.astype(acc) if a is None else p.astype(acc) - a.astype(acc)  # θ_{t-1} - θ_0
  sums = _sums(g.astype(acc), d, u.astype(acc), reduced_axes(p.ndim, axes, norm), norm)
  return sharding.across_devices(sums, axes, psum_axes, layer_split)


def _sqrt(x):
  # sqrt with a finite derivative at 0 (at step 1 nothing has moved yet).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def layer_values(sums, lam, axes, norm="frobenius"):
  """(scale λr, condition, ratio, deviation) from `layer_sums`' results.

  The scale broadcasts onto the leaf (per layer, or per row for
  ``rows_l1``); the other three have the reduced axes kept as size 1:
  per layer, the condition c_t, the applied ratio (0 wherever no decay was
  applied; for ``rows_l1`` the mean over the layer's rows) and
  ‖θ_t - θ_0‖ (Frobenius for both norms)."""
  lam = jnp.asarray(lam).astype(sums[0].dtype)
  if lam.ndim:  # one per layer: onto the layer axes of the leaf
    lam = jnp.expand_dims(lam, tuple(i for i in range(sums[0].ndim) if i not in axes))
  rest = tuple(i for i in range(sums[0].ndim) if i not in axes)
  rows = rest[:1] if norm == "rows_l1" and len(rest) >= 2 else ()
  if norm == "frobenius":
    gd, dd, s = sums
    norm_prev, norm_new = _sqrt(dd), _sqrt(dd + s)  # ‖θ_{t-1} - θ_0‖, ‖θ̃_t - θ_0‖
    # ‖θ̃-θ_0‖ - ‖θ_{t-1}-θ_0‖ without the cancellation of subtracting norms.
    growth = s / jnp.where(norm_new + norm_prev > 0, norm_new + norm_prev, 1)
    # The reference divides by ‖θ̃ - θ_0‖ unguarded; where it is 0 nothing
    # moved away from the anchor, so there is nothing to decay.
    ratio = jnp.where(norm_new > 0,
                      jnp.clip(growth / jnp.where(norm_new > 0, norm_new, 1), 0, 1), 0)
  else:
    gd, new, growth, squares = sums
    ratio = jnp.clip(growth / (new + ROW_NORM_EPS), 0, 1)
  condition = -jnp.sum(gd, axis=rows, keepdims=True)
  scale = lam * jnp.where(condition < 0, ratio, 0)
  # `!= 0` rather than `> 0`: a NaN strength (traced, so it cannot raise)
  # must show in the result, not silently switch SPD off.
  ratio = jnp.where(scale != 0, ratio, 0)
  if norm == "frobenius":
    deviation = jnp.abs(1 - scale) * norm_new
  else:  # ‖θ_t - θ_0‖² = Σ_i (1 - λ r_i)² ‖θ̃_t - θ_0‖²_i over the rows i
    deviation = jnp.sqrt(jnp.sum(jnp.square(1 - scale) * squares, axis=rows, keepdims=True))
  # A layer of no rows has no ratio to average: 0, as for one not decayed.
  n_rows = math.prod(gd.shape[i] for i in rows)
  mean_ratio = jnp.sum(ratio, axis=rows, keepdims=True) / max(n_rows, 1)
  return scale, condition, mean_ratio, deviation


def apply_scale(p, a, u, scale):
  """Pass 2 over a leaf: the update taking θ_{t-1} to θ_t, given the scale
  λr broadcasting onto it; exactly ``u`` where the scale is 0."""
  acc = acc_dtype(p.dtype)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  # θ_t = θ̃_t - scale·(θ̃_t - θ_0), formed as the reference forms it, then
  # expressed as an update. `where`, not arithmetic, so a leaf SPD leaves
  # alone gets the inner update bit for bit (θ̃ - θ_{t-1} would round).
  # θ̃ - θ_0 from p and a again, not as d + u: on TPU and GPU, XLA would
  # otherwise keep d from the first pass, a param-sized buffer more.
  tilde = p_acc + u_acc
  away = tilde if a is None else tilde - a.astype(acc)
  return jnp.where(scale != 0, (tilde - scale.astype(acc) * away - p_acc).astype(u.dtype), u)


def project(g, p, a, u, lam, axes, norm="frobenius", psum_axes=(), layer_split=()):
  """SPD for one leaf whose layers index `axes`: the three stages.

  Args:
    g, p, a, u: the leaf's gradient, params θ_{t-1}, anchor θ_0 (None for
      0) and the inner optimizer's update.
    lam: the strength λ, a scalar or of the layer axes' shape.
    axes: the leaf's layer axes (sorted).
    norm: ``"frobenius"`` or ``"rows_l1"``.
    psum_axes, layer_split: inside `jax.shard_map`, how the leaf is split
      (`spd_optax.options.Leaf`).

  Returns:
    ``(update, condition, ratio, deviation)``, the last three of the layer
    axes' shape (over the whole leaf); ``update`` is θ_t - θ_{t-1}.
  """
  sums = layer_sums(g, p, a, u, axes, norm, psum_axes, layer_split)
  scale, *values = layer_values(sums, lam, axes, norm)
  update = apply_scale(p, a, u, sharding.local_layers(scale, axes, layer_split))
  per_layer = lambda x: x.reshape(tuple(x.shape[i] for i in axes))
  return (update, *map(per_layer, values))


# --------------------------------------------------------------------------
# The sums' formulation: the one place where the step depends on the backend.


def _sums(g, d, u, axes, norm):
  """`layer_sums`' sums over `axes` (kept as size 1), summed per element.
  XLA:TPU and XLA:GPU fuse plain sibling sums into the pass that updates
  the moments, where a variadic reduction becomes a pass of its own;
  XLA:CPU is faster with one variadic reduction, which reads the operands'
  inputs once for all, and needs blocks for accuracy (benchmarks/NOTES.md)."""
  if norm == "rows_l1":
    terms = lambda g, d, u: (g * d, jnp.abs(d + u), jnp.abs(d + u) - jnp.abs(d),
                             jnp.square(d + u))
    cpu = lambda g, d, u: _blocked_sums(terms(g, d, u), axes)
  else:
    terms = lambda g, d, u: (g * d, d * d, u * (2 * d + u))

    def cpu(g, d, u):  # s from ⟨d, u⟩ and ‖u‖², as XLA:CPU's runs were recorded
      gd, dd, du, uu = _blocked_sums((g * d, d * d, d * u, u * u), axes)
      return gd, dd, 2 * du + uu
  return lax.platform_dependent(
      g, d, u, cpu=cpu,
      default=lambda g, d, u: tuple(jnp.sum(t, axis=axes, keepdims=True) for t in terms(g, d, u)))


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


def _blocked_sums(xs, axes):
  """Sums of every x in `xs` over `axes` from variadic reductions, accurate
  to float32's rounding whatever the shape.

  XLA:CPU accumulates a reduction in sequence, so one float32 sum over a
  long axis loses digits (2^21 squares: 1.5e-3 of ‖d‖², 8M: 1.2e-2, an 18%
  error in one step's ratio). The reduced axes are summed as one, in blocks
  of CPU_BLOCK elements, then the blocks' sums in blocks again (2e-7 on
  the same leaves; the same step time). Not where XLA splits the leaf over
  devices: there each device sums its part, and blocks would be sent
  between them.
  """
  out_shape = tuple(1 if i in axes else n for i, n in enumerate(xs[0].shape))
  if sharding.partitioned(xs[0]):
    return tuple(s.reshape(out_shape) for s in _variadic_sums(xs, axes))
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
  return tuple(s.reshape(out_shape) for s in _variadic_sums(xs, (len(lead),)))
