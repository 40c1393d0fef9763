"""LoRA fine-tuning of SmolLM2-135M on KJV books: AdamW vs Adam-SPD (zero anchor).

    python -m examples.llm.finetune --preset cpu --results-dir results/llm

Both methods train the same LoRA adapters (nnx.LoRAParam) of a frozen model.
AdamW has its own decoupled weight decay; Adam-SPD uses `spd_optax.adam_spd`
with `anchor="zeros"`, so SPD bounds the adapters themselves. Each run is
scored by perplexity on held-out chapters of the fine-tuning books (ID), on
other books (OOD Bible) and on Python's `pydoc_data` prose (general ability
the fine-tuning should keep), next to the adapters' norm.
"""

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
import optax
from flax import nnx
from tqdm import tqdm

import spd_optax
from examples.common import (Checkpointer, finished_run, method_color, pyplot, save_figure,
                             spd_log, strength_label, write_table)
from examples.llm import configs, convert, data
from examples.llm import tokenizer as tokenizer_lib
from examples.llm.model import next_token_nll

COLUMNS = ["method", "strength", "seed", "steps", "id_ppl", "ood_bible_ppl",
           "pydoc_ppl", "adapter_norm", "delta_w_norm", "val_ppl", "selected",
           "final_train_loss", "decayed_fraction", "train_s"]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu",
                 choices=sorted(configs.PRESETS) + sorted(configs.STUDY_PRESETS),
                 help="study / study-smoke: the statistical comparison of examples/llm/study.py")
  p.add_argument("--results-dir", default="results/llm")
  p.add_argument("--resume", action="store_true",
                 help="reuse finished runs and continue unfinished ones from "
                      "their latest checkpoint")
  p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop each run after this many steps, leaving only its "
                      "checkpoint (simulates an interruption; see --resume)")
  p.add_argument("--weights", default=None,
                 help="a Hugging Face-style LLaMA model.safetensors instead of "
                      "SmolLM2's GGUF")
  p.add_argument("--config", default=None,
                 help="its config.json (default: next to --weights)")
  p.add_argument("--tokenizer", default=None,
                 help="its tokenizer.json (default: next to --weights if present, "
                      "else SmolLM2's tokenizer)")
  return p.parse_args(argv)


def load_base(args):
  if args.weights is None:
    cfg, tok, weights = convert.read_gguf(convert.smollm2_gguf_path())
    return cfg, tok, weights
  cfg, weights = convert.read_safetensors(args.weights, args.config)
  tok_path = args.tokenizer or pathlib.Path(args.weights).with_name("tokenizer.json")
  if pathlib.Path(tok_path).exists():
    tok = tokenizer_lib.from_json(tok_path)
  else:
    tok = tokenizer_lib.from_gguf(convert.smollm2_gguf_path())
  # JAX clamps out-of-range gathers instead of failing: check up front.
  if tok.get_vocab_size() > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model's "
                     f"vocabulary is {cfg.vocab_size}: pass its own --tokenizer")
  return cfg, tok, weights


def spread(windows, n):
  """n windows evenly spaced through the stream, so a multi-book set is
  sampled across all its books rather than from the first one only."""
  if len(windows) <= n:
    return windows
  return windows[np.linspace(0, len(windows) - 1, n).round().astype(int)]


def make_datasets(cfg, tok):
  chapters = data.load_kjv()
  train, val, test = data.split_chapters(
      chapters, cfg.id_books, heldout_fraction=cfg.heldout_fraction,
      val_fraction=cfg.val_fraction, seed=cfg.split_seed)
  n_eval = cfg.eval_windows - cfg.eval_windows % cfg.eval_batch_size
  win = lambda text: data.token_windows(tok, text, cfg.seq_len)
  return {
      "train": win(data.chapters_text(chapters, train)),
      "val": spread(win(data.chapters_text(chapters, val)), n_eval),
      "id": spread(win(data.chapters_text(chapters, test)), n_eval),
      "ood_bible": spread(win(data.books_text(chapters, cfg.ood_books)), n_eval),
      "pydoc": spread(win(data.pydoc_text()), n_eval),
  }


