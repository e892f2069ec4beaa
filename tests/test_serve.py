"""dsv3-serve: the OpenAI API over continuous batching, checked with the `openai` client.

Two servers. Most fault cases (a full queue, dropped streams, a request that fails, a device
error, every bad request) run against the real FastAPI app and scheduler in this process over a
fake device (`FakeBatch`, no JAX): the fake can hold its decode step at a gate, which makes
"the queue is full now" and "the slot is busy now" deterministic. The model itself is checked
against `serve.py` run as a subprocess on a tiny HF-format checkpoint with MTP speculation:
/health before and after compilation, greedy output equal to `infer.py`'s, streaming equal to
non-streaming, 32 concurrent streams of mixed lengths, a dropped stream, and SIGTERM while a
request is in flight (the last test: it ends that server).
"""
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest

from dsv3_jax.serve.batch import prompt_buckets
from dsv3_jax.serve.metrics import Metrics
from dsv3_jax.serve.scheduler import Delta, Failed, Finished, Params, QueueFull, Scheduler
from dsv3_jax.serve.server import create_app
from dsv3_jax.serve.text import TextStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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
    dispatch; `gate` holds decode dispatches until set."""

    def __init__(self, slots=2, K=4, context=4096, step_s=0.0):
        self.slots, self.K, self.n_draft, self.context, self.step_s = slots, K, 0, context, step_s
        self.cfg = types.SimpleNamespace(vocab_size=128)
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next_decode = False
        self.last, self.left = np.zeros(slots, int), np.zeros(slots, int)
        self.active, self.eos = np.zeros(slots, bool), np.zeros(slots, int)

    def warmup(self):
        pass

    def compiled_programs(self):
        return 0

    def state_lost(self):
        return False

    def reset(self):
        self.active[:] = False

    def free(self, slot):
        self.active[slot] = False

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

    def decode(self, n):
        assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.step_s)
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("the fake device failed")
        tokens, count = np.zeros((self.K, self.slots, 1), int), np.zeros((self.K, self.slots), int)
        was = np.zeros((self.K, self.slots), bool)
        steps = 0
        while steps < min(n, self.K) and self.active.any():
            for r in np.flatnonzero(self.active):
                was[steps, r], count[steps, r] = True, 1
                tokens[steps, r, 0] = self._emit(r, self.last[r])
            steps += 1
        return types.SimpleNamespace(tokens=tokens, count=count, accepted=np.zeros_like(count), was_active=was,
                                     steps=steps, active=self.active.copy(), remaining=self.left.copy())


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


def test_faults_stay_with_their_request():
    batch = FakeBatch(slots=2)
    s = run_scheduler(batch)
    try:
        text, last = generate(s, "a!", max_tokens=3)  # fails in prefill
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


def test_steps_per_dispatch_shrink_while_a_request_waits():
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
        assert 4 in calls and min(calls) < 4  # dispatches end where the first request can finish
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


def client(url: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


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


# ---- the real server ---------------------------------------------------------------------------------------
def random_model(cfg, seed=0):
    """Parameters drawn with numpy (norms 1, gate bias 0): init through jax.random compiles a
    program per shape. A large init_std spreads the logits, so greedy choices are not near-ties."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax import Transformer

    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if len(path) > 1 and "norm" in str(path[-2]):
            value = np.ones(shape)
        elif path[-1] == "bias":
            value = np.zeros(shape)
        else:
            value = cfg.init_std * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, state)


CONTEXT = 64
PROMPT = "Once upon a time"
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF-format checkpoint with one MTP module, a trained byte-level BPE and a chat template."""
    from dsv3_jax import preset
    from dsv3_jax.hf import save_pretrained
    from dsv3_jax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf") / "tiny"
    tok = train_tokenizer(vocab_size=320, out_dir=root, corpus_max_bytes=200_000)
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_mtp_modules=1, max_seq_len=CONTEXT, init_std=0.15)
    save_pretrained(random_model(cfg), str(root))
    (root / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return root


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def served(hf_dir, tmp_path_factory):
    """serve.py with MTP on a free port, and infer.py's greedy text for PROMPT, started together."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "serve.py", "--hf_checkpoint", str(hf_dir), "--port", str(port),
                             "--speculative", "mtp", "--slots", "8", "--max_queue", "24"],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    infer = subprocess.Popen([sys.executable, "infer.py", "--hf_checkpoint", str(hf_dir), "--prompt", PROMPT,
                              "--max_new_tokens", str(GREEDY_TOKENS), "--temperature", "0"],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, seen = f"http://127.0.0.1:{port}", []

    def healthy():
        assert proc.poll() is None, _tail(log)
        try:
            seen.append(httpx.get(url + "/health", timeout=5).status_code)
        except httpx.TransportError:
            return False
        return seen[-1] == 200

    try:
        wait_until(healthy, 300, "serve.py's /health")
        out, err = infer.communicate(timeout=300)
        assert infer.returncode == 0, err
        yield types.SimpleNamespace(url=url, proc=proc, log=log, health_seen=seen, infer_text=out[:-1])
    finally:
        for p in (proc, infer):
            if p.poll() is None:
                p.kill()
                p.wait(30)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_health_is_503_until_compiled_then_200_with_models_and_metrics(served):
    assert 503 in served.health_seen and served.health_seen[-1] == 200
    assert served.health_seen.index(200) > served.health_seen.index(503)
    models = client(served.url).models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["max_model_len"] == CONTEXT
    text = httpx.get(served.url + "/metrics", timeout=10).text
    for name in ("dsv3_http_requests_total", "dsv3_prompt_tokens_total", "dsv3_generation_tokens_total",
                 "dsv3_queue_length", "dsv3_slots_busy", "dsv3_slot_occupancy",
                 "dsv3_time_to_first_token_seconds_bucket", "dsv3_time_per_output_token_seconds_bucket",
                 "dsv3_mtp_acceptance_rate", "dsv3_mtp_draft_tokens_total", "dsv3_compiled_programs"):
        assert re.search(rf"^{name}", text, re.M), name
    assert metric(served.url, "dsv3_slots") == 8


def test_greedy_output_equals_infer_py_streaming_or_not(served):
    """MTP speculation in a batch of 8 slots gives infer.py's plain greedy text (no speculation)."""
    c = client(served.url)
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0)
    assert out.choices[0].text == served.infer_text
    assert out.usage.completion_tokens <= GREEDY_TOKENS
    assert (out.choices[0].finish_reason == "length") == (out.usage.completion_tokens == GREEDY_TOKENS)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == served.infer_text
    assert chunks[-1].usage == out.usage


