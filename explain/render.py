"""Overlays and pair figures of signed maps (matplotlib Agg, no display, no pyplot state).

Colormap: ``RdBu_r`` — red where a region pulls the two faces together,
blue where it pushes them apart, centred at 0 with symmetric limits ±max|map|
(one scale for both faces of a pair; the peak is the 99th percentile of |map| so
one extreme cell does not wash out the rest). ColorBrewer's RdBu is diverging and
colour-blind safe (red/blue stay apart for deuteranopia and protanopia, unlike
red/green or ``coolwarm``'s grey-ish midtones), and red/blue reads without a
legend. Opacity grows with sqrt(|value|), so cells near 0 leave the face
visible and cells at a fifth of the peak are still plainly coloured.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from encoder.align import Alignment, warp_to_photo  # noqa: E402
from gallery.png import encode_png  # noqa: E402

DIVERGING_CMAP = "RdBu_r"
MAX_ALPHA = 0.75
FADE_FLOOR = 0.05  # |value| under this share of the colour limit is drawn transparent


def symmetric_limit(*maps: np.ndarray) -> float:
    """The shared colour scale ±limit: the largest over all maps of the 99th percentile of
    their non-zero |values| (1.0 when they are all zero)."""
    peaks = []
    for m in maps:
        if m is None or not m.size:
            continue
        magnitude = np.abs(np.asarray(m, dtype=np.float64))
        nonzero = magnitude[magnitude > 0]
        if nonzero.size:
            peaks.append(float(np.percentile(nonzero, 99)))
    peak = max(peaks, default=0.0)
    return peak if peak > 0 else 1.0


def colorize(signed_map: np.ndarray, limit: float | None = None) -> np.ndarray:
    """(H, W) signed map -> (H, W, 4) float RGBA in 0..1, opacity ∝ |value| / limit."""
    limit = symmetric_limit(signed_map) if limit is None else float(limit)
    scaled = np.clip(np.asarray(signed_map, dtype=np.float64) / limit, -1.0, 1.0)
    rgba = colormaps[DIVERGING_CMAP]((scaled + 1.0) / 2.0)
    rgba[..., 3] = MAX_ALPHA * np.sqrt(faded(np.abs(scaled)))
    return rgba


def faded(magnitude: np.ndarray, floor: float = FADE_FLOOR) -> np.ndarray:
    """|value| / limit in 0..1 -> opacity weight in 0..1 that is exactly 0 below ``floor``:
    a map's near-zero tail (the bilinear spread of a crop's map) leaves the face untouched,
    so no tinted rectangle marks where the aligned crop lies on a photo."""
    return np.clip((magnitude - floor) / (1.0 - floor), 0.0, 1.0)


def _resize_map(signed_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = np.asarray(signed_map, dtype=np.float32)
    if m.shape == size:
        return m
    import cv2

    return cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def overlay(rgb: np.ndarray, signed_map: np.ndarray, *, limit: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image + signed map (any size; resized bilinearly) -> (H, W, 3) uint8."""
    image = np.asarray(rgb)
    rgba = colorize(_resize_map(signed_map, image.shape[:2]), limit)
    alpha = rgba[..., 3:4]
    blended = image.astype(np.float64) / 255.0 * (1 - alpha) + rgba[..., :3] * alpha
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def figure_png(fig: Figure, path: str | Path | None = None) -> bytes:
    """PNG bytes of a matplotlib figure, also written to ``path`` when one is given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def with_legend(rgb: np.ndarray, lines: list[str] | tuple[str, ...]) -> np.ndarray:
    """(H, W, 3) uint8 image with a white strip below holding ``lines`` of text (the legend
    in words of a single overlay: which face, what the colours mean)."""
    from PIL import Image, ImageDraw

    image = np.asarray(rgb, dtype=np.uint8)
    row = 13
    strip = Image.new("RGB", (image.shape[1], 4 + row * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 2 + row * i), line, fill=(40, 40, 40))
    return np.concatenate([image[..., :3], np.asarray(strip)], axis=0)


def overlay_legend(method: str, face: str, *maps: np.ndarray) -> tuple[str, str]:
    """Two legend lines for a single overlay of ``face`` ("query face", "match"): the method
    and face, then the colours the maps show in words."""
    return f"{face} · {METHOD_TITLES.get(method, f'{method} map')}", legend_words(method, *maps)


def overlay_png(
    rgb: np.ndarray,
    signed_map: np.ndarray,
    path: str | Path | None = None,
    *,
    limit: float | None = None,
    legend: tuple[str, ...] | None = None,
) -> bytes:
    """PNG bytes of :func:`overlay` (also written to ``path`` when given); ``legend``: lines
    of words drawn in a strip below (e.g. :func:`overlay_legend`)."""
    drawn = overlay(rgb, signed_map, limit=limit)
    data = encode_png(with_legend(drawn, legend) if legend else drawn)
    if path is not None:
        Path(path).write_bytes(data)
    return data


def photo_map(aligned_map: np.ndarray, alignment: Alignment) -> np.ndarray:
    """(h, w) map on the aligned crop -> (H, W) float32 map on the original photo (0 outside)."""
    return warp_to_photo(aligned_map, alignment)


def photo_overlay_png(
    photo_rgb: np.ndarray,
    aligned_map: np.ndarray,
    alignment: Alignment,
    path: str | Path | None = None,
    *,
    limit: float | None = None,
    legend: tuple[str, ...] | None = None,
) -> bytes:
    """The aligned-crop map drawn on the original photo through the inverse alignment
    (``legend`` as in :func:`overlay_png`)."""
    limit = symmetric_limit(aligned_map) if limit is None else limit
    return overlay_png(photo_rgb, photo_map(aligned_map, alignment), path, limit=limit,
                       legend=legend)


# What each method's map shows, and what its two colours mean, in words for a clinician.
METHOD_TITLES = {
    "contrast": "contrast map: where the two faces differ",
    "similarity": "similarity map: what pulls the two faces together",
}
SIGN_WORDS = {
    "contrast": ("blue: differs from the other face", "red: shared with it"),
}
DEFAULT_SIGN_WORDS = ("blue: pushes the faces apart", "red: pulls them together")
OUTSIDE_WARNING_SHARE = 0.25  # of a map's positive mass outside the face: say so


def present_signs(*maps: np.ndarray, limit: float | None = None, floor: float = 0.2
                  ) -> tuple[bool, bool]:
    """(has blue, has red): whether a visible patch of the maps (0.5 % of their pixels) is
    negative (positive) beyond ``floor`` of the shared colour limit, i.e. whether that
    colour can be seen on the figure."""
    limit = symmetric_limit(*maps) if limit is None else limit
    values = [np.asarray(m, np.float64).ravel() for m in maps if m is not None and m.size]
    if not values:
        return False, False
    v = np.concatenate(values)
    return (float(np.percentile(v, 0.5)) < -floor * limit,
            float(np.percentile(v, 99.5)) > floor * limit)


def legend_words(method: str, *maps: np.ndarray) -> str:
    """The legend in words, naming only the colours the maps can show."""
    blue, red = SIGN_WORDS.get(method, DEFAULT_SIGN_WORDS)
    has_blue, has_red = present_signs(*maps)
    words = [w for w, shown in ((blue, has_blue), (red, has_red)) if shown]
    return " · ".join(words + ["pale: little effect"]) if words else "the map is empty"


def outside_face_share(signed_map: np.ndarray) -> float:
    """Share (0..1) of a map's positive ("pulls together") mass outside the face ellipse
    (hair, ears, background)."""
    from explain.regions import template_regions

    m = np.asarray(signed_map, dtype=np.float64)
    pos = np.maximum(m, 0.0)
    total = float(pos.sum())
    if total <= 0:
        return 0.0
    return float(pos[template_regions(m.shape)["background"]].sum() / total)


def map_words(query_map: np.ndarray, gallery_map: np.ndarray) -> tuple[str, str]:
    """Region words of both faces' maps; one line for both when they say the same."""
    from explain.regions import region_summary

    def words(m: np.ndarray) -> str:
        s = region_summary(m)
        parts = [s.describe("negative")]
        if s.ranked("positive"):
            parts.append(s.describe("positive"))
        return "; ".join(parts)

    q, g = words(query_map), words(gallery_map)
    return (f"both faces (one map drawn on both): {q}", "") if q == g else \
        (f"query: {q}", f"match: {g}")


