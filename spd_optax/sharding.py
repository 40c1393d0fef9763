"""Where SPD's arrays live: meshes, `jax.shard_map`'s manual axes and host
memory, across the jax versions spd_optax runs on (0.8 to 0.12)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def host_memory_works() -> bool:
  """Whether `jax.memory.Space.Host` places arrays in host memory here:
  XLA:CPU has no pinned_host memory before jax 0.10.2."""
  # The version first: asking for the backend initialises it, which must
  # not happen before jax.distributed.initialize.
  version = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
  return version >= (0, 10, 2) or jax.default_backend() != "cpu"


def tracks_varying_axes() -> bool:
  """Whether the enclosing `jax.shard_map` tracks the manual axes values
  vary over (``check_vma=True``; `jax.pmap` does not). JAX exposes the flag
  only privately; where it cannot be read, trust nothing."""
  try:
    from jax._src import config
    return bool(config._check_vma.value)
  except (ImportError, AttributeError):
    return False


def varying_axes(x) -> frozenset:
  """The manual mesh axes over which `x` takes different values on
  different devices (``vma`` from jax 0.8.1, ``manual_axis_type.varying``
  in 0.10)."""
  aval = jax.typeof(x)
  for get in (lambda t: t.vma, lambda t: t.manual_axis_type.varying):
    try:
      return frozenset(get(aval))
    except AttributeError:
      pass
  return frozenset()


def manual_axes() -> frozenset:
  """The manual axes of the enclosing `jax.shard_map` (or `jax.pmap`)."""
  return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def mesh_of(x):
  """The (abstract) mesh in `x`'s type, or None."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return None if mesh is None or mesh.empty else mesh


def explicit_mesh(x):
  """The mesh of `x`'s type if it has Explicit axes, else None."""
  mesh = mesh_of(x)
  return mesh if mesh is not None and AxisType.Explicit in mesh.axis_types else None


def partitioned(x) -> bool:
  """Whether XLA may split `x` over several devices: on a mesh of more than
  one, outside `jax.shard_map` (whose values are one device's own)."""
  mesh = mesh_of(x)
  return mesh is not None and mesh.size > 1 and not manual_axes()


def replicated(x, like, constant=False):
  """`x` replicated on the mesh of `like`, where that mesh places it: an
  Explicit mesh under `jax.jit`, or `like`'s concrete mesh outside it."""
  if isinstance(x, jax.core.Tracer) or isinstance(like, jax.core.Tracer):
    mesh = explicit_mesh(like)
    # Under jit, Auto axes leave placement to the compiler, and so does a
    # jit outside jax.set_mesh for a constant (it may have no devices yet).
    if mesh is None or (constant and jax.sharding.get_abstract_mesh().empty):
      return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P()))
  return jax.device_put(x, NamedSharding(like.sharding.mesh, P()))


def like_params(x, params_l):
  """`x` replicated on the params' mesh, if they are on one: where a step
  on those params returns it, so the state's types stay those of ``init``."""
  for p in params_l:
    if mesh_of(p) is not None:
      return replicated(x, p, constant=True)
  return x


def like(new, old):
  """A per-layer value of a step typed and placed as the state held it
  (replicated on its mesh; under jit on Auto axes, where the compiler
  places it), so a `lax.scan` carry or a jitted step's signature does not
  change."""
  new = new.astype(old.dtype)
  return replicated(new, old) if mesh_of(old) is not None else new


def place_like(new, old):
  """`new` with the sharding and memory kind of the array `old`."""
  if isinstance(old, jax.core.Tracer) or not hasattr(old, "sharding"):
    return new
  return jax.device_put(new, old.sharding)


def fresh_copy(x, dtype):
  """`x` in `dtype`, as a new buffer even under `jax.jit`: an anchor that
  aliased the params (a forwarded input) would break donating both."""
  return jnp.array(x, dtype=dtype, copy=True)


def across_devices(sums, axes, psum_axes=(), layer_split=()):
  """One device's per-layer sums (reduced axes kept as size 1) made the
  whole leaf's inside `jax.shard_map`: added over `psum_axes`, which split
  each layer's elements, and, where a layer axis ``axes[k]`` is split over
  the manual axes ``layer_split[k]``, gathered from every device, so that
  all devices hold every layer's values. Unchanged elsewhere."""
  if psum_axes:
    sums = lax.psum(sums, psum_axes)
  out = []
  for s in sums:
    for axis, names in zip(axes, layer_split):
      if names:
        # A psum of each device's layers placed among all, not an
        # all_gather: its result is typed the same on every device, as
        # shard_map's replication check wants of the state.
        n = s.shape[axis]
        full = jnp.zeros(s.shape[:axis] + (n * lax.axis_size(names),) + s.shape[axis + 1:],
                         s.dtype)
        s = lax.psum(lax.dynamic_update_slice_in_dim(full, s, lax.axis_index(names) * n,
                                                     axis), names)
    out.append(s)
  return tuple(out)


