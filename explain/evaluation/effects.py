"""``phenolens evaluate effects``: does each map put its mass where the model's own region
effects say the match is decided?

The truth is ``explain.effects`` in pixel mode: for every pair and face, the cosine change
when a region is replaced by the other face's (*differs*) or by the neutral face's
(*alike*). Per method and face the protocol compares the map's mass per region (negative
mass for *differs*, positive mass for *alike*; regions disjoint, ``outside_face`` included)
with the effects:

- Spearman rank correlation over the regions, and top-1 (the map's heaviest region is the
  model's), for *differs* on pairs of different people and *alike* on same-person pairs;
- the L1 distance between the map's shares and the effects' shares (positive part, normed);
- the *words*: the region the served words name first is the model's (the effects'
  ``features`` mode is scored the same way, against the pixel truth);
- the nuisance trap: the query is the gallery face with one region swapped in from another
  person *and* a change the model barely reacts to (a brightened cheek, or a background
  patch from a third photo). The model's share of the nuisance is the cosine regained by
  undoing the nuisance over that regained by undoing either edit; the map's share is its
  negative mass on the nuisance over its negative mass on both. A faithful map's share is
  the model's.

Baselines in the same table: pixel difference (``|q − g|``, no model), region area alone,
and a constant ranking (eyes first). Same-person pairs come from ``same_person`` groups
(sub-folders or a CSV) and, when a folder has too few, from altered copies of each photo
(rotated 6°, zoomed 92 %, darkened): ``--no-variants`` turns that off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.stats import spearmanr

from explain.attribution.catalogue import check_methods
from explain.attribution.engine import Explainer
from explain.attribution.matches import explain_matches
from explain.effects import (
    EFFECT_REGIONS,
    WEIGHTED_KIND,
    NeutralFace,
    edit_masks,
    effect_region_stack,
    paste_region,
    region_effects,
)
from explain.regions import template_regions

log = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("pixel difference", "region area", "constant (eyes)")


def weighted_row(method: str) -> str:
    """The row of ``method``'s map as drawn when a match's effects are measured
    (``explain.effects.WEIGHTED_KIND``, ``PairEffects.weighted``): the method's picture
    inside each region, the model's effect as each region's mass. Its region agreement
    holds by construction (the effects are the truth); its nuisance share does not."""
    return f"{method}, weighted by the effects"

NUISANCES: tuple[str, ...] = ("brightened cheek", "background patch")
TRAP_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth")


@dataclass(frozen=True, eq=False)
class Face:
    """One aligned face of the protocol: a name, a person (None: unknown) and its crop."""

    name: str
    person: str | None
    crop: np.ndarray = field(repr=False)


def variant(crop: np.ndarray, seed: int) -> np.ndarray:
    """An altered copy of an aligned crop (same person): rotated ±6°, zoomed to 92 % and
    darkened (gamma 1.3), as a second photo of the same face would differ."""
    h, w = crop.shape[:2]
    angle = 6.0 if seed % 2 == 0 else -6.0
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 0.92)
    out = cv2.warpAffine(crop, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = 255.0 * (out.astype(np.float32) / 255.0) ** 1.3
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def build_pairs(faces: Sequence[Face], *, max_pairs: int = 30, variants: bool = True
                ) -> tuple[list[tuple[int, int]], list[tuple[Face, Face]]]:
    """(different-person index pairs, same-person face pairs), both deterministic.

    Different: every (i, j), i < j, whose persons differ (or are unknown), spread over the
    faces, at most ``max_pairs``. Same: every pair of one known person's faces, then, when
    ``variants`` and fewer than ``max_pairs``, each face against an altered copy of itself.
    """
    n = len(faces)
    different = [(i, j) for i in range(n) for j in range(i + 1, n)
                 if faces[i].person is None or faces[i].person != faces[j].person]
    if len(different) > max_pairs:
        step = len(different) / max_pairs
        different = [different[int(k * step)] for k in range(max_pairs)]
    same = [(faces[i], faces[j]) for i in range(n) for j in range(i + 1, n)
            if faces[i].person is not None and faces[i].person == faces[j].person]
    if variants:
        for k, f in enumerate(faces):
            if len(same) >= max_pairs:
                break
            same.append((f, Face(f.name + " (altered)", f.person, variant(f.crop, k))))
    return different, same[:max_pairs]


# ---------------------------------------------------------------------------- masses

def masses(aligned_map: np.ndarray, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(negative mass, positive mass) of a signed (H, W) map per region, each (R,)."""
    m = np.asarray(aligned_map, np.float64)
    if m.shape != stack.shape[1:]:
        m = cv2.resize(m.astype(np.float32), stack.shape[1:][::-1],
                       interpolation=cv2.INTER_LINEAR).astype(np.float64)
    neg, pos = np.maximum(-m, 0), np.maximum(m, 0)
    return np.array([neg[r].sum() for r in stack]), np.array([pos[r].sum() for r in stack])


