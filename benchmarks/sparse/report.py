"""Summaries, markdown, the summary line and the figure of a sparse-label results file.

Run keys are the quality benchmark's (:func:`quality.runs.run_key`) with the effort
in the mode's place: ``k3/2shot/seed0/voco`` (3 annotated axial slices per phantom)
or ``whole/2shot/seed0/scratch`` (every slice). A run's Dice is the held-out mean
Dice at its plateau under the ``plateau`` protocol (``voco compare``'s reading: the
mean of the last 3 validations), of its last validation under the ``recorded`` one
(files written before the protocols were named).

"Fraction of the whole-volume Dice" is paired too: for seed ``s`` and init ``i``,
``dice(k, s, i) / dice(whole, s, i)``; the effort that reaches a target fraction is
read off the mean fractions, interpolated linearly in log(slices) between the two
measured efforts around it (the whole volume counts as all its axial slices).
"""

from __future__ import annotations

import math
from pathlib import Path

from voco_core.evaluation.compare import flatness, plateau
from voco_core.evaluation.stats import paired_difference, spread, t_interval

EFFORT_WHOLE = "whole"
INITS = ("scratch", "voco")
TARGET = 0.9  # the fraction of the whole-volume Dice the reading is about


def parse_key(key: str) -> tuple[str, int, str]:
    """``"k3/2shot/seed0/voco"`` -> ``("k3", 0, "voco")``."""
    effort, _shots, seed, init = key.split("/")
    return effort, int(seed.removeprefix("seed")), init


def effort_labels(report: dict) -> list[str]:
    return [e if e == EFFORT_WHOLE else f"k{e}" for e in report.get("efforts", [])]


def slices_of(effort: str, axial_slices: int) -> int:
    """Annotated slices per phantom of an effort label."""
    return axial_slices if effort == EFFORT_WHOLE else int(effort.removeprefix("k"))


def at_plateau(report: dict) -> bool:
    """Whether runs are read at their plateau (the ``plateau`` protocol)."""
    return report.get("settings", {}).get("protocol", "recorded") == "plateau"


def compare_curve(row: dict) -> list[dict]:
    """A run's curve in ``voco compare``'s point format (``step``, ``mean``, ``classes``)."""
    return [{"step": p["step"], "mean": p["mean_dice"], "classes": p.get("class_dice") or {}}
            for p in row.get("curve", []) if p.get("mean_dice") is not None]


def run_dice(report: dict, row: dict) -> float | None:
    """One run's held-out mean Dice: at its plateau, or at its last validation."""
    curve = compare_curve(row)
    if not curve:
        return None
    return round(plateau(curve), 4) if at_plateau(report) else float(curve[-1]["mean"])


def final_dice(report: dict) -> dict[tuple[str, int, str], float]:
    """``(effort, seed, init) -> held-out mean Dice`` of every finished run."""
    out = {}
    for key, row in report.get("runs", {}).items():
        dice = run_dice(report, row)
        if dice is not None:
            out[parse_key(key)] = float(dice)
    return out


def flattened(report: dict) -> dict[str, dict]:
    """``"k3/voco" -> voco compare's flatness`` of each setting's curves over its seeds
    (the mean curve's last validations against those before, overall and per class)."""
    curves: dict[str, list] = {}
    for key, row in report.get("runs", {}).items():
        effort, _, init = parse_key(key)
        curves.setdefault(f"{effort}/{init}", []).append(compare_curve(row))
    out = {}
    for name, group in sorted(curves.items()):
        classes = sorted({c for curve in group for p in curve for c in p["classes"]})
        out[name] = flatness(group, classes)
    return out


def slices_to_reach(points: list[tuple[int, float]], target: float) -> dict:
    """The effort at which a mean fraction first reaches ``target``.

    ``points``: ``(slices, fraction)`` in increasing slices (``None``: not measured, left
    out). Returns ``measured``: the smallest measured effort at or above the target
    (None: none is) and ``estimate``: log-linear interpolation between it and the
    measured effort before (the effort itself when it is the first)."""
    points = [(slices, fraction) for slices, fraction in points if fraction is not None]
    for i, (slices, fraction) in enumerate(points):
        if fraction >= target:
            if i == 0:
                return {"measured": slices, "estimate": float(slices), "below_first": True}
            low_slices, low = points[i - 1]
            share = (target - low) / (fraction - low)
            estimate = math.exp(math.log(low_slices) + share * (
                math.log(slices) - math.log(low_slices)))
            return {"measured": slices, "estimate": round(estimate, 1), "below_first": False}
    return {"measured": None, "estimate": None, "below_first": False}


