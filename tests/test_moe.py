"""DeepSeekMoE: the gate against the paper's equations, dropless dispatch against the dense loop,
the balance loss and the load counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.experts import dense_reference, routed_experts, rows_cover_experts, tile_rows, tiled_routed_experts
from dsv3_jax.moe import expert_load, route, sequence_balance_loss


def gate_loop(logits, bias, cfg):
    """Token by token, from V3 report eqs. 12-16 and the node-limited rule of §2.1.2."""
    E, K, G = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups
    out_w, out_i = [], []
    for u in logits.astype(np.float64):
        s = 1 / (1 + np.exp(-u)) if cfg.score_func == "sigmoid" else np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        sb = s + (bias if bias is not None else 0.0)
        per = E // G
        if bias is not None:
            gscore = [np.sort(sb[g * per:(g + 1) * per])[-2:].sum() for g in range(G)]
        else:
            gscore = [sb[g * per:(g + 1) * per].max() for g in range(G)]
        kept = np.argsort(gscore)[::-1][: cfg.n_limited_groups]
        candidates = [e for e in range(E) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -sb[e])[:K]
        w = s[chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        out_w.append(dict(zip(chosen, w * cfg.route_scale)))
    return out_w


def as_dicts(weights, indices):
    return [dict(zip(i.tolist(), w.tolist())) for w, i in zip(np.asarray(weights), np.asarray(indices))]


@pytest.mark.parametrize("cfg", [
    ModelConfig(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4),
    ModelConfig(n_routed_experts=16, n_expert_groups=8, n_limited_groups=3, n_activated_experts=6),
    ModelConfig(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                score_func="softmax", gate_bias=False, norm_topk_prob=False, route_scale=1.0),
    ModelConfig(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4,
                score_func="softmax", gate_bias=False, norm_topk_prob=False, route_scale=16.0),
], ids=["v3", "v3_8groups", "v2_greedy", "v2_group_limited"])
def test_gate_matches_paper_equations(cfg):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, cfg.n_routed_experts)).astype(np.float32)
    bias = (0.3 * rng.normal(size=cfg.n_routed_experts)).astype(np.float32) if cfg.gate_bias else None
    w, i, _ = route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias), cfg)
    want = gate_loop(logits, bias, cfg)
    for got, exp in zip(as_dicts(w, i), want):
        assert sorted(got) == sorted(exp)
        np.testing.assert_allclose([got[e] for e in sorted(exp)], [exp[e] for e in sorted(exp)], rtol=1e-5)


def test_bias_steers_selection_but_never_the_weights():
    cfg = ModelConfig(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    logits = jnp.zeros((1, 8)).at[0, 0].set(2.0).at[0, 1].set(1.0)
    bias = jnp.zeros(8).at[7].set(5.0)  # makes expert 7 win selection
    w, i, s = route(logits, bias, cfg)
    assert 7 in np.asarray(i[0]) and 0 in np.asarray(i[0])
    sig = jax.nn.sigmoid(jnp.array([2.0, 0.0]))  # unbiased scores of experts 0 and 7
    got = dict(zip(np.asarray(i[0]).tolist(), np.asarray(w[0]).tolist()))
    np.testing.assert_allclose([got[0], got[7]], 2.5 * sig / sig.sum(), rtol=1e-6)


def test_dropped_groups_masked_with_minus_inf_not_zero():
    """All biased scores negative: a 0 mask would let an excluded group's expert win."""
    cfg = ModelConfig(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    logits = jnp.zeros((1, 8))  # s = 0.5 everywhere
    bias = jnp.array([-0.6, -0.7, -0.9, -0.95, -1.0, -1.0, -1.0, -1.0])
    _, idx, _ = route(logits, bias, cfg)
    assert sorted(np.asarray(idx[0]).tolist()) == [0, 1]  # the kept group, as the paper's loop says
    assert sorted(gate_loop(np.zeros((1, 8)), np.asarray(bias), cfg)[0]) == [0, 1]
    zero_masked = jnp.where(jnp.arange(8) < 2, 0.5 + bias, 0.0)  # the old multiply-by-zero mask
    assert sorted(np.asarray(jax.lax.top_k(zero_masked, 2)[1]).tolist()) != [0, 1]


def _experts(rng, E=8, D=16, F=12):
    return [jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3) for s in ((E, F, D), (E, D, F), (E, F, D))]


def test_dropless_ragged_equals_dense_loop_values_and_gradients():
    rng = np.random.default_rng(3)
    cfg = ModelConfig(n_routed_experts=8, n_expert_groups=2, n_limited_groups=1, n_activated_experts=3)
    x = jnp.asarray(rng.normal(size=(40, 16)).astype(np.float32))
    w1, w2, w3 = _experts(rng)
    weights, idx, _ = route(jnp.asarray(rng.normal(size=(40, 8)).astype(np.float32)), jnp.zeros(8), cfg)
    args = (x, weights, idx, w1, w2, w3)
    np.testing.assert_allclose(routed_experts(*args, dtype=jnp.float32), dense_reference(*args, dtype=jnp.float32),
                               rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: (f(*a, dtype=jnp.float32) ** 2).sum()  # noqa: E731
    g_r = jax.grad(loss(routed_experts), argnums=(0, 1, 3, 4, 5))(*args)
    g_d = jax.grad(loss(dense_reference), argnums=(0, 1, 3, 4, 5))(*args)
    for a, b in zip(g_r, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dropless_handles_an_expert_nobody_chose():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(10, 16)).astype(np.float32))
    w1, w2, w3 = _experts(rng)
    idx = jnp.asarray(rng.integers(0, 4, size=(10, 2)), jnp.int32)  # experts 4..7 idle
    weights = jnp.full((10, 2), 0.5)
    np.testing.assert_allclose(routed_experts(x, weights, idx, w1, w2, w3, dtype=jnp.float32),
                               dense_reference(x, weights, idx, w1, w2, w3, dtype=jnp.float32), rtol=1e-5, atol=1e-6)


