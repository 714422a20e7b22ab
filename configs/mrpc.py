"""MRPC with MTLoRA on RoBERTa-base: the reference recipe (lr 4e-4, 30 epochs, global batch 16).

Reference batch: 16 on one GPU. Shared settings (r = 8, alpha = 16, AdamW, linear schedule, warmup ratio 0.06,
weight decay 0.1, max length 512, targets "mtlora-paper") come from configs/glue_common.py; pick the structure with
--config.mtlora.structure=lora|shim|icfm|ctcm|dtsm (default shim).

Commands:
  python -m train.glue --config configs/mrpc.py --workdir /tmp/mrpc
  python -m train.glue --config configs/mrpc.py:smoke --workdir /tmp/mrpc_smoke    # 5 steps on fixtures
  python -m train.glue --config configs/mrpc.py:minilm --workdir /tmp/mrpc_minilm  # MiniLM, 2-core CPU

The reference starts MRPC from the MNLI-trained adapters; pass the MNLI run with init_from:
  python -m train.glue --config configs/mnli.py --workdir /tmp/mnli
  python -m train.glue --config configs/mrpc.py --workdir /tmp/mrpc --config.init_from=/tmp/mnli

Expected dev score, accuracy (F1 also reported): 89.7 for LoRA r = 8 on query/value of RoBERTa-base (LoRA
paper, Hu et al. 2021, Table 2; the anchor in ../shared/REFERENCE.md). REFERENCE.md gives no per-task MTLoRA
numbers for RoBERTa-base (the MTLoRA paper's GLUE average is for DeBERTaV3-base: LoRA 86.9 -> MTLoRA 88.9).
The smoke and minilm variants have no expected score.
"""

from configs import glue_common


def get_config(arg: str | None = None):
    """MRPC config; arg: None, "smoke" or "minilm" (see configs/glue_common.py:task_config)."""
    return glue_common.task_config("mrpc", arg, learning_rate=4e-4, num_epochs=30, batch_size=16)
