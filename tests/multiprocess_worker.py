"""One process of the two-process SPD run that tests/test_multiprocess.py starts.

    python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz CKPT_DIR

Each process has 2 CPU devices; the mesh (2, 2) ('data', 'model') spans the
4 devices of both processes, which talk over gloo on 127.0.0.1 only. After
3 steps both save a checkpoint to CKPT_DIR, restore it onto a (4,) mesh and
take 3 more steps. The code is what runs on a GPU/TPU cluster, except that
there `initialize()` takes no arguments.
"""

import os
import sys

import jax

STEPS, SAVE_AT = 6, 3


def main(process_id: int, num_processes: int, port: int, out: str,
         ckpt_dir: str) -> None:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  if "jax_cpu_collectives_implementation" in jax.config.values:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=60,
  )
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import spd_optax
  from spd_optax import checkpoint as spd_ckpt
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_sharding import MASK, SPECS, host_grads, host_params, make_step
  from test_sharding import state_shardings

  assert jax.process_count() == num_processes
  assert jax.local_device_count() == 2 and jax.device_count() == 2 * num_processes
  mesh = jax.make_mesh((2, jax.device_count() // 2), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  psh = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}

  def global_arrays(host_tree):
    # Every process holds (or here: computes) the full values and hands each
    # of its devices only that device's shard.
    return {k: jax.make_array_from_callback(v.shape, psh[k], lambda idx, v=v: v[idx])
            for k, v in host_tree.items()}

  tx = spd_optax.adam_spd(0.05, weight_decay=1.0, mask=MASK)
  params = global_arrays(host_params())
  ssh = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  for t in range(SAVE_AT):
    params, state = step(params, state, global_arrays(host_grads(t)))

  # Every process saves its shards to the shared directory, then the run
  # resumes on another global mesh: (4,) 'fsdp' over the same devices.
  spd_ckpt.save(ckpt_dir, SAVE_AT, params, state)
  del params, state
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Explicit,))
  psh = {k: NamedSharding(mesh, P("fsdp") if v.ndim and v.shape[0] % 4 == 0 else P())
         for k, v in host_params().items()}
  abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=psh[k])
                     for k, v in host_params().items()}
  ssh = state_shardings(tx, abstract_params, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(tx.init, abstract_params), ssh)
  params, state = spd_ckpt.restore(ckpt_dir, abstract_params, abstract_state)
  step = jax.jit(make_step(tx), donate_argnums=(0, 1), out_shardings=(psh, ssh))
  for t in range(SAVE_AT, STEPS):
    params, state = step(params, state, global_arrays(host_grads(t)))

  # Only this process's shards live here.
  for k, p in params.items():
    assert all(s.device.process_index == jax.process_index()
               for s in p.addressable_shards)
    assert not p.is_fully_addressable or jax.process_count() == 1
  assert state.anchor["w1"].sharding.is_equivalent_to(psh["w1"], 2)
  assert state.inner_state[0].mu["w1"].sharding.is_equivalent_to(psh["w1"], 2)

  got_params = multihost_utils.process_allgather(params, tiled=True)
  got_anchor = multihost_utils.process_allgather(
      {k: a for k, a in state.anchor.items() if MASK[k]}, tiled=True)
  got_dev = multihost_utils.process_allgather(
      {k: d for k, d in state.deviation.items() if MASK[k]}, tiled=True)
  np.savez(out, **{f"params/{k}": np.asarray(v) for k, v in got_params.items()},
           **{f"anchor/{k}": np.asarray(v) for k, v in got_anchor.items()},
           **{f"deviation/{k}": np.asarray(v) for k, v in got_dev.items()})
  multihost_utils.sync_global_devices("spd_done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
       sys.argv[5])
