"""Turns a run's workdir into something PyTorch users load: a PEFT LoRA adapter or a merged HF model.

  python -m train.export --workdir workdirs/sst2-minilm --format peft --out exported/sst2-peft
  python -m train.export --workdir workdirs/sst2-minilm --format merged --out exported/sst2-merged

Both read the run's best checkpoint (train/saved_run.py).
  peft    adapter_config.json (peft_type LORA, base_model_name_or_path = the run's model, r, lora_alpha with
          rank_pattern / alpha_pattern, target_modules, fan_in_fan_out for GPT-2's Conv1D, modules_to_save for
          the trained head) + adapter_model.safetensors with lora_A = A and lora_B = B·T: exact for every
          structure. Load: peft.PeftModel.from_pretrained(<HF task class>.from_pretrained(base), out).
  merged  a standalone HF folder: config.json, model.safetensors (W + dW, the head folded in), tokenizer files.
          Load: transformers.AutoModelForSequenceClassification (encoders) / AutoModelForCausalLM (decoders)
          .from_pretrained(out). A GGUF base exports in the HF Llama layout (float32).
`--out` must be empty or absent (--overwrite to replace an earlier export); the workdir is only read. A run over a
quantized base (`base_quant`) exports its dequantized W + dW (merged) or its adapters, trained for that base (peft).
"""

import json
import os
import pathlib
import shutil

import numpy as np
from absl import app, flags, logging

