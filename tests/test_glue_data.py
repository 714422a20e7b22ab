"""GLUE loading: the official .tsv layouts (fixtures and the real files), strict errors, and the HF / TFDS sources.

Expected values are literals read off the fixture files by hand (tests/fixtures/glue, written in the official
layouts) or the row counts of ../shared/data/README.md, never values produced by the code under test.
"""

import math
import shutil
import sys
import time
import types

import numpy as np
import pytest

from train import hub
from train.glue import data as glue_data
from train.glue import tasks as glue_tasks

# task, split, rows, labels, first text_a (start), first text_b (start)
FIXTURE_SPLITS = [
    ("cola", "train", 10, [1, 1, 0, 1, 0, 1, 0, 1, 0, 1], "Our friends won't buy this", None),
    ("cola", "dev", 5, [1, 0, 1, 0, 1], "The sailors rode the breeze", None),
    ("cola", "test", 3, [-1, -1, -1], "Bill whistled past the house.", None),
    ("sst2", "train", 10, [0, 0, 1, 0, 0, 0, 1, 1, 0, 1], "hide new secretions from the parental units ", None),
    ("sst2", "dev", 5, [1, 0, 1, 0, 0], "it 's a charming and often affecting journey . ", None),
    ("sst2", "test", 2, [-1, -1], "uneasy mishmash of styles and genres .", None),
    ("mrpc", "train", 6, [1, 0, 1, 0, 1, 1], 'Amrozi accused his brother , whom he called " the', "Referring to him"),
    ("mrpc", "dev", 5, [1, 0, 0, 1, 0], "He said the foodservice pie", '" The foodservice pie business'),
    ("mrpc", "test", 2, [-1, -1], "PCCW 's chief operating officer", "Current Chief Operating Officer"),
    ("qqp", "dev", 5, [0, 0, 1, 0, 0], "Why are African-Americans so beautiful?", "Why are hispanics so beautiful?"),
    ("qqp", "test", 2, [-1, -1], "Would the idea of Trump and Putin", "Do you think that if Donald Trump"),
    ("mnli", "train", 9, [1, 0, 0, 0, 1, 0, 1, 0, 2], "Conceptually cream skimming", "Product and geography"),
    ("mnli", "dev_matched", 5, [1, 2, 0, 2, 2], "The new rights are nice enough", "Everyone really likes the"),
    ("mnli", "dev_mismatched", 4, [2, 2, 0, 1], "Your contribution helped", "Your contributions were of no"),
    ("mnli", "test_matched", 2, [-1, -1], "Hierbas, ans seco, ans dulce", "Hierbas is a name worth"),
    ("mnli", "test_mismatched", 1, [-1], "What have you decided,", "So what's your decision?"),
    ("qnli", "train", 6, [1, 1, 0, 0, 1, 0], "When did the third Digimon", "Unlike the two seasons before it"),
    ("qnli", "dev", 3, [0, 1, 1], "What came into force after", "As of that day, the new constitution"),
    ("qnli", "test", 1, [-1], "What organization is devoted", "For some decades prior to the First"),
    ("rte", "train", 6, [1, 0, 0, 0, 1, 0], "No Weapons of Mass Destruction", "Weapons of Mass Destruction Found"),
    ("rte", "dev", 3, [1, 0, 1], "Dana Reeve, the widow of the actor", "Christopher Reeve had an accident."),
    ("rte", "test", 1, [-1], "Mangla was summoned after", "Shukla is related to Mangla."),
]


@pytest.fixture
def glue_dir(fixtures):
    return str(fixtures / "glue")


@pytest.mark.parametrize("task,split,rows,labels,text_a,text_b", FIXTURE_SPLITS)
def test_fixture_splits(glue_dir, task, split, rows, labels, text_a, text_b):
    """Every official layout parses: row count, class ids in HF order, texts kept verbatim."""
    ex = glue_data.load_task(task, split, data_dir=glue_dir, source="local")
    assert (ex.task, ex.split, len(ex)) == (task, split, rows)
    assert ex.labels.dtype == np.int32
    assert ex.labels.tolist() == labels
    assert ex.text_a[0].startswith(text_a)
    assert (ex.text_b is None) == (text_b is None)
    if text_b is not None:
        assert ex.text_b[0].startswith(text_b) and len(ex.text_b) == rows


