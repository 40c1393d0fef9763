"""The experimental Pallas first pass (spd_optax.experimental), run in
Pallas' interpreter on the CPU: each backend's kernel against the XLA
arithmetic, and the whole optimizer against adam_spd and the reference."""

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import spd_optax
from spd_optax import experimental
from spd_optax.experimental import kernels
from test_golden import CASES, _replay

B1, B2, EPS, LR = 0.9, 0.999, 1e-8, 1e-2


def _leaf(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  g, p, a, m, v = (jax.random.normal(k, shape) for k in keys)
  return g, p, a, m, jnp.abs(v)


def _xla_pass(g, p, a, m, v, axes, count=3):
  """The moments as adam.scale_by_adam forms them, and the sums of
  projection.layer_sums, summed in float64 (XLA:CPU's float32 reduction
  of 2^19 terms is off by 1e-4 relative; the kernels' blocked sums are
  closer)."""
  m = (1 - B1) * g + B1 * m
  v = (1 - B2) * g * g + B2 * v
  bc1, bc2 = (spd_optax.adam.bias_correction(b, jnp.asarray(count), jnp.float32)
              for b in (B1, B2))
  u = -LR * spd_optax.adam.direction(m, v, bc1, bc2, EPS)
  g, p, u = (np.asarray(x, np.float64) for x in (g, p, u))
  d = p if a is None else p - np.asarray(a, np.float64)
  reduced = tuple(i for i in range(p.ndim) if i not in axes)
  return m, v, tuple(np.sum(t, axis=reduced) for t in (g * d, d * d, u * (2 * d + u)))


def _coef(count=3):
  c = jnp.asarray(count)
  return kernels.coefficients(-LR, spd_optax.adam.bias_correction(B1, c, jnp.float32),
                              spd_optax.adam.bias_correction(B2, c, jnp.float32),
                              B1, B2, EPS)


# Each kernel's own shapes: the TPU kernel's tile (rows of 8, columns of
# 128) with several blocks each way, and shapes only the Triton kernel's
# masked flat blocks take.
TPU_SHAPES = [((16, 256), ()), ((3, 24, 384), (0,)), ((2, 8, 4, 128), (0,)),
              ((512, 1024), ())]
GPU_SHAPES = TPU_SHAPES + [((5, 7), ()), ((4, 3, 1000), (0,)), ((33,), ())]


@pytest.mark.parametrize("platform,shape,axes",
                         [("tpu", *c) for c in TPU_SHAPES] + [("gpu", *c) for c in GPU_SHAPES])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchor", "zeros"])
def test_kernel_matches_xla_pass(platform, shape, axes, anchored):
  g, p, a, m, v = _leaf(shape)
  a = a if anchored else None
  got = kernels.first_pass(g, p, a, m, v, _coef(), axes, platform=platform)
  want = _xla_pass(g, p, a, m, v, axes)
  # The moments' arithmetic is XLA's, but XLA may contract it differently.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
  layer_shape = shape[:1] if axes else ()
  for s, w in zip(got[2], want[2]):
    assert s.shape == layer_shape and s.dtype == jnp.float32
    # Float32 sums of up to 2^19 terms: their rounding, relative to the
    # terms' magnitudes (a few units of 1e-7 per element summed).
    np.testing.assert_allclose(s, w, rtol=2e-6, atol=1e-6 * np.sqrt(np.prod(shape)))


def test_kernels_take_float32_leaves_with_leading_layers():
  f32, f64 = (jax.ShapeDtypeStruct((8, 128), t) for t in (jnp.float32, jnp.float64))
  assert kernels.supports(f32, f32, None, f32, f32, ())
  assert kernels.supports(f32, f32, f32, f32, f32, (0,))
  assert not kernels.supports(f32, f32, None, f32, f32, (1,))
  bf16 = jax.ShapeDtypeStruct((8, 128), jnp.bfloat16)
  assert not kernels.supports(f32, f32, None, bf16, f32, ())  # mu_dtype
  assert not kernels.supports(f64, f64, None, f64, f64, ())
  scalars = jax.ShapeDtypeStruct((8,), jnp.float32)  # a stack of scalars
  assert not kernels.supports(scalars, scalars, None, scalars, scalars, (0,))


PARAMS = {"w": (16, 256), "b": (256,), "blocks": (3, 8, 128), "odd": (5, 7),
          "head": (4, 16)}
LAYER_AXES = {"w": None, "b": None, "blocks": 0, "odd": None, "head": None}


def _run(tx, steps=6, shapes=PARAMS, place=lambda t: t):
  keys = iter(jax.random.split(jax.random.key(3), len(shapes)))
  params0 = place({k: jax.random.normal(next(keys), s) for k, s in shapes.items()})

  @jax.jit
  def step(p, state, t):
    # Away from θ_0 for a few steps, then back: SPD fires and then does not.
    g = jax.tree.map(lambda x, x0: jnp.sin(x0 * (t + 1.3)) * 0.01
                     + jnp.where(t < 4, 3.0, -3.0) * (x - x0), p, params0)
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  p, state = params0, tx.init(params0)
  for t in range(steps):
    p, state = step(p, state, t)
  return p, state


@pytest.mark.parametrize("anchor", ["params", "zeros"])
def test_adam_spd_pallas_matches_xla(anchor):
  kw = dict(weight_decay=0.7, anchor=anchor, layer_axes=LAYER_AXES,
            mask={"w": True, "b": True, "blocks": True, "odd": True, "head": False})
  want_p, want_s = _run(spd_optax.adam_spd(LR, **kw))
  got_p, got_s = _run(experimental.adam_spd(LR, **kw))
  for k in PARAMS:
    np.testing.assert_allclose(got_p[k], want_p[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_s.per_layer, want_s.per_layer, rtol=1e-5, atol=1e-7)
  plain, _ = _run(spd_optax.adam_spd(LR, **(kw | {"weight_decay": 0.0})))
  assert all(np.abs(plain[k] - want_p[k]).max() > 1e-4 for k in ("w", "blocks"))  # SPD acted
  for x, y in zip(jax.tree.leaves(got_s.inner_state), jax.tree.leaves(want_s.inner_state)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_pallas_with_zero_eps_masks_the_padded_lanes():
  # Every leaf here is shorter than the kernel's block of 4096: with eps = 0
  # a padded lane's direction is 0/0, which must not reach the sums.
  kw = dict(eps=0.0, weight_decay=0.7, layer_axes=LAYER_AXES)
  want_p, want_s = _run(spd_optax.adam_spd(LR, **kw))
  got_p, got_s = _run(experimental.adam_spd(LR, **kw))
  assert np.all(np.isfinite(got_s.per_layer))
  np.testing.assert_allclose(got_s.per_layer, want_s.per_layer, rtol=1e-5, atol=1e-7)
  for k in PARAMS:
    np.testing.assert_allclose(got_p[k], want_p[k], rtol=1e-6, atol=1e-6)
  plain, _ = _run(spd_optax.adam_spd(LR, **(kw | {"weight_decay": 0.0})))
  assert np.abs(plain["w"] - want_p["w"]).max() > 1e-4  # SPD acted


def test_pallas_on_zero_size_leaves_takes_xlas_pass():
  shapes = {"a": (0, 4), "b": (4, 0), "c": (0,), "d": (2, 0, 4), "e": (0, 3, 4),
            "w": (16, 256)}
  layer_axes = {"a": None, "b": None, "c": None, "d": 0, "e": 0, "w": None}
  g, p, a, m, v = _leaf((0, 4))
  assert not kernels.supports(g, p, a, m, v, ())
  want_p, want_s = _run(spd_optax.adam_spd(LR, layer_axes=layer_axes), shapes=shapes)
  got_p, got_s = _run(experimental.adam_spd(LR, layer_axes=layer_axes),
                      shapes=shapes)
  for k in shapes:
    assert got_p[k].shape == shapes[k]
  np.testing.assert_allclose(got_p["w"], want_p["w"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_s.per_layer, want_s.per_layer, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(13, 129), (12, 130)])
def test_tpu_kernel_refuses_what_it_cannot_tile(shape):
  g, p, a, m, v = _leaf(shape)
  with pytest.raises(ValueError, match="columns a multiple of 128 and rows of 8"):
    kernels.first_pass(g, p, a, m, v, _coef(), (), platform="tpu")
  # The Triton kernel takes it, and so does the TPU path on a TPU (XLA's).
  got = kernels.first_pass(g, p, a, m, v, _coef(), (), platform="gpu")
  for s, w in zip(got[2], _xla_pass(g, p, a, m, v, ())[2]):
    np.testing.assert_allclose(s, w, rtol=2e-6, atol=1e-5)


def test_pallas_first_pass_is_in_the_step():
  tx = experimental.adam_spd(LR, layer_axes=LAYER_AXES)
  params = {k: jnp.ones(s) for k, s in PARAMS.items()}
  jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
  # One kernel per leaf, each once per backend branch (TPU, GPU, others).
  assert jaxpr.count("pallas_call") >= 2 * len(PARAMS)


def test_pallas_under_inject_hyperparams_and_a_schedule():
  schedule = optax.linear_schedule(LR, LR / 4, 6)
  make = lambda adam_spd: optax.inject_hyperparams(adam_spd, static_args=(
      "layer_axes",))(learning_rate=schedule, weight_decay=0.5, layer_axes=LAYER_AXES)
  want_p, _ = _run(make(spd_optax.adam_spd))
  got_p, _ = _run(make(experimental.adam_spd))
  for k in PARAMS:
    np.testing.assert_allclose(got_p[k], want_p[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [c for c in CASES if "fp32" in c.stem],
                         ids=lambda c: c.stem)
def test_pallas_first_pass_replays_reference(path):
  z = np.load(path)
  meta = json.loads(str(z["meta"]))
  for t, params, _, _ in _replay(z, meta, jit=True, steps=meta["steps"],
                                 optimizer=experimental.adam_spd):
    for n in meta["leaves"]:
      want = z[f"param/{t}/{n}"].astype(np.float64)
      err = (np.linalg.norm(np.asarray(params[n], np.float64) - want)
             / max(np.linalg.norm(want), 1e-30))
      assert err <= 1e-5, f"step {t} leaf {n}: relative error {err:.2e}"


def test_first_pass_moved_out_of_adam_spd():
  # The argument of the stable adam_spd it was, refused with where it went.
  for value in ("pallas", "xla"):
    with pytest.raises(TypeError, match=r"has moved.*spd_optax\.experimental\.adam_spd"):
      spd_optax.adam_spd(LR, first_pass=value)
  assert "first_pass" not in inspect.signature(spd_optax.adam_spd).parameters
  # What the kernels do not offer is refused, with where it is.
  for kw in ({"anchor_on_host": True}, {"norm": "rows_l1"}):
    with pytest.raises(TypeError, match=r"takes no .*Use spd_optax\.adam_spd"):
      experimental.adam_spd(LR, **kw)


def test_pallas_refuses_an_auto_mesh_under_plain_jit():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  params = jax.device_put({"w": jnp.ones((16, 128))}, NamedSharding(mesh, P("x")))
  tx = experimental.adam_spd(LR)
  state = jax.jit(tx.init)(params)
  with pytest.raises(ValueError, match=r"params\['w'\] is on a mesh of 8 devices with "
                     r"Auto axes.*Explicit axes.*shard_map"):
    jax.jit(tx.update)(params, state, params)


def test_pallas_on_an_explicit_mesh_runs_per_device():
  # jax.make_mesh's default (Explicit axes): the leaf's placement is in its
  # type, so each device runs the kernel on its part and the sums are added
  # over the axes that split a layer, whole leaves and stacked ones whose
  # layer axis is split too.
  mesh = jax.make_mesh((4, 2), ("d", "m"))
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
  specs = {"w": P("d", "m"), "b": P("m"), "blocks": P("d", None, "m"), "odd": P(),
           "head": P()}
  shapes = PARAMS | {"blocks": (4, 8, 128)}
  kw = dict(weight_decay=0.7, layer_axes=LAYER_AXES)
  want_p, want_s = _run(spd_optax.adam_spd(LR, **kw), shapes=shapes)
  got_p, got_s = _run(experimental.adam_spd(LR, **kw), shapes=shapes,
                      place=lambda t: jax.device_put(
                          t, {k: NamedSharding(mesh, s) for k, s in specs.items()}))
  for k in shapes:
    assert got_p[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), len(shapes[k]))
    np.testing.assert_allclose(got_p[k], want_p[k], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(got_s.per_layer, want_s.per_layer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
def test_pallas_inside_shard_map_sums_over_devices(check_vma):
  # Hand-written FSDP and layer sharding over 8 devices: each kernel sums
  # its device's part and SPD adds the sums over the axes splitting a
  # layer's elements, and gathers those of split layers.
  import test_shard_map as fsdp
  mesh = jax.make_mesh((8,), ("x",))
  make = lambda **kw: spd_optax.adam_spd(1e-2, weight_decay=fsdp.STRENGTHS,
                                         layer_axes=fsdp.LAYER_AXES, **kw)
  want = fsdp.reference(make())
  pallas = experimental.adam_spd(1e-2, weight_decay=fsdp.STRENGTHS,
                                 layer_axes=fsdp.LAYER_AXES, param_specs=fsdp.SPECS)
  got = fsdp.sharded_run(pallas, mesh, check_vma=check_vma)
  fsdp.assert_same_run(got, want)


def test_pallas_update_is_differentiable_like_xla():
  # The kernel writes over its inputs (no derivative in JAX); its derivative
  # is that of the same arithmetic, so jax.grad through steps matches XLA's.
  keys = jax.random.split(jax.random.key(0), 2)
  p0 = {"w": jax.random.normal(keys[0], (16, 128)), "s": jax.random.normal(keys[1], (2, 8, 128))}
  grads = {}
  for fp, adam_spd in (("xla", spd_optax.adam_spd), ("pallas", experimental.adam_spd)):
    tx = adam_spd(1e-1, weight_decay=0.8, layer_axes={"w": None, "s": 0})

    def loss(shift):
      p, s = p0, tx.init(p0)
      for _ in range(3):
        g = jax.tree.map(lambda x, x0: 2.0 * (x - x0) + shift * jnp.cos(x0) + 0.3, p, p0)
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
      return sum(jnp.sum(jnp.sin(x) * x0) for x, x0 in zip(jax.tree.leaves(p),
                                                           jax.tree.leaves(p0)))
    grads[fp] = jax.grad(loss)(0.7)
  assert abs(float(grads["xla"])) > 1
  np.testing.assert_allclose(grads["pallas"], grads["xla"], rtol=1e-5)
