"""DeepSeekMoE: shared + routed SwiGLU experts, a group-limited top-k gate, dropless dispatch.

Shape letters (the package legend): B batch, S sequence, N = B*S tokens, D `dim`, E routed
experts, K activated experts per token, G expert groups, F `moe_inter_dim`, L MoE layers.

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
from the per-expert load counts in the `MoEStats` this module returns.

Dispatch is dropless (no capacity): `experts.routed_experts` on the local tokens (moe_impl
"ragged" or "tiled"), or expert parallel over the mesh (`parallel/ep.py`, moe_impl "ep");
`experts.dense_reference` (moe_impl "dense") computes every expert on every token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.experts import Experts, dense_reference, routed_experts
from dsv3_jax.layers import MLP, normal_param
from dsv3_jax.parallel.ep import moe_ep


# checkpoint_name of the MoE layer's output (routed + shared): what the "save_attn_moe" remat
# policies keep (block.REMAT)
MOE_OUT = "moe_out"


class RouterBias(nnx.Variable):
    """e_score_correction_bias [E]: selection-only bias, updated outside the gradient."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    """What MoE layers report, per layer (leading axes: layers, or none for one layer).

    Counts add up over parts of a batch; means are averaged (`combine`, the one merge rule).
    """

    load: jax.Array  # [..., E] int32 tokens routed to each expert
    balance: jax.Array  # [...] f32 sequence-wise balance loss, before alpha
    ep_dropped: jax.Array | None = None  # [...] int32 token-shard pairs over capacity (moe_impl "ep")
    ep_shards: jax.Array | None = None  # [...] f32 mean shards a token reaches (moe_impl "ep")

    def combine(self, other: "MoEStats") -> "MoEStats":
        """The statistics of two equal halves of one batch as those of the whole batch."""
        add = lambda a, b: None if a is None else a + b  # noqa: E731
        mean = lambda a, b: None if a is None else (a + b) / 2  # noqa: E731
        return MoEStats(add(self.load, other.load), mean(self.balance, other.balance),
                        add(self.ep_dropped, other.ep_dropped), mean(self.ep_shards, other.ep_shards))

    @staticmethod
    def concat(parts: list["MoEStats | None"]) -> "MoEStats | None":
        """Stack per-layer statistics of consecutive layer ranges (each with a leading layers axis)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


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


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # "router", not "exp": every device routes its own tokens over all E experts, so the gate
        # is replicated even where the experts are sharded.
        self.weight = normal_param(rngs, (cfg.n_routed_experts, cfg.dim), cfg.init_std, cfg.param_dtype,
                                   ("router", "embed"))
        if cfg.gate_bias:
            self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("router",))
        self.cfg = cfg

    def __call__(self, x: jax.Array):
        """x [N,D] -> weights [N,K], indices [N,K], scores [N,E]. Runs in float32 (§3.3)."""
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        bias = self.bias[...] if self.cfg.gate_bias else None
        return route(logits, bias, self.cfg)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate = Gate(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, std=cfg.init_std,
                                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                      impl=cfg.linear_impl, fp8_weights=cfg.fp8_weights,
                                      pow2_act_scale=cfg.fp8_act_scale == "ue8m0")
        self.cfg = cfg

    def routed(self, x, weights, indices) -> tuple[jax.Array, dict]:
        """The routed experts on x [N,D] by moe_impl -> y [N,D], EP counters (empty unless "ep")."""
        cfg, e = self.cfg, self.experts
        dtype = jnp.dtype(cfg.dtype)
        if cfg.moe_impl == "dense":
            if cfg.fp8 or cfg.fp8_weights:
                raise ConfigError("ModelConfig.moe_impl='dense' is the high-precision reference; it has no FP8 path")
            return dense_reference(x, weights, indices, *e.weights(), dtype=dtype), {}
        if cfg.moe_impl == "ep":  # expert parallel over the ambient mesh
            return moe_ep(x, weights, indices, *e.weights(), cfg=cfg, impl=cfg.linear_impl, scales=e.scales())
        impl = "tiled" if cfg.moe_impl == "tiled" and not cfg.fp8 else cfg.linear_impl
        y = routed_experts(x, weights, indices, *e.weights(), dtype=dtype, impl=impl, scales=e.scales(),
                           pow2_scale=cfg.fp8_act_scale == "ue8m0")
        return y.astype(dtype), {}

    def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEStats]:
        """x [B,S,D] -> y [B,S,D], this layer's MoEStats."""
        cfg = self.cfg
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        weights, indices, scores = self.gate(flat)
        y, ep = self.routed(flat, weights, indices)
        if cfg.n_shared_experts:
            y = y + self.shared_experts(flat)
        y = jax.ad_checkpoint.checkpoint_name(y, MOE_OUT)
        stats = MoEStats(
            load=expert_load(indices, cfg.n_routed_experts),
            balance=sequence_balance_loss(scores.reshape(B, S, -1), indices.reshape(B, S, -1),
                                          cfg.n_routed_experts),
            ep_dropped=ep.get("ep_dropped"), ep_shards=ep.get("ep_shards"))
        return y.reshape(B, S, D), stats
