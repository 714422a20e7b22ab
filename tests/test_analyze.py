"""train.analyze: the factored SVD of dW = scale · B_full · T · A equals numpy's SVD of the dense float64 dW, and the
eigenvalues of T equal np.linalg.eigvals of T built independently here, for every structure and leaf kind (plain
Dense, fused GPT-2 c_attn with q and v adapted under one joint T, nn.scan-stacked layers, a DenseGeneral with two
input axes); read back from real Orbax checkpoints (mt.save_adapters and a train-style workdir)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mtlora_jax as mt
from train import analyze

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")
RANK, ALPHA = 3, 6.0


def _numpy_t(structure, c, d):
    """T from the paper's table (../shared/REFERENCE.md), in float64, independent of mtlora_jax.structures."""
    c = None if c is None else np.asarray(c, np.float64)
    d = None if d is None else np.asarray(d, np.float64)
    if structure == "lora":
        return None
    return {"shim": lambda: c, "icfm": lambda: c @ c.T, "ctcm": lambda: c @ d, "dtsm": lambda: c + d}[structure]()


def _numpy_dw(ad, index=()):
    """Dense torch-orientation dW [d_out, d_in] in float64 from the raw factors of one (layer of an) adapter."""
    pick = lambda m: None if m is None else np.asarray(m, np.float64)[index]
    a, b, c, d = (pick(m) for m in (ad.a, ad.b, ad.c, ad.d))
    if ad.slices > 1:  # block-diagonal B_full: slice j's rows get b's j-th block on its j-th rank columns
        d_slice, k = b.shape[0] // sum(ad.enable), sum(ad.enable)
        b_full, j = np.zeros((ad.slices * d_slice, k * RANK)), 0
        for s, on in enumerate(ad.enable):
            if on:
                b_full[s * d_slice : (s + 1) * d_slice, j * RANK : (j + 1) * RANK] = b[j * d_slice : (j + 1) * d_slice]
                j += 1
        b = b_full
    t = _numpy_t(ad.structure, c, d)
    return ad.scale * (b @ (a if t is None else t @ a))


def _case(kind):
    """(base params, MTLoRAConfig kwargs, expected adapted paths) of one leaf kind."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.normal(size=s).astype(np.float32)
    if kind == "dense":  # two layers, d_in 7 != d_out 5
        base = {"enc": {f"layer_{i}": {"query": {"kernel": w(7, 5)}} for i in range(2)}}
        return base, {"targets": (r"enc/layer_\d+/query/kernel",)}
    if kind == "fused":  # GPT-2 c_attn [d, 3d]: q and v adapted, one joint T [2r, 2r]
        base = {"transformer": {"h_0": {"attn": {"c_attn": {"kernel": w(6, 12)}}}}}
        return base, {"targets": (r".*/c_attn/kernel",), "fused": {r".*/c_attn/kernel": (3, (True, False, True))}}
    if kind == "stacked":  # nn.scan: 3 layers stacked on a leading axis
        base = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": w(3, 8, 4)}}}}}
        return base, {"targets": (r"model/layers/.*/kernel",), "stack_ndim": {r"model/layers/.*": 1}}
    if kind == "in_ndim2":  # DenseGeneral attention output [heads, head_dim, d_out]
        base = {"attn": {"out": {"kernel": w(2, 3, 5)}}}
        return base, {"targets": (r"attn/out/kernel",), "in_ndim": {r"attn/out/kernel": 2}}
    raise ValueError(kind)


def _trained(kind, structure):
    """Adapted params with every factor random (B != 0, as after training)."""
    base, kw = _case(kind)
    params = mt.init(base, mt.MTLoRAConfig(rank=RANK, alpha=ALPHA, structure=structure, **kw), jax.random.key(1))
    rng = np.random.default_rng(2)

    def randomize(leaf):
        if not mt.is_adapted(leaf):
            return leaf
        rand = lambda m: None if m is None else rng.normal(size=m.shape).astype(np.float32)
        return dataclasses.replace(leaf, a=rand(leaf.a), b=rand(leaf.b), c=rand(leaf.c), d=rand(leaf.d))

    return jax.tree.map(randomize, params, is_leaf=mt.is_adapted)


def _leaves(params):
    out = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, x: out.setdefault("/".join(str(k.key) for k in kp), x) if mt.is_adapted(x) else None,
        params,
        is_leaf=mt.is_adapted,
    )
    return out


KINDS = ["dense", "fused", "stacked", "in_ndim2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_spectra_equal_dense_svd_and_eigvals(kind, structure):
    leaves = _leaves(_trained(kind, structure))
    records, arrays = analyze.analyze_adapters(leaves)
    assert len(records) == sum(int(np.prod(ad.stack_shape)) for ad in leaves.values())
    for rec in records:
        ad = leaves[rec["path"]]
        index = () if not ad.stack_ndim else (rec["layer"],)
        dense = _numpy_dw(ad, index)
        assert rec["shape"] == list(dense.shape) and rec["structure"] == structure
        np.testing.assert_allclose(rec["sv"], np.linalg.svd(dense, compute_uv=False)[: len(rec["sv"])], rtol=1e-9,
                                   atol=1e-9 * np.abs(dense).max())  # fmt: skip
        # mt.delta (w's layout) is the library's own dense dW: same singular values.
        lib = np.asarray(mt.delta(ad), np.float64)[index].reshape(ad.d_in, ad.d_out)
        np.testing.assert_allclose(rec["sv"], np.linalg.svd(lib, compute_uv=False)[: len(rec["sv"])], rtol=1e-4)
        assert rec["frob_norm"] == pytest.approx(np.linalg.norm(dense), rel=1e-9)
        assert rec["stable_rank"] == pytest.approx(np.linalg.norm(dense) ** 2 / np.linalg.norm(dense, 2) ** 2)
        key = rec["path"] + ("" if not ad.stack_ndim else f"#{rec['layer']}")
        np.testing.assert_array_equal(arrays[f"{key}/sv"], rec["sv"])
        pick = lambda m, index=index: None if m is None else np.asarray(m, np.float64)[index]
        t = _numpy_t(structure, pick(ad.c), pick(ad.d))
        if t is None:
            assert rec["t_eig"] is None and f"{key}/t_eig" not in arrays
            continue
        got = np.array([complex(re_, im) for re_, im in rec["t_eig"]])
        want = np.linalg.eigvals(t)
        assert len(got) == len(want) == RANK * (2 if kind == "fused" else 1)
        np.testing.assert_allclose(np.sort_complex(got), np.sort_complex(want), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(arrays[f"{key}/t_eig"], got)
        if structure == "icfm":  # C Cᵀ: symmetric PSD, real non-negative eigenvalues
            assert rec["t_eig_max_abs_imag"] == 0.0 and rec["t_eig_min_real"] >= -1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_gives_the_same_analysis(kind, tmp_path):
    """Adapters rebuilt from an Orbax checkpoint's meta (fused slices, stack axes, in_ndim) analyze the same."""
    params = _trained(kind, "ctcm")
    folder = mt.save_adapters(tmp_path / "ckpt", params, step=3)
    result = analyze.analyze(folder, str(tmp_path / "out"))
    want, arrays = analyze.analyze_adapters(_leaves(params))
    assert result["step"] == 3 and result["structures"] == ["ctcm"]
    assert json.loads((tmp_path / "out" / analyze.ANALYSIS_JSON).read_text())["adapters"] == result["adapters"]
    assert result["adapters"] == json.loads(json.dumps(want))
    npz = np.load(tmp_path / "out" / analyze.ANALYSIS_NPZ)
    assert set(npz.files) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(npz[key], value)


