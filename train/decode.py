"""Greedy and beam search under jit, over any cached step function.

The decoders never see a model. They call

    step(params, tokens [n, t], mask [n, S], cache) -> (logits [n, t, V], cache)

where `S = prompt_len + max_new_tokens` is the fixed length of the whole decode window and `mask` marks the
window positions that hold real tokens (left padding of the prompt is 0; the tokens fed in this call are 1).
With a cache, the prompt is fed once ("prefill", t = prompt_len) and then one token per call (t = 1); the
step writes at its own cache index. Without a cache (`init_cache=None`), every call gets the whole window
[n, S] and `cache=None`, and the decoder reads the logits at the last written position: slow, but the
reference that the cached path must equal. Every array leaf of a cache has the batch as axis 0, so beams
are reordered with `tree_map(lambda x: x[rows], cache)`.

Beam search follows Hugging Face's `num_beams` semantics: each step ranks the max(2, 1 + #eos) * k best
(beam, token) continuations of the k running beams; an end-of-sequence continuation among the top k becomes a finished
hypothesis scored `sum_logprobs / generated_len ** length_penalty` (generated_len counts the eos); the k
best non-eos continuations keep running; a batch row is done once it holds k finished hypotheses and no
running beam can still beat the worst of them (an exact bound, so stopping early never changes the result);
beams still running at `max_new_tokens` are added to the finished pool. `no_repeat_ngram_size` bans any
token that would repeat an n-gram of the generated tokens (the prompt is not included, as in LoRA's
gpt2_beam.py, so table values can still be copied). All shapes are fixed: one `lax.while_loop` over the new
tokens, stopping when every row is done, so a jitted decoder compiles once per prompt shape.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
InitCacheFn = Callable[[int, int], Any]


class BeamResult(NamedTuple):
    """Finished hypotheses of a beam search, best first.

    tokens: [b, k, max_new_tokens] generated tokens (eos included), pad after the end.
    scores: [b, k] length-penalised log-probabilities; -inf marks an empty slot.
    """

    tokens: jax.Array
    scores: jax.Array


def banned_tokens(generated: jax.Array, cur: jax.Array, ngram: int, vocab: int) -> jax.Array:
    """Tokens that would repeat an n-gram already present in the generated tokens.

    Args:
      generated: [n, T] generated tokens; positions >= cur are not yet written.
      cur: scalar int, how many tokens are written.
      ngram: no_repeat_ngram_size; 0 disables.
      vocab: vocabulary size V.

    Returns:
      [n, V] bool, True where token w at position cur would complete an n-gram
      (generated[cur-ngram+1:cur], w) that occurs in generated[:cur].
    """
    n, t_max = generated.shape
    if ngram <= 0 or t_max < ngram:
        return jnp.zeros((n, vocab), bool)
    k = ngram - 1
    starts = jnp.arange(t_max - k)  # [J] window starts j: n-gram generated[j : j+ngram]
    windows = generated[:, starts[:, None] + jnp.arange(k)[None, :]]  # [n, J, k]
    suffix = lax.dynamic_slice_in_dim(generated, jnp.maximum(cur - k, 0), k, axis=1)  # [n, k]
    follow = generated[:, starts + k]  # [n, J] the token that completed each n-gram
    written = starts + k < cur  # [J] the whole n-gram lies in generated[:cur]
    hit = jnp.all(windows == suffix[:, None, :], axis=-1) & written[None, :]  # [n, J]
    counts = jnp.zeros((n, vocab), jnp.int32).at[jnp.arange(n)[:, None], follow].add(hit.astype(jnp.int32))
    return counts > 0


def _next_logprobs(logits, generated, cur, ngram):
    """log_softmax of [n, V] logits in float32 with repeated n-grams set to -inf."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.where(banned_tokens(generated, cur, ngram, logp.shape[-1]), -jnp.inf, logp)


def _is_eos(tokens, eos_ids):
    return jnp.isin(tokens, jnp.asarray(list(eos_ids), tokens.dtype)) if eos_ids else jnp.zeros_like(tokens, bool)


def _prefill(step, params, seq, mask, prompt_len, init_cache):
    """Logits [n, V] for the first new token and the cache after the prompt."""
    if init_cache is None:
        logits, _ = step(params, seq, mask, None)  # [n, S, V]
        return logits[:, prompt_len - 1], None
    cache = init_cache(seq.shape[0], seq.shape[1])
    logits, cache = step(params, seq[:, :prompt_len], mask, cache)  # [n, P, V]
    return logits[:, -1], cache


