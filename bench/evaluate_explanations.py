"""The explanation evaluation of issue 7 on the real photo pairs, with fixed settings.

    .venv/bin/python -m bench.evaluate_explanations --out /tmp/phenolens-eval         # done-when run
    .venv/bin/python -m bench.evaluate_explanations --quick --out /tmp/phenolens-eval-quick

Runs ``phenolens evaluate`` (as a subprocess: bench never imports the server)
for EVERY method of the explain family with SFace: faithfulness (deletion and
insertion curves with blur and mean baselines against random orders, the
negative side, captum infidelity and max-sensitivity) with localisation (IOU and
IOU* per region) on the same maps, the sanity checks (cascading randomisation
and label permutation), and run time/consistency. Each protocol writes JSON,
Markdown and PNG into its own folder under ``--out``; ``report.md`` in each
folder holds the tables.

The expensive methods run with smaller budgets than their interactive defaults
so that the whole evaluation fits a shared 2-core CPU; they are listed in
``METHOD_OPTIONS`` and written into every report's command line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHOD_OPTIONS = (
    "scorecam.channels=32",
    "occlusion.patch=16",
    "occlusion.stride=16",
    "rise.masks=64",
    "integrated_gradients.steps=8",
    "smoothgrad.samples=4",
)

FULL = {
    "faithfulness": [
        "faithfulness,localization",
        "--max-pairs",
        "3",
        "--steps",
        "6",
        "--random-orders",
        "2",
        "--perturb-samples",
        "2",
        "--sensitivity-pairs",
        "1",
    ],
    "sanity": [
        "sanity",
        "--sanity-pairs",
        "2",
        "--stages",
        "3,10,all",
        "--label-permutations",
        "5",
    ],
    "cost": ["cost", "--max-pairs", "1", "--repeats", "2"],
}
QUICK = {
    "faithfulness": [
        "faithfulness,localization",
        "--max-pairs",
        "1",
        "--steps",
        "4",
        "--random-orders",
        "1",
        "--perturb-samples",
        "2",
        "--sensitivity-pairs",
        "1",
        "--methods",
        "similarity,gradcam,occlusion",
    ],
    "sanity": [
        "sanity",
        "--sanity-pairs",
        "1",
        "--stages",
        "0,all",
        "--label-permutations",
        "2",
        "--methods",
        "similarity,gradcam,saliency",
    ],
    "cost": ["cost", "--max-pairs", "1", "--repeats", "2", "--methods", "similarity,gradcam"],
}


def commands(out: Path, quick: bool) -> list[list[str]]:
    options = [arg for opt in METHOD_OPTIONS for arg in ("--option", opt)]
    preset = QUICK if quick else FULL
    return [
        [sys.executable, "-m", "server.cli", "evaluate", *args, *options, "--out", str(out / name)]
        for name, args in preset.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.evaluate_explanations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="three methods, one pair")
    parser.add_argument("--only", help="comma-separated subset of faithfulness,sanity,cost")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else set(FULL)
    status = 0
    for cmd in commands(args.out, args.quick):
        name = Path(cmd[-1]).name
        if name not in wanted:
            continue
        print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        status |= subprocess.run(cmd, cwd=REPO).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
