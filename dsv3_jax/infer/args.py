"""The model options dsv3-infer and dsv3-serve share (where the weights come from, their dtype,
FP8, the mesh): one definition, so the two commands take the same flags."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser):
    """Where the model comes from and how it is laid out: shared by dsv3-infer and dsv3-serve.
    -> the "weights and devices" group, for a command to add its own options to."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="WORKDIR", help="a training run's workdir")
    src.add_argument("--hf_checkpoint", metavar="DIR", help="an HF-format directory (config.json, "
                     "safetensors, tokenizer.json)")
    weights = p.add_argument_group("weights and devices (--hf_checkpoint)")
    weights.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                         help="parameter and compute dtype (default: the checkpoint's torch_dtype)")
    weights.add_argument("--keep_fp8", action="store_true",
                         help="keep FP8 weights in e4m3 with their block scales (block-scaled FP8 matmuls)")
    weights.add_argument("--mesh", metavar="D,P,E", default=None,
                         help="data,pipeline,expert mesh (default: all devices, experts over as many as divide)")
    weights.add_argument("--prefill_mesh", metavar="D,P,E", default=None,
                         help="prefill on its own devices (prefill/decode disaggregation): the first D*P*E "
                              "devices prefill, the rest decode (--mesh, over the remaining devices)")
    weights.add_argument("--num_cpu_devices", type=int, default=None, help="fake CPU devices (dry runs, tests)")
    weights.add_argument("--attn_impl", default=None,
                         help="attention kernel (ModelConfig.attn_impl: reference, blockwise, splash, tokamax, "
                              "cudnn); default: the checkpoint config's")
    return weights
