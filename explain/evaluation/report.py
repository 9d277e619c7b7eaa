"""Evaluation results as JSON, Markdown tables and PNG plots.

Takes the frozen result objects of the protocols (``explain.evaluation.*``) and writes them into
one output folder: ``<name>.json`` (everything, machine-readable),
``<name>.md`` (the tables a person reads) and PNG plots (deletion/insertion
curves, the randomisation cascade).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explain.evaluation import metrics as M
from explain.evaluation.cost import CostResult
from explain.evaluation.faithfulness import CurveSet, FaithfulnessResult
from explain.evaluation.localization import LocalisationResult
from explain.evaluation.sanity import SANITY_PASS_SPEARMAN, SanityResult
from gallery.accuracy import TopKAccuracy


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy arrays and scalars -> plain JSON types (NaN/inf -> None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, M.Curve):
            out["auc"] = obj.auc
        return out
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------- faithfulness


def curve_summary(curves: Sequence[CurveSet]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(method, side, baseline) -> means over pairs (and random repeats).

    ``deletion``/``insertion``: AUC of the held-norm similarity; ``deletion_mean``:
    the deletion AUC divided by its fraction range (for truncated curves);
    ``*_cos``: the same AUCs of the plain cosine; ``start``: the unperturbed similarity.
    """
    groups: dict[tuple[str, str, str], list[CurveSet]] = defaultdict(list)
    for c in curves:
        groups[(c.method, c.side, c.baseline)].append(c)
    out = {}
    for key, cs in groups.items():
        ins = [c for c in cs if c.insertion is not None]
        out[key] = {
            "deletion": float(np.mean([c.deletion.auc for c in cs])),
            "deletion_mean": float(np.mean([c.deletion.mean_score for c in cs])),
            "insertion": float(np.mean([c.insertion.auc for c in ins])) if ins else None,
            "deletion_cos": float(
                np.mean([M.auc(c.deletion.fractions, c.deletion_cosine) for c in cs])
            ),
            "insertion_cos": float(
                np.mean([M.auc(c.insertion.fractions, c.insertion_cosine) for c in ins])
            )
            if ins
            else None,
            "start": float(np.mean([c.deletion.scores[0] for c in cs])),
            "max_fraction": float(cs[0].deletion.fractions[-1]),
            "n": len(cs),
        }
    return out


def _random_side(side: str) -> str:
    return "random" if side == "positive" else "random-"


def beats_random(curves: Sequence[CurveSet]) -> dict[tuple[str, str, str], float]:
    """(method, side, baseline) -> fraction of pairs whose deletion curve beats the pair's
    random orders: lower mean similarity on the positive side, higher on the negative."""
    random_score: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for c in curves:
        if c.method == "random":
            random_score[(c.pair, c.side, c.baseline)].append(c.deletion.mean_score)
    wins: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    for c in curves:
        ref_scores = random_score.get((c.pair, _random_side(c.side), c.baseline))
        if c.method == "random" or not ref_scores:
            continue
        ref = float(np.mean(ref_scores))
        score = c.deletion.mean_score
        wins[(c.method, c.side, c.baseline)].append(
            score < ref if c.side == "positive" else score > ref
        )
    return {k: float(np.mean(v)) for k, v in wins.items()}


def faithfulness_markdown(result: FaithfulnessResult) -> str:
    summary = curve_summary(result.curves)
    wins = beats_random(result.curves)
    baselines = sorted({c.baseline for c in result.curves})
    methods = list(dict.fromkeys(c.method for c in result.curves if c.method != "random"))
    pairs = sorted({c.pair for c in result.curves})
    neg_range = next(
        (v["max_fraction"] for (m, side, _), v in summary.items() if side == "random-"), None
    )
    start = float(
        np.mean([v["start"] for (m, side, _), v in summary.items() if side == "random"] or [0])
    )
    parts = [
        "## Faithfulness: deletion / insertion of the held-norm pair similarity",
        "",
        f"{len(pairs)} pairs ({', '.join(pairs)}), {result.steps} steps, {result.n_random} "
        f"random orders per pair; mean unperturbed similarity {start:.3f}. "
        "`del+`/`ins+`: AUC of the similarity over the fraction of query pixels removed/restored, "
        "most similar first (deletion should be LOWER and insertion HIGHER than random). "
        f"`del−`: mean similarity while the most DISSIMILAR pixels are removed, over the first "
        f"{_fmt(neg_range, 2)} of the pixels (it should RISE: higher than random). "
        "`win` = fraction of pairs beating that pair's random orders.",
        "",
    ]
    header = ["method"]
    for b in baselines:
        header += [f"del+ {b}", f"ins+ {b}", f"win+ {b}", f"del− {b}", f"win− {b}"]
    header += ["infidelity", "max-sens", "s/map"]
    rows = []
    for method in ["random", *methods]:
        row = [method]
        for b in baselines:
            if method == "random":
                s = summary.get(("random", "random", b), {})
                n = summary.get(("random", "random-", b), {})
                row += [
                    _fmt(s.get("deletion")),
                    _fmt(s.get("insertion")),
                    "",
                    _fmt(n.get("deletion_mean")),
                    "",
                ]
                continue
            pos = summary.get((method, "positive", b), {})
            neg = summary.get((method, "negative", b), {})
            row += [
                _fmt(pos.get("deletion")),
                _fmt(pos.get("insertion")),
                _fmt(wins.get((method, "positive", b)), 2),
                _fmt(neg.get("deletion_mean")),
                _fmt(wins.get((method, "negative", b)), 2),
            ]
        inf = result.infidelity.get(method, {})
        sen = {k: v for k, v in result.sensitivity.get(method, {}).items() if math.isfinite(v)}
        sec = result.seconds.get(method, {})
        row += [
            _fmt(float(np.mean(list(inf.values()))) if inf else None, 4),
            _fmt(float(np.mean(list(sen.values()))) if sen else None),
            _fmt(float(np.mean(list(sec.values()))) if sec else None, 2),
        ]
        rows.append(row)
    parts.append(_table(header, rows))
    if result.errors:
        parts += [
            "",
            "Skipped methods: " + "; ".join(f"{m} ({e})" for m, e in result.errors.items()),
        ]
    return "\n".join(parts) + "\n"


