"""Layer axes: which axes of a leaf index separate layers.

Scanned models (`flax.nnx.scan`, `flax.linen.scan`, `jax.lax.scan` over
blocks) store L blocks as one leaf with a leading layer axis. SPD is per
layer, so such a leaf needs one condition and one ratio per index along that
axis, not one for the whole stack.
"""

from typing import Any

import jax
import numpy as np

from spd_optax import trees

Axes = tuple[int, ...]


def is_axes_entry(x) -> bool:
  """An entry of a `layer_axes` tree: None, an int, or a tuple of ints."""
  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  return x is None or is_int(x) or (isinstance(x, tuple) and all(map(is_int, x)))


def check_layer_axes(layer_axes) -> None:
  """Raises at build time for what can never be a `layer_axes` argument."""
  if isinstance(layer_axes, (jax.Array, np.ndarray)):
    raise TypeError(
        "layer_axes must be None, an int, a tuple of ints, a tree of those "
        f"like params, or a callable of params; got an array ({layer_axes!r}). "
        "optax.inject_hyperparams turns numbers into arrays and callables into "
        "schedules: pass static_args=('layer_axes',) to it.")


def resolve(layer_axes, params) -> list[Axes]:
  """Sorted non-negative layer axes of every leaf of params, flatten order.

  Raises:
    ValueError: an entry that is not None/int/tuple of ints, an axis the leaf
      does not have, an axis given twice, or a structure that does not fit.
  """
  if callable(layer_axes):
    layer_axes = layer_axes(params)
  check_layer_axes(layer_axes)
  entries = trees.broadcast_prefix(layer_axes, params, "layer_axes", is_axes_entry)
  leaves = jax.tree.leaves(params)
  out = []
  for path, leaf, entry in zip(trees.leaf_paths(params), leaves, entries):
    if not is_axes_entry(entry):
      raise ValueError(f"layer_axes for params{path} must be None, an int or a "
                       f"tuple of ints; got {entry!r}.")
    axes = () if entry is None else (entry,) if not isinstance(entry, tuple) else entry
    ndim = np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim
    if any(not -ndim <= a < ndim for a in axes):
      raise ValueError(f"layer_axes {entry!r} for params{path}: the leaf has shape "
                       f"{tuple(np.shape(leaf))}, so an axis must be in "
                       f"[{-ndim}, {ndim}).")
    axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
      raise ValueError(f"layer_axes {entry!r} for params{path} names an axis twice.")
    out.append(axes)
  return out


def _names(x) -> tuple | None:
  """The axis names a param carries, if any: nnx Variable sharding metadata,
  linen `Partitioned` boxes, or a `PartitionSpec`."""
  if trees.is_variable(x):
    meta = x.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if meta.get(key):
        return tuple(meta[key])
    return None
  if isinstance(x, jax.sharding.PartitionSpec):
    return tuple(x)
  names = getattr(x, "names", None)
  return tuple(names) if isinstance(names, (tuple, list)) else None


def _is_named(x) -> bool:
  return (trees.is_variable(x) or isinstance(x, jax.sharding.PartitionSpec)
          or isinstance(getattr(x, "names", None), (tuple, list)))


def layer_axes_from_names(tree: Any, name: str = "layers") -> Any:
  """A `layer_axes` tree read off the partition names a model carries.

  `flax.nnx.scan` with ``transform_metadata={nnx.PARTITION_NAME: name}`` and
  `flax.linen.scan` with ``metadata_params={nn.PARTITION_NAME: name}`` insert
  `name` into the sharding names of every param they stack (when the params
  were made with `nnx.with_partitioning` / `nn.with_partitioning`). The
  positions of `name` in a param's names are its layer axes; params without
  it get None (one layer). The scan stacks every param of the blocks, but
  only those made with names carry the layer axis: give the blocks' biases
  and norms names too, or pass a prefix such as ``{"blocks": 0}`` instead.

  Example:
    ```python
    layer_axes = spd_optax.layer_axes_from_names(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(
        model, spd_optax.adam_spd(1e-4, layer_axes=layer_axes), wrt=nnx.Param)
    # linen: from the boxed variables, before unboxing
    layer_axes = spd_optax.layer_axes_from_names(variables["params"])
    ```

  Args:
    tree: params carrying names: an `nnx.State` of Variables, linen params
      with `nn.Partitioned` boxes, or a tree of `PartitionSpec`s (e.g.
      `nn.get_partition_spec(variables)`).
    name: the partition name given to the scan.

  Returns:
    A tree like the (unboxed) params, with an int, a tuple of ints or None
    per leaf. Compute it once from the model and pass the tree: at ``update``
    `nnx.Optimizer` hands SPD plain arrays, which carry no names.

  Raises:
    ValueError: if no param carries `name`: the model does not say which
      axes are layers, so write `layer_axes` by hand (e.g. ``{"blocks": 0}``).
  """
  def axes(x):
    names = _names(x) if _is_named(x) else None
    found = tuple(i for i, n in enumerate(names or ())
                  if n == name or (isinstance(n, tuple) and name in n))
    return None if not found else found[0] if len(found) == 1 else found

  out = jax.tree.map(axes, tree, is_leaf=_is_named)
  if all(a is None for a in jax.tree.leaves(out, is_leaf=is_axes_entry)):
    raise ValueError(
        f"no param carries the partition name {name!r}: scan the blocks with "
        f"nnx.scan(..., transform_metadata={{nnx.PARTITION_NAME: {name!r}}}) "
        "(linen: metadata_params={nn.PARTITION_NAME: ...}) over params made "
        "with with_partitioning, or write layer_axes by hand, e.g. "
        "{'blocks': 0}.")
  return out
