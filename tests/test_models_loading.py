"""The checkpoint loader's contract: sources, errors, new heads, unused tensors, name maps.

A tiny random ``BertModel`` saved by transformers is the base checkpoint; copies of it are edited
with the safetensors numpy API (a tensor removed, one added, split into shards, stored as bf16) to
exercise each rule of ``from_pretrained``. Independent references: the file's own arrays, the
llama.cpp permutation formula (for the GGUF inverse), literal HF module names.
"""

import json
import logging
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtlora_jax import models
from mtlora_jax.models import gguf_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A saved random BertModel (with pooler), d=32, 2 layers."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _edit(src, dst, fn):
    """Copies a checkpoint folder and rewrites its tensors with fn(dict) -> dict."""
    shutil.copytree(src, dst)
    save_file(fn(load_file(dst / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_weights_come_from_the_file_transposed(bert_dir):
    """Every Linear kernel is the file's [d_out, d_in] weight transposed; embeddings and norms as stored."""
    _, params = models.from_pretrained(bert_dir)
    raw = load_file(bert_dir / "model.safetensors")
    layer = params["encoder"]["layer_1"]
    np.testing.assert_array_equal(
        layer["attention"]["value"]["kernel"], raw["encoder.layer.1.attention.self.value.weight"].T
    )
    np.testing.assert_array_equal(layer["output"]["LayerNorm"]["scale"], raw["encoder.layer.1.output.LayerNorm.weight"])
    emb = params["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(emb, raw["embeddings.word_embeddings.weight"])


def test_missing_tensor_raises_with_its_path(bert_dir, tmp_path):
    """A backbone tensor absent from the file raises KeyError naming our path and the HF name."""
    name = "encoder.layer.0.intermediate.dense.weight"
    broken = _edit(bert_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(KeyError, match="encoder/layer_0/intermediate/dense/kernel"):
        models.from_pretrained(broken)


def test_unused_tensors_reported_once(bert_dir, tmp_path, caplog):
    """An MLM head in the file is reported in one warning; the pooler is unused under head=None."""
    extra = _edit(bert_dir, tmp_path / "m", lambda t: {**t, "cls.predictions.bias": np.zeros(60, np.float32)})
    with caplog.at_level(logging.WARNING, logger="mtlora_jax.models"):
        models.from_pretrained(extra)
    records = [r for r in caplog.records if "not used" in r.getMessage()]
    assert len(records) == 1
    assert "cls.predictions.bias" in records[0].getMessage() and "pooler.dense.weight" in records[0].getMessage()


def test_new_classification_head_initialized_like_hf(bert_dir, tmp_path):
    """BERT: pooler from the file, new classifier N(0, initializer_range) with zero bias; RoBERTa-style
    heads (no pooler in the file) are new too; a wrong num_labels against a stored head raises."""
    _, params = models.from_pretrained(bert_dir, head="classification", num_labels=5, seed=3)
    raw = load_file(bert_dir / "model.safetensors")
    np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], raw["pooler.dense.weight"].T)
    kernel = np.asarray(params["classifier"]["kernel"])
    assert kernel.shape == (32, 5) and abs(kernel.std() - 0.02) < 0.006 and abs(kernel.mean()) < 0.006
    np.testing.assert_array_equal(params["classifier"]["bias"], np.zeros(5))
    no_pooler = _edit(bert_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if "pooler" not in k})
    _, params = models.from_pretrained(no_pooler, head="regression")
    assert params["pooler"]["dense"]["kernel"].shape == (32, 32) and params["classifier"]["kernel"].shape == (32, 1)
    stored = _edit(bert_dir, tmp_path / "c", lambda t: {**t, "classifier.weight": np.zeros((3, 32), np.float32),
                                                         "classifier.bias": np.zeros(3, np.float32)})  # fmt: skip
    with pytest.raises(ValueError, match=r"classifier/(kernel|bias).*has shape"):
        models.from_pretrained(stored, head="classification", num_labels=2)


def test_sharded_and_bf16_checkpoints(bert_dir, tmp_path):
    """A sharded checkpoint (index.json) and a bf16 one load to the same float32 params."""
    _, ref = models.from_pretrained(bert_dir)
    raw = load_file(bert_dir / "model.safetensors")
    shard = tmp_path / "sharded"
    shard.mkdir()
    shutil.copy(bert_dir / "config.json", shard)
    names = sorted(raw)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: raw[k] for k in keys}, shard / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params = models.from_pretrained(shard)
    assert jnp.array_equal(params["encoder"]["layer_1"]["output"]["dense"]["kernel"],
                           ref["encoder"]["layer_1"]["output"]["dense"]["kernel"])  # fmt: skip

    from safetensors.flax import save_file as save_jax

    half = tmp_path / "bf16"
    half.mkdir()
    shutil.copy(bert_dir / "config.json", half)
    save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in raw.items()}, half / "model.safetensors")
    _, params = models.from_pretrained(half)
    got = params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    want = jnp.asarray(raw["encoder.layer.0.attention.self.query.weight"].T, jnp.bfloat16).astype(jnp.float32)
    assert got.dtype == jnp.float32 and jnp.array_equal(got, want)


def test_sources_fail_fast_and_clearly(monkeypatch):
    """Offline hub ids and bad local paths raise at once, saying how to pass a local checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE.*local HF folder"):
        models.from_pretrained("mtlora-jax-test/no-such-model")
    assert time.time() - start < 10
    with pytest.raises(FileNotFoundError, match="no such checkpoint path"):
        models.from_pretrained("./no/such/dir")


def test_gguf_unpermute_inverts_llama_cpp():
    """gguf_io.unpermute undoes convert_hf_to_gguf.py's permute (q: all heads; k: kv heads)."""

    def llama_cpp_permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    for heads in (1, 3):
        np.testing.assert_array_equal(gguf_io.unpermute(llama_cpp_permute(w, heads), heads), w)
    assert gguf_io.hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert gguf_io.hf_name("output_norm.weight") == "model.norm.weight"


def test_hf_names():
    """Our paths map to HF tensor names / PEFT module names (literal expectations)."""
    assert (
        models.hf_module_name("encoder/layer_0/attention/query/kernel", "bert")
        == "encoder.layer.0.attention.self.query"
    )
    assert models.hf_module_name("encoder/layer_2/output/dense/kernel", "roberta", "roberta.") == (
        "roberta.encoder.layer.2.output.dense"
    )
    assert models.hf_module_name("classifier/out_proj/kernel", "roberta", "roberta.") == "classifier.out_proj"
    assert models.hf_tensor_name("transformer/h_11/attn/c_attn/kernel", "gpt2") == (
        "h.11.attn.c_attn.weight",
        "backbone",
        False,
    )
    assert models.hf_tensor_name("model/layers_3/mlp/down_proj/kernel", "llama") == (
        "layers.3.mlp.down_proj.weight", "backbone", True
    )  # fmt: skip
    assert models.hf_tensor_name("lm_head/kernel", "llama") == ("lm_head.weight", "top", True)
    assert models.hf_tensor_name("embeddings/LayerNorm/scale", "bert") == (
        "embeddings.LayerNorm.weight",
        "backbone",
        False,
    )
    with pytest.raises(ValueError, match="scanned"):
        models.hf_module_name("encoder/layers/attention/query/kernel", "bert")
    with pytest.raises(ValueError, match="unknown model family"):
        models.hf_module_name("x/kernel", "t5")
