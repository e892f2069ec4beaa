"""Tokenizers: an HF tokenizer.json, a tiktoken BPE (Kimi-K2, Moonlight), or a BPE trained here.

``load_tokenizer(path)`` reads a model directory (or the tokenizer file itself):

* ``tokenizer.json``: the HF ``tokenizers`` library (DeepSeek-V3/V3.1 ship this);
* ``tiktoken.model``: a tiktoken BPE, one ``<base64 token> <rank>`` line per token, run by the
  ``tiktoken`` package. Its special tokens come from ``tokenizer_config.json``'s
  ``added_tokens_decoder`` ({id: {"content": ...}}); ids between the last rank and the last named
  token that have no name become ``<|reserved_token_{id}|>``, as Kimi's tokenizer names them. The
  split regex lives in the repositories' ``tokenization_*.py``, which is never executed: it is
  read from a ``pat_str`` entry of tokenizer_config.json when there is one, else ``KIMI_PAT_STR``.

Both sit behind one ``Tokenizer`` (encode, decode, bos_id, eos_id, pad_id, vocab_size,
chat_template, apply_chat_template). tokenizer_config.json also gives the special tokens
(strings or ``{"content": ...}`` dicts), ``add_bos_token`` (DeepSeek sets it true) and the chat
template (see ``chat_template.py``). ``encode`` prepends BOS when ``add_bos`` (default: the
tokenizer's ``add_bos_token``) unless the text already starts with it; rendered chat templates
carry their own BOS text, so ``apply_chat_template(..., tokenize=True)`` adds none.

``get_tokenizer(None, vocab_size=V, workdir=W)`` trains a GPT-2-style byte-level BPE (ByteLevel
pre-tokenizer and decoder, 256-symbol byte alphabet, so every string round-trips exactly) with V
entries on the embedded corpus (``dsv3_jax.corpus``) and caches it as ``W/tokenizer.json`` +
``W/tokenizer_config.json``, a loadable HF-style directory. Training on the full 11.6 MB corpus
takes about 2 s on 2 cores. Its special tokens: ids 0, 1, 2 = ``<|bos|>``, ``<|eos|>``,
``<|pad|>``, no ``add_bos_token``; the data pipeline places EOS after each document.
"""
import base64
import hashlib
import json
import os
import pathlib
import re

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax import corpus
from dsv3_jax.chat_template import RenderLimits, read_chat_template, render
from dsv3_jax.errors import DataError, MissingFileError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Fallback names for EOS when a tokenizer comes without tokenizer_config.json.
_EOS_FALLBACKS = (EOS, "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>", "[EOS]")
_CACHE_KEY_FIELD = "dsv3_jax_trained_on"

# The split regex of TikTokenTokenizer.pat_str in tokenization_kimi.py (moonshotai/Kimi-K2-*) and
# tokenization_moonshot.py (moonshotai/Moonlight-16B-A3B*), identical in both. `&&` is a class
# intersection (letters that are not Han), which tiktoken's Rust regex engine supports.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# tiktoken's backtracking regex overflows its stack on long runs (openai/tiktoken#195; a million
# spaces fail): text is cut into 400 000-character chunks and runs of whitespace or of
# non-whitespace into 25 000-character slices first, with the same bounds as Kimi's tokenizer,
# so that ids match it.
_TIKTOKEN_CHUNK, _TIKTOKEN_RUN = 400_000, 25_000


