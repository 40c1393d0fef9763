"""The optimizer step on a GPU, measured in one process, group by group.

  python -m benchmarks.gpu_check                        # all sets, JSON to benchmarks/results/gpu.json
  python -m benchmarks.gpu_check --budget-s 400         # start no group after ~400 s
  python -m benchmarks.gpu_check --small --json /tmp/g.json   # tiny shapes: the CPU check

It reuses `benchmarks/optimizer_step.py` (its shape sets, optimizers, steps
and timing loop) and, in one process:

1. measures the device's copy bandwidth (a plain `x + 1`, read + write);
2. for each group (`GROUPS`: vit_b16, llama_1b, vit_b16_stacked,
   llama_1b_stacked in float32, llama_1b with bfloat16 params; each freed
   before the next, so each fits the device's memory):
   - checks each optimizer's float32 steps on the device against the same
     steps evaluated on the CPU in float64, from the same inputs, on the
     set's leaves outside its blocks and those of its first two blocks, every
     dimension capped (`--check-cap`): relative errors of the params, of
     their change and of the optimizer state;
   - times optax.adamw, optax.adam, naive SPD (unstacked sets) or adam_spd
     unstacked (stacked sets), adam_spd and adam_spd leaf by leaf (its
     arithmetic, each leaf's two passes back to back:
     `optimizer_step.leaf_by_leaf`; with naive SPD, left out where the
     device's memory cannot hold them all), alternating them: one jitted,
     donated step per call, then K steps in one jit (`lax.fori_loop`) on the
     same buffers; per-step medians and ratios to optax.adamw of this run;
   - records a `jax.profiler` trace of one (K = 1) step of each optimizer
     and parses it here: kernels by name and time, device busy time against
     the span, the gaps between kernels and the host time around them, and
     a fit of each kernel's time to a cost per kernel plus its bytes (from
     the compiled step's HLO), which says which of the two the step's time
     follows. If a trace holds no device events (on CPU, say), the summary
     says so;
3. the sweep of leaf sizes (group leaf_sizes): the same optimizers on sets
   of equal leaves from 256 KiB to 512 MiB, timed and profiled per size;
4. writes the JSON after each group (`complete` false until the end), so a
   run cut short still leaves what it measured, and stops starting groups
   when `--budget-s` runs low.

The JSON keeps optimizer_step.py's format (`device`, `backend`,
`copy_GBps`, `sets.<name>.median_ms`, `.ratio_to_adamw`, `.compiled`,
`.stacked_over_unstacked`) and adds, per set, `fori_loop` (the K-step
timings), `host_ms_per_call`, `profile` and `reference`. Every printed line
starts with the device it ran on.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

# The 1.35B sets hold up to 16 parameter-sized trees (NOTES.md, 2026-11-25).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is not a package path
  sys.path.insert(0, str(REPO))

from benchmarks import optimizer_step as ostep  # noqa: E402
import spd_optax  # noqa: E402

# name -> (shape set, dtype of params, gradients and state). The two targets
# first (llama_1b <= 1.3x, vit_b16 <= 1.5x adamw), then the stacked sets (no
# slower than unstacked), bf16 params, and the sweep of leaf sizes, so a
# short budget drops the last.
GROUPS = {"vit_b16": ("vit_b16", "float32"), "llama_1b": ("llama_1b", "float32"),
          "vit_b16_stacked": ("vit_b16_stacked", "float32"),
          "llama_1b_stacked": ("llama_1b_stacked", "float32"),
          "llama_1b_bf16": ("llama_1b", "bfloat16"), "leaf_sizes": (None, "float32")}
ORDER = list(GROUPS)
# The sweep: leaves of 2^k float32 elements (256 KiB to 512 MiB), 2^25
# elements (128 MiB per array) in all, or one leaf where it is larger, in
# square-ish matrices. Whether SPD's second pass over a leaf is cheaper once
# the leaf's arrays fit the L2 cache (50 MiB on an H100 or H200) is read off
# its ratio to AdamW and its kernels' effective bandwidth against the leaf
# size. The 512 MiB leaf is past the size (about 95M elements) from which
# XLA:GPU writes θ - θ_0 out instead of fusing it into the first pass:
# 14 words per parameter by its count, against 12 below.
LEAF_SIZE_LOG2 = (16, 18, 20, 22, 24, 27)
LEAF_SIZES_TOTAL_LOG2 = 25


def small_vit_shapes():
  """ViT-shaped, tiny (few leaves, so that compiling stays cheap on a CPU):
  vit_b16's names, 2 blocks of width 8."""
  d = 8
  shapes = {"patch/w": (4, 4, 3, d), "head/w": (d, 10), "head/b": (10,)}
  for i in range(2):
    shapes |= {f"block{i}/ln1/w": (d,), f"block{i}/qkv/w": (d, 3 * d),
               f"block{i}/fc1/w": (d, 2 * d)}
  return shapes


