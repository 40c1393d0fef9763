"""The per-layer SPD projection of one leaf: the step's arithmetic."""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from spd_optax import layout


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


# Elements per block of XLA:CPU's sums (see `_blocked_sums`).
CPU_BLOCK = 4096


def _blocked_sums(xs, axes):
  """`_variadic_sums(xs, axes)` accurate to float32's rounding whatever the
  shape: XLA:CPU accumulates a reduction in sequence, so one float32 sum
  over a long axis loses digits (2^21 squares: 1.5e-3 of ‖d‖², 8M: 1.2e-2).
  The reduced axes are summed as one, in blocks of CPU_BLOCK elements, then
  the blocks' sums in blocks again (2e-7 on the same leaves; the same step
  time, benchmarks/NOTES.md). Not where XLA splits the leaf over devices:
  there each device sums its part, and blocks would be sent between them."""
  if partitioned(xs[0]):
    return _variadic_sums(xs, axes)
  mesh = layout.explicit_mesh(xs[0])
  if mesh is not None:
    # A one-device Explicit mesh: the leaf's type is sharded, and merging a
    # sharded axis in a reshape is a type error; on one device, replicated
    # is the same layout.
    xs = tuple(jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.P()))
               for x in xs)
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


def _sums_cpu(g, d, u, axes):
  gd, dd, du, uu = _blocked_sums((g * d, d * d, d * u, u * u), axes)
  return gd, dd, 2 * du + uu


def partitioned(x) -> bool:
  """Whether XLA may split `x` over several devices: on a mesh of more than
  one, outside `jax.shard_map` (whose values are one device's own)."""
  mesh = layout.mesh_of(x)
  return (mesh is not None and mesh.size > 1
          and not jax.sharding.get_abstract_mesh().manual_axes)


def terms(g, d, u):
  """The per-element terms of ⟨g, d⟩, ‖d‖² and s = ⟨u, 2d + u⟩ (`_sums`)."""
  return g * d, d * d, u * (2 * d + u)


def _sums_plain(g, d, u, axes):
  # XLA:TPU and XLA:GPU fuse plain sibling sums into the pass that updates
  # the moments; a variadic reduction there becomes a pass of its own.
  return tuple(jnp.sum(t, axis=axes) for t in terms(g, d, u))


def _sums(g, d, u, axes):
  r"""$\langle g, d\rangle$, $\|d\|^2$ and $s = \langle u, 2d + u\rangle
  = \|d + u\|^2 - \|d\|^2$ over `axes`, summed per element (no
  cancellation). The one per-backend choice of the step: XLA:CPU is faster
  with variadic reductions, XLA:TPU and XLA:GPU with plain sums
  (benchmarks/NOTES.md)."""
  return lax.platform_dependent(
      g, d, u, cpu=functools.partial(_sums_cpu, axes=axes),
      default=functools.partial(_sums_plain, axes=axes))


def _sqrt(x):
  # sqrt with a finite derivative at 0 (at step 1 nothing has moved yet).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def project(g, p, a, u, lam, axes, psum_axes=(), sums=None, layer_split=()):
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
  Inside `jax.shard_map`, the per-layer sums are added over `psum_axes`,
  and `layer_split` names, per layer axis, the manual axes that split it
  (see `layer_sums`). `sums`, if given, are `layer_sums`'s, computed
  elsewhere (a kernel).

  The three stages (`layer_sums`, `layer_values`, `apply_scale`) are
  separate so that a step over many leaves can run the middle one once on
  every leaf's sums together (`selective_projection_decay` does).
  """
  if sums is None:
    sums = layer_sums(g, p, a, u, axes, psum_axes, layer_split)
  scale, *values = layer_values(*sums, lam)
  return (apply_scale(p, a, u, scale, axes, layer_split), *values)


def layer_sums(g, p, a, u, axes, psum_axes=(), layer_split=()):
  """Pass 1 over a leaf: ⟨g, d⟩, ‖d‖² and s per layer (see `project`), in
  `acc_dtype`, of the shape of the layer axes `axes`.

  Inside `jax.shard_map` a device holds part of the leaf: its sums are
  added over `psum_axes`, the manual axes that split a layer's elements;
  where a layer axis is split over devices (`layer_split`: per layer axis,
  the manual axes splitting it), the sums of every device's layers are
  gathered, so that the per-layer values are those of all layers, the same
  on every device."""
  acc = acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  d = p.astype(acc) if a is None else p.astype(acc) - a.astype(acc)  # θ_{t-1} - θ_0
  return across_devices(_sums(g.astype(acc), d, u.astype(acc), reduced),
                        psum_axes, layer_split)


def across_devices(sums, psum_axes=(), layer_split=()):
  """One device's per-layer sums made the whole leaf's, inside
  `jax.shard_map` (see `layer_sums`); unchanged elsewhere."""
  if psum_axes:  # each device summed its part of the layers' elements
    sums = lax.psum(sums, psum_axes)
  return tuple(_gather_layers(s, layer_split) for s in sums)


def _gather_layers(x, layer_split):
  """Per-layer sums of this device's layers placed among all layers' and
  added over the devices that split them. A psum, not an all_gather: its
  result is typed the same on every device, as `jax.shard_map`'s
  replication check wants of the state."""
  for k, names in enumerate(layer_split):
    if names:
      n = x.shape[k]
      full = jnp.zeros(x.shape[:k] + (n * lax.axis_size(names),) + x.shape[k + 1:],
                       x.dtype)
      x = lax.psum(lax.dynamic_update_slice_in_dim(full, x, lax.axis_index(names) * n, k),
                   names)
  return x


def _local_layers(x, layer_split):
  """The entries of a per-layer array for this device's layers: the
  inverse of `_gather_layers`."""
  for k, names in enumerate(layer_split):
    if names:
      n = x.shape[k] // lax.axis_size(names)
      x = lax.dynamic_slice_in_dim(x, lax.axis_index(names) * n, n, k)
  return x


def layer_values(gd, dd, s, lam):
  """(scale λr, condition, ratio, deviation) from the sums of `layer_sums`:
  element-wise, so one call serves any number of layers and leaves."""
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
  scale = jnp.asarray(lam).astype(gd.dtype) * ratio
  # `!= 0` rather than `> 0`: a NaN strength (traced, so it cannot raise)
  # must show in the result, not silently switch SPD off.
  ratio = jnp.where(scale != 0, ratio, 0)
  deviation = jnp.abs(1 - scale) * norm_new
  return scale, condition, ratio, deviation


def apply_scale(p, a, u, scale, axes, layer_split=()):
  """Pass 2 over a leaf: the update taking θ_{t-1} to θ_t, given the scale
  λr of each layer (the shape of the layer axes `axes`; of all layers where
  `layer_split` splits them over devices, see `layer_sums`)."""
  acc = acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  scale = jnp.expand_dims(_local_layers(scale, layer_split).astype(acc), reduced)
  # θ_t = θ̃_t - scale·(θ̃_t - θ_0), formed as the reference forms it, then
  # expressed as an update. `where`, not arithmetic, so a leaf SPD leaves
  # alone gets the inner update bit for bit (θ̃ - θ_{t-1} would round).
  # θ̃ - θ_0 from p and a again, not as d + u: on TPU and GPU, XLA would
  # otherwise keep d from the first pass, a param-sized buffer more.
  tilde = p_acc + u_acc
  away = tilde if a is None else tilde - a.astype(acc)
  return jnp.where(scale != 0, (tilde - scale * away - p_acc).astype(u.dtype), u)


def project_together(leaves: list, lams: list, like, sums=None) -> list:
  """`project` for several leaves, with one `layer_values` on the sums of
  all of them: the same numbers, in fewer small kernels.

  Args:
    leaves: per leaf, ``(g, p, a, u, axes, psum_axes, layer_split)`` as
      `project` takes.
    lams: per leaf, its strength (a scalar or the layer axes' shape).
    like: the state's packed per-layer array, whose dtype (and, on an
      Explicit mesh, replicated placement) the joined sums take.
    sums: per leaf, its `layer_sums` if computed elsewhere, else None.

  Returns:
    per leaf, ``(update, condition, ratio, deviation)`` as `project` does.
  """
  if not leaves:
    return []
  sums = [layer_sums(g, p, a, u, axes, over, split) if given is None else given
          for (g, p, a, u, axes, over, split), given
          in zip(leaves, sums or [None] * len(leaves))]
  shapes = [jnp.shape(s[0]) for s in sums]
  joined = [layout.concat([s[k] for s in sums], like) for k in range(3)]
  lam = layout.concat([jnp.broadcast_to(x, shape) for x, shape in zip(lams, shapes)], like)
  scale, *rows = layer_values(*joined, lam)
  return [(apply_scale(p, a, u, scale_i, axes, split), *values)
          for (_, p, a, u, axes, _, split), scale_i, *values
          in zip(leaves, layout.split(scale, shapes), *(layout.split(r, shapes) for r in rows))]


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


# Added to every row's L1 norm, as the authors' "mars" norm adds it: it keeps
# the ratio's denominator positive, so a row that has not moved gets r = 0.
ROW_NORM_EPS = 1e-8


def row_axes(ndim: int, axes) -> tuple[int | None, tuple[int, ...]]:
  """(row axis, axes summed within a row) of a leaf whose layers index `axes`.

  A layer's rows lie along its first axis, as in the authors' norm (axis 0
  of the tensor they are given). For a leaf stacking layers, that is the
  first axis that is not a layer axis, so a stacked leaf ``[L, rows, ...]``
  has, per layer, the rows the unstacked leaf ``[rows, ...]`` has. A layer of
  fewer than two axes (a bias, a scale) is one row: their norm sums over
  ``dim=tuple(range(1, ndim))``, which PyTorch takes for every axis when it
  is empty.
  """
  rest = tuple(i for i in range(ndim) if i not in axes)
  if len(rest) < 2:
    return None, rest
  return rest[0], rest[1:]


def _row_sums_cpu(g, d, u, within):
  new = jnp.abs(d + u)
  return _blocked_sums((g * d, new, new - jnp.abs(d), jnp.square(d + u)), within)


def _row_sums_plain(g, d, u, within):
  new = jnp.abs(d + u)
  return (jnp.sum(g * d, axis=within), jnp.sum(new, axis=within),
          jnp.sum(new - jnp.abs(d), axis=within), jnp.sum(jnp.square(d + u), axis=within))


def project_rows(g, p, a, u, lam, axes, psum_axes=()):
  r"""SPD for one leaf with the authors' row-wise ("mars") norms.

  With $d = \theta_{t-1} - \theta_0$, per layer, and per row $i$ of the
  layer (its first axis, `row_axes`), $\|x\|_i = \sum_j |x_{ij}| + 10^{-8}$
  (the L1 norm of row $i$ over all its other axes):

  $$
  c = -\langle g, d\rangle, \quad
  r_i = [c < 0]\,\operatorname{clip}\Big(\frac{\|\tilde\theta_t - \theta_0\|_i
      - \|d\|_i}{\|\tilde\theta_t - \theta_0\|_i}, 0, 1\Big), \quad
  \theta_{t,i} = \tilde\theta_{t,i} - \lambda r_i\,(\tilde\theta_{t,i} - \theta_{0,i})
  $$

  The numerator is summed per element, $\sum_j (|\tilde\theta_t - \theta_0|_{ij}
  - |d_{ij}|)$, the same number without subtracting two norms (the two
  $10^{-8}$ cancel there, and stay in the denominator).

  Returns (update, condition, ratio, deviation) per layer, as `project`
  does; ``ratio`` is the mean over the layer's rows of the applied $r_i$,
  and ``deviation`` is the Frobenius norm $\|\theta_t - \theta_0\|$ of the layer.
  """
  if psum_axes:
    # A device's part of a leaf may hold whole rows or parts of rows; which,
    # cannot be told from inside shard_map, and per-row sums added over
    # devices would be wrong in the first case.
    raise ValueError(
        "norm='rows_l1' inside jax.shard_map with axis_name is not supported: "
        "call the optimizer under jax.jit (sharding left to the compiler), or "
        "use norm='frobenius'.")
  acc = acc_dtype(p.dtype)
  row, within = row_axes(p.ndim, axes)
  layer_shape = tuple(p.shape[i] for i in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  d = p_acc if a is None else p_acc - a.astype(acc)
  # Per row, with the summed axes kept as size 1 so everything broadcasts
  # back onto the leaf.
  gd, new, growth, squares = (
      jnp.expand_dims(s, within) for s in lax.platform_dependent(
          g.astype(acc), d, u_acc,
          cpu=functools.partial(_row_sums_cpu, within=within),
          default=functools.partial(_row_sums_plain, within=within)))
  over_rows = () if row is None else (row,)
  condition = -jnp.sum(gd, axis=over_rows, keepdims=True)
  ratio = jnp.clip(growth / (new + ROW_NORM_EPS), 0, 1)
  ratio = jnp.where(condition < 0, ratio, 0)
  # λ: a scalar or one value per layer (the layer axes' shape).
  lam = jnp.asarray(lam).astype(acc)
  if lam.ndim:
    lam = jnp.expand_dims(lam, tuple(i for i in range(p.ndim) if i not in axes))
  scale = lam * ratio
  applied = scale != 0  # NaN strength shows, as in `project`
  ratio = jnp.where(applied, ratio, 0)
  tilde = p_acc + u_acc
  away = tilde if a is None else tilde - a.astype(acc)
  update = jnp.where(applied, (tilde - scale * away - p_acc).astype(u.dtype), u)
  # ‖θ_t - θ_0‖² = Σ_i (1 - λ r_i)² ‖θ̃_t - θ_0‖²_i (row-wise squared L2).
  deviation = jnp.sqrt(jnp.sum(jnp.square(1 - scale) * squares, axis=over_rows,
                               keepdims=True))
  # A layer of no rows has no ratio to average: 0, as for one not decayed.
  rows = 1 if row is None else p.shape[row]
  mean_ratio = jnp.sum(ratio, axis=over_rows, keepdims=True) / max(rows, 1)
  per_layer = lambda x: jnp.reshape(x, layer_shape)
  return update, per_layer(condition), per_layer(mean_ratio), per_layer(deviation)
