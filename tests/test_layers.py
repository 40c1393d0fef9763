"""Per-layer SPD on stacked leaves (`layer_axes`): a leaf stacking L layers
behaves exactly as L separate leaves."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spd_optax

L, D = 4, 6
STEPS = 12


def unstacked(dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  blocks = [{"w": rng.standard_normal((D, D)).astype(dtype),
             "b": rng.standard_normal((D,)).astype(dtype)} for _ in range(L)]
  return {"blocks": blocks, "head": rng.standard_normal((D, 3)).astype(dtype)}


def stack(tree):
  return {"blocks": jax.tree.map(lambda *x: jnp.stack(x), *tree["blocks"]),
          "head": tree["head"]}


def grads(t, dtype=np.float32):
  # Outward first, then back towards θ_0: SPD acts on some layers, not all.
  rng = np.random.default_rng(100 + t)
  tree = unstacked(dtype, seed=200 + t)
  sign = -1.0 if t < 4 else 1.0
  return jax.tree.map(
      lambda x: (0.5 * x + sign * rng.uniform(0, 1, ())).astype(dtype), tree)


def run(tx, params, to_params, jit=False, steps=STEPS, acted=None):
  """Steps with the gradients of `grads`; appends to `acted` how many layers
  SPD pulled back at each step."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(steps):
    updates, state = update(to_params(grads(t, params_dtype(params))), state, params)
    params = optax.apply_updates(params, updates)
    if acted is not None:
      acted.append(sum(int(np.count_nonzero(r)) for r in jax.tree.leaves(state.ratio)))
  return params, state


def params_dtype(params):
  return jax.tree.leaves(params)[0].dtype


def per_layer(state_tree):
  """Per-layer values of the unstacked run, stacked like the stacked run's."""
  return stack(state_tree)


def assert_equivalent(stacked_tx, flat_tx, dtype=np.float32, jit=False, rtol=1e-6):
  flat_acted, acted = [], []
  flat_params, flat_state = run(flat_tx, unstacked(dtype), lambda g: g, jit,
                                acted=flat_acted)
  got_params, got_state = run(stacked_tx, stack(unstacked(dtype)), stack, jit,
                              acted=acted)
  # SPD acted on some layers at some steps, the same number in both runs.
  assert acted == flat_acted and sum(acted) > 0
  chex.assert_trees_all_close(got_params, stack(flat_params), rtol=rtol, atol=rtol)
  for field in ("condition", "ratio", "deviation"):
    want = getattr(flat_state, field)
    got = getattr(got_state, field)
    if isinstance(want["head"], optax.MaskedNode):  # masked: nothing stored
      assert isinstance(got["head"], optax.MaskedNode)
      want, got = want["blocks"], got["blocks"]
      chex.assert_trees_all_close(got, per_layer({"blocks": want, "head": 0})["blocks"],
                                  rtol=rtol, atol=rtol)
    else:
      chex.assert_trees_all_close(got, per_layer(want), rtol=rtol, atol=rtol)
  want_stats = spd_optax.spd_stats(flat_state)
  got_stats = spd_optax.spd_stats(got_state)
  chex.assert_trees_all_close(got_stats, want_stats, rtol=rtol, atol=rtol)
  return np.asarray(got_state.ratio["blocks"]["w"])


FULL = {"blocks": {"w": 0, "b": 0}, "head": None}
PREFIX = {"blocks": 0, "head": None}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("layer_axes", [FULL, PREFIX, lambda p: PREFIX],
                         ids=["full", "prefix", "callable"])
def test_stacked_equals_separate_leaves(layer_axes, jit):
  ratios = assert_equivalent(spd_optax.adam_spd(0.05, layer_axes=layer_axes),
                             spd_optax.adam_spd(0.05), jit=jit)
  assert ratios.shape == (L,)


def test_selectivity_is_per_layer():
  # Layers 0 and 2 are pushed away and then back (decayed while Adam's
  # momentum still carries them outwards), 1 and 3 keep moving away (never
  # decayed): one condition for the whole stack could not tell them apart.
  params = stack(unstacked())
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, layer_axes=PREFIX)
  state = tx.init(params)
  turns = np.array([1.0, 0.0, 1.0, 0.0], np.float32)[:, None, None]
  decayed = np.zeros(L, bool)
  for t in range(8):
    g = np.where(turns > 0, -1.0 if t < 4 else 1.0, -1.0) * np.ones((L, D, D), np.float32)
    gr = {"blocks": {"w": jnp.asarray(g), "b": jnp.zeros((L, D))},
          "head": jnp.zeros((D, 3))}
    updates, state = tx.update(gr, state, params)
    params = optax.apply_updates(params, updates)
    ratio = np.asarray(state.ratio["blocks"]["w"])
    decayed |= ratio > 0
    # Each layer is one unit of spd_stats: 2 L stacked layers + the head.
    np.testing.assert_allclose(spd_optax.spd_stats(state)["decayed_fraction"],
                               np.count_nonzero(ratio) / (2 * L + 1), rtol=1e-6)
  np.testing.assert_array_equal(decayed, [True, False, True, False])


