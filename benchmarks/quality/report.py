"""Summaries, markdown tables and figures from a results file (also for a partial one:
only seeds with both inits finished are paired)."""

from __future__ import annotations

from pathlib import Path

from voco_core.evaluation.stats import normalised_auc, paired_difference, spread

from .settings import INITS, MODES

FOCUS_CLASSES = ("spleen", "kidney_right", "kidney_left", "aorta")
"""Small organs at consistent relative positions: where a position prior should help."""


def parse_key(key: str) -> tuple[str, int, int, str]:
    mode, shots, seed, init = key.split("/")
    return mode, int(shots.removesuffix("shot")), int(seed.removeprefix("seed")), init


def run_auc(row: dict) -> float:
    return normalised_auc([p["step"] for p in row["curve"]], [p["mean_dice"] or 0.0
                                                              for p in row["curve"]])


def common_steps(rows: list[dict]) -> list[int]:
    """The curve steps every run in ``rows`` was evaluated at."""
    return sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in rows)))


def points_at(rows: list[dict], step: int) -> list[dict]:
    """Each run's curve point at ``step``."""
    return [next(p for p in r["curve"] if p["step"] == step) for r in rows]


def mean_dice_at(rows: list[dict], step: int) -> list[float]:
    """Each run's mean Dice at ``step`` (a missing value counts 0)."""
    return [p["mean_dice"] or 0.0 for p in points_at(rows, step)]


def summarise(report: dict) -> dict:
    """Per mode and shots: per-step and AUC spreads per init and paired differences
    VoCo - control, per-class differences at the first and last curve step."""
    runs = report.get("runs", {})
    out: dict = {}
    for mode in MODES:
        control, treated = INITS[mode]
        for shots in sorted({parse_key(k)[1] for k in runs if parse_key(k)[0] == mode}):
            pairs = {}
            for key, row in runs.items():
                m, s, seed, init = parse_key(key)
                if m == mode and s == shots:
                    pairs.setdefault(seed, {})[init] = row
            seeds = sorted(seed for seed, p in pairs.items() if control in p and treated in p)
            if not seeds:
                continue
            a = [pairs[s][treated] for s in seeds]
            b = [pairs[s][control] for s in seeds]
            steps = common_steps(a + b)
            per_step = {}
            for step in steps:
                va, vb = mean_dice_at(a, step), mean_dice_at(b, step)
                per_step[str(step)] = {treated: spread(va), control: spread(vb),
                                       "difference": paired_difference(va, vb)}
            auc_a, auc_b = [run_auc(r) for r in a], [run_auc(r) for r in b]
            per_class = {}
            for step in sorted({steps[0], steps[-1]}):
                ca, cb = points_at(a, step), points_at(b, step)
                rows = {}
                for name in ca[0]["class_dice"]:
                    pa = [p["class_dice"].get(name) for p in ca]
                    pb = [p["class_dice"].get(name) for p in cb]
                    keep = [i for i in range(len(pa)) if pa[i] is not None and pb[i] is not None]
                    rows[name] = {treated: spread([pa[i] for i in keep]),
                                  control: spread([pb[i] for i in keep]),
                                  "difference": paired_difference([pa[i] for i in keep],
                                                                  [pb[i] for i in keep])}
                per_class[str(step)] = rows
            out[f"{mode}/{shots}shot"] = {
                "mode": mode, "shots": shots, "control": control, "treated": treated,
                "seeds": seeds, "steps": steps, "per_step": per_step,
                "auc": {treated: spread(auc_a), control: spread(auc_b),
                        "difference": paired_difference(auc_a, auc_b)},
                "per_class": per_class}
    return out


