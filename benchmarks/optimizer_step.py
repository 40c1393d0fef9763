"""Times one jitted, donated optimizer step: adam_spd against optax.adamw and
optax.adam, alternating in one run, on parameter sets shaped like ViT-B/16
and (GPU only by default) a LLaMA-style 1.35B model, each also with its
blocks stacked into one leaf per weight (as scanned models store them).

  python benchmarks/optimizer_step.py                # sets that fit the backend
  python benchmarks/optimizer_step.py --sets vit_b16 --reps 30 --json out.json
  python benchmarks/optimizer_step.py --sets llama_1b --dtype bfloat16

  python benchmarks/optimizer_step.py --steps-per-call 10   # 10 steps per jit call

Prints a table of median milliseconds per step and ratios to optax.adamw; writes JSON,
with each compiled step's fusion count and XLA's count of the bytes it
accesses, in words (one word = one parameter's dtype) per parameter.
"naive SPD" is optax.adam plus SPD written per leaf the obvious way: what
adam_spd's structure is measured against. A stacked set runs adam_spd with
``layer_axes`` (per layer) and, alternating with it, adam_spd on the same
model unstacked: "stacked / unstacked" compares the two.
"""

import argparse
import collections
import json
import pathlib
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
  the condition as separate reductions), for comparison.
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


def leaf_by_leaf(tx):
  """`tx` (an SPD optimizer over a flat dict of params whose base optimizer
  acts per element, as adam_spd's Adam does) applied one leaf at a time,
  each leaf's gradient tied by `lax.optimization_barrier` to the previous
  leaf's new params: XLA must finish a leaf's second pass before it starts
  the next leaf's first (every kernel of a leaf reads its gradient or
  what the first pass made of it), so the second pass may find the
  leaf's θ, θ_0 and moments still in the L2 cache the first pass left them
  in. Each leaf is `tx`'s own update on a one-leaf dict, so the arithmetic
  is `tx`'s; only the order differs. The tie is on θ_{t-1} + update as
  `optax.apply_updates` forms it, which XLA computes once for the tie and
  the step's result; a tie on the update would make XLA write the update
  out, 2 words per parameter more."""

  def update(grads, state, params):
    keys = list(params)
    is_params_tree = lambda x: isinstance(x, dict) and set(x) == set(keys)
    is_one_leaf = lambda x: isinstance(x, dict) and len(x) == 1 and next(iter(x)) in params
    updates, states, previous = {}, [], None
    for k in keys:
      one = jax.tree.map(lambda x: {k: x[k]} if is_params_tree(x) else x, state,
                         is_leaf=is_params_tree)
      g = grads[k]
      if previous is not None:
        g, _ = jax.lax.optimization_barrier((g, previous))
      u, one = tx.update({k: g}, one, {k: params[k]})
      updates[k] = u[k]
      states.append(one)
      previous = optax.apply_updates({k: params[k]}, u)[k]
    # Every one-leaf state's count is the same: each took one step.
    merged = jax.tree.map(lambda *xs: {k: v for x in xs for k, v in x.items()}
                          if is_one_leaf(xs[0]) else xs[0], *states, is_leaf=is_one_leaf)
    return updates, merged

  return optax.GradientTransformationExtraArgs(tx.init, update)


def adam_spd_leaf_by_leaf(lr, layer_axes=None):
  """adam_spd (λ = 1) under `leaf_by_leaf`; `layer_axes` a dict over the
  whole model, passed on as a callable since each leaf's update sees a
  one-leaf dict."""
  return leaf_by_leaf(spd_optax.adam_spd(
      lr, weight_decay=1.0,
      layer_axes=None if layer_axes is None else lambda p: {k: layer_axes[k] for k in p}))


