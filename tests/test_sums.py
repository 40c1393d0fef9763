"""The per-backend sums of spd_optax.sums, checked on the CPU against the
reference trajectories, each other and float64."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spd_optax
from spd_optax import sums
from test_golden import CASES, _replay


@pytest.mark.parametrize("path", CASES, ids=[c.stem for c in CASES])
def test_accelerator_sums_replay_reference(path, monkeypatch):
  # XLA:TPU and XLA:GPU take frobenius_plain; here it replaces the CPU's choice,
  # so the golden trajectories check the accelerators' arithmetic too.
  monkeypatch.setattr(sums, "frobenius", sums.frobenius_plain)
  z = np.load(path)
  meta = json.loads(str(z["meta"]))
  f64 = meta["dtype"] == "float64"
  rtol = 1e-9 if f64 else 1e-5
  with jax.enable_x64(f64):
    for t, params, _, _ in _replay(z, meta, jit=True, steps=meta["steps"]):
      for n in meta["leaves"]:
        want = z[f"param/{t}/{n}"].astype(np.float64)
        got = np.asarray(params[n], np.float64)
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert err <= rtol, f"step {t} leaf {n}: relative error {err:.2e}"


@pytest.mark.parametrize("axes", [(), (0,)])
def test_both_sums_agree(axes):
  keys = jax.random.split(jax.random.key(0), 3)
  g, d, u = (jax.random.normal(k, (3, 64, 32)) for k in keys)
  reduced = tuple(i for i in range(3) if i not in axes)
  for a, b in zip(sums.frobenius_cpu(g, d, u, reduced),
                  sums.frobenius_plain(g, d, u, reduced)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  # s is ||d + u||^2 - ||d||^2, formed without subtracting the two.
  s = sums.frobenius_plain(g, d, u, reduced)[2]
  want = jnp.sum((d + u) ** 2, reduced) - jnp.sum(d * d, reduced)
  np.testing.assert_allclose(s, want, rtol=1e-4)


@pytest.mark.parametrize("shape,axes", [
    ((1024, 2048), ()),        # many rows
    ((2 ** 21,), ()),          # one long axis
    ((2 ** 20, 8), ()),        # narrow rows (a LoRA factor of a large embedding)
    ((4, 2 ** 19), (0,)),      # stacked, each layer one long axis
    ((3, 1000, 7), (1,)),      # a layer axis in the middle, ragged blocks
    ((0, 3, 4), (0,)),         # zero-size: no layers
    ((2, 0, 4), (0,)),         # zero-size layers
])
def test_cpu_sums_keep_float32_accuracy(shape, axes):
  # One sequential float32 accumulation of 2^21 squares loses about 1e-3 of
  # ‖d‖²; summed in blocks, the error stays near float32's rounding.
  keys = jax.random.split(jax.random.key(2), 3)
  g, d, u = (jax.random.normal(k, shape) for k in keys)
  u = 1e-3 * u
  reduced = tuple(i for i in range(len(shape)) if i not in axes)
  got = jax.jit(lambda g, d, u: sums.frobenius_cpu(g, d, u, reduced))(g, d, u)
  g, d, u = (np.asarray(x, np.float64) for x in (g, d, u))
  terms = (g * d, d * d, u * (2 * d + u))
  for s, t in zip(got, terms):
    assert s.shape == tuple(shape[i] for i in axes)
    err = np.abs(np.asarray(s, np.float64) - t.sum(reduced)) / np.maximum(
        np.abs(t).sum(reduced), 1e-30)
    assert np.all(err <= 1e-6), err


def test_ratio_of_a_long_leaf_matches_float64():
  # A 2M-element 1-D leaf (a long bias, a flattened embedding): the ratio
  # SPD applies, in float32 on XLA:CPU, against the same step in float64.
  n = 2 ** 21
  keys = jax.random.split(jax.random.key(3), 3)
  theta0 = jax.random.normal(keys[0], (n,))
  theta = theta0 + 0.05 * jax.random.normal(keys[1], (n,))
  # c < 0 (the gradient points back), while Adam's sign-like first step
  # moves out on average: SPD decays, by the small ratio under test.
  grads = 0.1 * (theta - theta0) + 0.5 * jax.random.normal(keys[2], (n,))

  def ratio(dtype):
    cast = lambda x: {"w": jnp.asarray(x, dtype)}
    tx = spd_optax.adam_spd(1e-3, weight_decay=0.5)
    state = spd_optax.set_anchor(tx.init(cast(theta)), cast(theta0))
    _, state = jax.jit(tx.update)(cast(grads), state, cast(theta))
    return float(state.ratio["w"])

  want = ratio(jnp.float32)
  with jax.enable_x64(True):
    exact = ratio(jnp.float64)
  assert exact > 1e-5
  assert abs(want - exact) <= 1e-4 * exact, (want, exact)


def test_cpu_sums_on_a_one_device_explicit_mesh():
  # The leaf's type is sharded over an axis of one device (the flagship
  # example's one-device run): the blocked sums must not reshape it as such.
  mesh = jax.make_mesh((1,), ("fsdp",))
  keys = jax.random.split(jax.random.key(4), 3)
  g, d, u = (jax.random.normal(k, (2, 48, 64)) for k in keys)
  want = sums.frobenius_cpu(g, d, u, (1, 2))
  place = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(None, None, "fsdp")))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda g, d, u: sums.frobenius_cpu(g, d, u, (1, 2)))(*map(place, (g, d, u)))
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
