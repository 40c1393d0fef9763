"""SPD on sharded params: every state array is laid out like its param, the
compiled step gathers nothing, and the result equals the unsharded run.

Runs on the 8 host CPU devices that conftest.py forces, as a (2, 4) mesh
('data', 'model'): FSDP over 'data', tensor parallel over 'model'. The code
here is the recipe of docs/scaling.md.
"""

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spd_optax

SPECS = {
    "w1": P("data", "model"),   # FSDP x tensor parallel
    "w2": P("model", "data"),
    "b": P("model"),
    "emb": P(None, "model"),
    "norm": P(),                # small, replicated
    "head": P("data", None),    # masked off: no anchor
}
# Wide leaves: every shard (>= 64 elements) is larger than any partial sums
# the step may exchange (one per row and device at most).
SHAPES = {"w1": (16, 256), "w2": (32, 128), "b": (256,), "emb": (8, 256),
          "norm": (64,), "head": (16, 32)}
MASK = {k: k != "head" for k in SHAPES}
STEPS = 6


@pytest.fixture(autouse=True, params=[AxisType.Explicit, AxisType.Auto],
                ids=["explicit", "auto"])
def default_axis_type(request, monkeypatch):
  """Every test here runs on both axis types: Explicit (jax.make_mesh's
  default) and Auto; a test asking for one type gets it."""
  monkeypatch.setattr(make_mesh, "__defaults__", (request.param,))
  return request.param


def make_mesh(axis_types=AxisType.Explicit):
  return jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(axis_types, axis_types))


def host_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(SHAPES[k], np.float32) for k in sorted(SHAPES)}


def host_grads(t):
  # Noisy gradients that first push away from θ_0, then back: once they turn,
  # c_t < 0 while Adam's momentum still carries the step outwards, so SPD acts.
  rng = np.random.default_rng(100 + t)
  bias = np.float32(-0.5 if t < 3 else 0.5)
  return {k: 0.3 * rng.standard_normal(SHAPES[k], np.float32) + bias
          for k in sorted(SHAPES)}


