"""One leaf's projection, and the order a step runs it in over leaves."""

import jax
import jax.numpy as jnp
import numpy as np

from spd_optax import projection
from spd_optax import sharding


def test_anchor_to_device_chain_is_exact():
  shapes = {"a": (16, 8), "b": (8,), "c": (4, 4)}
  keys = iter(jax.random.split(jax.random.key(1), 4 * len(shapes)))
  leaf = lambda s: jax.random.normal(next(keys), s)
  g, p, a, u = ({k: leaf(s) for k, s in shapes.items()} for _ in range(4))
  lam = jnp.asarray(0.7)
  host = jax.device_put(a, jax.memory.Space.Host)

  @jax.jit
  def chained(g, p, host, u):
    out, after = {}, None
    for k in shapes:
      out[k] = projection.project(g[k], p[k], sharding.anchor_to_device(host[k], after),
                                  u[k], lam, ())
      after = out[k][0]
    return out

  @jax.jit
  def on_device(g, p, a, u):
    return {k: projection.project(g[k], p[k], a[k], u[k], lam, ()) for k in shapes}

  got, want = chained(g, p, host, u), on_device(g, p, a, u)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert sharding.anchor_to_device(None, p["a"]) is None
