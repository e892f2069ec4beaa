"""Prefix reuse under a chat workload: the server without prefix reuse, with it in the decode rows only
(`DecodeBatch.prefix_reuse`), and with a prefix pool of --slots rows beside them (`prefix_pool`),
on the same conversations, in one run.

--conversations chats run at once over --slots decode slots, each --turns turns long, closed loop: a
turn is sent when the previous one's answer is complete. Every conversation starts with the same
--system tokens (a shared system prompt); a turn's prompt is the conversation so far (system
prompt, earlier user messages and answers) and a new user message of 16-48 tokens; answers are 16-64
tokens (uniform; greedy, EOS ignored). This is what an OpenAI-style chat client sends: the whole
conversation every turn. With reuse on, a turn joins a free row that holds a prefix of it (its own
earlier turn, or another conversation's system prompt) from the first position it does not share;
with the pool, a row's conversation is saved before another takes the row and restored for its next turn.

Reported per system (best of --repeats, alternating): output tokens/s, TTFT p50/p99, TPOT p50/p99,
and the fraction of prompt tokens reused. The model, tokenizer and measurement are bench/serve.py's
(10.5M-parameter MoE, float32, mixed prefill 32, MTP off; both systems compiled before the clock).

    python bench/prefix_reuse.py                      # 12 conversations x 4 turns over 8 slots; ~3 min
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.serve.scheduler import Delta, Failed, Finished, Params  # noqa: E402
from dsv3_jax.tokenizer import train_tokenizer  # noqa: E402


def _bench(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def conversations(args, vocab: int, seed: int) -> tuple[list[int], list[list[tuple[list[int], int]]]]:
    """The system prompt and, per conversation, per turn: (the new user message, the answer length)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, args.system).tolist(), [[(rng.integers(3, vocab, int(rng.integers(16, 49))).tolist(), int(rng.integers(16, 65)))
             for _ in range(args.turns)] for _ in range(args.conversations)]


def run(scheduler, chats, system: list[int]) -> dict:
    """Every conversation turn by turn, all conversations at once -> throughput and latencies."""
    lock, done = threading.Lock(), threading.Semaphore(0)
    ttft, tpot, out_tokens, prompt_tokens, reused = [], [], [0], [0], [0]
    t0 = time.perf_counter()

    def send(c: int, turn: int, history: list[int]):
        message, n = chats[c][turn]
        prompt = history + message
        sent, times, answer = time.perf_counter(), [], []

        def sink(event):
            if isinstance(event, Delta):
                times.extend([time.perf_counter()] * len(event.tokens))
                answer.extend(event.tokens)
            elif isinstance(event, Finished):
                with lock:
                    ttft.append(times[0] - sent)
                    tpot.append((times[-1] - times[0]) / max(1, len(times) - 1))
                    out_tokens[0] += len(times)
                    prompt_tokens[0] += len(prompt)
                    reused[0] += event.cached_tokens
                if turn + 1 < len(chats[c]):
                    send(c, turn + 1, prompt + answer)
                else:
                    done.release()
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)
        scheduler.submit(Params(prompt, n, temperature=0.0, ignore_eos=True), sink)

    for c in range(len(chats)):
        send(c, 0, list(system))
    for _ in chats:
        done.acquire()
    wall = time.perf_counter() - t0
    return {"throughput": out_tokens[0] / wall, "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "tpot_p50": np.percentile(tpot, 50), "tpot_p99": np.percentile(tpot, 99),
            "reused": reused[0] / prompt_tokens[0], "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system", type=int, default=64, help="tokens of the shared system prompt")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--steps_per_dispatch", type=int, default=4)
    p.add_argument("--mixed_prefill", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.max_len = args.system + args.turns * (48 + 64) + 16  # the longest conversation
    args.prefill_device = False
    serve, decode = _bench("serve"), _bench("decode")
    cfg = decode.BENCH.replace(moe_impl="tiled")
    model = decode.bench_model(cfg, 0.08)
    tok = train_tokenizer(cfg.vocab_size, tempfile.mkdtemp(prefix="dsv3_bench_tok_"), corpus_max_bytes=2_000_000)
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; {args.conversations} conversations x {args.turns} turns, "
          f"system prompt {args.system} tokens, {args.slots} slots, mixed prefill {args.mixed_prefill}, "
          f"max_len {args.max_len}", flush=True)
    systems = {name: serve.start_scheduler(model, tok, args, 0, args.mixed_prefill, prefix_reuse=on, prefix_pool=pool)
               for name, on, pool in (("off", False, 0), ("rows", True, 0), (f"rows + pool {args.slots}", True, args.slots))}
    best = {}
    for repeat in range(args.repeats):
        # new conversations and system prompt each repeat: what the rows and the pool still hold of the
        # last one shares nothing with them (every system meets the same cold start)
        system, chats = conversations(args, cfg.vocab_size, args.seed + repeat)
        for name, scheduler in systems.items():
            r = run(scheduler, chats, system)
            print(f"  {name}: {r['throughput']:.0f} tok/s in {r['wall']:.1f} s", file=sys.stderr, flush=True)
            if name not in best or r["throughput"] > best[name]["throughput"]:
                best[name] = r
    for scheduler in systems.values():
        scheduler.stop(30)
    print("\n| prefix reuse | throughput (tok/s) | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | prompt tokens reused |")
    print("|---|---|---|---|---|")
    off = best["off"]
    for name, r in best.items():
        print(f"| {name} | {r['throughput']:.0f} | {1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | "
              f"{1e3 * r['tpot_p50']:.1f} / {1e3 * r['tpot_p99']:.1f} | {r['reused']:.0%} |")
    for name, r in best.items():
        if name != "off":
            print(f"{name} / off: throughput {r['throughput'] / off['throughput']:.2f}x, TTFT p50 "
                  f"{off['ttft_p50'] / r['ttft_p50']:.2f}x lower")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
