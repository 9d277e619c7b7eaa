"""Synthetic "syndromes": localised, smooth deformations of real aligned faces.

Real syndrome photos are protected health data, so the syndrome workflow, the
fine-tuning and the evaluation of explanations run on labelled data whose
distinguishing region is known by construction. A syndrome here is a small set
of *handles* around the five ArcFace landmarks; each handle is a compactly
supported Wendland RBF (exactly zero outside its ellipse, C2-smooth) that
translates, scales or rotates the content under it. Sizes are in units of the
inter-ocular distance (IOD), so a deformation follows the face it is applied
to. The ground-truth region of a class is where its handles act.

Samples are made on a padded aligned canvas (the aligned crop plus real
context from the photo on every side) so that the deformation and the pose
jitter never pull in border artefacts, then cropped to 112x112. Everything is
deterministic given a seed: the random state of one sample depends only on
(seed, split, class, index), never on the other samples.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from encoder.align import ARCFACE_TEMPLATE_112

CROP_SIZE = 112
DEFAULT_PAD = 24
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Horizontal flip swaps the image-left and image-right landmarks.
FLIP_ORDER = (1, 0, 2, 4, 3)

HandleKind = Literal["translate", "scale", "rotate"]


# --------------------------------------------------------------------------- handles


@dataclass(frozen=True)
class Handle:
    """One local deformation around a landmark.

    ``anchor`` names a landmark (``LANDMARK_NAMES``) or a midpoint
    (``eye_mid``, ``mouth_mid``); ``offset`` and ``radius`` are in IOD units.
    ``amount`` means: translate -> (dx, dy) in IOD units; scale -> (sx, sy)
    relative growth (0.3 = 30 % wider at the centre); rotate -> (degrees, 0),
    positive is clockwise on screen (image y points down).
    """

    kind: HandleKind
    anchor: str
    amount: tuple[float, float]
    radius: tuple[float, float] = (0.5, 0.5)
    offset: tuple[float, float] = (0.0, 0.0)

    def center(self, landmarks: np.ndarray) -> np.ndarray:
        iod = interocular_distance(landmarks)
        return anchor_point(landmarks, self.anchor) + np.asarray(self.offset) * iod

    def flipped(self) -> Handle:
        """The mirror handle: used to write symmetric syndromes once."""
        swap = {"left_eye": "right_eye", "right_eye": "left_eye",
                "mouth_left": "mouth_right", "mouth_right": "mouth_left"}
        amount = self.amount
        if self.kind == "translate":
            amount = (-amount[0], amount[1])
        elif self.kind == "rotate":
            amount = (-amount[0], amount[1])
        return replace(self, anchor=swap.get(self.anchor, self.anchor), amount=amount,
                       offset=(-self.offset[0], self.offset[1]))


@dataclass(frozen=True)
class Syndrome:
    """A labelled class: a name, what it imitates, and its handles."""

    name: str
    description: str
    handles: tuple[Handle, ...]


def _pair(handle: Handle) -> tuple[Handle, Handle]:
    return handle, handle.flipped()


# Strengths are chosen so that the peak displacement at strength 1 is 3-5 px in
# the 112x112 crop (about 10 % of the IOD): visible, but the identity stays.
SYNDROMES: dict[str, Syndrome] = {
    s.name: s
    for s in (
        Syndrome(
            "wide_eyes",
            "hypertelorism: eyes moved apart",
            _pair(Handle("translate", "left_eye", (-0.11, 0.0), radius=(0.62, 0.45))),
        ),
        Syndrome(
            "narrow_eyes",
            "hypotelorism: eyes moved together",
            _pair(Handle("translate", "left_eye", (0.11, 0.0), radius=(0.62, 0.45))),
        ),
        Syndrome(
            "downslant",
            "down-slanting palpebral fissures: outer corners of the eyes lowered",
            _pair(Handle("translate", "left_eye", (0.0, 0.11), radius=(0.48, 0.4),
                         offset=(-0.2, 0.0)))
            + _pair(Handle("translate", "left_eye", (0.0, -0.04), radius=(0.36, 0.3),
                           offset=(0.18, 0.0))),
        ),
        Syndrome(
            "broad_nose",
            "broad nasal tip and alae",
            (Handle("scale", "nose", (0.9, 0.0), radius=(0.62, 0.42), offset=(0.0, -0.05)),),
        ),
        Syndrome(
            "long_philtrum",
            "long philtrum with a thin upper lip",
            (
                Handle("translate", "mouth_mid", (0.0, 0.13), radius=(0.6, 0.36),
                       offset=(0.0, -0.16)),
            ),
        ),
        Syndrome(
            "small_chin",
            "small, retruded chin (micrognathia-like)",
            (
                Handle("translate", "mouth_mid", (0.0, -0.12), radius=(0.8, 0.5),
                       offset=(0.0, 0.45)),
                Handle("scale", "mouth_mid", (-0.45, 0.0), radius=(0.8, 0.5),
                       offset=(0.0, 0.45)),
            ),
        ),
    )
}


def syndrome(name: str) -> Syndrome:
    try:
        return SYNDROMES[name]
    except KeyError:
        raise ValueError(f"unknown synthetic syndrome {name!r}; known: {sorted(SYNDROMES)}") from None


# --------------------------------------------------------------------------- geometry


def interocular_distance(landmarks: np.ndarray) -> float:
    """Distance between the two eye landmarks, in pixels."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return float(np.linalg.norm(lm[1] - lm[0]))