def small_llama_shapes():
  """LLaMA-shaped, tiny: llama_1b's names, 2 layers of width 8."""
  d = 8
  shapes = {"embed": (64, d), "lm_head": (d, 64)}
  for i in range(2):
    shapes |= {f"layer{i}/q": (d, d), f"layer{i}/gate": (d, 3 * d),
               f"layer{i}/attn_norm": (d,)}
  return shapes


SMALL_SETS = {"vit_b16": small_vit_shapes, "vit_b16_stacked": small_vit_shapes,
              "llama_1b": small_llama_shapes, "llama_1b_stacked": small_llama_shapes}
SMALL_LEAF_SIZE_LOG2, SMALL_LEAF_SIZES_TOTAL_LOG2 = (8, 10, 13), 12


def leaf_size_shapes(log2, total_log2):
  """2^(total_log2 - log2) leaves of 2^log2 elements each (at least one), as
  matrices."""
  rows = 2 ** (log2 // 2)
  return {f"leaf{i:04d}": (rows, 2 ** log2 // rows)
          for i in range(2 ** max(total_log2 - log2, 0))}


class Log:
  """Prints every line prefixed with the device it ran on."""

  def __init__(self):
    d = jax.devices()[0]
    self.tag = f"[{d.device_kind} ({jax.default_backend()})]"

  def __call__(self, *lines):
    for text in lines:
      for line in str(text).splitlines() or [""]:
        print(f"{self.tag} {line}", flush=True)


# --- reference check -----------------------------------------------------------

def check_shapes(shapes, cap, layers=2):
  """The set's leaves outside the blocks and those of its first `layers`
  blocks (so a stacked set still stacks), every dimension at most cap: the
  same kinds of leaf as the timed set, at a fraction of the compile time
  and of the float64 reference's cost."""
  keep = {}
  for k, s in shapes.items():
    m = re.fullmatch(r"(?:block|layer)(\d+)/.+", k)
    if m is None or int(m[1]) < layers:
      keep[k] = tuple(min(d, cap) for d in s)
  return keep


def _check_grads(shapes, steps, seed):
  """Gradients that push one way, then, for the last two steps, the other:
  Adam's momentum still moves the params away from the anchor while the
  gradient points back, so SPD's condition fires and it decays (as in
  tests/test_sharding.py)."""
  rng = np.random.default_rng(seed)
  return [{k: (0.3 * rng.standard_normal(s) + (-0.5 if t < steps - 2 else 0.5))
           .astype(np.float32) for k, s in shapes.items()} for t in range(steps)]


def _rel(a, b):
  """||a - b|| / ||b|| over whole trees, in float64 on the host."""
  a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
  num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
  den = sum(float(np.sum(y ** 2)) for y in b)
  return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _run_steps(tx, params, grads, put):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  params = put(params)
  state = jax.jit(tx.init)(params)
  step = jax.jit(step)
  for g in grads:
    params, state = step(params, state, put(g))
  return jax.device_get(params), jax.device_get(state), state


def reference_errors(shapes, stacked, steps=6, lr=1e-3, seed=0):
  """Each optimizer's `steps` steps in float32 on the default device against
  the same steps in float64 on the CPU. Errors are ||out - ref|| / ||ref||:
  `params`, `update` (params minus their start: the part the optimizer
  computes, where float32 rounding of the params shows most), `state` (every
  float leaf of the optimizer state)."""
  out = {}
  cpu = jax.devices("cpu")[0]
  dev = jax.devices()[0]
  for name, (tx, tx_shapes) in ostep.optimizers(shapes, stacked, lr=lr).items():
    rng = np.random.default_rng(seed)
    p0 = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in tx_shapes.items()}
    grads = _check_grads(tx_shapes, steps, seed + 1)
    try:
      p32, s32, live = _run_steps(tx, p0, grads, lambda t: jax.device_put(t, dev))
      try:
        decayed = float(spd_optax.spd_stats(live)["decayed_fraction"])
      except Exception:  # noqa: BLE001 - not an adam_spd state
        decayed = None
      ref_kind = "cpu float64"
      try:
        with jax.enable_x64(True):
          tx64 = ostep.optimizers(shapes, stacked, lr=lr)[name][0]
          up = lambda t: jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float64), t), cpu)
          p64, s64, _ = _run_steps(tx64, p0, grads, up)
      except Exception as e:  # noqa: BLE001 - fall back to the CPU in float32
        ref_kind = f"cpu float32 (float64 failed: {type(e).__name__}: {e})"[:300]
        p64, s64, _ = _run_steps(tx, p0, grads, lambda t: jax.device_put(t, cpu))
      floats = lambda s: [x for x in jax.tree.leaves(s)
                          if np.issubdtype(np.asarray(x).dtype, np.floating)]
      delta = lambda p: {k: np.asarray(v, np.float64) - p0[k] for k, v in p.items()}
      out[name] = {"params": _rel(p32, p64), "update": _rel(delta(p32), delta(p64)),
                   "state": _rel(floats(s32), floats(s64)),
                   "finite": bool(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p32))),
                   "decayed_fraction": decayed, "reference": ref_kind}
    except Exception as e:  # noqa: BLE001 - record it, keep the run going
      out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
  return {"steps": steps, "lr": lr, "dtype": "float32", "leaves": len(shapes),
          "params": sum(int(np.prod(s)) for s in shapes.values()), "errors": out}


