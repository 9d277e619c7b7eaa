"""``phenolens evaluate {faithfulness,sanity,localization,cost,accuracy,swap,all}``.

Each protocol writes ``<protocol>.json``, ``<protocol>.md`` and its PNG plots
into ``--out DIR``; ``all`` runs every explanation protocol (and accuracy when
splits are given) and also writes ``report.md`` with every table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

PROTOCOLS = ("faithfulness", "sanity", "localization", "cost", "accuracy", "swap", "planted",
             "effects", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure explanations (faithfulness, sanity, localisation, cost) and matching accuracy",
        description=(
            "Evaluation protocols of PhenoLens (issue 7). Explanations are scored on face pairs "
            "against the pair similarity with norms held constant; accuracy follows "
            "GestaltMatcher's macro top-k on subject-disjoint splits."
        ),
    )
    parser.add_argument(
        "protocol",
        help=f"one of {', '.join(PROTOCOLS)}, or several joined by commas "
        "(localization then reuses the maps of faithfulness)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--encoder", default="sface", help="encoder name (default sface)")
    parser.add_argument("--weights", type=Path, help="checkpoint for the encoder")
    parser.add_argument("--flip", action="store_true", help="add the mirrored view")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="attribution methods, space- or comma-separated (default: every method of the "
        "family; the heavy ones take minutes per pair on a CPU)",
    )
    parser.add_argument(
        "--pair",
        nargs=3,
        action="append",
        metavar=("QUERY", "GALLERY", "KIND"),
        help="an image pair to explain (KIND: same or impostor); repeatable. "
        "Default: the bundled real photo pairs (2 same-person, 4 impostor)",
    )
    parser.add_argument("--max-pairs", type=int, help="use only the first N pairs")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option, e.g. occlusion.stride=14 or rise.masks=128; repeatable",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    faith = parser.add_argument_group("faithfulness")
    faith.add_argument("--steps", type=int, default=16, help="perturbation steps per curve")
    faith.add_argument("--random-orders", type=int, default=5, help="random orders per pair")
    faith.add_argument("--baselines", default="blur,mean", help="comma-separated: blur, mean")
    faith.add_argument("--no-captum", action="store_true", help="skip infidelity/max-sensitivity")
    faith.add_argument("--perturb-samples", type=int, default=8, help="captum n_perturb_samples")
    faith.add_argument(
        "--sensitivity-pairs", type=int, help="max-sensitivity on the first N pairs only"
    )

    sanity = parser.add_argument_group("sanity")
    sanity.add_argument(
        "--stages",
        help="comma-separated numbers of top units to randomise (default 0,1,2,4,...,all; "
        "'all' is allowed)",
    )
    sanity.add_argument("--sanity-pairs", type=int, default=2, help="pairs used by sanity checks")
    sanity.add_argument("--label-permutations", type=int, default=5)

    loc = parser.add_argument_group("localization")
    loc.add_argument("--k", type=float, default=1.0, help="threshold at mean + k std")

    cost = parser.add_argument_group("cost")
    cost.add_argument("--repeats", type=int, default=3)
    cost.add_argument("--noise", type=float, default=2.0, help="pixel noise std for consistency")

    swap = parser.add_argument_group("swap (one region pasted from another person's photo)")
    swap.add_argument("--photos", type=Path,
                      help="folder of single-face photos (default: the bundled data/photos)")
    swap.add_argument("--regions", nargs="+", help="of eyes brows nose mouth chin (default all)")
    swap.add_argument("--same-person", type=Path, metavar="CSV",
                      help="photo,person rows: donors are never the same person (default: "
                      "sub-folder names, if any)")
    swap.add_argument("--budget", type=int, help="forward passes per map (default the family's)")
    swap.add_argument("--time-limit", type=float, help="seconds per map (default the family's)")

    eff = parser.add_argument_group(
        "effects (maps against the model's own region effects; --photos, --same-person, "
        "--max-pairs and --methods as above, default methods: the served defaults)")
    eff.add_argument("--no-variants", action="store_true",
                     help="no altered copies of each photo as extra same-person pairs")
    eff.add_argument("--trap-pairs", type=int, default=12,
                     help="region swaps with a nuisance change for the trap (default 12)")

    acc = parser.add_argument_group("accuracy")
    acc.add_argument("--gallery", type=Path, help="gallery file holding both splits' embeddings")
    acc.add_argument("--embeddings", type=Path, help="or an .npz with image_ids and embeddings")
    acc.add_argument("--gallery-split", type=Path, help="GM split CSV of the gallery images")
    acc.add_argument("--test-split", type=Path, help="GM split CSV of the test images")
    acc.add_argument("--ks", default="1,5,10,30")

    planted = parser.add_argument_group(
        "planted (synthetic syndromes: is the planted region found? research.planted; "
        "always with the mirrored view, as served)")
    planted.add_argument("--folds", type=int, default=5, help="subject-disjoint folds")
    planted.add_argument("--planted-encoders", default="frozen,finetuned",
                         help="frozen (SFace as is) and/or finetuned (a syndrome head fitted "
                         "per fold: research.train init='lda')")
    planted.add_argument("--effects-mode", default="pixels",
                         help="pixels (the served region effects, default) or features "
                         "(contrast-layer edits: cheaper, agree less)")
    parser.set_defaults(func=run)


def _run_planted(args: argparse.Namespace) -> int:
    """``phenolens evaluate planted``: the table in planted.md, every row in planted.json."""
    from research.planted import PlantedConfig, markdown, run_planted

    args.out.mkdir(parents=True, exist_ok=True)
    config = PlantedConfig(folds=args.folds, seed=args.seed, mode=args.effects_mode,
                           encoders=tuple(e.strip() for e in args.planted_encoders.split(",")))
    result = run_planted(config, log=lambda line: print(line, file=sys.stderr))
    table = markdown(result)
    (args.out / "planted.md").write_text("# Planted-feature protocol\n\n" + table)
    (args.out / "planted.json").write_text(json.dumps(result, indent=1))
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
               for k, v in result["encoders"].items()}
    print(json.dumps(summary) if args.json else table)
    return 0


def _run_effects(args: argparse.Namespace) -> int:
    """``phenolens evaluate effects``: effects.md, effects.json, effects_examples.png."""
    from encoder.assets import PHOTOS, PHOTOS_DIR
    from encoder.pipeline import FacePipeline
    from explain.attribution.engine import Explainer
    from explain.defaults import DEFAULT_METHODS
    from explain.effects import bundled_neutral
    from explain.evaluation import effects as E
    from explain.evaluation import swap

    pipeline = FacePipeline()
    if args.photos is None:  # the bundled photos, every face of the group photo too
        photos, _ = swap.load_photos(PHOTOS_DIR, pipeline, {p.name: p.person for p in PHOTOS},
                                     exclude=tuple(p.name for p in PHOTOS
                                                   if p.faces != 1 or p.aligned))
        faces = [E.Face(p.name, p.person, p.face.crop) for p in photos]
        for p in PHOTOS:
            if p.faces > 1 and p.path.exists():
                faces += [E.Face(f"{p.name}#{k}", f"{p.person}#{k}", f.crop)
                          for k, f in enumerate(pipeline.faces(p.path))]
    else:
        identities = swap.read_identities(args.same_person) if args.same_person else {}
        photos, skipped = swap.load_photos(args.photos, pipeline, identities)
        faces = [E.Face(p.name, p.person, p.face.crop) for p in photos]
        for name, why in skipped.items():
            print(f"effects: skipped {name}: {why}", file=sys.stderr)
    if len(faces) < 3:
        raise ValueError(f"need at least 3 usable single-face photos, found {len(faces)}")
    encoder, model = _model(args)
    methods = tuple(m.strip() for m in ",".join(args.methods).split(",") if m.strip()) \
        if args.methods else DEFAULT_METHODS
    result = E.evaluate_effects(Explainer(model), faces, methods,
                                neutral=bundled_neutral(pipeline),
                                max_pairs=args.max_pairs or 30, variants=not args.no_variants,
                                trap_pairs=args.trap_pairs,
                                log_line=lambda line: print(line, file=sys.stderr))
    E.write(result, args.out)
    print(json.dumps(result.to_json()) if args.json else E.markdown(result))
    print(f"wrote {args.out / 'effects.md'}, effects.json, effects_examples.png", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ helpers


def _method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        try:
            key, raw = item.split("=", 1)
            method, name = key.rsplit(".", 1)
        except ValueError:
            raise ValueError(f"--option must look like METHOD.KEY=VALUE, got {item!r}") from None
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[name] = value
    return out


def _pairs(args: argparse.Namespace):
    from explain.evaluation.common import DEFAULT_PAIRS, FacePair, photo_pairs

    if not args.pair:
        pairs = photo_pairs(DEFAULT_PAIRS)
    else:
        from encoder.pipeline import FacePipeline

        pipeline = FacePipeline()
        pairs = []
        for q, g, kind in args.pair:
            fq, fg = pipeline.face(Path(q)), pipeline.face(Path(g))
            pairs.append(
                FacePair(
                    f"{Path(q).stem}~{Path(g).stem}",
                    kind,
                    fq.alignment.crop,
                    fg.alignment.crop,
                    fq.alignment.landmarks_crop,
                )
            )
    return pairs[: args.max_pairs] if args.max_pairs else pairs


def _model(args: argparse.Namespace):
    from encoder.registry import create_encoder
    from explain.attribution.views import SingleEncoderViews

    encoder = create_encoder(args.encoder, weights=args.weights)
    return encoder, SingleEncoderViews(encoder, flip=args.flip)


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    from explain.evaluation.common import available_methods

    if not args.methods:
        return available_methods()
    return tuple(m.strip() for m in ",".join(args.methods).split(",") if m.strip())


def _stages(args: argparse.Namespace, n_units: int) -> list[int] | None:
    if not args.stages:
        return None
    out = []
    for s in args.stages.split(","):
        s = s.strip()
        out.append(n_units if s == "all" else min(int(s), n_units))
    return out


def _label_gallery() -> tuple[list, list]:
    """The bundled single-face photos labelled by person, for the label-permutation check."""
    from encoder.assets import PHOTOS
    from encoder.pipeline import FacePipeline

    pipeline = FacePipeline()
    crops, labels, names = [], [], []
    for p in PHOTOS:
        if p.faces != 1:
            continue
        face = pipeline.face(p.path, aligned=p.aligned)
        crops.append(face.alignment.crop)
        labels.append(p.person)
        names.append(p.name)
    return crops, list(zip(names, labels, strict=True))


# ----------------------------------------------------------------------- protocols


def _faithfulness(args, model, pairs, methods, options, out: Path) -> tuple[str, dict]:
    from explain.evaluation import faithfulness
    from explain.evaluation import report as R

    result = faithfulness.faithfulness(
        model,
        pairs,
        methods,
        steps=args.steps,
        baselines=tuple(b.strip() for b in args.baselines.split(",")),
        n_random=args.random_orders,
        captum_metrics=not args.no_captum,
        n_perturb_samples=args.perturb_samples,
        sensitivity_pairs=args.sensitivity_pairs,
        method_options=options,
        seed=args.seed,
    )
    md = R.faithfulness_markdown(result)
    plots = R.plot_curves(result, out)
    summary = {f"{m}|{side}|{b}": v for (m, side, b), v in R.curve_summary(result.curves).items()}
    R.write_report(out, "faithfulness", {"summary": summary, "result": result}, md)
    info = {"plots": [str(p) for p in plots], "summary": summary, "errors": result.errors}
    return md, info, result.maps


def _sanity(args, encoder, pairs, methods, options, out: Path) -> tuple[str, dict]:
    import numpy as np

    from explain.attribution.views import SingleEncoderViews
    from explain.evaluation import report as R
    from explain.evaluation import sanity

    sane_pairs = _sanity_pairs(pairs, args.sanity_pairs)
    units = sanity.randomisation_units(encoder)
    steps, units, errors = sanity.cascading_randomisation(
        encoder,
        sane_pairs,
        methods,
        stages=_stages(args, len(units)),
        flip=args.flip,
        method_options=options,
        seed=args.seed,
    )
    labels: list = []
    if args.label_permutations > 0:
        crops, meta = _label_gallery()
        per_query = []
        for i, (name, person) in enumerate(meta):
            same = [j for j, (_, p) in enumerate(meta) if p == person and j != i]
            if not same or not name.endswith("_1.jpg"):
                continue
            keep = [j for j in range(len(meta)) if j != i]
            per_query.append(
                sanity.label_randomisation(
                    SingleEncoderViews(encoder, flip=args.flip),
                    crops[i],
                    np.stack([crops[j] for j in keep]),
                    [meta[j][1] for j in keep],
                    person,
                    n_permutations=args.label_permutations,
                    seed=args.seed,
                )
            )
        for method_rows in zip(*per_query, strict=True):
            labels.append(
                sanity.LabelRandomisation(
                    method=method_rows[0].method,
                    spearman=float(np.mean([r.spearman for r in method_rows])),
                    spearman_abs=float(np.mean([r.spearman_abs for r in method_rows])),
                    ssim=float(np.mean([r.ssim for r in method_rows])),
                    n_permutations=method_rows[0].n_permutations * len(method_rows),
                )
            )
    result = sanity.SanityResult(tuple(steps), tuple(units), tuple(labels), errors)
    md = R.sanity_markdown(result)
    plot = R.plot_cascade(result, out)
    passed = {"full": result.passed(), "every_stage": result.passed(every_stage=True)}
    R.write_report(
        out,
        "sanity",
        {"passed": passed, "pairs": [p.name for p in sane_pairs], "result": result},
        md,
    )
    return md, {"plots": [str(plot)], "passed": passed, "errors": errors}


def _sanity_pairs(pairs, n: int):
    """The first same-person pairs and impostor pairs, alternating, n in all."""
    same = [p for p in pairs if p.kind == "same"]
    other = [p for p in pairs if p.kind != "same"]
    mixed = [p for pair in zip(same, other, strict=False) for p in pair]
    mixed += [p for p in pairs if p not in mixed]
    return mixed[:n]


def _localization(args, model, pairs, methods, options, out: Path, maps=None) -> tuple[str, dict]:
    from explain.evaluation import common as E
    from explain.evaluation import localization
    from explain.evaluation import report as R

    errors: dict[str, str] = {}
    if maps is None:  # one pass over the methods serves both sides
        maps, errors = E.query_maps(model, pairs, methods, method_options=options)
    pos = localization.localisation(model, pairs, tuple(maps), k=args.k, maps=maps)
    neg = localization.localisation(model, pairs, tuple(maps), k=args.k, side="negative", maps=maps)
    md = R.localisation_markdown(pos) + "\n" + R.localisation_markdown(neg)
    R.write_report(out, "localization", {"positive": pos, "negative": neg}, md)
    return md, {"iou": pos.iou, "iou_star": pos.iou_star, "errors": errors}


def _cost(args, model, pairs, methods, options, out: Path) -> tuple[str, dict]:
    from explain.evaluation import cost
    from explain.evaluation import report as R

    result = cost.cost_and_consistency(
        model,
        pairs,
        methods,
        repeats=args.repeats,
        noise_std=args.noise,
        method_options=options,
        seed=args.seed,
    )
    md = R.cost_markdown(result)
    R.write_report(out, "cost", {"result": result}, md)
    return md, {"seconds": result.seconds, "errors": result.errors}


def _accuracy(args, out: Path) -> tuple[str, dict]:
    import numpy as np

    from explain.evaluation import accuracy
    from explain.evaluation import report as R
    from gallery import accuracy as A

    if not (args.gallery_split and args.test_split) or not (args.gallery or args.embeddings):
        raise ValueError(
            "accuracy needs --gallery-split and --test-split, and --gallery or --embeddings"
        )
    gsplit, tsplit = A.read_split_csv(args.gallery_split), A.read_split_csv(args.test_split)
    A.assert_subject_disjoint(gsplit.subjects, tsplit.subjects)
    wanted = set(gsplit.image_ids) | set(tsplit.image_ids)
    vectors: dict[str, np.ndarray] = {}
    if args.embeddings:
        data = np.load(args.embeddings, allow_pickle=False)
        for image_id, emb in zip(data["image_ids"], data["embeddings"], strict=True):
            if str(image_id) in wanted:
                vectors[str(image_id)] = np.asarray(emb)
    else:
        from gallery import Gallery

        with Gallery.open(args.gallery, create=False) as gallery:
            for record in gallery.iter_records():
                if record.info.image_id in wanted:
                    vectors[record.info.image_id] = np.stack([np.asarray(v) for v in record.views])
    missing = wanted - set(vectors)
    if missing:
        raise A.AccuracyError(f"{len(missing)} split image(s) have no embedding in the source")
    ks = tuple(int(k) for k in args.ks.split(","))
    result = accuracy.accuracy(
        np.stack([vectors[i] for i in tsplit.image_ids]),
        tsplit,
        np.stack([vectors[i] for i in gsplit.image_ids]),
        gsplit,
        ks,
    )
    md = R.accuracy_markdown(result)
    R.write_report(out, "accuracy", {"result": result}, md)
    return md, {"macro": result.macro, "micro": result.micro}


def _swap(args, model, methods, out: Path) -> tuple[str, dict]:
    from encoder.assets import PHOTOS, PHOTOS_DIR
    from explain.evaluation import report as R
    from explain.evaluation import swap
    from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S

    if args.photos is None:  # the bundled photos: skip the group photo and the aligned crop
        folder, identities = PHOTOS_DIR, {p.name: p.person for p in PHOTOS}
        exclude = tuple(p.name for p in PHOTOS if p.faces != 1 or p.aligned)
    else:
        folder, exclude = args.photos, ()
        identities = swap.read_identities(args.same_person) if args.same_person else {}
    regions = tuple(r for r in ",".join(args.regions or swap.SWAP_REGIONS).split(",") if r)
    unknown = [r for r in regions if r not in swap.SWAP_REGIONS]
    if unknown:
        raise ValueError(f"unknown swap region(s) {unknown}; choose from {swap.SWAP_REGIONS}")
    photos, skipped_photos = swap.load_photos(folder, identities=identities, exclude=exclude)
    pairs, skipped_pairs = swap.build_pairs(photos, regions, max_pairs=args.max_pairs)
    maps: dict = {}
    result = swap.evaluate_swaps(
        model, pairs, methods,
        budget=DEFAULT_BUDGET if args.budget is None else args.budget,
        time_limit=DEFAULT_TIME_LIMIT_S if args.time_limit is None else args.time_limit,
        steps=args.steps, seed=args.seed, skipped_photos=skipped_photos,
        skipped_pairs=skipped_pairs, maps_out=maps)
    md = swap.swap_markdown(result)
    plot = swap.plot_examples(pairs, maps, result.methods, out / "swap_examples.png")
    R.write_report(out, "swap", {"result": result}, md)
    return md, {"plots": [str(plot)], "summary": result.summary, "errors": result.errors}


# ---------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    import torch

    from explain.evaluation import report as R

    if args.protocol == "planted":
        return _run_planted(args)
    if args.protocol == "effects":
        return _run_effects(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    options = _method_options(args.option)
    wanted: list[str] = []
    for name in args.protocol.split(","):
        name = name.strip()
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
        if name == "all":
            wanted += ["faithfulness", "localization", "sanity", "cost"]
            if args.gallery_split and args.test_split:
                wanted.append("accuracy")
        elif name not in wanted:
            wanted.append(name)
    if "faithfulness" in wanted and "localization" in wanted:
        wanted.remove("localization")
        wanted.insert(wanted.index("faithfulness") + 1, "localization")
    maps = None
    sections: list[str] = []
    summary: dict[str, Any] = {}
    started = time.perf_counter()
    if wanted != ["accuracy"]:
        encoder, model = _model(args)
        methods = _methods(args)
    if set(wanted) - {"accuracy", "swap"}:
        pairs = _pairs(args)
    for protocol in wanted:
        t0 = time.perf_counter()
        if protocol == "faithfulness":
            md, info, maps = _faithfulness(args, model, pairs, methods, options, out)
        elif protocol == "sanity":
            md, info = _sanity(args, encoder, pairs, methods, options, out)
        elif protocol == "localization":
            md, info = _localization(args, model, pairs, methods, options, out, maps)
        elif protocol == "cost":
            md, info = _cost(args, model, pairs, methods, options, out)
        elif protocol == "swap":
            md, info = _swap(args, model, methods, out)
        else:
            md, info = _accuracy(args, out)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        summary[protocol] = info
        sections.append(md)
        print(f"{protocol}: done in {info['seconds']} s", file=sys.stderr)
    command = "phenolens " + " ".join(sys.argv[1:]) if len(sys.argv) > 2 else ""
    header = f"# PhenoLens evaluation\n\nencoder `{args.encoder}`{' + flip' if args.flip else ''}; "
    header += f"total {time.perf_counter() - started:.0f} s.\n\n" + (
        f"`{command}`\n" if command else ""
    )
    (out / "report.md").write_text(header + "\n" + "\n".join(sections))
    (out / "summary.json").write_text(json.dumps(R.to_jsonable(summary), indent=1))
    if args.json:
        print(json.dumps(R.to_jsonable(summary)))
    else:
        print("\n".join(sections))
    return 0
