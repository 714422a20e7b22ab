"""Spectra of the learned updates dW and eigenvalues of T from any adapter checkpoint.

  python -m train.analyze --workdir workdirs/study/cola-shim-s0        # its latest checkpoint
  python -m train.analyze --checkpoint path/to/adapters --out /tmp/a   # an mt.save_adapters folder

For every adapted weight (every layer of a stacked, nn.scan weight) of the checkpoint, with the torch-orientation
update dW = scale · B_full · T · A  ([d_out, d_in], mtlora_jax/adapted.py), this computes

  * the singular values of dW, exactly and without forming it: thin QR factorizations B_full = Q_b R_b and
    Aᵀ = Q_a R_a give dW = Q_b (scale · R_b T R_aᵀ) Q_aᵀ with orthonormal Q_b, Q_a, so dW has the singular values
    of the R x R core (R = rank, or k · rank for a fused projection with k adapted slices);
  * the eigenvalues of T (complex in general; ICFM's T = C Cᵀ is symmetric positive semi-definite, so they are
    real and >= 0; LoRA's T = I is not stored);
  * summaries: Frobenius and spectral norm, stable rank ‖dW‖_F² / σ₁² and effective rank exp(H(σ / Σσ)).

The checkpoint's own meta (structure, rank, scale, slices, shapes of each adapter) rebuilds the `mt.Adapted`
nodes, so no base model is loaded. Output: `<out>/analysis.json` (everything, per adapter and layer) and
`<out>/analysis.npz` (the same spectra as arrays, keys "<path>#<layer>/sv" and ".../t_eig").
"""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

import mtlora_jax as mt

ANALYSIS_JSON, ANALYSIS_NPZ = "analysis.json", "analysis.npz"
# Path components that hold the stacked layers of an nn.scan model (mtlora_jax/models/hf_names.py LAYERS).
_SCANNED = ("layers", "h")
_UNROLLED = re.compile(r"^[A-Za-z]+_(\d+)$")  # "layer_3", "h_3", "layers_3"


def checkpoint_folder(path: str) -> str:
    """A workdir (its latest checkpoint), its `checkpoints/` folder or one checkpoint folder -> that folder."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(os.path.join(path, "adapters")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
        if steps:
            return os.path.join(root, str(max(steps)))
    raise FileNotFoundError(
        f"{path}: no adapter checkpoint (expected a workdir with checkpoints/<step>/, or a folder with adapters/ "
        "and meta/ written by train.glue, train.nlg or mt.save_adapters)"
    )


def load_adapters(folder: str) -> tuple[dict[str, mt.Adapted], dict]:
    """The adapted leaves of one checkpoint folder, rebuilt from its meta (w is only a shape, never loaded).

    Returns:
      ({path: mt.Adapted with numpy factors}, meta dict of the checkpoint).
    """
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(folder, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        shapes = {p: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for p, (s, d) in meta["arrays"].items()}
        flat = ckptr.restore(folder, ocp.args.Composite(adapters=ocp.args.StandardRestore(shapes)))["adapters"]
    adapters = {}
    for path, m in meta["adapters"].items():
        get = lambda f, p=path: None if f"{p}/{f}" not in flat else np.asarray(flat[f"{p}/{f}"])
        ad = mt.Adapted(
            w=jax.ShapeDtypeStruct(tuple(m["w_shape"]), np.float32),
            a=get("a"), b=get("b"), c=get("c"), d=get("d"),
            structure=m["structure"], scale=float(m["scale"]), in_ndim=m["in_ndim"], stack_ndim=m["stack_ndim"],
            slices=m["slices"], enable=tuple(m["enable"]),
        )  # fmt: skip
        adapters[path] = ad.validate(f"{folder}: {path}")
    return adapters, meta


def factored_singular_values(b_full: np.ndarray, t: np.ndarray | None, a: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of scale · b_full · t · a without forming the product (exact up to rounding).

    Args:
      b_full: [d_out, R]. t: [R, R] or None (the identity). a: [R, d_in]. scale: alpha / rank.

    Returns:
      [min(R, d_out, d_in)] float64 singular values, descending.
    """
    b_full, a = np.asarray(b_full, np.float64), np.asarray(a, np.float64)
    r = a.shape[0]
    if b_full.shape[1] != r or (t is not None and np.shape(t) != (r, r)):
        raise ValueError(f"factors do not chain: b_full {b_full.shape}, t {np.shape(t)}, a {a.shape}")
    _, r_b = np.linalg.qr(b_full)  # b_full = Q_b R_b, R_b [min(d_out, R), R]
    _, r_a = np.linalg.qr(a.T)  # aᵀ = Q_a R_a, R_a [min(d_in, R), R]
    core = r_b if t is None else r_b @ np.asarray(t, np.float64)
    return scale * np.linalg.svd(core @ r_a.T, compute_uv=False)  # core: [min(d_out, R), min(d_in, R)]


def spectrum_stats(sv: np.ndarray) -> dict[str, float]:
    """Frobenius / spectral norm, stable rank (‖·‖_F² / σ₁²) and effective rank exp(H(σ / Σσ)) of a spectrum."""
    sv = np.asarray(sv, np.float64)
    total, top = float(np.sum(sv)), float(sv[0]) if sv.size else 0.0
    if top <= 0:
        return {"frob_norm": 0.0, "spectral_norm": 0.0, "stable_rank": 0.0, "effective_rank": 0.0}
    p = sv[sv > 0] / total
    return {
        "frob_norm": float(np.sqrt(np.sum(sv**2))),
        "spectral_norm": top,
        "stable_rank": float(np.sum(sv**2) / top**2),
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
    }


