"""The planted-feature protocol: is the region a synthetic syndrome was planted on found?

Synthetic syndromes (``research.synth``) act on one region each (``planted_region``:
eyes, nose, mouth or chin). Subjects are cut into ``folds`` subject-disjoint folds;
per fold the gallery is every syndrome on every other subject (``per_source``
augmented images per photo) and the queries are the fold's subjects carrying each
syndrome (``queries_per_source`` each, drawn with another random state than the
gallery's). Per held-out query:

- **syndrome accuracy**: the rank of its syndrome in GestaltMatcher's ranking (a
  syndrome scores its nearest gallery image); macro top-1/top-5 over syndromes;
- **leans on**: its top *same-syndrome* match (the nearest gallery face of its own
  syndrome) gets region effects (``explain.effects.region_effects``); the query is a
  hit when the region whose neutral replacement costs the match the most
  (``ranked("alike", top=1)``) is the planted one. The gallery side is scored alike;
- **syndrome-wise map**: the query's held-norm similarity map towards the direction
  ``ĉ_syndrome − ĉ_all`` (its syndrome's centroid minus the gallery's; every gallery
  subject carries every syndrome, so identity cancels); a hit when the map's largest
  pixel lies in the planted region;
- **calibration**: the gallery's own leave-one-subject-out calibration
  (``gallery.calibration.fit_calibration``) read on the held-out queries' per-syndrome
  best cosines; the expected calibration error of that, pooled over folds.

Both encoders explain with the mirrored view beside the face (``flip``), as the server
does. Encoders: ``frozen`` (the SFace weights as they are) and ``finetuned`` (a head fitted per
fold on that fold's gallery only, ``research.train.train_head``). By default (``init=
"lda"``) it is Fisher's discriminant directions of the backbone maps, with the gallery
faces' neutral edits counted as variation within their class, in closed form; with
another ``init`` it is trained with two of the gallery's people as its validation split.
Nothing is tuned on the queries.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FOLDS = 5
OUTSIDE = "outside_face"  # explain.effects.OUTSIDE_FACE: hair, ears, background
ENCODERS = ("frozen", "finetuned")


@dataclass(frozen=True)
class PlantedConfig:
    folds: int = FOLDS
    per_source: int = 2
    queries_per_source: int = 1
    seed: int = 0
    mode: str = "pixels"  # region effects: "pixels" (as served) or "features" (contrast-layer edits)
    init: str = "lda"  # the fine-tuned head's start (research.train.TrainConfig.init)
    flip: bool = True  # the mirrored view beside the face, as the server explains
    encoders: tuple[str, ...] = ENCODERS


def samples_of(sources, split: str, per_source: int, seed: int, classes: Sequence[str]):
    """``per_source`` samples of every syndrome on every source; a sample's random state is
    (seed, split, label, source, index), so a source's faces never depend on the others."""
    from research.synth import Augmentation, AugmentConfig, SynthSample, make_sample, syndrome

    out = []
    config = AugmentConfig()
    for src in sources:
        for label in classes:
            for i in range(per_source):
                rng = np.random.default_rng([seed, zlib.crc32(split.encode()),
                                             zlib.crc32(label.encode()),
                                             zlib.crc32(src.source_id.encode()), i])
                strength = float(rng.uniform(0.8, 1.2))
                aug = Augmentation.sample(rng, config)
                image, mask, lm = make_sample(src, syndrome(label), strength, aug)
                out.append(SynthSample(f"{split}-{label}-{src.source_id}-{i}", src.subject,
                                       label, split, src.source_id, strength, aug, image, mask,
                                       lm))
    return out


def region_of_pixel(y: int, x: int, size: tuple[int, int] = (112, 112)) -> str:
    """The summary region (first in ``SUMMARY_REGIONS`` order) holding pixel (y, x), else
    ``outside_face`` when outside the face ellipse, else ``other`` (e.g. the philtrum)."""
    from explain.regions import SUMMARY_REGIONS, template_regions

    masks = template_regions(size)
    for name in SUMMARY_REGIONS:
        if masks[name][y, x]:
            return name
    return "other" if masks["face"][y, x] else "outside_face"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _embeddings(features) -> np.ndarray:
    """(N, D) mean over views of unit embeddings, renormalised (the gallery's search vector)."""
    views = [_unit(e.detach().cpu().numpy().astype(np.float64)) for e in features.embeddings]
    return _unit(np.mean(views, axis=0))


def _train_head(base, gallery, seed: int, config: PlantedConfig):
    """The fold's fine-tuned encoder, started as ``config.init`` says. ``init="lda"`` is
    closed-form (no gradient steps, no epoch to select), so it is fitted on every gallery
    face (``research.train.fit_lda_head``: with ``config.flip``, also its mirror image,
    which the mirrored view shows it; with their neutral edits, the neutral face being the
    gallery's mean, ``fit_lda_head``'s default); other starts are trained on all but two gallery people and
    stopped early on those two."""
    from research.train import (
        LabelledFeatures,
        TrainConfig,
        extract_features,
        fit_lda_head,
        train_head,
    )

    crops = np.stack([s.image for s in gallery])
    labels, subjects = [s.label for s in gallery], [s.subject for s in gallery]
    ids = [s.image_id for s in gallery]
    if config.init == "lda":
        return fit_lda_head(base, crops, labels, subjects, ids, mirror=config.flip,
                            config=TrainConfig(seed=seed, init="lda", max_epochs=0)).model
    feats = LabelledFeatures(extract_features(base, crops), tuple(labels), tuple(subjects),
                             tuple(ids))
    rng = np.random.default_rng(seed)
    people = sorted(set(subjects))
    val_subjects = set(rng.choice(people, size=min(2, len(people) - 1), replace=False))
    train = feats.select([i for i, s in enumerate(feats.subjects) if s not in val_subjects])
    val = feats.select([i for i, s in enumerate(feats.subjects) if s in val_subjects])
    return train_head(base, train, val, TrainConfig(seed=seed, init=config.init),
                      base_name="sface").model


def _fold(explainer, gallery, queries, classes, mode: str) -> list[dict]:
    """One row per query of the fold (see the module docstring)."""
    import torch

    from explain.effects import mean_face, region_effects
    from explain.syndrome.maps import Centroid, SyndromeExplainer
    from gallery.accuracy import syndrome_ranks
    from gallery.calibration import fit_calibration
    from research.synth import planted_region

    g_crops = np.stack([s.image for s in gallery])
    q_crops = np.stack([s.image for s in queries])
    fg, fq = explainer.encode(g_crops), explainer.encode(q_crops)
    eg, eq = _embeddings(fg), _embeddings(fq)
    g_labels = [s.label for s in gallery]
    sim = eq @ eg.T
    ranks = syndrome_ranks(sim, g_labels, [s.label for s in queries])
    names = sorted(set(g_labels))
    lab = np.asarray(g_labels, dtype=object)
    best = np.stack([sim[:, lab == k].max(axis=1) for k in names], axis=1)
    calibration = fit_calibration(eg.astype(np.float32), [s.subject for s in gallery], g_labels)
    probability = calibration.syndrome(best) if calibration.syndrome is not None else None
    neutral = mean_face(g_crops)
    # the syndrome-wise directions: each syndrome's centroid minus the gallery's, per view
    directions = {}
    for k in names:
        vecs = []
        for e in fg.embeddings:
            u = e / e.norm(dim=1, keepdim=True)
            member = torch.from_numpy(lab == k)
            vecs.append(u[member].mean(0) - u.mean(0))
        directions[k] = Centroid(tuple(vecs), int((lab == k).sum()), fg.flipped)
    syndrome_explainer = SyndromeExplainer(explainer)
    rows = []
    for i, s in enumerate(queries):
        own = np.flatnonzero(lab == s.label)
        j = int(own[np.argmax(sim[i, own])])
        effects = region_effects(explainer, fq.select([i]), fg.select([j]), neutral=neutral,
                                 mode=mode)[0]
        lean_q = effects.query.ranked("alike", top=1)
        lean_g = effects.gallery.ranked("alike", top=1)
        on_face = [r for r, _ in effects.query.ranked("alike", top=len(effects.query.regions))
                   if r != OUTSIDE]
        pull = syndrome_explainer.query_pull(fq.select([i]), directions[s.label])
        y, x = np.unravel_index(int(np.argmax(pull.map_aligned)), pull.map_aligned.shape)
        planted = planted_region(s.label)
        rows.append({
            "query": s.image_id, "subject": s.subject, "syndrome": s.label, "planted": planted,
            "rank": float(ranks[i]), "match": gallery[j].image_id,
            "match_subject": gallery[j].subject, "cosine": float(sim[i, j]),
            "leans_on_query": lean_q[0][0] if lean_q else None,
            "leans_on_gallery": lean_g[0][0] if lean_g else None,
            "leans_on_query_face": on_face[0] if on_face else None,
            "alike_query": effects.query.to_json(),
            "map_peak": region_of_pixel(int(y), int(x), pull.map_aligned.shape),
            "best": best[i].tolist(), "best_label": [k == s.label for k in names],
            "probability": None if probability is None else probability[i].tolist(),
        })
    return rows


def deformation_shares(sources, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per syndrome, where its deformation changes the pixels: the share of the summed
    absolute pixel change (strength 1, no augmentation, pooled over ``sources``) in each
    effect region (the regions region effects paste, disjoint). The planted region's share
    is the most any region-level explanation can give it; the rest is where the planted
    change spills over (e.g. the broad nose's alae pushed into the cheeks)."""
    from explain.effects import EFFECT_REGIONS, effect_region_stack
    from research.synth import Augmentation, AugmentConfig, make_sample, syndrome

    stack = effect_region_stack((112, 112), EFFECT_REGIONS)
    still = Augmentation.sample(np.random.default_rng(0), AugmentConfig.none())
    out = {}
    for label in classes:
        total = np.zeros(len(EFFECT_REGIONS))
        for src in sources:
            plain = make_sample(src, syndrome(label), 0.0, still)[0].astype(np.float32)
            bent = make_sample(src, syndrome(label), 1.0, still)[0].astype(np.float32)
            change = np.abs(bent - plain).sum(-1)
            total += [float(change[m].sum()) for m in stack]
        total /= max(total.sum(), 1e-12)
        out[label] = {r: round(float(v), 4) for r, v in zip(EFFECT_REGIONS, total, strict=True)}
    return out


def summarise(rows: list[dict]) -> dict:
    """Per syndrome and overall (macro over syndromes) shares of the rows of one encoder."""
    from gallery.calibration import expected_calibration_error

    per: dict[str, dict] = {}
    for label in sorted({r["syndrome"] for r in rows}):
        mine = [r for r in rows if r["syndrome"] == label]
        per[label] = {
            "planted": mine[0]["planted"], "queries": len(mine),
            "leans_on_planted": float(np.mean([r["leans_on_query"] == r["planted"]
                                               for r in mine])),
            "gallery_leans_on_planted": float(np.mean([r["leans_on_gallery"] == r["planted"]
                                                       for r in mine])),
            "face_leans_on_planted": float(np.mean([r.get("leans_on_query_face") == r["planted"]
                                                    for r in mine])),
            "map_peaks_in_planted": float(np.mean([r["map_peak"] == r["planted"]
                                                   for r in mine])),
            "top1": float(np.mean([r["rank"] <= 1 for r in mine])),
            "top5": float(np.mean([r["rank"] <= 5 for r in mine])),
        }
    keys = ("leans_on_planted", "gallery_leans_on_planted", "face_leans_on_planted",
            "map_peaks_in_planted", "top1", "top5")
    macro = {k: float(np.mean([v[k] for v in per.values()])) for k in keys}
    calibrated = [r for r in rows if r["probability"] is not None]
    if calibrated:
        p = np.concatenate([r["probability"] for r in calibrated])
        y = np.concatenate([r["best_label"] for r in calibrated]).astype(float)
        macro["held_out_ece"] = expected_calibration_error(p, y)
    else:
        macro["held_out_ece"] = None
    return {"queries": len(rows), "macro": macro, "per_syndrome": per}


def run_planted(config: PlantedConfig | None = None, sources=None, log=print) -> dict:
    """Every encoder of ``config`` over every fold; returns {"config", "encoders": {name:
    summary + rows}}."""
    from encoder.registry import create_encoder
    from explain.attribution.engine import Explainer
    from explain.attribution.views import SingleEncoderViews
    from research.synth import SYNDROMES, load_source_faces, subject_folds

    config = config or PlantedConfig()
    classes = list(SYNDROMES)
    sources = sources if sources is not None else load_source_faces()
    folds = subject_folds([s.subject for s in sources], config.folds, config.seed)
    base = create_encoder("sface")
    base.eval()
    rows: dict[str, list[dict]] = {name: [] for name in config.encoders}
    seconds: dict[str, float] = {name: 0.0 for name in config.encoders}
    for n, held in enumerate(folds, start=1):
        gallery = samples_of([s for s in sources if s.subject not in held], "gallery",
                             config.per_source, config.seed, classes)
        queries = samples_of([s for s in sources if s.subject in held], "query",
                             config.queries_per_source, config.seed, classes)
        for name in config.encoders:
            t0 = time.monotonic()
            model = base if name == "frozen" else _train_head(base, gallery, config.seed + n,
                                                               config)
            views = SingleEncoderViews(model, flip=config.flip)
            rows[name] += _fold(Explainer(views), gallery, queries, classes, config.mode)
            seconds[name] += time.monotonic() - t0
            log(f"fold {n}/{len(folds)} ({', '.join(held)}): {name} done")
    out = {"config": config.__dict__ | {"encoders": list(config.encoders)}, "encoders": {},
           "deformation": deformation_shares(sources, classes)}
    for name in config.encoders:
        out["encoders"][name] = summarise(rows[name]) | {"seconds": round(seconds[name], 1),
                                                         "rows": rows[name]}
    return out


def markdown(result: dict) -> str:
    """The protocol's table: per encoder and syndrome, the shares and the accuracy."""
    lines = ["| encoder | syndrome | planted | queries | leans on planted (query) | "
             "(gallery) | (query, hair/background set aside) | syndrome map peaks there | "
             "top-1 | top-5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["encoders"].items():
        for label, v in s["per_syndrome"].items():
            lines.append(f"| {name} | {label} | {v['planted']} | {v['queries']} | "
                         f"{v['leans_on_planted']:.2f} | {v['gallery_leans_on_planted']:.2f} | "
                         f"{v['face_leans_on_planted']:.2f} | "
                         f"{v['map_peaks_in_planted']:.2f} | {v['top1']:.2f} | {v['top5']:.2f} |")
        m = s["macro"]
        ece = "n/a" if m["held_out_ece"] is None else f"{m['held_out_ece']:.3f}"
        lines.append(f"| **{name}** | **macro** | | {s['queries']} | "
                     f"**{m['leans_on_planted']:.2f}** | {m['gallery_leans_on_planted']:.2f} | "
                     f"{m['face_leans_on_planted']:.2f} | "
                     f"**{m['map_peaks_in_planted']:.2f}** | **{m['top1']:.2f}** | "
                     f"{m['top5']:.2f} |")
        lines.append(f"| {name} | held-out ECE of the syndrome confidence | | | {ece} "
                     "| | | | | |")
    shares = result.get("deformation")
    if shares:
        from research.synth import planted_region

        lines += ["", "Where each syndrome's deformation changes the pixels (strength 1, no "
                  "augmentation, every source face): the planted region's share of the change, "
                  "and the region with the next largest share.", "",
                  "| syndrome | planted | share in the planted region | next region |",
                  "|---|---|---|---|"]
        for label, by_region in shares.items():
            planted = planted_region(label)
            other = max((r for r in by_region if r != planted), key=by_region.get)
            lines.append(f"| {label} | {planted} | {by_region[planted]:.2f} | "
                         f"{other} {by_region[other]:.2f} |")
    return "\n".join(lines) + "\n"
