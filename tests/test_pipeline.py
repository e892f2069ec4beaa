"""Pipeline schedules: tick tables and bubbles against their formulas, and activation memory (XLA's
compiled temporaries) growing with the micro-batch count for GPipe but not for 1F1B."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import preset
from dsv3_jax import sharding
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import batch_sharding, make_mesh
from dsv3_jax.train import pipeline
from dsv3_jax.train.state import split_model

COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("P", [2, 4, 16])
@pytest.mark.parametrize("M", [1, 4, 8, 32])
def test_schedule_tables_and_bubbles(P, M):
    g = pipeline.schedule_table("gpipe", P, M)
    f = pipeline.schedule_table("1f1b", P, M)
    assert g.shape == (P, M + P - 1, 3) and f.shape == (P, M + 2 * P - 2, 3)  # F, B, W slots
    for table in (g, f):  # every stage runs every micro-batch once forward (and once backward)
        np.testing.assert_array_equal(table[..., 0].sum(1), M)
    np.testing.assert_array_equal(f[..., 1].sum(1), M)
    # GPipe: (P-1)/(M+P-1) of the stage-ticks idle, the textbook bubble
    assert float(pipeline.bubble(g)) == pytest.approx((P - 1) / (M + P - 1))
    # lockstep 1F1B: a forward and a backward slot per tick, (2P-2)/(M+2P-2) of them idle...
    assert float(pipeline.bubble(f)) == pytest.approx((2 * P - 2) / (M + 2 * P - 2))
    # ...but no backward runs in the first P-1 ticks and no forward in the last P-1, so with those
    # slots skipped the time is (M+P-1)(F+B): the textbook 1F1B bubble (P-1)/(M+P-1) for any F, B
    for F, B in ((1.0, 1.0), (1.0, 2.0)):
        busy = f.any(axis=0)  # [T, 2]: does any stage run a forward / backward this tick
        time = (busy[:, 0] * F + busy[:, 1] * B).sum()
        assert 1 - M * (F + B) / time == pytest.approx((P - 1) / (M + P - 1))
    # 1F1B keeps at most 2P-1 micro-batch inputs per stage (its ring), GPipe all M
    live = [(f[s, :, 0].cumsum() - f[s, :, 1].cumsum()).max() for s in range(P)]
    assert max(live) <= 2 * P - 1
    # how often each tick branch runs (the dry run's collective counts): every forward but the
    # last stage's (it runs inside its backward) once, alone or paired; every backward once
    for schedule, C in (("1f1b", 1), ("dualpipev", 2)):
        if schedule == "dualpipev" and M < 2 * P:
            continue
        w, ticks = pipeline.slot_weights(schedule, P, M), pipeline.schedule_table(schedule, P, M).shape[1]
        runs = {k: v * ticks * P for k, v in w.items()}
        assert runs["paired_f"] + runs["slot_f"] == pytest.approx(C * M * P - M)
        assert runs["paired_b"] + runs["slot_b"] == pytest.approx(C * M * P)
        assert (runs["slot_w"] > 0) == (schedule == "dualpipev")
    assert pipeline.slot_weights("gpipe", P, M) == {"slot_f": M / (M + P - 1)}


def _temp_bytes(schedule, M, mesh):
    cfg = preset("tiny", n_layers=3, n_mtp_modules=0, vocab_size=128, max_seq_len=64, moe_impl="ep",
                 ep_dispatch="fp32", ep_combine="fp32")
    from dsv3_jax.parallel import stages as st
    graphdef, params, biases = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    layout = pipeline.stage_layout(cfg, mesh.shape["pipeline"], schedule)
    params, biases = (jax.eval_shape(lambda t: st.to_slots(t, layout), t) for t in (params, biases))
    params = sharding.abstract_with(params, sharding.state_shardings(params, mesh))
    biases = sharding.abstract_with(biases, sharding.state_shardings(biases, mesh))
    B, S = M * 4, 64  # one sequence per device per micro-batch (data x expert = 4)
    tok = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=batch_sharding(mesh, (B, S)))
    f = pipeline.make_loss_and_grads(graphdef, cfg, mesh, schedule=schedule, microbatches=M, alpha=1e-4)
    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(params, biases, {"inputs": tok, "targets": tok}, 0.3).compile(COMPILE)
    return compiled.memory_analysis().temp_size_in_bytes, S * cfg.dim * 4  # and one stage input's bytes


@pytest.mark.slow
def test_1f1b_and_dualpipev_activation_memory_does_not_grow_with_microbatches():
    mesh = make_mesh(1, 2, 4)
    growth = {}
    for schedule in ("gpipe", "1f1b", "dualpipev"):
        small, x_bytes = _temp_bytes(schedule, 4, mesh)
        large, _ = _temp_bytes(schedule, 10, mesh)
        growth[schedule] = large - small
    # GPipe's autodiff keeps every tick's stage input (6 more micro-batches -> >= 6 more inputs);
    # 1F1B's and DualPipeV's buffers hold the most inputs and output gradients any rank holds at
    # once (schedule.buffer_slots), the same for M = 4 and M = 10 (DualPipeV: 2P+1 and P); their
    # per-device totals at V3's scale: docs/BENCHMARKS.md
    assert growth["gpipe"] >= 6 * x_bytes, growth
    assert growth["1f1b"] < x_bytes, growth
    assert growth["dualpipev"] < x_bytes, growth


@pytest.mark.parametrize("schedule,P,M", [("1f1b", 4, 8), ("1f1b", 16, 32), ("dualpipev", 4, 8),
                                          ("dualpipev", 16, 32), ("dualpipev", 16, 64)])
def test_stash_buffers_hold_each_value_until_its_last_read_and_no_more_slots(schedule, P, M):
    """Replaying the executor's stores and reads on the host: every read finds the value it wants
    (nothing overwritten early), and the buffers have as many slots as the most values any rank
    holds at once: DualPipeV's 2P+1 inputs (its README's PP+1 chunk activations, counted at the
    lockstep ticks) and P output gradients."""
    from dsv3_jax.train import schedule as sched_lib
    s = sched_lib.build(schedule, P, M)
    tabs = sched_lib.routes(s)
    slots, sizes = sched_lib.buffer_slots(s, tabs)
    for kind, reads, suffix in (("act", "fbw", "_x"), ("grad", "bw", "_dy")):
        held = np.full((P, sizes[kind], 2), -1)
        for t in range(s.ticks):
            for r in range(P):
                for i in range(3):
                    if tabs[kind + "_in"][t, r, i, 1] >= 0:
                        held[r, slots[kind + "_slot"][t, r, i]] = tabs[kind + "_in"][t, r, i]
                for op in reads:
                    c, m = tabs[op][t, r]
                    stored = (tabs[kind + "_in"][:t + 1, r, :, :] == (c, m)).all(-1).any()
                    if m >= 0 and stored:
                        np.testing.assert_array_equal(held[r, slots[op + suffix][t, r]], (c, m), err_msg=(kind, op, t, r))
        assert sizes[kind] <= (2 * P + 1 if kind == "act" else P)
    if schedule == "dualpipev":
        assert (sizes["act"], sizes["grad"]) == (2 * P + 1, P)


def _uneven(schedule, mesh_shape, n_layers, M):
    """A pipelined step over an uneven slot layout against the single-device step: loss, MTP and
    balance losses, gradients (brought back to layer order), loads."""
    from dsv3_jax.parallel import stages as st
    from dsv3_jax.train.step import loss_fn
    cfg = preset("tiny", n_layers=n_layers, vocab_size=128, max_seq_len=32, moe_impl="ep",
                 ep_dispatch="fp32", ep_combine="fp32")
    _, params, biases = split_model(Transformer(cfg.replace(moe_impl="ragged"), rngs=nnx.Rngs(0)))
    if schedule == "dualpipev":  # and the head's loss in chunks of tokens (ModelConfig.loss_chunk)
        cfg = cfg.replace(loss_chunk=8)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    ref_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.replace(moe_impl="ragged", loss_chunk=0),
                                                                   rngs=nnx.Rngs(0))))
    biases = jax.tree.map(lambda b: b + 0.01 * jax.random.normal(jax.random.key(3), b.shape), biases)
    toks = jax.random.randint(jax.random.key(1), (M * mesh_shape[0] * mesh_shape[2], 17), 0, cfg.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)(
        params, biases, ref_graphdef, batch["inputs"], batch["targets"], 0.3, 1e-2)
    mesh = make_mesh(*mesh_shape)
    layout = pipeline.stage_layout(cfg, mesh_shape[1], schedule)
    sp, sb = st.to_slots(params, layout), st.to_slots(biases, layout)
    sp = jax.device_put(sp, sharding.state_shardings(sp, mesh))
    sb = jax.device_put(sb, sharding.state_shardings(sb, mesh))
    tb = jax.device_put(batch, batch_sharding(mesh, batch["inputs"].shape))
    f = pipeline.make_loss_and_grads(graphdef, cfg, mesh, schedule=schedule, microbatches=M, alpha=1e-2,
                                     layout=layout)
    with jax.set_mesh(mesh):
        got_loss, got, got_grads = jax.jit(f).lower(sp, sb, tb, 0.3).compile(COMPILE)(sp, sb, tb, 0.3)
    assert not layout.identity  # the slots really are uneven / V-shaped
    assert float(got_loss) == pytest.approx(float(loss), rel=1e-5)
    for k in ("mtp_loss", "balance_loss"):
        assert float(got[k]) == pytest.approx(float(aux[k]), rel=1e-5), k
    errs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30)),
                        st.from_slots(got_grads, layout), grads)
    assert max(jax.tree.leaves(errs)) < 1e-5
    np.testing.assert_array_equal(got["load"], aux["load"])
    np.testing.assert_array_equal(got["pipeline_activity"], pipeline.schedule_table(schedule, mesh_shape[1], M))
    return layout


@pytest.mark.slow
@pytest.mark.parametrize("schedule,mesh_shape,n_layers,M", [
    ("1f1b", (1, 4, 2), 6, 2),  # 1 dense + 5 MoE layers over 4 stages
    ("dualpipev", (1, 4, 2), 6, 8),  # 5 MoE layers over 8 stages
])
def test_uneven_stages_and_dualpipev_equal_single_device(schedule, mesh_shape, n_layers, M):
    layout = _uneven(schedule, mesh_shape, n_layers, M)
    assert layout.chunks == pipeline.CHUNKS[schedule] and layout.n_layers == n_layers - 1


def test_balanced_split_counts_embedding_head_and_mtp():
    """V3 on PP16: embedding + 3 dense on stage 0, 4 MoE layers on stages 1-14, 2 + head + MTP last."""
    from dsv3_jax.parallel import stages as st
    v3 = preset("v3_671b")
    assert st.balanced(v3, 16) == (0,) + (4,) * 14 + (2,)
    layout = st.make_layout(v3, 16)
    assert layout.n_layers == 58 and layout.slots == 4 and not layout.identity
    with pytest.raises(ValueError, match="pipeline_stage_layers"):
        st.make_layout(v3, 16, 1, (4,) * 16)  # 64 != 58


@pytest.mark.slow
def test_dualpipev_paired_tick_all_to_all_is_independent_of_the_paired_computation():
    """DualPipeV pairs one micro-batch's forward (F) with another's backward (B) in a tick. In the
    compiled program, the branch that runs a pair holds both, and no EP all-to-all of one half uses,
    or is used by, any matmul of the other half: nothing stops a scheduler from running one's
    dispatch and combine under the other's compute (V3 report §3.2.1)."""
    from dsv3_jax.parallel import stages as st
    from dsv3_jax.train import hlo
    cfg = preset("tiny", n_layers=5, vocab_size=128, max_seq_len=32, moe_impl="ep")
    mesh, M = make_mesh(1, 2, 4), 4
    graphdef, params, biases = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    layout = pipeline.stage_layout(cfg, 2, "dualpipev")
    abstract = [jax.eval_shape(lambda t: st.to_slots(t, layout), t) for t in (params, biases)]
    sp, sb = (sharding.abstract_with(t, sharding.state_shardings(t, mesh)) for t in abstract)
    tok = jax.ShapeDtypeStruct((M * 4, 16), jnp.int32, sharding=batch_sharding(mesh, (M * 4, 16)))
    f = pipeline.make_loss_and_grads(graphdef, cfg, mesh, schedule="dualpipev", microbatches=M, alpha=1e-2,
                                     layout=layout)
    with jax.set_mesh(mesh):
        text = jax.jit(f).lower(sp, sb, {"inputs": tok, "targets": tok}, 0.3).compile(COMPILE).as_text()
    comps, _ = hlo.parse(text)

    def half(ins, name):  # the instruction belongs to the pair's F or B (jax.named_scope in the tick)
        return f"/{name}/" in ins.line

    def a2a_in(comp, h):
        return any(half(i, h) and any(op.opcode == "all-to-all" for op in hlo.nested(comps, i))
                   for i in comp.instructions.values())

    pairs = [c for c in comps.values() if a2a_in(c, "paired_f") and a2a_in(c, "paired_b")]
    assert len(pairs) == 2, [c.name for c in pairs]  # F with a full B, F with an input-only (split) B
    for body in pairs:
        runs = {i.name: {op.opcode for op in hlo.nested(comps, i)} for i in body.instructions.values()}
        part = {h: {n for n, i in body.instructions.items() if half(i, h)} for h in ("paired_f", "paired_b")}
        for h, other in (("paired_f", "paired_b"), ("paired_b", "paired_f")):
            a2a = [n for n in part[h] if "all-to-all" in runs[n]]
            dots = [n for n in part[other] if "dot" in runs[n]]
            assert a2a and dots, (body.name, h, a2a, dots)
            for c in a2a:
                ancestors = body.ancestors(c)
                for d in dots:
                    assert d not in ancestors, f"{h}'s {c} waits for {other}'s matmul {d} in {body.name}"
                    assert c not in body.ancestors(d), f"{other}'s matmul {d} waits for {h}'s {c} in {body.name}"
