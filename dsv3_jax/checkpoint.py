"""Checkpoints of a training run: orbax's CheckpointManager plus the checks orbax does not make.

Directory layout (one subdirectory per kept step; orbax's default step naming):

    directory/
      <step>/                    finalized: orbax writes <step>.orbax-checkpoint-tmp-<ts>/, then
        commit_success.txt       writes this marker and renames the directory in one step
        _CHECKPOINT_METADATA
        state/                   StandardSave: the array pytree (OCDBT + zarr), any sharding
        data/metadata            JsonSave: the grain iterator state, e.g. {"next_index": 1234}
        meta/metadata            JsonSave: configs and anything else JSON the caller passes
        checksums/metadata       JsonSave: {leaf path: uint32 fingerprint} of `state`
      <step>.orbax-checkpoint-tmp-<ts>/   a write cut short by a crash: never listed as a step
      <step>.corrupt/            a step that failed to restore, set aside (not deleted) so that
                                 the run can save that step number again

Why the extra checks. A kill -9 mid-write leaves only a tmp directory, which orbax ignores. But
orbax trusts any directory named like a step, and tensorstore keeps no checksum of array
bytes: a flipped byte restores silently wrong values (tested). So a step is used only if it has
the commit marker, every item restores, and the restored arrays match the fingerprints taken at
save time. Otherwise `restore_latest` warns, falls back to the previous step, and finally raises
one `errors.CheckpointError` (a RuntimeError) naming the directory and every step's reason.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import sys
import traceback
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dsv3_jax.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # orbax's own marker (atomicity_types.COMMIT_SUCCESS_FILE)
ITEMS = ("state", "data", "meta", "checksums")


# ---- fingerprints -------------------------------------------------------------------------------
_MIX = np.uint32(0x9E3779B1)  # odd: index * _MIX differs for every index below 2^32


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Position-weighted sum of the raw bits mod 2^32, [] uint32.

    Every weight is odd, so any single flipped bit changes the sum; the weights differ by
    position, so moved elements almost always do too. Modular sums are exact and order-free: the
    value does not depend on the sharding, so it also checks a restore onto another mesh.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte types gain a [..., 2]
    weights = (jnp.arange(bits.size, dtype=jnp.uint32) * _MIX) | np.uint32(1)
    return jnp.sum(bits.reshape(-1) * weights, dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _devices(x) -> frozenset:
    sharding = getattr(x, "sharding", None)
    return frozenset(d.id for d in sharding.device_set) if sharding is not None else frozenset()


def fingerprints(state) -> dict[str, int]:
    """{leaf path (jax keystr): uint32 checksum} of every array in `state`.

    One jitted pass per set of devices: a jit cannot mix arrays committed to different devices
    (e.g. mesh-sharded params and a key left on device 0), and per-leaf jits would compile once
    for each of a big model's hundreds of leaves."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    groups: dict[frozenset, dict[str, Any]] = {}
    for path, x in flat:
        groups.setdefault(_devices(x), {})[jax.tree_util.keystr(path)] = x
    sums = {}
    for leaves in groups.values():
        sums.update(jax.device_get(_checksum_tree(leaves)))
    return {key: int(v) for key, v in sums.items()}


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs for `state`'s arrays, with `shardings` (a matching pytree) or their own."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def describe(e: BaseException) -> str:
    """One line for a log: orbax/tensorstore messages can span a page of spec JSON."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


# asyncio's message for a Task, Future or _GatheringFuture (gather's) whose exception nobody read
_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved")


def _from_orbax(tb) -> bool:
    return tb is not None and any("orbax" in f.filename for f in traceback.extract_tb(tb))


class _AbortedReadFilter(logging.Filter):
    """The aborted reads as asyncio reports them: when orbax's sibling read tasks of a failed restore
    are garbage-collected, asyncio logs 'Task (or Future, _GatheringFuture) exception was never
    retrieved' with their traceback. restore_latest has already reported the failure in one line,
    so drop exactly those records: the ones raised inside orbax."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _NEVER_RETRIEVED.match(record.getMessage()) and record.exc_info:
            return not _from_orbax(record.exc_info[2])
        return True


def _aborted_read(unraisable) -> bool:
    """An exception Python can only print ('Exception ignored in: ...') that a failed restore's
    aborted reads leave: orbax's read coroutines, closed when collected, re-raise the GeneratorExit
    as an Exception carrying a page of TensorStore spec each (thousands of lines for a small
    model), and tensorstore's late callbacks find orbax's event loop closed."""
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine being finalised
    return (code is not None and "orbax" in code.co_filename) or _from_orbax(unraisable.exc_traceback)


@contextlib.contextmanager
def quiet_aborted_reads(failures: list):
    """Contain a failed restore's noise to the restore itself. When a step fails to read, its sibling
    reads are abandoned mid-flight: tensorstore finishes them on its own threads, and the abandoned
    coroutines and tasks report their errors whenever the garbage collector reaches them (at exit
    if nothing else: after the run's one-line error). So after a failure this waits briefly for
    the stragglers, then collects the garbage *here*, with a hook for exactly those unraisables, a
    filter for exactly those asyncio records and one for 'coroutine ... was never awaited' warnings
    (reads cut off before they started) installed, and removes them all: nothing global stays
    behind (importing or using this module leaves the process's logging and hooks as they were)."""
    previous = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    log_filter = _AbortedReadFilter()

    def hook(unraisable):
        if not _aborted_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    asyncio_log.addFilter(log_filter)
    try:
        with warnings.catch_warnings():
            # read coroutines the failure cut off before they were scheduled
            warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
            try:
                yield
            finally:
                if failures:
                    time.sleep(0.25)
                    gc.collect()  # the abandoned reads are in reference cycles with their exceptions
    finally:
        asyncio_log.removeFilter(log_filter)
        sys.unraisablehook = previous


