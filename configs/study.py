"""The structure study: every MTLoRA structure against LoRA on the same model, data, steps, lr and targets.

  python -m train.study --config configs/study.py --dry_run                 # the grid and what is done
  nohup python -m train.study --config configs/study.py --commit --max_hours 2.5 > study.log 2>&1 &
  python -m train.study.report --config configs/study.py                    # docs/RESULTS.md + docs/figures

Rows of the grid, per task and seed: the structures lora, shim, icfm, ctcm, dtsm on the same targets (the MTLoRA
reference's q, v and both FFN matrices, "mtlora-paper"), plus a parameter-matched LoRA row. MTLoRA adds (k·r)² (shim,
icfm) or 2(k·r)² (ctcm, dtsm) parameters per adapted matrix to LoRA's k·r·(d_in + d_out) (k adapted slices of a fused
projection, else 1). On these models that extra is under 1.5% of LoRA's count on the same targets, so LoRA at the
same rank r is already the parameter-matched LoRA there (rank r + 1 would overshoot by ~12%). The matched row
therefore spends MTLoRA's budget the way the paper's baseline places LoRA: LoRA on q and v only ("lora-qv", the LoRA
paper's targets) at the rank whose count is closest to the mean MTLoRA budget (`matched_rank`), with the same alpha.
WebNLG also gets one "base" run (0 steps: the untrained model's score, the same for every structure).

Arguments (`--config configs/study.py:<arg>`):
  offline  (default) all-MiniLM-L6-v2 on CoLA, MRPC, STS-B, RTE and the first 5,000 SST-2 training sentences (full dev
           sets), and SmolLM2-135M on 2,000 WebNLG training examples with greedy decoding of 100 test inputs; 3
           seeds; sized for a 2-core CPU (docs/RESULTS.md states the measured cost). No expected scores: measuring
           them is the point.
  round2   the second round (docs/RESULTS_round2.md): MiniLM on MRPC, STS-B (2 epochs each) and the SST-2 subset (1
           epoch), SmolLM2 on WebNLG as in `offline`; rows lora, shim, icfm, ctcm, dtsm and ctcm-id, dtsm-id (T = I at
           init, mtlora.c_init=identity); a learning-rate sweep (3e-4, 1e-3, 3e-3 with seed 0, one more rate past an
           edge) whose best rate per row is chosen on a held-out part of train (holdout_examples), then seeds 1, 2 at
           that rate (train/study/sweep.py). About 12 CPU hours on a 2-core CPU, run in parts:
             nohup python -m train.study --config configs/study.py:round2 --commit --max_hours 2.5 > round2.log 2>&1 &
             python -m train.study.report --config configs/study.py:round2
  gpu      the papers' settings, for accelerators with internet: RoBERTa-base on all 8 GLUE tasks (configs/<task>.py,
           MRPC / RTE / STS-B start from the same row's MNLI adapters, as the reference does) and GPT-2 medium on
           E2E, WebNLG, DART (configs/<task>.py on the LoRA repository's data: --config.nlg_data_dir, default
           ../LoRA/examples/NLG/data). Expected scores, from the papers and not measured here: LoRA r = 8 on q, v of
           RoBERTa-base (LoRA paper, Hu et al. 2021, Table 2), dev: MNLI 87.5, SST-2 95.1, MRPC 89.7, CoLA 63.4,
           QNLI 93.3, QQP 90.8, RTE 86.6, STS-B 91.5 (avg 87.2); GPT-2 medium LoRA r = 4 (Table 4): E2E BLEU 70.4,
           DART 47.1, WebNLG 55.3 (all). The MTLoRA paper (arXiv 2403.07440) reports +0.95 BLEU (DART) and +0.56 BLEU
           (WebNLG) over LoRA and, on DeBERTaV3-base rather than RoBERTa-base, a GLUE average of 88.9 vs LoRA's 86.9
           (its MTLoRA adapts q, v and FFN, its LoRA only q, v); it gives no per-task RoBERTa-base numbers.
  smoke    what tests/test_study.py runs: 2 structures x SST-2 smoke (5 steps on tests/fixtures/glue) x 2 seeds.
"""

