"""Pipeline schedules as lockstep tick tables (host side, numpy only): build, validate, measure.

The table-driven executor (`pipeline.py`) runs every rank of the `pipeline` axis tick by tick in one
SPMD program. This module decides what each rank does on each tick. Names follow DeepSeek's DualPipe:

  rank   one device on the pipeline axis (N of them).
  chunk  one of the model pieces a rank holds: 1 per rank for gpipe/1f1b, 2 for dualpipev.
  stage  a chunk's place in the model, 0 .. S-1 with S = N * chunks. DualPipeV folds the model into
         a V: chunk 0 of rank r is stage r, chunk 1 is stage 2N-1-r, so rank 0 holds the embedding
         (stage 0) and the head (stage 2N-1), and rank N-1 holds the two middle stages.
  F      forward of one stage on one micro-batch.
  B      backward: the input gradient, and the weight gradient too unless the B is *split*.
  W      the deferred weight gradient of a split B (zero-bubble): it fills a tick that would idle.

Lockstep model. Each tick, each rank runs at most one F, then at most one B, then at most one W, in
that order; a value made at tick t (an activation, a gradient) is usable at tick t+1, on a neighbour
or on the same rank. So F(s, m) needs F(s-1, m) at an earlier tick, and B(s, m) needs B(s+1, m) at
an earlier tick and F(s, m). The last stage's B recomputes its forward and the loss from the stashed
input, so it may share a tick with F(S-1, m) (as the closed-form 1f1b does). W(s, m) comes at the
tick of its split B or later.

Tables: f, b, w are [Tk, N, 2] int32 holding (chunk, micro-batch) per tick and rank, (-1, -1) idle;
b_split [Tk, N] marks backwards that left their weight gradient to a W. Shape letters: Tk ticks,
N ranks (DeepSeek's num_ranks; not the package's MoE token N), M micro-batches, S stages.

  gpipe      F(s, m) at tick m + s; no B in the table: autodiff runs the backward scan.
  1f1b       F(s, m) at m + s, B(s, m) at m + 2N - 2 - s (the closed form pipeline.py had).
  dualpipev  each rank's op order from DualPipeV.step's 8 steps, packed into ticks: each tick,
             each rank takes the next items of its order while their dependencies are met and
             their slots are free (an overlapped F&B pair takes one tick; a W never shares a tick
             with a B, so that it fills an otherwise idle slot, as zero-bubble means it to).

`bubble` times a table with per-op costs; `formula_bubble` is the DualPipe README's table, which
assumes free-running ranks. The lockstep tick (as long as its busiest rank) costs more in the
warm-up and cool-down: with F, B, W = 1, 2, 1 DualPipeV idles 3N-2 per rank against the README's
2N-2 and lockstep 1F1B's 6N-6 (same ranks, a 1F1B stage costing two DualPipeV chunks).

`routes` and `buffer_slots` turn a table into what the executor scans over: where each output goes
and arrives, and which buffer slot each stashed input and output gradient lives in.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import numpy as np

from dsv3_jax.errors import ConfigError

NAMES = ("gpipe", "1f1b", "dualpipev")
_INF = np.iinfo(np.int32).max  # "not done yet" in a tick map


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields; identity eq and hash
class Schedule:
    name: str            # "gpipe" | "1f1b" | "dualpipev"
    ranks: int           # N devices on the pipeline axis
    chunks: int          # stages per rank: 1 (gpipe, 1f1b) or 2 (dualpipev)
    microbatches: int    # M
    f: np.ndarray        # [Tk, N, 2] int32: (chunk, micro-batch) of the forward a rank runs; (-1, -1) idle
    b: np.ndarray        # [Tk, N, 2] backward (input gradient, and the weight gradient unless split)
    b_split: np.ndarray  # [Tk, N] bool: this tick's backward defers its weight gradient to a later W
    w: np.ndarray        # [Tk, N, 2] deferred weight-gradient op

    @property
    def stages(self) -> int:
        return self.ranks * self.chunks

    @property
    def ticks(self) -> int:
        return self.f.shape[0]

    def stage(self, rank: int, chunk: int) -> int:
        return rank if chunk == 0 else 2 * self.ranks - 1 - rank

    def rank_chunk(self, stage: int) -> tuple[int, int]:
        return (stage, 0) if stage < self.ranks else (2 * self.ranks - 1 - stage, 1)


class Op(NamedTuple):
    """One entry of a rank's DualPipeV op order."""
    kind: str            # "F" | "B" | "W"
    chunk: int
    m: int
    split: bool = False  # a B that leaves its weight gradient to a W


