"""benchmarks/gpu_check.py, the optimizer step measured on a GPU, runs end to end
with tiny shapes on the CPU and writes every section of its JSON; its trace
summary reads GPU-shaped events (timings are not tested: see NOTES.md)."""

import json

from benchmarks import gpu_check

SECTIONS = ("median_ms", "ratio_to_adamw", "compiled", "fori_loop", "host_ms_per_call",
            "profile", "reference", "phase_s")


def test_small_run_writes_every_section(tmp_path):
  out = tmp_path / "gpu.json"
  gpu_check.main(["--small", "--sets", "vit_b16", "--json", str(out),
                  "--trace-dir", str(tmp_path / "traces")])
  r = json.loads(out.read_text())
  assert r["backend"] and r["device"] and r["small"] and r["complete"]
  assert r["copy_GBps"] > 0 and r["skipped"] == []
  s = r["sets"]["vit_b16"]
  for key in SECTIONS:
    assert key in s, key
  names = {"optax.adamw", "optax.adam", "naive SPD", "adam_spd", "adam_spd leaf by leaf"}
  assert set(s["median_ms"]) == names and s["dtype"] == "float32" and s["ratio_to_adamw"]["optax.adamw"] == 1.0
  assert s["ratio_to_adamw"]["adam_spd"] > 0
  assert s["fori_loop"]["steps_per_call"] == 3 and set(s["fori_loop"]["median_ms"]) == names
  for name in names:
    p = s["profile"][name]
    assert p["device_events"] > 0 or "no device events" in p["note"], p
  summary = r["profile_summary"]["vit_b16"]
  assert set(summary) == names and all("device_events" in v for v in summary.values())
  errors = s["reference"]["errors"]
  assert set(errors) == names
  spd = errors["adam_spd"]
  assert spd["params"] < 1e-5 and spd["update"] < 1e-5 and spd["state"] < 1e-5, spd
  assert spd["finite"] and spd["decayed_fraction"] > 0  # SPD acted in the checked steps
  assert spd["reference"] == "cpu float64"
  assert errors["adam_spd leaf by leaf"]["params"] == spd["params"]  # the same arithmetic


def test_bf16_group_and_leaf_size_sweep(tmp_path):
  out = tmp_path / "gpu.json"
  gpu_check.main(["--small", "--sets", "llama_1b_bf16", "leaf_sizes", "--json", str(out)])
  r = json.loads(out.read_text())
  assert r["complete"] and set(r["sets"]) == {"llama_1b_bf16", "leaf_sizes"}
  bf16 = r["sets"]["llama_1b_bf16"]
  assert bf16["dtype"] == "bfloat16" and "reference" not in bf16  # float32 checks the arithmetic
  assert bf16["ratio_to_adamw"]["adam_spd"] > 0 and "fori_loop" in bf16
  sweep = r["sets"]["leaf_sizes"]["sizes"]
  assert list(sweep) == [f"2^{k}" for k in gpu_check.SMALL_LEAF_SIZE_LOG2]
  for k, v in zip(gpu_check.SMALL_LEAF_SIZE_LOG2, sweep.values()):
    assert v["leaf_bytes"] == 4 * 2 ** k
    assert v["leaves"] == 2 ** max(gpu_check.SMALL_LEAF_SIZES_TOTAL_LOG2 - k, 0)
    assert set(v["profile"]) == set(v["median_ms"]) >= {"optax.adamw", "adam_spd leaf by leaf"}
  assert set(r["profile_summary"]["leaf_sizes"]) == set(sweep)


def test_optional_optimizers_are_left_out_where_memory_is_short():
  shapes = {"w": (1024, 1024)}  # 4 MiB per tree
  log = lambda *lines: None
  assert gpu_check.runs_that_fit(shapes, False, gpu_check.jnp.float32, log,
                                 limit=2**40) == list(gpu_check.ostep.optimizers(shapes, False))
  # adamw 3 trees, adam 3, adam_spd 4, grads 1 (44 MiB) fit; naive SPD's 4 more do not.
  names = gpu_check.runs_that_fit(shapes, False, gpu_check.jnp.float32, log,
                                  limit=int(50 * 2**20 / 0.85))
  assert names == ["optax.adamw", "optax.adam", "adam_spd"]


def test_budget_skips_groups_and_still_writes(tmp_path):
  out = tmp_path / "gpu.json"
  gpu_check.main(["--small", "--budget-s", "0", "--json", str(out)])
  r = json.loads(out.read_text())
  assert r["skipped"] == gpu_check.ORDER and r["sets"] == {} and not r["complete"]


