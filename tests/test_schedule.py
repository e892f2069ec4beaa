"""Pipeline schedule tables (train/schedule.py): numpy only, no compile. Read as the specification.

Costs: F, B, W = 1, 2, 1 per DualPipeV chunk is DeepSeek's design point (B = 2F, W = F): the README's
bubble formula holds exactly there for free-running ranks (checked below by an event-driven run of
the same op orders). A 1F1B stage holds two DualPipeV chunks, so 1F1B is timed with 2F, 2B, 2W.
"""
import dataclasses

import numpy as np
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.train import schedule as S

DESIGN = dict(F=1.0, B=2.0, W=1.0)


def micro(name, N):
    if name == "dualpipev":
        return sorted({2 * N, 2 * N + 1, 3 * N, 4 * N + 3})
    return sorted({1, N, 2 * N + 1, 4 * N + 3})


@pytest.mark.parametrize("name", S.NAMES)
@pytest.mark.parametrize("N", range(1, 9))
def test_every_schedule_validates(name, N):
    for M in micro(name, N):
        s = S.build(name, N, M)
        S.validate(s)
        assert (s.stages, s.microbatches, s.f.shape) == (N * s.chunks, M, (s.ticks, N, 2))


def _replace(s, **tables):
    return dataclasses.replace(s, **{k: v.copy() for k, v in tables.items()})


def _where(table, r, op):
    return int(np.nonzero((table[:, r] == op).all(-1))[0][0])


def test_validate_rejects_broken_tables():
    s = S.build("1f1b", 3, 4)
    S.validate(s)
    f, b, w, split = s.f.copy(), s.b.copy(), s.w.copy(), s.b_split.copy()

    bad = f.copy()  # broken dependency: rank 1 runs F(1, 0) in the tick F(0, 0) runs, not after it
    bad[0, 1], bad[1, 1] = (0, 0), (-1, -1)
    with pytest.raises(ValueError, match=r"tick 0, rank 1, F\(chunk 0, m 0\): needs F\(stage 0, m 0\) at an earlier"):
        S.validate(_replace(s, f=bad))

    bad = b.copy()  # broken dependency: B(0, 0) one tick early, in the tick B(1, 0) runs
    t = _where(b, 0, (0, 0))
    bad[t - 1, 0], bad[t, 0] = (0, 0), (-1, -1)
    with pytest.raises(ValueError, match=r"rank 0, B\(chunk 0, m 0\): needs B\(stage 1, m 0\)"):
        S.validate(_replace(s, b=bad))

    bad = b.copy()  # doubled op: B(0, 0) again in rank 0's last (idle-forward, busy-backward) tick
    bad[-1, 0] = (0, 0)
    with pytest.raises(ValueError, match="doubled op"):
        S.validate(_replace(s, b=bad))

    bad = b.copy()  # missing op (stage 0's: no later op needs it, so only the count notices)
    bad[_where(b, 0, (0, 3)), 0] = (-1, -1)
    with pytest.raises(ValueError, match=r"rank 0, B\(chunk 0, m 3\) of stage 0 is missing"):
        S.validate(_replace(s, b=bad))

    # Two F on one rank in one tick: the table has one F slot per (tick, rank), so a second F can
    # only overwrite the first (which then is missing), or come with a wider table (wrong shape).
    bad = f.copy()
    bad[1, 0] = bad[2, 0]  # m 2 put into tick 1 too, over m 1: seen as m 2 doubled (then m 1 missing)
    with pytest.raises(ValueError, match=r"tick 2, rank 0, F\(chunk 0, m 2\): doubled op"):
        S.validate(_replace(s, f=bad))
    with pytest.raises(ValueError, match=r"F table shape \(8, 3, 2, 2\)"):
        S.validate(dataclasses.replace(s, f=np.stack([f, f], -2)))

    with pytest.raises(ValueError, match="missing"):  # only gpipe may leave its backward to autodiff
        S.validate(_replace(s, b=np.full_like(b, -1)))
    with pytest.raises(ValueError, match="forwards only"):
        S.validate(_replace(S.build("gpipe", 3, 4), b=b[:6]))

    bad = w.copy()  # a W for a B that was not split
    bad[-1, 0] = (0, 3)
    with pytest.raises(ValueError, match="a W needs its B"):
        S.validate(_replace(s, w=bad))
    bad = split.copy()  # a split B whose W never comes
    bad[_where(b, 1, (0, 2)), 1] = True
    with pytest.raises(ValueError, match=r"rank 1, W\(chunk 0, m 2\) of stage 1 is missing"):
        S.validate(_replace(s, b_split=bad))
    bad = f.copy()  # out of range
    bad[0, 0] = (1, 0)
    with pytest.raises(ValueError, match="expected \\(-1, -1\\) or"):
        S.validate(_replace(s, f=bad))


