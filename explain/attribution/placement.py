"""Where on the aligned crop each cell of a feature grid looks: maps drawn over what they measure.

A 7×7 CAM cell of a 112×112 crop nominally covers a 16-pixel square, but what
it measures is its effective receptive field: the pixels its activations
depend on most. With zero padding and receptive fields wider than the crop,
the border cells' fields are cut by the crop's edge and move inward (SFace:
the 7×7 cells peak at x ≈ 24…91 px, not 7.5…103.5). Upsampling a map by grid
position therefore draws the eye cells' values on the temples.

``placement(encoder, grid)`` measures it once per encoder and grid: the peak
of ``|∂ Σ_c F[c, i, j] / ∂x|`` (summed over a few fixed noise inputs, so no
face data is involved, and smoothed by half the grid's stride) for the cells of
the middle row and column, fitted by one affine map per axis and made
mirror-symmetric (flipped views share it). The peak, not the centroid: a
field's long, edge-truncated tails pull its centroid towards the middle of the
crop, which drew brows too low and mouths and chins too high (on region swaps
the most negative pixel of ``contrast`` sat 7–10 px from the swapped region
with centroids, 0–5 px with peaks; issue 12's notes).
The measurement (a few seconds on a CPU) is kept in memory and in
``data/cache/placement-*.json`` keyed by the encoder's name, version, grid and
a checksum of its weights, so a new process reads it instead of measuring.
``place(maps, placement, crop_size)`` samples each map bilinearly at
every crop pixel's position in grid coordinates: cells land on their
receptive-field centres at their real spacing, and beyond the outermost
centres the border cells' values extend to the crop's edge (their receptive
fields cover it; fading to zero there left the chin, at the bottom of an
ArcFace crop, with no map at all). ``spread(maps, placement, crop_size, weights)``
instead divides each cell's value among the crop's pixels in proportion to a Gaussian
of one grid step around its centre times a per-pixel weight (``contrast`` weighs by
where the two crops differ); each map's pixels sum to its cells' sum.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf

from encoder.spec import FaceEncoder


@dataclass(frozen=True)
class Placement:
    """Cell (i, j) of an (h, w) grid is centred at crop pixel (x, y) = (step_x·j + x0, step_y·i + y0)."""

    grid: tuple[int, int]
    step_x: float
    x0: float
    step_y: float
    y0: float


NOISE_INPUTS = 4  # noise images whose receptive-field profiles are summed per cell
METHOD = "erf-peak-v2"  # part of the cache key: a new way of measuring invalidates old files
_CACHE: dict[tuple[int, tuple[int, int], tuple[int, int]], Placement] = {}
_LOCK = threading.Lock()


def placement(encoder: FaceEncoder, grid: tuple[int, int]) -> Placement | None:
    """The measured placement of ``encoder``'s CAM grid or contrast grid (None for another grid)."""
    size = tuple(encoder.spec.input_size)
    key = (id(encoder), tuple(grid), size)
    with _LOCK:
        if key not in _CACHE:
            layer = _layer_of(encoder, tuple(grid))
            if layer is None:
                return None
            path = _cache_file(encoder, tuple(grid))
            found = _read(path)
            if found is None:
                found = _measure(encoder, layer, tuple(grid))
                _write(path, found)
            _CACHE[key] = found
        return _CACHE[key]


def _cache_file(encoder: FaceEncoder, grid: tuple[int, int]) -> Path:
    from encoder.assets import CACHE_DIR

    with torch.no_grad():
        checksum = sum(float(p.double().abs().sum()) for p in encoder.parameters())
    spec = encoder.spec
    key = f"{spec.name}@{spec.version}:{spec.input_size}:{grid}:{checksum:.6e}:{METHOD}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return CACHE_DIR / f"placement-{spec.name}-{grid[0]}x{grid[1]}-{digest}.json"


def _read(path: Path) -> Placement | None:
    try:
        doc = json.loads(path.read_text())
        return Placement(tuple(doc["grid"]), doc["step_x"], doc["x0"], doc["step_y"], doc["y0"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, found: Placement) -> None:
    try:  # a read-only data folder (a container) only costs the next process a measurement
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(found)))
        tmp.replace(path)
    except OSError:
        pass


