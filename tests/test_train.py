"""train.py end to end: bad configs, exact resume, kill -9, corrupt checkpoints, a different mesh.

Each case runs train.py in a subprocess on the tiny config. A persistent compilation cache
shared by the runs keeps the repeated compiles cheap.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["configs/tiny.gin"]
FAST = ["TrainConfig.sample_tokens = 0", "TrainConfig.eval_every = 1000", "TrainConfig.log_every = 1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def run(workdir, *bindings, cache=None, devices=None, check=True, wait=True, gin_files=BASE, flags=()):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the device count is train.py's flag, not the test process's
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "train.py", "--workdir", str(workdir)]
    for f in gin_files:
        cmd += ["--gin_file", f]
    for b in (*FAST, *bindings):
        cmd += ["--gin_bindings", b]
    if devices:
        cmd += ["--num_cpu_devices", str(devices)]
    cmd += list(flags)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(workdir):
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs}


def final_params(workdir):
    from orbax.checkpoint import PyTreeCheckpointer
    ckdir = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    tree = PyTreeCheckpointer().restore(os.path.join(ckdir, str(step), "state"))
    return step, tree["params"]


def assert_same_tree(a, b):
    import jax
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted 8-step run, checkpoints every 2 steps."""
    wd = tmp_path_factory.mktemp("ref")
    run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", cache=cache)
    return wd


@pytest.mark.slow
def test_resumed_run_is_bit_identical(reference, tmp_path, cache):
    wd = tmp_path / "resumed"
    run(wd, "train.num_steps = 5", "TrainConfig.checkpoint_every = 2", cache=cache)  # saves 2, 4, 5
    out = run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", cache=cache)
    assert "resumed from step 5" in out.stderr
    assert losses(wd) == losses(reference)  # same per-step losses, no duplicates
    assert_same_tree(final_params(wd)[1], final_params(reference)[1])


@pytest.mark.slow
def test_kill_9_loses_steps_not_checkpoints(reference, tmp_path, cache):
    wd = tmp_path / "killed"
    proc = run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", cache=cache, wait=False)
    ckdir = wd / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckdir.exists() and any(d.isdigit() and int(d) >= 4 for d in os.listdir(ckdir))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", cache=cache)
    assert losses(wd) == losses(reference)
    assert_same_tree(final_params(wd)[1], final_params(reference)[1])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, cache):
    wd = tmp_path / "corrupt"
    shutil.copytree(reference, wd)
    latest = wd / "checkpoints" / "8"
    for root, _, files in os.walk(latest / "state"):  # destroy the array data of the newest step
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").close()
    out = run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", cache=cache)
    assert "step 8" in out.stderr and "unusable" in out.stderr
    assert "resumed from step 6" in out.stderr
    assert "Traceback" not in out.stderr
    assert_same_tree(final_params(wd)[1], final_params(reference)[1])


DUALPIPEV = ["MeshConfig.data = 1", "MeshConfig.pipeline = 2", "MeshConfig.expert = 2", "ModelConfig.moe_impl = 'ep'",
             "TrainConfig.pipeline_schedule = 'dualpipev'", "TrainConfig.pipeline_microbatches = 4"]


@pytest.mark.slow
def test_resume_into_a_dualpipev_slot_layout_equals_the_uninterrupted_run(reference, tmp_path, cache):
    """The single-device run's step 6, resumed on DualPipeV over 2 ranks x 2 experts (4 devices; the
    2 MoE layers in the V's 4 stages are uneven, so the state keeps them in slots [N C Lm]): the
    resume converts the layout, steps 7 and 8 have the uninterrupted run's losses, the checkpoint
    records its layout and inference reads the slots back in layer order."""
    from dsv3_jax.infer.load import load_for_inference
    from dsv3_jax.parallel import stages as st
    wd = tmp_path / "dualpipev"
    shutil.copytree(reference, wd)
    shutil.rmtree(wd / "checkpoints" / "8")
    out = run(wd, "train.num_steps = 8", "TrainConfig.checkpoint_every = 2", *DUALPIPEV, cache=cache, devices=4)
    assert "resumed from step 6" in out.stderr and "stage layout None as StageLayout" in out.stderr
    got, ref = losses(wd), losses(reference)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[k] for k in (7, 8)], [ref[k] for k in (7, 8)], rtol=2e-5)
    step, saved = final_params(wd)
    layout = st.saved_layout(json.load(open(wd / "checkpoints" / str(step) / "meta" / "metadata")))
    assert step == 8 and layout is not None and not layout.identity and layout.chunks == 2
    model, _ = load_for_inference(str(wd))
    want = st.from_slots(saved, layout)["moe_layers"]["blocks"]["ffn"]["experts"]["w1"]["value"]
    np.testing.assert_array_equal(np.asarray(model.moe_layers.blocks.ffn.experts.w1[...]), np.asarray(want))


