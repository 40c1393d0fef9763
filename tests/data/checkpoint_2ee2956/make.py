"""Writes this folder's checkpoint: an adam_spd run of 3 steps on a small
tree (a masked-off head, a stacked leaf with layer_axes, a float64-free
float32 set), saved with spd_optax.checkpoint.save. Run from a checkout of
commit 2ee2956 (the release before the consolidation), in the folder:

  python make.py

tests/test_checkpoint.py restores it with the current library and replays
the same run to compare."""

import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax
from spd_optax import checkpoint as spd_checkpoint

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 3
LAYER_AXES = {"w": None, "blocks": 0, "head": None}
MASK = {"w": True, "blocks": True, "head": False}


def params0():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
          "blocks": jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32),
          "head": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}


def grads(t):
  rng = np.random.default_rng(100 + t)
  return {k: jnp.asarray(0.5 * rng.standard_normal(v.shape) - 0.3, jnp.float32)
          for k, v in params0().items()}


def make_tx():
  return spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK, layer_axes=LAYER_AXES)


def run(tx, steps=STEPS):
  params = params0()
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(grads(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


if __name__ == "__main__":
  out = HERE / "ckpt"
  shutil.rmtree(out, ignore_errors=True)
  params, state = run(make_tx())
  spd_checkpoint.save(out, STEPS, params, state)
  print("wrote", out, "with jax", jax.__version__, file=sys.stderr)