def anchor_point(landmarks: np.ndarray, anchor: str) -> np.ndarray:
    """(2,) point named by ``anchor`` on a (5, 2) landmark array."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if anchor in LANDMARK_NAMES:
        return lm[LANDMARK_NAMES.index(anchor)]
    if anchor == "eye_mid":
        return (lm[0] + lm[1]) / 2
    if anchor == "mouth_mid":
        return (lm[3] + lm[4]) / 2
    raise ValueError(f"unknown anchor {anchor!r}")


def wendland(r: np.ndarray) -> np.ndarray:
    """Wendland C2 kernel (1-r)^4 (4r+1) on r in [0, 1], exactly 0 beyond."""
    t = np.clip(1.0 - r, 0.0, None)
    return t ** 4 * (4.0 * r + 1.0)


def _handle_field(handle: Handle, landmarks: np.ndarray, shape: tuple[int, int],
                  strength: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 2) forward displacement in px and (H, W) kernel weight of one handle."""
    h, w = shape
    iod = interocular_distance(landmarks)
    cx, cy = handle.center(landmarks)
    rx, ry = handle.radius[0] * iod, handle.radius[1] * iod
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xs - cx, ys - cy
    weight = wendland(np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2))
    a0, a1 = handle.amount
    if handle.kind == "translate":
        fx = np.full_like(dx, a0 * iod * strength)
        fy = np.full_like(dy, a1 * iod * strength)
    elif handle.kind == "scale":
        fx, fy = a0 * strength * dx, a1 * strength * dy
    elif handle.kind == "rotate":
        theta = math.radians(a0 * strength)
        c, s = math.cos(theta) - 1.0, math.sin(theta)
        fx, fy = c * dx - s * dy, s * dx + c * dy
    else:
        raise ValueError(f"unknown handle kind {handle.kind!r}")
    return np.stack([fx * weight, fy * weight], axis=-1), weight


@dataclass(frozen=True)
class Deformation:
    """The field of one syndrome on one face: ``displacement`` (H, W, 2) in px
    (where content at x moves to), ``influence`` (H, W) max kernel weight in [0, 1]."""

    displacement: np.ndarray
    influence: np.ndarray

    def region(self, level: float = 0.25) -> np.ndarray:
        """(H, W) bool ground-truth region: where some handle acts with weight >= level."""
        return self.influence >= level

    @property
    def support(self) -> np.ndarray:
        """(H, W) bool: every pixel the deformation can move at all."""
        return self.influence > 0


def deformation_field(spec: Syndrome | str, landmarks: np.ndarray, shape: tuple[int, int],
                      strength: float = 1.0) -> Deformation:
    """The displacement field of ``spec`` for a face with (5, 2) ``landmarks`` in an (H, W) image."""
    spec = syndrome(spec) if isinstance(spec, str) else spec
    disp = np.zeros((*shape, 2))
    influence = np.zeros(shape)
    for handle in spec.handles:
        d, w = _handle_field(handle, landmarks, shape, strength)
        disp += d
        influence = np.maximum(influence, w)
    return Deformation(disp.astype(np.float32), influence.astype(np.float32))


