"""The fused Pallas first pass (spd_optax/kernels.py) against the pure-JAX
path, in Pallas' interpreter here; on a GPU the same tests run compiled."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from spd_optax import kernels

B1, B2, EPS = 0.9, 0.999, 1e-8
INTERPRET = jax.default_backend() != "gpu"


def reference(g, p, a, m, v, neg_lr, bc1, bc2):
  g, p, m, v = (np.asarray(x, np.float64) for x in (g, p, m, v))
  d = p if a is None else p - np.asarray(a, np.float64)
  m = (1 - B1) * g + B1 * m
  v = (1 - B2) * g * g + B2 * v
  u = neg_lr * (m / bc1) / (np.sqrt(v / bc2) + EPS)
  return m, v, (np.sum(g * d), np.sum(d * d), np.sum(d * u), np.sum(u * u))


@pytest.mark.parametrize("shape", [(7,), (kernels.BLOCK,), (2, kernels.BLOCK + 17), (33, 65, 3)],
                         ids=["tiny", "one_block", "partial_block", "3d"])
@pytest.mark.parametrize("with_anchor", [True, False], ids=["anchor", "zero_anchor"])
def test_moments_and_sums_match_float64(shape, with_anchor):
  rng = np.random.default_rng(sum(shape))
  g, p, a, m = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  v = np.abs(rng.standard_normal(shape)).astype(np.float32)
  a = a if with_anchor else None
  m_new, v_new, sums = kernels.adam_moments_and_sums(
      g, p, a, m, v, -1e-3, 0.19, 0.002, b1=B1, b2=B2, eps=EPS, interpret=INTERPRET)
  m_ref, v_ref, sums_ref = reference(g, p, a, m, v, -1e-3, 0.19, 0.002)
  assert m_new.shape == shape and m_new.dtype == jnp.float32
  np.testing.assert_allclose(m_new, m_ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(v_new, v_ref, rtol=1e-6, atol=1e-7)
  for got, want, x, y in zip(sums, sums_ref, ("g", "d", "d", "u"), ("d", "d", "u", "u")):
    # A float32 sum of n products: within n·eps of the sum of magnitudes.
    assert abs(float(got) - want) <= 1e-6 * np.sqrt(np.prod(shape)) * (abs(want) + 1e-3), (x, y)


def test_low_precision_inputs_keep_their_dtypes():
  rng = np.random.default_rng(0)
  g, p, a = (jnp.asarray(rng.standard_normal((300,)), jnp.bfloat16) for _ in range(3))
  m = jnp.asarray(rng.standard_normal((300,)), jnp.bfloat16)
  v = jnp.abs(jnp.asarray(rng.standard_normal((300,)), jnp.float16))
  m_new, v_new, sums = kernels.adam_moments_and_sums(
      g, p, a, m, v, -1e-3, 0.1, 0.001, b1=B1, b2=B2, eps=EPS, interpret=INTERPRET)
  assert m_new.dtype == jnp.bfloat16 and v_new.dtype == jnp.float16
  assert all(s.dtype == jnp.float32 for s in sums)
  m_ref, v_ref, _ = reference(g, p, a, m, v, -1e-3, 0.1, 0.001)
  np.testing.assert_allclose(np.asarray(m_new, np.float32), m_ref, rtol=1e-2, atol=1e-2)


SHAPES = {"w": (37, 129), "big": (kernels.BLOCK + 5,), "stack": (3, 8, 4), "norm": (7,)}


def trajectory(fused, steps=8, dtype=jnp.float32, **kwargs):
  """Steps that first push away from θ_0, then turn: SPD acts once they do."""
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
  tx = spd_optax.adam_spd(optax.linear_schedule(3e-2, 1e-3, steps), weight_decay=1.0,
                          fused=fused, **kwargs)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  acted = 0
  for t in range(steps):
    grads = {k: jnp.asarray(0.3 * rng.standard_normal(s) + (-0.5 if t < 3 else 0.5), dtype)
             for k, s in SHAPES.items()}
    params, state = step(params, state, grads)
    acted += float(spd_optax.spd_stats(state)["decayed_fraction"]) > 0
  assert acted, "SPD never acted: the comparison would not exercise it"
  return params, state


@pytest.mark.parametrize("kwargs", [
    {},
    {"anchor": "zeros"},
    {"mask": {"w": True, "big": False, "stack": True, "norm": True}},
    {"layer_axes": {"w": None, "big": None, "stack": 0, "norm": None}},
    {"anchor_dtype": jnp.bfloat16},
], ids=["default", "zero_anchor", "mask", "layer_axes", "bf16_anchor"])
def test_fused_adam_spd_follows_the_xla_path(kwargs):
  got_params, got_state = trajectory(True, **kwargs)
  want_params, want_state = trajectory(False, **kwargs)
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-4, atol=1e-5)


def test_mixed_dtypes_take_the_xla_path():
  params = {"w": jnp.ones((16, 16))}
  tx = spd_optax.adam_spd(1e-3, fused=True, mu_dtype=jnp.bfloat16)
  assert "pallas_call" not in str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))


def test_fused_under_inject_hyperparams():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((64, 40)), jnp.float32)}
  out = []
  for fused in (True, False):
    tx = optax.inject_hyperparams(spd_optax.adam_spd, static_args=("fused",))(
        learning_rate=0.05, weight_decay=0.5, fused=fused)
    state, p = tx.init(params), params
    for t in range(6):
      g = {"w": jnp.full((64, 40), -0.5 if t < 3 else 0.5, jnp.float32)}
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
    out.append(p)
  chex.assert_trees_all_close(*out, rtol=1e-6, atol=1e-7)


def test_bfloat16_params():
  got, _ = trajectory(True, dtype=jnp.bfloat16)
  want, _ = trajectory(False, dtype=jnp.bfloat16)
  # The kernel forms the moments in float32 where XLA forms them in
  # bfloat16: the runs agree to bfloat16's precision.
  chex.assert_trees_all_close(got, want, rtol=2e-2, atol=2e-2)


def pallas_calls(fused):
  tx = spd_optax.adam_spd(1e-3, fused=fused)
  params = {"w": jnp.ones((16, 16))}
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  return str(jaxpr).count("pallas_call")


def test_path_selection():
  assert pallas_calls(True) == 1 and pallas_calls(False) == 0
  on_one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
  assert pallas_calls(None) == (1 if on_one_gpu else 0)
  with pytest.raises(TypeError, match="fused must be"):
    spd_optax.adam_spd(1e-3, fused="yes")
