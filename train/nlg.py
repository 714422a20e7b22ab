"""Fine-tunes a GPT-2 / Llama-family decoder with MTLoRA on E2E, WebNLG or DART and scores its generations.

  python -m train.nlg --config configs/webnlg.py --workdir /tmp/webnlg --config.data_dir=<webnlg folder>
  python -m train.nlg --config configs/webnlg.py:smollm --workdir /tmp/webnlg_smollm      # offline, CPU
  python -m train.nlg --config configs/e2e.py --workdir /tmp/e2e --config.data_dir=<e2e folder> \\
      --config.model=<hub id | folder | .gguf> --config.beam_size=4 --config.eval_max_examples=100

Any config field can be overridden with --config.<field>=<value> (configs/nlg_common.py lists them). The run
resumes from the latest checkpoint in --workdir; on SIGTERM it saves a checkpoint and exits with status 143.
Results: <workdir>/summary.json, <split>.predictions.txt / .references.txt / .jsonl / .metrics.json,
metrics.jsonl and tb/ (TensorBoard).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import nlg_train

_CONFIG = config_flags.DEFINE_config_file("config", None, "NLG config file, e.g. configs/webnlg.py[:smoke|:smollm].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, predictions, metrics, summary.json.")
flags.mark_flags_as_required(["config", "workdir"])

# Exit status after a SIGTERM (128 + 15, what a shell reports for a process killed by it): checkpoint saved.
SIGTERM_EXIT = 143


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    summary = nlg_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary is None:
        sys.exit(SIGTERM_EXIT)


if __name__ == "__main__":
    app.run(main)
