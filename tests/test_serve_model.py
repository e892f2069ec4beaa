"""dsv3-serve on a real model: `serve.py` run as a subprocess on a tiny HF-format checkpoint with
MTP speculation, checked with the `openai` client: /health before and after compilation, greedy
output equal to `infer.py`'s, streaming equal to non-streaming, 32 concurrent streams of mixed
lengths, a dropped stream, bad requests, decode slots on an expert-parallel mesh, and SIGTERM
while a request is in flight (the last test: it ends that server). The fault cases that need a
deterministic device run over a fake one in tests/test_serve.py.
"""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import types

import httpx
import numpy as np
import openai
import pytest

from model_support import random_model
from serve_support import ROOT, client, free_port, wait_until


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


def decode_into(batch, got: dict[int, list[int]]):
    """One dispatch of K = 4 steps; each slot in `got` gets its new tokens appended -> the output."""
    out = batch.decode(4)
    for slot in got:
        got[slot] += out.emitted(slot)
    return out


def assert_row_as_prefilled(batch, slot: int, prompt: list[int], model, n_draft: int, n: int | None = None):
    """`slot`'s latent caches (main and MTP) over the prompt's first n positions (default all) equal
    what a whole-prompt prefill writes (bf16 caches: 2e-2) -> that prefill's first tokens and state."""
    import jax

    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    whole = DecodeBatch(model, slots=batch.slots, max_len=batch.max_len, n_draft=n_draft, steps_per_dispatch=4,
                        prefill_chunk=batch.max_len)
    first = whole.prefill(slot, prompt, 12, RowSettings())
    n = len(prompt) if n is None else n
    for got, at_once in zip(jax.tree.leaves(batch.state.cache), jax.tree.leaves(whole.state.cache)):
        np.testing.assert_allclose(np.asarray(got[:, slot, :n], np.float32),
                                   np.asarray(at_once[:, slot, :n], np.float32), atol=2e-2)
    return first


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
    """MTP speculation in a batch of 8 slots gives infer.py's plain greedy text (no speculation), also
    for a prompt that reuses the latents a freed row holds."""
    c = client(served.url)
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0)
    assert out.choices[0].text == served.infer_text
    assert out.usage.completion_tokens <= GREEDY_TOKENS
    assert (out.choices[0].finish_reason == "length") == (out.usage.completion_tokens == GREEDY_TOKENS)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == served.infer_text
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    # The same prompt again joined the row the first left (prefix reuse): it ran only the last
    # 1 + 2A positions (A = 1 MTP module), and its text is still infer.py's.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 3


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


@pytest.mark.parametrize("n_draft", [0, 1])
def test_a_prompt_prefilled_in_chunks_decodes_as_the_engine_does(n_draft):
    """A 150-token prompt entering a 180-slot row in chunks of 48 (starts 0, 48, 96, and 144 capped
    at T - 48 = 132: the last chunk overlaps the one before; cache prefixes 64, 128, 180, 180) in
    slot 1 holds the latent cache a whole-prompt prefill writes and gets Engine.generate's greedy
    tokens, with and without MTP drafts (whose caches are written chunk by chunk); after
    warmup, admitting it compiles nothing."""
    from dsv3_jax import preset
    from dsv3_jax.infer import Engine
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    cfg = preset("tiny", vocab_size=128, n_mtp_modules=1, max_seq_len=256, init_std=0.15)
    model = random_model(cfg, seed=4)
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 128, 150)]
    want = Engine(model).generate([prompt], max_new_tokens=8, speculative=n_draft).tokens[0]
    batch = DecodeBatch(model, slots=2, max_len=180, n_draft=n_draft, steps_per_dispatch=4, prefill_chunk=48)
    if n_draft == 0:  # (once: warmup takes a while)
        batch.warmup()
    compiled = batch.compiled_programs()
    admission, pauses = batch.admit(1, prompt, 8, RowSettings()), 0
    while True:
        try:
            next(admission)
            pauses += 1
        except StopIteration as done:
            got, active = done.value
            break
    assert pauses == 3 and len(want) == 8
    first = (list(got), active)
    while active:
        out = batch.decode(4)
        got += out.emitted(1)
        active = bool(out.active[1])
    assert got == want
    if n_draft == 0:
        assert batch.compiled_programs() == compiled  # warmup compiled every chunk's program
    assert assert_row_as_prefilled(batch, 1, prompt, model, n_draft, n=150) == first  # decoding wrote 150+


