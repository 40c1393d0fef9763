"""Fine-tunes a pre-trained DINOv2 ViT-S/14 on MNIST-5k with AdamW, L2-SP and
Adam-SPD, and measures how well each keeps its accuracy under distribution
shift (corrupted test images, and sklearn's digits).

  python -m examples.vit.finetune --preset cpu --results-dir results/vit

Each method searches its strength on one seed against an ID validation split
only; the chosen strength is then run on every seed and evaluated on the ID
test split and the OOD sets. See docs/examples/vit.md.
"""

import argparse
import functools
import json
import pathlib
import shutil
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import spd_optax
from examples import stats
from examples.common import (DEVIATION, STRENGTH_NAMES, Checkpointer, machine, method_color,
                             pyplot, save_figure, spd_log, strength_label, write_table)
from examples.vit import convert, data
from examples.vit.configs import PRESETS, STUDY_PRESETS, Config

METHODS = {"adamw": "AdamW", "l2sp": "L2-SP", "spd": "Adam-SPD"}


class Interrupted(Exception):
  """Raised by --interrupt-after, to exercise --resume without killing a process."""


# ---------------------------------------------------------------- optimizers

class L2SPState(NamedTuple):
  anchor: optax.Params


def l2_sp(alpha: float) -> optax.GradientTransformation:
  """L2-SP (Li et al., 2018): adds alpha * (θ - θ_0) to the gradient, the
  gradient of (alpha / 2) ‖θ - θ_0‖², with θ_0 the params given to `init`.

  Chained *before* Adam it is a penalty on the loss, so Adam rescales it like
  any gradient; that is what distinguishes it from `optax.add_decayed_weights`
  (decay toward 0, usually after the scaling, as in AdamW).
  """
  def init_fn(params):
    return L2SPState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("l2_sp needs the current params: tx.update(grads, state, params)")
    updates = jax.tree.map(lambda g, p, a: g + alpha * (p - a).astype(g.dtype),
                           updates, params, state.anchor)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def backbone_mask(params):
  """True for pre-trained leaves, False for the new head: pulling a randomly
  initialised head toward its initialisation has no meaning."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], "key", None) != "head", params)


@functools.cache
def make_optimizer(method: str, learning_rate: float, warmup_steps: int, steps: int,
                   head_lr_multiplier: float) -> optax.GradientTransformation:
  """The three methods side by side. `strength` is injected as optimizer
  state, and the transformation is built once per method (it is part of what
  nnx.jit keys its cache on), so one compiled train step serves every
  strength and seed of a method."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps)

  def adamw(learning_rate, strength):
    return optax.adamw(learning_rate, weight_decay=strength)

  def l2sp(learning_rate, strength):
    return optax.chain(optax.masked(l2_sp(strength), backbone_mask),
                       optax.adam(learning_rate))

  def spd(learning_rate, strength):
    return spd_optax.adam_spd(learning_rate, weight_decay=strength, mask=backbone_mask)

  factory = {"adamw": adamw, "l2sp": l2sp, "spd": spd}[method]
  tx = optax.inject_hyperparams(factory)(learning_rate=schedule, strength=0.0)
  # The new head starts from zero and must learn fast, while every Adam step
  # moves each pre-trained weight by about the learning rate: one rate for
  # both either leaves the head behind or scrambles the features early on.
  is_head = lambda params: jax.tree.map(lambda b: not b, backbone_mask(params))
  return optax.chain(tx, optax.masked(optax.scale(head_lr_multiplier), is_head))


# ------------------------------------------------------------ jitted pieces

@nnx.jit
def train_step(model, optimizer, images, labels):
  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model, images):
  return jnp.argmax(model(images), axis=-1)


@jax.jit
def distance(params, anchor):
  sq = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
  return jnp.sqrt(sum(jax.tree.leaves(sq)))


def backbone_params(model) -> dict:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {k: v for k, v in params.items() if k != "head"}