def warp_with_field(image: np.ndarray, displacement: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Move the content of ``image`` (H, W[, C]) by the forward ``displacement`` (H, W, 2).

    Backward sampling needs the inverse field: solve ``u = x - d(u)`` by a few
    fixed-point steps (exact enough for smooth fields of a few pixels). Pixels
    where the field is zero are copied bit-exactly.
    """
    h, w = displacement.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = np.ascontiguousarray(displacement[..., 0], dtype=np.float32)
    dy = np.ascontiguousarray(displacement[..., 1], dtype=np.float32)
    map_x, map_y = xs - dx, ys - dy
    for _ in range(iterations - 1):
        sx = cv2.remap(dx, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        sy = cv2.remap(dy, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        map_x, map_y = xs - sx, ys - sy
    still = (dx == 0) & (dy == 0)
    map_x[still], map_y[still] = xs[still], ys[still]
    out = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if image.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    out[still] = image[still]
    return out


def deform(image: np.ndarray, landmarks: np.ndarray, spec: Syndrome | str,
           strength: float = 1.0, mask_level: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Apply a synthetic syndrome to an aligned face.

    image: (H, W, 3) uint8 aligned face (crop or padded canvas); landmarks: (5, 2)
    in the same pixel frame. Returns (deformed (H, W, 3) uint8, region (H, W) bool).
    """
    field_ = deformation_field(spec, landmarks, image.shape[:2], strength)
    return warp_with_field(image, field_.displacement), field_.region(mask_level)


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the identity-preserving augmentation (uniform, symmetric)."""

    max_angle_deg: float = 6.0
    max_scale: float = 0.05  # relative
    max_shift_px: float = 3.0
    flip_probability: float = 0.5
    max_brightness: float = 20.0  # additive, pixel units
    max_contrast: float = 0.15  # relative
    max_saturation: float = 0.25  # relative
    max_channel_gain: float = 0.06  # per-channel white balance

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Augmentation:
    """One drawn augmentation: a similarity transform about the crop centre, a
    horizontal flip, and a colour jitter."""

    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 1.0
    saturation: float = 1.0
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def sample(cls, rng: np.random.Generator, config: AugmentConfig) -> Augmentation:
        u = lambda m: float(rng.uniform(-m, m)) if m > 0 else 0.0  # noqa: E731
        return cls(
            angle_deg=u(config.max_angle_deg),
            scale=1.0 + u(config.max_scale),
            shift=(u(config.max_shift_px), u(config.max_shift_px)),
            flip=bool(rng.random() < config.flip_probability),
            brightness=u(config.max_brightness),
            contrast=1.0 + u(config.max_contrast),
            saturation=1.0 + u(config.max_saturation),
            channel_gain=tuple(1.0 + u(config.max_channel_gain) for _ in range(3)),
        )

    def matrix(self, size: tuple[int, int]) -> np.ndarray:
        """(2, 3) forward pixel map of the geometric part (flip, then similarity about the centre)."""
        h, w = size
        center = ((w - 1) / 2.0, (h - 1) / 2.0)
        m = cv2.getRotationMatrix2D(center, -self.angle_deg, self.scale).astype(np.float64)
        m[:, 2] += self.shift
        if self.flip:
            f = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            m = m @ f
        return m


def augment(image: np.ndarray, mask: np.ndarray, landmarks: np.ndarray,
            aug: Augmentation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``aug`` to an image, its region mask and its landmarks consistently.

    image (H, W, 3) uint8, mask (H, W) bool, landmarks (5, 2) -> the same shapes.
    A flip reorders the landmarks so that index 0 stays the image-left eye.
    """
    h, w = image.shape[:2]
    m = aug.matrix((h, w))
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    warped_mask = cv2.warpAffine(mask.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0.0) >= 0.5
    lm = np.asarray(landmarks, dtype=np.float64)
    lm = lm @ m[:, :2].T + m[:, 2]
    if aug.flip:
        lm = lm[list(FLIP_ORDER)]
    return _colour_jitter(out, aug), warped_mask, lm.astype(np.float32)


def _colour_jitter(image: np.ndarray, aug: Augmentation) -> np.ndarray:
    x = image.astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = gray[..., None] + aug.saturation * (x - gray[..., None])
    x = (x - 127.5) * aug.contrast + 127.5 + aug.brightness
    x = x * np.asarray(aug.channel_gain, dtype=np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- source faces


@dataclass(frozen=True)
class SourceFace:
    """A real aligned face with context: ``canvas`` is the 112x112 ArcFace crop
    padded by ``pad`` real pixels on every side, ``landmarks`` (5, 2) in canvas pixels."""

    subject: str
    source_id: str
    canvas: np.ndarray
    landmarks: np.ndarray
    pad: int

    @property
    def crop(self) -> np.ndarray:
        """(112, 112, 3) uint8 aligned crop."""
        p = self.pad
        return self.canvas[p:p + CROP_SIZE, p:p + CROP_SIZE]

    @property
    def crop_landmarks(self) -> np.ndarray:
        return self.landmarks - self.pad


def source_from_photo(photo: np.ndarray, photo_to_crop: np.ndarray, landmarks_crop: np.ndarray,
                      subject: str, source_id: str, pad: int = DEFAULT_PAD) -> SourceFace:
    """Cut a padded aligned canvas from the photo with the alignment's (2, 3) ``photo_to_crop``."""
    m = np.asarray(photo_to_crop, dtype=np.float64).copy()
    m[:, 2] += pad
    size = CROP_SIZE + 2 * pad
    canvas = cv2.warpAffine(np.ascontiguousarray(photo), m, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    return SourceFace(subject, source_id, canvas,
                      np.asarray(landmarks_crop, dtype=np.float32) + pad, pad)


def source_from_crop(crop: np.ndarray, landmarks_crop: np.ndarray | None, subject: str,
                     source_id: str, pad: int = DEFAULT_PAD) -> SourceFace:
    """A source from an already-aligned 112x112 crop: context is mirrored, not real."""
    if crop.shape[:2] != (CROP_SIZE, CROP_SIZE):
        raise ValueError(f"aligned crops must be {CROP_SIZE}x{CROP_SIZE}, got {crop.shape[:2]}")
    lm = ARCFACE_TEMPLATE_112 if landmarks_crop is None else landmarks_crop
    canvas = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    return SourceFace(subject, source_id, canvas, np.asarray(lm, dtype=np.float32) + pad, pad)


def load_source_faces(pipeline=None, photos: Sequence | None = None,
                      pad: int = DEFAULT_PAD) -> list[SourceFace]:
    """Every face of the bundled real photos (``encoder.assets.PHOTOS``) as sources.

    Multi-face photos (t1.jpg) give one subject per face, ordered left to right.
    ``pipeline`` is an ``encoder.pipeline.FacePipeline`` (made if None).
    """
    from encoder.assets import PHOTOS
    from encoder.image import load_rgb

    if pipeline is None:
        from encoder.pipeline import FacePipeline

        pipeline = FacePipeline()
    sources: list[SourceFace] = []
    for p in photos if photos is not None else PHOTOS:
        rgb = load_rgb(p.path)
        if p.aligned:
            face = pipeline.face(rgb, aligned=True)
            sources.append(source_from_crop(face.alignment.crop, face.alignment.landmarks_crop,
                                            p.person, p.name, pad))
            continue
        if p.faces == 1:
            a = pipeline.face(rgb).alignment
            sources.append(source_from_photo(rgb, a.photo_to_crop, a.landmarks_crop,
                                             p.person, p.name, pad))
            continue
        for i, a in enumerate(_all_alignments(pipeline, rgb)):
            sources.append(source_from_photo(rgb, a.photo_to_crop, a.landmarks_crop,
                                             f"{p.person}_face{i}", f"{p.name}#{i}", pad))
    return sources


def _all_alignments(pipeline, rgb: np.ndarray) -> list:
    """Alignments of every detected face, left to right."""
    alignments = [f.alignment for f in pipeline.faces(rgb)]
    return sorted(alignments, key=lambda a: float(np.mean(a.landmarks_photo[:, 0])))


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class SynthSample:
    """One synthetic face: image (112, 112, 3) uint8, mask (112, 112) bool (the
    ground-truth region), landmarks (5, 2) in crop pixels, and its provenance."""

    image_id: str
    subject: str
    label: str
    split: str
    source_id: str
    strength: float
    augmentation: Augmentation
    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    landmarks: np.ndarray = field(repr=False)


def make_sample(source: SourceFace, spec: Syndrome | str, strength: float, aug: Augmentation,
                mask_level: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deform then augment one source; returns (image (112,112,3), mask (112,112), landmarks (5,2))."""
    deformed, region = deform(source.canvas, source.landmarks, spec, strength, mask_level)
    image, mask, lm = augment(deformed, region, source.landmarks, aug)
    p = source.pad
    return (np.ascontiguousarray(image[p:p + CROP_SIZE, p:p + CROP_SIZE]),
            np.ascontiguousarray(mask[p:p + CROP_SIZE, p:p + CROP_SIZE]), lm - p)


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode())


def generate(sources: Sequence[SourceFace], class_sizes: Mapping[str, int], *, seed: int = 0,
             split: str = "all", strength_range: tuple[float, float] = (0.8, 1.2),
             augment_config: AugmentConfig | None = None,
             mask_level: float = 0.25) -> Iterator[SynthSample]:
    """Yield ``class_sizes[label]`` samples per synthetic syndrome, made from ``sources``.

    Sources are used round-robin in a per-class shuffled order, so every class
    spreads over all subjects before repeating one. A sample's random state is
    ``(seed, split, label, index)``: changing one class's size changes no other sample.
    """
    if not sources:
        raise ValueError("no source faces given")
    config = augment_config if augment_config is not None else AugmentConfig()
    for label, size in class_sizes.items():
        spec = syndrome(label)
        if size < 0:
            raise ValueError(f"class size of {label} must be >= 0, got {size}")
        order_rng = np.random.default_rng([seed, _stable_int(split), _stable_int(label)])
        order = order_rng.permutation(len(sources))
        for i in range(size):
            rng = np.random.default_rng([seed, _stable_int(split), _stable_int(label), i + 1])
            src = sources[order[i % len(sources)]]
            strength = float(rng.uniform(*strength_range))
            aug = Augmentation.sample(rng, config)
            image, mask, lm = make_sample(src, spec, strength, aug, mask_level)
            yield SynthSample(f"{split}-{label}-{i:05d}", src.subject, label, split,
                              src.source_id, strength, aug, image, mask, lm)


# --------------------------------------------------------------------------- splits


def split_subjects(subjects: Iterable[str], fractions: Mapping[str, float],
                   seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Partition subjects into named splits (e.g. train/val/test) by fraction.

    Every split with a positive fraction gets at least one subject; the result
    is disjoint and covers all subjects. Deterministic given the seed.
    """
    unique = sorted(set(subjects))
    names = [n for n, f in fractions.items() if f > 0]
    if len(unique) < len(names):
        raise ValueError(f"{len(unique)} subjects cannot fill {len(names)} splits")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    total = sum(fractions[n] for n in names)
    counts = [max(1, round(len(unique) * fractions[n] / total)) for n in names]
    while sum(counts) > len(unique):
        counts[int(np.argmax(counts))] -= 1
    counts[0] += len(unique) - sum(counts)
    out, start = {}, 0
    for name, count in zip(names, counts, strict=True):
        out[name] = tuple(sorted(order[start:start + count]))
        start += count
    return out


def subject_folds(subjects: Iterable[str], k: int, seed: int = 0) -> list[tuple[str, ...]]:
    """k disjoint groups of subjects covering all of them (for subject-disjoint cross-validation)."""
    unique = sorted(set(subjects))
    if not 2 <= k <= len(unique):
        raise ValueError(f"need 2 <= k <= {len(unique)} subjects, got k={k}")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    return [tuple(sorted(order[i::k])) for i in range(k)]


def assert_subject_disjoint(splits: Mapping[str, Iterable[str]]) -> None:
    """Raise SubjectLeak if a subject appears in two splits."""
    seen: dict[str, str] = {}
    for name, subjects in splits.items():
        for s in set(subjects):
            if s in seen:
                raise SubjectLeak(f"a subject is in both the {seen[s]} and the {name} split")
            seen[s] = name


class SubjectLeak(ValueError):
    """The same subject in two splits that must be disjoint."""


# --------------------------------------------------------------------------- folder tree


MANIFEST_FIELDS = (
    "image_id", "subject", "label", "split", "image_path", "mask_path", "source_id", "strength",
    "angle_deg", "scale", "shift_x", "shift_y", "flip", "brightness", "contrast", "saturation",
    "landmarks",
)


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.csv`` (paths relative to the dataset folder)."""

    image_id: str
    subject: str
    label: str
    split: str
    image_path: str
    mask_path: str
    source_id: str
    strength: float
    landmarks: np.ndarray = field(repr=False)


def write_dataset(samples: Iterable[SynthSample], out_dir: str | Path) -> Path:
    """Write ``images/<split>/<label>/<id>.png``, ``masks/...`` (0/255 PNG) and ``manifest.csv``.

    The first three manifest columns are GestaltMatcher's split CSV
    (``image_id, subject, label``). Returns the manifest path.
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for s in samples:
            rel_img = Path("images") / s.split / s.label / f"{s.image_id}.png"
            rel_mask = Path("masks") / s.split / s.label / f"{s.image_id}.png"
            for rel in (rel_img, rel_mask):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.image).save(out / rel_img)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(out / rel_mask)
            a = s.augmentation
            writer.writerow([
                s.image_id, s.subject, s.label, s.split, rel_img.as_posix(), rel_mask.as_posix(),
                s.source_id, f"{s.strength:.4f}", f"{a.angle_deg:.3f}", f"{a.scale:.4f}",
                f"{a.shift[0]:.3f}", f"{a.shift[1]:.3f}", int(a.flip), f"{a.brightness:.2f}",
                f"{a.contrast:.4f}", f"{a.saturation:.4f}",
                " ".join(f"{v:.2f}" for v in np.asarray(s.landmarks).ravel()),
            ])
    return manifest


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a ``manifest.csv`` written by ``write_dataset``."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            lm = np.array([float(v) for v in r["landmarks"].split()], dtype=np.float32).reshape(5, 2)
            rows.append(ManifestRow(r["image_id"], r["subject"], r["label"], r["split"],
                                    r["image_path"], r["mask_path"], r["source_id"],
                                    float(r["strength"]), lm))
    return rows


def load_image_and_mask(root: str | Path, row: ManifestRow) -> tuple[np.ndarray, np.ndarray]:
    """(112, 112, 3) uint8 image and (112, 112) bool mask of one manifest row."""
    from PIL import Image

    root = Path(root)
    image = np.asarray(Image.open(root / row.image_path).convert("RGB"))
    mask = np.asarray(Image.open(root / row.mask_path).convert("L")) >= 128
    return image, mask


# --------------------------------------------------------------------------- in-memory sets


@dataclass(frozen=True)
class FaceSet:
    """N labelled synthetic faces as arrays: images (N, 112, 112, 3) uint8, masks
    (N, 112, 112) bool, and parallel (N,) image ids, subjects and labels."""

    images: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)
    image_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, index: Sequence[int]) -> FaceSet:
        idx = list(index)
        return FaceSet(self.images[idx], self.masks[idx], tuple(self.image_ids[i] for i in idx),
                       tuple(self.subjects[i] for i in idx), tuple(self.labels[i] for i in idx))


def face_set(samples: Iterable[SynthSample]) -> FaceSet:
    items = list(samples)
    if not items:
        empty = np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        return FaceSet(empty, np.zeros((0, CROP_SIZE, CROP_SIZE), bool), (), (), ())
    return FaceSet(np.stack([s.image for s in items]), np.stack([s.mask for s in items]),
                   tuple(s.image_id for s in items), tuple(s.subject for s in items),
                   tuple(s.label for s in items))


def load_face_set(root: str | Path, split: str | None = None) -> FaceSet:
    """The rows of ``root/manifest.csv`` (one split, or all) as a :class:`FaceSet`."""
    root = Path(root)
    rows = [r for r in read_manifest(root / "manifest.csv") if split is None or r.split == split]
    pairs = [load_image_and_mask(root, r) for r in rows]
    if not rows:
        return face_set([])
    return FaceSet(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
                   tuple(r.image_id for r in rows), tuple(r.subject for r in rows),
                   tuple(r.label for r in rows))


@dataclass(frozen=True)
class SplitPlan:
    """How a synthetic data set is cut: subject fractions per split, the class
    sizes of the training split and the per-class size of the other splits."""

    class_sizes: Mapping[str, int]
    eval_size: int = 20
    fractions: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.6, "val": 0.15, "test": 0.25})
    seed: int = 0
    strength_range: tuple[float, float] = (0.8, 1.2)
    augment_config: AugmentConfig = field(default_factory=AugmentConfig)


