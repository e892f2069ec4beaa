"""Multi-process start-up: `jax.distributed.initialize` from explicit flags or a recognised cluster.

Each process then sees every device (`jax.devices()`) but feeds only its own (`jax.local_devices()`):
train.py loads process p's strided share of every global batch (`data.make_data`) and assembles
the global array with `jax.make_array_from_process_local_data`. Every process must run the same
jitted programs in the same order. On CPU the collectives go through gloo.

Recognised clusters (jax's own auto-detection then fills in every argument): SLURM with more than
one task, Open MPI (mpirun) with more than one rank, and multi-host Cloud TPU slices.
"""

from __future__ import annotations

import os

import jax

from dsv3_jax.errors import ConfigError


def cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Start the distributed runtime if asked to (flags) or if on a cluster; -> whether it started.

    Call before anything touches a JAX backend. `timeout_s` bounds start-up and the heartbeat
    (tests pass a few seconds so that a dead peer cannot hang them)."""
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise ConfigError("--coordinator_address needs --num_processes and --process_id")
    if not explicit and not cluster_detected():
        return False
    kw = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=max(10, timeout_s // 3),
              shutdown_timeout_seconds=max(5, timeout_s // 3))
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **kw)
    else:
        jax.distributed.initialize(**kw)
    return True


def batch_share(sharding, global_shape) -> tuple[int, int]:
    """(index, count) of the block of batch rows this process's devices hold under `sharding`, for
    `data.make_data(process_index=index, process_count=count)`. Processes whose devices hold the same
    rows (other pipeline stages, replicas) get the same index and load the same data; with a pipeline
    split across hosts every stage's host reads the batch (the first stage needs the inputs, the last
    the targets)."""
    B = global_shape[0]
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()]
    lo = min(r.start or 0 for r in rows)
    hi = max(B if r.stop is None else r.stop for r in rows)
    size = hi - lo
    covered = set()
    for r in rows:
        covered.update(range(r.start or 0, B if r.stop is None else r.stop))
    if B % size or lo % size or len(covered) != size:
        raise ConfigError(f"this process's devices hold batch rows {sorted(covered)} of {B}: not one aligned "
                         "block; order the mesh so that each process holds a contiguous block")
    return lo // size, B // size
