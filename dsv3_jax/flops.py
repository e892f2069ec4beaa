"""Model arithmetic: matmul parameters a token meets, training FLOPs per token, and MFU.

FLOPs per token (training = forward + backward = 3x forward):
    6 x (activated matmul parameters)  +  3 x 2 x H x (qk_head_dim + v_head_dim) x ctx per layer
where ctx = (S+1)/2 keys per query under the causal mask (mean over positions 1..S). Matmul
parameters are the ones a token really meets: MLA's wq_a/wq_b (or wq), wkv_a, wkv_b, wo; dense
SwiGLU; K routed + shared experts and the gate in MoE layers; the output head; each MTP module's
eh_proj, block and its pass through the shared head. The embedding is a lookup, not a matmul.
This is the convention of the DeepSeek-V3 "Insights" paper (Table 2: 250 GFLOP/token at 4096);
norms, softmax and activations are left out (well under 1%).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def attention_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one MLA layer: the query path, wkv_a, wkv_b and wo."""
    H, D = cfg.n_heads, cfg.dim
    if cfg.q_lora_rank:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = D * H * cfg.qk_head_dim
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv_a + kv_b + H * cfg.v_head_dim * D


def ffn_matmul_params(cfg: ModelConfig, moe: bool) -> int:
    """Weights one token meets in a layer's FFN: SwiGLU is 3 matrices; MoE adds the gate."""
    if not moe:
        return 3 * cfg.dim * cfg.inter_dim
    experts = cfg.n_activated_experts + cfg.n_shared_experts
    return 3 * cfg.dim * cfg.moe_inter_dim * experts + cfg.n_routed_experts * cfg.dim


def activated_matmul_params(cfg: ModelConfig, *, include_mtp: bool = True) -> int:
    """Matmul weights applied to each token (a weight used twice, like the head, counts twice)."""
    head = cfg.vocab_size * cfg.dim
    n = cfg.n_layers * attention_matmul_params(cfg) + head
    n += cfg.n_dense_layers * ffn_matmul_params(cfg, moe=False)
    n += cfg.n_moe_layers * ffn_matmul_params(cfg, moe=True)
    if include_mtp:
        mtp = (2 * cfg.dim * cfg.dim + attention_matmul_params(cfg)
               + ffn_matmul_params(cfg, moe=cfg.n_routed_experts > 0) + head)
        n += cfg.n_mtp_modules * mtp
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, *, include_mtp: bool = True, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`; see the module docstring."""
    ctx = (seq_len + 1) / 2 if causal else seq_len
    attn_layers = cfg.n_layers + (cfg.n_mtp_modules if include_mtp else 0)
    scores = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx  # QK^T and PV, forward
    return 6.0 * activated_matmul_params(cfg, include_mtp=include_mtp) + 3.0 * attn_layers * scores


def measure_peak_flops(dtype=jnp.bfloat16, *, n: int | None = None, min_seconds: float = 0.2) -> float:
    """FLOP/s of a chain of [n, n] matmuls on the default device: an achievable peak, a little
    below the datasheet, which makes MFU against it a fair "how much is left" figure."""
    device = jax.devices()[0]
    if n is None:
        n = 512 if device.platform == "cpu" else 8192
    reps = 8

    @jax.jit
    def chain(a, b):
        # A true dependency chain of `reps` matmuls in one program: no per-call dispatch cost.
        return jax.lax.fori_loop(0, reps, lambda _, x: (x @ b).astype(dtype), a)

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = (jax.random.normal(key_b, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)  # keeps |x| ~ 1
    chain(a, b).block_until_ready()  # compile and warm up
    calls, start = 0, time.perf_counter()
    while True:
        chain(a, b).block_until_ready()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * reps * 2.0 * n ** 3 / elapsed


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over `peak` FLOP/s per device x devices."""
    return tokens_per_s * flops_per_token / (peak * n_devices)
