"""The options of `selective_projection_decay`: checked when the optimizer is
built, then resolved against the params into one `Leaf` record per leaf SPD
acts on. Trees of options are matched to the params by key path, not
container type, so a plain dict fits an `nnx.State`, nnx Variables or linen
boxes. Every error names the leaf and the fix. Nothing here adds an
operation to the compiled step but `strength`, which evaluates λ.
"""

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spd_optax import sharding

NORMS = ("frobenius", "rows_l1")
STATIC_HINT = ("Under optax.inject_hyperparams, pass static_args=('{}',): it turns "
               "numbers into arrays and calls callables as schedules.")

def is_variable(x) -> bool:
  # flax.nnx Variables carry their param's metadata (e.g. its sharding); the
  # per-layer values must not inherit it, so trees are read with Variables
  # as leaves. Looked up lazily: flax is not a dependency.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def is_masked(x) -> bool:
  """`optax.MaskedNode`: a place with no leaf (SPD stores it where it leaves
  a leaf alone, `optax.masked` passes it for leaves outside its mask)."""
  return isinstance(x, optax.MaskedNode)


def unwrap(x):
  """The array an nnx Variable holds; anything else as it is."""
  return (x.get_value() if hasattr(x, "get_value") else x.value) if is_variable(x) else x


def is_function(x) -> bool:
  """A callable that is not itself a tree of entries: an equinox Module
  used as a mask or ``layer_axes`` tree is callable (its forward pass)."""
  return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def key(path) -> tuple:
  """A leaf's place in a tree, whatever holds it (a dict entry, a dataclass
  field, a list index); the ``.value`` of a Variable or box is no part of it."""
  raw = lambda k: next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)
  return tuple(raw(k) for k in path
               if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def name(k: tuple) -> str:
  """`params[...]`-style name of a key."""
  return "".join(f"[{x!r}]" for x in k)


def with_paths(tree, is_leaf=is_variable) -> list[tuple[tuple, Any]]:
  """(key, leaf) pairs in flatten order; see `key`."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [(key(p), x) for p, x in flat]


def broadcast_prefix(prefix, params, what: str, is_entry=None) -> list[Any]:
  """One entry of `prefix` per leaf of params (flatten order), where `prefix`
  is a tree like params or a prefix of it (as `optax.masked` accepts)."""
  is_entry_or_var = lambda x: is_variable(x) or (is_entry is not None and is_entry(x))
  entries = dict(with_paths(prefix, is_leaf=is_entry_or_var))
  used, out, missing = set(), [], []
  for k, leaf in with_paths(params, is_leaf=lambda x: is_variable(x) or is_masked(x)):
    found = [k[:i] for i in range(len(k) + 1) if k[:i] in entries]
    if found:
      used.add(found[-1])
    if is_masked(leaf):  # a masked-off place has no leaf but may have an entry
      continue
    if not found:
      missing.append(name(k))
      continue
    out.append(unwrap(entries[found[-1]]))
  extra = [name(k) for k in entries if k not in used and k != ()]
  if missing or extra:
    raise ValueError(
        f"{what} must be a tree like params or a prefix of it (or a callable "
        f"of params returning one), matched by key: no entry for params "
        f"{missing or 'none'}; entries for no param {extra or 'none'}.")
  return out


class Options(NamedTuple):
  """The checked arguments of `selective_projection_decay` that say how
  each leaf is treated; `per_leaf`: whether λ is given per leaf (a tree,
  or an array of the layers' shape) rather than one for all."""
  weight_decay: Any
  mask: Any
  layer_axes: Any
  axis_name: tuple[str, ...] | None
  param_specs: Any
  norm: str
  per_leaf: bool


class Leaf(NamedTuple):
  """One leaf SPD acts on, as a step sees it: its place in the params'
  flatten order and its name (for errors); its layer axes, sorted (``()``:
  the leaf is one layer) and their shape over the whole leaf; its entry of
  a per-leaf ``weight_decay``; inside `jax.shard_map`, the manual axes
  splitting its layers' elements (its sums are added over them) and, per
  layer axis, those splitting it (its layers' sums are gathered)."""
  index: int
  path: str
  axes: tuple[int, ...]
  layer_shape: tuple[int, ...]
  strength: Any = None
  psum_axes: tuple[str, ...] = ()
  layer_split: tuple[tuple[str, ...], ...] = ()


def options(weight_decay, mask, layer_axes, axis_name, param_specs, norm) -> Options:
  """`Options`, or the error that says what is wrong with an argument."""
  if weight_decay is None or isinstance(weight_decay, (str, bytes)):
    raise TypeError("weight_decay must be a float >= 0, a schedule, or a tree "
                    f"of those like params; got {weight_decay!r}.")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  _check_layer_axes(layer_axes)
  if isinstance(axis_name, str):
    axis_name = (axis_name,)
  if axis_name is not None and not (
      isinstance(axis_name, tuple) and all(isinstance(n, str) for n in axis_name)):
    raise TypeError(f"axis_name must be a mesh axis name, a tuple of them, or None; "
                    f"got {axis_name!r}. " + STATIC_HINT.format("axis_name"))
  if param_specs is not None and axis_name is not None:
    raise ValueError("give axis_name or param_specs, not both: param_specs "
                     "says which axes split each leaf, and so which to sum over.")
  w = weight_decay
  per_leaf = not (is_function(w) or isinstance(w, jax.core.Tracer)) and (
      np.ndim(w) > 0 if isinstance(w, (jax.Array, np.ndarray))
      else not jax.tree_util.treedef_is_leaf(jax.tree.structure(w)))
  if not per_leaf:
    check_non_negative("weight_decay", weight_decay)
  return Options(weight_decay, mask, layer_axes, axis_name, param_specs, norm, per_leaf)


def check_non_negative(what: str, value) -> None:
  """Raises for a concrete negative or NaN value; traced values (under
  `optax.inject_hyperparams` inside `jit`) and schedules pass through."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  value = np.asarray(value)
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f"{what} must be >= 0 and not NaN, got {value}.")


def check_float_dtype(what: str, dtype) -> Any:
  """`dtype` as a floating dtype (or None); raises otherwise."""
  if dtype is None:
    return None
  if isinstance(dtype, (jax.Array, np.ndarray)):
    raise TypeError(f"{what} must be a dtype, got an array ({dtype!r}). "
                    + STATIC_HINT.format(what))
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{what} must be a dtype, got {dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{what} must be a floating-point dtype, got {dtype}: an "
                     "integer anchor would truncate the pre-trained weights.")
  return dtype


def _check_layer_axes(layer_axes) -> None:
  if isinstance(layer_axes, (jax.Array, np.ndarray)):
    raise TypeError("layer_axes must be None, an int, a tuple of ints, a tree of "
                    f"those like params, or a callable of params; got an array "
                    f"({layer_axes!r}). " + STATIC_HINT.format("layer_axes"))


def is_axes_entry(x) -> bool:
  """An entry of a `layer_axes` tree: None, an int, or a tuple of ints."""
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  return x is None or is_int(x) or (isinstance(x, tuple) and all(map(is_int, x)))


def layer_axes(entries, params) -> list[tuple[int, ...]]:
  """Sorted non-negative layer axes of every leaf of params, flatten order,
  from a `layer_axes` argument (a tree, a prefix or a callable)."""
  if is_function(entries):
    entries = entries(params)
  _check_layer_axes(entries)
  out = []
  for (k, leaf), entry in zip(with_paths(params), broadcast_prefix(
      entries, params, "layer_axes", is_axes_entry)):
    if not is_axes_entry(entry):
      raise ValueError(f"layer_axes for params{name(k)} must be None, an int or a "
                       f"tuple of ints; got {entry!r}.")
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    ndim = np.ndim(unwrap(leaf))
    if any(not -ndim <= a < ndim for a in axes):
      raise ValueError(f"layer_axes {entry!r} for params{name(k)}: the leaf has shape "
                       f"{np.shape(unwrap(leaf))}, so an axis must be in [{-ndim}, {ndim}).")
    axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
      raise ValueError(f"layer_axes {entry!r} for params{name(k)} names an axis twice.")
    out.append(axes)
  return out


def _is_bool(x) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return True
  return (isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
          and x.shape == () and x.dtype == np.bool_)


def _mask(mask, params) -> list[bool]:
  """The mask as one Python bool per leaf of params, in flatten order."""
  if mask is None:
    return [True] * len(with_paths(params))
  if is_function(mask):
    mask = mask(params)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)) and len(with_paths(params)) > 1:
    # One value for a whole tree is what optax.inject_hyperparams makes of a
    # callable mask (it calls it with the step count): never take it as "all".
    raise TypeError(f"mask is the single value {mask!r} for a tree of params: give "
                    "a bool per leaf or per subtree (mask=None decays every leaf). "
                    + STATIC_HINT.format("mask"))
  flags = broadcast_prefix(mask, params, "mask")
  for (k, _), flag in zip(with_paths(params), flags):
    if not _is_bool(flag):
      raise TypeError(f"mask entries must be bools; got {flag!r} for params{name(k)}."
                      + (" " + STATIC_HINT.format("mask") if isinstance(flag, jax.Array)
                         else ""))
  return [bool(f) for f in flags]


def _specs(param_specs, params) -> list:
  """Per leaf of params, its `PartitionSpec` in `param_specs`, or None."""
  if param_specs is None:
    return [None] * len(with_paths(params))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = broadcast_prefix(param_specs, params, "param_specs", is_spec)
  for (k, _), spec in zip(with_paths(params), specs):
    if not is_spec(spec):
      raise TypeError(f"param_specs for params{name(k)} must be a "
                      f"jax.sharding.PartitionSpec, got {spec!r}.")
  return specs


def resolve(opts: Options, params, held=None, arrays=None) -> list[Leaf]:
  """The records of the leaves SPD acts on, or the error naming the leaf
  whose mask, layer axes, strength, dtype or split does not fit.

  At ``init`` from the options alone; at ``update`` for the leaves the state
  holds per-layer values for (`held`: per leaf an array, or
  `optax.MaskedNode` where SPD leaves it alone), checked against them, and
  split inside `jax.shard_map` as `arrays` are (per leaf its gradient,
  params and anchor).
  """
  flat = with_paths(params)
  flags = _mask(opts.mask, params) if held is None else [not is_masked(h) for h in held]
  axes, specs = layer_axes(opts.layer_axes, params), _specs(opts.param_specs, params)
  is_entry = lambda x: x is None or is_function(x) or isinstance(x, (jax.Array, np.ndarray))
  entries = (broadcast_prefix(opts.weight_decay, params, "weight_decay", is_entry)
             if opts.per_leaf else [None] * len(flat))
  out = []
  for i, ((k, p), on) in enumerate(zip(flat, flags)):
    p = unwrap(p)
    if not on:
      continue
    leaf = Leaf(i, name(k), axes[i], sharding.layer_shape(p, axes[i], specs[i]), entries[i])
    if held is None:
      if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
        raise TypeError(f"SPD can only decay floating-point leaves, but params{leaf.path} "
                        f"has dtype {jnp.result_type(p)}; exclude it with mask=...")
      if opts.per_leaf:
        _check_strength(leaf)
    elif leaf.layer_shape != np.shape(held[i]):
      raise ValueError(
          f"params{leaf.path}: layer_axes give per-layer shape {leaf.layer_shape} at "
          f"update, but the state made at init holds {np.shape(held[i])}. A callable "
          "layer_axes must give the same axes for the params at init and at update "
          "(nnx.Optimizer passes plain arrays at update, without metadata): compute "
          "the tree once and pass it.")
    over, split = _split(opts, leaf, p, (p,) if arrays is None else arrays[i], specs[i])
    out.append(leaf._replace(psum_axes=over, layer_split=split))
  return out


def strength(opts: Options, leaf: Leaf, count):
  """The leaf's λ at step `count`: the schedule evaluated, negative values
  as 0 (a traced value cannot raise), NaN kept (it shows)."""
  lam = leaf.strength if opts.per_leaf else opts.weight_decay
  return jnp.maximum(jnp.asarray(lam(count) if callable(lam) else lam), 0)


def _check_structure(params, grads, held):
  """(the params' treedef, their leaves, the gradients' leaves), if both
  trees have the leaves of `held` (the state's per-layer tree made at
  ``init``); else an error naming the missing and extra leaves."""
  if params is None:
    raise ValueError("selective_projection_decay needs the current params: "
                     "call tx.update(grads, state, params).")
  keys = [k for k, _ in with_paths(held, is_leaf=is_masked)]
  for what, tree in (("params", params), ("gradients", grads)):
    have = [k for k, _ in with_paths(tree, is_leaf=lambda x: is_variable(x) or is_masked(x))]
    if have != keys:
      missing = [name(k) for k in keys if k not in set(have)]
      extra = [name(k) for k in have if k not in set(keys)]
      raise ValueError(
          f"the {what} do not have the structure of the params the SPD state was "
          f"made for at init: missing {missing or 'none'}, extra {extra or 'none'}"
          f"{'' if missing or extra else ' (or their containers differ)'}. Pass the "
          "same tree of params to init and update, or init a new state.")
  treedef = jax.tree.structure(params)
  try:
    grads_l = treedef.flatten_up_to(grads)
  except (ValueError, TypeError):
    raise ValueError(f"the gradients' containers differ from the params' (structures "
                     f"{jax.tree.structure(grads)} and {treedef}): pass gradients "
                     "of the same tree.") from None
  return treedef, treedef.flatten_up_to(params), grads_l


def at_update(opts: Options, params, grads, state):
  """What a step knows before the inner optimizer runs: the params' treedef
  and per-leaf structure (nnx Variables as leaves, as at ``init``); the
  params', gradients' and anchors' leaves; per leaf, the state's
  ``(condition, ratio, deviation)``; and the records of the leaves SPD acts
  on, each with its λ at this step in ``strength``. Raises for params or
  gradients unlike those given to ``init``, naming the leaves."""
  treedef, params_l, grads_l = _check_structure(params, grads, state.condition)
  per_leaf = jax.tree.structure(params, is_leaf=is_variable)
  held = [per_leaf.flatten_up_to(v) for v in (state.condition, state.ratio, state.deviation)]
  anchors_l = ([None] * len(params_l) if state.anchor is None
               else treedef.flatten_up_to(state.anchor))
  leaves = resolve(opts, params, held[0], list(zip(grads_l, params_l, anchors_l)))
  leaves = [leaf._replace(strength=strength(opts, leaf, state.count)) for leaf in leaves]
  return treedef, per_leaf, params_l, grads_l, anchors_l, held, leaves


def _check_strength(leaf: Leaf) -> None:
  """Raises for a per-leaf strength that can never be the leaf's."""
  entry, shape = leaf.strength, leaf.layer_shape
  if callable(entry) or isinstance(entry, jax.core.Tracer) and np.shape(entry) in ((), shape):
    return
  what = (f"weight_decay for params{leaf.path} must be a float >= 0, a schedule, "
          f"or an array of its per-layer shape {shape}")
  if entry is None or _is_bool(entry) or isinstance(entry, (str, bytes)):
    raise TypeError(f"{what}; got {entry!r}.")
  if np.shape(entry) not in ((), shape):
    raise ValueError(f"{what} (from layer_axes); got shape {np.shape(entry)}.")
  try:
    value = np.asarray(entry)
  except (TypeError, ValueError):
    raise TypeError(f"{what}; got {entry!r}.") from None
  if value.dtype.kind not in "iuf":
    raise TypeError(f"{what}; got {entry!r} (dtype {value.dtype}).")
  if np.any(np.isnan(value)) or np.any(value < 0):
    raise ValueError(f"{what}, not negative or NaN; got {value}.")


def _split(opts, leaf, p, arrays, spec):
  """How a leaf is split over the manual axes of an enclosing
  `jax.shard_map`: (the axes to add its per-layer sums over, and per layer
  axis the axes splitting it). Each device holds part of such a leaf, and
  a condition or a norm over its part alone is not SPD's."""
  manual = sharding.manual_axes()
  if not manual:
    return (), ()
  varying = frozenset().union(*(sharding.varying_axes(x) for x in arrays if x is not None))
  checked = sharding.tracks_varying_axes()
  if spec is not None:
    out = _split_by_spec(leaf, p, spec, varying if checked else frozenset())
  elif opts.axis_name is None:
    if checked and varying:
      raise ValueError(
          f"params{leaf.path} varies over the manual mesh axes {sorted(varying)} of "
          "a jax.shard_map: each device holds part of it, and SPD's condition "
          "and norms must span the whole layer. Pass axis_name= naming the "
          "axes the leaf's elements are split over, or param_specs=, or call "
          "the optimizer outside shard_map.")
    # jax.pmap and shard_map(check_vma=False) do not say what varies: each
    # device's leaf is taken as the whole leaf, as pmap's replicated params are.
    return (), ()
  else:
    out = _split_by_axis_name(leaf, opts.axis_name, manual, varying, checked)
  if opts.norm != "frobenius" and (out[0] or any(out[1])):
    # A device's part of a leaf may hold whole rows or parts of rows, and
    # per-row sums added over devices would be wrong in the first case.
    raise ValueError(f"params{leaf.path}: norm='rows_l1' on a leaf split inside "
                     "jax.shard_map is not supported: call the optimizer under "
                     "jax.jit (sharding left to the compiler), or use norm='frobenius'.")
  return out


def _split_by_spec(leaf, p, spec, varying):
  if len(spec) > np.ndim(p):
    raise ValueError(f"param_specs for params{leaf.path} is {spec}, for a leaf of "
                     f"{np.ndim(p)} axes.")
  split = sharding.dim_axes(spec, np.ndim(p))
  if varying - frozenset().union(*map(frozenset, split)):
    raise ValueError(
        f"params{leaf.path} varies over the manual mesh axes {sorted(varying)} of the "
        f"jax.shard_map, which its param_specs entry {spec} does not all split it "
        "over: give each leaf the PartitionSpec the shard_map's in_specs give it.")
  over = tuple(n for i, names in enumerate(split) if i not in leaf.axes for n in names)
  return over, tuple(split[i] for i in leaf.axes)


def _split_by_axis_name(leaf, axis_name, manual, varying, checked):
  if not checked:
    raise ValueError(
        "selective_projection_decay runs inside a jax.shard_map (or pmap) that "
        "does not track which axes values vary over (check_vma=False), so "
        "axis_name cannot tell a split leaf from a replicated one: pass "
        "param_specs= (the PartitionSpecs the shard_map gives the params).")
  if set(axis_name) - manual:
    raise ValueError(f"axis_name {sorted(set(axis_name) - manual)} are not manual axes "
                     f"of the enclosing jax.shard_map (those are {sorted(manual)}).")
  if varying - set(axis_name):
    raise ValueError(
        f"params{leaf.path} varies over the manual mesh axes "
        f"{sorted(varying - set(axis_name))}, which axis_name={axis_name} does not "
        "name: its SPD sums would cover one device's part only. Add them to axis_name.")
  if leaf.axes and varying:
    raise ValueError(
        f"params{leaf.path} stacks layers (layer_axes {leaf.axes}) and varies over "
        f"the manual mesh axes {sorted(varying)}: axis_name cannot say whether its "
        "layers or each layer's elements are split over them. Pass param_specs= "
        "(the PartitionSpecs the shard_map gives the params).")
  # Invariant values need no sum (psum would count them once per device).
  return tuple(n for n in axis_name if n in varying), ()
