"""Generation eval for table-to-text: decode every distinct input of a split under jit, score, write the outputs.

Decoding runs on the merged weights W + dW (`mt.merge`: one pass before decoding, then no adapter work per
token) of the unrolled model (a `scan_layers` model is unstacked: on CPU the scanned KV cache costs ~2x per
token). Each input's prompt (`nlg_data.encode_prompt`) goes to the smallest prompt bucket that holds it (longer
prompts keep their last tokens, so the separator stays), prompts are left-padded into batches of
`eval_batch_size` (padding rows repeat a real prompt and are dropped), and one jitted decoder per bucket runs
beam search (`beam_size` > 1) or greedy search with the KV cache over at most `max_new_tokens`. Texts are cut
at the first stop token (eos, or "\\n\\n" when it is one token) and decoded with the model's tokenizer.
"""

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import jax
import numpy as np
import tqdm
from absl import logging

import mtlora_jax as mt
from mtlora_jax import models
from train import decode, placement
from train import mesh as mesh_lib
from train.nlg import data as nlg_data
from train.nlg import metrics as nlg_metrics


def decode_params(module, params):
    """(unrolled module, plain params) for decoding: adapters merged into W, scanned layers unstacked.

    Args:
      module: the GPT-2 / Llama module used for training (scan_layers or not).
      params: its full param tree, with or without `mt.Adapted` leaves.
    """
    plain = mt.merge(params)
    if not module.scan_layers:
        return module, plain
    return module.clone(scan_layers=False), models.unstack_params(plain, models.family(module))


def _bucket_of(prompts: Sequence[list[int]], buckets: Sequence[int]) -> np.ndarray:
    """[n] the bucket of each prompt: the smallest that holds it, else the last (longer prompts keep their end)."""
    lengths = np.asarray([len(p) for p in prompts])
    return np.minimum(np.searchsorted(np.asarray(buckets), lengths), len(buckets) - 1)


