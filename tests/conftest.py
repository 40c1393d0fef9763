"""Shared test setup. Eight host devices let the sharding tests build meshes
on a CPU; the flag must be set before jax initialises its backend."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
# XLA:CPU runs a collective's 8 participants on a thread pool of
# max(cores, devices) threads: 8 here, on 2 cores. A long eager sequence of
# sharded ops (an eager update on a mesh) can leave one of them waiting for
# a launch slot, and the other 7 then wait for it until XLA aborts the
# process (1000 eager sums on 8 devices hung in 4 runs of 14 with jax
# 0.10.2, 14 of 14 with jax 0.8.0; with a pool of 16, none of 14 and 8).
os.environ.setdefault("PJRT_NPROC", "16")
# libtpu (the aot extra's, for tests/test_aot.py's compile-only TPU checks)
# must not claim a TPU where there is none, and several test processes may
# load it. Where a CUDA plugin is installed (a GPU machine), jax keeps
# its own choice of backend.
import importlib.util  # noqa: E402
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache for the run, shared by pytest-xdist's workers and the
# tests' subprocesses (they inherit the environment): many tests compile the
# same steps (the examples' runs and their resumes, one configuration over
# mesh types). Emptied at the end of the run, so no run reads another's.
import shutil  # noqa: E402
import tempfile  # noqa: E402
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spd_optax_jax_cache_")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Recorded from the authors' AdamSPD; see tests/golden/README.md.
GOLDEN = REPO / "tests" / "golden"

# XLA:CPU has host memory (pinned_host) only from jax 0.10.2 on. Before, on
# CPU, jax.device_put(x, jax.memory.Space.Host) leaves x in device memory
# (eagerly and under jit), and a jit whose sharded output is meant for
# pinned_host fails to compile ("UNIMPLEMENTED: Side-effect ops cannot be
# replicated" / "RET_CHECK ... Side-effect HLO must have sharding"), so
# anchor_on_host=True cannot do what it says there. Tests marked
# needs_host_memory are expected to fail exactly there (strict: an
# unexpected pass fails too), so .ci/minimums, at the declared floor of jax,
# still checks everything else.
NO_HOST_MEMORY_REASON = "XLA:CPU before jax 0.10.2 has no pinned_host memory placement"


def no_host_memory():
  import jax
  version = tuple(int(p) for p in jax.__version__.split(".")[:3])
  return jax.default_backend() == "cpu" and version < (0, 10, 2)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "needs_host_memory: anchor_on_host placement in pinned_host "
      "memory (expected to fail where " + NO_HOST_MEMORY_REASON + ")")


def pytest_collection_modifyitems(config, items):
  marked = [item for item in items if item.get_closest_marker("needs_host_memory")]
  if marked and no_host_memory():
    for item in marked:
      item.add_marker(pytest.mark.xfail(strict=True, reason=NO_HOST_MEMORY_REASON))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
