"""A training run's newest committed checkpoint, loaded for inference."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsv3_jax.checkpoint import COMMIT_MARKER, describe
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model import Transformer
from dsv3_jax.moe import RouterBias
from dsv3_jax.tokenizer import load_tokenizer


def load_for_inference(workdir: str | os.PathLike):
    """The newest committed checkpoint of a training run as (Transformer, Tokenizer or None).

    Reads the model config from the checkpoint's `meta` item and only what the model needs;
    the arrays land on the default device whatever mesh trained them.
    """
    ckdir = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists()) \
        if ckdir.is_dir() else []
    if not steps:
        raise CheckpointError(f"{workdir}: no committed checkpoint under {ckdir} (is it a train.py workdir?)")
    step_dir = ckdir / str(steps[-1])
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        cfg = ModelConfig(**meta["model"])
        if cfg.moe_impl == "ep":  # a layout for the training mesh; one device needs the local form
            cfg = cfg.replace(moe_impl="ragged")
        ckptr = ocp.StandardCheckpointer()
        saved = ckptr.metadata(step_dir / "state").item_metadata.tree
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # The whole saved tree (orbax restores no subtree by itself); only params and biases are kept.
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(saved))
        restored = ckptr.restore(step_dir / "state", target)
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint in {step_dir}: {describe(e)}") from e
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        node = restored["biases" if isinstance(var, RouterBias) else "params"]
        for key in path:
            node = node[str(key)]
        var.set_value(node["value"])
    tok_file = pathlib.Path(workdir) / "tokenizer.json"
    tokenizer = load_tokenizer(str(workdir)) if tok_file.exists() else None
    return nnx.merge(graphdef, state), tokenizer