# --- profile -------------------------------------------------------------------

def _intervals_union(iv):
  iv = sorted(iv)
  merged = []
  for s, e in iv:
    if merged and s <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], e)
    else:
      merged.append([s, e])
  return merged


def _events_from_xplane(path):
  """(plane name, line name, event name, start ns, duration ns) of every event
  in an .xplane.pb, read with jax's own ProfileData (no TensorFlow needed)."""
  from jax.profiler import ProfileData  # jax >= 0.4.30
  data = ProfileData.from_file(str(path))
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        yield plane.name, line.name, ev.name, float(ev.start_ns), float(ev.duration_ns)


def _events_from_trace_json(path):
  """The same from a Chrome-format .trace.json.gz (pids and tids named by
  metadata events), for a jax whose ProfileData is missing."""
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data.get("traceEvents", data if isinstance(data, list) else [])
  pids, tids = {}, {}
  for ev in events:
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      pids[ev.get("pid")] = ev.get("args", {}).get("name", "")
    elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
      tids[(ev.get("pid"), ev.get("tid"))] = ev.get("args", {}).get("name", "")
  for ev in events:
    if ev.get("ph") == "X":
      yield (pids.get(ev.get("pid"), str(ev.get("pid"))),
             tids.get((ev.get("pid"), ev.get("tid")), str(ev.get("tid"))),
             ev.get("name", ""), 1e3 * float(ev.get("ts", 0)), 1e3 * float(ev.get("dur", 0)))


def read_trace(log_dir):
  """All events of the newest trace under log_dir, and which file gave them."""
  errors = []
  for pattern, reader in (("**/*.xplane.pb", _events_from_xplane),
                          ("**/*.trace.json.gz", _events_from_trace_json)):
    files = sorted(glob.glob(os.path.join(str(log_dir), pattern), recursive=True),
                   key=os.path.getmtime)
    if not files:
      continue
    try:
      return list(reader(files[-1])), os.path.basename(files[-1]), errors
    except Exception as e:  # noqa: BLE001 - try the other format
      errors.append(f"{os.path.basename(files[-1])}: {type(e).__name__}: {e}"[:300])
  return [], None, errors


def is_device_event(plane, line, name):
  """Kernels and copies on a device's streams: XLA:GPU's planes are
  '/device:GPU:N' with lines 'Stream #K(...)'; a TPU's are '/device:TPU:N'.
  The derived lines ('XLA Modules', 'XLA Ops', 'Steps') only repeat them."""
  if not plane.startswith("/device:") or "CPU" in plane:
    return False
  return not any(line.startswith(d) for d in ("XLA Modules", "XLA Ops", "Steps",
                                               "XLA TraceMe", "Framework"))