def batched(fn, images, batch: int, image_size: int) -> np.ndarray:
  """fn over 28x28 images, prepared for the model one batch at a time (26 OOD
  sets at 112 px would take gigabytes if prepared up front)."""
  n = len(images)
  # Pad to whole batches so every call has one shape and compiles once.
  x = np.concatenate([images, np.zeros((-n % batch, *images.shape[1:]), images.dtype)])
  return np.concatenate([np.asarray(fn(data.to_model_input(x[i:i + batch], image_size)))
                         for i in range(0, len(x), batch)])[:n]


def accuracy(model, images, labels, batch: int, image_size: int) -> float:
  """Top-1 accuracy in % on 28x28 images."""
  preds = batched(lambda x: predict(model, x), images, batch, image_size)
  return float(np.mean(preds == labels) * 100)


def load_weights(args) -> tuple[dict, dict]:
  """The backbone's state dict and config: --weights, else the pinned ONNX."""
  if args.weights:
    return convert.read_safetensors(args.weights)
  return convert.read_onnx(convert.onnx_path())


def training_steps(exp, name: str, start: int, total: int):
  """Yields (step, progress bar) for steps start..total-1; with
  --interrupt-after, stops between steps once `exp` has taken that many."""
  bar = tqdm(range(start, total), desc=name, initial=start, total=total,
             dynamic_ncols=True, file=sys.stderr)
  for step in bar:
    if exp.args.interrupt_after is not None and exp.steps_taken >= exp.args.interrupt_after:
      bar.close()
      raise Interrupted(f"stopped after {exp.steps_taken} steps (--interrupt-after)")
    yield step, bar


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The step's batch, a pure function of (seed, step), so a resumed run sees
  exactly the batches the uninterrupted run would have."""
  per_epoch = n // batch_size
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[i * batch_size:(i + 1) * batch_size]


# --------------------------------------------------------------------- runs

class Experiment:
  """Everything shared by the runs of one invocation."""

  def __init__(self, cfg: Config, args, sd, hf_config):
    self.cfg, self.args, self.sd, self.hf_config = cfg, args, sd, hf_config
    self.results_dir = pathlib.Path(args.results_dir)
    self.steps_taken = 0      # across runs, for --interrupt-after
    self.resumed = {}         # run name -> step it resumed from

    images, labels = data.load_mnist5k()
    splits = data.split(images, labels, n_train=cfg.n_train, n_val=cfg.n_val,
                        n_test=cfg.n_test, seed=cfg.data_seed)
    self.train = (data.to_model_input(splits["train"][0], cfg.image_size), splits["train"][1])
    self.val, self.test = splits["val"], splits["test"]
    self.ood = data.ood_sets(*splits["test"], severities=cfg.severities,
                             n_digits=cfg.n_digits, seed=cfg.data_seed)

    self.anchor = backbone_params(self.new_model(seed=0))

  def new_model(self, seed: int):
    return convert.pretrained_vit(self.sd, self.hf_config, image_size=self.cfg.image_size,
                                  num_layers=self.cfg.num_layers, num_classes=10, seed=seed)

  @staticmethod
  def run_name(method, strength, seed):
    return f"{method}_s{strength:g}_seed{seed}"

  def record_path(self, name):
    return self.results_dir / "runs" / f"{name}.json"

  def checkpoint_dir(self, name):
    return self.results_dir / "checkpoints" / name

  def run(self, method: str, strength: float, seed: int, *, with_ood: bool) -> dict:
    """Trains one (method, strength, seed) run, or picks it up where it stopped."""
    cfg = self.cfg
    name = self.run_name(method, strength, seed)
    path = self.record_path(name)
    if path.exists():
      record = json.loads(path.read_text())
      if record.get("ood") or not with_ood:
        return record

    model = self.new_model(seed)
    tx = make_optimizer(method, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
                        cfg.head_lr_multiplier)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.opt_state[0].hyperparams["strength"][...] = jnp.asarray(strength, jnp.float32)

    # Closed (its last save finished) before the run's files are read or removed.
    with Checkpointer(self.checkpoint_dir(name)) as ckpt:
      start = 0
      latest = ckpt.latest_step()
      if latest is not None:
        # Model and optimizer together: the optimizer state holds the anchors
        # (SPD's, L2-SP's) and Adam's moments, all of which a resume needs.
        state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        restored = ckpt.restore(latest, {k: nnx.to_pure_dict(v) for k, v in state.items()})
        for key, module in (("model", model), ("opt", optimizer)):
          nnx.replace_by_pure_dict(state[key], restored[key])
          nnx.update(module, state[key])
        start = latest
        self.resumed[name] = latest

      log_file = self.checkpoint_dir(name) / "history.json"
      history = []
      if path.exists():
        history = json.loads(path.read_text())["history"]
      elif start and log_file.exists():
        history = [h for h in json.loads(log_file.read_text()) if h["step"] <= start]
      if start < cfg.steps:
        for step, bar in training_steps(self, name, start, cfg.steps):
          idx = batch_indices(len(self.train[0]), cfg.batch_size, seed, step)
          loss = train_step(model, optimizer, self.train[0][idx], self.train[1][idx])
          self.steps_taken += 1
          done = step + 1
          if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "loss": float(loss),
                   "deviation": float(distance(backbone_params(model), self.anchor)),
                   **{f"spd_{k}": v for k, v in spd_log(optimizer.opt_state).items()}}
            history.append(row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "step"})
          if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            ckpt.save(done, {"model": nnx.to_pure_dict(nnx.state(model)),
                             "opt": nnx.to_pure_dict(nnx.state(optimizer))})
            log_file.write_text(json.dumps(history))

    record = {
        "method": METHODS[method], "key": method, "strength": strength, "seed": seed,
        "val_acc": accuracy(model, *self.val, cfg.eval_batch, cfg.image_size),
        "deviation": float(distance(backbone_params(model), self.anchor)),
        "history": history,
    }
    if with_ood:
      record["id_acc"] = accuracy(model, *self.test, cfg.eval_batch, cfg.image_size)
      record["ood"] = {shift: accuracy(model, x, y, cfg.eval_batch, cfg.image_size)
                       for shift, (x, y) in tqdm(self.ood.items(), desc=f"{name} OOD",
                                                 leave=False, file=sys.stderr)}
      record["ood_mean"] = float(np.mean(list(record["ood"].values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record

  def method(self, method: str) -> tuple[list[dict], list[dict]]:
    """Strength search on the search seed, then all seeds at the chosen strength."""
    cfg = self.cfg
    strengths = cfg.strengths[method]
    search = [self.run(method, s, cfg.search_seed, with_ood=len(strengths) == 1)
              for s in strengths]
    # Ties go to the weaker strength: less regularisation for the same accuracy.
    best = max(search, key=lambda r: (r["val_acc"], -r["strength"]))["strength"]
    finals = [self.run(method, best, seed, with_ood=True) for seed in cfg.seeds]
    # The finals' numbers are on disk now; their checkpoints aren't needed.
    for s in strengths:
      for seed in {cfg.search_seed, *cfg.seeds}:
        shutil.rmtree(self.checkpoint_dir(self.run_name(method, s, seed)), ignore_errors=True)
    return search, finals


# ------------------------------------------------------------------ reports

def summarise(finals: list[dict]) -> list[dict]:
  rows = []
  for key in dict.fromkeys(r["key"] for r in finals):
    runs = [r for r in finals if r["key"] == key]
    mean = lambda f: float(np.mean([f(r) for r in runs]))
    std = lambda f: float(np.std([f(r) for r in runs]))
    row = {"method": runs[0]["method"], "strength": runs[0]["strength"], "seeds": len(runs),
           "id_acc": mean(lambda r: r["id_acc"]), "id_std": std(lambda r: r["id_acc"]),
           "ood_mean": mean(lambda r: r["ood_mean"]), "ood_std": std(lambda r: r["ood_mean"]),
           "deviation": mean(lambda r: r["deviation"])}
    for shift in runs[0]["ood"]:
      row[shift] = mean(lambda r: r["ood"][shift])
    rows.append(row)
  return rows


def write_reports(results_dir, searches, finals, cfg: Config, preset: str):
  shifts = list(finals[0]["ood"])
  per_run = [{k: v for k, v in r.items() if k not in ("history", "ood")} | r["ood"]
             for r in finals]
  common = ["method", "strength"]
  per_run = write_table(results_dir, "vit", per_run,
                        common + ["seed", "val_acc", "id_acc", "ood_mean", "deviation"])
  summary = write_table(results_dir, "vit_summary", summarise(finals),
                        common + ["seeds", "id_acc", "id_std", "ood_mean", "ood_std", "deviation"])
  write_table(results_dir, "vit_shifts", summary, ["method"] + shifts)
  search_rows = write_table(
      results_dir, "vit_search",
      [{k: v for k, v in r.items() if k in ("method", "strength", "seed", "val_acc", "deviation")}
       for r in searches], common + ["seed", "val_acc", "deviation"])
  title = f"ViT-S/14 on MNIST-5k, {preset} preset"
  d = pathlib.Path(results_dir)
  plot_runs(per_run, title, d / "vit.png")
  plot_summary(summary, title, d / "vit_summary.png")
  plot_shifts(per_run, shifts, title, d / "vit_shifts.png")
  plot_search(search_rows, {r["method"]: r["strength"] for r in finals}, cfg.n_val, title,
              d / "vit_search.png")
  return summary


# ------------------------------------------------------------------ figures
# They take the rows of the tables above (the .json files), so a figure can
# be redrawn from a run's results without running it again.

def _by_method(rows):
  return {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}


def plot_runs(rows, title, path):
  """Every final run: ID and mean OOD accuracy against the distance moved."""
  plt = pyplot()
  # Panels stacked, so that the figure keeps its size in a docs column.
  fig, axes = plt.subplots(2, 1, figsize=(6.4, 7.0), sharex=True)
  for ax, key, label in zip(axes, ("id_acc", "ood_mean"),
                            ("ID test accuracy (%)", "mean OOD accuracy (%, all shifted sets)")):
    for method, runs in _by_method(rows).items():
      ax.scatter([r["deviation"] for r in runs], [r[key] for r in runs], s=36, alpha=0.85,
                 color=method_color(method), label=strength_label(method, runs[0]["strength"]))
    ax.set(xlabel=DEVIATION, ylabel=label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{title}: one point per seed", fontsize=10)
  save_figure(fig, path)


def plot_summary(summary, title, path):
  """ID against mean OOD accuracy per method, mean ± std over seeds."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 5.2))
  for r in summary:
    ax.errorbar([r["id_acc"]], [r["ood_mean"]], xerr=[r["id_std"]], yerr=[r["ood_std"]],
                fmt="o", ms=7, capsize=4, color=method_color(r["method"]),
                label=f"{strength_label(r['method'], r['strength'])}, ‖θ − θ₀‖ {r['deviation']:.2f}")
  ax.set(xlabel="ID test accuracy (%)", ylabel="mean OOD accuracy (%)")
  ax.set_title(f"{title}: mean ± std over {int(summary[0]['seeds'])} seeds", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
  save_figure(fig, path)


def plot_shifts(rows, shifts, title, path):
  """Accuracy per corruption against its severity, and on the other shifted
  sets; mean over the rows of a method, bars ± std when it has several."""
  plt = pyplot()
  kinds = {}                                    # "blur" -> [(1, "blur-1"), ...]
  others = []
  for shift in shifts:
    kind, _, severity = shift.rpartition("-")
    if kind and severity.isdigit():
      kinds.setdefault(kind, []).append((int(severity), shift))
    else:
      others.append(shift)
  panels = list(kinds) + (["other sets"] if others else [])
  cols = min(2, len(panels))
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.9 * nrows), sharey=True,
                           squeeze=False)
  methods = _by_method(rows)
  for ax, panel in zip(axes.flat, panels):
    for k, (method, runs) in enumerate(methods.items()):
      acc = lambda shift: np.array([r[shift] for r in runs])
      std = lambda shift: acc(shift).std() if len(runs) > 1 else 0.0
      if panel in kinds:
        x = [sev for sev, _ in kinds[panel]]
        y = [acc(shift).mean() for _, shift in kinds[panel]]
        err = [std(shift) for _, shift in kinds[panel]]
      else:   # one x position per set, the methods side by side
        x = [i + (k - (len(methods) - 1) / 2) * 0.15 for i in range(len(others))]
        y = [acc(shift).mean() for shift in others]
        err = [std(shift) for shift in others]
      ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3,
                  ls="-" if panel in kinds else "none", color=method_color(method),
                  label=strength_label(method, runs[0]["strength"]))
    if panel in kinds:
      ax.set(title=panel.replace("_", " "), xlabel="severity (1 mild … 5 strong)",
             xticks=[sev for sev, _ in kinds[panel]])
    else:
      ax.set(title="other shifted sets", xticks=range(len(others)),
             xticklabels=[o.replace("_", " ") for o in others], xlim=(-0.6, len(others) - 0.4))
    ax.grid(alpha=0.3)
  for ax in axes[:, 0]:
    ax.set_ylabel("accuracy (%)")
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  axes.flat[0].legend(fontsize=7)
  some = next(iter(methods.values()))
  spread = f"mean ± std over {len(some)} seeds" if len(some) > 1 else "mean over seeds"
  fig.suptitle(f"{title}: accuracy per shift and severity ({spread})", fontsize=10)
  save_figure(fig, path)