def summarise(report: dict) -> dict:
    """Per effort and init: Dice spread with a 95% t interval, the paired VoCo - scratch
    difference, and the paired fractions of the whole-volume Dice (of the same init, and
    of scratch's); then the slices needed to reach ``TARGET`` of them."""
    dice = final_dice(report)
    efforts = effort_labels(report)
    axial = report.get("axial_slices", 0)
    seeds = sorted({seed for _, seed, _ in dice})
    complete = [s for s in seeds if all((e, s, i) in dice for e in efforts for i in INITS)]
    per_effort = {}
    for effort in efforts:
        row = {"slices": slices_of(effort, axial)}
        for init in INITS:
            values = [dice[(effort, s, init)] for s in seeds if (effort, s, init) in dice]
            low, high = t_interval(values)
            row[init] = {**spread(values), "ci95_t": [_r(low), _r(high)]}
            for reference in ("own", "scratch"):
                whole_init = init if reference == "own" else "scratch"
                fractions = [dice[(effort, s, init)] / dice[(EFFORT_WHOLE, s, whole_init)]
                             for s in seeds if (effort, s, init) in dice
                             and dice.get((EFFORT_WHOLE, s, whole_init))]
                low, high = t_interval(fractions)
                row[init][f"of_{reference}_whole"] = {**spread(fractions),
                                                      "ci95_t": [_r(low), _r(high)]}
        paired = [s for s in seeds if (effort, s, "voco") in dice and (effort, s, "scratch")
                  in dice]
        row["voco_minus_scratch"] = paired_difference(
            [dice[(effort, s, "voco")] for s in paired],
            [dice[(effort, s, "scratch")] for s in paired])
        row["paired_seeds"] = paired
        per_effort[effort] = row
    reach = {}
    for init in INITS:
        for reference in ("own", "scratch"):
            points = [(per_effort[e]["slices"], per_effort[e][init][f"of_{reference}_whole"].get(
                "mean")) for e in efforts]
            sparse_points = [f for (_, f), e in zip(points, efforts, strict=True)
                             if e != EFFORT_WHOLE and f is not None]
            reach[f"{init}_to_{reference}_whole"] = slices_to_reach(points, TARGET) if (
                sparse_points) else {"measured": None, "estimate": None, "below_first": False,
                                     "not_measured": True}
    return {"seeds": seeds, "complete_seeds": complete, "runs": len(dice),
            "reading": "plateau" if at_plateau(report) else "last validation",
            **({"flattened": flattened(report)} if at_plateau(report) else {}),
            "planned_runs": len(efforts) * len(INITS) * report.get("settings", {}).get(
                "seeds", 0), "target": TARGET, "per_effort": per_effort,
            "slices_to_reach_target": reach}


