"""MTP speculative decoding: draft with the MTP modules, verify with one main-model forward.

Shape letters (the package legend): B batch, A drafted tokens per step (MTP modules used),
V vocabulary, W draft window, D `dim`, Tb token-buffer length.

Each step (V3 report §5.4.3 reports 85-90% acceptance of the second token and 1.8x TPS):
  1. The main model runs once over [pending, d_1 .. d_A] at positions n .. n+A (n = length).
  2. Greedy rows: accept the longest prefix of drafts equal to the main model's argmax; the
     argmax after it is the correction (or the bonus token when all A agree). The output is
     therefore exactly greedy decoding's.
     Sampled rows (each with its own setting, `sampling.RowSampling`): speculative rejection
     sampling. Accept d_i with probability min(1, p_i/q_i); at the first rejection draw from
     norm(max(p_i - q_i, 0)); when all are accepted draw a bonus token from p_{A+1}. The emitted
     tokens then follow p exactly, whatever q is.
  3. Draft the next A tokens. MTP module k (V3 eq. 21-25) at position i reads the previous
     depth's hidden state at i and the embedding of token i+k, and predicts token i+k+1; the
     chain k = 1..A at the last position n'-1 gives d_1 .. d_A.

Every MTP module has its own latent cache. Its entry at position j depends on token j+k, which
was a draft until verified, and on the hidden state of the depth below at j, which for the
rejected part of the last window was computed from a wrong token. So every step recomputes the
entries of the last W = 2A positions (n'-2A .. n'-1) in all modules: the step advances by at
most A+1, and an entry leaves the window only once all its inputs were verified (j + k <= n'),
so the entries before the window are final. The main model's normalised hidden states of those
positions come from a small ring buffer (slot = position mod 4A).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.cache import Cache
from dsv3_jax.infer.sampling import ACCEPT, DRAFT, TARGET, RowSampling, categorical, probabilities, sample, token_keys
from dsv3_jax.model import Transformer


def ring_size(n_draft: int) -> int:
    """Slots of the hidden-state ring: the window (2A) plus the A+1 positions one verify writes."""
    return 4 * n_draft


def accept_greedy(target_logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """target_logits [B,A+1,V], drafts [B,A] -> accepted count a [B], tokens [B,A+1] (the first
    a+1 are emitted: a agreeing drafts, then the main model's own choice)."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    agree = (best[:, :-1] == drafts).astype(jnp.int32)
    return jnp.cumprod(agree, axis=-1).sum(axis=-1), best


def accept_sampled(p: jax.Array, q: jax.Array, drafts: jax.Array, uniform: jax.Array,
                   keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative rejection sampling. p [B,A+1,V] target and q [B,A,V] draft distributions,
    drafts [B,A] ~ q, uniform [B,A] in [0,1), keys [B,A+1] -> a [B], tokens [B,A+1]."""
    A = drafts.shape[1]
    p_d = jnp.take_along_axis(p[:, :A], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = uniform * q_d < p_d  # probability min(1, p/q)
    a = jnp.cumprod(accepted.astype(jnp.int32), axis=-1).sum(axis=-1)
    residual = jnp.maximum(p[:, :A] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # mass == 0 means p <= q everywhere, i.e. p == q: that draft is never rejected.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[:, :A])
    fresh = categorical(keys, jnp.concatenate([residual, p[:, A:]], axis=1))  # [B,A+1]
    idx = jnp.arange(A + 1)[None, :]
    tokens = jnp.where(idx < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), fresh)
    return a, tokens


def draft(model: Transformer, cache: Cache, tokens: jax.Array, h_main: jax.Array, wpos: jax.Array,
          length: jax.Array, seq_ids: jax.Array, key: jax.Array, rs: RowSampling, *, form: str,
          kv_len: int | None = None):
    """Run the MTP chain over the window positions wpos [B,W] and draft A tokens.

    tokens [B,Tb] holds every known token by position (the pending one at `length`); h_main
    [B,W,D] is the main model's normalised hidden state at wpos. Returns the cache with the
    window's MTP entries written, tokens with d_k stored at length+k, and q [B,A,V] (one-hot for
    greedy rows: any row of the batch may sample, so q is kept for all of them).
    form: "expanded" for prefill's whole-prompt window, "absorbed" for a decode step (mla.py).
    kv_len: cache slots attended (default all), as Transformer.forward_cached.
    """
    last = (length - 1 - wpos[:, 0])[:, None, None]  # window column of position length-1
    rows = jnp.arange(tokens.shape[0])
    qs = []
    drafted = tokens

    def sample_draft(k, h, tokens):
        """After module k: sample d_k from its logits at position length-1, store it at length+k."""
        nonlocal drafted
        logits = model.logits(jnp.take_along_axis(h, last, axis=1), model.mtp[k - 1].norm)[:, 0]
        pos = length + k
        qs.append(probabilities(logits, rs))
        drafted = tokens.at[rows, pos].set(sample(logits, token_keys(key, seq_ids, pos, DRAFT), rs), mode="drop")
        return drafted

    ctx = model.context(wpos, kv_len=kv_len or cache.slots)
    _, _, mtp = model.mtp_chain(h_main, tokens, ctx, cache.mtp, depth=len(cache.mtp), form=form,
                                after_depth=sample_draft)
    return Cache(layers=cache.layers, mtp=mtp), drafted, jnp.stack(qs, axis=1)


def verify(target_logits: jax.Array, drafts: jax.Array, q: jax.Array | None, length: jax.Array,
           seq_ids: jax.Array, key: jax.Array, rs: RowSampling) -> tuple[jax.Array, jax.Array]:
    """target_logits [B,A+1,V] at positions length..length+A, drafts [B,A] drawn from q [B,A,V]
    (None when A = 0) -> accepted a [B], tokens [B,A+1]. Greedy rows take the exact-match rule,
    sampled rows rejection sampling; the rejection work runs only when some row samples."""
    A = drafts.shape[1]
    new_pos = length[:, None] + 1 + jnp.arange(A + 1)  # the positions the tokens will occupy
    if A == 0:  # plain decoding
        keys = token_keys(key, seq_ids, new_pos[:, 0], TARGET)
        return jnp.zeros_like(length), sample(target_logits[:, 0], keys, rs)[:, None]
    a_greedy, greedy = accept_greedy(target_logits, drafts)

    def rejection(_):
        uniform = jax.vmap(jax.random.uniform)(token_keys(key, seq_ids, new_pos[:, :A], ACCEPT).reshape(-1))
        a, tokens = accept_sampled(probabilities(target_logits, rs), q, drafts, uniform.reshape(drafts.shape),
                                   token_keys(key, seq_ids, new_pos, TARGET))
        hot = rs.temperature > 0
        return jnp.where(hot, a, a_greedy), jnp.where(hot[:, None], tokens, greedy)

    return jax.lax.cond(jnp.any(rs.temperature > 0), rejection, lambda _: (a_greedy, greedy), None)