def read_meta(step_dir: str | os.PathLike):
    """A step directory's `meta` item as JSON (files only; raises OSError/ValueError if unreadable)."""
    return json.loads((pathlib.Path(step_dir) / "meta" / "metadata").read_text())


def latest_meta(directory: str | os.PathLike) -> tuple[int, dict | None] | None:
    """(step, meta) of the newest committed step, its `meta` item read as JSON (None when no committed
    step has a readable one); None when there is no committed step. Files only, no orbax manager:
    nothing is written, so a run can check a workdir before it touches it."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    steps = sorted((int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and (p / COMMIT_MARKER).exists()), reverse=True)
    for step in steps:
        try:
            meta = read_meta(directory / str(step))
        except (OSError, ValueError):  # unreadable: restore_latest will fall back past it too
            continue
        if isinstance(meta, dict):
            return step, meta
    return (steps[0], None) if steps else None


# ---- the checkpointer ---------------------------------------------------------------------------
class Checkpointer:
    """Save every `save_every` steps (or when forced), keep the newest `keep`, restore the newest
    readable one. Saves are asynchronous: `save` returns once the arrays are copied off the
    devices and orbax writes them in the background; `wait()` blocks until the write is committed.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ConfigError(f"Checkpointer save_every={save_every}: expected >= 1")
        if keep < 1:
            raise ConfigError(f"Checkpointer keep={keep}: expected >= 1")
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except Exception as e:
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {describe(e)}") from e

    @property
    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    @property
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int, force: bool = False) -> bool:
        latest = self.latest_step
        if latest is not None and step <= latest:  # e.g. a forced save right after the periodic one
            return False
        return force or step % self.save_every == 0

    def save(self, step: int, state, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Start saving `state` (a pytree of arrays) at `step` if it is due; True if started.

        `data_state` and `meta` must be JSON-serialisable; that is checked here, not later in
        orbax's background thread.
        """
        if not self.should_save(step, force):
            return False
        for name, item in (("data_state", data_state), ("meta", meta)):
            try:
                json.dumps(item)
            except (TypeError, ValueError) as e:
                raise TypeError(f"Checkpointer.save: {name} must be JSON-serialisable: {e}") from e
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
            checksums=ocp.args.JsonSave(fingerprints(state)),
        )
        try:
            # The due-or-not decision is ours (`should_save`), so orbax's own policy is bypassed.
            return bool(self._mngr.save(step, args=args, force=True))
        except Exception as e:
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {describe(e)}") from e

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable step, or None if there is none.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying the *target* shardings: the
        arrays are read straight into that layout, whatever mesh they were saved from. It may also be
        a function of a step's meta item returning that pytree, for states whose shapes the saving
        run chose (a pipeline's slot layout, `parallel/stages.py`).
        """
        self._mngr.wait_until_finished()  # a save still in flight would look uncommitted
        self._mngr.reload()
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        with quiet_aborted_reads(bad):
            for step in steps:
                try:
                    restored = self._restore_step(step, abstract_state)
                except Exception as e:  # anything unreadable is a reason to try the previous step
                    bad.append((step, describe(e)))
                    logger.warning("checkpoint step %d in %s is unusable (%s); trying an older step",
                                   step, self.directory, bad[-1][1])
                    continue
                if bad:
                    self._set_aside([s for s, _ in bad])
                return restored
        raise CheckpointError(f"no readable checkpoint in {self.directory}: "
                              + "; ".join(f"step {s}: {r}" for s, r in bad))

    def _restore_step(self, step: int, abstract_state):
        path = self.directory / str(step)
        if not (path / COMMIT_MARKER).exists():
            raise CheckpointError(f"{path} has no {COMMIT_MARKER}: the write never committed")
        if callable(abstract_state):
            abstract_state = abstract_state(read_meta(path))
        r = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
            checksums=ocp.args.JsonRestore(),
        ))
        got, want = fingerprints(r.state), r.checksums
        if not isinstance(want, dict) or set(got) != set(want):
            raise CheckpointError(f"checksums item does not list the state's {len(got)} arrays")
        wrong = [k for k in got if got[k] != want[k]]
        if wrong:
            raise CheckpointError(f"checksum mismatch in {len(wrong)} of {len(got)} arrays, e.g. {wrong[0]}")
        return step, r.state, r.data, r.meta

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unusable steps newer than the restored one to <step>.corrupt[-n]: kept for a
        post-mortem, out of orbax's step list, so the resumed run can save those steps again."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst, n = src.with_name(f"{step}.corrupt"), 1
                while dst.exists():
                    dst, n = src.with_name(f"{step}.corrupt-{n}"), n + 1
                if src.exists():
                    src.rename(dst)
                    logger.warning("moved unusable checkpoint %s to %s", src, dst.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dsv3_jax_checkpoint_set_aside")
        self._mngr.reload()

    def wait(self) -> None:
        """Block until the pending asynchronous save is committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
