"""Memory-efficient attention: a blockwise (flash) path in pure JAX, and adapters for the library
flash kernels; `attention(..., impl=...)` in attention.py reaches all of them.

Shape letters (the package legend, `dsv3_jax/__init__.py`): B batch, S queries, T keys, H heads,
Hk key/value heads (H, or 1 when every head attends to one shared key: MLA's absorbed form), Dk
query/key width, Dv value width; bq and bk are a tile's query rows and key slots.

The reference attention materializes the scores [B,H,S,T]: 8 GiB per sequence in float32 at V3 size
(H = 128, S = T = 4096), several times over in the backward. The blockwise path holds one
[B,bq,H,bk] tile of them at a time.

Forward: the online softmax (FlashAttention-2, Dao 2023, §3.1). For each block of bq queries the
key blocks are visited in turn, keeping per row a running maximum m, a running sum
l = sum_t exp(s_t - m) and an unnormalized output acc = sum_t exp(s_t - m) v_t, all float32. A tile
whose maximum raises m to m' first rescales l and acc by exp(m - m'); after the last tile acc / l is
the softmax-weighted sum of the values. Kept for the backward: the output O and the per-row
log-sum-exp lse = m + log l.

Backward: storing the probabilities would bring back the [S,T] memory the forward avoided, so each
tile's scores are recomputed from q and k, and lse gives the probabilities in one step,
p = exp(s - lse). With dp = dO v^T and delta = rowsum(dO * O) (which equals sum_t p_t dp_t), the
score gradient is ds = p (dp - delta); then dq += ds k, dk += ds^T q, dv += p^T dO, tile by tile.
Residuals: q, k, v, O and lse, O(S) per head, and the caller's [B,S,T] mask, which no head copies.

Tiles in which the mask hides every key from every query of every batch row are skipped, forward
and backward (a `lax.cond` on a [S/bq, T/bk] table computed once from the mask): about half of the
tiles of a causal mask. Padding (block sizes that do not divide S or T) is masked like any other
hidden key.

A query row that sees no key: the reference's finite NEG_INF gives it a uniform softmax, the mean of
v over the T slots. Skipped tiles and the library kernels cannot reproduce that, so every path here
computes such rows however it likes (finite: `_kernel_mask` shows the kernels slot 0) and replaces
them with that mean (`_fill_empty_rows`), through which the gradient then flows as in the reference.

The library kernels, each behind the same signature:
  splash   TPU: jax's Pallas splash kernel (Dk != Dv natively; Hk = 1 as its MQA form). It does not
           scale, so q is pre-scaled; the mask goes in as a dynamic per-row mask (its tiles, S*T
           bools per batch row, not per head), the kernel vmapped over B. Interpret mode off TPU.
  tokamax  GPU: tokamax.dot_product_attention(implementation="mosaic"), which takes Dv != Dk. The
           optional `gpu` extra: imported on first use, so the package imports without it.
  cudnn    GPU: cuDNN flash attention through jax.nn.dot_product_attention, which wants v as wide
           as k: v is zero-padded to Dk and the output cut back to Dv. Dk <= 256 on Hopper, so the
           absorbed form (Dk = 576) cannot use it. The bool mask becomes a [B,1,S,T] bias.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from dsv3_jax.errors import ConfigError
from dsv3_jax.vma import vary_like
from pallas_kernels.common import cdiv

# Hidden scores: finite, so a tile whose rows see nothing yet gives exp(0) and never 0/0 or inf - inf;
# rows that never see a key are replaced by `_fill_empty_rows`, so the value itself never shows.
MASKED = -1e30
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FlashTuning:
    """Tile sizes: block_q query rows by block_kv key slots. The blockwise path clamps them to S and T
    (a one-token decode step gets bq = 1); splash needs block_kv a multiple of 128 (TPU lanes)."""

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        for f in ("block_q", "block_kv"):
            if getattr(self, f) <= 0:
                raise ValueError(f"FlashTuning.{f}={getattr(self, f)}: expected a positive integer")


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> None:
    """q [B,S,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv] with Hk = H or 1, mask [B,S,T] bool; else ValueError."""
    ok = q.ndim == k.ndim == v.ndim == 4
    if ok:
        (B, S, H, Dk), (T, Hk) = q.shape, k.shape[1:3]
        ok = (k.shape[0] == B and k.shape[3] == Dk and Hk in (H, 1) and v.shape[:3] == k.shape[:3]
              and mask.shape == (B, S, T) and mask.dtype == jnp.bool_)
    if not ok:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} and mask {mask.shape} "
                         f"{mask.dtype} do not fit q [B,S,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv] "
                         "(Hk = H or 1), mask [B,S,T] bool")


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero- (or False-) pad one axis at its end up to `size`; no copy when it is already there."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _kernel_mask(mask: jax.Array) -> jax.Array:
    """mask [B,S,T] with rows that see nothing shown slot 0, so that no kernel divides by a zero sum
    (its output on those rows is replaced by `_fill_empty_rows`)."""
    empty = ~mask.any(-1, keepdims=True)
    return mask | (empty & (jnp.arange(mask.shape[-1]) == 0))


def _fill_empty_rows(out: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
    """out [B,S,H,Dv] with each row that sees no key set to the reference's value there: the uniform
    softmax's output, the mean of v over all T slots."""
    empty = ~mask.any(-1)  # [B,S]
    mean_v = v.astype(F32).mean(axis=1)[:, None]  # [B,1,Hk,Dv]
    return jnp.where(empty[:, :, None, None], mean_v.astype(out.dtype), out)


