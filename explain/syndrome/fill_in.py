"""Fill in the blanks for similarity (DESIGN.md §5; seed 004, adapted to a face matcher).

Patches of the query's aligned crop are blanked (``fill``: mid-gray, black or
the crop's mean colour), and the gradient of the held-norm similarity to a
target with respect to the blanked pixels says how the model would fill them in
to make the face look more like the target (a syndrome centroid or a gallery
face):

    t(x) = (1/V) Σ_v <e_v(x), ĉ_v> / stopgrad(‖e_v(x)‖)

Masks are random (``ratio`` of the ``patch``×``patch`` cells of the crop,
drawn independently per mask) or progressive (each round is a random partition
of the cells into non-overlapping masks that together cover the face exactly
once). The expectation of the in-mask gradient over many masks, per pixel,
is normalised by how often the pixel was masked. The update shown is that
expectation, thresholded to its strongest pixels (``threshold`` quantile of the
per-pixel gradient norm) and scaled so that its largest change is ``step``
gray levels.

Consistency check (the paper's "is the filled-in image closer to the target"):
for every mask, the filled-in face — the masked face plus ``steps`` projected
gradient steps inside the mask (each at most ``step`` gray levels, clipped to
0..255) — is scored against the masked face, and against a control that moves
the same pixels by random directions of the same size.

Cost: ``(steps + 2)`` forward passes per mask and view (gradient steps, the
filled score, the control) plus 2 per view (the original and the thresholded
update on the whole face), all planned against the budget before starting.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from explain.attribution.engine import Explainer
from explain.errors import IncompatibleViews, InvalidOption
from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S, CancelSignal, Guard
from explain.syndrome.maps import Centroid

MASK_KINDS = ("random", "progressive")
FILLS = ("gray", "black", "mean")


@dataclass(frozen=True)
class FillInOptions:
    """masks: "random" or "progressive"; count: masks; ratio: fraction of cells per mask;
    patch: cell side in pixels; fill: blank value; step: largest change per gradient step
    (gray levels); steps: projected gradient steps of the consistency check; threshold:
    quantile of the gradient norm below which the shown update is zero; seed; batch_size."""

    masks: str = "random"
    count: int = 32
    ratio: float = 0.25
    patch: int = 16
    fill: str = "gray"
    step: float = 16.0
    steps: int = 1
    threshold: float = 0.8
    seed: int = 0
    batch_size: int = 16

    def validated(self, crop_size: tuple[int, int]) -> FillInOptions:
        if self.masks not in MASK_KINDS:
            raise InvalidOption(f"masks must be one of {MASK_KINDS}, got {self.masks!r}")
        if self.fill not in FILLS:
            raise InvalidOption(f"fill must be one of {FILLS}, got {self.fill!r}")
        if not 0 < self.ratio <= 1:
            raise InvalidOption(f"ratio must be in (0, 1], got {self.ratio}")
        if not 1 <= self.patch <= min(crop_size):
            raise InvalidOption(f"patch {self.patch} does not fit a {crop_size[1]}x{crop_size[0]} crop")
        if self.count < 1 or self.steps < 1 or self.batch_size < 1:
            raise InvalidOption("count, steps and batch_size must be at least 1")
        if not 0 < self.step <= 255:
            raise InvalidOption(f"step must be in (0, 255] gray levels, got {self.step}")
        if not 0 <= self.threshold < 1:
            raise InvalidOption(f"threshold must be a quantile in [0, 1), got {self.threshold}")
        return self

    def cost(self, views: int) -> int:
        """Forward passes (images through an encoder) of one call."""
        return (self.count * (self.steps + 2) + 2) * views


def _cells(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return math.ceil(size[0] / patch), math.ceil(size[1] / patch)


def _expand(cells: np.ndarray, size: tuple[int, int], patch: int) -> np.ndarray:
    """(K, gh, gw) bool cells -> (K, H, W) bool pixel masks."""
    big = np.repeat(np.repeat(cells, patch, axis=1), patch, axis=2)
    return big[:, : size[0], : size[1]]


def random_masks(count: int, size: tuple[int, int], *, patch: int, ratio: float, seed: int = 0) -> np.ndarray:
    """(count, H, W) bool: each mask blanks round(ratio · cells) random patch cells (at least 1)."""
    gh, gw = _cells(size, patch)
    n = gh * gw
    k = max(1, round(ratio * n))
    rng = np.random.default_rng(seed)
    cells = np.zeros((count, n), bool)
    for i in range(count):
        cells[i, rng.choice(n, size=k, replace=False)] = True
    return _expand(cells.reshape(count, gh, gw), size, patch)


def progressive_masks(count: int, size: tuple[int, int], *, patch: int, ratio: float, seed: int = 0) -> np.ndarray:
    """(count, H, W) bool: rounds of non-overlapping masks, each round a random partition of
    the cells into ceil(1/ratio) masks, so a full round masks every pixel exactly once."""
    gh, gw = _cells(size, patch)
    n = gh * gw
    groups = max(1, math.ceil(1 / ratio))
    rng = np.random.default_rng(seed)
    cells = np.zeros((count, n), bool)
    i = 0
    while i < count:
        for part in np.array_split(rng.permutation(n), groups):
            if i == count:
                break
            cells[i, part] = True
            i += 1
    return _expand(cells.reshape(count, gh, gw), size, patch)


def make_masks(options: FillInOptions, size: tuple[int, int]) -> np.ndarray:
    make = random_masks if options.masks == "random" else progressive_masks
    return make(options.count, size, patch=options.patch, ratio=options.ratio, seed=options.seed)


@dataclass(frozen=True)
class Consistency:
    """Per-mask scores (K,) of the masked face, the filled-in face and the random control,
    and their summary. ``consistent``: most fillings raise the similarity, and by more
    than the control does on average."""

    masked: np.ndarray
    filled: np.ndarray
    control: np.ndarray
    fraction_improved: float
    mean_gain: float
    control_fraction_improved: float
    control_mean_gain: float

    @property
    def consistent(self) -> bool:
        return self.fraction_improved > 0.5 and self.mean_gain > self.control_mean_gain


@dataclass(frozen=True)
class FillInProgress:
    done: int
    total: int


@dataclass(frozen=True)
class FillInResult:
    """What the model would paint into the blanks to move the face towards the target.

    gradient (H, W, 3) float32: expected ∂t/∂pixel (per gray level) over the masks
    covering each pixel; magnitude (H, W): its norm over channels; coverage (H, W)
    int32: masks covering each pixel. update (H, W, 3) float32: the thresholded
    expected gradient scaled to at most ``step`` gray levels; filled (H, W, 3)
    uint8: the crop plus ``update``. expected_fill (H, W, 3) uint8: per pixel, the
    mean of the filled-in values over the masks covering it (the crop where no
    mask fell): what the model paints into the blanks. example_masked / example_filled (H, W, 3)
    uint8: the first mask's blanked and filled-in faces. score: t of the crop;
    score_updated: t of ``filled``.
    """

    gradient: np.ndarray
    magnitude: np.ndarray
    coverage: np.ndarray
    update: np.ndarray
    filled: np.ndarray
    expected_fill: np.ndarray
    example_mask: np.ndarray
    example_masked: np.ndarray
    example_filled: np.ndarray
    score: float
    score_updated: float
    consistency: Consistency
    forward_passes: int
    seconds: float
    options: FillInOptions

    def options_dict(self) -> dict:
        return asdict(self.options)


@dataclass(frozen=True)
class _View:
    encoder: torch.nn.Module
    flip: bool
    gray: bool


def _differentiable_views(explainer: Explainer, crop: np.ndarray) -> list[_View]:
    """The views of the explainer's scheme with what is needed to rebuild their inputs
    from a pixel tensor (so gradients reach the unflipped crop)."""
    out = []
    for item in explainer.source.view_inputs(crop[None]):
        if isinstance(item, tuple):
            encoder, _, flipped = item
            gray = False
        else:
            encoder, flipped = item.encoder, bool(item.flipped)
            view = getattr(item, "view", None)
            gray = bool(getattr(view, "gray", False))
        out.append(_View(encoder, flipped, gray))
    return out


def _inputs(view: _View, pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) float pixels in 0..255 -> (B, C, H, W) encoder input of the view."""
    x = pixels.permute(0, 3, 1, 2)
    if view.flip:
        x = torch.flip(x, dims=[-1])
    spec = view.encoder.spec
    if view.gray or spec.channels == 1:
        luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = luma if spec.channels == 1 else luma.expand(-1, 3, -1, -1)
    return (x - spec.mean) / spec.std