def test_stacked_equals_separate_leaves_float64():
  with jax.enable_x64(True):
    assert_equivalent(spd_optax.adam_spd(0.05, layer_axes=PREFIX),
                      spd_optax.adam_spd(0.05), dtype=np.float64, rtol=1e-12)


def test_zero_anchor_and_mask():
  assert_equivalent(
      spd_optax.adam_spd(0.05, anchor="zeros", layer_axes=PREFIX),
      spd_optax.adam_spd(0.05, anchor="zeros"))
  mask = {"blocks": True, "head": False}  # a prefix mask
  flat_mask = {"blocks": [True] * L, "head": False}
  assert_equivalent(
      spd_optax.adam_spd(0.05, mask=mask, layer_axes=PREFIX),
      spd_optax.adam_spd(0.05, mask=flat_mask))


def test_two_layer_axes():
  # [stages, layers_per_stage, ...]: 2 x 2 layers, axes (0, 1).
  def two_axes(tree):
    return jax.tree.map(lambda x: x.reshape((2, 2) + x.shape[1:]), tree)

  tx = spd_optax.adam_spd(0.05, layer_axes={"blocks": (0, 1), "head": None})
  params, state = run(tx, {"blocks": two_axes(stack(unstacked())["blocks"]),
                           "head": unstacked()["head"]},
                      lambda g: {"blocks": two_axes(stack(g)["blocks"]), "head": g["head"]})
  want_params, want_state = run(spd_optax.adam_spd(0.05), unstacked(), lambda g: g)
  chex.assert_trees_all_close(params["blocks"], two_axes(stack(want_params)["blocks"]),
                              rtol=1e-6, atol=1e-6)
  assert state.condition["blocks"]["w"].shape == (2, 2)
  chex.assert_trees_all_close(state.ratio["blocks"], two_axes(stack(want_state.ratio)["blocks"]),
                              rtol=1e-6, atol=1e-6)
  # A non-leading axis: the layers along the last axis of a transposed stack.
  tx = spd_optax.adam_spd(0.05, layer_axes={"blocks": -1, "head": None})
  move = lambda t: {"blocks": jax.tree.map(lambda x: jnp.moveaxis(x, 0, -1), stack(t)["blocks"]),
                    "head": t["head"]}
  params, _ = run(tx, move(unstacked()), move)
  chex.assert_trees_all_close(params, move(want_params), rtol=1e-6, atol=1e-6)


def test_default_is_one_layer_per_leaf():
  state = spd_optax.adam_spd(0.05).init(stack(unstacked()))
  assert state.condition["blocks"]["w"].shape == ()


@pytest.mark.parametrize("layer_axes, match", [
    ({"blocks": 2, "head": None}, r"params\['blocks'\]\['b'\].*shape \(4, 6\)"),
    ({"blocks": -3, "head": None}, r"params\['blocks'\]\['b'\].*must be in \[-2, 2\)"),
    ({"blocks": (0, 0), "head": None}, "names an axis twice"),
    ({"blocks": 0}, "layer_axes must be a tree like params or a prefix"),
    ({"blocks": 0, "head": None, "extra": 0}, "layer_axes must be a tree like params"),
    ({"blocks": "layers", "head": None}, "must be None, an int or a tuple of ints"),
    ({"blocks": True, "head": None}, "must be None, an int or a tuple of ints"),
])
def test_bad_layer_axes(layer_axes, match):
  tx = spd_optax.adam_spd(0.05, layer_axes=layer_axes)
  with pytest.raises(ValueError, match=match):
    tx.init(stack(unstacked()))


def test_layer_axes_that_change_after_init():
  # A callable must give the same axes at update; a mismatch is an error,
  # never a silent re-interpretation of the stored per-layer values.
  calls = []

  def axes(params):
    calls.append(1)
    return PREFIX if len(calls) == 1 else {"blocks": None, "head": None}

  tx = spd_optax.adam_spd(0.05, layer_axes=axes)
  params = stack(unstacked())
  state = tx.init(params)
  with pytest.raises(ValueError, match="per-layer shape"):
    tx.update(stack(grads(0)), state, params)


def test_layer_axes_array_refused():
  with pytest.raises(TypeError, match="static_args=\\('layer_axes',\\)"):
    spd_optax.adam_spd(0.05, layer_axes=jnp.asarray(0))


# --- flax.nnx.scan -------------------------------------------------------------

class Block(nnx.Module):

  def __init__(self, rngs, partitioned=True, bias_names=True):
    init, bias_init = nnx.initializers.lecun_normal(), nnx.initializers.normal(1.0)
    if partitioned:  # every stacked param must carry names, biases too
      init = nnx.with_partitioning(init, (None, "model"))
      if bias_names:
        bias_init = nnx.with_partitioning(bias_init, ("model",))
    self.linear = nnx.Linear(D, D, kernel_init=init, bias_init=bias_init, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.linear(x))


