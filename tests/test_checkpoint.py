"""Orbax checkpoints of params and the full SPD state: resume bit for bit,
restore onto another mesh, and fail loudly (never a wrong anchor) on a
checkpoint that is partial, corrupt or does not fit."""

import functools
import glob
import os
import shutil

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spd_optax
from spd_optax import checkpoint as spd_ckpt
from test_sharding import (MASK, host_grads, host_params, make_mesh, make_step,
                           param_shardings, state_shardings)

STEPS, SAVE_AT = 6, 3


def _tx(anchor="params", mask=MASK, **kw):
  return spd_optax.adam_spd(0.05, weight_decay=1.0, anchor=anchor, mask=mask, **kw)


def _setup(tx, mesh, psh):
  params = jax.device_put(host_params(), psh)
  ssh = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  return params, state, step, ssh


def _run(step, params, state, psh, start, stop):
  for t in range(start, stop):
    params, state = step(params, state, jax.device_put(host_grads(t), psh))
  return params, state


def _targets(tx, mesh, psh):
  """What a resuming job builds before it has any arrays: abstract params
  and state with the shardings they must have."""
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=psh[k])
            for k, v in host_params().items()}
  ssh = state_shardings(tx, params, mesh)
  abstract = jax.eval_shape(tx.init, params)
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, ssh)
  return params, state


def _orbax_save(directory, step, params, state):
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()


def _orbax_restore(directory, params_target, state_target, step=None):
  with ocp.CheckpointManager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params_target),
        opt_state=ocp.args.StandardRestore(state_target)))
  return out.params, out.opt_state


SAVERS = {
    "orbax": (_orbax_save, _orbax_restore),
    "spd_optax.checkpoint": (spd_ckpt.save, spd_ckpt.restore),
}


@functools.cache
def _uninterrupted(anchor="params", on_host=False):
  """The run that was never interrupted, on the (2, 4) mesh, on the host."""
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params, state, step, _ = _setup(_tx(anchor, anchor_on_host=on_host), mesh, psh)
  return jax.device_get(_run(step, params, state, psh, 0, STEPS))


@pytest.mark.parametrize("anchor, saver", [
    ("params", "orbax"), ("params", "spd_optax.checkpoint"),
    ("zeros", "orbax"),
    pytest.param("params_on_host", "spd_optax.checkpoint", marks=pytest.mark.needs_host_memory)])
def test_resume_is_bit_exact(tmp_path, saver, anchor):
  save, restore = SAVERS[saver]
  on_host = anchor == "params_on_host"
  anchor = "params" if on_host else anchor
  tx = _tx(anchor, anchor_on_host=on_host)
  mesh = make_mesh()
  psh = param_shardings(mesh)
  want_params, want_state = _uninterrupted(anchor, on_host)

  params, state, step, _ = _setup(tx, mesh, psh)
  params, state = _run(step, params, state, psh, 0, SAVE_AT)
  save(tmp_path / "ckpt", SAVE_AT, params, state)
  del params, state   # the job dies here

  tx = _tx(anchor, anchor_on_host=on_host)  # a new job: nothing in memory
  params, state = restore(tmp_path / "ckpt", *_targets(tx, mesh, psh))
  if anchor == "zeros":
    assert state.anchor is None
  else:
    assert isinstance(state.anchor["head"], optax.MaskedNode)
    np.testing.assert_array_equal(state.anchor["w1"], host_params()["w1"])
    assert state.anchor["w1"].sharding.memory_kind == (
        "pinned_host" if on_host else "device")
  assert isinstance(state.condition["head"], optax.MaskedNode)
  for k in params:
    assert params[k].sharding.is_equivalent_to(psh[k], params[k].ndim)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1),
                 out_shardings=(psh, state_shardings(tx, params, mesh)))
  params, state = _run(step, params, state, psh, SAVE_AT, STEPS)
  chex.assert_trees_all_equal(jax.device_get(params), want_params)
  chex.assert_trees_all_equal(jax.device_get(state), want_state)
  assert int(state.count) == STEPS