def plot_search(rows, chosen, n_val, title, path):
  """Each method's strength search: ID validation accuracy and distance moved
  against the strength (its own scale per method); the chosen one ringed."""
  plt = pyplot()
  methods = _by_method(rows)
  fig, axes = plt.subplots(2, len(methods), figsize=(2.2 * len(methods), 5.4), sharex="col",
                           squeeze=False)
  for col, (method, runs) in enumerate(methods.items()):
    runs = sorted(runs, key=lambda r: r["strength"])
    x = [r["strength"] for r in runs]
    color = method_color(method)
    top, bottom = axes[0, col], axes[1, col]
    val = [r["val_acc"] for r in runs]
    top.errorbar(x, val, yerr=[stats.binomial_halfwidth(v, n_val) for v in val],
                 marker="o", capsize=3, color=color)
    bottom.plot(x, [r["deviation"] for r in runs], "o-", color=color)
    for ax, ys in ((top, val), (bottom, [r["deviation"] for r in runs])):
      for xi, yi in zip(x, ys):
        if xi == chosen.get(method):
          ax.scatter([xi], [yi], s=160, facecolors="none", edgecolors="k", zorder=3,
                     label="chosen" if ax is top else None)
      ax.set_xscale("log")
      ax.grid(alpha=0.3)
    top.set_title(method, color=color)
    bottom.set_xticks(x, [f"{v:g}" for v in x])
    bottom.minorticks_off()
    bottom.set_xlabel(f"{STRENGTH_NAMES.get(method, 'strength')} (log scale)")
  axes[0, 0].set_ylabel(f"ID val. accuracy (%)\nbars: 95%, {n_val} images")
  axes[1, 0].set_ylabel(DEVIATION.replace(" (", "\n("))
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"{title}: strength search (seed {int(rows[0]['seed'])}, chosen on ID validation)",
               fontsize=10)
  save_figure(fig, path)


