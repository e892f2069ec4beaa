"""Multi-head Latent Attention (V3 report §2.1.1, eqs. 1-11), in its expanded and absorbed forms.

Shape letters (the package legend): B batch, S query tokens, T key slots, D `dim`, H heads,
Q `q_lora_rank`, C `kv_lora_rank`, Z `qk_nope_head_dim`, R `qk_rope_head_dim`, O `v_head_dim`.

Keys and values are compressed into one latent c_kv [B,T,C] (plus a single roped key k_pe [B,T,R]
shared by all heads); `wkv_b` expands the latent into per-head k_nope and v. Queries go through a
Q-rank bottleneck (`wq_a` -> `q_norm` -> `wq_b`) unless q_lora_rank == 0 (V2-Lite: one `wq`).
Only the decoupled R-dim part carries position (RoPE).

Two forms of the same attention, chosen per call (`form`):

  expanded  `wkv_b` expands every key latent into k_nope [B,T,H,Z] and v [B,T,H,O]; the heads attend
            in Z + R = 192 and O = 128 dims (V3 size). Training, and prefill, where S ~ T.
  absorbed  DeepSeek's "absorb" mode, for decoding. Viewed as [H, Z + O, C], `wkv_b`'s first Z rows
            per head are W_UK and the last O rows W_UV. Both maps are linear, so

                q_nope . k_nope_t  = q_nope . (W_UK c_t)  = (q_nope W_UK) . c_t
                sum_t p_t v_t      = sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t)

            W_UK is folded into the query (q_absorbed [B,S,H,C]), W_UV applied once after
            attention, and every head attends to the one latent key [c_t; k_pe_t] (C + R = 576
            dims) and value c_t (C = 512). No step multiplies the cache by `wkv_b`: per token a layer
            reads C + R numbers, not H x (Z + R + O).

The two are equal up to rounding; attention costs ~3.4x less expanded once S is in the hundreds
(2 T C H (Z + O) FLOPs expand the latents), ~H (Z + R + O) / (C + R) x less memory traffic
absorbed when S is a few tokens against a long cache.

With a latent cache (`cache.py`) the S new latents are written at their positions first and the
queries attend over the first T slots; without one they attend over themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.attention import attention
from dsv3_jax.cache import LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.context import Context
from dsv3_jax.errors import ConfigError
from dsv3_jax.layers import Linear, RMSNorm
from dsv3_jax.rope import apply_rope
from pallas_kernels import dequantize_weight_128x128

FORMS = ("expanded", "absorbed")
# checkpoint_name of the block's attention output (after wo): what the "save_attn_moe" remat
# policies keep (block.REMAT)
ATTN_OUT = "attn_out"
# The latent norms' eps is fixed, not rms_norm_eps: DeepSeek's reference and transformers build them
# with the RMSNorm default (it matters where rms_norm_eps differs, e.g. Moonlight's 1e-5).
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                  impl=cfg.linear_impl, fp8_weights=cfg.fp8_weights, pow2_act_scale=cfg.fp8_act_scale == "ue8m0")
        H = cfg.n_heads
        if cfg.q_lora_rank:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), **kw)
            self.q_norm = RMSNorm(cfg.q_lora_rank, "q_lora", eps=LATENT_NORM_EPS, param_dtype=cfg.param_dtype)
            self.wq_b = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, ("heads", "q_lora"), **kw)
        else:
            self.wq = Linear(cfg.dim, H * cfg.qk_head_dim, ("heads", "embed"), **kw)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("kv_lora", "embed"), **kw)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, "kv_lora", eps=LATENT_NORM_EPS, param_dtype=cfg.param_dtype)
        self.wkv_b = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            ("heads", "kv_lora"), **kw)
        self.wo = Linear(H * cfg.v_head_dim, cfg.dim, ("embed", "heads"), **kw)
        self.cfg = cfg

    def queries(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
        """x [B,S,D] -> q_nope [B,S,H,Z], q_pe [B,S,H,R] (roped)."""
        cfg = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.reshape(*x.shape[:2], cfg.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, ctx.cos, ctx.sin)

    def latent(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
        """x [B,S,D] -> c_kv [B,S,C] (normalised), k_pe [B,S,R] (roped): all that a cache holds."""
        c_kv, k_pe = jnp.split(self.wkv_a(x), [self.cfg.kv_lora_rank], axis=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], ctx.cos, ctx.sin)[:, :, 0, :]
        return self.kv_norm(c_kv), k_pe

    def expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """c_kv [B,T,C] -> k_nope [B,T,H,Z], v [B,T,H,O] through wkv_b."""
        cfg = self.cfg
        kv = self.wkv_b(c_kv).reshape(*c_kv.shape[:2], cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)

    def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
        """wkv_b [H(Z+O), C] -> W_UK [H,Z,C], W_UV [H,O,C] (views of the same parameter).

        An FP8-stored wkv_b is dequantized with its 128x128 block scales first, as DeepSeek's
        reference does for absorption (the two halves are contracted over different axes, so the
        block-scaled GEMM does not apply).
        """
        cfg = self.cfg
        w = self.wkv_b.weight[...]
        if self.wkv_b.fp8_weights:
            w = dequantize_weight_128x128(w, self.wkv_b.weight_scale_inv[...], out_dtype=self.wkv_b.dtype)
        w = w.reshape(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank).astype(self.wkv_b.dtype)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def __call__(self, x: jax.Array, ctx: Context, cache: LatentCache | None = None, layer=0, *,
                 form: str = "expanded") -> tuple[jax.Array, LatentCache | None]:
        """x [B,S,D] -> (y [B,S,D], cache with the S new latents written at ctx.positions in `layer`)."""
        cfg, dt = self.cfg, self.wkv_b.dtype
        q_nope, q_pe = self.queries(x, ctx)  # [B,S,H,Z], [B,S,H,R]
        c_kv, k_pe = self.latent(x, ctx)  # [B,S,C], [B,S,R]
        if cache is not None:
            cache = cache.write(layer, ctx.positions, c_kv, k_pe, ctx.cache_rows())
            c_kv, k_pe = cache.read(layer, ctx.kv_len, dt)  # [B,T,C], [B,T,R]
        if ctx.join_rows:
            out = self._mixed(q_nope, q_pe, c_kv, k_pe, ctx, cache.read_row(layer, ctx.join_slot, ctx.kv_len, dt), form)
        else:
            out = self._attend(q_nope, q_pe, c_kv, k_pe, ctx.mask, form)  # [B,S,H,O]
        y = self.wo(out.reshape(*x.shape[:2], cfg.n_heads * cfg.v_head_dim))
        return jax.ad_checkpoint.checkpoint_name(y, ATTN_OUT), cache

    def _mixed(self, q_nope, q_pe, c_kv, k_pe, ctx: Context, row: tuple[jax.Array, jax.Array], form: str) -> jax.Array:
        """A mixed step's attention (`Context.join_slot`): the first B query rows attend their own
        cache rows (c_kv, k_pe [B,T,...]); the last J, one prompt chunk a token per row, attend cache
        row join_slot (`row`: its c_kv, k_pe [1,T,...]) as one sequence of J*S queries, causal by
        position, so each token sees the chunk up to itself. The chunk has no cache rows of its own:
        the cache stays B rows deep while the batch is B + J."""
        J, S = ctx.join_rows, q_nope.shape[1]
        B = q_nope.shape[0] - J

        def chunk(a):  # [J,S,...] -> [1,J*S,...]
            return a[B:].reshape(1, J * S, *a.shape[2:])

        joined = self._attend(chunk(q_nope), chunk(q_pe), *row, chunk(ctx.mask), form)
        joined = joined.reshape(J, S, *joined.shape[2:])
        if not B:  # the chunk alone (the MTP modules filling their caches: infer.programs.Join.fill)
            return joined
        out = self._attend(q_nope[:B], q_pe[:B], c_kv, k_pe, ctx.mask[:B], form)
        return jnp.concatenate([out, joined], axis=0)

    def _attend(self, q_nope, q_pe, c_kv, k_pe, mask, form: str) -> jax.Array:
        """q_nope [B,S,H,Z], q_pe [B,S,H,R] over the latents c_kv [B,T,C], k_pe [B,T,R] -> [B,S,H,O]."""
        cfg, dt = self.cfg, self.wkv_b.dtype
        if form == "expanded":
            k_nope, v = self.expand(c_kv)  # [B,T,H,Z], [B,T,H,O]
            k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], cfg.n_heads, cfg.qk_rope_head_dim))
            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
            return attention(q, k, v, mask, scale=cfg.softmax_scale, impl=cfg.attn_impl)  # [B,S,H,O]
        elif form == "absorbed":
            w_uk, w_uv = self.absorbed_weights()
            q_abs = jnp.einsum("bshz,hzc->bshc", q_nope.astype(dt), w_uk)  # [B,S,H,C]
            q = jnp.concatenate([q_abs, q_pe.astype(dt)], axis=-1)  # [B,S,H,C+R]
            k = jnp.concatenate([c_kv, k_pe], axis=-1).astype(dt)[:, :, None]  # [B,T,1,C+R]
            o_latent = attention(q, k, c_kv.astype(dt)[:, :, None], mask, scale=cfg.softmax_scale,
                                 impl=cfg.attn_impl)  # [B,S,H,C]
            return jnp.einsum("bshc,hoc->bsho", o_latent, w_uv)  # [B,S,H,O]
        raise ConfigError(f"MLA form={form!r}: expected one of {FORMS}")
