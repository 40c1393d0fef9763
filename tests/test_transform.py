"""Core behaviour of selective_projection_decay and adam_spd."""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(k1, (8, 5)), "b": jax.random.normal(k2, (5,)),
          "head": {"w": jax.random.normal(k3, (5, 3))}}


def _grads_like(params, seed):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  it = iter(keys)
  return jax.tree.map(lambda p: jax.random.normal(next(it), p.shape, p.dtype), params)


def _spd_numpy(p, a, g, u, lam):
  """One SPD step of one leaf, as the paper writes it, in NumPy float64 from
  the inner update `u`; `a` is θ_0 (None: 0). Returns (θ_t, c_t, r_t)."""
  p, g, u = (np.asarray(x, np.float64) for x in (p, g, u))
  a = np.zeros_like(p) if a is None else np.asarray(a, np.float64)
  tilde = p + u
  cond = -np.sum(g * (p - a))
  n_new, n_prev = np.linalg.norm(tilde - a), np.linalg.norm(p - a)
  ratio = float(np.clip((n_new - n_prev) / n_new, 0, 1)) if cond < 0 and n_new > 0 else 0.0
  return tilde - lam * ratio * (tilde - a), cond, ratio


def _turning_grads(params, t, turn=3):
  """Gradients that push every leaf outwards for `turn` steps, then back
  towards 0 and its starting point: once they turn, c_t < 0 while
  momentum still carries the step outwards, so SPD decays."""
  keys = iter(jax.random.split(jax.random.key(50 + t), len(jax.tree.leaves(params))))
  sign = -1.0 if t < turn else 1.0
  return jax.tree.map(lambda p: sign * jnp.sign(p) * jax.random.uniform(
      next(keys), p.shape, p.dtype, 0.5, 1.5), params)


