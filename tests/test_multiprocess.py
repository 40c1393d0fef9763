"""Two processes, one global mesh: SPD on params sharded across processes
(jax.distributed on 127.0.0.1, gloo CPU collectives), checkpointed by both
and resumed on another mesh, equals one process."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import spd_optax
from test_sharding import MASK, host_params, unsharded_run

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  # 2 CPU devices per process (set by the worker), not the 8 of conftest.py.
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  # Loopback only: no proxy may see the coordinator's gRPC traffic.
  for var in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY",
              "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
    env.pop(var, None)
  env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
  return env




def _run_workers(tmp_path):
  port = _free_port()
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(NUM_PROCESSES)]
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(out),
       str(tmp_path / "ckpt")],
      env=_child_env(), stdout=log, stderr=subprocess.STDOUT, cwd=str(WORKER.parent))
      for i, (out, log) in enumerate(zip(outs, logs))]
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  report = "\n".join(f"--- process {i} ---\n{t[-4000:]}" for i, t in enumerate(texts))
  if codes is None:
    pytest.fail(f"workers did not finish in {TIMEOUT_S}s:\n{report}")
  assert codes == [0] * NUM_PROCESSES, f"worker exit codes {codes}:\n{report}"
  return [dict(np.load(out)) for out in outs]


@pytest.mark.skipif(sys.platform == "win32",
                    reason="jaxlib has no CPU collectives (gloo) on Windows")
def test_two_processes_match_one(tmp_path):
  results = _run_workers(tmp_path)
  assert (tmp_path / "ckpt" / "3" / "opt_state").is_dir()   # saved by both

  # The single-process run: one device, no sharding.
  from multiprocess_worker import STEPS
  params, state = unsharded_run(spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK),
                                steps=STEPS)

  for got in results:
    for k, want in params.items():
      np.testing.assert_allclose(got[f"params/{k}"], np.asarray(want),
                                 rtol=1e-5, atol=1e-6, err_msg=k)
      if MASK[k]:
        np.testing.assert_array_equal(got[f"anchor/{k}"], host_params()[k])
        np.testing.assert_allclose(got[f"deviation/{k}"],
                                   np.asarray(state.deviation[k]), rtol=1e-5)
  # both processes gathered the same global result
  for k in results[0]:
    np.testing.assert_array_equal(results[0][k], results[1][k])
