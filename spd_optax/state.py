"""Reading, editing and placing the SPD part of an optimizer state, wherever
it sits (inside `optax.chain`, `optax.MultiSteps`, `optax.inject_hyperparams`,
a `flax.nnx.Optimizer`, or `nnx.state` of one)."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from spd_optax import options
from spd_optax import sharding
from spd_optax.transform import SPDState


def _is_spd(x) -> bool:
  # `nnx.state(optimizer)` holds an SPDState as a mapping of its fields.
  return isinstance(x, SPDState) or (
      isinstance(x, Mapping) and set(SPDState._fields) - {"anchor"} <= set(x.keys()))


def spd_states_with_paths(state) -> list[tuple[str, SPDState]]:
  """Every SPD state inside `state`, with its path (`jax.tree_util.keystr`).
  One held as a mapping (in `nnx.state(optimizer)`) comes back as an
  `SPDState` of its values."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_spd)[0]
  as_state = lambda s: s if isinstance(s, SPDState) else SPDState(
      *(jax.tree.map(options.unwrap, s.get(f), is_leaf=options.is_variable)
        for f in SPDState._fields))
  return [(jax.tree_util.keystr(p), as_state(s)) for p, s in flat if _is_spd(s)]


def _find(state) -> list[SPDState]:
  found = [s for _, s in spd_states_with_paths(state)]
  if not found:
    raise ValueError("this optimizer state holds no SPDState: was it made by "
                     "spd_optax.selective_projection_decay or adam_spd?")
  return found


def spd_state(state) -> SPDState:
  """The one `SPDState` inside an optimizer state, wherever it sits, e.g.
  ``spd_optax.spd_state(optimizer.opt_state).ratio``.

  Raises:
    ValueError: if `state` holds no SPDState, or several (e.g. one per
      `optax.multi_transform` group), naming their paths.
  """
  found = _find(state)
  if len(found) > 1:
    raise ValueError(f"this optimizer state holds {len(found)} SPDStates, at "
                     f"{[p for p, _ in spd_states_with_paths(state)]}; pick one from "
                     "spd_optax.state.spd_states_with_paths(state).")
  return found[0]


def spd_stats(state) -> dict[str, jax.Array]:
  r"""A few scalars worth logging every few steps, from the last step's SPD.

  The unit is a layer: an SPD leaf, or one index along the ``layer_axes``
  of a leaf stacking layers (a leaf of L stacked blocks counts as L units,
  as if they were separate leaves). Returns a dict of float32 scalars
  (jit-friendly, no host transfer):

  - ``decayed_fraction``: share of units SPD pulled back at the last step
    (applied ratio $r_t > 0$). Zero for a long time means SPD is not acting:
    λ may be too small to matter or the run is still early.
  - ``mean_ratio``: mean over units of the applied ratio $r_t$ (0 wherever no
    decay was applied).
  - ``deviation``: $\|\theta_t - \theta_0\|$ over all SPD leaves after the
    last step; with the zero anchor, the norm of the adapters.

  For an ensemble (states stacked along a leading axis), call it inside
  `jax.vmap`, which gives each member's.

  Example:
    ```python
    updates, state = tx.update(grads, state, params)
    print({k: float(v) for k, v in spd_optax.spd_stats(state).items()})
    ```

  Raises:
    ValueError: if `state` holds no SPD state, or one with a leading axis
      (an ensemble outside `jax.vmap`).
  """
  decayed = ratio_sum = squares = units = 0
  for s in _find(state):
    if jnp.ndim(s.count):
      raise ValueError(
          f"this SPD state has a leading axis of {jnp.shape(s.count)} (its count is "
          "not a scalar): an ensemble of states. Call spd_stats inside jax.vmap "
          "over that axis, e.g. jax.vmap(spd_optax.spd_stats)(state).")
    for ratio, deviation in zip(jax.tree.leaves(s.ratio), jax.tree.leaves(s.deviation)):
      ratio = jnp.asarray(ratio, jnp.float32)
      decayed = decayed + jnp.sum(ratio > 0, dtype=jnp.float32)
      ratio_sum = ratio_sum + jnp.sum(ratio)
      squares = squares + jnp.sum(jnp.square(jnp.asarray(deviation, jnp.float32)))
      units += ratio.size
  zero = jnp.zeros((), jnp.float32)
  if not units:
    return {"decayed_fraction": zero, "mean_ratio": zero, "deviation": zero}
  return {"decayed_fraction": decayed / units, "mean_ratio": ratio_sum / units,
          "deviation": jnp.sqrt(squares)}


