"""Token-by-token generation from one prompt with the decoders' KV cache: greedy or sampled, streamed.

`Generator(module, params, ...)` merges the adapters once (`mt.merge`) and unstacks scanned layers, so each
token costs one plain decoder step. A prompt is left-padded to a multiple of `prompt_multiple` tokens (one
prefill compile per length class; the step compiles once), the cache holds that plus `max_new_tokens`.
`stream(prompt_ids, sampling)` yields token ids as they are produced and stops after a stop token (not
yielded) or `max_new_tokens`.

Sampling (`Sampling`): temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature,
cut to the `top_k` most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`
(nucleus sampling, Holtzman et al. 2020), and sampled with `jax.random.key(seed)` split once per token, so a
seed gives the same text every time.
"""

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mtlora_jax as mt
from mtlora_jax import models


class Sampling(NamedTuple):
    """How the next token is chosen: temperature 0 = greedy; top_k 0 = no cut; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


GREEDY = Sampling()


def check_sampling(s: Sampling) -> Sampling:
    """Raises ValueError naming the flag of a bad value."""
    if s.temperature < 0:
        raise ValueError(f"--temperature={s.temperature}: expected >= 0 (0 = greedy)")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"--top_p={s.top_p}: expected in (0, 1]")
    if s.top_k < 0:
        raise ValueError(f"--top_k={s.top_k}: expected >= 0 (0 = no cut)")
    return s


def plain_decoder(module, params):
    """(unrolled module, plain params) for decoding: adapters merged into W, scanned layers unstacked."""
    plain = mt.merge(params)
    if not getattr(module, "scan_layers", False):
        return module, plain
    return module.clone(scan_layers=False), models.unstack_params(plain, models.family(module))


def pick(logits: jax.Array, key: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """The next token (int32 scalar) from logits [V] (module docstring)."""
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    ordered, index = jax.lax.top_k(logits / jnp.maximum(temperature, 1e-6), vocab)  # descending
    keep = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
    probs = jax.nn.softmax(jnp.where(keep, ordered, -jnp.inf))
    keep &= (jnp.cumsum(probs) - probs) < top_p  # mass before this token < top_p: the first always stays
    sampled = index[jax.random.categorical(key, jnp.where(keep, ordered, -jnp.inf))]
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


def choose(logits: jax.Array, key: jax.Array, knobs, greedy: bool) -> jax.Array:
    """`pick`, or a plain argmax when decoding is greedy (no sort of the vocabulary per token)."""
    return jnp.argmax(logits).astype(jnp.int32) if greedy else pick(logits, key, *knobs)


_choose = jax.jit(choose, static_argnums=3)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(module, params, ids, mask, cache):
    """Logits [V] after the left-padded prompt ids [1, P] (mask [1, P]) and the cache holding it."""
    logits, cache = module.apply({"params": params}, ids, mask, cache=cache)
    return logits[0, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=3)
def _step(module, params, token, cache, key, knobs, greedy: bool):
    """The next token after `token` (scalar) and the cache holding it (module-level: compiled once per model)."""
    logits, cache = module.apply({"params": params}, token[None, None], None, cache=cache)
    return choose(logits[0, -1], key, knobs, greedy), cache


class Generator:
    """Streams the tokens a decoder generates for one prompt at a time (module docstring).

    Args:
      module: a GPT-2 / Llama module (scan_layers or not). params: its params, adapted or plain.
      stop_ids: tokens that end the answer. max_new_tokens: most tokens per answer.
      pad_id: the left-padding token. prompt_multiple: prompts are padded to a multiple of this.
    """

    def __init__(self, module, params, *, stop_ids: Sequence[int], max_new_tokens: int, pad_id: int,
                 prompt_multiple: int = 64):  # fmt: skip
        self.module, self.params = plain_decoder(module, params)
        self.stop_ids, self.max_new_tokens = frozenset(int(i) for i in stop_ids), max_new_tokens
        self.pad_id, self.prompt_multiple = pad_id, prompt_multiple
        self.dtype = getattr(self.module, "dtype", jnp.float32)

    def stream(self, prompt: Sequence[int], sampling: Sampling = GREEDY) -> Iterator[int]:
        """Yields the generated token ids of `prompt` one by one (the stop token not included)."""
        if not prompt:
            raise ValueError("an empty prompt")
        width = -(-len(prompt) // self.prompt_multiple) * self.prompt_multiple
        ids = np.full((1, width), self.pad_id, np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - len(prompt) :], mask[0, width - len(prompt) :] = prompt, 1
        cache = models.init_cache(self.module, 1, width + self.max_new_tokens, dtype=self.dtype)
        logits, cache = _prefill(self.module, self.params, jnp.asarray(ids), jnp.asarray(mask), cache)
        key = jax.random.key(sampling.seed)
        knobs = (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p), jnp.int32(sampling.top_k))
        key, sub = jax.random.split(key)
        greedy = sampling.temperature == 0
        token = int(_choose(logits, sub, knobs, greedy))
        for i in range(self.max_new_tokens):
            if token in self.stop_ids:
                return
            yield token
            if i + 1 == self.max_new_tokens:
                return
            if not greedy:  # greedy decoding never reads the key
                key, sub = jax.random.split(key)
            next_token, cache = _step(self.module, self.params, jnp.int32(token), cache, sub, knobs, greedy)
            token = int(next_token)

    def generate(self, prompt: Sequence[int], sampling: Sampling = GREEDY) -> list[int]:
        """All generated token ids of `prompt` (stop token not included)."""
        return list(self.stream(prompt, sampling))