import ml_collections

from configs import base

STRUCTURES = ("lora", "shim", "icfm", "ctcm", "dtsm")
# Round 2's rows: the structures, and CTCM / DTSM started at T = I (c_init="identity", the authors' newer advice).
ROUND2_ROWS = (*STRUCTURES, "ctcm-id", "dtsm-id")
# Trainable [r, r] matrices of T per structure (mtlora_jax/structures.py: T = I, C, C Cᵀ, C D, C + D).
NUM_MATS = {"lora": 0, "shim": 1, "icfm": 1, "ctcm": 2, "dtsm": 2}
# Model sizes: hidden, FFN, q/v output width (GQA: kv heads x head dim), layers.
MODELS = {
    "minilm": dict(family="bert", hidden=384, ffn=1536, v_out=384, layers=6),
    "roberta-base": dict(family="roberta", hidden=768, ffn=3072, v_out=768, layers=12),
    "smollm2-135m": dict(family="llama", hidden=576, ffn=1536, v_out=192, layers=30),
    "gpt2-medium": dict(family="gpt2", hidden=1024, ffn=4096, v_out=1024, layers=24),
}


def target_shapes(model: str, preset: str) -> tuple[tuple[int, int, int], ...]:
    """Adapted matrices of one layer as (d_in, d_out of one slice, adapted slices), as mtlora_jax.models.presets.

    Encoders: q, v (+ FFN in, FFN out); Llama: q, v (+ gate, up, down); GPT-2: c_attn with q and v as 2 slices
    (lora-qv), or q, k and v as 3 slices under one joint T (+ c_fc; mtlora-paper, as the authors' GPT-2).
    """
    m = MODELS[model]
    h, f, v = m["hidden"], m["ffn"], m["v_out"]
    qv = {"gpt2": ((h, h, 2),)}.get(m["family"], ((h, h, 1), (h, v, 1)))
    if preset == "lora-qv":
        return qv
    qv = {"gpt2": ((h, h, 3),)}.get(m["family"], qv)
    if preset != "mtlora-paper":
        raise ValueError(f"target_shapes: preset {preset!r} not tabulated; expected 'mtlora-paper' or 'lora-qv'")
    ffn = {"bert": ((h, f, 1), (f, h, 1)), "llama": ((h, f, 1), (h, f, 1), (f, h, 1)), "gpt2": ((h, f, 1),)}
    return qv + ffn.get(m["family"], ffn["bert"])


def adapter_params(shapes, rank: int, structure: str) -> int:
    """Adapter parameters of one layer: k·r·(d_in + d_out) for A and B, plus NUM_MATS · (k·r)² for T."""
    return sum(k * rank * (d_in + d_out) + NUM_MATS[structure] * (k * rank) ** 2 for d_in, d_out, k in shapes)


def matched_rank(model: str, rank: int, preset: str = "lora-qv", structures=STRUCTURES[1:]) -> int:
    """The LoRA rank on `preset` targets whose parameter count is closest to the mean MTLoRA budget at `rank`."""
    budget = sum(adapter_params(target_shapes(model, "mtlora-paper"), rank, s) for s in structures) / len(structures)
    lora = target_shapes(model, preset)
    return min(range(1, 8 * rank + 1), key=lambda r: (abs(adapter_params(lora, r, "lora") - budget), r))


