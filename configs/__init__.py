"""GLUE configs (ml_collections): one file per task, `get_config(arg=None)`; shared parts in `glue_common` and `base`.

`python -m train.glue --config configs/sst2.py[:smoke|:minilm] --workdir W --config.learning_rate=...`
"""

import importlib

from configs.glue_common import TASKS


def get_config(task: str, arg: str | None = None):
    """The config of GLUE `task` (configs/<task>.py), as `--config configs/<task>.py:<arg>` would load it."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(TASKS)}")
    return importlib.import_module(f"configs.{task}").get_config(arg)
