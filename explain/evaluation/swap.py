"""Region swaps: does a map find the one region in which two photos of a face differ?

From a folder of single-face photos, each pair replaces one landmark region
(eyes, brows, nose, mouth, chin) of a face with the same region of ANOTHER
person's face: the donor photo is warped onto the target by the 5-landmark
similarity transform, colour-matched (per-channel mean/std in a grown region),
feathered (blurred alpha) and pasted back into the original photo, which is
then detected and aligned again like any query. The pair is (query = swapped,
gallery = original); the ground truth is the paste mask (alpha > 0.5) warped
into each face's aligned crop.

Each method's query map (``explain_matches``, one query and one hit, the
method's defaults) is scored on the aligned crop (H, W):

- lift: (negative mass in the region / negative mass in the crop) / (region
  area / crop area), negative mass = sum of max(-map, 0); chance = 1, 0 for a
  map without negative mass;
- pointing: 1 when the most negative pixel lies in the region (0 without
  negative mass);
- off-region lift: the lift of the same map on the masks of the OTHER regions
  evaluated (``explain.regions`` masks of the swapped face's landmarks), averaged:
  a control (chance 1; a map that marks one place on every face, whatever was
  swapped, scores as high here as in the swapped region);
- restore AUC: the query crop's pixels, most negative first, are restored from
  the ORIGINAL photo warped into the swapped face's crop frame (restoring every
  pixel gives the original's pixels in that frame) in ``steps`` steps; the mean
  cosine to the original face along that curve (higher = the map found what
  differs), beside the same for random orders;
- cost: the forward passes the method reports (0 for the engine's batched maps,
  which read the pair's 2 encodes) and seconds of the query-side map.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from encoder.align import similarity_transform, warp_to_crop
from encoder.errors import ImageError, NoFaceFound
from encoder.pipeline import Face, FacePipeline
from encoder.spec import FaceEncoder
from explain.attribution.catalogue import METHOD_NAMES, check_methods
from explain.attribution.engine import Explainer
from explain.attribution.matches import explain_matches
from explain.attribution.views import ViewSource
from explain.effects import COLOUR_GROW, FEATHER_GROW, FEATHER_SIGMA, paste_region
from explain.evaluation import metrics as M
from explain.evaluation.common import PairTarget
from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S
from explain.regions import region_masks

log = logging.getLogger(__name__)

SWAP_REGIONS: tuple[str, ...] = ("eyes", "brows", "nose", "mouth", "chin")
PHOTO_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_EYE_DISTANCE_PX = 24.0  # smaller faces (or already-aligned crops) give no usable swap
DONOR_OFFSET = 3  # the donor is the photo this many places later in sorted order


# ------------------------------------------------------------------ photos and pairs


@dataclass(frozen=True, eq=False)
class SourcePhoto:
    """One usable photo: its name (path relative to the folder), person, decoded
    (H, W, 3) uint8 RGB and its one detected face."""

    name: str
    person: str | None
    rgb: np.ndarray = field(repr=False)
    face: Face = field(repr=False)


@dataclass(frozen=True, eq=False)
class SwapPair:
    """A swapped photo and its original, aligned.

    query: (h, w, 3) uint8 crop of the swapped photo; gallery: the original's crop;
    truth_query, truth_gallery: (h, w) bool paste masks in each crop;
    query_landmarks: (5, 2) the swapped face's landmarks in its crop;
    original_in_query: (h, w, 3) uint8 the ORIGINAL photo warped by the swapped
    face's alignment (what restoring every query pixel gives); alpha: (H, W)
    float32 paste weights in the photo; swapped_photo: (H, W, 3) uint8.
    """

    name: str
    target: str
    donor: str
    region: str
    query: np.ndarray = field(repr=False)
    gallery: np.ndarray = field(repr=False)
    truth_query: np.ndarray = field(repr=False)
    truth_gallery: np.ndarray = field(repr=False)
    query_landmarks: np.ndarray = field(repr=False)
    original_in_query: np.ndarray = field(repr=False)
    alpha: np.ndarray = field(repr=False)
    swapped_photo: np.ndarray = field(repr=False)


def read_identities(path: str | Path) -> dict[str, str]:
    """A CSV of ``photo,person`` rows (a header row ``photo,person`` is allowed) ->
    photo name -> person. Names are matched against paths relative to the folder
    and against bare file names."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2 or not row[0].strip() or row[0].strip().lower() == "photo":
                continue
            out[row[0].strip()] = row[1].strip()
    return out


