"""Gallery store behaviour: parity with GestaltMatcher scoring, filters, writes, faults."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from gallery import (
    DimensionMismatch,
    DuplicateId,
    Entry,
    Gallery,
    InvalidEmbedding,
    SchemaTooNew,
    SchemeMismatch,
    UnknownId,
)
from gallery import schema as gallery_schema
from tests.gallery.conftest import make_entries, mean_view_cosine, unit_views


def test_import_gallery_does_not_import_torch():
    code = (
        "import sys, gallery, gallery.store, gallery.imports, gallery.exchange, gallery.png\n"
        "assert 'torch' not in sys.modules, 'gallery imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("views", "dim"), [(1, 128), (12, 512)])
def test_scores_equal_mean_per_view_cosine(gallery_path, views, dim):
    entries = make_entries(120, views=views, dim=dim, seed=views)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        stored = np.stack([np.stack(e.views) for e in entries])
        query = unit_views(np.random.default_rng(99), views, dim)
        expected = mean_view_cosine(query, stored)
        hits = g.search(query, k=120)
        assert len(hits) == 120
        by_image = {e.image_id: i for i, e in enumerate(entries)}
        got = np.array([h.score for h in hits])
        want = np.array([expected[by_image[h.image_id]] for h in hits])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.all(np.diff(got) <= 1e-7), "hits are not best-first"
        assert hits[0].image_id == entries[int(np.argmax(expected))].image_id
        assert hits[0].distance == pytest.approx(1 - hits[0].score)


def test_views_may_have_different_sizes(gallery_path):
    rng = np.random.default_rng(3)
    entries = [
        Entry(f"i{i}", f"s{i}", "A", "A", [rng.normal(size=128), rng.normal(size=320)]) for i in range(30)
    ]
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        assert g.view_dims == (128, 320)
        query = [rng.normal(size=128), rng.normal(size=320)]
        hits = g.search(query, k=30)
        for hit in hits[:5]:
            e = entries[int(hit.image_id[1:])]
            want = np.mean([
                np.dot(q, v) / np.linalg.norm(q) / np.linalg.norm(v) for q, v in zip(query, e.views, strict=True)
            ])
            assert hit.score == pytest.approx(want, abs=1e-5)
        with pytest.raises(DimensionMismatch):
            g.search([rng.normal(size=320), rng.normal(size=128)], k=3)


def test_batched_search_equals_single_searches(gallery_path):
    entries = make_entries(200, views=3, dim=32)
    queries = np.random.default_rng(5).normal(size=(7, 3, 32)).astype(np.float32)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        batched = g.search_batch(queries, k=10)
        for q, hits in zip(queries, batched, strict=True):
            single = g.search(q, k=10)
            assert [h.gallery_id for h in hits] == [h.gallery_id for h in single]
            np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-6)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW32"])
def test_approximate_index_recall_at_10(gallery_path, factory):
    entries = make_entries(2000, views=2, dim=32, seed=11)
    queries = np.random.default_rng(12).normal(size=(20, 2, 32)).astype(np.float32)
    with Gallery.open(gallery_path) as exact:
        exact.add_many(entries)
        truth = [{h.gallery_id for h in hits} for hits in exact.search_batch(queries, k=10)]
    with Gallery.open(gallery_path, index=factory, nprobe=4, ef_search=64) as approx:
        assert approx.index_effective_factory == factory
        found = approx.search_batch(queries, k=10)
    recall = np.mean([len(t & {h.gallery_id for h in f}) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.5


def test_approximate_index_falls_back_to_exact_when_too_few_to_train(gallery_path):
    with Gallery.open(gallery_path, index="IVF64,Flat") as g:
        g.add_many(make_entries(50))
        assert g.index_effective_factory == "Flat"
        assert len(g.search(make_entries(1, seed=4)[0].views, k=5)) == 5


def test_readding_identical_content_is_a_noop(gallery_path):
    entries = make_entries(20)
    with Gallery.open(gallery_path) as g:
        first = g.add_many(entries)
        version = g.version
        again = g.add_many(make_entries(20))
        assert again.added == () and again.updated == ()
        assert again.unchanged == first.added
        assert g.version == version and len(g) == 20


def test_same_image_id_with_other_content_raises_duplicate_id(gallery_path):
    with Gallery.open(gallery_path) as g:
        g.add_many(make_entries(5))
        changed = make_entries(5, seed=1)[2]
        with pytest.raises(DuplicateId):
            g.add(changed)
        assert len(g) == 5
        np.testing.assert_array_equal(g.get_image("img2").views[0], make_entries(5)[2].views[0])
        twice = make_entries(2, prefix="dup") + [make_entries(2, seed=9, prefix="dup")[0]]
        with pytest.raises(DuplicateId):
            g.add_many(twice)
        assert len(g) == 5, "a rejected batch must write nothing"


def test_update_replaces_in_place_and_keeps_gallery_id(gallery_path):
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(make_entries(10)).added
        new = make_entries(10, seed=5)[3]
        gid = g.update(new)
        assert gid == ids[3] and len(g) == 10
        hit = g.search(new.views, k=1)[0]
        assert hit.gallery_id == gid and hit.score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(UnknownId):
            g.update(make_entries(1, prefix="nobody")[0])


def test_unknown_ids_raise_and_delete_is_all_or_nothing(gallery_path):
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(make_entries(10)).added
        with pytest.raises(UnknownId):
            g.delete([ids[0], 10_000])
        with pytest.raises(UnknownId):
            g.delete_images(["img1", "no-such-image"])
        assert len(g) == 10
        with pytest.raises(UnknownId):
            g.get(10_000)
        with pytest.raises(UnknownId):
            g.get_image("no-such-image")
        assert g.delete([ids[0]]) == 1 and g.delete_images(["img1"]) == 1
        assert len(g) == 8
        assert {h.image_id for h in g.search(make_entries(1)[0].views, k=10)}.isdisjoint({"img0", "img1"})


def test_dimension_mismatch_on_add_and_search(gallery_path):
    with Gallery.open(gallery_path) as g:
        g.add_many(make_entries(5, views=2, dim=16))
        with pytest.raises(DimensionMismatch):
            g.add(make_entries(1, views=2, dim=32, prefix="x")[0])
        with pytest.raises(DimensionMismatch):
            g.add(make_entries(1, views=3, dim=16, prefix="x")[0])
        with pytest.raises(DimensionMismatch):
            g.search(np.ones((1, 16)), k=1)
        with pytest.raises(DimensionMismatch):
            g.search_batch(np.ones((2, 2, 8)), k=1)
        with pytest.raises(InvalidEmbedding):
            g.add(Entry("z", "z", "A", "A", np.zeros((2, 16))))


def test_view_scheme_mismatch(gallery_path):
    with Gallery.open(gallery_path, encoder_id="sface", view_scheme="sface:orig") as g:
        g.add_many(make_entries(3))
        bad = make_entries(1, prefix="x")[0]
        with pytest.raises(SchemeMismatch):
            g.add(Entry(**{**bad.__dict__, "view_scheme": "sface:orig,sface:flip"}))
        with pytest.raises(SchemeMismatch):
            g.search(bad.views, k=1, view_scheme="iresnet50:orig")
    with pytest.raises(SchemeMismatch):
        Gallery.open(gallery_path, encoder_id="iresnet100")
    with pytest.raises(SchemeMismatch):
        Gallery.open(gallery_path, view_scheme="sface:orig,sface:flip")


def test_excluding_a_subject_still_returns_k_hits(gallery_path):
    entries = make_entries(60, per_subject=10)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        query = entries[0].views
        plain = g.search(query, k=10)
        assert plain[0].subject_id == "subj0"
        hits = g.search(query, k=10, exclude_subjects=["subj0", "subj1"])
        assert len(hits) == 10
        assert all(h.subject_id not in ("subj0", "subj1") for h in hits)


def test_same_patient_rule_drops_close_hits_and_refills(gallery_path):
    rng = np.random.default_rng(8)
    base = rng.normal(size=(1, 32))
    near = [Entry(f"near{i}", f"s{i}", "A", "A", base + 0.05 * rng.normal(size=(1, 32))) for i in range(15)]
    far = make_entries(40, dim=32, seed=2)
    with Gallery.open(gallery_path) as g:
        g.add_many(near + far)
        assert all(h.image_id.startswith("near") for h in g.search(base, k=10))
        hits = g.search(base, k=10, same_patient_distance=0.4)
        assert len(hits) == 10
        assert all(h.distance > 0.4 for h in hits)
        assert not any(h.image_id.startswith("near") for h in hits)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_syndrome_filter_returns_k_hits_of_those_syndromes(gallery_path, factory):
    entries = make_entries(800, syndromes=40, seed=6)
    with Gallery.open(gallery_path, index=factory, ef_search=16) as g:
        g.add_many(entries)
        hits = g.search(entries[0].views, k=12, syndromes=["SYN7", "SYN9"])
        assert len(hits) == 12
        assert {h.syndrome_id for h in hits} <= {"SYN7", "SYN9"}
        assert g.search(entries[0].views, k=5, syndromes=["NOPE"]) == []


def test_rank_syndromes_is_nearest_image_per_syndrome(gallery_path):
    entries = make_entries(300, views=2, dim=24, syndromes=12, seed=21)
    query = unit_views(np.random.default_rng(1), 2, 24)
    scores = mean_view_cosine(query, np.stack([np.stack(e.views) for e in entries]))
    best: dict[str, float] = {}
    for e, s in zip(entries, scores, strict=True):
        best[e.syndrome_id] = max(best.get(e.syndrome_id, -2.0), float(s))
    want = sorted(best, key=lambda k: -best[k])
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        ranked = g.rank_syndromes(query, top=None)
        assert [r.syndrome_id for r in ranked] == want
        np.testing.assert_allclose([r.score for r in ranked], [best[k] for k in want], atol=1e-5)
        assert [r.syndrome_id for r in g.rank_syndromes(query, top=3)] == want[:3]
        genes = g.rank_genes(query, top=None)
        gene_best: dict[str, float] = {}
        for e, s in zip(entries, scores, strict=True):
            for gene in e.genes:
                gene_best[gene] = max(gene_best.get(gene, -2.0), float(s))
        assert {x.gene: round(x.score, 5) for x in genes} == {k: round(v, 5) for k, v in gene_best.items()}
        assert all(a.score >= b.score for a, b in zip(genes, genes[1:], strict=False))
        excluded = g.rank_syndromes(query, top=None, exclude_subjects=[ranked[0].subject_id])
        assert excluded[0].image_id != ranked[0].image_id


def test_gallery_ids_stay_stable_across_rebuilds_and_deletes(gallery_path):
    entries = make_entries(30)
    with Gallery.open(gallery_path) as g:
        ids = dict(zip((e.image_id for e in entries), g.add_many(entries).added, strict=True))
        g.delete_images(["img29", "img28"])
        new_id = g.add(make_entries(1, prefix="late")[0])
        assert new_id not in ids.values(), "a deleted gallery id was reused"
    gallery_path.with_name(gallery_path.name + ".faiss").unlink()
    with Gallery.open(gallery_path) as g:
        for e in entries[:28]:
            assert g.search(e.views, k=1)[0].gallery_id == ids[e.image_id]


def test_corrupt_index_file_is_rebuilt_from_sqlite(gallery_path, caplog):
    entries = make_entries(40)
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
    index_file = gallery_path.with_name(gallery_path.name + ".faiss")
    assert index_file.exists()
    index_file.write_bytes(b"\x00garbage" * 1000)
    with caplog.at_level("INFO", logger="gallery.store"), Gallery.open(gallery_path) as g:
        assert g.search(entries[7].views, k=1)[0].image_id == "img7"
    assert any("rebuilding" in r.message for r in caplog.records)
    assert not any("img" in r.getMessage() for r in caplog.records), "logs must not carry identifiers"
    with Gallery.open(gallery_path) as g:  # the rebuilt index was saved and is now used as is
        assert g.search(entries[3].views, k=1)[0].image_id == "img3"


def test_stale_index_is_rebuilt(gallery_path):
    extra = make_entries(1, prefix="other", seed=77)[0]
    with Gallery.open(gallery_path) as g:
        g.add_many(make_entries(10))
    with Gallery.open(gallery_path) as other:
        other.add(extra)
        other._saved_version = other._index_version  # as if killed before saving its index
    with Gallery.open(gallery_path) as g:
        assert len(g) == 11
        assert g.search(extra.views, k=1)[0].image_id == "other0"


def test_readers_keep_searching_while_writers_write(gallery_path):
    entries = make_entries(400, dim=16, seed=13)
    errors: list[BaseException] = []
    stop = threading.Event()
    with Gallery.open(gallery_path) as g:
        g.add_many(entries[:100])

        def reader() -> None:
            rng = np.random.default_rng(threading.get_ident() % 1000)
            try:
                while not stop.is_set():
                    hits = g.search(rng.normal(size=(1, 16)), k=5, exclude_subjects=["subj3"])
                    assert len(hits) == 5 and all(h.subject_id != "subj3" for h in hits)
            except BaseException as exc:  # reported below
                errors.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(3)]
        for t in readers:
            t.start()
        for start in range(100, 400, 30):
            g.add_many(entries[start : start + 30])
            g.delete_images([entries[start].image_id])
        g.update(Entry(**{**entries[50].__dict__, "views": entries[51].views}))
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors[0]
        assert len(g) == 390
        assert g.search(entries[399].views, k=1)[0].image_id == entries[399].image_id


def test_v1_gallery_is_migrated(gallery_path):
    entry = make_entries(1)[0]
    conn = sqlite3.connect(gallery_path, isolation_level=None)
    for statement in gallery_schema.SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('gallery_version', '3'),"
                 " ('encoder_id', 'sface'), ('view_scheme', 'sface:orig'), ('view_dims', '[16]')")
    from gallery.vectors import pack

    conn.execute(
        "INSERT INTO records (image_id, subject_id, syndrome_id, syndrome_name, omim_id, genes, source,"
        " encoder_id, view_scheme, view_dims, embedding, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, '', 'sface', 'sface:orig', '[16]', ?, 0, 0)",
        (entry.image_id, entry.subject_id, entry.syndrome_id, entry.syndrome_name, entry.omim_id,
         '["GENE0"]', pack(entry.views)),
    )
    conn.close()
    with Gallery.open(gallery_path) as g:
        assert g.stats().schema_version == gallery_schema.SCHEMA_VERSION == 2
        assert g.search(entry.views, k=1)[0].image_id == entry.image_id
        assert g.add(entry).__class__ is int and len(g) == 1, "migrated hash must make re-adds no-ops"
        assert g.version == 3


def test_gallery_from_a_newer_schema_is_refused(gallery_path):
    Gallery.open(gallery_path).close()
    conn = sqlite3.connect(gallery_path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(SchemaTooNew):
        Gallery.open(gallery_path)


def test_stats_counts_and_imbalance(gallery_path):
    entries = make_entries(10, syndromes=2)[:9] + [
        Entry("solo", "lonely", "RARE", "Rare syndrome", np.ones((1, 16)))
    ]
    with Gallery.open(gallery_path) as g:
        g.add_many(entries)
        st = g.stats()
    assert st.records == 10 and st.syndromes == 3 and st.subjects == 6
    assert st.images_per_syndrome == {"SYN0": 5, "SYN1": 4, "RARE": 1}
    assert st.subjects_per_syndrome["RARE"] == 1 and st.syndromes_with_one_subject == 1
    assert st.syndrome_balance.max_min_ratio == 5.0 and st.syndrome_balance.singletons == 1
    assert 0 < st.syndrome_balance.gini < 1
    assert st.syndrome_names["RARE"] == "Rare syndrome"


def test_list_pages_in_gallery_id_order(gallery_path):
    with Gallery.open(gallery_path) as g:
        ids = g.add_many(make_entries(25)).added
        pages = [g.list(limit=10, offset=o) for o in (0, 10, 20)]
        assert [r.gallery_id for p in pages for r in p] == list(ids)
        assert [r.image_id for r in g.list(limit=3, syndrome_id="SYN1")] == ["img1", "img6", "img11"]


def test_updates_and_deletes_on_an_index_that_cannot_remove(gallery_path):
    entries = make_entries(100, dim=16, seed=31)
    with Gallery.open(gallery_path, index="HNSW32") as g:
        g.add_many(entries)
        moved = Entry(**{**entries[10].__dict__, "views": entries[90].views})
        report = g.add_many([moved, *make_entries(2, prefix="new", seed=40)], update=True)
        assert len(report.updated) == 1 and len(report.added) == 2
        assert {h.image_id for h in g.search(entries[90].views, k=2)} == {"img10", "img90"}
        g.delete_images(["img90"])
        assert g.search(entries[90].views, k=1)[0].image_id == "img10"
        assert len(g) == 101


def test_refresh_picks_up_writes_from_another_gallery_handle(gallery_path):
    with Gallery.open(gallery_path) as reader, Gallery.open(gallery_path) as writer:
        writer.add_many(make_entries(5))
        assert reader.search(make_entries(1)[0].views, k=1) == []
        reader.refresh()
        assert reader.search(make_entries(1)[0].views, k=1)[0].image_id == "img0"


def test_opening_a_missing_gallery_without_create_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Gallery.open(tmp_path / "absent.db", create=False)
