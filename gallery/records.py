"""The small frozen records that cross the gallery's boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gallery.vectors import ViewsLike, as_views


@dataclass(frozen=True, eq=False)
class Entry:
    """One image to add: labels plus its per-view embedding ``views`` (V vectors, (D_v,) each).

    ``encoder_id``/``view_scheme`` default to the gallery's; naming others raises SchemeMismatch.
    ``crop_png`` is the aligned face crop as PNG bytes (see ``gallery.png.encode_png``).
    """

    image_id: str
    subject_id: str
    syndrome_id: str
    syndrome_name: str
    views: ViewsLike
    omim_id: str | None = None
    genes: tuple[str, ...] = ()
    source: str = ""
    crop_png: bytes | None = None
    encoder_id: str | None = None
    view_scheme: str | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.image_id):
            raise ValueError("image_id must not be empty")
        object.__setattr__(self, "image_id", str(self.image_id))
        object.__setattr__(self, "subject_id", str(self.subject_id))
        object.__setattr__(self, "syndrome_id", str(self.syndrome_id))
        object.__setattr__(self, "syndrome_name", str(self.syndrome_name))
        object.__setattr__(self, "omim_id", None if self.omim_id in (None, "") else str(self.omim_id))
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        object.__setattr__(self, "views", as_views(self.views))


@dataclass(frozen=True)
class RecordInfo:
    """A gallery record's labels and provenance (no embedding, no crop)."""

    gallery_id: int
    image_id: str
    subject_id: str
    syndrome_id: str
    syndrome_name: str
    omim_id: str | None
    genes: tuple[str, ...]
    source: str
    encoder_id: str
    view_scheme: str
    created_at: float
    updated_at: float
    provenance: str = "{}"


@dataclass(frozen=True, eq=False)
class Record:
    """A full record: ``info``, the stored per-view embedding (V arrays (D_v,)) and the crop."""

    info: RecordInfo
    views: tuple[np.ndarray, ...]
    crop_png: bytes | None


@dataclass(frozen=True)
class Hit:
    """One gallery image matched to a query; ``score`` is the mean per-view cosine."""

    gallery_id: int
    image_id: str
    subject_id: str
    syndrome_id: str
    syndrome_name: str
    omim_id: str | None
    genes: tuple[str, ...]
    score: float

    @property
    def distance(self) -> float:
        """Mean per-view cosine distance, GestaltMatcher's ``distance``."""
        return 1.0 - self.score


@dataclass(frozen=True)
class SyndromeHit:
    """A syndrome ranked by its nearest gallery image (GestaltMatcher's rule)."""

    syndrome_id: str
    syndrome_name: str
    omim_id: str | None
    score: float
    gallery_id: int
    image_id: str
    subject_id: str

    @property
    def distance(self) -> float:
        return 1.0 - self.score


@dataclass(frozen=True)
class GeneHit:
    """A gene ranked by the nearest gallery image that carries it."""

    gene: str
    score: float
    gallery_id: int
    image_id: str
    subject_id: str
    syndrome_id: str

    @property
    def distance(self) -> float:
        return 1.0 - self.score


@dataclass(frozen=True)
class AddReport:
    """Gallery ids touched by one add/import: new, replaced in place, already identical."""

    added: tuple[int, ...] = ()
    updated: tuple[int, ...] = ()
    unchanged: tuple[int, ...] = ()

    def __add__(self, other: AddReport) -> AddReport:
        return AddReport(
            self.added + other.added, self.updated + other.updated, self.unchanged + other.unchanged
        )


@dataclass(frozen=True)
class ClassBalance:
    """Imbalance of image counts over classes (syndromes or subjects)."""

    classes: int
    min_count: int
    max_count: int
    max_min_ratio: float
    gini: float
    singletons: int


@dataclass(frozen=True)
class GalleryStats:
    records: int
    subjects: int
    syndromes: int
    genes: int
    encoder_id: str | None
    view_scheme: str | None
    view_dims: tuple[int, ...]
    gallery_version: int
    schema_version: int
    index_factory: str
    index_effective_factory: str
    images_per_syndrome: dict[str, int]
    subjects_per_syndrome: dict[str, int]
    syndrome_names: dict[str, str]
    images_per_subject: dict[str, int]
    syndrome_balance: ClassBalance
    subject_balance: ClassBalance
    syndromes_with_one_subject: int


def class_balance(counts: list[int]) -> ClassBalance:
    """Max/min ratio, Gini coefficient (0 = balanced) and singleton count of class sizes."""
    if not counts:
        return ClassBalance(0, 0, 0, 0.0, 0.0, 0)
    values = np.sort(np.asarray(counts, dtype=np.float64))
    n = values.size
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ values / (n * values.sum())) if values.sum() else 0.0
    return ClassBalance(
        classes=n,
        min_count=int(values[0]),
        max_count=int(values[-1]),
        max_min_ratio=float(values[-1] / values[0]),
        gini=gini,
        singletons=int((values == 1).sum()),
    )
