"""The train step of the full fine-tuning example, apart from its data and
reports, so that `memory_plan.py` compiles exactly this step for TPU pod
slices: the scanned model as a pure tree of FSDP-sharded params on a
one-axis mesh, the optimizers, the state's shardings, the jitted and
donated step, and the per-block views of the state.

Needs only jax, optax, flax and spd_optax.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import spd_optax
from examples.llm import scan_model
from examples.llm.model import window_nll

# The block matrices: what SPD (and AdamW's decay) acts on; see spd_mask.
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_mesh(n_devices):
  if n_devices > len(jax.devices()):
    raise ValueError(
        f"the mesh needs {n_devices} devices but jax sees {len(jax.devices())}; "
        f"on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n_devices} "
        f"(and PJRT_NPROC={2 * n_devices}: XLA:CPU's collectives can hang with no "
        f"more threads than devices) before starting, or pass --devices "
        f"{len(jax.devices())}")
  # jax.make_mesh's default axis type is Explicit: shardings are part of the
  # arrays' types, and the model gathers weights where it uses them.
  return jax.make_mesh((n_devices,), ("fsdp",), devices=jax.devices()[:n_devices])


def split_model(model, mesh):
  """(graphdef, params, param shardings, layer_axes): params a plain nested
  dict of arrays, FSDP-sharded (each weight's "embed" axis over the mesh)."""
  graphdef, state = nnx.split(model, nnx.Param)
  specs = nnx.to_pure_dict(scan_model.param_specs(state, {"embed": "fsdp"}))
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                     is_leaf=lambda x: isinstance(x, P))
  layer_axes = nnx.to_pure_dict(spd_optax.layer_axes_from_names(state, scan_model.LAYERS))
  params = jax.device_put(nnx.to_pure_dict(state), psh)
  return graphdef, params, psh, layer_axes


def spd_mask(params):
  """SPD (and AdamW's decay) on the seven block matrices, not on the norm
  gains nor on the tied embedding/head.

  The norms are 1-D gains (0.03% of the weights) whose scale fine-tuning is
  free to adjust. The embedding is one 49,152 x 576 leaf and so one SPD
  unit: its single condition would mix the few rows a batch's tokens touch
  with the many it does not, which is not the per-layer decision SPD is
  about; it trains with plain Adam, as is common for embeddings under
  weight decay too."""
  mask = jax.tree.map(lambda _: False, params)
  mask["blocks"] = {k: k in MATRICES for k in params["blocks"]}
  return mask


def make_tx(cfg, method, strength, steps, params, layer_axes, **spd_kwargs):
  lr = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, steps), max(steps, 1),
      end_value=0.1 * cfg.learning_rate)
  mask = spd_mask(params)
  if method == "adamw":
    return optax.adamw(lr, weight_decay=strength, mask=mask)
  if method == "adam_spd":
    return spd_optax.adam_spd(lr, weight_decay=strength, anchor="params", mask=mask,
                              layer_axes=layer_axes, **spd_kwargs)
  raise ValueError(f"unknown method {method!r}")


def state_shardings(tx, params, psh, mesh):
  """optax's recipe: params-shaped state (moments, anchor) like the params,
  the rest (counts, SPD's per-layer values) replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract, psh,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def make_step(graphdef, tx, psh, ssh, mesh):
  def loss_fn(params, tokens):
    return jnp.mean(window_nll(nnx.merge(graphdef, params)(tokens), tokens))

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1),
                 out_shardings=(psh, ssh, NamedSharding(mesh, P())))


def make_eval(graphdef):
  @jax.jit
  def nll(params, tokens):
    return window_nll(nnx.merge(graphdef, params)(tokens), tokens)
  return nll


def per_window_nll(nll, params, windows, batch_size, mesh):
  """nll of every window, `batch_size` windows a call, the last call padded
  (with copies of the first window, dropped from the result) so that every
  call has the one compiled shape. A window's NLL depends on its own tokens
  only. Evaluating all sets in one stream keeps the batches full: on a CPU
  mesh a forward pass costs mostly its all-gathers, whatever the batch."""
  n = len(windows)
  if n % batch_size:
    windows = np.concatenate([windows, np.repeat(windows[:1], batch_size - n % batch_size, 0)])
  out = [np.asarray(nll(params, shard_batch(windows[i:i + batch_size], mesh)))
         for i in range(0, len(windows), batch_size)]
  return np.concatenate(out)[:n]


def evaluate(nll, params, sets, names, batch_size, mesh):
  """{name: per-window NLL} of the sets `names`, evaluated as one stream."""
  stream = np.concatenate([sets[k] for k in names])
  out = per_window_nll(nll, params, stream, batch_size, mesh)
  ends = np.cumsum([len(sets[k]) for k in names])
  return dict(zip(names, np.split(out, ends[:-1])))


def shard_batch(tokens, mesh):
  return jax.device_put(jnp.asarray(tokens), NamedSharding(mesh, P("fsdp", None)))


@functools.partial(jax.jit, static_argnums=2)
def block_deviation(params, theta0, layer_axis):
  """[len(MATRICES), L]: ‖θ − θ0‖ of each block matrix, from the params
  (the same measure for AdamW, which keeps no anchor)."""
  def per_layer(a, b):
    d = jnp.square(a - b)
    return jnp.sum(d, axis=tuple(i for i in range(d.ndim) if i != layer_axis))
  return jnp.sqrt(jnp.stack([per_layer(params["blocks"][k], theta0["blocks"][k])
                             for k in MATRICES]))


def deviation_table(params, theta0, layer_axis):
  return np.asarray(block_deviation(params, theta0, layer_axis))


def layer_values(state, name):
  """[len(MATRICES), L] of SPD's per-layer `name` ("condition", "ratio",
  "deviation") from the stacked state, or None for a state without SPD."""
  if not spd_optax.state.spd_states_with_paths(state):
    return None
  tree = getattr(spd_optax.spd_state(state), name)
  return np.stack([np.asarray(tree["blocks"][k]) for k in MATRICES])
