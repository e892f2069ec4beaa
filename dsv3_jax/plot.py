"""Plots of a run's metrics: `python -m dsv3_jax.plot WORKDIR [--out DIR]`.

Reads WORKDIR/metrics.jsonl (written by `train.metrics.MetricsWriter`) and writes, to DIR
(default WORKDIR/plots), each figure whose metrics are present:
  loss.png         train `loss`, validation `val_loss`, MTP `mtp_loss` against step
  expert_load.png  `expert_load` [L][E] token counts as layer x expert heatmaps at a few steps,
                   normalised by each layer's mean (1 = perfectly balanced), and below them
                   `load_max_over_mean` [L] per layer against step (the aux-loss-free bias
                   should pull it towards 1)
  lr.png           learning rate `lr` against step
Any key may be missing from any record; a figure with no data is skipped, not an error. Uses
matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend switch),
so it runs anywhere, even while training is still appending to the file.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from dsv3_jax.train.metrics import read_records
from dsv3_jax.errors import MissingFileError

N_SNAPSHOTS = 4  # heatmaps across the run: evenly spaced, always including the last


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records where `key` is a number."""
    pts = [(r["step"], float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _matrices(records: list[dict], key: str, ndim: int) -> list[tuple[int, np.ndarray]]:
    """(step, array) for records whose `key` is a rectangular `ndim`-dimensional list."""
    out = []
    for r in records:
        try:
            a = np.asarray(r.get(key), dtype=np.float64)
        except (TypeError, ValueError):  # ragged or non-numeric
            continue
        if a.ndim == ndim and a.size:
            out.append((r["step"], a))
    return out


def plot_loss(records: list[dict], path: pathlib.Path) -> bool:
    curves = [("loss", "train", dict(lw=1)), ("val_loss", "validation", dict(marker="o", ms=3, lw=1.5)),
              ("mtp_loss", "MTP", dict(lw=1, alpha=0.8))]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    plotted = []
    for key, label, style in curves:
        steps, values = series(records, key)
        if len(steps):
            ax.plot(steps, values, label=label, **style)
            plotted.append(values[np.isfinite(values)])
    if not plotted:
        return False
    finite = np.concatenate(plotted)
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")  # early losses near ln(V) would flatten the rest of the curve
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return True


def plot_lr(records: list[dict], path: pathlib.Path) -> bool:
    steps, values = series(records, "lr")
    if not len(steps):
        return False
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, values)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return True


def plot_expert_load(records: list[dict], path: pathlib.Path) -> bool:
    loads = _matrices(records, "expert_load", 2)  # [(step, [L, E])]
    ratios = _matrices(records, "load_max_over_mean", 1)  # [(step, [L])]
    if not ratios and loads:
        ratios = [(s, a.max(1) / np.maximum(a.mean(1), 1e-9)) for s, a in loads]
    if not loads and not ratios:
        return False
    fig = Figure(figsize=(12, 7.5 if loads else 4), layout="constrained")
    grid = fig.add_gridspec(2 if loads else 1, max(1, min(N_SNAPSHOTS, len(loads))))
    if loads:
        picks = sorted({round(i * (len(loads) - 1) / max(1, N_SNAPSHOTS - 1)) for i in range(N_SNAPSHOTS)})
        shown = [(s, a / np.maximum(a.mean(1, keepdims=True), 1e-9)) for s, a in (loads[i] for i in picks)]
        vmax = max(2.0, max(float(a.max()) for _, a in shown))
        for col, (step, rel) in enumerate(shown):
            ax = fig.add_subplot(grid[0, col])
            im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                           norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax))  # white = balanced
            ax.set(title=f"step {step}", xlabel="expert", ylabel="MoE layer" if col == 0 else None)
        fig.colorbar(im, ax=fig.axes, location="right", shrink=0.45, anchor=(0, 1), label="load / layer mean")
    if ratios:
        ax = fig.add_subplot(grid[-1, :])
        steps = np.array([s for s, _ in ratios])
        n_layers = max(len(a) for _, a in ratios)
        cmap = colormaps["viridis"]
        for layer in range(n_layers):
            ys = np.array([a[layer] if layer < len(a) else math.nan for _, a in ratios])
            ax.plot(steps, ys, lw=1, color=cmap(layer / max(1, n_layers - 1)),
                    label=f"layer {layer}" if n_layers <= 8 else None)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xlabel="step", ylabel="max / mean expert load", title="Load imbalance per MoE layer"
               + ("" if n_layers <= 8 else f" ({n_layers} layers, dark = first)"))
        ax.grid(alpha=0.3)
        if n_layers <= 8:
            ax.legend(fontsize="small", ncols=min(4, n_layers))
    fig.savefig(path, dpi=110)
    return True


PLOTS = {"loss.png": plot_loss, "expert_load.png": plot_expert_load, "lr.png": plot_lr}


def make_plots(workdir, out=None) -> list[pathlib.Path]:
    """Write every figure that has data; returns the paths written."""
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    if not metrics.exists():
        raise MissingFileError(f"no metrics.jsonl in {workdir}")
    records = read_records(metrics)
    out = pathlib.Path(out) if out is not None else pathlib.Path(workdir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [out / name for name, plot in PLOTS.items() if plot(records, out / name)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsv3_jax.plot", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the run's workdir (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default WORKDIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.workdir, args.out)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot: {args.workdir}/metrics.jsonl has no loss, lr or expert load records")


if __name__ == "__main__":
    main()
