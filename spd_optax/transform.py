"""Selective Projection Decay around any Optax optimizer."""

import functools
from typing import Any, Callable, NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from spd_optax import _compat
from spd_optax import adam
from spd_optax import layers
from spd_optax import layout as layout_lib
from spd_optax import projection
from spd_optax import trees

ANCHORS = ("params", "zeros")

class SPDState(NamedTuple):
  """State of `selective_projection_decay`.

  The per-layer values are read by name through `condition`, `ratio` and
  `deviation`: trees like params holding, per leaf, an array of the shape
  of its layer axes (a scalar for a leaf that is one layer, the default;
  ``[L]`` for a leaf stacking L layers along ``layer_axes=0``) and
  `optax.MaskedNode()` where SPD leaves the leaf alone. They are stored
  packed in one small array, `per_layer`, so that a jitted step passes one
  array for them instead of three per leaf; it is never params-shaped, so
  `optax.tree_map_params` passes it to ``transform_non_params``.

  Attributes:
    count: steps taken, for a `weight_decay` schedule.
    inner_state: the base optimizer's state.
    anchor: θ_0 per leaf (like params); `optax.MaskedNode()` on leaves SPD
      leaves alone; `None` for the zero anchor, which stores nothing.
    per_layer: ``[3, layers]``, the rows `condition`, `ratio` and
      `deviation` of every layer of every SPD leaf, in the params' flatten
      order; replicated on the params' mesh.
    layout: which columns of `per_layer` belong to which leaf (static: no
      arrays, part of the tree structure).
  """
  count: jax.Array
  inner_state: optax.OptState
  anchor: Any
  per_layer: jax.Array
  layout: layout_lib.Layout

  @property
  def condition(self):
    """Per layer, c_t = -<g_t, θ_{t-1} - θ_0> of the last step."""
    return self.layout.unpack(self.per_layer, 0)

  @property
  def ratio(self):
    """Per layer, the r_t applied at the last step: 0 wherever no decay was
    applied (c_t >= 0, nothing moved away, or λ = 0). With
    ``norm="rows_l1"``, the mean over the layer's rows of the applied
    per-row ratios."""
    return self.layout.unpack(self.per_layer, 1)

  @property
  def deviation(self):
    """Per layer, ‖θ_t - θ_0‖ after the last step."""
    return self.layout.unpack(self.per_layer, 2)


def check_non_negative(name: str, value) -> None:
  """Raises for a concrete negative or NaN value; traced values (under
  `optax.inject_hyperparams` inside `jit`) and schedules pass through."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  value = np.asarray(value)
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f"{name} must be >= 0 and not NaN, got {value}.")


NORMS = ("frobenius", "rows_l1")
FIRST_PASSES = ("xla", "pallas")


def is_per_leaf(weight_decay) -> bool:
  """Whether `weight_decay` gives λ per leaf (a tree like params or a prefix
  of it, or an array of the layers' shape) rather than one for all."""
  if callable(weight_decay) or isinstance(weight_decay, jax.core.Tracer):
    return False
  if isinstance(weight_decay, (jax.Array, np.ndarray)):
    return np.ndim(weight_decay) > 0
  return not jax.tree_util.treedef_is_leaf(jax.tree.structure(weight_decay))


def _is_strength_entry(x) -> bool:
  # None would vanish from a tree's leaves (and read as a missing entry):
  # kept as an entry, so that the error names it.
  return x is None or callable(x) or isinstance(x, (jax.Array, np.ndarray))


def _strength_entries(weight_decay, params) -> list:
  return trees.broadcast_prefix(weight_decay, params, "weight_decay",
                                _is_strength_entry)


def check_strengths(weight_decay, params, flags, shapes) -> None:
  """Raises for an entry of a per-leaf `weight_decay` that can never be a
  strength of its leaf: not a number, NaN, negative, or an array that is not
  of the leaf's per-layer shape. Schedules and traced values pass."""
  entries = _strength_entries(weight_decay, params)
  for path, entry, on, shape in zip(trees.leaf_paths(params), entries, flags, shapes):
    if not on or callable(entry):
      continue
    what = (f"weight_decay for params{path} must be a float >= 0, a schedule, "
            f"or an array of its per-layer shape {shape}")
    if entry is None or _is_bool(entry) or isinstance(entry, (bool, str, bytes)):
      raise TypeError(f"{what}; got {entry!r}.")
    if np.shape(entry) not in ((), shape):
      raise ValueError(f"{what} (from layer_axes); got shape {np.shape(entry)}.")
    if isinstance(entry, jax.core.Tracer):
      continue
    try:
      value = np.asarray(entry)
    except (TypeError, ValueError):
      raise TypeError(f"{what}; got {entry!r}.") from None
    if value.dtype.kind not in "iuf":
      raise TypeError(f"{what}; got {entry!r} (dtype {value.dtype}).")
    if np.any(np.isnan(value)) or np.any(value < 0):
      raise ValueError(f"{what}, not negative or NaN; got {value}.")


def check_float_dtype(name: str, dtype) -> Any:
  """`dtype` as a floating dtype (or None); raises at build time otherwise."""
  if dtype is None:
    return None
  if isinstance(dtype, (jax.Array, np.ndarray)):
    raise TypeError(
        f"{name} must be a dtype, got an array ({dtype!r}): "
        "optax.inject_hyperparams turns dtype arguments into arrays (a dtype "
        f"is callable, so it is taken for a schedule). Pass static_args=('{name}',).")
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name} must be a dtype, got {dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point dtype, got {dtype}: an "
                     "integer anchor would truncate the pre-trained weights.")
  return dtype


