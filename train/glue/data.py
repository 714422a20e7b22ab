"""GLUE examples from one of three sources behind one function, `load_task`.

Sources:
  "local": a folder in the official GLUE distribution layout (`<data_dir>/SST-2/dev.tsv`, ...), read strictly
           by `train.glue.tsv`. Works offline; this is what the tests and the `minilm` configs use.
  "hf":    the Hugging Face `datasets` dataset `nyu-mll/glue` (downloads when online; its cache when
           HF_DATASETS_OFFLINE=1). Offline without a cached copy it fails at once with a message that says
           to pass --config.data_dir instead of retrying for minutes.
  "tfds":  TFDS `glue/<task>` (optional `tfds` extra; imported only when asked). `data_dir` is then the
           TFDS data folder (None: TFDS' default).
  "auto":  "local" when `data_dir` is given, else "hf".

All sources give the same `Examples`: texts in model input order and labels with the class ids of
`train.glue.tasks` (HF / TFDS order), -1 (NaN for STS-B) for unlabeled test splits.
"""

import dataclasses
import os

import numpy as np

from train import hub
from train.glue import tasks as glue_tasks
from train.glue import tsv as glue_tsv

SOURCES = ("auto", "local", "hf", "tfds")
HF_DATASET = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split of one task, as columns.

    Attributes:
      task: task name, e.g. "mrpc".
      split: split name, e.g. "dev" or "dev_matched".
      text_a: n first (or only) sentences.
      text_b: n second sentences, or None for single-sentence tasks (CoLA, SST-2).
      labels: [n] int32 class ids (-1 = unlabeled) or, for STS-B, float32 scores (NaN = unlabeled).
    """

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __post_init__(self):
        n = len(self.text_a)
        if self.labels.shape != (n,) or (self.text_b is not None and len(self.text_b) != n):
            raise ValueError(f"{self.task}/{self.split}: columns differ in length")

    def __len__(self) -> int:
        return len(self.text_a)

    def take(self, count: int) -> "Examples":
        """The first `count` examples (all of them when count < 0)."""
        if count < 0:
            return self
        return dataclasses.replace(
            self,
            text_a=self.text_a[:count],
            labels=self.labels[:count],
            text_b=None if self.text_b is None else self.text_b[:count],
        )

    def select(self, rows, split: str | None = None) -> "Examples":
        """The examples at `rows` ([m] indices, in that order), named `split` (default: this split's name)."""
        rows = np.asarray(rows, np.int64)
        pick = lambda texts: None if texts is None else [texts[i] for i in rows]
        texts = {"text_a": pick(self.text_a), "text_b": pick(self.text_b)}
        return dataclasses.replace(self, split=split or self.split, labels=self.labels[rows], **texts)


def _no_data(task: str, why: str) -> RuntimeError:
    folder = glue_tasks.get_task(task).folder
    return RuntimeError(
        f"cannot load GLUE {task!r} from the HF hub ({why}); download GLUE and pass "
        f"--config.data_dir=<folder holding {folder}/ and the other task folders> (official GLUE layout)"
    )


def _load_hf(spec: glue_tasks.TaskSpec, split: str) -> Examples:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data_source='hf' needs `datasets`: pip install 'mtlora-jax[train]'") from e
    offline = hub.hub_offline()
    if not offline and not hub.hub_reachable():
        raise _no_data(spec.name, "huggingface.co is unreachable; set HF_DATASETS_OFFLINE=1 to use a cached copy")
    try:
        ds = datasets.load_dataset(HF_DATASET, spec.name, split=glue_tasks.hf_split(split))
    except (ConnectionError, OSError) as e:  # offline cache miss: ConnectionError(OfflineModeIsEnabled)
        raise _no_data(spec.name, f"{type(e).__name__}: {str(e)[:200]}") from e
    columns = [list(ds[c]) for c in spec.hf_text]
    return _examples(spec, split, columns, list(ds["label"]))


def _load_tfds(spec: glue_tasks.TaskSpec, split: str, data_dir: str | None) -> Examples:
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.text.glue  # noqa: F401  (registers glue/<task>)
    except ImportError as e:
        raise ImportError("data_source='tfds' needs tensorflow-datasets: pip install 'mtlora-jax[tfds]'") from e
    builder = tfds.builder(f"glue/{spec.name}", data_dir=data_dir)
    if hub.hub_offline() and not os.path.isdir(builder.data_dir):
        raise RuntimeError(
            f"TFDS glue/{spec.name} is not prepared under {builder.data_dir} and HF_HUB_OFFLINE is set; "
            f"pass --config.data_dir=<GLUE folder> with --config.data_source=local"
        )
    builder.download_and_prepare()
    rows = list(tfds.as_numpy(builder.as_dataset(split=glue_tasks.hf_split(split))))
    decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    columns = [[decode(r[c]) for r in rows] for c in spec.hf_text]
    return _examples(spec, split, columns, [r["label"] for r in rows])


def _examples(spec: glue_tasks.TaskSpec, split: str, columns: list[list[str]], labels) -> Examples:
    """HF / TFDS columns -> Examples; their unlabeled marker (-1) becomes NaN for STS-B."""
    labels = np.asarray(labels, np.float32 if spec.is_regression else np.int32)
    if spec.is_regression:
        labels = np.where(labels < 0, np.float32(np.nan), labels)
    return Examples(spec.name, split, columns[0], columns[1] if len(columns) > 1 else None, labels)


def load_task(
    task: str,
    split: str,
    *,
    data_dir: str | None = None,
    source: str = "auto",
    max_examples: int | None = None,
) -> Examples:
    """Loads one split of one GLUE task.

    Args:
      task: "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli" or "rte".
      split: "train", "dev", "test"; MNLI: "train", "dev_matched", "dev_mismatched", "test_matched",
        "test_mismatched".
      data_dir: GLUE root folder (holding SST-2/, CoLA/ ...) for "local"; TFDS data dir for "tfds".
        "" counts as None.
      source: "auto" (local when data_dir is set, else hf), "local", "hf" or "tfds".
      max_examples: keep only the first N examples in file order (None or < 0: all).

    Returns:
      Examples with n = number of (kept) rows.

    Raises:
      ValueError: unknown task, split or source, a malformed local file ("path:line: ..."), or a split without
        examples (the message names the file).
      FileNotFoundError: a local file is missing (the message names the expected path).
      RuntimeError: the hub is unreachable / offline without a cache (the message says to pass data_dir).
    """
    spec = glue_tasks.get_task(task)
    glue_tasks.check_split(spec, split)
    if source not in SOURCES:
        raise ValueError(f"unknown GLUE data source {source!r}; expected one of {', '.join(SOURCES)}")
    data_dir = data_dir or None
    if source == "auto":
        source = "local" if data_dir else "hf"
    if source == "local":
        if data_dir is None:
            raise ValueError("data_source='local' needs --config.data_dir=<GLUE folder holding SST-2/, CoLA/ ...>")
        layout = spec.files[split]
        path = os.path.join(data_dir, spec.folder, layout.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"GLUE file not found: {path}; config.data_dir={data_dir!r} must hold the official GLUE task "
                f"folders ({spec.folder}/{layout.filename}, SST-2/dev.tsv, ...)"
            )
        text_a, text_b, labels = glue_tsv.read_tsv(path, layout, spec)
        if not text_a:
            raise ValueError(f"{path}: no examples (a header only, or an empty file); config.data_dir={data_dir!r}")
        examples = Examples(task, split, text_a, text_b, labels)
    elif source == "hf":
        examples = _load_hf(spec, split)
    else:
        examples = _load_tfds(spec, split, data_dir)
    if not len(examples):
        raise ValueError(f"GLUE {task} {split} from source {source!r}: no examples")
    return examples.take(-1 if max_examples is None else max_examples)
