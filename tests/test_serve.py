"""dsv3-serve: the OpenAI API over continuous batching, checked with the `openai` client.

The fault cases (a full queue, dropped streams, a request that fails, a device error, every bad
request) run against the real FastAPI app and scheduler in this process over a fake device
(`FakeBatch`, no JAX): the fake can hold its decode step at a gate, which makes "the queue is full
now" and "the slot is busy now" deterministic. The model itself, served by `serve.py`:
tests/test_serve_model.py.
"""
import concurrent.futures
import json
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest

from dsv3_jax.serve.batch import prompt_buckets
from dsv3_jax.serve.metrics import Metrics
from dsv3_jax.infer.programs import ChunkOutput
from dsv3_jax.serve.scheduler import Delta, Failed, Finished, Params, QueueFull, Scheduler
from dsv3_jax.serve.server import create_app
from dsv3_jax.serve.text import TextStream
from serve_support import client, free_port, wait_until


# ---- a fake device ----------------------------------------------------------------------------------
EOS, POISON, LAST = 0, ord("!"), ord("~")  # after "~" the fake model says EOS


class FakeTokenizer:
    """Characters are token ids (ASCII); EOS is id 0."""

    eos_id = EOS
    chat_template = "fake"

    def encode(self, text, add_bos=None):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kwargs):
        text = "".join(f"{m['role']}:{m['content']}\n" for m in messages) + "assistant:" * add_generation_prompt
        return self.encode(text) if tokenize else text


class FakeBatch:
    """`DecodeBatch`'s interface without JAX: every row continues its last character (b, c, d, ...),
    then EOS after "~". A prompt containing "!" fails in prefill; `fail_next_decode` fails one decode
    dispatch; `gate` holds decode dispatches until set. A prompt longer than `chunk` enters in
    chunks (`admit` pauses between them); with `mixed`, a prompt of at most `chunk` tokens joins
    the decode steps instead (`join`: joining prompts take turns, `mixed` tokens per step), from the
    positions its slot's last prompt shares with it (`best_slot`: prefix reuse). `calls` logs
    chunks, decode dispatches and, within them, the steps that carry a join, in order."""

    def __init__(self, slots=2, K=4, context=4096, step_s=0.0, chunk=4096, mixed=0):
        self.slots, self.K, self.n_draft, self.context, self.step_s = slots, K, 0, context, step_s
        self.chunk, self.calls, self.mixed, self._joins = chunk, [], mixed, []
        self.cfg = types.SimpleNamespace(vocab_size=128)
        self.gate = threading.Event()
        self.gate.set()
        self.held = False  # a decode dispatch waits at the gate
        self.fail_next_decode = False
        self.last, self.left = np.zeros(slots, int), np.zeros(slots, int)
        self.active, self.eos = np.zeros(slots, bool), np.zeros(slots, int)
        self.prompts = [[] for _ in range(slots)]  # each slot's last prompt (what its row "holds")
        self.starts = []  # each join's first position

    def warmup(self):
        pass

    def compiled_programs(self):
        return 0

    def state_lost(self):
        return False

    def reset(self):
        self.active[:] = False
        self._joins = []

    def free(self, slot):
        self.active[slot] = False
        self._joins = [j for j in self._joins if j[0] != slot]

    def reusable(self, slot, prompt):
        held = self.prompts[slot]
        return next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt) - 1))

    def best_slot(self, free, prompt):
        return max(((slot, self.reusable(slot, prompt) if self.mixed else 0) for slot in free), key=lambda s: s[1])

    def join(self, slot, prompt, budget, row, start=0):
        assert slot not in self.joining and start <= self.reusable(slot, prompt)
        if POISON in prompt:  # (as a failed move into or out of the prefix pool would)
            raise RuntimeError("this prompt breaks the fake device")
        self.prompts[slot] = list(prompt)
        self.starts.append(start)
        self._joins.append([slot, list(prompt)[start:], budget, row])

    @property
    def joining(self):
        return [j[0] for j in self._joins]

    def _join_step(self):
        """The next joining prompt loses `mixed` tokens; after its last, its row runs."""
        self.calls.append("join")
        j = self._joins[0]
        slot, prompt, budget, row = j
        if len(prompt) > self.mixed:
            j[1] = prompt[self.mixed:]
            return
        self._joins.pop(0)
        self.left[slot], self.eos[slot] = budget, row.eos_id
        self.last[slot], self.active[slot] = prompt[-1], True

    def _emit(self, slot, previous):
        t = EOS if previous == LAST else previous + 1
        self.last[slot], self.left[slot] = t, self.left[slot] - 1
        self.active[slot] = self.left[slot] > 0 and t != self.eos[slot]
        return t

    def prefill(self, slot, prompt, budget, row):
        if POISON in prompt:
            raise RuntimeError("this prompt breaks the fake device")
        self.left[slot], self.eos[slot] = budget, row.eos_id
        first = self._emit(slot, prompt[-1])
        return [first], bool(self.active[slot])

    def admit(self, slot, prompt, budget, row):
        for start in range(self.chunk, len(prompt), self.chunk):
            self.calls.append("chunk")
            yield
        self.calls.append("chunk")
        return self.prefill(slot, prompt, budget, row)

    def decode(self, n):
        self.held = not self.gate.is_set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.held = False
        self.calls.append("decode")
        time.sleep(self.step_s)
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("the fake device failed")
        tokens, count = np.zeros((self.K, self.slots, 1), int), np.zeros((self.K, self.slots), int)
        was = np.zeros((self.K, self.slots), bool)
        steps = 0
        while steps < min(n, self.K) and (self.active.any() or self._joins):
            if self._joins:
                self._join_step()
            for r in np.flatnonzero(self.active):
                was[steps, r], count[steps, r] = True, 1
                tokens[steps, r, 0] = self._emit(r, self.last[r])
            steps += 1
        return ChunkOutput(tokens, count, np.zeros_like(count), was, np.zeros_like(count), np.int32(steps),
                           self.active.copy(), self.left.copy())


