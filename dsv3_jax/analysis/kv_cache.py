"""KV cache per token (ISCA '25 paper §2.1.2, Table 1): MLA's latent cache against GQA.

MLA caches one latent c_kv [kv_lora_rank] and one shared roped key k_pe [qk_rope_head_dim] per
token per layer, whatever the head count: (512 + 64) x 61 layers x 2 bytes = 70,272 bytes for V3
in BF16. A GQA model caches K and V for each KV head: 2 x n_kv_heads x head_dim x layers x 2
bytes, 327,680 for Qwen-2.5 72B and 516,096 for LLaMA-3.1 405B. The paper's "KB" is 1000 bytes.

V3's figure is not a formula here: it is what `init_cache` allocates, read through
`jax.eval_shape` (no memory) and `bytes_per_token`, so the table follows the code.

The paper prints 7.28x for LLaMA-3.1 405B; its own two figures give 516.096 / 70.272 = 7.34x, so
that row differs by +0.9% from a misprint in the paper, not from a different count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.analysis.models import LLAMA3_1_405B, QWEN2_5_72B, DenseModel
from dsv3_jax.analysis.report import Row
from dsv3_jax.cache import bytes_per_token, init_cache
from dsv3_jax.config import ModelConfig, preset

CONTEXT = 65536  # one 64K-token context
BF16 = 2  # bytes


def mla_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Bytes per token of the cache `init_cache(cfg, 1, T)` allocates (main model, no MTP)."""
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 16, dtype))
    return bytes_per_token(cache)


def gqa_bytes_per_token(m: DenseModel, itemsize: int = BF16) -> int:
    """K and V of every KV head in every layer."""
    return 2 * m.n_kv_heads * m.head_dim * m.n_layers * itemsize


def mha_bytes_per_token(cfg: ModelConfig, itemsize: int = BF16) -> int:
    """V3 without MLA: per-head K (nope + rope dims) and V in every layer, for contrast."""
    return cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * itemsize


def kv_bytes(context_lens, per_token: int):
    """Bytes of one sequence's cache at each context length."""
    return [per_token * t for t in context_lens]


def per_token_by_model() -> dict[str, tuple[str, int]]:
    """id -> (label, bytes per token) for the three models of Table 1."""
    return {
        "deepseek_v3": ("DeepSeek-V3 (MLA)", mla_bytes_per_token(preset("v3_671b"))),
        "qwen2_5_72b": ("Qwen-2.5 72B (GQA)", gqa_bytes_per_token(QWEN2_5_72B)),
        "llama3_1_405b": ("LLaMA-3.1 405B (GQA)", gqa_bytes_per_token(LLAMA3_1_405B)),
    }


def rows() -> list[Row]:
    per_token = {k: b for k, (_, b) in per_token_by_model().items()}
    v3 = per_token["deepseek_v3"]
    paper = {"deepseek_v3": 70_272, "qwen2_5_72b": 327_680, "llama3_1_405b": 516_096}
    out = [Row(f"kv_bytes_per_token.{k}", paper[k], per_token[k], "B", "P1 Table 1 (BF16)")
           for k in paper]
    out += [Row("kv_ratio_vs_v3.qwen2_5_72b", 4.66, per_token["qwen2_5_72b"] / v3, "x", "P1 Table 1"),
            Row("kv_ratio_vs_v3.llama3_1_405b", 7.28, per_token["llama3_1_405b"] / v3, "x",
                "P1 Table 1 (misprint: its own figures give 7.34)"),
            Row("kv_bytes_per_token.deepseek_v3_mha", None, mha_bytes_per_token(preset("v3_671b")),
                "B", "ours: V3 with per-head K (192) and V (128) cached")]
    out += [Row(f"kv_gb_64k_context.{k}", None, b * CONTEXT / 1e9, "GB", "ours: 65,536 tokens x bytes/token")
            for k, b in per_token.items()]
    return out
