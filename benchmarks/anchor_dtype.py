"""What a bfloat16 anchor changes in a fine-tuning run.

``anchor_dtype=jnp.bfloat16`` stores θ_0 rounded. At step 1, θ_{t-1} is the
float32 θ_0, so θ_{t-1} - θ_0 is the rounding error, not 0: c_1 can be
negative and SPD can decay, towards the rounded anchor. This script fine-tunes
a small MLP from "pre-trained" weights with Adam-SPD, once with a float32
anchor and once with a bfloat16 one, over seeds, and prints per seed and as a
paired mean with a 95% t interval:

- the share of layers decayed at step 1 and their mean applied ratio;
- how far step 1's decay moved the params, relative to step 1's update;
- the distance between the two runs' final params, relative to how far the
  float32-anchor run moved from θ_0, and the same for a control: the
  float32-anchor run started from the params rounded to bfloat16 (anchor
  and params equal at step 1, so nothing decays there), which says how far
  a bfloat16-sized change of the start moves this run anyway;
- the two runs' final losses and distances from the float32 θ_0.

  python benchmarks/anchor_dtype.py --seeds 10 --steps 200
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import spd_optax

WIDTHS = (64, 256, 256, 256, 16)


def problem(seed):
  keys = jax.random.split(jax.random.key(seed), 2 * len(WIDTHS) + 2)
  params = {}
  for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
    params[f"l{i}"] = {"w": jax.random.normal(keys[2 * i], (a, b)) / np.sqrt(a),
                       "b": 0.1 * jax.random.normal(keys[2 * i + 1], (b,))}
  x = jax.random.normal(keys[-2], (512, WIDTHS[0]))
  # A new target near the pre-trained model's outputs: fine-tuning.
  y = forward(params, x) + 0.3 * jax.random.normal(keys[-1], (512, WIDTHS[-1]))
  return params, x, y


def forward(params, x):
  for i in range(len(WIDTHS) - 1):
    x = x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
    if i < len(WIDTHS) - 2:
      x = jax.nn.gelu(x)
  return x


def run(seed, steps, anchor_dtype, rounded_start=False):
  params0, x, y = problem(seed)
  if rounded_start:
    params0 = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), params0)
  loss = lambda p: jnp.mean((forward(p, x) - y) ** 2)
  tx = spd_optax.adam_spd(3e-3, weight_decay=1.0, anchor_dtype=anchor_dtype)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  params, state = params0, tx.init(params0)
  # Step 1 without the decay: the same Adam step with λ = 0.
  plain = spd_optax.adam_spd(3e-3, weight_decay=0.0)
  u_plain, _ = plain.update(jax.grad(loss)(params0), plain.init(params0), params0)
  params, state, _ = step(params, state)
  first = spd_optax.spd_stats(state)
  moved = optax.tree_utils.tree_norm(jax.tree.map(
      lambda p, p0, u: p - (p0 + u), params, params0, u_plain))
  for _ in range(steps - 1):
    params, state, _ = step(params, state)
  return {"decayed_at_1": float(first["decayed_fraction"]),
          "ratio_at_1": float(first["mean_ratio"]),
          "step1_pull_over_update": float(moved / optax.tree_utils.tree_norm(u_plain)),
          "loss": float(loss(params)),
          "distance": float(optax.tree_utils.tree_norm(
              jax.tree.map(jnp.subtract, params, params0))),
          "params": params}


def interval(values):
  values = np.asarray(values)
  half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return f"{values.mean():.3g} ± {half:.2g}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rows = []
  for seed in range(args.seeds):
    f32, bf16 = run(seed, args.steps, None), run(seed, args.steps, jnp.bfloat16)
    control = run(seed, args.steps, None, rounded_start=True)
    gap = lambda other: float(optax.tree_utils.tree_norm(jax.tree.map(
        jnp.subtract, f32["params"], other["params"])) / f32["distance"])
    rows.append({"seed": seed, "f32": {k: v for k, v in f32.items() if k != "params"},
                 "bf16": {k: v for k, v in bf16.items() if k != "params"},
                 "gap_over_distance": gap(bf16), "control_gap_over_distance": gap(control)})
    print(json.dumps(rows[-1]))
  pick = lambda run, key: [r[run][key] for r in rows]
  print(f"\n{args.seeds} seeds, {args.steps} steps, jax {jax.__version__}")
  print("bf16 anchor: layers decayed at step 1", interval(pick("bf16", "decayed_at_1")),
        "| their mean ratio", interval(pick("bf16", "ratio_at_1")),
        "| step 1's pull / its update", interval(pick("bf16", "step1_pull_over_update")))
  print("f32 anchor: layers decayed at step 1", interval(pick("f32", "decayed_at_1")))
  print("final params, |bf16 run - f32 run| / |f32 run - θ0|:",
        interval([r["gap_over_distance"] for r in rows]),
        "| control (f32 anchor, rounded start):",
        interval([r["control_gap_over_distance"] for r in rows]))
  print("loss bf16 - f32 (paired):", interval(np.subtract(pick("bf16", "loss"), pick("f32", "loss"))),
        "| f32 loss", interval(pick("f32", "loss")))
  print("distance from θ0, bf16 - f32 (paired):",
        interval(np.subtract(pick("bf16", "distance"), pick("f32", "distance"))),
        "| f32 distance", interval(pick("f32", "distance")))
  if args.json:
    json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
  main()
