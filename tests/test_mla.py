"""MLA: a naive per-head attention written from the weights == the expanded form == the absorbed form,
with and without the latent cache; decoding never expands the cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.cache import LatentCache
from dsv3_jax.context import make_context
from dsv3_jax.infer import SamplingConfig, programs

CFG = preset("tiny", n_mtp_modules=1, vocab_size=128, init_std=0.15)
B, S, T = 2, 10, 16


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def mla(model):
    graphdef, state = nnx.split(model.moe_layers.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).attn


def positions(n, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + n), (B, n))


@nnx.jit(static_argnames=("form", "kv_len"))
def run(mla, x, pos, cache=None, *, form, kv_len=None):
    return mla(x, make_context(CFG, pos, kv_len), cache, 0, form=form)


def naive(mla, x, pos):
    """Eqs. 1-11 head by head in float64 numpy: every key and value expanded, causal softmax."""
    ctx = make_context(CFG, pos)
    q_nope, q_pe = (np.asarray(a, np.float64) for a in mla.queries(x, ctx))
    c_kv, k_pe = (np.asarray(a, np.float64) for a in mla.latent(x, ctx))
    H, Z, O = CFG.n_heads, CFG.qk_nope_head_dim, CFG.v_head_dim
    w = np.asarray(mla.wkv_b.weight[...], np.float64).reshape(H, Z + O, CFG.kv_lora_rank)
    wo = np.asarray(mla.wo.weight[...], np.float64)
    n = x.shape[1]
    out = np.zeros((x.shape[0], n, H, O))
    for b in range(x.shape[0]):
        for h in range(H):
            k = np.concatenate([c_kv[b] @ w[h, :Z].T, k_pe[b]], axis=-1)  # [T, Z+R]
            v = c_kv[b] @ w[h, Z:].T  # [T, O]
            q = np.concatenate([q_nope[b, :, h], q_pe[b, :, h]], axis=-1)  # [S, Z+R]
            scores = q @ k.T * CFG.softmax_scale
            scores[np.triu_indices(n, 1)] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v
    return out.reshape(x.shape[0], n, H * O) @ wo.T


def empty_cache():
    return LatentCache(jnp.zeros((1, B, T, CFG.kv_lora_rank)), jnp.zeros((1, B, T, CFG.qk_rope_head_dim)))


def test_naive_equals_expanded_equals_absorbed(mla):
    x = jax.random.normal(jax.random.key(3), (B, S, CFG.dim))
    want = naive(mla, x, positions(S))
    for form in ("expanded", "absorbed"):
        got, cache = run(mla, x, positions(S), form=form)
        assert cache is None
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=form)


def test_the_cache_holds_the_latents_and_one_decoded_token_equals_the_full_attention(mla):
    x = jax.random.normal(jax.random.key(3), (B, S, CFG.dim))
    c_kv, k_pe = mla.latent(x, make_context(CFG, positions(S)))
    caches = {}
    for form in ("expanded", "absorbed"):
        out, cache = run(mla, x, positions(S), empty_cache(), form=form, kv_len=T)
        np.testing.assert_allclose(out, naive(mla, x, positions(S)), rtol=1e-5, atol=1e-5, err_msg=form)
        np.testing.assert_allclose(cache.c_kv[0, :, :S], c_kv, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cache.k_pe[0, :, :S], k_pe, rtol=1e-6, atol=1e-6)
        assert not cache.c_kv[0, :, S:].any()  # nothing past the written positions
        caches[form] = cache
    np.testing.assert_array_equal(caches["expanded"].c_kv, caches["absorbed"].c_kv)
    # one more token at position S against the cache == naive attention over S+1 tokens
    x1 = jax.random.normal(jax.random.key(4), (B, 1, CFG.dim))
    full = naive(mla, jnp.concatenate([x, x1], 1), positions(S + 1))
    for form in ("expanded", "absorbed"):
        step, _ = run(mla, x1, positions(1, S), caches["absorbed"], form=form, kv_len=T)
        np.testing.assert_allclose(step[:, 0], full[:, S], rtol=1e-5, atol=1e-5, err_msg=form)


def _shapes(jaxpr, out=None):
    """Every intermediate shape in a jaxpr, sub-jaxprs (scan, pjit, cond) included."""
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for val in eqn.params.values():
            for sub in val if isinstance(val, (tuple, list)) else (val,):
                if hasattr(sub, "eqns"):
                    _shapes(sub, out)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _shapes(sub.jaxpr, out)
    return out


def test_the_decode_step_never_expands_the_cache(model, mla):
    """The compiled decode step holds no per-head key or value over the T cache slots, while the
    expanded (training) attention does: the check can tell them apart."""
    H, Z, R, O = CFG.n_heads, CFG.qk_nope_head_dim, CFG.qk_rope_head_dim, CFG.v_head_dim
    Bd, Td = 3, 64
    expanded = {(Bd, Td, H, Z), (Bd, Td, H, O), (Bd, Td, H * (Z + O)), (Bd, Td, H, Z + R)}
    model_def, params = programs.split(model.unstacked())  # as the engine runs it
    state = programs.empty_state(CFG, Bd, Td, n_draft=1, cache_dtype=jnp.bfloat16, hidden_dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, st: programs.step(model_def, p, st, jax.random.key(0), jnp.int32(-1),
                                                      n_draft=1, sampling=SamplingConfig().rows(Bd)))(params, state)
    assert not _shapes(jaxpr.jaxpr) & expanded
    pd = jnp.broadcast_to(jnp.arange(Td), (Bd, Td))
    training = jax.make_jaxpr(lambda x: mla(x, make_context(CFG, pd))[0])(jnp.zeros((Bd, Td, CFG.dim)))
    assert _shapes(training.jaxpr) & expanded
