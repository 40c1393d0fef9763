"""What differs across the jax versions spd_optax runs on (0.8 to 0.12)."""

import jax


def version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def host_memory_works() -> bool:
  """Whether `jax.memory.Space.Host` places arrays in host memory here:
  XLA:CPU has no pinned_host memory before jax 0.10.2."""
  # The version first: asking for the backend initialises it, which must
  # not happen before jax.distributed.initialize.
  return version() >= (0, 10, 2) or jax.default_backend() != "cpu"


def tracks_varying_axes() -> bool:
  """Whether the enclosing `jax.shard_map` tracks the manual axes values
  vary over (``check_vma=True``): with ``check_vma=False`` every value's
  varying axes are empty, so "varies over nothing" means nothing there.
  JAX exposes the flag only privately; where it cannot be read, trust
  nothing."""
  try:
    from jax._src import config
    return bool(config._check_vma.value)
  except (ImportError, AttributeError):
    return False


def varying_axes(x) -> frozenset:
  """The manual mesh axes (of an enclosing `jax.shard_map`) over which `x`
  takes different values on different devices (``vma`` from jax 0.8.1 on,
  ``manual_axis_type.varying`` in 0.10)."""
  aval = jax.typeof(x)
  for get in (lambda t: t.vma, lambda t: t.manual_axis_type.varying):
    try:
      return frozenset(get(aval))
    except AttributeError:
      pass
  return frozenset()