def _r(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _mean_ci(d: dict) -> str:
    if not d.get("n"):
        return "-"
    low, high = d.get("ci95_t", [None, None])
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
    return f"{d['mean']:.3f}{ci}"


def _reach(d: dict, axial: int) -> str:
    if d.get("not_measured"):
        return "not measured yet"
    if d["measured"] is None:
        return "not reached"
    if d["below_first"]:
        return f"<= {d['measured']}"
    if d["measured"] == axial:
        return f"~{d['estimate']:.0f} (between the largest k and the whole volume)"
    return f"~{d['estimate']:.1f}"


def markdown(report: dict) -> str:
    """The docs table: Dice per effort and init, the paired difference, the fractions."""
    s = report["summary"]
    axial = report.get("axial_slices", 0)
    reading = ("at the plateau (mean of the last 3 validations)" if at_plateau(report)
               else "at the last step")
    lines = [
        f"{len(s['complete_seeds'])} complete paired seeds ({s['runs']} of "
        f"{s['planned_runs']} runs); Dice = held-out mean Dice, 10 classes, {reading}; "
        "[95% t interval over seeds]",
        "",
        "| annotated axial slices per phantom | from scratch | VoCo backbone | "
        "VoCo - scratch (wins) | scratch: % of its whole-volume Dice | "
        "VoCo: % of its whole-volume Dice |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for effort, row in s["per_effort"].items():
        label = f"whole ({axial})" if effort == EFFORT_WHOLE else str(row["slices"])
        d = row["voco_minus_scratch"]
        diff = "-" if not d.get("n") else (
            f"{d['mean']:+.3f} [{d['ci95_t'][0]:+.3f}, {d['ci95_t'][1]:+.3f}] "
            f"({d['wins']}/{d['n']})" if d["n"] > 1 else f"{d['mean']:+.3f} (1 seed)")
        fractions = []
        for init in INITS:
            f = row[init]["of_own_whole"]
            fractions.append("-" if not f.get("n") else f"{100 * f['mean']:.0f}%")
        lines.append(f"| {label} | {_mean_ci(row['scratch'])} | {_mean_ci(row['voco'])} | "
                     f"{diff} | {fractions[0]} | {fractions[1]} |")
    reach = s["slices_to_reach_target"]
    pct = f"{100 * s['target']:.0f}%"
    lines += [
        "",
        f"Slices per phantom to reach {pct} of the whole-volume Dice (mean fractions, "
        "log-interpolated): from scratch "
        f"{_reach(reach['scratch_to_own_whole'], axial)}, with VoCo "
        f"{_reach(reach['voco_to_own_whole'], axial)}; to reach {pct} of *scratch's* "
        f"whole-volume Dice, VoCo needs {_reach(reach['voco_to_scratch_whole'], axial)}.",
    ]
    if "flattened" in s:
        rising = {name: f for name, f in s["flattened"].items() if not f["flat"]}
        untold = [name for name, f in rising.items() if f["mean_change"] is None]
        moving = {name: f for name, f in rising.items() if name not in untold}
        parts = [f"{name} (mean {f['mean_change']:+.3f}, classes "
                 f"{', '.join(f['classes_not_flat']) or 'none'})"
                 for name, f in moving.items()]
        if untold:
            parts.append(f"{', '.join(untold)}: too few validations to tell (6 needed)")
        lines += ["", "Flattened (last 3 validations within 0.01 Dice of the 3 before, "
                  "overall and per class): " + (
                      "every setting." if not rising else "not yet: " + "; ".join(parts)
                      + ".")]
    return "\n".join(lines)


def summary_line(report: dict) -> str:
    s = report["summary"]
    efforts = list(s["per_effort"])

    def dice_row(init):
        return "/".join("-" if not s["per_effort"][e][init].get("n") else
                        f"{s['per_effort'][e][init]['mean']:.3f}" for e in efforts)

    reach = s["slices_to_reach_target"]
    axial = report.get("axial_slices", 0)
    return (f"sparse_bench: {len(s['complete_seeds'])} complete paired seeds ({s['runs']} of "
            f"{s['planned_runs']} runs), Dice at "
            f"{'/'.join(e.removeprefix('k') for e in efforts)} slices: scratch "
            f"{dice_row('scratch')}, VoCo {dice_row('voco')}; slices per phantom for "
            f"{100 * s['target']:.0f}% of the whole-volume Dice: scratch "
            f"{_reach(reach['scratch_to_own_whole'], axial)}, VoCo "
            f"{_reach(reach['voco_to_own_whole'], axial)}")


def plot_dice_vs_slices(report: dict, out: Path) -> Path | None:
    """Held-out Dice against annotated slices per phantom (log axis, the whole volume at
    its slice count), per init: mean with its 95% t interval, thin lines per seed, and
    the target fraction of each init's whole-volume Dice."""
    from matplotlib.figure import Figure

    s = report.get("summary", {})
    if not s or not s["runs"]:
        return None
    dice = final_dice(report)
    efforts = list(s["per_effort"])
    axial = report.get("axial_slices", 0)
    xs = [s["per_effort"][e]["slices"] for e in efforts]
    fig = Figure(figsize=(5.6, 4.0), constrained_layout=True)
    ax = fig.subplots()
    for init, colour, nudge in (("scratch", "C7", 0.96), ("voco", "C0", 1.04)):
        for seed in s["seeds"]:
            points = [(x, dice[(e, seed, init)]) for x, e in zip(xs, efforts, strict=True)
                      if (e, seed, init) in dice]
            if points:
                ax.plot(*zip(*points, strict=True), color=colour, lw=0.6, alpha=0.35)
        rows = [(x * nudge, s["per_effort"][e][init]) for x, e in zip(xs, efforts, strict=True)
                if s["per_effort"][e][init].get("n")]
        if not rows:
            continue
        x = [r[0] for r in rows]
        mean = [r[1]["mean"] for r in rows]
        low = [m - r[1]["ci95_t"][0] if r[1]["ci95_t"][0] is not None else 0.0
               for m, r in zip(mean, rows, strict=True)]
        high = [r[1]["ci95_t"][1] - m if r[1]["ci95_t"][1] is not None else 0.0
                for m, r in zip(mean, rows, strict=True)]
        name = "from scratch" if init == "scratch" else "VoCo backbone"
        ax.errorbar(x, mean, yerr=[low, high], fmt="o-", color=colour, lw=2, capsize=3,
                    label=f"{name} (mean, 95% CI, n={max(r[1]['n'] for r in rows)})")
        whole = s["per_effort"].get(EFFORT_WHOLE, {}).get(init, {})
        if whole.get("n"):
            ax.axhline(s["target"] * whole["mean"], color=colour, ls=":", lw=1,
                       label=f"{100 * s['target']:.0f}% of {name}'s whole-volume Dice")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"whole\n({axial})" if e == EFFORT_WHOLE else str(x)
                       for x, e in zip(xs, efforts, strict=True)])
    ax.minorticks_off()
    ax.set_xlabel("annotated axial slices per training phantom")
    ax.set_ylabel("held-out mean Dice (10 classes)")
    settings = report.get("settings", {})
    reading = "read at the plateau" if at_plateau(report) else "read at the last step"
    ax.set_title(f"{settings.get('shots')} labelled phantoms, {settings.get('steps')} "
                 f"finetuning steps, {reading}", fontsize=9)
    ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
