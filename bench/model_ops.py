"""The encoder's non-matmul ops on this CPU: each of ours against the form it replaced and PyTorch's.

Each variant runs the forward pass and then the forward pass with its vjp, on the same inputs (MiniLM's
shapes by default: batch 16 x 64 tokens, 12 heads of 32, FFN 1536); all are timed alternately round by round in one
process (`bench.step_time.time_variants`: the order rotated every round), and each ratio is to the replaced form
in the same round:

  attention  tokens-major (the former `layers.attention`: einsums over [b, t, h, hd], the mask as a select) /
             heads-major (`layers.attention`: heads before the tokens, the mask added as a bias) / torch sdpa
  gelu       nn.gelu(approximate=False) (erfc) / `layers.gelu_erf` / torch.nn.functional.gelu
  layernorm  nn.LayerNorm (one-pass variance, broadcast scale / std) / `layers.LayerNorm` (centred two-pass) /
             torch.nn.LayerNorm

    python -m bench.model_ops --rounds 15
"""

import argparse
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import step_time
from mtlora_jax.models import layers


def tokens_major(q, k, v, mask):
    """The former layers.attention (h == kvh): q, k, v [b, t, h, hd], mask [b, 1, t] -> [b, t, h * hd]."""
    b, t, h, hd = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(hd).astype(q.dtype)  # [b, h, t, s]
    scores = jnp.where(jnp.broadcast_to(mask, (b, t, t))[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, h * hd)


def jax_variant(fn, *inputs):
    """fn(*inputs) forward, then forward + vjp against a fixed cotangent, jitted; a no-argument callable that blocks."""
    g = jnp.cos(fn(*inputs))  # a fixed, non-trivial cotangent
    fwd, vjp = jax.jit(fn), jax.jit(lambda g, *xs: jax.vjp(fn, *xs)[1](g))
    return lambda: (jax.block_until_ready(fwd(*inputs)), jax.block_until_ready(vjp(g, *inputs)))


def torch_variant(fn, *inputs):
    """The same for a PyTorch function of float32 numpy inputs (all of them need gradients)."""
    import torch

    xs = [torch.from_numpy(np.array(x)).requires_grad_() for x in inputs]
    g = torch.cos(fn(*xs).detach())

    def run():
        with torch.no_grad():
            fn(*xs)
        fn(*xs).backward(g)

    return run


def attention_variants(b: int, t: int, h: int, hd: int, rng) -> tuple[dict, float]:
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32) for _ in range(3))
    keep = np.ones((b, 1, t), bool)
    keep[1:, :, (3 * t) // 4 :] = False  # every row but the first has padding keys
    mask = jnp.asarray(keep)
    ours = lambda q, k, v: layers.attention(q, k, v, mask)
    out = {"tokens-major": jax_variant(lambda q, k, v: tokens_major(q, k, v, mask), q, k, v),
           "heads-major": jax_variant(ours, q, k, v)}  # fmt: skip

    def sdpa(q, k, v):
        import torch

        tq, tk, tv = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, t, hd]
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(keep)[:, None])
        return o.transpose(1, 2).reshape(b, t, h * hd)

    out["torch-sdpa"] = torch_variant(sdpa, q, k, v)
    err = float(jnp.max(jnp.abs(ours(q, k, v) - tokens_major(q, k, v, mask))))
    return out, err


def gelu_variants(b: int, t: int, ffn: int, rng) -> tuple[dict, float]:
    x = jnp.asarray(3 * rng.standard_normal((b, t, ffn)), jnp.float32)
    erfc = lambda x: nn.gelu(x, approximate=False)
    out = {"erfc": jax_variant(erfc, x), "erf": jax_variant(layers.gelu_erf, x)}
    import torch

    out["torch"] = torch_variant(torch.nn.functional.gelu, x)
    return out, float(jnp.max(jnp.abs(erfc(x) - layers.gelu_erf(x))))


def layernorm_variants(b: int, t: int, d: int, rng) -> tuple[dict, float]:
    x = jnp.asarray(3 * rng.standard_normal((b, t, d)) + 1, jnp.float32)
    params = {"params": {"scale": jnp.linspace(0.5, 1.5, d), "bias": jnp.linspace(-1.0, 1.0, d)}}
    flax_ln, ours = nn.LayerNorm(1e-12), layers.LayerNorm(1e-12)
    run = lambda m: lambda p, x: m.apply(p, x)
    out = {"nn.LayerNorm": jax_variant(run(flax_ln), params, x), "two-pass": jax_variant(run(ours), params, x)}
    import torch

    tln = torch.nn.LayerNorm(d, eps=1e-12)
    out["torch"] = torch_variant(tln, x)
    return out, float(jnp.max(jnp.abs(flax_ln.apply(params, x) - ours.apply(params, x))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    b, t, h, hd = args.batch, args.seq, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    ops = {
        "attention": attention_variants(b, t, h, hd, rng),
        "gelu": gelu_variants(b, t, 4 * h * hd, rng),
        "layernorm": layernorm_variants(b, t, h * hd, rng),
    }
    print(f"batch {b} x {t} tokens, {h} heads of {hd}, FFN {4 * h * hd}; forward, then forward + vjp; median (range) "
          f"of {args.rounds} alternated rounds; ratio to the first variant of the op in the same round")  # fmt: skip
    for op, (variants, err) in ops.items():
        secs = step_time.time_variants({name: (fn, ()) for name, fn in variants.items()}, args.rounds)
        times = {name: [1e3 * x for x in xs] for name, xs in secs.items()}  # ms
        first = next(iter(times.values()))
        print(f"{op} (max |ours - replaced| {err:.1e})")
        for name, ts in times.items():
            ratios = [a / c for a, c in zip(ts, first, strict=True)]
            print(f"  {name:<13} {statistics.median(ts):7.3f} ms ({min(ts):.3f}-{max(ts):.3f}); ratio "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
