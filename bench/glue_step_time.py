"""Step time of the GLUE train step (train/loop.py + train/glue/train.py) per MTLoRA structure, vs LoRA.

Builds the exact step `python -m train.glue` runs (model and head from --config, adapters from
config.mtlora, AdamW, dropout) once per structure, feeds all of them the same real batches of one bucket
shape, and times them interleaved round by round in one process. Prints ms/step, examples/s and the
ratio of each structure to LoRA (T = I) in the same run.

    python -m bench.glue_step_time --config configs/rte.py:minilm --seq 128 --rounds 5 --steps 5
"""

import argparse
import statistics
import time

import jax
from absl import logging

import configs
import mtlora_jax as mt
from train import loop
from train import mesh as mesh_lib
from train import model as model_lib
from train.glue import pipeline
from train.glue import train as glue_train

STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")


def real_batches(config_arg: str, seq: int, steps: int, batch: int = 0):
    """(config, model, mesh, `steps` sharded train batches of the task's real data, all `seq` tokens wide) for
    "configs/<task>.py[:arg]"; batch 0 keeps the config's batch size."""
    path, _, arg = config_arg.partition(":")
    config = configs.get_config(path.removeprefix("configs/").removesuffix(".py"), arg or None)
    if batch:
        config.batch_size = batch
    config.max_length, config.length_buckets = seq, (seq,)
    data = glue_train.load_data(config)
    model = model_lib.load(config, **glue_train.head(config, data))
    encoded = pipeline.encode(data["train"], model.tokenizer, config.max_length)
    mesh = mesh_lib.make_mesh(config.mesh)
    it = pipeline.train_batches(encoded, batch_size=config.batch_size, buckets=(seq,), seed=0)
    return config, model, mesh, [mesh_lib.shard_batch(next(it), mesh) for _ in range(steps)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/rte.py:minilm", help="configs/<task>.py[:arg]")
    parser.add_argument("--structures", default=",".join(STRUCTURES), help="comma-separated, lora first")
    parser.add_argument("--seq", type=int, default=128, help="padded sequence length of every batch")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the config's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per structure per round")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    config, model, mesh, batches = real_batches(args.config, args.seq, args.steps, args.batch)

    runs = {}
    for structure in args.structures.split(","):
        config.mtlora.structure = structure
        params = model_lib.add_adapters(config, model).params
        heads = model_lib.trainable_heads(config, model)
        trainable, frozen = mt.split(params, heads)
        frozen_shardings = mesh_lib.tree_shardings(mesh, frozen)
        schedule = loop.make_schedule(config.learning_rate, 1000, 0)
        tx = loop.make_optimizer(schedule, config.weight_decay, trainable, heads)
        state, shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
        step = loop.make_train_step(
            glue_train.make_loss_fn(model.module, model.head == "regression"),
            tx,
            schedule,
            mesh=mesh,
            state_shardings=shardings,
            frozen_shardings=frozen_shardings,
        )
        frozen = jax.device_put(frozen, frozen_shardings)
        t = time.perf_counter()
        state, m = step(state, frozen, batches[0])  # compile
        jax.block_until_ready(m)
        runs[structure] = {
            "step": step,
            "state": state,
            "frozen": frozen,
            "times": [],
            "compile_s": time.perf_counter() - t,
        }
        runs[structure]["params"] = mt.count_params(params, heads)[0]

    for _ in range(args.rounds):
        for r in runs.values():
            t = time.perf_counter()
            for b in batches:
                r["state"], m = r["step"](r["state"], r["frozen"], b)
            jax.block_until_ready(m)
            r["times"].append((time.perf_counter() - t) / len(batches))

    ref = statistics.median(runs["lora"]["times"]) if "lora" in runs else None
    print(f"{config.task} {config.model} batch {config.batch_size} seq {args.seq}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"{'structure':<10} {'trainable':>10} {'compile s':>10} {'ms/step':>9} {'examples/s':>11} {'/ lora':>7}")
    for name, r in runs.items():
        ms = 1e3 * statistics.median(r["times"])
        ratio = f"{statistics.median(r['times']) / ref:.3f}" if ref else "-"
        print(f"{name:<10} {r['params']:>10,} {r['compile_s']:>10.1f} {ms:>9.1f} "
              f"{config.batch_size / ms * 1e3:>11.1f} {ratio:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
