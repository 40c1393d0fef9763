"""Helpers that build SPD's per-leaf options from a model: `layer_axes` read
off a scanned model's partition names, and a depth-decreasing λ.

Scanned models (`flax.nnx.scan`, `flax.linen.scan`, `jax.lax.scan` over
blocks) store L blocks as one leaf with a leading layer axis. SPD is per
layer, so such a leaf needs one condition and one ratio per index along that
axis, not one for the whole stack.
"""

import re
from typing import Any, Callable
import warnings

import jax
import numpy as np

from spd_optax import options


def _names(x) -> tuple | None:
  """The axis names a param carries, if any: nnx Variable sharding metadata,
  linen `Partitioned` boxes, or a `PartitionSpec`."""
  if options.is_variable(x):
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
  return (options.is_variable(x) or isinstance(x, jax.sharding.PartitionSpec)
          or isinstance(getattr(x, "names", None), (tuple, list)))


def layer_axes_from_names(tree: Any, name: str = "layers") -> Any:
  """A `layer_axes` tree read off the partition names a model carries.

  `flax.nnx.scan` with ``transform_metadata={nnx.PARTITION_NAME: name}`` and
  `flax.linen.scan` with ``metadata_params={nn.PARTITION_NAME: name}`` insert
  `name` into the sharding names of every param they stack that was made
  with names (`with_partitioning`). The positions of `name` are the layer
  axes; params without it get None (one layer), with a warning where their
  first axis has the stacked length (a bias made without names).

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
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_named)
  names = [_names(x) if _is_named(x) else None for _, x in flat]

  def axes(leaf_names):
    found = tuple(i for i, n in enumerate(leaf_names or ())
                  if n == name or (isinstance(n, tuple) and name in n))
    return None if not found else found[0] if len(found) == 1 else found

  found = [axes(n) for n in names]
  if all(a is None for a in found):
    raise ValueError(
        f"no param carries the partition name {name!r}: scan the blocks with "
        f"nnx.scan(..., transform_metadata={{nnx.PARTITION_NAME: {name!r}}}) "
        "(linen: metadata_params={nn.PARTITION_NAME: ...}) over params made "
        "with with_partitioning, or write layer_axes by hand, e.g. "
        "{'blocks': 0}.")
  # A param the scan stacked but made without names (a bias, a norm) says
  # nothing, and would silently be one layer: warn where its leading axis
  # has the length of the layer axes found.
  shape = lambda x: np.shape(options.unwrap(x) if options.is_variable(x)
                            else getattr(x, "value", x))  # a linen box's
  arrays = [not isinstance(x, jax.sharding.PartitionSpec) for _, x in flat]
  stacked = {shape(x)[a] for (_, x), axes_, array in zip(flat, found, arrays)
             if axes_ is not None and array
             for a in (axes_ if isinstance(axes_, tuple) else (axes_,))}
  unnamed = [jax.tree_util.keystr(p) for (p, x), n, array in zip(flat, names, arrays)
             if n is None and array and shape(x) and shape(x)[0] in stacked]
  if unnamed:
    warnings.warn(
        f"params {unnamed} carry no partition names, and their first axis has the "
        f"length of the layer axis {name!r} found on others: if the scan stacks "
        "them, they are taken as one layer here. Give them names "
        "(with_partitioning), or set their layer_axes by hand.", stacklevel=2)
  return treedef.unflatten(found)


def depth_scaled(
    params: Any,
    max_weight_decay: float,
    block_index: str | Callable[[tuple], int | None],
    *,
    layer_axes: Any | Callable[[Any], Any] = None,
    num_blocks: int | None = None,
    other: float | None = None,
) -> Any:
  r"""A `weight_decay` tree that decreases with depth: $\lambda_l =
  \lambda_{\max}\,(1 - l / N)$ for a leaf of block $l = 0, \dots, L - 1$.

  Early blocks are held closest to the pre-trained weights, late ones adapt
  most freely: the module-wise schedule of the authors' later code (MAPS,
  Huang et al. 2025), not the NeurIPS paper's (one λ for all). With the
  default $N = L$ the last block keeps $\lambda_{\max}/L$; MAPS' form, 0 at
  the last block, is ``num_blocks=L - 1``. A leaf stacking layers (per
  `layer_axes`) gets an array of its per-layer shape whose layer $j$ is
  block ``index + j``, so stacked and unstacked models get the same λ.

  Example:
    ```python
    # unstacked: params["blocks"][l]; stacked: params["blocks"] is [L, ...]
    wd = spd_optax.depth_scaled(params, 1.0, "blocks", layer_axes=layer_axes,
                                other=0.0)
    tx = spd_optax.adam_spd(1e-4, weight_decay=wd, layer_axes=layer_axes)
    ```

  Args:
    params: the params (a plain pytree, an `nnx.State`, ...).
    max_weight_decay: $\lambda_{\max} \ge 0$, the strength of block 0.
    block_index: a string names the container of the blocks: the key after
      it is the index (a list index, or a dict key like ``"3"``), or a key
      ``name_3`` (linen's ``blocks_3``); a leaf under it with no index is a
      stack of all the blocks (it needs `layer_axes`). Or a callable of a
      leaf's key path (e.g. ``("blocks", 3, "linear", "kernel")``) returning
      the index of its (first) block, or None outside the blocks.
    layer_axes: the optimizer's `layer_axes`, for stacked leaves.
    num_blocks: $N$; default 1 + the largest block index found.
    other: λ for leaves outside the blocks (embeddings, a head). None (the
      default) refuses them, naming them.

  Returns:
    A tree like params (a float, or a per-layer array, per leaf): pass it as
    ``weight_decay``.

  Raises:
    ValueError: a leaf outside the blocks with ``other=None``, a stacked
      leaf without layer axes, or a negative strength.
  """
  if not (isinstance(max_weight_decay, (int, float, np.floating, np.integer))
          and max_weight_decay >= 0):
    raise ValueError(f"max_weight_decay must be a float >= 0, got {max_weight_decay!r}.")
  if other is not None and not (isinstance(other, (int, float, np.floating, np.integer))
                                and other >= 0):
    raise ValueError(f"other must be a float >= 0 or None, got {other!r}.")
  find = _by_name(block_index) if isinstance(block_index, str) else block_index
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=options.is_variable)
  axes_l = options.layer_axes(layer_axes, params)
  found, outside = [], []
  for (path, leaf), axes in zip(flat, axes_l):
    key = options.key(path)
    shape = tuple(np.shape(options.unwrap(leaf))[i] for i in axes)
    index = find(key) if not isinstance(block_index, str) else find(key, bool(axes))
    if index is None:
      outside.append(options.name(key))
    elif not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
      raise ValueError(f"block_index for params{options.name(key)} must be an int >= 0 "
                       f"or None, got {index!r}.")
    found.append((index, shape, leaf))
  if outside and other is None:
    raise ValueError(
        f"params {outside} have no block index: pass other= (their λ, e.g. "
        "0.0), or leave them out of SPD with mask=.")
  last = max([i + int(np.prod(s)) for i, s, _ in found if i is not None], default=0)
  n = max(last, 1) if num_blocks is None else num_blocks
  if not isinstance(n, (int, np.integer)) or n <= 0 or n < last - 1:
    raise ValueError(f"num_blocks={num_blocks!r}: the blocks found go up to index "
                     f"{last - 1}, so it must be an int >= {max(last - 1, 1)} "
                     "(λ would be negative past it).")

  def strength(index, shape, leaf):
    if index is None:
      return other
    if not shape:
      return max_weight_decay * (1 - index / n)
    dtype = np.result_type(np.dtype(options.unwrap(leaf).dtype), np.float32)
    l = index + np.arange(int(np.prod(shape))).reshape(shape)
    return (max_weight_decay * (1 - l / n)).astype(dtype)

  return treedef.unflatten([strength(*f) for f in found])


def _by_name(name: str):
  pattern = re.compile(rf"{re.escape(name)}_(\d+)")

  def find(key, stacked):
    for i, k in enumerate(key):
      match = pattern.fullmatch(k) if isinstance(k, str) else None
      if match:
        return int(match.group(1))
      if k != name:
        continue
      nxt = key[i + 1] if i + 1 < len(key) else None
      if isinstance(nxt, (int, np.integer)) and not isinstance(nxt, bool):
        return int(nxt)
      if isinstance(nxt, str) and nxt.isdigit():
        return int(nxt)
      if stacked:
        return 0
      raise ValueError(
          f"params{options.name(key)} is under {name!r} with no block index "
          "after it and no layer_axes: pass the optimizer's layer_axes to "
          "depth_scaled for stacked blocks, or a callable block_index.")
    return None

  return find
