"""``phenolens synth`` (synthetic syndrome data sets) and ``phenolens train`` (fine-tuning).

``synth`` deforms the bundled real faces into labelled synthetic syndromes with
ground-truth region masks and writes a folder tree with ``manifest.csv``
(optionally also a gallery file of the training split). ``train`` fine-tunes
an embedding head on such a folder and compares it with the frozen encoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sizes(text: str | None, classes: list[str], default: int) -> dict[str, int]:
    """``"wide_eyes=80,broad_nose=10"`` or ``"80,40,20"`` (in class order) -> sizes."""
    if not text:
        return {c: default for c in classes}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" in p for p in parts):
        sizes = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
        unknown = set(sizes) - set(classes)
        if unknown:
            raise ValueError(f"--sizes names classes not in --classes: {sorted(unknown)}")
        return {c: sizes.get(c, default) for c in classes}
    if len(parts) != len(classes):
        raise ValueError(f"--sizes gives {len(parts)} sizes for {len(classes)} classes")
    return {c: int(p) for c, p in zip(classes, parts, strict=True)}


def _fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    if "train" not in out:
        raise ValueError("--split must name a train split, e.g. train=0.6,val=0.15,test=0.25")
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    from research.synth import SYNDROMES

    synth = subparsers.add_parser(
        "synth", help="make a synthetic syndrome data set from the bundled real faces",
        description="Deform real aligned faces into labelled synthetic syndromes "
        f"({', '.join(SYNDROMES)}), with ground-truth region masks, identity-preserving "
        "augmentation and subject-disjoint splits.")
    synth.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, images/, masks/)")
    synth.add_argument("--classes", default=",".join(SYNDROMES), help="comma-separated syndromes")
    synth.add_argument("--size", type=int, default=40, help="training images per class")
    synth.add_argument("--sizes", help='per-class training sizes: "wide_eyes=80,broad_nose=5" or "80,40,..."')
    synth.add_argument("--eval-size", type=int, default=20, help="images per class in val/test splits")
    synth.add_argument("--split", default="train=0.6,val=0.15,test=0.25",
                       help="subject fractions per split")
    synth.add_argument("--photos", help="comma-separated bundled photo names (default: all)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--strength", default="0.8,1.2", help="range of the deformation strength")
    synth.add_argument("--no-augment", action="store_true", help="no pose/colour/flip jitter")
    synth.add_argument("--gallery", type=Path, help="also write the train split into this gallery file")
    synth.add_argument("--encoder", default="sface", help="encoder for --gallery")
    synth.add_argument("--weights", type=Path, help="checkpoint for --encoder")
    synth.add_argument("--json", action="store_true", help="machine-readable summary")
    synth.set_defaults(func=run_synth)

    train = subparsers.add_parser(
        "train", help="fine-tune an embedding head on a synthetic (or any manifest) data set",
        description="GestaltMatcher-style fine-tuning: frozen backbone, trainable FC+BN "
        "embedding head (started from the base head with a within-class covariance "
        "normalisation) and linear classifier, class-weighted cross-entropy, Adam, early "
        "stopping on the validation split's macro top-k. Writes a checkpoint that "
        "`--encoder finetuned --weights CKPT` loads everywhere.")
    train.add_argument("--data", type=Path, required=True, help="folder with manifest.csv (phenolens synth)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    train.add_argument("--base", default="sface", help="frozen backbone encoder")
    train.add_argument("--base-weights", type=Path, help="weights of the base (iresnet50/100)")
    train.add_argument("--embedding-dim", type=int, help="embedding size (default: the base's)")
    train.add_argument("--init", choices=["wccn", "lda", "base", "random"], default="wccn",
                       help="head start: base head + within-class covariance normalisation "
                       "(wccn), the backbone maps' classes - 1 discriminant directions, made "
                       "blind to a region replaced by the mean face, fitted on each face and its "
                       "mirror image (lda: research.train.fit_lda_head, the demo's recipe; "
                       "--epochs 0 keeps it as fitted), the base head as is, or random")
    train.add_argument("--wccn-shrinkage", type=float, default=1.0)
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--patience", type=int, default=8)
    train.add_argument("--lr", type=float, default=5e-6, help="learning rate of the head")
    train.add_argument("--classifier-lr", type=float, default=1e-3)
    train.add_argument("--dropout", type=float, default=0.2)
    train.add_argument("--no-class-weights", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--report", type=Path, help="write the training report as JSON here")
    train.add_argument("--json", action="store_true", help="machine-readable summary")
    train.set_defaults(func=run_train)


def run_synth(args: argparse.Namespace) -> int:
    from research import synth

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    for c in classes:
        synth.syndrome(c)
    lo, hi = (float(v) for v in args.strength.split(","))
    plan = synth.SplitPlan(
        class_sizes=_sizes(args.sizes, classes, args.size),
        eval_size=args.eval_size,
        fractions=_fractions(args.split),
        seed=args.seed,
        strength_range=(lo, hi),
        augment_config=synth.AugmentConfig.none() if args.no_augment else synth.AugmentConfig(),
    )
    photos = None
    if args.photos:
        from encoder.assets import PHOTOS

        wanted = {p.strip() for p in args.photos.split(",") if p.strip()}
        photos = [p for p in PHOTOS if p.name in wanted]
        missing = wanted - {p.name for p in photos}
        if missing:
            raise ValueError(f"unknown bundled photos: {sorted(missing)}")
    sources = synth.load_source_faces(photos=photos)
    splits = synth.generate_splits(sources, plan)
    manifest = synth.write_dataset((s for rows in splits.values() for s in rows), args.out)
    summary = {
        "manifest": str(manifest),
        "classes": classes,
        "splits": {
            name: {
                "images": len(rows),
                "subjects": len({s.subject for s in rows}),
                "per_class": {c: sum(1 for s in rows if s.label == c) for c in classes},
            }
            for name, rows in splits.items()
        },
    }
    if args.gallery:
        summary["gallery"] = _write_gallery(args, splits["train"])
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(f"wrote {manifest}")
        for name, info in summary["splits"].items():
            sizes = ", ".join(f"{c}={n}" for c, n in info["per_class"].items())
            print(f"  {name:5s} {info['images']:5d} images, {info['subjects']:2d} subjects: {sizes}")
        if args.gallery:
            print(f"  gallery {args.gallery}: {summary['gallery']['added']} images added")
    return 0


def _write_gallery(args: argparse.Namespace, samples: list) -> dict:
    import numpy as np

    from encoder import views
    from encoder.registry import create_encoder
    from gallery import Entry, Gallery
    from gallery.png import encode_png
    from research.synth import LABELS

    if args.encoder == "finetuned":
        import encoder.models.finetuned  # noqa: F401  (registers the fine-tuned encoder)
    model = create_encoder(args.encoder, weights=args.weights)
    scheme = f"{model.spec.name}:orig"
    encoder_id = views.encoder_id([model])
    import torch

    entries = []
    with torch.no_grad():
        for start in range(0, len(samples), 64):
            batch = samples[start:start + 64]
            emb = model(model.preprocess(np.stack([s.image for s in batch]))).numpy()
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            for s, e in zip(batch, emb, strict=True):
                label = LABELS[s.label]  # made-up OMIM-style numbers and gene symbols
                entries.append(Entry(
                    image_id=s.image_id, subject_id=s.subject, syndrome_id=s.label,
                    syndrome_name=label.name, omim_id=label.omim, genes=label.genes, views=[e],
                    source=f"synthetic:{s.source_id}", crop_png=encode_png(s.image),
                    encoder_id=encoder_id, view_scheme=scheme,
                    provenance={"synthetic": True, "strength": round(s.strength, 4)},
                ))
    with Gallery.open(args.gallery, encoder_id=encoder_id, view_scheme=scheme) as gallery:
        report = gallery.add_many(entries)
    return {"path": str(args.gallery), "added": len(report.added),
            "encoder_id": encoder_id, "view_scheme": scheme}


def run_train(args: argparse.Namespace) -> int:
    from encoder.models.finetuned import save_checkpoint
    from encoder.registry import create_encoder
    from research.synth import load_face_set
    from research.train import (
        TrainConfig,
        fit_lda_head,
        labelled_features,
        matching_accuracy,
        train_head,
    )

    base = create_encoder(args.base, weights=args.base_weights)
    sets = {name: load_face_set(args.data, name) for name in ("train", "val", "test")}
    if not len(sets["train"]):
        raise ValueError(f"{args.data}/manifest.csv has no train split")
    feats = {name: labelled_features(base, s) for name, s in sets.items() if len(s)}
    config = TrainConfig(
        embedding_dim=args.embedding_dim, init=args.init,
        wccn_shrinkage=args.wccn_shrinkage, dropout=args.dropout, lr=args.lr,
        classifier_lr=args.classifier_lr, max_epochs=args.epochs, patience=args.patience,
        class_weighting="none" if args.no_class_weights else "balanced", seed=args.seed,
    )
    weights = str(args.base_weights) if args.base_weights else None
    if args.init == "lda":  # the recipe the planted protocol measures and the demo serves
        train = sets["train"]
        result = fit_lda_head(base, train.images, train.labels, train.subjects,
                              train.image_ids, config=config, base_name=args.base,
                              base_weights=weights, val=feats.get("val"))
    else:
        result = train_head(base, feats["train"], feats.get("val"), config,
                            base_name=args.base, base_weights=weights)
    report = {
        "checkpoint": str(args.out),
        "base": args.base,
        "classes": list(result.class_names),
        "train_images": len(feats["train"]),
        "best_epoch": result.best_epoch,
        "selection_metric": result.selection_metric,
        "history": [h.__dict__ for h in result.history],
    }
    if "test" in feats:
        frozen = matching_accuracy(base, feats["train"], feats["test"], ks=(1, 5))
        tuned = matching_accuracy(result.model, feats["train"], feats["test"], ks=(1, 5))
        report["test"] = {
            "frozen": {"macro_top1": frozen.macro[1], "macro_top5": frozen.macro[5],
                       "per_class_top1": {c: v[1] for c, v in frozen.per_syndrome.items()}},
            "finetuned": {"macro_top1": tuned.macro[1], "macro_top5": tuned.macro[5],
                          "per_class_top1": {c: v[1] for c, v in tuned.per_syndrome.items()}},
            "queries": frozen.n_queries,
        }
    save_checkpoint(result.model, args.out, metadata={k: v for k, v in report.items()
                                                       if k != "history"})
    report["encoder_version"] = result.model.spec.version
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(f"wrote {args.out} (best epoch {result.best_epoch} by {result.selection_metric})")
        if "test" in report:
            t = report["test"]
            print(f"  test macro top-1: frozen {args.base} {t['frozen']['macro_top1']:.3f}  "
                  f"fine-tuned {t['finetuned']['macro_top1']:.3f}  ({t['queries']} queries)")
            print(f"  test macro top-5: frozen {args.base} {t['frozen']['macro_top5']:.3f}  "
                  f"fine-tuned {t['finetuned']['macro_top5']:.3f}")
        print(f"  use it: --encoder finetuned --weights {args.out}")
    return 0
