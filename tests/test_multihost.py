"""Two processes x 4 CPU devices (jax.distributed, gloo on 127.0.0.1) train the same 3 steps as one
process x 8 devices: a GPipe pipeline split across the processes (mesh data 1 x pipeline 2 x
expert 4, stage s on process s), expert-parallel MoE, ZeRO-1, each process loading its share of
the data (here both stages read the whole batch: the first needs the inputs, the last the targets).

The worker below is this file run as a script: the same code path as train.py (make_data with the
process's batch share, layout.make_step, make_array_from_process_local_data), minus eval and
checkpoints so that it compiles one program.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS, BATCH, SEQ, TIMEOUT = 3, 8, 16, 150


def worker(pid: int, nproc: int, port: int, local_devices: int, tokens_path: str) -> list[float]:
    import jax

    jax.config.update("jax_num_cpu_devices", local_devices)
    from dsv3_jax.parallel import multihost

    if nproc > 1:
        multihost.initialize(f"127.0.0.1:{port}", nproc, pid, timeout_s=30)
    import jax.numpy as jnp

    from dsv3_jax.config import preset
    from dsv3_jax.data import DataConfig, make_data
    from dsv3_jax.sharding import batch_sharding, make_mesh
    from dsv3_jax.train import layout
    from dsv3_jax.train.config import OptimConfig, TrainConfig
    from dsv3_jax.train.state import init_state

    # two MoE layers and nothing else: the program stays small, so three processes compile it quickly
    cfg = preset("tiny", n_layers=2, n_dense_layers=0, n_mtp_modules=0, vocab_size=128, max_seq_len=32,
                 moe_impl="ep", ep_dispatch="fp32", ep_combine="fp32")
    run = TrainConfig(batch_size=BATCH, seq_len=SEQ, pipeline_schedule="gpipe", pipeline_microbatches=2)
    mesh = make_mesh(1, 2, 4)
    jax.set_mesh(mesh)
    in_sh = batch_sharding(mesh, (BATCH, SEQ))
    share, n_shares = multihost.batch_share(in_sh, (BATCH, SEQ))
    ds = make_data(DataConfig(sources=(tokens_path,), val_fraction=0.0), seq_len=SEQ, global_batch_size=BATCH,
                   vocab_size=cfg.vocab_size, workdir=os.path.dirname(tokens_path),
                   process_index=share, process_count=n_shares)
    graphdef, tx, state, sh = init_state(cfg, OptimConfig(peak_lr=1e-2, warmup_steps=1), mesh)
    step = jax.jit(layout.make_step(graphdef, tx, run, cfg, mesh), donate_argnums=0,
                   in_shardings=(sh, in_sh, None, None), out_shardings=(sh, None))
    step = step.lower(state, {"inputs": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=in_sh)} | {
        "targets": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=in_sh)}, 1e-3, 0.3).compile(
        {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    losses = []
    for _ in range(STEPS):
        b = {k: jax.make_array_from_process_local_data(in_sh, v, (BATCH, SEQ)) for k, v in next(ds.train).items()}
        state, m = step(state, b, 1e-3, 0.3)
        losses.append(float(m["loss"]))
    if nproc > 1:
        jax.distributed.shutdown()
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(pid, nproc, port, local_devices, tokens_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    args = [sys.executable, __file__, str(pid), str(nproc), str(port), str(local_devices), tokens_path]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 128, size=20_000).astype(np.uint16)
    path = str(tmp_path / "tokens.npy")
    np.save(path, tokens)
    port = _free_port()
    procs = [_launch(0, 2, port, 4, path), _launch(1, 2, port, 4, path), _launch(0, 1, 0, 8, path)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    two_a, two_b, one = outs
    assert two_a == two_b  # both processes see the same global loss
    np.testing.assert_allclose(two_a, one, rtol=1e-5)
    assert len(set(one)) == STEPS  # three different batches (each process read its own share)


if __name__ == "__main__":
    pid, nproc, port, local = (int(a) for a in sys.argv[1:5])
    print(json.dumps(worker(pid, nproc, port, local, sys.argv[5])))
