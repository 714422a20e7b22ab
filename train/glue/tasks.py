"""The eight GLUE tasks as data: text columns, labels, metrics, dev splits and the official file layouts.

One frozen `TaskSpec` per task in `TASKS`. Class ids follow the Hugging Face `nyu-mll/glue` dataset (and TFDS
`glue/<task>`, which uses the same ClassLabel names), so the three sources in `train.glue_data` agree:

  cola  unacceptable=0 acceptable=1      sst2 negative=0 positive=1      mrpc not_equivalent=0 equivalent=1
  qqp   not_duplicate=0 duplicate=1      mnli entailment=0 neutral=1 contradiction=2
  qnli  entailment=0 not_entailment=1    rte  entailment=0 not_entailment=1      stsb  float score in [0, 5]

Split names are those of the GLUE distribution files: "train", "dev", "test", and for MNLI "dev_matched",
"dev_mismatched", "test_matched", "test_mismatched". `LocalFile` records each official .tsv layout exactly
(the header line, or the column names of the header-less CoLA train/dev files), as written by the GLUE
download script (https://gluebenchmark.com).
"""

import dataclasses
from collections.abc import Mapping

_MNLI_PARSES = ("sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse")
_MNLI_HEAD = ("index", "promptID", "pairID", "genre", *_MNLI_PARSES, "sentence1", "sentence2")
_STSB_HEAD = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2")
_MRPC_TEXT = ("#1 ID", "#2 ID", "#1 String", "#2 String")


@dataclasses.dataclass(frozen=True)
class LocalFile:
    """Layout of one official GLUE .tsv file (tab-separated, no quoting, UTF-8, optional BOM).

    Attributes:
      filename: file name inside the task folder, e.g. "dev_matched.tsv".
      columns: the column names; for files with a header they must equal the header line exactly.
      has_header: False only for CoLA train/dev, whose four columns are unnamed in the file.
      text: the one or two text columns, in model input order (text_a, text_b).
      label: the label column, or None for the unlabeled test files.
      skip_short_rows: drop rows with fewer columns than `columns` instead of raising. Only QQP train/dev,
        whose official files hold a few questions broken over two lines; TFDS and HF `datasets` drop the
        same rows (their GLUE builders filter rows with missing fields).
    """

    filename: str
    columns: tuple[str, ...]
    text: tuple[str, ...]
    label: str | None
    has_header: bool = True
    skip_short_rows: bool = False


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific that the data, model head and metrics need.

    Attributes:
      name: config name, e.g. "sst2" (also the HF / TFDS config name).
      folder: task folder in the GLUE distribution, e.g. "SST-2".
      label_names: class names in class-id order; () for the regression task STS-B.
      local_labels: label strings of the local files in class-id order (e.g. "0", "1" or "entailment", ...).
      hf_text: text feature names in HF `nyu-mll/glue` and TFDS `glue/<task>` (text_a, text_b).
      metric_names: the dev metrics reported, before any split suffix.
      main_metric: metric used to pick the best evaluation, with its split suffix (MNLI: "accuracy_m").
      dev_splits: dev split name -> metric-name suffix ({"dev": ""}; MNLI {"dev_matched": "_m", ...}).
      files: split name -> LocalFile.
    """

    name: str
    folder: str
    label_names: tuple[str, ...]
    local_labels: tuple[str, ...]
    hf_text: tuple[str, ...]
    metric_names: tuple[str, ...]
    main_metric: str
    dev_splits: Mapping[str, str]
    files: Mapping[str, LocalFile]

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Output width of the task head: 1 for STS-B (regression), else the number of classes."""
        return len(self.label_names) or 1

    @property
    def is_pair(self) -> bool:
        return len(self.hf_text) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


def _files(train_dev: tuple[str, ...], test: tuple[str, ...], text: tuple[str, ...], label: str, **kw):
    """train.tsv and dev.tsv with one header, test.tsv (unlabeled) with another."""
    return {
        "train": LocalFile("train.tsv", train_dev, text, label, **kw),
        "dev": LocalFile("dev.tsv", train_dev, text, label, **kw),
        "test": LocalFile("test.tsv", test, text, None),
    }