# ---- blockwise, pure JAX -----------------------------------------------------------------------
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                        tuning: FlashTuning = FlashTuning()) -> jax.Array:
    """q [B,S,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv], mask [B,S,T] -> [B,S,H,Dv] in q's dtype; equal to
    the reference attention in value and gradient, in O(S) memory per head."""
    check_shapes(q, k, v, mask)
    S, T = q.shape[1], k.shape[1]
    bq, bk = min(tuning.block_q, S), min(tuning.block_kv, T)
    Sp, Tp = cdiv(S, bq) * bq, cdiv(T, bk) * bk
    kb, vb = _pad(k, 1, Tp), _pad(v, 1, Tp)
    if k.shape[2] == 1 and q.shape[2] > 1:  # one key for all heads: contract it without a broadcast copy
        kb, vb = kb[:, :, 0], vb[:, :, 0]
    maskb = _pad(_pad(mask, 1, Sp), 2, Tp)  # padded rows are cut off below; padded slots stay hidden
    out = _blockwise(_pad(q, 1, Sp), kb, vb, maskb, float(scale), bq, bk)[:, :S]
    return _fill_empty_rows(out, mask, v)


def _specs(shared: bool) -> tuple[str, str, str]:
    """Tile einsums: scores q.k -> [B,bq,H,bk]; probs.v -> [B,bq,H,D]; probs^T.x -> key-shaped."""
    kv = "bkd" if shared else "bkhd"
    return f"bqhd,{kv}->bqhk", f"bqhk,{kv}->bqhd", f"bqhk,bqhd->{kv}"