# --------------------------------------------------------------------- main

def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS) + sorted(STUDY_PRESETS), default="cpu",
                 help="study / study-smoke: the statistical comparison of examples/vit/study.py")
  p.add_argument("--results-dir", default="results/vit")
  p.add_argument("--resume", action="store_true",
                 help="keep finished runs and continue unfinished ones from their checkpoints")
  p.add_argument("--weights", default=None,
                 help="an HF Dinov2Model .safetensors file to use instead of the ONNX "
                      "weights (a config.json beside it gives the number of heads)")
  p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
  p.add_argument("--interrupt-after", type=int, default=None,
                 help="stop after this many training steps in all (to try --resume)")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.preset in STUDY_PRESETS:
    return study_main(args)
  cfg = PRESETS[args.preset]
  results_dir = pathlib.Path(args.results_dir)
  if not args.resume:
    for sub in ("runs", "checkpoints"):
      shutil.rmtree(results_dir / sub, ignore_errors=True)
  start = time.time()
  sd, hf_config = load_weights(args)
  exp = Experiment(cfg, args, sd, hf_config)

  searches, finals = [], []
  for method in args.methods:
    search, final = exp.method(method)
    searches += search
    finals += final
  summary = write_reports(results_dir, searches, finals, cfg, args.preset)
  seconds = time.time() - start
  (results_dir / "vit_timing.json").write_text(json.dumps(
      {"preset": args.preset, "seconds": seconds, "backend": jax.default_backend(),
       "devices": [str(d) for d in jax.devices()]}, indent=1))
  for row in summary:
    print(f"{row['method']:>9} (strength {row['strength']:g}): ID {row['id_acc']:.1f}%  "
          f"OOD {row['ood_mean']:.1f}%  ‖θ-θ₀‖ {row['deviation']:.3g}")
  print(f"{seconds:.0f}s; results in {results_dir}/")
  return {"summary": summary, "finals": finals, "searches": searches,
          "resumed": exp.resumed, "seconds": seconds}


