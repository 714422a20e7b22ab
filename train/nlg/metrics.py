"""Corpus metrics for table-to-text generation (E2E, WebNLG, DART), all multi-reference.

- BLEU (0-100) and TER (fraction) with sacrebleu, corpus level; inputs with fewer references are padded
  with None, sacrebleu's marker for a missing reference (TER divides by the mean length of the real ones).
- METEOR (fraction): METEOR 1.5, the jar and paraphrase table shipped in pycocoevalcap, run as E2E's and
  WebNLG's scripts run it (`-l en -norm`, best reference per input, corpus statistics). It needs java; where
  java or pycocoevalcap is missing the value is the string "unavailable: <reason>", never a number.
- ROUGE-L (fraction): rouge-score F-measure against the best reference, averaged over inputs.
- NIST (E2E): nltk's corpus_nist (n=5) on mteval-13a tokens. nltk scores each input against its single
  best reference, so values are close to, not equal to, mteval-v13a's NIST.
- CIDEr (E2E): CIDEr-D of pycocoevalcap (pure Python) on lower-cased 13a tokens without punctuation, which
  approximates the PTB tokenizer (java) of the E2E script.

WebNLG and DART texts are lower-cased and tokenized first, as LoRA's gpt2_decode.py --tokenize --lower;
E2E texts are scored as they are. WebNLG reports the seen, unseen and all test categories.
"""

import json
import pathlib
import re
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

METRICS = {
    "e2e": ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"),
    "webnlg": ("BLEU", "METEOR", "TER", "ROUGE_L"),
    "dart": ("BLEU", "METEOR", "TER", "ROUGE_L"),
}
# Tokens the PTB tokenizer of the COCO caption scripts drops before CIDEr.
_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", '"'}
_TOKENIZE_13A = Tokenizer13a()


def lora_tokenize(text: str) -> str:
    """LoRA's gpt2_decode.py tokenizer: split around every non-word character."""
    return " ".join(" ".join(re.split(r"(\W)", text)).split())


def _ref_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """[input][ref] -> sacrebleu's [ref][input], padded with None."""
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100, sacrebleu 13a tokenization) of hyps[i] against the references refs[i]."""
    return float(sacrebleu.corpus_bleu(list(hyps), _ref_streams(refs)).score)


def ter(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus TER as a fraction: edits to the closest reference / mean reference length."""
    return float(sacrebleu.corpus_ter(list(hyps), _ref_streams(refs)).score) / 100.0


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F-measure against any reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return float(np.mean([scorer.score_multi(list(r), h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]))


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 5) -> float:
    """nltk corpus NIST (n-grams up to n) on mteval-13a tokens."""
    from nltk.translate.nist_score import corpus_nist

    split = lambda s: _TOKENIZE_13A(s).split()
    return float(corpus_nist([[split(x) for x in r] for r in refs], [split(h) for h in hyps], n=n))


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (pycocoevalcap) on lower-cased 13a tokens without punctuation; idf from these references."""
    from pycocoevalcap.cider.cider import Cider

    clean = lambda s: " ".join(t for t in _TOKENIZE_13A(s.lower()).split() if t not in _PUNCT)
    gts = {i: [clean(x) for x in r] for i, r in enumerate(refs)}
    res = {i: [clean(h)] for i, h in enumerate(hyps)}
    return float(Cider().compute_score(gts, res)[0])


def meteor(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], subsets: dict[str, Sequence[int]] | None = None
) -> dict[str, float | str]:
    """Corpus METEOR 1.5 of each subset of inputs (default {"all": every input}), from one JVM.

    Returns:
      {subset: score in [0, 1]}, or {subset: "unavailable: <reason>"} where METEOR cannot run here.
    """
    subsets = {"all": range(len(hyps))} if subsets is None else subsets
    try:
        import pycocoevalcap.meteor.meteor as meteor_module
    except ImportError:
        return dict.fromkeys(subsets, "unavailable: pycocoevalcap (METEOR 1.5 jar) is not installed")
    java = shutil.which("java")
    if java is None:
        return dict.fromkeys(subsets, "unavailable: java not found on PATH (METEOR 1.5 runs on the JVM)")
    folder = pathlib.Path(meteor_module.__file__).parent
    cmd = [
        java,
        "-Dfile.encoding=UTF-8",
        "-Xmx2G",
        "-jar",
        meteor_module.METEOR_JAR,
        "-",
        "-",
        "-stdio",
        "-l",
        "en",
        "-norm",
    ]
    try:
        return _run_meteor(cmd, folder, hyps, refs, subsets)
    except (OSError, RuntimeError, ValueError) as e:
        return dict.fromkeys(subsets, f"unavailable: METEOR 1.5 failed ({e})")


def _run_meteor(cmd, folder, hyps, refs, subsets):
    """Talk to `meteor-1.5.jar -stdio`: one SCORE line per input, then one EVAL line per subset."""
    flat = lambda s: " ".join(s.replace("|||", "").split())  # one line, no field separator
    proc = subprocess.Popen(
        cmd,
        cwd=folder,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        encoding="utf8",
    )

    def ask(line, n_answers=1):
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answers = [proc.stdout.readline() for _ in range(n_answers)]
        if not answers[-1]:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.poll()}")
        return answers[-1].strip()

    try:
        stats = [ask(" ||| ".join(["SCORE", *map(flat, r), flat(h)])) for h, r in zip(hyps, refs, strict=True)]
        out = {}
        for name, idx in subsets.items():
            idx = list(idx)
            # EVAL answers one line per input, then the corpus score.
            out[name] = (
                float(ask(" ||| ".join(["EVAL", *(stats[i] for i in idx)]), len(idx) + 1))
                if idx
                else ("unavailable: no inputs")
            )
        return out
    finally:
        proc.kill()
        proc.wait()


def _scores(task, hyps, refs, subsets):
    """{subset: {metric: value}} for the task's metrics; METEOR runs once for all subsets."""
    met = meteor(hyps, refs, subsets) if "METEOR" in METRICS[task] else {}
    fns = {"BLEU": bleu, "TER": ter, "ROUGE_L": rouge_l, "NIST": nist, "CIDEr": cider}
    out = {}
    for name, idx in subsets.items():
        h, r = [hyps[i] for i in idx], [refs[i] for i in idx]
        out[name] = {
            m: (met[name] if m == "METEOR" else fns[m](h, r)) if idx else "unavailable: no inputs"
            for m in METRICS[task]
        }
    return out