def treated_versus(report: dict, other: dict, other_name: str) -> list[str]:
    """Markdown rows: this file's VoCo runs minus ``other``'s VoCo runs of the same
    mode, shots and seed (e.g. a pretraining lever against the default pretraining),
    per curve step and AUC; seeds present in both only."""
    lines = []
    for mode in MODES:
        treated = INITS[mode][1]
        mine, theirs = ({(m, s, seed): row for key, row in r.get("runs", {}).items()
                         for m, s, seed, init in [parse_key(key)]
                         if m == mode and init == treated} for r in (report, other))
        common = sorted(set(mine) & set(theirs))
        if not common:
            continue
        a, b = [mine[k] for k in common], [theirs[k] for k in common]
        title = "Frozen-encoder probe" if mode == "probe" else "Full finetuning"
        lines += [f"**{title}: VoCo here - VoCo of {other_name}** ({len(common)} paired seeds)",
                  "", "| step | here | there | here - there: mean [95% t CI] (bootstrap CI), "
                  "wins |", "| --- | --- | --- | --- |"]
        for step in common_steps(a + b):
            va, vb = mean_dice_at(a, step), mean_dice_at(b, step)
            lines.append(f"| {step} | {spread(va)['mean']:.3f} | {spread(vb)['mean']:.3f} | "
                         f"{_ci(paired_difference(va, vb))} |")
        auc_a, auc_b = [run_auc(r) for r in a], [run_auc(r) for r in b]
        lines += [f"| AUC (normalised) | {spread(auc_a)['mean']:.3f} | "
                  f"{spread(auc_b)['mean']:.3f} | {_ci(paired_difference(auc_a, auc_b))} |", ""]
    return lines


# ---------------------------------------------------------------- markdown


def _ci(d: dict) -> str:
    if d.get("n", 0) < 2:
        return f"{d.get('mean', float('nan')):+.3f} (n = {d.get('n', 0)})"
    return (f"{d['mean']:+.3f} [{d['ci95_t'][0]:+.3f}, {d['ci95_t'][1]:+.3f}] "
            f"(boot. [{d['ci95_bootstrap'][0]:+.3f}, {d['ci95_bootstrap'][1]:+.3f}]), "
            f"{d['wins']}/{d['n']}")


def markdown(report: dict) -> str:
    """The results part of docs/benchmarks.md ("Quality") for this results file:
    status, pretraining, positions, per-setting tables and the verdict on the targets."""
    lines = [status_line(report), ""]
    pre = report.get("pretraining")
    if pre:
        lines += [f"Pretraining: {pre['steps']} steps, loss {pre['loss_first_mean']} (mean of "
                  f"the first {pre['loss_window']}) -> {pre['loss_last_mean']} (last "
                  f"{pre['loss_window']}), median {pre['median_s_per_step']} s/step.", ""]
    for s in report.get("summary", {}).values():
        lines += setting_tables(s)
    pos = report.get("positions")
    if pos:
        last = pos["pretrained"][str(max(int(k) for k in pos["pretrained"]))]
        rows = [("chance 1/K", pos["chance_top1"], pos["chance_top1"]),
                ("constant prior", pos["prior"]["top1"], pos["prior"]["top1"]),
                ("raw-intensity cosine", pos["raw_cosine"]["same_volume"]["top1"],
                 pos["raw_cosine"]["cross_volume"]["top1"]),
                ("random init (mean)", pos["random_init_mean"]["same_volume"]["top1"],
                 pos["random_init_mean"]["cross_volume"]["top1"]),
                ("VoCo, last step", last["same_volume"]["top1"], last["cross_volume"]["top1"])]
        lines += [f"Held-out positions, top-1 ({pos['n_per_protocol']} sub-volumes per "
                  "protocol):", "", "| model | same-volume | cross-volume |",
                  "| --- | --- | --- |"]
        lines += [f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in rows] + [""]
    if report.get("plateau", {}).get("final_quality"):
        lines += plateau_tables(report["plateau"])
    lines += targets(report.get("summary", {}), report.get("plateau"))
    return "\n".join(lines)