def param_shardings(mesh):
  return {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def state_shardings(tx, params, mesh):
  """The library's recipe, on any mesh: params-shaped state like params, the
  anchor of anchor_on_host=True in pinned_host memory, the rest replicated."""
  del mesh
  return spd_optax.state_shardings(tx, params)


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def unsharded_run(tx, steps=STEPS):
  dev = jax.devices()[0]
  params = jax.device_put(host_params(), dev)
  state = jax.jit(tx.init)(params)
  step = jax.jit(make_step(tx))
  for t in range(steps):
    params, state = step(params, state, jax.device_put(host_grads(t), dev))
  return params, state


def check_laid_out_like_params(state, params, psh, anchor_memory="device"):
  """Anchor and Adam moments: each leaf's sharding is its param's."""
  inner = state.inner_state[0]
  trees = {"mu": inner.mu, "nu": inner.nu}
  if state.anchor is not None:
    trees["anchor"] = state.anchor
  for name, tree in trees.items():
    for k, p in params.items():
      leaf = tree[k]
      if isinstance(leaf, optax.MaskedNode):
        assert name == "anchor" and not MASK[k]
        continue
      assert leaf.shape == p.shape
      kind = anchor_memory if name == "anchor" else "device"
      assert leaf.sharding.memory_kind == kind, (name, k, leaf.sharding)
      assert leaf.sharding.with_memory_kind("device").is_equivalent_to(
          psh[k], leaf.ndim), (
          f"{name}[{k!r}] is laid out as {leaf.sharding}, its param as {psh[k]}")
      # not a replicated copy: each device holds only its shard
      shard_shape = psh[k].shard_shape(p.shape)
      assert all(s.data.shape == shard_shape for s in leaf.addressable_shards)
  check_per_layer_replicated(state, psh)


def check_per_layer_replicated(state, psh):
  """Per SPD leaf, one float32 value per field, whole on every device of
  the params' mesh; a masked-off leaf has none."""
  for field in ("condition", "ratio", "deviation"):
    tree = getattr(state, field)
    assert sorted(tree) == sorted(psh), field
    for k, leaf in tree.items():
      if not MASK[k]:
        assert isinstance(leaf, optax.MaskedNode), (field, k)
        continue
      assert leaf.shape == () and leaf.dtype == jnp.float32, (field, k, leaf)
      assert leaf.sharding.is_fully_replicated, (field, k, leaf.sharding)
      assert leaf.sharding.device_set == psh[k].device_set, (field, k)


def collectives(hlo: str) -> dict[str, list[int]]:
  """Per collective op in compiled HLO text, the element count of each
  array it returns."""
  found = {}
  pattern = re.compile(
      r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-gather|all-reduce|"
      r"reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if m:
      for dims in re.findall(r"[a-z]\w*\[([^\]]*)\]", m.group(1)):
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        found.setdefault(m.group(2), []).append(size)
  return found


def assert_moves_no_leaf_data(hlo: str, mesh, specs=SPECS, shapes=SHAPES
                              ) -> dict[str, list[int]]:
  """The step may only exchange partial sums for the per-leaf reductions:
  every collective returns fewer elements than the smallest shard of any
  leaf, so no leaf, and no shard of params, anchor, moments or gradients,
  is gathered or moved."""
  smallest_shard = min(
      int(np.prod(NamedSharding(mesh, specs[k]).shard_shape(shapes[k])))
      for k in shapes)
  ops = collectives(hlo)
  for op in ("reduce-scatter", "all-to-all", "collective-permute"):
    assert op not in ops, f"the SPD step moves leaf data: {op} {ops[op]}"
  for op, sizes in ops.items():
    assert max(sizes) < smallest_shard, (
        f"the SPD step moves leaf data: {op} of {sizes} elements")
  assert ops, "expected collectives for the per-leaf sums"
  return ops


@pytest.mark.parametrize("anchor", [
    "params", "zeros", pytest.param("params_on_host", marks=pytest.mark.needs_host_memory)])
def test_sharded_state_and_step_match_unsharded(anchor):
  on_host = anchor == "params_on_host"
  anchor = "params" if on_host else anchor
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, anchor=anchor, mask=MASK,
                          anchor_on_host=on_host)
  memory = "pinned_host" if on_host else "device"
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params = jax.device_put(host_params(), psh)

  # The recipe: abstract state -> shardings -> jitted init with out_shardings.
  ssh = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  check_laid_out_like_params(state, params, psh, memory)
  if anchor == "params":
    for k in params:
      if MASK[k]:
        np.testing.assert_array_equal(state.anchor[k], host_params()[k])

  step = jax.jit(make_step(tx), donate_argnums=(0, 1),
                 out_shardings=(psh, ssh))
  decayed = 0
  for t in range(STEPS):
    old = params
    params, state = step(params, state, jax.device_put(host_grads(t), psh))
    assert old["w1"].is_deleted()   # donated: buffers reused, no extra copy
    decayed += float(spd_optax.spd_stats(state)["decayed_fraction"]) > 0
    check_laid_out_like_params(state, params, psh, memory)
    for k in params:
      assert params[k].sharding.is_equivalent_to(psh[k], params[k].ndim)
  assert decayed > 0, "SPD never acted: the test would not exercise it"

  want_params, want_state = unsharded_run(tx)
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(want_params),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(state), jax.device_get(want_state),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("anchor", ["params", "zeros"])
def test_compiled_step_gathers_nothing(anchor):
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, anchor=anchor, mask=MASK)
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params = jax.device_put(host_params(), psh)
  ssh = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  grads = jax.device_put(host_grads(0), psh)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1),
                 out_shardings=(psh, ssh))
  hlo = step.lower(params, state, grads).compile().as_text()
  assert_moves_no_leaf_data(hlo, mesh)

  # Control: the same check sees the gathers that a replicated anchor costs.
  if anchor == "params":
    rep = NamedSharding(mesh, P())
    bad_ssh = ssh._replace(anchor=jax.tree.map(lambda _: rep, ssh.anchor))
    bad = jax.jit(make_step(tx), out_shardings=(psh, bad_ssh))
    ops = collectives(bad.lower(params, state, grads).compile().as_text())
    assert max(ops["all-gather"]) == 16 * 256   # the whole of w1's anchor


def test_auto_mesh_recipe():
  """On an Auto mesh jit is free to replicate the fresh zeros of the moments,
  so out_shardings must be given; they are the params' shardings."""
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK)
  mesh = make_mesh(AxisType.Auto)
  psh = param_shardings(mesh)
  params = jax.device_put(host_params(), psh)
  ssh = spd_optax.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  check_laid_out_like_params(state, params, psh)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  grads = jax.device_put(host_grads(0), psh)
  assert_moves_no_leaf_data(step.lower(params, state, grads).compile().as_text(), mesh)
  for t in range(STEPS):
    params, state = step(params, state, jax.device_put(host_grads(t), psh))
  check_laid_out_like_params(state, params, psh)
  want_params, _ = unsharded_run(tx)
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(want_params),
                              rtol=1e-5, atol=1e-6)


# --- flax.nnx ---------------------------------------------------------------