def compute_metrics(
    task: str,
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    categories: Sequence[str] = (),
    seen: frozenset[str] = frozenset(),
) -> dict:
    """The task's metrics; WebNLG as {"all", "seen", "unseen"} sub-dicts by category (seen: train categories).

    Args:
      task: "e2e", "webnlg" or "dart".
      hyps: one prediction per input. refs: the references of each input.
      categories: WebNLG category per input. seen: the categories of the training split.
    """
    if task not in METRICS:
        raise ValueError(f"config.task={task!r}: expected one of {sorted(METRICS)}")
    if len(hyps) != len(refs) or not all(refs):
        raise ValueError(f"{len(hyps)} predictions for {len(refs)} inputs; every input needs a reference")
    if task != "e2e":  # LoRA's gpt2_decode.py --tokenize --lower
        hyps = [lora_tokenize(h.lower()) for h in hyps]
        refs = [[lora_tokenize(x.lower()) for x in r] for r in refs]
    if task != "webnlg":
        return _scores(task, hyps, refs, {"all": range(len(hyps))})["all"]
    if len(categories) != len(hyps) or not seen:
        raise ValueError("WebNLG metrics need a category per input and the training categories (seen)")
    is_seen = [c in seen for c in categories]
    subsets = {
        "all": list(range(len(hyps))),
        "seen": [i for i, s in enumerate(is_seen) if s],
        "unseen": [i for i, s in enumerate(is_seen) if not s],
    }
    return _scores(task, hyps, refs, subsets)


def write_outputs(
    workdir: str | pathlib.Path,
    name: str,
    contexts: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    metrics: dict,
) -> None:
    """Write <name>.predictions.txt (one per line), <name>.references.txt (E2E layout: the references of
    an input one per line, a blank line after each input), <name>.jsonl and <name>.metrics.json."""
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    one_line = lambda s: " ".join(s.split())
    (out / f"{name}.predictions.txt").write_text("".join(one_line(h) + "\n" for h in hyps), encoding="utf8")
    (out / f"{name}.references.txt").write_text(
        "".join("".join(one_line(x) + "\n" for x in r) + "\n" for r in refs), encoding="utf8"
    )
    rows = [
        json.dumps({"context": c, "prediction": h, "references": list(r)}, ensure_ascii=False)
        for c, h, r in zip(contexts, hyps, refs, strict=True)
    ]
    (out / f"{name}.jsonl").write_text("".join(x + "\n" for x in rows), encoding="utf8")
    (out / f"{name}.metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf8")