def prompt_batches(
    prompts: Sequence[list[int]], buckets: Sequence[int], batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Left-padded prompt batches, bucket by bucket, inputs in order within a bucket.

    Args:
      prompts: token ids per input. buckets: sorted prompt lengths. batch_size: rows per batch.
      pad_id: the padding token.

    Yields:
      (index [batch_size] input index or -1 for a padding row, ids [batch_size, P], mask [batch_size, P]).
    """
    bucket_of = _bucket_of(prompts, buckets)
    for b, width in enumerate(buckets):
        members = np.flatnonzero(bucket_of == b)
        for start in range(0, len(members), batch_size):
            index = np.full(batch_size, -1, np.int64)
            index[: len(members[start : start + batch_size])] = members[start : start + batch_size]
            rows = [prompts[i] for i in np.where(index >= 0, index, index[0])]  # padding rows repeat row 0
            ids, mask = nlg_data.make_prompt_batch(rows, width, pad_id)
            yield index, ids, mask


def make_decoder(module, config, fmt: nlg_data.TokenFormat, mesh):
    """A jitted `decoder(params, ids [B, P], mask [B, P]) -> tokens [B, max_new_tokens]` (best beam).

    Beam search with config.beam_size beams, length_penalty and no_repeat_ngram_size; greedy search when
    beam_size == 1. Shardings follow the arguments: the batch split over the mesh's data axes (`shard_batch`),
    the params as `placement.param_shardings`; the tokens come back replicated (readable on every host).
    """
    common = dict(
        max_new_tokens=config.max_new_tokens,
        eos_ids=fmt.stop_ids,
        pad_id=fmt.pad_id,
        init_cache=decode.model_init_cache(module, module.dtype),
        no_repeat_ngram_size=config.no_repeat_ngram_size,
    )
    step = decode.model_step(module.apply)
    if config.beam_size == 1:
        search = functools.partial(decode.greedy_search, step, **common)
    else:
        beam = functools.partial(
            decode.beam_search, step, num_beams=config.beam_size, length_penalty=config.length_penalty, **common
        )
        search = lambda params, ids, mask: beam(params, ids, mask).tokens[:, 0]
    return jax.jit(search, out_shardings=mesh_lib.replicated(mesh))


def make_generate(module, tokenizer, config, mesh) -> Callable[[Any, Sequence[str]], list[str]]:
    """`generate(params, contexts) -> texts`: one decoded text per context (module docstring).

    The jitted decoder is built once here, so every evaluation of a run reuses its compiled prompt buckets.

    Args:
      module: the trained GPT-2 / Llama module (scan_layers or not); generate's params are its full
        (adapted) param tree.
      tokenizer: the model's HF tokenizer.
      config: an NLG config (eval_batch_size, prompt_buckets, beam_size, ...). mesh: the device mesh.
    """
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")
    fmt = nlg_data.token_format(tokenizer)
    decoder = make_decoder(module.clone(scan_layers=False), config, fmt, mesh)
    buckets = tuple(sorted(set(config.prompt_buckets)))
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def generate(params, contexts: Sequence[str]) -> list[str]:
        _, plain = decode_params(module, params)
        rules = placement.config_rules(config)
        plain = jax.device_put(plain, placement.param_shardings(plain, models.family(module), mesh, rules))
        prompts = [nlg_data.encode_prompt(encode, c, separator=fmt.separator, prefix=fmt.prefix) for c in contexts]
        too_long = sum(len(p) > buckets[-1] for p in prompts)
        if too_long:
            logging.warning("%d prompts longer than config.prompt_buckets[-1]=%d keep their last tokens", too_long,
                            buckets[-1])  # fmt: skip
        texts = [""] * len(prompts)
        batches = prompt_batches(prompts, buckets, config.eval_batch_size, fmt.pad_id)
        counts = np.bincount(_bucket_of(prompts, buckets), minlength=len(buckets))
        n_batches = sum(math.ceil(c / config.eval_batch_size) for c in counts)
        show = mesh_lib.is_main_process() and n_batches > 2  # a progress bar on long inputs
        for n, (index, ids, mask) in enumerate(tqdm.tqdm(batches, total=n_batches, unit="batch", disable=not show)):
            t = time.perf_counter()
            batch = mesh_lib.shard_batch({"ids": ids, "mask": mask}, mesh)
            tokens = np.asarray(decoder(plain, batch["ids"], batch["mask"]))
            rows = np.flatnonzero(index >= 0)
            logging.info("decoded batch %d: %d inputs, prompt length %d, %.1fs", n, len(rows), ids.shape[1],
                         time.perf_counter() - t)  # fmt: skip
            out = tokens_to_texts(detokenize, tokens[rows], fmt.stop_ids)
            for i, text in zip(index[rows], out, strict=True):
                texts[i] = text
        return texts

    return generate


def tokens_to_texts(decode_fn: Callable[[list[int]], str], tokens, stop_ids: Sequence[int]) -> list[str]:
    """Host-side text of generated tokens, cleaned as LoRA's gpt2_decode.py.

    Args:
      decode_fn: token ids -> text, e.g. `lambda ids: tokenizer.decode(ids)`.
      tokens: [b, T] generated ids (numpy or jax).
      stop_ids: each row is cut before its first stop token.

    Returns:
      b strings, cut at "<|endoftext|>" and at the first blank line, stripped.
    """
    out = []
    for row in jax.device_get(tokens).tolist():
        ends = [j for j, t in enumerate(row) if t in set(stop_ids)]
        text = decode_fn(row[: ends[0]] if ends else row)
        out.append(text.split("<|endoftext|>")[0].split("\n\n")[0].strip())
    return out


def flat_metrics(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """compute_metrics output -> ({"bleu": .., "bleu_seen": ..}, {name: reason} of metrics that could not run).

    Names are lower-cased; WebNLG's "all" subset has no suffix, "seen" / "unseen" get one.
    """
    subsets = metrics if isinstance(next(iter(metrics.values())), dict) else {"all": metrics}
    numbers, unavailable = {}, {}
    for subset, values in subsets.items():
        for name, value in values.items():
            key = name.lower() + ("" if subset == "all" else f"_{subset}")
            if isinstance(value, str):
                unavailable[key] = value
            else:
                numbers[key] = float(value)
    return numbers, unavailable


def score(task: str, hyps, refs, categories, seen) -> dict:
    """`nlg_metrics.compute_metrics`, except that NIST becomes "unavailable: ..." where nltk cannot compute it.

    nltk's corpus_nist divides by the number of hypothesis n-grams of each order up to 5, so it raises
    ZeroDivisionError when no output has 5 tokens (e.g. the empty texts of an untrained model); the other
    metrics are then computed without it.
    """
    try:
        return nlg_metrics.compute_metrics(task, hyps, refs, categories, seen)
    except ZeroDivisionError:
        if "NIST" not in nlg_metrics.METRICS[task]:
            raise
    without = tuple(m for m in nlg_metrics.METRICS[task] if m != "NIST")
    with mock.patch.dict(nlg_metrics.METRICS, {task: without}):
        metrics = nlg_metrics.compute_metrics(task, hyps, refs, categories, seen)
    return {**metrics, "NIST": "unavailable: nltk corpus_nist divides by zero (no output has 5 tokens)"}


def evaluate(generate, params, eval_set: nlg_data.EvalSet, task: str, *, seen, workdir, name, breakdown=True):
    """Decodes `eval_set`, scores it and writes <workdir>/<name>.{predictions.txt,references.txt,jsonl,metrics.json}.

    Args:
      generate: from `make_generate`. params: the full (adapted) params. task: "e2e", "webnlg" or "dart".
      seen: WebNLG's training categories (empty for E2E / DART). name: the output file prefix.
      breakdown: WebNLG's seen / unseen scores too; False keeps the whole set's only (the held-out train inputs,
        whose categories are all seen).

    Returns:
      (numbers, unavailable) as `flat_metrics`.
    """
    hyps = generate(params, eval_set.contexts)
    metrics = score(task, hyps, eval_set.references, eval_set.categories, seen)
    if not breakdown and "all" in metrics:  # WebNLG: {"all", "seen", "unseen"} -> the "all" scores
        metrics = metrics["all"]
    if mesh_lib.is_main_process():
        nlg_metrics.write_outputs(workdir, name, eval_set.contexts, hyps, eval_set.references, metrics)
    return flat_metrics(metrics)
