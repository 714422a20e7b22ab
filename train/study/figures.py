"""The structure study's figures (matplotlib, Agg): written by train.study.report from the committed results.

curves.png              eval metric (points) vs step per row, mean over seeds, one panel per task
spectra.png             singular values of ΔW normalized by the largest, mean over matrices, layers and seeds
spectra_layers_<t>.png  the same per module (rows) and structure (columns), one line per layer
norms_layers.png        ‖ΔW‖_F per layer (mean over modules and seeds), one panel per task
eigenvalues.png         eigenvalues of T in the complex plane, one panel per MTLoRA structure, all layers and seeds
lr_<task>.png           a sweep grid's score vs learning rate per row (first seed): held-out part of train (what
                        chooses the rate, left) and dev (right); diverged runs are marked with x at the bottom
"""

import collections
import os

import numpy as np

from train.study.stats import row_kind
from train.study.sweep import lr_text

T_STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")  # the structures with a trainable T


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tasks_kinds(config, results):
    tasks = [t for t in config.tasks if any(r.run["task"] == t for r in results)]
    kinds = [k for k in [*config.structures, "lora-qv-matched"] if any(row_kind(r.run["row"]) == k for r in results)]
    return tasks, kinds


def _panels(plt, n: int, width: float = 4.0, height: float = 3.0, ncols: int = 3):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    fig.clf()
    return path


def _normalized(sv) -> np.ndarray:
    sv = np.asarray(sv, np.float64)
    return sv / sv[0] if sv.size and sv[0] > 0 else np.full_like(sv, np.nan)


def _nanmean_ragged(rows: list) -> np.ndarray:
    """Mean over spectra of different lengths (missing entries are ignored)."""
    if not rows:
        return np.array([])
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    with np.errstate(invalid="ignore"):
        return np.nanmean(out, axis=0)


def plot_curves(plt, config, results, tasks, kinds, path):
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        metric, scale = config.tasks[task].metric, config.tasks[task].scale
        base = [r.summary["metrics"].get(metric) for r in results if r.run["task"] == task and r.run["row"] == "base"]
        for kind in kinds:
            by_step = collections.defaultdict(list)
            for r in results:
                if r.run["task"] == task and row_kind(r.run["row"]) == kind:
                    for rec in r.records:
                        if rec.get("kind") == "eval" and metric in rec:
                            by_step[rec["step"]].append(scale * rec[metric])
            if base and base[0] is not None:
                by_step[0] = [scale * base[0]]
            steps = sorted(by_step)
            ax.plot(steps, [np.mean(by_step[s]) for s in steps], marker="o", ms=3, label=kind)
        ax.set(title=task, xlabel="step", ylabel=f"{metric} (points)")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_lr(plt, config, results, task, kinds, best, path):
    """Score vs learning rate of `task`'s first-seed runs, per row; `best`: grid.best_rates."""
    t = config.tasks[task]
    fig, axes = _panels(plt, 2, width=5.0, height=3.6, ncols=2)
    for ax, key, title in zip(axes, (config.select_prefix + t.metric, t.metric), ("held-out part of train", "dev"),
                              strict=True):  # fmt: skip
        for i, kind in enumerate(kinds):
            runs = [r for r in results if r.run["task"] == task and r.run["row"] == kind and r.run.get("lr")]
            runs = sorted((r for r in runs if r.run["seed"] == config.seeds[0]), key=lambda r: r.run["lr"])
            ok = [r for r in runs if key in r.summary["metrics"]]
            style = dict(color=f"C{i}", ls="--" if kind.endswith("-id") else "-")
            shift = 1.04 ** (i - (len(kinds) - 1) / 2)  # rows side by side at each rate, so equal scores stay visible
            ax.plot([shift * r.run["lr"] for r in ok], [t.scale * r.summary["metrics"][key] for r in ok], marker="o",
                    ms=3, label=kind, **style)  # fmt: skip
            chosen = [r for r in ok if r.run["lr"] == best.get((task, kind), (None,))[0]]
            if chosen:
                ax.plot([shift * chosen[0].run["lr"]], [t.scale * chosen[0].summary["metrics"][key]], marker="*",
                        ms=11, color=f"C{i}", ls="none")  # fmt: skip
            bad = [shift * r.run["lr"] for r in runs if r.summary.get("diverged")]
            if bad:
                ax.plot(bad, [0.0] * len(bad), marker="x", color=f"C{i}", ls="none", transform=ax.get_xaxis_transform())
        ax.set(xscale="log", title=f"{task}: {title}", xlabel="learning rate", ylabel=f"{t.metric} (points)")
        rates = sorted({r.run["lr"] for r in results if r.run["task"] == task and r.run.get("lr")})
        ax.set_xticks(rates, [lr_text(lr) for lr in rates])
        ax.set_xticks([], minor=True)
    axes[0].legend(fontsize=7)
    fig.suptitle("stars: each row's chosen rate (best on the held-out part); rows drawn side by side at each rate; "
                 "dashed: started at T = I", fontsize=8)  # fmt: skip
    return _save(fig, path)


