"""Full fine-tuning of a scanned SmolLM2-135M on a device mesh: AdamW vs Adam-SPD
anchored at the pre-trained weights, per layer.

    python -m examples.llm.full_finetune --preset cpu --results-dir results/llm_full

Every weight trains. The 30 blocks are stacked under `nnx.scan`
(`scan_model.py`), so each block matrix is one `[30, ...]` leaf; SPD is told
with `layer_axes_from_names` that axis "layers" indexes blocks and decides,
per block and per matrix, whether to pull the step back towards the
pre-trained weights. Params, the anchor and Adam's moments are FSDP-sharded
over a one-axis mesh with Explicit axis types, batches along the same axis;
the step is jitted with donated params and state. Scored as the LoRA example
(`finetune.py`, whose data and evaluation sets this reuses): perplexity on
held-out chapters (ID), other books (OOD Bible) and Python's docs (pydoc),
next to ‖θ − θ0‖.
"""

import os

# Eight host devices for the CPU mesh; must be set before jax starts. An
# existing setting (the tests', a user's) wins. XLA:CPU runs a collective's
# participants on a pool of max(cores, devices) threads; with no more threads
# than devices, eager sharded ops can hang it (tests/conftest.py), so the
# pool gets twice the devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ.setdefault("PJRT_NPROC", "16")

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import spd_optax
from spd_optax import checkpoint as spd_checkpoint
from examples.common import (finished_run, machine, method_color, pyplot, save_figure,
                             write_table)
from examples.llm import convert, full_configs, scan_model
from examples.llm.finetune import batch_indices, make_datasets, mark_selected
from examples.llm.full_train import (MATRICES, deviation_table, evaluate, layer_values,
                                     make_eval, make_mesh, make_step, make_tx, shard_batch,
                                     split_model, state_shardings)

COLUMNS = ["method", "strength", "seed", "steps", "id_ppl", "ood_bible_ppl",
           "pydoc_ppl", "val_ppl", "selected", "deviation", "final_train_loss",
           "decayed_fraction", "train_s"]
EVAL_SETS = ("id", "ood_bible", "pydoc", "val")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(full_configs.PRESETS))
  p.add_argument("--results-dir", default="results/llm_full")
  p.add_argument("--devices", type=int, default=None,
                 help="devices in the mesh (default: the preset's)")
  p.add_argument("--layer-axis", type=int, default=None, choices=(0, 1),
                 help="1 stacks the blocks at axis 1, as MaxText does")
  p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
  p.add_argument("--resume", action="store_true",
                 help="reuse finished runs and continue unfinished ones from "
                      "their latest checkpoint")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop each run after this many steps, leaving only its "
                      "checkpoint (simulates an interruption; see --resume)")
  return p.parse_args(argv)


# --- one run ----------------------------------------------------------------

