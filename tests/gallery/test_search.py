"""Search and ranking after the split: the exact index equals numpy, filters keep their
meaning, ``auto`` chooses by size, and ``SearchFilter`` is the one way to say a filter."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gallery import Entry, Gallery, SearchFilter
from gallery import index as index_module
from gallery.index import ExactMatrix, auto_factory
from gallery.vectors import search_matrix
from tests.gallery.conftest import make_entries


def numpy_top_k(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (rows (N, k), scores (N, k)) best first, ties to the earlier row."""
    scores = q @ x.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


@pytest.mark.parametrize(("n", "queries"), [(20_000, 1), (20_000, 64), (300, 3), (5, 2)])
def test_exact_matrix_top_k_equals_numpy(n, queries):
    """Sizes that take the block-maxima path, several chunks (64 queries over 20k rows),
    plain argpartition, and fewer rows than k."""
    rng = np.random.default_rng(n + queries)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    q = rng.normal(size=(queries, 16)).astype(np.float32)
    index = ExactMatrix(16)
    index.add(np.arange(n) + 100, x)
    scores, ids = index.search(q, 10)
    rows, want = numpy_top_k(x, q, 10)
    found = ids >= 0
    assert found.sum(axis=1).tolist() == [min(n, 10)] * queries
    np.testing.assert_array_equal(ids[:, : min(n, 10)], rows + 100)
    np.testing.assert_allclose(scores[found].reshape(queries, -1), want, rtol=0, atol=1e-5)


def test_gallery_exact_search_equals_numpy_over_the_stored_vectors(gallery_path):
    entries = make_entries(600, views=2, dim=12, seed=4)
    queries = np.stack([np.stack(e.views) for e in make_entries(64, views=2, dim=12, seed=5)])
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(entries).added
        assert g.index_effective_factory == "Flat"
        x = search_matrix(np.stack([np.concatenate(e.views) for e in entries]), (12, 12))
        q = search_matrix(queries.reshape(64, -1), (12, 12))
        rows, scores = numpy_top_k(x, q, 10)
        for hits, want_rows, want_scores in zip(g.search_batch(queries, 10), rows, scores, strict=True):
            assert [h.gallery_id for h in hits] == [ids[r] for r in want_rows]
            np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-6)


def brute_force(entries: list[Entry], query: np.ndarray, k: int, rule: SearchFilter) -> list[str]:
    """The filters' meaning, written out: image ids best first."""
    x = search_matrix(np.stack([np.concatenate(e.views) for e in entries]), (16,))
    scores = x @ search_matrix(query.reshape(1, -1), (16,))[0]
    keep = [
        i for i in np.argsort(-scores, kind="stable")
        if entries[i].subject_id not in rule.exclude_subjects
        and (rule.syndromes is None or entries[i].syndrome_id in rule.syndromes)
        and (rule.same_patient_distance is None or 1 - scores[i] > rule.same_patient_distance)
    ]
    return [entries[i].image_id for i in keep[:k]]


RULES = [
    SearchFilter(),
    SearchFilter(exclude_subjects=("subj0", "subj3", "nobody")),
    SearchFilter(syndromes=("SYN1", "SYN4")),
    SearchFilter(same_patient_distance=0.9),
    SearchFilter(exclude_subjects=("subj7",), same_patient_distance=0.95, syndromes=("SYN2", "SYN3")),
]


@pytest.mark.parametrize("rule", RULES, ids=["none", "exclude", "syndromes", "same-patient", "all"])
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_filters_mean_the_same_as_a_brute_force(gallery_path, rule, factory):
    entries = make_entries(400, syndromes=6, per_subject=4, seed=9)
    query = entries[1].views[0] + 0.3 * np.random.default_rng(0).normal(size=16).astype(np.float32)
    with Gallery.open(gallery_path, index=factory, nprobe=4) as g:  # nprobe 4 of 4: exact recall
        g.add_many(entries)
        assert g.index_effective_factory == factory
        hits = g.search(query, 12, rule)
        assert [h.image_id for h in hits] == brute_force(entries, query, 12, rule)


def test_filter_object_and_keywords_are_the_same_filter(gallery_path):
    entries = make_entries(120, syndromes=4, seed=3)
    rule = SearchFilter(exclude_subjects=["subj1", "subj0"], syndromes={"SYN2", "SYN1"}, same_patient_distance=0.5)
    assert rule.exclude_subjects == ("subj0", "subj1") and rule.syndromes == ("SYN1", "SYN2")
    assert SearchFilter.of(rule, syndromes=None) == SearchFilter(("subj0", "subj1"), 0.5, None)
    with pytest.raises(TypeError):
        SearchFilter.of(None, exclude_subject=("typo",))
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        keywords = dict(exclude_subjects=["subj1", "subj0"], syndromes=["SYN1", "SYN2"], same_patient_distance=0.5)
        q = entries[5].views
        assert g.search(q, 8, rule) == g.search(q, 8, **keywords)
        assert g.rank_syndromes(q, 5, rule) == g.rank_syndromes(q, 5, **keywords)
        assert g.rank_genes(q, 5, rule) == g.rank_genes(q, 5, **keywords)
        assert g.search_batch([q, q], 8, rule) == g.search_batch([q, q], 8, **keywords)


