"""SPD inside optax's wrappers, under jit with donation, and in flax.nnx."""

import re
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spd_optax
from test_transform import _grads_like, _params, _run, _spd_numpy


def _steps_against_numpy(tx, inner, params, grad_fn, lam, steps):
  """Runs `tx` (SPD around `inner`) checking each step against one float64
  NumPy SPD step per leaf around `inner`'s own update, and its inner state
  against `inner`'s bit for bit. Returns (state, params, decays seen)."""
  state, p, decayed = tx.init(params), params, 0
  for t in range(steps):
    g = grad_fn(p, t)
    inner_updates, inner_state = inner.update(g, state.inner_state, p)
    updates, state = tx.update(g, state, p)
    chex.assert_trees_all_equal(state.inner_state, inner_state)
    for x, a, gx, ux, got in zip(*map(jax.tree.leaves, (p, params, g, inner_updates, updates))):
      want, _, ratio = _spd_numpy(x, a, gx, ux, lam)
      np.testing.assert_allclose(np.asarray(x, np.float64) + np.asarray(got), want,
                                 rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
      decayed += ratio > 0
    p = optax.apply_updates(p, updates)
  return state, p, decayed


def test_chain_with_clipping_and_schedule():
  # Every step against SPD restated in NumPy around the update the inner
  # chain gives from the same state; SPD passes that state through.
  params = _params()
  inner = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.lion(optax.cosine_decay_schedule(1e-2, 10)))
  tx = spd_optax.selective_projection_decay(inner, 0.5)
  state, _, decayed = _steps_against_numpy(
      tx, inner, params, lambda p, t: _grads_like(params, 1 + t), 0.5, 6)
  assert int(state.count) == 6 and decayed > 0
  # outer chain: SPD sees the clipped gradients, and its state is found through it
  outer = optax.chain(optax.clip(1.0), spd_optax.adam_spd(1e-2))
  got, ostate = _run(outer, params, 3)
  spd = spd_optax.adam_spd(1e-2)
  want, wstate = _run(spd, params, 3, step_fn=lambda g, s, p: spd.update(
      jax.tree.map(lambda x: jnp.clip(x, -1.0, 1.0), g), s, p))
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  chex.assert_trees_all_close(spd_optax.spd_stats(ostate), spd_optax.spd_stats(wstate),
                              rtol=1e-6)


def test_multisteps_accumulates_before_spd():
  params = _params()
  tx = optax.MultiSteps(spd_optax.adam_spd(0.05), every_k_schedule=2)
  ref = spd_optax.adam_spd(0.05)
  state, ref_state = tx.init(params), ref.init(params)
  p, q = params, params
  step = jax.jit(tx.update)
  for t in range(3):
    g1, g2 = _grads_like(params, 10 + 2 * t), _grads_like(params, 11 + 2 * t)
    u, state = step(g1, state, p)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
    p = optax.apply_updates(p, u)
    u, state = step(g2, state, p)
    p = optax.apply_updates(p, u)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    v, ref_state = ref.update(mean, ref_state, q)
    q = optax.apply_updates(q, v)
  chex.assert_trees_all_close(p, q, rtol=1e-5, atol=1e-6)
  assert spd_optax.spd_stats(state)["deviation"] > 0


def test_inject_hyperparams_learning_rate_and_weight_decay():
  params = _params()
  tx = optax.inject_hyperparams(spd_optax.adam_spd)(learning_rate=0.05, weight_decay=0.5)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(4):
    updates, state = step(_grads_like(params, t), state, params)
    params = optax.apply_updates(params, updates)
  state.hyperparams["weight_decay"] = jnp.asarray(0.0)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01)
  g = _grads_like(params, 9)
  updates, new_state = step(g, state, params)
  # λ is now 0 and η 0.01: the update is the base Adam step from the same moments
  # (inject_hyperparams turns b1 and b2 into float32 arrays too)
  base = optax.chain(spd_optax.adam.scale_by_adam(jnp.asarray(0.9), jnp.asarray(0.999)),
                     optax.scale_by_learning_rate(0.01))
  want, _ = jax.jit(base.update)(g, state.inner_state.inner_state, params)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  assert int(new_state.inner_state.count) == 5
  with pytest.raises(ValueError, match="weight_decay must be >= 0"):
    optax.inject_hyperparams(spd_optax.adam_spd)(learning_rate=0.05,
                                                 weight_decay=-1.0).init(params)


def test_inject_hyperparams_weight_decay_zero_is_adam():
  params = _params()
  tx = optax.inject_hyperparams(spd_optax.adam_spd)(learning_rate=0.05, weight_decay=0.0)
  got, _ = _run(tx, params, 4, step_fn=jax.jit(tx.update))
  want, _ = _run(optax.adam(0.05), params, 4, step_fn=jax.jit(optax.adam(0.05).update))
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


