"""Shardings for an optimizer state holding SPD, from the params' own."""

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from spd_optax import trees
from spd_optax.transform import SPDState


def state_shardings(tx: optax.GradientTransformation, params):
  """Shardings for ``tx.init(params)``, on Explicit and Auto meshes alike.

  Every state array shaped like a param at the same key path (the anchor,
  Adam's moments, any inner optimizer's params-shaped buffers) gets that
  param's sharding; an anchor made with ``anchor_on_host=True`` gets it in
  ``pinned_host`` memory, where `optax.tree_map_params` would put it in
  device memory; everything else (counts, the packed per-layer values) is
  replicated. Nothing is computed: `params` may be `jax.ShapeDtypeStruct`s
  with ``sharding=``.

  Example:
    ```python
    ssh = spd_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=ssh)(params)
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(psh, ssh))
    ```

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
  replicated = NamedSharding(mesh, P())
  by_key.sort(key=lambda e: -len(e[0]))   # the longest matching key wins

  def pick(path, leaf):
    where = trees.key(path)
    for k, sharding, shape in by_key:
      if where[len(where) - len(k):] == k and tuple(leaf.shape) == shape:
        return sharding.with_memory_kind("device")
    return replicated

  abstract = jax.eval_shape(tx.init, params)
  out = jax.tree_util.tree_map_with_path(pick, abstract)

  def on_host(s):
    if not isinstance(s, SPDState) or not s.layout.anchor_on_host:
      return s
    return s._replace(anchor=jax.tree.map(
        lambda x: x.with_memory_kind("pinned_host"), s.anchor))

  return jax.tree.map(on_host, out, is_leaf=lambda x: isinstance(x, SPDState))
