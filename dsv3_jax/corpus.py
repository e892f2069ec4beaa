"""The embedded default corpus: the running Python's own standard-library source.

Every machine that runs this project has a CPython install, so its standard library
is a text corpus that needs no download. The corpus is exactly:

- every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``,
- minus test suites and third-party code: any path with a directory component named
    ``test``, ``tests``, ``idle_test``, ``site-packages`` or ``dist-packages``, and any
    file named ``test_*.py``,
- ordered by POSIX path relative to the stdlib root, one file = one document,
- truncated to whole files: files are taken in order until their UTF-8 size reaches
    ``max_bytes`` (default ``CORPUS_MAX_BYTES`` = 16 MiB; the file that crosses the
    cap is included, later ones are not).

On CPython 3.12.1 that is 686 files, 11.6 MB (all of them fit under the cap) and
about 3.05M tokens with an 8192-token byte-level BPE trained on it. The same Python
version gives the same corpus; ``corpus_key`` folds the version and the file list
into a short string so caches built from it are invalidated when either changes.
"""
import hashlib
import pathlib
import sys
import sysconfig

from dsv3_jax.errors import ConfigError, MissingFileError

CORPUS_MAX_BYTES = 16 * 2**20
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(rel: pathlib.PurePath) -> bool:
    return bool(_EXCLUDED_DIRS & set(rel.parts[:-1])) or rel.name.startswith("test_")


def corpus_files(max_bytes: int = CORPUS_MAX_BYTES) -> list[pathlib.Path]:
    """Absolute paths of the corpus files, in corpus order, up to ``max_bytes``."""
    if max_bytes <= 0:
        raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
    root = stdlib_root()
    rels = sorted(
        (p.relative_to(root) for p in root.rglob("*.py")), key=lambda r: r.as_posix())
    files, total = [], 0
    for rel in rels:
        if _is_excluded(rel):
            continue
        if total >= max_bytes:
            break
        path = root / rel
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise MissingFileError(f"no standard-library .py files found under {root}")
    return files


def corpus_documents(max_bytes: int = CORPUS_MAX_BYTES) -> list[str]:
    """The corpus as a list of documents (one per file).

    CPython's non-test sources are UTF-8; ``errors="replace"`` only guards against a
    patched install, so that one odd file cannot stop tokenizer training.
    """
    return [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(max_bytes)]


def corpus_key(max_bytes: int = CORPUS_MAX_BYTES) -> str:
    """A cache key: Python version plus a hash of the file names and sizes.

    Sizes stand in for contents: hashing 12 MB on every start would cost more than the
    caches save, and a patched stdlib with identical sizes is not a realistic case.
    """
    root = stdlib_root()
    h = hashlib.sha256()
    for p in corpus_files(max_bytes):
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    version = ".".join(map(str, sys.version_info[:3]))
    return f"py{version}-{h.hexdigest()[:12]}"
