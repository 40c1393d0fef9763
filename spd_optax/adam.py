"""Adam with Selective Projection Decay (the authors' ``AdamSPD``), and
Adam's scaling with bias corrections as exact as the reference's."""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from spd_optax import options
from spd_optax import sharding
from spd_optax import transform


def _log(decay):
  # For a Python float, log(b) in double precision: 1 - f32(0.999)**t has a
  # 1.3e-5 relative error at t = 1 (cancellation), which PyTorch's double
  # precision bias correction does not have.
  if isinstance(decay, (int, float)):
    return math.log(decay)
  return jnp.log(decay)


def bias_correction(decay, count, dtype):
  """1 - decay**count, as -expm1(count · log(decay)): no cancellation."""
  return -jnp.expm1(count.astype(dtype) * jnp.asarray(_log(decay), dtype))


def direction(m, v, bc1, bc2, eps):
  r"""Adam's direction $\hat m / (\sqrt{\hat v} + \epsilon)$ from the
  moments and their bias corrections (`bias_correction`), in v's dtype."""
  acc = jnp.promote_types(v.dtype, jnp.float32)
  m_hat = m.astype(acc) / bc1
  v_hat = v.astype(acc) / bc2
  return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(v.dtype)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  mu_dtype=None) -> optax.GradientTransformation:
  r"""`optax.scale_by_adam`, with bias corrections accurate in float32.

  $$
  m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
  v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
  u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
  $$

  The state is `optax.ScaleByAdamState`. With it, `adam_spd` follows the
  authors' PyTorch AdamSPD to within 1e-6 relative over whole float32
  trajectories; with optax's own (float32 ``1 - b2**t``) the early-step
  error is about 1e-5 and compounds. ``mu`` and ``nu`` keep the dtypes
  ``init`` gives them, whatever the gradients' dtype (a `jax.lax.scan`
  carry); the update is formed before they are rounded.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=sharding.like_params(jnp.zeros([], jnp.int32), jax.tree.leaves(params)),
        mu=otu.tree_zeros_like(params, dtype=mu_dtype),
        nu=otu.tree_zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = otu.tree_update_moment(updates, state.mu, b1, 1)
    nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)

    def scale(m, v):
      acc = jnp.promote_types(v.dtype, jnp.float32)
      return direction(m, v, bias_correction(b1, count, acc),
                       bias_correction(b2, count, acc), eps)

    new_updates = jax.tree.map(scale, mu, nu)
    # The moments keep the dtypes init gave them (mu_dtype or the params'):
    # grads of another dtype (f32 grads, bf16 params) promote them, which
    # changes a lax.scan carry's type and retraces a jitted step.
    return new_updates, optax.ScaleByAdamState(
        count, otu.tree_cast_like(mu, state.mu), otu.tree_cast_like(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         mu_dtype=None) -> optax.GradientTransformation:
  """`optax.adam` with `scale_by_adam`'s bias corrections: the base step of
  `spd_optax.adam_spd`, its arguments checked (a concrete learning rate >=
  0, a floating ``mu_dtype``)."""
  options.check_non_negative("learning_rate", learning_rate)
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps,
                    mu_dtype=options.check_float_dtype("mu_dtype", mu_dtype)),
      optax.scale_by_learning_rate(learning_rate),
  )


def adam_spd(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | optax.Schedule | Any = 1.0,
    anchor: str = "params",
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    layer_axes: Any | Callable[[optax.Params], Any] = None,
    anchor_dtype: Any = None,
    anchor_on_host: bool = False,
    mu_dtype: Any = None,
    axis_name: str | tuple[str, ...] | None = None,
    param_specs: Any = None,
    norm: str = "frobenius",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with Selective Projection Decay: the authors' ``AdamSPD``.

  The base step is Adam's,
  $u_t = -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)$ (from
  `spd_optax.adam.scale_by_adam`, whose bias corrections match the
  reference's double precision), and SPD then acts per leaf as in
  `selective_projection_decay`, which documents the other arguments (λ,
  ``weight_decay``, is not scaled by the learning rate). There is no other
  weight decay.

  Example:
    ```python
    tx = spd_optax.adam_spd(1e-4, weight_decay=1.0)
    # or, to change hyperparameters during training:
    tx = optax.inject_hyperparams(spd_optax.adam_spd)(
        learning_rate=1e-4, weight_decay=0.5)
    ```

  Args:
    learning_rate: η, a float or an `optax` schedule.
    b1: decay rate of Adam's first moment.
    b2: decay rate of Adam's second moment.
    eps: term added to Adam's denominator.
    mu_dtype: dtype of Adam's first moment (as in `optax.adam`; static
      under `optax.inject_hyperparams`).

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `SPDState` with
    Adam's state (`optax.ScaleByAdamState` first) inside; ``update``
    requires ``params``.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  return transform.selective_projection_decay(
      adam(learning_rate, b1, b2, eps, mu_dtype), weight_decay, anchor, mask,
      layer_axes=layer_axes, anchor_dtype=anchor_dtype, anchor_on_host=anchor_on_host,
      axis_name=axis_name, param_specs=param_specs, norm=norm)
