"""Parity of the Flax models with transformers' PyTorch models on random tiny configs.

Each test builds a random-init model with ``transformers`` (torch, CPU), saves it with
``save_pretrained(safe_serialization=True)``, loads it with ``models.from_pretrained`` and checks
that hidden states / logits match the PyTorch forward within 1e-4 (fp32), with padding masks:
  * BERT (bare encoder, classification head) and RoBERTa (classification and regression heads,
    padding-offset positions: padded rows hold the pad id, as RoBERTa expects);
  * GPT-2 and the Llama family: Llama (GQA, untied head; tied head with llama3 RoPE scaling and an
    explicit head_dim), Qwen2 (q/k/v biases, no o_proj bias; untied, and tied with every layer sliding)
    and Mistral (sliding window 4 < sequence length), all with random biases, with right padding, left
    padding (HF given ``position_ids = cumsum(mask) - 1``, as its ``generate`` does), greedy ``generate``
    from a left-padded batch reproduced with our KV cache, packed rows (``segment_ids``) against each
    sequence alone, and our param names mapping onto exactly the HF state dict (what export writes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mtlora_jax import models  # noqa: E402
from mtlora_jax.models import hf_names  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Torch on one thread: on a shared 2-core machine its thread pool fights XLA's and runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ATOL = 1e-4
VOCAB = 101


def _save(tmp_path_factory, cls, config, name, random_biases=False):
    torch.manual_seed(0)
    model = cls(config).eval()
    if random_biases:  # HF inits biases to 0, which would hide a missing or misplaced bias
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith(".bias"):
                    p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _batch(seed, b=3, t=9, low=3):
    """Random ids [b, t] and a right-padding mask with row lengths t, t-3, 2."""
    ids = np.random.default_rng(seed).integers(low, VOCAB, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 3 :] = 0
    mask[2, 2:] = 0
    return ids, mask


def _torch(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return out


@pytest.fixture(scope="module")
def bert_cfg():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, type_vocab_size=2, num_labels=3,
    )  # fmt: skip


def test_bert_encoder_hidden_states(tmp_path_factory, bert_cfg):
    """BertModel.last_hidden_state == Encoder(head=None) with token types and padding."""
    hf, path = _save(tmp_path_factory, transformers.BertModel, bert_cfg, "bert")
    module, params = models.from_pretrained(path)
    ids, mask = _batch(0)
    types = (np.arange(ids.shape[1]) >= 4).astype(np.int64)[None].repeat(3, 0)
    ref = _torch(hf, ids, mask, token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    assert out.shape == (3, 9, 32)
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_bert_classification_logits(tmp_path_factory, bert_cfg):
    """BertForSequenceClassification logits (pooler + classifier loaded; num_labels=3 read from config.json)."""
    hf, path = _save(tmp_path_factory, transformers.BertForSequenceClassification, bert_cfg, "bertcls")
    module, params = models.from_pretrained(path, head="classification")
    ids, mask = _batch(1)
    ref = _torch(hf, ids, mask).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.shape == (3, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


@pytest.mark.parametrize("head,num_labels", [("classification", 3), ("regression", 1)])
def test_roberta_heads(tmp_path_factory, head, num_labels):
    """RobertaForSequenceClassification logits / regression scores, padding-offset positions."""
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, num_labels=num_labels,
    )  # fmt: skip
    hf, path = _save(tmp_path_factory, transformers.RobertaForSequenceClassification, cfg, f"roberta{head}")
    module, params = models.from_pretrained(path, head=head, num_labels=num_labels)
    ids, mask = _batch(2)
    ids = np.where(mask == 1, ids, 1)  # RoBERTa derives positions from ids != pad_token_id
    ref = _torch(hf, ids, mask).logits.numpy()
    out = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    if head == "regression":
        assert out.shape == (3,)
        ref = ref[:, 0]
    np.testing.assert_allclose(out, ref, atol=ATOL)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=None, eos_token_id=None
    )
    return transformers.GPT2LMHeadModel, cfg


def _llama_gqa():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM, cfg


def _llama_tied_llama3():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # fmt: skip
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=48, max_position_embeddings=64, rope_parameters=rope,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM, cfg


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM, cfg


def _qwen2_tied_sliding():
    """Tied head (as Qwen2.5-0.5B) and every layer sliding (max_window_layers=0) with a window of 4."""
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=4, max_window_layers=0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM, cfg


def _mistral_sliding():
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, max_position_embeddings=64, sliding_window=4,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.MistralForCausalLM, cfg


DECODERS = {
    "gpt2": _gpt2,
    "llama_gqa": _llama_gqa,
    "llama_tied_llama3": _llama_tied_llama3,
    "qwen2": _qwen2,
    "qwen2_tied_sliding": _qwen2_tied_sliding,
    "mistral_sliding": _mistral_sliding,
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder(request, tmp_path_factory):
    cls, cfg = DECODERS[request.param]()
    hf, path = _save(tmp_path_factory, cls, cfg, request.param, random_biases=True)
    module, params = models.from_pretrained(path, head="lm")
    return hf, module, params


def test_decoder_logits_right_padding(decoder):
    """LM logits at every real position match the PyTorch model (right padding, default positions)."""
    hf, module, params = decoder
    ids, mask = _batch(3)
    ref = _torch(hf, ids, mask).logits.numpy()
    out = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (3, 9, VOCAB)
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=ATOL)


def test_decoder_hidden_states_left_padding(decoder):
    """Bare-decoder hidden states (head=None) with left padding; our positions count real tokens."""
    hf, module, params = decoder
    ids, mask = _batch(4)
    mask = mask[:, ::-1].copy()  # left padding
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    ref = _torch(hf, ids, mask, position_ids=torch.tensor(pos), output_hidden_states=True).hidden_states[-1].numpy()
    out = np.asarray(module.clone(head=None).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=ATOL)


def _greedy(module, params, prompt, mask, new_tokens):
    """Greedy decoding with our KV cache: one prefill call, then one token per call."""
    step = jax.jit(lambda p, ids, m, c: module.apply({"params": p}, ids, m, cache=c))
    cache = models.init_cache(module, prompt.shape[0], prompt.shape[1] + new_tokens)
    logits, cache = step(params, jnp.asarray(prompt), jnp.asarray(mask), cache)
    out = []
    for _ in range(new_tokens):
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None]  # [b, 1]
        out.append(token)
        logits, cache = step(params, token, None, cache)
    return np.asarray(jnp.concatenate(out, axis=1))


def test_decoder_greedy_generation_left_padded(decoder):
    """HF ``generate`` (greedy, left-padded batch of prompts) == our cached decoding, token for token."""
    hf, module, params = decoder
    ids, mask = _batch(5, t=6)
    mask = mask[:, ::-1].copy()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(_greedy(module, params, ids, mask, 8), ref)


def test_decoder_packed_segments(decoder):
    """One row packing 3 sequences (segment ids 1..3, positions restarting at 0, 2 pads with segment 0)
    gives, at every real token, the logits of that sequence run alone through the HF model."""
    hf, module, params = decoder
    rng = np.random.default_rng(6)
    seqs = [rng.integers(3, VOCAB, n) for n in (5, 3, 6)]  # 5 and 6 > the sliding window of 4
    pad = np.zeros(2, np.int64)
    ids = np.concatenate([*seqs, pad])[None]
    seg = np.concatenate([np.full(len(x), i + 1) for i, x in enumerate(seqs)] + [pad])[None]
    pos = np.concatenate([np.arange(len(x)) for x in seqs] + [pad])[None]
    args = (jnp.asarray(ids), jnp.asarray((seg > 0).astype(np.int64)), jnp.asarray(pos))
    out = np.asarray(module.apply({"params": params}, *args, segment_ids=jnp.asarray(seg)))[0]
    start = 0
    for x in seqs:
        ref = _torch(hf, x[None], np.ones((1, len(x)), np.int64)).logits.numpy()[0]
        np.testing.assert_allclose(out[start : start + len(x)], ref, atol=ATOL)
        start += len(x)


def test_decoder_hf_names_match_state_dict(decoder):
    """Our param paths map (hf_names, as train/export.py names tensors) onto exactly the HF state dict,
    biases included (Qwen2: q/k/v_proj.bias, no o_proj.bias); a tied lm_head.weight is not ours."""
    hf, module, params = decoder
    family = models.family(module)
    prefix = hf_names.TASK_PREFIX[family]
    ours = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name, scope, _ = hf_names.hf_tensor_name("/".join(p.key for p in path), family)
        ours.add(name if scope == "top" else prefix + name)
    theirs = set(hf.state_dict())
    if hf.config.tie_word_embeddings:
        theirs.discard("lm_head.weight")
    assert ours == theirs


def test_llama_family_config_rules():
    """Per model_type biases and window; a Qwen2 mix of sliding and full layers raises, naming the key."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    read = lambda hf: models.LlamaConfig.from_hf(hf)  # noqa: E731
    llama = read(transformers.LlamaConfig(attention_bias=True, **kw))
    assert (llama.qkv_bias, llama.o_bias, llama.attention_bias, llama.sliding_window) == (True, True, True, None)
    qwen = read(transformers.Qwen2Config(sliding_window=4, **kw))  # use_sliding_window=False: full attention
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias, qwen.sliding_window) == (True, False, False, None)
    assert read(transformers.MistralConfig(sliding_window=7, **kw)).sliding_window == 7
    with pytest.raises(ValueError, match="max_window_layers=1"):
        read(transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **kw))
    with pytest.raises(ValueError, match="no Llama attention_bias"):
        _ = qwen.attention_bias


def test_segment_ids_need_positions_and_no_cache(decoder):
    """segment_ids without position_ids, or with a cache, raise instead of silently mis-positioning."""
    _, module, params = decoder
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="explicit position_ids"):
        module.apply({"params": params}, ids, segment_ids=ids)
    with pytest.raises(ValueError, match="without a cache"):
        module.apply({"params": params}, ids, None, ids, segment_ids=ids, cache=models.init_cache(module, 1, 4))
