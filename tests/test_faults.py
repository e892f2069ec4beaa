"""Fault injection against train.py: every bad input is one clear line, and nothing a user does loses a run.

Each case asserts the exit status (0 done, 1 runtime error, 2 usage error, 130/143 stopped by
SIGINT/SIGTERM; dsv3_jax/train/main.py's docstring), that no traceback is printed, that the
message names the value, and, where nothing should change, that every file of the workdir is
byte-identical afterwards. Cases that fail before any model work call `main([...])` in-process
(milliseconds); the rest run train.py in a subprocess on the tiny config, sharing one trained
workdir and one compilation cache (`slow`).

The cases, with what train.py did before this suite (commit c52cf4f) and what it does now:

  class           case                                      before -> after
  config types    TrainConfig.batch_size = '8' / 8.0        TypeError traceback, 1 -> 2, "TrainConfig.batch_size='8':
                                                            expected an int, got str"
                  ModelConfig.fp8 = 1, sources = 5, ...     accepted, or a TypeError traceback -> 2, names the field,
                                                            the value and the expected type
  config ranges   OptimConfig.b1 = 1.5, eps = 0, wd < 0     trained on (b1 = 1.5: exit 0) -> 2, names field and range
                  TrainConfig eval_batches, mtp_lambda(_late), sample_tokens < 0; ModelConfig norm_eps,
                  route_scale, init_std, rope_theta <= 0, original_seq_len < 1: unchecked -> 2
                  train.num_steps = 0                       exit 0, nothing done, silently -> 2
  gin, flags      binding syntax error / unclosed bracket   a line without the binding / TokenError traceback -> 2,
                                                            names the binding
                  missing gin file                          gin's own "ERROR:root" line, then the message -> 2, one line
                  missing include                           TypeError traceback from gin's package lookup -> 2, names
                                                            the include and the file including it
                  --num_cpu_devices -1                      XLA "vector::reserve" traceback, 1 -> 2
  data files      negative token ids in a .npy              ValueError traceback (bincount), 1 -> 1, "holds token id -5"
                  tokenizer_path not a tokenizer.json       bare Exception traceback, 1 -> 1, names the file
                  val_fraction = 0 / eval_batches = 0       IndexError at the first evaluation, before that step's save:
                                                            the work lost -> 0, trains and saves, "no evaluation" once
  workdir states  a file, or under a file                   FileExistsError traceback -> 2, one line
                  not writable                              PermissionError traceback -> 2 (through os.access: root
                                                            writes anyway)
  checkpoints     truncated newest step                     clean fallback -> the same, still <= 6 lines
                  a restore failing mid-read (configs lost  ~3500 lines: 54 orbax coroutine tracebacks at exit
                  from the meta, another vocab_size)        -> 1, "no readable checkpoint", 3 lines
                  no readable step (tests/test_train.py)    2 -> 1 (a runtime error)
  resume changes  ModelConfig.vocab_size 512 -> 1024        tokenizer.json retrained and config.gin overwritten, then
                                                            3500 lines -> 2, names the field, workdir unchanged
                  ModelConfig.n_layers 3 -> 2               263 lines, 4 tracebacks, config.gin overwritten -> 2, same
                  batch size, routing, optimizer, data      resumed silently under the new values -> 2 unless
                                                            --allow_config_change; then a warning and config_changes
                                                            in the new checkpoints' meta
                  DataConfig.corpus_max_bytes (flagged)     tokenizer retrained under the trained model -> kept
  signals         Ctrl-C / SIGTERM during start-up          KeyboardInterrupt traceback / silent death (-15) -> 130 /
                                                            143, one line, nothing saved
                  SIGTERM / SIGINT mid-run                  saved, then exit 0 and the sample -> saved, 143 / 130,
                                                            no sample
  finished runs   the same command again                    0 after a reload, config.gin and metrics rewritten -> 0,
                                                            "already at step 2", workdir unchanged
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.data import DataConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.train import config as run_config
from dsv3_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from dsv3_jax.train.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin_file", "configs/tiny.gin"]
# What the subprocess runs share: 2 checkpointed steps, no evaluation unless asked, no sample.
RUN = ["train.num_steps = 2", "TrainConfig.checkpoint_every = 1", "TrainConfig.eval_every = 1000",
       "TrainConfig.sample_tokens = 0"]


def flags(*bindings):
    return [a for b in bindings for a in ("--gin_bindings", b)]


def snapshot(workdir) -> dict[str, str]:
    """{relative path: sha256} of every file under `workdir` (empty if it does not exist)."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def in_process(capsys, *argv) -> tuple[int, str]:
    """main(argv) in this process -> (exit status, stderr). For failures before any model work."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # gin file paths are relative to the repository
    try:
        status = main(list(argv))
    finally:
        os.chdir(cwd)
    return status, capsys.readouterr().err


def assert_one_line(err: str, *needles: str, prefix: str = "error: ") -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def train_py(workdir, *bindings, extra=(), cache=None, wait=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one device: the tiny config's default mesh
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "train.py", "--workdir", str(workdir), *TINY, *flags(*RUN, *bindings), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# ---- config types and ranges: one line, exit 2, nothing written ----------------------------------
BAD_VALUES = [
    ("TrainConfig.batch_size = '8'", "TrainConfig.batch_size='8': expected an int, got str"),
    ("TrainConfig.batch_size = 8.0", "TrainConfig.batch_size=8.0: expected an int, got float"),
    ("MeshConfig.data = True", "MeshConfig.data=True: expected an int, got bool"),
    ("ModelConfig.fp8 = 1", "ModelConfig.fp8=1: expected True or False"),
    ("ModelConfig.rope_theta = '1e4'", "ModelConfig.rope_theta='1e4': expected a number, got str"),
    ("OptimConfig.peak_lr = None", "OptimConfig.peak_lr=None: expected a number"),
    ("DataConfig.sources = 5", "DataConfig.sources=5: expected a list of strings"),
    ("DataConfig.tokenizer_path = 3", "DataConfig.tokenizer_path=3: expected a string or None"),
    ("OptimConfig.b1 = 1.5", "OptimConfig.b1=1.5: expected 0 <= b1 < 1"),
    ("OptimConfig.eps = 0", "OptimConfig.eps=0.0: expected > 0"),
    ("OptimConfig.weight_decay = -0.1", "OptimConfig.weight_decay=-0.1: expected >= 0"),
    ("TrainConfig.eval_batches = -1", "TrainConfig.eval_batches=-1: expected >= 0"),
    ("TrainConfig.mtp_lambda = -0.3", "TrainConfig.mtp_lambda=-0.3: expected >= 0"),
    ("TrainConfig.mtp_lambda_late = -1", "TrainConfig.mtp_lambda_late=-1.0: expected >= 0"),
    ("TrainConfig.sample_tokens = -1", "TrainConfig.sample_tokens=-1: expected >= 0"),
    ("ModelConfig.norm_eps = 0", "ModelConfig.norm_eps=0.0: expected > 0"),
    ("ModelConfig.route_scale = 0", "ModelConfig.route_scale=0.0: expected > 0"),
    ("ModelConfig.init_std = -0.01", "ModelConfig.init_std=-0.01: expected > 0"),
    ("ModelConfig.rope_theta = 0", "ModelConfig.rope_theta=0.0: expected > 0"),
    ("ModelConfig.original_seq_len = 0", "ModelConfig.original_seq_len=0: expected a positive integer"),
    ("train.num_steps = 0", "train.num_steps=0: expected a positive integer"),
    ("train.num_steps = '10'", "train.num_steps='10': expected a positive integer"),
]


@pytest.mark.parametrize("binding,message", BAD_VALUES, ids=[b for b, _ in BAD_VALUES])
def test_bad_config_value_is_one_line_and_exit_2(capsys, tmp_path, binding, message):
    status, err = in_process(capsys, "--workdir", str(tmp_path / "wd"), *TINY, *flags(binding))
    assert status == 2
    assert_one_line(err, message)
    assert not (tmp_path / "wd").exists()


CONFIGS = (ModelConfig, MeshConfig, OptimConfig, TrainConfig, DataConfig)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_type_checked(cls):
    """Each field of each config against its annotation: ints reject strings, floats and bools;
    floats accept ints (stored as float); bools reject 1; strings reject numbers."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        wrong = {bool: [1, "True"], int: ["1", 1.5, True], float: ["1.0", True],
                 str: [1]}.get(type(value), [])
        for bad in wrong:
            with pytest.raises(ConfigError, match=f"{cls.__name__}.{f.name}="):
                cls(**{f.name: bad})
        if type(value) is float:
            ok = cls(**{f.name: int(value)}) if value == int(value) else None
            assert ok is None or type(getattr(ok, f.name)) is float
        if type(value) is int:  # numpy integers are ints, stored as Python ints (JSON-serialisable)
            assert type(getattr(cls(**{f.name: np.int64(value)}), f.name)) is int


