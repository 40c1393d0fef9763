"""spd_optax.adam.scale_by_adam, and the dtypes of the adam_spd state."""

import itertools

import jax
import jax.numpy as jnp
import optax
import pytest

import spd_optax
from test_transform import _grads_like, _params

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


@pytest.mark.parametrize("params_dtype,grads_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_state_dtypes_do_not_change_in_update(params_dtype, grads_dtype):
  # bf16 params with f32 grads once promoted Adam's moments to f32 at the
  # first step: a lax.scan carry then changes type and jit retraces.
  params = jax.tree.map(lambda p: p.astype(params_dtype), _params())
  grads = jax.tree.map(lambda g: g.astype(grads_dtype), _grads_like(_params(), 1))
  tx = spd_optax.adam_spd(1e-3)
  state = tx.init(params)
  _, new_state = tx.update(grads, state, params)
  assert _dtypes(new_state) == _dtypes(state)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (out, _), _ = jax.lax.scan(step, (params, state), length=3)
  assert _dtypes(out) == _dtypes(params)


@pytest.mark.parametrize("mu_dtype", [jnp.bfloat16, jnp.float32])
def test_mu_dtype_kept_with_other_grads(mu_dtype):
  params = _params()
  grads = jax.tree.map(lambda g: g.astype(jnp.float16), _grads_like(params, 1))
  tx = spd_optax.adam.scale_by_adam(mu_dtype=mu_dtype)
  state = tx.init(params)
  _, new_state = tx.update(grads, state, params)
  assert {x.dtype for x in jax.tree.leaves(new_state.mu)} == {jnp.dtype(mu_dtype)}
  assert _dtypes(new_state) == _dtypes(state)
