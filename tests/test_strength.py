"""weight_decay per leaf (a tree or prefix of floats, schedules and per-layer
arrays) and spd_optax.depth_scaled."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spd_optax
from test_layers import L, PREFIX, assert_equivalent, stack, unstacked


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(k1, (8, 5)), "b": jax.random.normal(k2, (5,)),
          "head": {"w": jax.random.normal(k3, (5, 3))}}


def _grads(params, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 3))
  return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)


def test_tree_matches_formula_per_leaf():
  params = _params()
  anchor = _grads(params, 7)
  lams = {"w": 0.7, "b": 0.0, "head": {"w": lambda count: 0.3 + count}}  # count is 0
  tx = spd_optax.selective_projection_decay(optax.sgd(0.3), weight_decay=lams)
  state = spd_optax.set_anchor(tx.init(params), anchor)
  grads = _grads(params, 4)
  updates, state = jax.jit(tx.update)(grads, state, params)
  decayed = 0
  for k, lam in (("w", 0.7), ("b", 0.0), ("head", 0.3)):
    get = (lambda t: t[k]["w"]) if k == "head" else (lambda t: t[k])
    p, a, g = (np.asarray(get(t), np.float64) for t in (params, anchor, grads))
    tilde = p - 0.3 * g
    n_new, n_prev = np.linalg.norm(tilde - a), np.linalg.norm(p - a)
    ratio = np.clip((n_new - n_prev) / n_new, 0, 1) if -np.sum(g * (p - a)) < 0 else 0.0
    want = tilde - lam * ratio * (tilde - a)
    np.testing.assert_allclose(p + np.asarray(get(updates)), want, rtol=1e-5, atol=1e-6)
    decayed += lam * ratio > 0
  assert decayed >= 1


def test_equal_tree_is_the_scalar_bit_for_bit():
  params = _params()
  outs, decayed = [], 0.0
  for wd in (0.6, {"w": 0.6, "b": 0.6, "head": 0.6}, {"w": 0.6, "b": 0.6, "head": {"w": 0.6}}):
    tx = spd_optax.adam_spd(0.1, weight_decay=wd)
    p, state = params, tx.init(params)
    for t in range(6):
      updates, state = jax.jit(tx.update)(_grads(p, t), state, p)
      p = optax.apply_updates(p, updates)
      decayed = max(decayed, float(spd_optax.spd_stats(state)["decayed_fraction"]))
    outs.append((p, state.condition, state.ratio, state.deviation))
  assert decayed > 0  # the strengths were applied
  chex.assert_trees_all_equal(outs[0], outs[1])
  chex.assert_trees_all_equal(outs[0], outs[2])


def test_schedule_entries_follow_the_count():
  # A schedule as an entry is called with SPD's count, as a scalar schedule
  # is: the same trajectory, bit for bit; a constant entry beside it differs.
  sched = optax.linear_schedule(0.0, 1.0, 4)
  params = _params()
  outs = []
  for wd in (sched, {"w": sched, "b": sched, "head": sched}, {"w": sched, "b": sched, "head": 0.0}):
    tx = spd_optax.adam_spd(0.1, weight_decay=wd)
    p, state = params, tx.init(params)
    for t in range(6):
      updates, state = jax.jit(tx.update)(_grads(p, t % 2), state, p)
      p = optax.apply_updates(p, updates)
    outs.append(p)
  chex.assert_trees_all_equal(outs[0], outs[1])
  chex.assert_trees_all_equal(outs[0]["w"], outs[2]["w"])
  assert not np.allclose(outs[0]["head"]["w"], outs[2]["head"]["w"], rtol=1e-6)


@pytest.mark.parametrize("norm", ["frobenius", "rows_l1"])
def test_depth_scaled_stacked_equals_unstacked(norm):
  flat_params, stacked_params = unstacked(), stack(unstacked())
  lam_flat = spd_optax.depth_scaled(flat_params, 1.0, "blocks", other=0.25)
  lam_stacked = spd_optax.depth_scaled(stacked_params, 1.0, "blocks",
                                       layer_axes=PREFIX, other=0.25)
  want = [1.0 * (1 - l / L) for l in range(L)]
  assert [lam_flat["blocks"][l]["w"] for l in range(L)] == want
  np.testing.assert_allclose(lam_stacked["blocks"]["w"], want, rtol=1e-7)
  assert lam_stacked["blocks"]["w"].shape == (L,) and lam_stacked["head"] == 0.25
  ratios = assert_equivalent(
      spd_optax.adam_spd(0.05, weight_decay=lam_stacked, layer_axes=PREFIX, norm=norm),
      spd_optax.adam_spd(0.05, weight_decay=lam_flat, norm=norm))
  assert ratios.shape == (L,)


def test_per_layer_lambda_acts_per_layer():
  # λ = 0 on layers 1 and 3 of a stack: those layers get Adam's update
  # exactly, the others are decayed when SPD fires.
  params = stack(unstacked())
  lam = {"blocks": jnp.asarray([1.0, 0.0, 1.0, 0.0]), "head": 1.0}
  tx = spd_optax.adam_spd(0.05, weight_decay=lam, layer_axes=PREFIX)
  plain = optax.adam(0.05)
  state, pstate = tx.init(params), plain.init(params)
  fired = np.zeros(L, bool)
  for t in range(8):
    g = stack(jax.tree.map(lambda x: x * (-1.0 if t < 4 else 1.0), unstacked(seed=t)))
    updates, state = tx.update(g, state, params)
    plain_updates, pstate = plain.update(g, pstate, params)
    for l in (1, 3):
      np.testing.assert_allclose(updates["blocks"]["w"][l], plain_updates["blocks"]["w"][l],
                                 rtol=1e-5, atol=1e-7)
    fired |= np.asarray(state.ratio["blocks"]["w"]) > 0
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(fired, [True, False, True, False])


def test_depth_scaled_forms():
  # Key paths: list indices, dict keys "3", linen's "blocks_3", a callable,
  # and an nnx.State (a plain dict of strengths fits it by key).
  flat = {"blocks": [{"w": np.ones(2)} for _ in range(3)], "emb": np.ones(2)}
  assert spd_optax.depth_scaled(flat, 0.9, "blocks", other=0.0)["blocks"][2]["w"] == (
      pytest.approx(0.9 * (1 - 2 / 3)))
  linen = {"blocks_0": {"w": np.ones(2)}, "blocks_1": {"w": np.ones(2)}, "out": np.ones(1)}
  got = spd_optax.depth_scaled(linen, 1.0, "blocks", other=0.0, num_blocks=1)
  assert got == {"blocks_0": {"w": 1.0}, "blocks_1": {"w": 0.0}, "out": 0.0}  # MAPS' form
  by_str = {"blocks": {"0": {"w": np.ones(2)}, "1": {"w": np.ones(2)}}}
  assert spd_optax.depth_scaled(by_str, 1.0, "blocks")["blocks"]["1"]["w"] == 0.5
  custom = spd_optax.depth_scaled(flat, 1.0, lambda k: k[1] if k[0] == "blocks" else None,
                                  other=0.1)
  assert custom["emb"] == 0.1 and custom["blocks"][1]["w"] == pytest.approx(2 / 3)

  class Net(nnx.Module):
    def __init__(self):
      self.blocks = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(2)])
      self.head = nnx.Linear(2, 1, rngs=nnx.Rngs(5))

  model = Net()
  state = nnx.state(model, nnx.Param)
  lam = spd_optax.depth_scaled(state, 1.0, "blocks", other=0.0)
  opt = nnx.Optimizer(model, spd_optax.adam_spd(0.1, weight_decay=lam), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, state)
  opt.update(model, grads)
  opt.update(model, jax.tree.map(lambda g: -g, grads))


def test_depth_scaled_refusals():
  flat = {"blocks": [{"w": np.ones(2)} for _ in range(3)], "emb": np.ones(2)}
  with pytest.raises(ValueError, match=r"\['emb'\].*no block index.*other="):
    spd_optax.depth_scaled(flat, 1.0, "blocks")
  with pytest.raises(ValueError, match="num_blocks"):
    spd_optax.depth_scaled(flat, 1.0, "blocks", other=0.0, num_blocks=1)
  with pytest.raises(ValueError, match="max_weight_decay"):
    spd_optax.depth_scaled(flat, -1.0, "blocks", other=0.0)
  with pytest.raises(ValueError, match=r"params\['blocks'\]\['b'\].*no layer_axes"):
    spd_optax.depth_scaled(stack(unstacked()), 1.0, "blocks", other=0.0)


@pytest.mark.parametrize("entry, error, match", [
    (-0.5, ValueError, "not negative or NaN"),
    (float("nan"), ValueError, "not negative or NaN"),
    (np.ones(3), ValueError, r"shape \(4,\).*got shape \(3,\)"),
    ("strong", TypeError, "got 'strong'"),
    (True, TypeError, "got True"),
    (None, TypeError, "got None"),
    (np.asarray([1.0, -1.0, 0.0, 0.0]), ValueError, "not negative"),
])
def test_bad_entries_refused_at_init_naming_the_leaf(entry, error, match):
  params = stack(unstacked())
  tx = spd_optax.adam_spd(0.05, layer_axes=PREFIX,
                          weight_decay={"blocks": {"w": entry, "b": 1.0}, "head": 1.0})
  with pytest.raises(error, match=r"params\['blocks'\]\['w'\].*" + match):
    tx.init(params)


def test_bad_entries_on_unstacked_leaf_and_structure():
  params = _params()
  tx = spd_optax.adam_spd(0.05, weight_decay={"w": np.ones(8), "b": 1.0, "head": 1.0})
  with pytest.raises(ValueError, match=r"params\['w'\].*shape \(\)"):
    tx.init(params)
  tx = spd_optax.adam_spd(0.05, weight_decay={"w": 1.0, "head": 1.0})
  with pytest.raises(ValueError, match=r"weight_decay must be a tree like params.*\['b'\]"):
    tx.init(params)
  with pytest.raises(TypeError, match="weight_decay must be"):
    spd_optax.adam_spd(0.05, weight_decay="0.5")
  # A masked-off leaf's entry is not used: anything there is fine.
  spd_optax.adam_spd(0.05, weight_decay={"w": 1.0, "b": -1.0, "head": 1.0},
                     mask={"w": True, "b": False, "head": True}).init(params)


def test_inject_hyperparams():
  params = stack(unstacked())
  make = optax.inject_hyperparams(spd_optax.adam_spd, static_args=("layer_axes",))
  # A tree is passed through as it is (not injectable; its schedules run on
  # SPD's own count) and gives what it gives without the wrapper.
  lam = spd_optax.depth_scaled(params, 1.0, "blocks", layer_axes=PREFIX, other=0.5)
  g = stack(unstacked(seed=3))
  wrapped = make(learning_rate=0.05, weight_decay=lam, layer_axes=PREFIX)
  direct = spd_optax.adam_spd(0.05, weight_decay=lam, layer_axes=PREFIX)
  ws, ds = wrapped.init(params), direct.init(params)
  assert "weight_decay" not in ws.hyperparams
  wp = dp = params
  for t in range(6):
    g_t = jax.tree.map(lambda x: x * (-1.0 if t < 3 else 1.0), g)
    wu, ws = jax.jit(wrapped.update)(g_t, ws, wp)
    du, ds = jax.jit(direct.update)(g_t, ds, dp)
    wp, dp = optax.apply_updates(wp, wu), optax.apply_updates(dp, du)
  # (the wrapper hands the learning rate in as a float32 array, not a float)
  chex.assert_trees_all_close(wp, dp, rtol=1e-6, atol=1e-7)
  # One array of the layers' shape for every SPD leaf is injectable, and can
  # be changed in the state like a scalar.
  per_layer = jnp.asarray([1.0, 0.5, 0.25, 0.0])
  wrapped = make(learning_rate=0.05, weight_decay=per_layer,
                 layer_axes={"blocks": 0, "head": 0})
  params = {"blocks": params["blocks"], "head": jnp.ones((L, 2))}
  state = wrapped.init(params)
  assert state.hyperparams["weight_decay"].shape == (L,)
  state.hyperparams["weight_decay"] = jnp.zeros(L)
  grads = jax.tree.map(jnp.ones_like, params)
  jax.jit(wrapped.update)(grads, state, params)
  with pytest.raises(ValueError, match=r"params\['blocks'\]\['b'\].*shape"):
    make(learning_rate=0.05, weight_decay=jnp.ones(3),
         layer_axes={"blocks": 0, "head": 0}).init(params)