def plot_curves(
    result: FaithfulnessResult, out_dir: Path, prefix: str = "faithfulness"
) -> list[Path]:
    """One PNG per (side, baseline): mean curves over pairs, random orders dashed.

    Positive side: deletion and insertion; negative side: the truncated deletion curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = list(dict.fromkeys(c.method for c in result.curves if c.method != "random"))
    cmap = plt.get_cmap("tab20")
    for side in ("positive", "negative"):
        kinds = ("deletion", "insertion") if side == "positive" else ("deletion",)
        for baseline in sorted({c.baseline for c in result.curves}):
            fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.8), squeeze=False)
            drawn = False
            for ax, kind in zip(axes[0], kinds, strict=True):
                for i, method in enumerate(["random", *methods]):
                    want = _random_side(side) if method == "random" else side
                    cs = [
                        c
                        for c in result.curves
                        if c.method == method
                        and c.side == want
                        and c.baseline == baseline
                        and getattr(c, kind) is not None
                    ]
                    if not cs:
                        continue
                    curve = M.mean_curve([getattr(c, kind) for c in cs])
                    if method == "random":
                        style = {"color": "black", "lw": 2.2, "ls": "--"}
                    else:
                        style = {"color": cmap(i % 20), "lw": 1.3}
                    ax.plot(
                        curve.fractions, curve.scores, label=f"{method} ({curve.auc:.3f})", **style
                    )
                    drawn = True
                verb = "removed" if kind == "deletion" else "restored"
                order = "most similar" if side == "positive" else "most dissimilar"
                ax.set_title(f"{kind}, {order} first, {baseline} baseline", fontsize=10)
                ax.set_xlabel(f"fraction of query pixels {verb}")
                ax.set_ylabel("held-norm pair similarity")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="best", ncol=2)
            fig.tight_layout()
            if drawn:
                path = out_dir / f"{prefix}_{side}_{baseline}.png"
                fig.savefig(path, dpi=110)
                paths.append(path)
            plt.close(fig)
    return paths


# ----------------------------------------------------------------------- sanity


def sanity_markdown(result: SanityResult, threshold: float = SANITY_PASS_SPEARMAN) -> str:
    stages = sorted({s.n_units for s in result.steps})
    methods = list(dict.fromkeys(s.method for s in result.steps))
    by = {(s.method, s.n_units): s for s in result.steps}
    full = len(result.units)
    passed = result.passed(threshold)
    parts = [
        "## Sanity: cascading model-parameter randomisation (top-down)",
        "",
        f"Spearman rank correlation of the signed query maps with the original model's, "
        f"mean over pairs, after randomising the top N of {full} units "
        f"({', '.join(result.units[:4])}, …, {result.units[-1]}); N = 0 is an untouched deep copy. "
        f"Pass (full): |Spearman| after full randomisation < {threshold}; pass (every "
        f"stage): < {threshold} at every randomised stage shown (the map must already change "
        "when only the top units are random).",
        "",
    ]
    strict = result.passed(threshold, every_stage=True)
    header = [
        "method",
        *[f"N={n}" for n in stages],
        "|map| ρ full",
        "SSIM full",
        "pass (full)",
        "pass (every stage)",
    ]
    rows = []
    for m in methods:
        row = [m] + [_fmt(by[(m, n)].spearman) if (m, n) in by else "–" for n in stages]
        last = by.get((m, full))
        row += [
            _fmt(last.spearman_abs) if last else "–",
            _fmt(last.ssim) if last else "–",
            ("yes" if passed.get(m) else "no") if m in passed else "–",
            ("yes" if strict.get(m) else "no") if m in strict else "–",
        ]
        rows.append(row)
    parts.append(_table(header, rows))
    cos = {n: next((s.cosine_mean for s in result.steps if s.n_units == n), None) for n in stages}
    parts += [
        "",
        "Mean pair cosine under the randomised model: "
        + ", ".join(f"N={n}: {_fmt(c)}" for n, c in cos.items()),
    ]
    if result.labels:
        parts += [
            "",
            "### Data randomisation: gallery labels permuted",
            "",
            "Query map towards the centroid of its label before vs after permuting the gallery "
            "labels (mean over permutations). Low agreement = the map depends on the label's members.",
            "",
            _table(
                ["method", "Spearman", "|map| Spearman", "SSIM", "permutations"],
                [
                    [
                        r.method,
                        _fmt(r.spearman),
                        _fmt(r.spearman_abs),
                        _fmt(r.ssim),
                        str(r.n_permutations),
                    ]
                    for r in result.labels
                ],
            ),
        ]
    if result.errors:
        parts += [
            "",
            "Skipped methods: " + "; ".join(f"{m} ({e})" for m, e in result.errors.items()),
        ]
    return "\n".join(parts) + "\n"


def plot_cascade(result: SanityResult, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(dict.fromkeys(s.method for s in result.steps)):
        pts = sorted((s.n_units, s.spearman) for s in result.steps if s.method == m)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=cmap(i % 20), label=m
        )
    ax.axhline(SANITY_PASS_SPEARMAN, color="black", ls="--", lw=1)
    ax.set_xlabel("units randomised, top-down")
    ax.set_ylabel("Spearman with the original map")
    ax.set_ylim(-0.6, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "sanity_cascade.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------- localisation


def localisation_markdown(result: LocalisationResult) -> str:
    regions = list(next(iter(result.iou.values()), {}).keys())
    header = ["method"] + [f"{r} IOU / IOU*" for r in regions] + [f"{r} energy" for r in regions]
    rows = []
    for m in result.iou:
        rows.append(
            [m]
            + [f"{_fmt(result.iou[m][r])} / {_fmt(result.iou_star[m][r])}" for r in regions]
            + [_fmt(result.energy[m][r], 2) for r in regions]
        )
    text = [
        f"## Localisation ({result.side} side): maps thresholded at mean + {result.k:g} std vs landmark regions",
        "",
        "Mean over pairs. IOU* weighs each surviving cell by its intensity (weighted Jaccard); "
        "energy = share of the positive attribution inside the region.",
        "",
        _table(header, rows),
    ]
    if result.errors:
        text += [
            "",
            "Skipped methods: " + "; ".join(f"{m} ({e})" for m, e in result.errors.items()),
        ]
    return "\n".join(text) + "\n"


def cost_markdown(result: CostResult) -> str:
    rows = [
        [
            m,
            _fmt(result.seconds[m], 3),
            _fmt(result.cpu_seconds[m], 3),
            _fmt(result.repeat_spearman[m]),
            _fmt(result.noise_spearman[m]),
        ]
        for m in result.seconds
    ]
    text = [
        "## Run time and consistency",
        "",
        f"Median seconds per query map (wall clock, and process CPU time over all threads, "
        f"which stays meaningful on a shared machine); mean pairwise Spearman over {result.repeats} repeats "
        f"(seeded methods get a new seed each repeat); Spearman between the map of the clean "
        f"query and of the query with Gaussian pixel noise (std {result.noise_std:g} levels).",
        "",
        _table(["method", "s/map (wall)", "s/map (CPU)", "repeat ρ", "noise ρ"], rows),
    ]
    if result.errors:
        text += [
            "",
            "Skipped methods: " + "; ".join(f"{m} ({e})" for m, e in result.errors.items()),
        ]
    return "\n".join(text) + "\n"


def accuracy_markdown(result: TopKAccuracy) -> str:
    header = ["", *[f"top-{k}" for k in result.ks]]
    rows = [
        ["macro", *[_fmt(result.macro[k]) for k in result.ks]],
        ["micro", *[_fmt(result.micro[k]) for k in result.ks]],
    ]
    return (
        "## Matching accuracy (GestaltMatcher protocol)\n\n"
        f"{result.n_queries} test images, {result.n_syndromes} syndromes, "
        f"{result.n_missing_in_gallery} test images whose syndrome has no gallery image "
        "(counted as misses). Macro = mean over syndromes of the per-syndrome accuracy.\n\n"
        + _table(header, rows)
        + "\n"
    )


def write_report(
    out_dir: str | Path, name: str, sections: dict[str, Any], markdown: str, header: str = ""
) -> dict[str, Path]:
    """Write ``<name>.json`` (sections) and ``<name>.md`` (header + markdown) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_text(json.dumps(to_jsonable(sections), indent=1))
    md_path.write_text((header + "\n" if header else "") + markdown)
    return {"json": json_path, "markdown": md_path}
