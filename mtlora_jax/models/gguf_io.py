"""Reads llama.cpp GGUF files (Llama architecture) into HF-named float32 tensors and a LlamaConfig.

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with ``gguf.quants.dequantize``.
llama.cpp's converter permutes the rows of q_proj and k_proj so that RoPE rotates interleaved pairs;
we rotate halves (HF layout), so the permutation is undone per head::

    w[h, pair, 2, d_in] (GGUF rows)  ->  swap the last two row axes  ->  w[h, 2, pair, d_in] (HF rows)

with k using ``num_kv_heads`` heads (the same inverse ``transformers`` applies when it loads GGUF).
"""

import pathlib
import re

import numpy as np

from mtlora_jax.models import file_checks
from mtlora_jax.models.config import LlamaConfig

# GGUF tensor name (after blk.N.) -> HF LlamaForCausalLM name (after model.layers.N.)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata key {key!r} missing")
        return default
    return field.contents()


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: w [num_heads * head_dim, d_in] -> same shape, HF rows."""
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot unpermute {w.shape} over {num_heads} heads")
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: pathlib.Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads a Llama GGUF file.

    Args:
      path: the ``.gguf`` file.

    Returns:
      (config, tensors): tensors are float32 with HF names and torch layout ([d_out, d_in]).
    """
    import gguf

    file_checks.check_gguf(path)  # every count and length of the header fits in the file, before gguf allocates
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF general.architecture={arch!r}; only 'llama' is supported")
    names = [t.name for t in reader.tensors]
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: llama3-style rope_freqs in GGUF is not supported; load the safetensors checkpoint")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", int(embed.shape[-1]))),
        hidden_size=hidden,
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_positions=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        if ".self_attn.q_proj." in name:
            w = unpermute(w, heads)
        elif ".self_attn.k_proj." in name:
            w = unpermute(w, kv_heads)
        tensors[name] = w
    return config, tensors