def layer_and_module(path: str, index: int | None) -> tuple[int | None, str]:
    """(layer number, module name) of an adapted weight: "encoder/layer_3/attention/query/kernel" -> (3,
    "attention/query"); a stacked "model/layers/self_attn/q_proj/kernel" at `index` 5 -> (5, "self_attn/q_proj")."""
    parts = path.split("/")
    if parts[-1] in ("kernel", "embedding"):
        parts = parts[:-1]
    for i, part in enumerate(parts):
        if index is not None and part in _SCANNED:
            return index, "/".join(parts[i + 1 :])
        match = _UNROLLED.match(part) if index is None else None
        if match:
            return int(match.group(1)), "/".join(parts[i + 1 :])
    return index, "/".join(parts)


def _layers(ad: mt.Adapted):
    """(stack index or None, the unstacked Adapted) for every layer of a (possibly stacked) adapter."""
    if not ad.stack_ndim:
        yield None, ad
        return
    stack = ad.stack_shape
    for flat_i, idx in enumerate(np.ndindex(*stack)):
        take = lambda m, idx=idx: None if m is None else np.asarray(m)[idx]
        w = jax.ShapeDtypeStruct(tuple(ad.w.shape[len(stack) :]), ad.w.dtype)
        fields = {f: take(getattr(ad, f)) for f in ("a", "b", "c", "d")}
        yield flat_i, dataclasses.replace(ad, w=w, stack_ndim=0, **fields)


def analyze_adapters(adapters: dict[str, mt.Adapted]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per adapter and layer: singular values of dW, eigenvalues of T and spectrum summaries.

    Returns:
      (records: JSON-able dicts with path, layer, module, structure, shape [d_out, d_in], total_rank, scale,
       sv, frob_norm, spectral_norm, stable_rank, effective_rank, t_eig [[re, im], ...] or None (lora),
       t_eig_min_real, t_eig_max_abs_imag;  arrays: {"<path>#<layer>/sv": [R], ".../t_eig": [R] complex}).
    """
    records, arrays = [], {}
    for path, ad in adapters.items():
        for index, one in _layers(ad):
            t = one.cast(np.float64).t()  # numpy float64 factors: T = C Cᵀ etc. formed in float64
            t = None if t is None else np.asarray(t, np.float64)
            sv = factored_singular_values(np.asarray(one.b_full()), t, np.asarray(one.a), one.scale)
            layer, module = layer_and_module(path, index)
            key = path if index is None else f"{path}#{index}"
            rec = {"path": path, "layer": layer, "module": module, "structure": one.structure}
            rec.update(shape=[one.d_out, one.d_in], total_rank=one.total_rank, scale=one.scale, sv=sv.tolist())
            rec.update(spectrum_stats(sv))
            arrays[f"{key}/sv"] = sv
            if t is None:
                rec.update(t_eig=None, t_eig_min_real=None, t_eig_max_abs_imag=None)
            else:
                eig = np.linalg.eigvals(t)
                eig = eig[np.lexsort((eig.imag, -eig.real))]  # by real part, descending
                rec.update(t_eig=[[float(z.real), float(z.imag)] for z in eig])
                rec.update(t_eig_min_real=float(eig.real.min()), t_eig_max_abs_imag=float(np.abs(eig.imag).max()))
                arrays[f"{key}/t_eig"] = eig
            records.append(rec)
    return records, arrays


def analyze(path: str, out: str | None = None) -> dict:
    """Analyzes the checkpoint at `path` (see `checkpoint_folder`) and writes analysis.json / .npz into `out`.

    Args:
      path: a workdir, its checkpoints/ folder, or a checkpoint folder.
      out: output folder; default `path` when it is a workdir, else the checkpoint folder's parent.

    Returns:
      The analysis dict: {"checkpoint", "step", "structures", "adapters": records of `analyze_adapters`}.
    """
    folder = checkpoint_folder(path)
    adapters, meta = load_adapters(folder)
    if not adapters:
        raise ValueError(f"{folder}: the checkpoint holds no adapters")
    records, arrays = analyze_adapters(adapters)
    result = {
        "checkpoint": folder,
        "step": meta.get("step"),
        "structures": sorted({r["structure"] for r in records}),
        "adapters": records,
    }
    out = out or (path if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(folder))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ANALYSIS_JSON), "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    np.savez_compressed(os.path.join(out, ANALYSIS_NPZ), **arrays)
    return result


def define_flags() -> None:
    """Defines the command-line flags (only when run as a script: importing the module defines none)."""
    flags.DEFINE_string("workdir", None, "A train.glue / train.nlg workdir: analyzes its latest checkpoint.")
    flags.DEFINE_string("checkpoint", None, "Or: one checkpoint folder (adapters/ and meta/).")
    flags.DEFINE_string("out", None, "Output folder for analysis.json / .npz (default: the workdir).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if (flags.FLAGS.workdir is None) == (flags.FLAGS.checkpoint is None):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    result = analyze(flags.FLAGS.workdir or flags.FLAGS.checkpoint, flags.FLAGS.out)
    for rec in result["adapters"]:
        sv = ", ".join(f"{s:.3g}" for s in rec["sv"][:4])
        eig = "" if rec["t_eig"] is None else f"  min Re eig(T) {rec['t_eig_min_real']:.3g}"
        print(f"{rec['path']}#{rec['layer']}: sv [{sv}{', ...' if len(rec['sv']) > 4 else ''}]"
              f"  stable rank {rec['stable_rank']:.2f}{eig}")  # fmt: skip
    print(f"wrote {ANALYSIS_JSON} and {ANALYSIS_NPZ} for {len(result['adapters'])} adapted matrices")


if __name__ == "__main__":
    define_flags()
    app.run(main)
