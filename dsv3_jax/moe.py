"""DeepSeekMoE: shared + routed SwiGLU experts, a group-limited top-k gate, dropless dispatch.

Shape letters: B batch, S sequence, N = B*S tokens, D `dim`, E routed experts, K activated
experts per token, G expert groups, F `moe_inter_dim`.

The gate (V3 report §2.1.2, eqs. 12-16):
  s = sigmoid(x . e_i)  (V3)   or softmax over experts (V2);
  experts are *selected* on s + b, where b is the aux-loss-free balancing bias
  (`e_score_correction_bias`); b steers selection only and never enters the weights;
  node-limited routing: a group's score is the sum of its top-2 biased scores (max without a
  bias); groups outside the best `n_limited_groups` are masked with -inf, not 0, because biased
  scores can be negative and a 0 could let an excluded expert win;
  weights = the unbiased s of the chosen experts, normalised when `norm_topk_prob`, times
  `route_scale`.
The bias is a `RouterBias` variable, not a `Param`: no gradient, no optimizer state, no weight
decay. Training moves it by gamma * sign(mean load - load) after each step (`train/balance.py`),
from the per-expert load counts this module returns.

Dispatch is dropless (no capacity): token copies are sorted by expert and run through
`jax.lax.ragged_dot` per weight matrix (moe_impl="ragged"), or through tile-padded batched GEMMs
("tiled", the fast form on XLA:CPU). `moe_dense` computes every expert on every token and is the
reference the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, fp8_kernel, fp8_weight, normal_param
from pallas_kernels import fp8_grouped_linear, fp8_grouped_matmul, quantize_act_1x128


class RouterBias(nnx.Variable):
    """e_score_correction_bias [E]: selection-only bias, updated outside the gradient."""


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig):
    """logits [N,E] (float32) -> weights [N,K] f32, indices [N,K] int32, scores [N,E] f32."""
    scores = jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias
    G = cfg.n_expert_groups
    if G > 1:
        grouped = choice.reshape(choice.shape[0], G, -1)  # [N, G, E/G]
        if bias is None:
            group_score = grouped.max(axis=-1)
        else:
            group_score = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
        _, keep = jax.lax.top_k(group_score, cfg.n_limited_groups)  # [N, n_limited]
        kept = jnp.zeros((choice.shape[0], G), bool).at[jnp.arange(choice.shape[0])[:, None], keep].set(True)
        choice = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(choice.shape)
    _, indices = jax.lax.top_k(choice, cfg.n_activated_experts)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.route_scale, indices.astype(jnp.int32), scores


def expert_load(indices: jax.Array, n_experts: int) -> jax.Array:
    """indices [..., K] -> tokens routed to each expert [E] (int32)."""
    return jnp.bincount(indices.reshape(-1), length=n_experts).astype(jnp.int32)


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, n_experts: int) -> jax.Array:
    """Sequence-wise balance loss without alpha (V3 eqs. 17-20), averaged over sequences.

    scores [B,S,E] unbiased affinities, indices [B,S,K]. f_i = E/(K S) * #tokens choosing i;
    P_i = mean over tokens of s_i / sum_j s_j. Equals 1 when every expert is used uniformly.
    """
    B, S, K = indices.shape
    p = (scores / scores.sum(axis=-1, keepdims=True)).mean(axis=1)  # [B, E]
    counts = jax.vmap(lambda idx: jnp.bincount(idx.reshape(-1), length=n_experts))(indices)
    f = counts.astype(jnp.float32) * n_experts / (K * S)
    return (f * p).sum(axis=-1).mean()


def grouped_matmul(a, w, group_sizes, *, dtype, impl: str = "default", scale=None):
    """Expert-sorted rows a [M, in] times their expert's w [E, out, in] -> [M, out].

    The MoE twin of layers.linear: "default" is lax.ragged_dot in `dtype`; "fp8" the FP8 training
    GEMMs; a `scale` [E, out/128, in/128] means w is stored in e4m3 (FP8 inference).
    """
    if scale is not None:
        aq, as_ = quantize_act_1x128(a.astype(dtype))
        return fp8_grouped_matmul(aq, as_, w, scale, group_sizes, jnp.float32).astype(dtype)
    if impl.startswith("fp8"):  # no grouped Mosaic GPU kernel yet: "mosaic_gpu" means "auto" here
        kernel = fp8_kernel(impl)
        return fp8_grouped_linear(a.astype(dtype), w.astype(dtype), group_sizes,
                                  "auto" if kernel == "mosaic_gpu" else kernel)
    if impl == "tiled":
        return tiled_grouped_matmul(a.astype(dtype), w.astype(dtype), group_sizes)
    # ragged_dot wants (E, in, out)
    return jax.lax.ragged_dot(a.astype(dtype), jnp.swapaxes(w, 1, 2).astype(dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(dtype)


def tiled_grouped_matmul(a, w, group_sizes, tile: int = 64):
    """grouped_matmul as one batched dense GEMM: each expert's rows are padded to whole tiles
    (DeepGEMM's "contiguous layout") and every tile multiplies its expert's weight.

    XLA:CPU runs lax.ragged_dot as a masked loop over groups; this form does the same FLOPs plus at
    most E*(tile-1) padding rows, in one batched matmul. Shapes are static: the tile count is the
    worst case ceil((M + E*(tile-1)) / tile). a [M, in] sorted by expert, w [E, out, in] -> [M, out].
    """
    M, E = a.shape[0], w.shape[0]
    padded = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start, start = padded_end - padded, jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
    T = -(-(M + E * (tile - 1)) // tile)
    # rows past sum(group_sizes) belong to no expert: they go nowhere and come back as zeros
    dest = jnp.where(jnp.arange(M) < start[-1] + group_sizes[-1],
                     padded_start[expert_of_row] + jnp.arange(M) - start[expert_of_row], T * tile)
    buf = jnp.zeros((T * tile, a.shape[1]), a.dtype).at[dest].set(a, mode="drop")
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(T) * tile, side="right"), E - 1)
    y = jnp.einsum("tmi,toi->tmo", buf.reshape(T, tile, -1), w[tile_expert],
                   preferred_element_type=jnp.float32).astype(a.dtype)
    return y.reshape(T * tile, -1).at[dest].get(mode="fill", fill_value=0)


def moe_ragged(x, weights, indices, w1, w2, w3, *, dtype, impl: str = "default", scales=(None,) * 3):
    """Dropless routed experts. x [N,D], weights/indices [N,K], w1/w3 [E,F,D], w2 [E,D,F] -> [N,D]."""
    N, K = indices.shape
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # token copies grouped by expert
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    mm = lambda a, w, s: grouped_matmul(a, w, group_sizes, dtype=dtype, impl=impl, scale=s)  # noqa: E731
    xs = x[order // K]
    h = jax.nn.silu(mm(xs, w1, scales[0])) * mm(xs, w3, scales[2])
    y_sorted = mm(h, w2, scales[1])
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, K, -1)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(dtype)


def moe_dense(x, weights, indices, w1, w2, w3, *, dtype):
    """Reference: every expert on every token, combined with the gate weights (zero if unchosen)."""
    E = w1.shape[0]
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(indices, E, dtype=weights.dtype))
    x = x.astype(dtype)
    h = jax.nn.silu(jnp.einsum("nd,efd->nef", x, w1.astype(dtype))) * jnp.einsum("nd,efd->nef", x, w3.astype(dtype))
    y = jnp.einsum("nef,edf->ned", h, w2.astype(dtype))
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine).astype(dtype)


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.weight = normal_param(rngs, (cfg.n_routed_experts, cfg.dim), cfg.init_std, cfg.param_dtype,
                                   ("exp", "embed"))
        if cfg.gate_bias:
            self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("exp",))
        self.cfg = cfg

    def __call__(self, x: jax.Array):
        """x [N,D] -> weights [N,K], indices [N,K], scores [N,E]. Runs in float32 (§3.3)."""
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        bias = self.bias[...] if self.cfg.gate_bias else None
        return route(logits, bias, self.cfg)


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights stacked along E, stored (E, out, in)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, F, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        shapes = {"w1": ((E, F, D), ("exp", "mlp", "embed")), "w2": ((E, D, F), ("exp", "embed", "mlp")),
                  "w3": ((E, F, D), ("exp", "mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            if cfg.fp8_weights:
                weight, scale = fp8_weight(shape, axes)
                setattr(self, name, weight)
                setattr(self, name + "_scale_inv", scale)
            else:
                setattr(self, name, normal_param(rngs, shape, cfg.init_std, cfg.param_dtype, axes))
        self.fp8_weights = cfg.fp8_weights

    def weights(self):
        return tuple(getattr(self, n)[...] for n in ("w1", "w2", "w3"))

    def scales(self):
        if not self.fp8_weights:
            return (None, None, None)
        return tuple(getattr(self, n + "_scale_inv")[...] for n in ("w1", "w2", "w3"))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate = Gate(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, std=cfg.init_std,
                                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                      impl=cfg.linear_impl, fp8_weights=cfg.fp8_weights)
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        """x [B,S,D] -> y [B,S,D], stats {load [E] int32, balance [] f32 (before alpha)}."""
        cfg = self.cfg
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        weights, indices, scores = self.gate(flat)
        e, dtype = self.experts, jnp.dtype(cfg.dtype)
        if cfg.moe_impl == "dense":
            if cfg.fp8 or cfg.fp8_weights:
                raise ValueError("moe_impl='dense' is the high-precision reference; it has no FP8 path")
            y = moe_dense(flat, weights, indices, *e.weights(), dtype=dtype)
        elif cfg.moe_impl == "ep":  # expert parallel over the ambient mesh (parallel/ep.py)
            from dsv3_jax.parallel.ep import moe_ep  # lazy: ep.py imports grouped_matmul from here
            y, ep_stats = moe_ep(flat, weights, indices, *e.weights(), cfg=cfg, impl=cfg.linear_impl,
                                 scales=e.scales())
        else:
            impl = "tiled" if cfg.moe_impl == "tiled" and not cfg.fp8 else cfg.linear_impl
            y = moe_ragged(flat, weights, indices, *e.weights(), dtype=dtype, impl=impl, scales=e.scales())
        if cfg.n_shared_experts:
            y = y + self.shared_experts(flat)
        stats = {
            "load": expert_load(indices, cfg.n_routed_experts),
            "balance": sequence_balance_loss(scores.reshape(B, S, -1), indices.reshape(B, S, -1),
                                             cfg.n_routed_experts),
        }
        if cfg.moe_impl == "ep":
            stats.update(ep_stats)  # ep_dropped (token-shard pairs over capacity), ep_shards (mean reach)
        return y.reshape(B, S, D), stats
