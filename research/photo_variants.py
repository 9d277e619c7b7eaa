"""Research: a folder of altered copies of photos, to try a protocol on photos it was not tuned on.

    .venv/bin/python -m research.photo_variants OUT [--photos DIR]
    .venv/bin/python -m research.contrast_variants --photos OUT --offsets 7

Each single-face photo (default: the bundled ones, with their people; with ``--photos``,
every file is taken as a different person) is written five times, altered in ways the region-swap protocol's pairs never are: mirrored,
rotated by +8° and −8°, zoomed out to 85 % and darkened (gamma 1.5, × 0.9). Photos go to
one sub-folder per person (``explain.evaluation.swap.load_photos`` reads the sub-folder as
the person, so a donor is never the same person). Issue 12's notes give what ``contrast``
scored on the bundled photos' copies. It is the same people, so it does not replace a
held-out set; it does catch a method tuned to the exact pixels of a few photos.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

import cv2
import numpy as np


def _rotated(angle: float, scale: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    def alter(bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        return cv2.warpAffine(bgr, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
    return alter


ALTERATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mirror": lambda bgr: np.ascontiguousarray(bgr[:, ::-1]),
    "rotp8": _rotated(8.0),
    "rotm8": _rotated(-8.0),
    "zoom85": _rotated(0.0, 0.85),
    "dark": lambda bgr: np.clip(255 * (bgr / 255.0) ** 1.5 * 0.9, 0, 255).astype(np.uint8),
}


def write_variants(photos: Mapping[Path, str], out: Path) -> list[Path]:
    """photo path -> person; writes ``out/PERSON/ALTERATION_STEM.jpg`` for each photo and
    alteration and returns the paths written. Raises ValueError for an unreadable photo."""
    written = []
    for path, person in photos.items():
        bgr = cv2.imread(str(path))
        if bgr is None:
            raise ValueError(f"cannot read {path} as an image")
        folder = out / person
        folder.mkdir(parents=True, exist_ok=True)
        for name, alter in ALTERATIONS.items():
            target = folder / f"{name}_{path.stem}.jpg"
            cv2.imwrite(str(target), alter(bgr), [cv2.IMWRITE_JPEG_QUALITY, 92])
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.photo_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--photos", type=Path,
                        help="a folder of single-face photos, one person per file (default: "
                        "the bundled photos, with their people)")
    args = parser.parse_args(argv)
    if args.photos is None:
        from encoder.assets import PHOTOS, PHOTOS_DIR

        photos = {PHOTOS_DIR / p.name: p.person for p in PHOTOS if p.faces == 1 and not p.aligned}
    else:
        photos = {p: p.stem for p in sorted(args.photos.iterdir())
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")}
    written = write_variants(photos, args.out)
    print(f"wrote {len(written)} photos of {len(set(photos.values()))} people to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
