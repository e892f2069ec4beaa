"""Inference: absorbed MLA over the latent cache, prefill + decode against the teacher-forced forward,
batching, MTP speculation (greedy identity, sampling distribution), disaggregation, sampling, CLI."""
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from dsv3_jax import Transformer, preset
from dsv3_jax.cache import LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.infer import Engine, SamplingConfig, bytes_per_token, formula_bytes_per_token, init_cache
from dsv3_jax.infer import programs, speculative
from dsv3_jax.infer.sampling import TARGET, filter_logits, probabilities, sample, token_keys
from dsv3_jax.sharding import make_mesh
from model_support import random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# init_std 0.15 makes the blocks matter enough that MTP drafts are often, not always, right.
CFG = preset("tiny", n_mtp_modules=2, vocab_size=128, init_std=0.15)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 40, 4, 41, 4, 42, 4, 43, 4, 44, 4, 45]]
NEW = 12


def drafty_model(cfg: ModelConfig, head_scale: float = 1.0, seed: int = 0) -> Transformer:
    """A random model whose MTP modules are decent drafters: unit-scale embeddings, a head whose
    row for token perm[t] is t's embedding (so "next = perm[current]" plus what the blocks add),
    and eh_proj passing the embedding half through, so MTP-k guesses perm applied to token i+k."""
    model = random_model(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    D, V = cfg.dim, cfg.vocab_size
    emb = rng.standard_normal((V, D))
    head = np.zeros((V, D))
    head[rng.permutation(V)] = emb
    model.embed.weight[...] = jnp.asarray(emb, model.embed.weight.dtype)
    model.head[...] = jnp.asarray(head_scale * head, model.head.dtype)
    pass_embedding = np.concatenate([np.eye(D), np.zeros((D, D))], axis=1)
    for m in model.mtp:
        m.eh_proj.weight[...] = jnp.asarray(pass_embedding, m.eh_proj.weight.dtype)
    return model


@pytest.fixture(scope="module")
def model():
    return drafty_model(CFG)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def greedy(engine):
    return engine.generate(PROMPTS, max_new_tokens=NEW)


forward = nnx.jit(lambda m, t: m.forward(t))
cached = nnx.jit(lambda m, cache, t, p, form="absorbed": m.forward_cached(t, p, cache, form=form),
                 static_argnames="form")
project = nnx.jit(lambda m, h: m.logits(h))
mtp_project = nnx.jit(lambda m, k, h: m.logits(h, m.mtp[k].norm), static_argnums=1)
trunk_norm = nnx.jit(lambda m, t, p: m.norm(m.trunk(m.embed(t), m.context(p))[0]))


@nnx.jit(static_argnums=1)
def cached_mtp(m, k, h_prev, nxt, pos, cache):
    """MTP module k (0-based) over positions pos with its own one-layer latent cache (absorbed)."""
    h, _, cache = m.mtp[k](h_prev, m.embed(nxt), m.context(pos, kv_len=cache.c_kv.shape[2]), cache, form="absorbed")
    return h, cache


# ---- the cache -----------------------------------------------------------------------------------
def test_cache_bytes_per_token_follow_the_mla_formula():
    cache = init_cache(CFG, 2, 32, jnp.bfloat16, n_mtp=1)
    assert bytes_per_token(cache) == (16 + 8) * 3 * 2 == formula_bytes_per_token(CFG) == CFG.kv_cache_bytes_per_token
    assert bytes_per_token(cache, include_mtp=True) == (16 + 8) * 4 * 2
    assert bytes_per_token(init_cache(CFG, 2, 32, jnp.float32)) == 2 * 144
    v3 = preset("v3_671b")
    abstract = jax.eval_shape(lambda: init_cache(v3, 1, 4096, jnp.bfloat16, n_mtp=1))
    assert bytes_per_token(abstract) == formula_bytes_per_token(v3) == 70_272  # ISCA '25 Table 1
    assert bytes_per_token(abstract, include_mtp=True) == 70_272 + 576 * 2
    assert [c.c_kv.shape for c in abstract.layers] == [(3, 1, 4096, 512), (58, 1, 4096, 512)]
    assert [c.k_pe.shape for c in abstract.layers] == [(3, 1, 4096, 64), (58, 1, 4096, 64)]


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_v3_671b_prefill_and_speculative_step_trace_without_memory(fp8_weights):
    """jax.eval_shape of the programs at full size (FP8-stored weights: wkv_b is dequantized for
    absorption), with the 61-layer latent cache of 3 dense + 58 MoE layers and one MTP module."""
    cfg = preset("v3_671b", fp8_weights=fp8_weights)
    model_def, params = programs.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    s = SamplingConfig(temperature=0.7, top_p=0.9)
    state = jax.eval_shape(lambda: programs.empty_state(cfg, 2, 4096, n_draft=1, cache_dtype=jnp.bfloat16,
                                                       hidden_dtype=jnp.bfloat16))
    new, out = jax.eval_shape(lambda p, st: programs.step(model_def, p, st, jax.random.key(0), jnp.int32(1),
                                                          n_draft=1, sampling=s.rows(2)), params, state)
    assert out.tokens.shape == (2, 2) and new.draft_probs.shape == (2, 1, cfg.vocab_size)
    assert [c.c_kv.shape for c in new.cache.layers] == [(3, 2, 4096, 512), (58, 2, 4096, 512)]
    assert new.cache.mtp[0].k_pe.shape == (1, 2, 4096, 64) and new.cache.mtp[0].k_pe.dtype == jnp.bfloat16
    rows, first = jax.eval_shape(
        lambda p: programs.prefill(model_def, p, jnp.zeros((2, 64), jnp.int32), jnp.array([3, 64]), jnp.arange(2),
                                   jnp.array([5, 5]), jax.random.key(0), jnp.int32(1), n_draft=1, sampling=s.rows(2),
                                   cache_dtype=jnp.dtype(jnp.bfloat16)), params)
    assert rows.cache.layers[1].c_kv.shape == (58, 2, 64, 512) and first.tokens.shape == (2, 1)


# ---- prefill + decode == teacher forcing ------------------------------------------------------------
@pytest.mark.parametrize("form, unstacked", [("expanded", True), ("absorbed", False)])  # the engine: expanded prefill, unstacked
def test_prefill_then_decode_steps_equal_the_teacher_forced_forward(model, form, unstacked):
    """Right-padded prefill of prompts of lengths 5 and 8 (expanded attention as the engine does,
    or absorbed), then 4 absorbed single-token steps, each fed the true next token: every logit
    equals the full forward's (float32, 1e-4), with the layers scanned or unstacked as the
    engine runs them."""
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, CFG.vocab_size)
    want = np.asarray(forward(model, tokens).logits)
    model = model.unstacked() if unstacked else model
    lengths = np.array([5, 8])
    prompt = jnp.where(jnp.arange(8) < lengths[:, None], tokens[:, :8], 0)  # right padding
    cache = init_cache(CFG, 2, 16, jnp.float32)
    h, cache = cached(model, cache, prompt, jnp.broadcast_to(jnp.arange(8), (2, 8)), form=form)
    logits = np.asarray(project(model, h))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], want[b, :n], rtol=1e-4, atol=1e-4)
    rows = np.arange(2)
    for k in range(4):
        pos = lengths + k
        h, cache = cached(model, cache, tokens[rows, pos][:, None], jnp.asarray(pos)[:, None])
        np.testing.assert_allclose(project(model, h)[:, 0], want[rows, pos], rtol=1e-4, atol=1e-4)


