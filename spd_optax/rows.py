r"""SPD for one leaf with row-wise norms (``norm="rows_l1"``): the authors'
later ``norm_type="mars"``, from their ``AdamH`` / MAPS code.

Per layer, and per row $i$ of the layer, $\|x\|_i = \sum_j |x_{ij}| + 10^{-8}$
over the row's other axes; the ratio is one value per row and each row is
pulled back by its own. The formula is on the algorithm page
(docs/algorithm.md, "Row-wise norms").
"""

import jax.numpy as jnp

from spd_optax import sums

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


def project_rows(g, p, a, u, lam, axes, psum_axes=(), layer_split=()):
  r"""SPD for one leaf whose layers index `axes`, with row-wise L1 norms.

  The numerator of each row's ratio is summed per element,
  $\sum_j (|\tilde\theta_t - \theta_0|_{ij} - |d_{ij}|)$: the same number
  without subtracting two norms (the two $10^{-8}$ cancel there, and stay in
  the denominator).

  Args:
    g, p, a, u: the leaf's gradient, params θ_{t-1}, anchor θ_0 (None for
      0) and proposed update.
    lam: the strength λ, a scalar or one per layer.
    axes: the leaf's layer axes.
    psum_axes, layer_split: must be empty: the row-wise norms are not
      computed inside `jax.shard_map` (`spd_optax.plan` refuses).

  Returns:
    ``(update, condition, ratio, deviation)`` as `projection.project` gives
    them; ``ratio`` is the mean over the layer's rows of the applied ratios
    (0 for a layer of no rows), ``deviation`` the Frobenius norm
    $\|\theta_t - \theta_0\|$ of the layer.
  """
  del psum_axes, layer_split  # empty (see above)
  acc = sums.acc_dtype(p.dtype)
  row, within = row_axes(p.ndim, axes)
  layer_shape = tuple(p.shape[i] for i in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  d = p_acc if a is None else p_acc - a.astype(acc)
  # Per row, with the summed axes kept as size 1 so everything broadcasts
  # back onto the leaf.
  gd, new, growth, squares = (jnp.expand_dims(s, within)
                              for s in sums.rows(g.astype(acc), d, u_acc, within))
  over_rows = () if row is None else (row,)
  condition = -jnp.sum(gd, axis=over_rows, keepdims=True)
  ratio = jnp.clip(growth / (new + ROW_NORM_EPS), 0, 1)
  ratio = jnp.where(condition < 0, ratio, 0)
  # λ: a scalar or one value per layer (the layer axes' shape).
  lam = jnp.asarray(lam).astype(acc)
  if lam.ndim:
    lam = jnp.expand_dims(lam, tuple(i for i in range(p.ndim) if i not in axes))
  scale = lam * ratio
  applied = scale != 0  # NaN strength shows, as in `projection.layer_values`
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