def _is_bool(x) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return True
  return (isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
          and x.shape == () and x.dtype == np.bool_)


def resolve_mask(mask, params) -> list[bool]:
  """The mask as one Python bool per leaf of params, in flatten order."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  if callable(mask):
    mask = mask(params)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)) and not (
      jax.tree_util.treedef_is_leaf(trees.scalar_def(params))):
    # One value for a whole tree is what optax.inject_hyperparams makes of a
    # callable mask (it calls it with the step count): never take it as "all".
    raise TypeError(
        f"mask is the single value {mask!r} for a tree of params: give a bool "
        "per leaf or per subtree (mask=None decays every leaf). Under "
        "optax.inject_hyperparams, a callable mask is called as a schedule: "
        "pass static_args=('mask',) to it.")
  flags = trees.broadcast_prefix(mask, params, "mask")
  for path, flag in zip(trees.leaf_paths(params), flags):
    if not _is_bool(flag):
      hint = (" optax.inject_hyperparams calls a callable mask as a schedule: "
              "pass static_args=('mask',) to it." if isinstance(flag, jax.Array) else "")
      raise TypeError(f"mask entries must be bools; got {flag!r} for "
                      f"params{path}.{hint}")
  return [bool(f) for f in flags]


def _check_floating(params, flags) -> None:
  for path, leaf, on in zip(trees.leaf_paths(params), jax.tree.leaves(params), flags):
    dtype = jnp.result_type(leaf)
    if on and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"SPD can only decay floating-point leaves, but params{path} has "
          f"dtype {dtype}; exclude it with mask=...")


def _copy(x, dtype):
  # A real copy, even under jit: a forwarded input would make the anchor alias
  # the params and break donation of both.
  return jnp.array(x, dtype=dtype, copy=True)


def _flatten_as(treedef, tree, what: str, given, made_for) -> list:
  """`treedef.flatten_up_to(tree)`; if the two differ, an error that names
  the leaves `given` (what the caller passed) lacks or adds against
  `made_for` (what the state was made for)."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    def names(t):
      is_leaf = lambda x: trees.is_variable(x) or isinstance(x, optax.MaskedNode)
      return {jax.tree_util.keystr(k) for k, _ in
              jax.tree_util.tree_flatten_with_path(t, is_leaf=is_leaf)[0]}
    have, want = names(given), names(made_for)
    raise ValueError(
        f"{what} do not have the structure of the params the SPD state was "
        f"made for at init: missing {sorted(want - have) or 'none'}, extra "
        f"{sorted(have - want) or 'none'} (structures {jax.tree.structure(given)} "
        f"and {jax.tree.structure(made_for)}). Pass the same tree of params to "
        "init and update, or init a new state.") from None