def test_cached_mtp_modules_equal_the_training_forward(model):
    """MTP depth 1 and 2 over a whole window, then depth 1 one position at a time, against the
    training forward's mtp_logits."""
    S = 12
    tokens = jax.random.randint(jax.random.key(6), (2, S), 0, CFG.vocab_size)
    out = forward(model, tokens)
    pos = jnp.broadcast_to(jnp.arange(S), (2, S))
    hn = trunk_norm(model, tokens, pos)

    def empty():
        return LatentCache(jnp.zeros((1, 2, 16, CFG.kv_lora_rank)), jnp.zeros((1, 2, 16, CFG.qk_rope_head_dim)))

    prev = hn
    for k in range(2):
        nxt = jnp.concatenate([tokens[:, k + 1:], jnp.zeros((2, k + 1), tokens.dtype)], axis=1)
        prev, _ = cached_mtp(model, k, prev, nxt, pos, empty())
        got = mtp_project(model, k, prev)
        np.testing.assert_allclose(got[:, : S - k - 1], out.mtp_logits[k][:, : S - k - 1], rtol=1e-4, atol=1e-4)
    cache = empty()
    for p in range(S - 1):
        h1, cache = cached_mtp(model, 0, hn[:, p:p + 1], tokens[:, p + 1:p + 2], pos[:, p:p + 1], cache)
        np.testing.assert_allclose(mtp_project(model, 0, h1)[:, 0], out.mtp_logits[0][:, p], rtol=1e-4, atol=1e-4)


