"""Compile-only counts of the per-leaf options: λ per leaf, and row-wise
("mars") norms.

COMPILER COUNTS, NOT TIMINGS (benchmarks/aot.py's tooling and caveats). For
the block sets it compiles one donated step of

- ``adam_spd``: one λ (the default path),
- ``adam_spd λ tree``: `spd_optax.depth_scaled` strengths, a float per
  unstacked leaf or a per-layer array per stacked leaf,
- ``adam_spd rows_l1``: ``norm="rows_l1"``,

beside ``optax.adamw``, on XLA:TPU (v5e, one chip, through libtpu: run it
from a venv with jax[tpu]) and on XLA:CPU (the machine's own backend).

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/aot_rows.py          # TPU + CPU
  python benchmarks/aot_rows.py --targets cpu
"""

import argparse
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import aot  # noqa: E402  (sets the libtpu environment first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import spd_optax  # noqa: E402

SETS = ["vit_block", "vit_block_stacked", "llama_block", "llama_block_stacked"]


def block_of(key):
  # "block3/qkv/w" is block 3; "blocks/qkv/w" stacks all the blocks.
  m = re.match(r"blocks?(\d*)/", key[0])
  return None if m is None else int(m[1] or 0)


def optimizers(shapes, layer_axes):
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  lam = spd_optax.depth_scaled(params, 1.0, block_of, layer_axes=layer_axes, other=0.5)
  return {
      "optax.adamw": optax.adamw(1e-4, weight_decay=0.1),
      "adam_spd": spd_optax.adam_spd(1e-4, weight_decay=1.0, layer_axes=layer_axes),
      "adam_spd λ tree": spd_optax.adam_spd(1e-4, weight_decay=lam, layer_axes=layer_axes),
      "adam_spd rows_l1": spd_optax.adam_spd(1e-4, weight_decay=1.0, layer_axes=layer_axes,
                                             norm="rows_l1"),
  }


def targets(names):
  out = []
  if "tpu" in names:
    out.append(aot.tpu_target("v5e:2x2", (1, 1)))
  if "cpu" in names:
    devices = np.array(jax.devices("cpu")[:1]).reshape(1, 1)
    out.append(aot.Target("XLA:CPU (1 device)", Mesh(devices, ("data", "model")), "cpu"))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", nargs="+", choices=["tpu", "cpu"], default=["tpu", "cpu"])
  parser.add_argument("--sets", nargs="+", choices=SETS, default=SETS)
  args = parser.parse_args(argv)
  print(f"Compile-only ({aot.DISCLAIMER}); spd_optax from "
        f"{pathlib.Path(spd_optax.__file__).parent}.")
  print("| target | set | optimizer | fusions/leaf | kernels/leaf | words/param | "
        "reduce kernels | est. cycles / adamw |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for target in targets(args.targets):
    for set_name in args.sets:
      shapes, layer_axes = aot.set_shapes(set_name)
      base = None
      for name, tx in optimizers(shapes, layer_axes).items():
        params = aot.abstract_tree(shapes, layer_axes, target, jnp.float32)
        state = aot.state_shardings(tx, params, target)
        text = aot.compile_step(tx, params).lower(params, params, state).compile().as_text()
        elements = [int(np.prod(s)) for s in shapes.values()]
        r = aot.hlo_counts(text, elements, 4)
        # Reductions inside the entry's fusions: how many reduce ops XLA kept.
        reduces = len(re.findall(r"= [^=]*\breduce\(", text))
        base = r["estimated_cycles"] if name == "optax.adamw" else base
        ratio = (f"{r['estimated_cycles'] / base:.2f}×" if base and r["estimated_cycles"]
                 else "–")
        print(f"| {target.name} | {set_name} | {name} | {r['fusions_per_leaf']:.2f} | "
              f"{r['kernels_per_leaf']:.2f} | {r['words_per_param']:.2f} | {reduces} | "
              f"{ratio} |", flush=True)


if __name__ == "__main__":
  main()
