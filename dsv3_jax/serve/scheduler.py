"""Continuous batching: one thread owns the device and moves requests through the decode slots.

Why one thread. The decode state is donated to every program (the cache is updated in place), so
exactly one owner may hold it between dispatches; JAX dispatch is not something to interleave
from several threads either. The scheduler thread therefore does all device work, and everything
else talks to it through thread-safe structures: `submit` appends to an inbox queue (from the
HTTP event loop, without blocking it), `cancel` sets a flag, and results go back through each
request's `sink`, a callable the HTTP side provides (it hands events to its asyncio loop with
`call_soon_threadsafe`).

The loop, once the model is loaded and every program compiled (`ready`):
  1. take new requests from the inbox; drop cancelled ones, free the slots of cancelled running ones;
  2. while a request waits and a slot is free: take the free slot whose row holds the longest
     prefix of its prompt (`DecodeBatch.best_slot`: prefix reuse); with mixed prefill on
     (`--mixed_prefill`), a prompt of at most `--prefill_chunk` tokens past that prefix joins the
     decode steps from there, the joining prompts taking
     turns a chunk per step as extra rows of the step's forward (Sarathi's mixed batch: the running
     rows wait for no prefill; its first token comes with the dispatch that carries its last
     chunk); otherwise it is
     prefilled alone and inserted into the slot (its first token streams out at once), a prompt
     longer than `--prefill_chunk` a chunk per iteration, so it stalls the decoding rows for one
     chunk at a time;
  3. if any slot is busy, run one decode dispatch: K steps on the device (`--steps_per_dispatch`,
     the streaming granularity and the most steps a waiting request waits for a freed slot), over
     the smallest cache prefix that holds them; then hand each request its tokens, and retire
     those that hit EOS, a stop string or their max_tokens.
A request therefore joins and leaves between two dispatches, never waiting for the rest of the
batch, and the compiled shapes never change.

Faults stay local: an exception while serving one request (its prefill, its text, its sink) fails
that request only. A device error in a shared program (insert, decode) fails the requests then
in the batch and starts a fresh one; the thread itself keeps going.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import random
import threading
import time
import traceback
from typing import Callable

from dsv3_jax.checkpoint import describe
from dsv3_jax.errors import UserError
from dsv3_jax.infer.sampling import SamplingConfig
from dsv3_jax.serve.batch import DecodeBatch, RowSettings
from dsv3_jax.serve.text import TextStream


class QueueFull(Exception):
    """More requests outstanding than slots + max_queue."""


class NotReady(Exception):
    """The model is still loading or compiling, or the server is shutting down."""


@dataclasses.dataclass(frozen=True)
class Params:
    """What a request asks for (validated by the HTTP layer)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


# ---- events a request's sink receives ---------------------------------------------------------------
@dataclasses.dataclass
class Delta:
    text: str
    tokens: list[int]


@dataclasses.dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, whose latents its row already held (prefix reuse)


@dataclasses.dataclass
class Failed:
    message: str


class Request:
    """One generation in flight: its parameters, its sink, its progress and timings."""

    _ids = itertools.count()

    def __init__(self, params: Params, sink: Callable[[object], None]):
        self.params, self.sink = params, sink
        self.id = next(Request._ids)
        self.cancelled = False  # set from the HTTP side; read by the scheduler
        self.arrival = time.perf_counter()
        self.first_token_at = self.last_token_at = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt positions its row already held
        self.budget = params.max_tokens  # max_tokens within the context
        self.text: TextStream | None = None
        self.done = False


