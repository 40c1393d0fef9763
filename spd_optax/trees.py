"""Pytree plumbing shared by the transformation and its options: per-leaf
structure (with flax.nnx Variables as leaves), leaf names, prefix trees
matched to params by key path."""

import sys
from typing import Any, Callable

import jax
import optax


def is_variable(x) -> bool:
  # flax.nnx Variables carry their param's metadata (e.g. its sharding); the
  # per-leaf values must not inherit it, so they are built with Variables as
  # leaves. Looked up lazily: flax is not a dependency.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def is_masked(x) -> bool:
  """A place with no leaf: `optax.masked` hands its inner transformation
  `optax.MaskedNode` there, and SPD stores it where it keeps no anchor."""
  return isinstance(x, optax.MaskedNode)


def unwrap(x):
  """The array an nnx Variable holds (`nnx.Optimizer` wraps state arrays)."""
  if not is_variable(x):
    return x
  return x.get_value() if hasattr(x, "get_value") else x.value


def scalar_def(params) -> jax.tree_util.PyTreeDef:
  """Structure of the per-leaf value trees: params' with Variables as leaves."""
  return jax.tree.structure(params, is_leaf=is_variable)


def with_paths(tree, is_leaf=is_variable) -> list[tuple[tuple, Any]]:
  """(key, leaf) pairs in flatten order; see `key`."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [(key(p), x) for p, x in flat]


def key(path) -> tuple:
  """A leaf's place in a tree, whatever holds it: a dict entry, a dataclass
  field, a list index and an nnx.State entry with the same key are one
  place; the ``.value`` of an nnx Variable or a linen box is not part of it."""
  return tuple(_raw_key(k) for k in path
               if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def _raw_key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def name(k: tuple) -> str:
  """`params[...]`-style name of a key."""
  return "".join(f"[{x!r}]" for x in k)


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
  entry above a subtree applies to all of its leaves.

  Entries are matched to leaves by key path, not by container type, so a
  plain dict fits an `nnx.State`, nnx Variables or linen boxes.
  """
  is_entry_or_var = lambda x: is_variable(x) or (is_entry is not None and is_entry(x))
  entries = dict(with_paths(prefix, is_leaf=is_entry_or_var))
  used, out, missing = set(), [], []
  # A masked-off place has no leaf but may have an entry.
  for k, leaf in with_paths(params, is_leaf=lambda x: is_variable(x) or is_masked(x)):
    found = [k[:i] for i in range(len(k) + 1) if k[:i] in entries]
    if found:
      used.add(found[-1])
    if is_masked(leaf):
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