def _task(
    entry: str, config: str, metric: str, model: str, flags: tuple[str, ...], **extra
) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    # Entry point: "glue" (python -m train.glue) or "nlg" (python -m train.nlg).
    t.entry = entry
    # The entry's --config (file:arg); the flags below override it.
    t.config = config
    # The summary.json metric the tables compare (higher is better).
    t.metric = metric
    # Factor that puts the metric in points (GLUE metrics are in [0, 1]; sacrebleu's BLEU is already 0-100).
    t.scale = 100.0 if entry == "glue" else 1.0
    # A key of MODELS: the adapted shapes behind the parameter-matched rank.
    t.model = model
    # --config.<key>=<value> flags of every run of this task; "{runs_dir}", "{row}", "{seed}" are filled in.
    t.flags = tuple(flags)
    # Also run the untrained model once (0 steps, seed 0): the score every structure starts from.
    t.base_row = extra.pop("base_row", False)
    # LoRA rank of the parameter-matched row (LoRA on q, v only); computed from the model's shapes.
    t.matched_rank = matched_rank(model, extra.pop("rank"))
    # What the report says about the task's data and length.
    t.description = extra.pop("description")
    # Dev score of one constant prediction (the majority class; MCC 0), in points; None where undefined (a
    # correlation). The report flags a task where no row clears it: there the grid's budget learned nothing.
    t.constant = extra.pop("constant", None)
    assert not extra, extra
    return t


# Shared by every offline GLUE run (explicit, so a change of the entries' defaults cannot change the study).
_GLUE_OFFLINE = (
    "num_train_steps=200", "batch_size=16", "max_length=128", "batching=buckets", "length_buckets=(32, 64)",
    "learning_rate=1e-3",
    "warmup_ratio=0.06", "weight_decay=0.1", "eval_every_steps=50", "checkpoint_every_steps=50",
    "keep_checkpoints=1", "log_every_steps=10", "mtlora.rank=8", "mtlora.alpha=16.0", "mtlora.dropout=0.0",
    "mtlora.targets_preset=mtlora-paper", "mesh.data=1",
)  # fmt: skip
# eval_every_steps=-1 (once per epoch; 60 steps of one 500-step epoch): the decode runs after the last step only,
# as it did when -1 meant "only after the last step" for train.nlg.
_NLG_OFFLINE = (
    "num_train_steps=60", "max_train_examples=2000", "train_subset=spread", "batch_size=4", "max_length=128",
    "batching=buckets", "length_buckets=(64, 96)", "learning_rate=1e-3", "warmup_steps=10", "weight_decay=0.01",
    "label_smoothing=0.1",
    "checkpoint_every_steps=20", "keep_checkpoints=1", "log_every_steps=5", "eval_every_steps=-1",
    "eval_before_training=False", "eval_split=test", "eval_max_examples=100", "eval_subset=spread",
    "eval_batch_size=20", "prompt_buckets=(64, 96, 160)", "beam_size=1", "max_new_tokens=64",
    "mtlora.rank=4", "mtlora.alpha=32.0", "mtlora.dropout=0.1", "mtlora.targets_preset=mtlora-paper", "mesh.data=1",
)  # fmt: skip


def _minilm_glue(shared: tuple[str, ...]):
    """glue(task, metric, *flags, desc, constant): a MiniLM GLUE task with the grid's `shared` flags, then `flags`."""
    return lambda task, metric, *more, desc, constant=None: _task(
        "glue", f"configs/{task}.py:minilm", metric, "minilm", shared + more, rank=8, description=desc,
        constant=constant,
    )  # fmt: skip


def _offline() -> ml_collections.ConfigDict:
    glue = _minilm_glue(_GLUE_OFFLINE)
    tasks = ml_collections.ConfigDict()
    # constant: majority-class accuracy of the official dev sets (any constant has MCC 0); tests/test_study.py checks.
    tasks.cola = glue("cola", "mcc", desc="CoLA: all 8,551 train sentences, dev 1,043; Matthews corr.", constant=0.0)
    tasks.mrpc = glue(
        "mrpc", "accuracy", desc="MRPC: all 3,668 train pairs, dev 408; accuracy", constant=100 * 279 / 408
    )
    tasks.stsb = glue("stsb", "pearson", desc="STS-B: all 5,749 train pairs, dev 1,500; Pearson corr.")
    tasks.rte = glue("rte", "accuracy", desc="RTE: all 2,490 train pairs, dev 277; accuracy", constant=100 * 146 / 277)
    tasks.sst2 = glue(
        "sst2", "accuracy", "max_train_examples=5000", desc="SST-2: first 5,000 of 67,349 train sentences, dev 872",
        constant=100 * 444 / 872,
    )  # fmt: skip
    tasks.webnlg = _task(
        "nlg", "configs/webnlg.py:smollm", "bleu", "smollm2-135m", _NLG_OFFLINE, rank=4, base_row=True,
        description="WebNLG 2017: 2,000 train examples spread over the file; greedy decoding of 100 test inputs "
        "spread over the file (seen and unseen categories); BLEU (all)",
    )  # fmt: skip
    return tasks


