"""Benchmark scripts that must keep running.

The accelerator benchmark's CPU dry run (bench/gpu_mfu.py --tiny): every model shape and variant is built, stepped
and timed, and every goal gets its verdict line, so the script is ready for a GPU session. bench/peft_throughput.py:
its steady-state arithmetic, and both of its sides train a few steps."""

import pathlib
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


def test_peft_throughput_steady_rate_counts_only_intervals_after_skip():
    """examples/s = steps x batch / seconds over the log intervals that start at or after --skip."""
    from bench import peft_throughput

    records = [{"step": 10, "examples_per_s": 5.0}, {"step": 20, "examples_per_s": 20.0},
               {"step": 30, "examples_per_s": 40.0}]  # fmt: skip
    # steps 10-20: 160 examples in 8 s; steps 20-30: 160 in 4 s
    assert peft_throughput.steady_rate(records, 10, 16) == pytest.approx(320 / 12)
    assert peft_throughput.steady_rate(records, 0, 16) == pytest.approx(480 / (32 + 8 + 4))
    with pytest.raises(ValueError, match="--skip"):
        peft_throughput.steady_rate(records, 30, 16)


@pytest.mark.slow
def test_peft_throughput_both_sides_train_on_the_fixtures():
    """Both sides of bench/peft_throughput.py run a few real steps: our train.glue command line (as the bench
    builds it) still fits the configs, and the PEFT Trainer side (group_by_length sampling) trains."""
    from bench import peft_throughput

    fixtures = str(pathlib.Path(__file__).parent / "fixtures" / "glue")
    ours = peft_throughput.run_ours("mrpc", "ctcm", 4, -1, 0, "length_grouped", fixtures)
    peft = peft_throughput.peft_main("mrpc", 4, -1, 1, fixtures)
    assert ours > 0 and peft > 0