def shares(values: np.ndarray) -> np.ndarray:
    v = np.maximum(np.asarray(values, np.float64), 0)
    total = v.sum()
    return v / total if total > 0 else np.full_like(v, 1.0 / len(v))


FACE = np.array([r != "outside_face" for r in EFFECT_REGIONS])


def agreement(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(Spearman, top-1, L1 of shares) of a per-region score against per-region truth
    (both: larger = more), over the facial regions (the ones the words name; hair and
    background are worded apart). Spearman of a constant vector counts as 0."""
    scores = np.asarray(scores, np.float64)[FACE]
    truth = np.asarray(truth, np.float64)[FACE]
    rho = 0.0 if np.ptp(scores) == 0 or np.ptp(truth) == 0 else float(spearmanr(scores, truth)[0])
    top = float(int(np.argmax(scores)) == int(np.argmax(truth)))
    l1 = float(np.abs(shares(scores) - shares(truth)).sum())
    return rho, top, l1


# ---------------------------------------------------------------------------- trap

def nuisance_edit(crop: np.ndarray, kind: str, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``crop`` with a change the model should barely react to, and its (H, W) bool mask:
    the left cheek brightened by 35 grey levels (feathered), or a 28-pixel square of
    ``other``'s background pasted into the top-left corner."""
    h, w = crop.shape[:2]
    if kind == "brightened cheek":
        cheeks = template_regions((h, w))["cheeks"].copy()
        cheeks[:, w // 2:] = False
        alpha = cv2.GaussianBlur(cheeks.astype(np.float32), (0, 0), 2.0)
        out = crop.astype(np.float32) + 35.0 * alpha[..., None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), 35.0 * alpha >= 0.5  # changed
    side = max(8, round(28 * h / 112))
    out = crop.copy()
    out[2:2 + side, 2:2 + side] = other[2:2 + side, 2:2 + side]
    mask = np.zeros((h, w), bool)
    mask[2:2 + side, 2:2 + side] = True
    return out, mask


@dataclass(frozen=True)
class TrapCase:
    name: str
    nuisance: str
    region: str
    model_share: float
    map_shares: dict[str, float]


def _restore_gain(explainer: Explainer, edited: np.ndarray, original: np.ndarray,
                  masks: Sequence[np.ndarray]) -> list[float]:
    """Per mask: the cosine to ``original`` regained by restoring ``original`` inside it."""
    restored = []
    for m in masks:
        alpha = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.0)
        restored.append(np.clip(np.rint(alpha[..., None] * original
                                        + (1 - alpha[..., None]) * edited), 0, 255).astype(np.uint8))
    feats = explainer.encode(np.stack([edited, *restored]))
    ref = explainer.encode(original)
    cos = np.mean([(_unit(e) @ _unit(r).T)[:, 0].double().numpy()
                   for e, r in zip(feats.embeddings, ref.embeddings, strict=True)], axis=0)
    return [float(c - cos[0]) for c in cos[1:]]


def _unit(e):
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------- protocol

@dataclass
class EffectsResult:
    methods: tuple[str, ...]
    pairs_different: int
    pairs_same: int
    rows: dict[str, dict[str, float]]  # method or baseline -> metric -> mean
    trap: list[TrapCase]
    truth_top: dict[str, dict[str, int]]  # "differs"/"alike" -> region -> times first
    seconds: dict[str, float]
    examples: list[dict] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"methods": list(self.methods), "pairs_different": self.pairs_different,
                "pairs_same": self.pairs_same, "rows": self.rows,
                "trap": [t.__dict__ for t in self.trap], "truth_top": self.truth_top,
                "seconds": self.seconds}


