"""Adam-SPD with its first pass from the Pallas kernels, through the one
hook the stable step has for it (`spd_optax.transform.build`)."""

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

from spd_optax import adam
from spd_optax import alias
from spd_optax import plan
from spd_optax import sharding
from spd_optax import transform
from spd_optax.experimental import kernels


def adam_spd(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """`spd_optax.adam_spd`, each float32 leaf's first pass from one kernel.

  The arguments are those of `spd_optax.adam_spd` less ``anchor_on_host``
  and ``norm`` (its signature, derived from that one: `inspect` and
  `optax.inject_hyperparams` read it). The leaves a kernel takes
  (`kernels.supports`: float32, at least one element, layers along axis 0
  only) get their new moments (written over the old ones) and SPD's sums
  from it; the others take XLA's pass. A kernel runs on one device's data:
  on a mesh with Explicit axes (`jax.make_mesh`'s default) each device runs
  it on its part, inside `jax.shard_map` too (with ``axis_name`` or
  ``param_specs``); on a mesh with Auto axes under a plain `jax.jit` it is
  refused (the leaves' placement is not known there).

  Example:
    ```python
    import spd_optax.experimental
    tx = spd_optax.experimental.adam_spd(1e-4, weight_decay=1.0)
    ```

  Args:
    *args: as `spd_optax.adam_spd` takes them.
    **kwargs: as `spd_optax.adam_spd` takes them.

  Returns:
    The optimizer, with the state of `spd_optax.adam_spd`.

  References:
    Tian et al., [Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models](https://arxiv.org/abs/2411.01713), NeurIPS 2024.
  """
  for name in ("anchor_on_host", "norm"):
    if name in kwargs:
      raise TypeError(f"spd_optax.experimental.adam_spd takes no {name}: its kernels "
                      "read the anchor in device memory and sum Frobenius norms. "
                      "Use spd_optax.adam_spd for it.")
  a = SIGNATURE.bind(*args, **kwargs)
  a.apply_defaults()
  a = a.arguments
  inner = adam.adam(a["learning_rate"], a["b1"], a["b2"], a["eps"], a["mu_dtype"])
  opts = plan.options(a["weight_decay"], a["mask"], a["layer_axes"], a["axis_name"],
                      a["param_specs"])
  return transform.build(inner, opts, anchor=a["anchor"], anchor_dtype=a["anchor_dtype"],
                         first_pass=_first_pass(a["learning_rate"], a["b1"], a["b2"],
                                                a["eps"]))


SIGNATURE = inspect.signature(alias.adam_spd).replace(parameters=[
    p for p in inspect.signature(alias.adam_spd).parameters.values()
    if p.name not in ("anchor_on_host", "norm")])
adam_spd.__signature__ = SIGNATURE


def _first_pass(learning_rate, b1, b2, eps):
  """The hook of `transform.build`: the kernels' first pass over the leaves
  they take. The inner Adam has already been traced in XLA; for these
  leaves its moments and update are replaced by ones formed from the
  kernel's moments, so XLA drops their computation from the compiled step."""
  scale_lr = optax.scale_by_learning_rate(learning_rate)

  def first_pass(leaves, grads, params, anchors, old_inner, new_inner, proposed):
    (old_adam, old_lr), (new_adam, new_lr) = old_inner, new_inner
    treedef = jax.tree.structure(new_adam.mu)
    mu, nu = treedef.flatten_up_to(new_adam.mu), treedef.flatten_up_to(new_adam.nu)
    old_mu, old_nu = treedef.flatten_up_to(old_adam.mu), treedef.flatten_up_to(old_adam.nu)
    count = new_adam.count
    # -η as scale_by_learning_rate applies it, schedules included.
    neg_lr = scale_lr.update(jnp.ones((), jnp.float32), old_lr)[0]
    bc1, bc2 = (adam.bias_correction(b, count, jnp.float32) for b in (b1, b2))
    coef = kernels.coefficients(neg_lr, bc1, bc2, b1, b2, eps)
    sums, taken = {}, []
    for leaf in leaves:
      i = leaf.index
      g, p, a = grads[i], params[i], anchors[i]
      if not kernels.supports(g, p, a, old_mu[i], old_nu[i], leaf.axes):
        continue
      run = kernels.first_pass
      if sharding.partitioned(p):
        if sharding.explicit_mesh(p) is None:
          raise ValueError(
              f"spd_optax.experimental.adam_spd: params{leaf.path} is on a mesh of "
              f"{sharding.mesh_of(p).size} devices with Auto axes under jax.jit, "
              "whose placement of the leaf the step cannot see, and a Pallas "
              "kernel is not partitioned (it would gather the whole leaf on "
              "every device). Use a mesh with Explicit axes (jax.make_mesh's "
              "default), call the optimizer inside jax.shard_map (with "
              "axis_name= or param_specs=), or use spd_optax.adam_spd.")
        run = kernels.on_each_device
      mu[i], nu[i], s = run(g, p, a, old_mu[i], old_nu[i], coef, leaf.axes)
      sums[i] = sharding.across_devices(s, leaf.psum_axes, leaf.layer_split)
      taken.append(i)
    directions = [adam.direction(mu[i], nu[i], bc1, bc2, eps) for i in taken]
    proposed = list(proposed)
    for i, u in zip(taken, scale_lr.update(directions, old_lr)[0]):
      proposed[i] = u
    new_adam = new_adam._replace(mu=treedef.unflatten(mu), nu=treedef.unflatten(nu))
    return proposed, (new_adam, new_lr), sums

  return first_pass
