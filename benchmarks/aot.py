"""Compile-only structure of one optimizer step on XLA:TPU, XLA:GPU and XLA:CPU.

COMPILER COUNTS AND ESTIMATES, NOT TIMINGS. Nothing here runs on an
accelerator: each step is compiled for a TPU topology (libtpu) or an H200
target description (the CUDA plugin) on a CPU-only machine, and what is
reported is read off the compiler's optimized HLO, its memory analysis and,
on TPU, its own cost model (``estimated_cycles``).

  # TPU (pip install -e ".[aot]": jax[tpu])
  python benchmarks/aot.py --target tpu
  # the same sets in a whole training step (forward, backward, optimizer)
  python benchmarks/aot.py --target tpu --whole-step --sets llama_block llama_1b_x16
  # GPU (a Python >= 3.12 venv with jax[cuda13], benchmarks/targets/README.md)
  JAX_PLATFORMS=cpu python benchmarks/aot.py --target gpu
  # this machine's XLA:CPU, one device and a (2, 4) mesh of host devices
  python benchmarks/aot.py --target cpu

Each optimizer is compiled as one donated ``params, state = step(params,
grads, state)``. Per set and optimizer it reports, from the entry
computation of the optimized HLO:

- fusions per leaf (``fusion`` instructions; "large" ones touch arrays of
  more than 64 elements, the rest compute per-layer values), and kernels per
  leaf (fusions, copies, custom calls, collectives and unfused compute on
  arrays, not the scalar unit's work);
- words per parameter: each kernel's distinct operands plus its outputs, in
  bytes, over (parameters per device × the params' itemsize). Memory-space
  prefetches (TPU VMEM) and host transfers are not kernels and are reported
  on their own;
- param-sized copies: ``copy`` (or a same-memory-space ``copy-start``) of an
  array as large as the smallest matrix leaf;
- arrays in and out of the entry computation, per leaf;
- XLA:TPU's estimated cycles: the sum of ``estimated_cycles`` over the
  entry computation (TPU only);
- the order of the large kernels by leaf (`leaf_order`): the share of
  leaves whose kernels run back to back, and how many kernels lie from a
  leaf's first to its last (on XLA:GPU the order the kernels run in);
- ``hlo_sha256``: a fingerprint of the optimized HLO less its source
  metadata (`hlo_fingerprint`), so that two versions of the library can be
  shown to compile the same step;
- peak memory per device: ``memory_analysis()``'s
  ``peak_memory_in_bytes`` where it has one (XLA:TPU, XLA:GPU), else
  arguments + outputs - aliased + temporaries. XLA:TPU's counts pinned_host
  buffers too; for a host anchor the table also gives the peak without
  them (``device_peak_bytes``).

"naive SPD" is optax.adam plus SPD written per leaf as the reference writes
it (benchmarks/optimizer_step.py). "adam_spd" is the library as installed.
"adam_spd host-anchor" keeps the anchor in pinned host memory
(``anchor_on_host=True``), brought in leaf by leaf (a stacked leaf layer by
layer, in a loop). "adam_spd leaf by leaf" (GPU target only) ties each
leaf's gradient to the previous leaf's new params, so that a leaf's two
passes run back to back (`optimizer_step.leaf_by_leaf`). "adam_spd in
shard_map" is the step inside
`jax.shard_map` (hand-written FSDP×TP). A variant the library cannot build
(an option it does not have) is skipped with a note, not compiled.

``--whole-step`` compiles a training step instead: forward, backward and the
optimizer over the set's blocks (benchmarks/train_step.py), and reports
each optimizer's estimated cycles and peak against optax.adamw's in the
same step. XLA:TPU's estimate covers the kernels of the entry computation:
not the body of a loop (the host anchor's layer-by-layer transfers), and
no collective (the all-reduces of the gradients and of SPD's sums carry no
estimate), so the share of a step omits their latency.

``spd_optax`` is whichever one Python imports first (PYTHONPATH, then an
installed one, then this checkout's), so one copy of this script can
compile two versions of the library:

  PYTHONPATH=/path/to/old/checkout python benchmarks/aot.py --target tpu \
      --sets llama_1b_x16_stacked llama_1b_x16 --json before.json
"""

import argparse
import collections
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import sys
import time

# No Python source locations in the lowered modules: a custom kernel's
# serialized Mosaic module carries them inside the HLO, where
# `hlo_fingerprint` cannot strip them.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# PYTHONPATH's or the installed library before this checkout's.
if importlib.util.find_spec("spd_optax") is None:
  sys.path.insert(0, str(_ROOT))
