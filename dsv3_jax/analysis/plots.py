"""The two figures of `python -m dsv3_jax.analysis --plots DIR`.

  kv_cache.png  one sequence's KV cache (GB) against context length for V3's MLA and the two GQA
                models of P1 Table 1; straight lines whose slopes are the bytes per token.
  tpot.png      the EP communication bound on time per output token (P1 §2.3.2) against the
                per-device bandwidth, with the accelerators of `hardware.py` marked on it.

matplotlib's object API on the Agg canvas (no pyplot, no display), as `dsv3_jax/plot.py` does.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.figure import Figure

from dsv3_jax.analysis import ep_bound, kv_cache
from dsv3_jax.analysis.hardware import ACCELERATORS


def kv_cache_figure() -> Figure:
    contexts = np.logspace(np.log2(1024), np.log2(131072), 64, base=2)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for label, per_token in kv_cache.per_token_by_model().values():
        ax.plot(contexts, np.array(kv_cache.kv_bytes(contexts, per_token)) / 1e9,
                label=f"{label}: {per_token / 1e3:.1f} KB/token")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1024, 4096, 16384, 65536, 131072], ["1K", "4K", "16K", "64K", "128K"])
    ax.axvline(kv_cache.CONTEXT, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache of one sequence (GB, BF16)")
    ax.set_title("KV cache per sequence (ISCA '25 Table 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def tpot_figure() -> Figure:
    bandwidths = np.logspace(np.log10(10e9), np.log10(2e12), 128)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(bandwidths / 1e9, ep_bound.tpot_curve(bandwidths), color="k",
            label="(1+2) B x 32 x 9 x 7000 / BW x 2 x 61")
    by_bw: dict[float, list[str]] = {}  # the three Hopper parts share one 400G NIC per GPU
    for acc in ACCELERATORS.values():
        by_bw.setdefault(acc.ep_bw, []).append(acc.name)
    for bw, names in by_bw.items():
        tpot = float(ep_bound.tpot_curve([bw])[0])
        ax.plot(bw / 1e9, tpot, "o")
        ax.annotate(f"{' / '.join(names)} @ {bw / 1e9:g} GB/s\n{tpot:.2f} ms, {1e3 / tpot:,.0f} tok/s",
                    (bw / 1e9, tpot),
                    textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-device EP bandwidth, one direction (GB/s)")
    ax.set_ylabel("TPOT bound (ms)")
    ax.set_title("V3 decode: EP communication bound (ISCA '25 §2.3.2)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def write(out_dir) -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (("kv_cache.png", kv_cache_figure()), ("tpot.png", tpot_figure())):
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths
