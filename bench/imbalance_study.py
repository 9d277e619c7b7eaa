"""The class-imbalance study of the GestaltMatcher explainability thesis, on synthetic syndromes.

Heads are fine-tuned (``research.train``) on the frozen SFace backbone with
different numbers and choices of classes and different class sizes; for each
head and for the frozen SFace embedding we report, per synthetic syndrome:

- matching accuracy in GestaltMatcher's protocol (test subjects against the
  head's own training faces as the gallery; macro top-1/3 over syndromes);
- localisation of the explanations against the syndrome's ground-truth region
  (the query's own mask): IOU of the map thresholded at mean + 1 std, IOU*,
  positive-energy share and the pointing game, for the query-side similarity
  map and embedding Grad-CAM of the query against its nearest same-syndrome
  gallery face (what the service shows), and for the *contrast* similarity map
  (the query's contribution map towards its syndrome's centroid minus the mean
  of the other centroids: what makes it look like this syndrome and not the others);
- deletion AUC of the pair similarity when the query's most-attributed pixels
  are blurred first (lower = more faithful), next to the random-order AUC.

    python -m bench.imbalance_study [--quick] [--out bench/results/imbalance] [--seed 0]

Writes ``imbalance.json``, ``imbalance.md`` and PNG plots to ``--out``.
Backbone feature maps are computed once per seed and cached under ``--out/cache``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from encoder.registry import create_encoder
from research import synth
from research.train import LabelledFeatures, TrainConfig, labelled_features, train_head

SIZE_LADDER = (64, 32, 16, 8, 4, 2)


@dataclass(frozen=True)
class StudyConfig:
    """One head: which classes, how many training images each."""

    name: str
    family: str  # "balanced", "imbalanced", "subset"
    class_sizes: dict[str, int]


@dataclass(frozen=True)
class ClassRow:
    """One (model, head configuration, syndrome) line of the study."""

    config: str
    family: str
    model: str  # "frozen" or "finetuned"
    syndrome: str
    train_size: int
    n_classes: int
    queries: int
    top1: float
    top3: float
    sim_iou: float
    sim_iou_star: float
    sim_pointing: float
    cam_iou: float
    cam_pointing: float
    contrast_iou: float
    contrast_pointing: float
    contrast_energy: float
    deletion_auc: float
    deletion_auc_random: float
    fold: int = 0


def study_configs(classes: tuple[str, ...], pool: int, rotations: int, seed: int) -> list[StudyConfig]:
    """Balanced, imbalanced (size ladder rotated over the classes) and class-subset heads."""
    ladder = [max(2, round(pool * s / SIZE_LADDER[0])) for s in SIZE_LADDER[: len(classes)]]
    out = [StudyConfig("balanced", "balanced", {c: pool for c in classes})]
    step = max(1, len(classes) // max(rotations, 1))
    for r in range(rotations):
        sizes = {c: ladder[(i + r * step) % len(classes)] for i, c in enumerate(classes)}
        out.append(StudyConfig(f"imbalanced-r{r}", "imbalanced", sizes))
    rng = np.random.default_rng(seed)
    for k in (2, 4):
        if k < len(classes):
            chosen = tuple(sorted(rng.choice(classes, size=k, replace=False).tolist()))
            out.append(StudyConfig(f"subset{k}-" + "+".join(chosen), "subset",
                                   {c: pool for c in chosen}))
    return out


def _take(feats: LabelledFeatures, faces: synth.FaceSet, subjects, sizes: dict[str, int]):
    """The first ``sizes[c]`` pool faces of each class among ``subjects`` (pool order
    interleaves the sources, so a small class still spreads over subjects)."""
    idx, seen = [], {c: 0 for c in sizes}
    members = set(subjects)
    for i, (lab, subj) in enumerate(zip(feats.labels, feats.subjects, strict=True)):
        if lab in sizes and subj in members and seen[lab] < sizes[lab]:
            idx.append(i)
            seen[lab] += 1
    return feats.select(idx), faces.select(idx)


def _face_features(model, feats: torch.Tensor):
    from explain.attribution.engine import FaceFeatures

    with torch.no_grad():
        emb = model.head(feats)
    return FaceFeatures((feats,), (emb,), (model,), (False,), (112, 112))


def evaluate_model(model, model_name: str, cfg: StudyConfig, gallery: LabelledFeatures,
                   gallery_faces: synth.FaceSet, test: LabelledFeatures, test_faces: synth.FaceSet,
                   deletion_per_class: int, deletion_steps: int) -> list[ClassRow]:
    """Per-syndrome accuracy, localisation and deletion AUC of one model on one head's gallery."""
    from explain.attribution.affine import affine_head
    from explain.attribution.engine import Explainer
    from explain.evaluation import metrics as M
    from research.train import embed_features, matching_accuracy

    model.eval()
    acc = matching_accuracy(model, gallery, test, ks=(1, 3))
    g_emb = embed_features(model, gallery.features)
    q_emb = embed_features(model, test.features)
    g_unit = g_emb / np.linalg.norm(g_emb, axis=1, keepdims=True)
    q_unit = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
    classes = sorted(set(gallery.labels))
    g_labels = np.array(gallery.labels)
    centroids = {}
    for c in classes:
        m = g_unit[g_labels == c].mean(0)
        centroids[c] = m / np.linalg.norm(m)
    explainer = Explainer(model)
    head = affine_head(model)
    gallery_ff = _face_features(model, gallery.features)
    with torch.no_grad():
        contrib = head.contributions(test.features).numpy()  # (Q, P, D)
    grid = head.grid
    per_class: dict[str, dict[str, list[float]]] = {c: {} for c in set(test.labels)}
    deleted = {c: 0 for c in per_class}
    for qi, label in enumerate(test.labels):
        mask = test_faces.masks[qi]
        same = np.nonzero(g_labels == label)[0]
        hit = int(same[np.argmax(g_unit[same] @ q_unit[qi])])
        (pair,) = explainer.explain(_face_features(model, test.features[qi:qi + 1]),
                                    gallery_ff.select([hit]))
        others = [centroids[c] for c in classes if c != label]
        direction = centroids[label] - (np.mean(others, 0) if others else 0.0)
        contrast = (contrib[qi] @ direction / np.linalg.norm(q_emb[qi])).reshape(grid)
        stats = per_class[label]
        for name, amap in (("sim", pair.query.similarity_aligned),
                           ("cam", pair.query.gradcam_aligned), ("contrast", contrast)):
            (score,) = M.localisation_scores(amap, {"region": mask}, k=1.0)
            stats.setdefault(f"{name}_iou", []).append(score.iou)
            stats.setdefault(f"{name}_iou_star", []).append(score.iou_star)
            stats.setdefault(f"{name}_pointing", []).append(float(score.pointing))
            stats.setdefault(f"{name}_energy", []).append(score.energy)
        if deleted[label] < deletion_per_class:
            deleted[label] += 1
            auc, auc_random = _deletion_aucs(model, test_faces.images[qi], g_unit[hit],
                                             float(np.linalg.norm(q_emb[qi])),
                                             pair.query.similarity, deletion_steps, qi)
            stats.setdefault("deletion_auc", []).append(auc)
            stats.setdefault("deletion_auc_random", []).append(auc_random)
    rows = []
    for c in sorted(per_class):
        s = per_class[c]

        def mean(key: str, s: dict = s) -> float:
            return float(np.mean(s[key])) if s.get(key) else float("nan")

        rows.append(ClassRow(
            cfg.name, cfg.family, model_name, c, int(cfg.class_sizes.get(c, 0)), len(cfg.class_sizes),
            len(s["sim_iou"]), acc.per_syndrome[c][1], acc.per_syndrome[c][3],
            mean("sim_iou"), mean("sim_iou_star"), mean("sim_pointing"),
            mean("cam_iou"), mean("cam_pointing"),
            mean("contrast_iou"), mean("contrast_pointing"), mean("contrast_energy"),
            mean("deletion_auc"), mean("deletion_auc_random"),
        ))
    return rows


