"""Selective Projection Decay around any Optax optimizer."""

import functools
from typing import Any, Callable, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import optax

from spd_optax import _compat
from spd_optax import layout as layout_lib
from spd_optax import plan
from spd_optax import projection
from spd_optax import sharding
from spd_optax import sums
from spd_optax import trees


ANCHORS = ("params", "zeros")


class SPDState(NamedTuple):
  """State of `selective_projection_decay`.

  The per-layer values are read by name through the properties
  `condition`, `ratio` and `deviation`: trees like params holding, per
  leaf, an array of the shape of its layer axes (a scalar for a leaf that
  is one layer; ``[L]`` for a leaf stacking L layers along
  ``layer_axes=0``) and `optax.MaskedNode()` where SPD leaves the leaf
  alone. They are stored packed in one small array, `per_layer`, so that a
  jitted step passes one array for them instead of three per leaf. Being
  properties, they are not fields: `optax.tree_utils.tree_get` does not
  find them (it returns None); `spd_optax.spd_state` finds the state inside
  any optimizer state.

  Attributes:
    count: steps taken, for a `weight_decay` schedule.
    inner_state: the base optimizer's state.
    anchor: θ_0 per leaf (like params); `optax.MaskedNode()` on leaves SPD
      leaves alone; `None` for the zero anchor, which stores nothing.
    per_layer: ``[3, layers]``, the rows `condition`, `ratio` and
      `deviation` of every layer of every SPD leaf, in the params' flatten
      order; replicated on the params' mesh. Never params-shaped, so
      `optax.tree_map_params` passes it to ``transform_non_params``.
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

  Per layer, SPD takes the base optimizer's step $u_t$ and, only where
  moving further from the anchor $\theta_0$ no longer lowers the loss
  ($c_t = -\langle g_t, \theta_{t-1} - \theta_0\rangle < 0$), pulls the
  result back towards the anchor by $\lambda$ times the share $r_t$ of the
  step that moved away from it:
  $\theta_t = \tilde\theta_t - \lambda r_t (\tilde\theta_t - \theta_0)$.
  $\lambda$ is not multiplied by the learning rate. The update rule, its
  edge cases and the authors' later variants are on the algorithm page
  (docs/algorithm.md).

  SPD acts on the update the inner optimizer returns. Around optimizers
  that keep a second sequence of iterates (e.g. `optax.contrib.schedule_free`,
  whose update moves the evaluated params y), SPD decays those params
  towards the anchor; the inner sequence z in its state is not decayed.

  Under `optax.inject_hyperparams`, numbers and callables become traced
  hyperparameters: a callable ``mask``, ``layer_axes``, ``anchor_dtype``,
  ``axis_name`` and ``param_specs`` must be named in its ``static_args``
  (they are refused with that advice otherwise). A scalar ``weight_decay``,
  or one per-layer array, is injectable; a tree is passed through unchanged
  (its schedules run on SPD's step count).

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
    weight_decay: λ >= 0: a float or an `optax` schedule of the step count;
      or λ per leaf, a tree like params or a prefix of it (matched by key
      path) of floats, schedules, or for a leaf stacking layers arrays of its
      per-layer shape (`spd_optax.depth_scaled` builds a depth-decreasing
      one; from the authors' later code, not the NeurIPS paper); or one
      array of the per-layer shape for every leaf. A concrete bad value is
      refused (at ``init`` for a tree, naming the leaf); a traced or
      scheduled value below 0 acts as 0, and NaN makes the updates NaN.
    anchor: ``"params"`` copies the params given to ``init`` (full
      fine-tuning); ``"zeros"`` uses θ_0 = 0 and stores nothing (LoRA and
      other adapters). To anchor elsewhere, see `spd_optax.set_anchor`.
    mask: bools (Python or NumPy) in a tree like params or a prefix of it,
      or a callable of params returning one. Leaves marked False (a new
      head, norms, biases) get the inner update unchanged and store no
      anchor.
    layer_axes: for models that stack L blocks in one leaf (`nnx.scan`,
      `linen.scan`): the axes of a leaf that index layers, None (one
      layer), an int or a tuple of ints per leaf, in a tree like params or
      a prefix of it (``{"blocks": 0}``), or a callable of params returning
      one. SPD then acts per layer exactly as on L separate leaves.
      `spd_optax.layer_axes_from_names` reads it off a scanned model.
    anchor_dtype: a floating dtype to store the anchor in (default: each
      param's own): ``jnp.bfloat16`` halves its memory for float32 params.
      The run is then exactly SPD anchored at the params rounded to that
      dtype: from step 1 on, since the params differ from that anchor by
      the rounding (round the params before ``init`` to start on it; see
      docs/scaling.md).
    anchor_on_host: keep the anchor in host memory (``pinned_host``) and
      move it in, leaf by leaf, in each step: one param-sized buffer less on
      the device, one host-to-device copy per step. Give the state the
      shardings of `spd_optax.state_shardings`; ``update`` warns when the
      anchor arrives in device memory.
    axis_name: inside `jax.shard_map`, the manual mesh axes the params'
      elements are split over (hand-written FSDP): SPD's per-layer sums are
      added over them. Not needed under `jax.jit`, where sharding is the
      compiler's.
    param_specs: inside `jax.shard_map`, in place of ``axis_name``: the
      `PartitionSpec`s the shard_map gives the params (a tree like params or
      a prefix of it). Needed for a stacked leaf whose layers are split over
      devices, and in ``shard_map(check_vma=False)``.
    norm: ``"frobenius"`` (the paper's): norms of the whole layer; or
      ``"rows_l1"``: the authors' later row-wise L1 norms, one ratio per row
      of each layer (not inside `jax.shard_map`).

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `SPDState`;
    ``update`` requires ``params``.

  Raises:
    ValueError, TypeError: for an argument that can never work, when the
      optimizer is built; at ``init`` for a mask, ``layer_axes``,
      ``weight_decay`` or ``param_specs`` tree that does not fit the params
      or has a bad entry, or a non-floating leaf SPD would act on; at
      ``update`` for params or gradients whose leaves differ from those
      given to ``init``, and inside `jax.shard_map` for a leaf whose split
      SPD cannot tell. Each names the leaf and the fix.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  return build(inner, plan.options(weight_decay, mask, layer_axes, axis_name, param_specs,
                                   norm),
               anchor=anchor, anchor_dtype=anchor_dtype, anchor_on_host=anchor_on_host)


def build(inner: optax.GradientTransformation, opts: plan.Options, *,
          anchor: str = "params", anchor_dtype: Any = None, anchor_on_host: bool = False,
          first_pass: Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """`selective_projection_decay` from checked options, with one hook.

  The anchor's arguments are those of `selective_projection_decay`; the
  others come checked in `opts` (`plan.options`).

  `first_pass`, if given, takes over the first pass of the leaves it
  chooses (an experimental kernel: `spd_optax.experimental`). It is called
  in ``update`` after the inner optimizer, as
  ``first_pass(leaves, grads, params, anchors, old_inner_state,
  new_inner_state, proposed)`` with the step's `plan.Leaf` records and the
  params' flat leaves, and returns ``(proposed, new_inner_state, sums)``:
  the inner updates and state with its leaves' replaced, and, per
  `plan.Leaf.index` it took, that leaf's `projection.layer_sums` (the whole
  leaf's: `sharding.across_devices` applied). The rest of the step is the
  same.
  """
  if anchor not in ANCHORS:
    raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}. For "
                     "any other anchor use spd_optax.set_anchor after init.")
  anchor_dtype = plan.check_float_dtype("anchor_dtype", anchor_dtype)
  if anchor_on_host and not _compat.host_memory_works():
    warnings.warn(
        "anchor_on_host=True has no effect here: XLA:CPU before jax 0.10.2 "
        "has no pinned_host memory, so the anchor stays in device memory (and "
        "a sharded jit meant to put it in pinned_host fails to compile). "
        "Upgrade jax, or leave anchor_on_host off on CPU.", stacklevel=3)
  anchor_on_host = anchor_on_host and anchor == "params"
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return _init(inner, opts, params, anchor, anchor_dtype, anchor_on_host)

  def update_fn(updates, state, params=None, **extra_args):
    # Checked first, so a mismatch is reported here and not deep inside the
    # inner optimizer's tree_map.
    treedef, params_l, grads_l = plan.check_structure(state.layout, params, updates)
    proposed, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    proposed_l = treedef.flatten_up_to(proposed)
    anchors_l = ([None] * len(params_l) if state.anchor is None
                 else treedef.flatten_up_to(state.anchor))
    leaves = plan.at_update(opts, state.layout, params,
                            list(zip(grads_l, params_l, anchors_l, proposed_l)))
    if anchor_on_host:
      sharding.warn_if_on_device(trees.leaf_paths(params), anchors_l, stacklevel=3)
    lams = plan.strengths(opts, leaves, state.count)
    given = {}
    if first_pass is not None:
      proposed_l, inner_state, given = first_pass(
          leaves, grads_l, params_l, anchors_l, state.inner_state, inner_state, proposed_l)
    per_layer = trees.unwrap(state.per_layer)
    results = projection.project_leaves(
        leaves, grads_l, params_l, anchors_l, proposed_l, lams, per_layer,
        norm=opts.norm, anchor_on_host=anchor_on_host, given=given)
    out = list(proposed_l)
    for leaf, (update, *_) in zip(leaves, results):
      out[leaf.index] = update
    if leaves:
      # Cast and placed as at init whatever the grads' dtype and sharding,
      # so a lax.scan carry or a jitted step's signature does not change.
      per_layer = layout_lib.pack([values for _, *values in results], per_layer)
    return treedef.unflatten(out), SPDState(
        count=optax.safe_increment(state.count), inner_state=inner_state,
        anchor=state.anchor, per_layer=per_layer, layout=state.layout)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _init(inner, opts, params, anchor, anchor_dtype, anchor_on_host) -> SPDState:
  """`build`'s ``init``: the inner state, the anchor, zeros for the
  per-layer values, and the layout that says whose they are."""
  if trees.is_placeholder(params):
    # For optax.tree_map_params: the anchor and the inner state map like
    # params; count, the per-layer values and (as a leaf here, so that the
    # real layout need not be known) the layout go to transform_non_params.
    zero = jnp.zeros(())
    return SPDState(count=zero, inner_state=inner.init(params),
                    anchor=params if anchor == "params" else None,
                    per_layer=zero, layout=zero)
  flags, leaves = plan.at_init(opts, params)
  params_l, treedef = jax.tree.flatten(params)
  anchors = None
  if anchor == "params":
    dtype = lambda p: p.dtype if anchor_dtype is None else anchor_dtype
    anchors = treedef.unflatten([sharding.fresh_copy(p, dtype(p)) if on
                                 else optax.MaskedNode() for p, on in zip(params_l, flags)])
    if anchor_on_host:
      anchors = jax.device_put(anchors, jax.memory.Space.Host)
  shapes = [None] * len(params_l)
  for leaf in leaves:
    shapes[leaf.index] = leaf.layer_shape
  layout = layout_lib.Layout(
      treedef=trees.scalar_def(params), keys=tuple(k for k, _ in trees.with_paths(params)),
      shapes=tuple(shapes), anchor_on_host=anchor_on_host)
  on_leaves = [params_l[leaf.index] for leaf in leaves]
  acc = functools.reduce(jnp.promote_types, [sums.acc_dtype(p.dtype) for p in on_leaves],
                         jnp.dtype(jnp.float32))
  return SPDState(
      count=sharding.like_params(jnp.zeros((), jnp.int32), params_l),
      inner_state=inner.init(params),
      anchor=anchors,
      per_layer=layout_lib.zeros(layout, acc, on_leaves),
      layout=layout,
  )