def test_a_failing_group_keeps_what_it_measured(tmp_path, monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise MemoryError("RESOURCE_EXHAUSTED (simulated)")
  monkeypatch.setattr(gpu_check, "reference_errors", lambda *a, **k: {"errors": {}})
  monkeypatch.setattr(gpu_check.ostep, "setup_runs", out_of_memory)
  out = tmp_path / "gpu.json"
  gpu_check.main(["--small", "--sets", "llama_1b", "--json", str(out)])
  r = json.loads(out.read_text())
  s = r["sets"]["llama_1b"]
  assert "RESOURCE_EXHAUSTED" in s["error"] and s["reference"] == {"errors": {}}
  assert "reference" in s["phase_s"] and not r["complete"]


def test_trace_summary_of_gpu_shaped_events():
  ms = 1e6  # ns
  events = [("/host:CPU", "python", "gpu_check adam_spd", 0.0, 10 * ms),
            ("/device:GPU:0", "Stream #13(Compute)", "loop_fusion", 1 * ms, 2 * ms),
            ("/device:GPU:0", "Stream #13(Compute)", "input_reduce_fusion", 3.5 * ms, 1 * ms),
            ("/device:GPU:0", "Stream #13(Compute)", "loop_fusion", 4.5 * ms, 2 * ms),
            ("/device:GPU:0", "XLA Ops", "loop_fusion", 1 * ms, 2 * ms)]  # derived: not counted
  p = gpu_check.summarize_trace(events, "gpu_check adam_spd", wall_ms=10.0)
  assert p["device_events"] == 3 and p["distinct_kernels"] == 2
  assert abs(p["busy_us"] - 5000) < 1e-6 and abs(p["span_us"] - 5500) < 1e-6
  assert p["gaps"]["count"] == 1 and abs(p["gaps"]["max_us"] - 500) < 1e-6
  assert p["top_kernels"][0]["name"] == "loop_fusion" and p["top_kernels"][0]["count"] == 2
  assert abs(p["host"]["before_first_kernel_us"] - 1000) < 1e-6
  assert abs(p["host"]["after_last_kernel_us"] - 3500) < 1e-6
  # Bytes per kernel (from the compiled step's HLO, named as XLA:GPU names
  # kernels): 1 us per kernel + 1 GB/s fits these exactly.
  kernels = [("/device:GPU:0", "Stream #13(Compute)", f"loop_fusion.{i}", 10.0 * ms * i,
              1e3 * (1 + b / 1e3)) for i, b in enumerate((1e3, 4e3, 2e3, 8e3))]
  nbytes = {f"loop_fusion_{i}": b for i, b in enumerate((1e3, 4e3, 2e3, 8e3))}
  fit = gpu_check.summarize_trace(events[:1] + kernels, "gpu_check adam_spd", 10.0,
                                  nbytes=nbytes)["bytes_or_kernels"]
  assert fit["kernels_with_bytes"] == 4 and abs(fit["us_per_kernel"] - 1) < 1e-9
  assert abs(fit["fit_GBps"] - 1) < 1e-9 and abs(fit["r2"] - 1) < 1e-9
  assert abs(fit["share_per_kernel"] - 4 / 19) < 1e-9 and abs(fit["share_bytes"] - 15 / 19) < 1e-9
  assert fit["by_kind"]["loop_fusion"]["count"] == 4 and fit["named_by"] == "kernels"
  # Where the trace has the derived "XLA Ops" line, its HLO names are used.
  ops = [("/device:GPU:0", "XLA Ops", n.replace("loop_fusion", "%loop_fusion"), *rest)
         for _, _, n, *rest in kernels]
  renamed = [(p, l, f"kernel_{i}", *rest) for i, (p, l, _, *rest) in enumerate(kernels)]
  fit = gpu_check.summarize_trace(events[:1] + renamed + ops, "gpu_check adam_spd", 10.0,
                                  nbytes=nbytes)["bytes_or_kernels"]
  assert fit["named_by"] == "XLA Ops" and fit["kernels_with_bytes"] == 4
  assert abs(fit["us_per_kernel"] - 1) < 1e-9
  none = gpu_check.summarize_trace(events[:1], "gpu_check adam_spd", wall_ms=10.0)
  assert none["device_events"] == 0 and "no device events" in none["note"]


def test_kernel_bytes_reads_a_compiled_step():
  import jax.numpy as jnp
  import spd_optax
  tx = spd_optax.adam_spd(1e-3)
  params = {"w": jnp.ones((64, 32))}
  step = gpu_check.ostep.make_step(tx).lower(params, tx.init(params), params).compile()
  nbytes = gpu_check.kernel_bytes(step.as_text())
  assert nbytes and all("." not in k for k in nbytes)
  # The update's last pass reads and writes at least the params.
  assert max(nbytes.values()) >= 2 * 64 * 32 * 4


def test_unreadable_trace_dir_gives_no_events(tmp_path):
  (tmp_path / "x.xplane.pb").write_bytes(b"not a proto")
  events, source, errors = gpu_check.read_trace(tmp_path)
  assert events == [] and source is None and errors