@pytest.mark.parametrize("saver", sorted(SAVERS))
def test_restore_onto_another_mesh(tmp_path, saver):
  save, restore = SAVERS[saver]
  tx = _tx()
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params, state, step, _ = _setup(tx, mesh, psh)
  params, state = _run(step, params, state, psh, 0, SAVE_AT)
  saved = jax.device_get((params, state))
  save(tmp_path / "ckpt", SAVE_AT, params, state)

  # 8 devices as (8,): FSDP only, first dimension sharded where it divides.
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  psh8 = {k: NamedSharding(mesh8, P("fsdp") if v.ndim and v.shape[0] % 8 == 0 else P())
          for k, v in host_params().items()}
  params8, state8 = restore(tmp_path / "ckpt", *_targets(tx, mesh8, psh8))
  chex.assert_trees_all_equal(jax.device_get((params8, state8)), saved)
  for k, a in state8.anchor.items():
    if not isinstance(a, optax.MaskedNode):
      assert a.sharding.is_equivalent_to(psh8[k], a.ndim)
      assert state8.inner_state[0].mu[k].sharding.is_equivalent_to(psh8[k], a.ndim)
  step8 = jax.jit(make_step(tx), donate_argnums=(0, 1),
                  out_shardings=(psh8, state_shardings(tx, params8, mesh8)))
  params8, state8 = _run(step8, params8, state8, psh8, SAVE_AT, STEPS)
  want_params, want_state = _uninterrupted()
  # Another layout sums in another order: equal up to rounding.
  chex.assert_trees_all_close(jax.device_get(params8), want_params,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(state8.deviation),
                              want_state.deviation, rtol=1e-5)


# --- partial, corrupt or mismatched checkpoints --------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """Steps 1 and 2 saved with spd_optax.checkpoint, and the targets."""
  directory = tmp_path_factory.mktemp("spd") / "ckpt"
  tx = _tx()
  mesh = make_mesh()
  psh = param_shardings(mesh)
  params, state, step, _ = _setup(tx, mesh, psh)
  for t in (1, 2):
    params, state = _run(step, params, state, psh, t - 1, t)
    spd_ckpt.save(directory, t, params, state)
  return directory, mesh, psh


