"""The study report's tables beside the scores: ΔW spectra and eigenvalues of T, and the parameter counts behind
the parameter-matched LoRA row (train/study/report.py renders them)."""

import numpy as np

from configs import study as study_config
from train.study.stats import row_kind, row_label


def spectrum_table(results: list, tasks, kinds) -> list[list[str]]:
    """Per task and row of report.Result runs: stable rank, effective rank, ‖ΔW‖_F (means over matrices; mean over
    seeds), T eigenvalues."""
    rows = []
    for task in tasks:
        for kind in kinds:
            runs = [r for r in results if r.run["task"] == task and row_kind(r.run["row"]) == kind and r.analysis]
            if not runs:
                continue
            per_run = lambda key, runs=runs: np.mean([np.mean([a[key] for a in r.analysis["adapters"]]) for r in runs])
            eig = [a for r in runs for a in r.analysis["adapters"] if a["t_eig"] is not None]
            zs = np.array([complex(*z) for a in eig for z in a["t_eig"]]) if eig else np.array([])
            complex_frac = f"{np.mean(np.abs(zs.imag) > 1e-6 * np.abs(zs).max()):.2f}" if zs.size else "—"
            min_re = f"{zs.real.min():.3g}" if zs.size else "—"
            rows.append(
                [
                    task,
                    row_label(kind),
                    f"{per_run('stable_rank'):.2f}",
                    f"{per_run('effective_rank'):.2f}",
                    f"{per_run('frob_norm'):.3g}",
                    min_re,
                    complex_frac,
                    str(len(runs)),
                ]
            )
    return rows


def matched_text(config, tasks) -> str:
    """Adapter parameters per layer of each row, and how close LoRA at the same rank already is to MTLoRA's."""
    parts, excess, seen = [], [], set()
    for task in tasks:
        t = config.tasks[task]
        rank = int(dict(f.split("=", 1) for f in t.flags).get("mtlora.rank", 0))
        if not rank or (t.model, rank) in seen:
            continue
        seen.add((t.model, rank))
        shapes = study_config.target_shapes(t.model, "mtlora-paper")
        n = {s: study_config.adapter_params(shapes, rank, s) for s in study_config.STRUCTURES}
        up = study_config.adapter_params(shapes, rank + 1, "lora")
        qv = study_config.adapter_params(study_config.target_shapes(t.model, "lora-qv"), t.matched_rank, "lora")
        excess.append(max(n.values()) / n["lora"] - 1)
        parts.append(
            f"{t.model} (r={rank}): LoRA {n['lora']:,}, SHIM/ICFM {n['shim']:,}, CTCM/DTSM {n['ctcm']:,}, "
            f"LoRA r={rank + 1} {up:,}; matched LoRA q,v r={t.matched_rank} {qv:,}"
        )
    if not parts:
        return ""
    return (
        "Parameter matching (adapter parameters per layer, configs/study.py:matched_rank): " + "; ".join(parts) + ". "
        f"MTLoRA's T adds at most {100 * max(excess):.1f}% to LoRA at the same rank and targets, so that LoRA row is "
        "already the parameter-matched one; the matched row spends the MTLoRA budget on q, v only (the LoRA paper's "
        "placement, which the MTLoRA paper compares against at rank r)."
    )