def test_sequence_balance_loss_matches_eqs_17_to_20():
    rng = np.random.default_rng(5)
    B, S, E, K = 3, 10, 8, 2
    scores = rng.uniform(0.05, 1.0, size=(B, S, E)).astype(np.float32)
    idx = np.stack([[rng.choice(E, K, replace=False) for _ in range(S)] for _ in range(B)])
    want = []
    for b in range(B):
        f = np.array([E / (K * S) * sum(i in idx[b, t] for t in range(S)) for i in range(E)])
        p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
        want.append((f * p).sum())
    got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), E)
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
    uniform = sequence_balance_loss(jnp.ones((1, 4, 4)), jnp.array([[[0], [1], [2], [3]]]), 4)
    assert float(uniform) == pytest.approx(1.0)  # perfectly balanced -> 1


def test_expert_load_counts_every_token_copy():
    idx = jnp.array([[0, 3], [3, 1], [3, 0]])
    np.testing.assert_array_equal(expert_load(idx, 5), [2, 1, 0, 3, 0])


@pytest.mark.parametrize("tile", [16, 1])
@pytest.mark.parametrize("load", ["spread", "one_hot_expert", "all_empty"])
def test_tiled_routed_experts_equals_dense_values_and_gradients(load, tile):
    """The CPU-friendly tile loop (tile 16) computes exactly what every-expert-on-every-token does:
    idle experts, an expert over several tiles and its partial last tile, empty slots (id E).
    Tiles of one row are the decode form (`copy_loop_experts`, a loop over the token copies)."""
    rng = np.random.default_rng(7)
    N, K, E = 40, 3, 8
    x = jnp.asarray(rng.normal(size=(N, 16)).astype(np.float32))
    w1, w2, w3 = _experts(rng, E=E)
    ids = np.stack([rng.choice(E // 2, K, replace=False) for _ in range(N)])  # experts 4..7 idle
    ids[::5, -1] = E  # some empty slots
    if load == "one_hot_expert":
        ids[:, 0] = 7  # 40 rows: two full tiles and a partial one
    elif load == "all_empty":
        ids[:] = E
    args = (x, jnp.asarray(rng.uniform(size=(N, K)).astype(np.float32)), jnp.asarray(ids, jnp.int32), w1, w2, w3)
    tiled = lambda *a: tiled_routed_experts(*a, dtype=jnp.float32, tile=tile)  # noqa: E731
    dense = lambda *a: dense_reference(*a, dtype=jnp.float32)  # noqa: E731
    np.testing.assert_allclose(tiled(*args), dense(*args), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()  # noqa: E731
    g_t = jax.grad(loss(tiled), argnums=(0, 1, 3, 4, 5))(*args)
    g_d = jax.grad(loss(dense), argnums=(0, 1, 3, 4, 5))(*args)
    for a, b in zip(g_t, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tile_height_follows_the_mean_rows_per_expert():
    """A decode step's few copies get one-row tiles (only the activated experts are read); a batch
    gets the mean rows per expert as a power of two, at most 64."""
    assert [tile_rows(n, 16) for n in (4, 16, 17, 32, 100, 4096)] == [1, 1, 2, 2, 8, 64]
    assert tile_rows(8 * 256, 256) == 8 and tile_rows(1, 256) == 1


def test_a_few_rows_that_read_every_expert_anyway_run_the_dense_form():
    """Batch 8 of a 16-expert top-4 model (two copies per expert) runs every expert on every row;
    fewer copies keep the copy loop, more rows the tiles, and DeepSeek-V3's 256 experts top-8 keep
    the copy loop for any decode batch under 64 rows."""
    assert rows_cover_experts(8, 4, 16) and rows_cover_experts(16, 4, 16)
    assert not rows_cover_experts(4, 4, 16) and not rows_cover_experts(7, 4, 16)  # under 2 copies per expert
    assert not rows_cover_experts(32, 4, 16)  # a prefill chunk or training batch: E/K x the FLOPs
    assert not any(rows_cover_experts(n, 8, 256) for n in range(1, 64))
    rng = np.random.default_rng(3)
    w1, w2, w3 = _experts(rng, E=16)
    x = jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32))
    ids = jnp.asarray(np.stack([rng.choice(16, 4, replace=False) for _ in range(8)]), jnp.int32)
    gates = jnp.asarray(rng.uniform(size=(8, 4)).astype(np.float32))
    np.testing.assert_allclose(tiled_routed_experts(x, gates, ids, w1, w2, w3, dtype=jnp.float32),
                               tiled_routed_experts(x, gates, ids, w1, w2, w3, dtype=jnp.float32, tile=1),
                               rtol=1e-5, atol=1e-6)