def test_factored_singular_values_rank_deficient_and_untrained():
    """Zero B (an untrained adapter) gives zero singular values; a d_out < R case keeps min(d, R) values."""
    rng = np.random.default_rng(0)
    a, t = rng.normal(size=(4, 9)), rng.normal(size=(4, 4))
    np.testing.assert_array_equal(analyze.factored_singular_values(np.zeros((6, 4)), t, a, 2.0), np.zeros(4))
    b = rng.normal(size=(2, 4))  # d_out = 2 < R = 4
    sv = analyze.factored_singular_values(b, t, a, 0.5)
    np.testing.assert_allclose(sv, np.linalg.svd(0.5 * b @ t @ a, compute_uv=False), rtol=1e-10)
    with pytest.raises(ValueError, match="do not chain"):
        analyze.factored_singular_values(b, np.eye(3), a, 1.0)


def test_spectrum_stats_by_hand():
    stats = analyze.spectrum_stats(np.array([2.0, 1.0, 1.0, 0.0]))
    assert stats["frob_norm"] == pytest.approx(np.sqrt(6)) and stats["spectral_norm"] == 2.0
    assert stats["stable_rank"] == pytest.approx(6 / 4)
    p = np.array([0.5, 0.25, 0.25])
    assert stats["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert analyze.spectrum_stats(np.zeros(3))["stable_rank"] == 0.0


def test_layer_and_module_names():
    assert analyze.layer_and_module("encoder/layer_3/attention/query/kernel", None) == (3, "attention/query")
    assert analyze.layer_and_module("transformer/h_11/attn/c_attn/kernel", None) == (11, "attn/c_attn")
    assert analyze.layer_and_module("model/layers/self_attn/q_proj/kernel", 5) == (5, "self_attn/q_proj")
    assert analyze.layer_and_module("fc1/kernel", None) == (None, "fc1")


def test_cli_on_a_train_workdir_uses_the_latest_step(tmp_path):
    """`python -m train.analyze --workdir W` reads W/checkpoints/<latest>/ and writes W/analysis.json."""
    older, newer = _trained("dense", "ctcm"), _trained("dense", "shim")
    mt.save_adapters(tmp_path / "checkpoints" / "5", older)
    mt.save_adapters(tmp_path / "checkpoints" / "10", newer, step=10)
    out = subprocess.run([sys.executable, "-m", "train.analyze", f"--workdir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / analyze.ANALYSIS_JSON).read_text())
    assert result["step"] == 10 and result["structures"] == ["shim"]
    assert result["checkpoint"].endswith(os.path.join("checkpoints", "10"))
    assert "wrote analysis.json" in out.stdout
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        analyze.checkpoint_folder(str(tmp_path / "nowhere"))