def _layer_of(encoder: FaceEncoder, grid: tuple[int, int]):
    if tuple(encoder.spec.feature_shape[1:]) == grid:
        return encoder.features
    if encoder.spec.contrast_layer is not None:
        h, w = encoder.spec.input_size
        with torch.no_grad():
            probe = encoder.fine_features(torch.zeros(1, encoder.spec.channels, h, w,
                                                      device=_device(encoder)))
        if tuple(probe.shape[-2:]) == grid:
            return encoder.fine_features
    return None


def _device(encoder: FaceEncoder) -> torch.device:
    return next(encoder.parameters()).device


def _measure(encoder: FaceEncoder, layer, grid: tuple[int, int]) -> Placement:
    h, w = grid
    height, width = encoder.spec.input_size
    cols = sorted({*range(0, w, 2), w - 1})  # every other cell and both ends suffice for the fit
    rows = sorted({*range(0, h, 2), h - 1})
    cells = [(h // 2, j) for j in cols] + [(i, w // 2) for i in rows]
    gen = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(NOISE_INPUTS, encoder.spec.channels, height, width, generator=gen)
    x = x.to(_device(encoder)).repeat(len(cells), 1, 1, 1).requires_grad_(True)
    with torch.enable_grad():
        fmap = layer(x)
        at_row = torch.tensor([c[0] for c in cells]).repeat_interleave(NOISE_INPUTS)
        at_col = torch.tensor([c[1] for c in cells]).repeat_interleave(NOISE_INPUTS)
        picked = fmap[torch.arange(len(at_row)), :, at_row, at_col]  # (N, C)
        (grad,) = torch.autograd.grad(picked.abs().sum(), x)
    mass = grad.abs().sum(1).reshape(len(cells), NOISE_INPUTS, height, width).sum(1).cpu()
    cx_row = _peaks(mass[: len(cols)].sum(1), width / w)  # column profiles of the row's cells
    cy_col = _peaks(mass[len(cols) :].sum(2), height / h)  # row profiles of the column's cells
    # Mirror symmetry: a flipped view's cell j is the unflipped view's cell w-1-j, so fit
    # the centres together with their mirror images.
    mirrored = torch.tensor([w - 1 - j for j in cols], dtype=torch.float64)
    step_x, x0 = _fit(torch.cat([cx_row, (width - 1) - cx_row]),
                      torch.cat([torch.tensor(cols, dtype=torch.float64), mirrored]))
    step_y, y0 = _fit(cy_col, torch.tensor(rows, dtype=torch.float64))
    return Placement((h, w), step_x, x0, step_y, y0)


def _peaks(profiles: torch.Tensor, stride: float) -> torch.Tensor:
    """(N, L) receptive-field profiles -> (N,) positions of their peaks, after a Gaussian
    smoothing of half the grid's stride (the raw gradient is speckled)."""
    sigma = max(1.0, stride / 2)
    taps = torch.arange(-int(3 * sigma), int(3 * sigma) + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    smooth = nnf.conv1d(profiles.double()[:, None], (kernel / kernel.sum())[None, None],
                        padding=len(taps) // 2)[:, 0]
    return smooth.argmax(1).double()


def _fit(centres: torch.Tensor, index: torch.Tensor) -> tuple[float, float]:
    a = torch.stack([index, torch.ones_like(index)], 1)
    sol = torch.linalg.lstsq(a, centres.double()[:, None]).solution[:, 0]
    return float(sol[0]), float(sol[1])


def grid_placement(grid: tuple[int, int], crop_size: tuple[int, int]) -> Placement:
    """Cells at their grid positions (cell j centred at (j + ½)·W/w − ½), as a plain
    bilinear upsampling draws them."""
    (h, w), (height, width) = grid, crop_size
    return Placement(tuple(grid), width / w, (width / w - 1) / 2, height / h,
                     (height / h - 1) / 2)


SPREAD_FLOOR = 0.01  # of the mean weight: a cell whose kernel sees no weight still spreads


def spread(maps: torch.Tensor, where: Placement | None, crop_size: tuple[int, int],
           weights: torch.Tensor, *, width: float = 1.0) -> torch.Tensor:
    """(K, h, w) cell values -> (K, H, W) shares of them on the crop's pixels.

    Cell p's value is divided among the pixels x in proportion to ``k_p(x)·weights[k, x]``,
    with ``k_p`` a Gaussian of ``width`` grid steps around the cell's centre (``where``; grid
    positions without a placement): each map's pixels sum to its cells' sum, and a pixel
    of (near-)zero weight gets (almost) nothing. weights (K, H, W) ≥ 0; a small floor
    (``SPREAD_FLOOR`` of their mean) keeps a cell whose kernel sees no weight from
    dividing by zero.
    """
    k, h, w = maps.shape
    if where is None or where.grid != (h, w):
        where = grid_placement((h, w), crop_size)
    height, crop_width = crop_size
    dtype, device = maps.dtype, maps.device

    def kernel(n: int, size: int, step: float, start: float) -> torch.Tensor:
        centres = start + step * torch.arange(n, dtype=dtype, device=device)
        pixels = torch.arange(size, dtype=dtype, device=device)
        return torch.exp(-0.5 * ((pixels[None] - centres[:, None]) / (width * step)) ** 2)

    ky = kernel(h, height, where.step_y, where.y0)
    kx = kernel(w, crop_width, where.step_x, where.x0)
    wts = weights.to(device, dtype)
    wts = wts + SPREAD_FLOOR * wts.mean((1, 2), keepdim=True) + 1e-12
    mass = ky @ wts @ kx.T  # (K, h, w): each cell's total kernel weight
    return wts * (ky.T @ (maps / mass) @ kx)


def place(maps: torch.Tensor, where: Placement | None, crop_size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) cell maps -> (K, H, W) on the aligned crop (bilinear in grid coordinates).

    Without a placement (a grid no encoder layer produces) the map is stretched over the
    whole crop, as a plain bilinear upsampling would. With one, crop pixel (y, x) samples
    the cells at grid position ((y − y0)/step_y, (x − x0)/step_x), clamped to the outermost
    cells (``grid_sample`` with border padding, written as the separable product
    ``Wy · map · Wxᵀ`` of two small interpolation matrices kept per placement).
    """
    k, h, w = maps.shape
    height, width = crop_size
    if where is None or where.grid != (h, w):
        return nnf.interpolate(maps[:, None], size=crop_size, mode="bilinear",
                               align_corners=False)[:, 0]
    wy, wx = _interpolation(where, (height, width), maps.dtype, maps.device)
    return wy @ maps @ wx


_INTERPOLATION: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _interpolation(where: Placement, crop_size: tuple[int, int], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wy (H, h), Wxᵀ (w, W)): the bilinear weights of ``place``, made once per placement."""
    key = (where, crop_size, dtype, device)
    found = _INTERPOLATION.get(key)
    if found is None:
        (h, w), (height, width) = where.grid, crop_size
        found = (_weights(height, h, where.step_y, where.y0, dtype, device),
                 _weights(width, w, where.step_x, where.x0, dtype, device).T.contiguous())
        with _LOCK:
            if len(_INTERPOLATION) > 64:  # encoders come and go in tests; a server has a few
                _INTERPOLATION.clear()
            _INTERPOLATION[key] = found
    return found


def _weights(size: int, cells: int, step: float, start: float, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """(size, cells): pixel p's bilinear weights over the cells at u = (p − start)/step,
    clamped to [0, cells − 1]."""
    u = ((torch.arange(size, dtype=torch.float64) - start) / step).clamp(0, cells - 1)
    low = u.floor().clamp(max=max(cells - 2, 0))
    frac = u - low
    out = torch.zeros(size, cells, dtype=torch.float64)
    rows = torch.arange(size)
    out[rows, low.long()] = 1 - frac
    if cells > 1:
        out[rows, low.long() + 1] += frac
    return out.to(device=device, dtype=dtype)
