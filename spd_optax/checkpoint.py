"""Save and restore params with an SPD optimizer state, the anchor checked.

The state is shaped like params, so plain Orbax restores it, and refuses a
target whose per-layer shapes differ. What it does not refuse: a target
built with another ``mask`` or anchor kind fails with a message that does
not say why, another ``anchor_dtype`` is cast without notice, and a damaged
anchor may restore as other numbers. `save` stores a small manifest beside
the arrays (per SPD leaf: its per-layer shape, the anchor's shape, dtype
and a checksum of its bits); `restore` checks the target against it before
reading and the restored anchor after, and names the cause. Works on
`nnx.state(optimizer)` and on SPD inside any wrapper; Orbax is imported
only when called.

Example::

  spd_optax.checkpoint.save(ckpt_dir, step, params, opt_state)
  params, opt_state = spd_optax.checkpoint.restore(
      ckpt_dir, abstract_params, abstract_opt_state)   # latest step
"""

import jax
import jax.numpy as jnp
import numpy as np

from spd_optax import options
from spd_optax.state import spd_states_with_paths


@jax.jit
def _checksums(leaves):
  """Per leaf, Σ bits·(2·index + 1) mod 2³²: exact on any sharding, and
  sensitive to every bit and to the position of every element."""
  out = []
  for x in leaves:
    x = jax.device_put(x, jax.memory.Space.Device)  # anchor_on_host
    if x.dtype.itemsize == 8:
      b = jax.lax.bitcast_convert_type(x, jnp.uint32)
      bits = b[..., 0] * jnp.uint32(0x9E3779B1) + b[..., 1]
    else:
      kind = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, kind).astype(jnp.uint32)
    index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    out.append(jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32))
  return out


def describe(opt_state, checksums: bool = False) -> dict:
  """Per SPD part of `opt_state` (by path), its anchor kind and, per leaf
  SPD acts on, its per-layer shape and its anchor's shape and dtype (and
  a checksum of the anchor's bits)."""
  out = {}
  for where, s in spd_states_with_paths(opt_state):
    held = dict(options.with_paths(s.condition))
    anchors = {} if s.anchor is None else dict(options.with_paths(s.anchor))
    leaves = {options.name(k): {"layers": list(np.shape(v))} for k, v in held.items()}
    for k, a in anchors.items():
      a = options.unwrap(a)
      leaves[options.name(k)].update(shape=list(a.shape), dtype=jnp.dtype(a.dtype).name)
    if checksums and anchors:
      for k, c in zip(anchors, _checksums([options.unwrap(a) for a in anchors.values()])):
        leaves[options.name(k)]["checksum"] = int(np.asarray(c.addressable_data(0)))
    out[where] = {"anchor": "zeros" if s.anchor is None else "params", "leaves": leaves}
  return out


def _errors(saved: dict, target: dict) -> list[str]:
  if set(saved) != set(target):
    return [f"SPD states at {sorted(saved)} in the checkpoint, at {sorted(target)} "
            "in the target"]
  errors = []
  for where, s in saved.items():
    t = target[where]
    if s["anchor"] != t["anchor"]:
      errors.append(f"opt_state{where}: saved with anchor={s['anchor']!r}, the target "
                    f"has anchor={t['anchor']!r}")
      continue
    for leaf in sorted(set(s["leaves"]) | set(t["leaves"])):
      se, te = s["leaves"].get(leaf), t["leaves"].get(leaf)
      if se is None or te is None:
        errors.append(f"params{leaf}: SPD acts on it in the "
                      f"{'target' if se is None else 'checkpoint'} only: another mask")
      elif se["layers"] != te["layers"]:
        errors.append(f"params{leaf}: per-layer shape {se['layers']} saved, "
                      f"{te['layers']} in the target: another layer_axes")
      elif se.get("dtype") != te.get("dtype"):
        errors.append(f"anchor{leaf}: saved as {se.get('dtype')}, the target is "
                      f"{te.get('dtype')}: another anchor_dtype")
      elif se.get("shape") != te.get("shape"):
        errors.append(f"anchor{leaf}: saved with shape {se.get('shape')}, the target's "
                      f"is {te.get('shape')}: other params")
  return errors


def _abstract(tree):
  # A target leaf without a sharding is restored onto this process's first
  # device: Orbax before 0.12 refuses sharding=None. (jax 0.12 deprecates
  # the class for the function.)
  single = getattr(jax.sharding, "make_single_device_sharding", None)
  default = (single or jax.sharding.SingleDeviceSharding)(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default), tree)


def save(directory, step: int, params, opt_state, *, max_to_keep: int | None = None,
         wait: bool = True) -> None:
  """Saves params and the optimizer state (anchor included) as step `step`
  of an Orbax checkpoint directory, with the SPD manifest."""
  import orbax.checkpoint as ocp
  manifest = describe(opt_state, checksums=True)
  with ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        spd_manifest=ocp.args.JsonSave(manifest)))
    if wait:
      mngr.wait_until_finished()


def restore(directory, params_target, opt_state_target, step: int | None = None):
  """Restores ``(params, opt_state)`` from step `step` (default: the latest
  finished one) onto the targets' shapes, dtypes and shardings (abstract or
  concrete; another mesh is fine).

  Raises:
    ValueError: no such step; the step was not saved by `save`, or is
      partial or damaged; or the target differs from what was saved (another
      mask, ``layer_axes``, ``anchor_dtype`` or anchor kind), naming which.
  """
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(directory) as mngr:
    steps = list(mngr.all_steps())
    step = mngr.latest_step() if step is None else step
    if step is None or step not in steps:
      raise ValueError(f"no finished checkpoint{'' if step is None else f' for step {step}'}"
                       f" in {directory}; finished steps: {steps} (an interrupted "
                       "save leaves only a temporary directory, which is ignored).")
    where = f"checkpoint step {step} in {directory}"
    unreadable = lambda e: ValueError(
        f"{where} could not be read as an spd_optax checkpoint: it was not written "
        "by spd_optax.checkpoint.save, or it is partial or damaged. Restore another "
        f"step (finished: {steps}). Cause: {type(e).__name__}: {str(e).strip()[:300]}")
    try:  # orbax raises KeyError, ValueError, OSError, ...
      saved = mngr.restore(step, args=ocp.args.Composite(
          spd_manifest=ocp.args.JsonRestore())).spd_manifest
    except Exception as e:
      raise unreadable(e) from e
    if errors := _errors(saved, describe(opt_state_target)):
      raise ValueError(
          f"{where} does not fit the target optimizer state:\n  - " + "\n  - ".join(errors)
          + "\nBuild the optimizer as in the run that saved it; to change the "
          "anchor, restore first, then use spd_optax.set_anchor.")
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(params_target)),
          opt_state=ocp.args.StandardRestore(_abstract(opt_state_target))))
    except Exception as e:
      raise unreadable(e) from e
  got = describe(out.opt_state, checksums=True)
  for key, s in saved.items():
    for leaf, entry in s["leaves"].items():
      if entry.get("checksum") != got[key]["leaves"][leaf].get("checksum"):
        raise ValueError(f"{where}: the restored anchor{leaf} differs from the one "
                         f"saved (checksum): the data is damaged. Restore another "
                         f"step (finished: {steps}).")
  return out.params, out.opt_state