def _abstract(tree):
  """Restore targets: the shapes, dtypes and shardings of a live tree (the
  freshly initialised params and state, laid out on this run's mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def run_one(ctx, cfg, method, strength, seed, steps, run_dir, resume=False, stop_after=None):
  """Trains every weight from the pre-trained ones with one optimizer;
  returns (report row, per-window NLLs), or None if stopped by `stop_after`."""
  with jax.set_mesh(ctx["mesh"]):
    return _run_one(ctx, cfg, method, strength, seed, steps, pathlib.Path(run_dir),
                    resume, stop_after)


def _run_one(ctx, cfg, method, strength, seed, steps, run_dir, resume, stop_after):
  result_file = run_dir / "result.json"
  if (saved := finished_run(run_dir, steps, resume)) is not None:
    return saved["row"], {k: np.asarray(v) for k, v in saved["nll"].items()}

  mesh, theta0 = ctx["mesh"], ctx["theta0"]
  copy, init, step_fn = _compiled(ctx, cfg, method, strength, steps)
  # A fresh copy: the step donates (consumes) the params it is given.
  params = copy(theta0)
  state = init(params)

  ckpt_dir = (run_dir / "checkpoints").absolute()
  start, history = 0, []
  if resume and ckpt_dir.exists() and (steps_saved := _saved_steps(ckpt_dir)):
    params, state = spd_checkpoint.restore(
        ckpt_dir, _abstract(params), _abstract(state), step=steps_saved[-1])
    start = min(steps_saved[-1], steps)
    if (run_dir / "history.json").exists():
      history = [h for h in json.loads((run_dir / "history.json").read_text())
                 if h["step"] <= start]
    print(f"{run_dir.name}: resuming at step {start}")

  train = ctx["sets"]["train"]
  t0 = time.time()
  losses = []
  bar = tqdm(range(start, steps), desc=f"{method} λ={strength} seed={seed}",
             initial=start, total=steps)
  for step in bar:
    tokens = shard_batch(train[batch_indices(len(train), cfg.batch_size, step, seed)], mesh)
    params, state, loss = step_fn(params, state, tokens)
    losses.append(float(loss))
    done = step + 1
    if done % cfg.log_every == 0 or done == steps:
      entry = {"step": done, "loss": float(np.mean(losses[-cfg.log_every:])),
               "block_deviation": deviation_table(params, theta0, ctx["layer_axis"]).tolist()}
      if method == "adam_spd":
        entry.update({k: float(v) for k, v in spd_optax.spd_stats(state).items()})
        entry["condition"] = layer_values(state, "condition").tolist()
        entry["ratio"] = layer_values(state, "ratio").tolist()
      history.append(entry)
      pulled = (np.asarray(entry["ratio"]) > 0).sum(0) if "ratio" in entry else None
      bar.set_postfix(loss=f"{entry['loss']:.3f}")
      tqdm.write(json.dumps({"run": run_dir.name, "step": done, "loss": entry["loss"],
                             "decayed_fraction": entry.get("decayed_fraction"),
                             "matrices_pulled_back_per_block":
                                 None if pulled is None else pulled.tolist(),
                             "deviation_per_block": np.round(np.sqrt(np.square(
                                 entry["block_deviation"]).sum(0)), 4).tolist()}))
      (run_dir / "history.json").write_text(json.dumps(history))
    stopping = stop_after is not None and done >= stop_after and done < steps
    if done % cfg.checkpoint_every == 0 or done == steps or stopping:
      spd_checkpoint.save(ckpt_dir, done, params, state, max_to_keep=2)
    if stopping:
      bar.close()
      print(f"{run_dir.name}: stopped at step {done} of {steps}")
      return None
  train_s = time.time() - t0

  nll = evaluate(ctx["nll"], params, ctx["sets"], EVAL_SETS, cfg.eval_batch_size, mesh)
  dev = deviation_table(params, theta0, ctx["layer_axis"])
  last = history[-1] if history else {}
  row = {"method": method, "strength": strength, "seed": seed, "steps": steps,
         **{f"{k}_ppl": math.exp(float(v.mean())) for k, v in nll.items()},
         "deviation": float(np.sqrt(np.square(dev).sum())),
         "final_train_loss": last.get("loss", float("nan")),
         "decayed_fraction": last.get("decayed_fraction", ""),
         "train_s": round(train_s, 1)}
  result_file.write_text(json.dumps(
      {"row": row, "nll": {k: v.tolist() for k, v in nll.items()},
       "final_params_checksum": params_checksum(params)}, indent=1))
  return row, nll


def _compiled(ctx, cfg, method, strength, steps):
  """(copy, init, step) jitted once per context and optimizer: the runs of
  other seeds (batch orders), and a resumed run, reuse the compiled step
  instead of compiling it again."""
  key = (method, strength, steps, cfg.learning_rate, cfg.warmup_steps)
  cache = ctx.setdefault("compiled", {})
  if key not in cache:
    mesh, psh, theta0 = ctx["mesh"], ctx["psh"], ctx["theta0"]
    tx = make_tx(cfg, method, strength, steps, theta0, ctx["layer_axes"])
    ssh = state_shardings(tx, theta0, psh, mesh)
    cache[key] = (jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=psh),
                  jax.jit(tx.init, out_shardings=ssh),
                  make_step(ctx["graphdef"], tx, psh, ssh, mesh))
  return cache[key]


def _saved_steps(ckpt_dir):
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def params_checksum(params) -> str:
  """A hash of the params' bits: equal iff two runs ended bit for bit equal."""
  import hashlib
  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


# --- report -----------------------------------------------------------------

