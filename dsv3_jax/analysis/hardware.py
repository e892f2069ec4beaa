"""Accelerators and interconnects the ISCA '25 paper reasons about, with the source of each figure.

Bandwidths are bytes/s in one direction per device (what one GPU can push to its EP peers while
it receives as much); FLOP/s are dense (no 2:4 sparsity) BF16 tensor-core peaks.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
TB = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    ep_bw: float  # bytes/s per device on the network the EP all-to-all crosses
    hbm_bw: float  # bytes/s
    bf16_flops: float  # FLOP/s, dense


ACCELERATORS = {
    # P1 §2.3.2: one 400 Gbps ConnectX-7 InfiniBand NIC per GPU = 50 GB/s. Memory and tensor
    # cores are the H100 SXM's (NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense BF16);
    # P1 Table 4's 38.94% causal MFU at 385 TFLOPS implies the same 989 TFLOPS.
    "h800_ib": Accelerator("H800", ep_bw=50 * GB, hbm_bw=3.35 * TB, bf16_flops=989e12),
    # NVIDIA H100 SXM datasheet; EP across nodes also goes through one 400G NIC per GPU.
    "h100": Accelerator("H100", ep_bw=50 * GB, hbm_bw=3.35 * TB, bf16_flops=989e12),
    # NVIDIA H200 datasheet: the H100's tensor cores with 4.8 TB/s HBM3e.
    "h200": Accelerator("H200", ep_bw=50 * GB, hbm_bw=4.8 * TB, bf16_flops=989e12),
    # P1 §2.3.2: 900 GB/s unidirectional NVLink between all 72 GPUs (1.8 TB/s bidirectional per
    # GPU in NVIDIA's GB200 NVL72 datasheet, which also gives 576 TB/s HBM3e and 180 PFLOPS
    # dense BF16 for the 72-GPU rack).
    "gb200_nvl72": Accelerator("GB200 NVL72", ep_bw=900 * GB, hbm_bw=8 * TB, bf16_flops=2.5e15),
    # Cloud TPU v5p docs: 459 TFLOPS BF16, 2765 GB/s HBM2e, 4800 Gbps (= 600 GB/s one way; 1200
    # GB/s bidirectional) of ICI per chip over a 3D torus, so an all-to-all over many chips
    # gets less than this per-chip figure.
    "tpu_v5p": Accelerator("TPU v5p", ep_bw=600 * GB, hbm_bw=2.765 * TB, bf16_flops=459e12),
}

# Unified-memory "AI SoC" machines P1 §2.2.2 cites for local inference: memory bytes/s.
LOCAL_MACHINES = {
    "ryzen_ai_max_395": ("AMD Ryzen AI Max+ 395", 256 * GB),  # AMD: 256-bit LPDDR5X-8000
    "m4_max": ("Apple M4 Max", 546 * GB),  # Apple's M4 Max announcement, Oct 2024 (16-core CPU)
}