def _advance(step, params, seq, mask, cache, pos, cached):
    """Logits [n, V] after the token just written at window position `pos`."""
    if not cached:
        logits, _ = step(params, seq, mask, None)  # [n, S, V]
        return lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), None
    tokens = lax.dynamic_slice_in_dim(seq, pos, 1, axis=1)  # [n, 1]
    logits, cache = step(params, tokens, mask, cache)
    return logits[:, -1], cache


def _write(x, pos, values):
    """x [n, S] with column `pos` set to values [n]."""
    return lax.dynamic_update_slice_in_dim(x, values[:, None].astype(x.dtype), pos, axis=1)


def _window(prompt, prompt_mask, max_new_tokens, pad_id):
    b = prompt.shape[0]
    seq = jnp.concatenate([prompt, jnp.full((b, max_new_tokens), pad_id, prompt.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    return seq, mask


def greedy_search(
    step: StepFn,
    params: Any,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    init_cache: InitCacheFn | None = None,
    no_repeat_ngram_size: int = 0,
) -> jax.Array:
    """Greedy decoding of a left-padded batch of prompts.

    Args:
      step: the model step (module docstring).
      params: passed to `step` unchanged.
      prompt: [b, P] int token ids, left-padded.
      prompt_mask: [b, P] 1 for real prompt tokens, 0 for padding.
      max_new_tokens: T, number of tokens to generate at most.
      eos_ids: tokens that end a sequence (may be empty).
      pad_id: written after a row has ended.
      init_cache: `init_cache(n, S) -> cache`, or None to decode without a cache.
      no_repeat_ngram_size: ban repeats of generated n-grams of this size (0: off).

    Returns:
      [b, T] generated tokens, each row cut after its first eos and padded with pad_id.
    """
    p = prompt.shape[1]
    seq, mask = _window(prompt, prompt_mask, max_new_tokens, pad_id)
    logits, cache = _prefill(step, params, seq, mask, p, init_cache)

    def cond(state):
        i, _, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, seq, mask, logits, cache, done = state
        logp = _next_logprobs(logits, seq[:, p:], i, no_repeat_ngram_size)  # [b, V]
        token = jnp.where(done, pad_id, jnp.argmax(logp, axis=-1))
        seq, mask = _write(seq, p + i, token), _write(mask, p + i, jnp.ones_like(token))
        done = done | _is_eos(token, eos_ids)
        logits, cache = _advance(step, params, seq, mask, cache, p + i, init_cache is not None)
        return i + 1, seq, mask, logits, cache, done

    done = jnp.zeros(prompt.shape[0], bool)
    state = lax.while_loop(cond, body, (jnp.int32(0), seq, mask, logits, cache, done))
    return state[1][:, p:]


def _length_norm(length, length_penalty):
    return jnp.asarray(length, jnp.float32) ** length_penalty


def _top_k_merge(scores_a, tokens_a, scores_b, tokens_b, k):
    """The k best of two pools: scores [b, ka], [b, kb]; tokens [b, ka, T], [b, kb, T]."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    tokens = jnp.concatenate([tokens_a, tokens_b], axis=1)
    best, idx = lax.top_k(scores, k)  # [b, k]
    return best, jnp.take_along_axis(tokens, idx[:, :, None], axis=1)


def beam_search(
    step: StepFn,
    params: Any,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    init_cache: InitCacheFn | None = None,
) -> BeamResult:
    """Beam search (Hugging Face semantics, module docstring) for a left-padded batch of prompts.

    Args:
      step, params, prompt [b, P], prompt_mask [b, P], max_new_tokens, eos_ids, pad_id, init_cache,
        no_repeat_ngram_size: as in `greedy_search`.
      num_beams: k, beams per prompt.
      length_penalty: finished scores are sum_logprobs / generated_len ** length_penalty.

    Returns:
      BeamResult with tokens [b, k, T] and scores [b, k], best hypothesis first.
    """
    b, p = prompt.shape
    k, t_max = num_beams, max_new_tokens
    seq, mask = _window(prompt, prompt_mask, t_max, pad_id)
    logits, cache = _prefill(step, params, seq, mask, p, init_cache)  # once per prompt, then copied
    repeat = functools.partial(jnp.repeat, repeats=k, axis=0)  # [b, ...] -> [b*k, ...]
    seq, mask, logits, cache = repeat(seq), repeat(mask), repeat(logits), jax.tree.map(repeat, cache)
    # Only beam 0 is live at the start, so the first step expands one copy of each prompt.
    run_scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))  # [b, k]
    fin_scores = jnp.full((b, k), -jnp.inf)
    fin_tokens = jnp.full((b, k, t_max), pad_id, seq.dtype)

    def cond(state):
        return (state[0] < t_max) & ~jnp.all(state[-1])

    def body(state):
        i, seq, mask, logits, cache, run_scores, fin_scores, fin_tokens, done = state
        generated = seq[:, p:]  # [b*k, T]
        logp = _next_logprobs(logits, generated, i, no_repeat_ngram_size)  # [b*k, V]
        vocab = logp.shape[-1]
        cand = (run_scores[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
        # Enough candidates that k are not eos even if every beam ranks all eos ids on top (HF's rule).
        n_cand = min(max(2, 1 + len(eos_ids)) * k, k * vocab)
        top_scores, top_idx = lax.top_k(cand, n_cand)  # [b, c]
        parent, token = top_idx // vocab, top_idx % vocab  # [b, c]
        eos = _is_eos(token, eos_ids)
        # Finished: eos continuations ranked in the top k, scored with the length penalty.
        parent_gen = jnp.take_along_axis(generated.reshape(b, k, t_max), parent[:, :, None], axis=1)
        cand_gen = jnp.where(jnp.arange(t_max) == i, token[:, :, None], parent_gen)  # [b, c, T]
        new_fin = eos & (jnp.arange(n_cand) < k)[None, :] & ~done[:, None]
        new_fin_scores = jnp.where(new_fin, top_scores / _length_norm(i + 1, length_penalty), -jnp.inf)
        fin_scores, fin_tokens = _top_k_merge(fin_scores, fin_tokens, new_fin_scores, cand_gen, k)
        # Running: the k best non-eos continuations; reorder rows of the window and the cache.
        run_scores, pick = lax.top_k(jnp.where(eos, -jnp.inf, top_scores), k)  # [b, k]
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, pick, axis=1)).reshape(-1)
        new_token = jnp.take_along_axis(token, pick, axis=1).reshape(-1)  # [b*k]
        seq = _write(seq[rows], p + i, new_token)
        mask = _write(mask[rows], p + i, jnp.ones_like(new_token))
        cache = jax.tree.map(lambda x: x[rows], cache)
        # Done: k finished and no running beam can beat the worst (log-probs only fall as beams grow).
        best_run = run_scores[:, 0]
        if length_penalty > 0:
            bound = best_run / _length_norm(t_max, length_penalty)
        else:
            # The next finished length is i + 2, or t_max for beams still running at the end.
            bound = best_run / _length_norm(jnp.minimum(i + 2, t_max), length_penalty)
        full = jnp.all(fin_scores > -jnp.inf, axis=1)
        done = done | (full & (fin_scores[:, -1] >= bound))
        logits, cache = _advance(step, params, seq, mask, cache, p + i, init_cache is not None)
        return i + 1, seq, mask, logits, cache, run_scores, fin_scores, fin_tokens, done

    state = (jnp.int32(0), seq, mask, logits, cache, run_scores, fin_scores, fin_tokens, jnp.zeros(b, bool))
    _, seq, _, _, _, run_scores, fin_scores, fin_tokens, done = lax.while_loop(cond, body, state)
    # Rows not done ran to max_new_tokens: their running beams join the finished pool.
    last = jnp.where(done[:, None], -jnp.inf, run_scores / _length_norm(t_max, length_penalty))
    fin_scores, fin_tokens = _top_k_merge(fin_scores, fin_tokens, last, seq[:, p:].reshape(b, k, t_max), k)
    return BeamResult(fin_tokens, fin_scores)


def model_step(apply_fn: Callable[..., Any]) -> StepFn:
    """The step function of an mtlora_jax.models decoder (GPT-2, Llama).

    Args:
      apply_fn: `module.apply`, or `mt.apply(module.apply)` for adapted params; called as
        `apply_fn({"params": params}, input_ids [n, t], attention_mask [n, t], cache=cache)`.

    Returns:
      step(params, tokens, mask [n, S], cache): the model's attention_mask covers only the fed tokens,
      read from the window mask at the cache's write index (its cache keeps the mask of earlier slots).
    """

    def step(params, tokens, mask, cache):
        if cache is None:
            return apply_fn({"params": params}, tokens, mask), None
        fed = lax.dynamic_slice_in_dim(mask, cache["index"][0], tokens.shape[1], axis=1)  # [n, t]
        return apply_fn({"params": params}, tokens, fed, cache=cache)

    return step


def model_init_cache(module: Any, dtype: Any = jnp.float32) -> InitCacheFn:
    """`init_cache(n, max_length)` for an mtlora_jax.models decoder, k/v stored in `dtype`."""
    from mtlora_jax import models

    return lambda n, max_length: models.init_cache(module, n, max_length, dtype=dtype)
