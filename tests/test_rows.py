"""Row-wise norms (norm="rows_l1", the authors' later "mars" norm) against an
independent NumPy float64 implementation of their formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from spd_optax import options
from spd_optax import projection
from test_layers import PREFIX, assert_equivalent

LR, MOMENTUM, LAM = 0.05, 0.9, 0.8
SHAPES = {"w": (6, 4), "conv": (3, 2, 4), "b": (5,), "s": ()}


def mars_norm(x):
  # Their norm: per row (axis 0), the L1 norm over the other axes, plus
  # 1e-8, kept broadcastable. PyTorch sums over every axis when the list of
  # axes is empty, so a 1-D or 0-D tensor is one row.
  if x.ndim < 2:
    return np.sum(np.abs(x)).reshape((1,) * x.ndim) + 1e-8
  return np.sum(np.abs(x), axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-8


def reference_step(p, a, g, u, lam):
  """One SPD step of one leaf, as the authors' code does it with "mars"."""
  tilde = p + u
  condition = -np.sum(g * (p - a))
  if condition >= 0:
    return tilde, condition, np.zeros(mars_norm(p).shape)
  new, prev = mars_norm(tilde - a), mars_norm(p - a)
  ratio = np.clip((new - prev) / new, 0, 1)
  return tilde - lam * ratio * (tilde - a), condition, ratio


def grads(t, rng):
  # Outward for a few steps, then back: momentum still carries the step
  # away from the anchor while the gradient points back (c < 0, decay fires).
  sign = -1.0 if t < 3 else 1.0
  return {k: sign * (0.5 + rng.uniform(0, 1, s)) for k, s in SHAPES.items()}


def test_matches_numpy_reference_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    anchor = {k: v.copy() for k, v in params.items()}
    tx = spd_optax.selective_projection_decay(
        optax.sgd(LR, momentum=MOMENTUM), weight_decay=LAM, norm="rows_l1")
    state = tx.init(jax.tree.map(jnp.asarray, params))
    got = jax.tree.map(jnp.asarray, params)
    want, trace = params, {k: np.zeros(s) for k, s in SHAPES.items()}
    step = jax.jit(tx.update)
    fired = 0
    distinct_rows = False
    for t in range(8):
      g = grads(t, rng)
      updates, state = step(jax.tree.map(jnp.asarray, g), state, got)
      got = optax.apply_updates(got, updates)
      new = {}
      for k in SHAPES:
        trace[k] = MOMENTUM * trace[k] + g[k]
        new[k], c, r = reference_step(want[k], anchor[k], g[k], -LR * trace[k], LAM)
        np.testing.assert_allclose(state.condition[k], c, rtol=1e-12)
        np.testing.assert_allclose(state.ratio[k], np.mean(r), rtol=1e-10, atol=1e-15)
        fired += c < 0
        distinct_rows |= bool(np.ptp(r) > 1e-3)
        np.testing.assert_allclose(state.deviation[k], np.linalg.norm(new[k] - anchor[k]),
                                   rtol=1e-10)
      want = new
      for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12,
                                   err_msg=f"step {t} leaf {k}")
    assert fired >= 8 and distinct_rows  # decay fired, with different rows' ratios
    stats = spd_optax.spd_stats(state)
    np.testing.assert_allclose(stats["mean_ratio"],
                               np.mean([state.ratio[k] for k in SHAPES]), rtol=1e-6)


def test_zero_rows_and_zero_anchor():
  # A row that has not moved from the anchor: ratio 0 (the 1e-8 keeps the
  # division finite), its values exactly the inner step's.
  params = {"w": jnp.zeros((3, 4)).at[1].set(1.0)}
  # An inner step against the gradient's descent direction: row 1 moves away
  # from the anchor while c = -<g, θ - θ_0> < 0.
  tx = spd_optax.selective_projection_decay(optax.sgd(-0.1), 1.0, anchor="zeros",
                                            norm="rows_l1")
  state = tx.init(params)
  g = {"w": jnp.zeros((3, 4)).at[1].set(1.0)}
  updates, state = tx.update(g, state, params)
  u = np.asarray(updates["w"])
  assert np.all(np.isfinite(u))
  np.testing.assert_array_equal(u[[0, 2]], 0.0)
  # Row 1: |1.1| vs |1.0| per element: r = 0.1/1.1, pulled back by λ·r.
  np.testing.assert_allclose(u[1], 1.1 - 1.1 * (0.1 / 1.1) - 1.0, atol=1e-6)
  np.testing.assert_allclose(state.ratio["w"], (0.1 / 1.1) / 3, rtol=1e-5)


