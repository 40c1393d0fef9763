"""SPD inside `jax.shard_map` (hand-written FSDP): each device holds rows of
every leaf, and SPD must sum its per-layer values over the devices, never
decay per shard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import spd_optax

SHAPES = {"w": (16, 8), "stack": (4, 16, 8), "b": (16,)}
LAYER_AXES = {"w": None, "stack": 0, "b": None}
# Rows split over the devices; the stack's layers are whole on every device.
SPECS = {"w": P("x"), "stack": P(None, "x"), "b": P("x")}
STEPS = 6


def params0():
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def grads(t):
  rng = np.random.default_rng(10 + t)
  sign = -1.0 if t < 3 else 1.0   # away from θ_0, then back: SPD acts
  return {k: (0.3 * rng.standard_normal(s) + sign * 0.5).astype(np.float32)
          for k, s in SHAPES.items()}


def reference(tx):
  params = params0()
  state = tx.init(params)
  for t in range(STEPS):
    updates, state = tx.update(grads(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def sharded_run(tx, mesh, check_vma=True):
  specs = SPECS
  state_specs = None

  def init(params):
    return tx.init(params)

  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.device_put(params0(), {k: NamedSharding(mesh, s) for k, s in specs.items()})
  abstract = jax.eval_shape(tx.init, params0())
  # The anchor and moments are split like params; counts and the packed
  # per-layer values are the same on every device.
  state_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract, specs,
      transform_non_params=lambda _: P())
  init = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(specs,), out_specs=state_specs,
                               check_vma=check_vma))
  step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, specs),
                               out_specs=(specs, state_specs), check_vma=check_vma))
  state = init(params)
  for t in range(STEPS):
    g = jax.device_put(grads(t), {k: NamedSharding(mesh, s) for k, s in specs.items()})
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
def test_shard_map_fsdp_matches_unsharded(check_vma):
  mesh = jax.make_mesh((8,), ("x",))
  make = lambda **kw: spd_optax.adam_spd(1e-2, weight_decay=1.0,
                                         layer_axes=LAYER_AXES, **kw)
  want_params, want_state = reference(make())
  got_params, got_state = sharded_run(make(axis_name="x"), mesh, check_vma)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got_params[k]), want_params[k],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_state.per_layer),
                             np.asarray(want_state.per_layer), rtol=1e-5, atol=1e-6)
  # SPD acted (so per-shard sums would have shown): without it, another run.
  plain, _ = reference(spd_optax.adam_spd(1e-2, weight_decay=0.0))
  assert all(np.abs(plain[k] - want_params[k]).max() > 1e-3 for k in SHAPES)


def test_shard_map_without_axis_name_is_refused():
  mesh = jax.make_mesh((8,), ("x",))
  tx = spd_optax.adam_spd(1e-2, layer_axes=LAYER_AXES)
  with pytest.raises(ValueError, match=r"params\['b'\] varies over the manual mesh axes \['x'\].*axis_name="):
    sharded_run(tx, mesh)
  with pytest.raises(ValueError, match="check_vma=False.*axis_name="):
    sharded_run(tx, mesh, check_vma=False)


def test_shard_map_axis_name_must_name_manual_axes():
  mesh = jax.make_mesh((8,), ("x",))
  tx = spd_optax.adam_spd(1e-2, layer_axes=LAYER_AXES, axis_name="data")
  with pytest.raises(ValueError, match=r"axis_name \['data'\] are not manual axes"):
    sharded_run(tx, mesh)
  with pytest.raises(TypeError, match="axis_name must be"):
    spd_optax.adam_spd(1e-2, axis_name=["x"])


def test_replicated_params_in_shard_map_need_no_axis_name():
  # Pure data parallelism: every device holds whole leaves (grads already
  # averaged), so nothing varies and nothing needs summing.
  mesh = jax.make_mesh((8,), ("x",))
  tx = spd_optax.adam_spd(1e-2, layer_axes=LAYER_AXES)
  want_params, _ = reference(tx)

  def run(params):
    state = tx.init(params)
    for t in range(STEPS):
      updates, state = tx.update(jax.tree.map(jnp.asarray, grads(t)), state, params)
      params = optax.apply_updates(params, updates)
    return params

  got = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P(), out_specs=P()))(params0())
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), want_params[k], rtol=1e-5, atol=1e-6)
