"""Which manual mesh axes a value varies over, inside `jax.shard_map` (jax's "vma" typing).

A `lax.scan` carry or the branches of a `lax.cond` must vary over the same axes as the values the
body computes from; a fresh `jnp.zeros` varies over none. `vary_like` gives fresh values the
varying axes of reference values (outside a shard_map it is a no-op).
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over (jax 0.12 keeps them in the aval's `mat`, 0.11 in `vma`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def vary_like(tree, *refs):
    """tree with every leaf varying over the union of the axes the leaves of `refs` vary over."""
    axes = set().union(*(varying_axes(r) for r in jax.tree.leaves(refs)))

    def one(x):  # pcast only the axes x does not already vary over (pcast rejects the others)
        missing = tuple(sorted(axes - varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(one, tree)
