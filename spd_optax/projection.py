r"""SPD's projection: the arithmetic of one leaf in three pure stages, and
the order in which a step runs them over all leaves.

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
pass; `project_leaves` runs them for a whole step.
"""

import jax.numpy as jnp

from spd_optax import layout
from spd_optax import rows
from spd_optax import sharding
from spd_optax import sums as sums_lib


def layer_sums(g, p, a, u, axes, psum_axes=(), layer_split=()):
  """Pass 1 over a leaf: ⟨g, d⟩, ‖d‖² and s per layer, in
  `sums.acc_dtype`, of the shape of the layer axes `axes`. Inside
  `jax.shard_map`, made the whole leaf's over `psum_axes` and `layer_split`
  (`sharding.across_devices`)."""
  acc = sums_lib.acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  d = p.astype(acc) if a is None else p.astype(acc) - a.astype(acc)  # θ_{t-1} - θ_0
  return sharding.across_devices(sums_lib.frobenius(g.astype(acc), d, u.astype(acc), reduced),
                                 psum_axes, layer_split)


def _sqrt(x):
  # sqrt with a finite derivative at 0 (at step 1 nothing has moved yet).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


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
  λr of each layer (of all layers, where `layer_split` splits them over
  devices); exactly ``u`` on layers SPD leaves alone."""
  acc = sums_lib.acc_dtype(p.dtype)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  scale = jnp.expand_dims(sharding.local_layers(scale, layer_split).astype(acc), reduced)
  # θ_t = θ̃_t - scale·(θ̃_t - θ_0), formed as the reference forms it, then
  # expressed as an update. `where`, not arithmetic, so a leaf SPD leaves
  # alone gets the inner update bit for bit (θ̃ - θ_{t-1} would round).
  # θ̃ - θ_0 from p and a again, not as d + u: on TPU and GPU, XLA would
  # otherwise keep d from the first pass, a param-sized buffer more.
  tilde = p_acc + u_acc
  away = tilde if a is None else tilde - a.astype(acc)
  return jnp.where(scale != 0, (tilde - scale * away - p_acc).astype(u.dtype), u)


def project(g, p, a, u, lam, axes, psum_axes=(), layer_split=(), sums=None):
  """SPD for one leaf whose layers index `axes`: the three stages.

  Args:
    g, p, a, u: the leaf's gradient, params θ_{t-1}, anchor θ_0 (None for
      0) and the inner optimizer's update.
    lam: the strength λ, a scalar or of the layer axes' shape.
    axes: the leaf's layer axes.
    psum_axes, layer_split: inside `jax.shard_map`, how the leaf is split
      (`sharding.manual_split`).
    sums: the leaf's `layer_sums`, if computed elsewhere.

  Returns:
    ``(update, condition, ratio, deviation)``, the last three of the layer
    axes' shape; ``update`` is θ_t - θ_{t-1}, for `optax.apply_updates`.
  """
  if sums is None:
    sums = layer_sums(g, p, a, u, axes, psum_axes, layer_split)
  scale, *values = layer_values(*sums, lam)
  return (apply_scale(p, a, u, scale, axes, layer_split), *values)


def project_leaves(leaves, grads, params, anchors, proposed, lams, like, *,
                   norm="frobenius", anchor_on_host=False, given=None) -> list:
  """SPD for every leaf of a step, in the order that suits the compilers.

  A stacked leaf's per-layer values are [L]-sized arrays, which XLA:TPU
  computes in small fusions of a fixed cost each, so all stacked leaves get
  theirs from one `layer_values` on their joined sums; a one-layer leaf's
  are scalars, cheaper per leaf. A host anchor goes leaf by leaf, each
  moved in after the previous leaf's update (`sharding.anchor_to_device`).

  Args:
    leaves: the step's `plan.Leaf` records, one per leaf SPD acts on.
    grads, params, anchors, proposed: all leaves' gradients, params,
      anchors (None for the zero anchor) and inner updates, in the params'
      flatten order (`Leaf.index`).
    lams: per record, its strength.
    like: the state's packed per-layer array, whose dtype (and, on an
      Explicit mesh, replicated placement) the joined sums take.
    norm: ``"frobenius"`` or ``"rows_l1"`` (`rows.project_rows`).
    anchor_on_host: whether the anchors are in host memory.
    given: `Leaf.index` -> that leaf's `layer_sums`, computed elsewhere.

  Returns:
    Per record, ``(update, condition, ratio, deviation)``.
  """
  given = given or {}
  arrays = lambda l: (grads[l.index], params[l.index], anchors[l.index], proposed[l.index])
  together = [(l, lam) for l, lam in zip(leaves, lams)
              if l.layer_shape != () and norm == "frobenius" and not anchor_on_host]
  results = dict(zip([l.index for l, _ in together], _together(together, arrays, like, given)))
  previous = None
  for leaf, lam in zip(leaves, lams):
    if leaf.index in results:
      continue
    g, p, a, u = arrays(leaf)
    if anchor_on_host:
      # Tied to the previous leaf's update, so XLA cannot start this
      # leaf's work before that one's is done (it may still start the
      # transfer early: benchmarks/NOTES.md).
      a = sharding.anchor_to_device(a, after=previous)
    one = project if norm == "frobenius" else rows.project_rows
    extra = {"sums": given[leaf.index]} if leaf.index in given else {}
    results[leaf.index] = one(g, p, a, u, lam, leaf.axes, leaf.psum_axes,
                              leaf.layer_split, **extra)
    previous = results[leaf.index][0]
  return [results[l.index] for l in leaves]


def _together(pairs, arrays, like, given) -> list:
  """`project` for several leaves, with one `layer_values` on the sums of
  all of them: the same numbers, in fewer small kernels."""
  if not pairs:
    return []
  sums = [given.get(l.index) or layer_sums(*arrays(l), l.axes, l.psum_axes, l.layer_split)
          for l, _ in pairs]
  shapes = [jnp.shape(s[0]) for s in sums]
  joined = [layout.concat([s[k] for s in sums], like) for k in range(3)]
  lam = layout.concat([jnp.broadcast_to(x, shape) for (_, x), shape in zip(pairs, shapes)],
                      like)
  scale, *values = layer_values(*joined, lam)
  out = []
  for (leaf, _), scale_i, *values_i in zip(pairs, layout.split(scale, shapes),
                                           *(layout.split(v, shapes) for v in values)):
    _, p, a, u = arrays(leaf)
    out.append((apply_scale(p, a, u, scale_i, leaf.axes, leaf.layer_split), *values_i))
  return out