# ---- generation --------------------------------------------------------------------------------------
def test_greedy_generation_equals_argmax_of_the_full_forward(model, greedy):
    width = max(map(len, PROMPTS)) + NEW
    for prompt, got in zip(PROMPTS, greedy.tokens):
        seq = list(prompt)
        for _ in range(NEW):
            padded = jnp.asarray([seq + [0] * (width - len(seq))])
            seq.append(int(jnp.argmax(forward(model, padded).logits[0, len(seq) - 1])))
        assert got == seq[len(prompt):]
    assert greedy.stats.generated_tokens == NEW * len(PROMPTS)


@pytest.mark.parametrize("speculative", [0, 2])
def test_steps_attend_a_growing_cache_prefix_and_equal_the_full_forward(model, engine, speculative):
    """A 40-token prompt and 40 greedy tokens in a 256-slot cache: the steps attend the first 64,
    then 128 slots (`programs.kv_len_for`), crossing the bucket mid-generation, and every token is
    the full forward's argmax; so with MTP drafts, whose cache writes run ahead of the length."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, CFG.vocab_size, 40)]
    got = engine.generate([prompt], max_new_tokens=40, max_len=256, speculative=speculative).tokens[0]
    seq = list(prompt)
    for _ in range(40):
        seq.append(int(jnp.argmax(forward(model, jnp.asarray([seq + [0] * (80 - len(seq))])).logits[0, len(seq) - 1])))
    assert got == seq[len(prompt):]
    assert programs.kv_len_for(40 + 3, 256) == 64 and programs.kv_len_for(80 + 3, 256) == 128


def test_a_batch_of_different_lengths_equals_each_prompt_alone(engine, greedy):
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], max_new_tokens=NEW, batch_size=3)  # same programs, two empty rows
        assert alone.tokens[0] == greedy.tokens[i]


def test_eos_stops_each_sequence_on_its_own(engine, greedy):
    eos = greedy.tokens[1][4]
    got = engine.generate(PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for want, toks in zip(greedy.tokens, got.tokens):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert toks == want[:cut]
    assert got.tokens[1][-1] == eos and len(got.tokens[1]) == 5


@pytest.mark.parametrize("n_draft", [1, 2])
def test_speculative_greedy_output_is_plain_greedy(engine, greedy, n_draft):
    spec = engine.generate(PROMPTS, max_new_tokens=NEW, speculative=n_draft)
    assert spec.tokens == greedy.tokens
    s = spec.stats
    # both branches ran: some drafts were accepted, some rejected
    assert 0.1 < s.acceptance_rate < 0.95, s
    assert 1.0 < s.tokens_per_step <= n_draft + 1
    assert s.steps < greedy.stats.steps


def test_speculative_sampling_keeps_the_output_distribution():
    """Chi-square test of 10,000 three-token continuations (vocab 8: 512 outcomes, cells with
    expected count < 5 pooled) against the exact distribution from teacher forcing, at p > 0.001.
    With an acceptance rate below 0.9, drafts differ from the target by TV >= 0.1 per token, so a
    sampler that emitted drafts unchecked would be rejected with overwhelming significance."""
    V, N = 8, 10_000
    cfg = preset("tiny", vocab_size=V, n_mtp_modules=2, init_std=0.16, n_dense_layers=3, n_routed_experts=0)
    model = drafty_model(cfg, head_scale=0.1)
    s = SamplingConfig(temperature=1.0)
    prompt = [3, 1, 4, 1]
    L = len(prompt)
    conts = np.array(list(itertools.product(range(V), repeat=3)), np.int32)
    logits = forward(model, jnp.asarray(np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1))).logits
    p = np.asarray(probabilities(logits, s.rows(len(conts))))
    r = np.arange(len(conts))
    exact = p[r, L - 1, conts[:, 0]] * p[r, L, conts[:, 1]] * p[r, L + 1, conts[:, 2]]
    out = Engine(model, cache_dtype=jnp.float32).generate([prompt] * N, max_new_tokens=3, sampling=s, seed=1,
                                                          speculative=2, max_len=16)
    assert 0.2 < out.stats.acceptance_rate < 0.9, out.stats
    toks = np.array(out.tokens)
    counts = np.bincount(toks[:, 0] * V * V + toks[:, 1] * V + toks[:, 2], minlength=V ** 3)
    expected = exact * N
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert stats.chi2.sf(chi2, len(obs) - 1) > 1e-3, (chi2, len(obs) - 1)


def test_disaggregated_prefill_and_decode_equal_the_single_program(model):
    """Prefill on devices 0-3 (data-parallel, batch 4), decode on devices 4-7 (experts over
    `expert`, batch 8), the latent cache handed over with device_put."""
    devices = jax.devices()
    prompts = [PROMPTS[i % 3][: 2 + i] for i in range(8)]
    single = Engine(model, cache_dtype=jnp.float32).generate(prompts, max_new_tokens=6, prefill_batch_size=4)
    disagg = Engine(model, cache_dtype=jnp.float32, prefill_mesh=make_mesh(4, 1, 1, devices[:4]),
                    decode_mesh=make_mesh(1, 1, 4, devices[4:]))
    def w1(params):  # the first MoE layer's (the engine runs the layers unstacked)
        return jax.tree.unflatten(disagg.model_def.treedef, params)["moe_layers"]["blocks"][0]["ffn"]["experts"]["w1"]

    w = w1(disagg.decode_params)[...]
    assert w.sharding.spec[0] == "expert" and set(w.sharding.device_set) == set(devices[4:])
    w = w1(disagg.prefill_params)[...]
    assert w.sharding.is_fully_replicated and set(w.sharding.device_set) == set(devices[:4])
    got = disagg.generate(prompts, max_new_tokens=6, batch_size=8, prefill_batch_size=4)
    assert got.tokens == single.tokens


# ---- sampling ----------------------------------------------------------------------------------------
def _allowed(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    """The tokens top-k / top-p may emit, computed independently with numpy."""
    z = logits / s.temperature
    order = np.argsort(-z, axis=-1)
    ok = np.zeros_like(z, bool)
    for row in range(z.shape[0]):
        cand = order[row][: s.top_k] if s.top_k else order[row]
        pr = np.exp(z[row, cand] - z[row, cand].max())
        pr /= pr.sum()
        before = np.cumsum(pr) - pr
        ok[row, cand[before < s.top_p]] = True
    return ok


@pytest.mark.parametrize("s", [SamplingConfig(1.0, top_k=5), SamplingConfig(0.7, top_p=0.6),
                               SamplingConfig(1.3, top_k=10, top_p=0.8)])
def test_top_k_top_p_emit_only_allowed_tokens_and_seeds_reproduce(s):
    logits = 3 * jax.random.normal(jax.random.key(0), (16, 64))
    ok = _allowed(np.asarray(logits), s)
    draw = jax.jit(jax.vmap(lambda k: sample(logits, jax.random.split(k, 16), s.rows(16))))
    keys = jax.random.split(jax.random.key(1), 500)
    got = np.asarray(draw(keys))  # [500, 16]
    assert ok[np.arange(16), got].all()
    assert all(len(set(got[:, r])) > 1 for r in range(16) if ok[r].sum() > 1)  # really random
    np.testing.assert_array_equal(draw(keys), got)
    assert np.isneginf(filter_logits(logits, s.rows(16))[~ok]).all()


def test_each_row_samples_as_it_would_alone():
    """Rows with different settings in one call (greedy, top-k, top-p, both, neither) draw exactly
    what each draws alone with its own SamplingConfig and the same keys: the distribution, a plain
    draw, and speculative verification (greedy rows by exact match, the others by rejection)."""
    configs = [SamplingConfig(0.0), SamplingConfig(0.7, top_k=5), SamplingConfig(1.3, top_p=0.8),
               SamplingConfig(1.0, top_k=10, top_p=0.5), SamplingConfig(0.9)]
    rs = SamplingConfig().rows(len(configs))
    for i, c in enumerate(configs):
        rs.set_row(i, c)
    rng = np.random.default_rng(0)
    B, A, V = len(configs), 2, 50
    logits = jnp.asarray(2 * rng.standard_normal((B, A + 1, V)), jnp.float32)
    drafts = jnp.asarray(rng.integers(0, V, (B, A)), jnp.int32)
    q = jax.nn.softmax(jnp.asarray(rng.standard_normal((B, A, V)), jnp.float32))
    key, seq, length = jax.random.key(3), jnp.arange(B, dtype=jnp.int32), jnp.int32([5, 6, 7, 8, 9])
    keys = token_keys(key, seq, length, TARGET)
    probs, drawn = probabilities(logits, rs), sample(logits[:, 0], keys, rs)
    accepted, tokens = speculative.verify(logits, drafts, q, length, seq, key, rs)
    for i, c in enumerate(configs):
        one = slice(i, i + 1)
        np.testing.assert_array_equal(probs[i], probabilities(logits[one], c.rows(1))[0])
        assert drawn[i] == sample(logits[one, 0], keys[one], c.rows(1))[0]
        a, t = speculative.verify(logits[one], drafts[one], q[one], length[one], seq[one], key, c.rows(1))
        assert accepted[i] == a[0] and (tokens[i] == t[0]).all()
    assert (probs[0] == jax.nn.one_hot(jnp.argmax(logits[0], -1), V)).all()  # greedy: the argmax


def test_generation_with_a_seed_is_reproducible_and_settings_compile_nothing(engine):
    s = SamplingConfig(temperature=1.0, top_k=20)
    a = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=s, seed=5)
    b = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=s, seed=5)
    c = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=s, seed=6)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    # The settings are arrays fed to the programs, not part of them: another one reuses them.
    compiled = programs.prefill._cache_size(), programs.decode._cache_size()
    engine.generate(PROMPTS, max_new_tokens=NEW, sampling=SamplingConfig(0.6, top_p=0.9), seed=5)
    assert (programs.prefill._cache_size(), programs.decode._cache_size()) == compiled


@pytest.mark.parametrize("speculative", [0, 2])
def test_steps_per_dispatch_changes_nothing_but_the_dispatches(engine, speculative):
    """K steps per dispatch run on the device in one loop: the same tokens, EOS and budgets ending
    rows inside a dispatch, the same steps counted."""
    s = SamplingConfig(temperature=1.0, top_k=20)
    eos = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=s, seed=3, steps_per_dispatch=1).tokens[2][6]
    runs = {K: engine.generate(PROMPTS, max_new_tokens=NEW, sampling=s, seed=3, eos_id=eos,
                               speculative=speculative, steps_per_dispatch=K) for K in (1, 3, 8)}
    one = runs[1]
    assert one.tokens[2][-1] == eos and len(one.tokens[2]) < NEW  # a row ended early by EOS
    assert any(len(t) == NEW for t in one.tokens)  # and one by its budget
    for K, run in runs.items():
        assert run.tokens == one.tokens, K
        assert (run.stats.steps, run.stats.sequence_steps, run.stats.accepted) == \
            (one.stats.steps, one.stats.sequence_steps, one.stats.accepted), K
        assert len(run.stats.step_s) == run.stats.steps
    with pytest.raises(ConfigError, match="steps_per_dispatch=0"):
        engine.generate(PROMPTS, steps_per_dispatch=0)


# ---- the CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF-format checkpoint with a trained byte-level BPE, and a second whose model
    vocabulary is smaller than its tokenizer's."""
    from dsv3_jax.hf import save_pretrained
    from dsv3_jax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer(vocab_size=320, out_dir=root / "ok", corpus_max_bytes=200_000)
    for name, vocab in (("ok", tok.vocab_size), ("small_vocab", 260)):
        cfg = preset("tiny", vocab_size=vocab, n_mtp_modules=1, max_seq_len=64)
        save_pretrained(random_model(cfg.replace(init_std=0.02)), str(root / name))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (root / name / f).write_bytes((root / "ok" / f).read_bytes())
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "malformed").mkdir()
    (root / "malformed" / "config.json").write_text("{not json")
    return root


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("case,match", [
    ("nan_temperature", "temperature=nan: expected a finite value"),
    ("inf_temperature", "temperature=inf: expected a finite value"),
    ("top_p", r"top_p=1.5: expected in \(0, 1\]"),
    ("batch", "--batch_size -2"),
    ("steps_per_dispatch", "--steps_per_dispatch 0: expected >= 1"),
    ("not_utf8", "not UTF-8"),
    ("empty", "empty prompt"),
    ("too_long", "context"),
    ("missing", "not a checkpoint directory"),
    ("malformed", "malformed|Expecting"),
    ("vocab", "outside the model's vocabulary"),
    ("prefill_mesh", "4 devices leave none of the 4 to decode"),
])
def test_cli_bad_input_exits_with_a_message(hf_dir, case, match):
    ok = str(hf_dir / "ok")
    args = {
        "nan_temperature": ["--hf_checkpoint", ok, "--prompt", "hi", "--temperature", "nan"],
        "inf_temperature": ["--hf_checkpoint", ok, "--prompt", "hi", "--temperature", "inf"],
        "top_p": ["--hf_checkpoint", ok, "--prompt", "hi", "--top_p", "1.5", "--temperature", "0.5"],
        "batch": ["--hf_checkpoint", ok, "--prompt", "hi", "--batch_size", "-2"],
        "steps_per_dispatch": ["--hf_checkpoint", ok, "--prompt", "hi", "--steps_per_dispatch", "0"],
        "not_utf8": ["--hf_checkpoint", ok, "--prompt_file", str(hf_dir / "latin1.txt")],
        "empty": ["--hf_checkpoint", ok, "--prompt", "  "],
        "too_long": ["--hf_checkpoint", ok, "--prompt", "the cat sat on the mat " * 40],
        "missing": ["--hf_checkpoint", str(hf_dir / "nowhere"), "--prompt", "hi"],
        "malformed": ["--hf_checkpoint", str(hf_dir / "malformed"), "--prompt", "hi"],
        "vocab": ["--hf_checkpoint", str(hf_dir / "small_vocab"), "--prompt", "the quick brown fox"],
        "prefill_mesh": ["--hf_checkpoint", ok, "--prompt", "hi", "--num_cpu_devices", "4", "--prefill_mesh", "1,1,4"],
    }[case]
    res = _cli(*args)
    # usage and config mistakes exit 2; unreadable files and checkpoints 1
    assert res.returncode == (1 if case in ("missing", "malformed") else 2), res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("infer.py: error:") and re.search(match, last), last


def test_cli_generates_and_reports_speed_and_acceptance(hf_dir):
    res = _cli("--hf_checkpoint", str(hf_dir / "ok"), "--prompt", "Once upon a time", "--max_new_tokens", "8",
               "--speculative", "mtp", "--chat", "--seed", "3", "--temperature", "0.8", "--top_p", "0.9")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "tokens/s" in res.stderr and "acceptance rate" in res.stderr
    assert "no chat template" in res.stderr
    cfg = json.loads((hf_dir / "ok" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