def run_scheduler(batch, **kw):
    s = Scheduler(lambda: (batch, FakeTokenizer()), metrics=Metrics("fake"), **{"max_queue": 4, **kw})
    s.start()
    assert s.ready.wait(10)
    return s


def collect(events: list, done: threading.Event):
    def sink(event):
        events.append(event)
        if isinstance(event, (Finished, Failed)):
            done.set()
    return sink


def generate(s: Scheduler, prompt: str, **kw):
    events, done = [], threading.Event()
    s.submit(Params(prompt=FakeTokenizer().encode(prompt), **{"max_tokens": 8, "temperature": 0.0, **kw}),
             collect(events, done))
    assert done.wait(10)
    return "".join(e.text for e in events if isinstance(e, Delta)), events[-1]


# ---- the scheduler and text, over the fake device --------------------------------------------------------
def test_finish_reasons_and_token_counts():
    s = run_scheduler(FakeBatch())
    try:
        assert generate(s, "a", max_tokens=5) == ("bcdef", Finished("length", 1, 5))
        # "z{|}~" then EOS: the text leaves EOS out, the count keeps it (the model generated it)
        assert generate(s, "y", max_tokens=20) == ("z{|}~", Finished("stop", 1, 6))
        assert generate(s, "y", max_tokens=20, ignore_eos=True)[1] == Finished("length", 1, 20)
        assert generate(s, "a", max_tokens=20, stop=("fg", "xyz")) == ("bcde", Finished("stop", 1, 6))
        assert generate(s, "a", max_tokens=1) == ("b", Finished("length", 1, 1))  # done at prefill
    finally:
        s.stop(10)


def test_text_stream_holds_back_partial_stop_strings_and_characters():
    class Utf8:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    t = TextStream(Utf8(), stop=("END",))
    assert t.push(list(b"ab")) == "ab"
    assert t.push(list(b"cE")) == "c"  # "E" may begin "END"
    assert t.push(list(b"Nx")) == "ENx"  # it did not
    assert t.push(list("é".encode())[:1]) == ""  # half a character waits for its other byte
    assert t.push(list("é".encode())[1:] + list(b"yEN")) == "éy"
    assert t.push(list(b"Dz")) == "" and t.stopped and t.flush() == ""
    t = TextStream(Utf8())
    assert t.push(list(b"q")) == "q" and t.push([0xE2]) == "" and t.flush() == "\ufffd"


def test_a_full_queue_is_refused_and_the_batch_runs_on():
    batch = FakeBatch(slots=2)
    s = run_scheduler(batch, max_queue=3)
    batch.gate.clear()  # decode dispatches wait: nothing finishes
    try:
        dones = []
        for i in range(5):  # 2 slots + 3 queued
            dones.append(threading.Event())
            s.submit(Params(prompt=[ord("a")], max_tokens=30, temperature=0.0), collect([], dones[-1]))
        with pytest.raises(QueueFull):
            s.submit(Params(prompt=[ord("a")], max_tokens=30), collect([], threading.Event()))
        batch.gate.set()
        assert all(d.wait(10) for d in dones)
        assert generate(s, "a", max_tokens=3) == ("bcd", Finished("length", 1, 3))
    finally:
        batch.gate.set()
        s.stop(10)


