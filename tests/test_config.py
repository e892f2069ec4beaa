"""The configs as a specification: what each preset is, what each validator rejects, the HF mapping.

  ModelConfig   every preset constructs and validates; `v3_671b` is DeepSeek-V3's config_671B.json
                plus the HF config's YaRN and MTP settings (numbers from the facts file,
                /work/shared/reference/deepseek_v3_facts.md §2.1, §2.2, §3.1); each rule of
                `__post_init__` raises ConfigError (a ValueError) naming the field and its value;
                `from_hf_config(to_hf_config(cfg))` gives `cfg` back (its dtypes passed along:
                config.json's torch_dtype is not read back).
  MeshConfig, OptimConfig, TrainConfig (dsv3_jax/train/config.py)
                the same for their rules, and run defaults that are the V3 report's (§4.2).

Each rule has one representative bad value; a guard test fails when a validator checks a field
that no case here exercises, so a new rule arrives with its case.
"""
import ast
import dataclasses
import inspect
import re
import textwrap

import pytest

from dsv3_jax.config import PRESETS, ModelConfig, preset
from dsv3_jax.errors import ConfigError
from dsv3_jax.train.config import MeshConfig, OptimConfig, TrainConfig

# ---- ModelConfig: the presets ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_constructs_and_validates(name):
    cfg = preset(name)
    # rebuilding from its fields runs __post_init__ again: a preset is a valid config, not a literal
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg


def test_preset_overrides_are_validated_and_unknown_names_rejected():
    assert preset("tiny", n_layers=5).n_layers == 5
    with pytest.raises(ConfigError, match=re.escape("ModelConfig.n_heads=0")):
        preset("tiny", n_heads=0)
    with pytest.raises(ConfigError, match="unknown preset 'v4'"):
        preset("v4")


# config_671B.json of deepseek-ai/DeepSeek-V3, exact contents (facts §3.1), without "dtype": "fp8"
# (the stored weight format, which our param_dtype does not describe)
CONFIG_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048,
    "n_layers": 61, "n_dense_layers": 3, "n_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8,
    "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid",
    "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
}
# the HF config.json's further settings (facts §2.1, §2.2): YaRN s=40 over 4096, MTP depth 1,
# aux-loss-free bias (topk_method noaux_tc) and normalised top-k gates, RMSNorm eps, theta
V3_HF_EXTRAS = {
    "max_seq_len": 163840, "rope_theta": 10000.0, "rope_factor": 40.0, "original_seq_len": 4096,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "norm_eps": 1e-6,
    "n_mtp_modules": 1, "gate_bias": True, "norm_topk_prob": True,
}


def test_v3_671b_is_deepseeks_config_671b():
    cfg = preset("v3_671b")
    got = {k: getattr(cfg, k) for k in {**CONFIG_671B, **V3_HF_EXTRAS}}
    assert got == {**CONFIG_671B, **V3_HF_EXTRAS}
    assert cfg.init_std == 0.006  # V3 report §4.2 (HF's initializer_range 0.02 is not the training value)
    assert (cfg.qk_head_dim, cfg.n_moe_layers) == (192, 58)


