"""Specification of the data pipeline: corpus, tokenizer, packing, split, order, resume.

The tokenizer is trained once per session (vocab 512 on the first 1 MiB of the
embedded corpus, well under a second); the other sources are small temp files.
"""
import json
import sys

import numpy as np
import pytest

from dsv3_jax import corpus, data, tokenizer
from dsv3_jax.data import DataConfig, make_data

VOCAB = 512
SMALL = 2**20  # bytes of the embedded corpus used in tests


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tokenizer.get_tokenizer(None, vocab_size=VOCAB, workdir=d, corpus_max_bytes=SMALL)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    return tokenizer.load_tokenizer(tok_dir)


def token_file(path, n, dtype=np.uint16):
    """Token ids 0..n-1 (each unique, so every window is identifiable)."""
    np.arange(n, dtype=dtype).tofile(path)
    return str(path)


def batches(d, n):
    return [next(d.train) for _ in range(n)]


# ---------------------------------------------------------------- corpus, tokenizer

def test_corpus_is_sorted_stdlib_without_tests_and_capped():
    root = corpus.stdlib_root()
    small, full = corpus.corpus_files(SMALL), corpus.corpus_files()
    rels = [p.relative_to(root).as_posix() for p in full]
    assert rels == sorted(rels) and small == full[:len(small)]
    assert not any(set(p.split("/")[:-1]) & {"test", "tests", "site-packages"} for p in rels)
    sizes = [p.stat().st_size for p in small]
    assert sum(sizes[:-1]) < SMALL <= sum(sizes)  # whole files, the last one crosses the cap
    assert sum(p.stat().st_size for p in full) > 4 * 2**20
    assert corpus.corpus_key().startswith("py%d.%d.%d-" % sys.version_info[:3])


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # ascii, tabs and  double spaces\n",
    "naïve café — 日本語テキスト 🙂 Ωμέγα\r\n",
    " leading space, <|eos|> in the text, trailing space ",
])
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < VOCAB for i in ids)


def test_trained_tokenizer_special_ids_and_size(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, VOCAB)
    assert len(tok.encode("import os\n")) < len("import os\n")  # merges were learned


def test_tokenizer_is_cached_and_retrained_only_on_a_new_key(tok_dir, monkeypatch):
    before = (tok_dir / "tokenizer.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(tokenizer, "train_tokenizer", no_training)
    again = tokenizer.get_tokenizer(None, vocab_size=VOCAB, workdir=tok_dir,
                                    corpus_max_bytes=SMALL)
    assert again.vocab_size == VOCAB
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="retrained"):
        tokenizer.get_tokenizer(None, vocab_size=VOCAB + 1, workdir=tok_dir,
                                corpus_max_bytes=SMALL)