class _HFBackend:
    """An HF ``tokenizers.Tokenizer``; special tokens in the text are matched, none is added."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Keep special tokens so that decode(encode(s)) == s even when s contains them.
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def max_id(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values())

    def definition(self) -> bytes:
        return self.tok.to_str().encode()


class _TiktokenBackend:
    """A ``tiktoken.Encoding``; every special token in the text becomes its id (as Kimi encodes)."""

    def __init__(self, enc, special: dict[str, int], definition: bytes):
        self.enc, self.special, self._definition = enc, special, definition

    def encode(self, text: str) -> list[int]:
        return [i for p in _tiktoken_pieces(text) for i in self.enc.encode(p, allowed_special="all")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if len(texts) < 2:  # no thread pool
            return [self.encode(t) for t in texts]
        owner, pieces = zip(*[(k, p) for k, t in enumerate(texts) for p in _tiktoken_pieces(t)])
        out = [[] for _ in texts]
        for k, ids in zip(owner, self.enc.encode_batch(list(pieces), allowed_special="all")):
            out[k].extend(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        # Ids past the table are dropped, as the HF library does (a model's vocab may be padded).
        return self.enc.decode([i for i in ids if 0 <= i <= self.enc.max_token_value])

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None

    def max_id(self) -> int:
        return self.enc.max_token_value

    def definition(self) -> bytes:
        return self._definition


def _tiktoken_pieces(text: str, chunk: int = _TIKTOKEN_CHUNK, run: int = _TIKTOKEN_RUN) -> list[str]:
    """``text`` cut where Kimi's tokenizer cuts it: into ``chunk``-character chunks, then each
    run of whitespace or non-whitespace longer than ``run`` after every ``run`` characters."""
    pieces, long_run = [], re.compile(r"\s{%d,}|\S{%d,}" % (run + 1, run + 1))
    for start in range(0, len(text), chunk):
        part, cut = text[start:start + chunk], 0
        for m in long_run.finditer(part):
            for at in range(m.start() + run, m.end(), run):
                pieces.append(part[cut:at])
                cut = at
        pieces.append(part[cut:])
    return pieces or [""]


class Tokenizer:
    """One interface over both backends, with the ids the trainer and the CLI need.

    ``vocab_size`` is max id + 1 (not the entry count), since that is the embedding size a model
    needs; HF files may leave gaps below added tokens. ``pad_id`` falls back to ``eos_id`` when
    the config names no pad token. ``template_limits`` bounds each chat-template render.
    """

    def __init__(self, backend, *, eos: str, bos: str | None = None, pad: str | None = None,
                 chat_template: str | None = None, add_bos: bool = False, name: str = "",
                 chat_template_name: str | None = None):
        self._backend = _HFBackend(backend) if isinstance(backend, tokenizers.Tokenizer) else backend
        self.name = name
        self.chat_template, self.chat_template_name = chat_template, chat_template_name or name
        self.template_limits = RenderLimits()
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.eos_id = self._id(eos)
        self.bos_id = None if bos is None else self._id(bos)
        self.pad_id = self.eos_id if pad is None else self._id(pad)
        if add_bos and bos is None:
            raise DataError(f"{name}: add_bos_token is true but there is no bos_token")
        self.add_bos = bool(add_bos)
        self.vocab_size = self._backend.max_id() + 1

    def _id(self, token: str) -> int:
        i = self._backend.token_to_id(token)
        if i is None:
            raise DataError(f"special token {token!r} is not in the vocabulary of {self.name}")
        return i

    @property
    def fingerprint(self) -> str:
        """A short hash of the full tokenizer definition, for cache keys."""
        return hashlib.sha256(self._backend.definition()).hexdigest()[:16]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if not (self.add_bos if add_bos is None else add_bos):
            return ids
        if self.bos_id is None:
            raise DataError(f"{self.name} has no bos_token to add")
        return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` (None: the tokenizer's add_bos_token)."""
        return self._with_bos(self._backend.encode(text), add_bos)

    def encode_batch(self, texts: list[str], add_bos: bool | None = False) -> list[list[int]]:
        """Like ``encode`` for many texts, in parallel inside the Rust library. No BOS unless
        asked: the data pipeline packs documents separated by EOS only."""
        return [self._with_bos(ids, add_bos) for ids in self._backend.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._backend.decode(list(map(int, ids)))

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Renders a conversation ([{"role": ..., "content": ...}]), or a list of them, with the
        model's chat template, as transformers does: the template sees ``messages``,
        ``add_generation_prompt``, ``tools``/``documents`` (None unless given), the special tokens
        (``bos_token``, ...) and every keyword argument (e.g. ``thinking=True`` for DeepSeek
        V3.1), all JSON values. Returns the text, or with ``tokenize`` its ids (no BOS added: the
        template writes its own). A list of conversations renders in one worker and returns a list.
        """
        if self.chat_template is None:
            raise DataError(f"{self.name} has no chat_template in its tokenizer_config.json "
                            f"and no chat_template.jinja beside it")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        tokens = {"bos_token": self.bos_token or "", "eos_token": self.eos_token}
        if self.pad_token is not None:
            tokens["pad_token"] = self.pad_token
        contexts = [{"tools": None, "documents": None, **tokens, "messages": list(c),
                     "add_generation_prompt": add_generation_prompt, **kwargs} for c in conversations]
        out = render(self.chat_template, contexts, name=self.chat_template_name,
                     limits=self.template_limits)
        if tokenize:
            out = [self.encode(text, add_bos=False) for text in out]
        return out if batched else out[0]


def _token_content(entry) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def _read_json(file: pathlib.Path, what: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{file}: not a JSON file ({e}); expected {what}") from None


def _load_hf(file: pathlib.Path) -> _HFBackend:
    try:
        return _HFBackend(tokenizers.Tokenizer.from_file(str(file)))
    except Exception as e:  # the library raises a bare Exception with serde's message
        _read_json(file, "an HF tokenizers tokenizer.json")  # names a non-JSON file as such
        raise DataError(f"{file}: not an HF tokenizers tokenizer.json: "
                        f"{' '.join(str(e).split())}") from None


def _read_ranks(file: pathlib.Path) -> dict[bytes, int]:
    """The ``<base64 token> <rank>`` lines of a tiktoken file (the format ``load_tiktoken_bpe``
    reads; that function also caches local files by path in a temp folder, so an edited file
    would load stale, and its errors name no line)."""
    expected = "expected '<base64 token> <rank>' lines (a tiktoken BPE file)"
    ranks = {}
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except ValueError:  # binascii.Error is one
                got = line[:80].decode(errors="replace").rstrip()
                raise DataError(f"{file}, line {n}: {expected}, got {got!r}") from None
            if token in ranks:
                raise DataError(f"{file}, line {n}: token {token!r} is listed twice")
            ranks[token] = rank
    if not ranks:
        raise DataError(f"{file}: no tokens; {expected}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{file}: the ranks must be 0 to {len(ranks) - 1}, each once; {expected}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken aborts the process on a byte it cannot encode
        raise DataError(f"{file}: {len(missing)} of the 256 single bytes have no token (first: "
                        f"{missing[0]:#04x}); a byte-level BPE needs them all")
    return ranks


def _tiktoken_specials(config: dict, n_ranks: int, config_file: pathlib.Path) -> dict[str, int]:
    """Special tokens {content: id} from added_tokens_decoder, gaps named as Kimi names them."""
    named = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if not (key.isdigit() and int(key) >= n_ranks and isinstance(content, str)):
            raise DataError(f"{config_file}: added_tokens_decoder entry {key!r}: expected an id "
                            f">= {n_ranks} (past the tiktoken ranks) and a 'content' string")
        named[int(key)] = content
    if len(set(named.values())) < len(named):
        raise DataError(f"{config_file}: added_tokens_decoder names a token twice")
    last = max(named, default=n_ranks - 1)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n_ranks, last + 1)}


def _load_tiktoken(file: pathlib.Path, config: dict, config_file: pathlib.Path) -> _TiktokenBackend:
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError(f"{file} is a tiktoken BPE, which needs the tiktoken package; "
                          "pip install tiktoken") from e
    ranks = _read_ranks(file)
    special = _tiktoken_specials(config, len(ranks), config_file)
    pat_str = config.get("pat_str", KIMI_PAT_STR)
    if not isinstance(pat_str, str):
        raise DataError(f"{config_file}: pat_str must be a regex string, got {pat_str!r}")
    try:
        enc = tiktoken.Encoding(file.name, pat_str=pat_str, mergeable_ranks=ranks,
                                special_tokens=special)
    except ValueError as e:  # the regex does not compile
        raise DataError(f"{config_file}: pat_str: {' '.join(str(e).split())}") from None
    definition = file.read_bytes() + json.dumps([pat_str, sorted(special.items())]).encode()
    return _TiktokenBackend(enc, special, definition)


def _tokenizer_file(path: pathlib.Path) -> pathlib.Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tiktoken.model"):
            if (path / name).is_file():
                return path / name
        raise MissingFileError(f"tokenizer_path {str(path)!r}: no tokenizer.json or tiktoken.model in it")
    if not path.is_file():
        raise MissingFileError(f"tokenizer_path {str(path)!r}: no such file or directory")
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a model directory's tokenizer.json or tiktoken.model (or names the file itself)."""
    file = _tokenizer_file(pathlib.Path(path))
    config_file = file.parent / "tokenizer_config.json"
    config = _read_json(config_file, "a tokenizer_config.json") if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise DataError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if file.suffix == ".json":
        backend = _load_hf(file)
    else:  # tiktoken.model, *.tiktoken
        backend = _load_tiktoken(file, config, config_file)
    eos = _token_content(config.get("eos_token"))
    if eos is None:
        eos = next((t for t in _EOS_FALLBACKS if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"tokenizer_path {str(path)!r}: no eos_token in tokenizer_config.json "
                        f"and none of {_EOS_FALLBACKS} in the vocabulary")
    add_bos = config.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise DataError(f"{config_file}: add_bos_token must be true or false, got {add_bos!r}")
    template, template_name = read_chat_template(config, config_file)
    return Tokenizer(backend, eos=eos, bos=_token_content(config.get("bos_token")),
                     pad=_token_content(config.get("pad_token")), chat_template=template,
                     add_bos=add_bos, name=str(file), chat_template_name=template_name)


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
