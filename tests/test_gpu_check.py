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
  names = {"optax.adamw", "optax.adam", "naive SPD", "adam_spd"}
  assert set(s["median_ms"]) == names and s["ratio_to_adamw"]["optax.adamw"] == 1.0
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
  none = gpu_check.summarize_trace(events[:1], "gpu_check adam_spd", wall_ms=10.0)
  assert none["device_events"] == 0 and "no device events" in none["note"]


def test_unreadable_trace_dir_gives_no_events(tmp_path):
  (tmp_path / "x.xplane.pb").write_bytes(b"not a proto")
  events, source, errors = gpu_check.read_trace(tmp_path)
  assert events == [] and source is None and errors
