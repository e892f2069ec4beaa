"""Tokenizers: a byte-level BPE trained on the embedded corpus, or any HF tokenizer.json.

Two ways to get a ``Tokenizer``:

* ``load_tokenizer(path)`` reads ``tokenizer.json`` from an HF model directory (or
  the file itself) plus, when present, ``tokenizer_config.json`` for the special
  tokens and the chat template. DeepSeek-V3's directory has both; its
  ``bos_token``/``eos_token`` entries are ``{"content": ...}`` dicts, which are read
  like plain strings.
* ``get_tokenizer(None, vocab_size=V, workdir=W)`` trains a GPT-2-style byte-level
  BPE (ByteLevel pre-tokenizer and decoder, 256-symbol byte alphabet, so every
  string round-trips exactly) with V entries on the embedded corpus
  (``dsv3_jax.corpus``) and caches it as ``W/tokenizer.json`` +
  ``W/tokenizer_config.json``. The workdir is then itself a loadable HF-style
  directory. Training on the full 11.6 MB corpus takes about 2 s on 2 cores, so no
  subset is needed.

Special tokens of the trained tokenizer: ids 0, 1, 2 = ``<|bos|>``, ``<|eos|>``,
``<|pad|>``. Encoding never adds special tokens itself (``add_special_tokens=False``);
the data pipeline places EOS after each document.
"""
import hashlib
import json
import os
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax import corpus
from dsv3_jax.errors import DataError, MissingFileError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Fallback names for EOS when a tokenizer.json comes without tokenizer_config.json.
_EOS_FALLBACKS = (EOS, "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>")
_CACHE_KEY_FIELD = "dsv3_jax_trained_on"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids the trainer needs.

    ``vocab_size`` is max id + 1 (not the entry count), since that is the embedding
    size a model needs; HF files may leave gaps below added tokens. ``pad_id`` falls
    back to ``eos_id`` when the config names no pad token.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, eos: str, bos: str | None = None,
                 pad: str | None = None, chat_template: str | None = None, name: str = ""):
        self._tok = tok
        self.name = name
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos, eos
        self.eos_id = self._id(eos)
        self.bos_id = None if bos is None else self._id(bos)
        self.pad_id = self.eos_id if pad is None else self._id(pad)
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise DataError(f"special token {token!r} is not in the vocabulary of {self.name}")
        return i

    @property
    def fingerprint(self) -> str:
        """A short hash of the full tokenizer definition, for cache keys."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like ``encode`` for many texts; runs in parallel inside the Rust library."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # Keep special tokens so that decode(encode(s)) == s even when s contains them.
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], *,
                            add_generation_prompt: bool = False) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}]) with the HF chat template.

        Returns the prompt string; pass it to ``encode``. Needs jinja2 (pinned in requirements.txt).
        """
        if self.chat_template is None:
            raise DataError(f"{self.name} has no chat_template in its tokenizer_config.json")
        try:
            import jinja2.sandbox
        except ImportError as e:
            raise ImportError("apply_chat_template needs jinja2, which is not installed; "
                              "pip install jinja2") from e

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        # HF renders chat templates with these two options; templates rely on them for
        # their whitespace.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token)


def _token_content(entry) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads an HF ``tokenizer.json`` (a model directory, or the file itself)."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"tokenizer_path {str(path)!r}: no tokenizer.json at {file}")
    tok = tokenizers.Tokenizer.from_file(str(file))
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    eos = _token_content(config.get("eos_token"))
    if eos is None:
        eos = next((t for t in _EOS_FALLBACKS if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"tokenizer_path {str(path)!r}: no eos_token in tokenizer_config.json "
                         f"and none of {_EOS_FALLBACKS} in the vocabulary")
    return Tokenizer(tok, eos=eos, bos=_token_content(config.get("bos_token")),
                     pad=_token_content(config.get("pad_token")),
                     chat_template=config.get("chat_template"), name=str(file))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    # Several processes may share a workdir: readers must never see a half file.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_tokenizer(vocab_size: int, out_dir: str | os.PathLike, *,
                    corpus_max_bytes: int = corpus.CORPUS_MAX_BYTES) -> Tokenizer:
    """Trains the byte-level BPE on the embedded corpus and writes it to ``out_dir``."""
    if vocab_size < 256 + 3:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE: "
                         f"it needs 256 byte symbols + 3 special tokens")
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no space invented at the start).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.corpus_documents(corpus_max_bytes), trainer)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              _CACHE_KEY_FIELD: _cache_key(vocab_size, corpus_max_bytes)}
    _write_atomic(out_dir / "tokenizer.json", tok.to_str())
    _write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    return load_tokenizer(out_dir)


def _cache_key(vocab_size: int, corpus_max_bytes: int) -> str:
    return f"{corpus.corpus_key(corpus_max_bytes)}-bytes{corpus_max_bytes}-vocab{vocab_size}"


def get_tokenizer(path: str | os.PathLike | None, *, vocab_size: int,
                  workdir: str | os.PathLike,
                  corpus_max_bytes: int = corpus.CORPUS_MAX_BYTES) -> Tokenizer:
    """``load_tokenizer(path)``, or with ``path=None`` the cached corpus BPE in ``workdir``.

    The cache is reused only when it was trained with the same vocab size on the same
    corpus (Python version and file list); otherwise it is retrained in place.
    """
    if path is not None:
        return load_tokenizer(path)
    workdir = pathlib.Path(workdir)
    config_file = workdir / "tokenizer_config.json"
    if (workdir / "tokenizer.json").is_file() and config_file.is_file():
        cached = json.loads(config_file.read_text()).get(_CACHE_KEY_FIELD)
        if cached == _cache_key(vocab_size, corpus_max_bytes):
            return load_tokenizer(workdir)
    return train_tokenizer(vocab_size, workdir, corpus_max_bytes=corpus_max_bytes)
