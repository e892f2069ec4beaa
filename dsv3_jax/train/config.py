"""Run-level configs: MeshConfig, OptimConfig, TrainConfig. Small, frozen, validated; gin binds them.

The model's own architecture lives in `dsv3_jax.config.ModelConfig`; data in `dsv3_jax.data.DataConfig`.
Defaults follow the V3 report §4.2 (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, gamma 0.001,
alpha 1e-4, MTP lambda 0.3 then 0.1), with step counts instead of token counts.

Also here: which config fields a resumed run may change (ARCHITECTURE / RUN / FREE, `config_changes`),
for every config including the model's and the data's.
"""

from __future__ import annotations

import dataclasses
import json

from dsv3_jax.errors import ConfigError, check_field_types


def _check(obj, field: str, ok: bool, why: str):
    if not ok:
        raise ConfigError(f"{type(obj).__name__}.{field}={getattr(obj, field)!r}: {why}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    pipeline: int = 1
    expert: int = 1

    def __post_init__(self):
        check_field_types(self)
        for f in ("data", "pipeline", "expert"):
            _check(self, f, getattr(self, f) >= 1, "expected a positive mesh degree")

    @property
    def size(self) -> int:
        return self.data * self.pipeline * self.expert


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 2.2e-4
    final_lr: float = 2.2e-5
    warmup_steps: int = 2000
    constant_steps: int = 0  # at peak_lr after warmup, before the cosine
    decay_steps: int = 0  # cosine from peak_lr to final_lr; then final_lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only
    clip_norm: float = 1.0
    bf16_moments: bool = False  # Adam moments in BF16, FP32 master weights (V3 report §3.3.3)

    def __post_init__(self):
        check_field_types(self)
        _check(self, "peak_lr", self.peak_lr > 0, "expected > 0")
        _check(self, "final_lr", 0 <= self.final_lr <= self.peak_lr, "expected 0 <= final_lr <= peak_lr")
        for f in ("warmup_steps", "constant_steps", "decay_steps"):
            _check(self, f, getattr(self, f) >= 0, "expected >= 0")
        _check(self, "b1", 0 <= self.b1 < 1, "expected 0 <= b1 < 1")
        _check(self, "b2", 0 < self.b2 < 1, "expected 0 < b2 < 1")
        _check(self, "eps", self.eps > 0, "expected > 0")
        _check(self, "weight_decay", self.weight_decay >= 0, "expected >= 0")
        _check(self, "clip_norm", self.clip_norm > 0, "expected > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step
    seed: int = 0
    # DeepSeek specifics
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (V3 eq. 17)
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed (V3 §2.1.2)
    bias_freeze_step: int = -1  # gamma -> 0 from this step on (V3: after 14.3T of 14.8T tokens); -1: never
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_step: int = -1  # lambda -> mtp_lambda_late from this step on; -1: never
    # pipeline parallelism (used when MeshConfig.pipeline > 1; dsv3_jax/train/pipeline.py)
    pipeline_schedule: str = "1f1b"  # "gpipe" (autodiff), "1f1b" or "dualpipev" (manual vjp, O(stages) activations)
    pipeline_microbatches: int = 0  # per step; divides the per-device batch; 0: one per sequence of it
    pipeline_stage_layers: tuple[int, ...] = ()  # MoE layers per stage (parallel/stages.py); (): balanced
    overlap_microbatches: bool = False  # the MoE stacks run as two interleaved halves (§2.3.1; block.py)
    # loop
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_tokens: int = 64
    sample_prompt: str = "def "

    def __post_init__(self):
        check_field_types(self)
        for f in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints"):
            _check(self, f, getattr(self, f) >= 1, "expected a positive integer")
        _check(self, "grad_accum", self.batch_size % self.grad_accum == 0,
               f"must divide batch_size={self.batch_size}")
        _check(self, "bias_gamma", self.bias_gamma >= 0, "expected >= 0")
        _check(self, "balance_alpha", self.balance_alpha >= 0, "expected >= 0")
        for f in ("mtp_lambda", "mtp_lambda_late"):
            _check(self, f, getattr(self, f) >= 0, "expected >= 0")
        for f in ("eval_batches", "sample_tokens"):
            _check(self, f, getattr(self, f) >= 0, "expected >= 0 (0: none)")
        _check(self, "pipeline_schedule", self.pipeline_schedule in ("gpipe", "1f1b", "dualpipev"),
               "expected 'gpipe', '1f1b' or 'dualpipev'")
        _check(self, "pipeline_stage_layers", all(isinstance(n, int) and n >= 0 for n in self.pipeline_stage_layers),
               "expected non-negative MoE layer counts, one per pipeline stage")
        _check(self, "pipeline_microbatches", self.pipeline_microbatches >= 0, "expected >= 0 (0: automatic)")

    def gamma_at(self, step):
        return self.bias_gamma if self.bias_freeze_step < 0 or step < self.bias_freeze_step else 0.0

    def mtp_lambda_at(self, step):
        late = 0 <= self.mtp_lambda_switch_step <= step
        return self.mtp_lambda_late if late else self.mtp_lambda


# ---- what a resumed run may change -------------------------------------------------------------
# A checkpoint's `meta` item holds the configs it was trained with (train/main.py saves them), one
# section per config. Resuming compares them with the new ones field by field, in three classes:
#   ARCHITECTURE  the parameters' shapes or the function they compute: the checkpoint cannot go on
#                 under the new value, so resuming stops with a ConfigError naming each field;
#   RUN           the same parameters, a different run (routing, numerics, the objective, the batch,
#                 the optimizer, the data): only with --allow_config_change, and then recorded;
#   FREE          execution and bookkeeping (mesh, MoE dispatch, remat, kernels, cadences, the
#                 context a model accepts, init-only values): free, as resuming on another mesh is.
# Every field of every config is in exactly one class (tested), so a new field needs a decision.
SECTIONS = {"model": "ModelConfig", "run": "TrainConfig", "mesh": "MeshConfig", "optim": "OptimConfig",
            "data": "DataConfig"}
ARCHITECTURE = {
    "model": ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
              "n_routed_experts", "n_shared_experts", "score_func", "gate_bias", "q_lora_rank",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta",
              "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "norm_eps", "n_mtp_modules", "param_dtype", "fp8_weights"),
}
RUN = {
    "model": ("n_activated_experts", "n_expert_groups", "n_limited_groups", "route_scale", "norm_topk_prob",
              "dtype", "fp8", "fp8_act_scale", "ep_capacity_factor"),
    "run": ("batch_size", "seq_len", "balance_alpha", "bias_gamma", "bias_freeze_step", "mtp_lambda",
            "mtp_lambda_late", "mtp_lambda_switch_step"),
    "optim": ("peak_lr", "final_lr", "warmup_steps", "constant_steps", "decay_steps", "b1", "b2", "eps",
              "weight_decay", "clip_norm", "bf16_moments"),
    "data": ("sources", "format", "token_dtype", "tokenizer_path", "val_fraction", "seed", "shuffle",
             "corpus_max_bytes"),
}
FREE = {
    "model": ("max_seq_len", "init_std", "remat", "moe_impl", "ep_dispatch", "ep_combine", "ep_transport",
              "ep_chunks", "fp8_kernel", "attn_impl", "loss_chunk"),
    "run": ("grad_accum", "seed", "pipeline_schedule", "pipeline_microbatches", "pipeline_stage_layers",
            "overlap_microbatches",
            "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
            "sample_tokens", "sample_prompt"),
    "mesh": ("data", "pipeline", "expert"),
    "data": ("num_threads", "prefetch_batches"),
}


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(architecture changes, run changes) from the `saved` meta to the `new` one, each as
    'ModelConfig.dim 64 -> 128'. Sections and fields the saved meta lacks (a checkpoint older than
    them) are not compared; FREE fields never count."""
    arch, run = [], []
    for section, fields in new.items():
        old = saved.get(section)
        if section not in SECTIONS or not isinstance(old, dict):
            continue
        for name, value in fields.items():
            value = json.loads(json.dumps(value))  # as the checkpoint stored it: tuples are lists
            if name not in old or old[name] == value:
                continue
            change = f"{SECTIONS[section]}.{name} {old[name]!r} -> {value!r}"
            if name in ARCHITECTURE.get(section, ()):
                arch.append(change)
            elif name in RUN.get(section, ()):
                run.append(change)
    return arch, run