import mtlora_jax as mt
from configs import glue_common
from mtlora_jax import models
from mtlora_jax.models import hf_names
from mtlora_jax.paths import named_leaves
from train import cli, saved_run
from train import model as model_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json and its checkpoints).")
_FORMAT = flags.DEFINE_enum("format", None, ["peft", "merged"], "peft: a LoRA adapter folder; merged: a HF model.")
_OUT = flags.DEFINE_string("out", None, "The folder to write (must be empty or absent).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
_MODEL = flags.DEFINE_string("model", None, "The base model's new place, when it moved since the run.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["workdir", "format", "out"])


def _head(config) -> dict:
    if config.task in glue_common.TASKS:
        from train.glue import train as job
    else:
        from train.nlg import train as job
    return job.head(config, None)


def _unrolled(params, family: str):
    """The tree with scanned (stacked) layers unstacked: HF names one module per layer."""
    root, _, scanned = hf_names.LAYERS[family]
    return models.unstack_params(params, family) if scanned in params.get(root, {}) else params


def _hf_key(path: str, family: str, prefix: str) -> tuple[str, bool]:
    name, scope, transpose = hf_names.hf_tensor_name(path, family)
    return (name if scope == "top" else prefix + name), transpose


def peft_state(saved: saved_run.SavedRun) -> tuple[dict, dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) of a saved run."""
    model, config = saved.model, saved.config
    _, prefix, task_type = model_lib.HF_CLASSES[model.family]
    params = _unrolled(model.params, model.family)
    state, cfg = mt.peft_lora_state(
        params,
        lambda path: models.hf_module_name(path, model.family, prefix),
        base_model_name_or_path=config.model,
        task_type=task_type,
        fan_in_fan_out=model.family == "gpt2",
    )
    adapted = {p for p, leaf in named_leaves(params) if mt.is_adapted(leaf)}
    trained = mt.adapter_state(params, model_lib.trainable_heads(config, model))
    modules = set()
    for path, value in trained.items():
        if path.rsplit("/", 1)[0] in adapted:
            continue  # an adapter factor: exported above as lora_A / lora_B
        key, transpose = _hf_key(path, model.family, prefix)
        value = np.asarray(value, np.float32)
        state[f"base_model.model.{key}"] = np.ascontiguousarray(value.T if transpose else value)
        modules.add(key.removeprefix(prefix).split(".")[0])  # "classifier", "pooler": PEFT's modules_to_save
    cfg["modules_to_save"] = sorted(modules) or None
    return state, cfg


def merged_state(saved: saved_run.SavedRun) -> dict:
    """model.safetensors tensors of the merged model (HF names and torch layout)."""
    family = saved.model.family
    _, prefix, _ = model_lib.HF_CLASSES[family]
    out = {}
    for path, leaf in named_leaves(_unrolled(saved.merged, family)):
        key, transpose = _hf_key(path, family, prefix)
        value = np.asarray(leaf, np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


def hf_config(saved: saved_run.SavedRun) -> dict:
    """config.json of the merged model: the base model's, with the task class, labels and head."""
    config, model = saved.config, saved.model
    arch = model_lib.HF_CLASSES[model.family][0]
    source = os.path.expanduser(config.model)
    if os.path.isfile(source) and source.endswith(".gguf"):
        c = model.module.config
        out = {
            "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_positions, "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias, "torch_dtype": "float32",
            "bos_token_id": model.tokenizer.bos_token_id, "eos_token_id": model.tokenizer.eos_token_id,
        }  # fmt: skip
    else:
        import transformers

        out = transformers.AutoConfig.from_pretrained(source).to_dict()
    own = model.head == "lm" and out.get("model_type") not in (None, "llama", "gpt2") and out.get("architectures")
    if not own:  # a Qwen2 / Mistral decoder keeps its own class (Qwen2ForCausalLM, MistralForCausalLM)
        out["architectures"] = [arch]
    if model.head in ("classification", "regression"):
        from train.glue import tasks

        spec = tasks.get_task(config.task)
        out["num_labels"] = spec.num_labels
        names = spec.label_names or ("score",)
        out["id2label"] = {str(i): n for i, n in enumerate(names)}
        out["label2id"] = {n: i for i, n in enumerate(names)}
        if spec.is_regression:
            out["problem_type"] = "regression"
    return out


def write_merged(saved: saved_run.SavedRun, path: pathlib.Path) -> None:
    """model.safetensors, config.json and the tokenizer files of the merged model, into `path`."""
    from safetensors.numpy import save_file

    save_file(merged_state(saved), path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(saved), indent=2))
    saved.model.tokenizer.save_pretrained(str(path))


def _prepare_out(out: str, overwrite: bool, workdir: str) -> pathlib.Path:
    path = pathlib.Path(out).expanduser().absolute()
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out={out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(path)
    workdir = pathlib.Path(workdir).absolute()
    if path == workdir or workdir in path.parents:
        raise ValueError(f"--out={out} is inside the workdir; export somewhere else (the workdir is only read)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def export(workdir: str, fmt: str, out: str, *, overwrite: bool = False, model: str | None = None) -> str:
    """Writes the export of `workdir` in format `fmt` ("peft" or "merged") to `out`; returns the folder."""
    from safetensors.numpy import save_file

    config = saved_run.read_config(workdir)
    saved = saved_run.load(workdir, head=_head(config), model=model)
    path = _prepare_out(out, overwrite, workdir)
    if fmt == "peft":
        state, cfg = peft_state(saved)
        save_file(state, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    else:
        write_merged(saved, path)
    quant = config.get("base_quant", "none")
    if quant != "none":
        what = ("the merged weights are its dequantized W + dW" if fmt == "merged" else "on a float base the PEFT "
                "adapter gives slightly different outputs (bitsandbytes' NF4 / int8 bases are closest)")  # fmt: skip
        logging.warning("the run trained over a %s base (base_quant); %s", quant, what)
    (path / "exported_from.json").write_text(json.dumps(
        {"workdir": os.path.abspath(workdir), "checkpoint": saved.checkpoint, "step": saved.step, "format": fmt,
         "base_quant": quant}, indent=2))  # fmt: skip
    return str(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    out = cli.guarded(export, _WORKDIR.value, _FORMAT.value, _OUT.value, overwrite=_OVERWRITE.value,
                      model=_MODEL.value, verbose=_VERBOSE.value)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
