"""Pod-slice memory plan for the full fine-tuning step (compile-only: XLA's
analysis, not a run).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m examples.llm.memory_plan \\
        --topology v5p:4x4x4 --out benchmarks/results/llm_full_memory_plan.json

Compiles the train step of `full_finetune.py` (`full_train.make_step`: the
scanned LLaMA, FSDP over every chip of the slice, donated params and state)
for a TPU slice that is not here, from abstract inputs: no weights, no
devices. Needs libtpu (`pip install -e ".[aot]"`). For
each model shape and optimizer it records XLA:TPU's per-device memory
analysis and its cost model's estimate of the step (the sum of the entry
computation's `estimated_cycles`), or the compiler's refusal
(RESOURCE_EXHAUSTED) when the step does not fit in HBM.
"""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import argparse
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import spd_optax
from examples.llm import full_configs, full_train, scan_model
from examples.llm.model import LlamaConfig

SHAPES = {
    "smollm2-135m": LlamaConfig(),
    # Llama 3.2 1B and Llama 3.1 8B shapes (tied / untied embeddings).
    "llama-1b": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32,
                            n_kv_heads=8, ffn_dim=8192, rope_base=500000.0,
                            tie_embeddings=True),
    "llama-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                            n_kv_heads=8, ffn_dim=14336, rope_base=500000.0,
                            tie_embeddings=False),
}
VARIANTS = {
    "adamw": ("adamw", {}),
    "spd_fp32_anchor": ("adam_spd", {}),
    "spd_bf16_anchor": ("adam_spd", {"anchor_dtype": jnp.bfloat16}),
    "spd_host_anchor": ("adam_spd", {"anchor_on_host": True}),
}


def tpu_mesh(topology):
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  return Mesh(np.array(topo.devices), ("fsdp",), axis_types=(AxisType.Explicit,))


def abstract_params(cfg, mesh):
  """(graphdef, params as ShapeDtypeStructs with FSDP shardings, layer_axes)."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: scan_model.ScanLlama(cfg, remat="full", rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  specs = nnx.to_pure_dict(scan_model.param_specs(state, {"embed": "fsdp"}))
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                     is_leaf=lambda x: isinstance(x, P))
  shapes = nnx.to_pure_dict(state)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, psh)
  layer_axes = nnx.to_pure_dict(spd_optax.layer_axes_from_names(state, scan_model.LAYERS))
  return graphdef, params, psh, layer_axes


def entry_cycles(hlo_text):
  """Sum of `estimated_cycles` over the instructions of the ENTRY computation
  of compiled TPU HLO (XLA:TPU's own cost model)."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")] if "\n}\n" in entry else entry
  return sum(int(c) for c in re.findall(r'estimated_cycles"?\s*[:=]\s*"?(\d+)', entry))


def plan_one(mesh, cfg, variant, seq_len, train_cfg):
  method, kwargs = VARIANTS[variant]
  with jax.set_mesh(mesh):
    graphdef, params, psh, layer_axes = abstract_params(cfg, mesh)
    tx = full_train.make_tx(train_cfg, method, 1.0, 1000, params, layer_axes, **kwargs)
    # Lowering init gives the state's shardings with memory kinds (the host
    # anchor lives in pinned_host); replicated where none is given.
    info = jax.jit(tx.init).lower(params).out_info
    ssh = jax.tree.map(lambda a: a.sharding or NamedSharding(mesh, P()), info)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         info, ssh)
    n = mesh.devices.size
    tokens = jax.ShapeDtypeStruct((n, seq_len), jnp.int32,
                                  sharding=NamedSharding(mesh, P("fsdp", None)))
    step = full_train.make_step(graphdef, tx, psh, ssh, mesh)
    lowered = step.lower(params, state, tokens)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  row = {"params_b": round(n_params / 1e9, 3), "devices": int(mesh.devices.size),
         "seq_len": seq_len, "global_batch": int(mesh.devices.size)}
  t0 = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # the compiler's refusal is a result here
    msg = str(e)
    row.update(fits=False, compile_s=round(time.time() - t0, 1),
               error=("RESOURCE_EXHAUSTED" if "RESOURCE_EXHAUSTED" in msg
                      else type(e).__name__), message=msg.strip().split("\n")[0][:300])
    # XLA:TPU says how much the step would have needed ("... required for HLO
    # temporaries (18.21G) exceeds available HBM (15.75G)").
    if used := re.search(r"\(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", msg):
      row.update(needed=used.group(1), hbm=used.group(2))
    return row
  mem = compiled.memory_analysis()
  gib = lambda b: round(b / 2**30, 3)
  row.update(
      fits=True, compile_s=round(time.time() - t0, 1),
      peak_gib=gib(getattr(mem, "peak_memory_in_bytes", 0)),
      argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
      alias_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
      host_argument_gib=gib(getattr(mem, "host_argument_size_in_bytes", 0)),
      estimated_cycles=entry_cycles(compiled.as_text()))
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", action="append", default=None,
                 help="TPU slice, e.g. v5p:4x4x4 (repeatable)")
  p.add_argument("--shape", action="append", choices=sorted(SHAPES), default=None)
  p.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--out", default="benchmarks/results/llm_full_memory_plan.json")
  args = p.parse_args(argv)
  if jax.default_backend() == "tpu":
    print("note: a TPU is attached; this still compiles for the named topology only")
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text()) if out.exists() else []
  done = {(r["topology"], r["shape"], r["variant"], r["seq_len"]) for r in rows}
  train_cfg = full_configs.get_config("cpu")
  for topology in args.topology or ["v5p:4x4x4"]:
    mesh = tpu_mesh(topology)
    for shape in args.shape or list(SHAPES):
      for variant in args.variant or list(VARIANTS):
        if (topology, shape, variant, args.seq_len) in done:
          continue
        row = {"topology": topology, "shape": shape, "variant": variant,
               **plan_one(mesh, SHAPES[shape], variant, args.seq_len, train_cfg)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()
