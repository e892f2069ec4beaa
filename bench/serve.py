"""Serving under load: continuous batching (dsv3_jax.serve) against static batching (Engine.generate
in fixed batches), with MTP speculation off and on, at several Poisson request rates.

Both systems run in this process on the same model and the same request stream, timed by the same
clock, so the comparison is the scheduling and nothing else (no HTTP; the server adds its
event loop and JSON on top of the continuous numbers). Each request has a prompt of random tokens
and asks for some number of tokens, greedy, EOS ignored (so every request generates exactly what it
asked for and both systems do the same useful work). Lengths are log-uniform (prompts 8-128,
outputs 8-192 tokens): many short answers and a long tail, as chat traffic has; static batching
loses more the wider the spread of output lengths in a batch.

  static      a loop that, whenever the engine is free, takes the requests that have arrived (up
              to --slots; it waits for the first if none) and runs `Engine.generate` on them as one
              batch of --slots rows with max_new_tokens = the batch's longest request, decoding
              --steps_per_dispatch steps per dispatch as the continuous side does. A request's
              tokens stream out as they come (on_tokens), so its TTFT and TPOT count from its own
              tokens; the batch still runs until its longest request is done.
  continuous  `Scheduler` + `DecodeBatch` (--slots slots, --steps_per_dispatch steps per dispatch):
              a request is prefilled alone as soon as a slot is free and leaves at its last token.
  mixed J     the same, but a prompt joins the decode steps J tokens per step as extra rows of
              their forward (`DecodeBatch.mixed`, Sarathi's mixed batch; serve.py's default, J =
              32): one per value of --mixed_prefill.

Per request: TTFT = first token - arrival; TPOT = (last token - first token) / (tokens - 1).
Each system runs --repeats times per rate, alternating with the other, and the run with the
higher throughput is reported (on a shared machine the slower runs are the disturbed ones); the
1-minute load average at the end of that run is printed beside it.
Throughput = output tokens of all requests / (last token of any request - first arrival). Rates
are requests per second; "inf" sends every request at t = 0 (the saturated server). For rate inf
the script also prints the workload's own ceiling: the ratio of decode steps static batches and
continuous slots need for the same requests (`step_ceiling`; 1.77x for 32 requests, 2.17x for 128:
a short run is mostly its ramp-down). Compilation
happens before the clock starts (every prompt bucket of both systems).

The model is bench/decode.py's (10.5M parameters, 4 layers, dim 256, 16 experts top-4, vocab
4096, one MTP module, random weights made to draft well at --init_std 0.08), float32, MoE tiled
(the fast form on XLA:CPU), layers unstacked (both systems), latent cache bf16; the tokenizer is the corpus BPE at that vocabulary.

    python bench/serve.py                                  # rates 2, 4, inf; 32 requests, 2 repeats; ~8 min on 2 cores
    python bench/serve.py --rates inf --requests 16        # quick look
    python bench/serve.py --rates inf --requests 128 --mixed_prefill 16 32   # mixed batches of two sizes
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/serve.py --prefill_device   # disaggregated
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import importlib.util
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.infer import Engine  # noqa: E402
from dsv3_jax.serve.batch import DecodeBatch  # noqa: E402
from dsv3_jax.serve.metrics import Metrics  # noqa: E402
from dsv3_jax.serve.scheduler import Delta, Failed, Finished, Params, Scheduler  # noqa: E402
from dsv3_jax.tokenizer import train_tokenizer  # noqa: E402

PROMPT_LEN = (8, 128)
OUTPUT_LEN = (8, 192)


def _decode_bench():
    """bench/decode.py's model (imported by path: bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_decode", os.path.join(os.path.dirname(__file__), "decode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Job:
    prompt: list[int]
    out: int  # tokens asked for
    arrival: float  # seconds after the start
    token_times: list[float] = dataclasses.field(default_factory=list)  # one entry per token received


def log_uniform(rng, lo: int, hi: int) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