def generate_splits(sources: Sequence[SourceFace], plan: SplitPlan) -> dict[str, list[SynthSample]]:
    """Subject-disjoint splits: ``train`` gets ``plan.class_sizes``, the others
    ``plan.eval_size`` per class; subjects are split by ``plan.fractions``."""
    subjects = split_subjects([s.subject for s in sources], plan.fractions, plan.seed)
    assert_subject_disjoint(subjects)
    out = {}
    for name, members in subjects.items():
        src = [s for s in sources if s.subject in members]
        sizes = (dict(plan.class_sizes) if name == "train"
                 else {c: plan.eval_size for c in plan.class_sizes})
        out[name] = list(generate(src, sizes, seed=plan.seed, split=name,
                                  strength_range=plan.strength_range,
                                  augment_config=plan.augment_config))
    return out


# --------------------------------------------------------------------------- demo cohort


@dataclass(frozen=True)
class SyndromeLabel:
    """What a gallery record says about a synthetic syndrome: an OMIM-style number and
    gene symbols that are made up (no real OMIM entry or HGNC symbol has them), and the
    region of the face its handles act on (``explain.regions.SUMMARY_REGIONS``)."""

    syndrome_id: str
    name: str
    omim: str
    genes: tuple[str, ...]
    region: str


# Genes shared between syndromes (SYNG-ORB1: wide and narrow eyes, SYNG-ORA1: philtrum and
# chin) exercise the gene ranking, whose best cosine pools several syndromes.
LABELS: dict[str, SyndromeLabel] = {
    lab.syndrome_id: lab
    for lab in (
        SyndromeLabel("wide_eyes", "synthetic hypertelorism", "SYN-900001", ("SYNG-ORB1",), "eyes"),
        SyndromeLabel("narrow_eyes", "synthetic hypotelorism", "SYN-900002", ("SYNG-ORB1",),
                      "eyes"),
        SyndromeLabel("downslant", "synthetic down-slanting eyes", "SYN-900003", ("SYNG-ORB2",),
                      "eyes"),
        SyndromeLabel("broad_nose", "synthetic broad nose", "SYN-900004", ("SYNG-NAS1",), "nose"),
        SyndromeLabel("long_philtrum", "synthetic long philtrum", "SYN-900005", ("SYNG-ORA1",),
                      "mouth"),
        SyndromeLabel("small_chin", "synthetic small chin", "SYN-900006", ("SYNG-MAN1",), "chin"),
    )
}
assert set(LABELS) == set(SYNDROMES)