def test_jitted_init_and_donation():
  params = _params()
  tx = spd_optax.adam_spd(0.05)
  state = jax.jit(tx.init)(params)
  for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(state.anchor)):
    assert p.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()

  @jax.jit
  def ref_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(ref_step, donate_argnums=(0, 1))
  p2, s2 = jax.tree.map(jnp.copy, (params, state))
  for t in range(3):
    g = _grads_like(params, t)
    params, state = ref_step(params, state, g)
    p2, s2 = step(p2, s2, g)
  chex.assert_trees_all_equal(params, p2)
  chex.assert_trees_all_equal(state.anchor, s2.anchor)


def test_eval_shape():
  params = _params()
  tx = spd_optax.adam_spd(0.05, mask={"w": True, "b": False, "head": {"w": True}})
  abstract = jax.eval_shape(tx.init, params)
  assert abstract.anchor["w"].shape == (8, 5)
  out = jax.eval_shape(tx.update, params, abstract, params)
  assert out[0]["w"].shape == (8, 5)


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.body = nnx.Linear(6, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.body(x)))


def test_flax_nnx_optimizer_with_head_masked_off():
  model = _Net(nnx.Rngs(0))
  mask = lambda state: jax.tree_util.tree_map_with_path(
      lambda path, _: "head" not in jax.tree_util.keystr(path), state)
  opt = nnx.Optimizer(model, spd_optax.adam_spd(0.05, weight_decay=1.0, mask=mask),
                      wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  pre_kernel = np.array(model.body.kernel[...])
  pre_bias = np.array(model.body.bias[...])
  losses, fractions = [], []
  for _ in range(30):
    losses.append(float(step(model, opt)))
    stats = spd_optax.spd_stats(opt.opt_state)
    # The units are the two leaves SPD acts on; the head is masked off.
    ratios = [float(opt.opt_state.ratio["body"][k][...]) for k in ("kernel", "bias")]
    np.testing.assert_array_equal(stats["decayed_fraction"], np.count_nonzero(ratios) / 2)
    np.testing.assert_allclose(stats["mean_ratio"], sum(ratios) / 2, rtol=1e-6)
    fractions.append(float(stats["decayed_fraction"]))
  assert losses[-1] < losses[0]
  assert max(fractions) > 0
  anchor = opt.opt_state.anchor
  assert jax.tree.leaves(anchor["head"]) == []  # masked off: no anchor stored
  np.testing.assert_array_equal(anchor["body"]["kernel"][...], pre_kernel)
  assert not np.allclose(model.body.kernel[...], pre_kernel)
  body = nnx.to_pure_dict(nnx.state(model, nnx.Param))["body"]
  np.testing.assert_allclose(
      stats["deviation"], np.sqrt(np.sum((body["kernel"] - pre_kernel) ** 2)
                                  + np.sum((body["bias"] - pre_bias) ** 2)), rtol=1e-5)
  # nnx.state(optimizer) holds the SPD state as a mapping: the same stats.
  chex.assert_trees_all_equal(spd_optax.spd_stats(nnx.state(opt)), stats)


def _nnx_run(tx, steps=12):
  model = _Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

  @nnx.jit
  def step(model, opt):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    opt.update(model, nnx.grad(loss_fn)(model))

  for _ in range(steps):
    step(model, opt)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), opt.opt_state


