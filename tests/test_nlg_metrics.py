"""Tests for train/nlg/metrics.py against independent implementations of the published formulas (BLEU,
TER without shifts, ROUGE-L, NIST, CIDEr-D) on pre-tokenized lower-case text, plus METEOR's
multi-reference rule and the WebNLG seen / unseen split."""

import collections
import json
import math

import numpy as np
import pytest

from train.nlg import metrics as nlg_metrics

HYPS = ["the cat sat on the mat today", "a dog is in the big garden", "the blue spice is a coffee shop in town"]
REFS = [
    ["the cat sat on the mat", "today a cat was sitting on the mat"],
    ["the dog is in the garden"],
    [
        "blue spice is a coffee shop in the city centre",
        "there is a coffee shop in town called blue spice",
        "the blue spice coffee shop is in town",
    ],
]


def ngrams(words, n):
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def ref_bleu(hyps, refs):
    """Papineni et al.: clipped n-gram precisions (max count over refs), closest ref length (ties: shorter)."""
    match, total, c, r = np.zeros(4), np.zeros(4), 0, 0
    for h, rs in zip(hyps, refs, strict=True):
        hw, rws = h.split(), [x.split() for x in rs]
        for n in range(1, 5):
            max_ref = collections.Counter()
            for rw in rws:
                max_ref |= ngrams(rw, n)
            match[n - 1] += sum((ngrams(hw, n) & max_ref).values())
            total[n - 1] += max(len(hw) - n + 1, 0)
        c += len(hw)
        r += min((abs(len(rw) - len(hw)), len(rw)) for rw in rws)[1]
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * math.exp(np.mean(np.log(match / total)))


def levenshtein(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def lcs(a, b):
    t = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1, j + 1] = t[i, j] + 1 if x == y else max(t[i, j + 1], t[i + 1, j])
    return t[-1, -1]


def test_bleu_matches_reference_formula():
    np.testing.assert_allclose(nlg_metrics.bleu(HYPS, REFS), ref_bleu(HYPS, REFS), rtol=1e-9)
    # A missing reference (None padding) is not an empty reference: BLEU ignores it.
    one_ref = [[r[0]] for r in REFS]
    np.testing.assert_allclose(nlg_metrics.bleu(HYPS, one_ref), ref_bleu(HYPS, one_ref), rtol=1e-9)


def test_ter_matches_edit_distance_when_no_shift_helps():
    """TER = sum_i min_r edits(h_i, r) / sum_i mean_r len(r), for outputs that are in reference order."""
    hyps = ["a b c d e", "x y z", "p q r s"]
    refs = [["a b x d e", "a c d e f g"], ["x y z w"], ["p q r s", "p q"]]
    edits = sum(min(levenshtein(h.split(), r.split()) for r in rs) for h, rs in zip(hyps, refs, strict=True))
    length = sum(np.mean([len(r.split()) for r in rs]) for rs in refs)
    np.testing.assert_allclose(nlg_metrics.ter(hyps, refs), edits / length, rtol=1e-9)


def test_rouge_l_is_mean_of_best_lcs_f_measure():
    want = []
    for h, rs in zip(HYPS, REFS, strict=True):
        hw = h.split()
        scores = []
        for r in rs:
            rw = r.split()
            p, rec = lcs(hw, rw) / len(hw), lcs(hw, rw) / len(rw)
            scores.append(2 * p * rec / (p + rec) if p + rec else 0.0)
        want.append(max(scores))
    np.testing.assert_allclose(nlg_metrics.rouge_l(HYPS, REFS), np.mean(want), rtol=1e-9)


def test_nist_matches_doddington_formula_with_one_reference():
    """NIST = sum_n [sum info(matched n-grams) / #hyp n-grams] * exp(beta log^2 min(Lsys/Lref, 1)), with
    info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over the references and beta = log 0.5 / log^2 1.5."""
    refs = [[r[0]] for r in REFS]
    counts = collections.Counter()
    for (r,) in refs:
        for n in range(1, 6):
            counts.update(ngrams(r.split(), n))
    n_words = sum(len(r.split()) for (r,) in refs)
    info = lambda g: math.log2((counts[g[:-1]] if len(g) > 1 else n_words) / counts[g])
    score = 0.0
    for n in range(1, 6):
        num = sum(
            info(g) * k
            for h, (r,) in zip(HYPS, refs, strict=True)
            for g, k in (ngrams(h.split(), n) & ngrams(r.split(), n)).items()
        )
        score += num / sum(max(len(h.split()) - n + 1, 0) for h in HYPS)
    ratio = sum(len(h.split()) for h in HYPS) / n_words
    score *= math.exp(math.log(0.5) / math.log(1.5) ** 2 * math.log(min(ratio, 1.0)) ** 2)
    np.testing.assert_allclose(nlg_metrics.nist(HYPS, refs), score, rtol=1e-9)


