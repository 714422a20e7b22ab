"""PEFT LoRA interchange: the exact export of any MTLoRA structure, and the import of a PEFT LoRA folder.

PEFT's LoRA computes dW_torch = (lora_alpha / r) · lora_B · lora_A (rsLoRA: lora_alpha / sqrt(r)). With
lora_A = A and lora_B = B_full · T (and lora_alpha = scale · R) that is exactly MTLoRA's scale · B_full · T · A,
so `peft_lora_state` is exact for every structure. `load_peft` reads a PEFT LoRA folder (adapter_config.json +
adapter_model.safetensors, rank_pattern / alpha_pattern, use_rslora) into adapted params of structure "lora"
(T = I): A = lora_A, B = lora_B, scale = lora_alpha / r; export -> import gives back the same dW.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable

import jax
import numpy as np

from mtlora_jax import paths
from mtlora_jax.adapted import is_adapted
from mtlora_jax.inject import MTLoRAConfig, init


def peft_lora_state(
    params, module_name: Callable[[str], str], *, prefix: str = "base_model.model.", **config
) -> tuple[dict[str, np.ndarray], dict]:
    """Exact PEFT LoRA export: lora_A = A, lora_B = B_full · T, lora_alpha = scale · R.

    Args:
      params: an adapted tree (unstacked adapters).
      module_name: maps a weight path (".../query/kernel") to the PEFT module name
        ("encoder.layer.0.attention.self.query"). Paths ending in "/embedding" export as PEFT's
        `lora_embedding_A` / `lora_embedding_B`.
      prefix: prepended to module names in the state dict keys (PEFT's saved-adapter convention).
      **config: extra adapter_config.json entries (e.g. fan_in_fan_out=True for GPT-2's Conv1D).

    Returns:
      (state_dict of numpy float32 arrays, adapter_config dict) to write as adapter_model.safetensors
      and adapter_config.json.
    """
    state, ranks, alphas = {}, {}, {}
    for path, ad in paths.named_leaves(params):
        if not is_adapted(ad):
            continue
        if ad.stack_ndim:
            raise ValueError(f"peft export: {path!r} is stacked (nn.scan); export an unscanned model")
        name = module_name(path)
        a = np.asarray(ad.a, np.float32)
        t = ad.t()
        b = np.asarray(ad.b_full() if t is None else ad.b_full() @ t, np.float32)
        kind = "lora_embedding_" if path.endswith("/embedding") else "lora_"
        suffix = "" if kind == "lora_embedding_" else ".weight"
        state[f"{prefix}{name}.{kind}A{suffix}"] = a
        state[f"{prefix}{name}.{kind}B{suffix}"] = b
        ranks[name], alphas[name] = ad.total_rank, ad.scale * ad.total_rank
    if not ranks:
        raise ValueError("peft export: the tree has no adapted leaves")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    cfg.update(config)
    return state, cfg


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _names(params, module_name) -> dict[str, str]:
    """PEFT module name -> our weight path, for every kernel / embedding `module_name` can name."""
    out = {}
    for path, leaf in paths.named_leaves(params):
        if is_adapted(leaf) or not path.endswith(("/kernel", "/embedding")):
            continue
        try:
            out[module_name(path)] = path
        except ValueError:
            continue  # a weight PEFT cannot name (not a module of the HF model)
    return out


def _model_namings() -> list[Callable[[str], str]]:
    """The HF module naming of every mtlora_jax.models family, for the bare model and for its task class."""
    from mtlora_jax.models import hf_names

    return [
        lambda p, f=f, x=x: hf_names.hf_module_name(p, f, x)
        for f in hf_names.FAMILIES
        for x in ("", hf_names.TASK_PREFIX[f])
    ]


def load_peft(folder, params, module_name: Callable[[str], str] | None = None, *, prefix: str = "base_model.model."):
    """Reads a PEFT LoRA adapter folder into `params` as structure-"lora" adapters.

    Args:
      folder: a folder with adapter_config.json and adapter_model.safetensors (PeftModel.save_pretrained).
      params: the plain, unrolled param tree of the base model the adapter was trained on.
      module_name: our weight path -> PEFT module name (as for `peft_lora_state`), e.g.
        `lambda p: models.hf_module_name(p, "bert", "bert.")`; None: the mtlora_jax.models naming of whichever
        family (and HF backbone prefix: bare model or task class) names every module of the folder.
      prefix: the state-dict key prefix PEFT writes ("base_model.model.").

    Returns:
      `params` with an `Adapted` (T = I) at every weight the folder adapts.

    Raises:
      ValueError: not a LoRA adapter (or DoRA), a module of the folder that matches no weight of `params`, or
        factors whose shapes do not fit the weight (each message names the folder and the module).
    """
    from safetensors.numpy import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{folder}: peft_type={cfg.get('peft_type')!r}, use_dora={cfg.get('use_dora')}: "
                         "only plain LoRA adapters can be read")  # fmt: skip
    state = load_file(os.path.join(folder, "adapter_model.safetensors"))
    factors = {}
    for key, value in state.items():
        m = re.fullmatch(rf"{re.escape(prefix)}(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?", key)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = value
    namings = [module_name] if module_name is not None else _model_namings()
    for naming in namings:
        by_name = _names(params, naming)
        unknown = sorted(set(factors) - set(by_name))
        if not unknown:
            break
    if unknown:
        raise ValueError(f"{folder}: modules {unknown[:3]} match no weight of these params (another base model?)")
    r, alpha, rs = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    ranks = {n: int(_pattern_value(cfg.get("rank_pattern") or {}, n, r)) for n in factors}
    alphas = {n: float(_pattern_value(cfg.get("alpha_pattern") or {}, n, alpha)) for n in factors}
    # our scale alpha' / r must be PEFT's lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))
    ours = {n: alphas[n] * (math.sqrt(ranks[n]) if rs else 1.0) for n in factors}
    targets = tuple(re.escape(by_name[n]) for n in factors)
    mt_cfg = MTLoRAConfig(
        rank=r, alpha=alpha, structure="lora", targets=targets,
        rank_pattern=tuple((re.escape(by_name[n]), ranks[n]) for n in factors),
        alpha_pattern=tuple((re.escape(by_name[n]), ours[n]) for n in factors),
    )  # fmt: skip
    adapted = init(params, mt_cfg, jax.random.key(0))  # every factor is overwritten below
    leaves = dict(paths.named_leaves(adapted))
    for name, f in factors.items():
        path = by_name[name]
        ad = leaves[path]
        a, b = np.asarray(f.get("A"), np.float32), np.asarray(f.get("B"), np.float32)
        if a.shape != tuple(ad.a.shape) or b.shape != tuple(ad.b.shape):
            raise ValueError(f"{folder}: {name}: lora_A {a.shape} / lora_B {b.shape} do not fit {path} "
                             f"(A {tuple(ad.a.shape)}, B {tuple(ad.b.shape)})")  # fmt: skip
        leaves[path] = dataclasses.replace(ad, a=a, b=b)
    return jax.tree_util.tree_map_with_path(lambda kp, x: leaves.get(paths.path_str(kp), x), adapted,
                                            is_leaf=is_adapted)  # fmt: skip