def plateau_tables(record: dict) -> list[str]:
    """Section ``plateau`` (a ``voco compare`` record): both readings, per class."""
    final, efficiency = record["final_quality"], record["efficiency"]
    pairs = final["difference"].get("n", 0)
    lines = [f"**Full finetuning at the plateau** (`voco compare`: {record['folds']} folds x "
             f"{record['seeds']} seeds = {pairs} pairs, {record['total_steps']} steps, "
             f"held-out Dice every {record['val_every']}; plateau = mean of the last "
             "3 validations)", "", record.get("headline", ""), "",
             "| arm | plateau Dice: mean ± std | curve flattened | classes still moving |",
             "| --- | --- | --- | --- |"]
    for arm in ("scratch", "voco"):
        flat = record["flattened"][arm]
        if flat["mean_change"] is None:  # fewer than 6 validations
            verdict, moving = "too few validations to tell", "-"
        else:
            verdict = (f"{'yes' if flat['flat'] else 'no'} (mean change "
                       f"{flat['mean_change']:+.3f})")
            moving = ", ".join(flat["classes_not_flat"]) or "-"
        lines.append(f"| {arm} | {final[arm]['mean']:.3f} ± {final[arm]['std']:.3f} | "
                     f"{verdict} | {moving} |")
    saved = efficiency["steps_saved_by_voco"]
    lines += ["", f"VoCo - scratch, final quality: {_ci(final['difference'])}. Efficiency "
              f"(steps to {efficiency['fraction_of_scratch_plateau']:.0%} of scratch's "
              f"plateau): scratch {efficiency['steps']['scratch']}, VoCo "
              f"{efficiency['steps']['voco']} (never: {efficiency['voco_never_reached']}); "
              f"steps saved by VoCo {_ci(saved) if saved.get('n') else 'n/a'}.", "",
              "| class | scratch | VoCo | VoCo - scratch [95% t CI] (bootstrap CI), wins |",
              "| --- | --- | --- | --- |"]
    for cls, row in final["per_class"].items():
        bold = "**" if cls in FOCUS_CLASSES else ""
        lines.append(f"| {bold}{cls}{bold} | {row['scratch'].get('mean', float('nan')):.3f} | "
                     f"{row['voco'].get('mean', float('nan')):.3f} | "
                     f"{_ci(row['difference'])} |")
    return [*lines, ""]


def status_line(report: dict) -> str:
    runs = report.get("runs", {})
    settings = report.get("settings", {})
    planned = (len(settings.get("shots", [])) * settings.get("seeds", 0) * 2 *
               sum(m in settings.get("sections", []) for m in MODES))
    timings = report.get("timings_s", {})
    load = report.get("machine", {}).get("loadavg_at_start")
    state = ("finished" if report.get("status") == "finished"
             else f"partial ({len(runs)} of {planned} finetuning runs)")
    total = timings.get("total")
    return (f"Status: {state}; started {report.get('started_at', '?')}"
            + (f", {total / 60:.1f} min" if total else "")
            + (f", load average at start {load}" if load else "") + ".")


def setting_tables(s: dict) -> list[str]:
    t, c = s["treated"], s["control"]
    title = "Frozen-encoder probe" if s["mode"] == "probe" else "Full finetuning"
    lines = [f"**{title}, {s['shots']} labelled phantoms, {len(s['seeds'])} paired "
             f"seeds** (held-out mean Dice, 10 classes)", "",
             f"| step | {c}: mean ± std | VoCo: mean ± std | VoCo - {c}: mean [95% t CI] "
             "(bootstrap CI), wins |", "| --- | --- | --- | --- |"]
    for step, row in s["per_step"].items():
        lines.append(f"| {step} | {row[c]['mean']:.3f} ± {row[c]['std']:.3f} | "
                     f"{row[t]['mean']:.3f} ± {row[t]['std']:.3f} | "
                     f"{_ci(row['difference'])} |")
    auc = s["auc"]
    lines.append(f"| AUC (normalised) | {auc[c]['mean']:.3f} ± {auc[c]['std']:.3f} | "
                 f"{auc[t]['mean']:.3f} ± {auc[t]['std']:.3f} | {_ci(auc['difference'])} |")
    lines.append("")
    last = s["per_class"][str(s["steps"][-1])]
    lines += [f"Per class at step {s['steps'][-1]} ({title.lower()}; bold: the small "
              "organs a position prior should help):", "",
              f"| class | {c} | VoCo | VoCo - {c} [95% t CI], wins |", "| --- | --- | --- | --- |"]
    for cls, row in last.items():
        bold = "**" if cls in FOCUS_CLASSES else ""
        lines.append(f"| {bold}{cls}{bold} | {row[c].get('mean', float('nan')):.3f} | "
                     f"{row[t].get('mean', float('nan')):.3f} | {_ci(row['difference'])} |")
    return [*lines, ""]


