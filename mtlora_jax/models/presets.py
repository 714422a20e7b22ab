"""Which weights MTLoRA adapts, per preset and model family, in one place.

Presets (regexes for ``MTLoRAConfig.targets``, full-matched over "/"-joined param paths; each
matches both the unrolled ``layer_3`` paths and the scanned ``layers`` paths):

  * ``"lora-qv"``: query and value projections (the LoRA paper). GPT-2's fused ``c_attn`` is one
    kernel, so q and v are selected with the fused spec (k disabled), as LoRA's ``enable_lora=[True,
    False, True]``.
  * ``"mtlora-paper"``: what the MTLoRA reference adapts. Encoders: query, value, FFN in
    (``intermediate/dense``) and FFN out (``output/dense``). GPT-2: ``c_attn`` with one joint T over
    q, k and v (the authors' ``examples/NLG/src/model.py``: ``MergedLinear(enable_xtuning=[True, True,
    True])``) plus ``mlp/c_fc``. Llama (not in the paper; by analogy): q, v and the
    SwiGLU FFN (gate, up, down).
  * ``"all-linear"``: every Dense kernel inside the blocks (heads and embeddings excluded); GPT-2's
    ``c_attn`` is adapted as one plain matrix.

Use with ``mt.MTLoRAConfig(targets=targets(p, f), fused=fused(p, f), stack_ndim=stack_ndim(f) if scan)``
and train the task head with ``extra_trainable=head_targets(f, head)``.
"""

from mtlora_jax.models.hf_names import LAYERS, check_family

PRESETS = ("lora-qv", "mtlora-paper", "all-linear")
_ENCODER = {
    "lora-qv": (r"attention/(query|value)",),
    "mtlora-paper": (r"attention/(query|value)", r"intermediate/dense", r"output/dense"),
    "all-linear": (r"attention/(query|key|value)", r"attention/output/dense", r"intermediate/dense", r"output/dense"),
}
_MODULES = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "gpt2": {
        "lora-qv": (r"attn/c_attn",),
        "mtlora-paper": (r"attn/c_attn", r"mlp/c_fc"),
        "all-linear": (r"attn/c_attn", r"attn/c_proj", r"mlp/c_fc", r"mlp/c_proj"),
    },
    "llama": {
        "lora-qv": (r"self_attn/(q_proj|v_proj)",),
        "mtlora-paper": (r"self_attn/(q_proj|v_proj)", r"mlp/(gate_proj|up_proj|down_proj)"),
        "all-linear": (r"self_attn/(q_proj|k_proj|v_proj|o_proj)", r"mlp/(gate_proj|up_proj|down_proj)"),
    },
}
# GPT-2 c_attn = [q | k | v] as three slices: LoRA's q and v (k frozen), and the MTLoRA authors' q, k and v under
# one joint T.
C_ATTN_QV = (3, (True, False, True))
C_ATTN_QKV = (3, (True, True, True))
_HEADS = {
    ("bert", "classification"): (r"pooler/.*", r"classifier/.*"),
    ("bert", "regression"): (r"pooler/.*", r"classifier/.*"),
    ("roberta", "classification"): (r"classifier/.*",),
    ("roberta", "regression"): (r"classifier/.*",),
}


def _layer_prefix(family: str) -> str:
    """Regex for the layer subtree: ``encoder/layer_<i>`` or ``encoder/layers`` (and alike)."""
    root, layer, scanned = LAYERS[family]
    return rf"{root}/({layer}_\d+|{scanned})"


def _check(preset: str, family: str) -> None:
    check_family(family)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {PRESETS}")


def targets(preset: str, family: str) -> tuple[str, ...]:
    """Target regexes for ``MTLoRAConfig.targets``.

    Args:
      preset: "lora-qv", "mtlora-paper" or "all-linear".
      family: "bert", "roberta", "gpt2" or "llama".

    Returns:
      e.g. ``("encoder/(layer_\\d+|layers)/attention/(query|value)/kernel",)``.
    """
    _check(preset, family)
    prefix = _layer_prefix(family)
    return tuple(f"{prefix}/{module}/kernel" for module in _MODULES[family][preset])


def fused(preset: str, family: str) -> dict[str, tuple[int, tuple[bool, ...]]]:
    """The ``MTLoRAConfig.fused`` spec of GPT-2's c_attn: ``(3, (True, False, True))`` for "lora-qv",
    ``(3, (True, True, True))`` (one joint T over q, k, v) for "mtlora-paper".

    Returns {} for every other preset and family (nothing fused; "all-linear" adapts c_attn as one matrix).
    """
    _check(preset, family)
    if family == "gpt2" and preset in ("lora-qv", "mtlora-paper"):
        spec = C_ATTN_QV if preset == "lora-qv" else C_ATTN_QKV
        return {f"{_layer_prefix(family)}/attn/c_attn/kernel": spec}
    return {}


def stack_ndim(family: str) -> dict[str, int]:
    """The ``MTLoRAConfig.stack_ndim`` spec for a ``scan_layers`` model: one leading layer axis."""
    root, _, scanned = LAYERS[check_family(family)]
    return {rf"{root}/{scanned}/.*": 1}


def head_targets(family: str, head: str | None) -> tuple[str, ...]:
    """Regexes of the task-head params to train beside the adapters (``extra_trainable``).

    Args:
      family: the model family. head: None, "classification", "regression" or "lm".

    Returns:
      BERT: pooler and classifier; RoBERTa: classifier; decoders and head None: () (the LM head is tied
      or pretrained and stays frozen).
    """
    check_family(family)
    return _HEADS.get((family, head), ())
