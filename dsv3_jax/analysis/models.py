"""The models the ISCA '25 paper compares DeepSeek-V3 with, and DeepSeek-V2 (236B).

The paper (Tables 1 and 2) does not list the dense models' shapes; the figures below are their
public `config.json` values, and they reproduce the paper's KV-cache column exactly.

DeepSeek-V2 has no preset in `dsv3_jax.config` (only V2-Lite does), so it is built here from
DeepSeek's own `inference/configs/config_236B.json` (deepseek-ai/DeepSeek-V3, HEAD 9b4e978):
dim 5120, inter_dim 12288, moe_inter_dim 1536, 60 layers (1 dense), 128 heads, 160 routed + 2
shared experts with 6 active, 8 groups / 3 kept, route_scale 16, q_lora_rank 1536,
kv_lora_rank 512, head dims 128/64/128, vocab 102400. The json leaves the gate at the reference
code's defaults (softmax, no balancing bias); V2's HF config.json adds norm_topk_prob false,
YaRN factor 40 with mscale 0.707, and no MTP.
"""

from __future__ import annotations

import dataclasses

from dsv3_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DenseModel:
    """A dense GQA decoder with a SwiGLU MLP and an untied head."""

    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter_dim: int  # SwiGLU width (each of w1, w3 is dim x inter_dim)
    vocab_size: int


# Qwen/Qwen-72B config.json: hidden_size 8192, 80 layers, 64 heads of kv_channels 128, no GQA,
# vocab 152064. Its intermediate_size 49152 is twice the SwiGLU width: Qwen-1's MLP halves it.
QWEN_72B = DenseModel("Qwen-72B", n_layers=80, dim=8192, n_heads=64, n_kv_heads=64, head_dim=128,
                      inter_dim=24576, vocab_size=152064)
# Qwen/Qwen2.5-72B config.json: the same trunk with 8 KV heads and intermediate_size 29568.
QWEN2_5_72B = DenseModel("Qwen-2.5 72B", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8,
                         head_dim=128, inter_dim=29568, vocab_size=152064)
# meta-llama/Llama-3.1-405B config.json: hidden_size 16384, 126 layers, 128 heads, 8 KV heads,
# intermediate_size 53248, vocab 128256. Table 2's "LLaMa-405B" is this model.
LLAMA3_1_405B = DenseModel("LLaMA-3.1 405B", n_layers=126, dim=16384, n_heads=128, n_kv_heads=8,
                           head_dim=128, inter_dim=53248, vocab_size=128256)

V2_236B = ModelConfig(
    vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60,
    n_dense_layers=1, n_heads=128, n_routed_experts=160, n_shared_experts=2,
    n_activated_experts=6, n_expert_groups=8, n_limited_groups=3, score_func="softmax",
    route_scale=16.0, norm_topk_prob=False, gate_bias=False, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
    rope_factor=40.0, original_seq_len=4096, mscale=0.707, mscale_all_dim=0.707, n_mtp_modules=0,
    dtype="bfloat16", param_dtype="bfloat16")
