"""Where SPD's arrays live: meshes, `jax.shard_map`'s manual axes, host
memory, and the shardings of an optimizer state holding SPD."""

from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from spd_optax import _compat
from spd_optax import trees

# --------------------------------------------------------------------------
# Meshes (under jax.jit, where XLA places the arrays)


def mesh_of(x):
  """The (abstract) mesh in `x`'s type, or None: arrays on a mesh carry it
  in their type, and on Explicit axes their sharding too."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return None if mesh is None or mesh.empty else mesh


def explicit_mesh(x):
  """The mesh of `x`'s type if it has Explicit axes, else None."""
  mesh = mesh_of(x)
  return mesh if mesh is not None and AxisType.Explicit in mesh.axis_types else None


def partitioned(x) -> bool:
  """Whether XLA may split `x` over several devices: on a mesh of more than
  one, outside `jax.shard_map` (whose values are one device's own)."""
  mesh = mesh_of(x)
  return (mesh is not None and mesh.size > 1
          and not jax.sharding.get_abstract_mesh().manual_axes)


def replicated(x, like, constant=False):
  """`x` replicated on the mesh of `like`, where that mesh places it: an
  Explicit mesh under `jax.jit`, or `like`'s concrete mesh outside it."""
  if isinstance(x, jax.core.Tracer) or isinstance(like, jax.core.Tracer):
    mesh = explicit_mesh(like)
    # Under jit, Auto axes leave placement to the compiler, and so does a
    # jit outside jax.set_mesh for a constant (it may have no devices yet).
    if mesh is None or (constant and jax.sharding.get_abstract_mesh().empty):
      return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P()))
  return jax.device_put(x, NamedSharding(like.sharding.mesh, P()))


def like_params(x, params_l):
  """`x` replicated on the params' mesh, if they are on one: where a step
  on those params returns it, so the state's types stay those of ``init``."""
  for p in params_l:
    if mesh_of(p) is not None:
      return replicated(x, p, constant=True)
  return x


def place_like(new, old):
  """`new` with the sharding and memory kind of the array `old`."""
  if isinstance(old, jax.core.Tracer) or not hasattr(old, "sharding"):
    return new
  return jax.device_put(new, old.sharding)


def fresh_copy(x, dtype):
  """`x` in `dtype`, as a new buffer even under `jax.jit`: an anchor that
  aliased the params (a forwarded input) would break donating both."""
  return jnp.array(x, dtype=dtype, copy=True)


# --------------------------------------------------------------------------
# Inside jax.shard_map: how a leaf is split over the manual axes


def dim_axes(spec, ndim) -> list[tuple[str, ...]]:
  """Per axis of a leaf, the manual mesh axes (of the enclosing
  `jax.shard_map`) that `spec` splits it over; axes the compiler shards
  (not manual) are not the step's to handle."""
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  names = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  return [tuple(n for n in names(e) if n in manual) for e in entries[:ndim]]


def layer_shape(p, axes, spec) -> tuple[int, ...]:
  """The shape of a leaf's layer axes over the whole leaf: inside
  `jax.shard_map`, a layer axis that `spec` splits over devices holds one
  device's layers, so its length is that times the devices along it."""
  shape = tuple(np.shape(p)[i] for i in axes)
  if spec is None:
    return shape
  mesh = jax.sharding.get_abstract_mesh()
  split = dim_axes(spec, np.ndim(p))
  return tuple(n * int(np.prod([mesh.shape[a] for a in split[i]]))
               for n, i in zip(shape, axes))


def manual_split(path, p, arrays, axes, axis_name, spec):
  """How a leaf is split over the manual axes of an enclosing
  `jax.shard_map`: (the axes to add its per-layer sums over, and per layer
  axis the axes splitting it). Each device holds part of such a leaf, and a
  condition or a norm over its part alone is not SPD's.

  `arrays` are the leaf's (gradient, params, anchor, ...), whose varying
  axes JAX tracks; `spec` is the leaf's `param_specs` entry, or None.
  """
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  if not manual:
    return (), ()
  varying = frozenset().union(*(_compat.varying_axes(x) for x in arrays
                                 if x is not None and not trees.is_masked(x)))
  checked = _compat.tracks_varying_axes()
  if spec is not None:
    if len(spec) > np.ndim(p):
      raise ValueError(f"param_specs for params{path} is {spec}, for a leaf of "
                       f"{np.ndim(p)} axes.")
    split = dim_axes(spec, np.ndim(p))
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


def across_devices(sums, psum_axes=(), layer_split=()):
  """One device's per-layer sums made the whole leaf's, inside
  `jax.shard_map`: added over `psum_axes`, the manual axes that split a
  layer's elements, and where a layer axis is split over devices
  (`layer_split`: per layer axis, the manual axes splitting it), the sums
  of every device's layers gathered, so that the per-layer values are those
  of all layers, the same on every device. Unchanged elsewhere."""
  if psum_axes:
    sums = lax.psum(sums, psum_axes)
  return tuple(_gather_layers(s, layer_split) for s in sums)


