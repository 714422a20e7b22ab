"""Model FLOPs utilisation of MTLoRA vs LoRA vs the frozen base on one accelerator (H100 / H200 / TPU).

Models: RoBERTa-base (12 x 768, FFN 3072, classification) and a 1B-class Llama (16 x 2048, 32 heads, 8 KV
heads, FFN 8192, vocab 32000), bf16 compute over a bf16 frozen base with fp32 adapters and AdamW state.
Variants, timed interleaved in one process:

    frozen  the base with no adapters: forward + gradients w.r.t. the input activations (the floor)
    lora    "mtlora-paper" targets, T = I, rank 8 (RoBERTa) / 16 (Llama)
    ctcm    the same targets with MTLoRA CTCM (the costliest T: two r x r matrices)

FLOPs per step are counted as 4 · N · tokens (forward 2NT + activation gradients 2NT: a frozen base has no
weight gradients) plus attention (4 · layers · seq² · width · batch for forward, twice that backward); the
adapters' own FLOPs (< 1%) are not counted, so the three variants are compared on the same work. MFU = counted
FLOPs / time / peak bf16 dense FLOP/s of the device (989e12 for H100/H200 SXM; --peak to override).

    python -m bench.gpu_mfu                      # on the accelerator
    python -m bench.gpu_mfu --tiny --rounds 2    # a CPU self-check with tiny shapes
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import mtlora_jax as mt
from mtlora_jax import models
from mtlora_jax.models.config import EncoderConfig, LlamaConfig

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5": 197e12, "TPU v4": 275e12}


def configs(tiny: bool):
    if tiny:
        return {
            "roberta-base": (EncoderConfig("roberta", 512, 64, 2, 4, 128), 4, 64, 8),
            "llama-1b": (LlamaConfig(512, 64, 2, 4, 2, 16, 128), 4, 64, 8),
        }
    return {  # name: (config, batch, seq, rank)
        "roberta-base": (EncoderConfig("roberta", 50265, 768, 12, 12, 3072), 32, 512, 8),
        "llama-1b": (LlamaConfig(32000, 2048, 16, 32, 8, 64, 8192), 8, 2048, 16),
    }


# The floor differentiates only a [width] norm scale at the bottom of the network: every layer's activation
# gradients are computed, no weight gradient of any size is.
FLOOR_LEAF = {
    "roberta": ("embeddings", "LayerNorm", "scale"),
    "llama": ("model", "layers_0", "input_layernorm", "scale"),
}


def _with_leaf(params, keys, value):
    if len(keys) == 1:
        return {**params, keys[0]: value}
    return {**params, keys[0]: _with_leaf(params[keys[0]], keys[1:], value)}


def variants(name, cfg, batch, seq, rank):
    """{variant: (jitted step, args)} and the counted FLOPs of one step."""
    family = "roberta" if name.startswith("roberta") else "llama"
    head = "classification" if family == "roberta" else "lm"
    module = models.build(family, cfg, head, 2, dtype=jnp.bfloat16, remat=family == "llama")
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    params = jax.jit(module.init)(jax.random.key(1), ids[:1, :8])["params"]
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)  # frozen base stored in bf16
    n_params = sum(w.size for w in jax.tree.leaves(params))
    loss_of = lambda out: jnp.mean(out.astype(jnp.float32) ** 2)
    keys = FLOOR_LEAF[family]
    leaf = functools.reduce(lambda t, k: t[k], keys, params)

    def floor(params, leaf, ids):
        return jax.grad(lambda s: loss_of(module.apply({"params": _with_leaf(params, keys, s)}, ids)))(leaf)

    out = {"frozen": (jax.jit(floor), (params, leaf, ids))}
    for structure in ("lora", "ctcm"):
        c = mt.MTLoRAConfig(
            rank=rank, alpha=2.0 * rank, structure=structure, targets=models.targets("mtlora-paper", family)
        )
        tr, fr = mt.split(mt.init(params, c, jax.random.key(2)))
        tx = mt.optimizer(optax.adamw(1e-4), tr)

        def step(tr, opt, fr, ids, tx=tx):
            g = jax.grad(lambda t: loss_of(mt.apply(module.apply)({"params": mt.combine(t, fr)}, ids)))(tr)
            upd, opt = tx.update(g, opt, tr)
            return optax.apply_updates(tr, upd), opt

        out[structure] = (jax.jit(step, donate_argnums=(0, 1)), [tr, tx.init(tr), fr, ids])
    layers, width = cfg.num_layers, cfg.hidden_size
    flops = 4 * n_params * batch * seq + 3 * 4 * layers * seq * seq * width * batch
    return out, flops


def timed(fn, args, rounds):
    """Median seconds per call after one warm-up; a list of args is a donated (state, opt) fed back each call."""
    times = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        res = fn(*args)
        jax.block_until_ready(res)
        if i:
            times.append(time.perf_counter() - t0)
        if isinstance(args, list):
            args[0], args[1] = res
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--peak", type=float, default=None, help="peak bf16 FLOP/s of the device")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU self-check)")
    args = ap.parse_args()
    kind = jax.devices()[0].device_kind
    peak = args.peak or next((v for k, v in PEAKS.items() if k in kind), None)
    print(f"device: {kind} ({jax.devices()[0].platform}), jax {jax.__version__}, peak {peak or 'unknown'} FLOP/s")
    for name, (cfg, batch, seq, rank) in configs(args.tiny).items():
        vs, flops = variants(name, cfg, batch, seq, rank)
        t = {}
        for v, (fn, a) in vs.items():
            t[v] = timed(fn, a, args.rounds)
        for v, sec in t.items():
            mfu = f"{100 * flops / sec / peak:.1f}%" if peak else "n/a"
            print(
                f"{name:<14}{v:<8} batch {batch} x {seq}: {1e3 * sec:9.1f} ms/step  {batch * seq / sec:10.0f} tok/s"
                f"  MFU {mfu}  x frozen {sec / t['frozen']:.3f}"
            )


if __name__ == "__main__":
    main()
