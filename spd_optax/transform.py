"""Selective Projection Decay around any Optax optimizer."""

import functools
from typing import Any, Callable, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import optax

from spd_optax import options as options_lib
from spd_optax import projection
from spd_optax import sharding

ANCHORS = ("params", "zeros")


class SPDState(NamedTuple):
  """State of `selective_projection_decay`.

  Every field but `count` is a tree like params, read by `optax.tree_utils`,
  flax serialization, Orbax and `jax.vmap` as `optax.adam`'s state is. A
  per-layer value is, per leaf, an array of its layer axes' shape (a scalar,
  or ``[L]`` for L layers stacked along ``layer_axes=0``), in float32
  (float64 for float64 params), replicated on the params' mesh. Where SPD
  leaves a leaf alone (``mask``), the anchor and these hold `optax.MaskedNode()`.

  Attributes:
    count: calls of ``update``, for a ``weight_decay`` schedule. Inside
      `optax.apply_if_finite`, a rejected step is not counted; with SPD
      outside it, it is (SPD saw the step).
    inner_state: the base optimizer's state.
    anchor: $\\theta_0$ per leaf; None for the zero anchor, which stores nothing.
    condition: per layer, $c_t = -\\langle g_t, \\theta_{t-1} - \\theta_0
      \\rangle$ of the last step (a layer whose gradient was not finite
      keeps its previous value).
    ratio: per layer, the $r_t$ applied at the last step: 0 wherever no
      decay was applied ($c_t \\ge 0$, nothing moved away, or λ = 0); with
      ``norm="rows_l1"``, the mean over the layer's rows.
    deviation: per layer, $\\|\\theta_t - \\theta_0\\|$ after the last step.
  """
  count: jax.Array
  inner_state: optax.OptState
  anchor: Any
  condition: Any
  ratio: Any
  deviation: Any

  def __getattr__(self, attr):
    # The inner state's fields read through, as tools that take the base
    # optimizer's state expect (optax.contrib.schedule_free_eval_params).
    if not attr.startswith("_") and hasattr(self.inner_state, attr):
      return getattr(self.inner_state, attr)
    raise AttributeError(f"'SPDState' object has no attribute {attr!r}")


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

  $$
  \tilde\theta_t = \theta_{t-1} + u_t, \quad
  r_t = \operatorname{clip}\Big(\frac{\|\tilde\theta_t - \theta_0\|
      - \|\theta_{t-1} - \theta_0\|}{\|\tilde\theta_t - \theta_0\|}, 0, 1\Big),
  \quad \theta_t = \tilde\theta_t - \lambda r_t (\tilde\theta_t - \theta_0).
  $$

  $\lambda$ is not multiplied by the learning rate. The edge cases and the
  authors' later variants are on the [algorithm page][the-algorithm].

  Around optimizers that keep a second sequence of iterates (e.g.
  `optax.contrib.schedule_free`), SPD decays the params; z is not decayed.

  Under `optax.inject_hyperparams`, a callable ``mask`` or ``layer_axes``,
  ``anchor_dtype``, ``axis_name`` and ``param_specs`` must be named in its
  ``static_args`` (they are refused with that advice otherwise). A scalar
  ``weight_decay``, or one per-layer array, is injectable; a tree is passed
  through unchanged (its schedules run on SPD's count).

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
      or λ per leaf, a tree like params or a prefix of it of floats,
      schedules, or for a leaf stacking layers arrays of its per-layer
      shape (`spd_optax.depth_scaled`); or one array of the per-layer
      shape for every leaf. A concrete bad value is refused; a traced or
      scheduled value below 0 acts as 0, and NaN makes the updates NaN.
    anchor: ``"params"`` copies the params given to ``init`` (full
      fine-tuning); ``"zeros"`` uses $\theta_0 = 0$ and stores nothing (LoRA
      and other adapters). To anchor elsewhere, see `spd_optax.set_anchor`.
    mask: bools in a tree like params or a prefix of it, or a function of
      params returning one. Leaves marked False (a new head, norms, biases)
      get the inner update unchanged and store no anchor.
    layer_axes: for models that stack L blocks in one leaf (`nnx.scan`,
      `linen.scan`): the axes of a leaf that index layers, None (one
      layer), an int or a tuple of ints per leaf, in a tree like params or
      a prefix of it (``{"blocks": 0}``), or a function of params returning
      one. SPD then acts per layer exactly as on L separate leaves.
      `spd_optax.layer_axes_from_names` reads it off a scanned model.
    anchor_dtype: a floating dtype to store the anchor in (default: each
      param's own). The run is then exactly SPD anchored at the params
      rounded to that dtype (round the params before ``init`` to start on
      it; see the scaling page).
    anchor_on_host: keep the anchor in host memory (``pinned_host``) and
      move it in, leaf by leaf (a stacked leaf one layer at a time), in
      each step. Give the state the shardings of
      `spd_optax.state_shardings`.
    axis_name: inside `jax.shard_map`, the manual mesh axes the params'
      elements are split over (hand-written FSDP): SPD's per-layer sums are
      added over them. Not needed under `jax.jit`, nor for replicated
      params (`jax.pmap` data parallelism).
    param_specs: inside `jax.shard_map`, in place of ``axis_name``: the
      `PartitionSpec`s the shard_map gives the params (a tree like params or
      a prefix of it). Needed for a stacked leaf whose layers are split over
      devices, and for split leaves under ``check_vma=False``.
    norm: ``"frobenius"`` (the paper's): norms of the whole layer; or
      ``"rows_l1"``: the authors' later row-wise L1 norms, one ratio per row
      of each layer.

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `SPDState`;
    ``update`` requires ``params``.

  Raises:
    ValueError, TypeError: for an argument that can never work, when the
      optimizer is built; at ``init`` for a mask, ``layer_axes``,
      ``weight_decay`` or ``param_specs`` tree that does not fit the params,
      or a non-floating leaf SPD would act on; at ``update`` for params or
      gradients whose leaves differ from those given to ``init``, and
      inside `jax.shard_map` for a leaf whose split SPD cannot tell. Each
      names the leaf and the fix.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  opts = options_lib.options(weight_decay, mask, layer_axes, axis_name, param_specs, norm)
  if anchor not in ANCHORS:
    raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}. For "
                     "any other anchor use spd_optax.set_anchor after init.")
  anchor_dtype = options_lib.check_float_dtype("anchor_dtype", anchor_dtype)
  if anchor_on_host and not sharding.host_memory_works():
    warnings.warn(
        "anchor_on_host=True has no effect here: XLA:CPU before jax 0.10.2 "
        "has no pinned_host memory, so the anchor stays in device memory. "
        "Upgrade jax, or leave anchor_on_host off on CPU.", stacklevel=2)
  on_host = anchor_on_host and anchor == "params" and sharding.host_memory_works()
  inner = optax.with_extra_args_support(inner)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, inner, opts, anchor, anchor_dtype, on_host),
      functools.partial(_update, inner, opts, on_host))


