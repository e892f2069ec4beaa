"""Logical axis names -> mesh axes: the one rules table, and helpers that apply it.

The mesh has DeepSeek's training axes (V3 report §3.2: PP16 x EP64 x ZeRO-1 DP, no tensor
parallelism): `data`, `pipeline`, `expert`. Model code never names a mesh axis; every parameter
carries logical names (`logical_axes` metadata), and batches are laid out with `batch`/`seq`
(`batch_sharding`); activations inside the model follow by GSPMD propagation. The expert axis also carries data parallelism for
the non-expert parts, as in DeepSeek's EP64.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.errors import ConfigError

MESH_AXES = ("data", "pipeline", "expert")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # activations: data parallel over data and expert
    ("layers", "pipeline"),  # the stacked MoE layers -> pipeline stages
    ("dense_layers", None),  # the stacked dense layers run on the first stage with the embedding
    ("exp", "expert"),  # routed experts -> expert parallel
    ("router", None),  # the gate's expert axis: every device routes its tokens over all experts
    ("vocab", None),
    ("embed", None),
    ("embed_cat", None),
    ("heads", None),
    ("mlp", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("seq", None),
)


def make_mesh(data: int = 1, pipeline: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, pipeline, expert) mesh with Auto axes (GSPMD propagation, see jax_ecosystem §2)."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * pipeline * expert
    if need != len(devices):
        raise ConfigError(f"mesh data={data} x pipeline={pipeline} x expert={expert} = {need} devices, "
                         f"but {len(devices)} are available")
    grid = np.array(devices).reshape(data, pipeline, expert)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names, shape, mesh: Mesh, rules=RULES) -> P:
    """Resolve logical names to a PartitionSpec; a mesh axis is used at most once, and only on a
    dimension it divides (otherwise that dimension stays replicated)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh):
    """A pytree of NamedShardings matching `state`, from each variable's logical_axes."""
    def one(var):
        return NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"],
                                                   var.get_value().shape, mesh))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to the rules (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def abstract_with(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a prefix tree, e.g. one NamedSharding per
    Variable): what `jit(...).lower` takes to compile for a layout without allocating it."""
    def attach(sh, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub)
    return jax.tree.map(attach, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(abstract_tree))


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Sharding of a [B, S, ...] batch: B over the data-carrying axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq") + (None,) * (len(shape) - 2), shape, mesh,
                                               rules=RULES + ((None, None),)))


# ---------------------------------------------------------------------------------------------
# ZeRO-1 (V3 report §3.2: "ZeRO-1 data parallelism"): the optimizer state, unlike the parameters,
# is also split over the data-carrying axes. Each variable keeps its parameter spec and, in
# addition, its largest still-replicated dimension is sharded over the data axes that divide it.
ZERO_AXES = ("data", "expert")


def zero1_spec(spec: P, shape, mesh: Mesh, axes=ZERO_AXES) -> P:
    """`spec` plus the largest replicated dim of `shape` sharded over the unused `axes` (all of
    them together if they divide it, else the first single axis that does)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries for a in ((e,) if isinstance(e, str) else tuple(e or ()))}
    free = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    for combo in ([free] if len(free) > 1 else []) + [(a,) for a in free]:
        size = int(np.prod([mesh.shape[a] for a in combo]))
        dims = [i for i, e in enumerate(entries) if e is None and shape[i] % size == 0]
        if dims:
            best = max(dims, key=lambda i: shape[i])
            entries[best] = combo[0] if len(combo) == 1 else combo
            return P(*entries)
    return P(*entries)


def opt_state_shardings(opt_state, mesh: Mesh):
    """NamedShardings for an optax state (or its eval_shape): every variable that carries
    logical_axes (Adam's mu/nu mirror the params) gets its ZeRO-1 spec; counters are replicated."""
    def one(leaf):
        if not isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, P())
        value = leaf.get_value()
        spec = logical_to_spec(leaf.get_metadata()["logical_axes"], value.shape, mesh)
        return NamedSharding(mesh, zero1_spec(spec, value.shape, mesh))
    return jax.tree.map(one, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