def summarize_trace(events, annotation, wall_ms, top=12, nbytes=None):
  """Kernel names and times, busy time against the span, gaps between
  kernels, and the host time before the first and after the last kernel
  inside the step's annotation."""
  planes = sorted({p for p, *_ in events})
  dev = [(p, l, n, s, d) for p, l, n, s, d in events if is_device_event(p, l, n)]
  host = [(s, d) for p, l, n, s, d in events if n == annotation and not p.startswith("/device:")]
  out = {"wall_ms": wall_ms, "planes": planes, "device_events": len(dev)}
  if not dev:
    out["note"] = ("no device events found in the trace"
                   + (" (CPU backend: XLA:CPU runs on host threads)"
                      if jax.default_backend() == "cpu" else ""))
    # What the host threads did, for a CPU run: the largest named events.
    by = collections.defaultdict(float)
    for p, l, n, s, d in events:
      if not l.startswith("python") and d > 0:
        by[n] += d
    out["host_top"] = [{"name": n[:120], "us": v / 1e3}
                       for n, v in sorted(by.items(), key=lambda kv: -kv[1])[:top]]
    return out
  iv = [(s, s + d) for *_, s, d in dev]
  merged = _intervals_union(iv)
  start, end = merged[0][0], max(e for _, e in merged)
  busy = sum(e - s for s, e in merged)
  gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
  by = collections.defaultdict(lambda: [0, 0.0])
  for _, _, n, _, d in dev:
    by[n][0] += 1
    by[n][1] += d
  kernels = sorted(by.items(), key=lambda kv: -kv[1][1])
  out |= {"streams": sorted({f"{p} {l}" for p, l, *_ in dev}),
          "kernel_launches": len(dev), "distinct_kernels": len(by),
          "busy_us": busy / 1e3, "span_us": (end - start) / 1e3,
          "busy_over_span": busy / (end - start) if end > start else None,
          "gaps": {"count": len(gaps), "total_us": sum(gaps) / 1e3,
                   "max_us": max(gaps, default=0) / 1e3,
                   "over_5us": sum(g > 5e3 for g in gaps),
                   "median_us": float(np.median(gaps)) / 1e3 if gaps else 0.0},
          "top_kernels": [{"name": n[:160], "count": c, "us": t / 1e3,
                           "share_of_busy": t / busy if busy else None}
                          for n, (c, t) in kernels[:top]]}
  if nbytes:
    # The derived "XLA Ops" line names each op as the HLO does; the kernels'
    # own names are the fusions' sanitized. Either is joined to the bytes.
    ops = [(n, d) for p, l, n, _, d in events
           if p.startswith("/device:") and "CPU" not in p and l.startswith("XLA Ops")]
    out["bytes_or_kernels"] = bytes_or_kernels(
        [(re.sub(r"\W", "_", n.lstrip("%")), d) for n, d in ops
         or [(n, d) for _, _, n, _, d in dev]], nbytes)
    out["bytes_or_kernels"]["named_by"] = "XLA Ops" if ops else "kernels"
  if host:
    hs, hd = host[0]
    out["host"] = {"annotation_us": hd / 1e3,
                   "before_first_kernel_us": (start - hs) / 1e3,
                   "after_last_kernel_us": (hs + hd - end) / 1e3}
  return out


def kernel_bytes(hlo_text):
  """Bytes each fusion of a compiled step's entry computation reads and
  writes (its distinct operands and its outputs), by the name XLA:GPU gives
  its kernel (the fusion's, '.' as '_')."""
  from benchmarks import aot  # its HLO reader; imported here, as it loads topologies
  instrs = aot.entry_instructions(hlo_text)
  by_name = {i.name: i for i in instrs}
  return {re.sub(r"\W", "_", i.name): aot.nbytes(i.type) + sum(
      aot.nbytes(by_name[o].type) for o in dict.fromkeys(i.operands) if o in by_name)
          for i in instrs if i.op == "fusion"}


