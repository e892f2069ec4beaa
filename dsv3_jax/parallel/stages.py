"""Which MoE layers each pipeline stage runs: uneven stages over a slot layout.

Shape letters (the package legend): L MoE layers, N ranks (devices on the pipeline axis), C chunks
(stages per rank: 1, or 2 for DualPipeV), Lm slots per stage, E experts.

DeepSeek-V3 has 61 layers (3 dense + 58 MoE) and an MTP module, trained on 16 pipeline ranks: no
even split exists. Here any layer count goes over any stage count, in the real layer order:

  balanced   the embedding, each dense layer, the head and each MTP module count as one
             layer-equivalent each (as Megatron's `account_for_embedding/loss_in_pipeline_split`).
             The embedding and the dense layers run on stage 0, the final norm, head and MTP modules
             on the last stage (they share the embedding and head, V3 report §3.2.3). Every stage
             gets at most c layer-equivalents, with the smallest c that places all L MoE layers; the
             surplus slots are left empty from the middle stages outwards. V3 on PP16:
             stage 0 = embedding + 3 dense, stages 1-14 = 4 MoE each, stage 15 = 2 MoE + head + MTP.
  explicit   `TrainConfig.pipeline_stage_layers`: the MoE layer count of each stage, in stage order.

Slot layout. Every device of an SPMD program holds arrays of one shape, so each stage holds Lm
slots (the most MoE layers any stage runs); a stage with fewer layers skips its spare slots
(`BlockStack(active=...)`, never computed) and they hold zeros (no gradient; weight decay keeps
them zero). The per-device memory is the busiest stage's, which that stage needs anyway. The train
state keeps the MoE stack ([L, ...] in the model) as [N C Lm, ...] sharded over the pipeline axis:
rank r holds rows [r C Lm, (r+1) C Lm), its chunk 0's slots, then chunk 1's. `to_slots` and
`from_slots` convert every leaf under `moe_layers` (parameters, router biases, optimizer moments).
Where the split is even and C = 1, the slot layout is the model's own ([L, ...]; `identity`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError

STACK = "moe_layers"  # the model's stacked MoE layers (model.py); the only stack split over stages
META = "stage_layout"  # the checkpoint meta's key for the layout its state was saved in


@dataclasses.dataclass(frozen=True)
class StageLayout:
    moe_per_stage: tuple[int, ...]  # MoE layers of each stage, in stage order (S = N * C stages)
    chunks: int = 1  # stages per rank; 2: V shape, rank r holds stages r and 2N-1-r (DualPipeV)

    @property
    def stages(self) -> int:
        return len(self.moe_per_stage)

    @property
    def ranks(self) -> int:
        return self.stages // self.chunks

    @property
    def slots(self) -> int:  # Lm
        return max(1, max(self.moe_per_stage))

    @property
    def n_layers(self) -> int:
        return sum(self.moe_per_stage)

    def stage(self, rank: int, chunk: int) -> int:
        return rank if chunk == 0 else 2 * self.ranks - 1 - rank

    @property
    def slot_layer(self) -> np.ndarray:
        """[N, C, Lm] int32: the MoE layer each slot holds, -1 for a spare slot."""
        first = np.concatenate([[0], np.cumsum(self.moe_per_stage)])
        out = np.full((self.ranks, self.chunks, self.slots), -1, np.int32)
        for r in range(self.ranks):
            for c in range(self.chunks):
                s = self.stage(r, c)
                out[r, c, :self.moe_per_stage[s]] = np.arange(first[s], first[s + 1])
        return out

    @property
    def identity(self) -> bool:
        """Is the slot layout the model's own [L, ...] stack (no conversion)?"""
        return bool(np.array_equal(self.slot_layer.reshape(-1), np.arange(self.n_layers)))

    def to_json(self) -> dict:
        return {"moe_per_stage": list(self.moe_per_stage), "chunks": self.chunks}

    @classmethod
    def from_json(cls, d: dict) -> "StageLayout":
        return cls(tuple(int(n) for n in d["moe_per_stage"]), int(d["chunks"]))