def test_v3_671b_writes_the_hf_config_json_keys():
    """to_hf_config speaks HF's vocabulary with HF's values for V3 (facts §2.1, §2.2)."""
    hf = preset("v3_671b").to_hf_config()
    want = {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    assert {k: hf[k] for k in want} == want
    # token ids are the tokenizer's: save_pretrained keeps the source directory's, never made up
    assert "bos_token_id" not in hf and "eos_token_id" not in hf
    assert {k: hf["rope_scaling"][k] for k in ("type", "factor", "original_max_position_embeddings", "beta_fast",
                                               "beta_slow", "mscale", "mscale_all_dim")} == {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = preset(name)
    # config.json's torch_dtype names the stored dtype, which from_hf_config reads back (compute in it)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


# ---- ModelConfig: the validators ---------------------------------------------------------------
# (field named in the message, the constructor arguments that break exactly that rule)
MODEL_RULES = [
    *[(f, {f: 0}) for f in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                            "v_head_dim", "max_seq_len")],  # positive integers
    *[(f, {f: -1}) for f in ("q_lora_rank", "n_shared_experts", "n_mtp_modules", "n_routed_experts")],  # >= 0
    ("n_dense_layers", {"n_dense_layers": -1}),
    ("n_dense_layers", {"n_dense_layers": 4}),  # more than n_layers=3
    ("qk_rope_head_dim", {"qk_rope_head_dim": 7}),  # RoPE rotates pairs
    ("qk_rope_head_dim", {"qk_rope_head_dim": 0}),
    ("n_routed_experts", {"n_routed_experts": 0}),  # the 2 layers after the dense one are MoE
    ("moe_inter_dim", {"moe_inter_dim": 0}),
    ("n_activated_experts", {"n_activated_experts": 0}),
    ("n_activated_experts", {"n_activated_experts": 17}),  # of 16 routed experts
    ("n_expert_groups", {"n_expert_groups": 3}),  # does not divide 16 experts
    ("n_expert_groups", {"n_expert_groups": 0}),
    ("n_limited_groups", {"n_limited_groups": 0}),
    ("n_limited_groups", {"n_limited_groups": 5}),  # of 4 groups
    ("n_limited_groups", {"n_limited_groups": 1, "n_activated_experts": 5}),  # 1 group of 4 cannot hold 5
    ("n_expert_groups", {"n_expert_groups": 16, "n_limited_groups": 4}),  # gate_bias sums a group's top 2
    ("inter_dim", {"inter_dim": 0}),
    ("score_func", {"score_func": "relu"}),
    ("rope_factor", {"rope_factor": 0.5}),
    *[(f, {f: 0.0}) for f in ("norm_eps", "route_scale", "init_std", "rope_theta")],  # > 0
    ("original_seq_len", {"original_seq_len": 0}),
    ("remat", {"remat": "everything"}),
    ("dtype", {"dtype": "float16"}),
    ("param_dtype", {"param_dtype": "int8"}),
    ("moe_impl", {"moe_impl": "loop"}),
    ("ep_dispatch", {"ep_dispatch": "fp16"}),
    ("ep_combine", {"ep_combine": "logfmt2"}),
    ("ep_combine", {"ep_combine": "logfmt17"}),
    ("ep_capacity_factor", {"ep_capacity_factor": -1.0}),
    ("ep_transport", {"ep_transport": "nccl"}),
    ("ep_chunks", {"ep_chunks": -1}),
    ("loss_chunk", {"loss_chunk": -1}),
    ("fp8_kernel", {"fp8_kernel": "triton"}),
    ("fp8_act_scale", {"fp8_act_scale": "e8m0"}),  # only float or ue8m0 (V3.1) scales
    ("attn_impl", {"attn_impl": "flash"}),
]

# where one field has two rules, the message says which one broke
WHY = {
    "n_routed_experts=0": "need at least one routed expert",
    "n_expert_groups=3": "must divide n_routed_experts=16",
    "n_expert_groups=16,n_limited_groups=4": "groups need at least 2 experts",
    "n_limited_groups=5": r"expected 1\.\.n_expert_groups=4",
    "n_limited_groups=1,n_activated_experts=5": "fewer than n_activated_experts=5",
}


def _case_id(case):
    return ",".join(f"{k}={v!r}" for k, v in case[1].items())


@pytest.mark.parametrize("field,kwargs", MODEL_RULES, ids=map(_case_id, MODEL_RULES))
def test_model_config_rule_raises_config_error_naming_field_and_value(field, kwargs):
    with pytest.raises(ConfigError, match=re.escape(f"ModelConfig.{field}={kwargs[field]!r}:")) as err:
        ModelConfig(**kwargs)  # on top of the tiny defaults, which are valid
    assert isinstance(err.value, ValueError)  # `except ValueError` keeps working for library users
    assert re.search(WHY.get(_case_id((field, kwargs)), ""), str(err.value)), str(err.value)


def test_the_boundary_values_are_accepted():
    """The edges the rules allow: V2-Lite's uncompressed query, no MTP, all-dense, greedy top-k, LogFMT."""
    ModelConfig(q_lora_rank=0, n_mtp_modules=0, n_shared_experts=0)
    ModelConfig(n_dense_layers=3, n_routed_experts=0)  # no MoE layers: no experts needed
    ModelConfig(n_dense_layers=0, inter_dim=0)  # no dense layers: no dense width needed
    ModelConfig(n_expert_groups=1, n_limited_groups=1, gate_bias=False, score_func="softmax")
    ModelConfig(n_activated_experts=16, n_limited_groups=4)
    ModelConfig(n_expert_groups=16, n_limited_groups=4, gate_bias=False)  # one-expert groups need no top-2
    ModelConfig(ep_combine="logfmt3", rope_factor=1.0, ep_capacity_factor=0.0)
    ModelConfig(ep_combine="logfmt16")


# ---- run configs -------------------------------------------------------------------------------
RUN_RULES = [
    *[(MeshConfig, f, {f: 0}) for f in ("data", "pipeline", "expert")],
    (OptimConfig, "peak_lr", {"peak_lr": 0.0}),
    (OptimConfig, "final_lr", {"final_lr": -1e-6}),
    (OptimConfig, "final_lr", {"final_lr": 1.0}),  # above peak_lr
    *[(OptimConfig, f, {f: -1}) for f in ("warmup_steps", "constant_steps", "decay_steps")],
    (OptimConfig, "b1", {"b1": 1.0}),
    (OptimConfig, "b1", {"b1": -0.1}),
    (OptimConfig, "b2", {"b2": 1.0}),
    (OptimConfig, "eps", {"eps": 0.0}),
    (OptimConfig, "weight_decay", {"weight_decay": -0.1}),
    (OptimConfig, "b2", {"b2": 0.0}),
    (OptimConfig, "clip_norm", {"clip_norm": 0.0}),
    *[(TrainConfig, f, {f: 0}) for f in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                                         "checkpoint_every", "keep_checkpoints")],
    (TrainConfig, "grad_accum", {"grad_accum": 3}),  # does not divide batch_size=8
    (TrainConfig, "bias_gamma", {"bias_gamma": -1e-3}),
    (TrainConfig, "balance_alpha", {"balance_alpha": -1e-4}),
    *[(TrainConfig, f, {f: -0.1}) for f in ("mtp_lambda", "mtp_lambda_late")],
    *[(TrainConfig, f, {f: -1}) for f in ("eval_batches", "sample_tokens")],  # 0: none
    (TrainConfig, "pipeline_schedule", {"pipeline_schedule": "zb"}),
    (TrainConfig, "pipeline_microbatches", {"pipeline_microbatches": -1}),
    (TrainConfig, "pipeline_stage_layers", {"pipeline_stage_layers": (4, -1)}),
]


