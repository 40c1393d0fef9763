"""Times one jitted, donated optimizer step: adam_spd against optax.adamw and
optax.adam, alternating in one run, on parameter sets shaped like ViT-B/16
and (GPU only by default) a LLaMA-style 1.35B model, each also with its
blocks stacked into one leaf per weight (as scanned models store them).

  python benchmarks/optimizer_step.py                # sets that fit the backend
  python benchmarks/optimizer_step.py --sets vit_b16 --reps 30 --json out.json

Prints a table of median milliseconds and ratios to optax.adamw; writes JSON.
"naive SPD" is optax.adam plus SPD written per leaf the obvious way: what
adam_spd's structure is measured against. A stacked set runs adam_spd with
``layer_axes`` (per layer) and, alternating with it, adam_spd on the same
model unstacked: "stacked / unstacked" compares the two.
"""

import argparse
import json
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import spd_optax


def vit_b16_shapes() -> dict[str, tuple[int, ...]]:
  """ViT-B/16 at 224px with a 1000-class head: 86.6M floats, 152 leaves."""
  d, mlp = 768, 3072
  shapes = {"patch/w": (16, 16, 3, d), "patch/b": (d,), "cls": (1, 1, d),
            "pos": (1, 197, d), "norm/w": (d,), "norm/b": (d,),
            "head/w": (d, 1000), "head/b": (1000,)}
  for i in range(12):
    shapes |= {f"block{i}/ln1/w": (d,), f"block{i}/ln1/b": (d,),
               f"block{i}/qkv/w": (d, 3 * d), f"block{i}/qkv/b": (3 * d,),
               f"block{i}/proj/w": (d, d), f"block{i}/proj/b": (d,),
               f"block{i}/ln2/w": (d,), f"block{i}/ln2/b": (d,),
               f"block{i}/fc1/w": (d, mlp), f"block{i}/fc1/b": (mlp,),
               f"block{i}/fc2/w": (mlp, d), f"block{i}/fc2/b": (d,)}
  return shapes


def llama_1b_shapes() -> dict[str, tuple[int, ...]]:
  """LLaMA-style, width 2048, 24 layers, FFN 5504, vocab 32000: 1.35B, 219 leaves."""
  d, ffn, vocab = 2048, 5504, 32000
  shapes = {"embed": (vocab, d), "norm": (d,), "lm_head": (d, vocab)}
  for i in range(24):
    shapes |= {f"layer{i}/{n}": (d, d) for n in ("q", "k", "v", "o")}
    shapes |= {f"layer{i}/gate": (d, ffn), f"layer{i}/up": (d, ffn),
               f"layer{i}/down": (ffn, d), f"layer{i}/attn_norm": (d,),
               f"layer{i}/mlp_norm": (d,)}
  return shapes


def stack_blocks(shapes):
  """The same model with block i's weights stacked along a leading axis:
  ``block{i}/qkv/w`` -> ``blocks/qkv/w`` of shape [L, ...]. Returns the
  shapes and the ``layer_axes`` (0 for the stacked leaves)."""
  stacked, layers = {}, {}
  for key, shape in shapes.items():
    m = re.fullmatch(r"(block|layer)\d+/(.+)", key)
    if m is None:
      stacked[key] = shape
      continue
    name = f"{m[1]}s/{m[2]}"
    layers[name] = layers.get(name, 0) + 1
    stacked[name] = shape
  shapes = {k: (layers[k],) + s if k in layers else s for k, s in stacked.items()}
  return shapes, {k: 0 if k in layers else None for k in shapes}


SETS = {"vit_b16": vit_b16_shapes, "llama_1b": llama_1b_shapes,
        "vit_b16_stacked": vit_b16_shapes, "llama_1b_stacked": llama_1b_shapes}


def naive_spd(lr, weight_decay):
  """SPD written the obvious way (as in the reference, per leaf, norms and
  the condition as separate reductions), for comparison: SPD.md's "naive".
  The state is (adam state, anchor)."""
  adam = optax.adam(lr)

  def init(params):
    return adam.init(params), jax.tree.map(jnp.copy, params)

  def update(grads, state, params):
    u, inner = adam.update(grads, state[0], params)

    def leaf(g, p, a, u):
      cond = -jnp.sum(g * (p - a))
      new = p + u
      n_new, n_prev = jnp.linalg.norm(new - a), jnp.linalg.norm(p - a)
      ratio = jnp.where(n_new > 0, jnp.clip((n_new - n_prev) / n_new, 0, 1), 0)
      return jnp.where(cond < 0, new - weight_decay * ratio * (new - a) - p, u)

    return jax.tree.map(leaf, grads, params, state[1], u), (inner, state[1])

  return optax.GradientTransformation(init, update)


