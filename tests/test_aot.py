"""Compile-only structure of the adam_spd step on an XLA:TPU target
(benchmarks/aot.py): deterministic compiler counts, not timings. Skipped
where libtpu is not installed (the aot extra: pip install -e ".[aot]";
.ci/run installs it and runs this file after the suite)."""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu", reason="compile-only XLA:TPU checks need libtpu: pip install -e '.[aot]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import spd_optax  # noqa: E402
from benchmarks import aot, optimizer_step  # noqa: E402

# Two small blocks, sharded FSDP×TP on a v5e:2x2 slice.
BLOCKS = {f"layer{i}/{n}": s for i in range(2)
          for n, s in {"w": (512, 1024), "v": (1024, 512), "norm": (1024,)}.items()}


@pytest.fixture(scope="module", autouse=True)
def no_compilation_cache():
  # An executable compiled for a topology without a client cannot be read back
  # from the tests' compilation cache (tests/conftest.py): jax warns and
  # compiles again. Off while this module runs.
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", was)


@pytest.fixture(scope="module")
def v5e():
  return aot.tpu_target("v5e:2x2", (2, 2))


def sets():
  stacked, layer_axes = optimizer_step.stack_blocks(BLOCKS)
  return {"unstacked": (BLOCKS, None), "stacked": (stacked, layer_axes)}


@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
def test_adam_spd_is_two_passes_without_copies(v5e, layout):
  shapes, layer_axes = sets()[layout]
  r = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes), shapes,
                  layer_axes, v5e, jnp.float32)
  # Two passes over the leaf's data. The per-layer values take a few small
  # fusions besides: 1 here for the six one-layer leaves (scalars, computed
  # per leaf), 6 for the three stacked leaves, whose values are computed
  # together (13 when each stacked leaf computed its own;
  # benchmarks/NOTES.md). Fewer is better.
  assert r["large_fusions_per_leaf"] <= 2, r["kernels"]
  small = r["kernels"].get("small fusion", 0)
  assert small <= (1 if layout == "unstacked" else 6), r["kernels"]
  assert r["param_sized_copies"] == 0, r["kernels"]
  # Pass 1 reads g, θ, θ_0, m, v and writes m, v; pass 2 reads θ, θ_0, m, v
  # (or u) and writes θ: 12 words, the floor for an update that
  # optax.apply_updates adds to θ (plus the per-layer scalars: < 0.1).
  assert r["words_per_param"] < 12.1


def test_arrays_in_and_out_are_the_steps_own(v5e):
  tx = spd_optax.adam_spd(1e-3)
  r = aot.analyse(tx, BLOCKS, None, v5e, jnp.float32)
  state = jax.eval_shape(tx.init, {k: jax.ShapeDtypeStruct(s, jnp.float32)
                                   for k, s in BLOCKS.items()})
  assert r["state_arrays"] == len(jax.tree.leaves(state))
  n = len(BLOCKS)
  # Out: the params and the whole state (a donated anchor goes out as its
  # own aliased buffer); nothing else.
  assert r["arrays_out"] == n + r["state_arrays"]
  # In: params, grads and the state, less inputs the step never reads.
  assert r["arrays_in"] <= 2 * n + r["state_arrays"]


@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
def test_host_anchor_lowers_the_device_peak(v5e, layout):
  shapes, layer_axes = sets()[layout]
  on_device = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes), shapes,
                          layer_axes, v5e, jnp.float32)
  on_host = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes, anchor_on_host=True),
                        shapes, layer_axes, v5e, jnp.float32, host_anchor=True)
  anchor = on_host["host_argument_bytes"]  # per device, all of it on the host
  assert anchor > 0
  # XLA:TPU's peak counts the pinned_host anchor too: without it, the step
  # holds at least half an anchor less device memory than with the anchor
  # on the device (leaf by leaf, only a few leaves' anchors are moved in).
  assert on_host["peak_bytes"] == on_host["device_peak_bytes"] + anchor
  assert on_host["device_peak_bytes"] < on_device["peak_bytes"] - anchor / 2


@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
def test_pallas_first_pass_compiles_for_tpu_in_place(v5e, layout):
  # Mosaic lowers the kernel for XLA:TPU; inside shard_map (hand-written
  # FSDP×TP, sums added over both axes) each device runs it on its part.
  # The new moments overwrite the donated old ones: no copies, 12 words.
  shapes, layer_axes = sets()[layout]
  specs = aot.param_specs(shapes, layer_axes, v5e)
  tx = spd_optax.experimental.adam_spd(1e-3, layer_axes=layer_axes, param_specs=specs)
  r = aot.analyse(tx, shapes, layer_axes, v5e, jnp.float32, in_shard_map=True)
  # One kernel per matrix (a norm's part per device is not a TPU tile: XLA's).
  matrices = sum(len(s) - (layer_axes is not None and layer_axes[k] is not None) == 2
                 for k, s in shapes.items())
  assert r["kernels"].get("custom-call", 0) == matrices > 0, r["kernels"]
  assert r["kernels_without_estimate"] == r["kernels"]["custom-call"]
  assert r["param_sized_copies"] == 0, r["kernels"]
  assert r["words_per_param"] < 12.1
  xla = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes,
                                       param_specs=specs),
                    shapes, layer_axes, v5e, jnp.float32, in_shard_map=True)
  assert r["arrays_in"] == xla["arrays_in"] and r["arrays_out"] == xla["arrays_out"]


def test_pallas_first_pass_compiles_for_tpu_on_an_explicit_mesh(v5e):
  # Under a plain jit on a mesh with Explicit axes (jax.make_mesh's default)
  # the step runs each leaf's kernel per device itself.
  from jax.sharding import AxisType, Mesh
  explicit = aot.Target("v5e:2x2 explicit", Mesh(v5e.mesh.devices, v5e.mesh.axis_names,
                                                  axis_types=(AxisType.Explicit,) * 2), "tpu")
  shapes, layer_axes = sets()["stacked"]
  tx = spd_optax.experimental.adam_spd(1e-3, layer_axes=layer_axes)
  r = aot.analyse(tx, shapes, layer_axes, explicit, jnp.float32)
  assert r["kernels"].get("custom-call", 0) == 2, r["kernels"]  # the two matrices
  assert r["param_sized_copies"] == 0 and r["words_per_param"] < 12.1, r["kernels"]
