"""TLS and mutual TLS from configuration, with a CA generated in the test."""

from __future__ import annotations

import phenolens
import pytest

from tests.service.conftest import READ_TOKEN, start_server


def test_tls_round_trip(backend, tmp_path, pki, photo_paths, gallery_ids):
    running = start_server(backend, tmp_path, listen="localhost:0",
                           tls={"cert": str(pki.folder / "server.pem"),
                                "key": str(pki.folder / "server.key")})
    try:
        tls = phenolens.TLS(ca=pki.ca)
        with phenolens.Client(running.address, token=READ_TOKEN, tls=tls) as c:
            assert c.server_info().api_version == "phenolens.v1"
            assert c.match(photo_paths["person_b_2.jpg"], top_k=1).hits[0].syndrome_id == \
                "person_b"
        # A client that does not trust the CA cannot connect.
        with phenolens.Client(running.address, token=READ_TOKEN, tls=True, timeout=5,
                              retry=phenolens.Retry(attempts=1)) as untrusting:
            with pytest.raises(phenolens.Unavailable):
                untrusting.server_info()
        # Plain text to a TLS port fails too.
        with phenolens.Client(running.address, token=READ_TOKEN, timeout=5,
                              retry=phenolens.Retry(attempts=1)) as plain:
            with pytest.raises(phenolens.Unavailable):
                plain.server_info()
    finally:
        running.stop(grace_s=1.0)


def test_mutual_tls_requires_a_client_certificate(backend, tmp_path, pki, gallery_ids):
    running = start_server(backend, tmp_path, listen="localhost:0",
                           tls={"cert": str(pki.folder / "server.pem"),
                                "key": str(pki.folder / "server.key"),
                                "client_ca": str(pki.folder / "ca.pem")})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN,
                              tls=phenolens.TLS(ca=pki.ca, cert=pki.client_cert,
                                                key=pki.client_key)) as c:
            assert c.gallery_stats().images > 0
        with phenolens.Client(running.address, token=READ_TOKEN, tls=phenolens.TLS(ca=pki.ca),
                              timeout=5, retry=phenolens.Retry(attempts=1)) as anonymous:
            with pytest.raises(phenolens.Unavailable):
                anonymous.gallery_stats()
    finally:
        running.stop(grace_s=1.0)
