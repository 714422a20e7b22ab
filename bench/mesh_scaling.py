"""MTLoRA training-step throughput and per-device memory vs mesh shape, on 8 simulated CPU devices.

A RoBERTa-shaped encoder (--layers x 768, FFN 3072) with the "mtlora-paper" targets at rank 8: the frozen base
is split by `mtlora_jax.models.partitioning` (embed -> fsdp, heads/mlp -> tensor), adapters follow their base
weight (`mt.partition_specs`), the batch splits over data and fsdp. Reported per mesh (data, fsdp, tensor):
tokens/s and the compiled per-device argument (params, optimizer state, batch) and temporary memory, as
ratios to the (8, 1, 1) data-parallel mesh.
Simulated devices share this machine's cores, so only the memory ratios carry over to real accelerators; the
throughput column shows the communication and partitioning overhead each layout adds on one host.

    python -m bench.mesh_scaling --layers 2 --batch 16 --seq 128 --rounds 3 [--scan]
    python -m bench.mesh_scaling --layers 12 --rounds 1 --meshes 2,2,2 [--scan]   # compile time vs scan
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mtlora_jax as mt  # noqa: E402
from mtlora_jax import models  # noqa: E402
from mtlora_jax.models.config import EncoderConfig  # noqa: E402
from train import placement  # noqa: E402

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8))


def build(layers: int, scan: bool):
    cfg = EncoderConfig(
        "roberta",
        vocab_size=1024,
        hidden_size=768,
        num_layers=layers,
        num_heads=12,
        intermediate_size=3072,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    module = models.build("roberta", cfg, "classification", 2, scan_layers=scan)
    ids = jnp.ones((2, 8), jnp.int32)
    params = module.init(jax.random.key(0), ids)["params"]
    m = mt.MTLoRAConfig(
        rank=8,
        alpha=16.0,
        structure="ctcm",
        targets=models.targets("mtlora-paper", "roberta"),
        stack_ndim=models.stack_ndim("roberta") if scan else {},
    )
    return module, mt.init(params, m, jax.random.key(1))


def run(module, params, shape, batch: int, seq: int, rounds: int):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
    head = models.head_targets("roberta", "classification")
    tr, fr, shardings = placement.place(params, head, family="roberta", mesh=mesh)  # as train.glue places them
    tr_s, fr_s = shardings
    tr = jax.device_put(jax.tree.map(jnp.copy, tr), tr_s)  # donated below: never alias the caller's arrays
    tx = mt.optimizer(optax.adamw(1e-4), tr, head)
    opt_s = placement.opt_state_shardings(tx, tr, tr_s, mesh)
    batch_s = NamedSharding(mesh, P(("data", "fsdp"), None))
    ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, 1024)
    labels = jnp.arange(batch) % 2

    def step(tr, opt, fr, ids, labels):
        def loss(t):
            logits = mt.apply(module.apply)({"params": mt.combine(t, fr)}, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, g = jax.value_and_grad(loss)(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, value

    jitted = jax.jit(
        step,
        in_shardings=(tr_s, opt_s, fr_s, batch_s, NamedSharding(mesh, P(("data", "fsdp")))),
        out_shardings=(tr_s, opt_s, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    opt = jax.jit(tx.init, out_shardings=opt_s)(tr)
    args = (ids, labels)
    t0 = time.perf_counter()
    compiled = jitted.lower(tr, opt, fr, *args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
    tr, opt, _ = jitted(tr, opt, fr, *args)  # warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tr, opt, loss = jitted(tr, opt, fr, *args)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times), per_device, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scan", action="store_true", help="nn.scan over layers (stacked params)")
    ap.add_argument("--meshes", nargs="+", default=[",".join(map(str, m)) for m in MESHES],
                    help="(data,fsdp,tensor) shapes as d,f,t; the first is the ratios' base")  # fmt: skip
    args = ap.parse_args()
    meshes = [tuple(int(n) for n in m.split(",")) for m in args.meshes]
    if any(len(m) != 3 or math.prod(m) != jax.device_count() for m in meshes):
        raise SystemExit(f"--meshes {args.meshes}: each needs 3 sizes whose product is {jax.device_count()}")
    module, params = build(args.layers, args.scan)
    rows = {s: run(module, params, s, args.batch, args.seq, args.rounds) for s in meshes}
    base_tps, (base_arg, base_tmp), _ = rows[meshes[0]]
    print(
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices, jax {jax.__version__}; "
        f"{args.layers} layers x 768{' (scan)' if args.scan else ''}, batch {args.batch} x {args.seq}, "
        f"MTLoRA ctcm r=8 on q, v, FFN; median of {args.rounds}"
    )
    print(
        f"{'mesh (data,fsdp,tensor)':<25}{'tokens/s':>9}{'x first':>10}{'args MiB':>10}{'x first':>10}"
        f"{'temp MiB':>10}{'x first':>10}{'compile s':>10}   (per device, compiled)"
    )
    for s, (tps, (arg, tmp), compile_s) in rows.items():
        print(
            f"{str(s):<25}{tps:>9.0f}{tps / base_tps:>10.2f}{arg:>10.1f}{arg / base_arg:>10.2f}{tmp:>10.1f}"
            f"{tmp / base_tmp:>10.2f}{compile_s:>10.1f}"
        )


if __name__ == "__main__":
    main()
