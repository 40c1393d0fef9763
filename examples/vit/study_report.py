"""Tables, intervals and figures of the ViT study (examples/vit/study.py)."""

import json
import pathlib

import numpy as np

from examples.common import _markdown_table
from examples import stats
from examples.vit.study import COLORS, NAMES, OOD_SETS, TUNED, block_order

PAIRS = (("spd", "adamw"), ("spd", "l2sp"), ("spd", "adam"))


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def correct(runs, labels, sets) -> dict[int, np.ndarray]:
  """seed -> per-image 1/0 over the given sets, concatenated."""
  return {r["seed"]: np.concatenate([np.asarray(r["preds"][k]) == labels[k] for k in sets])
          .astype(np.float64) * 100 for r in runs}


def paired_differences(finals, labels, n_boot, seed=0) -> list[dict]:
  """SPD minus each other method, paired by seed and test image."""
  rows = []
  n_ood = [len(labels[k]) for k in OOD_SETS]
  ood_strata = np.split(np.arange(sum(n_ood)), np.cumsum(n_ood)[:-1])
  for a, b in PAIRS:
    if len(finals.get(a, [])) < 2 or len(finals.get(b, [])) < 2:
      continue   # a reference run on one seed: no interval over seeds
    row = {"comparison": f"{NAMES[a]} − {NAMES[b]}"}
    for metric, sets, strata in (("ID", ["test"], None), ("mean OOD", list(OOD_SETS), ood_strata)):
      ca, cb = correct(finals[a], labels, sets), correct(finals[b], labels, sets)
      seeds = sorted(set(ca) & set(cb))
      res = stats.paired_bootstrap(np.stack([ca[s] for s in seeds]), np.stack([cb[s] for s in seeds]),
                                   strata=strata, n_boot=n_boot, seed=seed)
      row[f"{metric} diff"] = res["diff"]
      row[f"{metric} 95% CI"] = f"[{res['lo']:+.2f}, {res['hi']:+.2f}]"
      row[f"{metric} differs"] = "yes" if res["excludes_zero"] else "no"
      row["_" + metric] = res
    row["seeds"] = len(seeds)
    rows.append(row)
  return rows


def summary_rows(out) -> list[dict]:
  rows = []
  probe = out["probe"]
  rows.append({"method": NAMES["probe"], "strength": f"C={probe['strength']:g}", "seeds": 1,
               "ID test": probe["test"], **{k: probe[k] for k in OOD_SETS},
               "mean OOD": probe["ood_mean"], "‖θ−θ₀‖": 0.0})
  for key, runs in out["finals"].items():
    col = lambda k: np.array([r[k] for r in runs])
    # One seed (the plain-Adam reference) has no spread to show.
    spread = lambda k: f"{col(k).mean():.2f}" + (f" ± {col(k).std():.2f}" if len(runs) > 1 else "")
    rows.append({"method": NAMES[key], "strength": f"{runs[0]['strength']:g}", "seeds": len(runs),
                 "ID test": spread("test"), **{k: col(k).mean() for k in OOD_SETS},
                 "mean OOD": spread("ood_mean"), "‖θ−θ₀‖": col("deviation").mean()})
  return rows


def _fixed(rows, specs) -> list[dict]:
  """Rows with their float columns formatted by column (a format spec such
  as ".2f"), so the markdown tables can go into the docs as they are."""
  return [{c: format(v, specs[c]) if c in specs and isinstance(v, float) else v
           for c, v in r.items()} for r in rows]


def grid_point(run) -> dict:
  """A seed-0 grid run's scores as the grid measured them (first side_eval
  images per test set), also for the chosen run scored in full later."""
  return {**run, **run.get("grid_point", {})}


def plot_sensitivity(out, n_sets, path):
  """ID-val, ID-test and mean-OOD accuracy against strength, seed 0."""
  plt = _plt()
  # Panels stacked, so that the figure keeps its size in a docs column.
  fig, axes = plt.subplots(3, 1, figsize=(4.4, 12), sharex=True)
  adam = grid_point(out["grid"]["adam"][0])
  for ax, (metric, label) in zip(axes, (("val_acc", "ID validation"), ("test", "ID test"),
                                        ("ood_mean", "mean OOD"))):
    n = n_sets[metric]
    for key in TUNED:
      runs = sorted(map(grid_point, out["grid"][key]), key=lambda r: r["strength"])
      x = [r["strength"] for r in runs]
      y = [r[metric] for r in runs]
      err = [stats.binomial_halfwidth(v, n) for v in y]
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=COLORS[key], label=NAMES[key])
    ax.axhline(adam[metric], color=COLORS["adam"], ls="--", label="Adam (strength 0)")
    ax.axhline(out["probe"][metric if metric != "val_acc" else "val_acc"], color=COLORS["probe"],
               ls=":", label=NAMES["probe"])
    ax.set_xscale("log")
    ax.set_xlabel("strength (own scale per method; log)")
    ax.set_ylabel(f"{label} accuracy (%)")
    ax.set_title(f"{label} (seed 0; bars: 95% over {n} images)", fontsize=9)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


