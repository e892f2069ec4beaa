"""`Engine` and `generate(model, prompts, ...)`: batched generation with a latent cache, optional MTP
speculation and optional prefill/decode disaggregation (the compiled programs are `programs.py`).

Prompts are right-padded into a [B, S] batch (S rounded up to a multiple of 16 so few prompt
lengths compile), prefilled in chunks of `prefill_batch_size`, handed to the decode batch and
decoded K steps per dispatch (`programs.decode`) until every sequence has hit EOS or its token
budget. The host loop keeps one dispatch in flight: it sends dispatch i+1 before reading dispatch
i's tokens, so the device does not wait for Python between them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv3_jax.infer import programs
from dsv3_jax.infer.sampling import RowSampling, SamplingConfig
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import batch_sharding
from dsv3_jax.errors import ConfigError

PROMPT_BUCKET = 16  # prompt lengths are padded to a multiple of this
CACHE_BUCKET = 64  # cache lengths likewise
STEPS_PER_DISPATCH = 8  # decode steps per dispatch: host work paid once per 8 steps


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_tokens: int = 0  # of which sampled by prefill (one per sequence)
    prefill_s: float = 0.0  # prefill and hand-off (compilation included on a first call)
    decode_s: float = 0.0
    steps: int = 0  # decode steps run (each one a verification when speculating)
    sequence_steps: int = 0  # (sequence, step) pairs where the sequence was active
    drafted: int = 0
    accepted: int = 0
    step_s: list[float] = dataclasses.field(default_factory=list)  # per step: its dispatch's host time / its steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence gains per verification step (1 without speculation)."""
        return (self.generated_tokens - self.first_tokens) / self.sequence_steps if self.sequence_steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated_tokens - self.first_tokens) / self.decode_s if self.decode_s else 0.0


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, EOS included when it was hit
    stats: GenerationStats


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ConfigError(f"prompt {i} is empty: generation needs at least one token")
        if len(p) >= max_seq_len:
            raise ConfigError(f"prompt {i} has {len(p)} tokens; the model's context (max_seq_len) is "
                             f"{max_seq_len}, which leaves no room to generate")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i}: token ids {bad[:5]} are outside the model's vocabulary "
                             f"[0, {vocab_size})")
        out.append(p)
    if not out:
        raise ConfigError("no prompts given")
    return out


