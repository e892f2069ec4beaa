"""Training metrics: a JSONL log plus TensorBoard scalars, and the FLOP count behind MFU.

`workdir/metrics.jsonl` holds one JSON object per logged step, {"step": int, "time": unix s,
name: value, ...}; arrays (e.g. `expert_load` [L, E]) are nested lists. Each line is flushed as it
is written, so a kill loses nothing already logged. On resume, lines after the restored step
are dropped (they will be logged again), so the file never holds a step twice. TensorBoard gets
the scalar values under `workdir/tb/`, with a purge marker so that it, too, drops the replayed
steps.

FLOPs per token (training = forward + backward = 3x forward):
    6 x (activated matmul parameters)  +  3 x 2 x H x (qk_head_dim + v_head_dim) x ctx per layer
where ctx = (S+1)/2 keys per query under the causal mask (mean over positions 1..S). Matmul
parameters are the ones a token really meets: MLA's wq_a/wq_b (or wq), wkv_a, wkv_b, wo; dense
SwiGLU; K routed + shared experts and the gate in MoE layers; the output head; each MTP module's
eh_proj, block and its pass through the shared head. The embedding is a lookup, not a matmul.
This is the convention of the DeepSeek-V3 "Insights" paper (Table 2: 250 GFLOP/token at 4096);
norms, softmax and activations are left out (well under 1%).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig

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


# ---- FLOPs and MFU ----------------------------------------------------------------------------
def attention_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one MLA layer: the query path, wkv_a, wkv_b and wo."""
    H, D = cfg.n_heads, cfg.dim
    if cfg.q_lora_rank:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = D * H * cfg.qk_head_dim
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv_a + kv_b + H * cfg.v_head_dim * D


def ffn_matmul_params(cfg: ModelConfig, moe: bool) -> int:
    """Weights one token meets in a layer's FFN: SwiGLU is 3 matrices; MoE adds the gate."""
    if not moe:
        return 3 * cfg.dim * cfg.inter_dim
    experts = cfg.n_activated_experts + cfg.n_shared_experts
    return 3 * cfg.dim * cfg.moe_inter_dim * experts + cfg.n_routed_experts * cfg.dim


def activated_matmul_params(cfg: ModelConfig, *, include_mtp: bool = True) -> int:
    """Matmul weights applied to each token (a weight used twice, like the head, counts twice)."""
    head = cfg.vocab_size * cfg.dim
    n = cfg.n_layers * attention_matmul_params(cfg) + head
    n += cfg.n_dense_layers * ffn_matmul_params(cfg, moe=False)
    n += cfg.n_moe_layers * ffn_matmul_params(cfg, moe=True)
    if include_mtp:
        mtp = (2 * cfg.dim * cfg.dim + attention_matmul_params(cfg)
               + ffn_matmul_params(cfg, moe=cfg.n_routed_experts > 0) + head)
        n += cfg.n_mtp_modules * mtp
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, *, include_mtp: bool = True, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`; see the module docstring."""
    ctx = (seq_len + 1) / 2 if causal else seq_len
    attn_layers = cfg.n_layers + (cfg.n_mtp_modules if include_mtp else 0)
    scores = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx  # QK^T and PV, forward
    return 6.0 * activated_matmul_params(cfg, include_mtp=include_mtp) + 3.0 * attn_layers * scores


def measure_peak_flops(dtype=jnp.bfloat16, *, n: int | None = None, min_seconds: float = 0.2) -> float:
    """FLOP/s of a chain of [n, n] matmuls on the default device: an achievable peak, a little
    below the datasheet, which makes MFU against it a fair "how much is left" figure."""
    device = jax.devices()[0]
    if n is None:
        n = 512 if device.platform == "cpu" else 8192
    reps = 8

    @jax.jit
    def chain(a, b):
        # A true dependency chain of `reps` matmuls in one program: no per-call dispatch cost.
        return jax.lax.fori_loop(0, reps, lambda _, x: (x @ b).astype(dtype), a)

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = (jax.random.normal(key_b, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)  # keeps |x| ~ 1
    chain(a, b).block_until_ready()  # compile and warm up
    calls, start = 0, time.perf_counter()
    while True:
        chain(a, b).block_until_ready()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * reps * 2.0 * n ** 3 / elapsed


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over `peak` FLOP/s per device x devices."""
    return tokens_per_s * flops_per_token / (peak * n_devices)