def test_fields_are_kept_verbatim(glue_dir):
    """No CSV quoting: unbalanced quotes, trailing spaces and the row's exact text survive (MRPC dev row 1)."""
    ex = glue_data.load_task("mrpc", "dev", data_dir=glue_dir)
    assert (
        ex.text_a[0] == "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy ."
    )
    assert ex.text_b[0] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert ex.text_b[1].endswith(
        'he was " 100 percent behind George Bush " and looked forward to using his years of training in the war .'
    )


@pytest.mark.filterwarnings("ignore:.*dropped 2 rows")
def test_every_task_split_has_a_fixture(glue_dir):
    """The fixtures cover every split of every task (STS-B and QQP train are checked below)."""
    for name, spec in glue_tasks.TASKS.items():
        for split in spec.splits:
            assert len(glue_data.load_task(name, split, data_dir=glue_dir)) > 0


def test_cola_dev_without_header_or_final_newline(glue_dir):
    ex = glue_data.load_task("cola", "dev", data_dir=glue_dir)
    assert ex.text_a[-1] == "John arranged for himself to get the prize."


def test_stsb_float_scores(glue_dir):
    train = glue_data.load_task("stsb", "train", data_dir=glue_dir)
    assert train.labels.dtype == np.float32
    np.testing.assert_allclose(train.labels, [5.0, 3.8, 3.8, 2.6, 4.25, 0.0, 4.6], rtol=1e-6)
    assert train.text_a[5] == '"It\'s a hard decision," he said.'  # leading quote kept (no CSV quoting)
    dev = glue_data.load_task("stsb", "dev", data_dir=glue_dir)
    np.testing.assert_allclose(dev.labels, [5.0, 4.75, 5.0, 2.4, 2.615], rtol=1e-6)
    test = glue_data.load_task("stsb", "test", data_dir=glue_dir)
    assert len(test) == 2 and np.isnan(test.labels).all()


def test_mnli_uses_gold_label_not_label1(glue_dir):
    """Last dev_mismatched row: label1 = entailment, gold_label = neutral (class 1)."""
    ex = glue_data.load_task("mnli", "dev_mismatched", data_dir=glue_dir)
    assert ex.labels[-1] == glue_tasks.TASKS["mnli"].label_names.index("neutral") == 1


def test_qqp_drops_broken_question_rows_with_warning(glue_dir):
    """QQP train line 6-7 is one question broken by a newline (as in the official file): both halves drop."""
    with pytest.warns(UserWarning, match=r"QQP/train.tsv: dropped 2 rows with missing columns \(lines \[6, 7\]\)"):
        ex = glue_data.load_task("qqp", "train", data_dir=glue_dir)
    assert len(ex) == 7 and ex.labels.tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert not any("Melbourne" in t for t in ex.text_a + ex.text_b)


def _write(tmp_path, folder, name, data: bytes):
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / folder / name).write_bytes(data)
    return str(tmp_path)


