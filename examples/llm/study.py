"""The `study` preset of examples.llm.finetune: AdamW against Adam-SPD on
LoRA adapters, with intervals.

  python -m examples.llm.finetune --preset study --results-dir results/llm_study

Seed 0 runs plain Adam (strength 0) and each method over its strength grid;
each method's strength is the lowest ID-validation perplexity (ties to the
weaker) and runs on the other seeds. Every run keeps the NLL of each test
window, so SPD − AdamW gets a paired bootstrap interval over seeds and
windows (examples/stats.py) on ID perplexity and on the rise of general-text
(pydoc) perplexity. The chosen seed-0 runs are also evaluated along
W0 + α·ΔW (the adapters' update scaled by α): the ID–general frontier.
"""

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import spd_optax
from examples import stats
from examples.common import (Checkpointer, _markdown_table, machine, method_color, method_name,
                             spd_log)
from examples.llm import convert
from examples.llm.finetune import (_restore, _save, adapter_norms, batch_indices, load_base,
                                   make_datasets, reset_adapters, train_step)
from examples.llm.model import window_nll

NAMES = {k: method_name(k) for k in ("pretrained", "adam", "adamw", "adam_spd")}
# One colour per method in every figure of both examples (examples/common.py).
COLORS = {k: method_color(k) for k in NAMES}
TUNED = ("adamw", "adam_spd")
TEST_SETS = ("id", "pydoc")


@nnx.jit
def _window_nll(model, tokens):
  return window_nll(model(tokens), tokens)


def make_tx(cfg, method: str) -> optax.GradientTransformation:
  """One transformation per method with the strength as optimizer state, so
  one compiled train step serves every strength and seed of a method."""
  lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
                                          end_value=0.1 * cfg.learning_rate)
  factory = {
      "adamw": lambda learning_rate, strength: optax.adamw(learning_rate, weight_decay=strength),
      "adam_spd": lambda learning_rate, strength: spd_optax.adam_spd(
          learning_rate, weight_decay=strength, anchor="zeros"),
  }[method]
  return optax.inject_hyperparams(factory)(learning_rate=lr, strength=0.0)


def lora_modules(model):
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LoRA)]


def ppl_ratio(nats: float) -> float:
  """A mean NLL difference (nats per token) as a perplexity ratio, in %."""
  return float(100 * np.expm1(nats))


class Stopped(Exception):
  pass