class Scheduler:
    """Continuous batching over a `DecodeBatch` built by `start_batch()` on the scheduler thread."""

    def __init__(self, start_batch: Callable[[], tuple[DecodeBatch, object]], *, max_queue: int, metrics=None,
                 on_fatal: Callable[[str], None] | None = None):
        self._start_batch, self.max_queue, self.metrics, self._on_fatal = start_batch, max_queue, metrics, on_fatal
        self.batch: DecodeBatch | None = None
        self.tokenizer = None
        self.ready = threading.Event()
        self.error: str | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._free: list[int] = []  # least recently freed first (`DecodeBatch.best_slot`)
        # a long prompt entering its slot chunk by chunk: (request, slot, DecodeBatch.admit generator, budget)
        self._filling: tuple | None = None
        # prompts joining decode dispatches (DecodeBatch.join): slot -> (request, budget)
        self._joining: dict[int, tuple[Request, int]] = {}
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted and not finished
        self._stopping = False
        self._seeds = random.Random()
        self._thread = threading.Thread(target=self._main, name="dsv3-scheduler", daemon=True)

    # ---- the HTTP side's interface (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, params: Params, sink: Callable[[object], None]) -> Request:
        """Queue a request; raises NotReady before start-up ends or once stopping, QueueFull when full."""
        if not self.ready.is_set() or self._stopping:
            raise NotReady("the server is starting up" if not self._stopping else "the server is shutting down")
        with self._lock:
            if self._outstanding >= self.batch.slots + self.max_queue:
                raise QueueFull(f"{self._outstanding} requests are in progress or queued (the limit is "
                                f"{self.batch.slots} slots + --max_queue {self.max_queue})")
            self._outstanding += 1
        req = Request(params, sink)
        self._inbox.put(req)
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: free its slot (or its place in the queue) at the next iteration."""
        req.cancelled = True
        self._inbox.put(None)  # wake the thread if it sleeps

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is in flight, then end the thread (new submissions raise NotReady)."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def occupancy(self) -> tuple[int, int, int]:
        """(busy slots, slots, requests waiting for a slot): an estimate from another thread."""
        slots = self.batch.slots if self.batch is not None else 0
        busy = len(self._running)
        return busy, slots, max(0, self._outstanding - busy)

    # ---- the thread ------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.batch, self.tokenizer = self._start_batch()
            self.batch.warmup()
            self._free = list(range(self.batch.slots))
        except Exception as e:  # noqa: BLE001 - reported to the user as the server's exit reason
            if not isinstance(e, UserError):
                traceback.print_exc()
            self.error = str(e) if isinstance(e, UserError) else describe(e)
            if self._on_fatal is not None:
                self._on_fatal(self.error)
            return
        self.ready.set()
        self._update_gauges()
        while not (self._stopping and self._idle() and self._inbox.empty()):
            self._collect(block=self._idle())
            self._admit()
            if self._running or self._joining:
                self._decode()
            self._update_gauges()

    def _idle(self) -> bool:
        return not self._running and not self._waiting and self._filling is None and not self._joining

    def _collect(self, block: bool) -> None:
        """Move the inbox into the waiting line; act on cancellations."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._retire(req, None, "abort")
        for slot, req in list(self._running.items()):
            if req.cancelled:
                self._retire(req, slot, "abort")
        if self._filling is not None and self._filling[0].cancelled:
            req, slot, admission, _ = self._filling
            admission.close()
            self._filling = None
            self._free.append(slot)
            self._retire(req, None, "abort")
        for slot, (req, _) in list(self._joining.items()):
            if req.cancelled:
                del self._joining[slot]
                self.batch.free(slot)
                self._free.append(slot)
                self._retire(req, None, "abort")

    def _admit(self) -> None:
        """Let waiting requests into free slots, oldest first: a prompt of at most `prefill_chunk`
        tokens joins the next decode dispatches (`DecodeBatch.join`, where the batch has `mixed`
        on: the joining prompts take turns, a chunk per decode step); otherwise it is prefilled, a
        long one a chunk per call."""
        if self._filling is not None:
            self._advance()
        while self._waiting and self._free and self._filling is None:
            req = self._waiting.popleft()
            p = req.params
            slot, reused = self.batch.best_slot(self._free, p.prompt)  # the row holding most of the prompt
            self._free.remove(slot)
            budget = min(p.max_tokens, self.batch.context - len(p.prompt))
            seed = p.seed if p.seed is not None else self._seeds.getrandbits(31)
            row = RowSettings(SamplingConfig(p.temperature, p.top_k, p.top_p), seq_id=seed & 0x7FFFFFFF,
                              eos_id=-1 if p.ignore_eos else self.tokenizer.eos_id)
            try:
                req.text = TextStream(self.tokenizer, p.stop)
            except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
                self._free.append(slot)
                self._fail(req, e)
                continue
            if self.batch.mixed and len(p.prompt) - reused <= self.batch.chunk:
                try:  # (it may move a prefix into or out of the pool: a device program)
                    self.batch.join(slot, p.prompt, budget, row, start=reused)
                except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
                    self._free.append(slot)
                    self._fail(req, e)
                    if self.batch.state_lost():
                        self._reset(e)
                    continue
                self._joining[slot], req.cached_tokens = (req, budget), reused
                if self.metrics is not None:
                    self.metrics.reused_tokens.inc(reused)
            else:
                self._filling = (req, slot, self.batch.admit(slot, p.prompt, budget, row), budget)
                self._advance()

    def _advance(self) -> None:
        """The next chunk of the admission in progress; once its last is done the request runs."""
        req, slot, admission, budget = self._filling
        try:
            next(admission)
            return  # more chunks: a decode dispatch runs first
        except StopIteration as done:
            first, active = done.value
        except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
            self._filling = None
            self._free.append(slot)
            self._fail(req, e)
            if self.batch.state_lost():  # it failed inside insert, which consumed the batch
                self._reset(e)
            return
        self._filling = None
        self._start(req, slot, budget)
        self._deliver(req, slot, first, time.perf_counter(), still_active=active)

    def _start(self, req: Request, slot: int, budget: int) -> None:
        """The request's prompt is in its slot: it decodes from now on."""
        req.budget = budget
        self._running[slot] = req
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(req.params.prompt))

    def _decode(self) -> None:
        try:
            # K steps even while a request waits: a slot freed mid-dispatch idles for the rest of it
            # (at most K-1 steps), which cost less than cutting dispatches short at the first row
            # that can finish did in extra dispatches (bench/serve.py: 1.66x -> 2.18x static at
            # saturation, docs/BENCHMARKS.md). The loop ends early once no row is active and no
            # prompt chunk is left to join.
            out = self.batch.decode(self.batch.K)
        except Exception as e:  # noqa: BLE001 - a device error: the batch is lost, the server is not
            self._reset(e)
            return
        for slot in set(self._joining) - set(self.batch.joining):  # its last chunk ran: it decodes
            req, budget = self._joining.pop(slot)
            self._start(req, slot, budget)
        now = time.perf_counter()
        steps = int(out.steps)
        if self.metrics is not None:
            self.metrics.observe_dispatch(steps, *out.drafts(), self.batch.n_draft)
        for slot, req in list(self._running.items()):
            new = out.emitted(slot)
            self._deliver(req, slot, new, now, still_active=bool(out.active[slot]))

    def _deliver(self, req: Request, slot: int, tokens: list[int], now: float, *, still_active: bool) -> None:
        """Hand a request its new tokens; retire it if it is done (EOS, stop string, budget).

        Tokens go through the text one at a time, so that a stop string ends the count at the
        token that completed it, even when the dispatch produced more."""
        try:
            eos = self.tokenizer.eos_id if not req.params.ignore_eos else None
            text, used, hit_eos = [], 0, False
            for t in tokens:
                used += 1
                hit_eos = t == eos
                if hit_eos:
                    break
                text.append(req.text.push([t]))
                if req.text.stopped:
                    break
            if used:  # a Delta even without text (half a character): it carries the token count
                self._count_tokens(req, used, now)
                req.sink(Delta("".join(text), tokens[:used]))
            if req.text.stopped or hit_eos:
                self._retire(req, slot, "stop")
            elif not still_active:
                self._retire(req, slot, "length")
        except Exception as e:  # noqa: BLE001 - e.g. a sink whose event loop is gone
            self._retire(req, slot, "abort")
            self._fail(req, e)

    def _count_tokens(self, req: Request, n: int, now: float) -> None:
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - req.arrival)
        req.last_token_at = now
        req.completion_tokens += n
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(n)

    def _retire(self, req: Request, slot: int | None, reason: str) -> None:
        """Free the request's slot and send its last text and its Finished event ("abort": nothing)."""
        if slot is not None and self._running.get(slot) is req:
            del self._running[slot]
            self.batch.free(slot)
            self._free.append(slot)
        if req.done:
            return
        req.done = True
        with self._lock:
            self._outstanding -= 1
        if self.metrics is not None:
            self.metrics.observe_finished(req, reason)
        if reason == "abort":
            return
        rest = req.text.flush()
        if rest:
            req.sink(Delta(rest, []))
        req.sink(Finished(reason, len(req.params.prompt), req.completion_tokens, req.cached_tokens))

    def _fail(self, req: Request, e: Exception) -> None:
        if not req.done:
            req.done = True
            with self._lock:
                self._outstanding -= 1
            if self.metrics is not None:
                self.metrics.observe_finished(req, "error")
        try:
            req.sink(Failed(f"generation failed: {type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001 - nobody is listening any more
            pass

    def _reset(self, e: Exception) -> None:
        """A shared program failed: fail every request in the batch and start an empty one."""
        for slot, req in list(self._running.items()):
            del self._running[slot]
            self._fail(req, e)
        if self._filling is not None:  # its prefill has its own state, but its slot is in the lost batch
            self._filling[2].close()
            self._fail(self._filling[0], e)
            self._filling = None
        for req, _ in self._joining.values():
            self._fail(req, e)
        self._joining.clear()
        self._free = list(range(self.batch.slots))
        self.batch.reset()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_occupancy(*self.occupancy())
            self.metrics.compiled_programs.set(self.batch.compiled_programs())
