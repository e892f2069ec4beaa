"""Training metrics: a JSONL log plus TensorBoard scalars (the FLOP count behind MFU is `dsv3_jax.flops`).

`workdir/metrics.jsonl` holds one JSON object per logged step, {"step": int, "time": unix s,
name: value, ...}; arrays (e.g. `expert_load` [L, E]) are nested lists. Each line is flushed as it
is written, so a kill loses nothing already logged. On resume, lines after the restored step
are dropped (they will be logged again), so the file never holds a step twice. TensorBoard gets
the scalar values under `workdir/tb/`, with a purge marker so that it, too, drops the replayed
steps.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """jax/numpy scalars and arrays -> Python numbers and nested lists for JSON."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_records(path: pathlib.Path) -> list[dict]:
    """All well-formed records; a torn last line from a kill mid-write is skipped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
    return records


class MetricsWriter:
    """Append per-step metrics to metrics.jsonl and TensorBoard.

    `resume_step`: the step of the checkpoint the run restored; records with a larger step are
    removed. None means a fresh run: records of an earlier run in this workdir are removed (with
    a warning), since without a checkpoint its steps will all be redone. Only process 0 writes.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._file = self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(-1 if resume_step is None else resume_step)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
        # purge_step: TensorBoard discards the events at or after it that earlier runs wrote here.
        purge = 0 if resume_step is None else resume_step + 1
        # The suffix keeps two writers within one second (file names hold whole seconds) apart.
        self._tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=purge, flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}")

    def _truncate(self, keep_until: int) -> None:
        if not self.path.exists():
            return
        records = read_records(self.path)
        kept = [r for r in records if r["step"] <= keep_until]
        if len(kept) < len(records):
            logger.warning("%s: dropping %d records after step %d (they will be logged again)",
                           self.path, len(records) - len(kept), keep_until)
        # Write a new file and rename it over the old one: a kill here loses no kept record.
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log `metrics` ({name: number or array}) at `step`: one JSONL line, scalars also to TB."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(name, value, global_step=record["step"])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
