"""HF-format checkpoints: `from_pretrained(path)` and `save_pretrained(model, path)`.

The layout is DeepSeek's released one (HF `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM` names):
per-expert tensors `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (stacked here
into [E, ...]), FP8 weights with a `weight_scale_inv` companion (128x128 blocks, zero-padded at the
edges), and the MTP module as the extra layer `model.layers.{n_layers + k}` (enorm, hnorm, eh_proj,
a full block, shared_head.norm; its `embed_tokens` and `shared_head.head` repeat the shared ones).

Every tensor the model needs must be there with the right shape, and every tensor in the files
must be used: anything else is an error that names the tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer
from dsv3_jax.errors import CheckpointError, MissingFileError

log = logging.getLogger(__name__)

# Our path inside a block -> the HF name inside `model.layers.{i}.`. `{e}` is the expert index.
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.experts.w1": "mlp.experts.{e}.gate_proj.weight",
    "ffn.experts.w2": "mlp.experts.{e}.down_proj.weight",
    "ffn.experts.w3": "mlp.experts.{e}.up_proj.weight",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "head": "lm_head.weight",
             "norm.weight": "model.norm.weight"}
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
             "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
# Copies of shared tensors inside the MTP layer of DeepSeek's checkpoints.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def hf_template(path: tuple, cfg: ModelConfig) -> tuple[str, int]:
    """Our flat state path -> (HF name with {l} and {e} slots, number of stacked leading dims)."""
    name = ".".join(str(p) for p in path)
    if name.endswith("_scale_inv"):  # FP8 block scales sit beside their weight
        template, n_stack = hf_template(tuple(name[: -len("_scale_inv")].split(".")), cfg)
        return template + "_scale_inv", n_stack
    if name in TOP_NAMES:
        return TOP_NAMES[name], 0
    m = re.fullmatch(r"(dense|moe)_layers\.blocks\.(.+)", name)
    if m:
        inner = BLOCK_NAMES[m.group(2)]
        return "model.layers.{l}." + inner, 1 + ("{e}" in inner)
    m = re.fullmatch(r"mtp\.(\d+)\.(block\.)?(.+)", name)
    if m:
        prefix = f"model.layers.{cfg.n_layers + int(m.group(1))}."
        inner = BLOCK_NAMES[m.group(3)] if m.group(2) else MTP_NAMES[m.group(3)]
        return prefix + inner, int("{e}" in inner)
    raise KeyError(f"no HF name for parameter {name}")


def _layer_offset(path: tuple, cfg: ModelConfig) -> int:
    return cfg.n_dense_layers if path[0] == "moe_layers" else 0


# ---- reading ----------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None


@contextlib.contextmanager
def _opened(fname: str):
    """safe_open, with the library's errors (a truncated file, a bad header) as CheckpointErrors."""
    try:
        f = safe_open(fname, "numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fname}: cannot read safetensors ({e})") from None
    with f:
        try:
            yield f
        except SafetensorError as e:
            raise CheckpointError(f"{fname}: cannot read safetensors ({e})") from None


