"""Fine-tunes a BERT/RoBERTa model with MTLoRA on a GLUE task and reports dev metrics.

  python -m train.glue --config configs/sst2.py --workdir /tmp/sst2
  python -m train.glue --config configs/rte.py:minilm --workdir /tmp/rte --config.mtlora.structure=lora

Any config field can be overridden with --config.<field>=<value> (configs/glue_common.py and configs/base.py list
them). The run resumes from the latest checkpoint in --workdir; on SIGTERM it saves a checkpoint and exits with
status 143; an error prints one line (--verbose: the traceback). Results: <workdir>/summary.json, metrics.jsonl,
tb/ (TensorBoard); `python -m train.curves <workdir>` draws them.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from train import cli
from train.glue import predict, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "GLUE config file, e.g. configs/sst2.py[:smoke].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, summary.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    summary = cli.main(argv, train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, _VERBOSE.value)
    if jax.process_count() == 1 and summary.get("best_checkpoint"):  # not on a multi-host job: no console there
        print(cli.guarded(predict.show_examples, os.path.abspath(_WORKDIR.value), summary, verbose=_VERBOSE.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
