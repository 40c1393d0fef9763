"""Reading and editing the SPD part of an optimizer state, wherever it sits
(inside `optax.chain`, `optax.MultiSteps`, `optax.inject_hyperparams`, or a
`flax.nnx.Optimizer`)."""

import jax
import jax.numpy as jnp

from spd_optax import sharding
from spd_optax import trees
from spd_optax.transform import SPDState


def _is_spd(x) -> bool:
  return isinstance(x, SPDState)


def spd_states_with_paths(state) -> list[tuple[str, SPDState]]:
  """Every SPDState inside `state`, with its path (`jax.tree_util.keystr`)."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_spd)[0]
  return [(jax.tree_util.keystr(p), s) for p, s in flat if _is_spd(s)]


def spd_state(state) -> SPDState:
  """The one `SPDState` inside an optimizer state, wherever it sits.

  For reading its per-layer values by name, which
  `optax.tree_utils.tree_get` cannot (they are properties over one packed
  array): ``spd_optax.spd_state(opt_state).ratio`` is a tree like params,
  per leaf the applied ratio of each layer at the last step.

  Example:
    ```python
    optimizer = nnx.Optimizer(model, spd_optax.adam_spd(1e-4), wrt=nnx.Param)
    ...
    spd_optax.spd_state(optimizer.opt_state).condition
    ```

  Raises:
    ValueError: if `state` holds no SPDState, or several (e.g. one per
      `optax.multi_transform` group): their paths are named, and
      `spd_optax.state.spd_states_with_paths` lists them all.
  """
  found = _find(state)
  if len(found) > 1:
    raise ValueError(f"this optimizer state holds {len(found)} SPDStates, at "
                     f"{[p for p, _ in spd_states_with_paths(state)]}; pick one from "
                     "spd_optax.state.spd_states_with_paths(state).")
  return found[0]


def _find(state) -> list[SPDState]:
  found = [s for _, s in spd_states_with_paths(state)]
  if not found:
    raise ValueError("this optimizer state holds no SPDState: was it made by "
                     "spd_optax.selective_projection_decay or adam_spd?")
  return found


def spd_stats(state) -> dict[str, jax.Array]:
  """A few scalars worth logging every few steps, from the last step's SPD.

  The unit is a layer: an SPD leaf, or one index along the ``layer_axes``
  of a leaf stacking layers (a leaf of L stacked blocks counts as L units,
  as if they were separate leaves). Returns a dict of float32 scalars
  (jit-friendly, no host transfer):
    - ``decayed_fraction``: share of units SPD pulled back at the last step
      (applied ratio r_t > 0). Zero for a long time means SPD is not acting:
      λ may be too small to matter or the run is still early.
    - ``mean_ratio``: mean over units of the applied ratio r_t, which is 0
      wherever no decay was applied (c_t >= 0, nothing moved away, or λ = 0).
      With ``norm="rows_l1"`` each unit's ratio is the mean of its rows'
      applied ratios, and ``decayed_fraction`` counts units with any row
      pulled back.
    - ``deviation``: ‖θ - θ_0‖ over all SPD leaves after the last step; with
      the zero anchor this is the norm of the adapters.

  Example:
    ```python
    updates, state = tx.update(grads, state, params)
    print({k: float(v) for k, v in spd_optax.spd_stats(state).items()})
    ```
  """
  # Sums per state, then one division: no concatenation, which on an
  # Explicit mesh would need every part on one sharding.
  decayed = ratio_sum = squares = units = 0
  for s in _find(state):
    per_layer = trees.unwrap(s.per_layer).astype(jnp.float32)
    ratios, deviations = per_layer[1], per_layer[2]
    decayed = decayed + jnp.sum(ratios > 0, dtype=jnp.float32)
    ratio_sum = ratio_sum + jnp.sum(ratios)
    squares = squares + jnp.sum(jnp.square(deviations))
    units += s.layout.units
  if not units:
    zero = jnp.zeros((), jnp.float32)
    return {"decayed_fraction": zero, "mean_ratio": zero, "deviation": zero}
  return {
      "decayed_fraction": decayed / units,
      "mean_ratio": ratio_sum / units,
      "deviation": jnp.sqrt(squares),
  }


def set_anchor(state, anchor):
  """Returns `state` with its stored SPD anchors replaced from `anchor`.

  For an anchor other than the params given to ``init``: resuming from
  fine-tuned weights with the pre-trained ones as anchor, or a different
  reference model. `anchor` is a tree like the params: a plain pytree, a
  `flax.nnx.State` (``nnx.state(model, nnx.Param)``) or its
  ``nnx.to_pure_dict``. Leaves are matched by their path in the tree, with
  nnx Variables unwrapped, so the containers may differ from the state's
  (e.g. ``Param`` against the ``OptVariable`` an `nnx.Optimizer` stores).

  Every SPD part of the state that stores an anchor takes its own leaves
  from the one `anchor` tree: under ``optax.multi_transform`` or
  ``optax.masked`` a part stores only the leaves of its partition, and
  leaves outside it or masked off by SPD's ``mask`` (``optax.MaskedNode`` in
  its anchor) store nothing. Parts made with ``anchor="zeros"`` store no
  anchor and are skipped.

  Each leaf is copied and cast to the stored anchor's dtype and placed like
  it (same sharding and memory kind); the state keeps its own structure and
  wrappers. The arrays stay arguments of whatever step function takes the
  state, never constants compiled into it.

  Example:
    ```python
    state = tx.init(finetuned_params)
    state = spd_optax.set_anchor(state, pretrained_params)
    # with flax.nnx:
    opt.opt_state = spd_optax.set_anchor(opt.opt_state,
                                         nnx.state(pretrained, nnx.Param))
    ```

  Raises:
    ValueError: if no SPD part of the state stores an anchor, or `anchor`
      lacks a leaf one stores, has leaves the params do not, or has a leaf
      of another shape (naming the leaves).
  """
  parts = [s for s in _find(state) if s.anchor is not None]
  if not parts:
    raise ValueError("no SPD part of this state stores an anchor: with "
                     "anchor='zeros' there is none to set; create it with "
                     "anchor='params' to set one.")
  given = _by_path(anchor)
  known, masked, missing, wrong = set(), set(), [], []
  for s in parts:
    for key, old in _by_path(s.anchor, keep_masked=True).items():
      known.add(key)
      if trees.is_masked(old):
        masked.add(key)  # a leaf, or a whole subtree under a prefix mask
        continue
      if key not in given:
        missing.append(trees.name(key))
      elif jnp.shape(given[key]) != old.shape:
        wrong.append(f"{trees.name(key)} of shape {jnp.shape(given[key])} does not "
                     f"match the stored anchor's {old.shape}")
  extra = [trees.name(k) for k in given if k not in known
           and not any(k[:len(m)] == m for m in masked)]
  if missing or extra:
    raise ValueError(
        "the anchor must have the structure of the params the state was made "
        f"for: missing {missing or 'none'}, extra {extra or 'none'}.")
  if wrong:
    raise ValueError(f"anchor leaf {'; '.join(wrong)}.")

  def replace(s):
    if not _is_spd(s) or s.anchor is None:
      return s  # Variables outside SPD parts stay the same objects
    flat, treedef = jax.tree_util.tree_flatten_with_path(s.anchor, is_leaf=trees.is_masked)
    copy = lambda p, o: sharding.place_like(sharding.fresh_copy(given[trees.key(p)], o.dtype), o)
    leaves = [o if trees.is_masked(o) else copy(p, o) for p, o in flat]
    return s._replace(anchor=treedef.unflatten(leaves))

  return jax.tree.map(replace, state, is_leaf=lambda x: _is_spd(x) or trees.is_variable(x))


def _by_path(tree, keep_masked=False) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=trees.is_masked if keep_masked else None)[0]
  return {trees.key(p): x for p, x in flat}
