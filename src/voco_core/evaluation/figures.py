"""The figures of ``voco compare``: learning curves, the per-class difference at the
plateau, and (labelled design) plateau Dice against the number of labelled cases."""

from __future__ import annotations

from pathlib import Path

from voco_core.outputs import atomic_write

COLOURS = {"scratch": "0.3", "voco": "C1"}


def _curve_table(curves: list[list[dict]]):
    """``(steps, table)``: the validated steps of ``curves`` and their mean Dice, one row
    per curve (NaN where a curve has no point at a step)."""
    import numpy as np

    steps = sorted({p["step"] for c in curves for p in c})
    table = np.array([[next((p["mean"] for p in c if p["step"] == s), np.nan)
                       for s in steps] for c in curves], dtype=float)
    return steps, table


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90), "figure")


def plot_comparison(record: dict, curves_png: Path, classes_png: Path) -> None:
    """``curves.png``: mean held-out Dice against step for both arms (band: min..max
    over pairs); ``classes.png``: per-class VoCo - scratch at the plateau, 95% t CI."""
    import numpy as np
    from matplotlib.figure import Figure

    from voco_core.evaluation.compare import ARMS

    runs = record["runs"]
    fig = Figure(figsize=(6, 3.5), constrained_layout=True)
    ax = fig.add_subplot()
    for arm in ARMS:
        colour = COLOURS[arm]
        steps, table = _curve_table([r["curve"] for r in runs.values() if r["arm"] == arm])
        ax.plot(steps, np.nanmean(table, axis=0), color=colour, label=arm)
        ax.fill_between(steps, np.nanmin(table, axis=0), np.nanmax(table, axis=0),
                        color=colour, alpha=0.15)
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("held-out mean Dice")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, curves_png)

    per_class = record["final_quality"]["per_class"]
    names = list(per_class)
    means, low, high = [], [], []
    for name in names:
        difference = per_class[name]["difference"]
        mean = difference.get("mean") or 0.0
        lo, hi = difference.get("ci95_t") or (None, None)  # none with one pair
        means.append(mean)
        low.append(mean - lo if lo is not None else 0.0)
        high.append(hi - mean if hi is not None else 0.0)
    errors = [low, high]
    fig = Figure(figsize=(6, 3.5), constrained_layout=True)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, yerr=errors, color="C1", capsize=3)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("VoCo - scratch Dice at the plateau")
    _save(fig, classes_png)


def plot_labelled(record: dict, curves_png: Path, labelled_png: Path) -> None:
    """Labelled design. ``curves.png``: mean held-out Dice against step per arm and
    number of labelled cases (lighter: fewer); ``labelled.png``: plateau Dice against
    labelled cases per arm (bars: min..max over seeds)."""
    import numpy as np
    from matplotlib.figure import Figure

    from voco_core.evaluation.compare import ARMS

    counts = record["labelled"]
    fig = Figure(figsize=(6, 3.5), constrained_layout=True)
    ax = fig.add_subplot()
    for k, n in enumerate(counts):
        for arm in ARMS:
            steps, table = _curve_table([r["curve"] for r in record["runs"].values()
                                         if r["arm"] == arm and r["fold"] == k])
            ax.plot(steps, np.nanmean(table, axis=0), color=COLOURS[arm],
                    alpha=0.35 + 0.65 * (k + 1) / len(counts), label=f"{arm}, {n} labelled")
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("held-out mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, curves_png)

    fig = Figure(figsize=(5, 3.5), constrained_layout=True)
    ax = fig.add_subplot()
    for offset, arm in zip((-0.04, 0.04), ARMS, strict=True):
        spreads = [record["by_labelled"][str(n)]["final_quality"][arm] for n in counts]
        means = np.array([s.get("mean", np.nan) for s in spreads], dtype=float)
        low = means - np.array([s.get("min", np.nan) for s in spreads], dtype=float)
        high = np.array([s.get("max", np.nan) for s in spreads], dtype=float) - means
        x = np.array(counts, dtype=float) * (1 + offset)
        ax.errorbar(x, means, yerr=[low, high], color=COLOURS[arm], marker="o", capsize=3,
                    label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("held-out mean Dice at the plateau")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, labelled_png)
