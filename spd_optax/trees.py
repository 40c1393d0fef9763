"""Pytree plumbing shared by the transformation and its options: per-leaf
structure (with flax.nnx Variables as leaves), leaf names, prefix trees."""

import sys
from typing import Any, Callable

import jax


def is_variable(x) -> bool:
  # flax.nnx Variables carry their param's metadata (e.g. its sharding); the
  # per-leaf values must not inherit it, so they are built with Variables as
  # leaves. Looked up lazily: flax is not a dependency.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def scalar_def(params) -> jax.tree_util.PyTreeDef:
  """Structure of the per-leaf value trees: params' with Variables as leaves."""
  return jax.tree.structure(params, is_leaf=is_variable)


def leaf_paths(params) -> list[str]:
  """`params[...]` names of the leaves, in flatten order."""
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]]


def is_placeholder(params) -> bool:
  # `optax.tree_map_params` calls `init` on this leafless stand-in and maps
  # `f` over every part of the state that comes back as the stand-in itself:
  # only the parts that really are params-shaped may do so.
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def broadcast_prefix(prefix, params, what: str,
                     is_entry: Callable[[Any], bool] | None = None) -> list[Any]:
  """One entry of `prefix` per leaf of params (flatten order), where `prefix`
  is a tree like params or a prefix of it (as `optax.masked` accepts): an
  entry above a subtree applies to all of its leaves."""
  prefix_def = jax.tree.structure(prefix, is_leaf=is_entry)
  try:
    subtrees = prefix_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{what} must be a tree like params or a prefix of it (or a callable "
        f"of params returning one); got {prefix_def} for params "
        f"{scalar_def(params)}.") from e
  entries = jax.tree.leaves(prefix, is_leaf=is_entry)
  return [entry for entry, sub in zip(entries, subtrees)
          for _ in range(len(jax.tree.leaves(sub, is_leaf=is_variable)))]
