"""The feature-map store beside the gallery: round trip, staleness, deletion, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gallery import Entry, Gallery
from gallery.errors import DimensionMismatch
from gallery.features import FeatureLayout, FeatureStore
from tests.gallery.conftest import make_entries
from tests.gallery.features_crash_child import BATCH, DIM, ENCODER, SCHEME, SHAPE, batch, features

REPO = Path(__file__).resolve().parents[2]


def f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


@pytest.fixture
def gallery(gallery_path):
    with Gallery.open(gallery_path, encoder_id=ENCODER, view_scheme=SCHEME) as g:
        g.add_many(make_entries(64, views=2, dim=DIM))
        yield g


def test_sface_layout_costs_about_100_kb_per_view():
    assert FeatureLayout(((1024, 7, 7),), (128,)).bytes_per_image == 2 * (1024 * 49 + 128) == 100_608


def test_put_get_round_trip_in_float16_and_survives_reopening(gallery, gallery_path):
    ids = [3, 1, 7]
    maps, embs = batch(ids, 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.missing(ids) == ids and store.stale_reason == "missing"
        assert store.put(ids, maps, embs) == ids
        assert store.get([1]).maps[0].dtype == np.float16
        got = store.get([7, 99, 3, 1], dtype=np.float32)
        assert got.gallery_ids == (7, 3, 1) and got.missing == (99,)
        assert got.maps[1].shape == (3, *SHAPE) and got.maps[1].dtype == np.float32
        np.testing.assert_array_equal(got.maps[0], f16(maps[0][[2, 0, 1]]))
        np.testing.assert_array_equal(got.embeddings[1], f16(embs[1][[2, 0, 1]]))
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.stale_reason is None and len(store) == 3
        assert store.missing([1, 2, 3]) == [2]
        np.testing.assert_array_equal(store.get([1], np.float32).maps[1], f16(maps[1][[1]]))
        every = list(range(1, len(gallery) + 1))
        store.put(every, *batch(every, 1))
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.missing(every) == [], "an entry was not read back as valid"


def test_a_store_for_another_encoder_or_scheme_reads_as_missing_and_is_replaced(gallery, gallery_path):
    maps, embs = batch([1, 2], 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        store.put([1, 2], maps, embs)
    old_data = sorted(p.name for p in gallery_path.parent.glob("*.f16"))
    with FeatureStore.open(gallery_path, "other@2", SCHEME) as store:
        assert store.missing([1, 2]) == [1, 2]
        assert store.stale_reason == "built for another encoder or view scheme"
        small = [m[:, :8] for m in maps]  # another encoder, another layout
        store.put([1], [m[:1] for m in small], [e[:1] for e in embs])
        assert store.missing([1, 2]) == [2]
    assert sorted(p.name for p in gallery_path.parent.glob("*.f16")) != old_data, "stale data file kept"
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.missing([1, 2]) == [1, 2]


def test_layout_must_match_the_store(gallery, gallery_path):
    maps, embs = batch([1], 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        store.put([1], maps, embs)
        with pytest.raises(DimensionMismatch):
            store.put([2], [m[:, :8] for m in maps], embs)
        with pytest.raises(DimensionMismatch):
            store.put([2, 3], maps, embs)


def test_deleted_and_updated_records_lose_their_features(gallery, gallery_path):
    ids = [1, 2, 3, 4]
    maps, embs = batch(ids, 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        store.put(ids, maps, embs)
        gallery.delete([2])
        record = gallery.get(3).info
        gallery.update(Entry(record.image_id, record.subject_id, record.syndrome_id, record.syndrome_name,
                             np.ones((2, DIM), np.float32)))
        assert store.missing(ids) == [2, 3]  # SQLite is the truth: no discard call needed
        assert store.discard([4, 2]) == 1
        assert store.missing(ids) == [2, 3, 4]
        assert store.put([2], [m[1:2] for m in maps], [e[1:2] for e in embs]) == [], "a deleted id was stored"
        np.testing.assert_array_equal(store.get([1], np.float32).maps[0], f16(maps[0][:1]))
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.missing(ids) == [2, 3, 4]


def test_compaction_keeps_live_entries_and_drops_the_old_file(gallery, gallery_path):
    ids = list(range(1, 17))
    maps, embs = batch(ids, 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        store.put(ids, maps, embs)
        store.discard(ids[:12])
        before = list(gallery_path.parent.glob("*.f16"))
        store.compact()
        after = list(gallery_path.parent.glob("*.f16"))
        assert len(after) == 1 and after != before
        assert after[0].stat().st_size == 4 * store.layout.bytes_per_image
        np.testing.assert_array_equal(store.get([16], np.float32).embeddings[0], f16(embs[0][15:16]))


def test_a_torn_or_half_written_manifest_is_never_read_as_valid(gallery, gallery_path):
    maps, embs = batch([1, 2], 0)
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        store.put([1, 2], maps, embs)
    manifest = gallery_path.with_name(gallery_path.name + ".features")
    raw = manifest.read_bytes()
    manifest.write_bytes(raw[:-5])
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        assert store.missing([1, 2]) == [1, 2] and store.stale_reason == "unreadable manifest"
        store.put([1], [m[:1] for m in maps], [e[:1] for e in embs])
        assert store.missing([1, 2]) == [2]


def test_sigkill_mid_put_leaves_only_complete_entries(gallery, gallery_path):
    records = len(gallery)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.gallery.features_crash_child", str(gallery_path), str(records)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    done = 0
    try:
        while done < 12:
            line = child.stdout.readline()
            assert line, "child exited early"
            done = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with FeatureStore.open(gallery_path, ENCODER, SCHEME) as store:
        stored = [g for g in range(1, records + 1) if g not in store.missing([g])]
        assert len(stored) == records, "a durable put was lost"
        got = store.get(stored, np.float32)
        for row, gid in enumerate(got.gallery_ids):
            # the features of one of the puts that wrote this id, never a mix
            matches = []
            for generation in range(done + 2):
                if gid in [1 + (generation * BATCH + i) % records for i in range(BATCH)]:
                    maps, embs = features(gid, generation)
                    matches.append(all(
                        np.array_equal(got.maps[v][row], f16(maps[v][0]))
                        and np.array_equal(got.embeddings[v][row], f16(embs[v][0]))
                        for v in range(2)))
            assert any(matches), f"gallery id {gid} holds features no put wrote"