def test_layers_without_rows():
  # An empty layer ((0, 4); layers of (2, 0, 4)) is not decayed: ratio 0,
  # never NaN, and the model's mean ratio is the other layers'.
  params = {"empty": jnp.zeros((0, 4)), "stack": jnp.zeros((2, 0, 4)),
            "w": jnp.ones((8, 4))}
  tx = spd_optax.selective_projection_decay(
      optax.sgd(-0.1), 1.0, anchor="zeros", norm="rows_l1",
      layer_axes={"empty": None, "stack": 0, "w": None})
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert float(state.ratio["empty"]) == 0
  np.testing.assert_array_equal(state.ratio["stack"], [0, 0])
  assert float(state.ratio["w"]) > 0
  stats = spd_optax.spd_stats(state)
  np.testing.assert_allclose(stats["mean_ratio"], float(state.ratio["w"]) / 4, rtol=1e-6)


@pytest.mark.parametrize("shape, axes", [((3, 4, 5), (0,)), ((4, 3, 5), (1,)),
                                         ((2, 3, 2, 4), (0,)), ((6, 4), ()), ((3, 5), (0,))])
def test_project_per_layer_matches_numpy_reference(shape, axes):
  # One leaf through the three stages, each layer (an index along `axes`)
  # against the reference on that layer alone: its rows are its first axis.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(shape)
    d = rng.standard_normal(shape)
    p = a + d
    g = d * rng.uniform(0.5, 1.5, shape)     # c < 0 in every layer
    u = 0.1 * d * rng.uniform(-0.5, 1.5, shape)   # mostly away, by row
    lam = 0.7
    update, c, r, dev = jax.jit(lambda *x: projection.project(
        *x, lam, axes, norm="rows_l1"))(*map(jnp.asarray, (g, p, a, u)))
    layer_shape = tuple(shape[i] for i in axes)
    assert c.shape == r.shape == dev.shape == layer_shape
    rest = tuple(i for i in range(len(shape)) if i not in axes)
    for index in np.ndindex(*layer_shape):
      at = [slice(None)] * len(shape)
      for i, j in zip(axes, index):
        at[i] = j
      at = tuple(at)
      want, cond, ratio = reference_step(p[at], a[at], g[at], u[at], lam)
      np.testing.assert_allclose(np.asarray(p + update)[at], want, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(c[index], cond, rtol=1e-12)
      np.testing.assert_allclose(r[index], np.mean(ratio), rtol=1e-10)
      np.testing.assert_allclose(dev[index], np.linalg.norm(want - a[at]), rtol=1e-10)
      assert cond < 0 and np.max(ratio) > 0   # decayed
      if len(rest) >= 2:
        assert np.ptp(ratio) > 0   # by rows, each by its own ratio


@pytest.mark.parametrize("jit", [False, True])
def test_stacked_equals_separate_leaves(jit):
  # Rows of each layer: in a stacked [L, rows, ...] leaf the first axis
  # that is not a layer axis, so stacking changes nothing.
  ratios = assert_equivalent(
      spd_optax.adam_spd(0.05, layer_axes=PREFIX, norm="rows_l1"),
      spd_optax.adam_spd(0.05, norm="rows_l1"), jit=jit)
  assert ratios.shape == (4,)


def test_differs_from_frobenius():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
  out = {}
  for norm in options.NORMS:
    tx = spd_optax.selective_projection_decay(optax.sgd(0.05, momentum=0.9), 1.0,
                                              norm=norm)
    p, state = params, tx.init(params)
    for t in range(6):
      g = {"w": jnp.asarray(grads(t, rng)["w"], jnp.float32)}
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    out[norm] = np.asarray(p["w"])
  assert not np.allclose(out["frobenius"], out["rows_l1"], rtol=1e-4)


def test_bad_norm_and_shard_map():
  with pytest.raises(ValueError, match="norm must be one of"):
    spd_optax.adam_spd(0.1, norm="mars")
  mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  tx = spd_optax.adam_spd(0.1, norm="rows_l1", axis_name="fsdp")
  params = {"w": jnp.ones((4, 4))}

  def step(p):
    state = tx.init(p)
    return tx.update(jax.tree.map(jnp.ones_like, p), state, p)[0]

  f = jax.shard_map(step, mesh=mesh, in_specs=jax.P("fsdp"), out_specs=jax.P("fsdp"))
  with pytest.raises(ValueError, match="rows_l1.*shard_map"):
    jax.jit(f)(params)