def hf_dir(tok_dir, path, config):
    """An HF-style model directory: our tokenizer.json plus the given tokenizer_config."""
    (path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_load_hf_directory_with_addedtoken_config(tok_dir, tmp_path):
    # DeepSeek-V3's tokenizer_config.json stores special tokens as AddedToken dicts.
    added = lambda s: {"__type": "AddedToken", "content": s, "special": True}
    hf = tokenizer.load_tokenizer(hf_dir(tok_dir, tmp_path, {
        "bos_token": added("<|bos|>"), "eos_token": added("<|pad|>")}))
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 2, 2)  # pad falls back to eos
    bare = tokenizer.load_tokenizer(tok_dir / "tokenizer.json")
    assert bare.eos_id == 1
    with pytest.raises(ValueError, match="no chat_template"):
        hf.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_renders(tok_dir, tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    t = tokenizer.load_tokenizer(hf_dir(tok_dir, tmp_path, {
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": template}))
    out = t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == "<|bos|><user>hi<assistant>"


# ---------------------------------------------------------------- packing and split

def test_packing_keeps_every_token_and_shifts_targets(tok_dir, tok, tmp_path):
    docs = [f"document {i}: " + "word " * (i % 7) + "é" * i for i in range(30)]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    cfg = DataConfig(sources=(str(src),), tokenizer_path=str(tok_dir), val_fraction=0.0,
                     shuffle=False)
    S, B = 16, 4
    d = make_data(cfg, seq_len=S, global_batch_size=B, vocab_size=VOCAB, workdir=tmp_path)
    stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in docs])
    n = (len(stream) - 1) // S
    assert (d.train_windows, d.val_windows) == (n, 0)
    rows = batches(d, -(-n // B))
    inputs = np.concatenate([b["inputs"] for b in rows])[:n]
    targets = np.concatenate([b["targets"] for b in rows])[:n]
    assert inputs.shape == (n, S) and inputs.dtype == np.int32
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(np.append(inputs.ravel(), targets[-1, -1]), stream[:n * S + 1])
    assert len(stream) - (n * S + 1) < S  # only the tail shorter than a window is unused
    assert list(d.val_batches()) == []


def test_validation_holds_out_whole_documents_evenly(tok):
    docs = [f"doc{i} " for i in range(20)]
    train, val = data.tokenize_split(iter(docs), tok, val_fraction=0.25)
    split = lambda s: tok.decode(s).split("<|eos|>")[:-1]
    assert split(val) == [f"doc{i} " for i in (3, 7, 11, 15, 19)]  # i+1 divisible by 4
    assert split(train) == [t for t in docs if t not in split(val)]


def test_train_and_val_windows_are_disjoint_for_token_files(tmp_path):
    src = token_file(tmp_path / "t.bin", 1000)
    cfg = DataConfig(sources=(src,), val_fraction=0.2, shuffle=False)
    d = make_data(cfg, seq_len=10, global_batch_size=5, vocab_size=VOCAB * 2, workdir=tmp_path)
    assert (d.tokenizer, d.train_windows, d.val_windows) == (None, 79, 19)
    train = np.concatenate([b["inputs"] for b in batches(d, 16)]).ravel()
    val = np.concatenate([b["inputs"] for b in d.val_batches()]).ravel()
    assert train.max() < 800 <= val.min() and len(val) == 3 * 5 * 10  # 19 -> 3 full batches
    assert set(train[:790]) == set(range(790))


def test_embedded_corpus_batches(tok_dir):
    cfg = DataConfig(corpus_max_bytes=SMALL, seed=3, val_fraction=0.05)
    d = make_data(cfg, seq_len=64, global_batch_size=8, vocab_size=VOCAB, workdir=tok_dir)
    b = next(d.train)
    assert b["inputs"].shape == b["targets"].shape == (8, 64)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    docs = corpus.corpus_documents(SMALL)
    held_out = [i for i in range(len(docs)) if (i + 1) % 20 == 0]  # val_fraction 1/20
    val_tokens = sum(len(d.tokenizer.encode(docs[i])) + 1 for i in held_out)
    assert d.val_windows == (val_tokens - 1) // 64 and d.train_windows > 5000
    text = "".join(doc + "<|eos|>" for doc in docs)
    assert d.tokenizer.decode(b["inputs"][0]) in text


def test_tokenized_stream_is_cached(tok_dir, monkeypatch):
    cfg = DataConfig(corpus_max_bytes=SMALL, val_fraction=0.1)
    first = make_data(cfg, seq_len=32, global_batch_size=4, vocab_size=VOCAB, workdir=tok_dir)
    monkeypatch.setattr(data, "tokenize_split", lambda *a: pytest.fail("re-tokenized"))
    second = make_data(cfg, seq_len=32, global_batch_size=4, vocab_size=VOCAB, workdir=tok_dir)
    assert second.train_windows == first.train_windows
    np.testing.assert_array_equal(next(second.train)["inputs"], next(first.train)["inputs"])


# ---------------------------------------------------------------- order, resume, sharding

def window_ids(d, n_batches, S=8):
    """Window index of each row: token files hold 0..N-1, so window w starts at w*S."""
    return [tuple(b["inputs"][:, 0] // S) for b in batches(d, n_batches)]


def small_token_data(tmp_path, **kw):
    src = tmp_path / "t.bin"
    if not src.exists():  # never rewrite: earlier iterators still memory-map it
        token_file(src, 8 * 20 + 1)  # exactly 20 windows of S=8
    src = str(src)
    cfg = DataConfig(sources=(src,), val_fraction=0.0, **{"seed": 0, **kw})
    return lambda **k: make_data(cfg, seq_len=8, vocab_size=VOCAB, workdir=tmp_path,
                                 **{"global_batch_size": 4, **k})


def test_seed_fixes_the_order_and_each_epoch_is_a_new_permutation(tmp_path):
    ids = window_ids(small_token_data(tmp_path, seed=1)(), 10)  # 2 epochs of 5 batches
    assert ids == window_ids(small_token_data(tmp_path, seed=1)(), 10)
    assert ids != window_ids(small_token_data(tmp_path, seed=2)(), 10)
    epoch0, epoch1 = sum(ids[:5], ()), sum(ids[5:], ())
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    assert sum(window_ids(small_token_data(tmp_path, shuffle=False)(), 5), ()) == tuple(range(20))


def test_resume_from_state_matches_uninterrupted_run_across_epochs(tmp_path):
    build = small_token_data(tmp_path)
    uninterrupted = build(global_batch_size=3)  # 20 windows: batch 6 spans two epochs
    batches(uninterrupted, 5)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    assert state == {"next_index": 5}
    expected = batches(uninterrupted, 10)
    resumed = build(global_batch_size=3)
    resumed.set_state(state)
    for want, got in zip(expected, batches(resumed, 10)):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])


def test_process_shards_are_disjoint_and_cover_the_global_batch(tmp_path):
    build = small_token_data(tmp_path)
    whole = window_ids(build(), 8)
    shards = [window_ids(build(process_index=p, process_count=2), 8) for p in range(2)]
    for b, global_batch in enumerate(whole):
        assert shards[0][b] == global_batch[0::2] and shards[1][b] == global_batch[1::2]
        assert set(shards[0][b]).isdisjoint(shards[1][b])
    assert build(process_index=1, process_count=2).local_batch_size == 2


def test_sources_glob_and_token_dtypes(tok_dir, tok, tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "skip.md").write_text("not matched\n")
    cfg = DataConfig(sources=(str(tmp_path / "*.txt"),), tokenizer_path=str(tok_dir),
                     val_fraction=0.0, shuffle=False)
    d = make_data(cfg, seq_len=2, global_batch_size=1, vocab_size=VOCAB, workdir=tmp_path)
    rows = batches(d, d.train_windows)
    text = tok.decode(np.append(np.concatenate([b["inputs"][0] for b in rows]),
                                rows[-1]["targets"][0, -1]))
    assert text.startswith("first file\n<|eos|>second file\n") and "not matched" not in text
    np.arange(70_000, 70_000 + 17, dtype=np.uint32).tofile(tmp_path / "big.tok")
    np.save(tmp_path / "small.npy", np.arange(17, dtype=np.int32))
    for src, dtype, first in [("big.tok", "uint32", 70_000), ("small.npy", "uint16", 0)]:
        cfg = DataConfig(sources=(str(tmp_path / src),), format="tokens", token_dtype=dtype,
                         val_fraction=0.0, shuffle=False)
        d = make_data(cfg, seq_len=8, global_batch_size=2, vocab_size=80_000, workdir=tmp_path)
        assert d.train_windows == 2 and next(d.train)["inputs"][0, 0] == first


# ---------------------------------------------------------------- errors name the value

def test_errors_name_the_bad_value(tok_dir, tmp_path):
    (tmp_path / "one.txt").write_text("tiny")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    token_file(tmp_path / "ids.bin", 600)
    kw = dict(seq_len=8, global_batch_size=2, vocab_size=VOCAB, workdir=tmp_path)
    src = lambda name, **c: DataConfig(sources=(str(tmp_path / name),),
                                       tokenizer_path=str(tok_dir), **c)
    cases = [
        (FileNotFoundError, "missing.txt", lambda: make_data(src("missing.txt"), **kw)),
        (FileNotFoundError, r"\*\.parquet", lambda: make_data(src("*.parquet"), **kw)),
        (ValueError, "bad.jsonl:2", lambda: make_data(src("bad.jsonl"), **kw)),
        (ValueError, "'xml'", lambda: DataConfig(format="xml")),
        (ValueError, "'int8'", lambda: DataConfig(token_dtype="int8")),
        (ValueError, "vocab_size 300", lambda: make_data(src("one.txt"), **{**kw, "vocab_size": 300})),
        (ValueError, "token id 599 >= vocab_size 512", lambda: make_data(src("ids.bin"), **kw)),
        (ValueError, "global_batch_size 2", lambda: make_data(src("one.txt", val_fraction=0.0), **kw)),
        (ValueError, "val_fraction 0.1", lambda: make_data(  # 67 train, 7 val windows
            src("ids.bin", val_fraction=0.1), **{**kw, "vocab_size": 600, "global_batch_size": 40})),
        (ValueError, "process_count 3", lambda: make_data(src("one.txt"), **kw, process_count=3)),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()