@pytest.mark.parametrize("mixed", [0, 2])
def test_faults_stay_with_their_request(mixed):
    batch = FakeBatch(slots=2, mixed=mixed)
    s = run_scheduler(batch)
    try:
        text, last = generate(s, "a!", max_tokens=3)  # fails in prefill, or joining
        assert text == "" and isinstance(last, Failed) and "breaks the fake device" in last.message
        assert generate(s, "a", max_tokens=3)[1] == Finished("length", 1, 3)

        def broken_sink(event):
            raise RuntimeError("the client's loop is gone")

        s.submit(Params(prompt=[ord("a")], max_tokens=30, temperature=0.0), broken_sink)
        assert generate(s, "k", max_tokens=4) == ("lmno", Finished("length", 1, 4))
        wait_until(lambda: s.occupancy()[0] == 0, 10, "the broken request's slot to be freed")

        batch.fail_next_decode = True  # a shared program fails: the batch's requests fail, the server goes on
        text, last = generate(s, "a", max_tokens=10)
        assert isinstance(last, Failed) and "fake device failed" in last.message
        assert generate(s, "a", max_tokens=3)[1] == Finished("length", 1, 3)
    finally:
        s.stop(10)


def test_a_long_prompt_enters_a_chunk_per_decode_dispatch():
    """A 10-token prompt with chunks of 4 is prefilled in 3 pieces while the running request keeps
    decoding between them; both requests get their full output."""
    batch = FakeBatch(slots=2, K=1, chunk=4, step_s=0.005)
    s = run_scheduler(batch)
    try:
        first = threading.Event()
        got = []
        s.submit(Params(prompt=[ord("a")], max_tokens=30, temperature=0.0), collect(got, first))
        wait_until(lambda: s.occupancy()[0] == 1, 10, "the first request to run")
        batch.calls.clear()
        assert generate(s, "abcdefghij", max_tokens=3)[1].completion_tokens == 3
        calls = batch.calls[: batch.calls.index("chunk") + 6]
        assert calls[calls.index("chunk"):] == ["chunk", "decode", "chunk", "decode", "chunk", "decode"]
        assert first.wait(10)
    finally:
        s.stop(10)


def test_short_prompts_join_decode_steps_in_turn_and_a_long_one_is_prefilled():
    """With mixed prefill (chunks of 2) and prefill_chunk 6: two prompts of 5 and 3 tokens that
    arrive together join the running request's decode steps, a chunk per step in arrival order
    (2 + 2 + 1 tokens, then 2 + 1): five steps, the first four in one dispatch of K = 4; a 7-token
    prompt is prefilled (admit) instead. All get their full output."""
    batch = FakeBatch(slots=3, K=4, chunk=6, mixed=2, step_s=0.005)
    s = run_scheduler(batch)
    try:
        first = threading.Event()
        s.submit(Params(prompt=[ord("#")], max_tokens=400, temperature=0.0), collect([], first))
        wait_until(lambda: s.occupancy()[0] == 1, 10, "the first request to run")
        batch.gate.clear()
        wait_until(lambda: batch.held, 10, "a dispatch to wait at the gate")
        results = []
        for prompt, n in (("abcde", 6), ("abc", 5)):
            done = threading.Event()
            results.append((done, []))
            s.submit(Params(prompt=FakeTokenizer().encode(prompt), max_tokens=n, temperature=0.0),
                     collect(results[-1][1], done))
        batch.calls.clear()
        batch.gate.set()
        for (done, events), n in zip(results, (6, 5)):
            assert done.wait(10) and events[-1].completion_tokens == n
        assert batch.calls[:8] == ["decode", "decode", "join", "join", "join", "join", "decode", "join"]
        batch.calls.clear()
        assert generate(s, "pqrstuv", max_tokens=3)[1].completion_tokens == 3  # (no free row holds any of it)
        assert "chunk" in batch.calls and "join" not in batch.calls
        assert first.wait(10)
    finally:
        s.stop(10)


def test_a_prompt_joins_the_free_row_holding_most_of_it_from_the_first_position_it_does_not_share():
    """Prefix reuse: a chat's next turn (the conversation so far and more) goes into the row that
    holds the earlier turn and runs only its new tokens; an unrelated prompt runs whole."""
    batch = FakeBatch(slots=2, K=4, mixed=2)
    s = run_scheduler(batch)
    try:
        finished = [generate(s, prompt, max_tokens=2)[1] for prompt in ("abcdef", "xy", "abcdefgh", "zzz")]
        assert [f.completion_tokens for f in finished] == [2] * 4  # one at a time: both slots free for each
        assert batch.starts == [f.cached_tokens for f in finished] == [0, 0, 6, 0]
        assert batch.prompts[0] == list(b"abcdefgh") or batch.prompts[1] == list(b"abcdefgh")
        assert s.metrics.registry.get_sample_value("dsv3_prompt_tokens_reused_total") == 6
    finally:
        s.stop(10)


