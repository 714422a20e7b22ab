"""Architecture configs of the model families, read from ``transformers`` configs (or GGUF metadata).

Frozen dataclasses (hashable, so they can be Flax module attributes) with one naming scheme across
families (``hidden_size``, ``num_layers``, ``num_heads``, ...); ``from_hf`` maps the HF names and raises
on options the Flax models do not implement, naming the config key.

Llama family (``LlamaConfig``): HF ``model_type`` "llama", "qwen2" (Qwen2 / Qwen2.5) and "mistral" share one
architecture and differ only in where the biases are and in the attention window:

  * llama: ``attention_bias`` puts a bias on q, k, v AND o (``qkv_bias = o_bias = attention_bias``);
  * qwen2: always a bias on q, k, v and never on o (``qkv_bias=True, o_bias=False``), no MLP bias; a sliding
    window only when ``use_sliding_window`` and every layer slides (``max_window_layers`` = 0), else full attention;
    a mix of sliding and full layers raises;
  * mistral: no biases; ``sliding_window`` (int or None) on every layer.
"""

import dataclasses

# HF model_type -> our family
FAMILY_OF = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
}
_ENCODERS = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT/RoBERTa encoder (names follow the HF config where they exist)."""

    family: str  # "bert" or "roberta"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, hf) -> "EncoderConfig":
        """Reads a ``transformers`` BertConfig / RobertaConfig."""
        if FAMILY_OF.get(hf.model_type) not in _ENCODERS:
            raise ValueError(f"config model_type {hf.model_type!r} is not a BERT/RoBERTa encoder")
        if getattr(hf, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config position_embedding_type={hf.position_embedding_type!r}: only 'absolute'")
        return cls(
            family=FAMILY_OF[hf.model_type],
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=hf.layer_norm_eps,
            hidden_dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob,
            classifier_dropout=getattr(hf, "classifier_dropout", None),
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            initializer_range=hf.initializer_range,
        )


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model (HF names in comments)."""

    vocab_size: int
    hidden_size: int  # n_embd
    num_layers: int  # n_layer
    num_heads: int  # n_head
    intermediate_size: int  # n_inner or 4 * n_embd
    max_positions: int = 1024  # n_positions
    activation: str = "gelu_new"  # activation_function
    layer_norm_eps: float = 1e-5
    resid_dropout: float = 0.1
    embd_dropout: float = 0.1
    attn_dropout: float = 0.1
    initializer_range: float = 0.02

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf) -> "GPT2Config":
        """Reads a ``transformers`` GPT2Config; raises on options this model does not implement."""
        if hf.model_type != "gpt2":
            raise ValueError(f"config model_type {hf.model_type!r} is not 'gpt2'")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if getattr(hf, key, ok) != ok:
                raise ValueError(f"config {key}={getattr(hf, key)!r} is not supported (expected {ok})")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.n_embd,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            intermediate_size=hf.n_inner or 4 * hf.n_embd,
            max_positions=hf.n_positions,
            activation=hf.activation_function,
            layer_norm_eps=hf.layer_norm_epsilon,
            resid_dropout=hf.resid_pdrop,
            embd_dropout=hf.embd_pdrop,
            attn_dropout=hf.attn_pdrop,
            initializer_range=hf.initializer_range,
        )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model (HF LlamaConfig names where they differ in comments)."""

    vocab_size: int
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int
    intermediate_size: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float | str], ...] = ()  # rope_parameters minus rope_theta, sorted
    max_positions: int = 2048  # max_position_embeddings
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # a bias on q_proj, k_proj, v_proj (llama: attention_bias; qwen2: always)
    o_bias: bool = False  # a bias on o_proj (llama: attention_bias; qwen2, mistral: never)
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # None = full causal attention; w = a query at index i sees keys j with i - w < j <= i (mistral, qwen2)
    sliding_window: int | None = None

    def __post_init__(self):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be a positive int or None")

    @property
    def attention_bias(self) -> bool:
        """HF LlamaConfig's ``attention_bias`` (one flag for q, k, v and o); raises for Qwen2's split."""
        if self.qkv_bias != self.o_bias:
            raise ValueError(f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias} has no Llama attention_bias")
        return self.qkv_bias

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """Reads a ``transformers`` Llama / Qwen2 / Mistral config (``rope_parameters``, or legacy
        ``rope_theta``/``rope_scaling``); see the module docstring for the per-type biases and window."""
        if FAMILY_OF.get(hf.model_type) != "llama":
            raise ValueError(f"config model_type {hf.model_type!r} is not 'llama', 'qwen2' or 'mistral'")
        params = dict(getattr(hf, "rope_parameters", None) or {})
        if not params:
            params = {"rope_theta": getattr(hf, "rope_theta", 10000.0), **(getattr(hf, "rope_scaling", None) or {})}
        theta = params.pop("rope_theta")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config partial_rotary_factor={params['partial_rotary_factor']} is not supported")
        scaling = tuple(sorted((k, v) for k, v in params.items() if v is not None and k != "partial_rotary_factor"))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_positions=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0)),
            initializer_range=hf.initializer_range,
            **_biases_and_window(hf),
        )


def _biases_and_window(hf) -> dict:
    """qkv_bias, o_bias, mlp_bias and sliding_window of a llama / qwen2 / mistral HF config."""
    if hf.model_type == "llama":
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf, "mlp_bias", False)), sliding_window=None)
    if hf.model_type == "mistral":
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=getattr(hf, "sliding_window", None))
    # qwen2: HF sets sliding_window = None unless use_sliding_window; layer_types says which layers slide
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", False) else None
    kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
    if window is None or kinds == {"full_attention"}:
        window = None
    elif kinds != {"sliding_attention"}:
        raise ValueError(
            f"config use_sliding_window=True with max_window_layers={getattr(hf, 'max_window_layers', None)} "
            f"(layer_types {sorted(kinds)}) mixes sliding and full attention layers; only all-or-none is supported"
        )
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=window)


def from_hf(hf) -> tuple[str, EncoderConfig | GPT2Config | LlamaConfig]:
    """(family, config) for a ``transformers`` config; raises ValueError for unsupported model types."""
    family = FAMILY_OF.get(hf.model_type)
    if family is None:
        raise ValueError(f"config.json model_type {hf.model_type!r} is not supported; valid: {sorted(FAMILY_OF)}")
    cls = EncoderConfig if family in _ENCODERS else GPT2Config if family == "gpt2" else LlamaConfig
    return family, cls.from_hf(hf)
