"""GestaltMatcher matching accuracy on plain numpy arrays (no torch).

Splits (``Split``, ``read_split_csv``), the subject-disjointness check, GM's
syndrome ranking (a syndrome scores its nearest gallery image), macro/micro
top-k and the end-to-end ``split_accuracy`` on per-view embeddings. Used by
``phenolens evaluate accuracy``, ``research.train`` and the benches.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_KS: tuple[int, ...] = (1, 5, 10, 30)


class AccuracyError(ValueError):
    """A matching-accuracy protocol cannot run on the data given."""


class SubjectLeakage(AccuracyError):
    """The same subject appears in the gallery split and the test split."""


@dataclass(frozen=True)
class Split:
    """One split of a GestaltMatcher-style data set: parallel (N,) columns."""

    image_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.image_ids) == len(self.subjects) == len(self.labels):
            raise AccuracyError("split columns have different lengths")

    def __len__(self) -> int:
        return len(self.image_ids)


_SPLIT_COLUMNS = {
    "image_id": ("image_id", "img_id", "image", "img_name", "id"),
    "subject": ("subject", "subject_id", "patient_id"),
    "label": ("label", "syndrome_id", "syndrome", "disorder_id"),
}


def read_split_csv(path: str | Path) -> Split:
    """Read a GM split CSV (columns ``image_id, subject, label``; extra columns and
    a leading index column are ignored; the usual GMDB aliases are accepted)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;") if sample else csv.excel
        rows = list(csv.reader(fh, dialect))
    if not rows:
        raise AccuracyError(f"{path.name}: empty split file")
    header = [h.strip().lower() for h in rows[0]]
    cols = {}
    for key, aliases in _SPLIT_COLUMNS.items():
        idx = next((header.index(a) for a in aliases if a in header), None)
        if idx is None:
            raise AccuracyError(
                f"{path.name}: no {key} column (need image_id, subject, label; got {header})"
            )
        cols[key] = idx
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    return Split(
        image_ids=tuple(r[cols["image_id"]].strip() for r in body),
        subjects=tuple(r[cols["subject"]].strip() for r in body),
        labels=tuple(r[cols["label"]].strip() for r in body),
    )


def assert_subject_disjoint(gallery_subjects: Iterable[str], test_subjects: Iterable[str]) -> None:
    """Raise SubjectLeakage when any subject is in both splits (only the count is reported)."""
    shared = set(gallery_subjects) & set(test_subjects)
    if shared:
        raise SubjectLeakage(
            f"{len(shared)} subject(s) appear in both the gallery and the test split; "
            "GestaltMatcher's protocol requires subject-disjoint splits"
        )


def syndrome_ranks(
    similarity: np.ndarray, gallery_labels: Sequence[str], query_labels: Sequence[str]
) -> np.ndarray:
    """(Q,) 1-based rank of each query's true syndrome in GM's syndrome ranking.

    A syndrome scores the similarity of its nearest gallery image; the rank is
    1 + the number of syndromes scoring strictly higher than the true one.
    Queries whose syndrome has no gallery image get rank ``inf``.

    Args:
        similarity: (Q, G) query-by-gallery similarity (higher = closer).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    glab = np.asarray(gallery_labels, dtype=object)
    if sim.shape != (len(query_labels), len(glab)):
        raise AccuracyError(
            f"similarity {sim.shape} does not match {len(query_labels)} queries x "
            f"{len(glab)} gallery images"
        )
    syndromes = sorted(set(glab.tolist()))
    index = {s: i for i, s in enumerate(syndromes)}
    per_syndrome = np.full((sim.shape[0], len(syndromes)), -np.inf)
    gl_idx = np.array([index[s] for s in glab.tolist()], dtype=np.int64)
    for j in range(len(syndromes)):
        cols = gl_idx == j
        per_syndrome[:, j] = sim[:, cols].max(axis=1)
    ranks = np.full(sim.shape[0], np.inf)
    for q, label in enumerate(query_labels):
        j = index.get(label)
        if j is not None:
            ranks[q] = 1 + int(np.sum(per_syndrome[q] > per_syndrome[q, j]))
    return ranks


@dataclass(frozen=True)
class TopKAccuracy:
    """GestaltMatcher's matching accuracy: macro (mean over syndromes) and micro top-k."""

    ks: tuple[int, ...]
    macro: dict[int, float]
    micro: dict[int, float]
    per_syndrome: dict[str, dict[int, float]]
    n_queries: int
    n_syndromes: int
    n_missing_in_gallery: int  # test queries whose syndrome has no gallery image


def macro_topk(
    ranks: Sequence[float], labels: Sequence[str], ks: Sequence[int] = TOP_KS
) -> TopKAccuracy:
    """Macro top-k: the per-syndrome fraction of queries ranked within k, averaged
    over the syndromes of the test split (each syndrome counts once)."""
    r = np.asarray(ranks, dtype=np.float64)
    labs = np.asarray(labels, dtype=object)
    if r.shape != labs.shape:
        raise AccuracyError("ranks and labels differ in length")
    if r.size == 0:
        raise AccuracyError("no test queries")
    ks = tuple(int(k) for k in ks)
    per: dict[str, dict[int, float]] = {}
    for s in sorted(set(labs.tolist())):
        rs = r[labs == s]
        per[s] = {k: float(np.mean(rs <= k)) for k in ks}
    return TopKAccuracy(
        ks=ks,
        macro={k: float(np.mean([per[s][k] for s in per])) for k in ks},
        micro={k: float(np.mean(r <= k)) for k in ks},
        per_syndrome=per,
        n_queries=int(r.size),
        n_syndromes=len(per),
        n_missing_in_gallery=int(np.sum(~np.isfinite(r))),
    )


def mean_view_cosine(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, V, D) x (G, V, D) per-view embeddings -> (Q, G) mean cosine over views.

    Embeddings are L2-normalised per view here, so raw ones are fine (DESIGN §4).
    """
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    if q.ndim == 2:
        q = q[:, None]
    if g.ndim == 2:
        g = g[:, None]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    g = g / np.linalg.norm(g, axis=-1, keepdims=True)
    return np.einsum("qvd,gvd->qg", q, g) / q.shape[1]


def split_accuracy(
    query: np.ndarray,
    query_split: Split,
    gallery: np.ndarray,
    gallery_split: Split,
    ks: Sequence[int] = TOP_KS,
) -> TopKAccuracy:
    """GM protocol end to end on embeddings: subject check, syndrome ranking, macro top-k.

    Args:
        query: (Q, V, D) or (Q, D) embeddings of the test split, in its order.
        gallery: (G, V, D) or (G, D) embeddings of the gallery split, in its order.
    """
    assert_subject_disjoint(gallery_split.subjects, query_split.subjects)
    if len(query) != len(query_split) or len(gallery) != len(gallery_split):
        raise AccuracyError("embeddings and split rows differ in number")
    sim = mean_view_cosine(query, gallery)
    ranks = syndrome_ranks(sim, gallery_split.labels, query_split.labels)
    return macro_topk(ranks, query_split.labels, ks)