def workload(n: int, rate: float, vocab: int, seed: int) -> list[Job]:
    """n requests with Poisson arrivals at `rate`; prompt and output lengths log-uniform."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n) if np.isfinite(rate) else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Job(rng.integers(3, vocab, log_uniform(rng, *PROMPT_LEN)).tolist(), log_uniform(rng, *OUTPUT_LEN),
                float(a)) for a in arrivals]


def summarise(jobs: list[Job], t0: float) -> dict:
    ends = [j.token_times[j.out - 1] for j in jobs]
    ttft = np.array([j.token_times[0] - (t0 + j.arrival) for j in jobs])
    tpot = np.array([(e - j.token_times[0]) / (j.out - 1) for j, e in zip(jobs, ends) if j.out > 1])
    return {"throughput": sum(j.out for j in jobs) / (max(ends) - t0),
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "tpot_p50": np.percentile(tpot, 50), "tpot_p99": np.percentile(tpot, 99), "wall": max(ends) - t0}


# ---- static batching ----------------------------------------------------------------------------------
def run_static(engine: Engine, jobs: list[Job], slots: int, max_len: int, n_draft: int, K: int) -> dict:
    t0, i, drafted, accepted = time.perf_counter(), 0, 0, 0
    while i < len(jobs):
        wait = t0 + jobs[i].arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter() - t0
        group = [j for j in jobs[i: i + slots] if j.arrival <= now]
        i += len(group)

        def on_tokens(k, new, group=group):
            stamp = time.perf_counter()
            group[k].token_times.extend([stamp] * len(new))

        res = engine.generate([j.prompt for j in group], max_new_tokens=max(j.out for j in group),
                              batch_size=slots, max_len=max_len, speculative=n_draft, eos_id=None, on_tokens=on_tokens,
                              steps_per_dispatch=K)
        drafted += res.stats.drafted
        accepted += res.stats.accepted
    return {**summarise(jobs, t0), "accept": accepted / drafted if drafted else None}


def warm_static(engine: Engine, slots: int, max_len: int, n_draft: int, K: int) -> None:
    """Compile the prefill of every prompt bucket Engine can pick here, and the decode step."""
    for S in range(16, PROMPT_LEN[1] + 1, 16):
        engine.generate([[5] * S], max_new_tokens=2, batch_size=slots, max_len=max_len, speculative=n_draft,
                        steps_per_dispatch=K)


# ---- continuous batching ----------------------------------------------------------------------------------
def run_continuous(scheduler: Scheduler, jobs: list[Job]) -> dict:
    done = threading.Semaphore(0)

    def sink_for(job):
        def sink(event):
            if isinstance(event, Delta):
                job.token_times.extend([time.perf_counter()] * len(event.tokens))
            elif isinstance(event, (Finished, Failed)):
                done.release()
        return sink

    t0 = time.perf_counter()
    for job in jobs:
        wait = t0 + job.arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        scheduler.submit(Params(job.prompt, job.out, temperature=0.0, ignore_eos=True), sink_for(job))
    for _ in jobs:
        done.acquire()
    return {**summarise(jobs, t0), "accept": scheduler.metrics.acceptance_rate if scheduler.batch.n_draft else None}


def start_scheduler(model, tok, args, n_draft: int, mixed: int = 0, prefix_reuse: bool = True,
                    prefix_pool: int = 0) -> Scheduler:
    mesh = prefill_mesh = None
    if args.prefill_device:
        from dsv3_jax.infer.main import make_mesh
        mesh, prefill_mesh = (make_mesh("1,1,1", model.cfg.n_routed_experts, jax.devices()[i: i + 1]) for i in (1, 0))

    def start():
        return DecodeBatch(model, slots=args.slots, max_len=args.max_len, n_draft=n_draft,
                           steps_per_dispatch=args.steps_per_dispatch, cache_dtype=jnp.bfloat16, mesh=mesh,
                           prefill_mesh=prefill_mesh, mixed=mixed, prefix_reuse=prefix_reuse,
                           prefix_pool=prefix_pool), tok

    s = Scheduler(start, max_queue=10_000, metrics=Metrics("bench"))
    s.start()
    s.ready.wait()
    return s


# ---- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", nargs="+", default=["2", "4", "inf"], help="requests per second ('inf': all at once)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each system per rate; the faster one is reported")
    p.add_argument("--requests", type=int, default=32, help="requests per run")
    p.add_argument("--slots", type=int, default=8, help="decode slots (continuous) = batch size (static)")
    p.add_argument("--steps_per_dispatch", type=int, default=4)
    p.add_argument("--max_len", type=int, default=PROMPT_LEN[1] + OUTPUT_LEN[1] + 16,
                   help="cache slots per sequence (the longest request, plus room for MTP drafts)")
    p.add_argument("--init_std", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill_device", action="store_true",
                   help="continuous batching prefills on device 0 and decodes on device 1, side by side "
                        "(disaggregation; needs XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    p.add_argument("--mixed_prefill", type=int, nargs="*", default=[32],
                   help="also run continuous batching with prompts joining decode steps this many tokens at a "
                        "time (DecodeBatch.mixed), one system per value")
    args = p.parse_args()

    bench = _decode_bench()
    cfg = bench.BENCH.replace(moe_impl="tiled")
    model = bench.bench_model(cfg, args.init_std)
    tok = train_tokenizer(cfg.vocab_size, tempfile.mkdtemp(prefix="dsv3_bench_tok_"), corpus_max_bytes=2_000_000)
    engine = Engine(model, cache_dtype=jnp.bfloat16)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; {args.requests} requests "
          f"per run, prompts {PROMPT_LEN[0]}-{PROMPT_LEN[1]}, outputs {OUTPUT_LEN[0]}-{OUTPUT_LEN[1]} tokens, "
          f"{args.slots} slots, {args.steps_per_dispatch} steps per dispatch, max_len {args.max_len}", flush=True)
    rows = []
    for n_draft in (0, cfg.n_mtp_modules):
        t = time.perf_counter()
        warm_static(engine, args.slots, args.max_len, n_draft, args.steps_per_dispatch)
        schedulers = {"continuous": start_scheduler(model, tok, args, n_draft)}
        if not args.prefill_device:  # (a prompt that joins the decode steps uses no prefill device)
            schedulers.update({f"mixed {J}": start_scheduler(model, tok, args, n_draft, J) for J in args.mixed_prefill})
        names = ["static", *schedulers]
        print(f"  MTP {n_draft}: compiled in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        for rate in map(float, args.rates):
            best = {}
            for _ in range(args.repeats):  # alternating, so that all see the same spells of load
                for name in names:
                    jobs = workload(args.requests, rate, cfg.vocab_size, args.seed)
                    r = (run_static(engine, jobs, args.slots, args.max_len, n_draft, args.steps_per_dispatch) if name == "static"
                         else run_continuous(schedulers[name], jobs))
                    r["load"] = os.getloadavg()[0]
                    print(f"  rate {rate:g} {name} MTP {n_draft}: {r['throughput']:.0f} tok/s in {r['wall']:.1f} s "
                          f"(load average {r['load']:.1f})", file=sys.stderr, flush=True)
                    if name not in best or r["throughput"] > best[name]["throughput"]:
                        best[name] = r
            rows += [(rate, name, n_draft, best[name]) for name in names]
        for scheduler in schedulers.values():
            scheduler.stop(30)
    report(rows)
    if "inf" in args.rates:
        print(f"this workload's ceiling at rate inf (decode steps, static / continuous): "
              f"{step_ceiling(workload(args.requests, np.inf, cfg.vocab_size, args.seed), args.slots):.2f}x")


def step_ceiling(jobs: list[Job], slots: int) -> float:
    """Static / continuous decode steps for requests that all arrive at once: a static batch of
    `slots` runs as many steps as its longest request; a continuous slot takes the next request the
    step its last one ends. The throughput ratio the scheduling alone can give on this workload
    (one token per step; prefill not counted)."""
    outs = [j.out for j in jobs]
    static = sum(max(outs[i: i + slots]) for i in range(0, len(outs), slots))
    ends = [0] * slots
    for out in outs:
        heapq.heappush(ends, heapq.heappop(ends) + out)
    return static / max(ends)


def report(rows) -> None:
    print("\n| rate (req/s) | batching | MTP | throughput (tok/s) | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
          "| MTP acceptance | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for rate, name, n_draft, r in rows:
        accept = "-" if r["accept"] is None else f"{r['accept']:.2f}"
        print(f"| {rate:g} | {name} | {'on' if n_draft else 'off'} | {r['throughput']:.0f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {1e3 * r['tpot_p50']:.1f} / {1e3 * r['tpot_p99']:.1f} "
              f"| {accept} | {r['load']:.1f} |")
    by = {(rate, name, n): r for rate, name, n, r in rows}
    print()
    for rate, name, n, r in rows:
        if name != "static":
            s = by[(rate, "static", n)]
            print(f"rate {rate:g}, MTP {'on' if n else 'off'}: {name} / static throughput "
                  f"{r['throughput'] / s['throughput']:.2f}x, p99 TPOT {1e3 * r['tpot_p99']:.1f} vs "
                  f"{1e3 * s['tpot_p99']:.1f} ms")


if __name__ == "__main__":
    main()
