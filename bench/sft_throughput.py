"""Instruction tuning throughput: training tokens/s with length buckets vs packing, and generation tokens/s with
the KV cache against transformers' `generate` on the same model and prompts.

Training: the exact `python -m train.sft` step (the config's model, adapters, AdamW, the job's batches and loss)
for `packing=False` and `packing=True`. For each, one real batch of every shape an epoch uses (buckets: one per
bucket; packing: max_length) is compiled, then timed for `--steps` steps per round, the two modes alternated for
`--rounds` rounds; tokens/s over an epoch = the epoch's real (non-padding) tokens / the sum over shapes of the
epoch's batches of that shape x its step time.

Generation: greedy answers of `--new_tokens` tokens (no early stop) to the first `--prompts` held-out prompts
(chat template applied), by train/generation.py on the merged model and by
`transformers.AutoModelForCausalLM.generate` (PyTorch, float32, its KV cache) loaded from the same checkpoint,
alternated for `--rounds` rounds; also the fraction of tokens where the two greedy answers agree (up to the
answer's end of turn).

    python -m bench.sft_throughput --config configs/sft.py:smollm --steps 2 --rounds 3
"""

import argparse
import collections
import os
import statistics
import time

import jax
import numpy as np
from absl import logging

import mtlora_jax as mt
from configs import sft as sft_config
from mtlora_jax.models import sources
from train import batching, chat, generation, lm, loop
from train import mesh as mesh_lib
from train import model as model_lib
from train.sft import batches as batches_lib
from train.sft import tokens
from train.sft import train as sft_train


def train_runs(config, model, data, mesh) -> dict:
    """{"buckets"/"packing": run} where a run holds its compiled step, one batch of each shape of an epoch, how many
    batches of each shape an epoch has and the real (non-padding) tokens of the epoch."""
    runs = {}
    params = model_lib.add_adapters(config, model).params
    trainable, frozen = mt.split(params, ())
    frozen_shardings = mesh_lib.tree_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    encoded, _ = tokens.encode_all(model.tokenizer, data.train, config.max_length)
    for name, packing in (("buckets", False), ("packing", True)):
        batches = batches_lib.Batches(encoded, max_length=config.max_length, length_buckets=config.length_buckets,
                                      batch_size=config.batch_size, pad_id=chat.pad_id(model.tokenizer),
                                      packing=packing)  # fmt: skip
        plan = batching.epoch_plan(batches.example_lengths, batches.buckets, config.batch_size, config.seed, 0)
        counts = collections.Counter(seq_len for seq_len, _ in plan)
        first = {seq_len: batches.batch(seq_len, rows) for seq_len, rows in reversed(plan)}  # a batch per shape
        schedule = loop.make_schedule(config.learning_rate, 1000, 0)
        tx = loop.make_optimizer(schedule, config.weight_decay, trainable, ())
        state, shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
        step = loop.make_train_step(lm.make_loss_fn(model.module), tx, schedule, mesh=mesh, state_shardings=shardings,
                                    frozen_shardings=frozen_shardings)  # fmt: skip
        for b in first.values():  # compiles every shape
            state, m = step(state, frozen, mesh_lib.shard_batch(b, mesh))
        jax.block_until_ready(m)
        runs[name] = {"step": step, "state": state, "frozen": frozen, "first": first, "counts": counts,
                      "tokens": int(batches.example_lengths.sum()), "times": collections.defaultdict(list),
                      "padding": batches.padding_fraction(config.seed)}  # fmt: skip
    return runs


def time_train(runs: dict, mesh, rounds: int, steps: int) -> None:
    """Seconds per step of each shape, per round (the two modes alternated round by round)."""
    for _ in range(rounds):
        for r in runs.values():
            for seq_len, b in r["first"].items():
                t = time.perf_counter()
                for _ in range(steps):
                    r["state"], m = r["step"](r["state"], r["frozen"], mesh_lib.shard_batch(b, mesh))
                jax.block_until_ready(m)
                r["times"][seq_len].append((time.perf_counter() - t) / steps)


def epoch_rates(r: dict, rounds: int) -> list[float]:
    """Real tokens per second over an epoch, per round: the epoch's tokens / sum over shapes of count x step time."""
    return [r["tokens"] / sum(n * r["times"][s][i] for s, n in r["counts"].items()) for i in range(rounds)]


