"""The feature store behind Explain, through a real server on loopback.

Each test fills its own gallery through ImportGallery (real photos, real SFace), then
starts fresh servers over that gallery file: a fresh Backend has an empty feature
cache and opens the store from disk, as a restarted server process would. Hit
encodes are counted by the backend (``ExplainActivity.hit_encodes``), not mocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import ADMIN_TOKEN, GALLERY_PHOTOS, READ_TOKEN, make_config

QUERY = "person_a_2.jpg"
TOP_K = 5


def _backend(models, folder: Path, *, store: bool = True, cache: int = 512):
    """A fresh Backend over the gallery in ``folder`` sharing ``models``' loaded encoders
    and detector: its own Gallery, FeatureStore (opened from disk) and feature cache."""
    from gallery import Gallery
    from gallery.features import FeatureStore
    from server.backend import Backend
    from server.feature_cache import stored_scheme

    config = make_config(folder, explain={"feature_cache_size": cache})
    gallery = Gallery.open(config.gallery.path, encoder_id=models.encoder_id,
                           view_scheme=models.view_scheme)
    features = (FeatureStore.open(gallery.path, models.encoder_id,
                                  stored_scheme(models.view_scheme)) if store else None)
    return Backend(config, pipeline=models.pipeline, views=models.views, gallery=gallery,
                   explainer=models.explainer, encoder_id=models.encoder_id,
                   view_scheme=models.view_scheme, encoders=models.encoders,
                   feature_store=features)


@contextmanager
def _serving(backend, folder: Path, token: str = READ_TOKEN) -> Iterator:
    from phenolens import Client

    from server.app import start

    running = start(backend.config, backend=backend)
    try:
        with Client(running.address, token=token, timeout=120) as client:
            yield client
    finally:
        running.stop(grace_s=1.0)
        backend.close()


@pytest.fixture()
def filled(backend, tmp_path, photo_paths) -> Path:
    """A gallery of the bundled photos imported through a server with a store; its folder."""
    from phenolens import GalleryRecord, ImportItem

    items = [ImportItem(GalleryRecord("", image_id=name, subject_id=label, syndrome_id=label),
                        image=photo_paths[name]) for name, label in GALLERY_PHOTOS]
    importer = _backend(backend, tmp_path)
    with _serving(importer, tmp_path, ADMIN_TOKEN) as admin:
        assert admin.import_gallery(items).added == len(GALLERY_PHOTOS)
        assert len(importer.feature_store) == len(GALLERY_PHOTOS)
        assert importer.activity.hit_encodes == 0
    return tmp_path


def _explain(client, photo_paths):
    return client.explain(photo_paths[QUERY], top_k=TOP_K, photo_maps=False,
                          gallery_crops=False)


def test_fresh_server_explains_top_k_from_the_store_without_encoding_hits(filled,
                                                                            photo_paths):
    from server.backend import Backend

    fresh = Backend.from_config(make_config(filled))  # the server's own wiring
    assert fresh.feature_store is not None and len(fresh.feature_store) == len(GALLERY_PHOTOS)
    with _serving(fresh, filled) as reader:
        result = _explain(reader, photo_paths)
        assert len(result.explanations) == TOP_K
        assert (fresh.activity.hit_encodes, fresh.activity.store_reads) == (0, TOP_K)
        _explain(reader, photo_paths)  # now from the in-memory cache
        assert (fresh.activity.hit_encodes, fresh.activity.store_reads) == (0, TOP_K)
        assert fresh.feature_cache.stats().hits == TOP_K


def test_maps_from_the_store_equal_maps_from_a_fresh_encode(backend, filled, photo_paths):
    stored = _backend(backend, filled)
    with _serving(stored, filled) as reader:
        from_store = _explain(reader, photo_paths)
    assert stored.activity.hit_encodes == 0
    plain = _backend(backend, filled, store=False, cache=0)
    with _serving(plain, filled) as reader:
        encoded = _explain(reader, photo_paths)
    assert plain.activity.hit_encodes == TOP_K
    assert [e.hit.gallery_id for e in from_store.explanations] == \
        [e.hit.gallery_id for e in encoded.explanations]
    methods = set()
    for a, b in zip(from_store.explanations, encoded.explanations, strict=True):
        assert len(a.maps) == len(b.maps)
        for ma, mb in zip(a.maps, b.maps, strict=True):
            assert (ma.method, ma.side) == (mb.method, mb.side)
            methods.add(ma.method)
            scale = float(np.abs(mb.aligned).max())
            assert scale > 0
            # float16 storage keeps ~3 significant digits of the features: similarity maps
            # measured within 2.4e-4 of their peak, contrast maps (differences of the
            # contrast layer's activations) within 6.3e-3
            tolerance = 1.5e-2 if ma.method == "contrast" else 1e-3
            np.testing.assert_allclose(ma.aligned, mb.aligned, rtol=0, atol=tolerance * scale)
            assert not np.array_equal(ma.aligned, np.zeros_like(ma.aligned))
    assert {"contrast", "similarity"} <= methods


def test_a_deleted_image_is_never_served_from_the_store(backend, filled, photo_paths):
    from gallery import Gallery
    from gallery.features import FeatureStore
    from server.feature_cache import stored_scheme

    owner = _backend(backend, filled)
    path = owner.gallery.path
    with _serving(owner, filled, ADMIN_TOKEN) as admin:
        ids = {r.image_id: r.gallery_id for r in admin.iter_images()}
        gone = int(ids["person_a_1.jpg"])
        assert owner.feature_store.missing([gone]) == []
        assert admin.delete_images([str(gone)]) == 1
        assert owner.feature_store.missing([gone]) == [gone]
        result = _explain(admin, photo_paths)
        assert gone not in {int(e.hit.gallery_id) for e in result.explanations}
    # a store opened later (another process) does not serve it either
    with FeatureStore.open(path, backend.encoder_id, stored_scheme(backend.view_scheme)) as s:
        assert s.missing([gone]) == [gone] and len(s) == len(GALLERY_PHOTOS) - 1
        # deleted behind the store's back (another writer): dropped on the next read
        other = int(ids["person_b_1.jpg"])
        with Gallery.open(path) as g:
            g.delete([other])
        got = s.get([other, int(ids["grace_hopper.jpg"])])
        assert got.missing == (other,) and got.gallery_ids == (int(ids["grace_hopper.jpg"]),)


@pytest.mark.parametrize("damage", ["corrupt manifest", "missing data file"])
def test_a_damaged_store_is_rebuilt_by_explain(backend, filled, photo_paths, damage):
    manifest = filled / "gallery.sqlite.features"
    if damage == "corrupt manifest":
        manifest.write_bytes(b'{"format": 1, "sha256": "0"}\n' + b"\x00" * 64)
    else:
        data = list(filled.glob("gallery.sqlite.features.*.f16"))
        assert data
        for f in data:
            f.unlink()
    first = _backend(backend, filled)
    assert len(first.feature_store) == 0 and first.feature_store.stale_reason
    with _serving(first, filled) as reader:
        _explain(reader, photo_paths)
    assert first.activity.hit_encodes == TOP_K  # encoded, and written back
    second = _backend(backend, filled)
    assert len(second.feature_store) == TOP_K and second.feature_store.stale_reason is None
    with _serving(second, filled) as reader:
        _explain(reader, photo_paths)
    assert (second.activity.hit_encodes, second.activity.store_reads) == (0, TOP_K)


# ---------------------------------------------------------------- photo maps


@pytest.mark.parametrize("max_side", [4096, 512])
def test_photo_maps_are_warp_to_photo_at_the_wire_size(pipeline, photo_paths, max_side):
    """The batched photo warp draws what encoder.align.warp_to_photo (and the resize to
    the wire's size) draws, inside the face; nothing outside it."""
    import cv2

    from encoder.align import warp_to_photo
    from server.backend import PhotoWarp

    alignment = pipeline.face(photo_paths[QUERY].read_bytes(), aligned=False).alignment
    rng = np.random.default_rng(0)
    maps = np.stack([rng.standard_normal((7, 7)).astype(np.float32) for _ in range(3)])
    got = PhotoWarp.of(alignment, max_side)(maps)
    for m, g in zip(maps, got, strict=True):
        want, covered = warp_to_photo(m, alignment, return_mask=True)
        h, w = want.shape
        if max(h, w) > max_side:
            size = (round(w * max_side / max(h, w)), round(h * max_side / max(h, w)))
            want = cv2.resize(want, size, interpolation=cv2.INTER_AREA)
            covered = cv2.resize(covered.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        assert g.shape == want.shape
        interior = cv2.erode(covered.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        peak = float(np.abs(want).max())
        assert np.abs(g - want)[interior].max() < 0.03 * peak
        outside = cv2.dilate(covered.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
        assert outside.any() and not g[outside].any()


def test_photo_maps_come_for_the_methods_asked_only(backend, filled, photo_paths):
    with _serving(_backend(backend, filled), filled) as reader:
        result = reader.explain(photo_paths[QUERY], top_k=2, methods=("similarity",),
                                gallery_crops=False)
    for e in result.explanations:
        assert [(m.method, m.side) for m in e.maps] == [("similarity", "query"),
                                                        ("similarity", "gallery")]
        query, gallery = e.maps
        assert query.photo is not None and max(query.photo.shape) <= 512
        assert gallery.photo is None
        assert np.abs(query.photo).sum() > 0


def test_the_store_follows_a_swapped_in_gallery(backend, filled, photo_paths):
    """A replica swaps a snapshot's copy in (server.replica): the store beside that copy
    is used, never the old gallery's entries under the new gallery's ids."""
    import shutil

    from gallery import Gallery

    swapped = _backend(backend, filled)
    copy = filled / "gallery.sqlite.snapshot"  # the importer closed the gallery: one file
    shutil.copyfile(filled / "gallery.sqlite", copy)
    old = swapped.gallery
    swapped.gallery = Gallery.open(copy, create=False)
    old.close()
    assert swapped.feature_store.gallery_path == copy and len(swapped.feature_store) == 0
    with _serving(swapped, filled) as reader:
        _explain(reader, photo_paths)
    assert (swapped.activity.hit_encodes, swapped.activity.store_reads) == (TOP_K, 0)
    assert len(list(filled.glob("gallery.sqlite.snapshot.features*"))) >= 2


def test_the_gallery_features_command_fills_the_store_offline(backend, filled, photo_paths,
                                                             capsys, monkeypatch):
    import json

    from server.cli import main

    for f in filled.glob("gallery.sqlite.features*"):
        f.unlink()
    monkeypatch.chdir(filled)
    assert main(["gallery", "features", "--gallery", str(filled / "gallery.sqlite"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"stored": len(GALLERY_PHOTOS), "images": len(GALLERY_PHOTOS)}
    fresh = _backend(backend, filled)
    with _serving(fresh, filled) as reader:
        _explain(reader, photo_paths)
    assert (fresh.activity.hit_encodes, fresh.activity.store_reads) == (0, TOP_K)


def test_imported_faces_bring_their_neutral_edits_and_effects_read_them(backend, filled,
                                                                          photo_paths):
    """Region effects' neutral edits of gallery faces are made at import and kept in the
    store: a restarted server's first Explain with effects reads them instead of editing
    the hits again, and its effects equal a server's that edits them."""
    from explain.effects import EFFECT_REGIONS, neutral_edits
    from server.backend import KeptNeutralEdits

    stored = _backend(backend, filled)
    hits = stored.gallery.list(limit=2)
    pngs = [stored.gallery.get(h.gallery_id).crop_png for h in hits]
    kept = KeptNeutralEdits(stored.feature_cache, stored.feature_store,
                            stored._cache_keys(hits, pngs))
    first = kept.get(0)
    assert first is not None and first[0].shape == (len(EFFECT_REGIONS), 128)
    fresh = neutral_edits(backend.explainer, backend.explainer.encode(_crop(pngs[0])),
                          neutral=stored.neutral)[0]
    for a, b in zip(first, fresh, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)  # float16 storage
    with _serving(stored, filled) as reader:
        from_store = reader.explain(photo_paths[QUERY], top_k=2, photo_maps=False, effects=2)
    plain = _backend(backend, filled, store=False, cache=0)
    with _serving(plain, filled) as reader:
        edited = reader.explain(photo_paths[QUERY], top_k=2, photo_maps=False, effects=2)
    for a, b in zip(from_store.explanations, edited.explanations, strict=True):
        for side in ("query", "gallery"):
            x, y = a.effects_of(side), b.effects_of(side)
            np.testing.assert_allclose([r.alike for r in x.regions],
                                       [r.alike for r in y.regions], atol=2e-3)


def _crop(png: bytes) -> np.ndarray:
    from encoder.image import decode_image

    return decode_image(png)


def test_a_server_without_a_neutral_face_still_imports_and_stores_features(
        backend, tmp_path, photo_paths, monkeypatch):
    """A read-only install that cannot make the neutral face (no bundled photos, no cache)
    imports faces as before; they are stored without neutral edits (made when asked)."""
    from phenolens import GalleryRecord, ImportItem

    from server.backend import Backend, KeptNeutralEdits

    def unavailable(self):
        raise FileNotFoundError("no bundled photos")

    monkeypatch.setattr(Backend, "neutral", property(unavailable))
    importer = _backend(backend, tmp_path)
    items = [ImportItem(GalleryRecord("", image_id=name, subject_id=label, syndrome_id=label),
                        image=photo_paths[name]) for name, label in GALLERY_PHOTOS[:2]]
    with _serving(importer, tmp_path, ADMIN_TOKEN) as admin:
        assert admin.import_gallery(items).added == 2
    reopened = _backend(backend, tmp_path)
    assert len(reopened.feature_store) == 2
    hits = reopened.gallery.list(limit=2)
    pngs = [reopened.gallery.get(h.gallery_id).crop_png for h in hits]
    kept = KeptNeutralEdits(reopened.feature_cache, reopened.feature_store,
                            reopened._cache_keys(hits, pngs))
    assert kept.get(0) is None