def test_auto_is_exact_for_small_galleries_and_pq_fast_scan_past_the_limit(gallery_path, monkeypatch):
    assert auto_factory(1_000) == auto_factory(index_module.AUTO_EXACT_LIMIT - 1) == "Flat"
    assert auto_factory(1_000_000) == index_module.AUTO_APPROXIMATE == "PQ64x4fs,RFlat"
    assert auto_factory(1_000_000, 16) == "PQ8x4fs,RFlat" and auto_factory(1_000_000, 15) == "HNSW32"
    monkeypatch.setattr(index_module, "AUTO_EXACT_LIMIT", 300)
    entries = make_entries(400, seed=12)
    with Gallery.open(gallery_path) as g:
        assert g.factory == "auto"
        g.add_many(entries[:250])
        assert g.index_effective_factory == "Flat"
        g.add_many(entries[250:])
        assert g.index_effective_factory == "PQ8x4fs,RFlat"
        assert g.search(entries[7].views, 1)[0].image_id == "img7"


def test_saved_exact_index_is_loaded_not_rebuilt(gallery_path, caplog):
    entries = make_entries(50, views=2, seed=2)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        before = g.search(entries[3].views, 5)
    with caplog.at_level(logging.INFO, logger="gallery.store"):
        with Gallery.open(gallery_path) as g:
            assert g.search(entries[3].views, 5) == before
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("n", [11, 1_000, 16_384, 16_385, 40_000])
def test_search_paths_equal_numpy_and_give_ties_to_the_older_row(n, queries):
    """The lean one-query path (partition up to 16,384 rows, block maxima above) and the
    FAISS path of several queries against a stable brute force, with duplicated rows so the
    first query's k-th score is tied beyond the top k. Small integers make every product
    exact, so a tie is a tie in every BLAS kernel."""
    rng = np.random.default_rng(n)
    x = rng.integers(-8, 9, size=(n, 16)).astype(np.float32)
    q = rng.integers(-8, 9, size=(queries, 16)).astype(np.float32)
    best = np.argsort(-(x @ q[0]), kind="stable")
    x[best[: min(n, 14)]] = x[best[5]]  # rows tied at the 6th best score, 14 of them
    index = ExactMatrix(16)
    index.add(np.arange(n) + 7, x)
    scores, ids = index.search(q, 10)
    rows, want = numpy_top_k(x, q, 10)
    np.testing.assert_array_equal(ids, rows + 7)
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [300, 5_000])
def test_gallery_one_query_search_equals_numpy(gallery_path, n):
    entries = make_entries(n, dim=12, seed=n)
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(entries).added
        x = search_matrix(np.stack([e.views[0] for e in entries]), (12,))
        for query in make_entries(8, dim=12, seed=n + 1):
            q = search_matrix(query.views[0][None, :], (12,))
            rows, scores = numpy_top_k(x, q, 10)
            for form in (query.views, query.views[0], [query.views[0]]):
                hits = g.search(form, 10)
                assert [h.gallery_id for h in hits] == [ids[r] for r in rows[0]]
                np.testing.assert_allclose([h.score for h in hits], scores[0], atol=1e-6)


def test_removed_rows_are_zeroed_in_the_arrays_a_search_may_still_hold():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    index = ExactMatrix(16)
    index.add(np.arange(50), x)
    held = index.vectors  # what a search in flight would be scanning
    index.remove(np.array([4, 9]))
    assert not held[[4, 9]].any()
    np.testing.assert_array_equal(held[[0, 5, 49]], x[[0, 5, 49]])  # the rest untouched
    assert index.ntotal == 48 and not np.isin([4, 9], index.ids).any()
    np.testing.assert_array_equal(index.vectors, np.delete(x, [4, 9], axis=0))
    index.add(np.array([100]), x[:1])  # adds after a remove go to the new arrays
    assert index.ids[-1] == 100 and not held[[4, 9]].any()


