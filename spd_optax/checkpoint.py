"""Save and restore params with an SPD optimizer state, anchor checked.

Plain Orbax restores an SPD state correctly when the target matches what was
saved, but a target built with a different ``mask`` fails with a shape
mismatch that does not say why, a different ``anchor_dtype`` is cast without
notice, and a damaged step fails deep inside TensorStore. These two functions
wrap `orbax.checkpoint.CheckpointManager` and store a small manifest next to
the arrays: the layout of every anchor (which leaves are masked off, shapes,
dtypes) and a checksum of its bits. `restore` compares the target with the
manifest before reading and the restored anchor with the checksum after, and
raises `ValueError` saying what is wrong and what to do. Orbax is imported
only when these are called; it is not a dependency of `spd_optax`.

Example::

  spd_optax.checkpoint.save(ckpt_dir, step, params, opt_state)
  ...
  params, opt_state = spd_optax.checkpoint.restore(
      ckpt_dir, abstract_params, abstract_opt_state)   # latest step

Both work unchanged on many hosts (every process calls them).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spd_optax import trees
from spd_optax.state import spd_states_with_paths

# 2: the per-layer values are one packed array (format 1 held trees).
FORMAT = 2


def _bits(x) -> jax.Array:
  width = jnp.dtype(x.dtype).itemsize
  if width == 8:
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return b[..., 0] * jnp.uint32(0x9E3779B1) + b[..., 1]
  kind = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, kind).astype(jnp.uint32)


@jax.jit
def _checksums(leaves):
  """Per leaf, Σ bits·(2·index + 1) mod 2³²: exact on any sharding, and
  sensitive to every bit and to the position of every element."""
  out = []
  for x in leaves:
    bits = _bits(jax.device_put(x, jax.memory.Space.Device))  # anchor_on_host
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
      index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
      stride *= x.shape[axis]
    out.append(jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32))
  return out


def _host_int(x) -> int:
  # Replicated scalar; on many hosts only the local copy is addressable.
  return int(np.asarray(x.addressable_data(0)))


def _manifest(opt_state, with_checksums: bool) -> dict[str, Any]:
  """Layout (and optionally checksums) of every SPD anchor in opt_state."""
  states = {}
  for where, s in spd_states_with_paths(opt_state):
    layout = s.layout
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        layout.treedef.unflatten([0] * layout.treedef.num_leaves))[0]]
    anchors = ([None] * len(names) if s.anchor is None else
               jax.tree.leaves(s.anchor, is_leaf=trees.is_masked))
    if len(anchors) != len(names):
      raise ValueError(f"opt_state{where}: the anchor has {len(anchors)} leaves "
                       f"for {len(names)} params.")
    leaves = {}
    for name, shape, a in zip(names, layout.shapes, anchors):
      entry = {"masked": shape is None}
      if shape is not None:
        # One value per layer: shape () unless the leaf stacks layers.
        entry["layers"] = list(shape)
      if a is not None and not trees.is_masked(a):
        entry.update(shape=list(a.shape), dtype=jnp.dtype(a.dtype).name)
      leaves[name] = entry
    states[where] = {"anchor": "zeros" if s.anchor is None else "stored",
                     "leaves": leaves}
    if with_checksums and s.anchor is not None:
      stored = [(k, a) for k, a in zip(leaves, anchors)
                if a is not None and not trees.is_masked(a)]
      sums = _checksums([a for _, a in stored])
      for (k, _), c in zip(stored, sums):
        leaves[k]["checksum"] = _host_int(c)
  return {"format": FORMAT, "spd_states": states}


def _layout_errors(saved, target) -> list[str]:
  errors = []
  if set(saved) != set(target):
    return [f"the checkpoint holds SPD states at {sorted(saved)}, the target "
            f"at {sorted(target)}"]
  for where in saved:
    s, t = saved[where], target[where]
    at = f"opt_state{where}" if where else "opt_state"
    if s["anchor"] != t["anchor"]:
      errors.append(f"{at}: saved with anchor="
                    f"{'zeros' if s['anchor'] == 'zeros' else 'params'}, the target "
                    f"uses anchor={'zeros' if t['anchor'] == 'zeros' else 'params'}")
      continue
    if set(s["leaves"]) != set(t["leaves"]):
      errors.append(f"{at}: params leaves differ: saved {sorted(s['leaves'])}, "
                    f"target {sorted(t['leaves'])}")
      continue
    for leaf, se in s["leaves"].items():
      te = t["leaves"][leaf]
      if se["masked"] != te["masked"]:
        errors.append(f"anchor{leaf}: " + (
            "masked off when saved (no anchor stored), but the target's mask "
            "includes it" if se["masked"] else
            "stored when saved, but the target's mask excludes it"))
      elif se.get("layers", []) != te.get("layers", []):
        errors.append(f"params{leaf}: saved with {se.get('layers', [])} layers "
                      f"(per-layer shape), the target has {te.get('layers', [])}: "
                      "build the optimizer with the same layer_axes")
      elif (se.get("shape"), se.get("dtype")) != (te.get("shape"), te.get("dtype")):
        errors.append(f"anchor{leaf}: saved as {se.get('dtype')}{se.get('shape')}, "
                      f"the target is {te.get('dtype')}{te.get('shape')}")
  return errors


def _abstract(tree):
  # A target without a sharding (a bare jax.ShapeDtypeStruct) is restored
  # onto this process's first device, where a concrete array would be:
  # Orbax before 0.12 refuses sharding=None ("should be specified, concrete").
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  def one(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(x, jax.ShapeDtypeStruct) and sharding is not None:
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or default)
  return jax.tree.map(one, tree)


def save(directory, step: int, params, opt_state, *, max_to_keep: int | None = None,
         wait: bool = True) -> None:
  """Saves params and the full optimizer state (anchor included) as step
  `step` of an Orbax checkpoint directory, with the anchor manifest."""
  import orbax.checkpoint as ocp
  manifest = _manifest(opt_state, with_checksums=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  with ocp.CheckpointManager(directory, options=options) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        spd_manifest=ocp.args.JsonSave(manifest)))
    if wait:
      mngr.wait_until_finished()


def restore(directory, params_target, opt_state_target, step: int | None = None):
  """Restores ``(params, opt_state)`` from step `step` (default: the latest
  finished one) onto the targets' shapes, dtypes and shardings.

  Targets are abstract (`jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`)
  or concrete arrays; their shardings may differ from the saved ones
  (another mesh, another number of devices). A target leaf without a
  sharding is restored onto this process's first device.

  Raises:
    ValueError: no such step; the step is partial or corrupt; it was not saved
      by `save`; the target's SPD layout (anchor kind, mask, shapes, dtypes)
      differs from the saved one; or the restored anchor's checksum differs.
  """
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(directory) as mngr:
    steps = list(mngr.all_steps())
    if step is None:
      step = mngr.latest_step()
      if step is None:
        raise ValueError(f"no finished checkpoint in {directory} (a save that "
                         "was interrupted leaves only a temporary directory, "
                         "which is ignored).")
    elif step not in steps:
      raise ValueError(f"no finished checkpoint for step {step} in {directory}; "
                       f"finished steps: {steps}.")
    where = f"checkpoint step {step} in {directory}"
    try:
      saved = mngr.restore(step, args=ocp.args.Composite(
          spd_manifest=ocp.args.JsonRestore())).spd_manifest
    except Exception as e:  # orbax raises KeyError, ValueError, OSError, ...
      raise ValueError(
          f"{where} has no readable SPD manifest, so its anchor cannot be "
          "checked: it was not written by spd_optax.checkpoint.save, or it is "
          f"partial or corrupt ({type(e).__name__}: {_first_line(e)}).") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
      raise ValueError(
          f"{where}: SPD manifest format {saved.get('format') if isinstance(saved, dict) else '?'}, "
          f"this spd_optax reads format {FORMAT}. Format 1 checkpoints hold the "
          "per-layer values as trees, which this version packs into one array: "
          "restore with the spd_optax version that saved it.")
    errors = _layout_errors(saved["spd_states"],
                            _manifest(opt_state_target, False)["spd_states"])
    if errors:
      raise ValueError(
          f"{where} does not fit the target optimizer state:\n  - "
          + "\n  - ".join(errors) + "\nBuild the optimizer exactly as in the "
          "run that saved it (same anchor, mask, layer_axes and anchor_dtype); to change "
          "the anchor, restore first, then use spd_optax.set_anchor.")
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(params_target)),
          opt_state=ocp.args.StandardRestore(_abstract(opt_state_target))))
    except Exception as e:
      raise ValueError(
          f"{where} could not be read: it is partial or corrupt, or does not "
          "match the target's structure. Restore another step "
          f"(finished steps: {steps}). Cause: {type(e).__name__}: "
          f"{_first_line(e)}") from e
  got = _manifest(out.opt_state, with_checksums=True)["spd_states"]
  for key, s in saved["spd_states"].items():
    for leaf, entry in s["leaves"].items():
      if entry.get("checksum") != got[key]["leaves"][leaf].get("checksum"):
        raise ValueError(
            f"{where}: the restored anchor{leaf} differs from the one saved "
            "(checksum mismatch): the data is corrupt. Restore another step "
            f"(finished steps: {steps}).")
  return out.params, out.opt_state


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else "")[:limit]