class SafetensorsDir:
    """Lazy access to the tensors of one HF directory: model.safetensors, or an index + shards."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index)["weight_map"]
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            with _opened(os.path.join(path, "model.safetensors")) as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise MissingFileError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        self.path, self.weight_map = path, weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def get(self, key: str) -> np.ndarray:
        fname = os.path.join(self.path, self.weight_map[key])
        with _opened(fname) as f:
            if f.get_slice(key).get_dtype() == "F8_E4M3":
                return _read_fp8(fname, key)
            return f.get_tensor(key)


def _read_fp8(fname: str, key: str) -> np.ndarray:
    # Library gap: safetensors' numpy backend looks up np.float8_e4m3fn, which numpy does not have
    # (ml_dtypes does). The format is an 8-byte header length, a JSON header, then raw bytes.
    with open(fname, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[key]
    start, end = info["data_offsets"]
    raw = np.memmap(fname, np.uint8, "r", offset=8 + n + start, shape=(end - start,))
    return np.asarray(raw).view(ml_dtypes.float8_e4m3fn).reshape(info["shape"])


def dequantize_block_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
    """FP8 weight (N,K) with per-128x128-block scales (ceil(N/128), ceil(K/128)) -> float32."""
    n, k = w.shape
    want = (-(-n // block), -(-k // block))
    if scale_inv.shape != want:
        raise CheckpointError(f"weight_scale_inv shape {scale_inv.shape} for weight {w.shape}: expected {want}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:n, :k]
    return w.astype(np.float32) * s


def _read_weight(src: SafetensorsDir, key: str, used: set[str], dequantize: bool = True) -> np.ndarray:
    used.add(key)
    arr = src.get(key)
    scale_key = key[: -len("weight")] + "weight_scale_inv"
    if dequantize and scale_key in src.weight_map:
        used.add(scale_key)
        arr = dequantize_block_fp8(arr, src.get(scale_key))
    return arr


def from_pretrained(path: str, *, keep_fp8: bool = False, **overrides) -> Transformer:
    """Load an HF-format DeepSeek-V3/V2 directory into a `Transformer`.

    FP8 weights (`weight_scale_inv` beside them) are dequantized, or with `keep_fp8` stay e4m3 with
    their block scales and run through the block-scaled FP8 matmul. `overrides` replace config fields.
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise MissingFileError(f"{path}: not a checkpoint directory (no config.json)")
    hf_cfg = read_json(cfg_file)
    cfg = ModelConfig.from_hf_config(hf_cfg, **overrides)
    src = SafetensorsDir(path)
    if keep_fp8:
        if not any(k.endswith("weight_scale_inv") for k in src.keys()):
            raise CheckpointError(f"{path}: keep_fp8=True but the checkpoint has no FP8 weights (weight_scale_inv)")
        cfg = cfg.replace(fp8_weights=True)
    mtp_keys = {k for k in src.keys() if k.startswith(f"model.layers.{cfg.n_layers}.")}
    if cfg.n_mtp_modules and not mtp_keys:
        log.info("%s: config has %d MTP module(s) but the files hold none; loading without MTP",
                 path, cfg.n_mtp_modules)
        cfg = cfg.replace(n_mtp_modules=0)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used: set[str] = set()
    missing, misshaped = [], []
    for p, var in nnx.to_flat_state(state):
        template, n_stack = hf_template(p, cfg)
        shape, offset = tuple(var.get_value().shape), _layer_offset(p, cfg)
        keys = _expand(template, shape[:n_stack], offset, "{l}" in template)
        flat_keys = [str(k) for k in np.ravel(keys)]
        absent = [k for k in flat_keys if k not in src.weight_map]
        if absent:
            missing.extend(absent)
            continue
        raw = var.get_value().dtype == jnp.float8_e4m3fn or p[-1].endswith("_scale_inv")
        parts = [_read_weight(src, k, used, dequantize=not raw) for k in flat_keys]
        if any(a.shape != parts[0].shape for a in parts):
            misshaped.append(f"{template}: differing shapes {sorted({a.shape for a in parts})}")
            continue
        arr = np.stack(parts).reshape(*shape[:n_stack], *parts[0].shape) if n_stack else parts[0]
        if arr.shape != shape:
            misshaped.append(f"{template} {arr.shape} (expected {shape})")
            continue
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
    for k in mtp_keys:
        if k.split(".", 3)[3] in MTP_SHARED_COPIES:
            used.add(k)
    unknown = sorted(src.keys() - used)
    if missing or misshaped or unknown:
        raise CheckpointError(f"{path}: checkpoint does not match config "
                         f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                         f"mis-shaped {misshaped[:8]}; unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''})")
    return nnx.merge(graphdef, state)


def _expand(template: str, stack_shape: tuple, offset: int, has_layer: bool):
    """Fill {l}/{e} for every index of the stacked leading dims: a nested list of names."""
    if not stack_shape:
        return template
    idx = np.indices(stack_shape).reshape(len(stack_shape), -1).T
    names = []
    for i in idx:
        fill = {"l": int(i[0]) + offset} if has_layer else {}
        if "{e}" in template:
            fill["e"] = int(i[-1])
        names.append(template.format(**fill))
    return np.array(names, dtype=object).reshape(stack_shape)


# ---- writing ----------------------------------------------------------------------------------
def hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Flatten the model into HF names (per-expert tensors unstacked, MTP shared copies added)."""
    cfg = model.cfg
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(model)):
        template, n_stack = hf_template(p, cfg)
        arr = np.asarray(jax.device_get(var[...]))
        keys = _expand(template, arr.shape[:n_stack], _layer_offset(p, cfg), "{l}" in template)
        if n_stack:
            for k, a in zip(np.ravel(keys), arr.reshape(-1, *arr.shape[n_stack:])):
                out[k] = np.ascontiguousarray(a)
        else:
            out[keys] = arr
    for k in range(cfg.n_mtp_modules):
        prefix = f"model.layers.{cfg.n_layers + k}."
        out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[prefix + "shared_head.head.weight"] = out["lm_head.weight"]
    return out


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`)."""
    os.makedirs(path, exist_ok=True)
    tensors = hf_tensors(model)
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = tensors[k], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.cfg.to_hf_config(), f, indent=2)
