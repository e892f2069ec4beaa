"""The device side of the server: a decode batch of fixed slots over one latent cache.

Shape letters (the package legend): Bd decode slots, S prompt bucket, T cache slots per sequence.

Slot i is row i of every array of the decode `DecodeState`: its latent cache rows
`cache.layers[*].c_kv[:, i]` (T slots, one per position), its token buffer, length, budget and
`active` flag, and row i of the per-row sampling settings and EOS id kept here on the host. A
request is prefilled alone by `infer.programs.prefill` (a batch of one, its prompt right-padded to
the smallest bucket S = 16, 32, 64, ... that holds it; a prompt longer than `prefill_chunk` is
written chunk by chunk into a T-slot row of its own by `infer.programs.prefill_chunk`, a decode
dispatch between chunks: `admit`) and `infer.programs.insert` copies the result into its slot
(with `--prefill_mesh`, prefill runs on its own devices and the row's latent cache moves to the
decode mesh first: `Engine.prefill`); `infer.programs.decode` then runs K steps per
dispatch over the smallest cache prefix (64, 128, ... T slots) that the rows fill. With `mixed`
on, a prompt may instead `join`: no prefill program, its chunks ride in decode steps as extra
rows of the same forward, a chunk per step (`infer.programs.Join`). When a request
leaves, the host clears the slot's bit in `keep`, which the next decode dispatch applies. The
slot's stale cache needs no clearing: the next prompt overwrites slots 0..S-1 and the causal
rule of `dsv3_jax.cache` hides everything past a sequence's length.

Prefix reuse: a freed row keeps its latents, and the host remembers their tokens (`held`: the
prompt and every token emitted, the last one pending, not yet written). A prompt that starts with
what a free row holds (a shared system prompt; a chat's next turn, which repeats the conversation
so far) joins that row from the first position it does not share (`reusable`, `best_slot`), so its
shared part costs nothing: positions are slots, and a latent depends only on the tokens up to it.
With a prefix pool (`prefix_pool` rows of the same caches, not decoded), a row's content is saved
there before a prompt that does not continue it overwrites it, and restored into a free row for a
prompt that starts with it (`copy_row`, least recently used pool row first): more conversations
than slots keep their prefixes.

Every shape is fixed at start-up (Bd, T, the prompt and cache buckets, the chunk, K steps per
dispatch), so `warmup` compiles every program once and nothing compiles while serving;
`compiled_programs` counts them so that a test (and /metrics) can see it stays so.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv3_jax.cache import Cache, cache_shardings, init_cache
from dsv3_jax.errors import ConfigError
from dsv3_jax.infer import programs
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.sampling import SamplingConfig

FIRST_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def copy_row(dst: Cache, src: Cache, dst_row, src_row, *, mesh: Mesh | None = None) -> Cache:
    """Row src_row of every latent cache of `src` (all T positions, main and MTP) into row dst_row
    of `dst`: the prefix pool's save and restore (`DecodeBatch`; one program per direction)."""
    def put(d, s):
        row = jax.lax.dynamic_index_in_dim(s, src_row, axis=1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(d, row.astype(d.dtype), dst_row, axis=1)

    out = jax.tree.map(put, dst, src)
    return programs.constrain(out, None if mesh is None else cache_shardings(out, mesh))


def prompt_buckets(max_len: int) -> list[int]:
    """16, 32, 64, ... up to and including max_len: log2(T/16) prefill shapes instead of T/16."""
    return programs.buckets(max_len, FIRST_BUCKET)


@dataclasses.dataclass
class Joining:
    """A prompt joining its slot through decode dispatches (`DecodeBatch.join`)."""

    slot: int
    prompt: list[int]
    budget: int
    seq_id: int
    start: int = 0  # of the next chunk (> 0: the row already holds the prompt's latents below it)

    def chunk(self, J: int, n_draft: int = 0) -> tuple[list, bool]:
        """The fields of the next J tokens' `infer.programs.Join` (and the n_draft after them,
        which the MTP modules read) and whether they end the prompt (its row then decodes); `start`
        moves past them."""
        P, start = len(self.prompt), self.start
        piece = self.prompt[start: start + J + n_draft]
        pending = min(start + J, P - 1)
        self.start += J
        return [piece + [0] * (J + n_draft - len(piece)), self.slot, start, P, self.prompt[pending], self.seq_id,
                self.budget], pending == P - 1


def stack_joins(chunks: list[list], K: int, width: int) -> tuple[programs.Join, np.ndarray]:
    """Join fields (tokens `width` wide) for up to K steps -> (a Join with a leading [K] axis,
    has_join [K])."""
    unused = [[0] * width, 0, 0, 2, 0, 0, 0]  # the steps past the chunks carry none (has_join False)
    rows = chunks + [unused] * (K - len(chunks))
    fields = [np.asarray(column, np.int32) for column in zip(*rows)]
    return programs.Join(*fields), np.arange(K) < len(chunks)


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """What one request asks of its row."""

    sampling: SamplingConfig = SamplingConfig()
    seq_id: int = 0  # the sampling keys' sequence number (the request's seed)
    eos_id: int = -1  # -1: ignore EOS


class DecodeBatch:
    def __init__(self, model, *, slots: int, max_len: int, n_draft: int, steps_per_dispatch: int,
                 cache_dtype=jnp.bfloat16, mesh=None, prefill_mesh=None, prefill_chunk: int = 512, mixed: int = 0,
                 prefix_reuse: bool = True, prefix_pool: int = 0, seed: int = 0):
        """mesh: the decode batch's; prefill_mesh: prefill on other devices (disaggregation: the
        prefilled row's latent cache moves to `mesh` before its insert), default `mesh`.
        prefill_chunk: prompts longer than this enter in chunks of it (`admit`).
        mixed: prompts may instead `join` the decode steps, this many tokens in each (0: never).
        prefix_reuse: a joining prompt starts past what a free row already holds of it (`reusable`).
        prefix_pool: rows that keep what freed rows held once they are reused (0: none)."""
        if mixed < 0 or mixed > max_len or mixed % (n_draft + 1):
            raise ConfigError(f"mixed={mixed}: expected 0 (off) or a chunk of 1..max_len={max_len} tokens, a "
                              f"multiple of the {n_draft + 1} tokens a decoding row verifies per step")
        self.mixed, self._joins = mixed, []  # prompts joining, first come first served
        self.prefix_reuse = prefix_reuse
        self.pool_rows = prefix_pool if mixed and prefix_reuse else 0  # (only a join starts past a prefix)
        self.cfg, self.mesh = model.cfg, mesh
        self.slots, self.max_len, self.n_draft, self.K = slots, max_len, n_draft, steps_per_dispatch
        self.cache_dtype = jnp.dtype(cache_dtype)
        # The model as infer's Engine holds it: layers unstacked, parameters placed on each mesh.
        self.engine = Engine(model, cache_dtype=cache_dtype, prefill_mesh=mesh if prefill_mesh is None else prefill_mesh,
                             decode_mesh=mesh)
        self.chunk = prefill_chunk
        self.buckets = prompt_buckets(min(self.context, prefill_chunk))
        self.key = jax.random.key(seed)
        self.rs = SamplingConfig().rows(slots)  # numpy, edited in place as requests come and go
        self.eos = np.full(slots, -1, np.int32)
        self.keep = np.ones(slots, bool)
        # Per slot, what the host knows between dispatches: generating, and the cache slots written
        # (prompt + tokens emitted by decode steps): the attended prefix each dispatch needs.
        self.active = np.zeros(slots, bool)
        self.length = np.zeros(slots, np.int64)
        self.held = [[] for _ in range(slots)]  # per row, the tokens of its latents (prefix reuse)
        self.state = self._empty()
        self._empty_pool()

    @property
    def context(self) -> int:
        """Tokens one sequence may hold, prompt and output together (MTP drafts need n_draft slots more)."""
        return min(self.cfg.max_seq_len, self.max_len - self.n_draft)

    def _empty(self) -> programs.DecodeState:
        state = programs.empty_state(self.cfg, self.slots, self.max_len, n_draft=self.n_draft,
                                     cache_dtype=self.cache_dtype, hidden_dtype=jnp.dtype(self.cfg.dtype))
        return programs.place(state, self.mesh)

    def _empty_pool(self) -> None:
        """The prefix pool's rows (`copy_row`), least recently used first, none holding anything."""
        self.pool_held, self.pool_lru = [[] for _ in range(self.pool_rows)], list(range(self.pool_rows))
        self.pool = None
        if self.pool_rows:
            cache = init_cache(self.cfg, self.pool_rows, self.max_len, self.cache_dtype, self.n_draft)
            self.pool = jax.device_put(cache, jax.devices()[0] if self.mesh is None else cache_shardings(cache, self.mesh))

    def reset(self) -> None:
        """A fresh, empty batch (after a device error left the donated state unusable)."""
        self._joins = []
        self.keep[:] = True
        self.active[:] = False
        self.held = [[] for _ in range(self.slots)]
        self.state = self._empty()
        self._empty_pool()

    def state_lost(self) -> bool:
        return any(x.is_deleted() for x in jax.tree.leaves((self.state, self.pool)))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def prefill(self, slot: int, prompt: list[int], budget: int, row: RowSettings) -> tuple[list[int], bool]:
        """Prefill one prompt into `slot` all at once -> (its first tokens, whether it is still generating)."""
        admission = self.admit(slot, prompt, budget, row, overlap=False)
        while True:
            try:
                next(admission)
            except StopIteration as done:
                return done.value

    def admit(self, slot: int, prompt: list[int], budget: int, row: RowSettings, *, overlap: bool = True):
        """Prefill one prompt into `slot`: a generator that pauses between the chunks of a prompt
        longer than `chunk` (the scheduler runs a decode dispatch in each pause, so a long prompt
        never stalls the decoding rows for more than one chunk) and returns (its first tokens,
        whether it is still generating). A short prompt is one `prefill` of its bucket. overlap: also
        pause while a prefill on its own devices runs (`_overlap`); off for a caller that would only
        poll the pauses."""
        if len(prompt) > self.chunk:
            rows, first = yield from self._chunks(prompt, budget, row)
        else:
            tok = np.zeros((1, self.bucket(len(prompt))), np.int32)
            tok[0, : len(prompt)] = prompt
            rows, first = self.engine.prefill(tok, np.int32([len(prompt)]), np.int32([row.seq_id]),
                                              np.int32([budget]), self.key, np.int32([row.eos_id]),
                                              n_draft=self.n_draft, sampling=row.sampling.rows(1))
        if overlap:
            yield from self._overlap(first)
        self._stash(slot, prompt)
        return self._insert(slot, rows, first, prompt, row)

    def _overlap(self, first):
        """With prefill on its own devices (disaggregation), pause until the prefill has finished,
        a decode dispatch in each pause: the decoding rows run beside the prefill instead of
        waiting for it, since inserting the row makes the next dispatch depend on it. No pause
        where both share devices (the device would run them in turn anyway) or nothing else decodes."""
        while self.engine.disaggregated and not first.tokens.is_ready() and (self.active & self.keep).any():
            yield

    def _chunks(self, prompt: list[int], budget: int, row: RowSettings):
        """`infer.programs.prefill_chunk` over the prompt, a pause after each chunk but the last ->
        (the row's state, its first token). The last chunk ends at the prompt's end or at T."""
        e, C, T = self.engine, self.chunk, self.max_len
        state = programs.chunk_state(self.cfg, [prompt], [row.seq_id], T, n_draft=self.n_draft,
                                     cache_dtype=self.cache_dtype, mesh=e.prefill_mesh)
        starts = [min(s, T - C) for s in range(0, len(prompt), C)]
        for i, start in enumerate(starts):
            with programs.on_mesh(e.prefill_mesh):
                state, first = programs.prefill_chunk(
                    e.model_def, e.prefill_params, state, np.int32(start), np.int32([budget]), self.key,
                    np.int32([row.eos_id]), n_draft=self.n_draft, sampling=row.sampling.rows(1), chunk=C,
                    mesh=e.prefill_mesh, kv_len=programs.kv_len_for(start + C, T))
            if i < len(starts) - 1:
                yield
        return e.hand_off(state), first

    def _insert(self, slot: int, rows, first, prompt: list[int], row: RowSettings) -> tuple[list[int], bool]:
        tokens, count, active = np.asarray(first.tokens), np.asarray(first.count), bool(np.asarray(first.active)[0])
        tokens = tokens[0, : count[0]].tolist()
        if active:  # (a request done at its first token leaves the row as it was)
            self.state = programs.insert(self.state, rows, np.int32(slot), mesh=self.mesh)
            self.rs.set_row(slot, row.sampling)
            self.eos[slot], self.keep[slot] = row.eos_id, True
            self.active[slot], self.length[slot] = True, len(prompt)
            self.held[slot] = list(prompt) + tokens
        return tokens, active

    def reusable(self, slot: int, prompt: list[int]) -> int:
        """How many of the prompt's first positions `slot`'s row already holds the latents of, for a
        join to start past them (0 without mixed prefill, which is how a prompt enters a row that
        holds something, and without `prefix_reuse`). At most the shared prefix less the A tokens
        the MTP modules read ahead (a position's MTP latent embeds the tokens after it), the row's
        written positions (its last token is pending), and the prompt's length less 1 + 2A: its
        pending token is run, and its chunks rewrite the 2A hidden states a draft window reads."""
        return 0 if slot in self.joining else self._reuse(self.held[slot], prompt)

    def _reuse(self, held: list[int], prompt: list[int]) -> int:
        """`reusable` for a row holding the latents of `held`."""
        if not (self.mixed and self.prefix_reuse):
            return 0
        A = self.n_draft
        shared = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
        return max(0, min(shared - A, len(held) - 1, len(prompt) - 1 - 2 * A))

    def _pooled(self, prompt: list[int]) -> tuple[int, int]:
        """The prefix pool's row holding the longest prefix of `prompt` -> (row, positions reusable)."""
        return max(((r, self._reuse(held, prompt)) for r, held in enumerate(self.pool_held)), key=lambda s: s[1],
                   default=(-1, 0))

    def best_slot(self, free: list[int], prompt: list[int]) -> tuple[int, int]:
        """Of the free slots (least recently freed first), the one holding the longest prefix of
        `prompt` -> (slot, positions reusable); the least recently freed when none holds any, so
        that what the others hold stays the longest, or when a prefix pool row holds more (`join`
        restores it there)."""
        slot, reuse = max(((slot, self.reusable(slot, prompt)) for slot in free), key=lambda s: s[1])
        pooled = self._pooled(prompt)[1]
        return (free[0], pooled) if pooled > reuse else (slot, reuse)

    def _stash(self, slot: int, prompt: list[int], spare: int = -1) -> None:
        """Before `prompt` overwrites `slot`'s row: save what the row holds into the least recently
        used pool row (not `spare`), unless the prompt repeats it all (the row keeps it), a pool row
        has it already, or it is at most one chunk (run again in one step)."""
        held = self.held[slot]
        if (not self.pool_rows or len(held) <= max(self.mixed, 1 + 2 * self.n_draft)  # (nothing `_reuse` would give)
                or prompt[: len(held) - 1] == held[:-1] or any(h[: len(held) - 1] == held[:-1] for h in self.pool_held)):
            return
        r = next((r for r in self.pool_lru if r != spare), None)
        if r is None:
            return
        with programs.on_mesh(self.mesh):
            self.pool = copy_row(self.pool, self.state.cache, np.int32(r), np.int32(slot), mesh=self.mesh)
        self.pool_held[r] = list(held)
        self._used(r)

    def _restore(self, slot: int, r: int) -> None:
        """Pool row r's latents into `slot`'s row."""
        with programs.on_mesh(self.mesh):
            cache = copy_row(self.state.cache, self.pool, np.int32(slot), np.int32(r), mesh=self.mesh)
        self.state = dataclasses.replace(self.state, cache=cache)
        self.held[slot] = list(self.pool_held[r])
        self._used(r)

    def _used(self, r: int) -> None:
        """Pool row r becomes the most recently used."""
        self.pool_lru.remove(r)
        self.pool_lru.append(r)

    def join(self, slot: int, prompt: list[int], budget: int, row: RowSettings, start: int = 0) -> None:
        """Let `prompt` into `slot` through the next decode dispatches, `mixed` tokens of it riding
        in a step's forward (`infer.programs.Join`: Sarathi's mixed batch). The decoding rows wait
        for no prefill of its own; its chunks share their steps' weight reads. Joining prompts take
        turns in arrival order, a chunk per step; the step that carries a prompt's last chunk emits
        its first token in the slot's row, which decodes from the next step on. start: the first
        position to run, at most `reusable` (the row holds the latents below it)."""
        if slot in self.joining:
            raise RuntimeError(f"slot {slot} is already joining")
        own, (r, pooled) = self.reusable(slot, prompt), self._pooled(prompt)
        if not 0 <= start <= max(own, pooled):
            raise ValueError(f"start={start}: slot {slot} holds the latents of {own} positions of this prompt, "
                             f"the prefix pool {pooled}")
        self._stash(slot, prompt, spare=r if start > own else -1)
        if start > own:
            self._restore(slot, r)
        self.held[slot] = []  # its chunks overwrite the row from `start`
        self.rs.set_row(slot, row.sampling)
        # keep stays off until its last chunk has run: a row the host let go may still be active
        # on the device, and must not decode on until the chunk takes the row over
        self.eos[slot], self.keep[slot], self.active[slot] = row.eos_id, False, False
        self._joins.append(Joining(slot, list(prompt), budget, row.seq_id, start))

    @property
    def joining(self) -> list[int]:
        """The slots prompts are joining through decode dispatches."""
        return [j.slot for j in self._joins]

    def free(self, slot: int) -> None:
        """Stop generating in `slot` from the next dispatch on. Its settings go back to greedy: the
        sampling code runs only when some row samples, and a frozen row still counts. A prompt
        joining the slot stops joining."""
        self._joins = [j for j in self._joins if j.slot != slot]
        self.keep[slot] = False
        self.rs.set_row(slot, SamplingConfig())

    def decode(self, n_steps: int) -> programs.ChunkOutput:
        """Run up to n_steps (<= K) steps over the smallest cache prefix that holds them -> their
        outputs as numpy arrays."""
        n = min(n_steps, self.K)
        chunks, joined, length, live = self._schedule(n)
        # n steps advance a row by at most n (A+1) positions, the last writing up to length + A
        longest = int(length[live].max()) + n * (self.n_draft + 1) + 1 if live.any() else 1
        out = self._dispatch(n, programs.kv_len_for(min(longest, self.max_len), self.max_len),
                             stack_joins(chunks, self.K, self.mixed + self.n_draft) if chunks else None)
        for j in joined:
            self.keep[j.slot], self.held[j.slot] = True, list(j.prompt)
        self.length += out.count.sum(axis=0)
        self.active = out.active.copy()
        for slot in np.flatnonzero(out.count.any(axis=0)):
            self.held[slot] += out.emitted(slot)
        return out

    def _schedule(self, n: int) -> tuple[list, list[Joining], np.ndarray, np.ndarray]:
        """The joining prompts' chunks for n steps, one per step -> (their Join fields, the prompts
        whose last chunk is among them; per row, the highest position the dispatch may write from,
        and whether it may write at all)."""
        chunks, joined, length, live = [], [], self.length.copy(), self.active & self.keep
        while self._joins and len(chunks) < n:
            j = self._joins[0]
            fields, last = j.chunk(self.mixed, self.n_draft)
            chunks.append(fields)
            length[j.slot], live[j.slot] = j.start, True  # its chunk's and pending token's positions
            if last:  # it decodes from its pending token, the prompt's last, onwards
                self.length[j.slot] = len(j.prompt) - 1
                joined.append(self._joins.pop(0))
        return chunks, joined, length, live

    def _dispatch(self, n_steps: int, kv_len: int, joins=None) -> programs.ChunkOutput:
        with programs.on_mesh(self.mesh):
            self.state, out = programs.decode(self.engine.model_def, self.engine.decode_params, self.state,
                                              self.keep.copy(), np.int32(n_steps), self.rs, self.eos.copy(),
                                              self.key, n_draft=self.n_draft, max_steps=self.K, mesh=self.mesh,
                                              kv_len=kv_len, joins=None if joins is None else joins[0],
                                              has_join=None if joins is None else joins[1])
        return jax.tree.map(np.asarray, out)

    def warmup(self) -> None:
        """Compile every program the server will run: a prefill and an insert per bucket and the
        decode loop (with a sampled row, so both sides of every `lax.cond` run once)."""
        sampled = RowSettings(SamplingConfig(1.0, top_k=2, top_p=0.5))
        for S in self.buckets:
            self.prefill(0, [0] * min(S, self.context - 1), 2, sampled)
        if self.context - 1 > self.chunk:  # every chunk's cache prefix
            self.prefill(0, [0] * (self.context - 1), 2, sampled)
        for kv_len in programs.buckets(self.max_len, programs.KV_BUCKET):
            self._dispatch(self.K, kv_len)
            if self.mixed:  # a final chunk into slot 0
                chunk = Joining(0, [0, 0], 2, 0).chunk(self.mixed, self.n_draft)[0]
                self._dispatch(self.K, kv_len, stack_joins([chunk], self.K, self.mixed + self.n_draft))
        if self.pool_rows:  # both directions of copy_row (pool row 0 then holds nothing: pool_held[0] = [])
            with programs.on_mesh(self.mesh):
                self.pool = copy_row(self.pool, self.state.cache, np.int32(0), np.int32(0), mesh=self.mesh)
            self._restore(0, 0)
        self.free(0)
        self.active[:] = False
        self.held[0] = []

    def compiled_programs(self) -> int:
        return sum(f._cache_size() for f in (programs.prefill, programs.prefill_chunk, programs.decode,
                                             programs.insert, copy_row))
