"""Model FLOPs utilisation of MTLoRA vs LoRA vs the frozen base on one accelerator (H100 / H200 / TPU).

Models: RoBERTa-base (12 x 768, FFN 3072, classification) at batch 32 x 128 and 16 x 512, and a 1B-class Llama
(16 x 2048, 32 heads, 8 KV heads, FFN 8192, vocab 32000) at 8 x 1024, random weights, bf16 compute over a bf16
frozen base with fp32 adapters and AdamW state. Variants, timed interleaved in one process:

    frozen  the base with no adapters: forward + gradients w.r.t. the input activations (the floor)
    lora    "mtlora-paper" targets, T = I, rank 8 (RoBERTa) / 16 (Llama), mt.apply (factored: dW never formed)
    ctcm    the same targets with MTLoRA CTCM (the costliest T: two r x r matrices), factored
    merged  CTCM trained through W + dW formed in the step (mt.merge inside the loss): the dense path

FLOPs per step are counted as 4 · N · tokens (forward 2NT + activation gradients 2NT: a frozen base has no
weight gradients) plus attention (4 · layers · seq² · width · batch for forward, twice that backward); the
adapters' own FLOPs (< 1%) are not counted, so the three variants are compared on the same work. MFU = counted
FLOPs / time / peak bf16 dense FLOP/s of the device (989e12 for H100/H200 SXM; --peak to override).

    python -m bench.gpu_mfu                      # on the accelerator (a few minutes on one H200)
    python -m bench.gpu_mfu --tiny --rounds 2    # a CPU dry run with tiny shapes (tests/test_bench.py runs it)

Goals checked at the end (issue 21): every MTLoRA variant <= 1.05 x the floor's step time, >= 45% MFU on the
encoder; each line says met / not met.
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
    """name -> (config, batch, seq, rank)."""
    if tiny:
        enc, dec = EncoderConfig("roberta", 512, 64, 2, 4, 128), LlamaConfig(512, 64, 2, 4, 2, 16, 128)
        return {"roberta-base 4x32": (enc, 4, 32, 8), "roberta-base 2x64": (enc, 2, 64, 8),
                "llama-1b 2x64": (dec, 2, 64, 8)}  # fmt: skip
    enc, dec = EncoderConfig("roberta", 50265, 768, 12, 12, 3072), LlamaConfig(32000, 2048, 16, 32, 8, 64, 8192)
    return {"roberta-base 32x128": (enc, 32, 128, 8), "roberta-base 16x512": (enc, 16, 512, 8),
            "llama-1b 8x1024": (dec, 8, 1024, 16)}  # fmt: skip


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
    family = "roberta" if name.startswith("roberta") else "llama"  # the name's model, then its batch x seq
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
    factored = lambda t, fr, ids: mt.apply(module.apply)({"params": mt.combine(t, fr)}, ids)
    dense = lambda t, fr, ids: module.apply({"params": mt.merge(mt.combine(t, fr))}, ids)
    for variant, structure, forward in (("lora", "lora", factored), ("ctcm", "ctcm", factored),
                                        ("merged", "ctcm", dense)):  # fmt: skip
        c = mt.MTLoRAConfig(
            rank=rank, alpha=2.0 * rank, structure=structure, targets=models.targets("mtlora-paper", family)
        )
        tr, fr = mt.split(mt.init(params, c, jax.random.key(2)))
        tx = mt.optimizer(optax.adamw(1e-4), tr)

        def step(tr, opt, fr, ids, tx=tx, forward=forward):
            g = jax.grad(lambda t: loss_of(forward(t, fr, ids)))(tr)
            upd, opt = tx.update(g, opt, tr)
            return optax.apply_updates(tr, upd), opt

        out[variant] = (jax.jit(step, donate_argnums=(0, 1)), [tr, tx.init(tr), fr, ids])
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--peak", type=float, default=None, help="peak bf16 FLOP/s of the device")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    args = ap.parse_args(argv)
    kind = jax.devices()[0].device_kind
    peak = args.peak or next((v for k, v in PEAKS.items() if k in kind), None)
    print(f"device: {kind} ({jax.devices()[0].platform}), jax {jax.__version__}, peak {peak or 'unknown'} FLOP/s")
    goals = []
    for name, (cfg, batch, seq, rank) in configs(args.tiny).items():
        vs, flops = variants(name, cfg, batch, seq, rank)
        t = {v: timed(fn, a, args.rounds) for v, (fn, a) in vs.items()}
        for v, sec in t.items():
            mfu = flops / sec / peak if peak else None
            print(
                f"{name:<20}{v:<8} {1e3 * sec:9.1f} ms/step  {batch * seq / sec:10.0f} tok/s"
                f"  MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}  x frozen {sec / t['frozen']:.3f}"
            )
            if v in ("lora", "ctcm"):
                goals.append((f"{name} {v} <= 1.05 x frozen", sec / t["frozen"] <= 1.05))
            if v == "ctcm" and name.startswith("roberta") and mfu is not None:
                goals.append((f"{name} {v} MFU >= 45%", mfu >= 0.45))
    for goal, met in goals:
        print(f"goal {goal}: {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