def test_a_request_cancelled_while_it_joins_frees_its_slot():
    batch = FakeBatch(slots=1, K=4, mixed=1, step_s=0.002)
    s = run_scheduler(batch)
    try:
        req = s.submit(Params(prompt=[ord("a")] * 200, max_tokens=5, temperature=0.0), collect([], threading.Event()))
        wait_until(lambda: batch.calls.count("join") >= 2, 10, "the prompt to start joining")
        s.cancel(req)
        assert generate(s, "a", max_tokens=4)[1].completion_tokens == 4
        assert batch.calls.count("join") < 200 and batch.joining == []
    finally:
        s.stop(10)


def test_dispatches_run_k_steps_even_while_a_request_waits():
    batch = FakeBatch(slots=1, K=4)
    s = run_scheduler(batch)
    calls = []
    decode = batch.decode
    batch.decode = lambda n: calls.append(n) or decode(n)
    try:
        assert generate(s, "a", max_tokens=9)[1].completion_tokens == 9
        assert calls == [4, 4]  # 1 token from prefill, 8 from two dispatches of K = 4
        calls.clear()
        batch.gate.clear()
        first, second = [threading.Event() for _ in range(2)]
        s.submit(Params(prompt=[ord("a")], max_tokens=7, temperature=0.0), collect([], first))
        wait_until(lambda: s.occupancy()[0] == 1, 10, "the first request to take the slot")
        s.submit(Params(prompt=[ord("a")], max_tokens=3, temperature=0.0), collect([], second))
        batch.gate.set()
        assert first.wait(10) and second.wait(10)
        assert calls and set(calls) == {4}  # the waiting request joins after the dispatch in flight
    finally:
        batch.gate.set()
        s.stop(10)


def test_prompt_buckets_are_powers_of_two_up_to_the_context():
    assert prompt_buckets(64) == [16, 32, 64]
    assert prompt_buckets(100) == [16, 32, 64, 100]
    assert prompt_buckets(10) == [10]


# ---- the HTTP layer over the fake device -----------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_server():
    """The real app and scheduler, served by uvicorn on a thread, over a FakeBatch with a 32-token context."""
    import uvicorn

    batch = FakeBatch(slots=2, K=4, context=32, step_s=0.002)
    metrics = Metrics("fake")
    scheduler = Scheduler(lambda: (batch, FakeTokenizer()), max_queue=2, metrics=metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, metrics, "fake"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started and scheduler.ready.is_set(), 30, "the in-process server")
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", batch=batch, scheduler=scheduler)
    batch.gate.set()
    server.should_exit = True
    thread.join(30)


