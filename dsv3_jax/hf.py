"""HF-format checkpoints: `from_pretrained(path)` and `save_pretrained(model, path)`.

The layout is DeepSeek's released one (HF `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM` names):
per-expert tensors `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (stacked here
into [E, ...]), FP8 weights with a `weight_scale_inv` companion (128x128 blocks, zero-padded at the
edges), and the MTP module as the extra layer `model.layers.{n_layers + k}` (enorm, hnorm, eh_proj,
a full block, shared_head.norm; its `embed_tokens` and `shared_head.head` repeat the shared ones).

Every tensor the model needs must be there with the right shape, and every tensor in the files
must be used (the MTP layers past `n_mtp_modules` are skipped on purpose): anything else is an
error that names the tensors, raised from the headers alone, before any tensor is read.

Loading onto a mesh: each parameter is assembled shard by shard (`jax.make_array_from_callback`):
a device's shard of a stacked [L, E, out, in] expert tensor is read from the memory-mapped
files for exactly its layers and experts (`safetensors_io`), converted, and handed to that
device; nothing holds the whole model, or a whole stacked tensor, in host memory, and each
process reads only what its own devices hold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from tqdm import tqdm

from dsv3_jax import sharding
from dsv3_jax.config import DTYPES, ModelConfig
from dsv3_jax.errors import CheckpointError, ConfigError, MissingFileError
from dsv3_jax.model import Transformer
from dsv3_jax.safetensors_io import SafetensorsDir, read_json, write

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


# ---- the config ---------------------------------------------------------------------------------
def pretrained_config(path: str, *, dtype: str | None = None, keep_fp8: bool = False,
                      n_mtp_modules: int | None = None, fp8_in_files: bool | None = None,
                      **overrides) -> ModelConfig:
    """The ModelConfig of an HF directory from its config.json alone (the dry run reads no tensor).

    dtype None follows the checkpoint's `torch_dtype` (bfloat16 for every released DeepSeek
    checkpoint); keep_fp8 keeps the projections in e4m3 with their 128x128 scales, which needs
    FP8 weights: `fp8_in_files` when the caller has looked at the tensors, else config.json's
    `quantization_config`, whose `scale_fmt: "ue8m0"` (DeepSeek V3.1) makes the activation scales
    powers of two, as the model was trained. n_mtp_modules: how many MTP modules to load.
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise MissingFileError(f"{path}: not a checkpoint directory (no config.json)")
    hf = read_json(cfg_file)
    cfg = ModelConfig.from_hf_config(hf, **overrides)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: expected one of {DTYPES} (None: the checkpoint's torch_dtype)")
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    quant = hf.get("quantization_config") or {}
    if keep_fp8:
        has_fp8 = fp8_in_files if fp8_in_files is not None else quant.get("quant_method") == "fp8"
        if not has_fp8:
            raise ConfigError(f"{path}: keep_fp8=True but the checkpoint has no FP8 weights (weight_scale_inv)")
        if list(quant.get("weight_block_size", [128, 128])) != [128, 128]:
            raise CheckpointError(f"{cfg_file}: quantization_config.weight_block_size="
                                  f"{quant['weight_block_size']}: only 128x128 blocks are supported")
        cfg = cfg.replace(fp8_weights=True, fp8_act_scale="ue8m0" if quant.get("scale_fmt") == "ue8m0" else "float")
    if n_mtp_modules is not None:
        if not 0 <= n_mtp_modules <= cfg.n_mtp_modules:
            raise ConfigError(f"n_mtp_modules={n_mtp_modules}: the checkpoint has {cfg.n_mtp_modules} MTP "
                              f"module(s) (config.json num_nextn_predict_layers)")
        cfg = cfg.replace(n_mtp_modules=n_mtp_modules)
    return cfg


# ---- the plan: which file tensors make each parameter ----------------------------------------------
@dataclasses.dataclass
class _Source:
    """One parameter of the model and the HF tensors it is assembled from."""

    keys: np.ndarray  # object array over the stacked leading dims (0-d when none) of HF names
    n_stack: int
    shape: tuple[int, ...]  # the parameter's global shape
    dtype: np.dtype  # the parameter's dtype
    dequantize: bool  # the file holds e4m3 + weight_scale_inv; the parameter is high precision


def _scale_key(key: str) -> str:
    return key[: -len("weight")] + "weight_scale_inv"


def _plan(state, cfg: ModelConfig, src: SafetensorsDir, path: str) -> dict[tuple, _Source]:
    """Match every parameter to its file tensors by name and shape, from the headers alone; every
    mismatch is collected into one CheckpointError."""
    plan, used, missing, misshaped = {}, set(), [], []
    for p, var in nnx.to_flat_state(state):
        template, n_stack = hf_template(p, cfg)
        shape, dtype = tuple(var.get_value().shape), np.dtype(var.get_value().dtype)
        keys = np.asarray(_expand(template, shape[:n_stack], _layer_offset(p, cfg), "{l}" in template), dtype=object)
        names = [str(k) for k in keys.ravel()]
        absent = [k for k in names if k not in src.weight_map]
        if absent:
            missing.extend(absent)
            continue
        wrong = sorted({src.shape(k) for k in names if src.shape(k) != shape[n_stack:]})
        if wrong:
            misshaped.append(f"{template} {wrong[0]} (expected {shape[n_stack:]})")
            continue
        fp8_file = src.dtype(names[0]).name == "float8_e4m3fn"
        dequantize = fp8_file and dtype.name != "float8_e4m3fn"
        if dtype.name == "float8_e4m3fn" and not fp8_file:
            misshaped.append(f"{template}: stored as {src.dtype(names[0])}, but keep_fp8 expects e4m3 here")
            continue
        if dequantize:
            lacking = [k for k in names if _scale_key(k) not in src.weight_map]
            if lacking:
                missing.extend(_scale_key(k) for k in lacking)
                continue
            used.update(_scale_key(k) for k in names)
        used.update(names)
        plan[p] = _Source(keys, n_stack, shape, dtype, dequantize)
    skipped = _skipped_mtp_keys(src, cfg)
    unknown = sorted(src.keys() - used - skipped)
    if missing or misshaped or unknown:
        raise CheckpointError(f"{path}: checkpoint does not match config.json "
                              f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                              f"mis-shaped {misshaped[:8]}; unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''})")
    return plan


def _mtp_layers(src: SafetensorsDir, cfg: ModelConfig) -> set[int]:
    """The layer indices >= n_layers present in the files: the checkpoint's MTP modules."""
    layers = {int(m.group(1)) for k in src.keys() if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    return {i for i in layers if i >= cfg.n_layers}


def _skipped_mtp_keys(src: SafetensorsDir, cfg: ModelConfig) -> set[str]:
    """The MTP layers' copies of the shared embedding and head (always), and every tensor of the
    MTP layers past the ones loaded (`n_mtp_modules`)."""
    out = set()
    for k in src.keys():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", k)
        if m and int(m.group(1)) >= cfg.n_layers:
            if int(m.group(1)) >= cfg.n_layers + cfg.n_mtp_modules or m.group(2) in MTP_SHARED_COPIES:
                out.add(k)
    return out


# ---- reading a shard -------------------------------------------------------------------------------
def _dequantize(w: np.ndarray, scale: np.ndarray, rows: slice, cols: slice, block: int = 128) -> np.ndarray:
    """An e4m3 slice w = W[rows, cols] times its 128x128 block scales -> float32. `scale` holds the
    blocks rows.start // 128 .. and cols.start // 128 .. onward (the blocks this slice touches)."""
    r = np.arange(rows.start, rows.stop) // block - rows.start // block
    c = np.arange(cols.start, cols.stop) // block - cols.start // block
    return w.astype(np.float32) * scale.astype(np.float32)[r[:, None], c[None, :]]


def _read_shard(s: _Source, src: SafetensorsDir, index: tuple[slice, ...], bar) -> np.ndarray:
    """The parameter's block `index` (one slice per dimension), read from the files."""
    out = np.empty(tuple(i.stop - i.start for i in index), s.dtype)
    inner = index[s.n_stack:]
    names = np.asarray(s.keys[index[:s.n_stack]], dtype=object)
    for pos in np.ndindex(names.shape):
        key = str(names[pos])
        a = src.get(key, inner)
        bar.update(a.nbytes)
        if s.dequantize:
            rows, cols = inner
            blocks = (slice(rows.start // 128, -(-rows.stop // 128)), slice(cols.start // 128, -(-cols.stop // 128)))
            a = _dequantize(a, src.get(_scale_key(key), blocks), rows, cols)
        out[pos] = a
    return out


def _assemble(s: _Source, src: SafetensorsDir, target, bar) -> jax.Array:
    """The global array laid out as `target`, each device's block read on its own."""
    blocks: dict[tuple, np.ndarray] = {}  # replicated layouts ask for the same block per device

    def fetch(index):
        index = tuple(slice(*i.indices(n)[:2]) for i, n in zip(index, s.shape))
        key = tuple((i.start, i.stop) for i in index)
        if key not in blocks:
            blocks[key] = _read_shard(s, src, index, bar)
        return blocks[key]

    return jax.make_array_from_callback(s.shape, target, fetch)


def _targets(state, mesh: Mesh | None) -> dict[tuple, jax.sharding.Sharding]:
    """Where each parameter goes: by the logical-axis rules on `mesh`, or whole on the default device."""
    out = {}
    for p, var in nnx.to_flat_state(state):
        if mesh is None:
            out[p] = SingleDeviceSharding(jax.devices()[0])
        else:
            spec = sharding.logical_to_spec(var.get_metadata()["logical_axes"], var.get_value().shape, mesh)
            out[p] = NamedSharding(mesh, spec)
    return out


# ---- loading -----------------------------------------------------------------------------------------
def from_pretrained(path: str, *, dtype: str | None = None, keep_fp8: bool = False, mesh: Mesh | None = None,
                    n_mtp_modules: int | None = None, progress: bool | None = None, **overrides) -> Transformer:
    """Load an HF-format DeepSeek-V3/V2 directory into a `Transformer`.

    dtype: None follows config.json's torch_dtype, or "float32" / "bfloat16". keep_fp8: the
    projections stay e4m3 with their 128x128 block scales (exactly the tensors that have a
    `weight_scale_inv`; embedding, head, norms, router and eh_proj keep their own dtype) and run
    through the block-scaled FP8 matmul; otherwise FP8 weights are dequantized. mesh: each
    parameter is assembled shard by shard onto it by the logical-axis rules. n_mtp_modules: how
    many MTP modules to load (0: none). progress: a bar over the bytes read (None: on a terminal).
    `overrides` replace config fields.
    """
    options = dict(dtype=dtype, n_mtp_modules=n_mtp_modules, **overrides)
    cfg = pretrained_config(path, **options)  # config.json first: a directory without one is no checkpoint
    src = SafetensorsDir(path)
    if keep_fp8:
        fp8_in_files = any(k.endswith("weight_scale_inv") for k in src.keys())
        cfg = pretrained_config(path, keep_fp8=True, fp8_in_files=fp8_in_files, **options)
    present = len(_mtp_layers(src, cfg))
    if cfg.n_mtp_modules > present:
        log.info("%s: config has %d MTP module(s) but the files hold %d; loading %d",
                 path, cfg.n_mtp_modules, present, present)
        cfg = cfg.replace(n_mtp_modules=present)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    plan = _plan(state, cfg, src, path)
    targets = _targets(state, mesh)
    total = sum(src.tensor_bytes(str(k)) for s in plan.values() for k in s.keys.ravel())
    show = (jax.process_index() == 0) if progress is None else progress
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(os.path.normpath(path))}",
              disable=None if show else True) as bar:
        for p, var in nnx.to_flat_state(state):
            var.set_value(_assemble(plan[p], src, targets[p], bar))
    model = nnx.merge(graphdef, state)
    model.source_dir = os.path.abspath(path)  # save_pretrained keeps its token ids and tokenizer files
    return model


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


# Files beside the weights that other tools need, copied by save_pretrained from the source directory.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "tiktoken.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
# config.json keys that describe the tokenizer or generation, not the architecture: kept from the source.
KEPT_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures", "auto_map")


def hf_config(model: Transformer) -> dict:
    """config.json for `model`: the architecture from its ModelConfig; token ids and model type
    from the directory it was loaded from, if any; quantization_config when its weights are FP8."""
    hf = model.cfg.to_hf_config()
    source = getattr(model, "source_dir", None)
    if source and os.path.isfile(os.path.join(source, "config.json")):
        original = read_json(os.path.join(source, "config.json"))
        hf.update({k: original[k] for k in KEPT_HF_KEYS if k in original})
    else:
        for k in ("bos_token_id", "eos_token_id"):  # unknown without a tokenizer: better absent than wrong
            hf.pop(k, None)
    if model.cfg.fp8_weights:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
        if model.cfg.fp8_act_scale == "ue8m0":
            hf["quantization_config"]["scale_fmt"] = "ue8m0"
    return hf


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`), and the
    tokenizer, chat template and generation config files of the source directory."""
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
        write(os.path.join(path, "model.safetensors"), shards[0], metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write(os.path.join(path, fname), shard, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(model), f, indent=2)
    source = getattr(model, "source_dir", None)
    if source and os.path.abspath(source) != os.path.abspath(path):
        for name in COMPANION_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
