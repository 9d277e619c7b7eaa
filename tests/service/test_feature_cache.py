"""Explain with cached gallery features: same maps as without, never stale, safe across threads.

Two servers on loopback share the session's model and pipeline and one gallery
of their own (copies of the session gallery's records, so updates and deletes
here leave the shared gallery alone): one with the feature cache, one with it
off (``explain.feature_cache_size: 0``).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from tests.service.conftest import ADMIN_TOKEN, READ_TOKEN, make_config, start_server

_addresses: dict[str, str] = {}

METHODS = ("similarity", "gradcam")


def _backend_over(backend, gallery, cache_size: int):
    from server.backend import Backend

    config = dataclasses.replace(backend.config, explain=dataclasses.replace(
        backend.config.explain, feature_cache_size=cache_size))
    return Backend(config, pipeline=backend.pipeline, views=backend.views, gallery=gallery,
                   explainer=backend.explainer, encoder_id=backend.encoder_id,
                   view_scheme=backend.view_scheme, encoders=backend.encoders)


def _entry(record, **changes):
    from gallery import Entry

    info = record.info
    fields = dict(image_id=info.image_id, subject_id=info.subject_id,
                  syndrome_id=info.syndrome_id, syndrome_name=info.syndrome_name,
                  views=record.views, omim_id=info.omim_id, genes=info.genes,
                  source=info.source, crop_png=record.crop_png)
    return Entry(**{**fields, **changes})


@pytest.fixture(scope="module")
def own_gallery(backend, gallery_ids, tmp_path_factory):
    from gallery import Gallery

    folder = tmp_path_factory.mktemp("feature-cache")
    gallery = Gallery.open(folder / "gallery.sqlite", encoder_id=backend.encoder_id,
                           view_scheme=backend.view_scheme)
    gallery.add_many([_entry(r) for r in backend.gallery.iter_records()])
    yield gallery
    gallery.close()


@pytest.fixture(scope="module")
def cached(backend, own_gallery):
    return _backend_over(backend, own_gallery, 64)


@pytest.fixture(scope="module")
def clients(backend, own_gallery, cached, tmp_path_factory):
    """(client of the caching server, client of the server without a cache)."""
    from phenolens import Client

    uncached = _backend_over(backend, own_gallery, 0)
    assert uncached.feature_cache is None and cached.feature_cache is not None
    tmp = tmp_path_factory.mktemp("feature-cache-servers")
    servers = [start_server(b, tmp) for b in (cached, uncached)]
    _addresses["cached"] = servers[0].address
    with Client(servers[0].address, token=READ_TOKEN, timeout=120) as with_cache, \
            Client(servers[1].address, token=READ_TOKEN, timeout=120) as without:
        yield with_cache, without
    for s in servers:
        s.stop(grace_s=1.0)


def _ids(gallery, *image_ids: str) -> list[str]:
    return [str(gallery.get_image(i).info.gallery_id) for i in image_ids]


def _assert_same_maps(a, b, atol: float = 1e-6) -> None:
    assert [e.hit.gallery_id for e in a.explanations] == [e.hit.gallery_id
                                                         for e in b.explanations]
    for ea, eb in zip(a.explanations, b.explanations, strict=True):
        assert abs(ea.residual - eb.residual) < atol and abs(ea.bias_share - eb.bias_share) < atol
        for method in METHODS:
            for side in ("query", "gallery"):
                ma, mb = ea.map(method, side), eb.map(method, side)
                np.testing.assert_allclose(ma.aligned, mb.aligned, atol=atol, rtol=0)
                np.testing.assert_allclose(ma.feature, mb.feature, atol=atol, rtol=0)
                if side == "query":
                    np.testing.assert_allclose(ma.photo, mb.photo, atol=atol, rtol=0)


def test_cached_features_give_the_same_maps_as_encoding_the_hits(clients, cached,
                                                                 photo_paths):
    with_cache, without = clients
    cached.feature_cache.clear()
    before = cached.feature_cache.stats()
    kwargs = dict(top_k=6, methods=list(METHODS), feature_maps=True)
    query_a = photo_paths["person_a_2.jpg"]
    reference = without.explain(query_a, **kwargs)
    first = with_cache.explain(query_a, **kwargs)
    after_first = cached.feature_cache.stats()
    assert after_first.misses - before.misses == 6 and after_first.size == 6
    again = with_cache.explain(query_a, **kwargs)
    assert cached.feature_cache.stats().hits - after_first.hits == 6
    _assert_same_maps(first, reference)
    _assert_same_maps(again, reference)
    # features cached while explaining one query serve another query's maps
    query_b = photo_paths["person_b_2.jpg"]
    hits_before = cached.feature_cache.stats().hits
    _assert_same_maps(with_cache.explain(query_b, **kwargs), without.explain(query_b, **kwargs))
    assert cached.feature_cache.stats().hits - hits_before == 6


def test_an_updated_crop_is_encoded_again_never_served_stale(clients, cached, own_gallery,
                                                             photo_paths):
    with_cache, without = clients
    source = own_gallery.get_image("impostor_1.jpg")
    replacement = own_gallery.get_image("grace_hopper.jpg")
    own_gallery.add(_entry(source, image_id="cache-update-test", subject_id="s"))
    chosen = _ids(own_gallery, "cache-update-test")
    query = photo_paths["person_a_2.jpg"]
    kwargs = dict(gallery_ids=chosen, methods=list(METHODS), feature_maps=True)
    old = with_cache.explain(query, **kwargs)

    # labels only: the crop and so its features stay valid
    own_gallery.update(_entry(own_gallery.get_image("cache-update-test"), subject_id="t"))
    stale_before = cached.feature_cache.stats().stale
    relabelled = with_cache.explain(query, **kwargs)
    assert relabelled.explanations[0].hit.record.subject_id == "t"
    assert cached.feature_cache.stats().stale == stale_before
    _assert_same_maps(relabelled, old)

    # a new crop under the same gallery id
    own_gallery.update(_entry(replacement, image_id="cache-update-test", subject_id="t"))
    assert _ids(own_gallery, "cache-update-test") == chosen
    updated = with_cache.explain(query, **kwargs)
    assert cached.feature_cache.stats().stale == stale_before + 1
    _assert_same_maps(updated, without.explain(query, **kwargs))
    old_map = old.explanations[0].map("similarity", "gallery").aligned
    new_map = updated.explanations[0].map("similarity", "gallery").aligned
    assert np.abs(old_map - new_map).max() > 1e-3


def test_a_deleted_record_is_refused_and_leaves_the_cache(clients, cached, own_gallery,
                                                         photo_paths):
    from phenolens import Client
    from phenolens.errors import NotFound

    with_cache, _ = clients
    own_gallery.add(_entry(own_gallery.get_image("astronaut.png"), image_id="cache-delete-test"))
    chosen = _ids(own_gallery, "cache-delete-test")
    query = photo_paths["person_b_2.jpg"]
    with_cache.explain(query, gallery_ids=chosen, methods=["similarity"])
    before = len(cached.feature_cache)
    with Client(_addresses["cached"], token=ADMIN_TOKEN, timeout=120) as admin:
        assert admin.delete_images(chosen) == 1
    assert len(cached.feature_cache) == before - 1
    with pytest.raises(NotFound):
        with_cache.explain(query, gallery_ids=chosen, methods=["similarity"])


def test_concurrent_explains_share_the_cache_and_agree_with_uncached(clients, cached,
                                                                     own_gallery, photo_paths):
    with_cache, without = clients
    cached.feature_cache.clear()
    names = ("person_a_1.jpg", "person_b_1.jpg", "impostor_1.jpg", "impostor_2.jpg")
    chosen = _ids(own_gallery, *names)
    requests = [(photo_paths["person_a_2.jpg"], chosen), (photo_paths["person_b_2.jpg"], chosen),
                (photo_paths["person_a_2.jpg"], chosen[::-1]),
                (photo_paths["person_b_2.jpg"], chosen[1:])]
    kwargs = dict(methods=list(METHODS), feature_maps=True)
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def call(i: int) -> None:
        try:
            start.wait()
            results[i] = with_cache.explain(requests[i][0], gallery_ids=requests[i][1], **kwargs)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(r is not None for r in results)
    stats = cached.feature_cache.stats()
    assert stats.size == len(names) and stats.hits + stats.misses >= 15
    for (query, ids), result in zip(requests, results, strict=True):
        _assert_same_maps(result, without.explain(query, gallery_ids=ids, **kwargs))


def test_the_cache_evicts_least_recently_used_and_holds_only_feature_tensors(backend,
                                                                            own_gallery):
    import torch

    from encoder.image import decode_image
    from server.feature_cache import FeatureCache, Fingerprint

    records = list(own_gallery.iter_records())[:4]
    crops = np.stack([decode_image(r.crop_png) for r in records])
    keys = [(r.info.gallery_id, Fingerprint.of(r.crop_png, backend.encoder_id,
                                               backend.view_scheme)) for r in records]
    cache = FeatureCache(3)
    encoded: list[list[int]] = []

    def features(chosen: list[int]):
        def compute(missing: list[int]):
            encoded.append([chosen[j] for j in missing])
            return backend.explainer.encode(crops[encoded[-1]])

        return cache.features([keys[i] for i in chosen], compute)

    features([0, 1, 2])
    features([0])  # the first becomes the most recently used
    features([3])  # so the fourth evicts the second
    together = features([0, 2, 3])
    assert encoded == [[0, 1, 2], [3]]
    assert cache.stats().evictions == 1 and len(cache) == 3
    assert cache.get(*keys[1]) is None and cache.get(*keys[0]) is not None
    direct = backend.explainer.encode(crops[[0, 2, 3]])
    for got, want in zip((*together.feature_maps, *together.embeddings),
                         (*direct.feature_maps, *direct.embeddings), strict=True):
        # encoded in other batches: float32 sums differ in the last digits (1e-6 relative)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for gid, fingerprint in keys[2:]:
        features = cache.get(gid, fingerprint)
        held = (*features.feature_maps, *features.embeddings, *features.fine_maps)  # contrast reads them
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in held)
        assert len(fingerprint.crop_sha256) == 64  # a digest, not the crop
        assert features.crops.shape == (1, *crops.shape[1:])  # pixel methods perturb it
    assert cache.stats().bytes == 3 * (sum(t.numel() * 4 for t in held) + features.crops.nbytes)


def test_feature_cache_size_is_configurable_and_zero_disables_it(tmp_path):
    from server.config import ConfigError, load_config

    assert make_config(tmp_path).explain.feature_cache_size == 128  # the default (~160 MB)
    env = {"PHENOLENS_EXPLAIN__FEATURE_CACHE_SIZE": "0"}
    assert load_config(None, env=env).explain.feature_cache_size == 0
    with pytest.raises(ConfigError, match="feature_cache_size"):
        load_config(None, env={}, explain={"feature_cache_size": -1})


def test_a_replica_drops_the_faces_its_new_snapshot_no_longer_holds(backend, own_gallery):
    from encoder.image import decode_image
    from server.feature_cache import FeatureCache, Fingerprint
    from server.replica import _holds

    records = list(own_gallery.iter_records())[:3]
    keys = [(r.info.gallery_id, Fingerprint.of(r.crop_png, backend.encoder_id,
                                               backend.view_scheme)) for r in records]
    one = backend.explainer.encode(decode_image(records[0].crop_png))
    cache = FeatureCache(8)
    for gid, fingerprint in keys:
        cache.put(gid, fingerprint, one)
    cache.put(keys[2][0], Fingerprint.of(b"the crop before a replacing import",
                                         backend.encoder_id, backend.view_scheme), one)
    cache.put(10**9, keys[0][1], one)  # a record the gallery no longer holds
    assert cache.retain(lambda gid, fingerprint: _holds(own_gallery, gid, fingerprint)) == 2
    assert len(cache) == 2
    assert cache.get(*keys[0]) is not None and cache.get(*keys[1]) is not None


def test_what_is_kept_beside_a_face_goes_with_it(backend, aligned_crop):
    import torch

    from server.feature_cache import FeatureCache, Fingerprint

    cache = FeatureCache(capacity=2)
    fp = Fingerprint.of(b"crop", "enc", "scheme")
    edits = [torch.ones(9, 128)]
    cache.put_extra(7, fp, "edits", edits)  # no features cached for the face: ignored
    assert cache.extra(7, fp, "edits") is None
    cache.put(7, fp, backend.explainer.encode(aligned_crop))
    base = cache.stats().bytes
    cache.put_extra(7, fp, "edits", edits)
    assert torch.equal(cache.extra(7, fp, "edits")[0], edits[0])
    assert cache.stats().bytes == base + 9 * 128 * 4
    assert cache.extra(7, Fingerprint.of(b"other crop", "enc", "scheme"), "edits") is None
    cache.discard([7])  # a deleted face leaves nothing derived from it behind
    assert cache.extra(7, fp, "edits") is None and cache.stats().bytes == 0