import spd_optax  # noqa: E402
sys.path.insert(0, str(_ROOT))  # this script's own benchmarks/
from benchmarks import optimizer_step, train_step  # noqa: E402

DISCLAIMER = ("compiler counts and estimates from compile-only builds, not "
              "timings: nothing ran on an accelerator")
# The H100/H200 target descriptions (benchmarks/targets/README.md).
TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "targets"

# --------------------------------------------------------------------------
# Parameter sets


def llama_blocks(n: int = 2) -> dict[str, tuple[int, ...]]:
  """`n` blocks of benchmarks/optimizer_step.py's LLaMA-1B (d 2048, FFN 5504):
  q/k/v/o, gate/up/down and the two norms, 9 leaves per block. The embedding
  and head are left out: the block is the repeated unit and is cheap to
  compile."""
  full = optimizer_step.llama_1b_shapes()
  return {k: s for k, s in full.items()
          if (m := re.match(r"layer(\d+)/", k)) and int(m[1]) < n}


def vit_blocks(n: int = 2) -> dict[str, tuple[int, ...]]:
  """`n` blocks of ViT-B/16 (d 768, MLP 3072): qkv, proj, fc1, fc2 with
  their biases and the two layer norms, 12 leaves per block."""
  full = optimizer_step.vit_b16_shapes()
  return {k: s for k, s in full.items()
          if (m := re.match(r"block(\d+)/", k)) and int(m[1]) < n}


# Two blocks of each model (and the same two stacked): every leaf shape of
# the models' blocks, at a fraction of the compile time. The whole models
# are there too, for a target that compiles fast, and all the blocks of
# each at full depth (LLaMA-1B's 16, 0.81B; ViT-B/16's 12, 85M) without the
# embeddings and head.
SETS = {
    "vit_block": (vit_blocks, False),
    "vit_block_stacked": (vit_blocks, True),
    "llama_block": (llama_blocks, False),
    "llama_block_stacked": (llama_blocks, True),
    "vit_b16": (optimizer_step.vit_b16_shapes, False),
    "vit_b16_stacked": (optimizer_step.vit_b16_shapes, True),
    "llama_1b": (optimizer_step.llama_1b_shapes, False),
    "llama_1b_stacked": (optimizer_step.llama_1b_shapes, True),
    "vit_b16_x12": (functools.partial(vit_blocks, 12), False),
    "vit_b16_x12_stacked": (functools.partial(vit_blocks, 12), True),
    "llama_1b_x16": (functools.partial(llama_blocks, 16), False),
    "llama_1b_x16_stacked": (functools.partial(llama_blocks, 16), True),
}
DEFAULT_SETS = ["vit_block", "vit_block_stacked", "llama_block", "llama_block_stacked"]


def set_shapes(name):
  """(shapes, layer_axes or None) of a set."""
  make, stacked = SETS[name]
  shapes = make()
  if not stacked:
    return shapes, None
  return optimizer_step.stack_blocks(shapes)


# --------------------------------------------------------------------------
# Targets


@dataclasses.dataclass
class Target:
  name: str
  mesh: Mesh
  platform: str
  host_anchor: bool = False  # also compile the host-anchor variants

  @property
  def sharded(self) -> bool:
    return self.mesh.devices.size > 1


def cpu_target(mesh_shape) -> Target:
  """This machine's XLA:CPU, on one device or a mesh of the host devices
  that ``--xla_force_host_platform_device_count`` makes (main sets 8)."""
  n = int(np.prod(mesh_shape))
  devices = np.array(jax.devices("cpu")[:n]).reshape(mesh_shape)
  label = f"cpu {'x'.join(map(str, mesh_shape))}" if n > 1 else "cpu:1 device"
  return Target(label, Mesh(devices, ("data", "model")), "cpu")


def tpu_target(topology: str, mesh_shape) -> Target:
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devices = np.array(topo.devices)[:int(np.prod(mesh_shape))].reshape(mesh_shape)
  label = topology if devices.size > 1 else f"{topology.split(':')[0]}:1 chip"
  return Target(label, Mesh(devices, ("data", "model")), "tpu")


def gpu_target(config: str = "h200") -> Target:
  cfg = (TARGETS_DIR / f"{config}.txtpb").read_text()
  topo = topologies.get_topology_desc(platform="cuda", target_config=cfg, topology="1x1x1")
  mesh = topologies.make_mesh(topo, (1, 1), ("data", "model"))
  return Target(f"{config.upper()} (1 GPU)", mesh, "gpu")