@pytest.mark.parametrize(
    "folder,name,data,match",
    [
        (
            "SST-2",
            "dev.tsv",
            b"sentence\tlabel\ngood \t1\nno tab here\n",
            r"SST-2/dev.tsv:3: expected 2 tab-separated columns \(sentence, label\), found 1",
        ),
        (
            "SST-2",
            "dev.tsv",
            b"sentence\tlabel\ngood \tpositive\n",
            r"SST-2/dev.tsv:2: column 'label': expected one of \['0', '1'\], got 'positive'",
        ),
        (
            "SST-2",
            "dev.tsv",
            b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n",
            r"SST-2/dev.tsv:1: expected the header 'sentence\\tlabel'",
        ),
        ("SST-2", "dev.tsv", b"sentence\tlabel\ngood \t1\n\nbad \t0\n", r"SST-2/dev.tsv:3: unexpected blank line"),
        (
            "QQP",
            "dev.tsv",
            b"id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\ta\tb\t0\textra\n",
            r"QQP/dev.tsv:2: expected 6 tab-separated columns .* found 7",
        ),
        (
            "STS-B",
            "dev.tsv",
            b"index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            b"0\tg\tf\t2012\t0\tnone\tnone\ta\tb\tfive\n",
            r"STS-B/dev.tsv:2: column 'score': expected a finite number, got 'five'",
        ),
        ("CoLA", "dev.tsv", b"gj04\t1\t\tFine.\ngj04\t1\tFine.\n", r"CoLA/dev.tsv:2: expected 4 tab-separated"),
        ("RTE", "dev.tsv", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\t\xff\n", r"RTE/dev.tsv:2: not valid UTF-8"),
    ],
)
def test_malformed_files_raise_with_file_and_line(tmp_path, folder, name, data, match):
    task = {"SST-2": "sst2", "QQP": "qqp", "STS-B": "stsb", "CoLA": "cola", "RTE": "rte"}[folder]
    with pytest.raises(ValueError, match=match):
        glue_data.load_task(task, "dev", data_dir=_write(tmp_path, folder, name, data))


def test_trailing_blank_lines_and_crlf_are_accepted(tmp_path):
    root = _write(tmp_path, "SST-2", "dev.tsv", b"sentence\tlabel\r\ngood \t1\r\nbad \t0\r\n\n\n")
    ex = glue_data.load_task("sst2", "dev", data_dir=root)
    assert ex.text_a == ["good ", "bad "] and ex.labels.tolist() == [1, 0]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNLI/dev_matched.tsv.*official GLUE task folders"):
        glue_data.load_task("mnli", "dev_matched", data_dir=str(tmp_path))


def test_bad_arguments_list_the_valid_ones(glue_dir):
    with pytest.raises(ValueError, match=r"unknown GLUE task 'wnli'; expected one of cola, sst2"):
        glue_data.load_task("wnli", "dev", data_dir=glue_dir)
    with pytest.raises(ValueError, match=r"task 'mnli' has no split 'dev'; expected one of train, dev_matched"):
        glue_data.load_task("mnli", "dev", data_dir=glue_dir)
    with pytest.raises(ValueError, match=r"unknown GLUE data source 'csv'"):
        glue_data.load_task("sst2", "dev", data_dir=glue_dir, source="csv")
    with pytest.raises(ValueError, match=r"needs --config.data_dir"):
        glue_data.load_task("sst2", "dev", source="local")


def test_max_examples_keeps_the_first_rows(glue_dir):
    ex = glue_data.load_task("mrpc", "dev", data_dir=glue_dir, max_examples=2)
    assert len(ex) == len(ex.text_b) == 2 and ex.labels.tolist() == [1, 0]
    assert len(glue_data.load_task("mrpc", "dev", data_dir=glue_dir, max_examples=-1)) == 5


def test_hf_source_offline_fails_fast_with_data_dir_hint(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"pass --config.data_dir=<folder holding SST-2/"):
        glue_data.load_task("sst2", "dev")  # auto without data_dir = hf
    assert time.monotonic() - start < 30


def test_hf_source_unreachable_hub_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))  # must not be called
    with pytest.raises(RuntimeError, match=r"unreachable.*--config.data_dir=<folder holding CoLA/"):
        glue_data.load_task("cola", "dev", source="hf")


def test_hf_columns_map_to_examples(monkeypatch):
    """A stand-in `datasets` module: feature names and split names as on the hub (premise/hypothesis,
    validation_matched), test labels -1."""
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, -1], "idx": [0, 1]}

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex = glue_data.load_task("mnli", "dev_matched", source="hf")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert (ex.text_a, ex.text_b, ex.labels.tolist()) == (["p0", "p1"], ["h0", "h1"], [2, -1])