# Round 2 (issue 20): the tasks round 1 learned, budgets in epochs (>= 2 for MRPC and STS-B), a held-out part of
# train to choose each row's learning rate on, and length-grouped batches (today's default: less padding, faster).
# learning_rate comes from the sweep (configs/study.py:round2 learning_rates).
_GLUE_ROUND2 = (
    "num_train_steps=-1", "batch_size=16", "max_length=128", "batching=length_grouped", "pad_multiple=16",
    "warmup_ratio=0.06", "weight_decay=0.1", "eval_every_steps=-1", "checkpoint_every_steps=100",
    "keep_checkpoints=1", "log_every_steps=10", "mtlora.rank=8", "mtlora.alpha=16.0", "mtlora.dropout=0.0",
    "mtlora.targets_preset=mtlora-paper", "mesh.data=1", "holdout_seed=0",
)  # fmt: skip
# WebNLG as in round 1 (60 steps, greedy decoding of 100 test inputs) plus 50 held-out training inputs (all their
# references) that are decoded and scored at the end as well.
_NLG_ROUND2 = tuple(f for f in _NLG_OFFLINE if not f.startswith("learning_rate=")) + (
    "holdout_examples=50",
    "holdout_seed=0",
)


def _round2() -> ml_collections.ConfigDict:
    glue = _minilm_glue(_GLUE_ROUND2)
    tasks = ml_collections.ConfigDict()
    tasks.sst2 = glue(
        "sst2", "accuracy", "max_train_examples=5000", "holdout_examples=500", "num_epochs=1",
        desc="SST-2: first 5,000 of 67,349 train sentences, 500 of them held out (4,500 train, 1 epoch = 282 "
        "steps), dev 872", constant=100 * 444 / 872,
    )  # fmt: skip
    tasks.mrpc = glue(
        "mrpc", "accuracy", "holdout_examples=400", "num_epochs=2",
        desc="MRPC: 3,668 train pairs, 400 held out (3,268 train, 2 epochs = 410 steps), dev 408; accuracy",
        constant=100 * 279 / 408,
    )  # fmt: skip
    tasks.stsb = glue(
        "stsb", "pearson", "holdout_examples=500", "num_epochs=2",
        desc="STS-B: 5,749 train pairs, 500 held out (5,249 train, 2 epochs = 658 steps), dev 1,500; Pearson corr.",
    )  # fmt: skip
    tasks.webnlg = _task(
        "nlg", "configs/webnlg.py:smollm", "bleu", "smollm2-135m", _NLG_ROUND2, rank=4,
        description="WebNLG 2017: 50 training inputs (all their references) held out, 2,000 train examples spread "
        "over the rest; greedy decoding of 100 test inputs spread over the file (seen and unseen categories); BLEU "
        "(all)",
    )  # fmt: skip
    return tasks


def _gpu() -> ml_collections.ConfigDict:
    glue_flags = ("mtlora.targets_preset=mtlora-paper",)
    init = ("init_from={runs_dir}/mnli-{row}-s{seed}",)  # the reference starts MRPC, RTE, STS-B from MNLI
    metrics = {"mnli": "accuracy_m", "cola": "mcc", "stsb": "pearson"}
    tasks = ml_collections.ConfigDict()
    for task in ("mnli", "sst2", "cola", "qnli", "qqp", "mrpc", "rte", "stsb"):  # MNLI first: others start from it
        flags = glue_flags + (init if task in ("mrpc", "rte", "stsb") else ())
        tasks[task] = _task(
            "glue", f"configs/{task}.py", metrics.get(task, "accuracy"), "roberta-base", flags, rank=8,
            description=f"{task}: the reference recipe of configs/{task}.py (RoBERTa-base, full data, dev set)",
        )  # fmt: skip
    folders = {"e2e": "e2e", "webnlg": "webnlg_challenge_2017", "dart": "dart"}  # LoRA's examples/NLG/data/
    for task, folder in folders.items():
        flags = ("mtlora.targets_preset=mtlora-paper", f"data_dir={{nlg_data_dir}}/{folder}")
        tasks[task] = _task(
            "nlg", f"configs/{task}.py", "bleu", "gpt2-medium", flags, rank=4, base_row=True,
            description=f"{task}: the reference recipe of configs/{task}.py (GPT-2 medium, beam 10)",
        )  # fmt: skip
    return tasks


