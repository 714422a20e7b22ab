"""Fine-tunes a GPT-2 / Llama-family decoder with MTLoRA on E2E, WebNLG or DART and scores its generations.

  python -m train.nlg --config configs/webnlg.py --workdir /tmp/webnlg --config.data_dir=<webnlg folder>
  python -m train.nlg --config configs/webnlg.py:smollm --workdir /tmp/webnlg_smollm      # offline, CPU
  python -m train.nlg --config configs/e2e.py --workdir /tmp/e2e --config.data_dir=<e2e folder> \\
      --config.model=<hub id | folder | .gguf> --config.beam_size=4 --config.eval_max_examples=100

Any config field can be overridden with --config.<field>=<value> (configs/nlg_common.py and configs/base.py list
them). The run resumes from the latest checkpoint in --workdir; on SIGTERM it saves a checkpoint and exits with
status 143; an error prints one line (--verbose: the traceback). Results: <workdir>/summary.json,
<split>.predictions.txt / .references.txt / .jsonl / .metrics.json, metrics.jsonl and tb/ (TensorBoard).
"""

from absl import app, flags
from ml_collections import config_flags

from train import cli
from train.nlg import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "NLG config file, e.g. configs/webnlg.py[:smoke|:smollm].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, predictions, metrics, summary.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.main(argv, train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
