"""SyndromeService over a real gRPC server on loopback: real SFace, real SQLite+FAISS gallery
filled with the real photos (people as syndromes), the real phenolens client."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from phenolens import Client, InvalidArgument
from phenolens.syndrome import FillInProgress, FillInResult, SyndromeClient

from server.auth import TokenAuth
from server.backend import Backend
from server.config import load_config
from server.interceptor import ServiceInterceptor
from server.limits import HeavyWorkLimiter, RequestScope
from server.syndrome_servicer import add_syndrome_service
from tests.syndrome.conftest import GROUP_PHOTOS


@pytest.fixture(scope="module")
def syndrome_server(tmp_path_factory, crops):
    tmp = tmp_path_factory.mktemp("syndrome-service")
    config = load_config(None, env={}, listen="127.0.0.1:0",
                         gallery={"path": str(tmp / "gallery.sqlite")},
                         explain={"budget": 10_000, "time_limit_s": 120.0})
    backend = Backend.from_config(config)
    for name in GROUP_PHOTOS:
        face = backend.pipeline.face(crops[name], aligned=True)
        person = name.rsplit("_", 1)[0]
        backend.gallery.add(backend.entry(face, {"image_id": name, "subject_id": name,
                                                 "syndrome_id": person,
                                                 "syndrome_name": person.replace("_", " ")},
                                          RequestScope()))
    limiter = HeavyWorkLimiter(2, 10.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[ServiceInterceptor(TokenAuth([]))])
    add_syndrome_service(server, backend, limiter, config)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = Client(f"127.0.0.1:{port}", timeout=120.0)
    yield SyndromeClient(client), backend
    client.close()
    server.stop(None).wait()
    backend.close()


def test_composite_over_grpc_is_the_mean_of_the_syndrome_crops(syndrome_server, crops):
    syn, _ = syndrome_server
    result = syn.composite(syndrome_id="person_a")
    expected = np.stack([crops["person_a_1.jpg"], crops["person_a_2.jpg"]]).astype(np.float64).mean(0)
    np.testing.assert_allclose(result.mean, expected, atol=1e-4)
    assert result.image.shape == (112, 112, 3) and result.png.startswith(b"\x89PNG")
    assert result.group.images == 2 and result.group.label == "person a"
    assert any("small group" in w for w in result.group.warnings)


def test_syndrome_map_over_grpc_with_a_query_pull(syndrome_server, crops):
    syn, _ = syndrome_server
    result = syn.syndrome_map(syndrome_id="person_b", query=crops["grace_hopper.jpg"],
                              aligned=True, members=True, overlays=True)
    members = np.stack([m.to_centroid for m in result.members])
    np.testing.assert_allclose(result.to_centroid, members.mean(0), atol=1e-6)
    assert result.to_centroid_aligned.shape == (112, 112)
    assert result.query is not None and abs(result.query.residual) < 1e-4
    assert result.query.cosine < result.mean_cosine_to_centroid
    assert result.to_rest_overlay_png.startswith(b"\x89PNG")


def test_fill_in_streams_progress_then_a_result_that_moves_towards_the_target(syndrome_server, crops):
    syn, _ = syndrome_server
    events = list(syn.fill_in_stream(crops["grace_hopper.jpg"], aligned=True,
                                     syndrome_id="person_a", count=4, overlays=True))
    assert isinstance(events[0], FillInProgress) and isinstance(events[-1], FillInResult)
    result = events[-1]
    assert result.consistency.mean_gain > result.consistency.control_mean_gain
    assert result.consistency.masked.shape == (4,)
    assert result.figure_png.startswith(b"\x89PNG") and result.filled.shape == (112, 112, 3)


def test_too_small_group_is_an_invalid_argument(syndrome_server):
    syn, backend = syndrome_server
    gid = backend.gallery.get_image("person_a_1.jpg").info.gallery_id
    with pytest.raises(InvalidArgument, match="at least 2"):
        syn.composite(gallery_ids=[str(gid)])
    with pytest.raises(InvalidArgument):
        syn.syndrome_map(syndrome_id="nobody")
