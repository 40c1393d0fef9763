"""The per-layer values in the state: one packed array, and what says which
of its columns belong to which leaf.

SPD keeps three values per layer (condition, ratio, deviation). Stored as
trees like params, they are three arrays per leaf that every jitted step
takes in and gives back, more than the leaf's own moments and anchor (on a
GPU each array through the step costs time of its own). So they live in one
``[3, units]`` array for the whole state, replicated on the params' mesh, and
a static `Layout` (no arrays, part of the state's tree structure) says which
columns are which leaf's, so the values can still be read by name.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spd_optax import sharding
from spd_optax import trees

ROWS = ("condition", "ratio", "deviation")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each leaf's per-layer values sit in the packed array.

  Attributes:
    treedef: the params' structure at ``init`` (nnx Variables as leaves).
    keys: each leaf's key path (`trees.key`), to check params at ``update``.
    shapes: per leaf, the shape of its layer axes (``()`` for one layer), or
      None where SPD leaves the leaf alone (masked off).
    anchor_on_host: whether the anchor is meant to live in host memory.
  """
  treedef: Any
  keys: tuple
  shapes: tuple
  anchor_on_host: bool = False

  @property
  def units(self) -> int:
    return sum(int(np.prod(s)) for s in self.shapes if s is not None)

  def unpack(self, packed, row: int):
    """Row `row` of the packed array as a tree like params: per leaf an
    array of its layer shape, `optax.MaskedNode()` where masked off."""
    packed = trees.unwrap(packed)
    out, start = [], 0
    for shape in self.shapes:
      if shape is None:
        out.append(optax.MaskedNode())
        continue
      n = int(np.prod(shape))
      out.append(packed[row, start:start + n].reshape(shape))
      start += n
    return self.treedef.unflatten(out)


def zeros(layout: Layout, dtype, params_l) -> jax.Array:
  """The packed array at ``init``: zeros, placed as `sharding.like_params`."""
  return sharding.like_params(jnp.zeros((len(ROWS), layout.units), dtype), params_l)


def concat(pieces: list, like) -> jax.Array:
  """`pieces` raveled and concatenated in the dtype of `like` (the state's
  packed array), replicated where `like` is on an Explicit mesh."""
  pieces = [jnp.ravel(x).astype(like.dtype) for x in pieces]
  if sharding.explicit_mesh(like) is not None:
    # Sums over a leaf sharded along its layer axis come out sharded, and an
    # Explicit mesh concatenates only like-sharded arrays; the result keeps
    # the state's type across `update` (lax.scan carries, the jit cache).
    pieces = [sharding.replicated(x, like) for x in pieces]
  return jnp.concatenate(pieces)


def split(vector, shapes: list) -> list:
  """`vector` cut back into arrays of `shapes`, as `concat` joined them."""
  out, start = [], 0
  for shape in shapes:
    n = int(np.prod(shape))
    out.append(vector[start:start + n].reshape(shape))
    start += n
  return out


def pack(columns: list, old) -> jax.Array:
  """The per-leaf ``(condition, ratio, deviation)`` arrays as one array of
  the type of `old` (the state's packed array before the step)."""
  # Row by row, not leaf by leaf: XLA:TPU then forms every leaf's values in
  # one small fusion rather than one per leaf.
  return jnp.stack([concat(list(row), old) for row in zip(*columns)])
