"""A training run's newest good checkpoint, loaded for inference through the checks training makes.

Steps are tried newest first; a step is used only if it is committed, every array restores and the
arrays match the checksums taken when it was saved (`dsv3_jax.checkpoint.fingerprints`); otherwise
a one-line warning names the step and its reason and the previous step is tried. Unlike a resumed
training run, inference never moves or changes anything in the workdir. The tokenizer is the one
the run trained with: `DataConfig.tokenizer_path` as recorded in the checkpoint, else the workdir's
own `tokenizer.json`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsv3_jax.checkpoint import COMMIT_MARKER, describe, fingerprints, quiet_aborted_reads, read_meta
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError, ConfigError
from dsv3_jax.model import Transformer
from dsv3_jax.moe import RouterBias
from dsv3_jax.parallel import stages as st
from dsv3_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def _path_key(keystr: str) -> str:
    """A leaf path independent of how the tree is held (nnx.State's `.value` attribute when saved,
    a dict key when restored as plain data): its names joined by '/'."""
    return "/".join(re.findall(r"\w+", keystr))


def _restore(step_dir: pathlib.Path) -> tuple[dict, dict]:
    """-> (meta, the saved state as nested dicts on the default device), checksums verified."""
    meta = read_meta(step_dir)
    ckptr = ocp.StandardCheckpointer()
    saved = ckptr.metadata(step_dir / "state").item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # The whole saved tree (orbax restores no subtree by itself); only params and biases are kept.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(saved))
    restored = ckptr.restore(step_dir / "state", target)
    want = {_path_key(k): v for k, v in json.loads((step_dir / "checksums" / "metadata").read_text()).items()}
    got = {_path_key(k): v for k, v in fingerprints(restored).items()}
    wrong = sorted(k for k in got if want.get(k) != got[k])
    if wrong or set(want) != set(got):
        raise CheckpointError(f"checksum mismatch in {len(wrong)} of {len(got)} arrays, e.g. {(wrong or ['?'])[0]}")
    return meta, restored


def _newest_good(ckdir: pathlib.Path, workdir) -> tuple[int, dict, dict]:
    steps = sorted((int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists()),
                   reverse=True) if ckdir.is_dir() else []
    if not steps:
        raise CheckpointError(f"{workdir}: no committed checkpoint under {ckdir} (is it a train.py workdir?)")
    bad: list[tuple[int, str]] = []
    with quiet_aborted_reads(bad):
        for step in steps:
            try:
                return step, *_restore(ckdir / str(step))
            except Exception as e:  # anything unreadable is a reason to try the previous step
                bad.append((step, describe(e)))
                log.warning("checkpoint step %d in %s is unusable (%s); trying an older step", step, ckdir, bad[-1][1])
    raise CheckpointError(f"no readable checkpoint in {ckdir}: " + "; ".join(f"step {s}: {r}" for s, r in bad))


def _tokenizer(workdir, meta: dict):
    """The run's tokenizer: the recorded DataConfig.tokenizer_path, else the workdir's tokenizer.json."""
    path = (meta.get("data") or {}).get("tokenizer_path")
    if path:
        return load_tokenizer(path)
    if (pathlib.Path(workdir) / "tokenizer.json").exists():
        return load_tokenizer(str(workdir))
    raise ConfigError(f"{workdir}: the run has no tokenizer (it trained on token files without "
                      "DataConfig.tokenizer_path); inference needs one to read prompts")


def load_for_inference(workdir: str | os.PathLike):
    """The newest good checkpoint of a training run as (Transformer, Tokenizer); the arrays land on
    the default device whatever mesh trained them."""
    ckdir = pathlib.Path(workdir) / "checkpoints"
    step, meta, restored = _newest_good(ckdir, workdir)
    cfg = ModelConfig(**meta["model"])
    if cfg.moe_impl == "ep":  # a layout for the training mesh; one device needs the local form
        cfg = cfg.replace(moe_impl="ragged")
    stages = st.saved_layout(meta)  # a pipeline's slot layout the run kept its MoE stack in, if any
    restored = {k: st.from_slots(restored[k], stages) for k in ("params", "biases")}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        node = restored["biases" if isinstance(var, RouterBias) else "params"]
        for key in path:
            node = node[str(key)]
        var.set_value(node["value"])
    return nnx.merge(graphdef, state), _tokenizer(workdir, meta)
