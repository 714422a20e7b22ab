"""Tests for train/decode.py on a tiny hand-written model with a trivially correct cache.

The toy model scores the next token from the last two real tokens and the position:
logits = table[prev, cur] + pos_emb[position], where position counts real (unmasked) tokens. The reference
for every test is numpy: the same model evaluated token by token on the plain history, exhaustive
enumeration for beam search, and a direct loop for greedy decoding and n-gram bans.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import decode

VOCAB, EOS, PAD = 5, 4, 0


def toy_params(seed, vocab=VOCAB, max_len=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"table": 2.0 * jax.random.normal(k1, (vocab, vocab, vocab)), "pos": jax.random.normal(k2, (max_len, vocab))}


def toy_step(params, tokens, mask, cache):
    """Step function of the toy model: tokens [n, t], mask [n, S] -> logits [n, t, V]."""
    table, pos_emb = params["table"], params["pos"]
    if cache is None:  # the whole window [n, S]
        prev = jnp.where(mask[:, :-1] > 0, tokens[:, :-1], 0)
        prev = jnp.concatenate([jnp.zeros_like(prev[:, :1]), prev], axis=1)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return table[prev, tokens] + pos_emb[pos], None
    last, count, index = cache["last"], cache["count"], cache["index"]
    outs = []
    for j in range(tokens.shape[1]):
        real = jnp.take_along_axis(mask, (index + j)[:, None], axis=1)[:, 0] > 0
        outs.append(table[last, tokens[:, j]] + pos_emb[count])
        last = jnp.where(real, tokens[:, j], last)
        count = count + real.astype(count.dtype)
    return jnp.stack(outs, axis=1), {"last": last, "count": count, "index": index + tokens.shape[1]}


def toy_init_cache(n, max_len):
    del max_len
    zeros = jnp.zeros((n,), jnp.int32)
    return {"last": zeros, "count": zeros, "index": zeros}


def np_logprobs(params, history):
    """numpy log-softmax of the toy model's next-token logits after the real tokens `history`."""
    table, pos_emb = np.asarray(params["table"], np.float64), np.asarray(params["pos"], np.float64)
    prev = history[-2] if len(history) >= 2 else 0
    logits = table[prev, history[-1]] + pos_emb[len(history) - 1]
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def repeats_ngram(seq, ngram):
    """True if the last token of seq completes an n-gram that already occurred earlier in seq."""
    if ngram <= 0 or len(seq) < ngram:
        return False
    last = tuple(seq[-ngram:])
    return any(tuple(seq[j : j + ngram]) == last for j in range(len(seq) - ngram))


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), PAD, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def exhaustive_best(params, prompt, max_new, length_penalty, ngram):
    """Best length-penalised hypothesis over all continuations (numpy enumeration)."""
    best, best_seq = -np.inf, None
    for length in range(1, max_new + 1):
        for seq in itertools.product(range(VOCAB), repeat=length):
            if EOS in seq[:-1] or (length < max_new and seq[-1] != EOS):
                continue
            total, ok = 0.0, True
            for t in range(length):
                if repeats_ngram(seq[: t + 1], ngram):
                    ok = False
                    break
                total += np_logprobs(params, list(prompt) + list(seq[:t]))[seq[t]]
            score = total / length**length_penalty
            if ok and score > best:
                best, best_seq = score, seq
    return best, best_seq


def np_beam_search(params, prompt, num_beams, max_new, length_penalty, ngram, eos_ids):
    """Plain-Python beam search with Hugging Face's rules and no early stop: the finished top k, best first."""
    running, finished = [(0.0, [])], []
    for i in range(max_new):
        cands = []
        for total, toks in running:
            logp = np_logprobs(params, list(prompt) + toks)
            cands += [(total + logp[w], toks + [w]) for w in range(VOCAB) if not repeats_ngram(toks + [w], ngram)]
        cands = sorted(cands, key=lambda c: -c[0])[: max(2, 1 + len(eos_ids)) * num_beams]
        running = []
        for rank, (total, toks) in enumerate(cands):
            if toks[-1] in eos_ids:
                if rank < num_beams:
                    finished.append((total / (i + 1) ** length_penalty, toks))
            elif len(running) < num_beams:
                running.append((total, toks))
    finished += [(total / max_new**length_penalty, toks) for total, toks in running]
    return sorted(finished, key=lambda c: -c[0])[:num_beams]


