"""Training-step time and compiled memory of MTLoRA vs LoRA vs the frozen floor, merged and full fine-tuning.

A RoBERTa-base-shaped encoder stack (hidden --width, default 768, heads of 64, FFN 4 x width; --layers of them)
with q, v, FFN-in and FFN-out adapted at rank 8. Every variant is timed in the same process, interleaved round by
round, and reported as a ratio to the floor (frozen base, gradients w.r.t. the input activations only):

    floor   frozen base, d loss / d x only (no weight gradients)
    lora    mt.apply, LoRA adapters (T = I), AdamW on the adapters
    <s>     mt.apply, MTLoRA structure s (shim, icfm, ctcm, dtsm)
    merged  materialize W + dW inside the step (the naive path), MTLoRA ctcm
    full    full fine-tuning, AdamW on every weight
    peft    (--peft) PEFT LoRA in PyTorch on the same shapes, timed against a PyTorch floor

    python -m bench.step_time --layers 4 --batch 8 --seq 128 --rounds 40 --peft    # docs/BENCHMARKS.md
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import mtlora_jax as mt
from mtlora_jax.models import EncoderConfig, presets
from mtlora_jax.models.encoder import EncoderStack

STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")


def build(layers: int, batch: int, seq: int, width: int = 768):
    """The encoder stack, its params, a batch of hidden states [b, s, width] and the all-real mask."""
    cfg = EncoderConfig(
        family="roberta", vocab_size=8, hidden_size=width, num_layers=layers, num_heads=width // 64,
        intermediate_size=4 * width,
    )  # fmt: skip
    stack = EncoderStack(cfg, jnp.float32, jnp.float32, True)
    x = jax.random.normal(jax.random.key(0), (batch, seq, width))
    mask = jnp.ones((batch, 1, seq), bool)
    params = stack.init(jax.random.key(1), x, mask)["params"]
    return stack, {"encoder": params}, x, mask


def steps(stack, params, x, mask):
    """{variant: (jitted step, args)}; each step returns (new trainable, new opt state, loss)."""
    fwd = lambda p, x: stack.apply({"params": p["encoder"]}, x, mask)
    loss_of = lambda y: jnp.mean(y**2)
    out = {}

    def floor(x):
        return jax.value_and_grad(lambda x: loss_of(fwd(params, x)))(x)

    out["floor"] = (jax.jit(floor), (x,))
    targets = tuple(
        t.replace("encoder/(layer_\\d+|layers)", "encoder/layer_\\d+")
        for t in presets.targets("mtlora-paper", "roberta")
    )
    for name in (*STRUCTURES, "merged"):
        structure = "ctcm" if name == "merged" else name
        ad = mt.init(
            params, mt.MTLoRAConfig(rank=8, alpha=16.0, structure=structure, targets=targets), jax.random.key(2)
        )
        tr, fr = mt.split(ad)
        tx = mt.optimizer(optax.adamw(1e-4), tr)
        run = (lambda p, x: fwd(mt.merge(p), x)) if name == "merged" else mt.apply(fwd)

        def step(tr, opt, fr, x, tx=tx, run=run):
            loss, g = jax.value_and_grad(lambda t: loss_of(run(mt.combine(t, fr), x)))(tr)
            upd, opt = tx.update(g, opt, tr)
            return optax.apply_updates(tr, upd), opt, loss

        out[name] = (jax.jit(step), (tr, tx.init(tr), fr, x))
    tx = optax.adamw(1e-4)

    def full(p, opt, x):
        loss, g = jax.value_and_grad(lambda p: loss_of(fwd(p, x)))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    out["full"] = (jax.jit(full), (params, tx.init(params), x))
    return out


def memory_mib(fn, args) -> float:
    """Compiled temporary memory of one step (XLA's buffer assignment), MiB."""
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 2**20


def time_variants(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of every round, {variant: [t_round0, ...]}; variants interleaved each round so machine
    noise hits all alike (ratios are then taken round by round, see `paired`), in an order rotated by one each
    round so that every variant takes every place in the round (with rounds >= the number of variants)."""
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times = {k: [] for k in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotated: no variant always runs first
            fn, args = variants[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile over rounds of times[num][i] / times[den][i] (same-round ratios)."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def peft_times(layers: int, batch: int, seq: int, rounds: int, width: int = 768) -> dict[str, float]:
    """PyTorch: frozen floor (d loss / d x) and PEFT LoRA r=8 on the same four targets, AdamW."""
    import peft
    import torch
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaEncoder

    torch.manual_seed(0)
    cfg = RobertaConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        intermediate_size=4 * width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    enc = RobertaEncoder(cfg).eval()
    x = torch.randn(batch, seq, width)
    for p in enc.parameters():
        p.requires_grad_(False)

    def floor():
        xi = x.clone().requires_grad_(True)
        enc(xi)[0].pow(2).mean().backward()

    lora = peft.get_peft_model(
        enc,
        peft.LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=r".*\.(query|value|intermediate\.dense)$|.*layer\.\d+\.output\.dense$",
        ),
    )
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def peft_step():
        opt.zero_grad()
        lora(x)[0].pow(2).mean().backward()
        opt.step()

    fns = {"torch_floor": floor, "peft_lora": peft_step}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=768, help="hidden size (heads of 64, FFN 4 x width)")
    ap.add_argument("--peft", action="store_true", help="add the PyTorch PEFT LoRA peer row")
    args = ap.parse_args()
    stack, params, x, mask = build(args.layers, args.batch, args.seq, args.width)
    variants = steps(stack, params, x, mask)
    mem = {k: memory_mib(fn, a) for k, (fn, a) in variants.items()}
    times = time_variants(variants, args.rounds)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.layers} layers x {args.width}, "
        f"batch {args.batch} x {args.seq}, rank 8 on q, v, FFN-in, FFN-out; {args.rounds} rounds: median ms, "
        "and the median [25th-75th percentile] of the same-round ratios"
    )
    print(f"{'variant':<10}{'ms/step':>10}{'x floor':>10}{'  [p25-p75]':>16}{'x lora':>10}{'temp MiB':>10}")
    for k in t:
        r, lo, hi = paired(times, k, "floor")
        print(
            f"{k:<10}{1e3 * t[k]:>10.1f}{r:>10.3f}{f'  [{lo:.3f}-{hi:.3f}]':>16}"
            f"{paired(times, k, 'lora')[0]:>10.3f}{mem[k]:>10.1f}"
        )
    worst = lambda den: max(paired(times, s, den)[0] for s in STRUCTURES[1:])
    print(f"slowest MTLoRA / floor = {worst('floor'):.3f}  (target <= 1.10)")
    print(f"slowest MTLoRA / LoRA  = {worst('lora'):.3f}  (target <= 1.05)")
    print(f"merged / ctcm          = {paired(times, 'merged', 'ctcm')[0]:.3f}  (target >= 1.25)")
    if args.peft:
        pt = peft_times(args.layers, args.batch, args.seq, args.rounds, args.width)
        print(
            f"PyTorch {pt['torch_floor'] * 1e3:.1f} ms floor, PEFT LoRA {pt['peft_lora'] * 1e3:.1f} ms: "
            f"PEFT / its floor = {pt['peft_lora'] / pt['torch_floor']:.3f}; "
            f"ours: LoRA / floor = {t['lora'] / t['floor']:.3f}; "
            f"our LoRA / PEFT LoRA (absolute) = {t['lora'] / pt['peft_lora']:.3f}"
        )


if __name__ == "__main__":
    main()
