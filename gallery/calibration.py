"""Calibrated match confidence from the gallery itself (numpy and scipy).

A cosine of 0.45 means nothing until one knows how same-syndrome and
different-syndrome pairs score in *this* gallery. So every gallery image is
used once as a query with its whole subject left out (leave one subject out),
and two monotone maps are fitted:

- **hit**: the cosine of a (query, gallery image) pair -> P(the two share the
  syndrome); samples are all pairs of images of different subjects.
- **syndrome**: a syndrome's best cosine (its nearest image, GestaltMatcher's
  ranking rule) -> P(the query has that syndrome); samples are, per left-out
  query whose syndrome still has other subjects in the gallery, every
  syndrome's best cosine, labelled 1 for the query's own syndrome;
- **gene**: the same for genes (a gene's best cosine is that of the nearest image
  carrying it; a query may carry several), from queries with at least one gene
  carried by another subject.

Each map is isotonic (scipy's pool-adjacent-violators) or logistic, whichever has the
lower expected calibration error (ECE) in a 5-fold cross-validation split by
the query's subject; the ECE reported is that cross-validated one, and the
sample count is what the map rests on. A calibration belongs to one gallery
version (``CalibrationCache`` refits when the version moves); confidence is
refused, with the reason, for syndromes (genes) with fewer than ``min_subjects``
subjects and for galleries too small to fit at all.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.special import expit

from gallery.vectors import search_vector

MIN_SUBJECTS = 3  # per syndrome: fewer and its confidence is refused
MIN_POSITIVES = 20  # same-syndrome samples a map needs
ECE_BINS = 10
FOLDS = 5
MAX_IMAGES = 3000  # larger galleries are subsampled (seeded) to keep the fit O(N^2) small
PROBABILITY_RANGE = (0.001, 0.999)  # finite data never justifies 0 or 1


@dataclass(frozen=True)
class Curve:
    """A monotone map from cosine to probability, with how well it is calibrated.

    kind "isotonic": piecewise-linear through ``knots_x``/``knots_y``;
    kind "logistic": ``sigmoid(a + b * cosine)`` with ``(a, b) = params``.
    ``ece`` is cross-validated; ``ece_raw`` is the ECE of the cosine itself read
    as a probability (clipped to [0, 1]) on the same samples.
    """

    kind: str
    samples: int
    positives: int
    ece: float
    ece_raw: float
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    params: tuple[float, float] = (0.0, 0.0)
    candidates: tuple[tuple[str, float], ...] = ()  # (kind, cross-validated ECE) of each fit

    def __call__(self, cosine: float | np.ndarray) -> np.ndarray:
        x = np.asarray(cosine, dtype=np.float64)
        if self.kind == "isotonic":
            p = np.interp(x, self.knots_x, self.knots_y)
        else:
            p = expit(self.params[0] + self.params[1] * x)
        return np.clip(p, *PROBABILITY_RANGE)


@dataclass(frozen=True)
class Confidence:
    """P(the query shares the syndrome), or why it is not given (``probability`` None)."""

    probability: float | None
    reason: str = ""
    method: str = ""
    calibration_error: float = 0.0
    samples: int = 0
    gallery_version: int = 0

    @property
    def calibrated(self) -> bool:
        return self.probability is not None

    def to_json(self) -> dict:
        """The CLI's ``"confidence"`` object (the client's ``Confidence.to_json`` has the same)."""
        return {"probability": self.probability, "reason": self.reason or None,
                "method": self.method or None, "calibration_error": self.calibration_error,
                "samples": self.samples, "gallery_version": self.gallery_version}


@dataclass(frozen=True)
class Calibration:
    """The gallery's maps (None with ``reason`` / ``gene_reason`` when they could not be fitted)."""

    gallery_version: int
    hit: Curve | None
    syndrome: Curve | None
    subjects_per_syndrome: dict[str, int] = field(repr=False)
    min_subjects: int = MIN_SUBJECTS
    reason: str = ""
    gene: Curve | None = None
    subjects_per_gene: dict[str, int] = field(default_factory=dict, repr=False)
    gene_reason: str = "the gallery's images carry no genes"

    def hit_confidence(self, syndrome_id: str, cosine: float) -> Confidence:
        """Confidence that a query shares the syndrome of a gallery image at ``cosine``."""
        return self._confidence(self.hit, syndrome_id, cosine)

    def syndrome_confidence(self, syndrome_id: str, cosine: float) -> Confidence:
        """Confidence that a query has a syndrome whose nearest image is at ``cosine``."""
        return self._confidence(self.syndrome, syndrome_id, cosine)

    def gene_confidence(self, gene: str, cosine: float) -> Confidence:
        """Confidence that a query carries a gene whose nearest carrier is at ``cosine``."""
        if self.gene is None:
            return Confidence(None, self.gene_reason or self.reason,
                              gallery_version=self.gallery_version)
        return self._confidence(self.gene, gene, cosine, "gene", self.subjects_per_gene)

    def _confidence(self, curve: Curve | None, label: str, cosine: float,
                    what: str = "syndrome", counts: dict[str, int] | None = None) -> Confidence:
        if curve is None:
            return Confidence(None, self.reason, gallery_version=self.gallery_version)
        subjects = (self.subjects_per_syndrome if counts is None else counts).get(label, 0)
        if subjects < self.min_subjects:
            return Confidence(
                None,
                f"{what} {label!r} has {subjects} subject(s) in the gallery; a calibrated "
                f"confidence needs at least {self.min_subjects}",
                curve.kind, curve.ece, curve.samples, self.gallery_version)
        return Confidence(float(curve(cosine)), "", curve.kind, curve.ece, curve.samples,
                          self.gallery_version)