def _copy(saved_run, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(saved_run[0], directory)
  return directory


def _data_files(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/opt_state/**/*", recursive=True)
           if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
  assert files
  return files


def test_target_that_does_not_fit_names_the_cause(saved_run):
  directory, mesh, psh = saved_run
  restore = lambda tx: spd_ckpt.restore(directory, *_targets(tx, mesh, psh))
  with pytest.raises(ValueError, match=r"does not fit the target optimizer state:\n"
                     r"  - params\['head'\]: SPD acts on it in the target only: another mask"):
    restore(_tx(mask=None))
  with pytest.raises(ValueError, match=r"saved with anchor='params', the target has "
                     r"anchor='zeros'"):
    restore(_tx(anchor="zeros"))
  with pytest.raises(ValueError, match=r"anchor\['w1'\]: saved as float32, the target is "
                     r"bfloat16: another anchor_dtype"):
    restore(_tx(anchor_dtype=jax.numpy.bfloat16))
  with pytest.raises(ValueError, match=r"no finished checkpoint for step 5 .* \[1, 2\]"):
    spd_ckpt.restore(directory, *_targets(_tx(), mesh, psh), step=5)
  # Plain Orbax does not say why: it fails without naming the mask, or
  # restores a state without the head's anchor the target asks for.
  try:
    _, state = _orbax_restore(directory, *_targets(_tx(mask=None), mesh, psh))
  except ValueError as e:
    assert "mask" not in str(e)
  else:
    assert not isinstance(state.anchor["head"], jax.Array)


def test_interrupted_save_is_ignored(saved_run, tmp_path):
  directory = _copy(saved_run, tmp_path)
  # What a save killed midway leaves: a temporary directory, never renamed.
  shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp-1234567")
  shutil.rmtree(directory / "3.orbax-checkpoint-tmp-1234567" / "opt_state" / "d")
  targets = _targets(_tx(), *saved_run[1:])
  _, state = spd_ckpt.restore(directory, *targets)
  assert int(state.count) == 2
  with pytest.raises(ValueError, match="no finished checkpoint for step 3"):
    spd_ckpt.restore(directory, *targets, step=3)


# Orbax's reader threads may report the failed read once more, in a later
# test: filtered in pyproject.toml, with the reason.
@pytest.mark.parametrize("damage", ["truncate", "delete_data", "delete_metadata",
                                    "delete_opt_state"])
def test_damaged_step_raises(saved_run, tmp_path, damage):
  directory = _copy(saved_run, tmp_path)
  step_dir = directory / "2"
  if damage == "truncate":
    for f in _data_files(step_dir):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif damage == "delete_data":
    for f in _data_files(step_dir):
      os.remove(f)
  elif damage == "delete_metadata":
    os.remove(step_dir / "opt_state" / "_METADATA")
  else:
    shutil.rmtree(step_dir / "opt_state")
  targets = _targets(_tx(), *saved_run[1:])
  with pytest.raises(ValueError, match=r"checkpoint step 2 in .* could not be read as an "
                     r"spd_optax checkpoint:.*partial or damaged\. Restore another step "
                     r"\(finished: \[1, 2\]\)"):
    spd_ckpt.restore(directory, *targets)
  _, state = spd_ckpt.restore(directory, *targets, step=1)   # the way out
  assert int(state.count) == 1


def test_swapped_anchor_data_is_caught(saved_run, tmp_path):
  # Arrays from another step under this step's manifest (a mixed-up copy):
  # every file is intact, but the anchor is not the one saved here.
  tx = _tx()
  mesh, psh = saved_run[1:]
  directory = tmp_path / "ckpt"
  params, state, _, _ = _setup(tx, mesh, psh)
  spd_ckpt.save(directory, 1, params, state)
  other = spd_optax.set_anchor(state, jax.tree.map(lambda p: p + 1, params))
  spd_ckpt.save(tmp_path / "other", 1, params, other)
  shutil.rmtree(directory / "1" / "opt_state")
  shutil.copytree(tmp_path / "other" / "1" / "opt_state", directory / "1" / "opt_state")
  with pytest.raises(ValueError, match=r"restored anchor\['\w+'\] differs from the one "
                     r"saved \(checksum\): the data is damaged"):
    spd_ckpt.restore(directory, *_targets(tx, mesh, psh))


def test_checkpoint_without_manifest(saved_run, tmp_path):
  tx = _tx()
  mesh, psh = saved_run[1:]
  params, state, _, _ = _setup(tx, mesh, psh)
  _orbax_save(tmp_path / "plain", 1, params, state)
  with pytest.raises(ValueError, match=r"could not be read as an spd_optax checkpoint: "
                     r"it was not written by spd_optax\.checkpoint\.save"):
    spd_ckpt.restore(tmp_path / "plain", *_targets(tx, mesh, psh))
  # ... while plain Orbax restores it
  _, got = _orbax_restore(tmp_path / "plain", *_targets(tx, mesh, psh))
  chex.assert_trees_all_equal(jax.device_get(got.anchor), jax.device_get(state.anchor))


def test_stacked_layers_round_trip_and_layer_axes_checked(tmp_path):
  from test_sharding import LAYER_AXES, stacked_grads, stacked_params
  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, layer_axes=LAYER_AXES)
  params = stacked_params()
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  for t in range(4):
    params, state = step(params, state, stacked_grads(t))
  spd_ckpt.save(tmp_path / "ckpt", 4, params, state)
  got_params, got_state = spd_ckpt.restore(tmp_path / "ckpt", params,
                                           jax.eval_shape(tx.init, params))
  chex.assert_trees_all_equal(got_params, params)
  chex.assert_trees_all_equal(got_state, state)
  assert got_state.ratio["blocks_w"].shape == (4,)
  # A target built without layer_axes holds one value per leaf: refused.
  flat_target = jax.eval_shape(spd_optax.adam_spd(0.05).init, params)
  with pytest.raises(ValueError, match=r"params\['blocks_w'\]: per-layer shape \[4\] saved, "
                     r"\[\] in the target: another layer_axes"):
    spd_ckpt.restore(tmp_path / "ckpt", params, flat_target)
