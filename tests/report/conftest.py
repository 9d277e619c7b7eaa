"""A real PhenoLens server on loopback over a synthetic syndrome gallery, for the report tests.

The gallery holds synthetic syndromes made from real bundled faces (``research.synth``:
several subjects per syndrome, so confidence can be calibrated) plus one rare syndrome
with a single subject (so it must be refused), imported through the real ImportGallery
RPC as aligned crops. Person A's photos are kept out of the gallery: ``person_a_2.jpg``
is the query, a real photo that goes through detection.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import ADMIN_TOKEN, READ_TOKEN, make_config

SOURCE_PHOTOS = ("person_b_1.jpg", "impostor_1.jpg", "impostor_2.jpg", "t1.jpg",
                 "Tom_Hanks_54745.png")
CLASSES = {"wide_eyes": 10, "broad_nose": 10, "long_philtrum": 10, "small_chin": 10}
RARE = "rare_syndrome"
QUERY = "person_a_2.jpg"


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="session")
def synth_samples(pipeline):
    from encoder.assets import PHOTOS
    from research import synth

    sources = synth.load_source_faces(pipeline, [p for p in PHOTOS if p.name in SOURCE_PHOTOS])
    return list(synth.generate(sources, CLASSES, seed=3, split="gallery"))


@pytest.fixture(scope="session")
def report_backend(report_dir):
    from server.backend import Backend

    b = Backend.from_config(make_config(report_dir))
    yield b
    b.close()


@pytest.fixture(scope="session")
def report_server(report_backend, report_dir, synth_samples):
    from phenolens import Client, GalleryRecord, ImportItem

    from server.app import start

    running = start(make_config(report_dir), backend=report_backend)
    items = [ImportItem(GalleryRecord("", image_id=s.image_id, subject_id=s.subject,
                                      syndrome_id=s.label, syndrome_name=s.label.replace("_", " "),
                                      genes=(f"GENE_{s.label.upper()}",), source="synthetic"),
                        image=s.image, aligned=True) for s in synth_samples]
    rare = [s for s in synth_samples if s.label == "broad_nose"][:2]
    items += [ImportItem(GalleryRecord("", image_id=f"rare-{i}", subject_id="rare_subject",
                                       syndrome_id=RARE, syndrome_name="rare syndrome",
                                       source="synthetic"),
                         image=np.ascontiguousarray(s.image[:, ::-1]), aligned=True)
              for i, s in enumerate(rare)]
    with Client(running.address, token=ADMIN_TOKEN, timeout=300) as admin:
        admin.import_gallery(items)
    yield running
    running.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def client(report_server):
    from phenolens import Client

    with Client(report_server.address, token=READ_TOKEN, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def query_path(photo_paths):
    return photo_paths[QUERY]