def test_flax_nnx_plain_dict_masks_and_layer_axes():
  """Plain dicts (a prefix, or a full nnx.to_pure_dict) fit an nnx.State by
  key: the README's form works under nnx.Optimizer."""
  model = _Net(nnx.Rngs(0))
  full = jax.tree.map(lambda _: True, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  full["head"] = jax.tree.map(lambda _: False, full["head"])
  by_path = lambda state: jax.tree_util.tree_map_with_path(
      lambda path, _: "head" not in jax.tree_util.keystr(path), state)
  want, want_state = _nnx_run(spd_optax.adam_spd(0.05, mask=by_path))
  for mask in ({"body": True, "head": False}, full):
    got, state = _nnx_run(spd_optax.adam_spd(0.05, mask=mask))
    chex.assert_trees_all_equal(got, want)
    assert jax.tree.leaves(state.anchor["head"]) == []
  # A layer_axes prefix of plain dicts (what layer_axes_from_names' error
  # message tells users to write); one layer per leaf, as by default.
  got, state = _nnx_run(spd_optax.adam_spd(
      0.05, mask=by_path, layer_axes={"body": None, "head": {"kernel": None, "bias": None}}))
  chex.assert_trees_all_equal(got, want)
  for field in ("condition", "ratio", "deviation"):
    chex.assert_trees_all_equal(getattr(state, field), getattr(want_state, field))
  with pytest.raises(ValueError, match=re.escape("""no entry for params ["['head']['bias']"]""")):
    _nnx_run(spd_optax.adam_spd(0.05, mask={"body": True, "head": {"kernel": False}}))
  with pytest.raises(ValueError, match=re.escape("""entries for no param ["['tail']"]""")):
    _nnx_run(spd_optax.adam_spd(0.05, mask={"body": True, "head": False, "tail": True}))


# --- optax idioms on an SPD state (hardening) ----------------------------------

def test_inject_hyperparams_anchor_dtype():
  # A dtype is callable, so inject_hyperparams takes it for a schedule: it
  # would reach adam_spd as a float array and be dropped. Refused, with the fix.
  with pytest.raises(TypeError, match=r"static_args=\('anchor_dtype',\)"):
    optax.inject_hyperparams(spd_optax.adam_spd)(
        0.05, anchor_dtype=jnp.bfloat16).init(_params())
  tx = optax.inject_hyperparams(spd_optax.adam_spd, static_args=("anchor_dtype",))(
      0.05, anchor_dtype=jnp.bfloat16)
  state = tx.init(_params())
  assert {a.dtype for a in jax.tree.leaves(state.inner_state.anchor)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_non_floating_anchor_dtype_refused(dtype):
  with pytest.raises(ValueError, match="floating-point dtype"):
    spd_optax.adam_spd(0.05, anchor_dtype=dtype)
  with pytest.raises(ValueError, match="floating-point dtype"):
    spd_optax.adam_spd(0.05, mu_dtype=dtype)


@pytest.mark.parametrize("weight_decay", [0.0, optax.constant_schedule(0.0)])
def test_stats_report_only_applied_decay(weight_decay):
  def decayed_per_step(tx, params=_params()):
    state, out = tx.init(params), []
    for t in range(8):
      updates, state = tx.update(_grads_like(params, 1 + t), state, params)
      params = optax.apply_updates(params, updates)
      out.append(float(spd_optax.spd_stats(state)["decayed_fraction"]))
      assert float(spd_optax.spd_stats(state)["mean_ratio"]) >= 0
    return out, state

  fractions, state = decayed_per_step(spd_optax.adam_spd(0.05, weight_decay=weight_decay))
  assert fractions == [0.0] * 8
  chex.assert_trees_all_equal(state.ratio, jax.tree.map(jnp.zeros_like, state.ratio))
  # Control: with λ > 0 the same run does decay.
  fractions, _ = decayed_per_step(spd_optax.adam_spd(0.05, weight_decay=1.0))
  assert max(fractions) > 0


def test_nan_strength_refused_and_negative_schedule_clipped():
  with pytest.raises(ValueError, match="weight_decay must be >= 0 and not NaN"):
    spd_optax.adam_spd(0.05, weight_decay=float("nan"))
  with pytest.raises(ValueError, match="learning_rate must be >= 0 and not NaN"):
    spd_optax.adam_spd(float("nan"))
  # A schedule cannot be checked when built: its negative values act as 0.
  params = _params()
  neg, _ = _run(spd_optax.adam_spd(0.05, weight_decay=lambda count: -1.0), params, 6)
  zero, _ = _run(spd_optax.adam_spd(0.05, weight_decay=0.0), params, 6)
  chex.assert_trees_all_equal(neg, zero)


def test_traced_nan_strength_shows_in_the_updates():
  tx = optax.inject_hyperparams(spd_optax.adam_spd)(learning_rate=0.05, weight_decay=0.5)
  params = _params()
  state = tx.init(params)
  state.hyperparams["weight_decay"] = jnp.asarray(jnp.nan)
  updates, _ = jax.jit(tx.update)(_grads_like(params, 1), state, params)
  assert all(np.isnan(np.asarray(u)).any() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("mask", [{"w": "no", "b": True, "head": {"w": True}},
                                  {"w": 1, "b": True, "head": {"w": True}},
                                  {"w": None, "b": True, "head": {"w": True}}])
def test_non_bool_mask_refused(mask):
  with pytest.raises((TypeError, ValueError), match="mask"):
    spd_optax.adam_spd(0.05, mask=mask).init(_params())


def test_prefix_mask():
  params = _params()
  prefix = {"w": True, "b": True, "head": False}
  full = {"w": True, "b": True, "head": {"w": False}}
  got, state = _run(spd_optax.adam_spd(0.05, mask=prefix), params, 4)
  want, _ = _run(spd_optax.adam_spd(0.05, mask=full), params, 4)
  chex.assert_trees_all_equal(got, want)
  assert isinstance(state.anchor["head"]["w"], optax.MaskedNode)


def test_callable_mask_under_inject_hyperparams():
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  with pytest.raises(TypeError, match=r"static_args=\('mask',\)"):
    optax.inject_hyperparams(spd_optax.adam_spd)(0.05, mask=mask).init(_params())
  tx = optax.inject_hyperparams(spd_optax.adam_spd, static_args=("mask",))(0.05, mask=mask)
  state = tx.init(_params())
  assert isinstance(state.inner_state.anchor["b"], optax.MaskedNode)


def test_update_with_other_params_says_which_leaves():
  tx = spd_optax.adam_spd(0.05)
  params = _params()
  state = tx.init(params)
  other = {"w": params["w"], "b": params["b"], "tail": params["head"]}
  with pytest.raises(ValueError, match=r"missing \[\"\['head'\]\['w'\]\"\].*extra \[\"\['tail'\]"):
    tx.update(other, state, other)
  with pytest.raises(ValueError, match="the gradients do not have the structure"):
    tx.update({"w": params["w"]}, state, params)


def test_tree_map_params_cast_and_specs():
  params = _params()
  tx = spd_optax.adam_spd(0.05, mask={"w": True, "b": False, "head": True})
  state = tx.init(params)
  cast = optax.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), state)
  assert cast.anchor["w"].dtype == jnp.bfloat16
  assert isinstance(cast.anchor["b"], optax.MaskedNode)
  chex.assert_trees_all_equal(cast.condition, state.condition)   # not cast
  specs = jax.tree.map(lambda p: f"spec{p.ndim}", params)
  got = optax.tree_map_params(tx, lambda _, s: s, state, specs,
                              transform_non_params=lambda _: "replicated",
                              is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert got.anchor["w"] == "spec2" and got.inner_state[0].mu == specs
  assert got.count == "replicated"
  # the per-layer trees are not params: each is one non-params value
  assert got.condition == got.ratio == got.deviation == "replicated"


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_differentiable_through_update(mode):
  # Hypergradient of the loss after a few steps w.r.t. the learning rate,
  # against central finite differences in float64.
  with jax.enable_x64(True):
    params0 = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    # A target near θ_0: Adam overshoots it, then SPD pulls back.
    target = jax.tree.map(lambda p, g: p + 0.1 * g.astype(jnp.float64), params0,
                          _grads_like(_params(), 9))

    def loss(p):
      return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p),
                                                       jax.tree.leaves(target)))

    def after_steps(lr):
      tx = spd_optax.adam_spd(lr, weight_decay=1.0)
      p, state, decayed = params0, tx.init(params0), []
      for _ in range(4):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
        decayed.append(spd_optax.spd_stats(state)["decayed_fraction"])
      return loss(p), decayed

    lr = 0.1
    # Jitted: one compilation of the run, not one per operation.
    run = jax.jit(after_steps)
    f = lambda lr: run(lr)[0]
    # The run must pass through decayed steps for the check to mean anything.
    assert max(map(float, run(lr)[1])) > 0
    h = 1e-6
    want = (f(lr + h) - f(lr - h)) / (2 * h)
    got = (jax.jit(jax.grad(f))(lr) if mode == "reverse"
           else jax.jit(lambda lr: jax.jvp(f, (lr,), (1.0,))[1])(lr))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_schedule_free_inner_sequence_is_not_decayed():
  # SPD acts on the update schedule-free returns (it moves the evaluated
  # params y); its own z sequence stays as the inner optimizer keeps it.
  # The gradients depend on the params, so they see SPD's decay.
  params = _params()
  target = jax.tree.map(lambda p, g: p + 2.0 * g, params, _grads_like(params, 5))
  grad = jax.grad(lambda p: sum(jnp.sum(jnp.abs(a - b) ** 1.5) for a, b in zip(
      jax.tree.leaves(p), jax.tree.leaves(target))))
  inner = optax.contrib.schedule_free_sgd(0.5)
  tx = spd_optax.selective_projection_decay(inner, weight_decay=1.0)
  # z (and the rest of the inner state) stays the inner optimizer's, bit for bit
  state, p, decayed = _steps_against_numpy(tx, inner, params, lambda p, t: grad(p), 1.0, 8)
  assert decayed > 0  # SPD did act on the params
  # The inner state's fields read through SPDState, as schedule-free's
  # evaluation params need them.
  chex.assert_trees_all_equal(optax.contrib.schedule_free_eval_params(state, p),
                              optax.contrib.schedule_free_eval_params(state.inner_state, p))
