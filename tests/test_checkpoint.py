"""Checkpointer: exact round trips, retention, resharding on restore, crash safety, corruption
fallback, and the preemption guard. Runs on the 8 fake CPU devices of conftest.py."""

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.checkpoint import Checkpointer, abstract_like
from dsv3_jax.errors import CheckpointError
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.preemption import PreemptionGuard

DATA_STATE = {"next_index": 1234}
META = {"model": {"dim": 64, "n_layers": 3}, "note": "test"}


def make_state(mesh, seed=0):
    """A training-state-like pytree: f32 and bf16 params, optimizer moments, a router bias,
    a typed PRNG key, random uint32 bits and an int step; the big arrays are sharded over `data`."""
    ks = jax.random.split(jax.random.key(seed), 4)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    w = jax.random.normal(ks[0], (64, 32), jnp.float32)
    experts = jax.random.normal(ks[1], (8, 16, 8), jnp.float32).astype(jnp.bfloat16)
    return {
        "params": {"w": put(w, "data"), "experts": put(experts, "data")},
        "opt_state": {"mu": put(w * 0.5, "data"), "count": put(jnp.int32(7))},
        "router_bias": put(jax.random.uniform(ks[2], (16,)), None),
        "rng": jax.random.key(seed + 100),
        "noise": put(jax.random.bits(ks[3], (64, 32), jnp.uint32), "data"),  # incompressible: see below
        "step": jnp.int32(seed),
    }


def bits(x):
    """Raw bytes of an array (key data for PRNG keys), for bit-exact comparison."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).reshape(-1).view(np.uint8)


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


@pytest.fixture
def mesh8():
    return make_mesh(data=8)


def save_steps(directory, mesh, steps, **kw):
    kw = {"save_every": 1, "keep": 5, **kw}
    with Checkpointer(directory, **kw) as ckpt:
        for s in steps:
            assert ckpt.save(s, make_state(mesh, s), data_state={"next_index": s}, meta=META)
    return directory


def test_round_trip_is_bit_exact(tmp_path, mesh8):
    state = make_state(mesh8, seed=3)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.restore_latest(abstract_like(state)) is None  # empty directory: fresh start
        assert ckpt.save(3, state, data_state=DATA_STATE, meta=META)
        ckpt.wait()
        step, restored, data_state, meta = ckpt.restore_latest(abstract_like(state))
    assert step == 3 and data_state == DATA_STATE and meta == META
    assert restored["params"]["experts"].dtype == jnp.bfloat16
    assert restored["rng"].dtype == state["rng"].dtype  # still a typed key, usable as one
    assert_bit_equal(restored, state)


def test_save_every_and_keep_last_k(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state, data_state=DATA_STATE, meta=META)]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, data_state=DATA_STATE, meta=META, force=True)  # e.g. preemption
        assert not ckpt.save(7, state, data_state=DATA_STATE, meta=META, force=True)  # already there
        ckpt.wait()
        assert ckpt.steps == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_json_items_are_checked_before_saving(tmp_path, mesh8):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
            ckpt.save(1, make_state(mesh8), data_state=DATA_STATE, meta={"x": object()})


def test_restore_onto_another_mesh_with_requested_shardings(tmp_path, mesh8):
    state = make_state(mesh8, seed=1)
    save_steps(tmp_path, mesh8, [1])
    mesh222 = make_mesh(data=2, pipeline=2, expert=2)
    specs = {"params": {"w": P(("data", "expert"), "pipeline"), "experts": P("expert", None, "pipeline")},
             "opt_state": {"mu": P("pipeline", "data"), "count": P()},
             "router_bias": P("expert"), "rng": P(), "noise": P("pipeline", "data"), "step": P()}
    target = abstract_like(state, jax.tree.map(lambda s: NamedSharding(mesh222, s), specs))
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        step, restored, _, _ = ckpt.restore_latest(target)
    assert step == 1
    assert_bit_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert restored["params"]["experts"].addressable_shards[0].data.shape == (4, 16, 4)


def test_uncommitted_tmp_directory_is_ignored(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [1, 2])
    # What a crash mid-write leaves: orbax only renames <step>.orbax-checkpoint-tmp-* when done.
    partial = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", partial)
    (partial / "commit_success.txt").unlink()
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        assert ckpt.steps == [1, 2]
        step, restored, data_state, _ = ckpt.restore_latest(abstract_like(make_state(mesh8)))
    assert step == 2 and data_state == {"next_index": 2}
    assert_bit_equal(restored, make_state(mesh8, 2))
    assert not partial.exists()  # cleaned up when the manager opened the directory


def _array_files(step_dir):
    """The OCDBT data files (the top-level d/ holds the merged tree, small arrays inline)."""
    return glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)


def _truncate_array_files(d):
    for f in _array_files(d):
        os.truncate(f, os.path.getsize(f) // 2)


def _delete_array_files(d):
    for f in _array_files(d):
        os.remove(f)


def _flip_bit_in_array_data(d):
    """One bit inside the stored bytes of `noise` (random bits, so zstd keeps them verbatim and
    they can be found). Tensorstore reads them back without complaint; the checksums catch it."""
    step = int(d.name)
    shard = np.asarray(make_state(make_mesh(data=8), step)["noise"])[:8].tobytes()  # device 0's rows
    hits = 0
    for f in _array_files(d):
        raw = bytearray(open(f, "rb").read())
        at = raw.find(shard)
        if at >= 0:
            raw[at + len(shard) // 2] ^= 0x01
            open(f, "wb").write(bytes(raw))
            hits += 1
    assert hits, "the array bytes were not found verbatim: the storage format changed"


def _garble_json_item(d):
    (d / "data" / "metadata").write_text('{"next_index": 12')


def _remove_commit_marker(d):
    (d / "commit_success.txt").unlink()


CORRUPTIONS = {
    "truncated array files": (_truncate_array_files, "Error reading"),
    "deleted array files": (_delete_array_files, "Error reading"),
    "flipped bit": (_flip_bit_in_array_data, "checksum mismatch"),
    "garbled json": (_garble_json_item, "JSONDecodeError"),
    "no commit marker": (_remove_commit_marker, "commit_success.txt"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh8, caplog, name):
    corrupt, reason = CORRUPTIONS[name]
    save_steps(tmp_path, mesh8, [1, 2])
    corrupt(tmp_path / "2")
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        with caplog.at_level(logging.WARNING, logger="dsv3_jax.checkpoint"):
            step, restored, data_state, _ = ckpt.restore_latest(abstract_like(make_state(mesh8)))
        assert step == 1 and data_state == {"next_index": 1}
        assert_bit_equal(restored, make_state(mesh8, 1))
        warning = next(r.getMessage() for r in caplog.records if "step 2" in r.getMessage())
        assert reason in warning, warning
        # The bad step is set aside, not deleted, and the resumed run can write step 2 again.
        assert (tmp_path / "2.corrupt").is_dir() and ckpt.steps == [1]
        assert ckpt.save(2, make_state(mesh8, 2), data_state={"next_index": 2}, meta=META)
        ckpt.wait()
        assert ckpt.restore_latest(abstract_like(make_state(mesh8)))[0] == 2


def test_no_readable_checkpoint_raises_clear_error(tmp_path, mesh8):
    save_steps(tmp_path, mesh8, [1, 2])
    _delete_array_files(tmp_path / "1")
    _garble_json_item(tmp_path / "2")
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        with pytest.raises(RuntimeError, match="no readable checkpoint in") as info:
            ckpt.restore_latest(abstract_like(make_state(mesh8)))
    assert isinstance(info.value, CheckpointError)
    assert str(tmp_path) in str(info.value) and "step 1:" in str(info.value) and "step 2:" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing is moved when nothing restores


CHILD = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from dsv3_jax.checkpoint import Checkpointer
    big = lambda v: {"w": jnp.full((4096, 4096), v, jnp.float32)}  # 64 MB: the write takes a while
    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=3)
    ckpt.save(1, big(1.0), data_state={"next_index": 1}, meta={})
    ckpt.wait()
    print("saved", flush=True)
    for step in range(2, 1000):
        ckpt.save(step, big(float(step)), data_state={"next_index": step}, meta={})
""")


