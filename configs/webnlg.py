"""WebNLG 2017 with MTLoRA on GPT-2 medium: the reference recipe (../shared/REFERENCE.md), beam 10, penalty 0.8.

Data: LoRA's examples/NLG/data/webnlg_challenge_2017/{train,dev,test}.json. The test set is decoded and scored
(BLEU, METEOR, TER, ROUGE-L) on all categories and on the seen (the 10 training categories) / unseen ones.

Commands:
  python -m train.nlg --config configs/webnlg.py --workdir /tmp/webnlg --config.data_dir=<webnlg folder>
  python -m train.nlg --config configs/webnlg.py:smoke --workdir /tmp/webnlg_smoke --config.model=<tiny model>
  python -m train.nlg --config configs/webnlg.py:smollm --workdir /tmp/webnlg_smollm   # offline, 2-core CPU

Expected test score, BLEU (all categories): 55.3 for LoRA r = 4 on GPT-2 medium (LoRA paper, Hu et al. 2021,
Table 4; the anchor in ../shared/REFERENCE.md); the MTLoRA paper reports +0.56 BLEU over LoRA on WebNLG
(arXiv 2403.07440). These are the papers' numbers, not measured here. The smoke and smollm variants have no
expected score (docs/BENCHMARKS.md records what smollm measured).
"""

from configs import nlg_common


def get_config(arg: str | None = None):
    """WebNLG config; arg: None, "smoke" or "smollm" (see configs/nlg_common.py:task_config)."""
    return nlg_common.task_config("webnlg", arg, length_penalty=0.8)