def selective_projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: float | optax.Schedule | Any = 1.0,
    anchor: str = "params",
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    layer_axes: Any | Callable[[optax.Params], Any] = None,
    anchor_dtype: Any = None,
    anchor_on_host: bool = False,
    axis_name: str | tuple[str, ...] | None = None,
    param_specs: Any = None,
    norm: str = "frobenius",
) -> optax.GradientTransformationExtraArgs:
  r"""Selective Projection Decay around a base optimizer.

  Per layer (a parameter tensor, or one index along its ``layer_axes``), with
  raw gradient $g_t$, the base optimizer's update $u_t$ and the anchor
  $\theta_0$:

  $$
  \begin{aligned}
  \tilde\theta_t &= \theta_{t-1} + u_t, \qquad
      c_t = -\langle g_t,\, \theta_{t-1} - \theta_0 \rangle \\
  r_t &= \operatorname{clip}\Big(\frac{\|\tilde\theta_t - \theta_0\|
      - \|\theta_{t-1} - \theta_0\|}{\|\tilde\theta_t - \theta_0\|},\, 0,\, 1\Big) \\
  \theta_t &= \tilde\theta_t - \lambda\, r_t\, [c_t < 0]\,
      (\tilde\theta_t - \theta_0)
  \end{aligned}
  $$

  Decay acts only on layers where moving further from the anchor no longer
  lowers the loss ($c_t < 0$), and only by as much as the step moved away
  from it. $\lambda$ is not multiplied by the learning rate. Norms are
  Frobenius norms over the layer, accumulated in at least float32 (or, with
  ``norm="rows_l1"``, L1 norms per row). $\lambda$ is one value, or one per
  leaf or layer (a ``weight_decay`` tree).

  SPD acts on the update the inner optimizer returns. Around optimizers
  that keep a second sequence of iterates (e.g. `optax.contrib.schedule_free`,
  whose update moves the evaluated params y), SPD decays those params
  towards the anchor; the inner sequence z in its state is not decayed.

  Example:
    ```python
    tx = spd_optax.selective_projection_decay(
        optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4)),
        weight_decay=0.5)
    state = tx.init(params)                  # copies params as the anchor
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ```

  Args:
    inner: the base optimizer; its updates are the proposed step $u_t$.
    weight_decay: λ >= 0, a float or an `optax` schedule of the step count.
      A concrete negative or NaN value is refused; a traced or scheduled
      value cannot be checked: negative values act as 0, NaN makes the
      updates NaN. Or λ per leaf: a tree like params or a prefix of it
      (matched by key path, so a plain dict fits an `nnx.State`), whose
      entries are floats, schedules, or, for a leaf stacking layers, arrays
      of its per-layer shape (the shape of its ``layer_axes``, e.g.
      ``λ_max * (1 - jnp.arange(L) / L)``); `spd_optax.depth_scaled` builds
      the depth-decreasing one. An array (not a tree) of the per-layer shape
      applies to every SPD leaf. Per-leaf λ is from the authors' later code
      (MAPS, module-wise proximity scheduling), not the NeurIPS paper, which
      has one λ. A bad entry (negative, NaN, not a number, an array of
      another shape) is refused at ``init``, naming the leaf. Under
      `optax.inject_hyperparams` a tree is passed through unchanged (not
      injectable; its schedules run on SPD's step count); a scalar, or one
      per-layer array, is injectable.
    anchor: ``"params"`` copies the params given to ``init`` (full
      fine-tuning); ``"zeros"`` uses θ_0 = 0 and stores nothing (LoRA and
      other adapters). To anchor elsewhere, see `spd_optax.set_anchor`.
    mask: bools (Python or NumPy) in a tree like params or a prefix of it,
      or a callable of params returning one. Leaves marked False (a new
      head, norms, biases) get the inner update unchanged and store no
      anchor. Under `optax.inject_hyperparams`, a callable mask needs
      ``static_args=("mask",)``.
    layer_axes: which axes of a leaf index separate layers, for models that
      stack L blocks in one leaf (`nnx.scan`, `linen.scan`, `lax.scan`):
      None (the leaf is one layer), an int, or a tuple of ints per leaf, in
      a tree like params or a prefix of it (``{"blocks": 0}``), or a
      callable of params returning one (called at ``init`` and ``update``).
      SPD then acts per index along those axes exactly as it would on L
      separate leaves, and the state holds one condition, ratio and
      deviation per layer. `spd_optax.layer_axes_from_names` reads the tree
      off a scanned model's partition names. Under `optax.inject_hyperparams`,
      pass ``static_args=("layer_axes",)``.
    anchor_dtype: a floating dtype to store the anchor in (default: each
      param's own); ``jnp.bfloat16`` halves its memory for float32 params.
      The run is then exactly SPD anchored at the params rounded to that
      dtype: from step 1 on, since the params differ from that anchor by
      the rounding (round the params before ``init`` to start on it; see
      docs/scaling.md). Under `optax.inject_hyperparams`, pass
      ``static_args=("anchor_dtype",)``.
    anchor_on_host: keep the anchor in host memory (``pinned_host``, on
      backends with memory kinds: GPU, TPU, CPU) and move it in each step.
      Saves one param-sized buffer of device memory; costs a host-to-device
      copy of the anchor per step. Give the state the shardings of
      `spd_optax.state_shardings`, which keep it there; ``update`` warns
      when the anchor arrives in device memory.
    axis_name: inside `jax.shard_map`, the manual mesh axes that the params'
      elements are split over (hand-written FSDP): SPD's per-layer sums are
      added over them with `jax.lax.psum`, so each layer's condition and
      norms are those of the whole layer. A leaf that varies over a manual
      axis not named here is refused, never decayed per shard, and so is a
      leaf stacking layers that varies over one (``axis_name`` cannot say
      whether its layers or its layers' elements are split: give
      ``param_specs``), and a ``shard_map(check_vma=False)``, where JAX does
      not say what varies. Not needed under `jax.jit`, where sharding is the
      compiler's.
    param_specs: inside `jax.shard_map`, in place of ``axis_name``: the
      `jax.sharding.PartitionSpec` the shard_map gives each param (its
      ``in_specs`` for the params; a tree like params or a prefix of it).
      From them SPD knows how each leaf is split over the manual axes: sums
      over a layer's elements are added over the axes that split them, and
      the per-layer values of a layer axis split over devices are gathered
      (each device decays its own layers). Works with
      ``shard_map(check_vma=False)``, and on leaves split along
      ``layer_axes``.
    norm: the norm in the ratio $r_t$. ``"frobenius"`` (the default, the
      paper's and ``AdamSPD``'s): of the whole layer. ``"rows_l1"``: the
      authors' later ``norm_type="mars"`` (their ``AdamH`` / MAPS code, not
      the NeurIPS paper): per row $i$ of each layer (its first axis that is
      not a layer axis), $\|x\|_i = \sum_j |x_{ij}| + 10^{-8}$ over the row's
      other axes, so $r_{t,i}$ is one value per row,
      $r_{t,i} = \operatorname{clip}((\|\tilde\theta_t - \theta_0\|_i
      - \|\theta_{t-1} - \theta_0\|_i) / \|\tilde\theta_t - \theta_0\|_i, 0, 1)$,
      and each row is pulled back by its own ratio; $c_t$ stays one value per
      layer. A layer of fewer than two axes is one row. The state's ratio is
      then the mean over each layer's rows of the applied $r_{t,i}$. Not
      supported inside `jax.shard_map` with ``axis_name``. Flax ``Dense``
      kernels are ``[in, out]``: their rows are input rows, where PyTorch's
      ``[out, in]`` weights have output rows.

  Returns:
    A `GradientTransformationExtraArgs`; ``update`` requires ``params``.

  Raises:
    ValueError, TypeError: at construction for a bad ``anchor``,
      ``weight_decay``, ``anchor_dtype``, ``layer_axes`` or ``norm``; at
      ``init`` for a mask, ``layer_axes`` or ``weight_decay`` tree that does
      not fit params or has a bad entry (naming the leaf), or a
      non-floating leaf SPD would act on; at ``update`` for params whose
      structure differs from those given to ``init``.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  return _spd(inner, weight_decay, anchor, mask, layer_axes=layer_axes,
              anchor_dtype=anchor_dtype, anchor_on_host=anchor_on_host,
              axis_name=axis_name, param_specs=param_specs, norm=norm)


def _spd(inner, weight_decay, anchor, mask, *, layer_axes, anchor_dtype,
         anchor_on_host, axis_name, param_specs, norm, first_pass=None):
  """`selective_projection_decay`. `first_pass`, if given, computes some
  leaves' proposed updates, inner state and SPD sums itself
  (`_pallas_first_pass`); the others take XLA's pass."""
  if anchor not in ANCHORS:
    raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}. For "
                     "any other anchor use spd_optax.set_anchor after init.")
  per_leaf = is_per_leaf(weight_decay)
  if weight_decay is None or isinstance(weight_decay, (str, bytes)):
    raise TypeError("weight_decay must be a float >= 0, a schedule, or a tree "
                    f"of those like params; got {weight_decay!r}.")
  if not per_leaf:
    check_non_negative("weight_decay", weight_decay)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  project = projection.project if norm == "frobenius" else projection.project_rows
  anchor_dtype = check_float_dtype("anchor_dtype", anchor_dtype)
  layers.check_layer_axes(layer_axes)
  if anchor_on_host and not _compat.host_memory_works():
    warnings.warn(
        "anchor_on_host=True has no effect here: XLA:CPU before jax 0.10.2 "
        "has no pinned_host memory, so the anchor stays in device memory (and "
        "a sharded jit meant to put it in pinned_host fails to compile). "
        "Upgrade jax, or leave anchor_on_host off on CPU.", stacklevel=2)
  if axis_name is not None and not (isinstance(axis_name, str) or (
      isinstance(axis_name, tuple) and all(isinstance(n, str) for n in axis_name))):
    raise TypeError(f"axis_name must be a mesh axis name, a tuple of them, or "
                    f"None; got {axis_name!r}. Under optax.inject_hyperparams, "
                    "pass static_args=('axis_name',).")
  if param_specs is not None and axis_name is not None:
    raise ValueError("give axis_name or param_specs, not both: param_specs "
                     "says which axes split each leaf, and so which to sum over.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if trees.is_placeholder(params):
      return _placeholder_state(params)
    flags = resolve_mask(mask, params)
    _check_floating(params, flags)
    axes = layers.resolve(layer_axes, params)
    leaves, treedef = jax.tree.flatten(params)
    if per_leaf:
      check_strengths(weight_decay, params, flags,
                      [_global_layer_shape(p, ax, spec) for p, ax, spec
                       in zip(leaves, axes, _specs(param_specs, params))])
    anchors = None
    if anchor == "params":
      anchors = treedef.unflatten([
          _copy(p, p.dtype if anchor_dtype is None else anchor_dtype) if on
          else optax.MaskedNode() for p, on in zip(leaves, flags)])
      if anchor_on_host:
        anchors = jax.device_put(anchors, jax.memory.Space.Host)
    specs = _specs(param_specs, params)
    for path, p, ax, on, spec in zip(trees.leaf_paths(params), leaves, axes, flags, specs):
      if on:  # inside jax.shard_map, refused here as at update
        _manual_split(path, p, (p,), ax, axis_name, spec)
    layout = layout_lib.Layout(
        treedef=trees.scalar_def(params),
        keys=tuple(k for k, _ in trees.with_paths(params)),
        shapes=tuple(_global_layer_shape(p, ax, spec) if on else None
                     for p, ax, on, spec in zip(leaves, axes, flags, specs)),
        anchor_on_host=anchor_on_host and anchor == "params")
    on_leaves = [p for p, on in zip(leaves, flags) if on]
    dtype = functools.reduce(jnp.promote_types,
                             [projection.acc_dtype(p.dtype) for p in on_leaves],
                             jnp.dtype(jnp.float32))
    return SPDState(
        count=layout_lib.like_params(jnp.zeros((), jnp.int32), leaves),
        inner_state=inner.init(params),
        anchor=anchors,
        per_layer=layout_lib.zeros(layout, dtype, on_leaves),
        layout=layout,
    )

  def _placeholder_state(params):
    # For optax.tree_map_params: the anchor and the inner state map like
    # params; count, the per-layer values and (as a leaf here, so that the
    # real layout need not be known) the layout go to transform_non_params.
    zero = jnp.zeros(())
    return SPDState(count=zero, inner_state=inner.init(params),
                    anchor=params if anchor == "params" else None,
                    per_layer=zero, layout=zero)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("selective_projection_decay needs the current params: "
                       "call tx.update(grads, state, params).")
    layout = state.layout
    # Checked first, so a mismatch is reported here and not deep inside the
    # inner optimizer's tree_map.
    _check_same_leaves(layout, params)
    treedef = jax.tree.structure(params)
    grads_l = _flatten_as(treedef, updates, "the gradients", updates, params)
    params_l = treedef.flatten_up_to(params)

    proposed, inner_state = inner.update(updates, state.inner_state, params,
                                         **extra_args)
    if per_leaf:
      # Python-level, at trace time: the tree costs no op of its own.
      lams = [None if shape is None else _strength(e, state.count) for e, shape
              in zip(_strength_entries(weight_decay, params), layout.shapes)]
    else:
      lam = weight_decay(state.count) if callable(weight_decay) else weight_decay
      lams = [jnp.maximum(jnp.asarray(lam), 0)] * len(params_l)  # NaN stays NaN
    proposed_l = treedef.flatten_up_to(proposed)
    anchors_l = ([None] * len(params_l) if state.anchor is None
                 else treedef.flatten_up_to(state.anchor))
    axes_l = layers.resolve(layer_axes, params)
    specs = _specs(param_specs, params)
    _check_layer_shapes(params, params_l, axes_l, specs, layout.shapes)
    paths = trees.leaf_paths(params)
    if anchor_on_host:
      _warn_if_anchor_on_device(paths, anchors_l)

    per_layer = trees.unwrap(state.per_layer)
    on = [i for i, shape in enumerate(layout.shapes) if shape is not None]
    split = {i: _manual_split(paths[i], params_l[i], (grads_l[i], params_l[i], anchors_l[i],
                                                      proposed_l[i]), axes_l[i], axis_name, specs[i])
             for i in on}
    if norm != "frobenius":
      for i in on:
        if any(split[i][1]):
          raise ValueError(
              f"params{paths[i]}: norm={norm!r} inside jax.shard_map on a leaf "
              "split along its layer axes is not supported: use norm='frobenius', "
              "or call the optimizer under jax.jit.")
    sums = {}
    if first_pass is not None:
      proposed_l, inner_state, sums = first_pass(
          treedef, paths, on, grads_l, params_l, anchors_l, axes_l, split,
          state.inner_state, inner_state, proposed_l)
    out_u = list(proposed_l)
    # A stacked leaf's per-layer values are [L]-sized arrays, which XLA:TPU
    # computes in small fusions of a fixed cost each, so those leaves get
    # theirs from one call for all; a one-layer leaf's are scalars, cheaper
    # per leaf. A host anchor goes leaf by leaf, to be moved in one at a time.
    together = [i for i in on if layout.shapes[i] != () and norm == "frobenius"
                and not anchor_on_host]
    args = {i: (grads_l[i], params_l[i], anchors_l[i], proposed_l[i], axes_l[i],
                *split[i]) for i in on}
    results = dict(zip(together, projection.project_together(
        [args[i] for i in together], [lams[i] for i in together], per_layer,
        [sums.get(i) for i in together])))
    previous = None
    for i in on:
      if i in results:
        continue
      g, p, a, u, ax, over, layer_split = args[i]
      if anchor_on_host:
        # Tied to the previous leaf's update, so XLA cannot start this
        # leaf's work before that one's is done (it may still start the
        # transfer early: benchmarks/NOTES.md).
        a = projection.anchor_to_device(a, after=previous)
      given = {"sums": sums[i]} if i in sums else {}  # a kernel's (frobenius only)
      if any(layer_split):
        given["layer_split"] = layer_split  # frobenius only (refused above)
      results[i] = project(g, p, a, u, lams[i], ax, over, **given)
      previous = results[i][0]
    for i in on:
      out_u[i] = results[i][0]
    if on:
      per_layer = layout_lib.pack([results[i][1:] for i in on], per_layer)
    new_state = SPDState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        anchor=state.anchor,
        # Cast and placed as at init whatever the grads' dtype and sharding,
        # so a lax.scan carry or a jitted step's signature does not change.
        per_layer=per_layer,
        layout=layout,
    )
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _strength(entry, count):
  lam = entry(count) if callable(entry) else entry
  return jnp.maximum(jnp.asarray(lam), 0)  # NaN stays NaN


