"""The one map between our param paths and Hugging Face tensor / module names, per model family.

Used both to load checkpoints (our path -> HF tensor) and to export adapters for PEFT (our kernel
path -> HF module name). HF keeps ``nn.Linear`` weights as [d_out, d_in], so their kernels are
transposed on load; GPT-2's ``Conv1D`` weights are already [d_in, d_out] like ours.

Scopes: an HF checkpoint nests the backbone under a prefix that depends on the saved class
(``bert.``, ``roberta.``, ``transformer.``, ``model.``, or none for a bare ``BertModel``), while
task heads (``classifier``, ``lm_head``) sit at the top. :func:`hf_tensor_name` returns the name
relative to its scope; the loader finds the backbone prefix in the checkpoint.

    encoder/layer_0/attention/query/kernel  ->  encoder.layer.0.attention.self.query.weight  (T)
    transformer/h_0/attn/c_attn/kernel      ->  h.0.attn.c_attn.weight
    model/layers_0/self_attn/q_proj/kernel  ->  layers.0.self_attn.q_proj.weight             (T)
"""

import re

FAMILIES = ("bert", "roberta", "gpt2", "llama")

# family -> (backbone root in our tree or "" for the top level, unrolled layer name, scanned name)
LAYERS = {
    "bert": ("encoder", "layer", "layers"),
    "roberta": ("encoder", "layer", "layers"),
    "gpt2": ("transformer", "h", "h"),
    "llama": ("model", "layers", "layers"),
}
# the backbone prefix of each family's HF task class (*ForSequenceClassification, GPT2LMHeadModel, *ForCausalLM)
TASK_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}
# our top-level subtree that is the HF backbone (stripped), and our top-level heads (kept, top scope)
_BACKBONE_ROOT = {"bert": None, "roberta": None, "gpt2": "transformer", "llama": "model"}
_TOP_HEADS = {"bert": ("classifier",), "roberta": ("classifier",), "gpt2": ("lm_head",), "llama": ("lm_head",)}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# the backbone tensor every checkpoint of the family has; its prefix in a checkpoint is the backbone prefix
ANCHOR = {
    "bert": "embeddings.word_embeddings.weight",
    "roberta": "embeddings.word_embeddings.weight",
    "gpt2": "wte.weight",
    "llama": "embed_tokens.weight",
}


def check_family(family: str) -> str:
    """Returns family or raises a ValueError listing the valid ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {FAMILIES}")
    return family


def hf_tensor_name(path: str, family: str) -> tuple[str, str, bool]:
    """Maps one of our unrolled param paths to its HF tensor.

    Args:
      path: "/"-joined param path, e.g. ``"encoder/layer_0/attention/query/kernel"``.
      family: "bert", "roberta", "gpt2" or "llama".

    Returns:
      (name, scope, transpose): the HF tensor name relative to its scope, scope "backbone" or "top",
      and whether the HF array is the transpose of ours.
    """
    parts = path.split("/")
    root, layer, scanned = LAYERS[check_family(family)]
    if len(parts) > 2 and parts[0] == root and parts[1] == scanned:
        raise ValueError(f"{path!r} is a scanned (stacked) path; unstack it first (stack.unstack_params)")
    if parts[-1] not in _LEAF:
        raise ValueError(f"param path {path!r} ends in {parts[-1]!r}, not one of {sorted(_LEAF)}")
    scope = "top" if parts[0] in _TOP_HEADS[family] else "backbone"
    if parts[0] == _BACKBONE_ROOT[family]:
        parts = parts[1:]
    names = []
    for part in parts[:-1]:
        m = re.fullmatch(rf"{layer}_(\d+)", part)
        names.extend([layer, m.group(1)] if m else [part])
    name = ".".join(names)
    if family in ("bert", "roberta"):
        name = re.sub(r"\.attention\.(query|key|value)$", r".attention.self.\1", name)
    transpose = parts[-1] == "kernel" and family != "gpt2"
    return f"{name}.{_LEAF[parts[-1]]}", scope, transpose


def hf_module_name(path: str, family: str, backbone_prefix: str = "") -> str:
    """The HF module name of one of our kernel paths, as PEFT names it in ``target_modules``.

    Args:
      path: an unrolled kernel path, e.g. ``"encoder/layer_0/attention/query/kernel"``.
      family: the model family.
      backbone_prefix: the HF backbone prefix of the model PEFT wraps: ``""`` for ``BertModel`` /
        ``GPT2Model`` / ``LlamaModel``; ``"bert."``, ``"roberta."``, ``"transformer."`` or ``"model."``
        for the task classes (``*ForSequenceClassification``, ``*LMHeadModel``, ``*ForCausalLM``).

    Returns:
      e.g. ``"encoder.layer.0.attention.self.query"``.
    """
    if not path.endswith("/kernel"):
        raise ValueError(f"{path!r} is not a kernel path; only Dense kernels map to HF modules")
    name, scope, _ = hf_tensor_name(path, family)
    module = name.removesuffix(".weight")
    return module if scope == "top" else backbone_prefix + module