# ---------------------------------------------------------------------------------------------
def build(name: str, ranks: int, microbatches: int) -> Schedule:
    """The tick table of schedule `name` for `ranks` pipeline devices and `microbatches` micro-batches."""
    _check(name, ranks, microbatches)
    N, M = ranks, microbatches
    if name == "dualpipev":
        ops = _pack(N, M, [_dualpipev_order(N, M, r) for r in range(N)])
    else:  # the closed forms: stage s on rank s, chunk 0
        ops = [(m + s, "F", s, 0, m, False) for s in range(N) for m in range(M)]
        if name == "1f1b":
            ops += [(m + 2 * N - 2 - s, "B", s, 0, m, False) for s in range(N) for m in range(M)]
    return _tables(name, N, 2 if name == "dualpipev" else 1, M, ops)


def _check(name, ranks, microbatches):
    if name not in NAMES:
        raise ConfigError(f"pipeline schedule {name!r}: expected one of {NAMES}")
    for what, v in (("ranks", ranks), ("microbatches", microbatches)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"pipeline {what}={v!r}: expected an integer >= 1")
    if name == "dualpipev" and microbatches < 2 * ranks:
        raise ConfigError(f"dualpipev microbatches={microbatches}: expected >= 2 * ranks = {2 * ranks} "
                          "(DualPipeV fills both halves of the V before its steady state)")


def _tables(name, N, chunks, M, ops) -> Schedule:
    """ops [(tick, kind, rank, chunk, m, split)] -> a Schedule."""
    Tk = 1 + max(op[0] for op in ops)
    f, b, w = (np.full((Tk, N, 2), -1, np.int32) for _ in range(3))
    split = np.zeros((Tk, N), bool)
    for t, kind, r, c, m, sp in ops:
        {"F": f, "B": b, "W": w}[kind][t, r] = (c, m)
        if kind == "B":
            split[t, r] = sp
    return Schedule(name, N, chunks, M, f, b, split, w)


