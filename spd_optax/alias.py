"""Adam with Selective Projection Decay: the authors' ``AdamSPD``."""

import functools
from typing import Any, Callable

import optax

from spd_optax import adam
from spd_optax import transform


def _first_pass_moved(fn):
  """`fn`, refusing the ``first_pass`` argument it had, with where it went
  (the signature, as `inspect` and `optax.inject_hyperparams` read it, is
  `fn`'s)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if "first_pass" in kwargs:
      raise TypeError(
          "adam_spd(first_pass=...) has moved: the Pallas first pass is "
          "experimental (not yet timed on a device), so it left the stable "
          "API. Use spd_optax.experimental.adam_spd(...) with the same "
          "arguments, without first_pass; plain adam_spd is XLA's pass.")
    return fn(*args, **kwargs)
  return wrapper


@_first_pass_moved
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
  `selective_projection_decay`, which says what each SPD argument does.
  There is no other weight decay.

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
    weight_decay: SPD's strength λ >= 0, not scaled by the learning rate.
    anchor: ``"params"`` or ``"zeros"``.
    mask: the leaves SPD acts on.
    layer_axes: the axes of stacked leaves that index layers.
    anchor_dtype: the anchor's storage dtype.
    anchor_on_host: keep the anchor in host memory.
    mu_dtype: dtype of Adam's first moment (as in `optax.adam`; static
      under `optax.inject_hyperparams`).
    axis_name: inside `jax.shard_map`, the manual axes params are split over.
    param_specs: inside `jax.shard_map`, the params' PartitionSpecs there.
    norm: ``"frobenius"`` or ``"rows_l1"``.

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `SPDState` with
    Adam's state (`optax.ScaleByAdamState` first) inside; ``update``
    requires ``params``.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  return transform.selective_projection_decay(
      adam.adam(learning_rate, b1, b2, eps, mu_dtype), weight_decay, anchor, mask,
      layer_axes=layer_axes, anchor_dtype=anchor_dtype, anchor_on_host=anchor_on_host,
      axis_name=axis_name, param_specs=param_specs, norm=norm)
