"""Tunix SFT of SmolLM2-135M on KJV books: optax.adamw vs spd_optax.adam_spd.

    python -m examples.tunix.train --preset cpu --results-dir results/tunix

The model is Tunix's own Llama-3 (`tunix.models.llama3`) holding SmolLM2's
weights (examples/tunix/model.py), trained by `tunix.PeftTrainer` in two
modes: LoRA adapters added by qwix (Adam-SPD with anchor="zeros", which
bounds the adapters themselves) and full fine-tuning (anchor="params", the
pre-trained weights). The data, its ID/OOD split and the perplexities are
examples/llm's (`finetune.make_datasets`, `finetune.batch_indices`):
held-out chapters of the fine-tuning books (ID), other books (OOD Bible)
and Python's pydoc prose. Checkpoints and resumption are Tunix's; SPD's
statistics go through Tunix's metrics logger from a training hook.
"""

import argparse
import contextlib
import json
import math
import pathlib
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import qwix
from jax.sharding import AxisType
from flax import nnx
from tunix.sft import hooks, metrics_logger, peft_trainer
from tunix.sft import utils as sft_utils

import spd_optax
from examples.common import finished_run, machine, spd_log, write_table
from examples.llm import convert, finetune
from examples.llm.model import next_token_nll
from examples.tunix import configs
from examples.tunix import model as tunix_model

COLUMNS = ["mode", "method", "strength", "seed", "steps", "id_ppl", "ood_bible_ppl",
           "pydoc_ppl", "deviation", "final_train_loss", "decayed_fraction", "train_s"]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(configs.PRESETS))
  p.add_argument("--results-dir", default="results/tunix")
  p.add_argument("--resume", action="store_true",
                 help="reuse finished runs and let Tunix continue unfinished ones "
                      "from their latest checkpoint")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop each run after this many steps, leaving its checkpoint "
                      "(an interruption; continue with --resume)")
  p.add_argument("--fsdp", type=int, default=None,
                 help="override the preset's mesh size (host devices on CPU)")
  return p.parse_args(argv)


# --- Model and optimizer -----------------------------------------------------

def make_mesh(n):
  """A ("fsdp", "tp") mesh, the axis names of Tunix's Llama-3 shardings.
  tp stays 1: SmolLM2's 9 query and 3 KV heads split over no larger axis."""
  if n <= 1:
    return None
  if len(jax.devices()) < n:
    raise RuntimeError(f"a mesh of {n} needs {n} devices, found {len(jax.devices())}; "
                       f"on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  # Auto axes: Tunix's model leaves the placement of its activations to the
  # compiler (its sharding constraints are skipped on CPU), which explicit
  # axes refuse (the embedding lookup asks for an output sharding).
  return jax.make_mesh((n, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def shard_model(model, mesh):
  """Puts each weight where its Tunix sharding annotation says."""
  if mesh is not None:
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
  return model


def build(cfg, mode, model_cfg, weights, seed, mesh):
  model = tunix_model.build_model(model_cfg, weights)
  if mode == "lora":
    provider = qwix.LoraProvider(module_path=cfg.lora_modules, rank=cfg.lora_rank,
                                 alpha=cfg.lora_alpha)
    # qwix finds the projections by tracing one call; B starts at zero, so
    # the adapted model starts as the pre-trained one.
    model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(seed),
                                     **tunix_model.model_inputs(np.zeros((1, 8), np.int32)))
  return shard_model(model, mesh)


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def spd_mask(patterns):
  """SPD's mask for full fine-tuning: False for the weights whose path
  matches one of `patterns` (they get plain Adam and store no anchor)."""
  if not patterns:
    return None
  rx = re.compile("|".join(f"(?:{p})" for p in patterns))
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: rx.search(_path_name(path)) is None, params)


def make_tx(cfg, mode, method, strength, steps):
  peak = cfg.learning_rate if mode == "lora" else cfg.full_learning_rate
  lr = optax.warmup_cosine_decay_schedule(
      0.0, peak, min(cfg.warmup_steps, steps), max(steps, 1), end_value=0.1 * peak)
  # inject_hyperparams puts the learning rate in the optimizer state, where
  # Tunix's trainer finds and logs it.
  if method == "adamw":
    return optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=strength)
  if method == "adam_spd":
    if mode == "lora":
      return optax.inject_hyperparams(spd_optax.adam_spd, static_args=("anchor",))(
          learning_rate=lr, weight_decay=strength, anchor="zeros")
    return optax.inject_hyperparams(spd_optax.adam_spd, static_args=("anchor", "mask"))(
        learning_rate=lr, weight_decay=strength, anchor="params",
        mask=spd_mask(cfg.spd_exclude))
  raise ValueError(method)


