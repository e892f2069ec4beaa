"""Real-checkpoint loading: DeepSeek's released layout (FP8 projections with 128x128 scales, BF16
elsewhere, an MTP layer, shards with an index) loaded in its own dtypes, onto a mesh shard by
shard; save_pretrained round trips; transformers parity in bf16; bad files fail in one line,
before anything is read."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dsv3_jax import ModelConfig
from dsv3_jax.errors import CheckpointError, ConfigError, MissingFileError
from dsv3_jax.hf import from_pretrained, save_pretrained
from dsv3_jax.safetensors_io import SafetensorsFile
from dsv3_jax.sharding import make_mesh
from tools.synthetic_checkpoint import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
# Dims that are not multiples of 128 (the scales' edge blocks are zero-padded), 16 experts, one dense
# layer, two MoE layers and the MTP layer.
CFG = ModelConfig(vocab_size=300, dim=200, inter_dim=260, moe_inter_dim=72, n_layers=3, n_dense_layers=1,
                  n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                  n_limited_groups=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, max_seq_len=64, n_mtp_modules=1)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("released"))
    write_checkpoint(CFG, path, shard_bytes=400_000)  # several shards and an index
    return path


def leaves(model):
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.itemsize == 1:
        a, b = a.view(np.uint8), b.view(np.uint8)
    return a.dtype == b.dtype and np.array_equal(a, b)


def test_released_layout_loads_in_its_own_dtypes(released):
    files = [f for f in os.listdir(released) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.exists(os.path.join(released, "model.safetensors.index.json"))
    model = from_pretrained(released, keep_fp8=True)
    got = leaves(model)
    fp8 = {k for k, v in got.items() if v.dtype == jnp.float8_e4m3fn}
    scales = {k[: -len("_scale_inv")] for k in got if k.endswith("_scale_inv")}
    assert fp8 == scales  # e4m3 exactly where the checkpoint has weight_scale_inv
    assert "moe_layers.blocks.attn.wkv_a.weight" in fp8 and "moe_layers.blocks.ffn.experts.w2" in fp8
    for k in ("embed.weight", "head", "norm.weight", "mtp.0.eh_proj.weight", "moe_layers.blocks.ffn.gate.weight"):
        assert got[k].dtype == jnp.bfloat16, k  # BF16 in the files, BF16 here
    assert got["moe_layers.blocks.ffn.gate.bias"].dtype == jnp.float32
    # dtype None followed torch_dtype; "float32" on request dequantizes every FP8 weight
    assert model.cfg.dtype == model.cfg.param_dtype == "bfloat16"
    f32 = from_pretrained(released, dtype="float32")
    assert {v.dtype for v in leaves(f32).values()} == {jnp.dtype(jnp.float32)}
    a, b = model(TOKENS), f32(TOKENS)
    cos = float((a * b).sum() / jnp.sqrt((a * a).sum() * (b * b).sum()))
    assert cos > 0.98 and float((a.argmax(-1) == b.argmax(-1)).mean()) > 0.8  # FP8 activations' error only


def test_onto_a_mesh_the_experts_split_and_nothing_changes(released):
    one = from_pretrained(released, keep_fp8=True)
    mesh = make_mesh(1, 1, 8)
    spread = from_pretrained(released, keep_fp8=True, mesh=mesh)
    w1 = spread.moe_layers.blocks.ffn.experts.w1[...]
    assert {s.data.shape for s in w1.addressable_shards} == {(2, 16 // 8, 72, 200)}  # 8 ways, not replicated
    for (k, a), b in zip(leaves(one).items(), leaves(spread).values()):
        assert same(a, b), k


def test_ue8m0_scale_format_gives_power_of_two_activation_scales(released, tmp_path):
    """V3.1's quantization_config.scale_fmt = "ue8m0": activations are quantized with power-of-two
    scales, as it was trained: the logits change (coarser scales) but stay close to the float-scale
    ones, and the format survives a save."""
    path = str(tmp_path / "v31")
    shutil.copytree(released, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    pow2, plain = from_pretrained(path, keep_fp8=True), from_pretrained(released, keep_fp8=True)
    assert pow2.cfg.fp8_act_scale == "ue8m0" and plain.cfg.fp8_act_scale == "float"
    a, b = np.asarray(pow2(TOKENS), np.float32), np.asarray(plain(TOKENS), np.float32)
    assert np.abs(a - b).max() > 0 and (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()) > 0.95
    save_pretrained(pow2, str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "config.json"))["quantization_config"]["scale_fmt"] == "ue8m0"


def test_mtp_modules_are_skipped_or_kept(released):
    none = from_pretrained(released, n_mtp_modules=0, dtype="float32")
    assert none.cfg.n_mtp_modules == 0 and len(none.mtp) == 0
    full = from_pretrained(released, dtype="float32")
    np.testing.assert_array_equal(none(TOKENS), full(TOKENS))
    with pytest.raises(ConfigError, match="n_mtp_modules=2"):
        from_pretrained(released, n_mtp_modules=2)


def test_save_pretrained_round_trip_is_bit_identical(released, tmp_path):
    for keep_fp8 in (True, False):
        model = from_pretrained(released, keep_fp8=keep_fp8)
        out = str(tmp_path / f"saved_{keep_fp8}")
        save_pretrained(model, out)
        back = from_pretrained(out, keep_fp8=keep_fp8)
        for (k, a), b in zip(leaves(model).items(), leaves(back).values()):
            assert same(a, b), k
        hf = json.load(open(os.path.join(out, "config.json")))
        src = json.load(open(os.path.join(released, "config.json")))
        assert hf["model_type"] == "deepseek_v3" and hf["torch_dtype"] == "bfloat16"
        assert ("quantization_config" in hf) == keep_fp8
        assert (hf.get("bos_token_id"), hf.get("eos_token_id")) == (src.get("bos_token_id"), src.get("eos_token_id"))


def test_save_pretrained_keeps_token_ids_and_copies_tokenizer_files(tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(FIXTURES, "v3_group"), src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(bos_token_id=7, eos_token_id=9)
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        open(os.path.join(src, name), "w").write("{}" if name.endswith(".json") else "{{ messages }}")
    out = str(tmp_path / "out")
    save_pretrained(from_pretrained(src), out)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (7, 9)
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.exists(os.path.join(out, name)), name


def test_released_layout_float32_against_transformers(released, tmp_path):
    """The float32 path of a released-layout checkpoint against transformers, which reads our
    dequantized save of it (transformers' own FP8 path needs a GPU)."""
    from safetensors.numpy import save_file
    model = from_pretrained(released, dtype="float32")
    out = str(tmp_path / "f32")
    save_pretrained(model, out)
    hf_python = os.path.join(ROOT, ".venv-hf", "bin", "python")
    if not os.path.exists(hf_python):
        pytest.fail(f"{hf_python} is missing: run `make hfvenv` (make test does it)")
    save_file({"input_ids": np.asarray(TOKENS)}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run([hf_python, os.path.join(ROOT, "tools", "hf_reference.py"), "logits", "--model", out,
                           "--input_ids", str(tmp_path / "ids.safetensors"), "--out", str(tmp_path / "hf.safetensors")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "hf.safetensors"))["logits"]
    assert np.abs(np.asarray(model(TOKENS)) - theirs).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURES)))
