#!/usr/bin/env python3
"""HF transformers reference side of the dsv3-jax parity tests.

Runs in the HF venv (python 3.11, torch + transformers + safetensors + numpy; no JAX).

  generate --out DIR
      For each tiny config in CONFIGS build DeepseekV3ForCausalLM / DeepseekV2ForCausalLM in
      float32, randomise every parameter deterministically, save_pretrained(DIR/<name>), and write
      DIR/<name>/reference.safetensors with `input_ids` (int32 [2, S]) and `logits`
      (float32 [2, S, V]).  The logits are computed from the *reloaded* directory (the same path
      as the `logits` subcommand) and checked against the in-memory model.

  logits --model DIR --input_ids FILE --out FILE
      Load an HF directory with AutoModelForCausalLM (float32, eager attention and experts), read `input_ids`
      from FILE (safetensors), write `logits` (float32) to --out.  Fails on missing or mismatched
      weights, and on unexpected weights other than MTP layers (model.layers.{>= num_hidden_layers}.*).

Deterministic: running `generate` twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

BATCH = 2
WEIGHT_SEED = 1234
IDS_SEED = 4321
# Any top-k / group selection decided by less than this (in score units) makes the fixture
# fragile across frameworks; we then move on to the next token-id seed.
MIN_ROUTING_MARGIN = 1e-4
MAX_ID_SEED_TRIES = 64

# --------------------------------------------------------------------------------------------
# Tiny configs.  Sizes: hidden 64, 4 heads, vocab 256.  intermediate_size (32) and
# moe_intermediate_size (4 or 8) are small so that each model.safetensors stays near 400 KB and
# the five fixture directories together stay under 2 MB (16 experts x 3 x 64 x 32 float32 would
# alone be 400 KB per MoE layer).  Widths do not change any code path.
# --------------------------------------------------------------------------------------------
_ATTN = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=1,
)

_YARN_V3 = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=8,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)

_YARN_V2 = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=8,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=0.707,
    mscale_all_dim=0.707,
)

CONFIGS: dict[str, dict] = {
    "v3_group": dict(
        family="v3",
        seq_len=12,
        config=dict(
            _ATTN,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            q_lora_rank=32,
            intermediate_size=32,
            moe_intermediate_size=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=64,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            rope_interleave=True,
            num_nextn_predict_layers=0,
        ),
    ),
    "v3_yarn": dict(
        family="v3",
        seq_len=20,
        config=dict(
            _ATTN,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            q_lora_rank=32,
            intermediate_size=32,
            moe_intermediate_size=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=32,  # = factor * original_max_position_embeddings
            rope_parameters=dict(_YARN_V3),
            rope_interleave=True,
            num_nextn_predict_layers=0,
        ),
    ),
    "v3_dense2": dict(
        family="v3",
        seq_len=10,
        config=dict(
            _ATTN,
            num_hidden_layers=3,
            first_k_dense_replace=2,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=2,
            q_lora_rank=32,
            intermediate_size=32,
            moe_intermediate_size=8,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=64,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            rope_interleave=True,
            num_nextn_predict_layers=0,
        ),
    ),
    "v2_lite": dict(
        family="v2",
        seq_len=16,
        config=dict(
            _ATTN,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            num_experts_per_tok=2,
            n_shared_experts=2,
            q_lora_rank=None,
            intermediate_size=32,
            moe_intermediate_size=8,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            max_position_embeddings=32,
            rope_parameters=dict(_YARN_V2),
            # not read by transformers' DeepseekV2 (softmax is hard-wired); kept for our loader.
            scoring_func="softmax",
        ),
    ),
    "v2_group": dict(
        family="v2",
        seq_len=12,
        config=dict(
            _ATTN,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            num_experts_per_tok=4,
            n_shared_experts=2,
            q_lora_rank=32,
            intermediate_size=32,
            moe_intermediate_size=4,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,  # DeepSeek-V2 (236B) value
            max_position_embeddings=64,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            scoring_func="softmax",
        ),
    ),
    # Moonlight (Moonshot's 16B DeepSeek-V3-architecture model): no query compression, one
    # expert group, rms_norm_eps 1e-5 (the latent norms keep 1e-6 in every implementation).
    "moonlight_like": dict(
        family="v3",
        seq_len=12,
        config=dict(
            _ATTN,
            rms_norm_eps=1e-5,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=6,
            n_shared_experts=2,
            q_lora_rank=None,
            intermediate_size=32,
            moe_intermediate_size=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.446,
            max_position_embeddings=64,
            rope_parameters=dict(rope_type="default", rope_theta=50000.0),
            rope_interleave=True,
            num_nextn_predict_layers=0,
        ),
    ),
    # Kimi-K2 (DeepSeek-V3 architecture, 384 experts): one expert group, many experts, YaRN with
    # factor 32 and beta_fast = beta_slow = 1.
    "kimi_like": dict(
        family="v3",
        seq_len=20,
        config=dict(
            _ATTN,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=48,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=8,
            n_shared_experts=1,
            q_lora_rank=32,
            intermediate_size=32,
            moe_intermediate_size=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.827,
            max_position_embeddings=256,  # = factor * original_max_position_embeddings
            rope_parameters=dict(_YARN_V3, factor=32.0, beta_fast=1.0, beta_slow=1.0),
            rope_interleave=True,
            num_nextn_predict_layers=0,
        ),
    ),
}

FAMILIES = {
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Model construction and randomisation
# --------------------------------------------------------------------------------------------
def build_model(name: str):
    spec = CONFIGS[name]
    config_cls, model_cls = FAMILIES[spec["family"]]
    torch.manual_seed(WEIGHT_SEED)
    config = config_cls(**spec["config"], dtype="float32")
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = model_cls(config).to(torch.float32)
    randomise_(model, WEIGHT_SEED)
    model.eval()
    return model


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (and the router bias buffer) from a seeded generator.

    Linear / expert weights ~ N(0, 1/fan_in) so activations stay O(1) through the stack; RMSNorm
    weights = 1 + 0.1 * N(0, 1); embeddings ~ N(0, 1); router weights ~ N(0, 1/hidden) so that the
    router scores are well spread; e_score_correction_bias = 0.05 * N(0, 1) (has negative
    entries); any bias vectors ~ 0.1 * N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    for bname, buf in model.named_buffers():
        if bname.endswith("e_score_correction_bias"):
            tensors[bname] = buf
    for pname in sorted(tensors):
        t = tensors[pname]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if pname.endswith("e_score_correction_bias"):
            val = 0.05 * noise
            assert (val < 0).any() and (val > 0).any(), pname
        elif "norm" in pname.split(".")[-2] and pname.endswith(".weight") and t.ndim == 1:
            val = 1.0 + 0.1 * noise
        elif pname.endswith("embed_tokens.weight"):
            val = noise
        elif t.ndim == 1:  # biases (none with attention_bias=False / mlp_bias=False)
            val = 0.1 * noise
        else:
            fan_in = t.shape[-1]
            val = noise / math.sqrt(fan_in)
        t.copy_(val.to(t.dtype))


# --------------------------------------------------------------------------------------------
# Routing margins (robustness of the fixture to float reassociation in another framework)
# --------------------------------------------------------------------------------------------
def _kth_gap(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row gap between the k-th and (k+1)-th largest entries (inf if k == n)."""
    if k >= x.shape[-1]:
        return torch.full(x.shape[:-1], float("inf"), dtype=x.dtype)
    v = torch.topk(x, k + 1, dim=-1).values
    return v[..., k - 1] - v[..., k]


