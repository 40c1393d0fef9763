"""SPD's per-layer sums (`projection.layer_sums`): XLA:CPU's blocked
variadic sums and the plain sums XLA:TPU and XLA:GPU take, checked on the
CPU against the reference trajectories, each other and float64."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spd_optax
from spd_optax import projection
from test_golden import CASES, _replay


class _AcceleratorLax:
  """`jax.lax` with `platform_dependent` taking the accelerators' branch on
  any backend."""

  def __getattr__(self, name):
    return getattr(jax.lax, name)

  @staticmethod
  def platform_dependent(*args, default, **_):
    return default(*args)


@pytest.fixture
def accelerator_sums(monkeypatch):
  monkeypatch.setattr(projection, "lax", _AcceleratorLax())


def _frobenius_terms(g, d, u):
  return g * d, d * d, u * (2 * d + u)


@pytest.mark.parametrize("path", CASES, ids=[c.stem for c in CASES])
def test_accelerator_sums_replay_reference(path, accelerator_sums):
  # The golden trajectories check the accelerators' arithmetic too.
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


@pytest.mark.parametrize("norm", ["frobenius", "rows_l1"])
@pytest.mark.parametrize("axes", [(), (0,)])
def test_both_sums_agree(axes, norm, monkeypatch):
  keys = jax.random.split(jax.random.key(0), 4)
  g, p, a, u = (jax.random.normal(k, (3, 64, 32)) for k in keys)
  sums = lambda: jax.jit(lambda *x: projection.layer_sums(*x, axes, norm))(g, p, a, u)
  cpu = sums()
  monkeypatch.setattr(projection, "lax", _AcceleratorLax())
  plain = sums()
  # the patched step has one formulation, with no variadic reduction
  jaxpr = str(jax.make_jaxpr(lambda *x: projection.layer_sums(*x, axes, norm))(g, p, a, u))
  assert "platform_index" not in jaxpr and "custom_jvp_call" not in jaxpr
  rest = [i for i in range(3) if i not in axes]
  rows = rest[:1] if norm == "rows_l1" else []   # a layer's first axis is its rows
  kept = tuple(n if i in axes or i in rows else 1 for i, n in enumerate(g.shape))
  assert len(cpu) == len(plain) == (3 if norm == "frobenius" else 4)
  for x, y in zip(cpu, plain):
    assert x.shape == y.shape == kept   # the reduced axes kept, as size 1
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
  if norm == "frobenius":
    # s is ‖d + u‖² - ‖d‖², formed without subtracting the two.
    d = p - a
    reduced = tuple(i for i in range(3) if i not in axes)
    want = jnp.sum((d + u) ** 2, reduced, keepdims=True) - jnp.sum(d * d, reduced, keepdims=True)
    np.testing.assert_allclose(plain[2], want, rtol=1e-4)
    np.testing.assert_allclose(cpu[2], want, rtol=1e-4)


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
  # ‖d‖²; summed in blocks of CPU_BLOCK, the error stays near float32's
  # rounding. Through layer_sums (anchor 0, so d is the params), as the step
  # runs it.
  keys = jax.random.split(jax.random.key(2), 3)
  g, d, u = (jax.random.normal(k, shape) for k in keys)
  u = 1e-3 * u
  reduced = tuple(i for i in range(len(shape)) if i not in axes)
  got = jax.jit(lambda g, d, u: projection.layer_sums(g, d, None, u, axes))(g, d, u)
  g, d, u = (np.asarray(x, np.float64) for x in (g, d, u))
  for s, t in zip(got, _frobenius_terms(g, d, u), strict=True):
    assert s.shape == tuple(1 if i in reduced else n for i, n in enumerate(shape))
    err = np.abs(np.asarray(s, np.float64) - t.sum(reduced, keepdims=True)) / np.maximum(
        np.abs(t).sum(reduced, keepdims=True), 1e-30)
    assert np.all(err <= 1e-6), err


@pytest.mark.parametrize("rows, n", [
    (2, projection.CPU_BLOCK * 600 + 123),                                 # a ragged block
    (1, projection.CPU_BLOCK ** 2 + 5 * projection.CPU_BLOCK + 7),   # blocks of blocks
])
def test_blocked_sums_of_long_rows(rows, n):
  # Each row summed on its own, in blocks of CPU_BLOCK, then the blocks' sums
  # in blocks again while there are more than CPU_BLOCK of them.
  x = jax.random.uniform(jax.random.key(5), (rows, n), minval=0.5, maxval=1.5)
  ones = jnp.ones((rows, n))
  got = jax.jit(lambda x, ones: projection._blocked_sums((x, ones), (1,)))(x, ones)
  assert got[0].shape == got[1].shape == (rows, 1)
  np.testing.assert_allclose(got[1], n, rtol=1e-7)   # every element counted once
  want = np.asarray(x, np.float64).sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got[0], np.float64), want, rtol=1e-6)
  # One variadic reduction over the whole row, which XLA:CPU accumulates in
  # sequence, does not keep that accuracy: the rows are long enough to need
  # the blocks.
  whole = jax.jit(lambda x, ones: projection._variadic_sums((x, ones), (1,)))(x, ones)
  assert np.max(np.abs(np.asarray(whole[0], np.float64) - want[:, 0]) / want[:, 0]) > 1e-6


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
  sums = lambda g, d, u: projection.layer_sums(g, d, None, u, (0,))
  want = sums(g, d, u)
  place = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(None, None, "fsdp")))
  with jax.set_mesh(mesh):
    got = jax.jit(sums)(*map(place, (g, d, u)))
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape == (2, 1, 1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
