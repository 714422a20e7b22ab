"""E2E NLG with MTLoRA on GPT-2 medium: the reference recipe (../shared/REFERENCE.md), beam 10, penalty 0.9.

Data: LoRA's examples/NLG/data/e2e/{train,valid,test}.txt (`<meaning representation>||<reference>` lines).
The test set is decoded once per meaning representation and scored against all its references with BLEU,
NIST, METEOR, ROUGE-L and CIDEr.

Commands:
  python -m train.nlg --config configs/e2e.py --workdir /tmp/e2e --config.data_dir=<e2e folder>
  python -m train.nlg --config configs/e2e.py:smoke --workdir /tmp/e2e_smoke --config.model=<tiny model>

Expected test score, BLEU: 70.4 (NIST 8.85, METEOR 46.8, ROUGE-L 71.8, CIDEr 2.53) for LoRA r = 4 on GPT-2
medium (LoRA paper, Hu et al. 2021, Table 3; the anchor in ../shared/REFERENCE.md). The MTLoRA paper's E2E
numbers are not in REFERENCE.md. These are the papers' numbers, not measured here. The smoke and smollm
variants have no expected score.
"""

from configs import nlg_common


def get_config(arg: str | None = None):
    """E2E config; arg: None, "smoke" or "smollm" (see configs/nlg_common.py:task_config)."""
    return nlg_common.task_config("e2e", arg, length_penalty=0.9)