def _init(inner, opts, anchor, anchor_dtype, on_host, params) -> SPDState:
  params_l, treedef = jax.tree.flatten(params)
  if not params_l:
    # optax.tree_map_params' placeholder has no leaves: the anchor maps like
    # params, the per-layer values go to transform_non_params.
    return SPDState(jnp.zeros(()), inner.init(params), params if anchor == "params" else None,
                    *(jnp.zeros(()) for _ in range(3)))
  records = {leaf.index: leaf for leaf in options_lib.resolve(opts, params)}
  per_leaf = lambda f: [f(p, records[i]) if i in records else optax.MaskedNode()
                        for i, p in enumerate(params_l)]
  anchors = None
  if anchor == "params":
    anchors = treedef.unflatten(per_leaf(lambda p, _: sharding.fresh_copy(
        p, p.dtype if anchor_dtype is None else anchor_dtype)))
    if on_host:
      anchors = jax.device_put(anchors, jax.memory.Space.Host)
  zeros = lambda p, r: sharding.like_params(
      jnp.zeros(r.layer_shape, projection.acc_dtype(jnp.result_type(p))), params_l)
  # With nnx Variables as leaves, so the per-layer values take none of a
  # param's metadata (its sharding names are not theirs); three trees of
  # their own buffers, as one buffer in three fields cannot be donated.
  values = [jax.tree.structure(params, is_leaf=options_lib.is_variable).unflatten(
      per_leaf(zeros)) for _ in range(3)]
  return SPDState(sharding.like_params(jnp.zeros((), jnp.int32), params_l),
                  inner.init(params), anchors, *values)


def _update(inner, opts, on_host, updates, state, params=None, **extra_args):
  if params is not None and not jax.tree.leaves(params):  # nothing to decay
    proposed, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return proposed, state._replace(count=optax.safe_increment(state.count),
                                    inner_state=inner_state)
  # Checked first, so a mismatch is reported here and not deep inside the
  # inner optimizer's tree_map.
  treedef, per_leaf, params_l, grads_l, anchors_l, held, leaves = options_lib.at_update(
      opts, params, updates, state)
  proposed, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
  out = treedef.flatten_up_to(proposed)
  new, previous = [list(h) for h in held], None
  for leaf in leaves:
    i, a = leaf.index, anchors_l[leaf.index]
    if on_host:
      # Tied to the previous leaf's update, so XLA cannot start this leaf's
      # work (and hold its anchor) before that one's is done.
      a = sharding.anchor_to_device(a, after=previous, layer_axis=(
          leaf.axes[0] if leaf.axes and not leaf.layer_split else None))
    out[i], condition, ratio, deviation = projection.project(
        grads_l[i], params_l[i], a, out[i], leaf.strength, leaf.axes, opts.norm,
        leaf.psum_axes, leaf.layer_split)
    for k, value in enumerate((condition, ratio, deviation)):
      new[k][i] = sharding.like(value, held[k][i])
    # A layer whose gradient is not finite (a step that optax.apply_if_finite
    # inside SPD rejects) keeps its condition: the state stores no NaN.
    new[0][i] = jnp.where(jnp.isfinite(new[0][i]), new[0][i], held[0][i])
    previous = out[i]
  return treedef.unflatten(out), SPDState(optax.safe_increment(state.count), inner_state,
                                         state.anchor, *map(per_leaf.unflatten, new))