def routing_margins(model, input_ids: torch.Tensor) -> float:
    """Smallest selection margin (group and expert) over all MoE layers and tokens, in float64."""
    captured = []
    hooks = []
    for mod in model.modules():
        cls = type(mod).__name__
        if cls in ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter"):
            hooks.append(mod.register_forward_hook(lambda m, inp, out: captured.append((m, inp[0].detach()))))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    worst = float("inf")
    for gate, h in captured:
        x = h.reshape(-1, gate.hidden_dim).double()
        logits = x @ gate.weight.double().T
        E = gate.num_experts
        if type(gate).__name__ == "DeepseekV3TopkRouter":
            s = logits.sigmoid() + gate.e_score_correction_bias.double()
            G, TG = gate.num_group, gate.topk_group
            gs = s.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
            m_group = _kth_gap(gs, TG)
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, dim=-1).indices, 1.0)
            keep = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
            s = s.masked_fill(~keep, float("-inf"))
        else:
            s = logits.softmax(-1)
            m_group = torch.full(s.shape[:-1], float("inf"), dtype=s.dtype)
            if gate.topk_method == "group_limited_greedy":
                G, TG = gate.num_group, gate.topk_group
                gs = s.view(-1, G, E // G).max(dim=-1).values
                m_group = _kth_gap(gs, TG)
                keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, dim=-1).indices, 1.0)
                keep = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
                s = s.masked_fill(~keep, 0.0)
        m_expert = _kth_gap(s, gate.top_k)
        worst = min(worst, float(m_group.min()), float(m_expert.min()))
    return worst