@pytest.mark.parametrize("mixed, n_draft", [(16, 0), (64, 0), (16, 1)])
def test_prompts_joining_decode_steps_decode_as_the_engine_does(mixed, n_draft):
    """Sarathi's mixed batch: while slot 0 decodes, a 40-token prompt joins slot 2 and a 20-token
    one slot 1 (just let go while its request was still decoding: that row stays quiet until the
    chunk takes it over), riding in decode steps as extra rows, a chunk per step in turn. In chunks of 16:
    positions 0-15, 16-31 and 32-38 of the first (its last token becomes the row's pending one),
    then 0-15 of the second in the dispatch's 4th step and 16-18 in the next dispatch; in chunks of
    64, one each (mostly pads). Every row gets Engine.generate's greedy tokens, with MTP drafts too
    (the chunks then also fill the MTP caches and the hidden-state ring); the joined rows hold the
    latent caches a whole-prompt prefill writes; after warmup, joining compiles nothing; the MTP
    drafts counted leave out a joined row's placeholders."""
    from dsv3_jax import preset
    from dsv3_jax.infer import Engine
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    cfg = preset("tiny", vocab_size=128, max_seq_len=256, init_std=0.15, n_mtp_modules=1)
    model = random_model(cfg, seed=5)
    rng = np.random.default_rng(5)
    prompts = {0: rng.integers(0, 128, 7), 2: rng.integers(0, 128, 40), 1: rng.integers(0, 128, 20)}
    prompts = {slot: [int(t) for t in p] for slot, p in prompts.items()}
    want = Engine(model).generate(list(prompts.values()), max_new_tokens=12, speculative=n_draft).tokens
    batch = DecodeBatch(model, slots=3, max_len=100, n_draft=n_draft, steps_per_dispatch=4, mixed=mixed)
    if (mixed, n_draft) == (16, 0):  # (once: warmup takes a while)
        batch.warmup()
    compiled = batch.compiled_programs()
    got = {0: batch.prefill(0, prompts[0], 12, RowSettings())[0], 2: [], 1: []}
    batch.prefill(1, prompts[2][:9], 50, RowSettings())

    decode_into(batch, got)
    batch.free(1)
    got[1] = []
    for slot in (2, 1):
        batch.join(slot, prompts[slot], 12, RowSettings())
    first = decode_into(batch, got)
    assert not first.count[: 4 if mixed == 16 else 1, 1].any()  # steps before slot 1's last chunk
    # A row's first verification (in its last chunk's step) checks placeholders, not MTP's drafts.
    drafted = n_draft * first.was_active
    drafted[(2, 2) if mixed == 16 else (0, 2)] = 0  # slot 2's last chunk
    if mixed == 64:
        drafted[1, 1] = 0  # slot 1's (with 16, in the next dispatch)
    np.testing.assert_array_equal(first.drafted, drafted)
    dispatches = 1
    while batch.joining:
        decode_into(batch, got)
        dispatches += 1
    assert dispatches == (2 if mixed == 16 else 1)
    while decode_into(batch, got).active.any():
        pass
    assert list(got.values()) == want
    if (mixed, n_draft) == (16, 0):
        assert batch.compiled_programs() == compiled
    for slot in (2, 1):
        assert_row_as_prefilled(batch, slot, prompts[slot], model, n_draft)


@pytest.mark.parametrize("n_draft", [0, 1])
def test_a_chats_next_turn_reuses_the_latents_its_row_holds_and_decodes_as_the_engine_does(n_draft):
    """Prefix reuse: a 30-token prompt decodes 12 tokens in slot 0 and leaves; the next turn (the
    prompt, 5 of its answer's tokens and 10 new ones) joins slot 0 from position 35 - A, the first
    whose latents (main and MTP) the row does not hold for it, in one chunk. It gets
    Engine.generate's tokens for the whole 45-token prompt, and the row then holds what a
    whole-prompt prefill writes; a prompt sharing nothing reuses nothing."""
    from dsv3_jax import preset
    from dsv3_jax.infer import Engine
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    cfg = preset("tiny", vocab_size=128, max_seq_len=256, init_std=0.15, n_mtp_modules=1)
    model = random_model(cfg, seed=5)
    rng = np.random.default_rng(6)
    first = [int(t) for t in rng.integers(1, 128, 30)]
    batch = DecodeBatch(model, slots=2, max_len=100, n_draft=n_draft, steps_per_dispatch=4, mixed=16)
    batch.join(0, first, 12, RowSettings())
    got = {0: []}
    while decode_into(batch, got).active.any() or batch.joining:
        pass
    batch.free(0)
    second = first + got[0][:5] + [int(t) for t in rng.integers(1, 128, 10)]
    assert batch.best_slot([1, 0], [0] + second) == (1, 0)  # (the least recently freed when none holds any)
    slot, start = batch.best_slot([1, 0], second)
    assert (slot, start) == (0, 35 - n_draft) and batch.held[0] == first + got[0]
    want = Engine(model).generate([second], max_new_tokens=12, speculative=n_draft).tokens[0]
    batch.join(0, second, 12, RowSettings(), start=start)
    got = {0: []}
    out = decode_into(batch, got)
    assert out.count[0, 0] > 0 and not batch.joining  # one chunk: its first token in the first step
    while out.active.any():
        out = decode_into(batch, got)
    assert got[0] == want
    assert_row_as_prefilled(batch, 0, second, model, n_draft)


