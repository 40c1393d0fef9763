"""The optimizer-step benchmark runs, and its stacked sets are the same
models with their blocks stacked (timings are not tested: see NOTES.md)."""

import numpy as np

from benchmarks import optimizer_step as bench


def test_stack_blocks_keeps_every_parameter():
  shapes = bench.vit_b16_shapes()
  stacked, layer_axes = bench.stack_blocks(shapes)
  assert stacked["blocks/qkv/w"] == (12, 768, 3 * 768)
  assert layer_axes["blocks/qkv/w"] == 0 and layer_axes["head/w"] is None
  count = lambda s: sum(int(np.prod(v)) for v in s.values())
  assert count(stacked) == count(shapes)
  assert len(stacked) == 8 + 12  # 8 unstacked leaves, 12 weights per block


def test_bench_runs_on_a_tiny_stacked_model():
  shapes = {"embed": (16, 8)} | {f"layer{i}/{n}": (8, 8) for i in range(3) for n in "qk"}
  r = bench.bench(shapes, reps=2, stacked=True, warmup=1)
  assert set(r["median_ms"]) == {"optax.adamw", "optax.adam", "adam_spd unstacked", "adam_spd"}
  assert r["leaves"] == 3 and r["stacked_over_unstacked"] > 0
  assert set(bench.bench(shapes, reps=1, warmup=1)["median_ms"]) == {
      "optax.adamw", "optax.adam", "naive SPD", "adam_spd"}


def test_bench_records_xla_words_and_fusions_in_bfloat16():
  import jax.numpy as jnp
  shapes = {"w": (64, 32), "b": (32,)}
  r = bench.bench(shapes, reps=1, warmup=1, dtype=jnp.bfloat16)
  stats = r["compiled"]
  assert set(stats) == set(r["median_ms"])
  for name, s in stats.items():
    assert sum(s["fusions"].values()) > 0, name
    assert s["words_per_param"] > 0, name
  # SPD reads the anchor and its own sums on top of Adam's traffic.
  assert stats["adam_spd"]["words_per_param"] > stats["optax.adamw"]["words_per_param"]