@pytest.mark.parametrize("N,M", [(1, 1), (2, 5), (4, 3), (4, 8), (8, 20)])
def test_closed_forms(N, M):
    """gpipe and 1f1b are pipeline.py's former closed forms: stage s = rank s runs the forward of
    micro-batch t - s at tick t, and (1f1b) the backward of micro-batch t - (2N - 2 - s)."""
    for name, Tk in (("gpipe", M + N - 1), ("1f1b", M + 2 * N - 2)):
        s = S.build(name, N, M)
        t, r = np.arange(Tk)[:, None], np.arange(N)[None]
        expect_f = np.where((t - r >= 0) & (t - r < M), t - r, -1)
        expect_b = np.where((t + r - 2 * N + 2 >= 0) & (t + r - 2 * N + 2 < M), t + r - 2 * N + 2, -1)
        np.testing.assert_array_equal(s.f[..., 1], expect_f)
        np.testing.assert_array_equal(s.b[..., 1], expect_b if name == "1f1b" else -1)
        assert s.ticks == Tk and (s.f[..., 0] == np.where(expect_f >= 0, 0, -1)).all()
        assert not s.b_split.any() and (s.w == -1).all()


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8])
def test_dualpipev_v_layout(N):
    s = S.build("dualpipev", N, 2 * N + 1)
    for r in range(N):  # rank r holds stages r and 2N-1-r: rank 0 the embedding and the head
        assert (s.stage(r, 0), s.stage(r, 1)) == (r, 2 * N - 1 - r)
        assert s.rank_chunk(r) == (r, 0) and s.rank_chunk(2 * N - 1 - r) == (r, 1)
        for table in (s.f, s.b):  # each rank runs each of its two chunks on every micro-batch once
            for c in (0, 1):
                assert sorted(table[table[:, r, 0] == c, r, 1]) == list(range(s.microbatches))


@pytest.mark.parametrize("N,M", [(1, 2), (2, 4), (3, 7), (4, 12), (8, 16)])
def test_dualpipev_runs_deepseek_order(N, M):
    """Every rank consumes its whole 8-step order, in order; an overlapped F&B pair shares a tick."""
    s = S.build("dualpipev", N, M)
    tables = {"F": s.f, "B": s.b, "W": s.w}
    for r in range(N):
        order = S._dualpipev_order(N, M, r)
        ticks = [[_where(tables[op.kind], r, (op.chunk, op.m)) for op in item] for item in order]
        assert all(len(set(t)) == 1 for t in ticks)  # a pair in one tick
        flat = [t[0] for t in ticks]
        assert flat == sorted(flat)
        ops = sum(int((tables[k][:, r, 0] >= 0).sum()) for k in "FBW")
        assert ops == sum(len(item) for item in order)
        for item in order:  # split flags as DeepSeek's enable_zb; W pops the FIFO
            for op in item:
                if op.kind == "B":
                    assert s.b_split[_where(s.b, r, (op.chunk, op.m)), r] == op.split


def free_running_bubble(N, M, F, B, W):
    """Event-driven DualPipeV: each rank runs its order back to back (no ticks, free transfers); an
    item starts when the rank is free and its inputs are made. -> the makespan minus the busy time."""
    orders = [S._dualpipev_order(N, M, r) for r in range(N)]
    end, pos, free = {}, [0] * N, [0.0] * N
    while any(p < len(o) for p, o in zip(pos, orders)):
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                item = order[pos[r]]
                stages = [r if op.chunk == 0 else 2 * N - 1 - r for op in item]
                needs = [need for op, s in zip(item, stages) for need in _inputs(op, s, 2 * N)]
                if any(need not in end for need in needs):
                    break
                t = max([free[r]] + [end[need] for need in needs])
                for op, s in zip(item, stages):  # a pair costs F + B (the README's F&B default)
                    t += {"F": F, "B": B - W if op.split else B, "W": W}[op.kind]
                    end[op.kind, s, op.m] = t
                free[r], pos[r] = t, pos[r] + 1
    return max(free) - 2 * M * (F + B)


