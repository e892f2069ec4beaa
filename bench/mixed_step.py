"""What a prompt chunk costs the decoding rows: riding in a decode step (Sarathi's mixed batch,
`DecodeBatch.mixed`) against a prefill of its own (`DecodeBatch.prefill`: prefill + insert, the
first token read back, which the decoding rows wait for).

Seven rows decode (100-token prompts; every dispatch attends a 256-slot cache prefix). Per chunk
size J, timed in alternating rounds (the median of --rounds x 3 is printed):

  plain       a dispatch of K = 4 decode steps
  +k chunks   the same dispatch with k = 1..4 of its steps each carrying a J-token prompt chunk
  admission   a J-token prompt prefilled alone and inserted into the free eighth slot

The slope of the dispatch time over k is what one chunk costs inside a step; the admission is what
the same tokens cost the decoding rows when prefilled alone. The model is bench/decode.py's
(10.5M parameters, float32, MoE tiled, latent cache bf16), greedy.

    python bench/mixed_step.py                       # J = 16, 32, 64; ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.serve.batch import DecodeBatch, Joining, RowSettings, stack_joins  # noqa: E402

ROWS, PROMPT, K, KV = 7, 100, 4, 256


def measure(batch: DecodeBatch, J: int, rounds: int, rng) -> dict:
    """Median milliseconds of a plain dispatch, of dispatches with k chunks, and of an admission."""
    row = RowSettings(eos_id=-1)
    vocab = batch.cfg.vocab_size

    def chunks(k):
        return stack_joins([Joining(ROWS, rng.integers(3, vocab, 4 * J).tolist(), 2, 0).chunk(J, batch.n_draft)[0]
                            for _ in range(k)], K, J + batch.n_draft)

    def admission():
        batch.prefill(ROWS, rng.integers(3, vocab, J).tolist(), 2, row)
        batch.free(ROWS)

    cases = {"plain": lambda: batch._dispatch(K, KV), "admission": admission}
    for k in range(1, K + 1):
        cases[f"+{k}"] = lambda joins=chunks(k): batch._dispatch(K, KV, joins)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for slot in range(ROWS):  # fresh rows each round, so that they never run out of budget or cache
            batch.prefill(slot, rng.integers(3, vocab, PROMPT).tolist(), 10_000, row)
        for _ in range(3):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64], help="chunk sizes J")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    import decode as bench  # bench/decode.py: the model

    cfg = bench.BENCH.replace(moe_impl="tiled")
    model = bench.bench_model(cfg, 0.08)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; {ROWS} decoding rows, {K} steps per dispatch, "
          f"cache prefix {KV}", flush=True)
    print("\n| J | plain dispatch (ms) | +1 / +2 / +3 / +4 chunks (ms) | per chunk in a step (ms) "
          "| admission alone (ms) | admission / chunk |")
    print("|---|---|---|---|---|---|")
    for J in args.chunks:
        batch = DecodeBatch(model, slots=ROWS + 1, max_len=1024, n_draft=0, steps_per_dispatch=K,
                            cache_dtype=jnp.bfloat16, mixed=J)
        m = measure(batch, J, 1, rng)  # compiles
        m = measure(batch, J, args.rounds, rng)
        slope = np.polyfit(np.arange(K + 1), [m["plain"]] + [m[f"+{k}"] for k in range(1, K + 1)], 1)[0]
        with_chunks = " / ".join(f"{m[f'+{k}']:.1f}" for k in range(1, K + 1))
        print(f"| {J} | {m['plain']:.1f} | {with_chunks} | {slope:.2f} | {m['admission']:.1f} | "
              f"{m['admission'] / slope:.1f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