@pytest.mark.parametrize("n_draft", [0, 1])
def test_a_prefix_pool_keeps_a_conversation_its_row_lost_and_restores_it_for_the_next_turn(n_draft):
    """One slot and a prefix pool of one row: conversation A's first turn decodes in the slot; an
    unrelated prompt B takes the slot (A's row is saved to the pool first); A's next turn is
    restored from the pool into the slot and joins from position 35 - A, giving Engine.generate's
    tokens and the latents a whole-prompt prefill writes (main and MTP caches)."""
    from dsv3_jax import preset
    from dsv3_jax.infer import Engine
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    cfg = preset("tiny", vocab_size=128, max_seq_len=256, init_std=0.15, n_mtp_modules=1)
    model = random_model(cfg, seed=5)
    rng = np.random.default_rng(6)
    a, b = ([int(t) for t in rng.integers(1, 128, n)] for n in (30, 20))
    answer_a = Engine(model).generate([a], max_new_tokens=12, speculative=n_draft).tokens[0]
    second = a + answer_a[:5] + [int(t) for t in rng.integers(1, 128, 10)]
    want = Engine(model).generate([second], max_new_tokens=12, speculative=n_draft).tokens[0]
    batch = DecodeBatch(model, slots=1, max_len=100, n_draft=n_draft, steps_per_dispatch=4, mixed=16, prefix_pool=1)
    batch.warmup()
    compiled = batch.compiled_programs()

    def run(prompt, start=0):
        batch.join(0, prompt, 12, RowSettings(), start=start)
        got = {0: []}
        while decode_into(batch, got).active.any() or batch.joining:
            pass
        batch.free(0)
        return got[0]

    assert run(a) == answer_a
    assert batch.best_slot([0], b) == (0, 0)
    run(b)
    assert batch.pool_held[0] == a + answer_a and batch.held[0][:20] == b
    assert batch.best_slot([0], second) == (0, 35 - n_draft)  # from the pool
    assert run(second, start=35 - n_draft) == want
    assert batch.pool_held[0] == a + answer_a  # (B's row was not kept: the pool's one row was restoring A)
    assert batch.compiled_programs() == compiled
    assert_row_as_prefilled(batch, 0, second, model, n_draft)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, prefill_mesh", [("1,1,8", None), ("1,1,4", "1,1,4")])
def test_decode_slots_on_an_expert_parallel_mesh_give_the_engines_tokens(hf_dir, mesh, prefill_mesh):
    """The batch on conftest's 8 fake devices, loaded as serve.py loads it (--mesh 1,1,8: experts
    over 8 devices, EP decoding inside the decode loop; or disaggregated, --prefill_mesh 1,1,4
    --mesh 1,1,4: prefill on devices 0-3, the row's cache handed to decode on 4-7): a request in
    slot 3 with MTP gets Engine.generate's greedy tokens on the decode mesh alone, and so does a
    second one admitted into slot 5 while slot 3 decodes (a disaggregated admission pauses for
    decode dispatches until its prefill is done)."""
    import argparse

    from dsv3_jax.infer import Engine
    from dsv3_jax.infer.main import load
    from dsv3_jax.serve.batch import DecodeBatch, RowSettings

    args = argparse.Namespace(hf_checkpoint=str(hf_dir), checkpoint=None, dtype=None, mesh=mesh, attn_impl=None,
                              keep_fp8=False, prefill_mesh=prefill_mesh)
    model, _, mesh, prefill_mesh = load(args)
    assert set(prefill_mesh.devices.flat).isdisjoint(mesh.devices.flat) == (args.prefill_mesh is not None)
    want = Engine(model, prefill_mesh=mesh, decode_mesh=mesh).generate(
        [[5, 6, 7], [9, 8, 7, 6, 5]], max_new_tokens=10, speculative=1).tokens
    batch = DecodeBatch(model, slots=8, max_len=CONTEXT + 1, n_draft=1, steps_per_dispatch=4, mesh=mesh,
                        prefill_mesh=prefill_mesh)
    got = {3: batch.prefill(3, [5, 6, 7], 10, RowSettings())[0]}

    decode_into(batch, got)
    admission = batch.admit(5, [9, 8, 7, 6, 5], 10, RowSettings())
    while True:
        try:
            next(admission)
        except StopIteration as done:
            got[5] = done.value[0]
            break
        decode_into(batch, got)
    while decode_into(batch, got).active[[3, 5]].any():
        pass
    assert [got[3], got[5]] == want


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
