"""The accelerator benchmark's CPU dry run (bench/gpu_mfu.py --tiny): every model shape and variant is built,
stepped and timed, and every goal gets its verdict line, so the script is ready for a GPU session."""

import re

import pytest


@pytest.mark.slow
def test_gpu_mfu_dry_run_times_every_shape_and_variant(capsys):
    from bench import gpu_mfu

    gpu_mfu.main(["--tiny", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = re.findall(r"^(\S+ \S+)\s+(frozen|lora|ctcm|merged)\s+[\d.]+ ms/step", out, re.M)
    shapes = list(gpu_mfu.configs(tiny=True))
    assert rows == [(s, v) for s in shapes for v in ("frozen", "lora", "ctcm", "merged")], out
    assert len(re.findall(r"^goal .*: (met|not met)$", out, re.M)) == 2 * len(shapes), out