def optimizers(shapes, stacked, lr=1e-4):
  """name -> (optimizer, parameter shapes) for one set."""
  if not stacked:
    return {
        "optax.adamw": (optax.adamw(lr, weight_decay=0.1), shapes),
        "optax.adam": (optax.adam(lr), shapes),
        "naive SPD": (naive_spd(lr, 1.0), shapes),
        "adam_spd": (spd_optax.adam_spd(lr, weight_decay=1.0), shapes),
    }
  stacked_shapes, layer_axes = stack_blocks(shapes)
  return {
      "optax.adamw": (optax.adamw(lr, weight_decay=0.1), stacked_shapes),
      "optax.adam": (optax.adam(lr), stacked_shapes),
      "adam_spd unstacked": (spd_optax.adam_spd(lr, weight_decay=1.0), shapes),
      "adam_spd": (spd_optax.adam_spd(lr, weight_decay=1.0, layer_axes=layer_axes),
                   stacked_shapes),
  }


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def random_tree(shapes, seed):
  keys = iter(jax.random.split(jax.random.key(seed), len(shapes)))
  return {k: jax.random.normal(next(keys), s, jnp.float32) * 0.02
          for k, s in shapes.items()}


def bench(shapes, reps, stacked=False, warmup=3):
  n = sum(int(jnp.prod(jnp.array(s))) for s in shapes.values())
  runs, grads_for = {}, {}
  for name, (tx, tx_shapes) in optimizers(shapes, stacked).items():
    # One gradient tree per model layout, shared: at 1.35B a copy is 5.4 GB.
    if id(tx_shapes) not in grads_for:
      grads_for[id(tx_shapes)] = random_tree(tx_shapes, 1)
    params, grads = random_tree(tx_shapes, 0), grads_for[id(tx_shapes)]
    state = jax.jit(tx.init)(params)
    step = make_step(tx)
    for _ in range(warmup):  # compile, then let SPD's condition start firing
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    runs[name] = [step, params, state, grads, []]
    if name == "adam_spd":
      leaves = len(tx_shapes)
  for _ in range(reps):  # alternate, so drifting clocks hit all alike
    for name, run in runs.items():
      step, params, state, grads, times = run
      t0 = time.perf_counter()
      params, state = step(params, state, grads)
      jax.block_until_ready((params, state))
      times.append(time.perf_counter() - t0)
      run[1], run[2] = params, state
  med = {k: 1e3 * statistics.median(r[4]) for k, r in runs.items()}
  out = {"params": n, "leaves": leaves, "median_ms": med,
         "ratio_to_adamw": {k: v / med["optax.adamw"] for k, v in med.items()}}
  if stacked:
    out["stacked_over_unstacked"] = med["adam_spd"] / med["adam_spd unstacked"]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = (list(SETS) if jax.default_backend() != "cpu"
             else ["vit_b16", "vit_b16_stacked"])
  parser.add_argument("--sets", nargs="+", choices=SETS, default=default)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--json", default="benchmarks/optimizer_step.json")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  results = {"backend": jax.default_backend(), "device": device.device_kind,
             "jax": jax.__version__, "python": platform.python_version(),
             "reps": args.reps, "sets": {}}
  print(f"{results['device']} ({results['backend']}), jax {jax.__version__}, "
        f"{args.reps} alternating reps, float32, jitted + donated step")
  for name in args.sets:
    r = bench(SETS[name](), args.reps, stacked=name.endswith("_stacked"))
    results["sets"][name] = r
    print(f"\n| set | params | leaves | {' | '.join(r['median_ms'])} | adam_spd / adamw |"
          + (" stacked / unstacked |" if "stacked_over_unstacked" in r else ""))
    print("| --- | --- | --- |" + " --- |" * (len(r["median_ms"]) + 1)
          + (" --- |" if "stacked_over_unstacked" in r else ""))
    ms = " | ".join(f"{v:.2f} ms" for v in r["median_ms"].values())
    print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['leaves']} | {ms} | "
          f"{r['ratio_to_adamw']['adam_spd']:.2f}x |"
          + (f" {r['stacked_over_unstacked']:.2f}x |" if "stacked_over_unstacked" in r else ""),
          flush=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