def sum_note(method: str, contrast_share: float | None) -> str | None:
    """The line a contrast figure carries: how much of ``1 − cosine`` its sum accounts for
    (a first-order estimate through the query's linearisation, not the model's total)."""
    if method != "contrast" or contrast_share is None:
        return None
    return (f"the map adds up to {100 * contrast_share:.0f} % of the similarity lost "
            "(1 − cosine): a first-order estimate, not the model's total")


def weighted_note(method: str, contrast_share: float | None = None) -> str:
    """The line a figure drawn with region effects carries (``explain.effects.weighted_map``):
    what its totals are, and for contrast how much of ``1 − cosine`` its own sum holds."""
    note = (f"region totals: the measured effects (cosine change when a region is edited) "
            f"· shading within a region: {method}")
    if method == "contrast" and contrast_share is not None:
        note += (f"\ncontrast's own map sums to {100 * contrast_share:.0f} % of the similarity "
                 "lost (1 − cosine): a first-order estimate")
    return note


def pair_figure(
    query_rgb: np.ndarray,
    gallery_rgb: np.ndarray,
    query_map: np.ndarray,
    gallery_map: np.ndarray,
    *,
    cosine: float,
    label: str = "",
    method: str = "similarity",
    path: str | Path | None = None,
    dpi: int = 110,
    gallery_name: str = "",
    words: tuple[str, str] | None = None,
    warning: str | None = None,
    note: str | None = None,
) -> bytes:
    """PNG of a pair that explains itself: a title (query → match, cosine, the method in
    words), both aligned faces named (top), both overlays on one scale (bottom), a colour
    bar in cosine per 10×10 pixels whose words name only the colours the maps show, the
    region words of each face (``words``: query's and match's lines; default from the
    maps) and, in red, a ``warning`` (default, without ``words`` and on a map with visible
    red: when a quarter or more of either map's "pulls together" mass lies outside the
    face, that the match leans on hair/background).

    ``label`` is the match's syndrome; ``gallery_name`` how the gallery names the face
    (e.g. its subject and image id); ``note`` a grey line under the method's name (e.g.
    how much of the cosine lost a first-order map's sum accounts for:
    ``sum_note(method, contrast_share)``)."""
    limit = symmetric_limit(query_map, gallery_map)
    fig = Figure(figsize=(5.6, 7.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, gridspec_kw={"hspace": 0.22, "wspace": 0.06})
    note_lines = [w for line in (note or "").splitlines() for w in textwrap.wrap(line, 120)][:3]
    # a two-line match name and a note of two or three lines must not meet: the panels
    # start lower by each note line past the first
    fig.subplots_adjust(top=0.83 - 0.02 * max(0, len(note_lines) - 1), bottom=0.28,
                        left=0.04, right=0.96)
    match_name = label or "gallery face"
    panels = (
        (query_rgb, None, "query face"),
        (gallery_rgb, None, "\n".join(textwrap.wrap(f"match: {gallery_name}", 40)[:2])
         if gallery_name else "match"),
        (query_rgb, query_map, f"query · {method}"),
        (gallery_rgb, gallery_map, f"match · {method}"),
    )
    for ax, (rgb, signed, name) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(rgb if signed is None else overlay(rgb, signed, limit=limit))
        ax.set_title(name, fontsize=8.5)
        ax.set_axis_off()
    fig.suptitle(f"query → {match_name} · cosine {cosine:.3f}", fontsize=11, y=0.975)
    fig.text(0.5, 0.925, METHOD_TITLES.get(method, f"{method} map"), ha="center",
             fontsize=9, color="#333")
    if note_lines:
        fig.text(0.5, 0.912, "\n".join(note_lines), ha="center", va="top", fontsize=6.5,
                 color="#666", linespacing=1.3)
    has_blue, has_red = present_signs(query_map, gallery_map, limit=limit)
    cmap = colormaps[DIVERGING_CMAP]
    lo, hi = (-limit if has_blue or not has_red else 0.0), (limit if has_red else 0.0)
    per_100px = 100.0 * query_map.size / max(1, query_rgb.shape[0] * query_rgb.shape[1])
    mappable = matplotlib.cm.ScalarMappable(Normalize(-limit, limit), cmap)
    cax = fig.add_axes((0.2, 0.205, 0.6, 0.022))
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    bar.ax.set_xlim(lo, hi)
    ticks = [v for v in (lo, lo / 2, 0.0, hi / 2, hi) if lo <= v <= hi]
    bar.set_ticks(sorted(set(ticks)))
    bar.set_ticklabels([("0" if v == 0 else f"{v * per_100px:+.2g}").replace("-", "−")
                        for v in sorted(set(ticks))])
    bar.ax.tick_params(labelsize=7)
    change = ("gained (+) or lost (−)" if has_blue and has_red else
              "gained" if has_red else "lost")
    bar.set_label(f"colour: cosine {change} per 10×10 pixels of the face", fontsize=7.5)
    fig.text(0.5, 0.235, legend_words(method, query_map, gallery_map), ha="center",
             fontsize=8)
    if words is not None:  # e.g. region effects' words, per face
        words = tuple(w if not w or w.startswith(("query", "match", "both")) else f"{who}: {w}"
                      for who, w in zip(("query", "match"), words, strict=False))
    lines = [w for w in (words if words is not None else map_words(query_map, gallery_map)) if w]
    if warning is None and words is None and has_red:  # region effects' words say it
        share = max(outside_face_share(query_map), outside_face_share(gallery_map))
        warning = (f"this match leans on hair/background: {100 * share:.0f} % of what pulls the "
                   "faces together lies outside the face") if share >= OUTSIDE_WARNING_SHARE \
            else ""
    rows = [(part, "#222") for line in lines for part in textwrap.wrap(line, 100)]
    rows += [(part, "#b00020") for part in textwrap.wrap(warning or "", 95)]
    for i, (text, colour) in enumerate(rows[:5]):  # top down below the colour bar's label
        fig.text(0.5, 0.112 - 0.025 * i, text, ha="center", va="bottom", fontsize=7,
                 color=colour)
    return figure_png(fig, path)
