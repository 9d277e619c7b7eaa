"""Erasure: a deleted (or replaced) gallery record leaves no copy of its face data.

A gallery of real photos is filled through ImportGallery on a real server (SQLite,
FAISS, the feature store beside it, the feature cache), explained once, and published
as a snapshot. Then one record is deleted through the GalleryAdmin RPC, one through
``phenolens gallery delete`` (the CLI, another process) and one is replaced in place
(what ``phenolens gallery import --update`` does), and a snapshot is published again.
Every file under the gallery's folder and the snapshot folder is scanned for each
record's embedding bytes, slices of its crop PNG and a slice of its stored feature
maps: all found before, none after. The other records match and explain exactly as
before.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import ADMIN_TOKEN, GALLERY_PHOTOS
from tests.service.test_feature_store import _backend, _serving
from tests.service.test_replicas import REPO, _snapshot_tool

QUERY = "person_a_2.jpg"
VICTIMS = {"rpc": "person_b_1.jpg", "cli": "impostor_1.jpg", "replaced": "impostor_2.jpg"}


def _needles(backend, gallery_id: int) -> dict[str, list[bytes]]:
    """Byte strings that only this record's face data contains: its embedding (each
    view's float32 bytes), three 48-byte slices of its crop PNG's compressed pixels
    (a PNG's header is the same for every crop; SQLite splits a long blob over pages,
    so whole-PNG searches would miss), a 64-byte slice of its stored float16 maps and its
vector as the FAISS index stores it."""
    from gallery.vectors import search_matrix

    record = backend.gallery.get(gallery_id)
    png = record.crop_png
    crop = [png[at : at + 48] for at in (len(png) // 4, len(png) // 2, 3 * len(png) // 4)]
    stored = backend.feature_store.get([gallery_id])
    assert stored.gallery_ids == (gallery_id,)
    flat = stored.maps[0][0].reshape(-1)
    middle = int(np.flatnonzero(flat)[len(np.flatnonzero(flat)) // 2])
    maps = [flat[middle : middle + 32].astype("<f2").tobytes()]
    embedding = [np.asarray(v, "<f4").tobytes()[:256] for v in record.views]
    searched = search_matrix(np.concatenate(record.views)[None].astype(np.float32),
                             [len(v) for v in record.views])  # as the FAISS index holds it
    index = [searched[0].astype("<f4").tobytes()[:256]]
    return {"embedding": embedding, "crop": crop, "maps": maps, "index": index}


def _scan(folders: list[Path], needles: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """kind -> the files (relative names) holding any of that kind's needles."""
    found: dict[str, list[str]] = {kind: [] for kind in needles}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            data = path.read_bytes()
            for kind, items in needles.items():
                if any(item in data for item in items):
                    found[kind].append(str(path.relative_to(folder.parent)))
    return found


def _explained(client, photo_paths) -> dict[str, tuple[float, dict[str, np.ndarray]]]:
    result = client.explain(photo_paths[QUERY], top_k=len(GALLERY_PHOTOS), photo_maps=False,
                            gallery_crops=False)
    out = {}
    for e in result.explanations:
        maps = {f"{m}/{side}": np.array(e.map(m, side).aligned)
                for m in ("similarity", "contrast") for side in ("query", "gallery")}
        out[e.hit.record.image_id] = (e.hit.cosine, maps)
    return out


def test_deleted_and_replaced_records_leave_no_face_data_behind(backend, tmp_path,
                                                                photo_paths):
    from phenolens import GalleryRecord, ImportItem

    from gallery import Entry

    folder = tmp_path / "gallery"
    folder.mkdir()
    snapshots = tmp_path / "snapshots"
    tool = _snapshot_tool()
    items = [ImportItem(GalleryRecord("", image_id=name, subject_id=label, syndrome_id=label),
                        image=photo_paths[name]) for name, label in GALLERY_PHOTOS]
    server = _backend(backend, folder)
    with _serving(server, folder, ADMIN_TOKEN) as admin:
        assert admin.import_gallery(items).added == len(GALLERY_PHOTOS)
        before = _explained(admin, photo_paths)
        ids = {r.image_id: r.gallery_id for r in admin.iter_images()}
        gids = {how: int(ids[name]) for how, name in VICTIMS.items()}
        needles = {how: _needles(server, gid) for how, gid in gids.items()}
        kept_ids = sorted(int(g) for g in ids.values() if int(g) not in gids.values())
        kept_features = server.feature_store.get(kept_ids)
        server.gallery.flush()
        tool.publish(server.gallery.path, snapshots)
        for how, kinds in needles.items():
            found = _scan([folder, snapshots], kinds)
            print(f"erasure scan before deleting ({how}):", found)
            assert all(found.values()), (how, found)  # the scan finds each copy before
            assert any(".features" in f for f in found["maps"]), (how, found)
            assert any(".faiss" in f for f in found["index"]), (how, found)
            assert any("snapshots" in f for f in found["crop"]), (how, found)
        assert server.feature_cache.stats().size == len(GALLERY_PHOTOS)

        assert admin.delete_images([str(gids["rpc"])]) == 1
        # an import that replaces a record in place: new face data under the same ids
        other = server.gallery.get(int(ids["grace_hopper.jpg"]))
        old = server.gallery.get(gids["replaced"])
        server.gallery.update(Entry(old.info.image_id, old.info.subject_id,
                                    old.info.syndrome_id, old.info.syndrome_name, other.views,
                                    crop_png=other.crop_png))
        # a delete through the server drops the face from the in-memory cache at once
        assert server.feature_cache.stats().size == len(GALLERY_PHOTOS) - 1
    cli = subprocess.run([sys.executable, "-m", "server.cli", "gallery", "delete", "--gallery",
                          str(folder / "gallery.sqlite"), VICTIMS["cli"]],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    from gallery import Gallery

    with Gallery.open(folder / "gallery.sqlite", create=False) as gallery:
        tool.publish(gallery.path, snapshots)
        assert len(gallery) == len(GALLERY_PHOTOS) - 2

    scans = {how: _scan([folder, snapshots], kinds) for how, kinds in needles.items()}
    print("erasure scan after deletion (files holding each kind of face data):", scans)
    for how, found in scans.items():
        assert not any(found.values()), (how, found)

    # The remaining records match and explain exactly as before (a fresh server, so the
    # maps come from the feature store as it is on disk now).
    fresh = _backend(backend, folder)
    stored = fresh.feature_store.get(kept_ids)  # the kept faces' maps, bit for bit
    assert stored.gallery_ids == tuple(kept_ids) and not stored.missing
    for a, b in zip((*stored.maps, *stored.embeddings),
                    (*kept_features.maps, *kept_features.embeddings), strict=True):
        assert a.tobytes() == b.tobytes()
    with _serving(fresh, folder, ADMIN_TOKEN) as client:
        after = _explained(client, photo_paths)
    kept = set(before) - set(VICTIMS.values())
    assert set(after) == kept | {VICTIMS["replaced"]}
    for image_id in kept:
        assert after[image_id][0] == pytest.approx(before[image_id][0], abs=1e-6), image_id
        for key, value in before[image_id][1].items():
            # equal but for float32 rounding: K hits are mapped in one batch, and K changed
            np.testing.assert_allclose(after[image_id][1][key], value, rtol=1e-4, atol=1e-7,
                                       err_msg=image_id + key)
