"""SPD inside `jax.shard_map` (hand-written FSDP and layer sharding): each
device holds part of a leaf, and SPD must add its per-layer sums over the
devices that split a layer's elements, gather those of layers split over
devices, and never decay per shard.

Every test runs on an 8-device CPU mesh with Explicit axes (jax.make_mesh's
default) and with Auto ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spd_optax

SHAPES = {"w": (16, 8), "stack": (4, 16, 8), "b": (16,), "layers": (8, 4, 8),
          "r": (6, 4)}
LAYER_AXES = {"w": None, "stack": 0, "b": None, "layers": 0, "r": None}
SPECS = {
    "w": P("x"),               # rows split over the devices
    "stack": P(None, "x"),     # every layer's rows split; the layers whole
    "b": P("x"),
    "layers": P("x"),          # one layer per device
    "r": P(),                  # replicated: whole on every device
}
# Per-layer strengths on the leaf whose layers are split over the devices:
# each device must decay its own layers with their own λ.
STRENGTHS = {"w": 1.0, "stack": 0.7, "b": 1.0, "layers": jnp.linspace(0.2, 1.0, 8),
             "r": 1.0}
STEPS = 6


@pytest.fixture(params=[AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def mesh(request):
  return jax.make_mesh((8,), ("x",), axis_types=(request.param,))


def params0(keys=SHAPES):
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in keys}


def grads(t, keys=SHAPES):
  rng = np.random.default_rng(10 + t)
  sign = -1.0 if t < 3 else 1.0   # away from θ_0, then back: SPD acts
  return {k: (0.3 * rng.standard_normal(SHAPES[k]) + sign * 0.5).astype(np.float32)
          for k in keys}


def reference(tx, keys=SHAPES):
  params = params0(keys)
  state = tx.init(params)
  for t in range(STEPS):
    updates, state = tx.update(grads(t, keys), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def sharded_run(tx, mesh, check_vma=True, keys=SHAPES):
  specs = {k: SPECS[k] for k in keys}

  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  place = lambda tree: jax.device_put(tree, {k: NamedSharding(mesh, s)
                                             for k, s in specs.items()})
  params = place(params0(keys))
  # The anchor and moments are split like params; counts and the per-layer
  # values are the same on every device.
  state_specs = jax.tree.map(lambda s: s.spec, spd_optax.state_shardings(tx, params))
  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(specs,),
                               out_specs=state_specs, check_vma=check_vma))
  step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, specs),
                               out_specs=(specs, state_specs), check_vma=check_vma))
  state = init(params)
  for t in range(STEPS):
    params, state = step(params, state, place(grads(t, keys)))
  return params, state


def assert_same_run(got, want, keys=SHAPES):
  (got_params, got_state), (want_params, want_state) = got, want
  for k in keys:
    np.testing.assert_allclose(np.asarray(got_params[k]), want_params[k],
                               rtol=1e-5, atol=1e-6, err_msg=k)
  assert_same_per_layer(got_state, want_state)


def assert_same_per_layer(got_state, want_state):
  """Per leaf, the same per-layer values as the unsharded run, and the same
  on every device (a device's own part's values would differ)."""
  for field in ("condition", "ratio", "deviation"):
    got, want = getattr(got_state, field), getattr(want_state, field)
    assert jax.tree.structure(got) == jax.tree.structure(want), field
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(want)):
      where = f"{field}{jax.tree_util.keystr(path)}"
      assert g.shape == np.shape(w) and g.dtype == jnp.float32, where
      assert g.sharding.is_fully_replicated, where
      for shard in g.addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), np.asarray(w),
                                   rtol=1e-5, atol=1e-6, err_msg=where)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
def test_param_specs_match_unsharded(mesh, check_vma):
  make = lambda **kw: spd_optax.adam_spd(1e-2, weight_decay=STRENGTHS,
                                         layer_axes=LAYER_AXES, **kw)
  want = reference(make())
  got = sharded_run(make(param_specs=SPECS), mesh, check_vma)
  assert_same_run(got, want)
  # All 8 layers of the split leaf are in the state, each with its own values.
  condition = spd_optax.spd_state(got[1]).condition
  assert condition["layers"].shape == (8,)
  assert len(np.unique(np.asarray(condition["layers"]))) == 8
  assert_spd_acted(want)


def test_masked_leaves_with_the_state_specs_of_state_shardings(mesh):
  # docs/scaling.md's recipe: the state's specs from state_shardings, which
  # knows that masked-off leaves store no anchor.
  mask = {"w": True, "stack": False, "b": False, "layers": True, "r": True}
  make = lambda **kw: spd_optax.adam_spd(1e-2, weight_decay=STRENGTHS, mask=mask,
                                         layer_axes=LAYER_AXES, **kw)
  want = reference(make())
  got = sharded_run(make(param_specs=SPECS), mesh)
  assert_same_run(got, want)
  assert isinstance(got[1].anchor["b"], optax.MaskedNode)


def test_axis_name_matches_unsharded(mesh):
  # The leaves axis_name can describe: one layer each, split or replicated.
  keys = ("w", "b", "r")
  make = lambda **kw: spd_optax.adam_spd(1e-2, weight_decay=1.0, **kw)
  assert_same_run(sharded_run(make(axis_name="x"), mesh, keys=keys),
                  reference(make(), keys), keys)


def test_axis_name_cannot_tell_how_a_stacked_leaf_is_split(mesh):
  # [8, 4, 8] split along its layers, or [4, 16, 8] along each layer's rows:
  # the per-layer sums are added over devices in one case only.
  for key in ("layers", "stack"):
    tx = spd_optax.adam_spd(1e-2, layer_axes={key: 0}, axis_name="x")
    with pytest.raises(ValueError, match=rf"params\['{key}'\] stacks layers.*param_specs="):
      sharded_run(tx, mesh, keys=(key,))


def test_axis_name_without_check_vma_is_refused(mesh):
  # Without varying-axis tracking a replicated leaf looks like a split one
  # (its sums would be added 8 times over), so axis_name cannot be trusted:
  # refused, with the fix.
  tx = spd_optax.adam_spd(1e-2, axis_name="x")
  with pytest.raises(ValueError, match="check_vma=False.*param_specs="):
    sharded_run(tx, mesh, check_vma=False, keys=("w", "r"))


def test_axis_name_inside_pmap_is_refused():
  # pmap does not track varying axes either.
  tx = spd_optax.adam_spd(1e-2, axis_name="batch")
  params = jax.tree.map(lambda x: np.stack([x] * jax.device_count()), params0(("w",)))

  def run(params):
    return tx.update(params, tx.init(params), params)

  with pytest.raises(ValueError, match="check_vma=False.*param_specs="):
    jax.pmap(run, axis_name="batch")(params)


def test_shard_map_refusals(mesh):
  tx = spd_optax.adam_spd(1e-2)
  with pytest.raises(ValueError, match=r"params\['b'\] varies over the manual mesh axes \['x'\].*axis_name="):
    sharded_run(tx, mesh, keys=("b",))
  # axis_name must be manual axes, and cover every axis the leaf varies over.
  tx = spd_optax.adam_spd(1e-2, axis_name="data")
  with pytest.raises(ValueError, match=(
      r"axis_name \['data'\] are not manual axes of the enclosing jax.shard_map "
      r"\(those are \['x'\]\)")):
    sharded_run(tx, mesh, keys=("w",))
  grid = jax.make_mesh((2, 4), ("a", "b"), axis_types=(mesh.axis_types[0],) * 2)
  tx = spd_optax.adam_spd(1e-2, axis_name="a")
  params = jax.device_put(params0(("w",)), NamedSharding(grid, P("a", "b")))
  split_twice = jax.shard_map(lambda p: tx.update(p, tx.init(p), p)[0], mesh=grid,
                              in_specs=P("a", "b"), out_specs=P("a", "b"))
  with pytest.raises(ValueError, match=(
      r"params\['w'\] varies over the manual mesh axes \['b'\], which "
      r"axis_name=\('a',\) does not name")):
    jax.jit(split_twice)(params)
  # A spec that does not say how the leaf is split.
  tx = spd_optax.adam_spd(1e-2, param_specs={"w": P(), "r": P()})
  with pytest.raises(ValueError, match=r"params\['w'\] varies over .*\['x'\].*param_specs entry"):
    sharded_run(tx, mesh, keys=("w", "r"))
  with pytest.raises(TypeError, match="axis_name must be"):
    spd_optax.adam_spd(1e-2, axis_name=["x"])
  with pytest.raises(ValueError, match="axis_name or param_specs, not both"):
    spd_optax.adam_spd(1e-2, axis_name="x", param_specs=SPECS)
  tx = spd_optax.adam_spd(1e-2, param_specs={"w": "x"})
  with pytest.raises(TypeError, match=r"param_specs for params\['w'\] must be a .*PartitionSpec"):
    tx.init(params0(("w",)))


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
def test_replicated_params_in_shard_map_need_no_axis_name(mesh, check_vma):
  # Pure data parallelism: every device holds whole leaves (grads already
  # averaged), so nothing needs summing. Without varying-axis tracking SPD
  # cannot see that nothing varies, and takes each device's leaf as whole.
  tx = spd_optax.adam_spd(1e-2, weight_decay=STRENGTHS, layer_axes=LAYER_AXES)
  want = reference(tx)
  assert_spd_acted(want)

  def run(params):
    state = tx.init(params)
    for t in range(STEPS):
      updates, state = tx.update(jax.tree.map(jnp.asarray, grads(t)), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  params = jax.device_put(params0(), NamedSharding(mesh, P()))
  got = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P(), out_specs=P(),
                              check_vma=check_vma))(params)
  assert_same_run(got, want)


def test_replicated_params_in_pmap_need_no_axis_name():
  # pmap's data parallelism: each device gets its own copy of the params.
  tx = spd_optax.adam_spd(1e-2, weight_decay=STRENGTHS, layer_axes=LAYER_AXES)
  want = reference(tx)
  assert_spd_acted(want)
  n = jax.device_count()
  copies = lambda tree: jax.tree.map(lambda x: np.stack([x] * n), tree)

  def run(params, all_grads):
    state = tx.init(params)
    for g in all_grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  got_params, got_state = jax.pmap(run, axis_name="batch")(
      copies(params0()), [copies(grads(t)) for t in range(STEPS)])
  for i in range(n):
    device = lambda tree: jax.tree.map(lambda x: x[i], tree)
    assert_same_run((device(got_params), device(got_state)), want)


def assert_spd_acted(run):
  """SPD changed every leaf of the run, so a wrong sum or a per-device decay
  would have shown: without it, another run."""
  plain, _ = reference(spd_optax.adam_spd(1e-2, weight_decay=0.0))
  for k in SHAPES:
    assert np.abs(plain[k] - run[0][k]).max() > 1e-3, k
