"""Configs: every configs/<task>.py loads (default, smoke, minilm), holds the reference recipe, accepts the
documented command-line overrides through absl config_flags, and rejects typos and bad values clearly."""

import pathlib
import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import configs
from configs import base, glue_common, nlg_common
from train.glue import tasks as glue_tasks

CONFIGS = pathlib.Path(configs.__file__).parent
REQUIRED = {
    "partition_rules",
    "distributed",
    "base_dtype",
    "base_quant",
    "remat",
    "scan_layers",
    "model",
    "task",
    "data_dir",
    "data_source",
    "num_epochs",
    "num_train_steps",
    "batch_size",
    "grad_accum_steps",
    "max_length",
    "length_buckets",
    "batching",
    "pad_multiple",
    "holdout_examples",
    "holdout_seed",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "dtype",
    "mesh",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "init_from",
    "warmup_steps",
    "eval_before_training",
    "compilation_cache_dir",
    "max_train_examples",
    "max_eval_examples",
    "mtlora",
}
MTLORA = {"structure", "c_init", "rank", "alpha", "dropout", "targets_preset", "extra_targets", "extra_trainable"}
# ../shared/REFERENCE.md: lr, epochs, global batch (per-GPU x 2 where the reference used 2 GPUs).
RECIPES = {
    "mnli": (5e-4, 30, 32),
    "sst2": (5e-4, 60, 32),
    "cola": (4e-4, 80, 64),
    "qnli": (4e-4, 25, 64),
    "qqp": (5e-4, 25, 32),
    "rte": (5e-4, 80, 32),
    "mrpc": (4e-4, 30, 16),
    "stsb": (4e-4, 40, 16),
}


def test_config_files_and_tasks_agree():
    """Every GLUE task has a config file; every other file is an NLG task, the SFT job or a shared / driver module."""
    files = {p.stem for p in CONFIGS.glob("*.py")} - {"__init__", "base", "glue_common", "nlg_common", "study", "sft"}
    assert files == set(RECIPES) | set(nlg_common.NLG_TASKS)
    assert set(RECIPES) == set(glue_common.TASKS) == set(glue_tasks.TASKS)


@pytest.mark.parametrize("task", sorted(RECIPES))
@pytest.mark.parametrize("arg", [None, "smoke", "minilm"])
def test_get_config_has_required_keys_and_validates(task, arg):
    config = configs.get_config(task, arg)
    assert set(config.keys()) == REQUIRED and set(config.mtlora.keys()) == MTLORA
    assert config.task == task
    glue_common.validate(config)


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_reference_recipe(task):
    c = configs.get_config(task)
    assert (c.learning_rate, c.num_epochs, c.batch_size) == RECIPES[task]
    assert (c.warmup_ratio, c.weight_decay, c.max_length, c.num_train_steps) == (0.06, 0.1, 512, -1)
    assert (c.mtlora.rank, c.mtlora.alpha, c.mtlora.targets_preset) == (8, 16.0, "mtlora-paper")
    assert (c.model, c.data_dir, c.init_from) == ("FacebookAI/roberta-base", "", "")
    doc = (CONFIGS / f"{task}.py").read_text()
    assert f"python -m train.glue --config configs/{task}.py --workdir" in doc
    assert re.search(r"Expected dev score, .*: \d+\.\d", doc)
    assert ("--config.init_from=" in doc) == (task in ("mrpc", "rte", "stsb"))


def test_smoke_and_minilm_are_local_and_small():
    smoke = configs.get_config("sst2", "smoke")
    assert pathlib.Path(smoke.data_dir, "SST-2", "train.tsv").is_file()
    assert (smoke.num_train_steps, smoke.batch_size, smoke.max_length) == (5, 4, 32)
    minilm = configs.get_config("rte", "minilm")
    assert minilm.data_dir.endswith("shared/data/glue") and minilm.num_train_steps > 0
    if glue_common.minilm_path() != glue_common.MINILM_HUB_ID:
        assert pathlib.Path(smoke.model, "tokenizer.json").is_file() and minilm.model == smoke.model


def test_locked_config_rejects_typos_and_wrong_types():
    config = configs.get_config("cola")
    with pytest.raises(AttributeError):
        config.learing_rate = 1e-3
    with pytest.raises(AttributeError):
        config.mtlora.rnk = 4
    with pytest.raises(TypeError):
        config.batch_size = "big"


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=["glue", *argv])
    fv(["glue", *argv])
    return fv.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("task", sorted(RECIPES))
