"""Fine-tunes a BERT/RoBERTa model with MTLoRA on a GLUE task and reports dev metrics.

  python -m train.glue --config configs/sst2.py --workdir /tmp/sst2
  python -m train.glue --config configs/rte.py:minilm --workdir /tmp/rte --config.mtlora.structure=lora

Any config field can be overridden with --config.<field>=<value> (configs/common.py lists them). The run
resumes from the latest checkpoint in --workdir; on SIGTERM it saves a checkpoint and exits with status 143.
Results: <workdir>/summary.json, metrics.jsonl, tb/ (TensorBoard); `python -m train.plot <workdir>` draws them.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import glue_train

_CONFIG = config_flags.DEFINE_config_file("config", None, "GLUE config file, e.g. configs/sst2.py[:smoke].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, summary.json.")
flags.mark_flags_as_required(["config", "workdir"])

# Exit status after a SIGTERM (128 + 15, what a shell reports for a process killed by it): checkpoint saved.
SIGTERM_EXIT = 143


def _quiet_orbax(record) -> bool:
    """Orbax logs every file of every checkpoint at INFO; keep only its warnings and errors."""
    return record.levelno >= logging.converter.ABSL_TO_STANDARD[logging.WARNING] or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_orbax)
    summary = glue_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary is None:
        sys.exit(SIGTERM_EXIT)


if __name__ == "__main__":
    app.run(main)
