"""Loading a checkpoint in DeepSeek's released layout onto a mesh: host memory and time.

Writes a random >= 1 GB checkpoint (tools/synthetic_checkpoint.py: FP8 projections with 128x128
scales, BF16 embedding/head/norms/router/eh_proj, an MTP layer, 256 MB shards with an index), then
loads it with `from_pretrained(..., keep_fp8=True, mesh=...)` on 8 fake CPU devices with the experts
over the `expert` axis, and reports:

  * peak growth of the process's anonymous resident memory during the load (sampled every 5 ms
    from /proc/self/status RssAnon: the file pages the memory map reads are page cache, not the
    loader's), against the checkpoint's bytes. On CPU the "devices" are host memory too, so the
    loaded model itself is part of the growth: the non-expert weights once per device (they are
    replicated over the 8), the experts once in all;
  * the bytes the loaded arrays hold on all devices together (what the growth cannot be below);
  * load time, and that each device holds 1/8 of every expert tensor.

    python bench/load.py [--gb 1.0] [--dir /tmp/dsv3_synthetic_1gb]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.hf import from_pretrained  # noqa: E402
from dsv3_jax.sharding import make_mesh  # noqa: E402
from tools.synthetic_checkpoint import config_of_size, write_checkpoint  # noqa: E402


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.005):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, rss_anon(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.period)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--dir", default="/tmp/dsv3_synthetic_1gb")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        t0 = time.perf_counter()
        write_checkpoint(config_of_size(args.gb), args.dir)
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.1f} s")
    files = [f for f in os.listdir(args.dir) if f.endswith(".safetensors")]
    ckpt_bytes = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)
    mesh = make_mesh(1, 1, 8)
    jax.block_until_ready(jax.device_put(0.0))  # start the backend before measuring
    base = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    model = from_pretrained(args.dir, keep_fp8=True, mesh=mesh, progress=False)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    held = sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model)) for s in x.addressable_shards)
    w1 = model.moe_layers.blocks.ffn.experts.w1[...]
    per_device = {s.data.shape for s in w1.addressable_shards}
    growth = sampler.peak - base
    print(f"checkpoint: {ckpt_bytes / 1e9:.3f} GB in {len(files)} files; mesh {dict(mesh.shape)}")
    print(f"experts w1 {w1.dtype} {w1.shape} -> per device {sorted(per_device)} (spec {w1.sharding.spec})")
    print(f"load time {seconds:.1f} s ({ckpt_bytes / seconds / 1e9:.2f} GB/s)")
    print(f"arrays held on the 8 devices together: {held / 1e9:.3f} GB ({held / ckpt_bytes:.2f}x the checkpoint)")
    print(f"peak anonymous host memory growth during the load: {growth / 1e9:.3f} GB "
          f"= {growth / ckpt_bytes:.2f}x the checkpoint (goal <= 1.3x); beyond the loaded arrays themselves: "
          f"{(growth - held) / 1e9:+.3f} GB")


if __name__ == "__main__":
    main()