def optimizers(shapes, stacked, lr=1e-4):
  """name -> (optimizer, parameter shapes) for one set."""
  if not stacked:
    out = {
        "optax.adamw": (optax.adamw(lr, weight_decay=0.1), shapes),
        "optax.adam": (optax.adam(lr), shapes),
        "naive SPD": (naive_spd(lr, 1.0), shapes),
        "adam_spd": (spd_optax.adam_spd(lr, weight_decay=1.0), shapes),
        "adam_spd leaf by leaf": (adam_spd_leaf_by_leaf(lr), shapes),
    }
  else:
    stacked_shapes, layer_axes = stack_blocks(shapes)
    out = {
        "optax.adamw": (optax.adamw(lr, weight_decay=0.1), stacked_shapes),
        "optax.adam": (optax.adam(lr), stacked_shapes),
        "adam_spd unstacked": (spd_optax.adam_spd(lr, weight_decay=1.0), shapes),
        "adam_spd": (spd_optax.adam_spd(lr, weight_decay=1.0, layer_axes=layer_axes),
                     stacked_shapes),
        "adam_spd leaf by leaf": (adam_spd_leaf_by_leaf(lr, layer_axes), stacked_shapes),
    }
  return out


def make_step(tx, steps_per_call=1):
  """One jitted, donated call running `steps_per_call` optimizer steps on the
  same gradients; more than one runs them in a `lax.fori_loop`, so the
  per-call cost on the host (dispatch, one array handle per leaf in and out)
  is paid once for all of them."""
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def steps(params, state, grads):
    if steps_per_call == 1:
      return step(params, state, grads)
    return jax.lax.fori_loop(0, steps_per_call,
                             lambda _, c: step(*c, grads), (params, state))
  return jax.jit(steps, donate_argnums=(0, 1))


def random_tree(shapes, seed, dtype=jnp.float32):
  keys = iter(jax.random.split(jax.random.key(seed), len(shapes)))
  return {k: (jax.random.normal(next(keys), s, jnp.float32) * 0.02).astype(dtype)
          for k, s in shapes.items()}


def compiled_stats(compiled, n, itemsize, hlo_path=None):
  """XLA's own account of a compiled step: its fusions by kind and the bytes
  it reads and writes, as words per parameter (the byte floor's unit)."""
  text = compiled.as_text()
  if hlo_path is not None:
    hlo_path.write_text(text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  accessed = (cost or {}).get("bytes accessed")
  return {"fusions": dict(collections.Counter(re.findall(r"kind=k(\w+)", text))),
          "words_per_param": None if accessed is None else accessed / (n * itemsize)}


def setup_runs(shapes, stacked=False, warmup=3, dtype=jnp.float32, hlo_dir=None, tag="",
               steps_per_call=1, names=None):
  """Builds, compiles and warms up each optimizer's step on one set (only
  those in `names`, if given; optax.adamw always, the ratios' base). Returns
  (runs, stats, n, leaves): runs maps a name to [compiled step, params,
  state, grads, times], stats the compiled steps' `compiled_stats`, n the
  parameter count and leaves adam_spd's leaf count."""
  n = sum(int(jnp.prod(jnp.array(s))) for s in shapes.values())
  itemsize = jnp.dtype(dtype).itemsize
  runs, grads_for, stats = {}, {}, {}
  for name, (tx, tx_shapes) in optimizers(shapes, stacked).items():
    if names is not None and name not in names and name != "optax.adamw":
      continue
    # One gradient tree per model layout, shared: at 1.35B a copy is 5.4 GB.
    if id(tx_shapes) not in grads_for:
      grads_for[id(tx_shapes)] = random_tree(tx_shapes, 1, dtype)
    params, grads = random_tree(tx_shapes, 0, dtype), grads_for[id(tx_shapes)]
    state = jax.jit(tx.init)(params)
    step = make_step(tx, steps_per_call).lower(params, state, grads).compile()
    hlo = None if hlo_dir is None else hlo_dir / f"{tag}{re.sub(r'[^A-Za-z0-9]+', '_', name)}.hlo.txt"
    stats[name] = compiled_stats(step, n, itemsize, hlo)
    for _ in range(warmup):  # let SPD's condition start firing
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    runs[name] = [step, params, state, grads, []]
    if name == "adam_spd":
      leaves = len(tx_shapes)
  return runs, stats, n, leaves


def alternate(runs, reps):
  """Times `reps` calls of each run's step, alternating between the runs so
  that drifting clocks hit all alike; appends seconds per call to each
  run's times and keeps its (donated) params and state current."""
  for _ in range(reps):
    for name, run in runs.items():
      step, params, state, grads, times = run
      t0 = time.perf_counter()
      params, state = step(params, state, grads)
      jax.block_until_ready((params, state))
      times.append(time.perf_counter() - t0)
      run[1], run[2] = params, state


def medians(runs, steps_per_call, stacked):
  """Median milliseconds per step of each run, their ratios to optax.adamw
  and (stacked sets) adam_spd stacked over unstacked."""
  med = {k: 1e3 * statistics.median(r[4]) / steps_per_call for k, r in runs.items()}
  out = {"steps_per_call": steps_per_call, "median_ms": med,
         "ratio_to_adamw": {k: v / med["optax.adamw"] for k, v in med.items()}}
  if stacked:
    out["stacked_over_unstacked"] = med["adam_spd"] / med["adam_spd unstacked"]
  return out


def bench(shapes, reps, stacked=False, warmup=3, dtype=jnp.float32, hlo_dir=None, tag="",
          steps_per_call=1):
  """Medians per optimizer step: of one call's time, over `steps_per_call`."""
  runs, stats, n, leaves = setup_runs(shapes, stacked, warmup, dtype, hlo_dir, tag,
                                      steps_per_call)
  alternate(runs, reps)
  out = {"params": n, "leaves": leaves} | medians(runs, steps_per_call, stacked)
  out["compiled"] = stats
  if stacked:  # keep the key order of earlier JSON: compiled before the ratio
    out["stacked_over_unstacked"] = out.pop("stacked_over_unstacked")
  return out


def copy_bandwidth(gib=1, reps=20):
  """Device memory bandwidth of a plain elementwise pass (read + write), the
  rate the byte floors in NOTES.md divide by."""
  x = jnp.ones(int(gib * 2**28), jnp.float32)
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = jax.block_until_ready(step(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    x = jax.block_until_ready(step(x))
    times.append(time.perf_counter() - t0)
  return 2 * x.nbytes / statistics.median(times) / 1e9


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = (list(SETS) if jax.default_backend() != "cpu"
             else ["vit_b16", "vit_b16_stacked"])
  parser.add_argument("--sets", nargs="+", choices=SETS, default=default)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="of params, gradients and (so) every optimizer's state")
  parser.add_argument("--json", default="benchmarks/optimizer_step.json")
  parser.add_argument("--steps-per-call", type=int, default=1,
                      help="K > 1 runs K steps inside one jit (lax.fori_loop) "
                      "per call, and reports the call's time over K: with the "
                      "default, one step per call, the difference is the "
                      "per-call cost on the host")
  parser.add_argument("--hlo-dir", default=None,
                      help="write each compiled step's optimized HLO here")
  args = parser.parse_args(argv)
  hlo_dir = None if args.hlo_dir is None else pathlib.Path(args.hlo_dir)
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)

  device = jax.devices()[0]
  results = {"backend": jax.default_backend(), "device": device.device_kind,
             "jax": jax.__version__, "python": platform.python_version(),
             "reps": args.reps, "dtype": args.dtype,
             "steps_per_call": args.steps_per_call,
             "copy_GBps": copy_bandwidth(), "sets": {}}
  print(f"{results['device']} ({results['backend']}), jax {jax.__version__}, "
        f"{args.reps} alternating reps, {args.dtype}, jitted + donated, "
        f"{args.steps_per_call} step(s) per call; "
        f"device copy {results['copy_GBps']:.0f} GB/s (read + write)")
  for name in args.sets:
    r = bench(SETS[name](), args.reps, stacked=name.endswith("_stacked"),
              dtype=jnp.dtype(args.dtype), hlo_dir=hlo_dir, tag=f"{name}_{args.dtype}_",
              steps_per_call=args.steps_per_call)
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
    print("words per parameter (XLA's count) / fusions: " + "; ".join(
        f"{k} {v['words_per_param'] or float('nan'):.1f} / {sum(v['fusions'].values())}"
        for k, v in r["compiled"].items()), flush=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