def _nnx_net_cls():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.body = nnx.Linear(
          16, 32, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, ("data", "model")),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)))
      self.head = nnx.Linear(
          32, 8, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, ("model", "data")))

    def __call__(self, x):
      return self.head(jax.nn.gelu(self.body(x)))

  return Net


def _nnx_sharded_training():
  from flax import nnx
  Net = _nnx_net_cls()
  # The Flax guide's Auto mesh: annotations on the variables, jit propagates.
  mesh = make_mesh(AxisType.Auto)
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jax.random.normal(jax.random.key(2), (32, 8))
  with jax.set_mesh(mesh):

    @nnx.jit
    def create():
      model = Net(nnx.Rngs(0))
      return model, nnx.Optimizer(model, spd_optax.adam_spd(0.05), wrt=nnx.Param)

    model, opt = create()
    kernel0 = np.asarray(model.body.kernel[...])

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, opt, x, y):
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean((m(x) - y) ** 2))(model)
      opt.update(model, grads)
      return loss

    losses = [float(step(model, opt, x, y)) for _ in range(5)]
  return model, opt, kernel0, losses


def test_flax_nnx_sharded_optimizer():
  model, opt, kernel0, losses = _nnx_sharded_training()
  assert losses[-1] < losses[0]
  st = opt.opt_state
  for name in ("body", "head"):
    kernel = getattr(model, name).kernel[...]
    for leaf in (st.anchor[name]["kernel"][...],
                 st.inner_state[0].mu[name]["kernel"][...],
                 st.inner_state[0].nu[name]["kernel"][...]):
      assert leaf.sharding.is_equivalent_to(kernel.sharding, 2), (
          leaf.sharding, kernel.sharding)
      assert not leaf.sharding.is_fully_replicated
  bias = model.body.bias[...]
  assert st.anchor["body"]["bias"][...].sharding.is_equivalent_to(bias.sharding, 1)
  np.testing.assert_array_equal(st.anchor["body"]["kernel"][...], kernel0)
  for field in ("condition", "ratio", "deviation"):
    values = jax.tree.leaves(nnx_pure(getattr(st, field)))
    assert len(values) == 4, field   # body and head, kernel and bias
    for leaf in values:
      assert leaf.shape == () and leaf.sharding.is_fully_replicated, (field, leaf)


def nnx_pure(tree):
  from flax import nnx
  if hasattr(nnx, "as_pure"):   # flax >= 0.12.7
    return nnx.as_pure(tree)
  return jax.tree.map(lambda x: x.value if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- stacked layers, sharded along the layer axis ------------------------------

L = 4
STACKED_SHAPES = {"blocks_w": (L, 32, 128), "blocks_b": (L, 128), "head": (32, 64)}
STACKED_SPECS = {"blocks_w": P("data", None, "model"),  # layers over 'data'
                 "blocks_b": P("data", "model"), "head": P(None, "model")}
LAYER_AXES = {"blocks_w": 0, "blocks_b": 0, "head": None}


def stacked_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s, np.float32) for k, s in sorted(STACKED_SHAPES.items())}


def stacked_grads(t):
  rng = np.random.default_rng(300 + t)
  bias = np.float32(-0.5 if t < 3 else 0.5)
  return {k: 0.3 * rng.standard_normal(s, np.float32) + bias
          for k, s in sorted(STACKED_SHAPES.items())}