def hf_model(config):
    """The PyTorch model of config.model (a HF folder or a GGUF file), float32, eval mode."""
    import torch
    import transformers

    kind, path = sources.resolve(config.model)
    if kind == "gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.eval()


def answer_length(tokens: list[int], stops) -> int:
    """Tokens before the first stop token (the answer proper; both decoders run on past it here)."""
    return next((i for i, t in enumerate(tokens) if t in stops), len(tokens))


def time_generation(config, model, prompts, new_tokens: int, rounds: int) -> dict:
    import torch

    gen = generation.Generator(model.module, model.params, stop_ids=(), max_new_tokens=new_tokens, pad_id=0)
    hf = hf_model(config)

    def ours(ids):
        return gen.generate(ids)

    def theirs(ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, len(ids) :].tolist()

    results = {"ours": [], "transformers": []}
    answers = {}
    for fn, name in ((ours, "ours"), (theirs, "transformers")):  # warm-up: compiles, caches
        answers[name] = [fn(ids) for ids in prompts]
    for _ in range(rounds):
        for fn, name in ((ours, "ours"), (theirs, "transformers")):
            t = time.perf_counter()
            for ids in prompts:
                fn(ids)
            results[name].append(len(prompts) * new_tokens / (time.perf_counter() - t))
    # Agreement over each answer up to our first end-of-turn / eos: past it transformers' min_new_tokens bans eos
    # (so it continues differently) while ours, without stop tokens here, writes it.
    stops = set(chat.stop_ids(model.tokenizer))
    pairs = [(x[: answer_length(x, stops)], y) for x, y in zip(answers["ours"], answers["transformers"], strict=True)]
    agree = np.mean([a == b for x, y in pairs for a, b in zip(x, y, strict=False)]) if any(x for x, _ in pairs) else 1.0
    return {**results, "agree": float(agree), "answer_tokens": sum(len(x) for x, _ in pairs)}


def spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sft.py:smollm", help="configs/sft.py[:smoke|:smollm]")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per batch shape per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timing rounds")
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts to answer")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--skip", choices=("", "train", "generate"), default="", help="leave one part out")
    parser.add_argument("--model", default="", help="override config.model")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = sft_config.get_config(args.config.partition(":")[2] or None)
    if args.model:
        config.model = args.model
    mesh = mesh_lib.make_mesh(config.mesh)
    data = sft_train.load_data(config)
    model = model_lib.load(config, head="lm", mesh=mesh)
    print(f"{config.model}: {len(data.train)} train rows, batch {config.batch_size}, max_length {config.max_length}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; median (min-max) of {args.rounds} alternated "
          "rounds")  # fmt: skip
    if args.skip != "train":
        runs = train_runs(config, model, data, mesh)
        time_train(runs, mesh, args.rounds, args.steps)
        rates = {n: epoch_rates(r, args.rounds) for n, r in runs.items()}
        for n, r in runs.items():
            shapes = ", ".join(
                f"{s}: {c} x {statistics.median(r['times'][s]):.2f} s" for s, c in sorted(r["counts"].items())
            )
            print(f"train {n:<8} epoch of {sum(r['counts'].values())} steps ({shapes}), {r['tokens']} real tokens, "
                  f"padding {r['padding']:.1%}; tokens/s {spread(rates[n])}")  # fmt: skip
        ratios = [p / b for p, b in zip(rates["packing"], rates["buckets"], strict=True)]
        print(
            f"train packing / buckets tokens/s: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    if args.skip != "generate":
        plain = model._replace(params=mt.merge(model_lib.add_adapters(config, model).params))
        prompts = [ids for _, ids, _ in sft_train.sample_prompts(model.tokenizer, data.eval, args.prompts)]
        g = time_generation(config, plain, prompts, args.new_tokens, args.rounds)
        ratios = [a / b for a, b in zip(g["ours"], g["transformers"], strict=True)]
        print(f"generate ours tokens/s {spread(g['ours'])}; transformers {spread(g['transformers'])}; ours / theirs "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); greedy tokens agree "
              f"{g['agree']:.1%} over the {g['answer_tokens']} tokens of the answers before their end of turn "
              f"({len(prompts)} prompts x {args.new_tokens} tokens)")  # fmt: skip


if __name__ == "__main__":
    main()