def _check_same_leaves(layout, params) -> None:
  have = tuple(k for k, _ in trees.with_paths(params))
  if have != layout.keys:
    missing = [trees.name(k) for k in layout.keys if k not in set(have)]
    extra = [trees.name(k) for k in have if k not in set(layout.keys)]
    raise ValueError(
        "the params do not have the structure of the params the SPD state was "
        f"made for at init: missing {missing or 'none'}, extra {extra or 'none'}"
        f"{'' if missing or extra else ' (the same leaves in another order)'}. "
        "Pass the same tree of params to init and update, or init a new state.")


def _check_layer_shapes(params, params_l, axes_l, specs, shapes) -> None:
  for path, p, ax, spec, shape in zip(trees.leaf_paths(params), params_l, axes_l,
                                      specs, shapes):
    if shape is None:
      continue
    want = _global_layer_shape(p, ax, spec)
    if shape != want:
      raise ValueError(
          f"params{path}: layer_axes give per-layer shape {want} at update, but "
          f"the state made at init holds {shape}. A callable "
          "layer_axes must give the same axes for the params at init and at "
          "update (nnx.Optimizer passes plain arrays at update, without "
          "metadata): compute the tree once and pass it.")


def _specs(param_specs, params) -> list:
  """Per leaf of params, its `PartitionSpec` in `param_specs`, or None."""
  if param_specs is None:
    return [None] * len(jax.tree.leaves(params))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = trees.broadcast_prefix(param_specs, params, "param_specs", is_spec)
  for path, spec in zip(trees.leaf_paths(params), specs):
    if not is_spec(spec):
      raise TypeError(f"param_specs for params{path} must be a "
                      f"jax.sharding.PartitionSpec, got {spec!r}.")
  return specs