class Scanned(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(block, x):
      return block(x)
    return self.head(body(self.blocks, x))


class Unrolled(nnx.Module):

  def __init__(self, scanned):
    # The same weights, one module per block.
    self.blocks = nnx.List([Block(nnx.Rngs(0), partitioned=False) for _ in range(L)])
    for i, block in enumerate(self.blocks):
      block.linear.kernel[...] = scanned.blocks.linear.kernel[...][i]
      block.linear.bias[...] = scanned.blocks.linear.bias[...][i]
    self.head = nnx.Linear(D, 2, rngs=nnx.Rngs(0))
    self.head.kernel[...] = scanned.head.kernel[...]
    self.head.bias[...] = scanned.head.bias[...]

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def test_nnx_scan_matches_unrolled():
  # Partitioned variables need a mesh; one device is enough to carry names.
  mesh = jax.make_mesh((1, 1), ("layers", "model"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    _nnx_scan_matches_unrolled()


def _nnx_scan_matches_unrolled():
  scanned = Scanned(nnx.Rngs(0))
  unrolled = Unrolled(scanned)
  with warnings.catch_warnings():
    # Every stacked param carries names; the head's axes are not of length L.
    warnings.simplefilter("error")
    layer_axes = spd_optax.layer_axes_from_names(nnx.state(scanned, nnx.Param))
  assert layer_axes["blocks"]["linear"]["kernel"] == 0
  assert layer_axes["blocks"]["linear"]["bias"] == 0
  assert layer_axes["head"]["kernel"] is None
  opts = [nnx.Optimizer(scanned, spd_optax.adam_spd(0.05, layer_axes=layer_axes),
                        wrt=nnx.Param),
          nnx.Optimizer(unrolled, spd_optax.adam_spd(0.05), wrt=nnx.Param)]

  @nnx.jit
  def step(model, opt, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)

  rng = np.random.default_rng(0)
  for t in range(STEPS):
    x = jnp.asarray(rng.standard_normal((16, D)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    step(scanned, opts[0], x, y)
    step(unrolled, opts[1], x, y)
  for i in range(L):
    np.testing.assert_allclose(scanned.blocks.linear.kernel[...][i],
                               unrolled.blocks[i].linear.kernel[...], rtol=2e-5, atol=2e-6)
  ratio = opts[0].opt_state.ratio["blocks"]["linear"]["kernel"][...]
  want = [opts[1].opt_state.ratio["blocks"][i]["linear"]["kernel"][...] for i in range(L)]
  np.testing.assert_allclose(ratio, want, rtol=1e-4, atol=1e-6)
  assert np.count_nonzero(np.asarray(want)) > 0  # SPD acted
  stats = [spd_optax.spd_stats(o.opt_state) for o in opts]
  chex.assert_trees_all_close(stats[0], stats[1], rtol=1e-4, atol=1e-6)


def test_layer_axes_from_names_warns_of_stacked_params_without_names():
  # A bias made without names is stacked by the scan all the same, but says
  # nothing, so it would silently be one layer: its leading axis has the
  # stack's length L, and the warning names it.
  mesh = jax.make_mesh((1, 1), ("layers", "model"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(rngs, bias_names=False)

    state = nnx.state(make(nnx.Rngs(0)), nnx.Param)
    with pytest.warns(UserWarning, match=r"\['linear'\]\['bias'\].*carry no partition "
                      r"names.*'layers'"):
      axes = spd_optax.layer_axes_from_names(state)
  assert axes["linear"]["kernel"] == 0 and axes["linear"]["bias"] is None


def test_layer_axes_from_names_without_names():
  model = Block(nnx.Rngs(0), partitioned=False)
  with pytest.raises(ValueError, match="no param carries the partition name"):
    spd_optax.layer_axes_from_names(nnx.state(model, nnx.Param))


def test_layer_axes_from_linen_boxes_and_specs():
  import flax.linen as nn

  class LBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      k = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return x + nn.Dense(D, kernel_init=k)(x), None

  class LStack(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(LBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=L, metadata_params={nn.PARTITION_NAME: "layers"})()(x, None)
      return x

  variables = LStack().init(jax.random.key(0), jnp.ones((2, D)))
  # The Dense bias has no names: stacked, but it would be one layer.
  with pytest.warns(UserWarning, match=r"\['Dense_0'\]\['bias'\].*carry no partition names"):
    axes = spd_optax.layer_axes_from_names(variables["params"])
  kernel_axes = jax.tree.leaves(axes, is_leaf=lambda x: x is None or isinstance(x, int))
  assert 0 in kernel_axes
  from_specs = spd_optax.layer_axes_from_names(nn.get_partition_spec(variables)["params"])
  assert jax.tree.structure(from_specs) == jax.tree.structure(axes)
  params = nn.unbox(variables["params"])
  state = spd_optax.adam_spd(1e-3, layer_axes=axes).init(params)
  kernel_condition = [c for c in jax.tree.leaves(state.condition) if c.shape == (L,)]
  assert kernel_condition  # the scanned kernel holds one condition per layer