# --------------------------------------------------------------------------------------------
# Loading / logits
# --------------------------------------------------------------------------------------------
def load_hf(model_dir: str):
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    model.eval()
    n_layers = model.config.num_hidden_layers
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mtp_re = re.compile(r"^model\.layers\.(\d+)\.")
    mtp_unexpected = [k for k in unexpected if (m := mtp_re.match(k)) and int(m.group(1)) >= n_layers]
    other_unexpected = [k for k in unexpected if k not in mtp_unexpected]
    errors = []
    if missing:
        errors.append(f"missing keys: {missing}")
    if mismatched:
        errors.append(f"mismatched keys: {mismatched}")
    if other_unexpected:
        errors.append(f"unexpected keys: {other_unexpected}")
    if errors:
        raise RuntimeError(f"{model_dir}: " + "; ".join(errors))
    if mtp_unexpected:
        _log(f"note: {len(mtp_unexpected)} MTP keys (model.layers.>={n_layers}.*) ignored by the HF main model")
    if model.dtype != torch.float32:
        raise RuntimeError(f"model loaded in {model.dtype}, expected float32")
    return model


@torch.no_grad()
def compute_logits(model, input_ids: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(np.ascontiguousarray(input_ids).astype(np.int64))
    out = model(input_ids=ids, use_cache=False)
    return out.logits.to(torch.float32).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    names = args.only or list(CONFIGS)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name in names:
        spec = CONFIGS[name]
        model = build_model(name)
        V, S = model.config.vocab_size, spec["seq_len"]

        # Pick the first token-id seed whose routing decisions are all well separated.
        for k in range(MAX_ID_SEED_TRIES):
            rng = np.random.default_rng(IDS_SEED + k)
            input_ids = rng.integers(0, V, size=(BATCH, S), dtype=np.int64).astype(np.int32)
            margin = routing_margins(model, torch.from_numpy(input_ids.astype(np.int64)))
            if margin >= MIN_ROUTING_MARGIN:
                break
        else:
            raise RuntimeError(f"{name}: no token-id seed with routing margin >= {MIN_ROUTING_MARGIN}")

        mem_logits = compute_logits(model, input_ids)
        out_dir = os.path.join(args.out, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        for extra in ("generation_config.json",):  # not needed by the tests; keep fixtures minimal
            p = os.path.join(out_dir, extra)
            if os.path.exists(p):
                os.remove(p)

        reloaded = load_hf(out_dir)
        logits = compute_logits(reloaded, input_ids)
        if not np.array_equal(logits, mem_logits):
            diff = float(np.max(np.abs(logits - mem_logits)))
            raise RuntimeError(f"{name}: reloaded logits differ from in-memory logits (max abs {diff:g})")
        np_save_file(
            {"input_ids": input_ids, "logits": logits.astype(np.float32)},
            os.path.join(out_dir, "reference.safetensors"),
        )
        for fname in os.listdir(out_dir):  # safetensors writes 0600; make fixtures world-readable
            os.chmod(os.path.join(out_dir, fname), 0o644)
        size = os.path.getsize(os.path.join(out_dir, "model.safetensors"))
        summary[name] = dict(
            ids_seed=IDS_SEED + k,
            routing_margin=margin,
            model_bytes=size,
            logits_std=float(logits.std()),
            logits_absmax=float(np.abs(logits).max()),
        )
        _log(f"{name}: S={S} ids_seed={IDS_SEED + k} min routing margin={margin:.3g} "
             f"model.safetensors={size} B logits std={logits.std():.3f}")
    if args.summary:
        print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def cmd_logits(args) -> int:
    torch.set_num_threads(1)
    ids = np_load_file(args.input_ids)["input_ids"]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got {ids.shape}")
    model = load_hf(args.model)
    logits = compute_logits(model, ids)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np_save_file({"logits": logits.astype(np.float32)}, args.out)
    _log(f"wrote {args.out}: logits {logits.shape} ({transformers.__version__}, torch {torch.__version__})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="build tiny HF models + reference logits")
    g.add_argument("--out", required=True)
    g.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="subset of configs")
    g.add_argument("--summary", action="store_true", help="print a JSON summary on stdout")
    g.set_defaults(fn=cmd_generate)
    lg = sub.add_parser("logits", help="logits of an HF directory for given input_ids")
    lg.add_argument("--model", required=True)
    lg.add_argument("--input_ids", required=True)
    lg.add_argument("--out", required=True)
    lg.set_defaults(fn=cmd_logits)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