def _dim_axes(spec, ndim) -> list[tuple[str, ...]]:
  """Per axis of a leaf, the manual mesh axes (of the enclosing
  `jax.shard_map`) that `spec` splits it over; mesh axes the compiler
  shards (not manual) are not the step's to handle."""
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  names = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  return [tuple(n for n in names(e) if n in manual) for e in entries[:ndim]]


def _global_layer_shape(p, axes, spec) -> tuple[int, ...]:
  """The shape of a leaf's layer axes over the whole leaf: inside
  `jax.shard_map`, a layer axis that `spec` splits over devices holds one
  device's layers, so its length is that times the devices along it."""
  shape = tuple(np.shape(p)[i] for i in axes)
  if spec is None:
    return shape
  mesh = jax.sharding.get_abstract_mesh()
  split = _dim_axes(spec, np.ndim(p))
  return tuple(n * int(np.prod([mesh.shape[a] for a in split[i]]))
               for n, i in zip(shape, axes))


def _manual_split(path, p, arrays, axes, axis_name, spec):
  """How a leaf is split over the manual axes of an enclosing
  `jax.shard_map`: (the axes to add its per-layer sums over, and per layer
  axis the axes splitting it). Each device holds part of such a leaf, and a
  condition or a norm over its part alone is not SPD's."""
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  if not manual:
    return (), ()
  varying = frozenset().union(*(_compat.varying_axes(x) for x in arrays
                                 if x is not None and not isinstance(x, optax.MaskedNode)))
  checked = _compat.tracks_varying_axes()
  if spec is not None:
    if len(spec) > np.ndim(p):
      raise ValueError(f"param_specs for params{path} is {spec}, for a leaf of "
                       f"{np.ndim(p)} axes.")
    split = _dim_axes(spec, np.ndim(p))
    named = frozenset().union(*map(frozenset, split))
    if checked and varying - named:
      raise ValueError(
          f"params{path} varies over the manual mesh axes "
          f"{sorted(varying - named)} of the jax.shard_map, which its "
          f"param_specs entry {spec} does not split it over: give each leaf "
          "the PartitionSpec the shard_map's in_specs give it.")
    over = tuple(n for i, names in enumerate(split) if i not in axes for n in names)
    return over, tuple(split[i] for i in axes)
  names = None if axis_name is None else (
      (axis_name,) if isinstance(axis_name, str) else tuple(axis_name))
  if not checked:
    raise ValueError(
        "selective_projection_decay runs inside a jax.shard_map that does not "
        "track which axes values vary over (check_vma=False), so it cannot "
        "tell a split leaf from a replicated one: pass param_specs= (the "
        "PartitionSpecs the shard_map gives the params).")
  if names is None:
    if varying:
      raise ValueError(
          f"params{path} varies over the manual mesh axes {sorted(varying)} of "
          "a jax.shard_map: each device holds part of it, and SPD's condition "
          "and norms must span the whole layer. Pass axis_name= naming the "
          "axes the leaf's elements are split over (their per-device sums are "
          "then added with lax.psum), or param_specs=, or call the optimizer "
          "outside shard_map.")
    return (), ()
  unknown = set(names) - manual
  if unknown:
    raise ValueError(f"axis_name {sorted(unknown)} are not manual axes of the "
                     f"enclosing jax.shard_map (those are {sorted(manual)}).")
  left = varying - set(names)
  if left:
    raise ValueError(
        f"params{path} varies over the manual mesh axes {sorted(left)}, which "
        f"axis_name={axis_name!r} does not name: its SPD sums would cover one "
        "device's part only. Add them to axis_name.")
  if axes and varying:
    raise ValueError(
        f"params{path} stacks layers (layer_axes {axes}) and varies over the "
        f"manual mesh axes {sorted(varying)}: axis_name cannot say whether its "
        "layers or each layer's elements are split over them (the sums of "
        "one are added over devices, of the other not). Pass param_specs= "
        "(the PartitionSpecs the shard_map gives the params) instead of "
        "axis_name.")
  # Invariant values need no sum (psum would count them once per device).
  return tuple(n for n in names if n in varying), ()