def study_main(args) -> dict:
  """The `study` presets: every method, 5 seeds, intervals, frontier, per-layer view."""
  from examples.vit import study, study_report
  cfg = STUDY_PRESETS[args.preset]
  results_dir = pathlib.Path(args.results_dir)
  if not args.resume:
    for sub in ("runs", "checkpoints"):
      shutil.rmtree(results_dir / sub, ignore_errors=True)
    (results_dir / "anchor_features.npz").unlink(missing_ok=True)
  start = time.perf_counter()
  timer = study.Timer()
  t = time.perf_counter()
  sd, hf_config = load_weights(args)
  timer.add("weights", t)
  exp = study.Study(cfg, args, sd, hf_config, timer)
  out = exp.execute()
  labels = {k: v[1] for k, v in exp.sets.items()}
  # One clock reading per boundary, so that the parts add up to the total.
  t = time.perf_counter()
  timing = dict(timer.seconds)
  # Reports are quick; what is left (compiles, model builds) is "other".
  timing["other (compiles, model builds)"] = t - start - sum(timing.values())
  report = study_report.write(results_dir, out, labels, cfg, timing)
  end = time.perf_counter()
  timing["reports"] = end - t
  seconds = end - start
  timing["total"] = seconds
  (results_dir / "vit_timing.json").write_text(json.dumps(
      {"preset": args.preset, "seconds": seconds, "parts": timing,
       "machine": machine(), "resumed": exp.resumed}, indent=1))
  print("where the time went (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))
  for row in report["differences"]:
    print(f"{row['comparison']} ({row['seeds']} seeds): ID {row['ID diff']:+.2f} {row['ID 95% CI']}, "
          f"mean OOD {row['mean OOD diff']:+.2f} {row['mean OOD 95% CI']}")
  print(f"{seconds:.0f}s; results in {results_dir}/")
  return {**out, **report, "resumed": exp.resumed, "seconds": seconds, "timing": timing}


if __name__ == "__main__":
  try:
    main()
  except Interrupted as e:
    sys.exit(f"{e}; run again with --resume to continue")
