"""A real PhenoLens server on loopback, shared by the service tests.

One Backend (real SFace weights, real MTCNN, a real SQLite+FAISS gallery in a
temporary folder) is built per session; servers with different settings (auth,
TLS, limits) are started over it on free ports. The gallery is filled through
the real ImportGallery RPC with the bundled photos, people as labels.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import load_config

READ_TOKEN = "read-token-for-tests"
ADMIN_TOKEN = "admin-token-for-tests"

# (photo, person label); person_a_2 / person_b_2 are kept out as queries.
GALLERY_PHOTOS = (
    ("person_a_1.jpg", "person_a"),
    ("person_b_1.jpg", "person_b"),
    ("impostor_1.jpg", "impostor_1"),
    ("impostor_2.jpg", "impostor_2"),
    ("astronaut.png", "eileen_collins"),
    ("grace_hopper.jpg", "grace_hopper"),
)


def wait_for(predicate, timeout: float, poll: float = 0.005) -> bool:
    """Poll ``predicate`` every ``poll`` seconds until it holds or ``timeout`` passes; its
    last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def make_config(tmp: Path, **overrides):
    """A test configuration: tokens for both scopes, explain budget large enough for the
    deliberately slow calls that deadline and cancellation tests abandon."""
    base = {
        "listen": "127.0.0.1:0",
        "shutdown_grace_s": 5.0,
        "gallery": {"path": str(tmp / "gallery.sqlite")},
        "auth": {"tokens": [
            {"name": "reader", "scopes": ["read"], "token": READ_TOKEN},
            {"name": "operator", "scopes": ["admin"], "token": ADMIN_TOKEN},
        ]},
        "explain": {"budget": 1_000_000, "time_limit_s": 60.0},
        "limits": {"max_concurrent": 2, "queue_timeout_s": 10.0, "workers": 24,
                   "max_pending_rpcs": 64},
        "log": {"level": "INFO"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(None, env={}, **base)


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def backend(service_dir):
    from server.backend import Backend

    b = Backend.from_config(make_config(service_dir))
    b.warm_up()
    yield b
    b.close()


@pytest.fixture(scope="session")
def server(backend, service_dir):
    """The default test server: auth on, no TLS, 2 heavy slots."""
    from server.app import start

    running = start(make_config(service_dir), backend=backend)
    yield running
    running.stop(grace_s=1.0)


def start_server(backend, tmp: Path, **overrides):
    from server.app import start

    return start(make_config(tmp, **overrides), backend=backend)


@pytest.fixture(scope="session")
def admin(server):
    from phenolens import Client

    with Client(server.address, token=ADMIN_TOKEN, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def reader(server):
    from phenolens import Client

    with Client(server.address, token=READ_TOKEN, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def gallery_ids(admin, photo_paths) -> dict[str, str]:
    """Fill the gallery through ImportGallery; photo name -> gallery id."""
    from phenolens import GalleryRecord, ImportItem

    items = [
        ImportItem(GalleryRecord("", image_id=name, subject_id=label, syndrome_id=label,
                                 syndrome_name=label.replace("_", " "), genes=(f"GENE_{label}",),
                                 source="test"), image=photo_paths[name])
        for name, label in GALLERY_PHOTOS
    ]
    summary = admin.import_gallery(items)
    assert summary.received == len(GALLERY_PHOTOS)
    ids = {r.image_id: r.gallery_id for r in admin.iter_images()}
    return {name: ids[name] for name, _ in GALLERY_PHOTOS}


@pytest.fixture(scope="session")
def aligned_crop(photo_paths):
    """Tom Hanks' bundled 112x112 aligned crop as (112, 112, 3) uint8."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(photo_paths["Tom_Hanks_54745.png"]).convert("RGB"))


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    folder: Path


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool, san: bool, client: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("PhenoLens test CA", ca_key, _name("PhenoLens test CA"), ca_key,
                ca=True, san=False, client=False)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue("localhost", server_key, ca.subject, ca_key, ca=False, san=True,
                         client=False)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("test-client", client_key, ca.subject, ca_key, ca=False, san=False,
                         client=True)
    folder = tmp_path_factory.mktemp("pki")
    files = {"ca.pem": pem(ca), "server.pem": pem(server_cert), "server.key": pem_key(server_key),
             "client.pem": pem(client_cert), "client.key": pem_key(client_key)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Pki(files["ca.pem"], files["server.pem"], files["server.key"], files["client.pem"],
               files["client.key"], folder)


@pytest.fixture()
def server_log() -> Iterator:
    """A callable returning the server's JSON log records written so far in this test."""
    import io
    import json
    import logging

    from server.logs import setup_logging

    stream = io.StringIO()
    handler = setup_logging("INFO", stream=stream)

    def records() -> list[dict]:
        handler.flush()
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    yield records
    logging.getLogger("phenolens").removeHandler(handler)
