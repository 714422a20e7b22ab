"""A finished (or interrupted) run, read back from its workdir: its config, its model and its best adapters.

`load(workdir)` reads `<workdir>/config.json` (written when the run started), rebuilds the base model and the
adapters of that config, and fills them (adapters and head) from the checkpoint of the best evaluation
(`<workdir>/best/<step>`), or from the latest checkpoint when the run never evaluated; `merged` is
`mt.merge` of that tree, plain arrays W + dW for the model's own apply. What train.predict, train.export and
the end of a run's log use.
"""

import json
import os
from typing import Any, NamedTuple

import ml_collections

import mtlora_jax as mt
from train import checkpoints
from train import model as model_lib


class SavedRun(NamedTuple):
    """A run read back from its workdir.

    Attributes:
      config: the run's config (config.json) as a ConfigDict.
      model: its base model with the checkpoint's adapters and head (`model.params` adapted).
      merged: mt.merge(model.params): plain arrays for `model.module.apply`.
      checkpoint: the checkpoint folder read; step: its step; which: "best" or "latest".
    """

    config: Any
    model: model_lib.Model
    merged: Any
    checkpoint: str
    step: int
    which: str


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """`<workdir>/config.json` as a ConfigDict; raises FileNotFoundError naming the workdir when it has none."""
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir}: no config.json (not a workdir of train.glue, .nlg or .sft)")
    with open(path) as f:
        raw = json.load(f)
    tuples = ("length_buckets", "prompt_buckets", "extra_targets", "extra_trainable")  # JSON lists -> tuples
    fix = lambda d: {k: tuple(v) if k in tuples and isinstance(v, list) else fix(v) if isinstance(v, dict) else v
                     for k, v in d.items()}  # fmt: skip
    return ml_collections.ConfigDict(fix(raw))


def checkpoint_folder(workdir: str) -> tuple[str, int, str]:
    """(folder, step, "best" | "latest") of the checkpoint to use; raises FileNotFoundError when there is none."""
    workdir = os.path.abspath(workdir)
    for which, sub in (("best", checkpoints.BEST), ("latest", "checkpoints")):
        root = os.path.join(workdir, sub)
        steps = sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
        if steps:
            return os.path.join(root, str(steps[-1])), steps[-1], which
    raise FileNotFoundError(
        f"--workdir={workdir}: no checkpoint (best/ and checkpoints/ are empty: the run stopped before its first "
        "checkpoint); rerun its command to train it"
    )


def load(workdir: str, *, head: dict, model: str | None = None) -> SavedRun:
    """Rebuilds the run of `workdir` with its best adapters; `model` overrides config.model (a moved folder).

    Args:
      workdir: the run's workdir.
      head: `model.load`'s head keyword arguments for the run's job (head, num_labels).
      model: where the base model is now, when it moved since the run; None: config.model.
    """
    config = read_config(workdir)
    folder, step, which = checkpoint_folder(workdir)
    with config.unlocked():
        if model:
            config.model = model
        config.init_from = ""  # the adapters come from this run's own checkpoint
    if not os.path.exists(os.path.expanduser(config.model)) and config.model.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"config.model={config.model!r} (from {workdir}/config.json): no such file or folder; the model moved? "
            "pass --model=<where it is now>"
        )
    base = model_lib.load(config, **head)
    adapted = model_lib.add_adapters(config, base)
    params = mt.load_adapters(folder, adapted.params)
    model_ = adapted._replace(params=params)
    return SavedRun(config, model_, mt.merge(params), folder, step, which)