class FillIn:
    """Fill in the blanks over an :class:`Explainer`'s model or view scheme. Thread-safe."""

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer

    def _target(self, views: list[_View], pixels: torch.Tensor, units: tuple[torch.Tensor, ...],
                guard: Guard) -> torch.Tensor:
        """(B, H, W, 3) -> (B,) held-norm similarity averaged over views."""
        total = torch.zeros(pixels.shape[0], device=pixels.device)
        for view, unit in zip(views, units, strict=True):
            guard.spend(int(pixels.shape[0]))
            emb = view.encoder(_inputs(view, pixels))
            total = total + emb @ unit / emb.norm(dim=1).detach()
        return total / len(views)

    def _grad(self, views, pixels, units, guard) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = pixels.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            score = self._target(views, leaf, units, guard)
            (grad,) = torch.autograd.grad(score.sum(), leaf)
        return score.detach(), grad

    def run(self, crop: np.ndarray, target: Centroid, options: FillInOptions | None = None, **kwargs) -> FillInResult:
        """Consume :meth:`steps`; same arguments."""
        result = None
        for event in self.steps(crop, target, options, **kwargs):
            if isinstance(event, FillInResult):
                result = event
        assert result is not None
        return result

    def steps(
        self,
        crop: np.ndarray,
        target: Centroid,
        options: FillInOptions | None = None,
        *,
        budget: int | None = DEFAULT_BUDGET,
        time_limit: float | None = DEFAULT_TIME_LIMIT_S,
        cancel: CancelSignal = None,
    ) -> Iterator[FillInProgress | FillInResult]:
        """Yields FillInProgress after every batch of masks, then the FillInResult.

        crop: (H, W, 3) uint8 aligned crop; target: a :class:`Centroid` of the
        same view scheme (a syndrome's, or one gallery face's via
        ``SyndromeExplainer.centroid``). Raises BudgetExceeded (planned cost over
        ``budget``), TimeLimitExceeded, Cancelled, InvalidOption.
        """
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
            raise InvalidOption(f"crop must be (H, W, 3) uint8, got {crop.shape} {crop.dtype}")
        size = (int(crop.shape[0]), int(crop.shape[1]))
        opts = (options or FillInOptions()).validated(size)
        guard = Guard(budget, time_limit, cancel)
        views = _differentiable_views(self.explainer, crop)
        if tuple(v.flip for v in views) != target.flipped:
            raise IncompatibleViews("the crop's views and the target's views differ")
        guard.require(opts.cost(len(views)), f"fill-in with {opts.count} masks and {opts.steps} step(s)")
        device = next(views[0].encoder.parameters()).device
        units = tuple(u.to(device) for u in target.units)
        image = torch.from_numpy(crop.astype(np.float32)).to(device)
        fill = {"gray": 127.5, "black": 0.0, "mean": None}[opts.fill]
        fill_value = image.mean((0, 1)) if fill is None else torch.full((3,), fill, device=device)
        masks = torch.from_numpy(make_masks(opts, size)).to(device)
        gen = torch.Generator().manual_seed(opts.seed + 1)

        with torch.no_grad():
            score = float(self._target(views, image[None], units, guard)[0])
        grad_sum = torch.zeros_like(image)
        fill_sum = torch.zeros_like(image)
        coverage = torch.zeros(size, device=device)
        masked_scores, filled_scores, control_scores = [], [], []
        example = None
        for start in range(0, opts.count, opts.batch_size):
            m = masks[start:start + opts.batch_size, :, :, None].float()  # (B, H, W, 1)
            blanked = image[None] * (1 - m) + fill_value * m
            s_masked, grad = self._grad(views, blanked, units, guard)
            grad = grad * m
            grad_sum += grad.sum(0)
            coverage += m[..., 0].sum(0)
            filled, g = blanked, grad
            for step in range(opts.steps):
                peak = g.flatten(1).abs().max(1).values.clamp_min(1e-12)[:, None, None, None]
                filled = (filled + opts.step * g / peak).clamp(0, 255)
                if step < opts.steps - 1:
                    _, g = self._grad(views, filled, units, guard)
                    g = g * m
            noise = torch.randn(grad.shape, generator=gen).to(device) * m
            peak = noise.flatten(1).abs().max(1).values.clamp_min(1e-12)[:, None, None, None]
            control = (blanked + opts.step * opts.steps * noise / peak).clamp(0, 255)
            with torch.no_grad():
                s_filled = self._target(views, filled, units, guard)
                s_control = self._target(views, control, units, guard)
            fill_sum += (filled * m).sum(0)
            masked_scores.append(s_masked)
            filled_scores.append(s_filled)
            control_scores.append(s_control)
            if example is None:
                example = (m[0, ..., 0], blanked[0], filled[0])
            yield FillInProgress(min(start + opts.batch_size, opts.count), opts.count)

        gradient = torch.where(coverage[..., None] > 0, grad_sum / coverage.clamp_min(1)[..., None], 0.0)
        magnitude = gradient.norm(dim=-1)
        covered = magnitude[coverage > 0]
        cut = torch.quantile(covered, opts.threshold) if covered.numel() else torch.tensor(0.0)
        kept = gradient * (magnitude >= cut)[..., None]
        update = opts.step * kept / kept.abs().max().clamp_min(1e-12)
        filled_face = (image + update).clamp(0, 255).round()
        expected_fill = torch.where(coverage[..., None] > 0,
                                    fill_sum / coverage.clamp_min(1)[..., None], image)
        with torch.no_grad():
            score_updated = float(self._target(views, filled_face[None], units, guard)[0])
        masked = torch.cat(masked_scores).cpu().numpy()
        filled_s = torch.cat(filled_scores).cpu().numpy()
        control_s = torch.cat(control_scores).cpu().numpy()
        consistency = Consistency(
            masked, filled_s, control_s,
            float(np.mean(filled_s > masked)), float(np.mean(filled_s - masked)),
            float(np.mean(control_s > masked)), float(np.mean(control_s - masked)),
        )

        def u8(t: torch.Tensor) -> np.ndarray:
            return t.clamp(0, 255).round().to(torch.uint8).cpu().numpy()

        yield FillInResult(
            gradient=gradient.cpu().numpy().astype(np.float32),
            magnitude=magnitude.cpu().numpy().astype(np.float32),
            coverage=coverage.cpu().numpy().astype(np.int32),
            update=update.cpu().numpy().astype(np.float32),
            filled=u8(filled_face),
            expected_fill=u8(expected_fill),
            example_mask=example[0].bool().cpu().numpy(),
            example_masked=u8(example[1]),
            example_filled=u8(example[2]),
            score=score,
            score_updated=score_updated,
            consistency=consistency,
            forward_passes=guard.used,
            seconds=guard.elapsed,
            options=replace(opts),
        )


