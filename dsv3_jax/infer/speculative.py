"""MTP speculative decoding: draft with the MTP modules, verify with one main-model forward.

Shape letters: B batch, D drafted tokens per step (MTP modules used), V vocabulary, W draft
window, E `dim`.

Each step (V3 report §5.4.3 reports 85-90% acceptance of the second token and 1.8x TPS):
  1. The main model runs once over [pending, d_1 .. d_D] at positions n .. n+D (n = length).
  2. Greedy: accept the longest prefix of drafts equal to the main model's argmax; the argmax
     after it is the correction (or the bonus token when all D agree). The output is therefore
     exactly greedy decoding's.
     Sampling: speculative rejection sampling. Accept d_i with probability min(1, p_i/q_i); at
     the first rejection draw from norm(max(p_i - q_i, 0)); when all are accepted draw a bonus
     token from p_{D+1}. The emitted tokens then follow p exactly, whatever q is.
  3. Draft the next D tokens. MTP module k (V3 eq. 21-25) at position i reads the previous
     depth's hidden state at i and the embedding of token i+k, and predicts token i+k+1; the
     chain k = 1..D at the last position n'-1 gives d_1 .. d_D.

Every MTP module has its own latent cache. Its entry at position j depends on token j+k, which
was a draft until verified, and on the hidden state of the depth below at j, which for the
rejected part of the last window was computed from a wrong token. So every step recomputes the
entries of the last W = 2D positions (n'-2D .. n'-1) in all modules: the step advances by at
most D+1, and an entry leaves the window only once all its inputs were verified (j + k <= n'),
so the entries before the window are final. The main model's normalised hidden states of those
positions come from a small ring buffer (slot = position mod 4D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.infer.cache import Cache
from dsv3_jax.infer.decode import mtp_forward
from dsv3_jax.infer.sampling import (ACCEPT, DRAFT, TARGET, SamplingConfig, categorical, probabilities, sample,
                                     token_keys)
from dsv3_jax.model import Transformer


def ring_size(n_draft: int) -> int:
    """Slots of the hidden-state ring: the window (2D) plus the D+1 positions one verify writes."""
    return 4 * n_draft


def accept_greedy(target_logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """target_logits [B,D+1,V], drafts [B,D] -> accepted count a [B], tokens [B,D+1] (the first
    a+1 are emitted: a agreeing drafts, then the main model's own choice)."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    agree = (best[:, :-1] == drafts).astype(jnp.int32)
    return jnp.cumprod(agree, axis=-1).sum(axis=-1), best


def accept_sampled(p: jax.Array, q: jax.Array, drafts: jax.Array, uniform: jax.Array,
                   keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative rejection sampling. p [B,D+1,V] target and q [B,D,V] draft distributions,
    drafts [B,D] ~ q, uniform [B,D] in [0,1), keys [B,D+1] -> a [B], tokens [B,D+1]."""
    D = drafts.shape[1]
    p_d = jnp.take_along_axis(p[:, :D], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = uniform * q_d < p_d  # probability min(1, p/q)
    a = jnp.cumprod(accepted.astype(jnp.int32), axis=-1).sum(axis=-1)
    residual = jnp.maximum(p[:, :D] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # mass == 0 means p <= q everywhere, i.e. p == q: that draft is never rejected.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[:, :D])
    fresh = categorical(keys, jnp.concatenate([residual, p[:, D:]], axis=1))  # [B,D+1]
    idx = jnp.arange(D + 1)[None, :]
    tokens = jnp.where(idx < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), fresh)
    return a, tokens


def draft(model: Transformer, cache: Cache, tokens: jax.Array, h_main: jax.Array, wpos: jax.Array,
          length: jax.Array, seq_ids: jax.Array, key: jax.Array, s: SamplingConfig, *, kv_len: int,
          expand: bool = False):
    """Run the MTP chain over the window positions wpos [B,W] and draft D tokens.

    tokens [B,Tb] holds every known token by position (the pending one at `length`); h_main
    [B,W,E] is the main model's normalised hidden state at wpos. Returns the cache with the
    window's MTP entries written, tokens with d_k stored at length+k, and q [B,D,V].
    expand: expanded attention (prefill's whole-prompt window), see decode.py.
    """
    D = len(cache.mtp)
    last = (length - 1 - wpos[:, 0])[:, None, None]  # window column of position length-1
    rows = jnp.arange(tokens.shape[0])
    h, mtp, qs = h_main, [], []
    for k in range(D):
        nxt = jnp.take_along_axis(tokens, jnp.clip(wpos + k + 1, 0, tokens.shape[1] - 1), axis=1)
        h, c = mtp_forward(model, k, h, nxt, wpos, cache.mtp[k], kv_len=kv_len, expand=expand)
        h_last = jnp.take_along_axis(h, last, axis=1)  # [B,1,E]
        logits = model.project(h_last, model.mtp[k].norm)[:, 0]
        pos = length + k + 1
        d = sample(logits, token_keys(key, seq_ids, pos, DRAFT), s)
        tokens = tokens.at[rows, pos].set(d, mode="drop")
        mtp.append(c)
        qs.append(probabilities(logits, s))
    return Cache(layers=cache.layers, mtp=tuple(mtp)), tokens, jnp.stack(qs, axis=1)


def verify(target_logits: jax.Array, drafts: jax.Array, q: jax.Array | None, length: jax.Array,
           seq_ids: jax.Array, key: jax.Array, s: SamplingConfig):
    """target_logits [B,D+1,V] at positions length..length+D -> accepted a [B], tokens [B,D+1]."""
    D = drafts.shape[1]
    if s.greedy:
        return accept_greedy(target_logits, drafts)
    new_pos = length[:, None] + 1 + jnp.arange(D + 1)  # the positions the tokens will occupy
    if D == 0:  # plain decoding
        keys = token_keys(key, seq_ids, new_pos[:, 0], TARGET)
        return jnp.zeros_like(length), sample(target_logits[:, 0], keys, s)[:, None]
    uniform = jax.vmap(jax.random.uniform)(token_keys(key, seq_ids, new_pos[:, :D], ACCEPT).reshape(-1))
    return accept_sampled(probabilities(target_logits, s), q, drafts, uniform.reshape(drafts.shape),
                          token_keys(key, seq_ids, new_pos, TARGET))
