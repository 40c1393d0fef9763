"""On a mesh with Explicit axes (`jax.make_mesh`'s default) sharding is part
of an array's type: the state's types must be the same after `update` as
after `init`, or a `lax.scan` carry, `optax.MultiSteps`, `apply_if_finite`
and the jit cache break. Checked for every leaf layout, on Explicit and Auto
meshes, under `jax.set_mesh` and without it."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spd_optax

L = 8
SPECS = {
    "stack_on_layers": P("x"),          # [L, 16, 4], sharded along its layer axis
    "stack_on_rows": P(None, "x"),      # [L, 16, 4], sharded along another axis
    "matrix": P("x"),                   # [16, 4], one layer
    "norm": P(),                        # replicated
    "head": P("x"),                     # masked off
}
SHAPES = {"stack_on_layers": (L, 16, 4), "stack_on_rows": (L, 16, 4),
          "matrix": (16, 4), "norm": (4,), "head": (16, 4)}
LAYER_AXES = {"stack_on_layers": 0, "stack_on_rows": 0, "matrix": None,
              "norm": None, "head": None}
MASK = {k: k != "head" for k in SHAPES}


def mesh_of(axis_type):
  return jax.make_mesh((8,), ("x",), axis_types=(axis_type,))


def params_on(mesh, seed=0):
  # Specs written out to every axis, as jit writes those it returns (P("x")
  # and P("x", None) are one sharding but two jit cache entries).
  rng = np.random.default_rng(seed)
  full = lambda k: P(*SPECS[k], *[None] * (len(SHAPES[k]) - len(SPECS[k])))
  return {k: jax.device_put(rng.standard_normal(SHAPES[k]).astype(np.float32),
                            NamedSharding(mesh, full(k))) for k in SHAPES}


def grads_like(params, t):
  # Away from θ_0 first, then back, so that SPD acts from the second step.
  sign = jnp.where(t < 2, -1.0, 1.0)
  return jax.tree.map(lambda p: 0.1 * p + sign * 0.3, params)


def types(tree):
  return jax.tree.map(jax.typeof, tree)


OPTIMIZERS = {
    "per_layer": lambda: spd_optax.adam_spd(1e-2, mask=MASK, layer_axes=LAYER_AXES),
    "per_leaf": lambda: spd_optax.adam_spd(1e-2, mask=MASK),
    "zero_anchor": lambda: spd_optax.adam_spd(1e-2, anchor="zeros", layer_axes=LAYER_AXES),
    "around_sgd": lambda: spd_optax.selective_projection_decay(
        optax.sgd(1e-2, momentum=0.9), 0.5, layer_axes=LAYER_AXES),
    # Stacked leaves bring a host anchor in layer by layer, sharded along
    # their layer axis or another.
    "host_anchor": lambda: spd_optax.adam_spd(1e-2, mask=MASK, layer_axes=LAYER_AXES,
                                              anchor_on_host=True),
}
NAMES = [pytest.param(n, marks=pytest.mark.needs_host_memory) if n == "host_anchor" else n
         for n in sorted(OPTIMIZERS)]


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
@pytest.mark.parametrize("set_mesh", [True, False], ids=["set_mesh", "no_set_mesh"])
@pytest.mark.parametrize("name", NAMES)
def test_state_types_survive_update(axis_type, set_mesh, name):
  mesh = mesh_of(axis_type)
  tx = OPTIMIZERS[name]()
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    params = params_on(mesh)
    state = tx.init(params)
    before = types(state)
    _, eager = tx.update(grads_like(params, 0), state, params)
    chex.assert_trees_all_equal(types(eager), before)

    @jax.jit
    def step(params, state, t):
      updates, state = tx.update(grads_like(params, t), state, params)
      return optax.apply_updates(params, updates), state

    if set_mesh:
      # (Outside set_mesh, a jitted init on an Explicit mesh fails in optax's
      # own moments when it does not read the params: the zero anchor.)
      state = jax.jit(tx.init)(params)
      chex.assert_trees_all_equal(types(state), before)
    for t in range(4):
      params, state = step(params, state, t)
      chex.assert_trees_all_equal(types(state), before)
    if axis_type == AxisType.Explicit and set_mesh:
      # (On an Auto mesh jit picks the outputs' shardings, unless told; an
      # eager init writes specs shorter than jit's, P("x") for P("x", None).)
      assert step._cache_size() == 1   # one compilation for every step
    stats = spd_optax.spd_stats(state)
    chex.assert_trees_all_close(jax.jit(spd_optax.spd_stats)(state), stats)
    if name in ("per_layer", "around_sgd", "host_anchor"):
      # These grads turn SPD on around θ_0 = params (not around 0).
      assert float(stats["decayed_fraction"]) > 0


def _run(tx, params, steps):
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(grads_like(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
def test_scan_multisteps_apply_if_finite(axis_type):
  mesh = mesh_of(axis_type)
  with jax.set_mesh(mesh):
    params = params_on(mesh)
    want, _ = _run(OPTIMIZERS["per_layer"](), params, 4)

    tx = OPTIMIZERS["per_layer"]()

    @jax.jit
    def scanned(params):
      def body(carry, t):
        params, state = carry
        updates, state = tx.update(grads_like(params, t), state, params)
        return (optax.apply_updates(params, updates), state), None
      return jax.lax.scan(body, (params, tx.init(params)), jnp.arange(4))[0]

    got, _ = scanned(params)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

    for wrapped in (optax.MultiSteps(OPTIMIZERS["per_layer"](), every_k_schedule=2),
                    optax.apply_if_finite(OPTIMIZERS["per_layer"](), 3)):
      state = wrapped.init(params)
      before = types(state)
      p = params
      for t in range(4):
        updates, state = jax.jit(wrapped.update)(grads_like(p, t), state, p)
        p = optax.apply_updates(p, updates)
        chex.assert_trees_all_equal(types(state), before)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
def test_per_layer_values_by_name_on_a_mesh(axis_type):
  mesh = mesh_of(axis_type)
  with jax.set_mesh(mesh):
    params = params_on(mesh)
    _, state = _run(OPTIMIZERS["per_layer"](), params, 4)
  assert state.ratio["stack_on_layers"].shape == (L,)
  assert state.condition["matrix"].shape == ()
  for field in ("condition", "ratio", "deviation"):
    tree = getattr(state, field)
    assert isinstance(tree["head"], optax.MaskedNode), field
    for k in MASK:
      if MASK[k]:
        assert tree[k].dtype == jnp.float32, (field, k)
        assert tree[k].sharding.device_set == set(mesh.devices.flat), (field, k)
        assert tree[k].sharding.is_fully_replicated, (field, k, tree[k].sharding)
  # Unsharded, the same run gives the same per-layer values.
  host = jax.tree.map(np.asarray, params_on(mesh))
  _, want = _run(OPTIMIZERS["per_layer"](), host, 4)
  for field in ("condition", "ratio", "deviation"):
    chex.assert_trees_all_close(getattr(state, field), getattr(want, field),
                                rtol=1e-5, atol=1e-6)