def spec_for(shape, layer_axis, mesh) -> P:
  """FSDP×TP: the last axis over "model", the one before it over "data",
  where they divide; a stacked leaf's layer axis stays whole."""
  spec = [None] * len(shape)
  free = [i for i in range(len(shape)) if i != layer_axis]
  for axis_name, pos in (("model", -1), ("data", -2)):
    if len(free) >= -pos and shape[free[pos]] % mesh.shape[axis_name] == 0:
      spec[free[pos]] = axis_name
  return P(*spec)


# --------------------------------------------------------------------------
# Optimizers


def naive_spd(lr, weight_decay):
  return optimizer_step.naive_spd(lr, weight_decay)


class Unavailable(Exception):
  """An optimizer variant the library being compiled cannot build."""


def optimizers(layer_axes, lr=1e-4, host_anchor=True, param_specs=None, only=None,
               leaf_by_leaf=False):
  """name -> optimizer for one set (`layer_axes` None when unstacked). With
  `param_specs` (a sharded target's), "adam_spd in shard_map" is compiled
  inside `jax.shard_map` over the target's mesh (hand-written FSDP×TP,
  SPD's sums added over the axes splitting each leaf). Only the names in
  `only` if given; a variant the library cannot build (an option it does
  not have) maps to an `Unavailable` instead of an optimizer. With
  `leaf_by_leaf`, also adam_spd ordered leaf by leaf
  (`optimizer_step.leaf_by_leaf`)."""
  spd = lambda **kw: spd_optax.adam_spd(lr, weight_decay=1.0, layer_axes=layer_axes, **kw)
  make = {
      "optax.adamw": lambda: optax.adamw(lr, weight_decay=0.1),
      "optax.adam": lambda: optax.adam(lr),
      "naive SPD": lambda: naive_spd(lr, 1.0),
      "adam_spd": spd,
      "adam_spd rows_l1": lambda: spd(norm="rows_l1"),
      "adam_spd zeros anchor": lambda: spd(anchor="zeros"),
      "adam_spd bf16 anchor": lambda: spd(anchor_dtype=jnp.bfloat16),
  }
  if param_specs is not None:
    make["adam_spd in shard_map"] = lambda: spd(param_specs=param_specs)
  if layer_axes is not None:
    del make["naive SPD"]  # its sums are per leaf, not per layer
  if host_anchor:
    make["adam_spd host-anchor"] = lambda: spd(anchor_on_host=True)
  if leaf_by_leaf:
    make["adam_spd leaf by leaf"] = lambda: optimizer_step.adam_spd_leaf_by_leaf(lr, layer_axes)
  out = {}
  for name, f in make.items():
    if only and name not in only:
      continue
    try:
      out[name] = f()
    except Unavailable as e:
      out[name] = e
    except (TypeError, ValueError, AttributeError, ImportError) as e:
      out[name] = Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return out


# --------------------------------------------------------------------------
# Reading the optimized HLO

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
# Not kernels: bookkeeping, and moves between memory spaces (counted apart).
_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                "copy-start", "copy-done", "after-all", "opt-barrier", "partition-id",
                "replica-id", "iota", "all-reduce-done", "all-gather-done",
                "collective-permute-done", "async-done", "async-update"}


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  operands: list[str]
  rest: str


def _split_type(s: str) -> tuple[str, str]:
  """(the type at the start of `s`, what follows it)."""
  if s.startswith("("):
    depth = 0
    for i, c in enumerate(s):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        return s[:i + 1], s[i + 2:]
  t, _, rest = s.partition(" ")
  return t, rest


def entry_instructions(text: str) -> list[Instr]:
  """The instructions of the ENTRY computation of an HLO module's text."""
  start = text.index("\nENTRY ")
  body = text[text.index("{\n", start) + 2:text.index("\n}", start)]
  out = []
  for line in body.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)$", line)
    if m is None:
      continue
    name, rest = m[1], m[2]
    typ, rest = _split_type(rest)
    op, _, rest = rest.partition("(")
    depth, i = 1, 0
    while depth and i < len(rest):
      depth += rest[i] == "("
      depth -= rest[i] == ")"
      i += 1
    args, tail = rest[:i - 1], rest[i:]
    operands = re.findall(r"%([\w.\-]+)", args)
    out.append(Instr(name, typ, op.strip(), operands, tail))
  return out