def test_cider_matches_cider_d_formula():
    """CIDEr-D (Vedantam et al.): tf-idf n-gram vectors (idf over the reference sets), clipped cosine with a
    Gaussian length penalty (sigma 6), mean over n = 1..4 and over references, times 10, mean over inputs."""
    n_docs = len(REFS)
    df = collections.Counter(
        g for rs in REFS for g in {g for r in rs for n in range(1, 5) for g in ngrams(r.split(), n)}
    )

    def vec(words, n):
        return {g: k * (math.log(n_docs) - math.log(max(1.0, df[g]))) for g, k in ngrams(words, n).items()}

    scores = []
    for h, rs in zip(HYPS, REFS, strict=True):
        total = 0.0
        for r in rs:
            hw, rw = h.split(), r.split()
            for n in range(1, 5):
                vh, vr = vec(hw, n), vec(rw, n)
                nh, nr = math.sqrt(sum(v * v for v in vh.values())), math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
                sim = dot / (nh * nr) if nh and nr else dot
                total += sim * math.exp(-((len(hw) - len(rw)) ** 2) / (2 * 6.0**2)) / 4
        scores.append(10 * total / len(rs))
    np.testing.assert_allclose(nlg_metrics.cider(HYPS, REFS), np.mean(scores), rtol=1e-9)


def test_meteor_best_reference_and_subsets():
    """One JVM: an input scored against two references equals its better single-reference score."""
    h, (r1, r2) = HYPS[0], REFS[0]
    hyps = [h, h, h, "zebra quantum", r1]
    refs = [[r1, r2], [r1], [r2], [r1], [r1]]
    got = nlg_metrics.meteor(hyps, refs, {"both": [0], "r1": [1], "r2": [2], "none": [3], "same": [4], "empty": []})
    if isinstance(got["both"], str):
        pytest.skip(got["both"])
    np.testing.assert_allclose(got["both"], max(got["r1"], got["r2"]), rtol=1e-9)
    assert got["none"] == 0.0 and got["same"] > 0.95 and got["empty"] == "unavailable: no inputs"


def test_meteor_without_java_says_so(monkeypatch):
    monkeypatch.setattr(nlg_metrics.shutil, "which", lambda name: None)
    assert nlg_metrics.meteor(HYPS, REFS) == {"all": "unavailable: java not found on PATH (METEOR 1.5 runs on the JVM)"}


def test_webnlg_metrics_split_seen_and_unseen_after_lora_tokenization(monkeypatch):
    calls = []
    monkeypatch.setattr(
        nlg_metrics, "meteor", lambda h, r, subsets: calls.append((h, r, subsets)) or {k: 0.5 for k in subsets}
    )
    hyps = ["The Cat, sat.", "A dog is in the garden", "Blue Spice is a coffee shop"]
    got = nlg_metrics.compute_metrics(
        "webnlg", hyps, REFS, ["Airport", "Artist", "Food"], seen=frozenset({"Airport", "Food"})
    )
    tokenized = ["the cat , sat .", "a dog is in the garden", "blue spice is a coffee shop"]
    assert calls[0][0] == tokenized
    assert calls[0][2] == {"all": [0, 1, 2], "seen": [0, 2], "unseen": [1]}
    assert got["seen"]["BLEU"] == nlg_metrics.bleu([tokenized[0], tokenized[2]], [REFS[0], REFS[2]])
    assert got["unseen"]["TER"] == nlg_metrics.ter([tokenized[1]], [REFS[1]])
    assert set(got["all"]) == {"BLEU", "METEOR", "TER", "ROUGE_L"} and got["all"]["METEOR"] == 0.5
    e2e = nlg_metrics.compute_metrics("e2e", hyps, REFS)
    assert set(e2e) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} and calls[1][0] == hyps  # E2E: as is
    with pytest.raises(ValueError, match="config.task='wmt'"):
        nlg_metrics.compute_metrics("wmt", hyps, REFS)


def test_write_outputs(tmp_path):
    nlg_metrics.write_outputs(
        tmp_path / "eval", "test", ["c1", "c2"], ["h1", "h 2\n"], [["r1", "r2"], ["r3"]], {"BLEU": 1.0}
    )
    assert (tmp_path / "eval" / "test.predictions.txt").read_text() == "h1\nh 2\n"
    assert (tmp_path / "eval" / "test.references.txt").read_text() == "r1\nr2\n\nr3\n\n"
    rows = [json.loads(x) for x in (tmp_path / "eval" / "test.jsonl").read_text().splitlines()]
    assert rows[1] == {"context": "c2", "prediction": "h 2\n", "references": ["r3"]}
    assert json.loads((tmp_path / "eval" / "test.metrics.json").read_text()) == {"BLEU": 1.0}
