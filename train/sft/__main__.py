"""Instruction fine-tuning of a decoder LLM with MTLoRA on your own chat, prompt / completion, Alpaca or text rows.

  python -m train.sft --config configs/sft.py --workdir W --config.model=<HF folder | .gguf | hub id> \\
      --config.data=<file.jsonl | file.json | folder> [--config.eval_data=<file>] [--config.packing=True]
  python -m train.sft --config configs/sft.py:smollm --workdir workdirs/sft-smollm   # offline demo, 2-core CPU
  python -m train.generate --workdir W --prompt "Give three tips for staying healthy."

Any config field can be overridden with --config.<field>=<value> (configs/sft.py and configs/base.py list them).
The run resumes from the latest checkpoint in --workdir; on SIGTERM it saves a checkpoint and exits with status
143; an error prints one line (--verbose: the traceback). Results: <workdir>/summary.json (eval_loss,
perplexity; metrics_before with --config.eval_before_training=True), samples/<step>.jsonl, metrics.jsonl and tb/.
"""

from absl import app, flags
from ml_collections import config_flags

from train import cli
from train.sft import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "SFT config file, e.g. configs/sft.py[:smoke|:smollm].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, samples, metrics, summary.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.main(argv, train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