def bytes_or_kernels(dev, nbytes, top=6):
  """Which explains a step's device time, from its kernels' durations and
  bytes: a least-squares fit of time = a + bytes / B over its kernels
  gives a cost per kernel (a) and a bandwidth (B); the two shares say how
  much of the busy time each accounts for. Also per kind of kernel (its
  name less the number: loop fusions are elementwise passes, input
  fusions reductions): time, bytes and effective bandwidth (above the
  device's copy rate, the kernel read from the L2 cache)."""
  pairs = [(nbytes[k], d / 1e3) for k, d in dev if k in nbytes]
  out = {"kernels_with_bytes": len(pairs), "kernels": len(dev)}
  if len(pairs) < 3:
    return out
  b, t = (np.array(x, np.float64) for x in zip(*pairs))
  slope, intercept = np.polyfit(b, t, 1)
  pred = intercept + slope * b
  out |= {"us_per_kernel": float(intercept), "fit_GBps": float(1e-3 / slope) if slope > 0
          else None, "r2": float(1 - np.sum((t - pred) ** 2) / max(np.sum((t - t.mean()) ** 2), 1e-30)),
          "share_per_kernel": float(intercept * len(t) / t.sum()),
          "share_bytes": float(slope * b.sum() / t.sum())}
  kinds = collections.defaultdict(lambda: [0, 0.0, 0])
  for k, d in dev:
    kind = kinds[re.sub(r"_\d+$", "", k)]
    kind[0] += 1
    kind[1] += d / 1e3
    kind[2] += nbytes.get(k, 0)
  out["by_kind"] = {k: {"count": c, "us": us, "bytes": nb,
                        "GBps": nb / us / 1e3 if us and nb else None}
                    for k, (c, us, nb) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:top]}
  return out


def profile_runs(runs, trace_root, log):
  """One traced, K = 1 step of each run, each in its own trace (so no
  kernel is attributed to the wrong optimizer), summarized."""
  out = {}
  for name, run in runs.items():
    step, params, state, grads, _ = run
    d = tempfile.mkdtemp(prefix="trace_", dir=trace_root)
    annotation = f"gpu_check {name}"
    try:
      with jax.profiler.trace(d):
        with jax.profiler.TraceAnnotation(annotation):
          t0 = time.perf_counter()
          params, state = step(params, state, grads)
          jax.block_until_ready((params, state))
          wall = 1e3 * (time.perf_counter() - t0)
      run[1], run[2] = params, state
      events, source, errors = read_trace(d)
      try:
        nbytes = kernel_bytes(step.as_text())
      except Exception:  # noqa: BLE001 - the profile without bytes
        nbytes = None
      summary = summarize_trace(events, annotation, wall, nbytes=nbytes)
      summary["trace_file"] = source
      if errors:
        summary["read_errors"] = errors
    except Exception as e:  # noqa: BLE001 - a profile is not worth the run
      summary = {"error": f"{type(e).__name__}: {e}"[:500], "device_events": 0}
      run[1], run[2] = params, state
    out[name] = summary
    if "busy_us" in summary:
      fit = summary.get("bytes_or_kernels", {})
      log(f"  profile {name}: {summary['kernel_launches']} kernels "
          f"({summary['distinct_kernels']} distinct), busy {summary['busy_us']:.0f} us "
          f"of span {summary['span_us']:.0f} us ({summary['busy_over_span']:.0%}), "
          f"{summary['gaps']['over_5us']} gaps > 5 us" + (
              f"; fit: {fit['us_per_kernel']:.2f} us per kernel ({fit['share_per_kernel']:.0%}"
              f" of busy) + bytes at {fit['fit_GBps'] or float('nan'):.0f} GB/s "
              f"({fit['share_bytes']:.0%}), r2 {fit['r2']:.2f}" if "r2" in fit else ""))
    else:
      log(f"  profile {name}: {summary.get('note') or summary.get('error')}")
  return out


# --- one group -----------------------------------------------------------------

# Dropped first where a set's optimizers do not all fit the device together.
OPTIONAL = ("adam_spd leaf by leaf", "naive SPD")


def runs_that_fit(shapes, stacked, dtype, log, share=0.85, limit=None):
  """The optimizers to time together on one set: all of them where their
  params, states and gradients take at most `share` of the device's memory
  (the rest is for the steps' temporaries), else without those in OPTIONAL
  (the 1.35B sets' 19 parameter-sized trees, 103 GB, fit an H200; an H100
  holds 13). `limit`: the device's memory in bytes, by default its
  allocator's limit (none on XLA:CPU: all of them)."""
  txs = ostep.optimizers(shapes, stacked)
  limit = limit or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  if limit is None:
    return list(txs)
  nbytes = lambda t: sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
  need, grads = {}, {}
  for name, (tx, sh) in txs.items():
    params = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in sh.items()}
    grads[id(sh)] = nbytes(params)
    need[name] = nbytes(params) + nbytes(jax.eval_shape(tx.init, params))
  names = list(txs)
  while sum(need[k] for k in names) + sum(grads.values()) > share * limit:
    drop = next((k for k in OPTIONAL if k in names), None)
    if drop is None:
      break
    names.remove(drop)
    log(f"  {drop}: left out, the set's optimizers do not all fit "
        f"{limit / 2**30:.0f} GiB together")
  return names


