"""Data pipeline: documents -> one token stream -> packed windows -> grain batches.

Packing. Each document is tokenized and followed by EOS; the documents are
concatenated into one stream and cut into windows of ``seq_len + 1`` tokens that
overlap by one token: window w is ``stream[w*S : w*S + S + 1]``, inputs are
``window[:-1]``, targets ``window[1:]``. Every token is the input of exactly one
window, nothing is padded, and only the final ``< S`` tokens of a stream are unused.
Pre-tokenized files are separate streams (windows never cross files), and their
contents are taken as they are: no EOS is added.

Validation split. Text/JSONL: by document, before packing, independently of the
seed: document i (in source order) is held out iff floor((i+1)f) > floor(i*f), with
f = ``val_fraction``, i.e. exactly floor(n*f) documents spread evenly over the
sources. Token files have no document boundaries, so their last fraction f of tokens
is held out. Train and validation are packed into separate streams, so no token is
in both.

Order. ``MapDataset.shuffle(seed).repeat()`` reshuffles windows each epoch from
the seed alone; process p of P takes elements p, p+P, ... of that global sequence,
so process p's local batch b is exactly the p-th strided slice of global batch b =
elements [b*G, (b+1)*G). The iterator state is grain's own ``{"next_index": k}``.

Caching. Tokenized text/JSONL streams are saved as ``.npy`` under
``workdir/data_cache/`` (uint16 when the vocabulary fits, else uint32) keyed by the
source files' paths/sizes/mtimes, the tokenizer's hash, ``val_fraction`` and, for
the embedded corpus, the Python version; they are memory-mapped on reuse.
"""
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import pathlib
from typing import Iterator

import grain
import numpy as np

from dsv3_jax import corpus
from dsv3_jax.tokenizer import Tokenizer, get_tokenizer, load_tokenizer
from dsv3_jax.errors import ConfigError, DataError, MissingFileError, check_field_types

