"""Selective Projection Decay around any Optax optimizer."""

import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from spd_optax import adam

ANCHORS = ("params", "zeros")


class SPDState(NamedTuple):
  """State of `selective_projection_decay`.

  Attributes:
    count: steps taken, for a `weight_decay` schedule.
    inner_state: the base optimizer's state.
    anchor: θ_0 per leaf (like params); `optax.MaskedNode()` on leaves SPD
      leaves alone; `None` for the zero anchor, which stores nothing.
    condition: per leaf, c_t = -<g_t, θ_{t-1} - θ_0> of the last step.
    ratio: per leaf, the r_t applied at the last step (0 where SPD did not act).
    deviation: per leaf, ‖θ_t - θ_0‖ after the last step.
  """
  count: jax.Array
  inner_state: optax.OptState
  anchor: Any
  condition: Any
  ratio: Any
  deviation: Any


def _acc_dtype(dtype) -> jnp.dtype:
  # Sums over millions of bfloat16 elements lose the signal; float64 params
  # keep float64 so the float64 golden runs agree to 1e-9.
  return jnp.promote_types(dtype, jnp.float32)


def check_non_negative(name: str, value) -> None:
  """Raises for a concrete negative value; traced values (under
  `optax.inject_hyperparams` inside `jit`) and schedules pass through."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  if np.any(np.asarray(value) < 0):
    raise ValueError(f"{name} must be >= 0, got {value}.")


def _is_variable(x) -> bool:
  # flax.nnx Variables carry their param's metadata (e.g. its sharding); the
  # per-leaf scalars must not inherit it, so they are built with Variables as
  # leaves. Looked up lazily: flax is not a dependency.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def _scalar_def(params) -> jax.tree_util.PyTreeDef:
  """Structure of the per-leaf scalar trees: params' with Variables as leaves."""
  return jax.tree.structure(params, is_leaf=_is_variable)


def _leaf_paths(params) -> list[str]:
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def resolve_mask(mask, params) -> list[bool]:
  """The mask as one Python bool per leaf of params, in flatten order."""
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    return [True] * len(leaves)
  if callable(mask):
    mask = mask(params)
  try:
    flags = treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must have the structure of params (one bool per leaf, or a "
        f"callable returning one); got {jax.tree.structure(mask)} for params "
        f"{treedef}.") from e
  return [bool(f) for f in flags]


def _check_floating(params, flags) -> None:
  for path, leaf, on in zip(_leaf_paths(params), jax.tree.leaves(params), flags):
    dtype = jnp.result_type(leaf)
    if on and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"SPD can only decay floating-point leaves, but params{path} has "
          f"dtype {dtype}; exclude it with mask=...")


def _copy(x, dtype):
  # A real copy, even under jit: a forwarded input would make the anchor alias
  # the params and break donation of both.
  return jnp.array(x, dtype=dtype, copy=True)


def _sum4(*xs):
  """Four full sums from one variadic reduction, so XLA reads the operands'
  inputs once for all four (separate sums read them four times)."""
  zero = jnp.zeros((), xs[0].dtype)
  return lax.reduce(xs, (zero,) * 4, lambda a, b: tuple(x + y for x, y in zip(a, b)),
                    tuple(range(xs[0].ndim)))


def _project(g, p, a, u, lam):
  """SPD for one leaf. Returns (update, condition, ratio, deviation)."""
  acc = _acc_dtype(p.dtype)
  p_acc, u_acc = p.astype(acc), u.astype(acc)
  d = p_acc if a is None else p_acc - a.astype(acc)  # θ_{t-1} - θ_0
  gd, dd, du, uu = _sum4(g.astype(acc) * d, d * d, d * u_acc, u_acc * u_acc)
  condition = -gd
  norm_prev = jnp.sqrt(dd)
  norm_new = jnp.sqrt(jnp.maximum(dd + 2 * du + uu, 0))  # ‖θ̃_t - θ_0‖
  # ‖θ̃-θ_0‖ - ‖θ_{t-1}-θ_0‖ without the cancellation of subtracting norms.
  growth = (2 * du + uu) / jnp.where(norm_new + norm_prev > 0, norm_new + norm_prev, 1)
  # The reference divides by ‖θ̃ - θ_0‖ unguarded; where it is 0 nothing moved
  # away from the anchor, so there is nothing to decay.
  ratio = jnp.where(norm_new > 0,
                    jnp.clip(growth / jnp.where(norm_new > 0, norm_new, 1), 0, 1), 0)
  ratio = jnp.where(condition < 0, ratio, 0)
  scale = lam.astype(acc) * ratio
  # θ_t = θ̃_t - scale·(θ̃_t - θ_0), formed as the reference forms it, then
  # expressed as an update. `where`, not arithmetic, so a leaf SPD leaves
  # alone gets the inner update bit for bit (θ̃ - θ_{t-1} would round).
  tilde = p_acc + u_acc
  update = jnp.where(scale > 0, (tilde - scale * (d + u_acc) - p_acc).astype(u.dtype), u)
  deviation = jnp.abs(1 - scale) * norm_new
  return update, condition, ratio, deviation