def set_anchor(state, anchor):
  """Returns `state` with its stored SPD anchors replaced from `anchor`.

  For an anchor other than the params given to ``init`` (resuming from
  fine-tuned weights with the pre-trained ones as anchor, another reference
  model). `anchor` is a tree like the params (a plain pytree, an
  `nnx.State` or its ``nnx.to_pure_dict``), matched by key path. Every SPD
  part that stores an anchor takes its leaves from it (masked-off leaves
  and ``anchor="zeros"`` parts store none), each copied, cast and placed
  like the stored one: arguments of a step, never compiled-in constants.

  Example:
    ```python
    state = spd_optax.set_anchor(tx.init(finetuned_params), pretrained_params)
    opt.opt_state = spd_optax.set_anchor(opt.opt_state,        # flax.nnx
                                         nnx.state(pretrained, nnx.Param))
    ```

  Raises:
    ValueError: if no SPD part stores an anchor, or `anchor` lacks a leaf
      one stores, has leaves the params do not, or a leaf of another shape.
  """
  _find(state)
  parts = [s for s in jax.tree.leaves(state, is_leaf=_is_spd)
           if isinstance(s, SPDState) and s.anchor is not None]
  if not parts:
    raise ValueError("no SPD part of this state stores an anchor: with "
                     "anchor='zeros' there is none to set (create it with "
                     "anchor='params'); with nnx, pass optimizer.opt_state.")
  given = {k: options.unwrap(x) for k, x in options.with_paths(anchor)}
  stored = [(k, options.unwrap(x)) for s in parts
            for k, x in options.with_paths(s.anchor, options.is_masked)]
  masked = [k for k, x in stored if options.is_masked(x)]
  missing = [options.name(k) for k, x in stored if not options.is_masked(x) and k not in given]
  known = {k for k, _ in stored}
  extra = [options.name(k) for k in given
           if k not in known and not any(k[:len(m)] == m for m in masked)]
  if missing or extra:
    raise ValueError("the anchor must have the structure of the params the state "
                     f"was made for: missing {missing or 'none'}, extra {extra or 'none'}.")
  wrong = [f"{options.name(k)} of shape {jnp.shape(given[k])} does not match the stored "
           f"anchor's {x.shape}" for k, x in stored
           if not options.is_masked(x) and jnp.shape(given[k]) != x.shape]
  if wrong:
    raise ValueError(f"anchor leaf {'; '.join(wrong)}.")

  def copy(path, old):
    if options.is_masked(old):
      return old
    return sharding.place_like(sharding.fresh_copy(given[options.key(path)], old.dtype), old)

  def replace(s):
    if not isinstance(s, SPDState) or s.anchor is None:
      return s  # Variables outside SPD parts stay the same objects
    return s._replace(anchor=jax.tree_util.tree_map_with_path(
        copy, s.anchor, is_leaf=options.is_masked))

  return jax.tree.map(replace, state, is_leaf=lambda x: _is_spd(x) or options.is_variable(x))


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
  """Shardings for ``tx.init(params)``, on Explicit and Auto meshes alike.

  Every state array shaped like a param at the same key path (the anchor,
  Adam's moments, any inner optimizer's params-shaped buffers) gets that
  param's sharding, in the memory ``init`` puts it in (``pinned_host`` for
  an anchor made with ``anchor_on_host=True``, where
  `optax.tree_map_params` would put it in device memory); everything else
  (counts, per-layer values) is replicated. Nothing is computed: `params`
  may be `jax.ShapeDtypeStruct`s with ``sharding=``. Inside
  `jax.shard_map`, their ``.spec`` are the state's specs.

  Example:
    ```python
    ssh = spd_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=ssh)(params)
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(psh, ssh))
    ```

  Raises:
    ValueError: if no param carries a `NamedSharding` (there is no mesh to
      lay the state out on).
  """
  by_key = [(k, p.sharding, tuple(p.shape)) for k, p in options.with_paths(params)
            if isinstance(getattr(p, "sharding", None), NamedSharding)]
  if not by_key:
    raise ValueError("no param carries a NamedSharding: place the params on a "
                     "mesh (jax.device_put(params, shardings)) or pass "
                     "jax.ShapeDtypeStruct(..., sharding=...) for them.")
  everywhere = NamedSharding(by_key[0][1].mesh, P())
  by_key.sort(key=lambda e: -len(e[0]))   # the longest matching key wins
  jaxpr, shapes = jax.make_jaxpr(tx.init, return_shape=True)(params)
  on_host = iter(getattr(a, "memory_space", None) == jax.memory.Space.Host
                 for a in jaxpr.out_avals)

  def pick(path, leaf):
    where, host = options.key(path), next(on_host)
    for k, s, shape in by_key:
      if where[len(where) - len(k):] == k and tuple(leaf.shape) == shape:
        return s.with_memory_kind("pinned_host" if host else "device")
    return everywhere

  return jax.tree_util.tree_map_with_path(pick, shapes)