def np_greedy(params, prompt, max_new, ngram):
    out = []
    for _ in range(max_new):
        logp = np_logprobs(params, list(prompt) + out)
        for w in range(VOCAB):
            if repeats_ngram(out + [w], ngram):
                logp[w] = -np.inf
        out.append(int(np.argmax(logp)))
        if out[-1] == EOS:
            break
    return out + [PAD] * (max_new - len(out))


def test_banned_tokens_matches_python_loop():
    """banned[r, w] == (generated[r, :cur] + [w]) repeats one of its n-grams."""
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 3, size=(6, 9)).astype(np.int32)
    for ngram in (1, 2, 3):
        banned = jax.jit(functools.partial(decode.banned_tokens, ngram=ngram, vocab=4))
        for cur in range(0, 10):
            got = np.asarray(banned(jnp.asarray(gen), jnp.int32(cur)))
            want = [[repeats_ngram(list(row[:cur]) + [w], ngram) for w in range(4)] for row in gen]
            np.testing.assert_array_equal(got, np.array(want), err_msg=f"ngram={ngram} cur={cur}")


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_matches_numpy(ngram):
    """Greedy tokens equal a numpy argmax loop on the plain history, per row of a left-padded batch."""
    params = toy_params(1)
    prompts = [[1, 2, 3], [2], [3, 1]]
    ids, mask = left_pad(prompts)
    fn = jax.jit(
        functools.partial(
            decode.greedy_search,
            toy_step,
            max_new_tokens=6,
            eos_ids=(EOS,),
            pad_id=PAD,
            init_cache=toy_init_cache,
            no_repeat_ngram_size=ngram,
        )
    )
    got = np.asarray(fn(params, ids, mask))
    for r, p in enumerate(prompts):
        assert got[r].tolist() == np_greedy(params, p, 6, ngram)


@pytest.mark.parametrize("length_penalty,ngram", [(0.0, 0), (1.0, 0), (0.8, 2), (-0.5, 2)])
def test_beam_search_equals_exhaustive_search(length_penalty, ngram):
    """With k >= every candidate sequence, beam search returns argmax_seq sum(log p) / len**lp."""
    max_new = 4
    prompts = [[1, 2], [3]]
    ids, mask = left_pad(prompts)
    search = jax.jit(
        functools.partial(
            decode.beam_search,
            toy_step,
            num_beams=VOCAB**max_new,
            max_new_tokens=max_new,
            eos_ids=(EOS,),
            pad_id=PAD,
            length_penalty=length_penalty,
            no_repeat_ngram_size=ngram,
            init_cache=toy_init_cache,
        )
    )
    for seed in range(3):
        params = toy_params(seed + 10)
        result = search(params, ids, mask)
        for r, p in enumerate(prompts):
            best, best_seq = exhaustive_best(params, p, max_new, length_penalty, ngram)
            got = np.asarray(result.tokens[r, 0]).tolist()
            assert got == list(best_seq) + [PAD] * (max_new - len(best_seq)), (seed, r)
            np.testing.assert_allclose(float(result.scores[r, 0]), best, rtol=1e-5)
            scores = np.asarray(result.scores[r])
            assert np.all(scores[:-1] >= scores[1:])  # best first


@pytest.mark.parametrize(
    "num_beams,length_penalty,eos_ids",
    [(2, 0.8, (EOS, 1)), (3, 0.0, (EOS,)), (3, 1.5, (EOS, 1)), (2, 1.0, (EOS, 1, 2))],
)
def test_beam_search_matches_python_reference(num_beams, length_penalty, eos_ids):
    """Small beams prune as the plain-Python reference does: all k finished hypotheses and scores agree."""
    prompts = [[1, 2, 3], [2]]
    ids, mask = left_pad(prompts)
    search = jax.jit(
        functools.partial(
            decode.beam_search,
            toy_step,
            num_beams=num_beams,
            max_new_tokens=7,
            eos_ids=eos_ids,
            pad_id=PAD,
            length_penalty=length_penalty,
            no_repeat_ngram_size=2,
            init_cache=toy_init_cache,
        )
    )
    for seed in range(3):
        params = toy_params(seed + 30)
        # Favour the eos ids, so that often more than k of the top candidates end.
        params["pos"] = params["pos"].at[:, list(eos_ids)].add(1.5)
        result = search(params, ids, mask)
        for r, p in enumerate(prompts):
            want = np_beam_search(params, p, num_beams, 7, length_penalty, 2, eos_ids)
            for j, (score, toks) in enumerate(want):
                assert np.asarray(result.tokens[r, j]).tolist() == toks + [PAD] * (7 - len(toks)), (seed, r, j)
                np.testing.assert_allclose(float(result.scores[r, j]), score, rtol=1e-5, atol=1e-6)