ALPHA_MARKERS = ("o", "^", "s", "D", "*")


def plot_frontier(out, n_sets, labels, path):
  """Mean-OOD against ID accuracy along θ0 + α(θ − θ0), seed 0. One colour
  per method, one marker per α (text labels would pile up where the curves
  meet)."""
  from matplotlib.lines import Line2D
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 5.2))
  alphas = sorted({p["alpha"] for f in out["frontier"] for p in f["points"]})
  marker = dict(zip(alphas, ALPHA_MARKERS * len(alphas)))
  for front in out["frontier"]:
    pts, color = front["points"], COLORS[front["key"]]
    x, y = [p["test"] for p in pts], [p["ood_mean"] for p in pts]
    ax.plot(x, y, color=color, lw=1.5, label=f"{front['method']} ({front['strength']:g})")
    for p, xi, yi in zip(pts, x, y):
      ax.errorbar([xi], [yi], xerr=[stats.binomial_halfwidth(xi, n_sets["test"])],
                  yerr=[stats.binomial_halfwidth(yi, n_sets["ood_mean"])], color=color,
                  marker=marker[p["alpha"]], ms=7, capsize=2, elinewidth=0.7, alpha=0.9)
  # The probe on the same images as the frontier points.
  probe = out["probe"]["preds"]
  n = n_sets["test"]
  acc = lambda k: float(np.mean(np.asarray(probe[k][:n]) == labels[k][:n]) * 100)
  ax.scatter([acc("test")], [np.mean([acc(k) for k in OOD_SETS])], marker="P", s=80,
             color=COLORS["probe"], label=NAMES["probe"], zorder=3)
  ax.set_xlabel(f"ID test accuracy (%, first {n} images)")
  ax.set_ylabel(f"mean OOD accuracy (%, first {n} images per set)")
  ax.set_title("ID–OOD frontier: θ₀ + α(θ − θ₀), head as trained (seed 0; bars: 95%)",
               fontsize=9)
  methods = ax.legend(fontsize=8, loc="lower right")
  ax.add_artist(methods)
  ax.legend([Line2D([], [], color="k", marker=marker[a], ls="none") for a in alphas],
            [f"α = {a:g}" for a in alphas], fontsize=8, loc="upper left", title="interpolation",
            title_fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def spd_heatmap_matrix(runs) -> tuple[list[str], list[int], np.ndarray]:
  """Blocks x logged steps: share of each block's leaves that SPD pulled back
  at that step, mean over the runs given."""
  rows = [h for r in runs for h in r["history"] if "spd_blocks" in h]
  blocks = block_order({b for h in rows for b in h["spd_blocks"]})
  steps = sorted({h["step"] for h in rows})
  mat = np.zeros((len(blocks), len(steps)))
  n = np.zeros_like(mat)
  for h in rows:
    j = steps.index(h["step"])
    for i, b in enumerate(blocks):
      if b in h["spd_blocks"]:
        mat[i, j] += h["spd_blocks"][b]["pulled"]
        n[i, j] += 1
  return blocks, steps, mat / np.maximum(n, 1)


def plot_layers(out, path):
  """Top: where SPD pulled back over training. Bottom: final ‖θ−θ₀‖ per block."""
  plt = _plt()
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.1, 9.6))
  spd = out["finals"]["spd"]
  blocks, steps, mat = spd_heatmap_matrix(spd)
  im = ax1.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                  extent=(steps[0] - 0.5, steps[-1] + 0.5, len(blocks) - 0.5, -0.5))
  ax1.set_yticks(range(len(blocks)), blocks, fontsize=7)
  ax1.set_xlabel("training step")
  ax1.set_ylabel("backbone block")
  ax1.set_title(f"Adam-SPD (λ={spd[0]['strength']:g}): share of the block's leaves "
                f"pulled back (mean of {len(spd)} seeds)", fontsize=9)
  fig.colorbar(im, ax=ax1, label="share of leaves with r_t > 0")
  keys = list(out["finals"])
  order = block_order(set(spd[0]["block_deviation"]))
  width = 0.8 / len(keys)
  for k, key in enumerate(keys):
    dev = np.array([[r["block_deviation"][b] for b in order] for r in out["finals"][key]])
    ax2.bar(np.arange(len(order)) + (k - (len(keys) - 1) / 2) * width, dev.mean(0), width,
            yerr=dev.std(0), capsize=1.5, color=COLORS[key], label=NAMES[key])
  ax2.set_xticks(range(len(order)), order, rotation=60, fontsize=7)
  ax2.set_ylabel("‖θ − θ₀‖ of the block (L2 norm, weight units)")
  ax2.set_title("final distance from the pre-trained weights, per block "
                "(mean ± std over seeds)", fontsize=9)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(results_dir, out, labels, cfg, timing) -> dict:
  """Writes study.{json,md} and the figures; returns what main prints."""
  d = pathlib.Path(results_dir)
  d.mkdir(parents=True, exist_ok=True)
  side = lambda k: min(cfg.side_eval or len(labels[k]), len(labels[k]))
  # Sizes behind the one-seed figures' error bars (grid points, frontier).
  n_sets = {"val_acc": len(labels["val"]), "test": side("test"),
            "ood_mean": sum(side(k) for k in OOD_SETS)}
  summary = summary_rows(out)
  diffs = paired_differences(out["finals"], labels, cfg.n_boot)
  grid = [{"method": r["method"], "strength": r["strength"], "val_acc": r["val_acc"],
           "ID test": r["test"], "mean OOD": r["ood_mean"], "‖θ−θ₀‖": r["deviation"]}
          for key in ("adam", *TUNED) for r in map(grid_point, out["grid"][key])]
  fronts = [{"method": f["method"], "alpha": p["alpha"], "ID test": p["test"],
             **{k: p[k] for k in OOD_SETS}, "mean OOD": p["ood_mean"]}
            for f in out["frontier"] for p in f["points"]]
  val_curve = [{"step": h["step"], "val_acc": h["val_acc"]}
               for h in out["grid"]["adam"][0]["history"] if "val_acc" in h]
  diff_cols = ["comparison", "seeds", "ID diff", "ID 95% CI", "ID differs",
               "mean OOD diff", "mean OOD 95% CI", "mean OOD differs"]
  acc = {k: ".2f" for k in ("val_acc", "ID test", *OOD_SETS, "mean OOD")}
  acc |= {"‖θ−θ₀‖": ".3f", "ID diff": "+.2f", "mean OOD diff": "+.2f"}
  md = ["## Methods at their chosen strengths (mean ± std over seeds)\n",
        _markdown_table(_fixed(summary, acc), ["method", "strength", "seeds", "ID test",
                                               *OOD_SETS, "mean OOD", "‖θ−θ₀‖"]),
        "\n## Paired differences (points; 95% bootstrap CI over seeds and test images)\n",
        _markdown_table(_fixed(diffs, acc), diff_cols),
        f"\n## Strength grid (seed 0; test sets: first {n_sets['test']} images each)\n",
        _markdown_table(_fixed(grid, acc),
                        ["method", "strength", "val_acc", "ID test", "mean OOD", "‖θ−θ₀‖"]),
        f"\n## Frontier (seed 0; first {n_sets['test']} images of each test set)\n",
        _markdown_table(_fixed(fronts, acc), ["method", "alpha", "ID test", *OOD_SETS, "mean OOD"]),
        "\n## Plain Adam, seed 0: ID-val accuracy during training\n",
        _markdown_table(val_curve, ["step", "val_acc"]),
        "\n## Time (s)\n",
        _markdown_table([{"part": k, "seconds": v} for k, v in timing.items()], ["part", "seconds"])]
  (d / "study.md").write_text("".join(md))
  clean = [{k: v for k, v in r.items() if not k.startswith("_")} | {
      "ID": r["_ID"], "mean OOD": r["_mean OOD"]} for r in diffs]
  (d / "study.json").write_text(json.dumps(
      {"summary": summary, "differences": clean, "grid": grid, "frontier": fronts,
       "val_curve": val_curve, "chosen": out["chosen"], "timing": timing}, indent=1))
  plot_sensitivity(out, n_sets, d / "study_sensitivity.png")
  plot_frontier(out, n_sets, labels, d / "study_frontier.png")
  plot_layers(out, d / "study_layers.png")
  return {"summary": summary, "differences": clean}