def load_photos(
    folder: str | Path,
    pipeline: FacePipeline | None = None,
    identities: Mapping[str, str] | None = None,
    *,
    exclude: Sequence[str] = (),
) -> tuple[list[SourcePhoto], dict[str, str]]:
    """The folder's single-face photos in sorted order, and why others were skipped.

    The person of a photo is ``identities[name]`` (by path relative to ``folder``
    or file name), else its sub-folder's name for photos in sub-folders, else
    unknown (None: any other photo may donate). Photos without exactly one
    detected face, or with a face under ``MIN_EYE_DISTANCE_PX`` between the eyes,
    are skipped. Returns (photos, skipped name -> reason).
    """
    folder = Path(folder)
    pipeline = pipeline or FacePipeline()
    identities = identities or {}
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    photos: list[SourcePhoto] = []
    skipped: dict[str, str] = {}
    for path in paths:
        name = path.relative_to(folder).as_posix()
        if name in exclude or path.name in exclude:
            skipped[name] = "excluded"
            continue
        try:
            rgb, face = pipeline.photo_face(path)
        except NoFaceFound:
            skipped[name] = "no face found"
            continue
        except ImageError as exc:
            skipped[name] = f"unreadable ({type(exc).__name__})"
            continue
        if face.face_count != 1:
            skipped[name] = f"{face.face_count} faces (one is needed)"
            continue
        eyes = face.alignment.landmarks_photo[:2]
        if float(np.linalg.norm(eyes[1] - eyes[0])) < MIN_EYE_DISTANCE_PX:
            skipped[name] = f"face too small (eyes under {MIN_EYE_DISTANCE_PX:.0f} px apart)"
            continue
        person = identities.get(name, identities.get(path.name))
        if person is None and path.parent != folder:
            person = path.parent.relative_to(folder).as_posix()
        photos.append(SourcePhoto(name, person, rgb, face))
    for name, why in skipped.items():
        log.info("swap: skipped %s: %s", name, why)
    return photos, skipped


def donor_index(photos: Sequence[SourcePhoto], index: int, offset: int = DONOR_OFFSET) -> int:
    """The donor of ``photos[index]``: the first photo from ``offset`` places later
    (cyclically) that shows another person (any other photo when persons are
    unknown). Raises ValueError when there is none."""
    n = len(photos)
    target = photos[index]
    for step in range(n):
        j = (index + max(offset, 1) + step) % n
        other = photos[j]
        if j == index:
            continue
        if target.person is None or other.person is None or other.person != target.person:
            return j
    raise ValueError(f"no donor of another person for {target.name}")