def test_seeded_sampling_and_chat_repeat_exactly(served):
    c = client(served.url)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
              temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 50, "ignore_eos": True})
    a = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == a.choices[0].message.content
    assert a.usage.completion_tokens == 12 and a.choices[0].finish_reason == "length"
    other = c.chat.completions.create(**{**kw, "seed": 8})
    greedy = c.chat.completions.create(**{**kw, "temperature": 0})
    assert len({a.choices[0].message.content, other.choices[0].message.content,
                greedy.choices[0].message.content}) == 3


@pytest.mark.slow
def test_32_concurrent_streams_of_mixed_lengths_finish_with_their_token_counts(served):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while seven dogs ran far away".split()
    jobs = []
    for i in range(32):
        prompt = " ".join(rng.choice(words, int(rng.integers(1, 13))))
        jobs.append(dict(prompt=prompt, max_tokens=int(rng.integers(1, 30)), temperature=0.0 if i % 2 else 0.8,
                         seed=i))
    compiled = metric(served.url, "dsv3_compiled_programs")
    c = client(served.url, timeout=120)

    def run(job):
        chunks = list(c.completions.create(model="tiny", stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}, **job))
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage, \
            [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    assert time.monotonic() - t0 < 120
    for job, (text, usage, reason) in zip(jobs, results):
        assert usage.completion_tokens == job["max_tokens"] and reason == "length", (job, usage)
    # greedy rows of the crowd equal the same request alone; nothing compiled while serving
    for job, (text, _, _) in list(zip(jobs, results))[1:8:2]:
        alone = c.completions.create(model="tiny", extra_body={"ignore_eos": True}, **job)
        assert alone.choices[0].text == text
    assert metric(served.url, "dsv3_compiled_programs") == compiled


def test_a_dropped_stream_then_a_normal_request(served):
    c = client(served.url)
    stream = c.completions.create(model="tiny", prompt="a", max_tokens=CONTEXT - 8, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_until(lambda: metric(served.url, "dsv3_slots_busy") == 0, 10, "the dropped stream's slot to be freed")
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0)
    assert out.choices[0].text == served.infer_text


def test_bad_requests_leave_the_server_healthy(served):
    c = client(served.url)
    for kw, match in [(dict(prompt="the cat sat " * 40), "context"), (dict(prompt="a", temperature=-1), ">= 0"),
                      (dict(prompt="a", top_p=0.0), r"\(0, 1\]"), (dict(prompt="a", max_tokens=0), "at least 1")]:
        with pytest.raises(openai.BadRequestError, match=match):
            c.completions.create(model="tiny", **kw)
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_decode_slots_on_an_expert_parallel_mesh_give_the_engines_tokens(hf_dir):
    """The batch on conftest's 8 fake devices, loaded as serve.py loads it (--mesh 1,1,8: experts
    over 8 devices, EP decoding inside the decode loop): a request in slot 3 with MTP gets
    Engine.generate's greedy tokens on the same mesh."""
    import argparse

    import jax

    from dsv3_jax.infer import Engine
    from dsv3_jax.infer.main import load
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    args = argparse.Namespace(hf_checkpoint=str(hf_dir), checkpoint=None, dtype=None, mesh="1,1,8", attn_impl=None,
                              keep_fp8=False)
    model, _, mesh = load(args)
    with jax.set_mesh(mesh):
        want = Engine(model, prefill_mesh=mesh, decode_mesh=mesh).generate([[5, 6, 7]], max_new_tokens=10,
                                                                           speculative=1).tokens[0]
        batch = DecodeBatch(model, slots=8, max_len=CONTEXT + 1, n_draft=1, steps_per_dispatch=4, mesh=mesh)
        got, active = batch.prefill(3, [5, 6, 7], 10, RowSettings())
        while active:
            out = batch.decode(4)
            got += [t for s in range(int(out.steps)) for t in out.tokens[s, 3, : out.count[s, 3]].tolist()]
            active = bool(out.active[3])
    assert got == want


def test_sigterm_finishes_the_request_in_flight_and_exits_0(served):
    """Last: this ends the module's server."""
    c = client(served.url, timeout=120)
    stream = c.completions.create(model="tiny", prompt="a", max_tokens=CONTEXT - 8, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    served.proc.send_signal(signal.SIGTERM)
    rest = list(it)
    assert rest[-1].usage.completion_tokens == CONTEXT - 8
    assert served.proc.wait(60) == 0, _tail(served.log)
    with pytest.raises(httpx.TransportError):
        httpx.get(served.url + "/health", timeout=5)