def plot_spectra(plt, results, tasks, kinds, path):
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        for kind in kinds:
            rows = [
                _normalized(a["sv"])
                for r in results
                if r.run["task"] == task and row_kind(r.run["row"]) == kind and r.analysis
                for a in r.analysis["adapters"]
            ]
            mean = _nanmean_ragged(rows)
            if mean.size:
                ax.semilogy(np.arange(1, mean.size + 1), mean, marker="o", ms=3, label=kind)
        ax.set(title=f"{task}: σ_i / σ_1 of ΔW", xlabel="i")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_spectra_layers(plt, results, task, kinds, path):
    adapters = collections.defaultdict(list)  # (module, kind, layer) -> normalized spectra over seeds
    for r in results:
        if r.run["task"] == task and r.analysis:
            for a in r.analysis["adapters"]:
                adapters[(a["module"], row_kind(r.run["row"]), a["layer"] or 0)].append(_normalized(a["sv"]))
    modules = sorted({m for m, _, _ in adapters})
    kinds = [k for k in kinds if any(k == kk for _, kk, _ in adapters)]
    layers = sorted({layer for _, _, layer in adapters})
    fig, axes = plt.subplots(len(modules), len(kinds), figsize=(2.6 * len(kinds), 2.1 * len(modules)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for i, module in enumerate(modules):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for layer in layers:
                mean = _nanmean_ragged(adapters.get((module, kind, layer), []))
                if mean.size:
                    color = cmap(layers.index(layer) / max(len(layers) - 1, 1))
                    ax.semilogy(np.arange(1, mean.size + 1), mean, color=color, lw=1)
            ax.set_title(f"{kind}: {module}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{task}: σ_i / σ_1 of ΔW per layer (dark = first layer, yellow = last)", fontsize=9)
    return _save(fig, path)


def plot_norms(plt, results, tasks, kinds, path):
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        for kind in kinds:
            per_layer = collections.defaultdict(list)
            for r in results:
                if r.run["task"] == task and row_kind(r.run["row"]) == kind and r.analysis:
                    for a in r.analysis["adapters"]:
                        per_layer[a["layer"] or 0].append(a["frob_norm"])
            layers = sorted(per_layer)
            if layers:
                ax.plot(layers, [np.mean(per_layer[x]) for x in layers], marker="o", ms=3, label=kind)
        ax.set(title=f"{task}: ‖ΔW‖_F per layer", xlabel="layer")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_eigenvalues(plt, results, tasks, path):
    # One panel per MTLoRA row (a structure, or one started at T = I: "ctcm-id").
    structures = [k for k in dict.fromkeys(r.run["row"] for r in results) if k.split("-")[0] in T_STRUCTURES]
    fig, axes = _panels(plt, max(len(structures), 1), width=3.6, height=3.4, ncols=4)
    for ax, s in zip(axes, structures, strict=False):
        for task in tasks:
            zs = [
                complex(*z)
                for r in results
                if r.run["task"] == task and r.run["row"] == s and r.analysis
                for a in r.analysis["adapters"]
                if a["t_eig"]
                for z in a["t_eig"]
            ]
            if zs:
                ax.scatter(np.real(zs), np.imag(zs), s=4, alpha=0.4, label=task)
        ax.axhline(0, color="gray", lw=0.5)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set(title=f"eigenvalues of T: {s}", xlabel="Re λ", ylabel="Im λ")
    if structures:
        axes[0].legend(fontsize=7, markerscale=3)
    return _save(fig, path)


def plot_all(config, results, figures_dir: str, sweep_results=(), best=None) -> dict[str, str]:
    """Writes every figure into `figures_dir`; returns {title: path}. A sweep grid passes its first-seed runs at
    every rate (`sweep_results`) and its chosen rates (`best`: grid.best_rates); `results` are then the runs at
    the chosen rates."""
    plt = _plt()
    os.makedirs(figures_dir, exist_ok=True)
    tasks, kinds = _tasks_kinds(config, results)
    join = lambda name: os.path.join(figures_dir, name)
    out = {}
    sweep_tasks, sweep_kinds = _tasks_kinds(config, sweep_results)
    for task in sweep_tasks:
        name = f"Score vs learning rate: {task}"
        out[name] = plot_lr(plt, config, sweep_results, task, sweep_kinds, best or {}, join(f"lr_{task}.png"))
    if tasks:
        out["Dev metric vs step"] = plot_curves(plt, config, results, tasks, kinds, join("curves.png"))
    analyzed = [t for t in tasks if any(r.run["task"] == t and r.analysis for r in results)]
    if analyzed:
        out["Normalized ΔW spectra"] = plot_spectra(plt, results, analyzed, kinds, join("spectra.png"))
        out["‖ΔW‖_F per layer"] = plot_norms(plt, results, analyzed, kinds, join("norms_layers.png"))
        out["Eigenvalues of T"] = plot_eigenvalues(plt, results, analyzed, join("eigenvalues.png"))
        for task in analyzed:
            name = f"ΔW spectra per layer: {task}"
            out[name] = plot_spectra_layers(plt, results, task, kinds, join(f"spectra_layers_{task}.png"))
    plt.close("all")
    return out