def saved_layout(meta: dict | None) -> StageLayout | None:
    """The slot layout a checkpoint's state was saved in (its meta's `stage_layout`; None: the model's)."""
    found = (meta or {}).get(META)
    return StageLayout.from_json(found) if found else None


def balanced(cfg: ModelConfig, stages: int) -> tuple[int, ...]:
    """MoE layers per stage with embedding, dense layers, head and MTP modules as layer-equivalents."""
    L = cfg.n_moe_layers
    pre, post = 1 + cfg.n_dense_layers, 1 + cfg.n_mtp_modules  # stage 0's and the last stage's extras
    if stages == 1:
        return (L,)

    def caps(c):
        return [max(0, c - pre)] + [c] * (stages - 2) + [max(0, c - post)]

    c = 1
    while sum(caps(c)) < L:
        c += 1
    counts = caps(c)
    surplus = sum(counts) - L
    # take the surplus one layer at a time from the fullest stage nearest the middle
    order = sorted(range(stages), key=lambda s: abs(s - (stages - 1) / 2))
    while surplus:
        s = max(order, key=lambda s: counts[s])
        counts[s] -= 1
        surplus -= 1
    return tuple(counts)


def make_layout(cfg: ModelConfig, ranks: int, chunks: int = 1, moe_per_stage: tuple[int, ...] = ()) -> StageLayout:
    """The layout for `ranks` pipeline devices with `chunks` stages each: `moe_per_stage` if given
    (TrainConfig.pipeline_stage_layers), else an even split where the layers divide, else `balanced`. Clear errors for a split that cannot be."""
    stages = ranks * chunks
    if not moe_per_stage and cfg.n_moe_layers % stages == 0:  # an even split, as before uneven stages
        return StageLayout((cfg.n_moe_layers // stages,) * stages, chunks)
    if not moe_per_stage:
        return StageLayout(balanced(cfg, stages), chunks)
    counts = tuple(moe_per_stage)
    if len(counts) != stages or min(counts) < 0 or sum(counts) != cfg.n_moe_layers:
        raise ConfigError(f"TrainConfig.pipeline_stage_layers={counts}: expected {stages} non-negative MoE "
                          f"layer counts (MeshConfig.pipeline={ranks} x {chunks} stage(s) per device) summing "
                          f"to the model's {cfg.n_moe_layers} MoE layers")
    return StageLayout(counts, chunks)


# ---------------------------------------------------------------------------------------------
def _is_stack(path) -> bool:
    return any(getattr(k, "key", None) == STACK for k in path)


def map_stack(fn, tree):
    """fn applied to every leaf under `moe_layers`; other leaves as they are."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x) if _is_stack(p) else x, tree)


def to_slots(tree, layout: StageLayout | None):
    """Every leaf under `moe_layers`: [L, ...] -> [N C Lm, ...], spare slots zero (None: as it is)."""
    if layout is None or layout.identity:
        return tree
    idx = layout.slot_layer.reshape(-1)
    take, spare = np.maximum(idx, 0), idx < 0

    def one(x):
        y = jnp.take(x, take, axis=0)
        return jnp.where(spare.reshape(-1, *([1] * (x.ndim - 1))), jnp.zeros((), x.dtype), y)
    return map_stack(one, tree)


def from_slots(tree, layout: StageLayout | None):
    """Inverse of to_slots: [N C Lm, ...] -> [L, ...] (the model's layer order)."""
    if layout is None or layout.identity:
        return tree
    flat = layout.slot_layer.reshape(-1)
    where = np.argsort(np.where(flat < 0, np.iinfo(np.int32).max, flat), kind="stable")[:layout.n_layers]
    return map_stack(lambda x: jnp.take(x, where, axis=0), tree)


def slot_rows_to_layers(rows, layout: StageLayout):
    """Per-slot rows [N C Lm, ...] (e.g. expert loads) -> [L, ...] in layer order."""
    return from_slots({STACK: rows}, layout)[STACK]


def layer_rows_to_slots(rows, layout: StageLayout):
    """Per-layer rows [L, ...] -> [N C Lm, ...] (spare slots zero)."""
    return to_slots({STACK: rows}, layout)[STACK]
