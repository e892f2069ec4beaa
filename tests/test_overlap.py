"""Two-micro-batch overlap: same outputs as the plain forward, and in the compiled HLO each
micro-batch's EP all-to-alls are independent of the other micro-batch's attention matmuls."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import preset
from dsv3_jax.model import Transformer
from dsv3_jax.block import MICRO, join_pair, split_pair
from dsv3_jax.errors import ConfigError
from dsv3_jax.parallel import xla_flags
from dsv3_jax.sharding import batch_sharding, make_mesh, shard_model
from dsv3_jax.train import hlo

CFG = preset("tiny", vocab_size=128, max_seq_len=32)
COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.slow
def test_overlapped_forward_equals_forward():
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)

    def run(forward):
        f = jax.jit(lambda st, t: forward(nnx.merge(graphdef, st), t))
        return f.lower(state, tokens).compile(COMPILE)(state, tokens)

    want = run(lambda m, t: m.forward(t))
    got = run(lambda m, t: m.forward(t, overlap=True))
    for a, b in ((got.logits, want.logits), (got.mtp_logits, want.mtp_logits), (got.moe.balance, want.moe.balance)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.moe.load, want.moe.load)
    a, b = split_pair(tokens)
    np.testing.assert_array_equal(join_pair(a, b), tokens)


def test_all_to_all_of_one_micro_batch_is_independent_of_the_others_matmuls():
    """In the scanned layer body of the compiled program: no all-to-all of micro-batch A uses, or is
    used by, any matmul of micro-batch B (attention core, projections, gate, experts), and vice versa.

    XLA:CPU drops the op_name of the attention-core dots (batched einsums), so a micro-batch's
    matmuls are found by data flow: every dot its own all-to-alls depend on, plus the dots that
    still carry its named scope."""
    model = Transformer(CFG.replace(moe_impl="ep"), rngs=nnx.Rngs(0))  # FP8 dispatch, BF16 combine
    mesh = make_mesh(2, 1, 4)
    shard_model(model, mesh)
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (16, 16), 0, CFG.vocab_size)  # 2 x 8 rows: 1 per device
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda st, t: nnx.merge(graphdef, st).forward(t, overlap=True).logits)
        text = fn.lower(state, jax.device_put(tokens, batch_sharding(mesh, tokens.shape))).compile(COMPILE).as_text()
    comps, _ = hlo.parse(text)
    body = max(comps.values(), key=lambda c: sum(i.opcode == "all-to-all" for i in c.instructions.values()))
    is_dot = {i.name: [op for op in hlo.nested(comps, i) if op.opcode == "dot"] for i in body.instructions.values()}
    a2a, dots, core = {}, {}, {}
    for m in MICRO:
        a2a[m] = [i.name for i in body.instructions.values() if i.opcode == "all-to-all" and f"/{m}/" in i.line]
        upstream = set().union(*(body.ancestors(c) for c in a2a[m]))
        named = {n for n, ds in is_dot.items() if any(f"/{m}/" in d.line for d in ds)}
        dots[m] = named | {n for n in upstream if is_dot[n]}
        core[m] = {n for n in upstream if is_dot[n] and not any("op_name" in d.line for d in is_dot[n])}
    for m in MICRO:  # the layer body holds both micro-batches' dispatch, combine and matmuls
        assert len(a2a[m]) >= 2 and len(dots[m]) >= 8 and len(core[m]) >= 2, (m, a2a, dots, core)
    assert not dots["mb0"] & dots["mb1"]
    for m, other in (("mb0", "mb1"), ("mb1", "mb0")):
        for c in a2a[m]:
            ancestors = body.ancestors(c)
            for d in dots[other]:
                assert d not in ancestors, f"{m}'s {c} waits for {other}'s matmul {d}"
                assert c not in body.ancestors(d), f"{other}'s matmul {d} waits for {m}'s {c}"


def test_gpu_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    added = xla_flags.set_gpu_xla_flags()
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags  # the user's setting wins
    assert flags.count("latency_hiding_scheduler") == 1 and added == list(xla_flags.GPU_XLA_FLAGS[1:])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not xla_flags.gpu_requested()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert xla_flags.gpu_requested()


@pytest.mark.parametrize("bad", [(3, 16)])
def test_overlap_needs_an_even_batch(bad):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="even batch"):
        model.forward(jax.numpy.zeros(bad, jax.numpy.int32), overlap=True)


def test_collective_bytes_counts_loops_and_narrow_types():
    """3 loop iterations x (all-to-all + permute of a [4,4] f32 block) + one psum; bf16 stays 2 bytes."""
    from jax import lax
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh(2, 2, 2)

    def body(x, w):
        def step(c, _):
            y = lax.all_to_all(c @ w, "expert", 0, 0, tiled=True)
            return lax.ppermute(y, "pipeline", [(0, 1)]), None
        c, _ = lax.scan(step, x, None, length=3)
        half = lax.all_to_all(c.astype(jax.numpy.bfloat16), "expert", 0, 0, tiled=True)
        return lax.psum(c + half.astype(c.dtype), "data")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(("data", "pipeline", "expert")), P()),
                              out_specs=P(("pipeline", "expert"))))
    text = f.lower(jax.numpy.ones((32, 4)), jax.numpy.ones((4, 4))).compile().as_text()
    got = hlo.collective_bytes(text)
    assert got["all-to-all"]["count"] == 4 and got["all-to-all"]["bytes"] == 3 * 64 + 32
    assert got["collective-permute"]["count"] == 3 and got["collective-permute"]["bytes"] == 3 * 64
    assert got["all-reduce"]["count"] == 1 and got["all-reduce"]["bytes"] == 64
