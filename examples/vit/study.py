"""The `study` preset of examples.vit.finetune: can the methods be told apart?

  python -m examples.vit.finetune --preset study --results-dir results/vit_study

Full fine-tuning of DINOv2 ViT-S/14 at 56 px with plain Adam, AdamW, L2-SP and
Adam-SPD, and a linear probe on the frozen backbone, whose head every
fine-tuning run starts from (LP-FT). Seed 0 runs every
method over a grid of strengths (plain Adam, strength 0, is the grid's
shared first point); each method's strength is chosen on ID validation only
and run on the other seeds. Every run keeps its per-image predictions, so
the differences between methods get paired bootstrap intervals over seeds
and test images (examples/stats.py). The chosen seed-0 runs are also
evaluated along θ0 + α(θ - θ0) (the ID–OOD frontier), and SPD's per-leaf
state is logged during training (the per-block heatmap).
"""

import json
import pathlib
import re
import shutil
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.common import Checkpointer, method_color, method_name, spd_log
from examples.vit import data
from examples.vit.finetune import (backbone_params, batch_indices, batched, make_optimizer,
                                   predict, training_steps)
from spd_optax.state import spd_states_with_paths

NAMES = {k: method_name(k) for k in ("probe", "adam", "adamw", "l2sp", "spd")}
# One colour per method in every figure of both examples (examples/common.py).
COLORS = {k: method_color(k) for k in NAMES}
TUNED = ("adamw", "l2sp", "spd")
OOD_SETS = ("corrupt", "digits", "fonts")
EVAL_SETS = ("test", *OOD_SETS)   # ID test, then the OOD sets


class Timer:
  """Wall seconds per category, to print where the time went."""

  def __init__(self):
    self.seconds = defaultdict(float)

  def add(self, key, start):
    self.seconds[key] += time.perf_counter() - start


# ------------------------------------------------------------ jitted pieces

@nnx.jit
def grad_step(model, images, labels):
  """Forward and backward only; the optimizer step is timed apart."""
  import optax

  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return nnx.value_and_grad(loss_fn)(model)


@nnx.jit
def apply_step(model, optimizer, grads):
  optimizer.update(model, grads)


@nnx.jit
def pooled_features(model, images):
  """What the head reads: class token and mean patch token, concatenated."""
  tokens = model.features(images)
  return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)


def block_of(path: str) -> str | None:
  """Groups a leaf path into the unit the per-layer plots show."""
  m = re.search(r"\['blocks'\]\[(\d+)\]", path)
  if m:
    return f"block {int(m.group(1))}"
  if "'head'" in path:
    return None
  if "'norm'" in path:
    return "final norm"
  return "embed"


def block_order(names) -> list[str]:
  blocks = sorted((n for n in names if n.startswith("block")), key=lambda n: int(n.split()[1]))
  return [n for n in ("embed",) if n in names] + blocks + [
      n for n in ("final norm",) if n in names]


def per_block_distance(params, anchor) -> dict[str, float]:
  """‖θ - θ0‖ per block of the backbone."""
  sq = defaultdict(float)
  flat_a = dict(jax.tree_util.tree_flatten_with_path(anchor)[0])
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    block = block_of(jax.tree_util.keystr(path))
    if block is not None:
      sq[block] += float(np.sum((np.asarray(p, np.float64) - np.asarray(flat_a[path])) ** 2))
  return {k: float(np.sqrt(v)) for k, v in sq.items()}


def spd_per_block(opt_state) -> dict[str, dict[str, float]]:
  """From SPD's own state: per block, the share of its leaves pulled back at
  the last step (ratio > 0) and their mean ratio. Values may be arrays per
  leaf (stacked layers) in other models, hence np.asarray, not float."""
  pulled, ratio, count = defaultdict(float), defaultdict(float), defaultdict(int)
  for _, state in spd_states_with_paths(opt_state):
    for path, r in jax.tree_util.tree_flatten_with_path(state.ratio)[0]:
      block = block_of(jax.tree_util.keystr(path))
      if block is None:
        continue
      r = np.asarray(r, np.float64).ravel()
      pulled[block] += float(np.sum(r > 0))
      ratio[block] += float(np.sum(r))
      count[block] += r.size
  return {b: {"pulled": pulled[b] / count[b], "ratio": ratio[b] / count[b]} for b in count}


