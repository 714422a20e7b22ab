"""A quantized frozen base (`--config.base_quant`): bytes of the base, peak memory of the compiled training step, and
step time, float32 vs int8 vs NF4.

For each model the exact train step of the jobs (train/loop.py: value and grad of train/lm.py's loss through
`mt.apply`, AdamW on the adapters, the state donated) is compiled for each setting, the base quantized as the jobs do
it (train/model.py:quantize_base, the "all-linear" kernels) and "all-linear" shim adapters of rank 8 on top, under
`nn.scan`. From XLA's memory analysis of the compiled step: argument bytes (base, adapters, optimizer state,
batch), temporaries, and their sum as the peak. Shapes only (`jax.eval_shape`, nothing allocated) for the
Llama-1B-shaped model; SmolLM2-135M (its real GGUF weights) also runs `--steps` steps per setting, alternated for
`--rounds` rounds, for the step time against the float base.

    python -m bench.quant_memory --models smollm2,llama-1b --batch 4 --seq 128 --steps 2 --rounds 3
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import mtlora_jax as mt
from configs import base as base_config
from mtlora_jax import models
from mtlora_jax.models.config import LlamaConfig
from train import lm, loop
from train import mesh as mesh_lib

SETTINGS = ("none", "int8", "nf4")
TARGETS = models.targets("all-linear", "llama")
# Llama 3.2 1B's shape (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = LlamaConfig(
    vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
    intermediate_size=8192, rope_theta=500000.0, max_positions=131072, tie_word_embeddings=True,
)  # fmt: skip


def load(name: str):
    """(module, params) with scanned layers: real SmolLM2 weights, or abstract Llama-1B shapes."""
    if name == "smollm2":
        return models.from_pretrained(base_config.smollm_path(), head="lm", scan_layers=True)
    module = models.build("llama", LLAMA_1B, "lm", None, scan_layers=True)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return module, shapes


def adapted(params, setting: str):
    """The base quantized (or not) and rank-8 all-linear shim adapters on it."""
    if setting != "none":
        params = mt.quantize(params, setting, targets=TARGETS)
    cfg = mt.MTLoRAConfig(rank=8, alpha=16.0, structure="shim", targets=TARGETS, stack_ndim=models.stack_ndim("llama"))
    return mt.init(params, cfg, jax.random.key(0))


def build_step(module, params, setting: str, mesh, abstract: bool):
    """(jitted step, state, frozen) for one setting; abstract: ShapeDtypeStructs only."""
    make = lambda p: mt.split(adapted(p, setting))
    trainable, frozen = jax.eval_shape(make, params) if abstract else make(params)
    schedule = loop.make_schedule(1e-4, 1000, 0)
    tx = loop.make_optimizer(schedule, 0.0, trainable, ())
    if abstract:
        init = lambda p, r: loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)
        state = jax.eval_shape(init, trainable, jax.random.key(0))
        shardings = mesh_lib.tree_shardings(mesh, state)
    else:
        state, shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
    step = loop.make_train_step(lm.make_loss_fn(module), tx, schedule, mesh=mesh, state_shardings=shardings,
                                frozen_shardings=mesh_lib.tree_shardings(mesh, frozen))  # fmt: skip
    return step, state, frozen


def batch(b: int, t: int, vocab: int, abstract: bool):
    shapes = {"input_ids": jnp.int32, "labels": jnp.int32, "attention_mask": jnp.int32, "weights": jnp.float32}
    if abstract:
        return {k: jax.ShapeDtypeStruct((b, t), d) for k, d in shapes.items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    return {"input_ids": ids, "labels": np.roll(ids, -1, 1), "attention_mask": np.ones((b, t), np.int32),
            "weights": np.ones((b, t), np.float32)}  # fmt: skip


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-1b", help="comma-separated: smollm2, llama-1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting per round (smollm2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timing rounds (0: memory only)")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    mesh = mesh_lib.make_mesh({"data": 1})
    for name in args.models.split(","):
        module, params = load(name)
        abstract = name != "smollm2"
        vocab = module.config.vocab_size
        data = batch(args.batch, args.seq, vocab, abstract)
        runs, float_peak = {}, None
        kernels = mt.quantized_bytes(jax.eval_shape(lambda p: mt.quantize(p, "int8", targets=TARGETS), params))[1]
        print(f"{name}: batch {args.batch} x {args.seq}, {jax.devices()[0].device_kind}, "
              f"{'shapes only' if abstract else 'real weights'}; the quantized matrices take {kernels / 1e6:.1f} MB "
              "in float32")  # fmt: skip
        print(f"{'base':<6} {'matrices MB':>12} {'/ float':>8} {'base MB':>9} {'args MB':>9} {'temp MB':>9} "
              f"{'peak MB':>9} {'/ float':>8}")  # fmt: skip
        for setting in SETTINGS:
            step, state, frozen = build_step(module, params, setting, mesh, abstract)
            matrices = mt.quantized_bytes(frozen)[0] if setting != "none" else kernels
            mem = step.lower(state, frozen, data).compile().memory_analysis()
            peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes)  # fmt: skip
            float_peak = float_peak or peak
            print(f"{setting:<6} {matrices / 1e6:>12.1f} {matrices / kernels:>8.3f} {nbytes(frozen) / 1e6:>9.1f} "
                  f"{mem.argument_size_in_bytes / 1e6:>9.1f} {mem.temp_size_in_bytes / 1e6:>9.1f} {peak / 1e6:>9.1f} "
                  f"{peak / float_peak:>8.3f}")  # fmt: skip
            runs[setting] = (step, state, frozen)
        if abstract or not args.rounds:
            continue
        times = {s: [] for s in SETTINGS}
        for setting, (step, state, frozen) in runs.items():  # compile and warm up
            state, m = step(state, frozen, data)
            jax.block_until_ready(m)
            runs[setting] = (step, state, frozen)
        for _ in range(args.rounds):
            for setting, (step, state, frozen) in runs.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    state, m = step(state, frozen, data)
                jax.block_until_ready(m)
                times[setting].append((time.perf_counter() - t) / args.steps)
                runs[setting] = (step, state, frozen)
        for setting, ts in times.items():
            ratios = [a / b for a, b in zip(ts, times["none"], strict=True)]
            print(f"step time {setting:<5} {statistics.median(ts):.2f} s ({min(ts):.2f}-{max(ts):.2f}); / float "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