def test_searches_without_the_lock_stay_full_and_never_return_a_record_deleted_before(gallery_path):
    """Readers take no lock on the exact index: while records are deleted and added, every
    search still returns k hits, and none deleted before the search began."""
    import threading

    entries = make_entries(400, seed=21)
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(entries).added
        deleted: set[int] = set()
        failures: list[str] = []
        stop = threading.Event()

        def search() -> None:
            rng = np.random.default_rng(threading.get_ident() % 1000)
            while not stop.is_set():
                gone = set(deleted)
                hits = g.search(rng.normal(size=16).astype(np.float32), 10)
                if len(hits) != 10:
                    failures.append(f"{len(hits)} hits")
                if gone & {h.gallery_id for h in hits}:
                    failures.append("a deleted record")

        readers = [threading.Thread(target=search) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            for i, gid in enumerate(ids[:150]):
                g.delete([gid])
                deleted.add(gid)
                if i % 10 == 0:
                    g.add_many(make_entries(3, seed=100 + i, prefix=f"new{i}_"))
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert not failures, failures[:5]


def test_pq_fast_scan_index_filters_its_results(gallery_path):
    """The fast-scan index cannot filter inside its scan: excluded subjects are dropped from
    its results (widening until k pass), an allowed syndrome list is scanned exactly."""
    entries = make_entries(1_000, syndromes=6, per_subject=4, seed=5)
    query = entries[1].views[0]
    with Gallery.open(gallery_path, index="PQ8x4fs,RFlat") as g:
        g.add_many(entries)
        assert g.index_effective_factory == "PQ8x4fs,RFlat"
        excluded = g.search(query, 12, exclude_subjects=("subj0", "subj1"))
        assert len(excluded) == 12 and not {h.subject_id for h in excluded} & {"subj0", "subj1"}
        rule = SearchFilter(syndromes=("SYN1", "SYN4"))
        assert [h.image_id for h in g.search(query, 12, rule)] == brute_force(entries, query, 12, rule)


def test_a_gallery_smaller_than_k_returns_every_record_once(gallery_path):
    entries = make_entries(4, seed=31)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        for _ in range(2):  # labels fetched, then cached
            one = g.search(entries[0].views, 10)
            assert len(one) == 4 and one[0].image_id == "img0"
            batch = g.search_batch(np.stack([e.views for e in entries]), 10)
            assert [len(h) for h in batch] == [4] * 4 and [h[0].image_id for h in batch] == [e.image_id for e in entries]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_one_query_through_the_bfloat16_copy_equals_numpy():
    """Past COARSE_MIN_ROWS one query scans a bfloat16 copy and rescores its best rows
    exactly: the same ids as brute force, and the candidates prove it (no fallback)."""
    rng = np.random.default_rng(7)
    n = index_module.COARSE_MIN_ROWS + 1000
    x, q = _unit(rng, n, 128), _unit(rng, 32, 128)
    index = ExactMatrix(128)
    index.add(np.arange(n) + 100, x)
    rows, want = numpy_top_k(x, q, 10)
    for i in range(len(q)):
        found = index_module._search_one_coarse(index._rows, q[i], 10)
        assert found is not None
        scores, ids = index.search_one(q[i], 10)
        np.testing.assert_array_equal(ids, rows[i] + 100)
        np.testing.assert_array_equal(found[1], ids)
        np.testing.assert_allclose(scores, want[i], rtol=0, atol=1e-6)


def test_the_bfloat16_copy_defers_to_the_exact_scan_when_it_cannot_prove_the_top_k():
    """Many rows within the copy's error of each other (here 40 copies of one vector, the
    query's best match): the candidates cannot prove which rows win, so the exact scan
    decides, and the earliest copies win the tie as in brute force."""
    rng = np.random.default_rng(8)
    n = index_module.COARSE_MIN_ROWS + 500
    x, q = _unit(rng, n, 128), _unit(rng, 1, 128)
    near = q[0] + 0.05 * _unit(rng, 1, 128)[0]
    spots = np.sort(rng.choice(n, 70, replace=False))
    x[spots] = near / np.linalg.norm(near)
    index = ExactMatrix(128)
    index.add(np.arange(n), x)
    assert index_module._search_one_coarse(index._rows, q[0], 10) is None
    rows, _ = numpy_top_k(x, q, 10)
    np.testing.assert_array_equal(index.search_one(q[0], 10)[1], rows[0])
    np.testing.assert_array_equal(rows[0], spots[:10])


def test_removing_rows_zeroes_them_in_the_bfloat16_copy():
    rng = np.random.default_rng(9)
    n = index_module.COARSE_MIN_ROWS + 10
    x = _unit(rng, n, 128)
    index = ExactMatrix(128)
    index.add(np.arange(n), x)
    old = index._rows
    coarse, _ = old.coarse()
    codes = index_module.faiss.rev_swig_ptr(coarse.codes.data(), coarse.ntotal * coarse.code_size)
    codes = codes.reshape(coarse.ntotal, coarse.code_size)
    assert codes[[3, 500]].any()
    index.remove(np.array([3, 500]))
    assert not codes[[3, 500]].any()
    assert codes[[2, 4, 501]].any(axis=1).all()
    assert 3 not in index.search_one(x[3], 10)[1]