class Study:

  def __init__(self, cfg, args):
    self.cfg, self.args = cfg, args
    self.dir = pathlib.Path(args.results_dir)
    self.seconds = {"train": 0.0, "evaluation": 0.0}
    model_cfg, tok, weights = load_base(args)
    self.model = convert.build_model(model_cfg, weights, lora_rank=cfg.lora_rank,
                                     lora_attn=cfg.lora_attn, lora_mlp=cfg.lora_mlp,
                                     lora_layers=cfg.lora_layers, n_layers=cfg.n_layers)
    self.sets = make_datasets(cfg, tok)
    print(f"windows of {cfg.seq_len} tokens: " + ", ".join(f"{k} {len(v)}" for k, v in self.sets.items()))
    self.tx = {m: make_tx(cfg, m) for m in TUNED}

  def nll(self, names) -> dict[str, list[float]]:
    t = time.perf_counter()
    b = self.cfg.eval_batch_size
    out = {k: np.concatenate([np.asarray(_window_nll(self.model, jnp.asarray(self.sets[k][i:i + b])))
                              for i in range(0, len(self.sets[k]), b)]).tolist() for k in names}
    self.seconds["evaluation"] += time.perf_counter() - t
    return out

  @staticmethod
  def summarise(nll) -> dict[str, float]:
    return {f"{k}_ppl": float(np.exp(np.mean(v))) for k, v in nll.items()}

  def _save(self, path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record

  def pretrained(self) -> dict:
    path = self.dir / "runs" / "pretrained.json"
    if path.exists():
      return json.loads(path.read_text())
    reset_adapters(self.model, 0)   # B = 0: the pre-trained model
    nll = self.nll(("val", *TEST_SETS))
    return self._save(path, {"key": "pretrained", "strength": 0.0, "seed": 0, "nll": nll,
                             **self.summarise(nll), "delta_w_norm": 0.0})

  def run(self, key: str, strength: float, seed: int, *, with_val: bool) -> dict:
    """Trains fresh adapters for one (method, strength, seed), or reads them
    back; plain Adam is Adam-SPD at strength 0 (no projection)."""
    cfg = self.cfg
    name = f"{key}_s{strength:g}_seed{seed}"
    path = self.dir / "runs" / f"{name}.json"
    if path.exists():
      return json.loads(path.read_text())
    reset_adapters(self.model, seed)
    optimizer = nnx.Optimizer(self.model, self.tx["adam_spd" if key == "adam" else key],
                              wrt=nnx.LoRAParam)
    optimizer.opt_state.hyperparams["strength"][...] = jnp.asarray(strength, jnp.float32)
    ckpt_dir = self.dir / "checkpoints" / name
    # One manager per run; leaving the block waits for a save in flight.
    with Checkpointer(ckpt_dir) as ckpt:
      start, history = 0, []
      if (last := ckpt.latest_step()) is not None:
        _restore(ckpt, last, self.model, optimizer)
        start = last
        history = [h for h in json.loads((ckpt_dir / "history.json").read_text()) if h["step"] <= last]
      train = self.sets["train"]
      t = time.perf_counter()
      losses = []
      for step in tqdm(range(start, cfg.steps), desc=name, initial=start, total=cfg.steps):
        tokens = jnp.asarray(train[batch_indices(len(train), cfg.batch_size, step, seed)])
        losses.append(float(train_step(self.model, optimizer, tokens)))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
          history.append({"step": done, "loss": float(np.mean(losses[-cfg.log_every:])),
                          **spd_log(optimizer.opt_state)})
        stopping = self.args.stop_after is not None and done >= self.args.stop_after
        if (done % cfg.checkpoint_every == 0 or stopping) and done < cfg.steps:
          _save(ckpt, done, self.model, optimizer)
          (ckpt_dir / "history.json").write_text(json.dumps(history))
        if stopping and done < cfg.steps:
          self.seconds["train"] += time.perf_counter() - t
          raise Stopped(f"{name} stopped at step {done} (--stop-after)")
    self.seconds["train"] += time.perf_counter() - t
    nll = self.nll((("val",) if with_val else ()) + TEST_SETS)
    norm, delta = adapter_norms(self.model)
    record = {"key": key, "strength": strength, "seed": seed, "nll": nll, **self.summarise(nll),
              "adapter_norm": norm, "delta_w_norm": delta, "history": history}
    if seed == cfg.seeds[0]:
      # Kept until the frontier has been evaluated.
      np.savez(self.dir / "runs" / f"{name}.adapters.npz",
               *[np.asarray(x) for x in jax.tree.leaves(nnx.state(self.model, nnx.LoRAParam))])
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return self._save(path, record)

  def frontier(self, run, base) -> dict:
    """ID and pydoc perplexity of W0 + α·ΔW: every B factor scaled by α
    (ΔW = A·B is linear in B), A as trained."""
    path = self.dir / "runs" / f"frontier_{run['key']}.json"
    if path.exists():
      return json.loads(path.read_text())
    name = f"{run['key']}_s{run['strength']:g}_seed{run['seed']}"
    saved = np.load(self.dir / "runs" / f"{name}.adapters.npz")
    state = nnx.state(self.model, nnx.LoRAParam)
    treedef = jax.tree.structure(state)
    # jax arrays, not the loaded numpy ones: nnx writes `v[...] = x` into a
    # numpy value in place, which would rescale the saved B factors too.
    nnx.update(self.model, jax.tree.unflatten(treedef, [jnp.asarray(saved[f"arr_{i}"])
                                                        for i in range(treedef.num_leaves)]))
    trained_b = [jnp.asarray(m.lora_b[...]) for m in lora_modules(self.model)]
    points = []
    for alpha in self.cfg.alphas:
      if alpha in (0, 1):   # the pre-trained model and the run itself: known
        ppl = {f"{k}_ppl": (base if alpha == 0 else run)[f"{k}_ppl"] for k in TEST_SETS}
      else:
        for m, b in zip(lora_modules(self.model), trained_b):
          m.lora_b[...] = alpha * b
        ppl = self.summarise(self.nll(TEST_SETS))
      points.append({"alpha": alpha, **ppl})
    return self._save(path, {"key": run["key"], "strength": run["strength"], "points": points})

  def execute(self) -> dict:
    cfg = self.cfg
    seed0 = cfg.seeds[0]
    base = self.pretrained()
    grid = {"adam": [self.run("adam", 0.0, seed0, with_val=True)]}
    for key in TUNED:
      grid[key] = [self.run(key, s, seed0, with_val=True) for s in cfg.strengths[key]]
    chosen = {"adam": grid["adam"][0]}
    for key in TUNED:
      # Ties go to the weaker strength.
      chosen[key] = min(grid[key], key=lambda r: (r["val_ppl"], r["strength"]))
    fronts = [self.frontier(chosen[k], base) for k in ("adam", *TUNED)]
    for npz in (self.dir / "runs").glob("*.adapters.npz"):
      npz.unlink()
    finals = {k: [chosen[k]] for k in TUNED}
    for seed in cfg.seeds[1:]:
      for key in TUNED:
        finals[key].append(self.run(key, chosen[key]["strength"], seed, with_val=False))
    return {"pretrained": base, "grid": grid,
            "chosen": {k: r["strength"] for k, r in chosen.items()},
            "frontier": fronts, "finals": finals}


# ------------------------------------------------------------------ report

def paired_differences(finals, n_boot) -> list[dict]:
  """Adam-SPD − AdamW in mean NLL per window, paired by seed and window
  (bootstrap over both), shown as a perplexity ratio − 1 in %. On pydoc this
  is the difference of the two methods' rises in log-perplexity over the
  pre-trained model: the pre-trained term cancels in the pair."""
  a = {r["seed"]: r for r in finals["adam_spd"]}
  b = {r["seed"]: r for r in finals["adamw"]}
  seeds = sorted(set(a) & set(b))
  row = {"comparison": "Adam-SPD − AdamW", "seeds": len(seeds)}
  for k, label in (("id", "ID"), ("pydoc", "pydoc rise")):
    res = stats.paired_bootstrap(np.array([a[s]["nll"][k] for s in seeds]),
                                 np.array([b[s]["nll"][k] for s in seeds]), n_boot=n_boot)
    row[f"{label} Δ%"] = ppl_ratio(res["diff"])
    row[f"{label} 95% CI"] = f"[{ppl_ratio(res['lo']):+.3g}, {ppl_ratio(res['hi']):+.3g}]"
    row[f"{label} differs"] = "yes" if res["excludes_zero"] else "no"
    row["_" + k] = res
  return [row]


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_sensitivity(out, path):
  plt = _plt()
  # Panels stacked, so that the figure keeps its size in a docs column.
  fig, axes = plt.subplots(3, 1, figsize=(4.4, 12))
  adam = out["grid"]["adam"][0]
  for ax, k, title in zip(axes, ("val", "id", "pydoc"),
                          ("ID validation", "ID test", "general text (pydoc)")):
    for key in TUNED:
      runs = out["grid"][key]
      ax.plot([r["strength"] for r in runs], [r[f"{k}_ppl"] for r in runs], "o-",
              color=COLORS[key], label=NAMES[key])
    ax.axhline(adam[f"{k}_ppl"], color=COLORS["adam"], ls="--", label="Adam (strength 0)")
    ax.axhline(out["pretrained"][f"{k}_ppl"], color=COLORS["pretrained"], ls=":",
               label="pre-trained")
    ax.set(xscale="log", xlabel="strength (AdamW: weight decay; Adam-SPD: λ)",
           ylabel="perplexity (lower is better)", title=title)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_frontier(out, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for f in out["frontier"]:
    pts = f["points"]
    ax.plot([p["id_ppl"] for p in pts], [p["pydoc_ppl"] for p in pts], "o-",
            color=COLORS[f["key"]], label=f"{NAMES[f['key']]} ({f['strength']:g})")
    for p in pts:
      ax.annotate(f"{p['alpha']:g}", (p["id_ppl"], p["pydoc_ppl"]), fontsize=7,
                  textcoords="offset points", xytext=(3, 3))
  ax.set(xlabel="ID perplexity (held-out chapters; lower is better)",
         ylabel="pydoc perplexity (general text; lower is better)",
         title="W0 + α·ΔW, seed 0 (labels: α)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(results_dir, out, cfg, seconds) -> dict:
  d = pathlib.Path(results_dir)
  base = out["pretrained"]
  diffs = paired_differences(out["finals"], cfg.n_boot)
  ppl_cols = lambda r: {"ID ppl": r["id_ppl"], "pydoc ppl": r["pydoc_ppl"],
                        "‖ΔW‖": r["delta_w_norm"]}
  grid = [{"method": NAMES[k], "strength": r["strength"], "val ppl": r["val_ppl"], **ppl_cols(r)}
          for k in ("adam", *TUNED) for r in out["grid"][k]]
  summary = [{"method": NAMES["pretrained"], "seeds": "", **ppl_cols(base), "pydoc rise %": 0.0}]
  for key, runs in out["finals"].items():
    col = lambda k: np.array([r[k] for r in runs])
    summary.append({"method": NAMES[key], "strength": runs[0]["strength"], "seeds": len(runs),
                    "ID ppl": f"{col('id_ppl').mean():.3f} ± {col('id_ppl').std():.3f}",
                    "pydoc ppl": f"{col('pydoc_ppl').mean():.3f} ± {col('pydoc_ppl').std():.3f}",
                    "pydoc rise %": float(100 * (col("pydoc_ppl").mean() / base["pydoc_ppl"] - 1)),
                    "‖ΔW‖": col("delta_w_norm").mean()})
  fronts = [{"method": NAMES[f["key"]], "strength": f["strength"], **p}
            for f in out["frontier"] for p in f["points"]]
  diff_cols = ["comparison", "seeds", "ID Δ%", "ID 95% CI", "ID differs",
               "pydoc rise Δ%", "pydoc rise 95% CI", "pydoc rise differs"]
  md = ["## Chosen strengths (mean ± std over seeds)\n",
        _markdown_table(summary, ["method", "strength", "seeds", "ID ppl", "pydoc ppl",
                                  "pydoc rise %", "‖ΔW‖"]),
        "\n## Paired differences (perplexity ratio − 1, %; 95% bootstrap CI over seeds and windows)\n",
        _markdown_table(diffs, diff_cols),
        "\n## Strength grid (seed 0)\n",
        _markdown_table(grid, ["method", "strength", "val ppl", "ID ppl", "pydoc ppl", "‖ΔW‖"]),
        "\n## Frontier (seed 0)\n",
        _markdown_table(fronts, ["method", "strength", "alpha", "id_ppl", "pydoc_ppl"]),
        "\n## Time (s)\n",
        _markdown_table([{"part": k, "seconds": v} for k, v in seconds.items()], ["part", "seconds"])]
  (d / "llm_study.md").write_text("".join(md))
  clean = [{k: v for k, v in r.items() if not k.startswith("_")}
           | {"id_nats": r["_id"], "pydoc_nats": r["_pydoc"]} for r in diffs]
  (d / "llm_study.json").write_text(json.dumps(
      {"chosen": out["chosen"], "differences": clean, "summary": summary, "grid": grid,
       "frontier": fronts, "seconds": seconds}, indent=1))
  plot_sensitivity(out, d / "llm_study_sensitivity.png")
  plot_frontier(out, d / "llm_study_frontier.png")
  return {"differences": diffs, "summary": summary}


def main(args, cfg) -> dict | None:
  d = pathlib.Path(args.results_dir)
  if not args.resume:
    for sub in ("runs", "checkpoints"):
      shutil.rmtree(d / sub, ignore_errors=True)
  start = time.perf_counter()
  study = Study(cfg, args)
  seconds = {"load": time.perf_counter() - start}
  try:
    out = study.execute()
  except Stopped as e:
    print(f"{e}; continue with --resume")
    return None
  seconds.update(study.seconds)
  # One clock reading per boundary, so that the parts add up to the total
  # (two readings a few microseconds apart left a gap).
  t = time.perf_counter()
  seconds["other (compiles, frontier bookkeeping)"] = t - start - sum(seconds.values())
  report = write(d, out, cfg, seconds)
  end = time.perf_counter()
  seconds["reports"] = end - t
  seconds["total"] = end - start
  (d / "llm_study_timing.json").write_text(json.dumps(
      {"preset": args.preset, "seconds": seconds["total"], "parts": seconds,
       "machine": machine()}, indent=1))
  print("where the time went (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
  for row in report["differences"]:
    print(f"{row['comparison']} ({row['seeds']} seeds): ID ppl {row['ID Δ%']:+.2f}% "
          f"{row['ID 95% CI']}, pydoc ppl rise {row['pydoc rise Δ%']:+.2f}% "
          f"{row['pydoc rise 95% CI']}")
  print(f"results in {d}/")
  return {**out, **report, "seconds": seconds}
