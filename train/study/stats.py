"""The study's statistics: per-cell scores over seeds, paired t-tests against LoRA, Holm's correction.

A cell is (task, row kind) -> {seed: final metric in points}; every comparison pairs a row with LoRA on the same
seeds (scipy.stats.ttest_rel), and the MTLoRA-vs-LoRA tests of single tasks are Holm-corrected together; then
one plain sentence per comparison (`verdict`) and per task against its constant prediction (`constant_text`).
"""

import collections

import numpy as np
from scipy import stats

ALPHA = 0.05  # significance level of the paired tests
LEARNED_MARGIN = 1.0  # points above a constant prediction that count as having learned a task


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std (ddof = 1; nan for one value), n)."""
    v = np.asarray(list(values), np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def paired_test(a: dict, b: dict) -> tuple[float, float, int]:
    """Paired t-test of a - b over the seeds both have: (mean difference, two-sided p-value, n); p = nan for n < 2."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return float("nan"), float("nan"), 0
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    p = float(stats.ttest_rel(x, y).pvalue) if len(seeds) > 1 else float("nan")
    return float(np.mean(x - y)), p, len(seeds)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if not np.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out, running = list(pvalues), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * pvalues[i]))
        out[i] = running
    return out


def row_kind(row: str) -> str:
    """Table row of a run row: the matched rows of different tasks (different ranks) share one line."""
    return "lora-qv-matched" if row.startswith("lora-qv-r") else row


def cells(results: list, config) -> dict:
    """{(task, row kind): {seed: final metric in points (x config.tasks[task].scale)}} for the config's tasks."""
    out = collections.defaultdict(dict)
    for r in results:
        task = r.run["task"]
        if task in config.tasks:
            value = r.summary["metrics"].get(config.tasks[task].metric)
            if value is not None:
                out[(task, row_kind(r.run["row"]))][r.run["seed"]] = config.tasks[task].scale * value
    return out


def seed_average(c: dict, kind: str, tasks) -> dict:
    """{seed: mean over `tasks`} for the seeds that have every task of row `kind`."""
    seeds = set.intersection(*(set(c.get((t, kind), {})) for t in tasks)) if tasks else set()
    return {s: float(np.mean([c[(t, kind)][s] for t in tasks])) for s in seeds}


def comparisons(c: dict, tasks, kinds) -> list[dict]:
    """Every (task or "average", row kind) against lora: mean difference, p, Holm-adjusted p, n."""
    out = []
    for kind in [k for k in kinds if k not in ("lora", "base")]:
        for task in [*tasks, "average"]:
            a = seed_average(c, kind, tasks) if task == "average" else c.get((task, kind), {})
            b = seed_average(c, "lora", tasks) if task == "average" else c.get((task, "lora"), {})
            if a and b:
                diff, p, n = paired_test(a, b)
                out.append({"task": task, "kind": kind, "diff": diff, "p": p, "n": n, "a": a, "b": b})
    tested = [x for x in out if x["kind"] != "lora-qv-matched" and x["task"] != "average"]
    for x, adj in zip(tested, holm([x["p"] for x in tested]), strict=True):
        x["p_holm"] = adj
    return out


def row_label(row: str) -> str:
    """The report's name of a row (kind): the matched rows of all tasks share one line."""
    return {"lora-qv-matched": "LoRA q,v (matched rank)", "base": "base (0 steps)"}.get(row, row)


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def verdict(x: dict) -> str:
    """One plain sentence for one comparison against LoRA."""
    name = "the average" if x["task"] == "average" else x["task"].upper()
    a, b = mean_std(x["a"].values()), mean_std(x["b"].values())
    head = f"{name}: {row_label(x['kind'])} {a[0]:.1f} vs LoRA {b[0]:.1f} (Δ {x['diff']:+.1f}, {x['n']} paired seeds"
    if np.isnan(x["p"]):
        return head + "): too few seeds for a test."
    head += f", p = {_fmt_p(x['p'])}" + (f", Holm p = {_fmt_p(x['p_holm'])}" if "p_holm" in x else "") + ")"
    if x["p"] >= ALPHA:
        return head + ": no significant difference" + (" (higher but not significant)." if x["diff"] > 0 else ".")
    better = "significantly better than LoRA" if x["diff"] > 0 else "significantly worse than LoRA"
    held = "" if "p_holm" not in x else (" and after Holm correction" if x["p_holm"] < ALPHA else ", not after Holm")
    return f"{head}: {better} at p < {ALPHA}{held}."


def _best_row(c: dict, task: str):
    """(row kind, mean score) of the best row of `task`, or None without scores."""
    means = [(k, np.mean(list(v.values()))) for (t, k), v in c.items() if t == task and v]
    return max(means, key=lambda kv: kv[1]) if means else None


def unlearned(c: dict, tasks, config) -> list[str]:
    """The tasks with a constant-prediction score that no row clears by LEARNED_MARGIN: the budget learned nothing
    there, so the verdict, the average and the Holm correction leave them out."""
    out = []
    for task in [t for t in tasks if config.tasks[t].get("constant") is not None]:
        best = _best_row(c, task)
        if best is not None and best[1] <= config.tasks[task].constant + LEARNED_MARGIN:
            out.append(task)
    return out


def constant_text(c: dict, tasks, config) -> list[str]:
    """One sentence per task with a constant-prediction score: does the best row clear it by LEARNED_MARGIN?"""
    out = []
    for task in [t for t in tasks if config.tasks[t].get("constant") is not None]:
        const, best = config.tasks[task].constant, _best_row(c, task)
        if best is None:
            continue
        best_kind, score = best
        head = f"{task.upper()}: best row {row_label(best_kind)} {score:.1f}, constant prediction {const:.1f}"
        if task not in unlearned(c, [task], config):
            out.append(f"{head}: learned ({score - const:+.1f} points).")
        else:
            out.append(
                f"{head}: no row beats it by more than {LEARNED_MARGIN:.0f} point, so within this budget the model "
                "did not learn the task; its comparisons say nothing about the structures and are left out of the "
                "verdict, the average and the Holm correction."
            )
    return out
