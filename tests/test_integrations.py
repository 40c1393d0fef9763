"""The state as users' tools see it: flax serialization, Orbax, vmapped
ensembles, optax's tree utilities, flax.nnx, equinox, optax wrappers around
and inside SPD. Each test is a pattern a user runs, checked against an
independent computation."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization, traverse_util

import spd_optax
from spd_optax import checkpoint as spd_ckpt


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"sa": jax.random.normal(k[0], (2, 4, 4)) * 0.5,
          "sb": jax.random.normal(k[1], (2, 4, 4)) * 0.5,
          "head": jax.random.normal(k[2], (4, 2))}


def _loss(p, seed):
  x = jax.random.normal(jax.random.key(100 + seed), (16, 4))
  y = jax.random.normal(jax.random.key(200 + seed), (16, 2))
  h = x
  for w in list(p["sa"]) + list(p["sb"]):
    h = jnp.tanh(h @ w)
  return jnp.mean((h @ p["head"] - y) ** 2)


def _train(tx, params, steps, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, t):
    grads = jax.grad(_loss)(params, 0)
    grads = jax.tree.map(lambda g: g * jnp.where(t % 3 == 2, -1.0, 1.0), grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, t)
  return params, state


def _tx(**kw):
  kw = {"weight_decay": 0.7, "layer_axes": {"sa": 0, "sb": None, "head": None}, **kw}
  return spd_optax.adam_spd(0.1, mask={"sa": True, "sb": True, "head": False}, **kw)


def test_flax_serialization_round_trip():
  params, state = _train(_tx(), _params(), 6)
  assert np.any(np.asarray(state.ratio["sa"]) > 0)  # values worth keeping
  restored = serialization.from_bytes(_tx().init(_params(1)), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  # the state dict names the per-layer values, as optax.adam's names mu and nu
  flat = traverse_util.flatten_dict(serialization.to_state_dict(state), sep="/")
  np.testing.assert_array_equal(flat["condition/sa"], state.condition["sa"])
  # and the training continues from it exactly
  chex.assert_trees_all_equal(_train(_tx(), params, 2, restored), _train(_tx(), params, 2, state))


def test_tree_get_and_per_leaf_logging():
  _, state = _train(optax.chain(optax.clip(10.0), _tx()), _params(), 5)
  ratio = otu.tree_get(state, "ratio")
  assert ratio is not None and ratio["sa"].shape == (2,) and ratio["sb"].shape == ()
  assert isinstance(ratio["head"], optax.MaskedNode)  # masked off: no value
  logged = {jax.tree_util.keystr(k): float(v)
            for k, v in jax.tree_util.tree_leaves_with_path(ratio) for v in np.ravel(v)}
  assert set(logged) == {"['sa']", "['sb']"}
  stats = spd_optax.spd_stats(state)
  units = np.concatenate([np.ravel(ratio["sa"]), np.ravel(ratio["sb"])])
  np.testing.assert_allclose(stats["mean_ratio"], units.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["decayed_fraction"], np.mean(units > 0))


def test_stats_of_a_vmapped_ensemble_are_the_members():
  members = [_params(0), _params(1)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  tx = _tx()
  _, states = jax.vmap(lambda p: _train_pure(tx, p, 6))(stacked)
  got = jax.vmap(spd_optax.spd_stats)(states)
  for i, p in enumerate(members):
    want = spd_optax.spd_stats(_train_pure(tx, p, 6)[1])
    for k in want:
      np.testing.assert_allclose(got[k][i], want[k], rtol=1e-5, atol=1e-7)
  assert float(got["decayed_fraction"][0]) != float(got["decayed_fraction"][1]) or (
      float(got["mean_ratio"][0]) != float(got["mean_ratio"][1]))
  with pytest.raises(ValueError, match="leading axis.*jax.vmap"):
    spd_optax.spd_stats(states)


def _train_pure(tx, params, steps):
  state = tx.init(params)
  for t in range(steps):
    grads = jax.tree.map(lambda g: g * (-1.0 if t % 3 == 2 else 1.0),
                         jax.grad(_loss)(params, 0))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_orbax_refuses_a_target_with_other_layer_axes(tmp_path):
  params, state = _train(_tx(), _params(), 4)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(4, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
  # Three layers in both, split otherwise between the leaves.
  other = _tx(layer_axes={"sa": None, "sb": 0, "head": None})
  target = jax.eval_shape(other.init, _params())
  assert sum(np.size(x) for x in jax.tree.leaves(target.condition)) == 3
  with ocp.CheckpointManager(tmp_path) as mngr:
    try:
      restored = mngr.restore(4, args=ocp.args.StandardRestore(target))
    except Exception as e:  # Orbax 0.12 checks the target's shapes
      assert "shape" in str(e)
    else:  # Orbax 0.11 restores the saved shapes; the next step refuses them
      assert restored.condition["sa"].shape == (2,) and restored.condition["sb"].shape == ()
      with pytest.raises(ValueError, match=r"params\['sa'\]: layer_axes give per-layer "
                         r"shape \(\) at update, but the state made at init holds \(2,\)"):
        other.update(params, restored, params)
  with ocp.CheckpointManager(tmp_path) as mngr:  # the same target restores exactly
    chex.assert_trees_all_equal(
        mngr.restore(4, args=ocp.args.StandardRestore(jax.eval_shape(_tx().init, params))),
        state)


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.body = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.body(x)))


def _nnx_run(tx, steps=5):
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jax.random.normal(jax.random.key(2), (8, 2))

  @nnx.jit
  def step(model, optimizer, sign):
    grads = nnx.grad(lambda m: sign * jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for t in range(steps):
    step(model, optimizer, 1.0 if t % 3 != 2 else -1.0)
  return model, optimizer


NNX_MASK = {"body": True, "head": False}


def test_spd_stats_on_nnx_state():
  _, optimizer = _nnx_run(spd_optax.adam_spd(0.1, weight_decay=0.5, mask=NNX_MASK))
  want = spd_optax.spd_stats(optimizer.opt_state)
  assert float(want["deviation"]) > 0
  got = spd_optax.spd_stats(nnx.state(optimizer))
  chex.assert_trees_all_close(got, want)


def test_checkpoint_of_nnx_states_checks_the_anchor(tmp_path):
  tx = lambda **kw: spd_optax.adam_spd(0.1, weight_decay=0.5, mask=NNX_MASK, **kw)
  model, optimizer = _nnx_run(tx())
  spd_ckpt.save(tmp_path, 5, nnx.state(model), nnx.state(optimizer))
  target = lambda t: (nnx.state(_Model(nnx.Rngs(3))), nnx.state(nnx.Optimizer(
      _Model(nnx.Rngs(3)), t, wrt=nnx.Param)))
  params, opt_state = spd_ckpt.restore(tmp_path, *target(tx()))
  chex.assert_trees_all_equal(nnx.to_pure_dict(opt_state),
                              nnx.to_pure_dict(nnx.state(optimizer)))
  with pytest.raises(ValueError, match="another anchor_dtype"):
    spd_ckpt.restore(tmp_path, *target(tx(anchor_dtype=jnp.bfloat16)))
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\].*another mask"):
    spd_ckpt.restore(tmp_path, *target(spd_optax.adam_spd(0.1, weight_decay=0.5)))


def test_equinox_module_shaped_option_trees():
  eqx = pytest.importorskip("equinox")

  class Net(eqx.Module):
    w: jax.Array
    v: jax.Array

    def __call__(self, x):
      return x @ self.w @ self.v

  net = Net(jax.random.normal(jax.random.key(0), (3, 4)),
            jax.random.normal(jax.random.key(1), (2, 4, 4)))
  mask = Net(True, False)
  axes = Net(None, 0)
  strength = Net(0.5, jnp.asarray([1.0, 0.0]))
  tx = spd_optax.adam_spd(0.1, weight_decay=strength, mask=mask, layer_axes=axes)
  got, state = _train_pure_eqx(tx, net)
  assert state.condition.w.shape == () and isinstance(state.condition.v, optax.MaskedNode)
  # the same run with plain-dict options on the same leaves
  as_dict = lambda n: {"w": n.w, "v": n.v}
  want, _ = _train_pure_eqx(spd_optax.adam_spd(0.1, weight_decay={"w": 0.5, "v": 1.0},
                                               mask={"w": True, "v": False}), as_dict(net))
  chex.assert_trees_all_close(as_dict(got), want)


def _train_pure_eqx(tx, net):
  x = jax.random.normal(jax.random.key(2), (8, 3))
  forward = lambda n: x @ n["w"] @ n["v"] if isinstance(n, dict) else n(x)
  loss = lambda n, sign: sign * jnp.mean(jnp.tanh(forward(n)) ** 2)
  state = tx.init(net)
  for t in range(5):
    grads = jax.grad(loss)(net, 1.0 if t % 3 != 2 else -1.0)
    updates, state = tx.update(grads, state, net)
    net = optax.apply_updates(net, updates)
  return net, state


def test_nan_gradient_inside_apply_if_finite_stores_no_nan():
  params = _params()
  tx = spd_optax.selective_projection_decay(optax.apply_if_finite(optax.adam(0.1), 3), 0.7,
                                            layer_axes={"sa": 0, "sb": None, "head": None})
  params, state = _train(tx, params, 4)
  before = state
  grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(state.condition, before.condition)
  for x in jax.tree.leaves((state.ratio, state.deviation)):
    assert np.all(np.isfinite(x))
  chex.assert_trees_all_close(state.deviation, before.deviation, rtol=1e-6)
  assert int(state.count) == int(before.count) + 1  # SPD's count: calls of update


def test_schedule_free_eval_params_reads_through_the_state():
  params = _params()
  tx = spd_optax.selective_projection_decay(optax.contrib.schedule_free_adamw(0.1), 0.5)
  params, state = _train(tx, params, 4)
  chex.assert_trees_all_equal(optax.contrib.schedule_free_eval_params(state, params),
                              optax.contrib.schedule_free_eval_params(state.inner_state, params))
  with pytest.raises(AttributeError, match="'SPDState' object has no attribute 'nope'"):
    state.nope


def test_layer_axes_from_names_warns_about_an_unnamed_stacked_leaf():

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.w = nnx.Param(nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "m"))(
          rngs.params(), (4, 4)))
      self.b = nnx.Param(jnp.zeros((4,)))  # made without names

  @nnx.split_rngs(splits=3)
  @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(rngs)

  # Partitioned variables need a mesh; one device is enough to carry names.
  mesh = jax.make_mesh((1, 1), ("layers", "m"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    params = nnx.state(make(nnx.Rngs(0)), nnx.Param)
  with pytest.warns(UserWarning, match=r"\['b'\].*carry no partition names"):
    axes = spd_optax.layer_axes_from_names(params)
  assert nnx.to_pure_dict(axes) == {"w": 0, "b": None}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spd_optax.layer_axes_from_names({"w": params["w"]})  # all named: no warning


def test_eager_state_donated_into_a_loop_that_reads_every_field():
  params = _params()
  tx = _tx()
  grads = jax.grad(_loss)(params, 0)

  def step(p, s):
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  loop = jax.jit(lambda p, s: jax.lax.fori_loop(0, 3, lambda _, c: step(*c), (p, s)),
                 donate_argnums=(0, 1))
  got = loop(jax.tree.map(jnp.copy, params), tx.init(params))  # eager init, donated
  want = (params, tx.init(params))
  for _ in range(3):
    want = step(*want)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
