"""Every RPC end to end against a real server on loopback (real SFace, MTCNN, SQLite, FAISS)."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest

from tests.service.conftest import GALLERY_PHOTOS


def test_server_info_reports_encoder_scheme_gallery_and_limits(reader, gallery_ids):
    info = reader.server_info()
    assert info.api_version == "phenolens.v1"
    assert info.encoder_id.startswith("sface")
    assert info.view_scheme and "sface" in info.view_scheme
    assert info.gallery_size == len(GALLERY_PHOTOS) and info.gallery_version > 0
    assert info.limits["max_top_k"] > 0 and info.limits["max_concurrent_heavy_calls"] == 2
    assert "similarity" in info.explain_methods and "occlusion" in info.explain_methods
    assert info.encoders[0].embedding_dim == 128
    assert "syndrome" in info.features  # issue 8's SyndromeService is registered


def test_encode_returns_unit_views_and_alignment(reader, photo_paths):
    enc = reader.encode(photo_paths["astronaut.png"], return_crop=True)
    views, dim = enc.embedding.shape
    assert dim == 128 and views == len(enc.view_scheme.split(","))
    np.testing.assert_allclose(np.linalg.norm(enc.embedding, axis=1), 1.0, atol=1e-5)
    a = enc.alignment
    assert a.detected and a.face_count == 1 and a.detection_score > 0.9
    assert a.landmarks_photo.shape == (5, 2) and a.crop_to_photo.shape == (2, 3)
    assert a.photo_size == (512, 512) and a.crop_size == (112, 112)
    assert enc.aligned_crop().shape == (112, 112, 3)


def test_encode_accepts_path_bytes_pil_and_numpy_alike(reader, photo_paths):
    from PIL import Image

    path = photo_paths["grace_hopper.jpg"]
    by_path = reader.encode(path).embedding
    by_bytes = reader.encode(path.read_bytes()).embedding
    pil = Image.open(path)
    by_pil = reader.encode(pil).embedding
    by_numpy = reader.encode(np.asarray(pil.convert("RGB"))).embedding
    np.testing.assert_allclose(by_bytes, by_path, atol=1e-6)
    np.testing.assert_allclose(by_pil, by_numpy, atol=1e-6)
    assert float(np.sum(by_pil * by_path, axis=1).min()) > 0.99


def test_encode_of_an_aligned_crop_skips_detection(reader, aligned_crop):
    enc = reader.encode(aligned_crop, aligned=True)
    assert not enc.alignment.detected
    assert enc.alignment.crop_size == (112, 112)


def test_match_finds_the_same_person_first(reader, photo_paths, gallery_ids):
    for query, person in (("person_a_2.jpg", "person_a"), ("person_b_2.jpg", "person_b")):
        result = reader.match(photo_paths[query], top_k=3)
        assert [h.rank for h in result.hits] == [1, 2, 3]
        assert result.hits[0].record.subject_id == person
        assert result.syndromes[0].syndrome_id == person
        assert result.genes[0].gene == f"GENE_{person}"
        assert result.hits[0].cosine >= result.hits[1].cosine
        assert abs(result.hits[0].distance - (1 - result.hits[0].cosine)) < 1e-6
        assert result.alignment is not None and result.alignment.detected


def test_match_filters_exclude_subject_and_restrict_syndromes(reader, photo_paths, gallery_ids):
    from phenolens import Filters

    query = photo_paths["person_a_2.jpg"]
    excluded = reader.match(query, top_k=10, exclude_subjects=["person_a"])
    assert "person_a" not in {h.record.subject_id for h in excluded.hits}
    assert len(excluded.hits) == len(GALLERY_PHOTOS) - 1
    only = reader.match(query, top_k=10, filters=Filters(syndromes=("impostor_1", "impostor_2")))
    assert {h.syndrome_id for h in only.hits} == {"impostor_1", "impostor_2"}
    assert {s.syndrome_id for s in only.syndromes} == {"impostor_1", "impostor_2"}


def test_same_patient_rule_drops_near_duplicates(reader, photo_paths, gallery_ids):
    from phenolens import Filters

    query = photo_paths["person_a_1.jpg"]  # itself in the gallery: distance ~0
    plain = reader.match(query, top_k=3)
    assert plain.hits[0].record.image_id == "person_a_1.jpg" and plain.hits[0].distance < 0.05
    ruled = reader.match(query, top_k=3, filters=Filters(same_patient_rule=True))
    assert "person_a_1.jpg" not in {h.record.image_id for h in ruled.hits}
    assert all(h.distance > 0.4 for h in ruled.hits)


def test_match_by_precomputed_embedding_equals_match_by_image(reader, photo_paths, gallery_ids):
    query = photo_paths["person_b_2.jpg"]
    enc = reader.encode(query)
    by_embedding = reader.match(embedding=enc.embedding, view_scheme=enc.view_scheme, top_k=3)
    by_image = reader.match(query, top_k=3)
    assert [h.gallery_id for h in by_embedding.hits] == [h.gallery_id for h in by_image.hits]
    assert by_embedding.alignment is None


def _check_explained(e, *, photo_shape):
    assert set(e.methods) == {"contrast", "similarity"}  # the default explanation
    for method in e.methods:
        q, g = e.map(method, "query"), e.map(method, "gallery")
        assert q.aligned.shape == (112, 112) and g.aligned.shape == (112, 112)
        assert q.aligned.dtype == np.float32
        assert q.photo is not None and max(q.photo.shape) == min(512, max(photo_shape))
        assert abs(q.photo.shape[0] / q.photo.shape[1] - photo_shape[0] / photo_shape[1]) < 0.01
        assert g.photo is None
        assert 0 < np.abs(q.aligned).max() < 1  # raw contributions, not min-max normalised
    assert abs(e.residual) < 1e-3


def test_explain_returns_maps_on_both_faces(reader, photo_paths, gallery_ids, tmp_path):
    from PIL import Image

    result = reader.explain(photo_paths["person_a_2.jpg"], top_k=3, feature_maps=True)
    assert [h.gallery_id for h in result.match.hits] == [e.hit.gallery_id
                                                         for e in result.explanations]
    assert result.explanations[0].hit.record.subject_id == "person_a"
    h, w = Image.open(photo_paths["person_a_2.jpg"]).size[::-1]
    for e in result.explanations:
        _check_explained(e, photo_shape=(h, w))
        assert e.map("similarity", "query").feature.shape == (7, 7)
    top = result.explanations[0]
    both = top.save_overlay(tmp_path / "pair.png")
    photo = top.save_overlay(tmp_path / "photo.png", "similarity", "query", coords="photo")
    assert Image.open(both).size[0] > 2 * 112 and Image.open(photo).size == (w, h)


def test_explain_sum_rule_holds_for_the_feature_map(reader, photo_paths, gallery_ids):
    result = reader.explain(photo_paths["person_b_2.jpg"], top_k=1, feature_maps=True,
                            methods=["similarity"])
    e = result.explanations[0]
    total = float(e.map("similarity", "query").feature.sum())
    assert abs(e.hit.cosine - total - e.bias_share - e.residual) < 1e-4


def test_explain_server_side_overlays_are_pngs(reader, photo_paths, gallery_ids):
    from PIL import Image

    result = reader.explain(photo_paths["person_b_2.jpg"], top_k=1, overlays=True,
                            methods=["gradcam"])
    m = result.explanations[0].map("gradcam", "query")
    assert Image.open(io.BytesIO(m.overlay_png)).size == (112, 112)
    assert Image.open(io.BytesIO(m.photo_overlay_png)).size[0] > 0


def test_explain_against_chosen_gallery_images(reader, photo_paths, gallery_ids):
    chosen = [gallery_ids["grace_hopper.jpg"], gallery_ids["impostor_1.jpg"]]
    result = reader.explain(photo_paths["person_a_2.jpg"], gallery_ids=chosen,
                            methods=["similarity"])
    assert [e.hit.gallery_id for e in result.explanations] == chosen


def test_explain_with_a_pixel_method_and_options(reader, aligned_crop, gallery_ids):
    result = reader.explain(aligned_crop, aligned=True, top_k=1, methods=["occlusion"],
                            method_options={"occlusion": {"patch": 28, "stride": 28}},
                            photo_maps=False)
    q = result.explanations[0].map("occlusion", "query")
    assert q.aligned.shape == (112, 112) and q.photo is None


def test_explain_stream_sends_the_match_first_then_each_hit(reader, photo_paths, gallery_ids):
    from phenolens import ExplainedMatch, MatchResult

    events = list(reader.explain_stream(photo_paths["person_a_2.jpg"], top_k=3))
    assert isinstance(events[0], MatchResult) and len(events) == 4
    assert all(isinstance(e, ExplainedMatch) for e in events[1:])
    assert sorted(e.index for e in events[1:]) == [0, 1, 2]
    assert events[1].hit.gallery_id == events[0].hits[events[1].index].gallery_id


def test_async_client_matches_and_streams(server, photo_paths, gallery_ids):
    from phenolens import AsyncClient, MatchResult

    from tests.service.conftest import READ_TOKEN

    async def run():
        async with AsyncClient(server.address, token=READ_TOKEN) as client:
            info = await client.server_info()
            result = await client.match(photo_paths["person_b_2.jpg"], top_k=2)
            events = [e async for e in client.explain_stream(photo_paths["person_b_2.jpg"],
                                                             top_k=2)]
            stats = await client.gallery_stats()
        return info, result, events, stats

    info, result, events, stats = asyncio.run(run())
    assert info.api_version == "phenolens.v1"
    assert result.hits[0].record.subject_id == "person_b"
    assert isinstance(events[0], MatchResult) and len(events) == 3
    assert stats.images == len(GALLERY_PHOTOS)


def test_gallery_stats_list_and_get(reader, gallery_ids):
    stats = reader.gallery_stats()
    assert stats.images == len(GALLERY_PHOTOS) and stats.syndromes == len(GALLERY_PHOTOS)
    assert {c.syndrome_id for c in stats.per_syndrome} == {label for _, label in GALLERY_PHOTOS}
    first = reader.list_images(page_size=4)
    assert len(first.records) == 4 and first.total == len(GALLERY_PHOTOS)
    assert first.next_page_token
    second = reader.list_images(page_size=4, page_token=first.next_page_token)
    assert len(second.records) == len(GALLERY_PHOTOS) - 4 and not second.next_page_token
    ids = [r.gallery_id for r in first.records + second.records]
    assert len(set(ids)) == len(GALLERY_PHOTOS)
    only = reader.list_images(syndrome_id="person_b")
    assert [r.image_id for r in only.records] == ["person_b_1.jpg"]
    image = reader.get_image(gallery_ids["astronaut.png"], include_crop=True,
                             include_embedding=True)
    assert image.record.syndrome_id == "eileen_collins"
    assert image.embedding.shape[1] == 128 and image.aligned_crop_png[:4] == b"\x89PNG"


def test_add_get_and_delete_an_image(admin, photo_paths, gallery_ids, aligned_crop):
    before = admin.gallery_stats().gallery_version
    record = admin.add_image(aligned_crop, aligned=True, image_id="tom_hanks_crop",
                             subject_id="tom", syndrome_id="tom_hanks", genes=("GENE_X",))
    assert record.gallery_id and record.encoder_id.startswith("sface")
    assert admin.get_image(record.gallery_id).record.genes == ("GENE_X",)
    hit = admin.match(aligned_crop, aligned=True, top_k=1).hits[0]
    assert hit.gallery_id == record.gallery_id and hit.cosine > 0.99
    assert admin.delete_images([record.gallery_id]) == 1
    assert admin.gallery_stats().gallery_version > before
    with pytest.raises(Exception) as info:
        admin.get_image(record.gallery_id)
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_import_precomputed_records_is_idempotent(admin, reader, photo_paths, gallery_ids):
    from phenolens import GalleryRecord, ImportItem

    enc = reader.encode(photo_paths["person_b_2.jpg"], return_crop=True)
    item = ImportItem(GalleryRecord("", image_id="precomputed_b2", subject_id="person_b_x",
                                    syndrome_id="person_b"),
                      embedding=enc.embedding, view_scheme=enc.view_scheme,
                      aligned_crop_png=enc.aligned_crop_png)
    first = admin.import_gallery([item])
    again = admin.import_gallery([item])
    assert (first.added, again.added, again.unchanged) == (1, 0, 1)
    gid = next(r.gallery_id for r in admin.iter_images() if r.image_id == "precomputed_b2")
    assert admin.delete_images([gid, "999999"], missing_ok=True) == 1


def test_health_and_reflection_are_open_without_a_token(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="phenolens.v1.PhenoLens"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"phenolens.v1.PhenoLens", "phenolens.v1.GalleryAdmin", "grpc.health.v1.Health",
            "phenolens.v1.SyndromeService"} <= names


def test_cli_info_asks_the_server(server, capsys):
    import json

    from server.cli import main
    from tests.service.conftest import READ_TOKEN

    assert main(["info", "--server", server.address, "--token", READ_TOKEN, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["api_version"] == "phenolens.v1" and doc["view_scheme"]


def test_cli_match_and_gallery_go_through_the_server(server, photo_paths, gallery_ids, capsys):
    import json

    from server.cli import main
    from tests.service.conftest import READ_TOKEN

    remote = ["--server", server.address, "--token", READ_TOKEN, "--json"]
    assert main(["match", str(photo_paths["person_b_2.jpg"]), "--top", "2", *remote]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["hits"][0]["subject_id"] == "person_b"
    assert doc["syndromes"][0]["nearest_image_id"] == "person_b_1.jpg"
    assert main(["gallery", "stats", *remote]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(GALLERY_PHOTOS)


def test_cli_explain_goes_through_the_server_and_writes_maps(server, photo_paths, gallery_ids,
                                                             tmp_path, capsys):
    import json

    from server.cli import main
    from tests.service.conftest import READ_TOKEN

    assert main(["explain", str(photo_paths["person_a_2.jpg"]), "--top", "2", "--methods",
                 "similarity", "--out", str(tmp_path), "--json", "--server", server.address,
                 "--token", READ_TOKEN]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["rank"] for d in docs] == [1, 2] and docs[0]["syndrome_id"] == "person_a"
    files = docs[0]["methods"]["similarity"]["files"]
    assert np.load(files["query_map"]).shape == (7, 7)
    for key in ("pair", "gallery_overlay", "query_photo"):
        assert files[key].endswith(".png") and (tmp_path / files[key].split("/")[-1]).exists()


def test_explain_sends_region_effects_for_the_hits_asked(reader, photo_paths, gallery_ids):
    result = reader.explain(photo_paths["person_a_2.jpg"], top_k=2, effects=1,
                            methods=["contrast"], photo_maps=False)
    top, second = result.explanations
    assert second.effects == () and second.effects_of("query") is None
    query, gallery = top.effects_of("query"), top.effects_of("gallery")
    assert [r.region for r in query.regions][-1] == "outside_face" and len(query.regions) == 9
    assert query.regions != gallery.regions  # each face edited on its own side
    assert top.describe("query") == query.describe() and "alike" in top.describe("gallery")
    # the same person: taking away the face's regions lowers the match
    assert min(r.alike for r in query.regions) < -0.02
    assert top.contrast_share is not None and 0.2 < top.contrast_share < 2.0
    assert "region effects not measured" in second.describe("query")


def test_with_region_effects_the_maps_sent_for_pictures_carry_each_regions_measured_effect(
        reader, photo_paths):
    """``Map.drawn`` is what the server's figures draw: each region's mass is minus the
    region's measured effect (alike for similarity, differs for contrast), so a picture the
    client draws from it names the region the words name; maps without effects send none."""
    from explain.effects import effect_region_stack

    result = reader.explain(photo_paths["person_a_2.jpg"], top_k=2, effects=1,
                            methods=["similarity", "contrast", "gradcam"], photo_maps=False)
    top, second = result.explanations
    for side in ("query", "gallery"):
        effects = {r.region: r for r in top.effects_of(side).regions}
        masks = effect_region_stack(top.map("similarity", side).aligned.shape, tuple(effects))
        for method, kind in (("similarity", "alike"), ("contrast", "differs")):
            m = top.map(method, side)
            assert m.drawn is not None and m.picture is m.drawn
            assert not np.allclose(m.drawn, m.aligned)
            mass = [float(m.drawn[mask].sum()) for mask in masks]
            want = [-getattr(effects[r], kind) for r in effects]
            np.testing.assert_allclose(mass, want, atol=2e-4)
        assert top.map("gradcam", side).drawn is None  # gradcam is drawn as it is
        # the client's overlay draws the weighted map unless asked for the method's own
        assert not np.array_equal(top.overlay("similarity", side),
                                  top.overlay("similarity", side, weighted=False))
    assert all(m.drawn is None for m in second.maps)
    assert second.map("contrast").picture is second.map("contrast").aligned