def arrays(typ: str) -> list[tuple[int, int, int]]:
  """(elements, bytes, memory space) of each array in an HLO type."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(typ):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((n, n * _DTYPE_BYTES[dtype], int(space[1]) if space else 0))
  return out


def nbytes(typ: str) -> int:
  return sum(b for _, b, _ in arrays(typ))


def largest_array(ins: Instr, by_name: dict) -> int:
  """Elements of the largest array an instruction reads or writes: at most
  64 for the per-leaf or per-layer values and step counts."""
  return max([n for o in ins.operands if o in by_name for n, _, _ in arrays(by_name[o].type)]
             + [n for n, _, _ in arrays(ins.type)], default=0)


def hlo_counts(text: str, leaf_elements: list[int], itemsize: int) -> dict:
  """Counts over the entry computation; `leaf_elements` per device."""
  instrs = entry_instructions(text)
  by_name = {i.name: i for i in instrs}
  matrices = [n for n in leaf_elements if n >= 4096] or leaf_elements
  big = min(matrices)
  space = lambda name: (arrays(by_name[name].type) or [(0, 0, 0)])[0][2] if name in by_name else 0
  kinds = collections.Counter()
  words_bytes = prefetch_bytes = host_bytes = 0
  copies = []
  cycles = 0
  unestimated = 0
  for ins in instrs:
    m = re.search(r'"estimated_cycles":"(\d+)"', ins.rest)
    cycles += int(m[1]) if m else 0
    # XLA:TPU's cost model gives a Mosaic (Pallas) kernel no estimate.
    unestimated += m is None and 'custom_call_target="tpu_custom_call"' in ins.rest
    if ins.op in ("copy-start", "slice-start"):
      # copy-start: (dst, src, context); slice-start: ((src), dst, context).
      dst = arrays(ins.type)[0 if ins.op == "copy-start" else 1]
      src_space = space(ins.operands[0])
      if 5 in (src_space, dst[2]):  # S(5): host memory
        host_bytes += dst[1]
      elif src_space != dst[2]:  # HBM <-> VMEM: the consumer counts it
        prefetch_bytes += dst[1]
      else:  # a real copy within one memory space
        kinds["copy"] += 1
        words_bytes += 2 * dst[1]
        copies += [dst[0]] if dst[0] >= big else []
      continue
    if ins.op in _NOT_KERNELS or ins.op == "slice-done" or (
        ins.op == "custom-call" and "ConcatBitcast" in ins.rest):
      continue
    operands = [by_name[o] for o in dict.fromkeys(ins.operands) if o in by_name]
    if ins.op == "copy" and 5 in (space(ins.operands[0]), arrays(ins.type)[0][2]):
      host_bytes += nbytes(ins.type)
      continue
    small = largest_array(ins, by_name) <= 64  # per-leaf or per-layer values, step counts
    if small and ins.op != "fusion":  # unfused scalar work (the TPU's scalar unit)
      kinds["scalar ops"] += 1
      continue
    kinds["small fusion" if small else ins.op] += 1
    words_bytes += sum(nbytes(o.type) for o in operands) + nbytes(ins.type)
    if ins.op == "copy" and arrays(ins.type)[0][0] >= big:
      copies.append(arrays(ins.type)[0][0])
  params = [i for i in instrs if i.op == "parameter"]
  root = instrs[-1] if instrs else None
  outs = len(arrays(root.type)) if root is not None else 0
  # The leaves' own arrays (params, grads, moments, anchor), apart from the
  # step's few others (counts, the packed per-layer values): those are a
  # fixed number per step, whatever the number of leaves.
  sizes = set(leaf_elements)
  io = [n for i in params for n, _, _ in arrays(i.type)] + (
      [n for n, _, _ in arrays(root.type)] if root is not None else [])
  small_io = sum(1 for n in io if n not in sizes)
  leaves = len(leaf_elements)
  n = sum(leaf_elements)
  return {
      "fusions_per_leaf": (kinds["fusion"] + kinds["small fusion"]) / leaves,
      "large_fusions_per_leaf": kinds["fusion"] / leaves,
      "kernels_per_leaf": (sum(kinds.values()) - kinds["scalar ops"]) / leaves,
      "kernels": dict(kinds),
      "words_per_param": words_bytes / (n * itemsize),
      "param_sized_copies": len(copies),
      "arrays_in_out_per_leaf": (len(params) + outs) / leaves,
      "arrays_in": len(params), "arrays_out": outs,
      "leaf_arrays_in_out_per_leaf": (len(params) + outs - small_io) / leaves,
      "small_arrays_in_out": small_io,
      "vmem_prefetch_words_per_param": prefetch_bytes / (n * itemsize),
      "host_transfer_words_per_param": host_bytes / (n * itemsize),
      "estimated_cycles": cycles or None,
      "kernels_without_estimate": unestimated,
  }


def leaf_order(text: str) -> dict:
  """How the entry computation orders its large kernels (fusions on arrays of
  more than 64 elements) by the leaf they work on. A kernel's leaf is that
  of the entry parameters it reads, directly or through other
  instructions, each parameter named by its metadata (``params['key']``,
  ``state.inner_state[0].mu['key']``); kernels of no leaf or of several
  are left out. Returns the share of leaves whose kernels run back to
  back, with no other leaf's kernel between them, and the mean and largest
  number of large kernels from a leaf's first to its last (0 for a leaf of
  one kernel). XLA:GPU runs a step's kernels in this order."""
  instrs = entry_instructions(text)
  by_name = {i.name: i for i in instrs}
  named = re.compile(r"op_name=\"[^\"]*\[\\?'([^'\\]+)\\?'\]\"")
  leaves, order = {}, []
  for ins in instrs:
    m = named.search(ins.rest) if ins.op == "parameter" else None
    leaves[ins.name] = {m[1]} if m else set().union(*(leaves.get(o, set())
                                                      for o in ins.operands))
    if (ins.op == "fusion" and len(leaves[ins.name]) == 1
        and largest_array(ins, by_name) > 64):
      order.append(next(iter(leaves[ins.name])))
  positions = collections.defaultdict(list)
  for i, leaf in enumerate(order):
    positions[leaf].append(i)
  if not positions:
    return {}
  spans = [p[-1] - p[0] for p in positions.values()]
  return {"leaves_back_to_back": sum(p[-1] - p[0] + 1 == len(p) for p in positions.values())
          / len(positions),
          "mean_kernels_first_to_last": float(np.mean(spans)),
          "max_kernels_first_to_last": max(spans)}