class Engine:
    """A model ready to generate: its layers unstacked, its parameters placed on the prefill and
    decode meshes.

    unstack (default: unless a mesh splits layers over `pipeline`): run the layers as separate
    arrays (`Transformer.unstacked`), which spares each decode step a copy of every layer's weights
    out of the scanned stack (2-3x faster steps at batch 1 on CPU, docs/BENCHMARKS.md). The copy is
    made once, here: while the caller still holds `model`, both forms are in memory; False keeps
    the stack (a model that fills its devices).

    Without meshes both programs use the same parameter arrays. With meshes, the parameters are
    laid out by `sharding.RULES` on each (e.g. prefill data-parallel, decode with experts over
    `expert`) and the prefilled state moves between them with `jax.device_put`.
    """

    def __init__(self, model: Transformer, *, cache_dtype=jnp.bfloat16, prefill_mesh: Mesh | None = None,
                 decode_mesh: Mesh | None = None, unstack: bool | None = None):
        self.cfg = model.cfg
        if unstack is None:
            unstack = all(m is None or m.shape.get("pipeline", 1) == 1 for m in (prefill_mesh, decode_mesh))
        model = model.unstacked() if unstack else model
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.prefill_mesh, self.decode_mesh = prefill_mesh, decode_mesh
        self.model_def, self.prefill_params = programs.split(model, prefill_mesh)
        self.decode_params = (self.prefill_params if decode_mesh is prefill_mesh
                              else programs.split(model, decode_mesh)[1])

    def prefill(self, tokens, lengths, seq_ids, budget, key, eos, *, n_draft: int, sampling: RowSampling):
        """Prefill rows (tokens [B,S] right-padded, lengths/seq_ids/budget [B]) on the prefill mesh,
        rows over its data axes -> (their DecodeState, handed to the decode mesh; the first tokens).
        The hand-off is the latent cache (S slots per sequence) and the small per-row state."""
        args = [tokens, lengths, seq_ids, budget]
        if self.prefill_mesh is not None:
            args = [jax.device_put(a, batch_sharding(self.prefill_mesh, np.shape(a))) for a in args]
        with programs.on_mesh(self.prefill_mesh):
            rows, first = programs.prefill(self.model_def, self.prefill_params, *args, key, eos, n_draft=n_draft,
                                           sampling=sampling, cache_dtype=self.cache_dtype, mesh=self.prefill_mesh)
        return self.hand_off(rows), first

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode run on meshes of their own."""
        return self.decode_mesh is not None and self.decode_mesh is not self.prefill_mesh

    def hand_off(self, rows: programs.DecodeState) -> programs.DecodeState:
        """Prefilled rows onto the decode mesh (a no-op where both phases share one)."""
        if self.disaggregated:
            rows = jax.device_put(rows, programs.state_shardings_for(rows, self.decode_mesh))
        return rows

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_id: int | None = None,
                 speculative: int = 0, batch_size: int | None = None, prefill_batch_size: int | None = None,
                 max_len: int | None = None, steps_per_dispatch: int = STEPS_PER_DISPATCH,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
        """Generate up to `max_new_tokens` per prompt (fewer where the context ends or EOS comes).

        speculative: D, the number of tokens drafted per step by MTP modules 1..D (0 = off).
        batch_size / prefill_batch_size: decode and prefill batch sizes (default: all prompts).
        max_len: cache slots per sequence (default: longest prompt + budget, rounded up).
        steps_per_dispatch: K, decode steps per dispatch (`programs.decode`; the tokens are the
        same for any K).
        on_tokens(i, ids) is called as prompt i's tokens arrive (streaming, K steps at a time).
        """
        cfg = self.cfg
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        if steps_per_dispatch < 1:
            raise ConfigError(f"steps_per_dispatch={steps_per_dispatch}: expected >= 1")
        if not 0 <= speculative <= cfg.n_mtp_modules:
            raise ConfigError(f"speculative={speculative}: the model has {cfg.n_mtp_modules} MTP module(s)")
        prompts = validate_prompts(prompts, cfg.vocab_size, cfg.max_seq_len)
        Bd = batch_size or len(prompts)
        Bp = prefill_batch_size or Bd
        if Bd % Bp:
            raise ConfigError(f"batch_size={Bd} must be a multiple of prefill_batch_size={Bp}")
        S = min(_round_up(max(map(len, prompts)), PROMPT_BUCKET), cfg.max_seq_len)
        budget = [min(max_new_tokens, cfg.max_seq_len - len(p)) for p in prompts]
        need = max(len(p) + b for p, b in zip(prompts, budget)) + speculative
        T = max_len or max(_round_up(need, CACHE_BUCKET), S)
        if T < max(need, S):
            raise ConfigError(f"max_len={max_len}: needs at least {max(need, S)} slots")
        run = _Run(self, prompts, budget, S, T, jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id),
                   speculative, sampling, on_tokens, steps_per_dispatch)
        for start in range(0, len(prompts), Bd):
            ids = [i if i < len(prompts) else -1 for i in range(start, start + Bd)]
            t0 = time.perf_counter()
            state = run.prefill(ids, Bp)
            t1 = time.perf_counter()
            run.decode(ids, state)
            run.stats.prefill_s += t1 - t0
            run.stats.decode_s += time.perf_counter() - t1
        return GenerationResult(run.results, run.stats)


@dataclasses.dataclass
class _Run:
    """One `generate` call: its settings, the tokens so far, the statistics."""

    engine: Engine
    prompts: list[list[int]]
    budget: list[int]
    S: int  # padded prompt length
    T: int  # cache slots
    key: jax.Array
    eos: jax.Array
    n_draft: int
    sampling: SamplingConfig  # every row's; the programs take it as rows, so a new setting compiles nothing
    on_tokens: Callable[[int, list[int]], None] | None
    steps_per_dispatch: int
    results: list[list[int]] = dataclasses.field(default_factory=list)
    stats: GenerationStats = dataclasses.field(default_factory=GenerationStats)

    def __post_init__(self):
        self.results = [[] for _ in self.prompts]

    def emit(self, tokens: np.ndarray, count: np.ndarray, ids: list[int]):
        """One step's tokens [B,A+1], the first count [B] of each row new."""
        toks, count = np.asarray(tokens), np.asarray(count)
        for row, i in enumerate(ids):
            if i >= 0 and count[row]:
                new = toks[row, : count[row]].tolist()
                self.results[i].extend(new)
                self.stats.generated_tokens += len(new)
                if self.on_tokens is not None:
                    self.on_tokens(i, new)

    def prefill(self, ids: list[int], Bp: int) -> programs.DecodeState:
        """Prefill the decode batch `ids` (-1: empty row) in chunks of Bp; returns its state."""
        e, cfg = self.engine, self.engine.cfg
        state = programs.empty_state(cfg, len(ids), self.T, n_draft=self.n_draft, cache_dtype=e.cache_dtype,
                                     hidden_dtype=jnp.dtype(cfg.dtype))
        if e.decode_mesh is not None:
            state = jax.device_put(state, programs.state_shardings_for(state, e.decode_mesh))
        firsts = []
        for p0 in range(0, len(ids), Bp):
            chunk = ids[p0: p0 + Bp]
            if all(i < 0 for i in chunk):
                continue
            rows, first = self._prefill_chunk(chunk)
            firsts.append((first, chunk))
            state = programs.insert(state, rows, jnp.int32(p0), mesh=e.decode_mesh)
        for first, chunk in firsts:
            self.emit(first.tokens, first.count, chunk)
            self.stats.first_tokens += int(np.asarray(first.count).sum())
        self.stats.prompt_tokens += sum(len(self.prompts[i]) for i in ids if i >= 0)
        return jax.block_until_ready(state)

    def _prefill_chunk(self, chunk: list[int]):
        """Right-pad one chunk of prompts (empty rows: one pad token, no budget) and prefill it."""
        e = self.engine
        tok = np.zeros((len(chunk), self.S), np.int32)
        lengths = np.ones((len(chunk),), np.int32)
        budget = np.zeros((len(chunk),), np.int32)
        for r, i in enumerate(chunk):
            if i >= 0:
                tok[r, : len(self.prompts[i])] = self.prompts[i]
                lengths[r], budget[r] = len(self.prompts[i]), self.budget[i]
        seq_ids = np.asarray([max(i, 0) for i in chunk], np.int32)
        return e.prefill(tok, lengths, seq_ids, budget, self.key, self.eos, n_draft=self.n_draft,
                         sampling=self.sampling.rows(len(chunk)))

    def decode(self, ids: list[int], state: programs.DecodeState) -> None:
        """Dispatch K steps at a time (`programs.decode`) until every row is done, one dispatch in
        flight: dispatch i+1 goes out before dispatch i's tokens are read, unless it cannot matter
        (every step emits >= 1 token per active sequence, so sequences with <= K tokens left are
        done once the dispatch in flight ends; its loop stops early when none is active)."""
        e, K = self.engine, self.steps_per_dispatch
        active, remaining = np.asarray(state.active), np.asarray(state.remaining)
        in_flight, last = None, time.perf_counter()
        rows = self.sampling.rows(len(ids))
        while True:
            alive = active & (remaining > K) if in_flight is not None else active
            nxt = None
            if alive.any():
                with programs.on_mesh(e.decode_mesh):
                    state, nxt = programs.decode(e.model_def, e.decode_params, state, np.ones(len(ids), bool),
                                                 np.int32(K), rows, self.eos, self.key, n_draft=self.n_draft,
                                                 max_steps=K, mesh=e.decode_mesh,
                                                 kv_len=self._kv_len(ids, alive, in_flight is not None))
            if in_flight is not None:
                out = jax.tree.map(np.asarray, in_flight)
                n = int(out.steps)  # 0 where the dispatch before it finished every row
                self._count(out)
                for s in range(n):
                    self.emit(out.tokens[s], out.count[s], ids)
                active, remaining = out.active, out.remaining
                now = time.perf_counter()
                self.stats.step_s += [(now - last) / max(n, 1)] * n
                last = now
            if nxt is None:
                return
            in_flight = nxt

    def _kv_len(self, ids: list[int], alive: np.ndarray, in_flight: bool) -> int:
        """The cache prefix the next dispatch attends: it holds every live row's slots written so
        far (prompt + emitted - 1: the newest token is still pending), what the dispatch in flight
        may add, and this dispatch's K steps of A+1 positions each."""
        A1, K = self.n_draft + 1, self.steps_per_dispatch
        written = max(len(self.prompts[i]) + len(self.results[i]) - 1 for r, i in enumerate(ids) if alive[r])
        return programs.kv_len_for(min(written + (2 if in_flight else 1) * K * A1 + 1, self.T), self.T)

    def _count(self, out: programs.ChunkOutput):
        s = self.stats
        s.steps += int(out.steps)
        s.sequence_steps += int(out.was_active.sum())
        drafted, accepted = out.drafts()
        s.drafted += drafted
        s.accepted += accepted


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, cache_dtype=jnp.bfloat16,
             **kwargs) -> GenerationResult:
    """One-shot `Engine(model, cache_dtype=...).generate(prompts, **kwargs)` (programs stay compiled)."""
    return Engine(model, cache_dtype=cache_dtype).generate(prompts, **kwargs)