def _warn_if_anchor_on_device(paths, anchors_l) -> None:
  for path, a in zip(paths, anchors_l):
    if a is None or isinstance(a, optax.MaskedNode):
      continue
    if getattr(jax.typeof(a), "memory_space", None) == jax.memory.Space.Device:
      warnings.warn(
          f"anchor_on_host=True, but the anchor of params{path} arrived in "
          "device memory, so it takes the device memory it was meant to "
          "save. Its sharding lost the pinned_host memory kind: give the "
          "state the shardings of spd_optax.state_shardings(tx, params) "
          "(optax.tree_map_params gives the anchor the params' shardings, "
          "in device memory).", stacklevel=4)
      return


def adam_spd(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | optax.Schedule | Any = 1.0,
    anchor: str = "params",
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    layer_axes: Any | Callable[[optax.Params], Any] = None,
    anchor_dtype: Any = None,
    anchor_on_host: bool = False,
    mu_dtype: Any = None,
    axis_name: str | tuple[str, ...] | None = None,
    param_specs: Any = None,
    norm: str = "frobenius",
    first_pass: str = "xla",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with Selective Projection Decay: the authors' ``AdamSPD``.

  The base step is Adam's,
  $u_t = -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)$ (from
  `spd_optax.adam.scale_by_adam`, whose bias corrections match the
  reference's double precision), and SPD then acts per leaf as in
  `selective_projection_decay`. There is no other weight decay.

  Example:
    ```python
    tx = spd_optax.adam_spd(1e-4, weight_decay=1.0)
    # or, to change hyperparameters during training:
    tx = optax.inject_hyperparams(spd_optax.adam_spd)(
        learning_rate=1e-4, weight_decay=0.5)
    ```

  Args:
    learning_rate: η, a float or an `optax` schedule.
    b1: decay rate of Adam's first moment.
    b2: decay rate of Adam's second moment.
    eps: term added to Adam's denominator.
    weight_decay: SPD's strength λ >= 0: a float, a schedule, or per leaf
      (a tree, see `selective_projection_decay`; `spd_optax.depth_scaled`).
    anchor: ``"params"`` or ``"zeros"``, as in `selective_projection_decay`.
    mask: leaves SPD acts on, as in `selective_projection_decay`.
    layer_axes: the axes of stacked leaves that index layers, as in
      `selective_projection_decay`.
    anchor_dtype: the anchor's storage dtype, as in `selective_projection_decay`.
    anchor_on_host: keep the anchor in host memory, as in
      `selective_projection_decay`.
    mu_dtype: dtype of Adam's first moment (as in `optax.adam`); under
      `optax.inject_hyperparams`, pass ``static_args=("mu_dtype",)``.
    axis_name: inside `jax.shard_map`, the manual axes params are split
      over, as in `selective_projection_decay`.
    param_specs: inside `jax.shard_map`, the params' PartitionSpecs there,
      in place of ``axis_name``, as in `selective_projection_decay`.
    norm: ``"frobenius"`` or ``"rows_l1"`` (the authors' later "mars"
      row-wise norms), as in `selective_projection_decay`.
    first_pass: who computes the first pass over each leaf (new moments
      and SPD's per-layer sums): ``"xla"`` (the default), or ``"pallas"``,
      one hand-written kernel per leaf (`spd_optax.kernels`: Mosaic on TPU,
      Triton on GPU, Pallas' interpreter elsewhere), for leaves it takes
      (float32, layers along axis 0 only); the rest take XLA's.
      Experimental: not measured faster on a device yet
      (benchmarks/NOTES.md). A kernel runs on one device's data: on a mesh
      with Explicit axes (`jax.make_mesh`'s default) each device runs it on
      its part, inside `jax.shard_map` too (with ``axis_name`` where leaves
      are split); a mesh with Auto axes under a plain `jax.jit` is refused
      (the leaves' placement is not known there), and so are
      ``anchor_on_host`` and ``"rows_l1"``.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  check_non_negative("learning_rate", learning_rate)
  mu_dtype = check_float_dtype("mu_dtype", mu_dtype)
  if first_pass not in FIRST_PASSES:
    raise ValueError(f"first_pass must be one of {FIRST_PASSES}, got {first_pass!r}.")
  if first_pass == "pallas" and (anchor_on_host or norm != "frobenius"):
    raise ValueError(
        "first_pass='pallas' needs the anchor in device memory and "
        f"norm='frobenius' (got anchor_on_host={anchor_on_host}, norm={norm!r}): "
        "use first_pass='xla' with those.")
  inner = optax.chain(
      adam.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _spd(inner, weight_decay, anchor, mask, layer_axes=layer_axes,
              anchor_dtype=anchor_dtype, anchor_on_host=anchor_on_host,
              axis_name=axis_name, param_specs=param_specs, norm=norm,
              first_pass=None if first_pass == "xla" else
              _pallas_first_pass(learning_rate, b1, b2, eps))


def _pallas_first_pass(learning_rate, b1, b2, eps):
  """`adam_spd`'s first pass over each leaf the kernel takes, as one Pallas
  kernel (`kernels.first_pass`): the new moments and SPD's sums.

  The inner Adam has already been traced in XLA; for these leaves its
  moments and update are replaced by ones formed from the kernel's moments,
  so XLA drops their computation from the compiled step.
  """
  from spd_optax import kernels  # Pallas only for those who ask for it

  scale_lr = optax.scale_by_learning_rate(learning_rate)

  def first_pass(treedef, paths, on, grads_l, params_l, anchors_l, axes_l,
                 split, old_inner, new_inner, proposed_l):
    (old_adam, old_lr), (new_adam, new_lr) = old_inner, new_inner
    mu_l, nu_l = treedef.flatten_up_to(new_adam.mu), treedef.flatten_up_to(new_adam.nu)
    old_mu, old_nu = treedef.flatten_up_to(old_adam.mu), treedef.flatten_up_to(old_adam.nu)
    count = new_adam.count
    # -η as scale_by_learning_rate applies it, schedules included.
    neg_lr = scale_lr.update(jnp.ones((), jnp.float32), old_lr)[0]
    bc1, bc2 = (adam.bias_correction(b, count, jnp.float32) for b in (b1, b2))
    coef = kernels.coefficients(neg_lr, bc1, bc2, b1, b2, eps)
    sums, taken = {}, []
    for i in on:
      g, p, a = grads_l[i], params_l[i], anchors_l[i]
      if not kernels.supports(g, p, a, old_mu[i], old_nu[i], axes_l[i]):
        continue
      run = kernels.first_pass
      if projection.partitioned(p):
        if layout_lib.explicit_mesh(p) is None:
          raise ValueError(
              f"first_pass='pallas': params{paths[i]} is on a mesh of "
              f"{layout_lib.mesh_of(p).size} "
              "devices with Auto axes under jax.jit, whose placement of the leaf "
              "the step cannot see, and a Pallas kernel is not partitioned (it "
              "would gather the whole leaf on every device). Use a mesh with "
              "Explicit axes (jax.make_mesh's default), call the optimizer "
              "inside jax.shard_map (with axis_name= naming the axes leaves are "
              "split over), or use first_pass='xla'.")
        run = kernels.on_each_device
      mu_l[i], nu_l[i], s = run(g, p, a, old_mu[i], old_nu[i], coef, axes_l[i])
      sums[i] = projection.across_devices(s, *split[i])
      taken.append(i)
    directions = [adam.direction(mu_l[i], nu_l[i], bc1, bc2, eps) for i in taken]
    proposed_l = list(proposed_l)
    for i, u in zip(taken, scale_lr.update(directions, old_lr)[0]):
      proposed_l[i] = u
    new_adam = new_adam._replace(mu=treedef.unflatten(mu_l), nu=treedef.unflatten(nu_l))
    return proposed_l, (new_adam, new_lr), sums

  return first_pass