def batch_indices(n_windows, batch_size, step, seed):
  """The windows of one step: a fresh permutation per epoch, fixed by
  (seed, epoch), so a resumed run sees exactly the batches it would have."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), n_windows)
    perm = np.random.default_rng([seed, epoch]).permutation(n_windows)
    out.extend(perm[offset:offset + batch_size - len(out)])
  return np.asarray(out)


def make_tx(cfg, method, strength, steps):
  lr = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, steps), max(steps, 1),
      end_value=0.1 * cfg.learning_rate)
  if method == "adamw":
    return optax.adamw(lr, weight_decay=strength)
  if method == "adam_spd":
    return spd_optax.adam_spd(lr, weight_decay=strength, anchor="zeros")
  raise ValueError(method)


def reset_adapters(model, seed):
  """Fresh LoRA adapters as nnx.LoRALinear makes them (A: He-uniform, B: 0),
  so one loaded base model serves every run."""
  state = nnx.state(model, nnx.LoRAParam)
  flat = nnx.to_flat_state(state)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  init_a = nnx.initializers.he_uniform()
  new = {}
  for key, (path, var) in zip(keys, flat):
    if path[-1] == "lora_a":
      new[path] = init_a(key, var.shape, var.dtype)
    else:
      new[path] = jnp.zeros(var.shape, var.dtype)
  nnx.update(model, nnx.from_flat_state(
      [(p, v.replace(new[p])) for p, v in flat]))


def adapter_norms(model):
  """(‖adapters‖, ‖ΔW‖): the norm of all LoRA factors, which is what SPD with
  the zero anchor bounds, and that of the weight changes A·B they make."""
  sq_ab = sq_delta = 0.0
  for _, mod in nnx.iter_graph(model):
    if isinstance(mod, nnx.LoRA):
      a, b = mod.lora_a[...], mod.lora_b[...]
      sq_ab += jnp.sum(a * a) + jnp.sum(b * b)
      sq_delta += jnp.sum(jnp.square(a @ b))
  return math.sqrt(float(sq_ab)), math.sqrt(float(sq_delta))


@nnx.jit
def train_step(model, optimizer, tokens):
  def loss_fn(model):
    return next_token_nll(model(tokens), tokens)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_nll(model, tokens):
  return next_token_nll(model(tokens), tokens)


def perplexity(model, windows, batch_size):
  nll = [float(eval_nll(model, jnp.asarray(windows[i:i + batch_size])))
         for i in range(0, len(windows), batch_size)]
  return math.exp(float(np.mean(nll)))


def evaluate(model, sets, cfg, with_val):
  names = ["id", "ood_bible", "pydoc"] + (["val"] if with_val else [])
  return {f"{n}_ppl": perplexity(model, sets[n], cfg.eval_batch_size)
          for n in tqdm(names, desc="eval", leave=False)}


def _checkpoint_state(model, optimizer):
  return {"lora": nnx.state(model, nnx.LoRAParam), "opt": nnx.state(optimizer)}


def _save(ckpt, step, model, optimizer):
  # A flat list of arrays: Orbax stores it without caring that nnx paths
  # contain integers (layer indices, tuple fields of the optimizer state).
  ckpt.save(step, jax.tree.leaves(_checkpoint_state(model, optimizer)))


def _restore(ckpt, step, model, optimizer):
  state = _checkpoint_state(model, optimizer)
  leaves, treedef = jax.tree.flatten(state)
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  restored = jax.tree.unflatten(treedef, ckpt.restore(step, abstract))
  nnx.update(model, restored["lora"])
  nnx.update(optimizer, restored["opt"])


def run_one(model, sets, cfg, method, strength, seed, steps, run_dir, resume, with_val,
            stop_after=None):
  """Trains fresh adapters with one optimizer; returns the report row, or
  None if stopped early by `stop_after`."""
  result_file = run_dir / "result.json"
  if (saved := finished_run(run_dir, steps, resume)) is not None:
    return saved["row"]

  reset_adapters(model, seed)
  optimizer = nnx.Optimizer(model, make_tx(cfg, method, strength, steps), wrt=nnx.LoRAParam)
  # One manager per run; leaving the block waits for a save in flight, so a
  # stopped run resumes from its last checkpoint.
  with Checkpointer(run_dir / "checkpoints") as ckpt:
    start, history = 0, []
    if resume and (last := ckpt.latest_step()) is not None:
      _restore(ckpt, last, model, optimizer)
      start = min(last, steps)
      if (run_dir / "history.json").exists():
        history = [h for h in json.loads((run_dir / "history.json").read_text())
                   if h["step"] <= start]
      print(f"{run_dir.name}: resuming at step {start}")

    train = sets["train"]
    t0 = time.time()
    losses = []
    bar = tqdm(range(start, steps), desc=f"{method} λ={strength} seed={seed}",
               initial=start, total=steps)
    for step in bar:
      tokens = jnp.asarray(train[batch_indices(len(train), cfg.batch_size, step, seed)])
      losses.append(float(train_step(model, optimizer, tokens)))
      done = step + 1
      if done % cfg.log_every == 0 or done == steps:
        entry = {"step": done, "loss": float(np.mean(losses[-cfg.log_every:])),
                 **spd_log(optimizer.opt_state)}
        entry["adapter_norm"], entry["delta_w_norm"] = adapter_norms(model)
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", norm=f"{entry['adapter_norm']:.2f}")
        tqdm.write(json.dumps({"run": run_dir.name, **entry}))
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
      stopping = stop_after is not None and done >= stop_after and done < steps
      if done % cfg.checkpoint_every == 0 or done == steps or stopping:
        _save(ckpt, done, model, optimizer)
      if stopping:
        bar.close()
        print(f"{run_dir.name}: stopped at step {done} of {steps}")
        return None
  train_s = time.time() - t0

  metrics = evaluate(model, sets, cfg, with_val)
  norm, delta = adapter_norms(model)
  last = history[-1] if history else {}
  row = {"method": method, "strength": strength, "seed": seed, "steps": steps,
         **metrics, "adapter_norm": norm, "delta_w_norm": delta,
         "final_train_loss": last.get("loss", float("nan")),
         "decayed_fraction": last.get("decayed_fraction", ""),
         "train_s": round(train_s, 1)}
  result_file.write_text(json.dumps({"row": row, "history": history}, indent=1))
  return row


def plot_perplexity(rows, key, label, title, path):
  """Perplexity against the weight change the adapters make, one point per
  run; a marker per strength within a method. Takes the rows of llm.json,
  so it can be redrawn from saved results."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  markers = "os^Dv"
  groups = {}
  for r in rows:
    groups.setdefault((r["method"], r.get("strength")), []).append(r)
  per_method = {}
  for (method, strength), runs in groups.items():
    k = per_method[method] = per_method.get(method, -1) + 1
    ax.scatter([r["delta_w_norm"] for r in runs], [r[key] for r in runs], s=40, alpha=0.85,
               marker=markers[k % len(markers)], color=method_color(method),
               label=strength_label(method, strength)
               + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
  ax.set(xlabel="‖ΔW‖ = (Σ ‖A·B‖²)^½, the weight change the adapters make",
         ylabel=f"{label}; lower is better")
  ax.set_title(f"{title}: one point per run", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure(fig, path)


def mark_selected(rows):
  """Per method, flags the strength with the lowest mean ID validation
  perplexity (only when there is a choice to make)."""
  for method in {r["method"] for r in rows if r["method"] != "pretrained"}:
    mine = [r for r in rows if r["method"] == method]
    strengths = sorted({r["strength"] for r in mine})
    if len(strengths) < 2:
      continue
    mean_val = {s: np.mean([r["val_ppl"] for r in mine if r["strength"] == s])
                for s in strengths}
    best = min(strengths, key=mean_val.get)
    for r in mine:
      r["selected"] = r["strength"] == best


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = configs.get_config(args.preset)
  if args.preset in configs.STUDY_PRESETS:
    from examples.llm import study
    if args.steps is not None:
      cfg = dataclasses.replace(cfg, steps=args.steps)
    return study.main(args, cfg)
  steps = cfg.steps if args.steps is None else args.steps
  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  print(f"preset {args.preset}: {cfg}")

  t0 = time.time()
  model_cfg, tok, weights = load_base(args)
  model = convert.build_model(model_cfg, weights, lora_rank=cfg.lora_rank,
                              lora_attn=cfg.lora_attn, lora_mlp=cfg.lora_mlp,
                              lora_layers=cfg.lora_layers, n_layers=cfg.n_layers)
  del weights
  sets = make_datasets(cfg, tok)
  print(f"loaded in {time.time() - t0:.1f}s; windows of {cfg.seq_len} tokens: "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))

  with_val = len(cfg.adamw_weight_decay) > 1 or len(cfg.spd_strength) > 1
  base_file = results_dir / "runs" / "pretrained.json"
  if args.resume and base_file.exists():
    base = json.loads(base_file.read_text())
  else:
    # With B = 0 the adapted model is the pre-trained one; its adapter norm is
    # that of the initial A factors, where every run starts.
    reset_adapters(model, 0)
    norm, delta = adapter_norms(model)
    base = {"method": "pretrained", "strength": "", "seed": "", "steps": 0,
            **evaluate(model, sets, cfg, with_val), "adapter_norm": norm,
            "delta_w_norm": delta}
    base_file.parent.mkdir(parents=True, exist_ok=True)
    base_file.write_text(json.dumps(base))
  print(json.dumps(base))

  rows = [base]
  grid = [("adamw", s) for s in cfg.adamw_weight_decay] + \
         [("adam_spd", s) for s in cfg.spd_strength]
  for method, strength in grid:
    for seed in cfg.seeds:
      run_dir = results_dir / "runs" / f"{method}_{strength}_seed{seed}"
      row = run_one(model, sets, cfg, method, strength, seed, steps, run_dir,
                    args.resume, with_val, args.stop_after)
      if row is not None:
        rows.append(row)
        print(json.dumps(row))
  if len(rows) < 1 + len(grid) * len(cfg.seeds):
    print("some runs are unfinished: no report written; continue with --resume")
    return rows
  mark_selected(rows)

  columns = [c for c in COLUMNS if with_val or c not in ("val_ppl", "selected")]
  title = f"SmolLM2-135M LoRA on KJV, {args.preset} preset"
  rows = write_table(results_dir, "llm", rows, columns)
  write_table(results_dir, "llm_pydoc", rows, columns)
  plot_perplexity(rows, "id_ppl", "ID perplexity (held-out chapters)", title,
                  results_dir / "llm.png")
  plot_perplexity(rows, "pydoc_ppl", "pydoc perplexity (general text)", title,
                  results_dir / "llm_pydoc.png")
  print((results_dir / "llm.md").read_text())
  print(f"total {time.time() - t0:.0f}s")
  return rows


if __name__ == "__main__":
  main()