def test_bf16_logits_against_transformers(name):
    """The bf16 path against transformers' float32 logits. Derived bound: bf16 keeps 8 significant
    bits, so each rounding of a weight or activation is off by at most 2^-9 relative; a token's
    logits pass ~10 roundings per layer and independent errors add in quadrature, so for L <= 3
    layers a position's logits are off by ~sqrt(30) x 2^-9 ~ 1.1% of their scale (measured:
    medians 0.7-1.2%); we allow 3x that for the typical (median) position. A position where some
    expert choice was decided by less than bf16's rounding (the fixtures guarantee margins of only
    1e-4) may pick another expert and move further: that is routing, not the loader, so the tail
    is bounded by argmax agreement instead."""
    ref = load_file(os.path.join(FIXTURES, name, "reference.safetensors"))
    model = from_pretrained(os.path.join(FIXTURES, name), dtype="bfloat16")
    got = np.asarray(model(jnp.asarray(ref["input_ids"])))
    per_position = np.abs(got - ref["logits"]).max(-1) / np.abs(ref["logits"]).max()
    assert np.median(per_position) <= 3 * np.sqrt(30) * 2.0 ** -9, np.median(per_position)
    assert (got.argmax(-1) == ref["logits"].argmax(-1)).mean() >= 0.9


