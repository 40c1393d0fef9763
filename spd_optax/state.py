"""Reading and editing the SPD part of an optimizer state, wherever it sits
(inside `optax.chain`, `optax.MultiSteps`, `optax.inject_hyperparams`, or a
`flax.nnx.Optimizer`)."""

import jax
import jax.numpy as jnp
import optax

from spd_optax.transform import SPDState, _copy


def _is_spd(x) -> bool:
  return isinstance(x, SPDState)


def spd_states_with_paths(state) -> list[tuple[str, SPDState]]:
  """Every SPDState inside `state`, with its path (`jax.tree_util.keystr`)."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_spd)[0]
  return [(jax.tree_util.keystr(p), s) for p, s in flat if _is_spd(s)]


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
    - ``deviation``: ‖θ - θ_0‖ over all SPD leaves after the last step; with
      the zero anchor this is the norm of the adapters.

  Example:
    ```python
    updates, state = tx.update(grads, state, params)
    print({k: float(v) for k, v in spd_optax.spd_stats(state).items()})
    ```
  """
  ratios, deviations = [], []
  for s in _find(state):
    ratios += jax.tree.leaves(s.ratio)
    deviations += jax.tree.leaves(s.deviation)
  if not sum(jnp.size(r) for r in ratios):
    zero = jnp.zeros((), jnp.float32)
    return {"decayed_fraction": zero, "mean_ratio": zero, "deviation": zero}
  # Scalars and per-layer arrays alike: every element is one unit.
  flat = lambda xs: jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in xs])
  ratios, deviations = flat(ratios), flat(deviations)
  return {
      "decayed_fraction": jnp.mean((ratios > 0).astype(jnp.float32)),
      "mean_ratio": jnp.mean(ratios),
      "deviation": jnp.sqrt(jnp.sum(jnp.square(deviations))),
  }


def set_anchor(state, anchor):
  """Returns `state` with its SPD anchor replaced by `anchor` (like params).

  For an anchor other than the params given to ``init``: resuming from
  fine-tuned weights with the pre-trained ones as anchor, or a different
  reference model. The arrays stay arguments of whatever step function takes
  the state, never constants compiled into it. Each leaf is copied and cast to
  the stored anchor's dtype and placed like it (same sharding and memory
  kind); leaves masked off keep no anchor.

  Example:
    ```python
    state = tx.init(finetuned_params)
    state = spd_optax.set_anchor(state, pretrained_params)
    ```

  Raises:
    ValueError: if the state has the zero anchor or no SPD part, or `anchor`
      does not have the structure of params.
  """
  count = len(_find(state))
  if count != 1:
    raise ValueError(f"the state holds {count} SPDStates; set each anchor on its "
                     "own sub-state.")

  def replace(s):
    if not _is_spd(s):
      return s
    if s.anchor is None:
      raise ValueError("this SPD state uses anchor='zeros', which stores no "
                       "anchor; create it with anchor='params' to set one.")
    treedef = jax.tree.structure(s.anchor, is_leaf=_is_masked)
    try:
      new = treedef.flatten_up_to(anchor)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "the anchor must have the structure of the params the state was "
          f"made for ({treedef}); got {jax.tree.structure(anchor)}.") from e
    old = treedef.flatten_up_to(s.anchor)
    for n, o in zip(new, old):
      if not _is_masked(o) and jnp.shape(n) != o.shape:
        raise ValueError(f"anchor leaf of shape {jnp.shape(n)} does not match "
                         f"the stored anchor's {o.shape}.")
    leaves = [o if _is_masked(o) else _place_like(_copy(n, o.dtype), o)
              for n, o in zip(new, old)]
    return s._replace(anchor=treedef.unflatten(leaves))

  return jax.tree.map(replace, state, is_leaf=_is_spd)


def _place_like(new, old):
  # Keep the stored anchor's layout: its mesh sharding and memory kind.
  if isinstance(old, jax.core.Tracer) or not hasattr(old, "sharding"):
    return new
  return jax.device_put(new, old.sharding)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)
