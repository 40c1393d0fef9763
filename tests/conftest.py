"""Shared test setup. Eight host devices let the sharding tests build meshes
on a CPU; the flag must be set before jax initialises its backend."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

REPO = pathlib.Path(__file__).resolve().parents[1]
# Recorded from the authors' AdamSPD; see tests/golden/README.md.
GOLDEN = REPO / "tests" / "golden"