def _deletion_aucs(model, image: np.ndarray, hit_unit: np.ndarray, query_norm: float,
                   similarity_map: np.ndarray, steps: int, seed: int) -> tuple[float, float]:
    """Deletion AUC of the held-norm pair similarity ``<e(x), ê_hit> / ‖e_q‖`` when the
    query's pixels are blurred in the map's order, and in a random order (one batch)."""
    from explain.evaluation import metrics as M

    img = image.astype(np.float32)
    baseline = M.blur_baseline(img)
    orders = (M.pixel_order(similarity_map, img.shape[:2], "positive"),
              M.pixel_order(similarity_map, img.shape[:2], "random", np.random.default_rng(seed)))
    batches = [M.perturbation_images(img, baseline, o, steps, "deletion") for o in orders]
    images = np.concatenate([b[0] for b in batches])
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) - model.spec.mean) / model.spec.std
        scores = (model(x).numpy() @ hit_unit) / query_norm
    n = steps + 1
    return (M.auc(batches[0][1], scores[:n]), M.auc(batches[1][1], scores[n:]))


def chance_levels(faces: synth.FaceSet, grid: tuple[int, int] = (7, 7), per_class: int = 40,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """IOU and pointing rate of random (Gaussian) maps on the feature grid, per syndrome:
    what a map that knows nothing about the region scores against these masks."""
    from explain.evaluation import metrics as M

    rng = np.random.default_rng(seed)
    out = {}
    for c in sorted(set(faces.labels)):
        idx = [i for i, lab in enumerate(faces.labels) if lab == c][:per_class]
        scores = [M.localisation_scores(rng.standard_normal(grid), {"r": faces.masks[i]})[0]
                  for i in idx]
        out[c] = {"iou": float(np.mean([s.iou for s in scores])),
                  "pointing": float(np.mean([s.pointing for s in scores]))}
    return out


def _mask_area(faces: synth.FaceSet) -> dict[str, float]:
    return {c: float(np.mean([faces.masks[i].mean() for i, lab in enumerate(faces.labels)
                              if lab == c])) for c in sorted(set(faces.labels))}


def make_pool(per_source: int, classes: tuple[str, ...], seed: int, cache: Path):
    """Every source face deformed into every class ``per_source`` times (augmented), with
    its SFace feature maps; cached. Splits and heads select from this pool by subject."""
    sface = create_encoder("sface")
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"pool-seed{seed}-m{per_source}-{'+'.join(classes)}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=False)
        return sface, blob["faces"], blob["feats"]
    sources = synth.load_source_faces()
    sizes = {c: per_source * len(sources) for c in classes}
    faces = synth.face_set(synth.generate(sources, sizes, seed=seed, split="pool"))
    feats = labelled_features(sface, faces)
    torch.save({"faces": faces, "feats": feats}, path)
    return sface, faces, feats


def run(out: Path, *, seed: int, per_source: int, folds: int, accuracy_folds: int,
        study_folds: int, pool: int, rotations: int, epochs: int, patience: int, lr: float,
        only: str = "all",
        deletion_per_class: int, deletion_steps: int, classes: tuple[str, ...]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sface, faces, feats = make_pool(per_source, classes, seed, out / "cache")
    prep_s = time.time() - t0
    subject_groups = synth.subject_folds(feats.subjects, folds, seed)
    rows: list[ClassRow] = []
    heads = []
    configs = study_configs(classes, pool, rotations, seed)
    balanced = [c for c in configs if c.family == "balanced"]
    others = [c for c in configs if c.family != "balanced"]
    n_folds = max(accuracy_folds, study_folds)
    # Balanced heads of the first two folds first, so the frozen-vs-fine-tuned comparison
    # exists early; results are rewritten after every head.
    plan = [(f, c) for f in range(min(2, n_folds)) for c in balanced]
    plan += [(f, c) for f in range(study_folds) for c in others]
    plan += [(f, c) for f in range(2, n_folds) for c in balanced]
    if only != "all":
        plan = [(f, c) for f, c in plan if (c.family == "balanced") == (only == "balanced")]
    report: dict = {}
    chance = chance_levels(faces)
    for fold, cfg in plan:
        test_subj = subject_groups[fold]
        val_subj = subject_groups[(fold + 1) % folds]
        train_subj = [s for g in subject_groups for s in g if s not in test_subj + val_subj]
        synth.assert_subject_disjoint({"train": train_subj, "val": val_subj, "test": test_subj})
        t = time.time()
        tr, tr_faces = _take(feats, faces, train_subj, cfg.class_sizes)
        everything = {c: len(feats) for c in cfg.class_sizes}
        va, _ = _take(feats, faces, val_subj, everything)
        te, te_faces = _take(feats, faces, test_subj, everything)
        result = train_head(
            sface, tr, va,
            TrainConfig(lr=lr, max_epochs=epochs, patience=patience, seed=seed + fold),
            class_names=sorted(cfg.class_sizes))
        train_s = time.time() - t
        for label, model in (("frozen", sface), ("finetuned", result.model)):
            rows += [replace(r, fold=fold) for r in evaluate_model(
                model, label, cfg, tr, tr_faces, te, te_faces, deletion_per_class,
                deletion_steps)]
        heads.append({"config": cfg.name, "fold": fold, "family": cfg.family,
                      "class_sizes": cfg.class_sizes, "train_images": len(tr),
                      "test_images": len(te), "best_epoch": result.best_epoch,
                      "selection": result.selection_metric,
                      "epochs_run": len(result.history) - 1,
                      "train_seconds": round(train_s, 1),
                      "eval_seconds": round(time.time() - t - train_s, 1)})
        print(f"fold {fold} {cfg.name}: trained in {train_s:.0f}s (best epoch "
              f"{result.best_epoch}), evaluated in {time.time() - t - train_s:.0f}s", flush=True)
        report = {
            "seed": seed, "per_source": per_source, "pool": pool, "folds": folds, "lr": lr,
            "classes": list(classes),
            "fold_subjects": [list(g) for g in subject_groups],
            "images": len(feats), "subjects": len(set(feats.subjects)),
            "mask_area_fraction": _mask_area(faces),
            "chance": chance,
            "prep_seconds": round(prep_s, 1), "heads": heads,
            "rows": [asdict(r) for r in rows],
        }
        (out / "imbalance.json").write_text(json.dumps(report, indent=2))
        (out / "imbalance.md").write_text(markdown(report))
        plot(report, out)
    example_figure(faces, out / "syndromes.png")
    return report


# ----------------------------------------------------------------------------- reporting


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r[key] == r[key]]
    return float(np.mean(vals)) if vals else float("nan")


def markdown(report: dict) -> str:
    rows = report["rows"]
    configs = list(dict.fromkeys(h["config"] for h in report["heads"]))
    lines = [
        "# Class-imbalance study on synthetic syndromes",
        "",
        f"seed {report['seed']}; {report['images']} synthetic images of {report['subjects']} "
        f"real subjects ({report['per_source']} per source face and syndrome); "
        f"{report['folds']} subject folds (test = fold f, validation = fold f+1, train = rest).",
        "",
        "Accuracy: GestaltMatcher macro top-k of the test subjects against each head's training "
        "faces. Localisation vs the ground-truth region (maps thresholded at mean + 1 std): "
        "`sim` = query similarity map vs its nearest same-syndrome gallery face, `cam` = "
        "embedding Grad-CAM of that pair, `contrast` = similarity map towards the syndrome "
        "centroid minus the mean of the other centroids. Deletion AUC: blur the query's most "
        "similarity-attributed pixels first (lower = more faithful), random order alongside.",
        "",
        "## Balanced head vs frozen SFace (macro over syndromes)",
        "",
        "| fold | test images | frozen top-1 | fine-tuned top-1 | frozen top-3 | fine-tuned top-3 |",
        "|---|---|---|---|---|---|",
    ]
    folds = sorted({h["fold"] for h in report["heads"] if h["config"] == "balanced"})
    per_fold = []
    for f in folds:
        fr = [r for r in rows if r["config"] == "balanced" and r["fold"] == f and r["model"] == "frozen"]
        ft = [r for r in rows if r["config"] == "balanced" and r["fold"] == f and r["model"] == "finetuned"]
        n = next(h["test_images"] for h in report["heads"] if h["config"] == "balanced" and h["fold"] == f)
        vals = (_mean(fr, "top1"), _mean(ft, "top1"), _mean(fr, "top3"), _mean(ft, "top3"))
        per_fold.append(vals)
        lines.append(f"| {f} | {n} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    if per_fold:
        m = np.mean(per_fold, axis=0)
        lines.append("| mean | | " + " | ".join(f"**{v:.3f}**" for v in m) + " |")
    lines += [
        "",
        "## Per head (macro over syndromes, mean over the folds it ran on)",
        "",
        "| head | model | top-1 | top-3 | sim IOU | sim pointing | cam IOU | cam pointing | "
        "contrast IOU | contrast pointing | deletion AUC | random AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        for model in ("frozen", "finetuned"):
            rs = [r for r in rows if r["config"] == config and r["model"] == model]
            lines.append(
                f"| {config} | {model} | {_mean(rs, 'top1'):.3f} | {_mean(rs, 'top3'):.3f} | "
                f"{_mean(rs, 'sim_iou'):.3f} | {_mean(rs, 'sim_pointing'):.2f} | "
                f"{_mean(rs, 'cam_iou'):.3f} | {_mean(rs, 'cam_pointing'):.2f} | "
                f"{_mean(rs, 'contrast_iou'):.3f} | {_mean(rs, 'contrast_pointing'):.2f} | "
                f"{_mean(rs, 'deletion_auc'):.3f} | {_mean(rs, 'deletion_auc_random'):.3f} |"
            )
    lines += ["", "## Per syndrome, balanced head (mean over folds)", "",
              "| syndrome | region % of crop | chance IOU / pointing | model | top-1 | sim IOU | "
              "sim pointing | cam IOU | cam pointing | contrast IOU | contrast pointing | "
              "deletion AUC | random AUC |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    chance = report.get("chance", {})
    area = report["mask_area_fraction"]
    for syndrome in report["classes"]:
        for model in ("frozen", "finetuned"):
            rs = [r for r in rows if r["config"] == "balanced" and r["syndrome"] == syndrome
                  and r["model"] == model]
            if not rs:
                continue
            ch = chance.get(syndrome, {"iou": float("nan"), "pointing": float("nan")})
            lines.append(
                f"| {syndrome} | {100 * area.get(syndrome, float('nan')):.1f} | "
                f"{ch['iou']:.3f} / {ch['pointing']:.2f} | {model} | "
                f"{_mean(rs, 'top1'):.3f} | {_mean(rs, 'sim_iou'):.3f} | "
                f"{_mean(rs, 'sim_pointing'):.2f} | {_mean(rs, 'cam_iou'):.3f} | "
                f"{_mean(rs, 'cam_pointing'):.2f} | {_mean(rs, 'contrast_iou'):.3f} | "
                f"{_mean(rs, 'contrast_pointing'):.2f} | {_mean(rs, 'deletion_auc'):.3f} | "
                f"{_mean(rs, 'deletion_auc_random'):.3f} |")
    lines += ["", "## Imbalanced heads: by the class's training size (mean over syndromes "
              "and ladder rotations)", "",
              "| class size | model | n | top-1 | top-3 | sim IOU | cam IOU | contrast IOU | "
              "contrast pointing | deletion AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
    imb = [r for r in rows if r["family"] == "imbalanced"]
    for size in sorted({r["train_size"] for r in imb}, reverse=True):
        for model in ("frozen", "finetuned"):
            rs = [r for r in imb if r["train_size"] == size and r["model"] == model]
            lines.append(
                f"| {size} | {model} | {len(rs)} | {_mean(rs, 'top1'):.3f} | "
                f"{_mean(rs, 'top3'):.3f} | {_mean(rs, 'sim_iou'):.3f} | "
                f"{_mean(rs, 'cam_iou'):.3f} | {_mean(rs, 'contrast_iou'):.3f} | "
                f"{_mean(rs, 'contrast_pointing'):.2f} | {_mean(rs, 'deletion_auc'):.3f} |")
    lines += ["", "## Heads", "",
              "| head | fold | class sizes | train images | best epoch | epochs | train s |",
              "|---|---|---|---|---|---|---|"]
    for h in report["heads"]:
        sizes = ", ".join(f"{k}={v}" for k, v in h["class_sizes"].items())
        lines.append(f"| {h['config']} | {h['fold']} | {sizes} | {h['train_images']} | "
                     f"{h['best_epoch']} | {h['epochs_run']} | {h['train_seconds']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["family"] == "imbalanced"]
    if not rows:
        return
    metrics = (("top1", "macro top-1"), ("contrast_iou", "contrast-map IOU"),
               ("sim_iou", "similarity-map IOU"), ("cam_pointing", "Grad-CAM pointing game"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for model, colour in (("frozen", "tab:gray"), ("finetuned", "tab:blue")):
            rs = [r for r in rows if r["model"] == model]
            sizes = sorted({r["train_size"] for r in rs})
            ys = [_mean([r for r in rs if r["train_size"] == s], key) for s in sizes]
            ax.plot(sizes, ys, "o-", color=colour, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training images of the class")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "imbalance_vs_class_size.png", dpi=110)
    plt.close(fig)


def example_figure(faces: synth.FaceSet, path: Path) -> None:
    """One test face per syndrome with its ground-truth region outlined."""
    import cv2
    from PIL import Image

    tiles = []
    for c in synth.SYNDROMES:
        idx = [i for i, lab in enumerate(faces.labels) if lab == c]
        if not idx:
            continue
        img = faces.images[idx[0]].copy()
        contours, _ = cv2.findContours(faces.masks[idx[0]].astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
        tiles.append(img)
    if tiles:
        Image.fromarray(np.concatenate(tiles, 1)).resize(
            (224 * len(tiles), 224), Image.NEAREST).save(path)


def render(out: Path, merge: list[Path]) -> dict:
    """Re-render ``out/imbalance.json`` (plus the heads and rows of other result folders,
    e.g. the balanced heads run separately) into Markdown and plots."""
    report = json.loads((out / "imbalance.json").read_text())
    for other in merge:
        extra = json.loads((other / "imbalance.json").read_text())
        report["heads"] = extra["heads"] + report["heads"]
        report["rows"] = extra["rows"] + report["rows"]
    if "chance" not in report:
        cache = sorted((out / "cache").glob("pool-*.pt"))
        if cache:
            report["chance"] = chance_levels(torch.load(cache[0], weights_only=False)["faces"])
    (out / "imbalance_merged.json").write_text(json.dumps(report, indent=2))
    (out / "imbalance.md").write_text(markdown(report))
    plot(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.imbalance_study")
    parser.add_argument("--out", type=Path, default=Path("bench/results/imbalance"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small pool, few epochs (smoke run)")
    parser.add_argument("--per-source", type=int, help="augmented images per source face and class")
    parser.add_argument("--folds", type=int, default=4, help="subject folds (test, val = next)")
    parser.add_argument("--accuracy-folds", type=int, help="folds for the balanced head (default all)")
    parser.add_argument("--study-folds", type=int, default=1, help="folds for the other heads")
    parser.add_argument("--pool", type=int, help="training images per class of the balanced head")
    parser.add_argument("--rotations", type=int, default=3, help="imbalanced heads (ladder rotations)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of the head")
    parser.add_argument("--only", choices=["all", "balanced", "others"], default="all",
                        help="run only the balanced heads (all folds) or only the others")
    parser.add_argument("--deletion-per-class", type=int, default=1)
    parser.add_argument("--deletion-steps", type=int, default=10)
    parser.add_argument("--classes", default=",".join(synth.SYNDROMES))
    parser.add_argument("--render", action="store_true",
                        help="only re-render --out's JSON (with --merge folders) to Markdown/PNG")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="result folder whose heads are merged in when rendering")
    args = parser.parse_args(argv)
    if args.render:
        render(args.out, args.merge)
        print((args.out / "imbalance.md").read_text())
        return 0
    torch.manual_seed(args.seed)
    quick = args.quick
    per_source = args.per_source or (2 if quick else 8)
    report = run(
        args.out, seed=args.seed, per_source=per_source, folds=args.folds,
        accuracy_folds=args.accuracy_folds or (1 if quick else args.folds),
        study_folds=args.study_folds, pool=args.pool or (per_source * 7),
        rotations=1 if quick else args.rotations, epochs=3 if quick else args.epochs,
        patience=args.patience, lr=args.lr, only=args.only, deletion_per_class=1 if quick else args.deletion_per_class,
        deletion_steps=4 if quick else args.deletion_steps,
        classes=tuple(c.strip() for c in args.classes.split(",")),
    )
    print((args.out / "imbalance.md").read_text())
    print(f"wrote {args.out}/imbalance.json, imbalance.md, imbalance_vs_class_size.png, "
          f"syndromes.png ({len(report['rows'])} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