def run_group(name, shapes, args, trace_root, log, out, save, dtype="float32"):
  """Fills `out` (already in the results) phase by phase, calling save()
  after each, so that a group cut short or failing late keeps what it
  measured: the reference check (float32 groups: bfloat16 params run the
  same arithmetic on other inputs), the K = 1 timings, the profile, the
  K-step timings."""
  stacked = name.endswith("_stacked")
  dtype = jnp.dtype(dtype)
  t0 = time.perf_counter()
  phase = {}
  tick = lambda what, t=[t0]: (phase.__setitem__(what, time.perf_counter() - t[0]),
                               t.__setitem__(0, time.perf_counter()), save())
  out |= {"dtype": dtype.name, "phase_s": phase}
  if dtype == jnp.float32:
    out["reference"] = reference_errors(check_shapes(shapes, args.check_cap), stacked,
                                        steps=args.check_steps)
    for k, v in out["reference"]["errors"].items():
      log(f"  reference {k}: " + (f"params {v['params']:.2e}, update {v['update']:.2e}, "
                                  f"state {v['state']:.2e} vs {v['reference']}"
                                  if "error" not in v else v["error"]))
    tick("reference")
  names = runs_that_fit(shapes, stacked, dtype, log)
  runs, stats, n, leaves = ostep.setup_runs(shapes, stacked, warmup=args.warmup, dtype=dtype,
                                            names=names)
  out |= {"params": n, "leaves": leaves}
  tick("setup")
  ostep.alternate(runs, args.reps)
  out |= ostep.medians(runs, 1, stacked)
  out["compiled"] = stats
  tick("time")
  out["profile"] = profile_runs(runs, trace_root, log)
  for rname, prof in out["profile"].items():
    if "busy_us" in prof:  # what the timed call spends beyond the device's busy time
      prof["median_call_minus_busy_us"] = 1e3 * out["median_ms"][rname] - prof["busy_us"]
  tick("profile")
  # The same buffers, K steps per call in one jit.
  k = args.steps_per_call
  try:
    txs = ostep.optimizers(shapes, stacked)
    for rname, run in runs.items():
      run[0] = ostep.make_step(txs[rname][0], k).lower(*run[1:4]).compile()
      run[1], run[2] = run[0](*run[1:4])  # warm up
      jax.block_until_ready(run[1])
      run[4] = []
    tick("fori_setup")
    ostep.alternate(runs, args.fori_reps)
    out["fori_loop"] = ostep.medians(runs, k, stacked)
    out["host_ms_per_call"] = {r: out["median_ms"][r] - out["fori_loop"]["median_ms"][r]
                               for r in runs}
  except Exception as e:  # noqa: BLE001 - keep the K = 1 results
    out["fori_loop"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    log(f"  fori_loop FAILED {type(e).__name__}: {str(e)[:300]}")
  del runs
  tick("fori_time")
  out["seconds"] = time.perf_counter() - t0
  return out


def _size(nbytes):
  return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def run_leaf_sizes(args, trace_root, log, out, save):
  """The sweep of leaf sizes (LEAF_SIZE_LOG2): per size, every optimizer's
  step timed (one per call, alternating) and one step of each profiled;
  `out` is saved after each size."""
  sizes, total = ((SMALL_LEAF_SIZE_LOG2, SMALL_LEAF_SIZES_TOTAL_LOG2) if args.small
                  else (LEAF_SIZE_LOG2, LEAF_SIZES_TOTAL_LOG2))
  t0 = time.perf_counter()
  out |= {"dtype": "float32", "params": 2 ** total, "sizes": {}}
  for log2 in sizes:
    runs, stats, _, leaves = ostep.setup_runs(leaf_size_shapes(log2, total), warmup=args.warmup)
    ostep.alternate(runs, args.reps)
    r = out["sizes"][f"2^{log2}"] = {"leaf_bytes": 4 * 2 ** log2, "leaves": leaves}
    r |= ostep.medians(runs, 1, False) | {"compiled": stats}
    r["profile"] = profile_runs(runs, trace_root, log)
    del runs
    log(f"  {leaves} leaves of {_size(4 * 2 ** log2)}: " + ", ".join(
        f"{k} {v:.3f} ms ({r['ratio_to_adamw'][k]:.2f}x)" for k, v in r["median_ms"].items()))
    save()
  out["seconds"] = time.perf_counter() - t0
  return out


def profile_summary(profile):
  """The profile's headline numbers per optimizer, for the top of the JSON."""
  keys = ("device_events", "distinct_kernels", "busy_us", "span_us", "busy_over_span",
          "median_call_minus_busy_us", "wall_ms", "note", "error")
  out = {}
  for name, p in profile.items():
    out[name] = {k: p[k] for k in keys if k in p}
    fit = p.get("bytes_or_kernels", {})
    out[name] |= {k: fit[k] for k in ("us_per_kernel", "fit_GBps", "share_per_kernel",
                                      "share_bytes") if k in fit}
    if "gaps" in p:
      out[name]["gaps_over_5us"] = p["gaps"]["over_5us"]
      out[name]["gaps_total_us"] = p["gaps"]["total_us"]
    if "top_kernels" in p:
      out[name]["top_kernel"] = p["top_kernels"][0]["name"] if p["top_kernels"] else None
  return out


def print_group(name, r, log):
  ms = r["median_ms"]
  log(f"| {name} | {r['params'] / 1e6:.1f}M | {r['leaves']} leaves | "
      + " | ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
      + f" | adam_spd / adamw {r['ratio_to_adamw']['adam_spd']:.2f}x"
      + (f" | stacked / unstacked {r['stacked_over_unstacked']:.2f}x"
         if "stacked_over_unstacked" in r else "") + " |")
  f = r["fori_loop"]
  if "error" in f:
    log(f"| {name}, K steps per jit | FAILED: {f['error'][:200]} |")
    return
  log(f"| {name}, {f['steps_per_call']} steps per jit | | | "
      + " | ".join(f"{k} {v:.3f} ms" for k, v in f["median_ms"].items())
      + f" | adam_spd / adamw {f['ratio_to_adamw']['adam_spd']:.2f}x"
      + (f" | stacked / unstacked {f['stacked_over_unstacked']:.2f}x"
         if "stacked_over_unstacked" in f else "") + " |")


def git_commit():
  if os.environ.get("GPU_CHECK_COMMIT"):
    return os.environ["GPU_CHECK_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, timeout=10).stdout.strip() or None
  except Exception:  # noqa: BLE001 - the device machine's copy may have no .git
    return None


def package_versions():
  from importlib import metadata
  out = {}
  for name in ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "optax", "numpy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def write(results, path):
  tmp = path.with_name(path.name + ".part")
  tmp.write_text(json.dumps(results, indent=2))
  tmp.replace(path)


def main(argv=None):
  start = time.perf_counter()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
  p.add_argument("--sets", nargs="+", choices=ORDER, default=ORDER)
  p.add_argument("--small", action="store_true",
                 help="tiny shapes and few reps: the whole script on a CPU in seconds")
  p.add_argument("--budget-s", type=float, default=None,
                 help="start no group once this much time is gone, or when less is "
                      "left than the longest group so far took")
  p.add_argument("--reps", type=int, default=None, help="K = 1 reps (default 20, small 3)")
  p.add_argument("--fori-reps", type=int, default=None, help="K-step reps (default 5, small 2)")
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="K for the fori_loop timings (default 10, small 3)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--check-cap", type=int, default=None,
                 help="the reference check caps every dimension at this (default 512, small 64)")
  p.add_argument("--check-steps", type=int, default=6)
  p.add_argument("--copy-gib", type=float, default=None, help="default 1, small 1/64")
  p.add_argument("--trace-dir", default=None,
                 help="keep the raw traces here (default: a temporary folder, removed)")
  args = p.parse_args(argv)
  small = args.small
  args.reps = args.reps or (3 if small else 20)
  args.fori_reps = args.fori_reps or (2 if small else 5)
  args.steps_per_call = args.steps_per_call or (3 if small else 10)
  args.check_cap = args.check_cap or (64 if small else 512)
  args.copy_gib = args.copy_gib or (1 / 64 if small else 1)
  shape_sets = SMALL_SETS if small else ostep.SETS

  log = Log()
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  trace_holder = None
  if args.trace_dir:
    trace_root = pathlib.Path(args.trace_dir)
    trace_root.mkdir(parents=True, exist_ok=True)
  else:
    trace_holder = tempfile.TemporaryDirectory(prefix="gpu_check_")
    trace_root = pathlib.Path(trace_holder.name)

  device = jax.devices()[0]
  results = {"backend": jax.default_backend(), "device": device.device_kind,
             "devices": len(jax.devices()), "jax": jax.__version__,
             "packages": package_versions(),
             "optax": optax.__version__, "python": platform.python_version(),
             "commit": git_commit(), "small": small,
             "reps": args.reps, "fori_reps": args.fori_reps,
             "steps_per_call": 1, "fori_steps_per_call": args.steps_per_call,
             "budget_s": args.budget_s, "complete": False, "skipped": [], "sets": {},
             "profile_summary": {}}
  results["copy_GBps"] = ostep.copy_bandwidth(args.copy_gib, reps=5 if small else 20)
  log(f"jax {jax.__version__}, {len(jax.devices())} device(s), commit {results['commit']}, "
      f"{'SMALL shapes; ' if small else ''}copy "
      f"{results['copy_GBps']:.0f} GB/s (read + write, {args.copy_gib:g} GiB)")
  write(results, path)

  longest = 0.0
  for name in [s for s in ORDER if s in args.sets]:
    elapsed = time.perf_counter() - start
    if args.budget_s is not None and (elapsed >= args.budget_s
                                      or args.budget_s - elapsed < longest):
      log(f"{name}: skipped, {elapsed:.0f} s of the {args.budget_s:.0f} s budget gone "
          f"(longest group so far {longest:.0f} s)")
      results["skipped"].append(name)
      continue
    log(f"{name}: starting at {elapsed:.0f} s")
    r = results["sets"][name] = {}
    group_start = time.perf_counter()
    try:
      save = lambda: write(results, path)
      set_name, dtype = GROUPS[name]
      if set_name is None:
        run_leaf_sizes(args, trace_root, log, r, save)
      else:
        run_group(name, shape_sets[set_name](), args, trace_root, log, r, save, dtype)
    except Exception as e:  # noqa: BLE001 - out of memory, say: keep the others
      log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
      r["error"] = f"{type(e).__name__}: {e}"[:1000]
      r["seconds"] = time.perf_counter() - group_start
      longest = max(longest, r["seconds"])
      write(results, path)
      continue
    longest = max(longest, r["seconds"])
    if "sizes" in r:
      results["profile_summary"][name] = {k: profile_summary(v["profile"])
                                          for k, v in r["sizes"].items()}
      log(f"{name}: done in {r['seconds']:.0f} s")
    else:
      results["profile_summary"][name] = profile_summary(r["profile"])
      print_group(name, r, log)
      log(f"{name}: done in {r['seconds']:.0f} s (" + ", ".join(
          f"{k} {v:.1f}" for k, v in r["phase_s"].items()) + ")")
    results["elapsed_s"] = time.perf_counter() - start
    write(results, path)

  results["complete"] = not results["skipped"] and all(
      "error" not in r and "error" not in r.get("fori_loop", {})
      for r in results["sets"].values())
  results["elapsed_s"] = time.perf_counter() - start
  write(results, path)
  if trace_holder is not None:
    trace_holder.cleanup()
  log(f"wrote {path} in {results['elapsed_s']:.0f} s; complete: {results['complete']}")
  log("| set | adam_spd / adamw (1 step per call) | (K steps per jit) | stacked / unstacked |")
  for name, r in results["sets"].items():
    if "error" in r:
      log(f"| {name} | FAILED | | |")
      continue
    if "sizes" in r:
      for size, v in r["sizes"].items():
        log(f"| {name}, {_size(v['leaf_bytes'])} | "
            f"{v['ratio_to_adamw']['adam_spd']:.2f}x | - | - |")
      continue
    su = r.get("stacked_over_unstacked")
    fori = r["fori_loop"].get("ratio_to_adamw", {}).get("adam_spd", float("nan"))
    log(f"| {name} | {r['ratio_to_adamw']['adam_spd']:.2f}x | {fori:.2f}x | "
        + (f"{su:.2f}x |" if su is not None else "- |"))
  return results


if __name__ == "__main__":
  main()
