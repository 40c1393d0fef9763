"""SPD inside optax's wrappers, under jit with donation, and in flax.nnx."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spd_optax
from test_transform import _grads_like, _params, _run


def test_chain_with_clipping_and_schedule():
  params = _params()
  inner = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.lion(optax.cosine_decay_schedule(1e-2, 10)))
  tx = spd_optax.selective_projection_decay(inner, 0.5)
  got, state = _run(tx, params, 6)
  assert int(state.count) == 6
  # outer chain: the SPD state is found through it
  outer = optax.chain(optax.clip(1.0), spd_optax.adam_spd(1e-2))
  _, ostate = _run(outer, params, 3)
  assert set(spd_optax.spd_stats(ostate)) == {"decayed_fraction", "mean_ratio", "deviation"}
  for x in jax.tree.leaves(got):
    assert np.all(np.isfinite(x))


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
  losses = [float(step(model, opt)) for _ in range(30)]
  assert losses[-1] < losses[0]
  anchor = opt.opt_state.anchor
  assert jax.tree.leaves(anchor["head"]) == []  # masked off: no anchor stored
  np.testing.assert_array_equal(anchor["body"]["kernel"][...], pre_kernel)
  assert not np.allclose(model.body.kernel[...], pre_kernel)
  stats = spd_optax.spd_stats(opt.opt_state)
  assert float(stats["deviation"]) > 0
  assert float(stats["decayed_fraction"]) >= 0