def test_kill_9_during_save_leaves_last_good_checkpoint(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"saved"
        deadline = time.monotonic() + 30
        while not any("orbax-checkpoint-tmp" in p for p in os.listdir(tmp_path)):  # a write under way
            assert time.monotonic() < deadline, "the child never started a second save"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    target = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        step, restored, data_state, _ = ckpt.restore_latest(target)
    assert data_state == {"next_index": step}
    np.testing.assert_array_equal(np.asarray(restored["w"])[::512, ::512], float(step))


def test_preemption_guard_sets_flag_and_restores_handlers():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.signum == signal.SIGTERM and guard.should_stop()
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still stops a stuck run
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGTERM)  # back to the handler installed before the guard
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("kind", ["Task", "Future"])
def test_aborted_orbax_reads_are_not_reported_twice(kind):
    """A failed restore's sibling reads end as never-retrieved asyncio exceptions raised inside
    orbax; those records are dropped (the restore already reported the failure in one line).
    The same message from any other code still gets through."""
    from dsv3_jax.checkpoint import _AbortedReadFilter

    def record_from(filename):
        ns = {}
        exec(compile("def boom():\n    import json\n    json.loads('')\n", filename, "exec"), ns)
        try:
            ns["boom"]()
        except ValueError:
            exc_info = sys.exc_info()
        return logging.LogRecord("asyncio", logging.ERROR, "x", 1, f"{kind} exception was never retrieved",
                                 None, exc_info)

    f = _AbortedReadFilter()
    assert not f.filter(record_from("/site-packages/orbax/checkpoint/_src/metadata/store.py"))
    assert f.filter(record_from("/home/user/my_code.py"))