# Held out of every demo gallery: the demo's query faces are new people.
DEMO_HELD_OUT = ("grace_hopper", "eileen_collins")


def planted_region(label: str) -> str:
    """The summary region (eyes, nose, mouth, chin) a synthetic syndrome's handles act on."""
    return LABELS[label].region


@dataclass(frozen=True)
class Cohort:
    """A synthetic-syndrome gallery and subject-disjoint query faces made from the bundled
    real photos: ``gallery`` and ``queries`` are lists of :class:`SynthSample`."""

    gallery: list[SynthSample]
    queries: list[SynthSample]

    @property
    def gallery_subjects(self) -> tuple[str, ...]:
        return tuple(sorted({s.subject for s in self.gallery}))

    @property
    def query_subjects(self) -> tuple[str, ...]:
        return tuple(sorted({s.subject for s in self.queries}))


def cohort(sources: Sequence[SourceFace], held_out: Iterable[str] = DEMO_HELD_OUT, *,
           per_source: int = 2, queries_per_source: int = 1, seed: int = 0,
           classes: Sequence[str] | None = None) -> Cohort:
    """Every syndrome on every gallery subject (``per_source`` augmented images per source
    photo), and ``queries_per_source`` images per syndrome of each held-out subject.

    With every syndrome on every gallery subject, identity is balanced across the
    syndromes: the nearest face of a syndrome is told apart by its deformation alone.
    """
    held = set(held_out)
    classes = list(classes or SYNDROMES)
    gallery_src = [s for s in sources if s.subject not in held]
    query_src = [s for s in sources if s.subject in held]
    missing = held - {s.subject for s in query_src}
    if missing:
        raise ValueError(f"held-out subjects not among the sources: {sorted(missing)}")
    if not gallery_src:
        raise ValueError("no gallery subjects left after holding some out")
    assert_subject_disjoint({"gallery": [s.subject for s in gallery_src],
                             "queries": [s.subject for s in query_src]})
    gallery = list(generate(gallery_src, {c: per_source * len(gallery_src) for c in classes},
                            seed=seed, split="gallery"))
    queries = list(generate(query_src, {c: queries_per_source * len(query_src) for c in classes},
                            seed=seed, split="query")) if query_src else []
    return Cohort(gallery, queries)


def gallery_genes(sample: SynthSample) -> tuple[str, ...]:
    return LABELS[sample.label].genes