def _block(x: jax.Array, i, size: int, axis: int = 1) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _unblock(x: jax.Array) -> jax.Array:
    """[n,B,b,...] stacked by a loop over blocks -> [B,n*b,...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _live_tiles(mask: jax.Array, bq: int, bk: int) -> jax.Array:
    """mask [B,Sp,Tp] -> [Sp/bq, Tp/bk] bool: the tile shows some key to some query. Reduced over the
    batch once, so a batch-sharded mask costs one collective, not one per tile."""
    B, Sp, Tp = mask.shape
    return mask.reshape(B, Sp // bq, bq, Tp // bk, bk).any(axis=(0, 2, 4))


def _scores(q_i, k_j, mask_ij, scale: float, qk: str) -> jax.Array:
    """One tile: q_i [B,bq,H,Dk], k_j [B,bk,(H,)Dk], mask_ij [B,bq,bk] -> float32 [B,bq,H,bk],
    scaled and masked exactly as the reference does."""
    s = jnp.einsum(qk, q_i, k_j, preferred_element_type=F32) * scale
    return jnp.where(mask_ij[:, :, None, :], s, MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, mask, scale, bq, bk):
    """Padded operands (S, T multiples of bq, bk; k, v [B,T,D] when shared) -> [B,Sp,H,Dv]."""
    return _forward(q, k, v, mask, scale, bq, bk)[0]


def _forward(q, k, v, mask, scale, bq, bk):
    """-> out [B,Sp,H,Dv] in q's dtype, lse [B,Sp,H] float32."""
    B, Sp, H, _ = q.shape
    qk, pv, _ = _specs(k.ndim == 3)
    live = _live_tiles(mask, bq, bk)

    def q_block(i):
        q_i, mask_i = _block(q, i, bq), _block(mask, i, bq)

        def visit(j, carry):
            m, l, acc = carry
            s = _scores(q_i, _block(k, j, bk), _block(mask_i, j, bk, axis=2), scale, qk)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)  # rescales what earlier tiles summed against the old maximum
            acc = acc * alpha[..., None] + jnp.einsum(pv, p, _block(v, j, bk), preferred_element_type=F32)
            return m_new, l * alpha + p.sum(-1), acc

        def kv_step(carry, j):
            return lax.cond(live[i, j], functools.partial(visit, j), lambda c: c, carry), None

        init = vary_like((jnp.full((B, bq, H), MASKED, F32), jnp.zeros((B, bq, H), F32),
                      jnp.zeros((B, bq, H, v.shape[-1]), F32)), q, k, v, mask)
        (m, l, acc), _ = lax.scan(kv_step, init, jnp.arange(live.shape[1]))
        l = jnp.where(l > 0, l, 1.0)  # every tile of this block skipped: rows replaced by _fill_empty_rows
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = lax.map(q_block, jnp.arange(live.shape[0]))
    return _unblock(out), _unblock(lse)


def _blockwise_fwd(q, k, v, mask, scale, bq, bk):
    out, lse = _forward(q, k, v, mask, scale, bq, bk)
    return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(scale, bq, bk, res, d_out):
    """One pass over key blocks (outer: dk, dv of the block accumulate in the inner carry) and query
    blocks (inner: dq accumulates in place in the outer carry), recomputing each live tile."""
    q, k, v, mask, out, lse = res
    qk, pv, ptx = _specs(k.ndim == 3)
    live = _live_tiles(mask, bq, bk)
    delta = jnp.einsum("bshd,bshd->bsh", d_out.astype(F32), out.astype(F32))  # [B,Sp,H]

    def kv_block(dq, j):
        k_j, v_j, mask_j = _block(k, j, bk), _block(v, j, bk), _block(mask, j, bk, axis=2)

        def visit(i, carry):
            dq, dk, dv = carry
            q_i, do_i = _block(q, i, bq), _block(d_out, i, bq)
            p = jnp.exp(_scores(q_i, k_j, _block(mask_j, i, bq), scale, qk) - _block(lse, i, bq)[..., None])
            dp = jnp.einsum(qk, do_i, v_j, preferred_element_type=F32)
            ds = p * (dp - _block(delta, i, bq)[..., None]) * scale  # hidden entries: p = 0, so ds = 0
            dq_i = _block(dq, i, bq) + jnp.einsum(pv, ds, k_j, preferred_element_type=F32)
            return (lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=1),
                    dk + jnp.einsum(ptx, ds, q_i, preferred_element_type=F32),
                    dv + jnp.einsum(ptx, p, do_i, preferred_element_type=F32))

        def q_step(carry, i):
            return lax.cond(live[i, j], functools.partial(visit, i), lambda c: c, carry), None

        init = (dq, *vary_like((jnp.zeros(k_j.shape, F32), jnp.zeros(v_j.shape, F32)), q, k, v, mask, d_out))
        (dq, dk, dv), _ = lax.scan(q_step, init, jnp.arange(live.shape[0]))
        return dq, (dk, dv)

    dq0 = vary_like(jnp.zeros(q.shape, F32), q, k, v, mask, d_out)
    dq, (dk, dv) = lax.scan(kv_block, dq0, jnp.arange(live.shape[1]))
    return dq.astype(q.dtype), _unblock(dk).astype(k.dtype), _unblock(dv).astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- library kernels ---------------------------------------------------------------------------
