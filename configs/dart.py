"""DART with MTLoRA on GPT-2 medium: the reference recipe (../shared/REFERENCE.md), beam 10, penalty 0.8.

Data: LoRA's examples/NLG/data/dart/dart-v1.1.1-full-{train,dev,test}.json (the official .xml also reads).
The test set is decoded and scored with BLEU, METEOR, TER and ROUGE-L (lower-cased and tokenized as LoRA's
gpt2_decode.py does).

Commands:
  python -m train.nlg --config configs/dart.py --workdir /tmp/dart --config.data_dir=<dart folder>
  python -m train.nlg --config configs/dart.py:smoke --workdir /tmp/dart_smoke --config.model=<tiny model>

Expected test score, BLEU: 47.1 for LoRA r = 4 on GPT-2 medium (LoRA paper, Hu et al. 2021, Table 4; the
anchor in ../shared/REFERENCE.md); the MTLoRA paper reports +0.95 BLEU over LoRA on DART (arXiv 2403.07440).
These are the papers' numbers, not measured here. The smoke and smollm variants have no expected score.
"""

from configs import nlg_common


def get_config(arg: str | None = None):
    """DART config; arg: None, "smoke" or "smollm" (see configs/nlg_common.py:task_config)."""
    return nlg_common.task_config("dart", arg, length_penalty=0.8)
