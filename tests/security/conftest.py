"""The service tests' real backend and server on loopback, for the fuzz tests."""

from tests.service.conftest import (  # noqa: F401 - fixtures re-exported for this folder
    admin,
    backend,
    gallery_ids,
    server,
    service_dir,
)