def _smoke() -> ml_collections.ConfigDict:
    tasks = ml_collections.ConfigDict()
    flags = ("num_train_steps=4", "eval_every_steps=2", "checkpoint_every_steps=2", "mtlora.rank=2", "mesh.data=1")
    tasks.sst2 = _task("glue", "configs/sst2.py:smoke", "accuracy", "minilm", flags, rank=2, description="fixtures")
    return tasks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study grid; arg: "offline" (default), "round2", "gpu" or "smoke" (see the module docstring)."""
    names = ("offline", "round2", "gpu", "smoke")
    variant = base.parse_arg(arg, **dict.fromkeys(names, False))
    chosen = [name for name in names if variant[name]] or ["offline"]
    if len(chosen) > 1:
        raise ValueError(f"config arguments {' and '.join(chosen)} exclude each other")
    grid = chosen[0]
    c = ml_collections.ConfigDict()
    # Name of the grid (results/<grid>/, workdirs/study/<grid>/).
    c.grid = grid
    # Run workdirs (checkpoints, metrics, logs), relative to the repository root; ignored by git (/workdirs/).
    c.runs_dir = f"workdirs/study/{grid}"
    # Committed per-run summaries (summary, config, metrics, ΔW spectra; never checkpoints).
    c.results_dir = f"results/{grid}"
    # Persistent XLA compilation cache shared by the runs (identical shapes compile once across seeds).
    c.cache_dir = "workdirs/study/jax_cache"
    # Where train.study.report writes the report and its figures.
    c.report = "docs/RESULTS.md" if grid == "offline" else f"docs/RESULTS_{grid}.md"
    c.figures_dir = "docs/figures" if grid == "offline" else f"docs/figures/{grid}"
    # Rows compared: structures, and "<structure>-id" for a structure started at T = I (mtlora.c_init=identity).
    c.structures = {"smoke": ("lora", "shim"), "round2": ROUND2_ROWS}.get(grid, STRUCTURES)
    # Seeds (parameter init, dropout, data order); the paired tests pair runs by seed.
    c.seeds = (0, 1) if grid == "smoke" else (0, 1, 2)
    # Add the parameter-matched LoRA row (LoRA on q, v at each task's matched_rank).
    c.matched_row = grid != "round2"
    # A learning-rate sweep (train/study/sweep.py): each row runs these rates with the first seed, is scored on
    # select_prefix + the task's metric (the held-out part of train), may add max_extra_rates rates beyond an edge
    # of the sweep, and runs the other seeds at its best rate. () = one rate, the task's flags' own.
    c.learning_rates = (3e-4, 1e-3, 3e-3) if grid == "round2" else ()
    c.select_prefix = "heldout_"
    c.max_extra_rates = 1
    # Environment of the runs (KEY=VALUE); the offline grids must never reach the network.
    c.env = () if grid == "gpu" else ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1")
    # LoRA-repo NLG data (the gpu grid's "{nlg_data_dir}"): git clone https://github.com/microsoft/LoRA ../LoRA.
    c.nlg_data_dir = "../LoRA/examples/NLG/data" if grid == "gpu" else ""
    # The tasks in run order: entry, config, metric, model, flags, base_row, matched_rank, description.
    c.tasks = {"offline": _offline, "round2": _round2, "gpu": _gpu, "smoke": _smoke}[grid]()
    return c