# ---- gin files, bindings and flags: usage errors, exit 2 ------------------------------------------
def test_gin_syntax_errors_name_the_binding(capsys, tmp_path):
    status, err = in_process(capsys, "--workdir", str(tmp_path), *TINY, *flags("TrainConfig.batch_size = = 3"))
    assert status == 2
    assert_one_line(err, "Unable to parse value", "'TrainConfig.batch_size = = 3'")
    status, err = in_process(capsys, "--workdir", str(tmp_path), *TINY, *flags("TrainConfig.batch_size = (3"))
    assert status == 2
    assert_one_line(err, "unclosed bracket")


def test_a_typo_in_a_gin_file_names_its_line(capsys, tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("include 'configs/tiny.gin'\nTrainConfig.batch_sizze = 3\n")
    status, err = in_process(capsys, "--workdir", str(tmp_path / "wd"), "--gin_file", str(f))
    assert status == 2
    assert_one_line(err, "batch_sizze", f"{f} line 2")


def test_missing_gin_file_and_include(capsys, tmp_path):
    status, err = in_process(capsys, "--workdir", str(tmp_path / "wd"), "--gin_file", "configs/nope.gin")
    assert status == 2
    assert_one_line(err, "'configs/nope.gin' does not exist")
    f = tmp_path / "run.gin"
    f.write_text("include 'configs/tiny.gin'\ninclude 'configs/model/nope.gin'\n")
    status, err = in_process(capsys, "--workdir", str(tmp_path / "wd"), "--gin_file", str(f))
    assert status == 2
    assert_one_line(err, "'configs/model/nope.gin'", f"included by '{f}'")
    assert not (tmp_path / "wd").exists()


def test_bad_device_count_flag_through_train_py(tmp_path):
    """The whole path of a usage error through the script: exit 2, one line."""
    out = train_py(tmp_path / "wd", extra=["--num_cpu_devices", "-1"])
    assert out.returncode == 2
    assert_one_line(out.stderr, "--num_cpu_devices=-1")
    assert not (tmp_path / "wd").exists()


# ---- workdir states ---------------------------------------------------------------------------
ON_8 = flags("MeshConfig.data = 8")  # in-process runs see conftest's 8 devices


def test_workdir_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a run")
    status, err = in_process(capsys, "--workdir", str(f), *TINY, *ON_8)
    assert status == 2
    assert_one_line(err, f"--workdir '{f}' is a file")
    status, err = in_process(capsys, "--workdir", str(f / "sub"), *TINY, *ON_8)
    assert status == 2
    assert_one_line(err, f"'{f}' is a file")
    assert f.read_text() == "not a run"


def test_workdir_that_is_not_writable(capsys, tmp_path, monkeypatch):
    wd = tmp_path / "ro"
    wd.mkdir()
    real = os.access
    # chmod cannot show it when the tests run as root (root writes anyway): os.access is what is asked
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(wd) else real(p, mode, **kw))
    status, err = in_process(capsys, "--workdir", str(wd), *TINY, *ON_8)
    assert status == 2
    assert_one_line(err, f"'{wd}' is not writable")
    assert os.listdir(wd) == []