def local_layers(x, axes, layer_split=()):
  """The entries of a per-layer array (of all layers) for this device's
  layers, where `layer_split` splits them (see `across_devices`)."""
  for axis, names in zip(axes, layer_split):
    if names:
      n = x.shape[axis] // lax.axis_size(names)
      x = lax.dynamic_slice_in_dim(x, lax.axis_index(names) * n, n, axis)
  return x


def anchor_to_device(anchor, after=None, layer_axis=None):
  """One leaf's host anchor in device memory, moved in once `after` exists.

  Moved in all at once at the start of a step, the anchors would all be on
  the device together. Tied to the previous leaf's result by
  `lax.optimization_barrier`, a leaf's anchor is used only once that leaf
  is done; but XLA starts a transfer whenever it likes, and on LLaMA-1B's
  16 stacked blocks (v5e:2x2) it started six leaves' whole anchors at the
  top of the step: a device peak of 3,883 MiB against 3,957 with the
  anchor on the device. A stacked leaf's anchor (``layer_axis``) is
  therefore moved in one layer per turn of a loop, which starts only once
  `after` exists: 3,347 MiB (XLA:TPU's memory analysis, benchmarks/NOTES.md).
  """
  if anchor is None:  # the zero anchor
    return anchor
  mesh = explicit_mesh(anchor)
  spec = P() if mesh is None else jax.typeof(anchor).sharding.spec
  if layer_axis is not None and layer_axis < len(spec) and spec[layer_axis] is not None:
    layer_axis = None  # the layers are split over devices: each holds its own
  if layer_axis is not None:
    # The layers' buffer: a constant XLA fills on the device, on an Explicit
    # mesh typed as the anchor. (Zeros like the host anchor are filled on
    # the host and moved in: on LLaMA-1B x16 stacked, 2 copies and +101 MiB
    # of peak.) A jit outside `jax.set_mesh` may give a constant no mesh
    # type (jax 0.12): the leaf then comes in whole.
    out = jnp.zeros(anchor.shape, anchor.dtype)
    if mesh is not None and isinstance(anchor, jax.core.Tracer):
      out = jnp.zeros(anchor.shape, anchor.dtype, out_sharding=NamedSharding(mesh, spec))
      layer_axis = None if jax.typeof(out).sharding.mesh.empty else layer_axis
    elif mesh is not None:
      out = jax.device_put(out, NamedSharding(anchor.sharding.mesh, spec))
  if layer_axis is None:
    anchor = jax.device_put(anchor, jax.memory.Space.Device)
    if after is not None:
      # The barrier on the moved copy, not on the host value: XLA's host
      # offloading moves a barrier's host operands to the device first.
      anchor, _ = lax.optimization_barrier((anchor, after))
    return anchor
  # The loop's operands wait for `after` (through `start`, which is 0): a
  # transfer inside the loop cannot start before the loop does.
  start = jnp.zeros((), jnp.int32)
  if after is not None:
    start, _ = lax.optimization_barrier((start, after))

  def move_layer(layer, carry):
    out, start = carry
    one = lax.dynamic_slice_in_dim(anchor, start + layer, 1, layer_axis)
    one = jax.device_put(one, jax.memory.Space.Device)
    return lax.dynamic_update_slice_in_dim(out, one, start + layer, layer_axis), start
  return lax.fori_loop(0, anchor.shape[layer_axis], move_layer, (out, start))[0]


def dim_axes(spec, ndim) -> list[tuple[str, ...]]:
  """Per axis of a leaf, the manual mesh axes (of the enclosing
  `jax.shard_map`) that `spec` splits it over; axes the compiler shards
  (not manual) are not the step's to handle."""
  manual = manual_axes()
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  names = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  return [tuple(n for n in names(e) if n in manual) for e in entries[:ndim]]


def layer_shape(p, axes, spec) -> tuple[int, ...]:
  """The shape of a leaf's layer axes over the whole leaf: inside
  `jax.shard_map`, a layer axis that `spec` splits over devices holds one
  device's layers, so its length is that times the devices along it."""
  shape = tuple(np.shape(p)[i] for i in axes)
  if spec is None:
    return shape
  mesh = jax.sharding.get_abstract_mesh()
  split = dim_axes(spec, np.ndim(p))
  return tuple(n * int(np.prod([mesh.shape[a] for a in split[i]]))
               for n, i in zip(shape, axes))
