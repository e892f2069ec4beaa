"""The XLA ops a jitted program spends its time in, from a `jax.profiler` trace: a table of op name,
microseconds per call and the result shape and JAX operation each op came from (the compiled HLO's
metadata). Shared by bench/decode_profile.py and bench/train_step.py --profile."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax


def profile(call, n_calls: int, compiled_text: str, top: int) -> str:
    """Runs `call()` n_calls times under the profiler; returns the markdown table of the `top` ops."""
    trace_dir = tempfile.mkdtemp(prefix="dsv3_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(n_calls):
            jax.block_until_ready(call())
    per_call = collections.Counter()
    for path in glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True):
        for ev in json.load(gzip.open(path))["traceEvents"]:
            name = ev.get("name", "")
            if ev.get("ph") == "X" and ev.get("args", {}).get("hlo_op") == name:  # the program's ops only
                per_call[name] += ev.get("dur", 0) / n_calls
    source = {}  # op -> its result shape and the jax operation it came from
    for m in re.finditer(r'%([\w.\-]+) = (\S+) [^\n]*', compiled_text):
        op_name = re.search(r'op_name="([^"]*)"', m.group(0))
        source[m.group(1)] = f"{m.group(2)[:40]} {op_name.group(1)[-60:] if op_name else ''}"
    total = sum(per_call.values())
    kinds = collections.Counter()  # ynn_fusion.12 -> ynn_fusion
    for name, us in per_call.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += us
    rows = [f"\nops total {total / 1e3:.2f} ms per call",
            "by kind: " + ", ".join(f"{k} {us / total:.0%}" for k, us in kinds.most_common(8)),
            "| XLA op | us per call | share | result, from |", "|---|---|---|---|"]
    rows += [f"| {name} | {us:.1f} | {us / total:.1%} | {source.get(name, '')} |" for name, us in per_call.most_common(top)]
    return "\n".join(rows)