def targets(summary: dict, plateau: dict | None = None) -> list[str]:
    """One line per target: met or not, with the numbers it was judged on."""
    lines = []
    if plateau and plateau.get("final_quality"):
        d = plateau["final_quality"]["difference"]
        flat = all(plateau["flattened"][arm]["flat"] for arm in ("scratch", "voco"))
        lines.append(f"- Target {'MET' if d.get('ci_above_zero') and flat else 'NOT met'}: "
                     "full finetuning at the plateau: VoCo > scratch with the 95% intervals "
                     f"above 0, both arms flattened — measured {_ci(d)}, "
                     f"{'flattened' if flat else 'not flattened (train longer)'}.")
    for s in summary.values():
        if s["mode"] == "probe":
            d = s["per_step"][str(s["steps"][-1])]["difference"]
            goal = f"probe ({s['shots']} phantoms): VoCo > random init at step {s['steps'][-1]}"
            checks = [d, s["auc"]["difference"]]
        else:
            early = s["steps"][: max(1, len(s["steps"]) // 2)]
            goal = (f"full finetuning ({s['shots']} phantoms): VoCo >= scratch at the early "
                    f"steps {', '.join(map(str, early))}")
            checks = [s["per_step"][str(x)]["difference"] for x in early]
        met = all(c.get("ci_above_zero") for c in checks)
        shown = "; ".join(_ci(c) for c in checks)
        lines.append(f"- Target {'MET' if met else 'NOT met'}: {goal} with the 95% interval "
                     f"above 0 — measured {shown}.")
    return lines


# ---------------------------------------------------------------- figures


def plot_curves(report: dict, out: Path) -> Path | None:
    """Per setting: mean held-out Dice vs finetuning step per init (thin: seeds), and
    the paired difference with its 95% t interval."""
    from matplotlib.figure import Figure

    summary = report.get("summary", {})
    if not summary:
        return None
    fig = Figure(figsize=(4.2 * len(summary), 6.2), constrained_layout=True)
    axes = fig.subplots(2, len(summary), squeeze=False)
    for col, s in enumerate(summary.values()):
        top, bottom = axes[0][col], axes[1][col]
        steps = s["steps"]
        for init, colour in ((s["control"], "C7"), (s["treated"], "C0")):
            for key, row in report["runs"].items():
                mode, shots, seed, i = parse_key(key)
                if (mode, shots, i) == (s["mode"], s["shots"], init) and seed in s["seeds"]:
                    top.plot([p["step"] for p in row["curve"]],
                             [p["mean_dice"] or 0.0 for p in row["curve"]],
                             color=colour, lw=0.6, alpha=0.5)
            top.plot(steps, [s["per_step"][str(x)][init]["mean"] for x in steps], "o-",
                     color=colour, lw=2, label=f"{init} (mean of {len(s['seeds'])})")
        top.set_ylim(0, 1)
        top.set_title(f"{'probe (frozen encoder)' if s['mode'] == 'probe' else 'full finetuning'}"
                      f", {s['shots']} phantoms", fontsize=9)
        top.set_ylabel("held-out mean Dice")
        top.legend(fontsize=7)
        diff = [s["per_step"][str(x)]["difference"] for x in steps]
        bottom.axhline(0, color="k", lw=0.8)
        bottom.plot(steps, [d["mean"] for d in diff], "o-", color="C3",
                    label=f"VoCo - {s['control']}")
        if len(s["seeds"]) > 1:
            bottom.fill_between(steps, [d["ci95_t"][0] for d in diff],
                                [d["ci95_t"][1] for d in diff], color="C3", alpha=0.2,
                                label="95% t interval")
        bottom.set_xlabel("finetuning step")
        bottom.set_ylabel("paired Dice difference")
        bottom.legend(fontsize=7)
    fig.savefig(out, dpi=100)
    return out


def plot_classes(report: dict, out: Path) -> Path | None:
    """Paired per-class difference (VoCo - control) at the last step, with 95% t CI."""
    import numpy as np
    from matplotlib.figure import Figure

    summary = report.get("summary", {})
    if not summary:
        return None
    fig = Figure(figsize=(9, 3.4), constrained_layout=True)
    ax = fig.add_subplot()
    width = 0.8 / len(summary)
    names = None
    for i, (name, s) in enumerate(summary.items()):
        rows = s["per_class"][str(s["steps"][-1])]
        names = list(rows)
        means = [rows[c]["difference"].get("mean") or 0.0 for c in names]
        low = [rows[c]["difference"].get("ci95_t", [None])[0] for c in names]
        high = [rows[c]["difference"].get("ci95_t", [None, None])[1] for c in names]
        x = np.arange(len(names)) + (i - (len(summary) - 1) / 2) * width
        ax.bar(x, means, width, color=f"C{i}", label=f"{name} (step {s['steps'][-1]})")
        if all(v is not None for v in low + high):
            ax.errorbar(x, means, yerr=[np.subtract(means, low), np.subtract(high, means)],
                        fmt="none", ecolor="k", capsize=2, lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    ax.set_ylabel("VoCo - control Dice (paired)")
    ax.set_title("Per-class paired Dice difference on held-out phantoms (95% t interval)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=100)
    return out


def plot_positions(report: dict, out: Path) -> Path | None:
    """Held-out top-1 per protocol against pretraining step, with the baselines."""
    from matplotlib.figure import Figure

    pos = report.get("positions")
    if not pos:
        return None
    fig = Figure(figsize=(5, 3.3), constrained_layout=True)
    ax = fig.add_subplot()
    kept = sorted(int(s) for s in pos["pretrained"])
    for protocol, colour in (("same_volume", "C0"), ("cross_volume", "C3")):
        ax.plot(kept, [pos["pretrained"][str(s)][protocol]["top1"] for s in kept], "o-",
                color=colour, label=protocol.replace("_", "-"))
        ax.axhline(pos["raw_cosine"][protocol]["top1"], color=colour, ls=":", lw=1,
                   label=f"raw cosine, {protocol.split('_')[0]}")
    ax.axhline(pos["prior"]["top1"], color="0.5", ls="--", lw=1, label="constant prior")
    ax.axhline(pos["chance_top1"], color="0.7", ls="-.", lw=1, label="chance 1/K")
    ax.set_xlabel("pretraining step (0 = random init)")
    ax.set_ylabel("held-out top-1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(out, dpi=100)
    return out


def write_figures(report: dict, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = [plot_curves(report, folder / f"{stem}_curves.png"),
            plot_classes(report, folder / f"{stem}_classes.png"),
            plot_positions(report, folder / f"{stem}_positions.png")]
    if report.get("plateau", {}).get("final_quality"):  # voco compare's own two figures
        from voco_core.evaluation.figures import plot_comparison

        made += [folder / f"{stem}_plateau_curves.png", folder / f"{stem}_plateau_classes.png"]
        plot_comparison(report["plateau"], made[-2], made[-1])
    return [p for p in made if p is not None]