FORMATS = ("auto", "text", "jsonl", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")
_ENCODE_CHUNK = 512  # documents per encode_batch call: parallel, but bounded memory


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is split and ordered.

    ``sources``: paths or globs (``**`` allowed); empty = the embedded corpus.
    ``format``: "auto" picks per file by suffix (.jsonl -> jsonl, .bin/.npy -> tokens,
    anything else -> text). ``token_dtype`` is the element type of raw ``.bin`` token
    files. ``tokenizer_path``: an HF model directory or tokenizer.json; None trains
    the byte-level BPE on the embedded corpus (cached in the workdir).
    ``val_fraction`` counts documents for text/JSONL (so its share of tokens varies
    with document sizes: 0.05 holds out 10% of the full embedded corpus's tokens) and
    tokens for token files.
    """
    sources: tuple[str, ...] = ()
    format: str = "auto"
    token_dtype: str = "uint16"
    tokenizer_path: str | None = None
    val_fraction: float = 0.05
    seed: int = 0
    shuffle: bool = True
    corpus_max_bytes: int = corpus.CORPUS_MAX_BYTES
    num_threads: int = 2          # grain read threads; windows are cheap slices
    prefetch_batches: int = 4

    def __post_init__(self):
        sources = self.sources
        if isinstance(sources, (str, os.PathLike)):
            sources = (sources,)
        if isinstance(sources, (list, tuple)):  # gin writes lists
            sources = tuple(os.fspath(s) if isinstance(s, os.PathLike) else s for s in sources)
        object.__setattr__(self, "sources", sources)
        if isinstance(self.tokenizer_path, os.PathLike):
            object.__setattr__(self, "tokenizer_path", os.fspath(self.tokenizer_path))
        check_field_types(self)
        if self.format not in FORMATS:
            raise ConfigError(f"DataConfig.format {self.format!r} is not one of {FORMATS}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ConfigError(f"DataConfig.token_dtype {self.token_dtype!r} is not one of {TOKEN_DTYPES}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"DataConfig.val_fraction {self.val_fraction} must be in [0, 1)")
        if self.corpus_max_bytes <= 0:
            raise ConfigError(f"DataConfig.corpus_max_bytes {self.corpus_max_bytes} must be positive")


@dataclasses.dataclass
class Data:
    """``train``: an endless grain iterator of {"inputs", "targets"}: int32 [B_local, S].

    ``val_batches()`` yields the same structure, a finite fixed sequence of
    ``val_windows // G`` batches (identical on every call). ``tokenizer`` is None only
    for pre-tokenized sources without a ``tokenizer_path``.
    """
    train: grain.DatasetIterator
    val_dataset: grain.MapDataset
    tokenizer: Tokenizer | None
    train_windows: int
    val_windows: int
    local_batch_size: int
    unigram_val_loss: float | None = None  # baseline: val NLL under train-split token frequencies

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.val_dataset)

    def get_state(self) -> dict:
        """JSON-serialisable position of ``train``, e.g. {"next_index": 12}."""
        return self.train.get_state()

    def set_state(self, state: dict) -> None:
        self.train.set_state(state)


class PackedWindows:
    """Random access to windows [S + 1] of one or more token streams (no crossing)."""

    def __init__(self, streams: list[np.ndarray], seq_len: int):
        self.streams, self.seq_len = streams, seq_len
        counts = [max(len(s) - 1, 0) // seq_len for s in streams]
        self.starts = np.cumsum([0] + counts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = (i - int(self.starts[k])) * self.seq_len
        return np.asarray(self.streams[k][j:j + self.seq_len + 1])


def resolve_sources(sources: tuple[str, ...]) -> list[pathlib.Path]:
    """Expands globs (sorted) and checks that every named file exists."""
    files = []
    for src in sources:
        if any(c in src for c in "*?["):
            matches = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
            if not matches:
                raise MissingFileError(f"source glob {src!r} matches no files")
            files += matches
        elif os.path.isfile(src):
            files.append(src)
        else:
            raise MissingFileError(f"source {src!r} does not exist or is not a file")
    return [pathlib.Path(f) for f in files]


def file_format(path: pathlib.Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".bin": "tokens", ".npy": "tokens"}.get(suffix, "text")


def read_documents(path: pathlib.Path, fmt: str) -> list[str]:
    """One document per text file, or one per non-blank JSONL line (its "text")."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"source {str(path)!r} is not UTF-8 text ({e.reason}); "
                         f"use format='tokens' for token files") from None
    if fmt == "text":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: JSONL line has no string 'text' field")
        docs.append(record["text"])
    return docs


def load_token_file(path: pathlib.Path, token_dtype: str) -> np.ndarray:
    """A read-only memmap of a raw token file, or a memory-mapped 1-D integer .npy.

    The file is read lazily while training, so it must not be rewritten in place
    meanwhile (truncating a mapped file kills the reader with SIGBUS); replace it
    with a rename instead.
    """
    if path.suffix.lower() == ".npy":
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DataError(f"token file {str(path)!r} holds {tokens.dtype} {tokens.shape}; "
                             f"expected a 1-D integer array")
        return tokens
    dtype = np.dtype(token_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"token file {str(path)!r} has {size} bytes, not a multiple of "
                         f"token_dtype {token_dtype} ({dtype.itemsize} bytes)")
    if size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _is_val(i: int, fraction: float) -> bool:
    return int((i + 1) * fraction) > int(i * fraction)


def tokenize_split(docs: Iterator[str], tok: Tokenizer,
                   val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Packs documents into (train, val) token streams, EOS after each document."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    parts, i = ([], []), 0
    eos = np.array([tok.eos_id], dtype)
    while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
        for ids in tok.encode_batch(chunk):
            parts[_is_val(i, val_fraction)].extend((np.asarray(ids, dtype), eos))
            i += 1
    return tuple(np.concatenate(p) if p else np.zeros(0, dtype) for p in parts)


def _text_streams(cfg: DataConfig, files, formats, tok: Tokenizer,
                  workdir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized (train, val) streams, from the workdir cache when it is current."""
    if files:
        ident = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, fmt]
                 for f, fmt in zip(files, formats)]
    else:
        ident = [corpus.corpus_key(cfg.corpus_max_bytes), cfg.corpus_max_bytes]
    key = hashlib.sha256(json.dumps(
        [ident, tok.fingerprint, cfg.val_fraction]).encode()).hexdigest()[:16]
    cache = workdir / "data_cache"
    paths = [cache / f"tokens-{key}-{split}.npy" for split in ("train", "val")]
    if all(p.is_file() for p in paths):
        return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)

    if files:
        docs = (d for f, fmt in zip(files, formats) for d in read_documents(f, fmt))
    else:
        docs = iter(corpus.corpus_documents(cfg.corpus_max_bytes))
    streams = tokenize_split(docs, tok, cfg.val_fraction)
    cache.mkdir(parents=True, exist_ok=True)
    for path, stream in zip(paths, streams):
        # Processes sharing a workdir each write the same bytes; rename keeps it atomic.
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, stream, allow_pickle=False)
        os.replace(tmp, path)
    return streams


def _token_streams(cfg: DataConfig, files, vocab_size: int) -> tuple[list, list]:
    train, val = [], []
    for f in files:
        tokens = load_token_file(f, cfg.token_dtype)
        # Full scans, skipped when the dtype cannot hold an out-of-range id.
        if len(tokens) and np.iinfo(tokens.dtype).max >= vocab_size:
            top = int(tokens.max())
            if top >= vocab_size:
                raise DataError(f"token file {str(f)!r} holds token id {top} >= "
                                 f"vocab_size {vocab_size}")
        if len(tokens) and np.iinfo(tokens.dtype).min < 0:
            low = int(tokens.min())
            if low < 0:
                raise DataError(f"token file {str(f)!r} holds token id {low}; expected ids in "
                                f"[0, vocab_size {vocab_size})")
        cut = len(tokens) - int(len(tokens) * cfg.val_fraction)
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    return train, val


def _to_example(windows: np.ndarray) -> dict[str, np.ndarray]:
    """[B, S + 1] windows -> inputs and targets int32 [B, S], shifted by one."""
    windows = windows.astype(np.int32)
    return {"inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:])}


def _tokenizer(cfg: DataConfig, vocab_size: int, workdir: pathlib.Path,
               keep_workdir_tokenizer: bool) -> Tokenizer:
    """``cfg.tokenizer_path``'s tokenizer, or the workdir's corpus BPE: trained (or retrained for a new
    vocabulary or corpus) only while no checkpoint depends on it."""
    if cfg.tokenizer_path is None and keep_workdir_tokenizer:
        if not (workdir / "tokenizer.json").is_file():
            raise MissingFileError(f"{workdir} has checkpoints but no tokenizer.json: they were "
                                   f"trained with the one that was there; put it back, or start a "
                                   f"new workdir")
        tok = load_tokenizer(workdir)
    else:
        tok = get_tokenizer(cfg.tokenizer_path, vocab_size=vocab_size, workdir=workdir,
                            corpus_max_bytes=cfg.corpus_max_bytes)
    if tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, more than "
                        f"the model's vocab_size {vocab_size}")
    return tok


def make_data(cfg: DataConfig, *, seq_len: int, global_batch_size: int, vocab_size: int,
              workdir: str | os.PathLike, process_index: int = 0,
              process_count: int = 1, keep_workdir_tokenizer: bool = False) -> Data:
    """Builds this process's training iterator and validation batches (see module doc).

    ``keep_workdir_tokenizer``: the workdir has checkpoints, trained with the tokenizer.json
    there; without a ``tokenizer_path`` that one is loaded as it is, never retrained (a new
    corpus key, e.g. another Python version, would otherwise replace it)."""
    if seq_len <= 0 or global_batch_size <= 0:
        raise DataError(f"seq_len {seq_len} and global_batch_size {global_batch_size} "
                         f"must be positive")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} must be in [0, {process_count})")
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    workdir = pathlib.Path(workdir)
    files = resolve_sources(cfg.sources)
    formats = [file_format(f, cfg.format) for f in files]
    if len({fmt == "tokens" for fmt in formats}) > 1:
        raise DataError(f"sources mix token files and text files: {cfg.sources}")
    pretokenized = bool(formats) and formats[0] == "tokens"

    tok = None
    if not pretokenized or cfg.tokenizer_path is not None:
        tok = _tokenizer(cfg, vocab_size, workdir, keep_workdir_tokenizer)
    if pretokenized:
        train_streams, val_streams = _token_streams(cfg, files, vocab_size)
    else:
        train_stream, val_stream = _text_streams(cfg, files, formats, tok, workdir)
        train_streams, val_streams = [train_stream], [val_stream]

    train_windows = PackedWindows(train_streams, seq_len)
    val_windows = PackedWindows(val_streams, seq_len)
    what = (f"of seq_len + 1 = {seq_len + 1} tokens, fewer than "
            f"global_batch_size {global_batch_size}")
    if len(train_windows) < global_batch_size:
        raise DataError(f"the training split has {len(train_windows)} windows {what}; "
                         f"add data or lower seq_len or global_batch_size")
    if cfg.val_fraction > 0 and len(val_windows) < global_batch_size:
        raise DataError(f"the validation split (val_fraction {cfg.val_fraction}) has "
                         f"{len(val_windows)} windows {what}")

    local = global_batch_size // process_count
    train = grain.MapDataset.source(train_windows)
    if cfg.shuffle:
        train = train.shuffle(seed=cfg.seed)
    train = (train.repeat(None)[process_index::process_count]
             .batch(local, drop_remainder=True).map(_to_example))
    options = grain.ReadOptions(num_threads=cfg.num_threads,
                                prefetch_buffer_size=cfg.prefetch_batches)
    # Whole global batches only, so that every process gets the same number of batches.
    n_val = len(val_windows) // global_batch_size * global_batch_size
    val = (grain.MapDataset.source(val_windows)[:n_val][process_index::process_count]
           .batch(local, drop_remainder=True).map(_to_example))
    return Data(train=iter(train.to_iter_dataset(options)), val_dataset=val, tokenizer=tok,
                train_windows=len(train_windows), val_windows=len(val_windows),
                local_batch_size=local,
                unigram_val_loss=unigram_loss(train_streams, val_streams, vocab_size))


def unigram_loss(train_streams, val_streams, vocab_size: int) -> float | None:
    """Mean NLL (nats) of the validation tokens under add-one-smoothed train-split unigram
    frequencies: the loss a model that ignores context would reach. None without validation data."""
    n_val = sum(len(s) for s in val_streams)
    if n_val == 0:
        return None
    counts = sum(np.bincount(np.asarray(s), minlength=vocab_size)[:vocab_size] for s in train_streams)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(-sum(logp[np.asarray(s)].sum() for s in val_streams) / n_val)
