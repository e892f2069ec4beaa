"""Logical axis names -> mesh axes: the one rules table, and helpers that apply it.

The mesh has DeepSeek's training axes (V3 report §3.2: PP16 x EP64 x ZeRO-1 DP, no tensor
parallelism): `data`, `pipeline`, `expert`. Model code never names a mesh axis; every parameter
carries logical names (`logical_axes` metadata) and activations are constrained at block
boundaries with `batch`/`seq`/`act_embed`. The expert axis also carries data parallelism for
the non-expert parts, as in DeepSeek's EP64.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "pipeline", "expert")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # activations: data parallel over data and expert
    ("layers", "pipeline"),  # stacked decoder layers -> pipeline stages
    ("exp", "expert"),  # routed experts -> expert parallel
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
        raise ValueError(f"mesh data={data} x pipeline={pipeline} x expert={expert} = {need} devices, "
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


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Sharding of a [B, S, ...] batch: B over the data-carrying axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq") + (None,) * (len(shape) - 2), shape, mesh,
                                               rules=RULES + ((None, None),)))
