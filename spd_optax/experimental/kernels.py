r"""Adam-SPD's first pass over a leaf as one Pallas kernel (experimental).

The first pass of an Adam-SPD step reads $g$, $\theta_{t-1}$, $\theta_0$,
$m$ and $v$ once and writes the new moments and, per layer, the three sums
SPD needs before it can finish any element (`spd_optax.projection.layer_sums`):

$$
m_t = (1-\beta_1) g + \beta_1 m, \quad v_t = (1-\beta_2) g^2 + \beta_2 v,
\quad u = -\eta\, \frac{m_t / c_1}{\sqrt{v_t / c_2} + \epsilon}, \quad
d = \theta_{t-1} - \theta_0,
$$
$$
\big(\langle g, d\rangle,\ \|d\|^2,\ \langle u, 2d + u\rangle\big)
\text{ per layer, in float32.}
$$

XLA forms this pass itself (a multi-output reduction fusion); this module
is the same pass written by hand, so that a device run can tell whether a
hand-written pass is faster (benchmarks/NOTES.md). The new moments are
written over the old ones (``input_output_aliases``), so a donated step
needs no extra buffer. One kernel per backend, chosen in `first_pass`:
Mosaic on TPU, Triton on GPU, Pallas' interpreter elsewhere (tests).

A kernel works on one device's data: inside `jax.shard_map`, the caller
adds the sums over the devices (`spd_optax.experimental.adam_spd` does, as
its ``axis_name`` or ``param_specs`` say); on a mesh with Explicit axes,
`on_each_device` runs it per device itself.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P

from spd_optax import _compat
from spd_optax import adam
from spd_optax import sums

# Elements per Triton program: 16 per thread at 8 warps.
GPU_BLOCK = 4096
GPU_WARPS = 8
# The largest TPU block, (rows, columns): five inputs and two outputs,
# double-buffered, in (256, 512) float32 blocks take 7 MiB of VMEM, well
# under every TPU's default scoped limit (16 MiB on v5e).
TPU_MAX_BLOCK = (256, 512)


def supports(g, p, a, m, v, axes: tuple[int, ...]) -> bool:
  """Whether the kernels take a leaf, given its gradient, params, anchor
  (or None), moments and layer axes: float32 throughout (float64 and mixed
  dtypes keep XLA's pass, which forms the update before rounding the
  moments) and layers along axis 0 only."""
  arrays = [g, p, m, v] + ([] if a is None else [a])
  # A zero-size leaf has no block to run a kernel on.
  return (all(x.dtype == jnp.float32 for x in arrays) and axes in ((), (0,))
          and p.ndim > len(axes) and p.size > 0)


def _tileable(shape) -> bool:
  """Whether the TPU kernel tiles a [L, R, C] view without padding."""
  return shape[2] % 128 == 0 and shape[1] % 8 == 0


def coefficients(neg_lr, bc1, bc2, b1, b2, eps) -> jax.Array:
  """The kernels' scalars in one float32 array: ``(-η, c_1, c_2, β_1,
  1-β_1, β_2, 1-β_2, ε)``. Under `optax.inject_hyperparams` even β and ε
  are traced values, which a kernel may not close over. ``1 - β`` is formed
  here, as optax forms it: in double precision for a Python float."""
  return jnp.stack([jnp.asarray(c, jnp.float32)
                    for c in (neg_lr, bc1, bc2, b1, 1 - b1, b2, 1 - b2, eps)])


def _arithmetic(coef, g, p, a, m, v):
  """(m_t, v_t, ⟨g,d⟩ terms, ‖d‖² terms, s terms), element-wise, as
  `adam.scale_by_adam` and `spd_optax.projection.layer_sums` form them."""
  neg_lr, bc1, bc2, b1, c1, b2, c2, eps = (coef[i] for i in range(8))
  m = c1 * g + b1 * m
  v = c2 * (g * g) + b2 * v
  u = neg_lr * adam.direction(m, v, bc1, bc2, eps)
  return m, v, sums.terms(g, p if a is None else p - a, u)


def _cost(inputs, m, v) -> pl.CostEstimate:
  """What the kernel moves and computes, for XLA's scheduler (XLA:TPU's
  cost model gives the call no estimate with or without it)."""
  n = m.size
  moved = sum(x.size * x.dtype.itemsize for x in inputs) + 2 * n * m.dtype.itemsize
  return pl.CostEstimate(flops=20 * n, transcendentals=2 * n, bytes_accessed=moved)


def _out(like, shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  """A kernel output's type: inside `jax.shard_map`, varying over the
  manual axes `like` varies over (as the moments and their sums do). The
  keyword for that differs across jax versions."""
  aval = jax.typeof(like)
  for keyword, attribute in (("manual_axis_type", "manual_axis_type"), ("vma", "vma")):
    if hasattr(aval, attribute):
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{keyword: getattr(aval, attribute)})
      except TypeError:
        pass
  return jax.ShapeDtypeStruct(shape, dtype)


def _anchor_or_none(rest) -> tuple:
  """(a, m, v) from the arrays after g and p, which hold no anchor where
  θ_0 = 0 (a kernel's operands are arrays only)."""
  return tuple(rest) if len(rest) == 3 else (None, *rest)


def _edge(n: int, step: int, most: int) -> int:
  """The largest multiple of `step` that divides `n`, up to `most`."""
  best = step
  for e in range(step, min(n, most) + 1, step):
    if n % e == 0:
      best = e
  return best


def _tpu(coef, g, p, a, m, v, *, interpret):
  """Mosaic: [L, R, C] in (R-block, C-block) tiles, the rows innermost, so
  that each layer's sums for one column block accumulate in an output block
  that stays in VMEM while the rows run past it."""
  layers, rows, cols = g.shape
  br, bc = _edge(rows, 8, TPU_MAX_BLOCK[0]), _edge(cols, 128, TPU_MAX_BLOCK[1])
  has_anchor = a is not None

  def kernel(coef_ref, *refs):
    g_ref, p_ref, *refs = refs
    a_ref = refs.pop(0) if has_anchor else None
    m_ref, v_ref, m_out, v_out, sums_ref = refs

    @pl.when(pl.program_id(2) == 0)
    def _():
      sums_ref[...] = jnp.zeros_like(sums_ref)

    m, v, terms = _arithmetic(
        [coef_ref[i] for i in range(8)], g_ref[...], p_ref[...],
        None if a_ref is None else a_ref[...], m_ref[...], v_ref[...])
    m_out[...] = m
    v_out[...] = v
    # Down the rows only (vector adds); across the lanes once, in XLA.
    sums_ref[...] += jnp.concatenate(
        [jnp.sum(t, axis=0, keepdims=True) for t in terms], axis=0)

  tile = pl.BlockSpec((None, br, bc), lambda l, j, i: (l, i, j))
  inputs = [g, p] + ([a] if has_anchor else []) + [m, v]
  moments = len(inputs) - 1  # m's index among the operands (coef first)
  m_new, v_new, partial = pl.pallas_call(
      kernel,
      grid=(layers, cols // bc, rows // br),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + [tile] * len(inputs),
      out_specs=[tile, tile, pl.BlockSpec((None, None, 3, bc),
                                          lambda l, j, i: (l, j, 0, 0))],
      out_shape=[_out(m, m.shape, m.dtype), _out(v, v.shape, v.dtype),
                 _out(m, (layers, cols // bc, 3, bc))],
      input_output_aliases={moments: 0, moments + 1: 1},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=_cost(inputs, m, v),
      name="adam_spd_first_pass",
  )(coef, *inputs)
  sums = jnp.sum(partial, axis=(1, 3))  # [L, 3]
  return m_new, v_new, tuple(sums[:, k] for k in range(3))


def _gpu(coef, g, p, a, m, v, *, interpret):
  """Triton: each layer's elements in flat blocks of GPU_BLOCK, one program
  per block, each writing its partial sums; XLA adds the partials."""
  layers = g.shape[0]
  n = g.size // layers
  blocks = pl.cdiv(n, GPU_BLOCK)
  has_anchor = a is not None
  flat = [x.reshape(layers, n) for x in [g, p] + ([a] if has_anchor else []) + [m, v]]

  def kernel(coef_ref, *refs):
    g_ref, p_ref, *refs = refs
    a_ref = refs.pop(0) if has_anchor else None
    m_ref, v_ref, m_out, v_out, *sum_refs = refs
    # The last block runs past the layer's end: its lanes there load zeros
    # and are not stored. Their terms are masked too: with eps = 0 a zero
    # lane's direction is 0/0.
    valid = pl.program_id(1) * GPU_BLOCK + jnp.arange(GPU_BLOCK) < n
    load = lambda r: plgpu.load(r, mask=valid, other=0.0)
    coef = [coef_ref[i] for i in range(8)]
    m, v, terms = _arithmetic(coef, load(g_ref), load(p_ref),
                              None if a_ref is None else load(a_ref),
                              load(m_ref), load(v_ref))
    plgpu.store(m_out, m, mask=valid)
    plgpu.store(v_out, v, mask=valid)
    for ref, t in zip(sum_refs, terms):
      ref[...] = jnp.sum(jnp.where(valid, t, 0.0))

  block = pl.BlockSpec((None, GPU_BLOCK), lambda l, i: (l, i))
  partial = pl.BlockSpec((None, None), lambda l, i: (l, i))
  moments = len(flat) - 1
  m_new, v_new, *partials = pl.pallas_call(
      kernel,
      grid=(layers, blocks),
      in_specs=[pl.BlockSpec((8,), lambda l, i: (0,))] + [block] * len(flat),
      out_specs=[block, block] + [partial] * 3,
      out_shape=[_out(m, (layers, n), m.dtype), _out(v, (layers, n), v.dtype)]
                + [_out(m, (layers, blocks))] * 3,
      input_output_aliases={moments: 0, moments + 1: 1},
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=GPU_WARPS),
      interpret=interpret,
      cost_estimate=_cost(flat, m, v),
      name="adam_spd_first_pass",
  )(coef, *flat)
  return (m_new.reshape(m.shape), v_new.reshape(v.shape),
          tuple(jnp.sum(s, axis=1) for s in partials))


def _xla(coef, g, p, a, m, v, *, interpret=False):
  """The same pass in plain jnp, for what the TPU kernel cannot tile."""
  del interpret
  m, v, terms = _arithmetic(coef, g, p, a, m, v)
  return m, v, tuple(jnp.sum(t, axis=(1, 2)) for t in terms)


def first_pass(g: jax.Array, p: jax.Array, a: jax.Array | None, m: jax.Array,
               v: jax.Array, coef: jax.Array, axes: tuple[int, ...], *,
               platform: str | None = None) -> tuple:
  """New moments and per-layer SPD sums of one leaf, from one kernel.

  Args:
    g: the leaf's gradient (`supports` says which leaves a kernel takes).
    p: its params θ_{t-1}.
    a: its anchor θ_0, or None for θ_0 = 0.
    m: Adam's first moment before the step; the kernel writes over it.
    v: Adam's second moment before the step; written over too.
    coef: `coefficients`.
    axes: the leaf's layer axes, ``()`` or ``(0,)``.
    platform: ``"tpu"`` or ``"gpu"``: that backend's kernel in Pallas'
      interpreter (tests). None: the kernel of the backend the step is
      compiled for: Mosaic on TPU (XLA's pass for a leaf whose last axis is
      not a multiple of 128, or its rows of 8), Triton on GPU, the Triton
      kernel in Pallas' interpreter elsewhere; inside a `jax.shard_map`
      that checks varying axes (its default), the interpreter cannot run
      (it pads blocks with values of no axis, which the check refuses), so
      off accelerators XLA's pass runs there instead.

  Returns:
    ``(m_t, v_t, (⟨g,d⟩, ‖d‖², s))``, the sums of the layer axes' shape.

  Raises:
    ValueError: for a leaf `supports` does not take, or with
      ``platform="tpu"``, one the TPU kernel cannot tile.
  """
  if not supports(g, p, a, m, v, axes):
    raise ValueError(
        f"the Pallas first pass takes float32 leaves of at least one element "
        f"with layers along axis 0 only; got shape {p.shape}, dtype {p.dtype}, "
        f"layer axes {axes} (kernels.supports says which).")
  layers = g.shape[0] if axes else 1
  view = (layers, -1, p.shape[-1]) if p.ndim > len(axes) + 1 else (layers, 1, -1)
  views = [x if x is None else x.reshape(view) for x in (g, p, a, m, v)]
  if platform == "tpu" and not _tileable(views[0].shape):
    raise ValueError(
        f"the TPU kernel tiles a leaf as [layers, rows, columns] with columns a "
        f"multiple of 128 and rows of 8; shape {p.shape} is {views[0].shape} "
        "there. On a TPU (platform=None) such a leaf takes XLA's pass.")

  def on(call, interpret=False):
    def run(coef, g, p, *rest):
      return call(coef, g, p, *_anchor_or_none(rest), interpret=interpret)
    return run

  if platform is not None:
    run = on({"tpu": _tpu, "gpu": _gpu}[platform], interpret=True)
  else:
    tpu = _tpu if _tileable(views[0].shape) else _xla
    checked = (bool(jax.sharding.get_abstract_mesh().manual_axes)
               and _compat.tracks_varying_axes())
    run = lambda *xs: lax.platform_dependent(
        *xs, tpu=on(tpu), cuda=on(_gpu),
        default=on(_xla) if checked else on(_gpu, interpret=True))
  # A kernel that writes over its inputs has no derivative in JAX: the
  # derivative is that of the same arithmetic in jnp (`jax.grad` through
  # `update` works as on XLA's pass).
  run = jax.custom_jvp(run)
  run.defjvp(lambda primals, tangents: (
      run(*primals), jax.jvp(on(_xla), primals, tangents)[1]))
  m_new, v_new, sums = run(coef, *(x for x in views if x is not None))
  shape = g.shape[:1] if axes else ()
  return (m_new.reshape(m.shape), v_new.reshape(v.shape),
          tuple(s.reshape(shape) for s in sums))


def on_each_device(g, p, a, m, v, coef, axes):
  """`first_pass` for a leaf on an Explicit mesh under `jax.jit` (whose
  placement its type carries): each device runs the kernel on its part in
  a `jax.shard_map`, and a layer's sums are added over the mesh axes that
  split its elements. The gradient, anchor and moments are placed like the
  params first (a no-op when they already are)."""
  sharding = jax.typeof(p).sharding
  mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (p.ndim - len(sharding.spec))
  names = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  within = tuple(n for entry in spec[len(axes):] for n in names(entry))
  leaf = P(*spec)
  sums_spec = P(spec[0]) if axes else P()  # the layer axis may be split too
  place = lambda x: jax.sharding.reshard(x, NamedSharding(mesh, leaf))
  arrays = [place(x) for x in (g, p, a, m, v) if x is not None]

  def local(coef, g, p, *rest):
    m, v, sums = first_pass(g, p, *_anchor_or_none(rest), coef, axes)
    return m, v, tuple(lax.psum(s, within) if within else s for s in sums)

  # Unchecked: Pallas' interpreter (off accelerators) pads blocks with
  # values that vary over no axis, which the check refuses.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (leaf,) * len(arrays),
                       out_specs=(leaf, leaf, (sums_spec,) * 3), check_vma=False)(
                           jax.sharding.reshard(coef, NamedSharding(mesh, P())), *arrays)
