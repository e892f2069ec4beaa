"""Cached forward passes with absorbed MLA: DeepSeek's reference "absorb" mode in JAX.

Shape letters: B batch, S new tokens, T cache slots read, D `dim`, H heads, C `kv_lora_rank`,
N `qk_nope_head_dim`, R `qk_rope_head_dim`, Dv `v_head_dim`, L layers.

`wkv_b` maps the latent c [C] to per-head k_nope [N] and v [Dv]; viewed as [H, N + Dv, C] its
first N rows per head are W_UK, the last Dv rows W_UV. Because both maps are linear,

    q_nope . k_nope_t      = q_nope . (W_UK c_t)  = (q_nope W_UK) . c_t
    sum_t p_t v_t          = sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t)

so W_UK is folded into the query (q_absorbed [B,S,H,C]), W_UV is applied once after attention,
and the scores and the weighted sum run against the cached latent directly:

    scores = (q_absorbed . c_kv + q_pe . k_pe) * softmax_scale.

No step ever multiplies the cache by `wkv_b`; per token a layer reads C + R numbers, not
H x (N + R + Dv).

Prefill is the other regime: S new tokens against T = S slots. There the heads attend in
C + R = 576 (scores) and C = 512 (values) dims when absorbed, against N + R = 192 and Dv = 128
when K/V are expanded from the latents once (2 T C H (N + Dv) FLOPs), so attention costs ~3.4x
less expanded at V3 size once S is in the hundreds. `expand=True` (the engine's prefill) does
that, as DeepSeek's inference does; it writes the same latent cache either way.

Everything here takes the model's own modules (the same `Transformer`, no weight copies): the
scanned stacks are split with `nnx.split(stack.blocks)` and scanned together with the layer index,
the stack's cache riding in the carry so each layer writes only its S new slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.attention import NEG_INF
from dsv3_jax.block import Block, BlockStack
from dsv3_jax.infer.cache import Cache, LatentCache
from dsv3_jax.mla import MLA
from dsv3_jax.model import Transformer
from dsv3_jax.rope import rope_tables
from pallas_kernels import dequantize_weight_128x128


def absorbed_weights(mla: MLA) -> tuple[jax.Array, jax.Array]:
    """wkv_b [H(N+Dv), C] -> W_UK [H,N,C], W_UV [H,Dv,C] (views of the same parameter).

    An FP8-stored wkv_b is dequantized with its 128x128 block scales first, as DeepSeek's
    reference does for absorption (the two halves are contracted over different axes, so the
    block-scaled GEMM does not apply).
    """
    cfg = mla.cfg
    w = mla.wkv_b.weight[...]
    if mla.wkv_b.fp8_weights:
        w = dequantize_weight_128x128(w, mla.wkv_b.weight_scale_inv[...], out_dtype=mla.wkv_b.dtype)
    w = w.reshape(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


def cached_attention(mla: MLA, x, cos, sin, positions, cache: LatentCache, layer, *, kv_len: int,
                     expand: bool = False):
    """x [B,S,D] at `positions` [B,S] -> (out [B,S,D], cache with the S new latents written).

    The queries attend over the first `kv_len` slots of `layer` in `cache`; slot t is visible from
    the query at position p iff t <= p (see cache.py for why that is the only mask needed).
    Absorbed (decode) by default; `expand` expands the read latents into per-head k_nope / v
    through `wkv_b` first (prefill, where S ~ kv_len). The two are equal up to rounding.
    """
    cfg = mla.cfg
    dt = mla.wkv_b.dtype
    q_nope, q_pe = mla.queries(x, cos, sin)  # [B,S,H,N], [B,S,H,R]
    c_new, pe_new = mla.latent(x, cos, sin)  # [B,S,C], [B,S,R]
    cache = cache.write(layer, positions, c_new, pe_new)
    c = cache.c_kv[layer, :, :kv_len].astype(dt)  # [B,T,C]
    pe = cache.k_pe[layer, :, :kv_len].astype(dt)  # [B,T,R]
    if expand:
        k_nope, v = mla.expand(c)  # [B,T,H,N], [B,T,H,Dv]
        content = jnp.einsum("bshn,bthn->bsht", q_nope, k_nope, preferred_element_type=jnp.float32)
    else:
        w_uk, w_uv = absorbed_weights(mla)
        q_abs = jnp.einsum("bshn,hnc->bshc", q_nope, w_uk.astype(dt))  # [B,S,H,C]
        content = jnp.einsum("bshc,btc->bsht", q_abs, c, preferred_element_type=jnp.float32)
    scores = content + jnp.einsum("bshr,btr->bsht", q_pe, pe, preferred_element_type=jnp.float32)
    visible = jnp.arange(kv_len)[None, None, :] <= positions[:, :, None]  # [B,S,T]
    scores = jnp.where(visible[:, :, None, :], scores * cfg.softmax_scale, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if expand:
        out = jnp.einsum("bsht,bthd->bshd", probs, v.astype(jnp.float32)).astype(dt)  # [B,S,H,Dv]
    else:
        o_latent = jnp.einsum("bsht,btc->bshc", probs, c.astype(jnp.float32))  # [B,S,H,C]
        out = jnp.einsum("bshc,hdc->bshd", o_latent.astype(dt), w_uv.astype(dt))  # [B,S,H,Dv]
    return mla.wo(out.reshape(*x.shape[:2], cfg.n_heads * cfg.v_head_dim)), cache


absorbed_attention = functools.partial(cached_attention, expand=False)
expanded_attention = functools.partial(cached_attention, expand=True)


def block_forward(block: Block, x, cos, sin, positions, cache: LatentCache, layer, *, kv_len: int,
                  expand: bool = False):
    """One decoder block over S new tokens (absorbed attention, or expanded with `expand`):
    x [B,S,D] -> x, cache."""
    a, cache = cached_attention(block.attn, block.attn_norm(x), cos, sin, positions, cache, layer,
                                kv_len=kv_len, expand=expand)
    x = x + a
    h = block.ffn_norm(x)
    # MoE routes the B*S tokens like any others (dropless); its statistics are unused and
    # removed by XLA.
    y = block.ffn(h)[0] if block.moe else block.ffn(h)
    return x + y, cache


def stack_forward(stack: BlockStack, x, cos, sin, positions, cache: LatentCache, *, kv_len: int,
                  expand: bool = False):
    """The scanned layers of one stack, the stack's cache [L,B,T,...] carried through the scan."""
    graphdef, state = nnx.split(stack.blocks)

    def body(carry, xs):
        h, c = carry
        layer_state, layer = xs
        h, c = block_forward(nnx.merge(graphdef, layer_state), h, cos, sin, positions, c, layer,
                             kv_len=kv_len, expand=expand)
        return (h, c), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(stack.n)))
    return x, cache