def test_command_line_overrides(task):
    """The overrides of the command-line contract work on every task, with `path:arg` config files."""
    config = _parse(
        [
            f"--config={CONFIGS / task}.py:smoke",
            "--config.model=/models/x",
            "--config.data_dir=/data/glue",
            "--config.num_train_steps=7",
            "--config.batch_size=8",
            "--config.max_length=64",
            "--config.learning_rate=1e-3",
            "--config.seed=3",
            "--config.mtlora.structure=lora",
            "--config.mtlora.rank=4",
            "--config.mtlora.alpha=8",
        ]
    )
    got = (
        config.model,
        config.data_dir,
        config.num_train_steps,
        config.batch_size,
        config.max_length,
        config.learning_rate,
        config.seed,
        config.mtlora.structure,
        config.mtlora.rank,
        config.mtlora.alpha,
    )
    assert got == ("/models/x", "/data/glue", 7, 8, 64, 1e-3, 3, "lora", 4, 8.0)
    glue_common.validate(config)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_command_line_typo_fails():
    with pytest.raises(AttributeError, match='Did you mean "learning_rate"'):
        _parse([f"--config={CONFIGS / 'sst2'}.py", "--config.learing_rate=1e-3"])


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("task", "wnli", r"config.task='wnli': expected one of cola"),
        ("data_source", "s3", r"config.data_source='s3'"),
        ("batch_size", 0, r"config.batch_size=0: expected a positive int"),
        ("grad_accum_steps", 3, r"config.grad_accum_steps=3: expected a positive divisor of batch_size=32"),
        ("length_buckets", (64, -1), r"config.length_buckets=\(64, -1\)"),
        ("batching", "sorted", r"config.batching='sorted': expected one of buckets, length_grouped"),
        ("pad_multiple", 0, r"config.pad_multiple=0: expected a positive int"),
        ("warmup_ratio", 1.0, r"config.warmup_ratio=1.0: expected in \[0, 1\)"),
        ("dtype", "float16", r"config.dtype='float16'"),
        ("max_eval_examples", 0, r"config.max_eval_examples=0: expected -1 \(all\) or > 0"),
        ("holdout_examples", -1, r"config.holdout_examples=-1: expected an int >= 0"),
        ("mtlora.structure", "diag", r"config.mtlora.structure='diag': expected one of lora, shim, icfm, ctcm, dtsm"),
        ("mtlora.c_init", "eye", r"config.mtlora.c_init='eye': expected one of kaiming_uniform, identity"),
        ("mtlora.rank", 0, r"config.mtlora.rank=0"),
        ("mtlora.targets_preset", "qkv", r"config.mtlora.targets_preset='qkv'"),
        ("mtlora.extra_targets", ("(unclosed",), r"config.mtlora.extra_targets: '\(unclosed' is not a regex"),
    ],
)
def test_validate_names_the_bad_key(key, value, match):
    config = configs.get_config("sst2")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        glue_common.validate(config)


def test_validate_cross_field_rules():
    config = configs.get_config("sst2")
    config.data_source = "local"
    with pytest.raises(ValueError, match=r"config.data_dir='': expected a GLUE folder"):
        glue_common.validate(config)
    config = configs.get_config("sst2")
    config.num_epochs = 0.0
    with pytest.raises(ValueError, match=r"config.num_epochs=0.0: expected > 0 when num_train_steps is -1"):
        glue_common.validate(config)
    config.num_train_steps = 10
    glue_common.validate(config)
    config.mesh.data = -2
    with pytest.raises(ValueError, match=r"config.mesh"):
        glue_common.validate(config)


def test_parse_arg():
    arg = base.parse_arg("smoke,rank=4,name=x", smoke=False, minilm=False, rank=8, name="")
    assert (arg.smoke, arg.minilm, arg.rank, arg.name) == (True, False, 4, "x")
    assert base.parse_arg(None, smoke=False).smoke is False
    assert base.parse_arg("smoke=false", smoke=True).smoke is False
    with pytest.raises(ValueError, match=r"unknown config argument 'tiny'; expected one of smoke, minilm"):
        configs.get_config("sst2", "tiny")
    with pytest.raises(ValueError, match=r"config argument rank='four': expected a int"):
        base.parse_arg("rank=four", rank=8)
    with pytest.raises(ValueError, match="exclude each other"):
        configs.get_config("sst2", "smoke,minilm")
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        configs.get_config("wnli")


def test_target_presets_are_the_library_presets():
    """configs only names presets; their regexes come from mtlora_jax.models.presets (one source of truth)."""
    presets = pytest.importorskip("mtlora_jax.models.presets")
    assert set(base.TARGET_PRESETS) == set(presets.PRESETS)
    structures = pytest.importorskip("mtlora_jax.structures")
    assert base.C_INITS == structures.C_INITS


def test_mtlora_c_init_reaches_the_adapters_and_old_configs_keep_the_reference_start():
    import dataclasses

    import jax
    import numpy as np

    import mtlora_jax as mt
    from train import model as model_lib

    c = glue_common.task_config("mrpc", "smoke", learning_rate=1e-3, num_epochs=1, batch_size=4)
    assert c.mtlora.c_init == "kaiming_uniform"
    with c.unlocked():
        c.mtlora.structure, c.mtlora.c_init = "ctcm", "identity"
    cfg = model_lib.mtlora_config(c, "bert")
    assert cfg.c_init == "identity"
    base_params = {"attention": {"query": {"kernel": np.ones((12, 12), np.float32)}}}
    cfg = dataclasses.replace(cfg, targets=(r".*kernel",), fused={})
    adapted = mt.init(base_params, cfg, jax.random.key(0))["attention"]["query"]
    assert np.array_equal(adapted["kernel"].c, np.eye(8)) and np.array_equal(adapted["kernel"].d, np.eye(8))
    old = ml_collections.ConfigDict(c.to_dict())  # a config.json saved before the key existed
    del old.mtlora["c_init"]
    assert model_lib.mtlora_config(old, "bert").c_init == "kaiming_uniform"