# ---------------------------------------------------------------------------------------------
# DualPipeV: each rank's op order (DualPipeV.step), then packing it into lockstep ticks.
def _dualpipev_order(N: int, M: int, r: int) -> list[tuple[Op, ...]]:
    """Rank r's op order in DualPipeV's 8 steps. An item is one op, or an overlapped F&B pair that
    must share a tick. Micro-batches go through each (kind, chunk) in order; W pops the oldest split B."""
    order, nxt, fifo = [], collections.Counter(), collections.deque()

    def op(kind, chunk=0, split=False):
        if kind == "W":  # DeepSeek's WeightGradStore is a FIFO of deferred weight gradients
            return Op("W", *fifo.popleft())
        m, nxt[kind, chunk] = nxt[kind, chunk], nxt[kind, chunk] + 1
        if split:
            fifo.append((chunk, m))
        return Op(kind, chunk, m, split)

    def one(*specs):  # single ops, in this order
        order.extend((op(*spec),) for spec in specs)

    def pair(f_chunk, b_chunk):
        order.append((op("F", f_chunk), op("B", b_chunk)))

    last = r == N - 1
    for _ in range(2 * (N - r - 1)):        # 1: nF0, warm up the first half of the V
        one(("F", 0))
    for _ in range(r + 1):                  # 2: nF0F1
        one(("F", 0), ("F", 1))
    for _ in range(N - r - 1):              # 3: nB1W1F1, zero-bubble: W just after its B
        one(("B", 1, True), ("W",), ("F", 1))
    for i in range(M - 2 * N + r + 1):      # 4: nF0B1F1B0, the steady state of overlapped pairs
        if i == 0 and last:                 # DeepSeek does not overlap this pair (smaller bubble);
            one(("F", 0), ("B", 1))         # in lockstep the two may still share a tick
        else:
            pair(0, 1)
        pair(1, 0)
    for _ in range(N - r - 1):              # 5: nB1F1B0
        one(("B", 1))
        pair(1, 0)
    zb = False
    for i in range(r + 1):                  # 6: nB1B0, the second half split
        zb = zb or (i == (r + 1) // 2 and r % 2 == 1)
        one(("B", 1, zb))
        zb = zb or (i == (r + 1) // 2 and r % 2 == 0)
        one(("B", 0, zb))
    for _ in range(N - r - 1):              # 7: nWB0
        one(("W",), ("B", 0, True))
    for _ in range(r + 1):                  # 8: nW, drain the FIFO
        one(("W",))
    assert not fifo and all(v == M for v in nxt.values()), (r, fifo, nxt)
    return order


def _pack(N: int, M: int, orders) -> list[tuple]:
    """Lockstep packing: each tick, each rank takes the next items of its order while their
    dependencies are met and their op kinds' slots are free this tick -> [(tick, kind, rank, chunk, m, split)]."""
    S = 2 * N
    done: dict = {}  # (kind, stage, m) -> tick
    ops, pos, t = [], [0] * N, 0
    limit = 4 * sum(len(o) for o in orders) + 8
    while any(p < len(o) for p, o in zip(pos, orders)):
        for r, order in enumerate(orders):
            used = set()
            while pos[r] < len(order):
                item = order[pos[r]]
                stages = [r if op.chunk == 0 else S - 1 - r for op in item]
                if not _slots_free([op.kind for op in item], used) or any(
                        _unmet(op.kind, st, op.m, t, done, S) for op, st in zip(item, stages)):
                    break  # in order: a rank never skips ahead of a blocked item
                for op, st in zip(item, stages):
                    done[op.kind, st, op.m] = t
                    used.add(op.kind)
                    ops.append((t, op.kind, r, op.chunk, op.m, op.split))
                pos[r] += 1
        t += 1
        if t > limit:
            raise RuntimeError(f"dualpipev N={N} M={M}: packing deadlocked at {pos}")
    return ops


def _slots_free(kinds, used) -> bool:
    """One op of each kind per tick, and a W never shares a tick with a B on its rank. That is the
    zero-bubble point of splitting a B: its W fills a later tick in which this rank would idle (its
    neighbours busier). A W in its B's own tick would make that tick as long as an unsplit B; the
    greedy pack that allows it measured 6N-4 bubble units against this rule's 3N-2 (F, B, W = 1, 2, 1)."""
    return not any(k in used or {"W": "B", "B": "W"}.get(k) in used for k in kinds)


def _unmet(kind: str, s: int, m: int, t: int, done: dict, S: int) -> str | None:
    """The dependency rule op (kind, stage s, micro-batch m) at tick t breaks, or None. `done` holds the
    ticks of ops already placed (this tick's included: same-tick ops are excluded by `<`)."""
    at = lambda k, st: done.get((k, st, m), _INF)  # noqa: E731
    if kind == "F" and s > 0 and not at("F", s - 1) < t:
        return f"needs F(stage {s - 1}, m {m}) at an earlier tick"
    if kind == "B" and s == S - 1 and not at("F", s) <= t:
        return f"needs F(stage {s}, m {m}) at the same or an earlier tick"
    if kind == "B" and s < S - 1 and not at("F", s) < t:
        return f"needs F(stage {s}, m {m}) at an earlier tick"
    if kind == "B" and s < S - 1 and not at("B", s + 1) < t:
        return f"needs B(stage {s + 1}, m {m}) at an earlier tick"
    if kind == "W" and not at("B", s) <= t:
        return f"needs its split B(stage {s}, m {m}) at the same or an earlier tick"
    return None


# ---------------------------------------------------------------------------------------------
def validate(s: Schedule) -> None:
    """Raise ValueError naming the first broken rule (by tick, then rank, then F/B/W) of a table."""
    Tk, N, M, S = s.ticks, s.ranks, s.microbatches, s.stages
    _check_shapes(s)
    done, split = {}, set()
    for t in range(Tk):
        for r in range(N):
            for kind, table in (("F", s.f), ("B", s.b), ("W", s.w)):
                c, m = (int(v) for v in table[t, r])
                if c < 0:
                    continue
                st, where = s.stage(r, c), f"{s.name}: tick {t}, rank {r}, {kind}(chunk {c}, m {m})"
                if (kind, st, m) in done:
                    raise ValueError(f"{where}: doubled op (already at tick {done[kind, st, m]})")
                if kind == "W" and (st, m) not in split:
                    raise ValueError(f"{where}: a W needs its B(stage {st}, m {m}) split at this or an earlier tick")
                if rule := _unmet(kind, st, m, t, done, S):
                    raise ValueError(f"{where}: {rule}")
                done[kind, st, m] = t
                if kind == "B" and s.b_split[t, r]:
                    split.add((st, m))
    kinds = ("F",) if s.name == "gpipe" else ("F", "B")  # gpipe's backward is autodiff's, not a table's
    for st in range(S):
        for m in range(M):
            for kind in kinds + (("W",) if (st, m) in split else ()):
                if (kind, st, m) not in done:
                    r, c = s.rank_chunk(st)
                    raise ValueError(f"{s.name}: rank {r}, {kind}(chunk {c}, m {m}) of stage {st} is missing")


def _check_shapes(s: Schedule):
    """Shapes, value ranges, and the ops gpipe must not have."""
    Tk, N = s.ticks, s.ranks
    if s.name not in NAMES or s.chunks != (2 if s.name == "dualpipev" else 1):
        raise ValueError(f"schedule {s.name!r} with {s.chunks} chunks per rank: expected one of {NAMES}, "
                         "2 chunks for dualpipev, else 1")
    for kind, table in (("F", s.f), ("B", s.b), ("W", s.w)):
        if table.shape != (Tk, N, 2):
            raise ValueError(f"{s.name}: {kind} table shape {table.shape}: expected (Tk, N, 2) = {(Tk, N, 2)}")
        c, m = table[..., 0], table[..., 1]
        bad = ~(((c == -1) & (m == -1)) | ((c >= 0) & (c < s.chunks) & (m >= 0) & (m < s.microbatches)))
        if bad.any():
            t, r = np.argwhere(bad)[0]
            raise ValueError(f"{s.name}: tick {t}, rank {r}, {kind}{tuple(table[t, r])}: expected (-1, -1) or "
                             f"(chunk < {s.chunks}, micro-batch < {s.microbatches})")
    if s.b_split.shape != (Tk, N) or (s.b_split & (s.b[..., 0] < 0)).any():
        raise ValueError(f"{s.name}: b_split (shape {s.b_split.shape}) must be (Tk, N) and set only on B ops")
    if s.name == "gpipe" and ((s.b[..., 0] >= 0).any() or (s.w[..., 0] >= 0).any()):
        raise ValueError("gpipe: its table holds forwards only (autodiff runs the backward)")


# ---------------------------------------------------------------------------------------------
# Live stage inputs: what a rank holds between ticks (activation memory).
def _ticks(s: Schedule):
    """-> tF, tB, tW [S, M] tick maps (-1: none) and split [S, M] bool, read off the tables."""
    tF, tB, tW = (np.full((s.stages, s.microbatches), -1) for _ in range(3))
    split = np.zeros((s.stages, s.microbatches), bool)
    for tmap, table in ((tF, s.f), (tB, s.b), (tW, s.w)):
        t, r = np.nonzero(table[..., 0] >= 0)
        c, m = table[t, r, 0], table[t, r, 1]
        st = np.where(c == 0, r, 2 * s.ranks - 1 - r)
        tmap[st, m] = t
        if table is s.b:
            split[st, m] = s.b_split[t, r]
    return tF, tB, tW, split


def _live(s: Schedule) -> np.ndarray:
    """-> [N, chunks, Tk, M] bool: stage input m held by a (rank, chunk) at a tick.

    A stage input is live from its arrival (the tick after F(s-1, m), or its own F tick on stage 0)
    to its release (its B tick, the W tick when split; gpipe: its F tick, autodiff keeps the rest).
    Both ends count: an arrival is written at the start of its tick, the release reads at its tick.
    """
    tF, tB, tW, split = _ticks(s)
    S, (N, M, Tk) = s.stages, (s.ranks, s.microbatches, s.ticks)
    release = np.where(split, tW, tB) if s.name != "gpipe" else tF
    arrive = np.concatenate([tF[:1], tF[:-1] + 1])
    t = np.arange(Tk)[:, None]
    inputs = np.zeros((N, s.chunks, Tk, M), bool)
    for st in range(S):
        r, c = s.rank_chunk(st)
        inputs[r, c] = (arrive[st] <= t) & (t <= release[st])
    return inputs


# ---------------------------------------------------------------------------------------------
def bubble(s: Schedule, F: float = 1.0, B: float = 2.0, W: float = 1.0) -> dict:
    """Time a table: op costs F, B (a split B costs B - W, its W costs W); a tick lasts as long as its
    busiest rank. -> makespan, busy (per rank, mean), bubble_time (mean idle per rank), bubble_fraction,
    peak_live (most stage inputs one rank holds at once: activation memory in stage-input units)."""
    has_f, has_b, has_w = (x[..., 0] >= 0 for x in (s.f, s.b, s.w))
    if s.name == "gpipe":  # the backward scan mirrors the forward one: tick t costs F, its mirror B
        cost = has_f * (F + B)
    else:
        cost = has_f * F + has_b * np.where(s.b_split, B - W, B) + has_w * W  # [Tk, N]
    makespan = float(cost.max(axis=1).sum())
    busy = float(cost.sum(axis=0).mean())
    inputs = _live(s)
    peak = s.microbatches if s.name == "gpipe" else int(inputs.sum(axis=(1, 3)).max())
    return {"makespan": makespan, "busy": busy, "bubble_time": makespan - busy,
            "bubble_fraction": (makespan - busy) / makespan if makespan else 0.0, "peak_live": peak}


def formula_bubble(name: str, ranks: int, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB=None) -> float:
    """The DualPipe README's bubble (free-running ranks), PP = number of stages: 1f1b (PP-1)(F+B) with
    PP = ranks; dualpipev (PP/2-1)(F&B + B - 3W) with PP = 2 * ranks, F&B (an overlapped pair)
    defaulting to F + B. gpipe's textbook bubble equals 1F1B's (the README does not list it)."""
    _check(name, ranks, 2 * ranks)
    if name == "dualpipev":
        return (ranks - 1) * ((F + B if FB is None else FB) + B - 3 * W)
    return (ranks - 1) * (F + B)


def render(s: Schedule) -> str:
    """The table as text, one line per rank: F0.3 is chunk 0's forward of micro-batch 3 (b: split B)."""
    lines = []
    for r in range(s.ranks):
        cells = []
        for t in range(s.ticks):
            ops = [f"{k}{c}.{m}" if k != "B" or not s.b_split[t, r] else f"b{c}.{m}"
                   for k, (c, m) in (("F", s.f[t, r]), ("B", s.b[t, r]), ("W", s.w[t, r])) if c >= 0]
            cells.append(" ".join(ops) or ".")
        lines.append(f"rank {r}: " + " | ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Host-side tables the pipeline executor (train/pipeline.py) scans over.
SOURCES = ("down", "up", "self")  # an arrival came from rank r-1, from rank r+1, or from this rank


def routes(s: Schedule) -> dict:
    """Host-side: per tick and rank, where each op's output goes and what arrives.

    -> f, b, w [Tk, N, 2] (chunk, micro-batch), split [Tk, N], f_dir / b_dir [Tk, N] (+1: to rank
    r+1, -1: to r-1, 0: this rank, 2: nowhere), act_in / grad_in [Tk, N, 3, 2]: (chunk,
    micro-batch) arriving this tick from each of SOURCES, (-1, -1) none.
    """
    Tk, N = s.ticks, s.ranks
    out = {"f": s.f, "b": s.b, "w": s.w, "split": s.b_split.astype(np.int32)}
    for kind, table, step in (("act", s.f, 1), ("grad", s.b, -1)):
        dirs = np.full((Tk, N), 2, np.int32)
        arrive = np.full((Tk + 1, N, 3, 2), -1, np.int32)
        for t, r in zip(*np.nonzero(table[..., 1] >= 0)):
            c, m = table[t, r]
            nxt = s.stage(r, c) + step
            if 0 <= nxt < s.stages:
                r2, c2 = s.rank_chunk(nxt)
                dirs[t, r] = r2 - r
                arrive[t + 1, r2, {1: 0, -1: 1, 0: 2}[r2 - r]] = (c2, m)
        out[("f" if kind == "act" else "b") + "_dir"] = dirs
        out[kind + "_in"] = arrive[:Tk]
    return out


def buffer_slots(s: Schedule, tabs: dict) -> tuple[dict, dict]:
    """Host-side: which buffer slot each stashed value lives in, per rank.

    An input (chunk, micro-batch) is stored when it arrives and read by its F, B and W; an output
    gradient is stored when it arrives and read by its B and W. A slot is free again the tick after
    its entry's last read (stores come first in a tick). -> ({act_slot, grad_slot [Tk, N, 3]: the
    slot each arrival goes to, -1 none; f_x, b_x, w_x: the input slot each op reads; b_dy, w_dy: the
    gradient slot, 0 where the op reads nothing}, {"act": slots, "grad": slots})."""
    Tk, N = s.ticks, s.ranks
    out, sizes = {}, {}
    for kind, reads in (("act", ("f", "b", "w")), ("grad", ("b", "w"))):
        arrive = tabs[kind + "_in"]
        last = {}  # (rank, chunk, micro-batch) -> last tick that reads it
        for op in reads:
            for t, r in zip(*np.nonzero(tabs[op][..., 1] >= 0)):
                key = (r, *tabs[op][t, r])
                last[key] = max(last.get(key, t), t)
        slot_in = np.full((Tk, N, 3), -1, np.int32)
        read = {op: np.zeros((Tk, N), np.int32) for op in reads}
        size = 1
        for r in range(N):
            where, busy_until = {}, []  # busy_until[slot]: the last tick its entry is read
            for t in range(Tk):
                for i in range(3):
                    c, m = arrive[t, r, i]
                    if m < 0:
                        continue
                    free = [k for k, u in enumerate(busy_until) if u < t]
                    k = free[0] if free else len(busy_until)
                    busy_until[k:k + 1] = [last.get((r, c, m), t)]
                    where[(c, m)] = slot_in[t, r, i] = k
                for op in reads:
                    c, m = tabs[op][t, r]
                    read[op][t, r] = where.get((c, m), 0)  # 0: an op with nothing stashed (stage 0's input)
            size = max(size, len(busy_until))
        out[kind + "_slot"] = slot_in
        out.update({op + ("_x" if kind == "act" else "_dy"): v for op, v in read.items()})
        sizes[kind] = size
    return out, sizes
