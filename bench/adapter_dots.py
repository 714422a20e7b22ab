"""The adapter's thin backward dots on their own: why `Adapted.out_proj` puts Bᵀ behind an optimization barrier.

The out-projection z = u Bᵀ (u [n, rank], B [d_out, rank]) has the weight gradient dB = gᵀ u [d_out, rank]. XLA
folds the transpose of B into that dot, which then writes its [d_out, rank] result directly; with the barrier
it computes uᵀ g [rank, d_out] and transposes the small result. Each variant is the vjp (du, dB) of one
out-projection, timed interleaved as in bench/step_time.py (median ms of --rounds; folded / barrier is the median
of the same-round ratios), next to the base layer's own input gradient g Wᵀ.

    python -m bench.adapter_dots --tokens 1024 --rank 8 --rounds 30
"""

import argparse
import statistics

import jax
import jax.numpy as jnp

from bench import step_time


def variants(n: int, rank: int, d_in: int, d_out: int) -> dict:
    """{name: (jitted fn, args)} for one [d_in, d_out] layer with a rank-`rank` adapter."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    g = jax.random.normal(k1, (n, d_out))
    u = jax.random.normal(k2, (n, rank))
    b = jax.random.normal(k3, (d_out, rank))
    w = jax.random.normal(k4, (d_in, d_out))
    barrier = jax.lax.optimization_barrier
    folded = lambda u, b, g: jax.vjp(lambda u, b: u @ b.T, u, b)[1](g)
    kept = lambda u, b, g: jax.vjp(lambda u, b: u @ barrier(b.T), u, b)[1](g)
    base_dx = lambda g, w: g @ w.T
    return {
        "base g Wt": (jax.jit(base_dx), (g, w)),
        "vjp folded": (jax.jit(folded), (u, b, g)),
        "vjp barrier": (jax.jit(kept), (u, b, g)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="n = batch x sequence")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; n = {args.tokens}, rank {args.rank}")
    print(f"{'d_in x d_out':<14}{'base g Wt ms':>14}{'vjp folded ms':>15}{'vjp barrier ms':>16}{'folded/barrier':>16}")
    for d_in, d_out in ((768, 768), (768, 3072), (3072, 768)):
        vs = variants(args.tokens, args.rank, d_in, d_out)
        folded, kept = (jax.device_get(vs[k][0](*vs[k][1])) for k in ("vjp folded", "vjp barrier"))
        if not all(jnp.allclose(x, y, rtol=1e-4, atol=1e-3) for x, y in zip(folded, kept, strict=True)):
            raise RuntimeError(f"{d_in} x {d_out}: the folded and the barrier vjp disagree")
        times = step_time.time_variants(vs, args.rounds)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"{f'{d_in} x {d_out}':<14}{ms['base g Wt']:>14.2f}{ms['vjp folded']:>15.2f}{ms['vjp barrier']:>16.2f}"
            f"{step_time.paired(times, 'vjp folded', 'vjp barrier')[0]:>16.2f}"
        )


if __name__ == "__main__":
    main()