# -- fitting -------------------------------------------------------------------------------


def expected_calibration_error(probability: np.ndarray, label: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width probability bins: sum_b n_b/n * |mean p - mean y|."""
    p = np.clip(np.asarray(probability, np.float64), 0.0, 1.0)
    y = np.asarray(label, np.float64)
    if p.size == 0:
        return 0.0
    which = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    sp = np.bincount(which, p, minlength=bins)
    sy = np.bincount(which, y, minlength=bins)
    used = n > 0
    return float(np.sum(np.abs(sp[used] - sy[used])) / p.size)


def fit_isotonic(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Non-decreasing least-squares fit (scipy's pool adjacent violators) -> knots (x, y) for
    interp: each pooled block's first and last x at the block's mean."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    fit = isotonic_regression(ys)
    first, last = fit.blocks[:-1], fit.blocks[1:] - 1
    kx = np.column_stack([xs[first], xs[last]]).ravel()
    ky = np.repeat(fit.x[first], 2)
    keep = np.concatenate([[True], np.diff(kx) > 0])  # one knot per x, the first block's
    return tuple(kx[keep].tolist()), tuple(ky[keep].tolist())


def fit_logistic(x: np.ndarray, y: np.ndarray, *, ridge: float = 1e-6) -> tuple[float, float]:
    """(a, b) of sigmoid(a + b x): maximum likelihood (scipy's BFGS), ``ridge`` * |(a, b)|^2 / 2
    added to the negative log-likelihood."""
    X = np.stack([np.ones_like(x, dtype=np.float64), np.asarray(x, np.float64)], axis=1)
    y = np.asarray(y, np.float64)
    n = y.size

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ w
        nll = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * w @ w
        return nll / n, (X.T @ (expit(z) - y) + ridge * w) / n

    w = minimize(loss, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-10}).x
    return float(w[0]), float(w[1])


def _curve(kind: str, x: np.ndarray, y: np.ndarray) -> Curve:
    if kind == "isotonic":
        kx, ky = fit_isotonic(x, y)
        return Curve("isotonic", x.size, int(y.sum()), 0.0, 0.0, knots_x=kx, knots_y=ky)
    return Curve("logistic", x.size, int(y.sum()), 0.0, 0.0, params=fit_logistic(x, y))


def fit_curve(cosine: np.ndarray, label: np.ndarray, group: np.ndarray,
              folds: int = FOLDS) -> Curve:
    """The better-calibrated of isotonic and logistic by cross-validated ECE (folds by ``group``,
    the query's subject), refitted on all samples. cosine, label, group: (n,)."""
    cosine = np.asarray(cosine, np.float64)
    label = np.asarray(label, np.float64)
    _, group_index = np.unique(np.asarray(group), return_inverse=True)
    fold = group_index % folds
    scores = {}
    for kind in ("isotonic", "logistic"):
        predicted = np.empty_like(cosine)
        for f in range(folds):
            test = fold == f
            train = ~test
            if not test.any():
                continue
            if label[train].min() == label[train].max():
                predicted[test] = label[train].mean()
                continue
            predicted[test] = _curve(kind, cosine[train], label[train])(cosine[test])
        scores[kind] = expected_calibration_error(predicted, label)
    kind = min(scores, key=scores.__getitem__)
    best = _curve(kind, cosine, label)
    raw = expected_calibration_error(np.clip(cosine, 0.0, 1.0), label)
    return Curve(best.kind, best.samples, best.positives, scores[kind], raw, best.knots_x,
                 best.knots_y, best.params, tuple(scores.items()))


@dataclass(frozen=True)
class LosoSamples:
    """Leave-one-subject-out samples: ``hit_*`` per pair of images of different subjects,
    ``syndrome_*`` per (left-out query, syndrome) best cosine; ``*_group`` the query's subject."""

    hit_cosine: np.ndarray
    hit_label: np.ndarray
    hit_group: np.ndarray
    syndrome_cosine: np.ndarray
    syndrome_label: np.ndarray
    syndrome_group: np.ndarray
    gene_cosine: np.ndarray
    gene_label: np.ndarray
    gene_group: np.ndarray


def _best_of_labels(masked: np.ndarray, member: np.ndarray, subj: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (query, label): the best cosine to the label's images of other subjects.

    masked (N, N) cosines, -inf for same-subject pairs; member (N, L) bool. Only queries
    with one of their own labels still present (and only labels present) give samples.
    Returns (cosine, label 0/1, query subject), each (n,)."""
    if member.shape[1] == 0:
        empty = np.zeros(0)
        return empty, empty.astype(np.int8), empty.astype(int)
    best = np.stack([masked[:, member[:, k]].max(axis=1) for k in range(member.shape[1])],
                    axis=1)
    present = np.isfinite(best)
    own_present = (present & member).any(axis=1)
    rows, cols = np.nonzero(present & own_present[:, None])
    return (best[rows, cols].astype(np.float64), member[rows, cols].astype(np.int8),
            subj[rows])


def loso_samples(vectors: np.ndarray, subjects: Sequence[str], syndromes: Sequence[str],
                 genes: Sequence[Sequence[str]] | None = None) -> LosoSamples:
    """vectors: (N, D) search vectors (inner product = mean per-view cosine); genes: per
    image the genes it carries (none: no gene samples)."""
    subj = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)[1]
    syn_names, syn = np.unique(np.asarray(syndromes, dtype=object).astype(str),
                               return_inverse=True)
    sim = np.asarray(vectors, np.float32) @ np.asarray(vectors, np.float32).T
    other_subject = subj[:, None] != subj[None, :]
    i, j = np.nonzero(np.triu(other_subject, k=1))
    hit_cos, hit_lab = sim[i, j], (syn[i] == syn[j]).astype(np.int8)
    masked = np.where(other_subject, sim, -np.inf)
    syndrome = _best_of_labels(masked, syn[:, None] == np.arange(syn_names.size)[None, :], subj)
    gene_names = sorted({g for gs in genes or () for g in gs})
    member = np.array([[g in set(gs) for g in gene_names] for gs in genes or [()] * len(subj)],
                      dtype=bool).reshape(len(subj), len(gene_names))
    gene = _best_of_labels(masked, member, subj)
    return LosoSamples(hit_cos.astype(np.float64), hit_lab, subj[i], *syndrome, *gene)


def fit_calibration(vectors: np.ndarray, subjects: Sequence[str], syndromes: Sequence[str], *,
                    genes: Sequence[Sequence[str]] | None = None, gallery_version: int = 0,
                    min_subjects: int = MIN_SUBJECTS, max_images: int = MAX_IMAGES,
                    seed: int = 0) -> Calibration:
    """A Calibration of N gallery images: vectors (N, D) search vectors, labels (N,),
    genes (N,) tuples (optional)."""
    subjects = [str(s) for s in subjects]
    syndromes = [str(s) for s in syndromes]
    genes = [tuple(str(g) for g in gs) for gs in genes] if genes is not None \
        else [()] * len(subjects)
    per_syndrome: dict[str, set[str]] = {}
    per_gene: dict[str, set[str]] = {}
    for s, y, gs in zip(subjects, syndromes, genes, strict=True):
        per_syndrome.setdefault(y, set()).add(s)
        for g in gs:
            per_gene.setdefault(g, set()).add(s)
    counts = {y: len(s) for y, s in per_syndrome.items()}
    gene_counts = {g: len(s) for g, s in per_gene.items()}
    vectors = np.asarray(vectors)
    if len(subjects) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(subjects), max_images, replace=False))
        vectors = vectors[keep]
        subjects = [subjects[k] for k in keep]
        syndromes = [syndromes[k] for k in keep]
        genes = [genes[k] for k in keep]
    eligible = sum(1 for n in counts.values() if n >= 2)
    if eligible < 2:
        return Calibration(gallery_version, None, None, counts, min_subjects,
                           "the gallery needs at least two syndromes with two or more subjects "
                           "each to calibrate confidence")
    s = loso_samples(vectors, subjects, syndromes, genes)
    curves = []
    for cos, lab, grp in ((s.hit_cosine, s.hit_label, s.hit_group),
                          (s.syndrome_cosine, s.syndrome_label, s.syndrome_group),
                          (s.gene_cosine, s.gene_label, s.gene_group)):
        positives = int(lab.sum())
        if positives < MIN_POSITIVES or positives == lab.size:
            curves.append(None)
        else:
            curves.append(fit_curve(cos, lab, grp))
    reason = "" if curves[0] and curves[1] else (
        f"too few same-syndrome pairs of different subjects (need {MIN_POSITIVES}) to calibrate")
    gene_reason = "" if curves[2] else (
        "the gallery's images carry no genes" if not gene_counts else
        f"too few gene-sharing samples of different subjects (need {MIN_POSITIVES}) to calibrate")
    return Calibration(gallery_version, curves[0], curves[1], counts, min_subjects, reason,
                       curves[2], gene_counts, gene_reason)


def calibrate_gallery(gallery, *, min_subjects: int = MIN_SUBJECTS) -> Calibration:
    """Fit a Calibration on every record of an open ``gallery.Gallery``."""
    version = gallery.version
    vectors, subjects, syndromes, genes = [], [], [], []
    for record in gallery.iter_records():
        vectors.append(search_vector(record.views))
        subjects.append(record.info.subject_id or record.info.image_id)
        syndromes.append(record.info.syndrome_id)
        genes.append(record.info.genes)
    if not vectors:
        return Calibration(version, None, None, {}, min_subjects, "the gallery is empty")
    return fit_calibration(np.stack(vectors), subjects, syndromes, genes=genes,
                           gallery_version=version, min_subjects=min_subjects)


class CalibrationCache:
    """The Calibration of a gallery's current version; refitted when the version moves."""

    def __init__(self, min_subjects: int = MIN_SUBJECTS) -> None:
        self.min_subjects = min_subjects
        self._current: Calibration | None = None
        self._lock = threading.Lock()

    def get(self, gallery) -> Calibration:
        with self._lock:
            if self._current is None or self._current.gallery_version != gallery.version:
                self._current = calibrate_gallery(gallery, min_subjects=self.min_subjects)
            return self._current


# -- measurement: ``python -m gallery.calibration GALLERY [--held-out GALLERY]`` -------------


def _vectors(gallery) -> tuple[np.ndarray, list[str], list[str]]:
    vectors, subjects, syndromes = [], [], []
    for record in gallery.iter_records():
        vectors.append(search_vector(record.views))
        subjects.append(record.info.subject_id or record.info.image_id)
        syndromes.append(record.info.syndrome_id)
    return np.stack(vectors), subjects, syndromes


def held_out_samples(gallery_vectors: np.ndarray, gallery_syndromes: Sequence[str],
                     query_vectors: np.ndarray, query_syndromes: Sequence[str]):
    """Hit pairs (every query x gallery image) and per-query syndrome best cosines of
    subject-disjoint queries: ((cos, label), (best (Q, S), labels (Q, S)), syndrome names)."""
    names = sorted(set(gallery_syndromes))
    gsyn = np.array([names.index(s) for s in gallery_syndromes])
    sim = query_vectors @ gallery_vectors.T
    qsyn = np.asarray(query_syndromes, dtype=object)
    hit_label = (qsyn[:, None] == np.asarray(gallery_syndromes, dtype=object)[None, :])
    best = np.stack([sim[:, gsyn == k].max(axis=1) for k in range(len(names))], axis=1)
    best_label = qsyn[:, None] == np.asarray(names, dtype=object)[None, :]
    return (sim.ravel(), hit_label.ravel()), (best, best_label), names


def _macro_topk(order: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """order (Q, S) syndrome indices best first; labels (Q, S) bool -> macro top-k."""
    rank = np.argmax(np.take_along_axis(labels, order, axis=1), axis=1)
    true = np.argmax(labels, axis=1)
    return {k: float(np.mean([np.mean(rank[true == t] < k) for t in np.unique(true)])) for k in ks}


def study(gallery_path: str, held_out_path: str | None = None) -> dict:
    """Calibration error before (cosine read as a probability, and (1 + cosine) / 2) and
    after, leave-one-subject-out on the gallery and on a subject-disjoint held-out gallery;
    macro top-k of the syndrome ranking by cosine and by calibrated confidence."""
    from gallery.store import Gallery

    with Gallery.open(gallery_path, create=False) as g:
        version = g.version
        vectors, subjects, syndromes = _vectors(g)
    cal = fit_calibration(vectors, subjects, syndromes, gallery_version=version)
    out: dict = {"gallery": {"images": len(subjects), "subjects": len(set(subjects)),
                             "syndromes": len(set(syndromes)), "version": version}}
    if cal.hit is None or cal.syndrome is None:
        out["refused"] = cal.reason
        return out
    loso = loso_samples(vectors, subjects, syndromes)
    for name, curve, cos, lab in (("hit", cal.hit, loso.hit_cosine, loso.hit_label),
                                  ("syndrome", cal.syndrome, loso.syndrome_cosine,
                                   loso.syndrome_label)):
        out[f"loso_{name}"] = {
            "samples": curve.samples, "positives": curve.positives, "chosen": curve.kind,
            "ece_cosine_as_probability": curve.ece_raw,
            "ece_half_cosine_plus_half": expected_calibration_error((1 + cos) / 2, lab),
            "ece_calibrated_cv": dict(curve.candidates),
        }
    if held_out_path:
        with Gallery.open(held_out_path, create=False) as h:
            qv, qsubjects, qsyn = _vectors(h)
        if set(qsubjects) & set(subjects):
            raise ValueError("the held-out gallery shares subjects with the gallery")
        (hc, hl), (best, bl), names = held_out_samples(vectors, syndromes, qv, qsyn)
        keep = bl.any(axis=1)  # queries whose syndrome is in the gallery
        best, bl = best[keep], bl[keep]
        for name, curve, cos, lab in (("hit", cal.hit, hc, hl),
                                      ("syndrome", cal.syndrome, best.ravel(), bl.ravel())):
            out[f"held_out_{name}"] = {
                "samples": int(cos.size), "positives": int(lab.sum()),
                "ece_cosine_as_probability": expected_calibration_error(np.clip(cos, 0, 1), lab),
                "ece_half_cosine_plus_half": expected_calibration_error((1 + cos) / 2, lab),
                "ece_calibrated": expected_calibration_error(curve(cos), lab),
            }
        ks = (1, 3, 5)
        by_cosine = np.argsort(-best, axis=1, kind="stable")
        prob = cal.syndrome(best)
        by_probability = np.array([np.lexsort((-b, -p)) for b, p in zip(best, prob,
                                                                          strict=True)])
        out["held_out_macro_topk"] = {"by_cosine": _macro_topk(by_cosine, bl, ks),
                                      "by_confidence": _macro_topk(by_probability, bl, ks)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m gallery.calibration",
                                     description=study.__doc__)
    parser.add_argument("gallery", help="gallery file to calibrate")
    parser.add_argument("--held-out", help="gallery file of subject-disjoint query faces")
    args = parser.parse_args(argv)
    print(json.dumps(study(args.gallery, args.held_out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