def test_beam_one_equals_greedy():
    """num_beams=1 (no length normalisation) picks the argmax token each step, like greedy."""
    prompts = [[1, 2, 3], [2], [3, 1]]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=8, eos_ids=(EOS,), pad_id=PAD, init_cache=toy_init_cache, no_repeat_ngram_size=3)
    greedy_fn = jax.jit(functools.partial(decode.greedy_search, toy_step, **kw))
    beam_fn = jax.jit(functools.partial(decode.beam_search, toy_step, num_beams=1, length_penalty=0.0, **kw))
    for seed in range(4):
        params = toy_params(seed + 20)
        greedy, beam = greedy_fn(params, ids, mask), beam_fn(params, ids, mask)
        np.testing.assert_array_equal(np.asarray(beam.tokens[:, 0]), np.asarray(greedy))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached(num_beams):
    """Prefill + one token per step with the cache == recomputing the whole window every step."""
    params = toy_params(3)
    ids, mask = left_pad([[1, 2, 3, 1], [2], [3, 3]])
    kw = dict(max_new_tokens=7, eos_ids=(EOS,), pad_id=PAD, no_repeat_ngram_size=2)
    if num_beams == 1:
        cached, plain = (
            jax.jit(functools.partial(decode.greedy_search, toy_step, init_cache=c, **kw))
            for c in (toy_init_cache, None)
        )
        np.testing.assert_array_equal(np.asarray(cached(params, ids, mask)), np.asarray(plain(params, ids, mask)))
        return
    cached, plain = (
        jax.jit(
            functools.partial(decode.beam_search, toy_step, num_beams=num_beams, length_penalty=0.8, init_cache=c, **kw)
        )
        for c in (toy_init_cache, None)
    )
    b_cached, b_plain = cached(params, ids, mask), plain(params, ids, mask)
    np.testing.assert_array_equal(np.asarray(b_cached.tokens), np.asarray(b_plain.tokens))
    np.testing.assert_allclose(np.asarray(b_cached.scores), np.asarray(b_plain.scores), rtol=1e-6)


def test_batched_beam_search_equals_one_prompt_at_a_time():
    """Left padding and batching do not change any row's beams (two eos ids)."""
    params = toy_params(4)
    prompts = [[1, 2, 3, 1], [2]]
    search = jax.jit(
        functools.partial(
            decode.beam_search,
            toy_step,
            num_beams=3,
            max_new_tokens=6,
            eos_ids=(EOS, 3),
            pad_id=PAD,
            length_penalty=0.9,
            no_repeat_ngram_size=2,
            init_cache=toy_init_cache,
        )
    )
    batched = search(params, *left_pad(prompts))
    for r, p in enumerate(prompts):
        single = search(params, *left_pad([p]))
        np.testing.assert_array_equal(np.asarray(batched.tokens[r]), np.asarray(single.tokens[0]))
        np.testing.assert_allclose(np.asarray(batched.scores[r]), np.asarray(single.scores[0]), rtol=1e-6)


def tiny_decoder(family):
    from mtlora_jax import models

    if family == "gpt2":
        cfg = models.GPT2Config(
            vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=32
        )
        return models.GPT2(cfg)
    cfg = models.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        intermediate_size=32,
        max_positions=32,
    )
    return models.Llama(cfg)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_real_decoder_cached_equals_uncached(family):
    """A tiny random GPT-2 / Llama from mtlora_jax.models: KV-cache decoding == full recomputation."""
    module = tiny_decoder(family)
    ids, mask = left_pad([[5, 9, 3, 7, 1], [2, 30], [11, 12, 13]])
    params = jax.jit(module.init)(jax.random.key(0), ids, mask)["params"]
    params = jax.tree.map(lambda x: 8 * x, params)  # sharper, more varied next-token distributions
    step = decode.model_step(module.apply)
    kw = dict(num_beams=3, max_new_tokens=6, eos_ids=(EOS,), pad_id=PAD, length_penalty=0.8, no_repeat_ngram_size=2)
    with jax.default_matmul_precision("float32"):
        cached = jax.jit(functools.partial(decode.beam_search, step, init_cache=decode.model_init_cache(module), **kw))
        plain = jax.jit(functools.partial(decode.beam_search, step, init_cache=None, **kw))
        got, want = cached(params, ids, mask), plain(params, ids, mask)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-4)
    assert len({tuple(r) for r in np.asarray(got.tokens[:, 0]).tolist()}) > 1  # rows differ: not a constant model
