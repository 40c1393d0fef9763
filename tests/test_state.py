"""spd_stats and set_anchor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from test_transform import _grads_like, _params, _run


def test_spd_stats_values():
  params = _params()
  tx = spd_optax.adam_spd(0.05, weight_decay=0.5, mask={"w": True, "b": True,
                                                         "head": {"w": False}})
  new_params, state = _run(tx, params, 8)
  stats = spd_optax.spd_stats(state)
  ratios = [float(state.ratio["w"]), float(state.ratio["b"])]
  np.testing.assert_allclose(stats["mean_ratio"], np.mean(ratios), rtol=1e-6)
  np.testing.assert_allclose(stats["decayed_fraction"], np.mean([r > 0 for r in ratios]))
  # deviation is ‖θ - θ_0‖ over the SPD leaves, after the step
  want = np.sqrt(sum(np.sum((np.asarray(new_params[k]) - np.asarray(params[k])) ** 2)
                     for k in ("w", "b")))
  np.testing.assert_allclose(stats["deviation"], want, rtol=1e-4)
  jax.jit(spd_optax.spd_stats)(state)  # no host transfer needed


def test_spd_stats_reports_decay_happening():
  # pulling towards a far target makes moving away useless: c_t < 0 happens
  params = {"x": jnp.zeros((10,))}
  tx = spd_optax.adam_spd(0.1, weight_decay=1.0)
  state = tx.init(params)
  seen = []
  for t in range(20):
    target = jnp.full((10,), 1.0 if t < 10 else -1.0)
    grads = {"x": params["x"] - target}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(float(spd_optax.spd_stats(state)["decayed_fraction"]))
  assert max(seen) == 1.0


def test_spd_stats_without_spd_state():
  with pytest.raises(ValueError, match="holds no SPDState"):
    spd_optax.spd_stats(optax.adam(0.1).init(_params()))


def test_set_anchor_is_an_argument_not_a_constant():
  params = _params()
  tx = spd_optax.adam_spd(0.05)
  other = _grads_like(params, 3)
  state = spd_optax.set_anchor(tx.init(params), other)
  np.testing.assert_array_equal(state.anchor["w"], other["w"])
  assert state.anchor["w"].unsafe_buffer_pointer() != other["w"].unsafe_buffer_pointer()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jaxpr = jax.make_jaxpr(step)(params, state, params)
  assert not [c for c in jaxpr.consts if np.size(c) > 1]
  # and it changes the result relative to the default anchor
  a, _ = _run(tx, params, 4)
  s = spd_optax.set_anchor(tx.init(params), other)
  p = params
  for t in range(4):
    u, s = tx.update(_grads_like(params, 1 + t), s, p)
    p = optax.apply_updates(p, u)
  assert not np.allclose(a["w"], p["w"])


def test_set_anchor_through_wrappers_and_dtype():
  params = _params()
  tx = optax.MultiSteps(spd_optax.adam_spd(0.05, anchor_dtype=jnp.bfloat16), 2)
  state = spd_optax.set_anchor(tx.init(params), jax.tree.map(jnp.ones_like, params))
  anchor = state.inner_opt_state.anchor
  assert anchor["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(anchor["w"], 1)


def test_set_anchor_bad_input():
  params = _params()
  state = spd_optax.adam_spd(0.05).init(params)
  with pytest.raises(ValueError, match="structure of the params"):
    spd_optax.set_anchor(state, {"w": params["w"]})
  bad = dict(params, w=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="does not match"):
    spd_optax.set_anchor(state, bad)
  zeros = spd_optax.adam_spd(0.05, anchor="zeros").init(params)
  with pytest.raises(ValueError, match="anchor='zeros'"):
    spd_optax.set_anchor(zeros, params)
  with pytest.raises(ValueError, match="holds no SPDState"):
    spd_optax.set_anchor(optax.sgd(0.1).init(params), params)


def _nbytes(tree, memory_kind=None):
  return sum(x.nbytes for x in jax.tree.leaves(tree)
             if memory_kind is None or x.sharding.memory_kind == memory_kind)


@pytest.mark.parametrize("anchor", ["params", "zeros"])
def test_state_memory_is_inner_plus_one_anchor(anchor):
  params = _params()
  tx = spd_optax.adam_spd(0.05, anchor=anchor)
  state = tx.init(params)
  inner = _nbytes(spd_optax.adam.scale_by_adam().init(params))
  n_leaves = len(jax.tree.leaves(params))
  anchor_bytes = _nbytes(params) if anchor == "params" else 0
  # count + three float32 scalars per leaf
  assert _nbytes(state) == inner + anchor_bytes + 4 + 3 * 4 * n_leaves


def test_bfloat16_anchor_halves_its_memory():
  params = _params()
  full = spd_optax.adam_spd(0.05).init(params)
  half = spd_optax.adam_spd(0.05, anchor_dtype=jnp.bfloat16).init(params)
  assert _nbytes(half.anchor) * 2 == _nbytes(full.anchor)


def test_anchor_on_host():
  params = _params()
  tx = spd_optax.adam_spd(0.05, anchor_on_host=True)
  state = jax.jit(tx.init)(params)
  assert {a.sharding.memory_kind for a in jax.tree.leaves(state.anchor)} == {"pinned_host"}
  assert _nbytes(state, "device") == _nbytes(state) - _nbytes(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  p, s = jax.tree.map(jnp.copy, params), state
  for t in range(4):
    p, s = step(p, s, _grads_like(params, 1 + t))
  assert {a.sharding.memory_kind for a in jax.tree.leaves(s.anchor)} == {"pinned_host"}
  want, _ = _run(spd_optax.adam_spd(0.05), params, 4, step_fn=jax.jit(
      spd_optax.adam_spd(0.05).update))
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  s = spd_optax.set_anchor(s, params)
  assert {a.sharding.memory_kind for a in jax.tree.leaves(s.anchor)} == {"pinned_host"}


def test_spd_stats_counts_each_layer_of_a_stacked_leaf():
  # A leaf stacking L layers holds [L] values: each layer is one unit, as
  # if the layers were separate leaves.
  f32 = lambda *v: jnp.asarray(v if len(v) > 1 else v[0], jnp.float32)
  state = spd_optax.SPDState(
      count=jnp.ones((), jnp.int32), inner_state=(), anchor=None,
      condition={"blocks": f32(-1, 2, -3), "head": f32(-1), "b": optax.MaskedNode()},
      ratio={"blocks": f32(0.5, 0, 0.25), "head": f32(0.0), "b": optax.MaskedNode()},
      deviation={"blocks": f32(1, 2, 2), "head": f32(4), "b": optax.MaskedNode()})
  stats = jax.jit(spd_optax.spd_stats)(state)
  np.testing.assert_allclose(stats["decayed_fraction"], 2 / 4)
  np.testing.assert_allclose(stats["mean_ratio"], 0.75 / 4)
  np.testing.assert_allclose(stats["deviation"], 5.0)  # sqrt(1 + 4 + 4 + 16)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in stats.values())
