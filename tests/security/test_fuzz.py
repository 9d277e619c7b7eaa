"""Fuzzing (hypothesis): the image decoder and the gRPC request parsing of a real server.

Every input must end in a typed refusal, never a crash: the decoder returns an
(H, W, 3) uint8 array or raises ``encoder.errors.ImageError``; the server answers
every malformed or mutated request with a deliberate status (never UNKNOWN or
INTERNAL) and keeps serving. Bounded to about a minute in all (example counts
below, no per-example deadline: the machine is shared).
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from encoder.errors import ImageError
from encoder.image import decode_image
from tests.service.conftest import READ_TOKEN

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# The statuses a malformed request may get; UNKNOWN and INTERNAL mean a crash.
DELIBERATE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNIMPLEMENTED}


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 32, 3), np.uint8)
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> bytes:
    """A real encoded image with bytes flipped, cut or spliced."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "cut", "splice")))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:at]
        else:
            data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


def _check_decoded(data: bytes) -> None:
    try:
        rgb = decode_image(data, max_pixels=4_000_000)
    except ImageError:
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=4096))
def test_decoder_refuses_random_bytes_with_a_typed_error(data):
    _check_decoded(data)


@settings(FUZZ, max_examples=300)
@given(mutated_image())
def test_decoder_refuses_damaged_images_with_a_typed_error(data):
    _check_decoded(data)


# -- gRPC request parsing against a real server ------------------------------------------

def _valid_requests(aligned_png: bytes) -> dict[str, bytes]:
    from phenolens._proto import gallery_pb2, phenolens_pb2, types_pb2

    image = types_pb2.Image(encoded=aligned_png, aligned=True)
    match = phenolens_pb2.MatchRequest(image=image, top_k=2)
    return {
        "/phenolens.v1.PhenoLens/Encode":
            phenolens_pb2.EncodeRequest(image=image).SerializeToString(),
        "/phenolens.v1.PhenoLens/Match": match.SerializeToString(),
        "/phenolens.v1.PhenoLens/Explain":
            phenolens_pb2.ExplainRequest(match=match).SerializeToString(),
        "/phenolens.v1.GalleryAdmin/ListImages":
            gallery_pb2.ListImagesRequest(page_size=5).SerializeToString(),
        "/phenolens.v1.GalleryAdmin/GetImage":
            gallery_pb2.GetImageRequest(gallery_id="1").SerializeToString(),
        "/phenolens.v1.GalleryAdmin/AddImage":
            gallery_pb2.AddImageRequest(image=image).SerializeToString(),
    }


@pytest.fixture(scope="module")
def raw_calls(server, gallery_ids):
    """method -> callable(bytes) sending raw request bytes with the read token."""
    aligned = io.BytesIO()
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(aligned, format="PNG")
    valid = _valid_requests(aligned.getvalue())
    channel = grpc.insecure_channel(server.address)
    metadata = (("authorization", f"Bearer {READ_TOKEN}"),)
    calls = {m: (channel.unary_unary(m, request_serializer=None,
                                     response_deserializer=None), body)
             for m, body in valid.items()}

    def send(method: str, body: bytes) -> grpc.StatusCode:
        stub = calls[method][0]
        try:
            stub(body, timeout=20, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    yield send, valid
    channel.close()


def _assert_deliberate(code: grpc.StatusCode, method: str) -> None:
    assert code == grpc.StatusCode.OK or code in DELIBERATE, (method, code)


@settings(FUZZ, max_examples=300)
@given(method=st.sampled_from(sorted(_valid_requests(b"").keys())),
       body=st.binary(max_size=2048))
def test_server_refuses_random_request_bytes_deliberately(raw_calls, server, method, body):
    send, _ = raw_calls
    _assert_deliberate(send(method, body), method)


@settings(FUZZ, max_examples=300)
@given(method=st.sampled_from(sorted(_valid_requests(b"").keys())), data=st.data())
def test_server_refuses_mutated_requests_deliberately(raw_calls, server, method, data):
    send, valid = raw_calls
    body = bytearray(valid[method])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, max(0, len(body) - 1)))
        if body and data.draw(st.booleans()):
            body[at] = data.draw(st.integers(0, 255))
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    _assert_deliberate(send(method, bytes(body)), method)


def test_undecodable_request_is_invalid_argument_not_internal(raw_calls):
    send, _ = raw_calls
    assert send("/phenolens.v1.GalleryAdmin/ListImages", b"\x00") == \
        grpc.StatusCode.INVALID_ARGUMENT
    # Authorisation comes first: a reader's write is refused before its body is read.
    assert send("/phenolens.v1.GalleryAdmin/AddImage", b"\x00") == \
        grpc.StatusCode.PERMISSION_DENIED
    assert send("/phenolens.v1.PhenoLens/Match", b"\xff\xff\xff") == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_server_still_serves_after_the_fuzzing(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