def _run(tx, params, steps, seed=1, step_fn=None):
  state = tx.init(params)
  step_fn = step_fn or tx.update
  for t in range(steps):
    updates, state = step_fn(_grads_like(params, seed + t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_zero_is_inner_optimizer(self):
    params = _params()
    inner = optax.sgd(0.1, momentum=0.9)
    tx = spd_optax.selective_projection_decay(inner, weight_decay=0.0)
    got, _ = _run(tx, params, 5, step_fn=self.variant(tx.update))
    want, _ = _run(inner, params, 5, step_fn=self.variant(inner.update))
    chex.assert_trees_all_equal(got, want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_step_never_decays(self):
    params = _params()
    tx = spd_optax.adam_spd(0.1, weight_decay=1.0)
    state = tx.init(params)
    grads = _grads_like(params, 3)
    updates, state = self.variant(tx.update)(grads, state, params)
    inner_updates, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params))
    chex.assert_trees_all_close(updates, inner_updates, rtol=1e-5)
    chex.assert_trees_all_equal(state.condition, jax.tree.map(jnp.zeros_like, state.condition))
    chex.assert_trees_all_equal(state.ratio, jax.tree.map(jnp.zeros_like, state.ratio))

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_formula_per_leaf(self):
    params = _params()
    anchor = _grads_like(params, 7)
    inner = optax.sgd(0.3)
    tx = spd_optax.selective_projection_decay(inner, weight_decay=0.7)
    state = spd_optax.set_anchor(tx.init(params), anchor)
    grads = _grads_like(params, 4)
    updates, state = self.variant(tx.update)(grads, state, params)
    trees = (params, anchor, grads, updates, state.condition, state.ratio)
    for p, a, g, u, c, r in zip(*map(jax.tree.leaves, trees)):
      p, a, g = (np.asarray(x, np.float64) for x in (p, a, g))
      tilde = p - 0.3 * g
      cond = -np.sum(g * (p - a))
      np.testing.assert_allclose(c, cond, rtol=1e-5)
      n_new, n_prev = np.linalg.norm(tilde - a), np.linalg.norm(p - a)
      ratio = np.clip((n_new - n_prev) / n_new, 0, 1) if cond < 0 else 0.0
      np.testing.assert_allclose(r, ratio, rtol=1e-5, atol=1e-7)
      want = tilde - 0.7 * ratio * (tilde - a)
      np.testing.assert_allclose(p + np.asarray(u), want, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_leaves_get_inner_update_and_no_anchor(self):
    params = _params()
    mask = {"w": True, "b": True, "head": {"w": False}}
    inner = optax.adam(0.05)
    tx = spd_optax.selective_projection_decay(inner, 1.0, mask=mask)
    got, state = _run(tx, params, 6, step_fn=self.variant(tx.update))
    want, _ = _run(inner, params, 6, step_fn=self.variant(inner.update))
    chex.assert_trees_all_equal(got["head"], want["head"])
    assert isinstance(state.anchor["head"]["w"], optax.MaskedNode)
    assert isinstance(state.condition["head"]["w"], optax.MaskedNode)
    assert not np.allclose(got["w"], want["w"])  # SPD did act on the rest

  @chex.variants(with_jit=True, without_jit=True)
  def test_callable_mask(self):
    params = _params()
    tx = spd_optax.adam_spd(0.05, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    _, state = _run(tx, params, 2, step_fn=self.variant(tx.update))
    assert isinstance(state.anchor["b"], optax.MaskedNode)
    assert state.anchor["w"].shape == (8, 5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_anchor_stores_nothing_and_decays_towards_zero(self):
    # θ_0 = 0 (adapters): every step against the NumPy restatement with a
    # zero anchor, through steps where SPD decays.
    params = _params()
    inner = optax.sgd(0.05, momentum=0.9)
    tx = spd_optax.selective_projection_decay(inner, weight_decay=0.8, anchor="zeros")
    step = self.variant(tx.update)
    state, p, decayed = tx.init(params), params, 0
    assert state.anchor is None
    for t in range(8):
      g = _turning_grads(p, t)
      inner_updates, _ = inner.update(g, state.inner_state, p)
      updates, state = step(g, state, p)
      flat = zip(*map(jax.tree.leaves, (p, g, inner_updates, updates, state.condition,
                                        state.ratio)))
      for x, gx, ux, got, c, r in flat:
        want, cond, ratio = _spd_numpy(x, None, gx, ux, 0.8)
        np.testing.assert_allclose(c, cond, rtol=1e-5)
        np.testing.assert_allclose(r, ratio, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(x, np.float64) + np.asarray(got), want,
                                   rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        decayed += ratio > 0
      p = optax.apply_updates(p, updates)
      # the deviation from a zero anchor is the norm of the params
      for x, dev in zip(jax.tree.leaves(p), jax.tree.leaves(state.deviation)):
        np.testing.assert_allclose(dev, np.linalg.norm(np.asarray(x, np.float64)), rtol=1e-5)
    assert decayed >= 3

  @chex.variants(with_jit=True, without_jit=True)
  def test_degenerate_leaves_are_finite(self):
    params = {"zero": jnp.zeros((4, 4)), "empty": jnp.zeros((0, 3)),
              "scalar": jnp.asarray(0.5), "still": jnp.ones((3,))}
    tx = spd_optax.adam_spd(0.1, weight_decay=1.0)
    step = self.variant(tx.update)
    state = tx.init(params)
    for t in range(4):
      grads = {"zero": jnp.full((4, 4), 0.3 * (-1) ** t), "empty": jnp.zeros((0, 3)),
               "scalar": jnp.asarray(1.0 - t), "still": jnp.zeros((3,))}
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
    for tree in (params, state.condition, state.ratio, state.deviation):
      for x in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(x)))
    assert float(state.ratio["still"]) == 0.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_keeps_dtypes(self):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    tx = spd_optax.adam_spd(0.05, weight_decay=1.0)
    got, state = _run(tx, params, 3, step_fn=self.variant(tx.update))
    chex.assert_trees_all_equal_dtypes(got, params)
    chex.assert_trees_all_equal_dtypes(state.anchor, params)
    for c in jax.tree.leaves(state.condition):
      assert c.dtype == jnp.float32

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_schedule(self):
    # λ = 0 for the first three steps (the inner optimizer exactly), then the
    # schedule's λ at SPD's count: two values, so a count off by one shows.
    params = _params()
    inner = optax.sgd(0.1, momentum=0.9)
    sched = lambda count: jnp.where(count < 3, 0.0, jnp.where(count == 3, 1.0, 0.5))
    tx = spd_optax.selective_projection_decay(inner, sched)
    step, inner_step = self.variant(tx.update), self.variant(inner.update)
    state, inner_state = tx.init(params), inner.init(params)
    p, q, decayed = params, params, {1.0: 0, 0.5: 0}
    for t in range(8):
      g = _turning_grads(p, t)
      inner_updates, _ = inner.update(g, state.inner_state, p)
      updates, state = step(g, state, p)
      if t < 3:
        plain, inner_state = inner_step(g, inner_state, q)
        q = optax.apply_updates(q, plain)
        chex.assert_trees_all_equal(updates, plain)
      lam = 0.0 if t < 3 else 1.0 if t == 3 else 0.5
      for x, a, gx, ux, got in zip(*map(jax.tree.leaves, (p, params, g, inner_updates,
                                                          updates))):
        want, _, ratio = _spd_numpy(x, a, gx, ux, lam)
        np.testing.assert_allclose(np.asarray(x, np.float64) + np.asarray(got), want,
                                   rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        if lam:
          decayed[lam] += ratio > 0
      p = optax.apply_updates(p, updates)
    assert decayed[1.0] > 0 and decayed[0.5] > 0


def test_anchor_dtype_bfloat16():
  params = _params()
  tx = spd_optax.adam_spd(0.05, anchor_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(state.anchor))
  got, _ = _run(tx, params, 5)
  # The effect is exactly that of anchoring at the params rounded to bfloat16.
  ref = spd_optax.adam_spd(0.05)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), params)
  state = spd_optax.set_anchor(ref.init(params), rounded)
  for t in range(5):
    updates, state = ref.update(_grads_like(params, 1 + t), state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(got, params, rtol=1e-6)


def test_bfloat16_anchor_decays_at_step_one_unless_the_params_start_on_it():
  # docs/scaling.md: the params differ from a rounded anchor by the
  # rounding, which SPD can take for a move away at step 1; rounded params
  # start on the anchor, and nothing is decayed at step 1.
  keys = jax.random.split(jax.random.key(5), 16)
  params = {f"w{i}": jax.random.normal(k, (32, 32)) for i, k in enumerate(keys[:8])}
  grads = {f"w{i}": jax.random.normal(k, (32, 32)) for i, k in enumerate(keys[8:])}
  tx = spd_optax.adam_spd(1e-3, anchor_dtype=jnp.bfloat16)
  _, state = tx.update(grads, tx.init(params), params)
  assert float(spd_optax.spd_stats(state)["decayed_fraction"]) > 0
  rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), params)
  _, state = tx.update(grads, tx.init(rounded), rounded)
  assert float(spd_optax.spd_stats(state)["decayed_fraction"]) == 0
  _, state = spd_optax.adam_spd(1e-3).update(grads, spd_optax.adam_spd(1e-3).init(params),
                                             params)
  assert float(spd_optax.spd_stats(state)["decayed_fraction"]) == 0


def test_cpu_step_temporaries_are_one_update_per_leaf():
  # docs/scaling.md: XLA:CPU keeps each leaf's proposed update between the
  # passes (the whole model's size at once), where optax.adam keeps nothing.
  shapes = {f"w{i}": (256, 256) for i in range(4)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

  def temporaries(tx):
    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  model = sum(4 * 256 * 256 for _ in shapes)
  assert temporaries(optax.adam(1e-3)) < 1024   # a few scalars
  assert 0.99 * model <= temporaries(spd_optax.adam_spd(1e-3)) <= 1.01 * model


def test_float64_reductions():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    _, state = _run(spd_optax.adam_spd(0.05), params, 3)
    assert all(c.dtype == jnp.float64 for c in jax.tree.leaves(state.condition))


# --- properties ---------------------------------------------------------------

arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
                    elements=st.floats(-4, 4, width=32))


def _one_step(p, a, g, lr, lam):
  tx = spd_optax.selective_projection_decay(optax.sgd(lr), lam)
  state = spd_optax.set_anchor(tx.init({"x": p}), {"x": a})
  updates, state = tx.update({"x": g}, state, {"x": p})
  return np.asarray(updates["x"]), state


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(data=st.data(), lr=st.floats(1e-3, 1.0), lam=st.floats(0, 2))
def test_properties_of_one_step(data, lr, lam):
  p = data.draw(arrays)
  a = data.draw(hnp.arrays(np.float32, p.shape, elements=st.floats(-4, 4, width=32)))
  g = data.draw(hnp.arrays(np.float32, p.shape, elements=st.floats(-4, 4, width=32)))
  updates, state = _one_step(p, a, g, lr, lam)
  r, c = float(state.ratio["x"]), float(state.condition["x"])
  assert 0.0 <= r <= 1.0
  assert np.all(np.isfinite(updates))
  inner = -np.float32(lr) * g
  if c >= 0 or r == 0:
    np.testing.assert_array_equal(updates, inner)  # exactly the inner update


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(data=st.data(), lr=st.floats(1e-3, 1.0))
def test_lambda_one_does_not_move_away(data, lr):
  p = data.draw(arrays)
  a = data.draw(hnp.arrays(np.float32, p.shape, elements=st.floats(-4, 4, width=32)))
  g = data.draw(hnp.arrays(np.float32, p.shape, elements=st.floats(-4, 4, width=32)))
  updates, state = _one_step(p, a, g, lr, 1.0)
  if float(state.condition["x"]) < 0:
    before = np.linalg.norm(p.astype(np.float64) - a)
    after = np.linalg.norm(p.astype(np.float64) + updates - a)
    assert after <= before * (1 + 1e-5) + 1e-5


# --- bad input ----------------------------------------------------------------

def test_update_without_params():
  tx = spd_optax.adam_spd(0.1)
  state = tx.init(_params())
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(_params(), state)


def test_mask_structure_mismatch():
  tx = spd_optax.adam_spd(0.1, mask={"w": True})
  with pytest.raises(ValueError, match="mask must be a tree like params or a prefix of it"):
    tx.init(_params())


def test_negative_lambda():
  with pytest.raises(ValueError, match="weight_decay must be >= 0"):
    spd_optax.adam_spd(0.1, weight_decay=-0.1)


def test_unknown_anchor():
  with pytest.raises(ValueError, match="anchor must be one of"):
    spd_optax.adam_spd(0.1, anchor="pretrained")


def test_non_floating_leaf():
  params = {"w": jnp.ones((3,)), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):
    spd_optax.adam_spd(0.1).init(params)
  # masked off, it is fine
  spd_optax.selective_projection_decay(optax.identity(), 1.0,
                                       mask={"w": True, "step": False}).init(params)


def test_empty_params():
  tx = spd_optax.adam_spd(0.1)
  updates, state = tx.update({}, tx.init({}), {})
  assert updates == {} and spd_optax.spd_stats(state)["deviation"] == 0