def hlo_fingerprint(text: str) -> str:
  """sha256 of an optimized HLO module's text less what names the Python
  source (op metadata, the module's name): the same compiled step built by
  other code has the same fingerprint."""
  text = re.sub(r",? metadata=\{[^{}]*\}", "", text)
  text = re.sub(r"^HloModule \S+", "HloModule step", text, flags=re.M)
  # The tables of Python files, functions and frames the metadata points into.
  text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*\n?", "",
                text, flags=re.M)
  return hashlib.sha256(text.encode()).hexdigest()


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  peak = getattr(m, "peak_memory_in_bytes", None) or (
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes)
  host = int(m.host_argument_size_in_bytes) + int(m.host_temp_size_in_bytes)
  # XLA:TPU's peak counts pinned_host buffers too (a 64 MiB host argument
  # passed through a step on a 64 MiB device array peaks at 128 MiB), so a
  # host anchor is in `peak_bytes`. `device_peak_bytes` leaves host memory
  # out: exact where the host buffers live through the whole step (a
  # donated anchor, returned unchanged) and are all there is in host memory.
  return {"peak_bytes": int(peak), "device_peak_bytes": int(peak) - host,
          "argument_bytes": int(m.argument_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "host_argument_bytes": int(m.host_argument_size_in_bytes),
          "host_temp_bytes": int(m.host_temp_size_in_bytes)}


# --------------------------------------------------------------------------
# Compiling one step


def abstract_tree(shapes, layer_axes, target, dtype):
  def one(k, s):
    ax = None if layer_axes is None else layer_axes[k]
    spec = spec_for(s, ax, target.mesh) if target.sharded else P()
    return jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(target.mesh, spec))
  return {k: one(k, s) for k, s in shapes.items()}


def param_specs(shapes, layer_axes, target) -> dict:
  """The params' PartitionSpecs on the target's mesh (`abstract_tree`'s)."""
  return {k: x.sharding.spec for k, x in
          abstract_tree(shapes, layer_axes, target, jnp.float32).items()}


