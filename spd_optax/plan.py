"""What the step knows of each leaf before it sees its values.

`options` checks the arguments of `selective_projection_decay` when the
optimizer is built. `at_init` and `at_update` resolve them against the
params into one `Leaf` record per leaf SPD acts on: its layer axes and
layer shape, its strength, and how it is split inside `jax.shard_map`. All
of it is static: nothing here adds an operation to the compiled step, but
`strengths`, which evaluates λ.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spd_optax import layers
from spd_optax import sharding
from spd_optax import trees

NORMS = ("frobenius", "rows_l1")


@dataclasses.dataclass(frozen=True)
class Options:
  """The checked arguments of `selective_projection_decay` that say how
  each leaf is treated (the anchor's are `transform.build`'s)."""
  weight_decay: Any
  mask: Any
  layer_axes: Any
  axis_name: str | tuple[str, ...] | None
  param_specs: Any
  norm: str

  @property
  def per_leaf(self) -> bool:
    """Whether λ is given per leaf (a tree like params or a prefix of it,
    or an array of the layers' shape) rather than one for all."""
    w = self.weight_decay
    if callable(w) or isinstance(w, jax.core.Tracer):
      return False
    if isinstance(w, (jax.Array, np.ndarray)):
      return np.ndim(w) > 0
    return not jax.tree_util.treedef_is_leaf(jax.tree.structure(w))


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
  """One leaf SPD acts on, as the step sees it.

  Attributes:
    index: its place in the params' flatten order.
    path: its name, ``['blocks']['w']``, for errors.
    axes: its layer axes, sorted (``()``: the leaf is one layer).
    layer_shape: the shape of its layer axes over the whole leaf.
    strength: its entry of a per-leaf ``weight_decay``, else None.
    psum_axes: inside `jax.shard_map`, the manual axes splitting its
      layers' elements (its sums are added over them).
    layer_split: inside `jax.shard_map`, per layer axis, the manual axes
      splitting it (its layers' sums are gathered over them).
  """
  index: int
  path: str
  axes: tuple[int, ...]
  layer_shape: tuple[int, ...]
  strength: Any
  psum_axes: tuple[str, ...] = ()
  layer_split: tuple[tuple[str, ...], ...] = ()


def options(weight_decay=1.0, mask=None, layer_axes=None, axis_name=None,
            param_specs=None, norm="frobenius") -> Options:
  """`Options`, or the error that says what is wrong with an argument."""
  if weight_decay is None or isinstance(weight_decay, (str, bytes)):
    raise TypeError("weight_decay must be a float >= 0, a schedule, or a tree "
                    f"of those like params; got {weight_decay!r}.")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  layers.check_layer_axes(layer_axes)
  if axis_name is not None and not (isinstance(axis_name, str) or (
      isinstance(axis_name, tuple) and all(isinstance(n, str) for n in axis_name))):
    raise TypeError(f"axis_name must be a mesh axis name, a tuple of them, or "
                    f"None; got {axis_name!r}. Under optax.inject_hyperparams, "
                    "pass static_args=('axis_name',).")
  if param_specs is not None and axis_name is not None:
    raise ValueError("give axis_name or param_specs, not both: param_specs "
                     "says which axes split each leaf, and so which to sum over.")
  out = Options(weight_decay, mask, layer_axes, axis_name, param_specs, norm)
  if not out.per_leaf:
    check_non_negative("weight_decay", weight_decay)
  return out


def check_non_negative(name: str, value) -> None:
  """Raises for a concrete negative or NaN value; traced values (under
  `optax.inject_hyperparams` inside `jit`) and schedules pass through."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  value = np.asarray(value)
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f"{name} must be >= 0 and not NaN, got {value}.")


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


# --------------------------------------------------------------------------
# Per leaf


def at_init(opts: Options, params) -> tuple[list[bool], list[Leaf]]:
  """(per leaf, whether SPD acts on it; the records of those it acts on),
  or the error that names the leaf whose mask, layer axes, strength, dtype
  or split does not fit."""
  flags = _mask(opts.mask, params)
  paths = trees.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  for path, p, on in zip(paths, leaves, flags):
    dtype = jnp.result_type(p)
    if on and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"SPD can only decay floating-point leaves, but params{path} has "
          f"dtype {dtype}; exclude it with mask=...")
  records = _records(opts, params, paths, leaves, flags)
  if opts.per_leaf:
    for leaf in records:
      _check_strength(leaf)
  for leaf in records:  # inside jax.shard_map, refused here as at update
    p = leaves[leaf.index]
    sharding.manual_split(leaf.path, p, (p,), leaf.axes, opts.axis_name,
                          _specs(opts.param_specs, params)[leaf.index])
  return flags, records


def check_structure(layout, params, grads):
  """(the params' treedef, their leaves, the gradients' leaves), if both
  trees have the leaves the state was made for at init; else an error that
  names the missing and extra ones, and the fix."""
  if params is None:
    raise ValueError("selective_projection_decay needs the current params: "
                     "call tx.update(grads, state, params).")
  _same_leaves("the params", params, layout.keys)
  treedef = jax.tree.structure(params)
  try:
    grads_l = treedef.flatten_up_to(grads)
  except (ValueError, TypeError):
    _same_leaves("the gradients", grads, layout.keys)
    raise ValueError(
        "the gradients do not have the structure of the params the SPD state "
        f"was made for at init (structures {jax.tree.structure(grads)} and "
        f"{treedef}). Pass the same tree of params to init and update, or "
        "init a new state.") from None
  return treedef, treedef.flatten_up_to(params), grads_l


def _same_leaves(what, tree, keys) -> None:
  have = tuple(k for k, _ in trees.with_paths(tree))
  if have != keys:
    missing = [trees.name(k) for k in keys if k not in set(have)]
    extra = [trees.name(k) for k in have if k not in set(keys)]
    raise ValueError(
        f"{what} do not have the structure of the params the SPD state was "
        f"made for at init: missing {missing or 'none'}, extra {extra or 'none'}"
        f"{'' if missing or extra else ' (the same leaves in another order)'}. "
        "Pass the same tree of params to init and update, or init a new state.")


def at_update(opts: Options, layout, params, arrays) -> list[Leaf]:
  """The records of the leaves the state holds SPD values for, checked
  against the params: the layer shapes the state holds, and how each leaf
  is split in `jax.shard_map` (read off `arrays`, per leaf its gradient,
  params, anchor and update)."""
  leaves = jax.tree.leaves(params)
  paths = trees.leaf_paths(params)
  flags = [shape is not None for shape in layout.shapes]
  records = _records(opts, params, paths, leaves, flags)
  for leaf in records:
    held = layout.shapes[leaf.index]
    if leaf.layer_shape != held:
      raise ValueError(
          f"params{leaf.path}: layer_axes give per-layer shape {leaf.layer_shape} "
          f"at update, but the state made at init holds {held}. A callable "
          "layer_axes must give the same axes for the params at init and at "
          "update (nnx.Optimizer passes plain arrays at update, without "
          "metadata): compute the tree once and pass it.")
  specs = _specs(opts.param_specs, params)
  out = []
  for leaf in records:
    over, split = sharding.manual_split(leaf.path, leaves[leaf.index], arrays[leaf.index],
                                        leaf.axes, opts.axis_name, specs[leaf.index])
    if opts.norm != "frobenius" and (over or any(split)):
      # A device's part of a leaf may hold whole rows or parts of rows, and
      # per-row sums added over devices would be wrong in the first case.
      raise ValueError(
          f"norm='rows_l1' inside jax.shard_map with axis_name is not "
          "supported: call the optimizer under jax.jit (sharding left to the "
          "compiler), or use norm='frobenius'.")
    out.append(dataclasses.replace(leaf, psum_axes=over, layer_split=split))
  return out


def strengths(opts: Options, leaves: list[Leaf], count) -> list:
  """Per record, its λ at step `count`: the schedule evaluated, negative
  values as 0 (a traced value cannot raise), NaN kept (it shows)."""
  if opts.per_leaf:
    # Python-level, at trace time: the tree costs no op of its own.
    return [_strength(leaf.strength, count) for leaf in leaves]
  lam = opts.weight_decay
  lam = lam(count) if callable(lam) else lam
  return [jnp.maximum(jnp.asarray(lam), 0)] * len(leaves)


def _strength(entry, count):
  lam = entry(count) if callable(entry) else entry
  return jnp.maximum(jnp.asarray(lam), 0)


def _records(opts, params, paths, leaves, flags) -> list[Leaf]:
  axes = layers.resolve(opts.layer_axes, params)
  specs = _specs(opts.param_specs, params)
  entries = (trees.broadcast_prefix(opts.weight_decay, params, "weight_decay",
                                    _is_strength_entry)
             if opts.per_leaf else [None] * len(leaves))
  return [Leaf(i, paths[i], axes[i], sharding.layer_shape(leaves[i], axes[i], specs[i]),
               entries[i]) for i in range(len(leaves)) if flags[i]]


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


def _is_bool(x) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return True
  return (isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
          and x.shape == () and x.dtype == np.bool_)


def _mask(mask, params) -> list[bool]:
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


def _is_strength_entry(x) -> bool:
  # None would vanish from a tree's leaves (and read as a missing entry):
  # kept as an entry, so that the error names it.
  return x is None or callable(x) or isinstance(x, (jax.Array, np.ndarray))


def _check_strength(leaf: Leaf) -> None:
  """Raises for a per-leaf strength that can never be the leaf's: not a
  number, NaN, negative, or an array that is not of the leaf's per-layer
  shape. Schedules and traced values pass."""
  entry, shape = leaf.strength, leaf.layer_shape
  if callable(entry):
    return
  what = (f"weight_decay for params{leaf.path} must be a float >= 0, a schedule, "
          f"or an array of its per-layer shape {shape}")
  if entry is None or _is_bool(entry) or isinstance(entry, (bool, str, bytes)):
    raise TypeError(f"{what}; got {entry!r}.")
  if np.shape(entry) not in ((), shape):
    raise ValueError(f"{what} (from layer_axes); got shape {np.shape(entry)}.")
  if isinstance(entry, jax.core.Tracer):
    return
  try:
    value = np.asarray(entry)
  except (TypeError, ValueError):
    raise TypeError(f"{what}; got {entry!r}.") from None
  if value.dtype.kind not in "iuf":
    raise TypeError(f"{what}; got {entry!r} (dtype {value.dtype}).")
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f"{what}, not negative or NaN; got {value}.")