def evaluate_effects(explainer: Explainer, faces: Sequence[Face], methods: Sequence[str],
                     *, neutral: np.ndarray | NeutralFace, max_pairs: int = 30,
                     variants: bool = True, trap_pairs: int = 12,
                     log_line=lambda s: None) -> EffectsResult:
    """Score every method's maps (both faces of each pair) against the region effects."""
    methods = check_methods(methods)
    different, same = build_pairs(faces, max_pairs=max_pairs, variants=variants)
    size = faces[0].crop.shape[:2]
    stack = effect_region_stack(size)
    area = stack.reshape(len(stack), -1).sum(1).astype(np.float64)
    eyes = EFFECT_REGIONS.index("eyes")
    constant = np.where(np.arange(len(EFFECT_REGIONS)) == eyes, 1.0, 0.0)
    scores: dict[str, dict[str, list[float]]] = {}
    seconds = {"effects": 0.0, "features effects": 0.0, **{m: 0.0 for m in methods}}
    truth_top = {"differs": {}, "alike": {}}
    examples: list[dict] = []

    def add(row: str, metric: str, values: tuple[float, float, float]) -> None:
        d = scores.setdefault(row, {})
        for name, v in zip(("spearman", "top1", "l1"), values, strict=True):
            d.setdefault(f"{metric} {name}", []).append(v)

    def run(q_crop, g_crop, kind: str, label: str) -> None:
        q, g = explainer.encode(q_crop), explainer.encode(g_crop)
        t0 = time.perf_counter()
        (truth,) = region_effects(explainer, q, g, neutral=neutral, mode="pixels")
        seconds["effects"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        (fast,) = region_effects(explainer, q, g, neutral=neutral, mode="features")
        seconds["features effects"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        (match,) = explain_matches(explainer, q, g, methods)
        spent = time.perf_counter() - t0
        for m in methods:
            seconds[m] += spent / len(methods)
        for side, crop, other in (("query", q_crop, g_crop), ("gallery", g_crop, q_crop)):
            t = truth.side(side)
            values = np.array(t.differs if kind == "differs" else [-a for a in t.alike])
            top = EFFECT_REGIONS[int(np.argmax(values))]  # hair/background included
            truth_top[kind][top] = truth_top[kind].get(top, 0) + 1
            for method in methods:
                mm = match[method]
                aligned = mm.query_aligned if side == "query" else mm.gallery_aligned
                neg, pos = masses(aligned, stack)
                add(method, kind, agreement(neg if kind == "differs" else pos, values))
                if WEIGHTED_KIND.get(method) == kind:
                    neg, pos = masses(truth.weighted(side, kind, aligned), stack)
                    add(weighted_row(method), kind,
                        agreement(neg if kind == "differs" else pos, values))
            f = fast.side(side)
            fast_values = np.array(f.differs if kind == "differs" else [-a for a in f.alike])
            add("effects, features mode", kind, agreement(fast_values, values))
            face = np.flatnonzero(FACE)
            words = t.ranked(kind, top=1)  # the first facial region the words name
            named = float(bool(words) and words[0][0] == EFFECT_REGIONS[
                face[int(np.argmax(values[face]))]])
            d = scores.setdefault("served words (from the effects)", {})
            d.setdefault(f"{kind} top1", []).append(named)
            if kind == "differs":
                diff = np.abs(crop.astype(np.float64) - other.astype(np.float64)).sum(-1)
                add("pixel difference", kind, agreement(masses(-diff, stack)[0], values))
            add("region area", kind, agreement(area, values))
            add("constant (eyes)", kind, agreement(constant, values))
        if len(examples) < 4:
            examples.append({"label": label, "kind": kind, "query": q_crop, "gallery": g_crop,
                             "maps": {m: match[m].query_aligned for m in methods},
                             "words": truth.query.describe()})

    for n, (i, j) in enumerate(different):
        log_line(f"effects: different {n + 1}/{len(different)} {faces[i].name} / {faces[j].name}")
        run(faces[i].crop, faces[j].crop, "differs", f"{faces[i].name} vs {faces[j].name}")
    for n, (a, b) in enumerate(same):
        log_line(f"effects: same person {n + 1}/{len(same)} {a.name} / {b.name}")
        run(a.crop, b.crop, "alike", f"{a.name} vs {b.name}")
    trap = _trap(explainer, faces, methods, different[:trap_pairs], log_line, neutral)
    rows = {row: {k: float(np.mean(v)) for k, v in d.items()} for row, d in scores.items()}
    for method in [*methods, *(weighted_row(m) for m in methods if WEIGHTED_KIND.get(m) == "differs")]:
        cases = [t.map_shares[method] for t in trap]
        rows.setdefault(method, {})["nuisance share"] = float(np.mean(cases)) if cases else \
            float("nan")
    rows.setdefault("pixel difference", {})["nuisance share"] = float(np.mean(
        [t.map_shares["pixel difference"] for t in trap])) if trap else float("nan")
    rows["model (pixel effects)"] = {"nuisance share": float(np.mean(
        [t.model_share for t in trap])) if trap else float("nan")}
    return EffectsResult(tuple(methods), len(different), len(same), rows, trap, truth_top,
                         seconds, examples)


def _trap(explainer: Explainer, faces: Sequence[Face], methods: Sequence[str],
          pairs: Sequence[tuple[int, int]], log_line,
          neutral: np.ndarray | NeutralFace) -> list[TrapCase]:
    masks = edit_masks(faces[0].crop.shape[:2])
    out = []
    for n, (i, j) in enumerate(pairs):
        original, donor = faces[i].crop, faces[j].crop
        third = faces[(j + 1) % len(faces)].crop
        region = TRAP_REGIONS[n % len(TRAP_REGIONS)]
        nuisance = NUISANCES[n % len(NUISANCES)]
        r = masks.regions.index(region)
        swapped = paste_region(original, donor, masks.alpha[r], masks.colour[r])
        edited, nuisance_mask = nuisance_edit(swapped, nuisance, third)
        swap_mask = masks.alpha[r] > 0.1
        log_line(f"effects: trap {n + 1}/{len(pairs)} {region} + {nuisance}")
        gain_nuisance, gain_swap = _restore_gain(explainer, edited, original,
                                                 [nuisance_mask, swap_mask])
        gn, gs = max(gain_nuisance, 0.0), max(gain_swap, 0.0)
        model = gn / (gn + gs) if gn + gs > 0 else 0.0
        q, g = explainer.encode(edited), explainer.encode(original[None])
        (match,) = explain_matches(explainer, q, g, methods, sides=("query",))
        drawn = {m: match[m].query_aligned for m in methods}
        weighted = [m for m in methods if WEIGHTED_KIND.get(m) == "differs"]
        if weighted:
            (effects,) = region_effects(explainer, q, g, neutral=neutral)
            drawn.update({weighted_row(m): effects.weighted("query", "differs", drawn[m])
                          for m in weighted})
        shares_by = {}
        for method, aligned in drawn.items():
            m = np.asarray(aligned, np.float64)
            if m.shape != nuisance_mask.shape:
                m = cv2.resize(m.astype(np.float32), nuisance_mask.shape[::-1]).astype(np.float64)
            neg = np.maximum(-m, 0)
            a, b = neg[nuisance_mask].sum(), neg[swap_mask & ~nuisance_mask].sum()
            shares_by[method] = float(a / (a + b)) if a + b > 0 else 0.0
        diff = np.abs(edited.astype(np.float64) - original.astype(np.float64)).sum(-1)
        a, b = diff[nuisance_mask].sum(), diff[swap_mask & ~nuisance_mask].sum()
        shares_by["pixel difference"] = float(a / (a + b)) if a + b > 0 else 0.0
        out.append(TrapCase(f"{faces[i].name} + {faces[j].name}", nuisance, region, model,
                            shares_by))
    return out


# ---------------------------------------------------------------------------- output

TARGETS = {"contrast": {"differs spearman": 0.8, "differs top1": 0.9},
           "similarity": {"alike spearman": 0.7, "alike top1": 0.8}}
TARGETS.update({weighted_row(m): TARGETS[m] for m in WEIGHTED_KIND})


def markdown(result: EffectsResult) -> str:
    cols = ("differs spearman", "differs top1", "differs l1", "alike spearman", "alike top1",
            "alike l1", "nuisance share")
    lines = [f"Pairs: {result.pairs_different} of different people (*differs*), "
             f"{result.pairs_same} of the same person (*alike*); both faces of each pair "
             "scored. Truth: region effects by pixel edits (`explain.effects`); Spearman, "
             "top-1 and L1 over the 8 facial regions the words name. Rows \"weighted by the "
             "effects\" are the maps drawn when a match's effects are measured: the method's "
             "picture inside each region, the measured effect as each region's mass, so their "
             "region agreement holds by construction and shows only that the drawing keeps "
             "it; their nuisance share is a real test.", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    order = [*result.methods, *(weighted_row(m) for m in result.methods if m in WEIGHTED_KIND),
             "effects, features mode", "served words (from the effects)",
             *BASELINES, "model (pixel effects)"]
    for row in order:
        if row not in result.rows:
            continue
        values = result.rows[row]
        cells = []
        for c in cols:
            v = values.get(c)
            cell = "–" if v is None or v != v else f"{v:.2f}"
            target = TARGETS.get(row, {}).get(c)
            if target is not None and v is not None:
                cell += f" ({'met' if v >= target else 'not met'}: ≥ {target})"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "How often each region is the model's first (pixel effects, both faces): "
              + "; ".join(f"{k}: " + ", ".join(f"{r} {n}" for r, n in
                                               sorted(v.items(), key=lambda x: -x[1]))
                          for k, v in result.truth_top.items()), "",
              "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()), ""]
    return "\n".join(lines)


def plot_examples(result: EffectsResult, path) -> None:
    from matplotlib.figure import Figure

    examples = result.examples
    if not examples:
        return
    cols = 2 + len(result.methods)
    fig = Figure(figsize=(2.2 * cols, 2.6 * len(examples)), dpi=90)
    axes = fig.subplots(len(examples), cols, squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        row[0].imshow(ex["query"])
        row[0].set_title("query", fontsize=8)
        row[1].imshow(ex["gallery"])
        row[1].set_title("gallery face", fontsize=8)
        for ax, method in zip(row[2:], result.methods, strict=True):
            m = np.asarray(ex["maps"][method], np.float64)
            lim = float(np.abs(m).max()) or 1.0
            ax.imshow(ex["query"])
            ax.imshow(cv2.resize(m.astype(np.float32), ex["query"].shape[:2][::-1]),
                      cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)
            ax.set_title(f"{method} (query)", fontsize=8)
        row[0].text(0, ex["query"].shape[0] + 14, ex["words"], fontsize=6.5, va="top",
                    wrap=True)
        for ax in row:
            ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.08, wspace=0.05, hspace=0.45)
    fig.savefig(path)


def write(result: EffectsResult, out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "effects.md").write_text("# Maps against the model's region effects\n\n"
                                    + markdown(result), encoding="utf-8")
    (out / "effects.json").write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
    plot_examples(result, out / "effects_examples.png")
