"""Write a random checkpoint in DeepSeek's released layout, for the loader's tests and benchmark.

The layout of the released V3/R1/V3.1 directories: every projection of the attention, the dense
MLPs, the shared and the routed experts (`kv_a_proj_with_mqa` included) stored in e4m3 with an F32
`weight_scale_inv` per 128x128 block (zero-padded at the edges); the embedding, the head, the
norms, the router and the MTP layer's `eh_proj` in BF16, the router's `e_score_correction_bias` in
F32; the MTP module as layer `n_layers` with its own copies of the embedding and head; shards of
at most `shard_bytes` named by `model.safetensors.index.json`; `quantization_config` in
config.json. Values are random (normal weights, scales ~ 1/448 x N(1, 0.1)), generated one tensor
at a time, so a multi-GB checkpoint never sits in memory.

    python tools/synthetic_checkpoint.py OUT_DIR [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import ml_dtypes
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import MTP_SHARED_COPIES, _expand, _layer_offset, hf_template
from dsv3_jax.model import Transformer
from dsv3_jax.safetensors_io import write

# HF names stored in FP8 in the released checkpoints: every projection but eh_proj (and the head).
FP8_NAME = re.compile(r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF tensor name -> (shape, "F8" | "BF16" | "F32") of a checkpoint of `cfg` (BF16 model)."""
    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.replace(fp8_weights=False), rngs=nnx.Rngs(0))))
    out = {}
    for p, var in nnx.to_flat_state(state):
        template, n_stack = hf_template(p, cfg)
        shape = tuple(var.get_value().shape)
        names = np.ravel(np.asarray(_expand(template, shape[:n_stack], _layer_offset(p, cfg), "{l}" in template),
                                    dtype=object))
        for name in map(str, names):
            kind = "F32" if name.endswith("e_score_correction_bias") else "F8" if FP8_NAME.search(name) else "BF16"
            out[name] = (shape[n_stack:], kind)
    for k in range(cfg.n_mtp_modules):  # the MTP layer's own copies of the shared embedding and head
        for copy, shared in zip(MTP_SHARED_COPIES, ("model.embed_tokens.weight", "lm_head.weight")):
            out[f"model.layers.{cfg.n_layers + k}.{copy}"] = out[shared]
    return out


def _tensors(name: str, shape, kind: str, rng):
    if kind == "F32":
        return {name: rng.normal(0, 0.01, shape).astype(np.float32)}
    if kind == "BF16":
        init = 1.0 if name.endswith("norm.weight") or name.endswith("layernorm.weight") else 0.02
        values = rng.normal(init, 0.02, shape) if init == 1.0 else rng.normal(0, init, shape)
        return {name: values.astype(ml_dtypes.bfloat16)}
    n, k = shape
    scale_shape = (-(-n // 128), -(-k // 128))
    return {name: rng.normal(0, 64, shape).astype(np.float32).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn),
            name + "_scale_inv": (rng.normal(1, 0.1, scale_shape) * 0.02 / 64).astype(np.float32)}  # std ~0.02


def write_checkpoint(cfg: ModelConfig, out: str, *, shard_bytes: int = 256 << 20, seed: int = 0) -> int:
    """Write config.json, the shards and the index -> bytes of tensor data written."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            write(os.path.join(out, fname), current, metadata={"format": "pt"})
            shards.append((fname, sorted(current)))
            current, size = {}, 0

    for name, (shape, kind) in layout(cfg).items():
        for key, value in _tensors(name, shape, kind, rng).items():
            if size + value.nbytes > shard_bytes:
                flush()
            current[key], size, total = value, size + value.nbytes, total + value.nbytes
    flush()
    weight_map = {key: fname for fname, keys in shards for key in keys}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16", fp8_weights=False).to_hf_config()
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    return total


def config_of_size(gb: float) -> ModelConfig:
    """A V3-shaped config of about `gb` GB in FP8: dims not multiples of 128, and as expert-heavy as
    V3 (97% of V3's bytes are routed experts; here ~96%)."""
    base = dict(vocab_size=2000, dim=1000, inter_dim=2600, moe_inter_dim=350, n_dense_layers=1, n_heads=8,
                n_routed_experts=128, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                n_limited_groups=4, q_lora_rank=400, kv_lora_rank=200, qk_nope_head_dim=64, qk_rope_head_dim=32,
                v_head_dim=64, max_seq_len=256, n_mtp_modules=1, dtype="bfloat16", param_dtype="bfloat16")
    per_moe_layer = 3 * base["dim"] * base["moe_inter_dim"] * (base["n_routed_experts"] + 1)
    n_moe = max(1, math.ceil(gb * 1e9 / per_moe_layer) - 1)  # the MTP layer is one more MoE layer
    return ModelConfig(n_layers=1 + n_moe, **base)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--gb", type=float, default=1.0)
    args = p.parse_args()
    total = write_checkpoint(config_of_size(args.gb), args.out)
    print(f"{args.out}: {total / 1e9:.2f} GB of tensors")


if __name__ == "__main__":
    main()