def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                     tuning: FlashTuning = FlashTuning(), interpret: bool | None = None) -> jax.Array:
    """TPU splash kernel; same shapes and values as `blockwise_attention`. `interpret`: None runs
    the kernel compiled on TPU and in Pallas's interpret mode anywhere else."""
    check_shapes(q, k, v, mask)
    if tuning.block_kv % 128:
        raise ValueError(f"splash attention: FlashTuning.block_kv={tuning.block_kv} must be a multiple of 128")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    S, H, T = q.shape[1], q.shape[2], k.shape[1]
    bq = S if S <= tuning.block_q else tuning.block_q  # a block as long as the array needs no alignment
    bk = min(tuning.block_kv, cdiv(T, 128) * 128)
    Sp, Tp = cdiv(S, bq) * bq, cdiv(T, bk) * bk
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                               block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    shared = k.shape[2] == 1 and H > 1
    make = splash.make_splash_mqa_single_device if shared else splash.make_splash_mha_single_device

    def one_row(q, k, v, mask):  # q [H,Sp,Dk], k [(Hk,)Tp,Dk], v [(Hk,)Tp,Dv], mask [Sp,Tp]
        kernel = make(mask[None], block_sizes=blocks, interpret=interpret)  # one mask head serves all
        # jax 0.12.0.1 turns the MaskInfo's is_dynamic_mask flag into an array, which is a tracer under
        # jit and breaks the kernel's `if` on it; the flag only names a scope, so set it back.
        kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
        return kernel(q, k, v)

    kh, vh = (jnp.swapaxes(_pad(x, 1, Tp), 1, 2) for x in (k, v))  # [B,Hk,Tp,D], the kernel's layout
    if shared:
        kh, vh = kh[:, 0], vh[:, 0]  # [B,Tp,D]: its MQA form
    qh = jnp.swapaxes(_pad((q.astype(F32) * scale).astype(q.dtype), 1, Sp), 1, 2)  # the kernel does not scale
    out = jax.vmap(one_row)(qh, kh, vh, _kernel_mask(_pad(_pad(mask, 1, Sp), 2, Tp)))  # [B,H,Sp,Dv]
    return _fill_empty_rows(jnp.swapaxes(out, 1, 2)[:, :S], mask, v)


def tokamax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                      scale: float) -> jax.Array:
    """GPU: tokamax's Mosaic GPU flash attention; same shapes and values as `blockwise_attention`."""
    check_shapes(q, k, v, mask)
    try:
        tokamax = importlib.import_module("tokamax")
    except ImportError as e:
        raise ConfigError("attn_impl='tokamax' needs the tokamax package, which is not importable here "
                          "(pip install 'dsv3-jax[gpu]', or pick attn_impl='cudnn' or 'blockwise')") from e
    out = tokamax.dot_product_attention(q, k, v, mask=_kernel_mask(mask)[:, None], scale=scale,
                                        implementation="mosaic")
    return _fill_empty_rows(out, mask, v)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    scale: float) -> jax.Array:
    """GPU: cuDNN flash attention; same shapes and values as `blockwise_attention`."""
    check_shapes(q, k, v, mask)
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dv > Dk:
        raise ValueError(f"cudnn attention pads v to the key width: Dv={Dv} > Dk={Dk}")
    out = jax.nn.dot_product_attention(q, k, _pad(v, 3, Dk), mask=_kernel_mask(mask)[:, None],
                                       scale=scale, implementation="cudnn")
    return _fill_empty_rows(out[..., :Dv], mask, v)