def trained_vars(model, mode):
  return nnx.state(model, nnx.LoRAParam if mode == "lora" else nnx.Param)


def deviation(model, mode, start):
  """‖θ − θ₀‖ over the trained weights: for LoRA, θ₀ = 0 (the adapters'
  norm, what SPD with the zero anchor bounds); for full fine-tuning, the
  distance from the pre-trained weights."""
  now = jax.tree.leaves(trained_vars(model, mode))
  if mode == "lora":
    return math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in now))
  return math.sqrt(sum(float(jnp.sum(jnp.square(x - x0))) for x, x0 in zip(now, start)))


# --- Data and evaluation -----------------------------------------------------

def batches(train, cfg, seed, n):
  """Tunix's input: `n` batches of windows, in examples/llm's order (a
  fresh permutation per epoch, fixed by seed and epoch). Tunix resumes by
  skipping the batches a checkpoint had seen, so the order must be a pure
  function of the batch index, as it is here."""
  for step in range(n):
    tokens = train[finetune.batch_indices(len(train), cfg.batch_size, step, seed)]
    yield peft_trainer.TrainingInput(input_tokens=tokens,
                                     input_mask=np.ones(tokens.shape, np.bool_))


def model_input(x):
  """TrainingInput -> the keyword arguments of Tunix's default loss."""
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(x.input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


@nnx.jit
def eval_nll(model, tokens):
  return next_token_nll(tunix_model.logits(model, tokens), tokens)


def evaluate(model, sets, cfg):
  """Perplexities as examples/llm's `evaluate` computes them (mean NLL of
  each batch of windows, averaged, exponentiated), on Tunix's model."""
  out = {}
  for name in ("id", "ood_bible", "pydoc"):
    w = sets[name]
    nll = [float(eval_nll(model, jnp.asarray(w[i:i + cfg.eval_batch_size])))
           for i in range(0, len(w), cfg.eval_batch_size)]
    out[f"{name}_ppl"] = math.exp(float(np.mean(nll)))
  return out


# --- SPD statistics through Tunix's metrics logger ---------------------------

_BLOCK = re.compile(r"\['layers'\]\[(\d+)\]")


def block_stats(opt_state) -> dict[str, float]:
  """Per transformer block, from SPD's per-leaf state: the mean applied
  ratio of its weights at the last step and its deviation ‖θ − θ₀‖ (the
  root of the sum of its leaves' squares). {} for a state without SPD."""
  try:
    state = spd_optax.spd_state(opt_state)
  except ValueError:
    return {}
  ratios, squares = {}, {}
  for (path, r), d in zip(jax.tree_util.tree_leaves_with_path(state.ratio),
                          jax.tree.leaves(state.deviation)):
    m = _BLOCK.search(jax.tree_util.keystr(path))
    block = f"block_{int(m.group(1)):02d}" if m else "outside_blocks"
    ratios.setdefault(block, []).append(float(jnp.mean(r)))
    squares[block] = squares.get(block, 0.0) + float(jnp.sum(jnp.square(d)))
  out = {}
  for block in sorted(ratios):
    out[f"{block}/ratio"] = float(np.mean(ratios[block]))
    out[f"{block}/deviation"] = math.sqrt(squares[block])
  return out


class SPDStatsHook(hooks.TrainingHooks):
  """Logs `spd_optax.spd_stats` (decayed fraction, mean ratio, deviation)
  as `spd/<name>`, and each block's ratio and deviation as
  `spd/block_NN/<name>`, through the trainer's metrics logger (TensorBoard
  under the run's directory), every `every` optimizer updates and at the
  last.

  Tunix calls on_train_step_end after the next update has been dispatched,
  with the step of the loss it reports (one behind the optimizer state), so
  the statistics are labelled with the updates the state has seen,
  `trainer.train_steps`, not with the hook's step argument."""

  def __init__(self, every, last):
    self.every, self.last, self.history, self._logged = every, last, [], set()
    self.start = 0

  def on_train_step_end(self, trainer, train_step, train_loss):
    n = trainer.train_steps
    if n in self._logged or (n % self.every and n != self.last):
      return
    self._logged.add(n)
    stats = spd_log(trainer.optimizer.opt_state)
    blocks = block_stats(trainer.optimizer.opt_state)
    for k, v in (stats | blocks).items():
      trainer.metrics_logger.log(trainer.metrics_prefix, f"spd/{k}", v, "train", n)
    self.history.append({"step": n, **stats, **({"blocks": blocks} if blocks else {})})

  def on_train_start(self, trainer):
    self.start = trainer.train_steps  # > 0 where Tunix restored a checkpoint

  def on_train_end(self, trainer): pass
  def on_train_step_start(self, trainer): pass
  def on_eval_step_start(self, trainer): pass
  def on_eval_step_end(self, trainer, eval_loss): pass


def train_one(model, tx, cfg, train, seed, run_dir, max_steps, total_steps, mesh, mode):
  """One Tunix run; returns (trainer, hook). Tunix restores the latest
  checkpoint under run_dir/checkpoints itself, if there is one."""
  tcfg = peft_trainer.TrainingConfig(
      eval_every_n_steps=max(total_steps, 1),
      max_steps=max_steps,
      checkpoint_root_directory=str((run_dir / "checkpoints").absolute()),
      checkpointing_options=ocp.CheckpointManagerOptions(
          save_interval_steps=cfg.checkpoint_every, max_to_keep=2),
      metrics_logging_options=metrics_logger.MetricsLoggerOptions(
          log_dir=str((run_dir / "tensorboard").absolute()), flush_every_n_steps=1),
      pbar_description=run_dir.name)
  trainer = peft_trainer.PeftTrainer(model, tx, tcfg).with_gen_model_input_fn(model_input)
  hook = SPDStatsHook(cfg.log_every, max_steps)
  trainer.with_training_hooks(hook)
  data = batches(train, cfg, seed, total_steps)
  with mesh_context(mesh):
    trainer.train(data)
  return trainer, hook


@contextlib.contextmanager
def mesh_context(mesh):
  """Tunix 0.1.7 shards batches and optimizer state on the mesh it finds in
  jax's legacy mesh context (`pxla.thread_resources`), which only the
  deprecated `with mesh:` sets; jax.set_mesh does not."""
  if mesh is None:
    yield
    return
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`with mesh:` context manager", DeprecationWarning)
    mesh.__enter__()
  try:
    yield
  finally:
    mesh.__exit__(None, None, None)


def run_one(cfg, mode, method, strength, seed, steps, model_cfg, weights, sets, run_dir,
            resume, stop_after, mesh):
  result_file = run_dir / "result.json"
  if (saved := finished_run(run_dir, steps, resume)) is not None:
    return saved["row"]

  model = build(cfg, mode, model_cfg, weights, seed, mesh)
  start = ([] if mode == "lora" else
           [np.asarray(x) for x in jax.tree.leaves(trained_vars(model, mode))])
  tx = make_tx(cfg, mode, method, strength, steps)
  max_steps = steps if stop_after is None else min(stop_after, steps)
  t0 = time.time()
  trainer, hook = train_one(model, tx, cfg, sets["train"], seed, run_dir, max_steps,
                            steps, mesh, mode)
  train_s = time.time() - t0
  logged = lambda name: [float(x) for x in
                         trainer.metrics_logger.get_metric_history("", name, "train")]
  # Tunix logs, with the loss of update n, the learning rate in the state
  # after update n + 1 (it writes a step's metrics once the next is
  # dispatched): learning_rate[i] is the rate of update i + 2.
  history = {"loss": logged("loss"), "learning_rate": logged("learning_rate"),
             "spd": hook.history}
  if hook.start and (run_dir / "history.json").exists():
    # A resumed run: the steps before its checkpoint come from the history
    # the interrupted run wrote.
    before = json.loads((run_dir / "history.json").read_text())
    history = {"loss": before["loss"][:hook.start] + history["loss"],
               "learning_rate": before["learning_rate"][:hook.start]
               + history["learning_rate"],
               "spd": [h for h in before["spd"] if h["step"] <= hook.start] + history["spd"]}
  (run_dir / "history.json").write_text(json.dumps(history, indent=1))
  if trainer.train_steps < steps:
    print(f"{run_dir.name}: stopped at step {trainer.train_steps} of {steps}")
    return None

  row = {"mode": mode, "method": method, "strength": strength, "seed": seed, "steps": steps,
         **evaluate(model, sets, cfg), "deviation": deviation(model, mode, start),
         "final_train_loss": history["loss"][-1] if history["loss"] else float("nan"),
         "decayed_fraction": hook.history[-1].get("decayed_fraction", "") if hook.history
         else "", "train_s": round(train_s, 1)}
  result_file.write_text(json.dumps({"row": row, "history": history}, indent=1))
  return row


def load(cfg):
  """(Tunix's config, the weights, the evaluation sets, examples/llm's config)."""
  llm_cfg, tok, weights = convert.read_gguf(convert.smollm2_gguf_path())
  tunix_model.use_rope_theta(llm_cfg.rope_base)
  sets = finetune.make_datasets(cfg, tok)
  return (tunix_model.tunix_config(llm_cfg, cfg.n_layers, cfg.remat), weights, sets,
          llm_cfg)


def logits_gap(model_cfg, llm_cfg, weights, tokens, mesh):
  """Largest |logit difference| between Tunix's model and examples/llm's
  on `tokens` (float32), and the largest |logit|, for scale."""
  ref = convert.build_model(llm_cfg, weights, n_layers=model_cfg.num_layers)(tokens)
  got = tunix_model.logits(shard_model(tunix_model.build_model(model_cfg, weights), mesh),
                           tokens)
  return float(jnp.max(jnp.abs(got - ref))), float(jnp.max(jnp.abs(ref)))


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = configs.get_config(args.preset)
  fsdp = cfg.fsdp if args.fsdp is None else args.fsdp
  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  print(f"preset {args.preset} (mesh fsdp={fsdp}): {cfg}")

  t0 = time.time()
  mesh = make_mesh(fsdp)
  model_cfg, weights, sets, llm_cfg = load(cfg)
  print(f"loaded in {time.time() - t0:.1f}s; windows of {cfg.seq_len} tokens: "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
  gap, scale = logits_gap(model_cfg, llm_cfg, weights, jnp.asarray(sets["id"][:2]), mesh)
  print(f"Tunix's model vs examples/llm's on 2 ID windows: max |Δlogit| {gap:.3g} "
        f"(max |logit| {scale:.3g}, float32)")

  base = {"mode": "", "method": "pretrained", "strength": "", "seed": "", "steps": 0,
          **evaluate(build(cfg, "full", model_cfg, weights, 0, mesh), sets, cfg),
          "deviation": 0.0}
  print(json.dumps(base))
  rows = [base]
  grid = [(mode, "adamw", s) for mode in cfg.modes for s in cfg.adamw_weight_decay] + \
         [(mode, "adam_spd", s) for mode in cfg.modes for s in cfg.spd_strength]
  grid.sort(key=lambda g: cfg.modes.index(g[0]))
  for mode, method, strength in grid:
    for seed in cfg.seeds:
      run_dir = results_dir / "runs" / f"{mode}_{method}_{strength}_seed{seed}"
      row = run_one(cfg, mode, method, strength, seed, cfg.steps, model_cfg, weights, sets,
                    run_dir, args.resume, args.stop_after, mesh)
      if row is not None:
        rows.append(row)
        print(json.dumps(row))
  if len(rows) < 1 + len(grid) * len(cfg.seeds):
    print("some runs are unfinished: no report written; continue with --resume")
    return rows
  rows = write_table(results_dir, "tunix", rows, COLUMNS)
  (results_dir / "machine.json").write_text(json.dumps(
      {**machine(), "fsdp": fsdp, "logits_max_abs_diff": gap, "logits_max_abs": scale,
       "total_s": round(time.time() - t0)}, indent=1))
  print((results_dir / "tunix.md").read_text())
  print(f"total {time.time() - t0:.0f}s")
  return rows


if __name__ == "__main__":
  main()
