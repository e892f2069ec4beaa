"""The expert-parallel bound on decode speed (ISCA '25 paper §2.3.2).

In the paper's decode setting every device holds one expert and serves about 32 tokens per step.
A token goes to 9 experts (8 routed plus the shared one, which DeepSeek's serving treats as a
routed expert that is always picked); dispatch travels in FP8 (1 byte per element) and combine
in BF16 (2 bytes). One EP step (dispatch + combine) therefore moves

    (1 B + 2 B) x 32 tokens x 9 experts x hidden   bytes per device,

and takes that over the per-device bandwidth. With the two-micro-batch overlap hiding all
computation behind communication, a layer costs two such steps, one per micro-batch, and 61
layers give the time per output token (TPOT). Latency is ignored: these are upper bounds.

The paper says the hidden size is "about 7K" and computes with 7000: 120.96 us per step on
400 Gbps InfiniBand (50 GB/s), 14.76 ms TPOT, "~67" tokens/s; 6.72 us, 0.82 ms and "~1200" on
GB200 NVL72 (900 GB/s). The exact reciprocals are 67.8 and 1219.8 tokens/s, which the paper
prints as "~67" and "~1200"; those two rows carry that rounding as their difference. With V3's
real dim 7168 the step grows 2.4% (123.9 us, TPOT 15.1 ms); as this repository's wire formats
send it (`parallel/wire.py`: E4M3 plus one f32 scale per 1x128 tile = 1.03 B per element) it is
125.2 us.

Experts per token and layer count come from the V3 config; 32 tokens, 7000 and the bandwidths
are the paper's scenario.

The bound assumes the expert's work hides behind the all-to-all. Its floor is reading the
expert's FP8 weights (3 x 7168 x 2048 bytes) from HBM once per step: 13 us on an H800 against a
121 us step, but 5.5 us on a GB200 against 6.7 us, so at NVL72 bandwidth the step is nearly
memory-bound as well (rows expert_hbm_read_us.*).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.analysis.hardware import ACCELERATORS
from dsv3_jax.analysis.report import Row
from dsv3_jax.config import ModelConfig, preset
from dsv3_jax.parallel import wire

PAPER_HIDDEN = 7000  # "about 7K"
TOKENS_PER_DEVICE = 32


@dataclasses.dataclass(frozen=True)
class EPDecode:
    """One decode step's all-to-all traffic per device; times in seconds for bandwidth bw (B/s)."""

    tokens: int
    experts_per_token: int
    hidden: int
    dispatch_bytes: float  # per element on the wire
    combine_bytes: float
    n_layers: int
    micro_batches: int = 2

    def step_s(self, bw):
        elems = self.tokens * self.experts_per_token * self.hidden
        return (self.dispatch_bytes + self.combine_bytes) * elems / bw

    def layer_s(self, bw):
        return self.micro_batches * self.step_s(bw)

    def tpot_s(self, bw):
        return self.n_layers * self.layer_s(bw)


def element_bytes(fmt: str) -> int:
    """Bytes of one encoded element, scales left out (the paper's count): fp8 1, bf16 2."""
    payload = jax.eval_shape(lambda: wire.encode(jnp.zeros((1, 128), jnp.float32), fmt))
    return payload[0].dtype.itemsize


def wire_bytes_per_element(fmt: str, dim: int) -> float:
    """Bytes per element as `wire.encode` sends a [1, dim] row, scales included."""
    return wire.wire_bytes((1, dim), fmt) / dim


def decode_scenario(cfg: ModelConfig, *, hidden: int = PAPER_HIDDEN, with_scales: bool = False) -> EPDecode:
    """The paper's setting for `cfg`: its expert count, layers and EP wire formats."""
    if with_scales:
        d, c = (wire_bytes_per_element(f, hidden) for f in (cfg.ep_dispatch, cfg.ep_combine))
    else:
        d, c = (element_bytes(f) for f in (cfg.ep_dispatch, cfg.ep_combine))
    experts = cfg.n_activated_experts + cfg.n_shared_experts  # the shared expert counts as routed
    return EPDecode(tokens=TOKENS_PER_DEVICE, experts_per_token=experts, hidden=hidden,
                    dispatch_bytes=d, combine_bytes=c, n_layers=cfg.n_layers)


def tpot_curve(bandwidths) -> np.ndarray:
    """TPOT in ms of V3 in the paper's setting at each bandwidth (B/s)."""
    return decode_scenario(preset("v3_671b")).tpot_s(np.asarray(bandwidths, float)) * 1e3


def expert_read_s(cfg: ModelConfig, hbm_bw: float, bytes_per_weight: float = 1.0) -> float:
    """One routed expert's SwiGLU weights read from HBM once (FP8 by default)."""
    return 3 * cfg.dim * cfg.moe_inter_dim * bytes_per_weight / hbm_bw


def rows() -> list[Row]:
    cfg = preset("v3_671b")
    paper_sc = decode_scenario(cfg)
    out = []
    for key, step_us, layer_us, tpot_ms, tok_s in (("h800_ib", 120.96, 241.92, 14.76, 67),
                                                   ("gb200_nvl72", 6.72, None, 0.82, 1200)):
        bw, src = ACCELERATORS[key].ep_bw, f"P1 §2.3.2 ({ACCELERATORS[key].ep_bw / 1e9:g} GB/s, hidden 7000)"
        tpot = paper_sc.tpot_s(bw)
        out += [Row(f"ep_step_us.{key}", step_us, paper_sc.step_s(bw) * 1e6, "us", src),
                Row(f"ep_layer_us.{key}", layer_us, paper_sc.layer_s(bw) * 1e6, "us",
                    src if layer_us else "ours: 2 micro-batches x one step"),
                Row(f"tpot_ms.{key}", tpot_ms, tpot * 1e3, "ms", src),
                Row(f"decode_tokens_per_s.{key}", tok_s, 1 / tpot, "tok/s",
                    f"P1 §2.3.2 ('~{tok_s}', rounded)"),
                Row(f"expert_hbm_read_us.{key}", None, expert_read_s(cfg, ACCELERATORS[key].hbm_bw) * 1e6,
                    "us", "ours: one FP8 expert from HBM per step")]
    bw = ACCELERATORS["h800_ib"].ep_bw
    real = decode_scenario(cfg, hidden=cfg.dim)
    sent = decode_scenario(cfg, hidden=cfg.dim, with_scales=True)
    out += [Row("ep_step_us.h800_ib_dim7168", None, real.step_s(bw) * 1e6, "us", "ours: hidden = dim 7168"),
            Row("tpot_ms.h800_ib_dim7168", None, real.tpot_s(bw) * 1e3, "ms", "ours: hidden = dim 7168"),
            Row("ep_step_us.h800_ib_wire", None, sent.step_s(bw) * 1e6, "us",
                "ours: dim 7168, wire.py formats with scales")]
    return out
