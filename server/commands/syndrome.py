"""``phenolens composite | syndrome-map | fill-in``: syndrome-level explanations as PNGs.

    phenolens composite --gallery G.sqlite --syndrome ID --out composite.png [--balance-subjects]
    phenolens composite --photos a.jpg b.jpg ... --out composite.png
    phenolens syndrome-map --gallery G.sqlite --syndrome ID [--query IMG] --out DIR
    phenolens fill-in IMG (--syndrome ID | --gallery-id N) --gallery G.sqlite --out DIR
    phenolens fill-in IMG --target OTHER.jpg --out DIR

A group is a syndrome of the gallery (``--syndrome``), chosen gallery images
(``--ids``) or photos (``--photos``, composite and syndrome-map only). Every
command also runs against a server with ``--server HOST:PORT`` (the gallery is
then the server's). ``--json`` prints a summary document.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _group_arguments(p: argparse.ArgumentParser, *, photos: bool = True) -> None:
    g = p.add_argument_group("group")
    g.add_argument("--gallery", type=Path, help="gallery file (local mode)")
    g.add_argument("--syndrome", help="syndrome id: all its gallery images")
    g.add_argument("--ids", help="comma-separated gallery ids instead of a syndrome")
    if photos:
        g.add_argument("--photos", type=Path, nargs="+", help="photos as the group (local mode)")
    g.add_argument("--exclude-subjects", default="", help="comma-separated subject ids to leave out")
    g.add_argument("--min-size", type=int, default=2, help="smallest group accepted (default 2)")


def _encoder_arguments(p: argparse.ArgumentParser) -> None:
    from server.remote import add_remote_arguments

    p.add_argument("--config", type=Path, help="PhenoLens configuration file (YAML or TOML)")
    enc = p.add_argument_group("encoder")
    enc.add_argument("--encoder", help="encoder name, e.g. sface")
    enc.add_argument("--weights", type=Path, help="checkpoint for the encoder")
    enc.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                     help="add the mirrored view (default: from the configuration)")
    enc.add_argument("--view-scheme", help='explicit views, e.g. "sface:orig,sface:flip"')
    enc.add_argument("--aligned", action="store_true", help="the photos are aligned crops")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_remote_arguments(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S
    from explain.syndrome.fill_in import FILLS, MASK_KINDS, FillInOptions

    comp = subparsers.add_parser("composite", help="mean aligned face of a syndrome or group",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _group_arguments(comp)
    comp.add_argument("--balance-subjects", action="store_true",
                      help="every subject weighs the same (default: every image)")
    comp.add_argument("--out", type=Path, required=True, help="PNG file to write")
    _encoder_arguments(comp)
    comp.set_defaults(func=run_composite)

    smap = subparsers.add_parser(
        "syndrome-map", help="syndrome-wise similarity maps (and a query's pull towards it)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _group_arguments(smap)
    smap.add_argument("--query", type=Path, help="also map what pulls this face towards the group")
    smap.add_argument("--out", type=Path, required=True, help="output folder")
    _encoder_arguments(smap)
    smap.set_defaults(func=run_syndrome_map)

    d = FillInOptions()
    fill = subparsers.add_parser(
        "fill-in", help="fill in the blanks: what the model paints into masked patches",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fill.add_argument("image", type=Path, help="the face to fill in")
    _group_arguments(fill, photos=False)
    fill.add_argument("--gallery-id", help="target: one gallery face")
    fill.add_argument("--target", type=Path, help="target: another photo")
    fill.add_argument("--masks", choices=MASK_KINDS, default=d.masks)
    fill.add_argument("--count", type=int, default=d.count, help=f"masks (default {d.count})")
    fill.add_argument("--ratio", type=float, default=d.ratio, help="fraction of patches per mask")
    fill.add_argument("--patch", type=int, default=d.patch, help="patch side in pixels")
    fill.add_argument("--fill", choices=FILLS, default=d.fill, help="value of blanked pixels")
    fill.add_argument("--step", type=float, default=d.step, help="gray levels per gradient step")
    fill.add_argument("--steps", type=int, default=d.steps, help="gradient steps of the check")
    fill.add_argument("--threshold", type=float, default=d.threshold,
                      help="quantile of the gradient norm below which the update is not shown")
    fill.add_argument("--seed", type=int, default=d.seed)
    fill.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="forward passes")
    fill.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="seconds")
    fill.add_argument("--out", type=Path, required=True, help="output folder")
    _encoder_arguments(fill)
    fill.set_defaults(func=run_fill_in, min_size=1)


# ---- local plumbing --------------------------------------------------------------------------

def _ids(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in (text or "").split(",") if v.strip())


def _local(args: argparse.Namespace):
    from explain.attribution.engine import Explainer
    from server.commands.gallery import PipelineEmbedder
    from server.config import load_config

    embed = PipelineEmbedder(load_config(args.config), args)
    return embed, Explainer(embed.ensemble)


def _local_group(args: argparse.Namespace, embed: Any):
    import numpy as np

    from server.syndrome_servicer import GalleryGroup, load_group

    if getattr(args, "photos", None):
        crops = np.stack([embed(p)[1] for p in args.photos])
        return GalleryGroup(f"{len(args.photos)} photos", crops, (), tuple(
            str(p) for p in args.photos))
    if args.gallery is None:
        raise ValueError("name the group: --gallery with --syndrome or --ids (or --photos)")
    from gallery import Gallery

    with Gallery.open(args.gallery, create=False) as gallery:
        return load_group(gallery, syndrome_id=args.syndrome or "", gallery_ids=_ids(args.ids),
                          exclude_subjects=tuple(s for s in args.exclude_subjects.split(",") if s))


def _emit(args: argparse.Namespace, doc: dict, text: str) -> None:
    print(json.dumps(doc, ensure_ascii=False) if args.json else text)


def _remote(args: argparse.Namespace):
    from phenolens.syndrome import SyndromeClient

    from server.remote import client_from_args

    client = client_from_args(args)
    return client, SyndromeClient(client)


def _remote_group(args: argparse.Namespace) -> dict:
    return {"syndrome_id": args.syndrome or "", "gallery_ids": [str(i) for i in _ids(args.ids)],
            "exclude_subjects": [s for s in args.exclude_subjects.split(",") if s]}


# ---- commands --------------------------------------------------------------------------------

def run_composite(args: argparse.Namespace) -> int:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.server:
        client, syn = _remote(args)
        with client:
            result = syn.composite(**_remote_group(args), min_size=args.min_size,
                                   balance_subjects=args.balance_subjects)
        args.out.write_bytes(result.png)
        summary = result.group
        doc = {"label": summary.label, "images": summary.images, "subjects": summary.subjects,
               "warnings": list(summary.warnings), "file": str(args.out)}
    else:
        from explain.syndrome.maps import composite
        from gallery.png import encode_png

        group = _local_group(args, _local(args)[0] if getattr(args, "photos", None) else None)
        comp = composite(group.crops, subjects=group.subjects, min_size=args.min_size,
                         balance="subject" if args.balance_subjects else "image")
        args.out.write_bytes(encode_png(comp.image))
        doc = {"label": group.label, "images": comp.check.images, "subjects": comp.check.subjects,
               "warnings": list(comp.warnings), "file": str(args.out)}
    _emit(args, doc, f"composite of {doc['label']} ({doc['images']} images, {doc['subjects']} "
          f"subjects) -> {args.out}" + "".join(f"\n  warning: {w}" for w in doc["warnings"]))
    return 0


def run_syndrome_map(args: argparse.Namespace) -> int:
    import numpy as np

    args.out.mkdir(parents=True, exist_ok=True)
    if args.server:
        client, syn = _remote(args)
        with client:
            result = syn.syndrome_map(**_remote_group(args), min_size=args.min_size,
                                      query=args.query, aligned=args.aligned, members=True,
                                      overlays=True)
        files = {"composite": args.out / "composite.png",
                 "to_centroid": args.out / "to_centroid.png", "to_rest": args.out / "to_rest.png"}
        files["composite"].write_bytes(result.composite_png)
        files["to_centroid"].write_bytes(result.to_centroid_overlay_png)
        files["to_rest"].write_bytes(result.to_rest_overlay_png)
        if result.query is not None:
            files["query_pull"] = args.out / "query_pull.png"
            files["query_pull"].write_bytes(result.query.overlay_png)
        summary, mean_c, mean_r = result.group, result.mean_cosine_to_centroid, \
            result.mean_cosine_to_rest
        label, images, subjects, warnings = summary.label, summary.images, summary.subjects, \
            list(summary.warnings)
        query_cos = result.query.cosine if result.query is not None else None
        maps_c, maps_r = result.to_centroid, result.to_rest
    else:
        from explain.render import overlay_png, symmetric_limit
        from explain.syndrome.maps import SyndromeExplainer, composite, syndrome_figure
        from gallery.png import encode_png

        embed, explainer = _local(args)
        group = _local_group(args, embed)
        syn = SyndromeExplainer(explainer)
        maps = syn.syndrome_maps(group.crops, subjects=group.subjects, min_size=args.min_size)
        comp = composite(group.crops, subjects=group.subjects, min_size=args.min_size)
        query_crop = pull = None
        if args.query is not None:
            query_crop = embed(args.query)[1]
            pull = syn.query_pull(query_crop, maps.centroid)
        files = {"figure": args.out / "syndrome_map.png", "composite": args.out / "composite.png",
                 "to_centroid": args.out / "to_centroid.png", "to_rest": args.out / "to_rest.png"}
        syndrome_figure(comp.image, maps, label=group.label, query_crop=query_crop, pull=pull,
                        path=str(files["figure"]))
        limit = symmetric_limit(maps.to_centroid_aligned, maps.to_rest_aligned)
        files["composite"].write_bytes(encode_png(comp.image))
        overlay_png(comp.image, maps.to_centroid_aligned, files["to_centroid"], limit=limit)
        overlay_png(comp.image, maps.to_rest_aligned, files["to_rest"], limit=limit)
        if pull is not None:
            files["query_pull"] = args.out / "query_pull.png"
            overlay_png(query_crop, pull.map_aligned, files["query_pull"])
            np.save(args.out / "query_pull.npy", pull.map)
        label, images, subjects, warnings = group.label, maps.check.images, \
            maps.check.subjects, list(maps.check.warnings)
        mean_c, mean_r = maps.mean_cosine_to_centroid, maps.mean_cosine_to_rest
        query_cos = pull.cosine if pull is not None else None
        maps_c, maps_r = maps.to_centroid, maps.to_rest
    np.save(args.out / "to_centroid.npy", maps_c)
    np.save(args.out / "to_rest.npy", maps_r)
    doc = {"label": label, "images": images, "subjects": subjects, "warnings": warnings,
           "mean_cosine_to_centroid": mean_c, "mean_cosine_to_rest": mean_r,
           "query_cosine_to_centroid": query_cos, "files": {k: str(v) for k, v in files.items()}}
    text = (f"{label}: {images} images, {subjects} subjects; cosine to centroid {mean_c:.3f}, "
            f"to rest {mean_r:.3f}" + (f"; query {query_cos:.3f}" if query_cos is not None else "")
            + f" -> {args.out}" + "".join(f"\n  warning: {w}" for w in warnings))
    _emit(args, doc, text)
    return 0


def run_fill_in(args: argparse.Namespace) -> int:
    from PIL import Image

    args.out.mkdir(parents=True, exist_ok=True)
    targets = sum(bool(t) for t in (args.syndrome or args.ids, args.gallery_id, args.target))
    if targets != 1:
        raise ValueError("name one target: --syndrome/--ids, --gallery-id or --target")
    opts = {k: getattr(args, k) for k in ("masks", "count", "ratio", "patch", "fill", "step",
                                          "steps", "threshold", "seed")}
    if args.server:
        client, syn = _remote(args)
        target: dict[str, Any] = ({"target_image": args.target} if args.target else
                                  {"gallery_id": args.gallery_id} if args.gallery_id else
                                  {"syndrome_id": args.syndrome or "",
                                   "gallery_ids": [str(i) for i in _ids(args.ids)]})
        with client:
            result = syn.fill_in(args.image, aligned=args.aligned, overlays=True, **target,
                                 **opts)
        label, figure = result.target_label, result.figure_png
        c = result.consistency
        (args.out / "fill_in.png").write_bytes(figure)
    else:
        import numpy as np

        from encoder.image import decode_image
        from explain.syndrome.fill_in import FillIn, FillInOptions, fill_in_figure
        from explain.syndrome.maps import SyndromeExplainer

        embed, explainer = _local(args)
        crop = embed(args.image)[1]
        if args.target:
            target_crops, label = embed(args.target)[1][None], args.target.stem
        elif args.gallery_id:
            from gallery import Gallery

            with Gallery.open(args.gallery, create=False) as gallery:
                record = gallery.get(int(args.gallery_id))
            target_crops = decode_image(record.crop_png)[None]
            label = record.info.syndrome_name or record.info.syndrome_id
        else:
            group = _local_group(args, embed)
            target_crops, label = group.crops, group.label
        target = SyndromeExplainer(explainer).centroid(np.asarray(target_crops))
        result = FillIn(explainer).run(crop, target, FillInOptions(**opts), budget=args.budget,
                                       time_limit=args.time_limit)
        fill_in_figure(crop, result, label=label, path=str(args.out / "fill_in.png"))
        np.save(args.out / "gradient.npy", result.gradient)
        np.save(args.out / "update.npy", result.update)
        c = result.consistency
    Image.fromarray(result.filled).save(args.out / "filled.png")
    Image.fromarray(result.expected_fill).save(args.out / "expected_fill.png")
    doc = {"target": label, "score": result.score, "score_updated": result.score_updated,
           "fraction_improved": c.fraction_improved, "mean_gain": c.mean_gain,
           "control_fraction_improved": c.control_fraction_improved,
           "control_mean_gain": c.control_mean_gain, "consistent": bool(c.consistent),
           "forward_passes": result.forward_passes, "seconds": result.seconds,
           "out": str(args.out)}
    _emit(args, doc, f"fill in towards {label}: filled closer in {c.fraction_improved:.0%} of "
          f"masks (mean gain {c.mean_gain:+.4f}; random control {c.control_mean_gain:+.4f}); "
          f"{result.forward_passes} forward passes, {result.seconds:.1f} s -> {args.out}")
    return 0
