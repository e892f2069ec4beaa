#!/usr/bin/env python3
"""HF transformers side of bench/decode.py: greedy `generate` speed and KV-cache size.

Runs in the HF venv (python 3.11, torch + transformers + numpy; no JAX):

  hf_decode_bench.py --model DIR --input_ids FILE.npy --new_tokens N [--threads 2] [--repeats 1]

Loads DIR with AutoModelForCausalLM (float32, eager attention), runs greedy generate(max_new_tokens=N)
with EOS disabled on the [B, S] prompt ids in FILE, and times it with a streamer that stamps every
token step (so prefill and decode are told apart within one run, not by subtracting two noisy
runs). Prints one JSON line:

  prefill_s (call to the first new token), decode_s (first to last new token),
  decode_tokens_per_s = B (N - 1) / decode_s (the fastest of --repeats runs),
  median_tokens_per_s = B / the median time between token steps (all runs pooled; robust to
  bursts of load on a shared machine),
  cache_bytes_per_token (every tensor the returned cache holds, over B x cached positions),
  cache_dtype, first_tokens (the first generated ids of row 0, to check both sides agree).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class Clock(BaseStreamer):
    """generate() calls put() with the prompt, then once per new token step."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def cache_bytes(cache) -> tuple[int, str]:
    total, dtypes = 0, set()
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
                dtypes.add(str(value.dtype).removeprefix("torch."))
    return total, ",".join(sorted(dtypes))


def timed_generate(model, ids: torch.Tensor, n: int):
    """-> (prefill_s, decode_s, output)."""
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, return_dict_in_generate=True, use_cache=True,
                             pad_token_id=0, eos_token_id=None, streamer=clock)
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt
    return first - t0, last - first, out, np.diff(clock.times[1:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--input_ids", required=True)
    p.add_argument("--new_tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="take the fastest of this many runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.from_numpy(np.load(args.input_ids).astype(np.int64))
    B, S = ids.shape
    if args.new_tokens < 2:
        raise SystemExit("--new_tokens must be >= 2 (one from prefill, the rest decoded)")
    timed_generate(model, ids[:, : min(S, 16)], 2)  # warm-up
    runs = [timed_generate(model, ids, args.new_tokens) for _ in range(args.repeats)]
    prefill_s, decode_s, out, _ = min(runs, key=lambda r: r[1])
    median_step = float(np.median(np.concatenate([r[3] for r in runs])))
    nbytes, dtype = cache_bytes(out.past_key_values)
    cached = out.past_key_values.get_seq_length()
    print(json.dumps({
        "batch": B, "prompt_len": S, "new_tokens": args.new_tokens,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "decode_tokens_per_s": B * (args.new_tokens - 1) / decode_s,
        "median_tokens_per_s": B / median_step,
        "cache_bytes_per_token": nbytes / (B * cached), "cache_dtype": dtype,
        "first_tokens": out.sequences[0, S:S + 8].tolist(),
    }))


if __name__ == "__main__":
    main()