def state_shardings(tx, params, target, host_anchor=False):
  """optax's tree_map_params recipe (docs/scaling.md): params-shaped state
  takes the params' shardings, the rest is replicated. A host anchor keeps
  its memory kind."""
  abstract = jax.eval_shape(tx.init, params)
  psh = jax.tree.map(lambda p: p.sharding, params)
  replicated = NamedSharding(target.mesh, P())
  try:
    ssh = optax.tree_map_params(
        tx, lambda _, s: s, abstract, psh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  except Exception:  # naive SPD: (adam state, anchor)
    adam = optax.tree_map_params(optax.adam(1e-4), lambda _, s: s,
                                 abstract[0], psh,
                                 transform_non_params=lambda _: replicated)
    ssh = (adam, psh)
  host = lambda s: s.with_memory_kind("pinned_host")
  if host_anchor and hasattr(ssh, "anchor"):
    ssh = ssh._replace(anchor=jax.tree.map(host, ssh.anchor))
  elif host_anchor:
    ssh = (ssh[0], jax.tree.map(host, ssh[1]))
  # The shardings are a prefix of the state (one for all per-layer values).
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  return jax.tree.map(
      lambda s, sub: jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub),
      ssh, abstract, is_leaf=is_sharding)


def compile_step(tx, params, state=None, mesh=None):
  """The jitted, donated step; inside `jax.shard_map` over `mesh` if given,
  with the specs of `params` and `state` (abstract arrays with shardings)."""
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  if mesh is not None:
    spec = lambda tree: jax.tree.map(lambda x: x.sharding.spec, tree)
    step = jax.shard_map(step, mesh=mesh,
                         in_specs=(spec(params), spec(params), spec(state)),
                         out_specs=(spec(params), spec(state)))
  return jax.jit(step, donate_argnums=(0, 2))


def analyse(tx, shapes, layer_axes, target, dtype, hlo_path=None,
            host_anchor=False, in_shard_map=False, whole_step=False) -> dict:
  params = abstract_tree(shapes, layer_axes, target, dtype)
  state = state_shardings(tx, params, target, host_anchor)
  t0 = time.perf_counter()
  if whole_step:
    step = jax.jit(train_step.make(tx), donate_argnums=(0, 1))
    compiled = step.lower(params, state, train_step.inputs(shapes, target.mesh)).compile()
  else:
    step = compile_step(tx, params, state, target.mesh if in_shard_map else None)
    compiled = step.lower(params, params, state).compile()
  seconds = time.perf_counter() - t0
  text = compiled.as_text()
  if hlo_path is not None:
    hlo_path.write_text(text)
  leaf_elements = [int(np.prod(p.sharding.shard_shape(p.shape))) for p in params.values()]
  out = hlo_counts(text, leaf_elements, jnp.dtype(dtype).itemsize)
  out |= memory(compiled)
  out |= leaf_order(text)
  out["hlo_sha256"] = hlo_fingerprint(text)
  out["state_arrays"] = len(jax.tree.leaves(state))
  out["largest_leaf_bytes"] = max(leaf_elements) * jnp.dtype(dtype).itemsize
  out["compile_s"] = round(seconds, 1)
  return out


def run_set(set_name, target, dtype, hlo_dir=None, only=None, whole_step=False):
  shapes, layer_axes = set_shapes(set_name)
  n = sum(int(np.prod(s)) for s in shapes.values())
  txs = optimizers(layer_axes, host_anchor=target.host_anchor,
                   leaf_by_leaf=target.platform == "gpu" and not whole_step,
                   param_specs=param_specs(shapes, layer_axes, target)
                   if target.sharded and not whole_step else None, only=only)
  result = {"params": n, "leaves": len(shapes),
            "layout": "sharded FSDP×TP" if target.sharded else "unsharded",
            "optimizers": {}}
  if whole_step:
    model = train_step.model_of(shapes)
    result["step"] = (f"forward, backward and optimizer; {train_step.EXAMPLES_PER_SHARD[model]}"
                      f" × {train_step.TOKENS[model]} tokens per data shard")
  for name, tx in txs.items():
    if isinstance(tx, Unavailable):
      result.setdefault("skipped", {})[name] = str(tx)
      print(f"  {name}: skipped, {tx}", flush=True)
      continue
    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{target.name}_{set_name}_{name}")
    hlo = None if hlo_dir is None else hlo_dir / f"{tag}.hlo.txt"
    kw = dict(host_anchor="host-anchor" in name, in_shard_map=name.endswith("in shard_map"))
    try:
      r = analyse(tx, shapes, layer_axes, target, dtype, hlo, whole_step=whole_step, **kw)
      if whole_step:  # the optimizer's own cycles, from its step alone
        r["optimizer_cycles"] = analyse(tx, shapes, layer_axes, target, dtype,
                                        **kw)["estimated_cycles"]
    except Exception as e:  # e.g. RESOURCE_EXHAUSTED: report, go on
      r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    result["optimizers"][name] = r
    print(f"  {name}: {summary(r)}", flush=True)
  base = result["optimizers"].get("optax.adamw", {}).get("estimated_cycles")
  for r in result["optimizers"].values():
    # A sum that leaves kernels out is no estimate of the step.
    if base and r.get("estimated_cycles") and not r.get("kernels_without_estimate"):
      r["cycles_to_adamw"] = r["estimated_cycles"] / base
  adamw = result["optimizers"].get("optax.adamw", {})
  for r in result["optimizers"].values():
    # What the optimizer adds to a step of optax.adamw, from the optimizer
    # steps alone: the whole steps' difference also holds XLA's other
    # choices for the forward and backward passes (a few 0.1% either way).
    if whole_step and r.get("optimizer_cycles") and adamw.get("optimizer_cycles"):
      r["added_to_adamw_step"] = ((r["optimizer_cycles"] - adamw["optimizer_cycles"])
                                  / adamw["estimated_cycles"])
  return result