@pytest.mark.parametrize("cls,field,kwargs", RUN_RULES,
                         ids=[f"{c.__name__}.{f}={k[f]!r}" for c, f, k in RUN_RULES])
def test_run_config_rule_raises_config_error_naming_field_and_value(cls, field, kwargs):
    with pytest.raises(ConfigError, match=re.escape(f"{cls.__name__}.{field}={kwargs[field]!r}:")):
        cls(**kwargs)


def test_run_defaults_are_the_v3_recipe():
    """V3 report §4.2 (facts §2.3, §2.4): AdamW 0.9/0.95, decay 0.1, clip 1.0, warmup to 2.2e-4 over
    2K steps, cosine to 2.2e-5; alpha 1e-4, gamma 1e-3; MTP lambda 0.3 then 0.1."""
    o = OptimConfig()
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert (o.peak_lr, o.final_lr, o.warmup_steps) == (2.2e-4, 2.2e-5, 2000)
    t = TrainConfig()
    assert (t.balance_alpha, t.bias_gamma, t.mtp_lambda, t.mtp_lambda_late) == (1e-4, 1e-3, 0.3, 0.1)
    assert MeshConfig().size == 1 and MeshConfig(2, 2, 2).size == 8


def test_gamma_freezes_and_mtp_lambda_switches_at_their_steps():
    # gamma 0.001 -> 0 for the last tokens; lambda 0.3 -> 0.1 (V3 report §4.2); -1: never
    t = TrainConfig(bias_freeze_step=10, mtp_lambda_switch_step=5)
    assert [t.gamma_at(s) for s in (0, 9, 10, 11)] == [1e-3, 1e-3, 0.0, 0.0]
    assert [t.mtp_lambda_at(s) for s in (0, 4, 5, 6)] == [0.3, 0.3, 0.1, 0.1]
    never = TrainConfig()
    assert never.gamma_at(10**9) == 1e-3 and never.mtp_lambda_at(10**9) == 0.3


# ---- every validated field has a case ----------------------------------------------------------
def _validated_fields(cls) -> set[str]:
    """The fields cls.__post_init__'s rules name: the field argument of `bad(field, why)` (ModelConfig)
    or `_check(self, field, ok, why)` (the run configs), a literal or a loop over literals."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__post_init__)))
    loops: dict[str, set[str]] = {}  # loop variable -> the literals it runs over (every loop using that name)
    for n in ast.walk(tree):
        if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and isinstance(n.iter, ast.Tuple):
            loops.setdefault(n.target.id, set()).update(e.value for e in n.iter.elts)
    fields = set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in ("bad", "_check"):
            arg = call.args[0 if call.func.id == "bad" else 1]
            fields.update([arg.value] if isinstance(arg, ast.Constant) else loops[arg.id])
    return fields


@pytest.mark.parametrize("cls", [ModelConfig, MeshConfig, OptimConfig, TrainConfig], ids=lambda c: c.__name__)
def test_every_validated_field_has_a_rejection_case(cls):
    covered = ({f for f, _ in MODEL_RULES} if cls is ModelConfig
               else {f for c, f, _ in RUN_RULES if c is cls})
    assert _validated_fields(cls) <= covered, sorted(_validated_fields(cls) - covered)