@pytest.mark.slow
def test_dry_run_reports_memory_and_writes_the_operative_config(tmp_path, cache):
    """train.py --dry_run compiles the step for the mesh without allocating the model: DualPipeV
    over 2 MoE layers on 2 ranks (4 uneven stages), per-device memory with the pipeline's stash."""
    wd = tmp_path / "dry"
    out = run(wd, *DUALPIPEV, cache=cache, devices=4, flags=["--dry_run"])  # the step the resume test compiles
    assert "per-device total: " in out.stdout and "5 stage inputs + 2 output gradients" in out.stdout, out.stdout
    total = float(out.stdout.split("per-device total: ")[1].split(" GiB")[0])
    assert 0 < total < 1
    assert "pipeline_schedule = 'dualpipev'" in (wd / "config.gin").read_text()
    assert not (wd / "checkpoints").exists()


@pytest.mark.parametrize("binding,message", [
    ("TrainConfig.batch_sizee = 4", "batch_sizee"),  # a typo
    ("NoSuchThing.x = 1", "NoSuchThing"),  # an unknown configurable
    ("MeshConfig.data = 3", "MeshConfig data=3"),  # a mesh the devices cannot form
    ("ModelConfig.n_expert_groups = 3", "n_expert_groups"),  # an invalid model
])
def test_bad_config_exits_with_a_clear_message_before_compiling(tmp_path, binding, message):
    out = run(tmp_path / "bad", binding, check=False)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_missing_required_value_is_reported(tmp_path):
    out = run(tmp_path / "req", check=False, gin_files=["configs/base.gin", "configs/model/tiny.gin"])
    assert out.returncode != 0 and "num_steps" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_infer_decodes_from_a_training_workdir(reference):
    from dsv3_jax.infer.load import load_for_inference
    model, tokenizer = load_for_inference(str(reference))
    _, params = final_params(reference)
    np.testing.assert_array_equal(np.asarray(model.head[...]), np.asarray(params["head"]["value"]))
    assert tokenizer is not None and tokenizer.vocab_size <= model.cfg.vocab_size
    out = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(reference), "--prompt", "def ",
                          "--max_new_tokens", "4", "--temperature", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 tokens" in out.stderr and "tokens/s" in out.stderr


def _destroy_arrays(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").close()


@pytest.mark.slow
def test_no_readable_checkpoint_stops_with_a_clear_message(reference, tmp_path, cache):
    wd = tmp_path / "all_corrupt"
    shutil.copytree(reference, wd)
    for d in (wd / "checkpoints").iterdir():
        if d.name.isdigit():
            _destroy_arrays(d)
    out = run(wd, "train.num_steps = 8", cache=cache, check=False)
    assert out.returncode == 1 and "no readable checkpoint" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_infer_falls_back_past_a_corrupt_step_and_changes_nothing(reference, tmp_path):
    """infer.py --checkpoint restores through the checks training makes (commit marker, checksums),
    warns in one line and uses the previous step, and leaves the workdir as it found it."""
    wd = tmp_path / "infer_corrupt"
    shutil.copytree(reference, wd)
    newest = max(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    _destroy_arrays(wd / "checkpoints" / str(newest))
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(wd), "--prompt", "def ",
                          "--max_new_tokens", "2", "--temperature", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"step {newest}" in out.stderr and "unusable" in out.stderr and "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == before
