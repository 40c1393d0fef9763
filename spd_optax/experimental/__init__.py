"""Experimental: not covered by the stable API, and not yet timed on a device.

`adam_spd` here is `spd_optax.adam_spd` with each float32 leaf's first pass
(new moments, SPD's per-layer sums) from one hand-written Pallas kernel
(`spd_optax.experimental.kernels`: Mosaic on TPU, Triton on GPU, Pallas'
interpreter elsewhere) instead of XLA's fusion. It computes the same
numbers (tests/test_kernels.py); whether it is faster is for a device run to
say (benchmarks/gpu_check.py, benchmarks/NOTES.md).
"""

from spd_optax.experimental.pallas import adam_spd

__all__ = ["adam_spd"]