def forward_cached(model: Transformer, cache: Cache, tokens, positions, *, kv_len: int,
                   expand: bool = False):
    """tokens, positions [B,S] -> hidden state [B,S,D] before the final norm, updated cache.

    Prefill is the call with positions 0..S-1, kv_len = S and expand=True; a decode step or a
    speculative verification is the call with positions length + (0..S-1) and kv_len = T.
    """
    cos, sin = rope_tables(model.cfg, positions)
    h = model.embed(tokens)
    stacks = [s for s in (model.dense_layers, model.moe_layers) if s is not None]
    layers = []
    for stack, c in zip(stacks, cache.layers, strict=True):
        h, c = stack_forward(stack, h, cos, sin, positions, c, kv_len=kv_len, expand=expand)
        layers.append(c)
    return h, Cache(layers=tuple(layers), mtp=cache.mtp)


def mtp_forward(model: Transformer, k: int, h_prev, next_tokens, positions, cache: LatentCache, *,
                kv_len: int, expand: bool = False):
    """MTP module k (0-based) over S positions: h_prev [B,S,D] (the main model's normalised
    output for k = 0, module k-1's output after that), next_tokens [B,S] = the token k+1 places
    ahead of each position -> h [B,S,D] (before the module's norm), the module's cache."""
    module = model.mtp[k]
    cos, sin = rope_tables(model.cfg, positions)
    emb = module.enorm(model.embed(next_tokens))
    x = module.eh_proj(jnp.concatenate([emb, module.hnorm(h_prev)], axis=-1))
    return block_forward(module.block, x, cos, sin, positions, cache, 0, kv_len=kv_len, expand=expand)