def selective_projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: float | optax.Schedule = 1.0,
    anchor: str = "params",
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    anchor_dtype: Any = None,
    anchor_on_host: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Selective Projection Decay around a base optimizer.

  Per leaf (parameter tensor), with raw gradient $g_t$, the base optimizer's
  update $u_t$ and the anchor $\theta_0$:

  $$
  \begin{aligned}
  \tilde\theta_t &= \theta_{t-1} + u_t, \qquad
      c_t = -\langle g_t,\, \theta_{t-1} - \theta_0 \rangle \\
  r_t &= \operatorname{clip}\Big(\frac{\|\tilde\theta_t - \theta_0\|
      - \|\theta_{t-1} - \theta_0\|}{\|\tilde\theta_t - \theta_0\|},\, 0,\, 1\Big) \\
  \theta_t &= \tilde\theta_t - \lambda\, r_t\, [c_t < 0]\,
      (\tilde\theta_t - \theta_0)
  \end{aligned}
  $$

  Decay acts only on leaves where moving further from the anchor no longer
  lowers the loss ($c_t < 0$), and only by as much as the step moved away
  from it. $\lambda$ is not multiplied by the learning rate. Norms are
  Frobenius norms of whole leaves, accumulated in at least float32.

  Example:
    ```python
    tx = spd_optax.selective_projection_decay(
        optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4)),
        weight_decay=0.5)
    state = tx.init(params)                  # copies params as the anchor
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ```

  Args:
    inner: the base optimizer; its updates are the proposed step $u_t$.
    weight_decay: λ >= 0, a float or an `optax` schedule of the step count.
    anchor: ``"params"`` copies the params given to ``init`` (full
      fine-tuning); ``"zeros"`` uses θ_0 = 0 and stores nothing (LoRA and
      other adapters). To anchor elsewhere, see `spd_optax.set_anchor`.
    mask: a pytree of bools like params, or a callable returning one. Leaves
      marked False (a new head, norms, biases) get the inner update unchanged
      and store no anchor.
    anchor_dtype: dtype to store the anchor in (default: each param's own);
      ``jnp.bfloat16`` halves its memory for float32 params. The run is then
      exactly SPD anchored at the params rounded to that dtype.
    anchor_on_host: keep the anchor in host memory (``pinned_host``, on
      backends with memory kinds: GPU, TPU, CPU) and move it in each step.
      Saves one param-sized buffer of device memory; costs a host-to-device
      copy of the anchor per step.

  Returns:
    A `GradientTransformationExtraArgs`; ``update`` requires ``params``.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  if anchor not in ANCHORS:
    raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}. For "
                     "any other anchor use spd_optax.set_anchor after init.")
  check_non_negative("weight_decay", weight_decay)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    flags = resolve_mask(mask, params)
    _check_floating(params, flags)
    leaves, treedef = jax.tree.flatten(params)

    def per_leaf(fn, treedef=treedef):
      return treedef.unflatten(
          [fn(p) if on else optax.MaskedNode() for p, on in zip(leaves, flags)])

    def acc_zero(p):
      return jnp.zeros((), _acc_dtype(p.dtype))

    scalar_def = _scalar_def(params)
    anchors = None
    if anchor == "params":
      anchors = per_leaf(lambda p: _copy(p, anchor_dtype or p.dtype))
      if anchor_on_host:
        anchors = jax.device_put(anchors, jax.memory.Space.Host)
    return SPDState(
        count=jnp.zeros((), jnp.int32),
        inner_state=inner.init(params),
        anchor=anchors,
        condition=per_leaf(acc_zero, scalar_def),
        ratio=per_leaf(acc_zero, scalar_def),
        deviation=per_leaf(acc_zero, scalar_def),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("selective_projection_decay needs the current params: "
                       "call tx.update(grads, state, params).")
    proposed, inner_state = inner.update(updates, state.inner_state, params,
                                         **extra_args)
    lam = weight_decay(state.count) if callable(weight_decay) else weight_decay
    lam = jnp.asarray(lam)

    treedef = jax.tree.structure(params)
    params_l = treedef.flatten_up_to(params)
    grads_l = treedef.flatten_up_to(updates)
    proposed_l = treedef.flatten_up_to(proposed)
    scalar_def = _scalar_def(params)
    marks = scalar_def.flatten_up_to(state.condition)
    anchors_l = ([None] * len(params_l) if state.anchor is None
                 else treedef.flatten_up_to(state.anchor))
    if anchor_on_host:
      anchors_l = [a if a is None or isinstance(a, optax.MaskedNode)
                   else jax.device_put(a, jax.memory.Space.Device) for a in anchors_l]
    per_leaf = [(u, mark, mark, mark) if isinstance(mark, optax.MaskedNode)
                else _project(g, p, a, u, lam)
                for g, p, a, u, mark in zip(grads_l, params_l, anchors_l, proposed_l, marks)]
    out_u, out_c, out_r, out_d = (list(col) for col in zip(*per_leaf)) if per_leaf else ([],) * 4
    new_state = SPDState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        anchor=state.anchor,
        condition=scalar_def.unflatten(out_c),
        ratio=scalar_def.unflatten(out_r),
        deviation=scalar_def.unflatten(out_d),
    )
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_spd(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | optax.Schedule = 1.0,
    anchor: str = "params",
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    anchor_dtype: Any = None,
    anchor_on_host: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with Selective Projection Decay: the authors' ``AdamSPD``.

  The base step is Adam's,
  $u_t = -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)$ (from
  `spd_optax.adam.scale_by_adam`, whose bias corrections match the
  reference's double precision), and SPD then acts per leaf as in
  `selective_projection_decay`. There is no other weight decay.

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
    weight_decay: SPD's strength λ >= 0 (a float or a schedule).
    anchor: ``"params"`` or ``"zeros"``, as in `selective_projection_decay`.
    mask: leaves SPD acts on, as in `selective_projection_decay`.
    anchor_dtype: the anchor's storage dtype, as in `selective_projection_decay`.
    anchor_on_host: keep the anchor in host memory, as in
      `selective_projection_decay`.
    mu_dtype: dtype of Adam's first moment (as in `optax.adam`).

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  check_non_negative("learning_rate", learning_rate)
  inner = optax.chain(
      adam.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )
  return selective_projection_decay(inner, weight_decay, anchor, mask,
                                    anchor_dtype=anchor_dtype,
                                    anchor_on_host=anchor_on_host)