def summary(r) -> str:
  if "error" in r:
    return r["error"]
  cyc = "" if r.get("estimated_cycles") is None else f", est. cycles {r['estimated_cycles']:,}"
  if r.get("kernels_without_estimate"):
    cyc += f" (+{r['kernels_without_estimate']} Pallas kernels XLA gives no estimate)"
  if "added_to_adamw_step" in r:
    cyc += f", adds {100 * r['added_to_adamw_step']:+.2f}% to optax.adamw's step"
  if "leaves_back_to_back" in r:
    cyc += (f", leaves back to back {r['leaves_back_to_back']:.1%} (mean "
            f"{r['mean_kernels_first_to_last']:.2f} kernels first to last)")
  return (f"fusions/leaf {r['fusions_per_leaf']:.2f}, words/param "
          f"{r['words_per_param']:.2f}, copies {r['param_sized_copies']}, arrays/leaf "
          f"{r['arrays_in_out_per_leaf']:.2f}, peak {_peak(r)} MiB"
          f"{cyc} ({r['compile_s']} s to compile)")


def _peak(r) -> str:
  peak = f"{r.get('peak_bytes', 0) / 2**20:.1f}"
  if r.get("device_peak_bytes", r.get("peak_bytes")) != r.get("peak_bytes"):
    peak += f" ({r['device_peak_bytes'] / 2**20:.1f} without host memory)"
  return peak