_COLA_ROWS = ("source", "label", "original_judgement", "sentence")
_QQP_TEXT = ("question1", "question2")
_CLS2 = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MNLI3 = ("entailment", "neutral", "contradiction")
_MNLI_DEV = (*_MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label")
_PAIR = ("sentence1", "sentence2")

TASKS: Mapping[str, TaskSpec] = {
    "cola": TaskSpec(
        name="cola", folder="CoLA", label_names=("unacceptable", "acceptable"), local_labels=_CLS2,
        hf_text=("sentence",), metric_names=("mcc", "accuracy"), main_metric="mcc", dev_splits={"dev": ""},
        files={
            "train": LocalFile("train.tsv", _COLA_ROWS, ("sentence",), "label", has_header=False),
            "dev": LocalFile("dev.tsv", _COLA_ROWS, ("sentence",), "label", has_header=False),
            "test": LocalFile("test.tsv", ("index", "sentence"), ("sentence",), None),
        },
    ),
    "sst2": TaskSpec(
        name="sst2", folder="SST-2", label_names=("negative", "positive"), local_labels=_CLS2,
        hf_text=("sentence",), metric_names=("accuracy",), main_metric="accuracy", dev_splits={"dev": ""},
        files=_files(("sentence", "label"), ("index", "sentence"), ("sentence",), "label"),
    ),
    "mrpc": TaskSpec(
        name="mrpc", folder="MRPC", label_names=("not_equivalent", "equivalent"), local_labels=_CLS2,
        hf_text=_PAIR, metric_names=("accuracy", "f1"), main_metric="accuracy", dev_splits={"dev": ""},
        files=_files(("Quality", *_MRPC_TEXT), ("index", *_MRPC_TEXT), ("#1 String", "#2 String"), "Quality"),
    ),
    "qqp": TaskSpec(
        name="qqp", folder="QQP", label_names=("not_duplicate", "duplicate"), local_labels=_CLS2,
        hf_text=_QQP_TEXT, metric_names=("accuracy", "f1"), main_metric="accuracy", dev_splits={"dev": ""},
        files=_files(("id", "qid1", "qid2", *_QQP_TEXT, "is_duplicate"), ("id", *_QQP_TEXT), _QQP_TEXT,
                     "is_duplicate", skip_short_rows=True),
    ),
    "stsb": TaskSpec(
        name="stsb", folder="STS-B", label_names=(), local_labels=(),
        hf_text=_PAIR, metric_names=("pearson", "spearman"), main_metric="pearson", dev_splits={"dev": ""},
        files=_files((*_STSB_HEAD, "score"), _STSB_HEAD, _PAIR, "score"),
    ),
    "mnli": TaskSpec(
        name="mnli", folder="MNLI", label_names=_MNLI3, local_labels=_MNLI3,
        hf_text=("premise", "hypothesis"), metric_names=("accuracy",), main_metric="accuracy_m",
        dev_splits={"dev_matched": "_m", "dev_mismatched": "_mm"},
        files={
            "train": LocalFile("train.tsv", (*_MNLI_HEAD, "label1", "gold_label"), _PAIR, "gold_label"),
            "dev_matched": LocalFile("dev_matched.tsv", _MNLI_DEV, _PAIR, "gold_label"),
            "dev_mismatched": LocalFile("dev_mismatched.tsv", _MNLI_DEV, _PAIR, "gold_label"),
            "test_matched": LocalFile("test_matched.tsv", _MNLI_HEAD, _PAIR, None),
            "test_mismatched": LocalFile("test_mismatched.tsv", _MNLI_HEAD, _PAIR, None),
        },
    ),
    "qnli": TaskSpec(
        name="qnli", folder="QNLI", label_names=_NLI2, local_labels=_NLI2,
        hf_text=("question", "sentence"), metric_names=("accuracy",), main_metric="accuracy", dev_splits={"dev": ""},
        files=_files(("index", "question", "sentence", "label"), ("index", "question", "sentence"),
                     ("question", "sentence"), "label"),
    ),
    "rte": TaskSpec(
        name="rte", folder="RTE", label_names=_NLI2, local_labels=_NLI2,
        hf_text=_PAIR, metric_names=("accuracy",), main_metric="accuracy", dev_splits={"dev": ""},
        files=_files(("index", *_PAIR, "label"), ("index", *_PAIR), _PAIR, "label"),
    ),
}  # fmt: skip


def get_task(name: str) -> TaskSpec:
    """Returns the spec of GLUE task `name`; raises ValueError listing the valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def check_split(spec: TaskSpec, split: str) -> None:
    """Raises ValueError naming the valid splits when `split` is not one of `spec`'s."""
    if split not in spec.files:
        raise ValueError(f"task {spec.name!r} has no split {split!r}; expected one of {', '.join(spec.splits)}")


def hf_split(split: str) -> str:
    """GLUE file split -> HF / TFDS split name: "dev" -> "validation", "dev_matched" -> "validation_matched"."""
    return split.replace("dev", "validation", 1) if split.startswith("dev") else split
