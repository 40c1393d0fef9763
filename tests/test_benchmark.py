"""The optimizer-step benchmark runs, and its stacked sets are the same
models with their blocks stacked (timings are not tested: see NOTES.md)."""

import numpy as np
import pytest
import spd_optax

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
  assert set(r["median_ms"]) == {"optax.adamw", "optax.adam", "adam_spd unstacked", "adam_spd",
                                 "adam_spd leaf by leaf"}
  assert r["leaves"] == 3 and r["stacked_over_unstacked"] > 0
  assert set(bench.bench(shapes, reps=1, warmup=1)["median_ms"]) == {
      "optax.adamw", "optax.adam", "naive SPD", "adam_spd", "adam_spd leaf by leaf"}


@pytest.mark.parametrize("stacked", [False, True])
def test_leaf_by_leaf_is_adam_spd_in_another_order(stacked):
  # The same arithmetic, bit for bit, over steps where SPD decays: params
  # and every leaf of the state, in the state's own structure.
  import jax
  import optax
  shapes = {"embed": (16, 8), "norm": (8,)} | {
      f"layer{i}/{n}": (8, 12) for i in range(3) for n in "qk"}
  txs = bench.optimizers(shapes, stacked, lr=1e-2)
  base, ordered = txs["adam_spd"][0], txs["adam_spd leaf by leaf"][0]
  shapes = txs["adam_spd"][1]
  params = bench.random_tree(shapes, 0)
  grads = [jax.tree.map(lambda g, s=s: g + s, bench.random_tree(shapes, 1))
           for s in (-0.5, -0.5, -0.5, 0.5, 0.5)]  # away, then back: SPD fires
  out = []
  for tx in (base, ordered):
    p, state = params, tx.init(params)
    step = jax.jit(lambda p, s, g, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for g in grads:
      p, state = step(p, state, g)
    out.append((p, state))
  assert jax.tree.structure(out[0]) == jax.tree.structure(out[1])
  assert float(spd_optax.spd_stats(out[1][1])["decayed_fraction"]) > 0
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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


def test_steps_per_call_runs_the_same_steps_in_one_jit():
  import jax
  import jax.numpy as jnp
  import spd_optax
  shapes = {"w": (8, 4), "b": (4,)}
  tx = spd_optax.adam_spd(1e-2, weight_decay=1.0)
  params, grads = bench.random_tree(shapes, 0), bench.random_tree(shapes, 1)
  one, three = bench.make_step(tx), bench.make_step(tx, steps_per_call=3)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # the steps donate their inputs
  p1, s1 = copy(params), tx.init(params)
  for _ in range(3):
    p1, s1 = one(p1, s1, grads)
  p3, s3 = three(copy(params), tx.init(params), grads)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p3, s3))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bench_reports_per_step_times_with_several_steps_per_call():
  r = bench.bench({"w": (16, 8)}, reps=1, warmup=1, steps_per_call=4)
  assert r["steps_per_call"] == 4
  assert set(r["median_ms"]) == {"optax.adamw", "optax.adam", "naive SPD", "adam_spd",
                                 "adam_spd leaf by leaf"}
  assert all(v > 0 for v in r["median_ms"].values())
  assert r["ratio_to_adamw"]["optax.adamw"] == 1


def test_anchor_dtype_study_runs(capsys):
  # benchmarks/anchor_dtype.py, whose numbers docs/scaling.md quotes, on a
  # couple of short runs: the bfloat16 anchor decays at step 1, the float32
  # one does not.
  from benchmarks import anchor_dtype
  import jax.numpy as jnp
  f32, bf16 = (anchor_dtype.run(0, 3, d) for d in (None, jnp.bfloat16))
  assert f32["decayed_at_1"] == 0 and bf16["decayed_at_1"] > 0
  assert 0 < bf16["step1_pull_over_update"] < 1
