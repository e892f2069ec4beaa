"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own.

A private `CollectorRegistry` rather than the process-wide default, so that two servers in one
process (tests, the benchmark) do not share counters. The scheduler thread updates the token,
latency and MTP metrics as it goes (prometheus_client is thread-safe); the HTTP side counts
responses by endpoint and status.

Time per output token is per request: (last token time - first token time) / (tokens - 1),
observed when the request finishes, the way serving benchmarks define TPOT; tokens reach the host
one decode dispatch at a time, so a finer clock would only measure the dispatch granularity.
MTP acceptance is exported as the two counters (rate() them) and their running ratio.
"""

from __future__ import annotations

import prometheus_client as prom

# Seconds: from a few ms (a hot GPU) to a minute (a long queue on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = prom.CollectorRegistry()
        self._totals = [0, 0]  # drafted, accepted (for the ratio; counters do not read back)
        prom.Info("dsv3_model", "the served model", registry=r).info({"name": model_name})
        self.requests = prom.Counter("dsv3_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.finished = prom.Counter("dsv3_requests_finished", "generations ended, by reason "
                                     "(stop, length, abort = client gone, error)", ["reason"], registry=r)
        self.prompt_tokens = prom.Counter("dsv3_prompt_tokens", "prompt tokens of the requests started "
                                          "(reused ones too)", registry=r)
        self.reused_tokens = prom.Counter("dsv3_prompt_tokens_reused", "prompt tokens whose latents a freed "
                                          "row still held (prefix reuse: not run again)", registry=r)
        self.generation_tokens = prom.Counter("dsv3_generation_tokens", "tokens generated", registry=r)
        self.queue_length = prom.Gauge("dsv3_queue_length", "requests waiting for a decode slot", registry=r)
        self.slots_busy = prom.Gauge("dsv3_slots_busy", "decode slots holding a request", registry=r)
        self.slots = prom.Gauge("dsv3_slots", "decode slots", registry=r)
        self.occupancy = prom.Gauge("dsv3_slot_occupancy", "busy slots / slots", registry=r)
        self.ttft = prom.Histogram("dsv3_time_to_first_token_seconds", "arrival to first token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = prom.Histogram("dsv3_time_per_output_token_seconds", "per request: (last - first token "
                                   "time) / (tokens - 1)", buckets=TPOT_BUCKETS, registry=r)
        self.latency = prom.Histogram("dsv3_request_latency_seconds", "arrival to last token",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.dispatches = prom.Counter("dsv3_decode_dispatches", "decode dispatches (each up to K steps)",
                                       registry=r)
        self.steps = prom.Counter("dsv3_decode_steps", "decode (verification) steps run", registry=r)
        self.drafted = prom.Counter("dsv3_mtp_draft_tokens", "MTP tokens drafted for active rows", registry=r)
        self.accepted = prom.Counter("dsv3_mtp_accepted_tokens", "MTP drafts accepted", registry=r)
        self.acceptance = prom.Gauge("dsv3_mtp_acceptance_rate", "accepted / drafted since start", registry=r)
        self.compiled_programs = prom.Gauge("dsv3_compiled_programs", "programs compiled (constant after "
                                            "start-up)", registry=r)

    def observe_dispatch(self, steps: int, drafted: int, accepted: int, n_draft: int) -> None:
        """One decode dispatch: its MTP drafts verified and accepted (`ChunkOutput.drafts`)."""
        self.dispatches.inc()
        self.steps.inc(steps)
        if n_draft and steps:
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)
            self._totals[0] += drafted
            self._totals[1] += accepted
            self.acceptance.set(self.acceptance_rate)

    @property
    def acceptance_rate(self) -> float:
        """MTP drafts accepted / drafted since start (0 without speculation)."""
        return self._totals[1] / self._totals[0] if self._totals[0] else 0.0

    def observe_finished(self, req, reason: str) -> None:
        self.finished.labels(reason).inc()
        if req.first_token_at is None:
            return
        self.latency.observe(req.last_token_at - req.arrival)
        if req.completion_tokens > 1:
            self.tpot.observe((req.last_token_at - req.first_token_at) / (req.completion_tokens - 1))

    def set_occupancy(self, busy: int, slots: int, waiting: int) -> None:
        self.slots_busy.set(busy)
        self.slots.set(slots)
        self.occupancy.set(busy / slots if slots else 0.0)
        self.queue_length.set(waiting)

    def render(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_PLAIN_0_0_4