def test_stacked_layers_sharded_along_layer_axis():
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, layer_axes=LAYER_AXES)
  mesh = make_mesh()
  psh = {k: NamedSharding(mesh, s) for k, s in STACKED_SPECS.items()}
  params = jax.device_put(stacked_params(), psh)
  replicated = NamedSharding(mesh, P())

  # optax's recipe: the anchor and Adam's moments map like params, the
  # per-layer values go to transform_non_params (here: replicated).
  abstract = jax.eval_shape(tx.init, params)
  ssh = optax.tree_map_params(tx, lambda _, s: s, abstract, psh,
                              transform_non_params=lambda _: replicated)
  assert ssh.anchor == psh and ssh.inner_state[0].mu == psh
  assert ssh.condition == ssh.ratio == ssh.deviation == replicated
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  for k in params:
    assert state.anchor[k].sharding.is_equivalent_to(psh[k], params[k].ndim)
  assert state.condition["blocks_w"].shape == (L,)
  for field in ("condition", "ratio", "deviation"):
    for k, leaf in getattr(state, field).items():
      assert leaf.sharding.is_fully_replicated, (field, k, leaf.sharding)

  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  hlo = step.lower(params, state, jax.device_put(stacked_grads(0), psh)).compile().as_text()
  smallest = min(int(np.prod(psh[k].shard_shape(STACKED_SHAPES[k]))) for k in psh)
  for op, sizes in collectives(hlo).items():
    assert max(sizes) < smallest, f"the stacked step moves leaf data: {op} {sizes}"

  acted = 0
  for t in range(STEPS):
    params, state = step(params, state, jax.device_put(stacked_grads(t), psh))
    acted += np.count_nonzero(np.asarray(state.ratio["blocks_w"]))
  assert acted > 0, "SPD never acted: the test would not exercise it"
  ratios = np.asarray(state.ratio["blocks_w"])

  # The same run unsharded, and per layer as separate leaves.
  flat = {f"w{i}": stacked_params()["blocks_w"][i] for i in range(L)}
  flat_tx = spd_optax.adam_spd(0.05, weight_decay=1.0)
  flat_state = flat_tx.init(flat)
  for t in range(STEPS):
    g = {f"w{i}": stacked_grads(t)["blocks_w"][i] for i in range(L)}
    u, flat_state = flat_tx.update(g, flat_state, flat)
    flat = optax.apply_updates(flat, u)
  np.testing.assert_allclose(jax.device_get(params["blocks_w"]),
                             np.stack([flat[f"w{i}"] for i in range(L)]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ratios, [flat_state.ratio[f"w{i}"] for i in range(L)],
                             rtol=1e-4, atol=1e-6)

  # A cast through optax.tree_map_params: params-shaped state only.
  cast = optax.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), state)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(cast.anchor))
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(cast.inner_state[0].mu))
  chex.assert_trees_all_equal(cast.condition, state.condition)
  chex.assert_trees_all_equal(cast.ratio, state.ratio)


@pytest.mark.parametrize("layered", [False, True], ids=["per_leaf", "per_layer"])
def test_donated_sharded_steps_make_no_host_transfer(layered):
  """On whatever devices this runs on (8 CPU devices here, the GPUs on an
  accelerator machine): once params, state and gradients are on the
  devices, a jitted, donated, sharded step never touches the host, and its
  result equals the unsharded run's."""
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Explicit,))
  shapes = {"w": (8 * len(devices), 64), "stack": (3, 8 * len(devices), 16),
            "b": (8 * len(devices),)}
  layer_axes = {"w": None, "stack": 0 if layered else None, "b": None}
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, layer_axes=layer_axes)
  specs = {"w": P("data"), "stack": P(None, "data"), "b": P("data")}
  psh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  rng = np.random.default_rng(0)
  host = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
  grads = [{k: (0.3 * rng.standard_normal(s) + (-0.5 if t < 3 else 0.5)).astype(np.float32)
            for k, s in shapes.items()} for t in range(5)]  # SPD acts at steps 4, 5
  params = jax.device_put(host, psh)
  ssh = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  on_device = [jax.device_put(g, psh) for g in grads]
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  step = step.lower(params, state, on_device[0]).compile()
  with jax.transfer_guard("disallow"):
    for g in on_device:
      old = params
      params, state = step(params, state, g)
      assert old["w"].is_deleted()
  assert float(spd_optax.spd_stats(state)["decayed_fraction"]) > 0

  ref_params = jax.device_put(host, devices[0])
  ref_state = jax.jit(tx.init)(ref_params)
  ref_step = jax.jit(make_step(tx))
  for g in grads:
    ref_params, ref_state = ref_step(ref_params, ref_state, jax.device_put(g, devices[0]))
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(ref_params),
                              rtol=1e-5, atol=1e-6)

  # Control: the guard does catch a host transfer in this setting.
  with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
    step(params, state, grads[0])


# --- anchor_on_host through the recipes ---------------------------------------

@pytest.mark.needs_host_memory
def test_state_shardings_keep_a_host_anchor_on_host():
  """The library's recipe keeps the anchor in pinned_host memory on either
  axis type, through donated steps, and the run is the device anchor's."""
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK, anchor_on_host=True)
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params = jax.device_put(host_params(), psh)
  ssh = spd_optax.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  check_laid_out_like_params(state, params, psh, anchor_memory="pinned_host")
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for t in range(STEPS):
      params, state = step(params, state, jax.device_put(host_grads(t), psh))
  check_laid_out_like_params(state, params, psh, anchor_memory="pinned_host")
  want_params, _ = unsharded_run(spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK))
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(want_params),
                              rtol=1e-5, atol=1e-6)


def test_state_shardings_needs_a_mesh():
  with pytest.raises(ValueError, match="no param carries a NamedSharding"):
    spd_optax.state_shardings(spd_optax.adam_spd(0.1), host_params())