def swap_region(
    target_rgb: np.ndarray,
    target_landmarks: np.ndarray,
    donor_rgb: np.ndarray,
    donor_landmarks: np.ndarray,
    region: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``region`` of the donor face into the target photo.

    target_rgb (H, W, 3), donor_rgb (H', W', 3) uint8; landmarks (5, 2) in each
    photo. The donor is warped onto the target by the landmarks' similarity
    transform, matched per channel (mean/std) to the target in the region grown
    by ``COLOUR_GROW`` d, and blended with a feathered alpha.
    Returns (swapped (H, W, 3) uint8, alpha (H, W) float32 in 0..1).
    """
    h, w = target_rgb.shape[:2]
    lt = np.asarray(target_landmarks, dtype=np.float64)
    matrix = similarity_transform(np.asarray(donor_landmarks, dtype=np.float64), lt)
    warped = cv2.warpAffine(donor_rgb, matrix, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    mask = region_masks(lt, size=(h, w))[region].astype(np.float32)
    d = float(np.linalg.norm(lt[1] - lt[0]))

    def kernel(fraction: float) -> np.ndarray:
        k = max(3, int(fraction * d) | 1)
        return np.ones((k, k), np.uint8)

    grown = cv2.dilate(mask, kernel(COLOUR_GROW)) > 0
    alpha = cv2.GaussianBlur(cv2.dilate(mask, kernel(FEATHER_GROW)), (0, 0),
                             max(1.0, FEATHER_SIGMA * d))
    alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    return paste_region(target_rgb, warped, alpha, grown), alpha


def build_pairs(
    photos: Sequence[SourcePhoto],
    regions: Sequence[str] = SWAP_REGIONS,
    pipeline: FacePipeline | None = None,
    *,
    max_pairs: int | None = None,
    offset: int = DONOR_OFFSET,
) -> tuple[list[SwapPair], dict[str, str]]:
    """One pair per photo and region (photos outer, regions inner, up to ``max_pairs``),
    and the pairs that were skipped with why (the swapped photo lost its face)."""
    pipeline = pipeline or FacePipeline()
    pairs: list[SwapPair] = []
    skipped: dict[str, str] = {}
    for i, target in enumerate(photos):
        donor = photos[donor_index(photos, i, offset)]
        for region in regions:
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs, skipped
            name = f"{target.name}:{region}<-{donor.name}"
            swapped, alpha = swap_region(target.rgb, target.face.alignment.landmarks_photo,
                                         donor.rgb, donor.face.alignment.landmarks_photo, region)
            try:
                face = pipeline.face(swapped)
            except NoFaceFound:
                skipped[name] = "no face found in the swapped photo"
                continue
            truth_query = warp_to_crop(alpha, face.alignment) > 0.5
            if not truth_query.any():
                skipped[name] = "the swapped region lies outside the aligned crop"
                continue
            ch, cw = face.alignment.crop_size
            original_in_query = cv2.warpAffine(target.rgb, face.alignment.photo_to_crop,
                                               (cw, ch), flags=cv2.INTER_LINEAR)
            pairs.append(SwapPair(
                name, target.name, donor.name, region, face.crop, target.face.crop,
                truth_query, warp_to_crop(alpha, target.face.alignment) > 0.5,
                np.asarray(face.alignment.landmarks_crop, dtype=np.float64), original_in_query, alpha, swapped))
    return pairs, skipped


# ------------------------------------------------------------------ metrics


def negative_lift(aligned_map: np.ndarray, truth: np.ndarray) -> float:
    """(share of the map's negative mass inside ``truth``) / (``truth``'s share of the
    map's area); chance 1, 0 when the map has no negative mass. Both (H, W)."""
    neg = np.maximum(-np.asarray(aligned_map, dtype=np.float64), 0.0)
    total = float(neg.sum())
    area = float(truth.mean())
    if total <= 0 or area <= 0:
        return 0.0
    return float(neg[truth].sum() / total / area)


def negative_pointing(aligned_map: np.ndarray, truth: np.ndarray) -> float:
    """1.0 when the most negative pixel of the (H, W) map lies in ``truth``, else 0.0
    (also 0.0 when no pixel is negative)."""
    m = np.asarray(aligned_map)
    index = int(np.argmin(m))
    return float(m.flat[index] < 0 and bool(truth.flat[index]))


def other_region_masks(pair: SwapPair, regions: Sequence[str]) -> list[np.ndarray]:
    """Masks, in the swapped face's crop, of the evaluated regions other than the swapped
    one (the off-region control's ground)."""
    masks = region_masks(pair.query_landmarks, size=pair.query.shape[:2])
    return [masks[r] for r in regions if r != pair.region]


def map_scores(aligned_map: np.ndarray, pair: SwapPair, others: Sequence[np.ndarray]
               ) -> tuple[float, float, float]:
    """(lift, pointing, off-region lift) of one (H, W) query map; the off-region lift is
    the mean lift on ``others`` (NaN without any)."""
    off = float(np.mean([negative_lift(aligned_map, m) for m in others])) if others \
        else float("nan")
    return (negative_lift(aligned_map, pair.truth_query),
            negative_pointing(aligned_map, pair.truth_query), off)


def restore_curve(
    target: PairTarget,
    swapped: np.ndarray,
    original: np.ndarray,
    order: np.ndarray,
    steps: int = 16,
) -> M.Curve:
    """Cosine to the original face while the pixels of ``order`` (H*W flat indices,
    first restored first) go from ``swapped`` back to ``original`` (both (H, W, 3))."""
    images, fractions = M.perturbation_images(original, swapped, order, steps, "insertion")
    return M.Curve("insertion", fractions, target.scores(images)[1])


# ------------------------------------------------------------------ the protocol


@dataclass(frozen=True)
class SwapScore:
    """One method's query map on one pair; off_lift: mean lift on the other evaluated
    regions (a control); restore_auc: mean cosine to the original along the restore curve; passes: forward passes the method reports (0 for the
    engine's batched maps); seconds: of the map, given the pair's features."""

    pair: str
    region: str
    method: str
    lift: float
    pointing: float
    off_lift: float
    restore_auc: float
    passes: int
    seconds: float


@dataclass(frozen=True)
class PairInfo:
    """A scored pair: its photos, region, the cosine of (swapped, original), the
    region's share of the query crop and the random orders' restore AUC."""

    name: str
    target: str
    donor: str
    region: str
    cosine: float
    area: float
    random_restore_auc: float


@dataclass(frozen=True)
class SwapResult:
    """Everything ``phenolens evaluate swap`` measured.

    summary: method -> region (and ``"mean"``, over regions) -> mean lift,
    pointing, restore_auc, passes, seconds; random_restore: region (and
    ``"mean"``) -> the random orders' restore AUC; errors: method -> why it
    failed (first failure).
    """

    methods: tuple[str, ...]
    regions: tuple[str, ...]
    pairs: tuple[PairInfo, ...]
    scores: tuple[SwapScore, ...]
    summary: dict[str, dict[str, dict[str, float]]]
    random_restore: dict[str, float]
    skipped_photos: dict[str, str]
    skipped_pairs: dict[str, str]
    errors: dict[str, str]
    steps: int
    budget: int | None
    time_limit: float | None


def evaluate_swaps(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[SwapPair],
    methods: Sequence[str] = METHOD_NAMES,
    *,
    budget: int | None = DEFAULT_BUDGET,
    time_limit: float | None = DEFAULT_TIME_LIMIT_S,
    steps: int = 16,
    n_random: int = 3,
    seed: int = 0,
    skipped_photos: Mapping[str, str] | None = None,
    skipped_pairs: Mapping[str, str] | None = None,
    maps_out: dict[str, dict[str, np.ndarray]] | None = None,
) -> SwapResult:
    """Explain every pair with every method and score the query maps.

    A method that fails on a pair (e.g. BudgetExceeded) is recorded in ``errors``
    and leaves that pair out of its means. ``maps_out``, when given, receives
    pair name -> method -> (H, W) aligned query map (for the example grid).
    """
    methods = check_methods(methods)
    regions = tuple(dict.fromkeys(p.region for p in pairs))
    explainer = Explainer(model)
    rng = np.random.default_rng(seed)
    infos: list[PairInfo] = []
    scores: list[SwapScore] = []
    errors: dict[str, str] = {}
    for pair in pairs:
        size = pair.query.shape[:2]
        others = other_region_masks(pair, regions)
        query = explainer.encode(pair.query)
        hit = explainer.encode(pair.gallery[None])
        target = PairTarget(model, pair.query, pair.gallery)
        cosine = float(target.scores(pair.query[None])[1][0])
        randoms = [restore_curve(target, pair.query, pair.original_in_query,
                                 M.pixel_order(np.zeros(size), size, "random", rng), steps).auc
                   for _ in range(n_random)]
        infos.append(PairInfo(pair.name, pair.target, pair.donor, pair.region, cosine,
                              float(pair.truth_query.mean()), float(np.mean(randoms))))
        for method in methods:
            t0 = time.perf_counter()
            try:
                (match,) = explain_matches(explainer, query, hit, [method], budget=budget,
                                           time_limit=time_limit, sides=("query",))
            except Exception as exc:  # one method's failure must not end the protocol
                log.warning("swap: %s failed on %s: %s", method, pair.name, exc)
                errors.setdefault(method, f"{type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - t0
            maps = match[method]
            amap = M.upsample_map(np.asarray(maps.query_aligned, dtype=np.float32), size)
            order = M.pixel_order(amap, size, "negative")
            curve = restore_curve(target, pair.query, pair.original_in_query, order, steps)
            scores.append(SwapScore(pair.name, pair.region, method,
                                    *map_scores(amap, pair, others), curve.auc,
                                    int(maps.forward_passes), seconds))
            if maps_out is not None:
                maps_out.setdefault(pair.name, {})[method] = amap
    return SwapResult(methods, regions, tuple(infos), tuple(scores),
                      summarise(scores, methods, regions), _random_summary(infos, regions),
                      dict(skipped_photos or {}), dict(skipped_pairs or {}), errors, steps,
                      budget, time_limit)


SUMMARY_FIELDS: tuple[str, ...] = ("lift", "pointing", "off_lift", "restore_auc", "passes",
                                   "seconds")


def summarise(scores: Sequence[SwapScore], methods: Sequence[str], regions: Sequence[str]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """method -> region -> field -> mean over pairs; ``"mean"`` is the mean over the
    regions' means (each region weighs the same). Methods without scores are left out."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        per_region = {}
        for region in regions:
            rows = [s for s in scores if s.method == method and s.region == region]
            if rows:
                per_region[region] = {f: float(np.mean([getattr(s, f) for s in rows]))
                                      for f in SUMMARY_FIELDS}
        if per_region:
            per_region["mean"] = {f: float(np.mean([r[f] for r in per_region.values()]))
                                  for f in SUMMARY_FIELDS}
            out[method] = per_region
    return out


def _random_summary(infos: Sequence[PairInfo], regions: Sequence[str]) -> dict[str, float]:
    out = {r: float(np.mean([p.random_restore_auc for p in infos if p.region == r]))
           for r in regions if any(p.region == r for p in infos)}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


# ------------------------------------------------------------------ report


def swap_markdown(result: SwapResult) -> str:
    """Methods as rows, regions as columns ("lift / pointing"), then the mean over
    regions, restore AUC (random orders in the last row) and cost."""
    cols = [*result.regions, "mean"]
    header = ["method", *(f"{r} lift / pointing" for r in cols), "off-region lift", "restore AUC",
              "passes / pair", "s / pair"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in result.methods:
        row = result.summary.get(method)
        if row is None:
            lines.append(f"| {method} | " + " | ".join("–" for _ in header[1:]) + " |")
            continue
        cells = [f"{row[r]['lift']:.2f} / {row[r]['pointing']:.2f}" if r in row else "–"
                 for r in cols]
        mean = row["mean"]
        cells += [f"{mean['off_lift']:.2f}", f"{mean['restore_auc']:.3f}", f"{mean['passes']:.0f}", f"{mean['seconds']:.2f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if result.random_restore:
        lines.append("| random order | " + " | ".join("–" for _ in cols)
                     + f" | – | {result.random_restore['mean']:.3f} | – | – |")
    n_pairs = len(result.pairs)
    text = [
        f"## Region swaps ({n_pairs} pairs: query = a photo with one region swapped in from "
        "another person, gallery = the original)\n",
        "lift: share of the query map's negative mass inside the swapped region / the region's "
        "share of the aligned crop (chance 1); pointing: the most negative pixel lies in the "
        "region; off-region lift: the same map's lift on the other regions' masks (a control, "
        "chance 1: lower is better). restore AUC: mean cosine to the original while the "
        f"query's pixels are restored from it, most negative first ({result.steps} steps; higher = the map found the "
        "difference). passes: forward passes the method reports beyond the pair's 2 encodes "
        "(0 for the engine's batched maps); s: seconds of the query-side map.\n",
        "\n".join(lines),
    ]
    if result.errors:
        text.append("\nFailed: " + "; ".join(f"{m}: {e}" for m, e in result.errors.items()))
    if result.skipped_photos:
        text.append("\nSkipped photos: " + "; ".join(
            f"{n} ({why})" for n, why in result.skipped_photos.items()))
    if result.skipped_pairs:
        text.append("\nSkipped pairs: " + "; ".join(
            f"{n} ({why})" for n, why in result.skipped_pairs.items()))
    return "\n".join(text) + "\n"


def plot_examples(
    pairs: Sequence[SwapPair],
    maps: Mapping[str, Mapping[str, np.ndarray]],
    methods: Sequence[str],
    path: str | Path,
    *,
    max_pairs: int = 5,
) -> Path:
    """A PNG grid, one row per pair (spread over the regions): swapped face with the
    ground truth's outline, original, and each method's query map (blue = negative,
    its own ±max|map| scale)."""
    from matplotlib.figure import Figure

    from explain.render import figure_png, overlay

    chosen: list[SwapPair] = []
    for region in dict.fromkeys(p.region for p in pairs):  # one pair per region first
        chosen += [p for p in pairs if p.region == region and p.name in maps][:1]
    chosen += [p for p in pairs if p not in chosen and p.name in maps]
    chosen = chosen[:max_pairs]
    cols = 2 + len(methods)
    fig = Figure(figsize=(1.6 * cols, 1.75 * max(len(chosen), 1) + 0.3), dpi=100,
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(len(chosen), 1), cols, squeeze=False))
    for row, pair in zip(axes, chosen, strict=False):
        outline = _outline(pair.query, pair.truth_query)
        panels = [(outline, f"swapped {pair.region}"), (pair.gallery, "original")]
        for method in methods:
            amap = maps[pair.name].get(method)
            panels.append((pair.query if amap is None else
                           _outline(overlay(pair.query, amap), pair.truth_query), method))
        for ax, (image, title) in zip(row, panels, strict=True):
            ax.imshow(image)
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    for ax in axes.ravel()[len(chosen) * cols:]:
        ax.set_axis_off()
    fig.suptitle("region swaps: query maps (blue = differs from the original, red = alike; "
                 "green = swapped region)", fontsize=8)
    path = Path(path)
    figure_png(fig, path)
    return path


def _outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with the outline of the (H, W) bool mask drawn in green."""
    out = np.ascontiguousarray(rgb).copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 200, 0), 1)
    return out
