"""MoE economics (ISCA '25 paper §2.2.1-§2.2.2): total vs activated parameters, and what that
means for decode on a machine with one pool of memory.

Parameters are counted in closed form from the config, leaf by leaf as `dsv3_jax.model` builds
them (tests check the count against `jax.eval_shape` of the model): per layer MLA's projections
and its q_norm/kv_norm, two block norms, then a dense SwiGLU or the MoE layer (all routed experts,
the shared ones, the gate); plus embedding, head and final norm. The MTP module (eh_proj, its
three norms, one block) is counted apart, as DeepSeek's README_WEIGHTS does: V3 is 671B without
it. The gate's balancing bias is a buffer, not a parameter, and is left out.

"Activated" is what one token's forward pass multiplies: `flops.activated_matmul_params` (the
head and the K routed + shared experts, not the embedding lookup). That gives V3 36.6B,
DeepSeek's README_WEIGHTS says 36.7B and the paper rounds to "37B" (-1.0%); V2 20.9B against "21B".

Decode at batch 1 reads every activated weight once per token, so memory bandwidth over
activated bytes bounds the tokens/s of a single stream (KV-cache reads and compute ignored).
P1 §2.2.2 reports nearly 20 tokens/s for V2 on AI-SoC PCs; these bounds show why that is
reachable for a 21B-activated MoE and not for a 72B dense model on the same memory.
"""

from __future__ import annotations

import dataclasses

from dsv3_jax.analysis.hardware import LOCAL_MACHINES
from dsv3_jax.analysis.models import QWEN2_5_72B, V2_236B
from dsv3_jax.analysis.report import Row
from dsv3_jax.analysis.train_flops import dense_matmul_params
from dsv3_jax.config import ModelConfig, preset
from dsv3_jax.flops import activated_matmul_params, attention_matmul_params

B = 1e9


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # main model (embedding, layers, norm, head)
    activated: int  # matmul weights one token meets (main model)
    mtp: int  # the MTP modules' own weights (embedding and head are shared)


def block_params(cfg: ModelConfig, moe: bool) -> int:
    """One decoder block: MLA + q_norm/kv_norm, two RMSNorms, the dense MLP or the whole MoE."""
    attn = attention_matmul_params(cfg) + cfg.q_lora_rank + cfg.kv_lora_rank
    if moe:
        experts = cfg.n_routed_experts + cfg.n_shared_experts
        ffn = 3 * cfg.dim * cfg.moe_inter_dim * experts + cfg.n_routed_experts * cfg.dim
    else:
        ffn = 3 * cfg.dim * cfg.inter_dim
    return attn + 2 * cfg.dim + ffn


def param_count(cfg: ModelConfig) -> ParamCount:
    total = 2 * cfg.vocab_size * cfg.dim + cfg.dim
    total += cfg.n_dense_layers * block_params(cfg, moe=False)
    total += cfg.n_moe_layers * block_params(cfg, moe=True)
    mtp_module = 2 * cfg.dim * cfg.dim + 3 * cfg.dim + block_params(cfg, moe=cfg.n_routed_experts > 0)
    return ParamCount(total=total, activated=activated_matmul_params(cfg, include_mtp=False),
                      mtp=cfg.n_mtp_modules * mtp_module)


def decode_tokens_per_s(mem_bw: float, weights: int, bytes_per_weight: float) -> float:
    """Batch-1 decode bound: every activated weight read once per token."""
    return mem_bw / (weights * bytes_per_weight)


def rows() -> list[Row]:
    v2, v3 = param_count(V2_236B), param_count(preset("v3_671b"))
    out = [Row("params_total_b.deepseek_v2", 236, v2.total / B, "B", "P1 Table 2"),
           Row("params_activated_b.deepseek_v2", 21, v2.activated / B, "B", "P1 Table 2"),
           Row("params_total_b.deepseek_v3", 671, v3.total / B, "B", "P1 Table 2"),
           Row("params_activated_b.deepseek_v3", 37, v3.activated / B, "B", "P1 Table 2 (rounded)"),
           Row("params_activated_b.deepseek_v3_readme", 36.7, v3.activated / B, "B", "R README_WEIGHTS"),
           Row("params_mtp_b.deepseek_v3", 11.5, v3.mtp / B, "B",
               "R README_WEIGHTS ('11.5B unique')")]
    cases = (("deepseek_v2_bf16", v2.activated, 2), ("deepseek_v2_fp8", v2.activated, 1),
             ("qwen2_5_72b_fp8", dense_matmul_params(QWEN2_5_72B), 1))
    for key, (name, bw) in LOCAL_MACHINES.items():
        for model, weights, nbytes in cases:
            out.append(Row(f"local_decode_tok_s.{model}.{key}", None,
                           decode_tokens_per_s(bw, weights, nbytes), "tok/s",
                           f"ours: {bw / 1e9:g} GB/s ({name}) / activated bytes"))
    return out