def _gather_layers(x, layer_split):
  # A psum of each device's layers placed among all, not an all_gather: its
  # result is typed the same on every device, as shard_map's replication
  # check wants of the state.
  for k, names in enumerate(layer_split):
    if names:
      n = x.shape[k]
      full = jnp.zeros(x.shape[:k] + (n * lax.axis_size(names),) + x.shape[k + 1:],
                       x.dtype)
      x = lax.psum(lax.dynamic_update_slice_in_dim(full, x, lax.axis_index(names) * n, k),
                   names)
  return x


def local_layers(x, layer_split=()):
  """The entries of a per-layer array (of all layers) for this device's
  layers, where `layer_split` splits them (see `across_devices`)."""
  for k, names in enumerate(layer_split):
    if names:
      n = x.shape[k] // lax.axis_size(names)
      x = lax.dynamic_slice_in_dim(x, lax.axis_index(names) * n, n, k)
  return x


# --------------------------------------------------------------------------
# Host memory (anchor_on_host)


def anchor_to_device(anchor, after=None):
  """One leaf's host anchor in device memory, held back until `after` exists.

  Moving every leaf's anchor in at the start of a step keeps all of them
  on the device together, which raises the device peak above keeping the
  anchor there (XLA:TPU's memory analysis, benchmarks/NOTES.md). Called
  per leaf with the previous leaf's result as `after`, the moved copy is
  tied to that result by `lax.optimization_barrier`, so XLA cannot start
  the leaf's work (and hold its anchor) before the previous leaf is done.
  The values are exactly `anchor`'s.

  Args:
    anchor: one leaf of the anchor, in host memory (or device memory: the
      move is then a no-op); None (the zero anchor) and `optax.MaskedNode`
      pass through.
    after: an array or tree to wait for, e.g. the previous leaf's update;
      None for the first leaf.
  """
  if anchor is None or not hasattr(anchor, "shape"):
    return anchor
  anchor = jax.device_put(anchor, jax.memory.Space.Device)
  if after is not None:
    # The barrier on the moved copy, not on the host value: XLA's host
    # offloading moves a barrier's host operands to the device first.
    anchor, _ = lax.optimization_barrier((anchor, after))
  return anchor


def warn_if_on_device(paths, anchors, stacklevel) -> None:
  """Warns once if an anchor meant for host memory is in device memory."""
  for path, a in zip(paths, anchors):
    if a is None or trees.is_masked(a):
      continue
    if getattr(jax.typeof(a), "memory_space", None) == jax.memory.Space.Device:
      warnings.warn(
          f"anchor_on_host=True, but the anchor of params{path} arrived in "
          "device memory, so it takes the device memory it was meant to "
          "save. Its sharding lost the pinned_host memory kind: give the "
          "state the shardings of spd_optax.state_shardings(tx, params) "
          "(optax.tree_map_params gives the anchor the params' shardings, "
          "in device memory).", stacklevel=stacklevel + 1)
      return


# --------------------------------------------------------------------------
# The state's shardings


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
  """Shardings for ``tx.init(params)``, on Explicit and Auto meshes alike.

  Every state array shaped like a param at the same key path (the anchor,
  Adam's moments, any inner optimizer's params-shaped buffers) gets that
  param's sharding; an anchor made with ``anchor_on_host=True`` gets it in
  ``pinned_host`` memory, where `optax.tree_map_params` would put it in
  device memory; everything else (counts, the packed per-layer values) is
  replicated. Nothing is computed: `params` may be `jax.ShapeDtypeStruct`s
  with ``sharding=``. Inside `jax.shard_map`, their ``.spec`` are the
  state's specs (docs/scaling.md).

  Example:
    ```python
    ssh = spd_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=ssh)(params)
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(psh, ssh))
    ```

  Args:
    tx: the optimizer, with SPD anywhere inside it.
    params: the params (arrays or `jax.ShapeDtypeStruct`s) with
      `NamedSharding`s.

  Returns:
    A tree like ``tx.init(params)`` of `NamedSharding`s.

  Raises:
    ValueError: if no param carries a `NamedSharding` (there is no mesh to
      lay the state out on).
  """
  by_key = [(k, p.sharding, tuple(p.shape)) for k, p in trees.with_paths(params)
            if isinstance(getattr(p, "sharding", None), NamedSharding)]
  if not by_key:
    raise ValueError("no param carries a NamedSharding: place the params on a "
                     "mesh (jax.device_put(params, shardings)) or pass "
                     "jax.ShapeDtypeStruct(..., sharding=...) for them.")
  mesh = by_key[0][1].mesh
  everywhere = NamedSharding(mesh, P())
  by_key.sort(key=lambda e: -len(e[0]))   # the longest matching key wins

  def pick(path, leaf):
    where = trees.key(path)
    for k, sharding, shape in by_key:
      if where[len(where) - len(k):] == k and tuple(leaf.shape) == shape:
        return sharding.with_memory_kind("device")
    return everywhere

  out = jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))

  # An SPD state is the part whose static layout says where its anchor
  # lives (read by attribute: the state's module builds on this one).
  on_host = lambda s: getattr(getattr(s, "layout", None), "anchor_on_host", False)
  to_host = lambda s: s._replace(anchor=jax.tree.map(
      lambda x: x.with_memory_kind("pinned_host"), s.anchor)) if on_host(s) else s
  return jax.tree.map(to_host, out, is_leaf=on_host)