def plot_heatmap(history, path, title):
  """Blocks x logged steps: how many of a block's 7 matrices SPD pulled back
  (ratio > 0) at that step, and the mean applied ratio."""
  plt = pyplot()
  steps = [h["step"] for h in history if "ratio" in h]
  ratio = np.stack([np.asarray(h["ratio"]) for h in history if "ratio" in h])  # [T, 7, L]
  pulled = (ratio > 0).sum(1).T                     # [L, T]
  mean_ratio = ratio.mean(1).T
  # Panels stacked, so that the figure keeps its size in a docs column.
  fig, axes = plt.subplots(2, 1, figsize=(5.5, 9.3), sharex=True)
  for ax, values, label, cmap, vmax in [
      (axes[0], pulled, f"matrices pulled back (of {ratio.shape[1]})", "Reds", ratio.shape[1]),
      (axes[1], mean_ratio, "mean applied ratio r_t", "viridis", max(mean_ratio.max(), 1e-9))]:
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                   vmin=0, vmax=vmax,
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, values.shape[0] - 0.5)
                   if len(steps) > 1 else None)
    ax.set_xlabel("step (logged)")
    fig.colorbar(im, ax=ax, label=label)
  for ax in axes:
    ax.set_ylabel("block")
    ax.set_yticks(np.arange(0, pulled.shape[0], max(1, pulled.shape[0] // 10)))
  fig.suptitle(title)
  save_figure(fig, path)


def plot_scatter(rows, path, x, y, title):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for method in dict.fromkeys(r["method"] for r in rows):
    pts = [r for r in rows if r["method"] == method]
    ax.scatter([r[x] for r in pts], [r[y] for r in pts], label=method,
               color=method_color(method))
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title)
  ax.legend()
  save_figure(fig, path)


def plot_block_deviation(devs, path, title):
  """devs: {label: [L] ‖θ − θ0‖ per block}; bars side by side per block."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(10, 3.8))
  width = 0.8 / len(devs)
  for i, (label, d) in enumerate(devs.items()):
    x = np.arange(len(d)) + (i - (len(devs) - 1) / 2) * width
    ax.bar(x, d, width, label=label, color=method_color(label.split(" ")[0]))
  ax.set_xlabel("block")
  ax.set_xticks(np.arange(len(d)))
  ax.set_ylabel("‖θ − θ0‖ of the block's matrices")
  ax.set_title(title)
  ax.legend()
  save_figure(fig, path)


def paired_intervals(results, chosen, seeds):
  """SPD − AdamW at the chosen strengths, per evaluation set: the mean over
  seeds and windows of the per-window NLL difference (nats per token; exp of
  it is the perplexity ratio), with a 95% paired bootstrap interval
  (examples/stats.py: seeds and windows resampled, both methods' windows
  together, so the pairing by window and batch order is kept)."""
  from examples.stats import paired_bootstrap
  out = []
  for k in ("id", "ood_bible", "pydoc"):
    a = np.stack([results[("adam_spd", chosen["adam_spd"], s)][k] for s in seeds])
    b = np.stack([results[("adamw", chosen["adamw"], s)][k] for s in seeds])
    r = paired_bootstrap(a, b, n_boot=5000)
    out.append({"set": k, "spd": chosen["adam_spd"], "adamw": chosen["adamw"],
                "seeds": len(seeds), "windows": int(a.shape[1]),
                "spd_minus_adamw_nats": r["diff"], "lo": r["lo"], "hi": r["hi"],
                "ppl_ratio": math.exp(r["diff"]), "excludes_zero": r["excludes_zero"]})
  return out


def intervals_table(diffs) -> str:
  d0 = diffs[0]
  lines = [f"SPD (λ={d0['spd']}) − AdamW (λ={d0['adamw']}, chosen on ID validation), "
           f"per-token NLL over {d0['seeds']} seed(s) x {d0['windows']} windows per set; "
           "95% paired bootstrap interval over seeds and windows.", "",
           "| set | SPD − AdamW (nats/token) | 95% interval | perplexity ratio |",
           "| --- | --- | --- | --- |"]
  lines += [f"| {d['set']} | {d['spd_minus_adamw_nats']:+.4f} | "
            f"[{d['lo']:+.4f}, {d['hi']:+.4f}] | {d['ppl_ratio']:.4f} |" for d in diffs]
  return "\n".join(lines) + "\n"


# --- entry point ------------------------------------------------------------

def build_context(cfg, model_cfg, tok, weights):
  """What every run shares: the mesh, the pre-trained params on it (θ0,
  never donated), their shardings, the model's graph and the data."""
  mesh = make_mesh(cfg.devices)
  model = scan_model.build_scan_model(model_cfg, weights, n_layers=cfg.n_layers,
                                      layer_axis=cfg.layer_axis)
  with jax.set_mesh(mesh):
    graphdef, theta0, psh, layer_axes = split_model(model, mesh)
  return {"mesh": mesh, "graphdef": graphdef, "theta0": theta0, "psh": psh,
          "layer_axes": layer_axes, "layer_axis": cfg.layer_axis,
          # No rounding of the sets to whole evaluation batches: evaluate()
          # pads its last batch instead.
          "sets": make_datasets(dataclasses.replace(cfg, eval_batch_size=1), tok),
          "nll": make_eval(graphdef)}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = full_configs.get_config(args.preset)
  overrides = {k: v for k, v in [("devices", args.devices), ("layer_axis", args.layer_axis),
                                 ("steps", args.steps)] if v is not None}
  cfg = dataclasses.replace(cfg, **overrides)
  for name in ("batch_size", "eval_batch_size"):
    if getattr(cfg, name) % cfg.devices:
      raise ValueError(f"{name}={getattr(cfg, name)} is not a multiple of the "
                       f"{cfg.devices} devices it is sharded over")
  steps = cfg.steps
  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  print(f"preset {args.preset}: {cfg}")
  print(f"machine: {machine()}")

  t0 = time.time()
  model_cfg, tok, weights = convert.read_gguf(convert.smollm2_gguf_path())
  ctx = build_context(cfg, model_cfg, tok, weights)
  del weights
  mesh, theta0, sets = ctx["mesh"], ctx["theta0"], ctx["sets"]
  print(f"loaded in {time.time() - t0:.1f}s on a mesh of {cfg.devices} devices; windows "
        f"of {cfg.seq_len} tokens: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))

  with jax.set_mesh(mesh):
    base_nll = evaluate(ctx["nll"], theta0, sets, EVAL_SETS, cfg.eval_batch_size, mesh)
    base = {"method": "pretrained", "strength": "", "seed": "", "steps": 0,
            **{f"{k}_ppl": math.exp(float(v.mean())) for k, v in base_nll.items()},
            "deviation": 0.0}
    print(json.dumps(base))

    rows, results = [base], {}
    grids = {"adamw": cfg.adamw_weight_decay, "adam_spd": cfg.spd_strength}

    def run(method, strength, seed):
      run_dir = results_dir / "runs" / f"{method}_{strength}_seed{seed}"
      out = run_one(ctx, cfg, method, strength, seed, steps, run_dir, args.resume,
                    args.stop_after)
      if out is not None:
        rows.append(out[0])
        results[(method, strength, seed)] = out[1]
        print(json.dumps(out[0]))
      return out is not None

    # Strengths are searched on the first seed only and chosen on its ID
    # validation perplexity; the other seeds (batch orders) rerun the chosen
    # strength of each method, as the LoRA study does. No test set is looked
    # at before the choice.
    finished = [run(m, s, cfg.seeds[0]) for m, grid in grids.items() for s in grid]
    if all(finished):
      mark_selected(rows)
      chosen = {m: next(r["strength"] for r in rows if r["method"] == m
                        and r.get("selected", True) is not False) for m in grids}
      for seed in cfg.seeds[1:]:
        for m in grids:
          if run(m, chosen[m], seed) and len(grids[m]) > 1:
            rows[-1]["selected"] = True
  if len(rows) < 1 + sum(map(len, grids.values())) + 2 * (len(cfg.seeds) - 1):
    print("some runs are unfinished: no report written; continue with --resume")
    return rows
  diffs = paired_intervals(results, chosen, cfg.seeds)

  title = f"SmolLM2-135M full fine-tuning on KJV ({args.preset} preset)"
  write_table(results_dir, "llm_full", rows, COLUMNS)
  plot_scatter(rows, results_dir / "llm_full.png", "deviation", "id_ppl", title)
  (results_dir / "llm_full_differences.json").write_text(json.dumps(diffs, indent=1))
  with open(results_dir / "llm_full.md", "a") as f:
    f.write("\n" + intervals_table(diffs))
  seed = cfg.seeds[0]
  hist = {m: json.loads((results_dir / "runs" / f"{m}_{chosen[m]}_seed{seed}" /
                         "history.json").read_text()) for m in chosen}
  plot_heatmap(hist["adam_spd"], results_dir / "llm_full_heatmap.png",
               f"Adam-SPD λ={chosen['adam_spd']}: blocks pulled back, seed {seed}")
  plot_block_deviation(
      {f"{m} ({chosen[m]})": np.sqrt(np.square(hist[m][-1]["block_deviation"]).sum(0))
       for m in ("adamw", "adam_spd")},
      results_dir / "llm_full_block_deviation.png",
      f"‖θ − θ0‖ per block after {steps} steps, seed {seed}")
  print((results_dir / "llm_full.md").read_text())
  print(f"total {time.time() - t0:.0f}s")
  return rows


if __name__ == "__main__":
  main()
