"""ModelConfig: every architecture field of DeepSeek-V3 and the V2 family, frozen and validated.

Field names follow DeepSeek's own `ModelArgs` / `config_671B.json` (`dim`, `n_routed_experts`,
`n_expert_groups`, `kv_lora_rank`, ...). The HF `config.json` vocabulary appears only in
`from_hf_config` / `to_hf_config`, the single mapping at the conversion boundary.

V2 vs V3, as fields rather than a "version" switch:
  V3:      score_func="sigmoid", gate_bias=True (e_score_correction_bias), norm_topk_prob=True,
           group score = sum of the group's top-2 biased scores.
  V2:      score_func="softmax", gate_bias=False, group score = the group's max
           (n_expert_groups=1 is plain greedy top-k), norm_topk_prob usually False.
  V2-Lite: q_lora_rank=0, i.e. the query is not compressed (one `wq` projection).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from dsv3_jax.errors import ConfigError, check_field_types

SCORE_FUNCS = ("sigmoid", "softmax")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn_moe", "offload_attn_moe")  # block.REMAT
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    dim: int = 64
    inter_dim: int = 128  # dense-layer SwiGLU width
    moe_inter_dim: int = 32  # per-expert SwiGLU width
    n_layers: int = 3
    n_dense_layers: int = 1  # the first layers use a dense MLP instead of MoE
    n_heads: int = 4
    # MoE
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    norm_topk_prob: bool = True
    gate_bias: bool = True  # aux-loss-free balancing bias (V3); V2 has none
    # MLA
    q_lora_rank: int = 32  # 0: no query compression (V2-Lite)
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # RoPE / YaRN (rope_factor == 1 disables YaRN)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    norm_eps: float = 1e-6
    # MTP
    n_mtp_modules: int = 1
    # numerics and execution
    init_std: float = 0.006  # V3 report §4.2
    dtype: str = "float32"  # compute dtype of matmuls
    param_dtype: str = "float32"
    remat: str = "none"  # remat policy of the scanned layers
    moe_impl: str = "ragged"  # "ragged" (sort + lax.ragged_dot), "tiled" (tile-padded, a loop over tiles,
    # fast on XLA:CPU), "dense" (every expert on every token: the reference), "ep" (expert parallel)
    # expert parallelism (moe_impl="ep", dsv3_jax/parallel/ep.py): wire formats of the all-to-all,
    # per-pair capacity (0: the worst case, dropless) and the transport primitive
    ep_dispatch: str = "fp8"  # "fp8" (E4M3, pow2 1x128 scales), "bf16", "fp32"
    ep_combine: str = "bf16"  # "bf16", "fp32", "logfmtN" (LogFMT-nBit, 3 <= N <= 16)
    ep_capacity_factor: float = 0.0
    ep_transport: str = "all_to_all"  # or "ragged_all_to_all" (GPU/TPU; XLA:CPU lacks it)
    # the received [X, U] slots go through the local experts in this many sequential chunks of
    # source shards (must divide the EP degree; 0: one chunk per source shard), each recomputed in
    # the backward: the expert-side temporaries are one chunk's U J rows per source instead of
    # X U J (dropless: X N J). 1: one pass over all slots.
    ep_chunks: int = 1
    # FP8 (V3 report §3.3). fp8: the linear layers run Fprop/Dgrad/Wgrad as block-scaled FP8 GEMMs;
    # fp8_weights: weights *stored* as e4m3 + 128x128 scales (DeepSeek's FP8 checkpoints, inference).
    # Embedding, head, gate, norms and the attention core stay in higher precision either way.
    fp8: bool = False
    fp8_weights: bool = False
    # with fp8_weights, how activations are scaled: "float", or "ue8m0" (powers of two: V3.1's scale_fmt)
    fp8_act_scale: str = "float"
    # which block-scaled GEMM runs them: "auto" (Mosaic GPU kernel on GPU, Pallas on TPU, the jnp
    # reference on CPU), or "reference" / "pallas" / "mosaic_gpu" by name (grouped MoE GEMMs: the
    # Pallas kernel on TPU, else the reference)
    fp8_kernel: str = "auto"
    # the attention core (attention.py): "reference" (materializes [S,T] scores per head), "blockwise"
    # (pure-JAX flash, any backend), "splash" (TPU), "tokamax" / "cudnn" (GPU)
    attn_impl: str = "reference"
    # training loss: the head's logits and cross entropy over this many tokens at a time, each
    # chunk's logits recomputed in the backward (train/loss.chunked_cross_entropy); 0: all at once
    loss_chunk: int = 0

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

        check_field_types(self)
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "v_head_dim", "max_seq_len"):
            if getattr(self, f) <= 0:
                bad(f, "expected a positive integer")
        for f in ("q_lora_rank", "n_shared_experts", "n_mtp_modules", "n_routed_experts"):
            if getattr(self, f) < 0:
                bad(f, "expected >= 0")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            bad("n_dense_layers", f"expected between 0 and n_layers={self.n_layers}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "expected a positive even number (RoPE rotates pairs)")
        if self.n_moe_layers > 0 and self.n_routed_experts == 0:
            bad("n_routed_experts", f"the {self.n_moe_layers} layers after n_dense_layers are MoE "
                "layers and need at least one routed expert")
        if self.n_routed_experts > 0:
            if self.moe_inter_dim <= 0:
                bad("moe_inter_dim", "expected a positive integer")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                bad("n_activated_experts", f"expected 1..n_routed_experts={self.n_routed_experts}")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                bad("n_expert_groups", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                bad("n_limited_groups", f"expected 1..n_expert_groups={self.n_expert_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_limited_groups * per_group < self.n_activated_experts:
                bad("n_limited_groups", f"the kept groups hold {self.n_limited_groups * per_group} experts, "
                    f"fewer than n_activated_experts={self.n_activated_experts}")
            if self.gate_bias and self.n_expert_groups > 1 and per_group < 2:
                bad("n_expert_groups", "with gate_bias the group score sums the top-2 experts of a group; "
                    "groups need at least 2 experts")
        if self.n_dense_layers > 0 and self.inter_dim <= 0:
            bad("inter_dim", "dense layers need a positive width")
        if self.score_func not in SCORE_FUNCS:
            bad("score_func", f"expected one of {SCORE_FUNCS}")
        if self.rope_factor < 1.0:
            bad("rope_factor", "expected >= 1 (1 disables YaRN)")
        for f in ("norm_eps", "route_scale", "init_std", "rope_theta"):
            if not getattr(self, f) > 0:
                bad(f, "expected > 0")
        if self.original_seq_len < 1:
            bad("original_seq_len", "expected a positive integer")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {REMAT_POLICIES}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"expected one of {DTYPES}")
        if self.moe_impl not in ("ragged", "tiled", "dense", "ep"):
            bad("moe_impl", "expected 'ragged', 'tiled', 'dense' or 'ep'")
        if self.ep_dispatch not in ("fp8", "bf16", "fp32"):
            bad("ep_dispatch", "expected 'fp8', 'bf16' or 'fp32'")
        if not re.fullmatch(r"bf16|fp32|logfmt([3-9]|1[0-6])", self.ep_combine):
            bad("ep_combine", "expected 'bf16', 'fp32' or 'logfmtN' with 3 <= N <= 16")
        if self.ep_capacity_factor < 0:
            bad("ep_capacity_factor", "expected >= 0 (0: worst-case capacity, nothing dropped)")
        if self.loss_chunk < 0:
            bad("loss_chunk", "expected >= 0 (0: the whole sequence's logits at once)")
        if self.ep_chunks < 0:
            bad("ep_chunks", "expected >= 0 (0: one chunk per source shard, 1: no chunking)")
        if self.ep_transport not in ("all_to_all", "ragged_all_to_all"):
            bad("ep_transport", "expected 'all_to_all' or 'ragged_all_to_all'")
        if self.fp8_act_scale not in ("float", "ue8m0"):
            bad("fp8_act_scale", "expected 'float' or 'ue8m0'")
        if self.fp8_kernel not in ("auto", "reference", "pallas", "mosaic_gpu"):
            bad("fp8_kernel", "expected 'auto', 'reference', 'pallas' or 'mosaic_gpu'")
        if self.attn_impl not in ("reference", "blockwise", "splash", "tokamax", "cudnn"):
            bad("attn_impl", "expected 'reference', 'blockwise', 'splash', 'tokamax' or 'cudnn'")

    # ---- derived values --------------------------------------------------------------------
    @property
    def linear_impl(self) -> str:
        """The layers' matmul: "default", or "fp8" / "fp8:<kernel>" (layers.linear parses it)."""
        if not self.fp8:
            return "default"
        return "fp8" if self.fp8_kernel == "auto" else f"fp8:{self.fp8_kernel}"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R) (V3 eq. 10), times YaRN's attention temperature mscale^2."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1.0 and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Latent KV cache in BF16: (kv_lora_rank + rope dim) x layers x 2 bytes (paper §2.1.2)."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.n_layers * 2

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- HF config.json mapping ------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        return cls(**{**hf_to_fields(hf), **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        return fields_to_hf(self)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(t) = 0.1 * mscale * ln(s) + 1 (V3 report §4.3)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------------
# HF <-> DeepSeek names. One table; the few non-1:1 keys are handled below it.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "norm_topk_prob": "norm_topk_prob",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "num_nextn_predict_layers": "n_mtp_modules",
}


# Keys config.json may leave out, with the value transformers' DeepSeek configs then use.
# Every other key of _HF_KEYS must be there: a missing one is an error, never a preset's value.
_HF_OPTIONAL = {"num_nextn_predict_layers": 0, "scoring_func": None}  # None: by model_type, below


def hf_to_fields(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
        raise ConfigError(f"config.json model_type={model_type!r}: expected 'deepseek_v3' or 'deepseek_v2'")
    missing = sorted(k for k in _HF_KEYS if hf.get(k) is None and k not in _HF_OPTIONAL)
    if missing:
        raise ConfigError(f"config.json is missing {missing}: every architecture key must be given "
                          "(no default is assumed)")
    out = {ours: hf[k] for k, ours in _HF_KEYS.items() if hf.get(k) is not None}
    out["q_lora_rank"] = hf.get("q_lora_rank") or 0
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"config.json moe_layer_freq={hf['moe_layer_freq']}: only 1 (every layer "
                         "after the dense ones is MoE) is supported")
    if hf.get("tie_word_embeddings", False):
        raise ConfigError("config.json tie_word_embeddings=true: DeepSeek models have an untied head")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}: expected 'silu'")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json attention_bias=true: DeepSeek attention has no biases")
    topk_method = hf.get("topk_method", "noaux_tc" if model_type != "deepseek_v2" else "greedy")
    out["gate_bias"] = topk_method == "noaux_tc"
    if model_type == "deepseek_v2" and topk_method == "greedy":
        out["n_expert_groups"], out["n_limited_groups"] = 1, 1
    if out.get("score_func") is None:
        out["score_func"] = "softmax" if model_type == "deepseek_v2" else "sigmoid"
    if "n_mtp_modules" not in out:
        out["n_mtp_modules"] = 0
    # The stored dtype (transformers 5 writes `dtype`, older files `torch_dtype`); no key: float32.
    stored = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    if stored not in DTYPES:
        raise ConfigError(f"config.json torch_dtype={stored!r}: expected one of {DTYPES}")
    out["dtype"] = out["param_dtype"] = stored
    # transformers 5 folds theta and scaling into `rope_parameters`; older files use rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    out["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype == "yarn":
        out["rope_factor"] = float(rope["factor"])
        out["original_seq_len"] = int(rope.get("original_max_position_embeddings", 4096))
        out["beta_fast"] = float(rope.get("beta_fast", 32))
        out["beta_slow"] = float(rope.get("beta_slow", 1))
        out["mscale"] = float(rope.get("mscale", 1.0) or 0.0)
        out["mscale_all_dim"] = float(rope.get("mscale_all_dim", 0.0) or 0.0)
    elif rtype != "default":
        raise ConfigError(f"config.json rope type {rtype!r}: expected 'yarn' or 'default'")
    return out


def fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    v2 = not cfg.gate_bias and cfg.score_func == "softmax"
    hf = {k: getattr(cfg, ours) for k, ours in _HF_KEYS.items()}
    hf.update(
        architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
        model_type="deepseek_v2" if v2 else "deepseek_v3",
        q_lora_rank=cfg.q_lora_rank or None,
        moe_layer_freq=1,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
        num_key_value_heads=cfg.n_heads,
        rope_theta=cfg.rope_theta,
        torch_dtype=cfg.param_dtype,
    )
    if v2:
        hf["topk_method"] = "greedy" if cfg.n_expert_groups == 1 else "group_limited_greedy"
    else:
        hf["topk_method"] = "noaux_tc"
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_factor > 1.0:
        rope.update(rope_type="yarn", type="yarn", factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.original_seq_len, beta_fast=cfg.beta_fast,
                    beta_slow=cfg.beta_slow, mscale=cfg.mscale, mscale_all_dim=cfg.mscale_all_dim)
    hf["rope_parameters"] = rope
    hf["rope_scaling"] = rope if cfg.rope_factor > 1.0 else None
    return hf


# ---------------------------------------------------------------------------------------------
# Presets. `tiny` runs the tests in seconds; `small` (~100M parameters) trains on a CPU;
# `v2_lite` is DeepSeek-V2-Lite (16B); `v3_671b` is exactly `config_671B.json` plus the
# HF config's YaRN settings and MTP depth.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(
        vocab_size=8192, dim=512, inter_dim=2048, moe_inter_dim=256, n_layers=8, n_dense_layers=1,
        n_heads=8, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=1024),
    "v2_lite": ModelConfig(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
        route_scale=1.0, norm_topk_prob=False, gate_bias=False, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
        rope_factor=40.0, original_seq_len=4096, mscale=0.707, mscale_all_dim=0.707,
        n_mtp_modules=0, dtype="bfloat16", param_dtype="bfloat16"),
    "v3_671b": ModelConfig(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
        route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, rope_factor=40.0,
        original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        n_mtp_modules=1, dtype="bfloat16", param_dtype="bfloat16"),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