def interpolate(params, anchor, alpha):
  """θ0 + α(θ - θ0) on the backbone leaves in `anchor`; the rest as given."""
  return jax.tree.map(lambda p, a: a + alpha * (p - a), params, anchor)


# ---------------------------------------------------------------- the study

class Study:
  """All runs of one `study` invocation, each saved as it finishes."""

  def __init__(self, cfg, args, sd, hf_config, timer: Timer):
    import examples.vit.convert as convert
    self.cfg, self.args, self.timer = cfg, args, timer
    self.convert, self.sd, self.hf_config = convert, sd, hf_config
    self.dir = pathlib.Path(args.results_dir)
    self.steps_taken = 0
    self.resumed = {}
    self.compiled = set()

    t = time.perf_counter()
    images, labels = data.load_mnist5k()
    splits = data.split(images, labels, n_train=cfg.n_train, n_val=cfg.n_val,
                        n_test=cfg.n_test, seed=cfg.data_seed)
    self.train = (data.to_model_input(splits["train"][0], cfg.image_size), splits["train"][1])
    self.sets = {"val": splits["val"], "test": splits["test"]}
    self.sets.update(study_ood_sets(*splits["test"], n=cfg.n_ood,
                                    severity=cfg.corruption_severity, seed=cfg.data_seed))
    self.timer.add("data", t)
    self.anchor = backbone_params(self.new_model(0))

  def new_model(self, seed):
    return self.convert.pretrained_vit(self.sd, self.hf_config, image_size=self.cfg.image_size,
                                       num_layers=self.cfg.num_layers, num_classes=10, seed=seed)

  def _batched(self, fn, images):
    return batched(fn, images, self.cfg.eval_batch, self.cfg.image_size)

  def predictions(self, model, names, start=0, stop=None) -> dict[str, list[int]]:
    """Predicted classes of images start..stop of each named set."""
    t = time.perf_counter()
    out = {k: self._batched(lambda x: predict(model, x), self.sets[k][0][start:stop]).tolist()
           for k in names}
    self.timer.add("evaluation", t)
    return out

  def accuracy(self, preds, name) -> float:
    """Of the set's first len(preds) images: grid points and the frontier
    are scored on the first side_eval images of each test set."""
    return float(np.mean(np.asarray(preds) == self.sets[name][1][:len(preds)]) * 100)

  def summarise_preds(self, preds) -> dict:
    acc = {k: self.accuracy(v, k) for k, v in preds.items()}
    if all(k in acc for k in OOD_SETS):
      acc["ood_mean"] = float(np.mean([acc[k] for k in OOD_SETS]))
    return acc

  # ------------------------------------------------------------ linear probe

  def probe(self) -> dict:
    """Logistic regression on the frozen θ0 features; C chosen on ID val.
    It is deterministic given the features, so it is one run, not five."""
    path = self.dir / "runs" / "probe.json"
    if path.exists():
      return json.loads(path.read_text())
    from sklearn.linear_model import LogisticRegression
    feats = self.anchor_features()
    n = self.cfg.probe_train
    t = time.perf_counter()
    fits = []
    for c in self.cfg.probe_C:
      clf = LogisticRegression(C=c, max_iter=2000).fit(feats["train"], self.train[1][:n])
      fits.append((float(np.mean(clf.predict(feats["val"]) == self.sets["val"][1]) * 100), -c, clf))
    val, neg_c, clf = max(fits, key=lambda f: f[:2])
    self.timer.add("linear probe fit", t)
    preds = {k: clf.predict(feats[k]).tolist() for k in EVAL_SETS}
    record = {"key": "probe", "method": NAMES["probe"], "strength": -neg_c, "seed": 0,
              "val_acc": val, "preds": preds, **self.summarise_preds(preds),
              "head": {"kernel": clf.coef_.T.tolist(), "bias": clf.intercept_.tolist()},
              "search": [{"strength": -nc, "val_acc": v} for v, nc, _ in fits]}
    return self._save(path, record)

  def anchor_features(self) -> dict[str, np.ndarray]:
    """θ0's pooled features of every set, computed once: the probe and every
    method's α = 0 point (θ0 with its own head) read them."""
    cache = self.dir / "anchor_features.npz"
    if cache.exists():
      feats = dict(np.load(cache))
      # A cache from a version with other evaluation sets is recomputed.
      if set(feats) == {"train", "val", *EVAL_SETS}:
        return feats
    model = self.new_model(0)
    t = time.perf_counter()
    n = self.cfg.probe_train
    # The training images are already at model size; the others are 28x28.
    train = np.concatenate([np.asarray(pooled_features(model, self.train[0][i:i + self.cfg.eval_batch]))
                            for i in range(0, n, self.cfg.eval_batch)])[:n]
    feats = {"train": train, **{k: self._batched(lambda x: pooled_features(model, x), self.sets[k][0])
                                for k in ("val", *EVAL_SETS)}}
    self.timer.add("θ0 features (probe, α=0)", t)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **feats)
    return feats

  # --------------------------------------------------------- fine-tune runs

  @staticmethod
  def run_name(key, strength, seed):
    return f"{key}_s{strength:g}_seed{seed}"

  def _save(self, path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record

  def run(self, key: str, strength: float, seed: int, *, with_val: bool) -> dict:
    """Fine-tunes one (method, strength, seed), or reads it back. Plain Adam
    is SPD's optimizer with λ = 0 (no projection)."""
    cfg = self.cfg
    name = self.run_name(key, strength, seed)
    path = self.dir / "runs" / f"{name}.json"
    if path.exists():
      return json.loads(path.read_text())
    model = self.new_model(seed)
    if cfg.head_init == "probe":
      self._init_head_from_probe(model)
    elif cfg.head_init != "zero":
      raise ValueError(f"head_init is {cfg.head_init!r}; use 'probe' or 'zero'")
    tx = make_optimizer("spd" if key == "adam" else key, cfg.learning_rate, cfg.warmup_steps,
                        cfg.steps, cfg.head_lr_multiplier)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.opt_state[0].hyperparams["strength"][...] = jnp.asarray(strength, jnp.float32)
    ckpt_dir = self.dir / "checkpoints" / name
    # One manager per run; leaving the block waits for a save in flight,
    # so an interrupted run resumes from its last checkpoint.
    with Checkpointer(ckpt_dir) as ckpt:
      start, history = self._restore(name, ckpt, model, optimizer)
      val_curve = key == "adam" and seed == cfg.seeds[0]

      for step, _ in training_steps(self, name, start, cfg.steps):
        idx = batch_indices(len(self.train[0]), cfg.batch_size, seed, step)
        # A jitted function's first call per optimizer compiles: timed apart.
        first = key not in self.compiled
        self.compiled.add(key)
        t = time.perf_counter()
        loss, grads = grad_step(model, self.train[0][idx], self.train[1][idx])
        jax.block_until_ready(grads)
        self.timer.add("compile (first steps)" if first else "forward/backward", t)
        t = time.perf_counter()
        apply_step(model, optimizer, grads)
        jax.block_until_ready(nnx.state(model))
        self.timer.add("compile (first steps)" if first else "optimizer step", t)
        self.steps_taken += 1
        done = step + 1
        # The validation curve has its own period: a multiple of log_every
        # would otherwise be needed for it to be read at all.
        val_due = val_curve and done % cfg.val_curve_every == 0
        if done % cfg.log_every == 0 or done == cfg.steps or val_due:
          t = time.perf_counter()
          row = {"step": done, "loss": float(loss),
                 **{f"spd_{k}": v for k, v in spd_log(optimizer.opt_state).items()}}
          if key in ("spd", "adam"):
            row["spd_blocks"] = spd_per_block(optimizer.opt_state)
          self.timer.add("logging", t)
          if val_due:   # timed as evaluation by predictions(), not twice
            row["val_acc"] = self.accuracy(self.predictions(model, ["val"])["val"], "val")
          history.append(row)
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
          t = time.perf_counter()
          ckpt.save(done, {"model": nnx.to_pure_dict(nnx.state(model)),
                           "opt": nnx.to_pure_dict(nnx.state(optimizer))})
          (ckpt_dir / "history.json").write_text(json.dumps(history))
          self.timer.add("checkpoints", t)
      t = time.perf_counter()
      ckpt.wait()   # for the last save, written while training went on
      self.timer.add("checkpoints", t)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if with_val:
      # A grid point: validation in full, the test sets on their first
      # side_eval images; complete() scores the rest if it is chosen.
      preds = {**self.predictions(model, ["val"]),
               **self.predictions(model, EVAL_SETS, stop=cfg.side_eval)}
    else:
      preds = self.predictions(model, EVAL_SETS)
    record = {"key": key, "method": NAMES[key], "strength": strength, "seed": seed,
              "preds": preds, **self.summarise_preds(preds),
              "deviation": float(np.sqrt(sum(v ** 2 for v in per_block_distance(
                  backbone_params(model), self.anchor).values()))),
              "block_deviation": per_block_distance(backbone_params(model), self.anchor),
              "history": history}
    if with_val:
      record["val_acc"] = record.pop("val")
    if seed == cfg.seeds[0]:
      # Kept until the frontier is evaluated: only the chosen run's is needed.
      np.savez(self.dir / "runs" / f"{name}.params.npz",
               **{jax.tree_util.keystr(p): np.asarray(v)
                  for p, v in jax.tree_util.tree_flatten_with_path(params)[0]})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return self._save(path, record)

  def _init_head_from_probe(self, model):
    """LP-FT (Kumar et al., 2022): every fine-tuning run starts from the
    linear probe's head. From a zero head, the first steps' gradients are
    the head's error pushed into the features, and a short run spends them
    rebuilding what the probe already knows (measured: plain Adam at 36 %
    ID after 24 steps from a zero head, the probe at 90 %)."""
    head = self.probe()["head"]
    model.head.kernel[...] = jnp.asarray(head["kernel"], jnp.float32)
    model.head.bias[...] = jnp.asarray(head["bias"], jnp.float32)

  def _restore(self, name, ckpt, model, optimizer):
    latest = ckpt.latest_step()
    if latest is None:
      return 0, []
    state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    restored = ckpt.restore(latest, {k: nnx.to_pure_dict(v) for k, v in state.items()})
    for key, module in (("model", model), ("opt", optimizer)):
      nnx.replace_by_pure_dict(state[key], restored[key])
      nnx.update(module, state[key])
    self.resumed[name] = latest
    history = json.loads((ckpt.directory / "history.json").read_text())
    return latest, [h for h in history if h["step"] <= latest]

  # --------------------------------------------------------------- frontier

  def _trained(self, run):
    """(model, its Param state, the trained weights as a pure dict) of a
    seed-0 run, from the weights it saved."""
    name = self.run_name(run["key"], run["strength"], run["seed"])
    flat = dict(np.load(self.dir / "runs" / f"{name}.params.npz"))
    model = self.new_model(run["seed"])
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    trained = jax.tree.unflatten(jax.tree.structure(pure), [flat[p] for p in paths])
    nnx.replace_by_pure_dict(state, trained)
    nnx.update(model, state)
    return model, state, trained

  def complete(self, run: dict) -> dict:
    """A chosen grid point scored on the whole test sets, its grid-point
    scores (first side_eval images) kept under "grid_point"."""
    if all(len(run["preds"][k]) == len(self.sets[k][1]) for k in EVAL_SETS):
      return run
    model, _, _ = self._trained(run)
    rest = {k: self.predictions(model, [k], start=len(run["preds"][k]))[k] for k in EVAL_SETS}
    preds = {k: run["preds"][k] + rest[k] for k in EVAL_SETS}
    record = {**run, "grid_point": {k: run[k] for k in (*EVAL_SETS, "ood_mean")},
              "preds": {**run["preds"], **preds}, **self.summarise_preds(preds)}
    return self._save(self.dir / "runs" / f"{self.run_name(run['key'], run['strength'], run['seed'])}.json",
                      record)

  def frontier(self, run: dict) -> dict:
    """ID and OOD accuracy along θ0 + α(θ - θ0), the head as trained, on
    the first side_eval images of each test set."""
    path = self.dir / "runs" / f"frontier_{run['key']}.json"
    if path.exists():
      return json.loads(path.read_text())
    model, state, trained = self._trained(run)
    head = trained["head"]
    n = self.cfg.side_eval
    points = []
    for alpha in self.cfg.alphas:
      if alpha == 1:
        acc = self.summarise_preds({k: run["preds"][k][:n] for k in EVAL_SETS})
      elif alpha == 0:
        # θ0 with this run's head: the cached θ0 features make it free.
        feats = self.anchor_features()
        preds = {k: np.argmax(feats[k][:n] @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                              axis=-1).tolist() for k in EVAL_SETS}
        acc = self.summarise_preds(preds)
      else:
        mixed = dict(trained)
        mixed.update(interpolate({k: v for k, v in trained.items() if k != "head"},
                                 self.anchor, alpha))
        nnx.replace_by_pure_dict(state, mixed)
        nnx.update(model, state)
        acc = self.summarise_preds(self.predictions(model, EVAL_SETS, stop=n))
      points.append({"alpha": alpha, **acc})
    record = {"key": run["key"], "method": run["method"], "strength": run["strength"],
              "points": points}
    return self._save(path, record)

  # ------------------------------------------------------------------ plan

  def execute(self) -> dict:
    cfg = self.cfg
    seed0, others = cfg.seeds[0], cfg.seeds[1:]
    if unknown := set(cfg.final_methods) - {"adam", *TUNED}:
      raise ValueError(f"final_methods has {sorted(unknown)}; choose from adam, {', '.join(TUNED)}")
    probe = self.probe()
    # Seed 0: the strength grids, plain Adam (strength 0) first: it is every grid's 0.
    grid = {"adam": [self.run("adam", 0.0, seed0, with_val=True)]}
    for key in TUNED:
      grid[key] = [self.run(key, s, seed0, with_val=True) for s in cfg.strengths[key]]
    chosen = {"adam": 0.0}
    for key in TUNED:
      # Ties go to the weaker strength: less regularisation for the same accuracy.
      chosen[key] = max(grid[key], key=lambda r: (r["val_acc"], -r["strength"]))["strength"]
    for key in chosen:
      grid[key] = [self.complete(r) if r["strength"] == chosen[key] else r for r in grid[key]]
    fronts = [self.frontier(next(r for r in grid[k] if r["strength"] == chosen[k]))
              for k in chosen]
    for npz in (self.dir / "runs").glob("*.params.npz"):
      npz.unlink()
    # The other seeds seed by seed, so a run cut short has every method on
    # the seeds it finished.
    finals = {k: [next(r for r in grid[k] if r["strength"] == chosen[k])] for k in chosen}
    for seed in others:
      for key in cfg.final_methods:
        finals[key].append(self.run(key, chosen[key], seed, with_val=False))
    return {"probe": probe, "grid": grid, "chosen": chosen, "frontier": fronts,
            "finals": finals}


def study_ood_sets(test_images, test_labels, *, n, severity, seed):
  """Three OOD sets of n images: the ID test images, each with one of the
  five corruptions in turn (all kinds in one set, so one set of n images
  rather than five sets of n/5), sklearn's digits (other writers, 8x8 scans)
  and typeset digits (matplotlib's fonts: type, not handwriting)."""
  x, y = test_images[:n], test_labels[:n]
  corrupted = np.empty_like(x)
  for i, kind in enumerate(data.CORRUPTIONS):
    sel = np.arange(i, len(x), len(data.CORRUPTIONS))
    corrupted[sel] = data.corrupt(x[sel], kind, severity, seed)
  digits, labels = data.load_digits28(None)
  order = np.random.default_rng(seed).permutation(len(digits))[:n]
  return {"corrupt": (corrupted, y), "digits": (digits[order], labels[order]),
          "fonts": data.load_font_digits(n, seed)}