# ---- bad files: one clear error, raised from the headers before any tensor is read -------------------
def _copy(released, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(released, dst)
    return dst


def _shard(path):
    return os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1])


def _truncate(path):
    f = _shard(path)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 1000)


def _inflate_header(path):
    """A header whose last tensor claims more bytes than the file holds."""
    f = _shard(path)
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["shape"] = [header[last]["shape"][0] * 1000] + header[last]["shape"][1:]
    begin = header[last]["data_offsets"][0]
    itemsize = {"F32": 4, "BF16": 2, "F8_E4M3": 1}[header[last]["dtype"]]
    header[last]["data_offsets"][1] = begin + int(np.prod(header[last]["shape"])) * itemsize
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    open(f, "wb").write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def _drop_shard(path):
    os.remove(_shard(path))


def _index_names_ghost(path):
    index = os.path.join(path, "model.safetensors.index.json")
    data = json.load(open(index))
    data["weight_map"]["model.layers.0.ghost.weight"] = os.path.basename(_shard(path))
    json.dump(data, open(index, "w"))


def _config_disagrees(path):
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["moe_intermediate_size"] = 80
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


@pytest.mark.parametrize("damage,error,match", [
    (_truncate, CheckpointError, "truncated"),
    (_inflate_header, CheckpointError, "truncated"),
    (_drop_shard, MissingFileError, "no such file"),
    (_index_names_ghost, CheckpointError, "does not hold"),
    (_config_disagrees, CheckpointError, "mis-shaped"),
])
def test_bad_files_fail_in_one_line_before_reading(released, tmp_path, monkeypatch, damage, error, match):
    path = _copy(released, tmp_path)
    damage(path)
    reads = []
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, *a, **k: reads.append(a))
    with pytest.raises(error, match=match) as info:
        from_pretrained(path, keep_fp8=True)
    assert "\n" not in str(info.value) and not reads  # one line; nothing half-loaded


def test_config_json_missing_an_architecture_key_is_an_error(released, tmp_path):
    """No preset value fills a key config.json leaves out (it would load the wrong model silently)."""
    path = _copy(released, tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg["moe_intermediate_size"], cfg["n_group"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match=r"missing \['moe_intermediate_size', 'n_group'\]"):
        from_pretrained(path)


def test_safetensors_files_round_trip_every_dtype(tmp_path):
    """The reader's dtypes agree with safetensors' own files (F32, BF16 and F8_E4M3 by slice)."""
    from dsv3_jax.safetensors_io import SafetensorsDir, write
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
              "b": np.linspace(-2, 2, 40).reshape(5, 8).astype(ml_dtypes.bfloat16),
              "c": np.linspace(-400, 400, 256).reshape(16, 16).astype(ml_dtypes.float8_e4m3fn)}
    write(str(tmp_path / "model.safetensors"), arrays)
    d = SafetensorsDir(str(tmp_path))
    for k, v in arrays.items():
        assert same(d.get(k), v) and same(d.get(k, (slice(1, 3),)), v[1:3]), k
    from safetensors import safe_open  # the library reads what we write (its numpy side has no FP8)
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), arrays["a"])
        assert f.get_slice("c").get_shape() == [16, 16] and f.get_slice("c").get_dtype() == "F8_E4M3"


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_infer_mesh_that_does_not_divide_the_experts(released):
    res = _cli("--hf_checkpoint", released, "--num_cpu_devices", "8", "--mesh", "1,1,3", "--prompt", "hi")
    assert res.returncode == 2 and "Traceback" not in res.stderr  # a usage mistake
    assert "expert=3 must divide the model's 16 routed experts" in res.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_infer_dry_run_reads_no_tensor(released, tmp_path):
    """--dry_run needs config.json alone: here the safetensors files are gone."""
    only_config = tmp_path / "config_only"
    only_config.mkdir()
    shutil.copy(os.path.join(released, "config.json"), only_config / "config.json")
    res = _cli("--hf_checkpoint", str(only_config), "--keep_fp8", "--dry_run", "--num_cpu_devices", "8",
               "--mesh", "1,1,8", "--batch_size", "8", "--max_len", "64")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "per-device total:" in res.stdout and "bytes per token" in res.stdout
    assert jax.device_count() == 8  # (the test process itself is untouched)
