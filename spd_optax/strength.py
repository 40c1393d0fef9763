"""Per-leaf SPD strengths: a depth-decreasing λ from a model's block index."""

import re
from typing import Any, Callable

import jax
import numpy as np

from spd_optax import layers
from spd_optax import trees


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
  most freely. This is the module-wise schedule of the authors' later code
  (MAPS, Huang et al. 2025), not part of the NeurIPS paper (one λ for all).
  With the default $N = L$ the last block keeps $\lambda_{\max}/L$; MAPS'
  form $\lambda_{\max}(1 - l/(L-1))$, which reaches 0 at the last block, is
  ``num_blocks=L - 1``.

  Stacked and unstacked forms of a model get the same strengths: a leaf
  stacking layers (per `layer_axes`, as given to the optimizer) gets an
  array of its per-layer shape, whose layer $j$ (flattened over the layer
  axes) is block ``index + j``, with ``index`` what `block_index` gives the
  leaf (0 for a stack of all the blocks).

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
    block_index: where a leaf's block index comes from. A string names the
      container of the blocks: the key after it is the index (a list or
      `nnx.List` index, or a dict key like ``"3"``), or a key ``name_3``
      (linen's ``blocks_3``); a leaf under it with no index is a stack of
      all the blocks (index 0; it needs `layer_axes`). Or a callable of a
      leaf's key path (a tuple of dict keys, attribute names and indices,
      e.g. ``("blocks", 3, "linear", "kernel")``) returning the index of the
      leaf's (first) block, or None for a leaf outside the blocks.
    layer_axes: the optimizer's `layer_axes` (a tree or prefix, or a callable
      of params), for stacked leaves.
    num_blocks: $N$; default the number of blocks found,
      1 + the largest block index.
    other: λ for leaves outside the blocks (embeddings, a head, a final
      norm). None (the default) refuses them, naming them: choose their
      strength, or leave them out of SPD with its ``mask``.

  Returns:
    A tree like params, with a float per leaf, or an array of its per-layer
    shape for a stacked leaf; pass it as ``weight_decay``.

  Raises:
    ValueError: a leaf outside the blocks with ``other=None``, a leaf under
      the named container with no index and no layer axes, a negative or
      NaN strength, or a block index at or past `num_blocks` (λ < 0).
  """
  if not (isinstance(max_weight_decay, (int, float, np.floating, np.integer))
          and max_weight_decay >= 0):
    raise ValueError(f"max_weight_decay must be a float >= 0, got {max_weight_decay!r}.")
  if other is not None and not (isinstance(other, (int, float, np.floating, np.integer))
                                and other >= 0):
    raise ValueError(f"other must be a float >= 0 or None, got {other!r}.")
  find = _by_name(block_index) if isinstance(block_index, str) else block_index
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=trees.is_variable)
  axes_l = layers.resolve(layer_axes, params)
  found, outside = [], []
  for (path, leaf), axes in zip(flat, axes_l):
    key = trees.key(path)
    shape = tuple(np.shape(trees.unwrap(leaf))[i] for i in axes)
    index = find(key) if not isinstance(block_index, str) else find(key, bool(axes))
    if index is None:
      outside.append(trees.name(key))
    elif not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
      raise ValueError(f"block_index for params{trees.name(key)} must be an int >= 0 "
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
    dtype = np.result_type(np.dtype(trees.unwrap(leaf).dtype), np.float32)
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
          f"params{trees.name(key)} is under {name!r} with no block index "
          "after it and no layer_axes: pass the optimizer's layer_axes to "
          "depth_scaled for stacked blocks, or a callable block_index.")
    return None

  return find
