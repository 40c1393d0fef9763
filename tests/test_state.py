"""spd_stats and set_anchor."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spd_optax
from test_compose import _Net
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


@pytest.mark.needs_host_memory
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


@pytest.mark.needs_host_memory
@pytest.mark.parametrize("norm", ["frobenius", "rows_l1"])
def test_a_host_anchor_gives_the_device_anchors_numbers(norm):
  # Stacked leaves move their host anchor in layer by layer (along their
  # first layer axis, 0 or not); one-layer leaves whole. Bit for bit the
  # device anchor's params and per-layer values.
  k = jax.random.split(jax.random.key(0), 3)
  params = {"blocks": jax.random.normal(k[0], (4, 64, 32)),
            "heads": jax.random.normal(k[1], (8, 3, 16)), "out": jax.random.normal(k[2], (16, 8))}
  layer_axes = {"blocks": 0, "heads": (1,), "out": None}

  def run(on_host):
    tx = spd_optax.adam_spd(0.05, weight_decay=1.0, layer_axes=layer_axes, norm=norm,
                            anchor_on_host=on_host)
    def step(p, s, t):  # gradients along the drift: SPD decays
      g = jax.tree.map(lambda x, x0: 50 * (x - x0) + jnp.sin(x0 * (t + 3)), p, params)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params)
    for t in range(5):
      p, s = step(p, s, t)
    return p, s

  (p_dev, s_dev), (p_host, s_host) = run(False), run(True)
  assert {a.sharding.memory_kind for a in jax.tree.leaves(s_host.anchor)} == {"pinned_host"}
  assert float(spd_optax.spd_stats(s_host)["decayed_fraction"]) == 1
  for x, y in zip(jax.tree.leaves((p_dev, s_dev)), jax.tree.leaves((p_host, s_host))):
    if jax.__version_info__ < (0, 12):
      np.testing.assert_array_equal(x, y)
    else:
      # XLA:CPU from jax 0.12 fuses a leaf's second pass otherwise when its
      # anchor comes from host memory (a leaf moved in whole too): 1 ulp on
      # a few percent of the elements, which this drift-driven gradient
      # amplifies over the steps.
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_spd_stats_counts_each_layer_of_a_stacked_leaf():
  # A leaf stacking L layers holds [L] values: each layer is one unit, as
  # if the layers were separate leaves.
  params = {"b": jnp.zeros(3), "blocks": jnp.zeros((3, 2)), "head": jnp.zeros(2)}
  tx = spd_optax.adam_spd(0.1, mask={"b": False, "blocks": True, "head": True},
                          layer_axes={"b": None, "blocks": 0, "head": None})
  state = tx.init(params)
  for field in ("condition", "ratio", "deviation"):
    tree = getattr(state, field)
    assert isinstance(tree["b"], optax.MaskedNode)
    assert tree["blocks"].shape == (3,) and tree["head"].shape == ()
    assert tree["blocks"].dtype == tree["head"].dtype == jnp.float32
  values = lambda blocks, head: {"b": optax.MaskedNode(),
                                 "blocks": jnp.asarray(blocks, jnp.float32),
                                 "head": jnp.asarray(head, jnp.float32)}
  state = state._replace(condition=values([-1, 2, -3], -1), ratio=values([0.5, 0, 0.25], 0),
                         deviation=values([1, 2, 2], 4))
  stats = jax.jit(spd_optax.spd_stats)(state)
  np.testing.assert_allclose(stats["decayed_fraction"], 2 / 4)
  np.testing.assert_allclose(stats["mean_ratio"], 0.75 / 4)
  np.testing.assert_allclose(stats["deviation"], 5.0)  # sqrt(1 + 4 + 4 + 16)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in stats.values())


# --- set_anchor on flax.nnx and on states with several SPD parts ---------------

def _apply(p, x):
  # _Net on a plain dict of its params, for the plain-pytree reference run.
  h = jax.nn.gelu(x @ p["body"]["kernel"] + p["body"]["bias"])
  return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("as_pure_dict", [False, True], ids=["nnx_state", "pure_dict"])
def test_set_anchor_on_nnx_optimizer(as_pure_dict):
  model, pretrained = _Net(nnx.Rngs(0)), _Net(nnx.Rngs(1))
  start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  anchor = nnx.state(pretrained, nnx.Param)
  want_anchor = nnx.to_pure_dict(anchor)
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  count = opt.opt_state.count
  opt.opt_state = spd_optax.set_anchor(
      opt.opt_state, nnx.to_pure_dict(anchor) if as_pure_dict else anchor)
  stored = opt.opt_state.anchor["body"]["kernel"]
  assert type(stored) is nnx.OptVariable  # the state keeps its own wrappers
  np.testing.assert_array_equal(stored[...], want_anchor["body"]["kernel"])
  assert opt.opt_state.count is count  # the rest of the state is untouched

  x = jax.random.normal(jax.random.key(1), (32, 6))
  loss = lambda out: jnp.mean((out - 1.0) ** 2)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(lambda m: loss(m(x)))(model))

  for _ in range(5):
    step(model, opt)
  # The same run on plain dicts, anchored at the same params.
  params, state = start, spd_optax.set_anchor(tx.init(start), want_anchor)
  for _ in range(5):
    updates, state = tx.update(jax.grad(lambda p: loss(_apply(p, x)))(params), state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params,
                              rtol=1e-5, atol=1e-6)
  assert float(spd_optax.spd_stats(state)["decayed_fraction"]) > 0  # SPD acted


LABELS = {"w": "full", "b": "full", "head": {"w": "other"}}
FULL = {"w": True, "b": True, "head": False}
OTHER = {"w": False, "b": False, "head": True}


def _run_anchored(tx, params, anchor, steps=6):
  state = tx.init(params)
  if anchor is not None:
    state = spd_optax.set_anchor(state, anchor)
  for t in range(steps):
    updates, state = tx.update(_grads_like(params, 1 + t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("other_anchor", ["zeros", "params"])
def test_set_anchor_on_multi_transform(other_anchor):
  # Full fine-tuning on one partition and, on the other, a zero anchor (LoRA:
  # skipped) or a second params anchor (set from the same tree).
  params, new_anchor = _params(), _grads_like(_params(), 7)
  full = lambda mask=None: spd_optax.adam_spd(0.05, weight_decay=1.0, mask=mask)
  other = lambda mask=None: spd_optax.adam_spd(0.05, weight_decay=0.5,
                                                anchor=other_anchor, mask=mask)
  tx = optax.multi_transform({"full": full(), "other": other()}, LABELS)
  got, state = _run_anchored(tx, params, new_anchor)
  parts = state.inner_states
  np.testing.assert_array_equal(parts["full"].inner_state.anchor["w"], new_anchor["w"])
  assert isinstance(parts["full"].inner_state.anchor["head"]["w"], optax.MaskedNode)
  if other_anchor == "params":
    np.testing.assert_array_equal(parts["other"].inner_state.anchor["head"]["w"],
                                  new_anchor["head"]["w"])
    assert isinstance(parts["other"].inner_state.anchor["w"], optax.MaskedNode)
  # Each partition follows its own optimizer anchored at the new tree.
  want_full, _ = _run_anchored(full(FULL), params, new_anchor)
  want_other, _ = _run_anchored(other(OTHER), params,
                                new_anchor if other_anchor == "params" else None)
  chex.assert_trees_all_close((got["w"], got["b"]), (want_full["w"], want_full["b"]),
                              rtol=1e-6)
  chex.assert_trees_all_close(got["head"], want_other["head"], rtol=1e-6)
  default, _ = _run_anchored(tx, params, None)
  assert not np.allclose(got["w"], default["w"])


def test_set_anchor_names_the_leaves():
  params = _params()
  tx = optax.multi_transform({"full": spd_optax.adam_spd(0.05),
                              "other": spd_optax.adam_spd(0.05)}, LABELS)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"missing \[\"\['head'\]\['w'\]\"\], extra "
                                       r"\[\"\['tail'\]\"\]"):
    spd_optax.set_anchor(state, {"w": params["w"], "b": params["b"], "tail": params["b"]})
  with pytest.raises(ValueError, match=r"\['head'\]\['w'\] of shape \(2,\) does not match"):
    spd_optax.set_anchor(state, dict(params, head={"w": jnp.ones(2)}))
  zeros = optax.multi_transform(
      {"full": spd_optax.adam_spd(0.05, anchor="zeros"),
       "other": spd_optax.adam_spd(0.05, anchor="zeros")}, LABELS)
  with pytest.raises(ValueError, match="anchor='zeros'"):
    spd_optax.set_anchor(zeros.init(params), params)


def test_set_anchor_keeps_the_stored_sharding():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros((4,))}
  spec = {"w": jax.P("data", None), "b": jax.P()}
  shard = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), spec)
  tx = spd_optax.adam_spd(0.05)
  old = jax.jit(tx.init)(jax.device_put(params, shard))
  new = {"w": np.ones((16, 4), np.float64), "b": jnp.ones((4,), jnp.bfloat16)}
  state = spd_optax.set_anchor(old, new)
  for k in params:
    assert state.anchor[k].sharding == old.anchor[k].sharding
    assert state.anchor[k].sharding.is_equivalent_to(shard[k], params[k].ndim)
    assert state.anchor[k].dtype == jnp.float32
    np.testing.assert_array_equal(state.anchor[k], 1)


def test_set_anchor_with_prefix_labels():
  # multi_transform with labels for whole subtrees: optax.masked replaces a
  # subtree by one MaskedNode; the anchor's leaves under it are not extra.
  params, new_anchor = _params(), _grads_like(_params(), 7)
  tx = optax.multi_transform({"full": spd_optax.adam_spd(0.05), "head": optax.adam(0.05)},
                             {"w": "full", "b": "full", "head": "head"})
  state = spd_optax.set_anchor(tx.init(params), new_anchor)
  anchor = state.inner_states["full"].inner_state.anchor
  np.testing.assert_array_equal(anchor["w"], new_anchor["w"])
  with pytest.raises(ValueError, match=r"extra \[\"\['tail'\]\"\]"):
    spd_optax.set_anchor(state, dict(new_anchor, tail=params["b"]))


def test_spd_state_finds_the_one_state_and_refuses_ambiguity():
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones((2,))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), spd_optax.adam_spd(1e-2))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  found = spd_optax.spd_state(state)
  assert isinstance(found, spd_optax.SPDState)
  assert jax.tree.structure(found.ratio) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="holds no SPDState"):
    spd_optax.spd_state(optax.adam(1e-2).init(params))
  two = optax.multi_transform({"x": spd_optax.adam_spd(1e-2), "y": spd_optax.adam_spd(1e-3)},
                              {"a": "x", "b": "y"})
  with pytest.raises(ValueError, match=r"holds 2 SPDStates.*spd_states_with_paths"):
    spd_optax.spd_state(two.init(params))


def test_tree_get_finds_the_per_layer_fields():
  # condition, ratio and deviation are fields of SPDState: optax's tree
  # utilities find them by name inside a chain, as they find Adam's mu.
  import optax.tree_utils as otu
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), spd_optax.adam_spd(1e-2))
  state = tx.init(params)
  p, before = params, params
  for t in range(3):
    grads = _grads_like(params, 1 + t)
    updates, state = tx.update(grads, state, p)
    before, p = p, optax.apply_updates(p, updates)
  found = spd_optax.spd_state(state)
  for field in ("condition", "ratio", "deviation"):
    got = otu.tree_get(state, field)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    chex.assert_trees_all_equal(got, getattr(found, field))
  # The values are the last step's, leaf by leaf; SPD saw the clipped gradients.
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  clip = min(1.0, 1.0 / np.sqrt(sum(np.sum(x * x) for x in g.values())))
  for k in params:
    d = np.asarray(before[k], np.float64) - np.asarray(params[k], np.float64)
    np.testing.assert_allclose(otu.tree_get(state, "condition")[k],
                               -np.sum(clip * g[k] * d), rtol=1e-5)
    np.testing.assert_allclose(otu.tree_get(state, "deviation")[k],
                               np.linalg.norm(np.asarray(p[k]) - np.asarray(params[k])),
                               rtol=1e-5)
  # and tree_set writes them where they are
  other = jax.tree.map(lambda r: r + 0.5, found.ratio)
  chex.assert_trees_all_equal(otu.tree_get(otu.tree_set(state, ratio=other), "ratio"), other)