# ---- data files: runtime errors, exit 1 -------------------------------------------------------------
def test_negative_token_ids(tmp_path):
    tokens = np.arange(4000, dtype=np.int32) % 500
    tokens[100] = -5
    np.save(tmp_path / "tokens.npy", tokens)
    out = train_py(tmp_path / "wd", f"DataConfig.sources = ['{tmp_path / 'tokens.npy'}']")
    assert out.returncode == 1
    assert_one_line(out.stderr, "tokens.npy", "holds token id -5")


def test_tokenizer_file_that_is_not_one(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    out = train_py(tmp_path / "wd", f"DataConfig.tokenizer_path = '{bad}'")
    assert out.returncode == 1
    assert_one_line(out.stderr, str(bad))


# ---- the trained workdir the slow cases share -----------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """2 steps, both checkpointed, with eval_batches = 0 (which used to crash before the first save).
    -> (workdir, the run's stderr). Tests copy it before changing anything."""
    wd = tmp_path_factory.mktemp("trained") / "wd"
    out = train_py(wd, "TrainConfig.eval_every = 1", "TrainConfig.eval_batches = 0", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, out.stderr


def copy_of(trained, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(trained[0], wd)
    return wd


SAME = ("TrainConfig.eval_every = 1", "TrainConfig.eval_batches = 0")  # the fixture's own bindings


@pytest.mark.slow
def test_eval_batches_0_trains_and_saves(trained):
    wd, err = trained
    assert err.count("no evaluation: TrainConfig.eval_batches = 0") == 1
    assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
def test_val_fraction_0_trains_and_saves(tmp_path, cache):
    out = train_py(tmp_path / "wd", "TrainConfig.eval_every = 1", "DataConfig.val_fraction = 0", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("no evaluation: DataConfig.val_fraction = 0.0 holds out no validation data") == 1
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == ["1", "2"]


# ---- finished runs ------------------------------------------------------------------------------
@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(trained, tmp_path, cache):
    wd = copy_of(trained, tmp_path)
    before = snapshot(wd)
    out = train_py(wd, *SAME, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "already at step 2 (train.num_steps = 2)" in out.stderr and "Traceback" not in out.stderr
    assert snapshot(wd) == before


# ---- resume with changed configs ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("binding,message", [
    ("ModelConfig.vocab_size = 1024", "ModelConfig.vocab_size 512 -> 1024"),  # used to retrain the tokenizer
    ("ModelConfig.n_layers = 2", "ModelConfig.n_layers 3 -> 2"),
])
def test_architecture_change_stops_and_changes_nothing(trained, tmp_path, binding, message):
    wd = copy_of(trained, tmp_path)
    before = snapshot(wd)
    out = train_py(wd, *SAME, "train.num_steps = 3", binding, extra=["--allow_config_change"])
    assert out.returncode == 2
    assert_one_line(out.stderr, message, "another architecture")
    assert snapshot(wd) == before  # tokenizer.json and config.gin included


@pytest.mark.slow
def test_run_change_needs_the_flag_and_is_recorded(trained, tmp_path, cache):
    wd = copy_of(trained, tmp_path)
    before = snapshot(wd)
    change = ("train.num_steps = 3", "DataConfig.corpus_max_bytes = 2097152", "TrainConfig.batch_size = 4")
    out = train_py(wd, *SAME, *change)
    assert out.returncode == 2
    assert_one_line(out.stderr, "DataConfig.corpus_max_bytes 1048576 -> 2097152", "TrainConfig.batch_size 8 -> 4",
                    "--allow_config_change")
    assert snapshot(wd) == before

    # with the flag: the same parameters go on under the new data; a new corpus size would retrain a
    # tokenizer that is not there yet, but never the one these checkpoints were trained with
    out = train_py(wd, *SAME, *change[:2], extra=["--allow_config_change"], cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warning: --allow_config_change: resuming step 2 with DataConfig.corpus_max_bytes 1048576 -> 2097152" \
        in out.stderr and "Traceback" not in out.stderr
    after = snapshot(wd)
    assert after["tokenizer.json"] == before["tokenizer.json"]
    meta = json.loads((wd / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["config_changes"] == [{"step": 2, "changes": ["DataConfig.corpus_max_bytes 1048576 -> 2097152"]}]
    assert meta["data"]["corpus_max_bytes"] == 2097152


def test_every_config_field_has_one_resume_class():
    """Every field of every config is in exactly one class of train/config.py's resume table."""
    for section, cls in (("model", ModelConfig), ("run", TrainConfig), ("mesh", MeshConfig),
                         ("optim", OptimConfig), ("data", DataConfig)):
        names = [f.name for f in dataclasses.fields(cls)]
        classed = [*run_config.ARCHITECTURE.get(section, ()), *run_config.RUN.get(section, ()),
                   *run_config.FREE.get(section, ())]
        assert sorted(classed) == sorted(names), (section, set(names) ^ set(classed))


def test_config_changes_compare_as_stored():
    saved = {"model": {"dim": 64, "moe_impl": "ragged"}, "data": {"sources": ["a.txt"]}}
    new = {"model": {"dim": 64, "moe_impl": "ep", "attn_impl": "reference"}, "data": {"sources": ("a.txt",)},
           "mesh": {"data": 2}}
    assert run_config.config_changes(saved, new) == ([], [])  # free fields, tuples as lists, unknown fields
    new["model"]["dim"], new["data"]["sources"] = 128, ("b.txt",)
    assert run_config.config_changes(saved, new) == (["ModelConfig.dim 64 -> 128"],
                                                     ["DataConfig.sources ['a.txt'] -> ['b.txt']"])


# ---- checkpoint corruption ----------------------------------------------------------------------
def _array_files(step_dir):
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
            if os.path.basename(r) == "d"]


@pytest.mark.slow
def test_truncated_newest_step_falls_back_in_a_few_lines(trained, tmp_path, cache):
    wd = copy_of(trained, tmp_path)
    for f in _array_files(wd / "checkpoints" / "2"):
        os.truncate(f, os.path.getsize(f) // 2)
    out = train_py(wd, *SAME, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2" in out.stderr and "unusable" in out.stderr and "resumed from step 1" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 6, out.stderr[-3000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2", "2.corrupt"]


@pytest.mark.slow
def test_a_restore_that_fails_mid_read_is_one_line(trained, tmp_path):
    """Configs lost from the meta (nothing to compare), restored into another vocabulary: every
    step fails while its sibling reads are in flight. orbax's aborted coroutines used to print
    ~3500 lines of tracebacks at exit; now: exit 1, one error line after one warning per step."""
    wd = copy_of(trained, tmp_path)
    for step in ("1", "2"):
        (wd / "checkpoints" / step / "meta" / "metadata").write_text("{}")
    before = snapshot(wd)
    out = train_py(wd, *SAME, "ModelConfig.vocab_size = 1024")
    assert out.returncode == 1
    assert "error: no readable checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) <= 4, out.stderr[-3000:]
    assert snapshot(wd) == before


def test_a_failed_restore_leaves_no_hook_or_filter_behind(tmp_path):
    """The noise is contained inside restore_latest: no asyncio filter, warnings filter or unraisable
    hook stays behind."""
    import warnings
    import jax
    import jax.numpy as jnp
    from dsv3_jax.checkpoint import Checkpointer
    from dsv3_jax.errors import CheckpointError
    hook, filters, warning_filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters), warnings.filters[:]
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, {"w": jnp.ones((8, 4))}, data_state={}, meta={})
        ckpt.wait()
        with pytest.raises(CheckpointError, match="no readable checkpoint"):
            ckpt.restore_latest({"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)})
    assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == filters
    assert warnings.filters == warning_filters


def test_gather_futures_of_aborted_reads_are_dropped_too():
    """asyncio names the class: gather's _GatheringFuture of a failed restore's reads, raised inside
    orbax, is dropped like a Task's; from other code it gets through."""
    from dsv3_jax.checkpoint import _AbortedReadFilter

    def record_from(filename):
        ns = {}
        exec(compile("def boom():\n    raise ValueError('shape')\n", filename, "exec"), ns)
        try:
            ns["boom"]()
        except ValueError:
            exc_info = sys.exc_info()
        return logging.LogRecord("asyncio", logging.ERROR, "x", 1,
                                 "_GatheringFuture exception was never retrieved\nfuture: <...>", None, exc_info)

    f = _AbortedReadFilter()
    assert not f.filter(record_from("/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
    assert f.filter(record_from("/home/user/my_code.py"))


# ---- signals ------------------------------------------------------------------------------------
def _signal_when(proc, path, sig, timeout=300):
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert time.time() < deadline and proc.poll() is None, "the run never got there"
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.communicate(timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_start_up_exits_quietly(tmp_path, sig, status):
    wd = tmp_path / "wd"
    proc = train_py(wd, wait=False)
    out, err = _signal_when(proc, wd / "tokenizer.json", sig)  # written before the model is built
    assert proc.returncode == status
    assert_one_line(err, "stopped without saving", prefix=f"interrupted ({sig.name})")
    assert not (wd / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_saves_then_exits_with_its_status(tmp_path, cache, sig, status):
    wd = tmp_path / "wd"
    proc = train_py(wd, "train.num_steps = 1000", "TrainConfig.checkpoint_every = 1000",
                    "TrainConfig.sample_tokens = 4", cache=cache, wait=False)
    out, err = _signal_when(proc, wd / "metrics.jsonl", sig)  # after the first step
    assert proc.returncode == status, err[-3000:]
    assert f"{sig.name} received: saved step" in err and "Traceback" not in err
    saved = int(err.split("saved step ")[1].split(";")[0])
    assert os.listdir(wd / "checkpoints") == [str(saved)]
    assert "sample" not in out
