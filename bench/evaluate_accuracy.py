"""GestaltMatcher's matching protocol on a synthetic syndrome gallery built from the real photos.

    .venv/bin/python -m bench.evaluate_accuracy --out /tmp/phenolens-accuracy
    .venv/bin/python -m bench.evaluate_accuracy --gallery-size 8 --test-size 4 --flip

Real syndrome photos are health data, so the protocol is exercised on the
synthetic syndromes of ``research.synth`` (localised deformations of the bundled
real faces; subject = the source person). Subjects are split into a gallery and
a test split (subject-disjoint, checked), every image is embedded with the
frozen encoder, and the test images are ranked against the gallery by
GestaltMatcher's rule (a syndrome scores its nearest gallery image): macro and
micro top-1/5/10/30. The splits are written as GM split CSVs and the embeddings
as an .npz, so ``phenolens evaluate accuracy --embeddings ... --gallery-split ...
--test-split ...`` reproduces the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def write_split_csv(path: Path, image_ids, subjects, labels) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "subject", "label"])
        writer.writerows(zip(image_ids, subjects, labels, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.evaluate_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", default="sface")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--gallery-size", type=int, default=6, help="gallery images per syndrome")
    parser.add_argument("--test-size", type=int, default=4, help="test images per syndrome")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from encoder.registry import create_encoder
    from explain.attribution.views import SingleEncoderViews
    from explain.evaluation import report as R
    from explain.evaluation.common import embed_views
    from gallery import accuracy as A
    from research import synth

    args.out.mkdir(parents=True, exist_ok=True)
    sources = synth.load_source_faces()
    plan = synth.SplitPlan(
        class_sizes={name: args.gallery_size for name in synth.SYNDROMES},
        eval_size=args.test_size,
        fractions={"train": 0.6, "test": 0.4},
        seed=args.seed,
    )
    splits = synth.generate_splits(sources, plan)
    gallery, test = synth.face_set(splits["train"]), synth.face_set(splits["test"])
    views = SingleEncoderViews(create_encoder(args.encoder), flip=args.flip)
    g_emb = embed_views(views, gallery.images)
    t_emb = embed_views(views, test.images)

    g_split = A.Split(gallery.image_ids, gallery.subjects, gallery.labels)
    t_split = A.Split(test.image_ids, test.subjects, test.labels)
    result = A.split_accuracy(t_emb, t_split, g_emb, g_split)

    write_split_csv(
        args.out / "gallery_split.csv", g_split.image_ids, g_split.subjects, g_split.labels
    )
    write_split_csv(
        args.out / "test_split.csv", t_split.image_ids, t_split.subjects, t_split.labels
    )
    np.savez(
        args.out / "embeddings.npz",
        image_ids=np.array(gallery.image_ids + test.image_ids),
        embeddings=np.concatenate([g_emb, t_emb]),
    )
    md = (
        f"{len(gallery)} gallery / {len(test)} test images, {len(synth.SYNDROMES)} synthetic "
        f"syndromes, encoder {args.encoder}{' + flip' if args.flip else ''}, "
        f"{len(set(g_split.subjects))} / {len(set(t_split.subjects))} subjects (disjoint)\n\n"
        + R.accuracy_markdown(result)
    )
    R.write_report(args.out, "accuracy", {"result": result}, md)
    print(md)
    print(json.dumps({"macro": result.macro, "micro": result.micro}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