BAD_REQUESTS = [  # (endpoint, body, param named by the error, words of its message)
    ("completions", b"{not json", None, "not valid JSON"),
    ("completions", b"[1, 2]", None, "JSON object"),
    ("completions", {"prompt": "a"}, "model", "required"),
    ("completions", {"model": "fake"}, "prompt", "required"),
    ("chat/completions", {"model": "fake"}, "messages", "required"),
    ("completions", {"model": "gpt-4", "prompt": "a"}, "model", "does not exist"),
    ("completions", {"model": "fake", "prompt": "a" * 32}, "prompt", "context"),
    ("completions", {"model": "fake", "prompt": "abc", "max_tokens": 30}, "max_tokens", "context"),
    ("completions", {"model": "fake", "prompt": ""}, "prompt", "empty"),
    ("completions", {"model": "fake", "prompt": [1, 500]}, "prompt", "vocabulary"),
    ("completions", {"model": "fake", "prompt": ["a", "b"]}, "prompt", "one request each"),
    ("completions", {"model": "fake", "prompt": "a", "max_tokens": 0}, "max_tokens", "at least 1"),
    ("completions", {"model": "fake", "prompt": "a", "max_tokens": "8"}, "max_tokens", "integer"),
    ("completions", {"model": "fake", "prompt": "a", "temperature": -0.5}, "temperature", ">= 0"),
    ("completions", b'{"model": "fake", "prompt": "a", "temperature": NaN}', "temperature", "finite"),
    ("completions", b'{"model": "fake", "prompt": "a", "temperature": 1e999}', "temperature", "finite"),
    ("completions", {"model": "fake", "prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ("completions", {"model": "fake", "prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
    ("completions", {"model": "fake", "prompt": "a", "top_k": -2}, "top_k", ">= 0"),
    ("completions", {"model": "fake", "prompt": "a", "n": 2}, "n", "n = 1"),
    ("completions", {"model": "fake", "prompt": "a", "stop": [1]}, "stop", "strings"),
    ("completions", {"model": "fake", "prompt": "a", "logprobs": 3}, "logprobs", "not supported"),
    ("chat/completions", {"model": "fake", "messages": []}, "messages", "non-empty"),
    ("chat/completions", {"model": "fake", "messages": [{"content": "x"}]}, "messages[0]", "role"),
]


@pytest.mark.parametrize("endpoint,body,param,words", BAD_REQUESTS,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_400_in_the_api_error_shape(fake_server, endpoint, body, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{fake_server.url}/v1/{endpoint}", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_the_openai_client_sees_errors_as_its_exceptions(fake_server):
    c = client(fake_server.url)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        c.completions.create(model="other", prompt="a")
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="fake", input="a")
    assert c.completions.create(model="fake", prompt="a", max_tokens=3, temperature=0).choices[0].text == "bcd"


def test_a_full_queue_answers_429(fake_server):
    """2 slots + max_queue 2: with the device held, the fifth concurrent request is refused."""
    c, batch = client(fake_server.url), fake_server.batch
    batch.gate.clear()
    try:
        streams = [c.completions.create(model="fake", prompt="a", max_tokens=20, temperature=0, stream=True)
                   for _ in range(4)]
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="fake", prompt="a", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_exceeded"
    finally:
        batch.gate.set()
    texts = ["".join(ch.choices[0].text for ch in s) for s in streams]
    assert texts == ["bcdefghijklmnopqrstu"] * 4


def test_a_dropped_stream_frees_its_slot_at_once(fake_server):
    c, s, batch = client(fake_server.url), fake_server.scheduler, fake_server.batch
    before = s.metrics.finished.labels("abort")._value.get()
    batch.gate.clear()  # the request cannot finish by itself meanwhile
    try:
        stream = c.completions.create(model="fake", prompt="a", max_tokens=28, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()  # the client goes away mid-stream
        wait_until(lambda: any(r.cancelled for r in list(s._running.values())), 5, "the server to see it")
    finally:
        batch.gate.set()
    wait_until(lambda: s.occupancy() == (0, 2, 0), 5, "the slot to be freed")
    assert s.metrics.finished.labels("abort")._value.get() == before + 1
    out = c.completions.create(model="fake", prompt="k", max_tokens=4, temperature=0)
    assert out.choices[0].text == "lmno" and out.usage.completion_tokens == 4
    assert out.usage.prompt_tokens_details.cached_tokens == 0  # (this batch reuses no prefix)


def test_one_failing_request_does_not_disturb_the_others(fake_server):
    c = client(fake_server.url)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        ok = [pool.submit(c.completions.create, model="fake", prompt=p, max_tokens=6, temperature=0) for p in "ak"]
        with pytest.raises(openai.InternalServerError, match="breaks the fake device"):
            c.completions.create(model="fake", prompt="a!", max_tokens=6)
        assert [f.result().choices[0].text for f in ok] == ["bcdefg", "lmnopq"]
    fake_server.batch.fail_next_decode = True
    stream = c.completions.create(model="fake", prompt="a", max_tokens=6, stream=True)
    with pytest.raises(openai.APIError, match="fake device failed"):
        list(stream)
    assert c.completions.create(model="fake", prompt="a", max_tokens=2, temperature=0).choices[0].text == "bc"


def test_chat_and_streaming_chunks_follow_the_api(fake_server):
    c = client(fake_server.url)
    chunks = list(c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ";<="  # after ":"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(ch.usage is None for ch in chunks[:-1])
    prompt_tokens = len("user:Hi\nassistant:")
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.total_tokens == prompt_tokens + 3
    out = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": [{"type": "text",
                                    "text": "Hi"}]}], max_tokens=3, temperature=0)
    assert out.choices[0].message.content == ";<=" and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("flag", ["--slots", "--steps_per_dispatch", "--prefill_chunk"])
def test_a_count_flag_below_one_is_refused_by_name(flag, capsys):
    from dsv3_jax.serve.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "runs/x", flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert getattr(parse_args(["--checkpoint", "runs/x", flag, "3"]), flag[2:]) == 3
