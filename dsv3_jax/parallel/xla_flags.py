"""XLA flags that make the two-micro-batch overlap (block.py) real on GPUs: the latency-hiding
scheduler runs the EP all-to-all asynchronously and places the other micro-batch's compute
between its start and done. Set before the backend starts (`train.py` does)."""

from __future__ import annotations

import importlib.util
import os

# Exist in jaxlib 0.11/0.12 (jax_kernels.md §7.1); an unknown XLA flag aborts backend start-up.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)


def gpu_requested() -> bool:
    """Will JAX start on a GPU? Decided without starting a backend (XLA_FLAGS must be set first)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(p in platforms for p in ("cuda", "gpu", "rocm"))
    return any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def set_gpu_xla_flags() -> list[str]:
    """Append the latency-hiding-scheduler flags to XLA_FLAGS (call before the backend starts);
    flags the user already set win. -> the flags added."""
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