def _inputs(op, s, n_stages):
    """The ops whose results `op` (on stage s) consumes, as (kind, stage, micro-batch)."""
    if op.kind == "F":
        return [("F", s - 1, op.m)] if s > 0 else []
    if op.kind == "B":
        return [("F", s, op.m)] + ([("B", s + 1, op.m)] if s < n_stages - 1 else [])
    return [("B", s, op.m)]


def test_free_running_orders_reproduce_the_readme():
    """The orders are DeepSeek's: run free (not in lockstep) they give the README's bubble exactly."""
    for N in (1, 2, 3, 4, 8, 16):
        for M in (2 * N, 4 * N + 1):
            assert free_running_bubble(N, M, **DESIGN) == S.formula_bubble("dualpipev", N, **DESIGN)


# Measured at F, B, W = 1, 2, 1 (DualPipeV chunk units; 1F1B with 2, 4, 2), independent of M >= 2N:
#    N   dualpipev Tk (M=2N, 4N)   dualpipev bubble   README formula   1f1b Tk (M=2N, 4N)   1f1b bubble
#    2        15, 23                     3                  2               6, 10                 6
#    4        31, 47                    10                  6              14, 22                18
#    8        63, 95                    22                 14              30, 46                42
#   16       127, 191                   46                 30              62, 94                90
@pytest.mark.parametrize("N", [2, 4, 8, 16])
def test_dualpipev_bubble_against_1f1b_and_the_readme(N):
    figures = set()
    for M in (2 * N, 4 * N):
        d, o = S.build("dualpipev", N, M), S.build("1f1b", N, M)
        bd, bo = S.bubble(d, **DESIGN), S.bubble(o, F=2.0, B=4.0, W=2.0)
        assert bd["busy"] == bo["busy"] == 6 * M  # the same work per rank
        # lockstep 1F1B is the textbook (PP-1)(F+B) exactly: its warm-up ticks run forwards only,
        # its cool-down backwards only, every other tick has a rank running both
        assert bo["bubble_time"] == S.formula_bubble("1f1b", N, F=2.0, B=4.0) == 6 * (N - 1)
        assert bd["bubble_time"] < bo["bubble_time"]
        # The README's figure is for free-running ranks (test above). In lockstep a tick lasts as
        # long as its busiest rank, which costs in the two transitions: at the warm-up's end a rank
        # running its step-3 'F1 b1' (F + B - W) stretches the tick in which the middle ranks, which
        # feed the V, run a lone F; in the cool-down a lone step-5 B1 sits in a tick of F&B pairs.
        # About one F per rank in all: at most N*F over the formula, independent of M (tight: the
        # table gives exactly N). The steady state of F&B pairs loses nothing.
        formula = S.formula_bubble("dualpipev", N, **DESIGN)
        assert formula < bd["bubble_time"] <= formula + N * DESIGN["F"]
        figures.add(bd["bubble_time"])
        assert d.ticks == 2 * o.ticks + 3  # a DualPipeV tick runs one chunk, half a 1F1B stage
    assert len(figures) == 1  # more micro-batches add steady state, not bubble


@pytest.mark.parametrize("N", [1, 2, 3, 4, 8])
def test_peak_live(N):
    """Stage inputs one rank holds at once (from arrival to its B, or W when split). DualPipeV holds
    PP+1 = 2N+1 of them, the README's figure; lockstep 1F1B 2N-1 (the round trip of one
    micro-batch takes 2N-1 ticks), not the textbook N; gpipe every micro-batch's."""
    for M in (2 * N, 4 * N + 3):
        assert S.bubble(S.build("dualpipev", N, M))["peak_live"] == 2 * N + 1
        assert S.bubble(S.build("1f1b", N, M))["peak_live"] == min(M, 2 * N - 1)
        assert S.bubble(S.build("gpipe", N, M))["peak_live"] == M


def test_bad_input():
    for args, match in [(("zb", 2, 4), "'zb'.*expected one of"), (("1f1b", 0, 4), "ranks=0.*>= 1"),
                        (("1f1b", 2, 0), "microbatches=0.*>= 1"), (("gpipe", 2.0, 4), "ranks=2.0"),
                        (("dualpipev", 4, 7), r"microbatches=7: expected >= 2 \* ranks = 8")]:
        with pytest.raises(ConfigError, match=match):
            S.build(*args)
    with pytest.raises(ConfigError, match="expected one of"):
        S.formula_bubble("zb", 2)
    assert S.formula_bubble("1f1b", 4) == 9 and S.formula_bubble("dualpipev", 4, FB=2.5) == 4.5
