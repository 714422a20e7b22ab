"""RTE with MTLoRA on RoBERTa-base: the reference recipe (lr 5e-4, 80 epochs, global batch 32).

Reference batch: 32 on one GPU. Shared settings (r = 8, alpha = 16, AdamW, linear schedule, warmup ratio 0.06,
weight decay 0.1, max length 512, targets "mtlora-paper") come from configs/glue_common.py; pick the structure with
--config.mtlora.structure=lora|shim|icfm|ctcm|dtsm (default shim).

Commands:
  python -m train.glue --config configs/rte.py --workdir /tmp/rte
  python -m train.glue --config configs/rte.py:smoke --workdir /tmp/rte_smoke    # 5 steps on fixtures
  python -m train.glue --config configs/rte.py:minilm --workdir /tmp/rte_minilm  # MiniLM, 2-core CPU

The reference starts RTE from the MNLI-trained adapters; pass the MNLI run with init_from:
  python -m train.glue --config configs/mnli.py --workdir /tmp/mnli
  python -m train.glue --config configs/rte.py --workdir /tmp/rte --config.init_from=/tmp/mnli

Expected dev score, accuracy: 86.6 for LoRA r = 8 on query/value of RoBERTa-base (LoRA paper, Hu et al. 2021,
Table 2; the anchor in ../shared/REFERENCE.md). REFERENCE.md gives no per-task MTLoRA numbers for RoBERTa-base
(the MTLoRA paper's GLUE average is for DeBERTaV3-base: LoRA 86.9 -> MTLoRA 88.9). The smoke and minilm
variants have no expected score.
"""

from configs import glue_common


def get_config(arg: str | None = None):
    """RTE config; arg: None, "smoke" or "minilm" (see configs/glue_common.py:task_config)."""
    return glue_common.task_config("rte", arg, learning_rate=5e-4, num_epochs=80, batch_size=32)
