"""Replays trajectories recorded from the authors' PyTorch AdamSPD."""

import json

import jax
import numpy as np
import optax
import pytest

import spd_optax
from conftest import GOLDEN

CASES = sorted(GOLDEN.glob("*.npz"))


def test_golden_files_present():
  assert len(CASES) >= 4, f"expected the golden trajectories in {GOLDEN}"


def _replay(z, meta, jit, steps, optimizer=None, **options):
  names = meta["leaves"]
  params = {n: jax.numpy.asarray(z[f"init/{n}"]) for n in names}
  tx = (optimizer or spd_optax.adam_spd)(
      meta["learning_rate"], b1=meta["b1"], b2=meta["b2"], eps=meta["eps"],
      weight_decay=meta["weight_decay"],
      anchor="params" if meta["anchor"] == "init" else "zeros", **options)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for t in range(steps):
    grads = {n: jax.numpy.asarray(z[f"grad/{t}/{n}"]) for n in names}
    params, state = step(params, state, grads)
    yield t, params, state, grads


@pytest.mark.parametrize("path", CASES, ids=[c.stem for c in CASES])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_replays_reference(path, jit):
  z = np.load(path)
  meta = json.loads(str(z["meta"]))
  f64 = meta["dtype"] == "float64"
  rtol = 1e-9 if f64 else 1e-5
  # Eager dispatch is slow: the unjitted replay checks the first steps only.
  steps = meta["steps"] if jit else 12
  fired = total = 0
  with jax.enable_x64(f64):
    for t, params, state, grads in _replay(z, meta, jit, steps):
      conditions = state.condition
      for n in meta["leaves"]:
        want = z[f"param/{t}/{n}"]
        got = np.asarray(params[n])
        assert got.dtype == want.dtype
        err = (np.linalg.norm(got.astype(np.float64) - want)
               / max(np.linalg.norm(want.astype(np.float64)), 1e-30))
        assert err <= rtol, f"step {t} leaf {n}: relative error {err:.2e}"
        # The condition is a sum of products: equal up to the rounding of a
        # sum of that many terms, bounded by |g|·|θ-θ0|.
        c_ref = float(z[f"cond/{t}/{n}"])
        g = np.asarray(grads[n], np.float64)
        d = (np.asarray(z[f"param/{t-1}/{n}"] if t else z[f"init/{n}"], np.float64)
             - (z[f"init/{n}"] if meta["anchor"] == "init" else 0))
        bound = (1e-12 if f64 else 1e-5) * np.linalg.norm(g) * np.linalg.norm(d)
        assert abs(float(conditions[n]) - c_ref) <= bound + 1e-30, (t, n)
        fired += c_ref < 0
        total += 1
  if steps == meta["steps"]:
    np.testing.assert_allclose(fired / total, meta["fired_fraction"])
