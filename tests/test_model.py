"""The whole model: MTP wiring, scan vs a Python loop, causality, input errors, meshes, 671B sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.mtp import shift_tokens
from dsv3_jax.sharding import batch_sharding, make_mesh, shard_model

CFG = preset("tiny", n_mtp_modules=2, vocab_size=128)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (4, 10), 0, CFG.vocab_size)


forward = nnx.jit(lambda m, t: m.forward(t))


def test_output_shapes_and_dtypes(model, tokens):
    out = forward(model, tokens)
    assert out.logits.shape == (4, 10, 128) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (2, 4, 10, 128)
    n_moe = CFG.n_moe_layers + CFG.n_mtp_modules
    assert out.moe.load.shape == (n_moe, CFG.n_routed_experts) and out.moe.balance.shape == (n_moe,)
    # every token copy lands on some expert in every MoE layer
    np.testing.assert_array_equal(out.moe.load.sum(axis=1), 4 * 10 * CFG.n_activated_experts)
    np.testing.assert_array_equal(model(tokens), out.logits)


def test_mtp_equals_hand_built_computation(model, tokens):
    """h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), shared embedding and head."""
    out = forward(model, tokens)
    ctx = model.context(jnp.broadcast_to(jnp.arange(10), (4, 10)))
    h, _, _ = model.trunk(model.embed(tokens), ctx)
    h = model.norm(h)
    emb_w, head_w = np.asarray(model.embed.weight[...]), np.asarray(model.head[...])
    for k, mod in enumerate(model.mtp, start=1):
        nxt = np.concatenate([np.asarray(tokens)[:, k:], np.zeros((4, k), np.int32)], axis=1)
        cat = np.concatenate([np.asarray(mod.enorm(jnp.asarray(emb_w[nxt]))), np.asarray(mod.hnorm(h))], -1)
        x = cat @ np.asarray(mod.eh_proj.weight[...]).T
        h, _, _ = mod.block(jnp.asarray(x), ctx)
        logits = np.asarray(mod.norm(h)) @ head_w.T
        np.testing.assert_allclose(out.mtp_logits[k - 1], logits, rtol=1e-4, atol=1e-4)


def test_shift_tokens():
    t = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(shift_tokens(t, 1), [[2, 3, 4, 0]])
    np.testing.assert_array_equal(shift_tokens(t, 2), [[3, 4, 0, 0]])


def test_scan_equals_python_loop_over_layers(model, tokens):
    stack = model.moe_layers
    x = jax.random.normal(jax.random.key(2), (4, 10, CFG.dim))
    ctx = model.context(jnp.broadcast_to(jnp.arange(10), (4, 10)))
    y_scan, stats, _ = stack(x, ctx)
    graphdef, state = nnx.split(stack.blocks)
    y = x
    for i in range(stack.n):
        y, st, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(y, ctx)
        np.testing.assert_array_equal(st.load, stats.load[i])
    np.testing.assert_allclose(y_scan, y, rtol=1e-5, atol=1e-5)


def test_causal_changing_token_t_changes_nothing_before_t(model, tokens):
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(a.logits[:, :t], b.logits[:, :t])
    assert np.abs(np.asarray(a.logits[:, t:] - b.logits[:, t:])).max() > 1e-6
    # MTP depth k reads token i+k at position i: positions before t-k are untouched
    for k in (1, 2):
        np.testing.assert_array_equal(a.mtp_logits[k - 1][:, : t - k], b.mtp_logits[k - 1][:, : t - k])


@pytest.mark.parametrize("bad,match", [
    (jnp.array([[0, 1, 128]]), r"\[0, 128\)"),
    (jnp.array([[-1, 3]]), r"\[0, 128\)"),
    (jnp.array([0, 1, 2]), "shape"),
    (jnp.array([[0.5, 1.0]]), "integer"),
])
def test_bad_token_ids_give_a_clear_error(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_same_model_on_a_2x2x2_mesh_gives_the_same_logits(tokens):
    m = nnx.jit(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))()
    want = forward(m, tokens)
    mesh = make_mesh(2, 2, 2)
    shard_model(m, mesh)
    assert m.moe_layers.blocks.ffn.experts.w1[...].sharding.spec[:2] == ("pipeline", "expert")
    got = forward(m, jax.device_put(tokens, batch_sharding(mesh, tokens.shape)))
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.moe.load, want.moe.load)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_v3_671b_sizes_without_memory():
    cfg = preset("v3_671b")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    total = _count(params)
    mtp = _count(nnx.state(abstract.mtp, nnx.Param))
    main = total - mtp
    assert main == pytest.approx(671.0e9, rel=0.005)
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * expert
    activated = main - idle
    assert activated == pytest.approx(37.5e9, rel=0.02)  # "37B activated" incl. embedding and head
    assert mtp == pytest.approx(11.6e9, rel=0.02)  # README_WEIGHTS: 11.5B unique + the block's norms
    assert cfg.kv_cache_bytes_per_token == 70_272
    # and the forward pass traces at full size without allocating anything
    out = jax.eval_shape(lambda m, t: m(t), abstract, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    assert out.shape == (1, 16, 129280) and out.dtype == jnp.float32
