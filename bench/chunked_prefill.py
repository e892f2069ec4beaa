"""What a long prompt costs the requests already decoding: whole-prompt vs chunked prefill.

Seven requests decode (16-token prompts, 300 tokens each, greedy, EOS ignored); once they are all
streaming, an eighth arrives with a --long-token prompt. The server's scheduler (`dsv3_jax.serve`,
no HTTP) admits it either in one prefill (--prefill_chunk larger than the prompt) or a chunk per
scheduler turn with a decode dispatch between chunks. Measured from the tokens the decoding
requests receive (timestamps of their deltas, one per dispatch):

  dispatch   the median interval between deliveries before the long request arrives
  stall      the longest interval while it is being admitted (what its prefill costs the others)
  TTFT       the long request's time to first token

Each setting runs --rounds times, alternating, in one process (same load); the median is printed.
First, for scale, what one admission costs against a decode step: `DecodeBatch.prefill` of a short
prompt (16, 64, 128 tokens) and a decode dispatch of 8 busy rows, per step (medians of 10).
The model is bench/decode.py's (10.5M parameters, float32, latent cache bf16), 8 slots, 4 steps
per dispatch.

    python bench/chunked_prefill.py                      # prompt 2000; chunks 256, 512 and whole; ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.serve.batch import DecodeBatch, RowSettings  # noqa: E402
from dsv3_jax.serve.metrics import Metrics  # noqa: E402
from dsv3_jax.serve.scheduler import Delta, Failed, Finished, Params, Scheduler  # noqa: E402
from dsv3_jax.tokenizer import train_tokenizer  # noqa: E402

SHORT_PROMPT, SHORT_OUT, LONG_OUT, RUNNING = 16, 300, 4, 7


class Stream:
    """One request's delivery times; `done` is set when it ends."""

    def __init__(self):
        self.times: list[float] = []
        self.done = threading.Event()
        self.error = None

    def __call__(self, event):
        if isinstance(event, Delta):
            self.times.append(time.perf_counter())
        elif isinstance(event, Failed):
            self.error = event
            self.done.set()
        elif isinstance(event, Finished):
            self.done.set()


def one_round(scheduler: Scheduler, vocab: int, long_len: int, rng) -> dict:
    running = [Stream() for _ in range(RUNNING)]
    for s in running:
        scheduler.submit(Params(rng.integers(3, vocab, SHORT_PROMPT).tolist(), SHORT_OUT, temperature=0.0,
                                ignore_eos=True), s)
    while min(len(s.times) for s in running) < 8:  # all admitted and streaming
        time.sleep(0.005)
    long, t_arrive = Stream(), time.perf_counter()
    scheduler.submit(Params(rng.integers(3, vocab, long_len).tolist(), LONG_OUT, temperature=0.0, ignore_eos=True),
                     long)
    for s in running + [long]:
        s.done.wait()
        if s.error is not None:
            raise RuntimeError(f"a request failed: {s.error}")
    t_first = long.times[0]
    before, during = [], []
    for s in running:
        t = np.asarray(s.times)
        gaps, ends = np.diff(t), t[1:]
        before += gaps[ends < t_arrive].tolist()
        during += gaps[(ends > t_arrive) & (t[:-1] < t_first)].tolist()
    return {"dispatch": float(np.median(before)), "stall": max(during), "ttft": t_first - t_arrive}


def admission_costs(batch: DecodeBatch, vocab: int, rng) -> None:
    """One admission (prefill + insert, the first token read back) per prompt length, against a
    decode step of every slot busy."""
    row = RowSettings(eos_id=-1)
    for slot in range(batch.slots):
        batch.prefill(slot, rng.integers(3, vocab, SHORT_PROMPT).tolist(), SHORT_OUT, row)

    def median_s(fn, n=10):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    step = median_s(lambda: batch.decode(batch.K)) / batch.K
    print(f"decode step, {batch.slots} rows: {1e3 * step:.1f} ms")
    for n in (16, 64, 128):
        t = median_s(lambda: batch.prefill(0, rng.integers(3, vocab, n).tolist(), SHORT_OUT, row))
        print(f"admission of a {n}-token prompt: {1e3 * t:.1f} ms = {t / step:.1f} decode steps")
    for slot in range(batch.slots):
        batch.free(slot)


def start(model, tok, chunk: int, max_len: int) -> Scheduler:
    def build():
        return DecodeBatch(model, slots=RUNNING + 1, max_len=max_len, n_draft=0, steps_per_dispatch=4,
                           cache_dtype=jnp.bfloat16, prefill_chunk=chunk), tok

    s = Scheduler(build, max_queue=64, metrics=Metrics(f"bench_chunk_{chunk}"))
    s.start()
    s.ready.wait()
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long", type=int, default=2000, help="the arriving prompt's length")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    import decode as bench  # bench/decode.py: the model

    cfg = bench.BENCH.replace(moe_impl="tiled")
    model = bench.bench_model(cfg, 0.08)
    tok = train_tokenizer(cfg.vocab_size, tempfile.mkdtemp(prefix="dsv3_bench_tok_"), corpus_max_bytes=2_000_000)
    max_len = args.long + SHORT_OUT + 16
    settings = [max_len] + args.chunks  # max_len: never chunked
    t = time.perf_counter()
    schedulers = {c: start(model, tok, c, max_len) for c in settings}
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; prompt {args.long} arriving beside {RUNNING} decoding "
          f"requests; compiled in {time.perf_counter() - t:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    admission_costs(schedulers[max_len].batch, cfg.vocab_size, rng)  # the scheduler is idle: no requests
    results = {c: [] for c in settings}
    for r in range(args.rounds):
        for c in settings:
            results[c].append(one_round(schedulers[c], cfg.vocab_size, args.long, rng))
            print(f"  round {r} chunk {c}: {results[c][-1]} (load average {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    for s in schedulers.values():
        s.stop(30)
    print("\n| prefill | dispatch (ms) | longest stall (ms) | stall / dispatch | long TTFT (s) |")
    print("|---|---|---|---|---|")
    for c in settings:
        m = {k: float(np.median([x[k] for x in results[c]])) for k in ("dispatch", "stall", "ttft")}
        name = "whole prompt" if c == max_len else f"chunks of {c}"
        print(f"| {name} | {1e3 * m['dispatch']:.1f} | {1e3 * m['stall']:.1f} | {m['stall'] / m['dispatch']:.1f} | "
              f"{m['ttft']:.2f} |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
