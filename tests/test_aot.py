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
  # fusions besides: 1 here for the six one-layer leaves (scalars), 3 for
  # each of the three stacked leaves ([L] arrays). Computing the stacked
  # leaves' values together took 6, which at full depth (LLaMA-1B, 16
  # blocks stacked) changed XLA:TPU's estimate of the step by 0.17%
  # (benchmarks/results/redesign). Fewer is better.
  assert r["large_fusions_per_leaf"] <= 2, r["kernels"]
  small = r["kernels"].get("small fusion", 0)
  assert small <= (1 if layout == "unstacked" else 9), r["kernels"]
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


@pytest.mark.parametrize("layout", ["unstacked", "stacked", "llama_1b_x16_stacked",
                                    "llama_1b_x16_stacked explicit"])
def test_host_anchor_lowers_the_device_peak(v5e, layout):
  # Also at full depth: LLaMA-1B's 16 blocks stacked, where moving each
  # stacked leaf's anchor in whole saved 74 of its 772 MiB per device; and
  # there on a mesh of Explicit axes, where the layers' device buffer is
  # typed (a buffer made like the host anchor was filled on the host).
  if layout.endswith(" explicit"):
    from jax.sharding import AxisType, Mesh
    layout = layout.removesuffix(" explicit")
    v5e = aot.Target("v5e:2x2 explicit", Mesh(v5e.mesh.devices, v5e.mesh.axis_names,
                                               axis_types=(AxisType.Explicit,) * 2), "tpu")
  shapes, layer_axes = sets()[layout] if layout in sets() else aot.set_shapes(layout)
  on_device = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes), shapes,
                          layer_axes, v5e, jnp.float32)
  on_host = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes, anchor_on_host=True),
                        shapes, layer_axes, v5e, jnp.float32, host_anchor=True)
  anchor = on_host["host_argument_bytes"]  # per device, all of it on the host
  assert anchor > 0
  # XLA:TPU's peak counts the pinned_host anchor too: without it, the step
  # holds at least half an anchor less device memory than with the anchor
  # on the device (only a leaf's, or a layer's, anchor is moved in at once).
  assert on_host["peak_bytes"] == on_host["device_peak_bytes"] + anchor
  assert on_host["device_peak_bytes"] < on_device["peak_bytes"] - anchor / 2
  assert on_host["param_sized_copies"] == 0, on_host["kernels"]


@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
def test_in_shard_map_the_step_is_still_two_passes(v5e, layout):
  # Hand-written FSDP×TP: inside shard_map each device runs both passes on
  # its part, SPD's sums added over the axes splitting each leaf. The same
  # 12 words and no copies as under jit.
  shapes, layer_axes = sets()[layout]
  specs = aot.param_specs(shapes, layer_axes, v5e)
  tx = spd_optax.adam_spd(1e-3, layer_axes=layer_axes, param_specs=specs)
  r = aot.analyse(tx, shapes, layer_axes, v5e, jnp.float32, in_shard_map=True)
  assert r["large_fusions_per_leaf"] <= 2, r["kernels"]
  assert r["param_sized_copies"] == 0, r["kernels"]
  assert r["words_per_param"] < 12.1


def test_on_an_explicit_mesh_the_step_is_still_two_passes(v5e):
  # jax.make_mesh's default axis type: the per-layer values are resharded to
  # replicated at each step, which must not copy a leaf.
  from jax.sharding import AxisType, Mesh
  explicit = aot.Target("v5e:2x2 explicit", Mesh(v5e.mesh.devices, v5e.mesh.axis_names,
                                                  axis_types=(AxisType.Explicit,) * 2), "tpu")
  shapes, layer_axes = sets()["stacked"]
  r = aot.analyse(spd_optax.adam_spd(1e-3, layer_axes=layer_axes), shapes, layer_axes,
                  explicit, jnp.float32)
  assert r["param_sized_copies"] == 0 and r["words_per_param"] < 12.1, r["kernels"]


def test_leaf_order_reads_which_leaf_each_kernel_works_on():
  # An entry computation whose parameters name their leaves in metadata, as
  # jax's lowering names them: leaf a's two kernels, then b's, then a third
  # of a's, reading a's first kernel's output; a scalar fusion is not a kernel.
  param = lambda n, i, path: (f'  %{n} = f32[128]{{0}} parameter({i}), '
                              f'metadata={{op_name="{path}"}}')
  text = "\n".join([
      "HloModule step", "", "ENTRY %main (p0: f32[128], p1: f32[128], p2: f32[128]) -> f32[128] {",
      param("p0", 0, "params[\\'a\\']"), param("g0", 1, "grads[\\'a\\']"),
      param("p1", 2, "state.inner_state[0].mu[\\'b\\']"),
      "  %c = s32[] parameter(3), metadata={op_name=\"state.count\"}",
      "  %f1 = f32[128]{0} fusion(%p0, %g0, %c), kind=kLoop, calls=%x",
      "  %f2 = f32[128]{0} fusion(%p1), kind=kLoop, calls=%x",
      "  %s = f32[] fusion(%c), kind=kLoop, calls=%x",
      "  %f3 = f32[128]{0} fusion(%f1, %s), kind=kLoop, calls=%x",
      "  ROOT %t = (f32[128]{0}, f32[128]{0}) tuple(%f2, %f3)", "}", ""])
  order = aot.leaf_order(text)
  assert order == {"leaves_back_to_back": 0.5, "mean_kernels_first_to_last": 1.0,
                   "max_kernels_first_to_last": 2}
  # Reordered so that each leaf's kernels are together.
  swapped = text.replace("  %f2 = f32[128]{0} fusion(%p1), kind=kLoop, calls=%x\n", "")
  swapped = swapped.replace("  ROOT", "  %f2 = f32[128]{0} fusion(%p1), kind=kLoop, calls=%x\n  ROOT")
  assert aot.leaf_order(swapped)["leaves_back_to_back"] == 1.0
