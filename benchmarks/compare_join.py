"""Join the records of one comparison run in parts (``voco compare --first-seed``).

A comparison split over machines or sessions, whose run folders are no longer side by
side (the way ``voco compare`` itself joins parts is to copy the parts' ``runs/`` into
one ``--out``): this joins their ``compare.json`` records instead, and reads both
readings again over all pairs with compare's own :func:`summarise`. The parts must
agree on everything but their seeds (data, preset, steps, validations, overrides,
held-out cases); two parts whose backbones' sha256 differ are refused, and a part that
predates the digest is listed as such in the joined record's ``parts``.

Usage:
    python benchmarks/compare_join.py A/compare.json B/compare.json --out JOINED.json \\
        [--figures PREFIX]   # PREFIX_curves.png, PREFIX_classes.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SAME = ("data", "preset", "design", "folds", "labelled", "total_steps", "val_every",
        "overrides", "held_out")
"""Fields every part must share (what makes their runs pairs of one comparison)."""


def join(records: list[dict], names: list[str]) -> dict:
    """One record holding every part's runs, with both readings read anew."""
    from voco_core.evaluation.compare import summarise

    first = records[0]
    for record, name in zip(records[1:], names[1:], strict=True):
        differ = [key for key in SAME if record.get(key) != first.get(key)]
        if differ:
            raise ValueError(f"{name}: {', '.join(differ)} differ(s) from {names[0]}: not "
                             "parts of one comparison")
    digests = {r.get("pretrained_sha256") for r in records} - {None}
    if len(digests) > 1:
        raise ValueError(f"the parts judged different backbones (sha256 {sorted(digests)}): "
                         "their VoCo arms are no pairs of one comparison")
    runs: dict = {}
    for record, name in zip(records, names, strict=True):
        if record.get("status", "finished") != "finished":  # results files may omit it
            raise ValueError(f"{name}: status {record.get('status')!r}, expected 'finished'")
        arms = {}
        for run in record["runs"].values():
            arms.setdefault((run["fold"], run["seed"]), set()).add(run["arm"])
        unpaired = sorted(unit for unit, have in arms.items() if have != {"scratch", "voco"})
        if unpaired:
            raise ValueError(f"{name}: (fold, seed) {unpaired} lack an arm: not pairs")
        shared = sorted(set(runs) & set(record["runs"]))
        if shared:
            raise ValueError(f"{name}: runs {', '.join(shared)} are in another part too")
        runs.update(record["runs"])
    seeds = sorted({r["seed"] for r in runs.values()})
    joined = {key: first[key] for key in first if key in SAME}
    joined.update({
        "parts": [{"file": name, "pretrained": r.get("pretrained"),
                   "pretrained_sha256": r.get("pretrained_sha256", "not recorded"),
                   "seeds": sorted({run["seed"] for run in r["runs"].values()})}
                  for r, name in zip(records, names, strict=True)],
        "seeds": len(seeds), "seed_values": seeds, "status": "finished",
        "runs": dict(sorted(runs.items(), key=lambda kv: (kv[1]["fold"], kv[1]["seed"],
                                                           kv[1]["arm"]))),
    })
    if first.get("design") == "labelled":
        joined["by_labelled"] = {
            str(n): summarise({"runs": {k: r for k, r in joined["runs"].items()
                                        if r.get("labelled") == n}})
            for n in first["labelled"]}
    else:
        joined.update(summarise(joined))
    return joined


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare_join", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+", help="compare.json of each part")
    parser.add_argument("--out", type=Path, required=True, help="the joined record (JSON)")
    parser.add_argument("--figures", type=Path, help="figure prefix: PREFIX_curves.png and "
                        "PREFIX_classes.png (PREFIX_labelled.png for --labelled)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out and the figures if they exist")
    args = parser.parse_args(argv)
    from voco_core.errors import VoCoError
    from voco_core.evaluation.compare import headline
    from voco_core.evaluation.figures import plot_comparison, plot_labelled
    from voco_core.outputs import refuse_existing, write_json

    try:
        records = [json.loads(path.read_text()) for path in args.records]
        joined = join(records, [str(path) for path in args.records])
        figures = []
        if args.figures:
            second = "labelled" if joined.get("design") == "labelled" else "classes"
            figures = [Path(f"{args.figures}_curves.png"), Path(f"{args.figures}_{second}.png")]
        refuse_existing([args.out, *figures], args.overwrite)
    except (OSError, ValueError, KeyError, VoCoError) as err:
        print(f"compare_join: error: {err}", file=sys.stderr)
        return 1
    write_json(args.out, joined)
    if figures:
        plot = plot_labelled if joined.get("design") == "labelled" else plot_comparison
        plot(joined, *figures)
    print(f"{len(joined['runs'])} runs from {len(records)} parts -> {args.out}")
    print(headline(joined))
    return 0


if __name__ == "__main__":
    sys.exit(main())