def whole_step_table(results) -> str:
  lines = [f"Whole training steps, compile-only ({DISCLAIMER}).", "",
           "| target | set | step | optimizer | est. cycles of the step / adamw's | "
           "the optimizer adds to adamw's step | peak MiB/device |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for tname, sets in results["targets"].items():
    for sname, s in sets.items():
      for oname, r in s["optimizers"].items():
        if "error" in r:
          lines.append(f"| {tname} | {sname} | | {oname} | {r['error'][:60]} | | |")
          continue
        ratio = f"{r['cycles_to_adamw']:.4f}×" if r.get("cycles_to_adamw") else "–"
        added = (f"{100 * r['added_to_adamw_step']:+.2f}%"
                 if "added_to_adamw_step" in r else "–")
        lines.append(f"| {tname} | {sname} | {s.get('step', '')} | {oname} | {ratio} | "
                     f"{added} | {_peak(r)} |")
  return "\n".join(lines)


def table(results) -> str:
  if results.get("whole_step"):
    return whole_step_table(results)
  lines = [f"Compile-only ({DISCLAIMER}).", "",
           "| target | set | optimizer | est. cycles / adamw | fusions/leaf | "
           "kernels/leaf | words/param | param-sized copies | arrays in+out/leaf "
           "(the leaves' + the step's few) | "
           "peak MiB/device |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for tname, sets in results["targets"].items():
    for sname, s in sets.items():
      for oname, r in s["optimizers"].items():
        if "error" in r:
          lines.append(f"| {tname} | {sname} | {oname} | {r['error'][:60]} |" + " |" * 6)
          continue
        ratio = f"{r['cycles_to_adamw']:.2f}×" if r.get("cycles_to_adamw") else (
            "no estimate (Pallas)" if r.get("kernels_without_estimate") else "–")
        io = f"{r['arrays_in_out_per_leaf']:.2f}"
        if "leaf_arrays_in_out_per_leaf" in r:  # results written after 2026-12-01
          io += f" ({r['leaf_arrays_in_out_per_leaf']:.2f} + {r['small_arrays_in_out']})"
        lines.append(
            f"| {tname} | {sname} | {oname} | {ratio} | {r['fusions_per_leaf']:.2f} | "
            f"{r['kernels_per_leaf']:.2f} | {r['words_per_param']:.2f} | "
            f"{r['param_sized_copies']} | {io} | "
            f"{_peak(r)} |")
  return "\n".join(lines)


TPU_TARGETS = ["v5e:2x2", "v5p:4x4x4", "v5e:1chip"]


def plan(target_kind, sets, tpu_targets=TPU_TARGETS):
  """(target, set names) pairs to compile."""
  if target_kind == "tpu":
    # Sharded v5e:2x2 for every set (with the host-anchor variants: the
    # memory comparison is made there); one chip and a v5p pod slice for
    # the LLaMA sets, to keep the run's compile time down.
    v5e = tpu_target("v5e:2x2", (2, 2))
    v5e.host_anchor = True
    llama = [s for s in sets if s.startswith("llama")]
    out = {"v5e:2x2": lambda: (v5e, sets),
           "v5p:4x4x4": lambda: (tpu_target("v5p:4x4x4", (16, 4)), llama),
           "v5e:1chip": lambda: (tpu_target("v5e:2x2", (1, 1)), llama)}
    return [out[t]() for t in TPU_TARGETS if t in tpu_targets]
  if target_kind == "cpu":
    one = cpu_target((1, 1))
    one.host_anchor = True  # pinned_host on XLA:CPU from jax 0.10.2
    return [(one, sets), (cpu_target((2, 4)), sets)]
  return [(gpu_target("h200"), sets)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", choices=["tpu", "gpu", "cpu"])
  parser.add_argument("--show", nargs="+", default=None, metavar="JSON",
                      help="print the tables of results written before, and exit")
  parser.add_argument("--sets", nargs="+", choices=SETS, default=DEFAULT_SETS)
  parser.add_argument("--optimizers", nargs="+", default=None,
                      help="compile only these (default: all)")
  parser.add_argument("--tpu-targets", nargs="+", choices=TPU_TARGETS, default=TPU_TARGETS,
                      help="--target tpu: the slices to compile for (default: all)")
  parser.add_argument("--whole-step", action="store_true",
                      help="compile forward, backward and optimizer (benchmarks/train_step.py)")
  parser.add_argument("--examples-per-shard", type=int, default=None,
                      help="--whole-step: examples per data shard (default: "
                           f"{train_step.EXAMPLES_PER_SHARD})")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--json", default=None,
                      help="default: benchmarks/results/aot_<target>.json")
  parser.add_argument("--hlo-dir", default=None)
  args = parser.parse_args(argv)
  if args.show:
    for path in args.show:
      r = json.loads(pathlib.Path(path).read_text())
      print(f"{path} (commit {r['commit']}, jax {r['jax']}):\n{table(r)}\n")
    return
  if args.target is None:
    parser.error("--target is required")
  if args.examples_per_shard:
    train_step.EXAMPLES_PER_SHARD = dict.fromkeys(train_step.EXAMPLES_PER_SHARD,
                                                  args.examples_per_shard)
  if args.target == "cpu":  # before jax starts its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
  hlo_dir = None if args.hlo_dir is None else pathlib.Path(args.hlo_dir)
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
  out = pathlib.Path(args.json or f"benchmarks/results/aot_{args.target}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or None
  library = pathlib.Path(spd_optax.__file__).parent
  library_commit = os.popen(f"git -C '{library}' rev-parse --short HEAD 2>/dev/null"
                            ).read().strip() or None
  if library_commit and os.popen(f"git -C '{library}' status --porcelain -- . 2>/dev/null").read():
    library_commit += " (with uncommitted changes)"
  results = {"note": DISCLAIMER, "kind": "compile-only", "target": args.target,
             "jax": jax.__version__, "python": platform.python_version(),
             "commit": commit, "library_commit": library_commit,
             "dtype": args.dtype, "whole_step": args.whole_step, "targets": {}}
  print(f"Compile-only, {args.target}: {DISCLAIMER}. jax {jax.__version__}, {args.dtype}.")
  for target, sets in plan(args.target, args.sets, args.tpu_targets):
    for s in sets:
      print(f"{target.name}, {s}:", flush=True)
      results["targets"].setdefault(target.name, {})[s] = run_set(
          s, target, jnp.dtype(args.dtype), hlo_dir, args.optimizers, args.whole_step)
  print()
  print(table(results))
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
