"""Research: variants of the ``contrast`` map on region swaps, for whoever takes up its pointing.

    .venv/bin/python -m research.contrast_variants                  # bundled photos, offsets 3 1 2
    .venv/bin/python -m research.contrast_variants --photos DIR --offsets 3 --max-pairs 40
    .venv/bin/python -m research.contrast_variants --widths 0.5 1.5 2 3

Builds the pairs of ``phenolens evaluate swap`` (``explain.evaluation.swap``) once per
donor offset, and scores the query map of each variant × placement with the protocol's
own lift, pointing and off-region lift, per region:

- variants: ``query-jacobian`` (shipped: both halves through the query's tail Jacobian,
  ``explain.attribution.contrast``) and ``own-jacobians`` (each face's half through its
  own tail Jacobian, one more tail forward and backward per hit);
- drawings on the crop: ``changes`` (shipped: each cell's value divided among the pixels
  where the two crops differ, ``explain.attribution.contrast.draw``), ``peak`` (bilinear,
  cells at the peaks of their effective receptive fields, ``explain.attribution.placement``)
  and ``grid`` (bilinear, cells at their grid positions, as a plain upsampling draws them);
  with ``--widths``, also ``changes×W``: the shipped drawing with a kernel of W grid steps
  instead of one (how much the choice of one step matters).

One view (the evaluation's default). Prints one Markdown table per offset and a mean
over offsets; issue 12's notes hold the numbers it gave on the bundled photos.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.contrast import change_weights, contrast_maps, draw
from explain.attribution.engine import Explainer, FaceFeatures
from explain.attribution.placement import grid_placement, place, placement, spread
from explain.evaluation import swap

VARIANTS: tuple[str, ...] = ("query-jacobian", "own-jacobians")
PLACEMENTS: tuple[str, ...] = ("changes", "peak", "grid")


@dataclass(frozen=True)
class VariantScore:
    """One pair's query map under one variant and placement, scored as the protocol does."""

    offset: int
    region: str
    variant: str
    placement: str
    lift: float
    pointing: float
    off_lift: float


def variant_map(encoder: FaceEncoder, query: FaceFeatures, gallery: FaceFeatures,
                variant: str) -> torch.Tensor:
    """(h_f, w_f) contrast-layer map of one (query, gallery) pair (single-view features)."""
    aq, ag = query.fine_maps[0], gallery.fine_maps[0]
    eq, eg = query.embeddings[0][0], gallery.embeddings[0]
    shipped = contrast_maps(encoder, aq, eq, ag, eg)
    if variant == "query-jacobian":
        return shipped.maps[0]
    if variant != "own-jacobians":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    nq, ng = eq.norm(), eg.norm(dim=1)
    direction = (eq / nq - eg / ng[:, None]) / ng[:, None]  # (ê_q − ê_g)/‖e_g‖
    own = (encoder.tail_vjp(ag, direction[None])[0] * ag).sum(1)
    return 0.5 * (shipped.self_query[0] + own[0])


def score_pairs(encoder: FaceEncoder, pairs: Sequence[swap.SwapPair], offset: int,
                variants: Sequence[str] = VARIANTS,
                placements: Sequence[str] = PLACEMENTS,
                widths: Sequence[float] = ()) -> list[VariantScore]:
    explainer = Explainer(encoder)
    regions = tuple(dict.fromkeys(p.region for p in pairs))  # as the protocol's control
    scores = []
    for pair in pairs:
        size = pair.query.shape[:2]
        others = swap.other_region_masks(pair, regions)
        query, gallery = explainer.encode(pair.query), explainer.encode(pair.gallery[None])
        for variant in variants:
            cells = variant_map(encoder, query, gallery, variant)
            grid = tuple(cells.shape)
            for name in placements:
                if name == "changes":
                    drawn = draw(cells[None], encoder, size, pair.query, pair.gallery[None])
                else:
                    where = (placement(encoder, grid) if name == "peak"
                             else grid_placement(grid, size))
                    drawn = place(cells[None], where, size)
                drawn = drawn[0].numpy()
                scores.append(VariantScore(offset, pair.region, variant, name,
                                           *swap.map_scores(drawn, pair, others)))
            changes = change_weights(pair.query, pair.gallery[None]) if widths else None
            for width in widths:
                drawn = spread(cells[None], placement(encoder, grid), size, changes,
                               width=width)[0].numpy()
                scores.append(VariantScore(offset, pair.region, variant, f"changes×{width:g}",
                                           *swap.map_scores(drawn, pair, others)))
    return scores


def table(scores: Sequence[VariantScore], title: str) -> str:
    """Markdown: a row per variant × placement, lift / pointing per region, then the mean
    lift / pointing and the off-region lift."""
    regions = [r for r in swap.SWAP_REGIONS if any(s.region == r for s in scores)]
    lines = [f"### {title}", "",
             "| variant | drawn | " + " | ".join(regions) + " | mean | off-region |",
             "|---|---|" + "---|" * (len(regions) + 2)]
    rows = dict.fromkeys((s.variant, s.placement) for s in scores)
    for variant, where in rows:
        mine = [s for s in scores if (s.variant, s.placement) == (variant, where)]
        cells = []
        for region in regions:
            r = [s for s in mine if s.region == region]
            cells.append(f"{np.mean([s.lift for s in r]):.2f} / "
                         f"{np.mean([s.pointing for s in r]):.2f}")
        cells.append(f"{np.mean([s.lift for s in mine]):.2f} / "
                     f"{np.mean([s.pointing for s in mine]):.2f}")
        cells.append(f"{np.mean([s.off_lift for s in mine]):.2f}")
        lines.append(f"| {variant} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.contrast_variants",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="a folder of single-face photos "
                        "(default: the bundled photos)")
    parser.add_argument("--offsets", type=int, nargs="+", default=[3, 1, 2],
                        help="donor offsets, one pair set each")
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--widths", type=float, nargs="*", default=[],
                        help="also draw the shipped map with kernels of these grid steps")
    args = parser.parse_args(argv)
    from encoder.assets import PHOTOS, PHOTOS_DIR
    from encoder.registry import create_encoder

    if args.photos is None:
        folder, identities = PHOTOS_DIR, {p.name: p.person for p in PHOTOS}
        exclude = tuple(p.name for p in PHOTOS if p.faces != 1 or p.aligned)
    else:
        folder, identities, exclude = args.photos, {}, ()
    encoder = create_encoder("sface")
    photos, _ = swap.load_photos(folder, identities=identities, exclude=exclude)
    everything, count = [], 0
    for offset in args.offsets:
        pairs, _ = swap.build_pairs(photos, max_pairs=args.max_pairs, offset=offset)
        scores = score_pairs(encoder, pairs, offset, widths=args.widths)
        everything, count = everything + scores, count + len(pairs)
        print(table(scores, f"donor offset {offset}: {len(pairs)} pairs"))
    if len(args.offsets) > 1:
        print(table(everything, f"all offsets: {count} pairs"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