def test_tfds_source(monkeypatch, tmp_path):
    """A stand-in TFDS: glue/stsb, bytes decoded, the -1 test label becomes NaN, "dev" -> "validation"."""
    seen = {}

    class Builder:
        data_dir = str(tmp_path)

        def download_and_prepare(self):
            seen["prepared"] = True

        def as_dataset(self, split):
            seen["split"] = split
            return [
                {"sentence1": b"a \xc3\xa9", "sentence2": b"b", "label": np.float32(3.5), "idx": 0},
                {"sentence1": b"c", "sentence2": b"d", "label": np.float32(-1.0), "idx": 1},
            ]

    def builder(name, data_dir):
        seen["name"], seen["data_dir"] = name, data_dir
        return Builder()

    tfds = types.ModuleType("tensorflow_datasets")
    tfds.builder, tfds.as_numpy = builder, lambda ds: ds
    tfds.text = types.ModuleType("tensorflow_datasets.text")
    tfds.text.glue = types.ModuleType("tensorflow_datasets.text.glue")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.text", tfds.text)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.text.glue", tfds.text.glue)
    ex = glue_data.load_task("stsb", "dev", source="tfds", data_dir="/tfds")
    assert seen == {"name": "glue/stsb", "data_dir": "/tfds", "prepared": True, "split": "validation"}
    assert ex.text_a == ["a é", "c"] and ex.text_b == ["b", "d"]
    assert ex.labels[0] == 3.5 and math.isnan(ex.labels[1])


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"mtlora-jax\[tfds\]"):
        glue_data.load_task("rte", "dev", source="tfds")


# Row counts from ../shared/data/README.md (official GLUE sizes).
REAL_COUNTS = {
    ("cola", "train"): 8551,
    ("cola", "dev"): 1043,
    ("cola", "test"): 1063,
    ("sst2", "train"): 67349,
    ("sst2", "dev"): 872,
    ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668,
    ("mrpc", "dev"): 408,
    ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749,
    ("stsb", "dev"): 1500,
    ("stsb", "test"): 1379,
    ("rte", "train"): 2490,
    ("rte", "dev"): 277,
    ("rte", "test"): 3000,
}


@pytest.mark.data
@pytest.mark.parametrize("task,split", sorted(REAL_COUNTS))
def test_real_glue_files(shared_data, task, split):
    """The real files parse with the official row counts; labels agree with a plain split of the last
    (CoLA: second, MRPC: first) column."""
    spec = glue_tasks.TASKS[task]
    ex = glue_data.load_task(task, split, data_dir=str(shared_data / "glue"))
    assert len(ex) == REAL_COUNTS[task, split]
    if split == "test":
        return
    lines = (shared_data / "glue" / spec.folder / f"{split}.tsv").read_text("utf-8-sig").splitlines()
    rows = [line.split("\t") for line in lines[task != "cola" :]]
    column = {"cola": 1, "mrpc": 0}.get(task, -1)
    raw = [r[column] for r in rows]
    expected = [float(v) for v in raw] if task == "stsb" else [spec.local_labels.index(v) for v in raw]
    np.testing.assert_allclose(ex.labels, expected, rtol=1e-6)


@pytest.mark.data
def test_real_mrpc_matches_its_source_file(shared_data):
    """MRPC train = msr_paraphrase_train.txt minus the pairs of dev_ids.tsv (README note M1), same texts."""
    root = shared_data / "glue" / "MRPC"
    dev_ids = {tuple(line.split("\t")) for line in (root / "dev_ids.tsv").read_text().splitlines()}
    source = [line.split("\t") for line in (root / "msr_paraphrase_train.txt").read_text("utf-8-sig").splitlines()[1:]]
    kept = [r for r in source if (r[1], r[2]) not in dev_ids]
    ex = glue_data.load_task("mrpc", "train", data_dir=str(shared_data / "glue"))
    assert ex.text_a == [r[3] for r in kept] and ex.text_b == [r[4] for r in kept]


def test_local_copy_of_a_real_file_is_independent_of_location(tmp_path, glue_dir):
    """data_dir is the GLUE root; the task folder name comes from the spec (SST-2, not sst2)."""
    shutil.copytree(glue_dir + "/SST-2", tmp_path / "SST-2")
    assert len(glue_data.load_task("sst2", "dev", data_dir=str(tmp_path))) == 5