def _stretch_fill(result: FillInResult, crop: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """Expected fill with its change from the blank value amplified ``gain`` times (display)."""
    fill = {"gray": 127.5, "black": 0.0}.get(result.options.fill)
    blank = crop.reshape(-1, 3).mean(0) if fill is None else np.full(3, fill)
    out = blank + gain * (result.expected_fill.astype(np.float32) - blank)
    out = np.where(result.coverage[..., None] > 0, out, crop)
    return np.clip(out, 0, 255).astype(np.uint8)


def fill_in_figure(crop: np.ndarray, result: FillInResult, *, label: str = "",
                   path: str | None = None) -> bytes:
    """PNG: the crop, the expected-gradient magnitude (scaled to its 99th percentile), the
    thresholded update stretched to full range on mid-gray, the crop plus update (with the
    target similarity before and after), the expected fill and one masked/filled-in pair,
    changes amplified ×8 for display only (titles say so; the arrays are unscaled)."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from explain.render import figure_png, overlay

    def amplified(base: np.ndarray, changed: np.ndarray, gain: float) -> np.ndarray:
        delta = changed.astype(np.float32) - base.astype(np.float32)
        return np.clip(base.astype(np.float32) + gain * delta, 0, 255).astype(np.uint8)

    covered = result.magnitude[result.coverage > 0]
    limit = float(np.quantile(covered, 0.99)) if covered.size and covered.max() > 0 else 1.0
    gain = 127.5 / max(float(np.abs(result.update).max()), 1e-6)
    update_rgb = np.clip(127.5 + gain * result.update, 0, 255).astype(np.uint8)
    fill_gain = 8.0
    panels = [
        (crop, "face"),
        (overlay(crop, result.magnitude, limit=limit), "|E grad| in blanks"),
        (update_rgb, "thresholded update (stretched)"),
        (result.filled, f"face + update ({result.score:.3f}→{result.score_updated:.3f})"),
        (_stretch_fill(result, crop, fill_gain), "expected fill (change ×8)"),
        (result.example_masked, "one mask"),
        (amplified(result.example_masked, result.example_filled, fill_gain),
         "filled in (change ×8)"),
    ]
    fig = Figure(figsize=(2.1 * len(panels), 2.7), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (img, name) in zip(axes, panels, strict=True):
        ax.imshow(img)
        ax.set_title(name, fontsize=7)
        ax.set_axis_off()
    c = result.consistency
    fig.suptitle(
        f"fill in the blanks → {label or 'target'} · {result.options.masks} masks ×"
        f"{result.options.count} · filled closer in {c.fraction_improved:.0%} (gain "
        f"{c.mean_gain:+.3f}; random control {c.control_fraction_improved:.0%}, "
        f"{c.control_mean_gain:+.3f})",
        fontsize=8,
    )
    return figure_png(fig, path)
