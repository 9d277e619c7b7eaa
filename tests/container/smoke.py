"""Smoke test of a running PhenoLens container, driven from the host through the client.

Imports the demo gallery (the bundled real photos, people as labels: an identity
demo, not syndromes), then runs Match and Explain with a held-out photo of a
person in the gallery, checks health and the scopes of the two tokens. Exits
non-zero with the failed step on stderr. Run by tests/container/run.sh:

    python tests/container/smoke.py --target 127.0.0.1:PORT \
        --admin-token A --read-token R [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from phenolens import Client, ImportItem, PermissionDenied, Unauthenticated
from phenolens.results import GalleryRecord

from encoder.assets import PHOTOS, Photo

QUERY = "person_a_2.jpg"  # person_a_1.jpg, taken years apart, is in the gallery
EXPECTED_PERSON = "person_a"


class SmokeFailure(AssertionError):
    """A step of the smoke test did not behave as a working container must."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def health_status(target: str, timeout: float = 5.0) -> str:
    """The grpc.health.v1 status name of the whole server."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def gallery_photos() -> list[Photo]:
    """Single-face demo photos except the held-out query."""
    return [p for p in PHOTOS if p.faces == 1 and p.name != QUERY]


def import_items(photos: list[Photo]) -> list[ImportItem]:
    return [
        ImportItem(
            record=GalleryRecord(
                gallery_id="", image_id=p.path.stem, subject_id=p.person,
                syndrome_id=p.person, syndrome_name=p.person.replace("_", " "),
                source="container smoke test (identity demo)",
            ),
            image=p.path.read_bytes(),
            aligned=p.aligned,
        )
        for p in photos
    ]


def run(target: str, admin_token: str, read_token: str, out: Path | None) -> dict[str, float]:
    """Every step against ``target``; returns seconds per step."""
    timings: dict[str, float] = {}

    def step(name: str):
        print(f"[smoke] {name}", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]

    step("health")
    check(health_status(target) == "SERVING", "health is not SERVING")
    done("health")

    photos = gallery_photos()
    with Client(target, token=admin_token, timeout=300) as admin, \
            Client(target, token=read_token, timeout=300) as reader, \
            Client(target, token="not-a-token", timeout=30) as stranger:
        step("server_info")
        info = reader.server_info()
        check(bool(info.encoder_id), "ServerInfo names no encoder")
        done("server_info")

        step("scopes")
        try:
            stranger.gallery_stats()
            raise SmokeFailure("an unknown token was accepted")
        except Unauthenticated:
            pass
        try:
            reader.add_image(photos[0].path.read_bytes(), image_id="scope-probe",
                             subject_id="x", syndrome_id="x")
            raise SmokeFailure("a read token could write to the gallery")
        except PermissionDenied:
            pass
        done("scopes")

        step("import_gallery")
        summary = admin.import_gallery(import_items(photos))
        check(summary.received == len(photos),
              f"import received {summary.received} of {len(photos)} records")
        check(summary.added + summary.unchanged == len(photos),
              f"import added {summary.added} and kept {summary.unchanged} of {len(photos)}")
        stats = reader.gallery_stats()
        check(stats.images == len(photos), f"gallery holds {stats.images}, not {len(photos)}")
        done("import_gallery")

        query = (Path(photos[0].path).parent / QUERY).read_bytes()

        step("match")
        match = reader.match(query, top_k=5)
        check(len(match.hits) == 5, f"match returned {len(match.hits)} hits, not 5")
        top = match.hits[0].record
        check(top.subject_id == EXPECTED_PERSON,
              f"top hit is {top.subject_id!r}, not the same person {EXPECTED_PERSON!r}")
        check(match.syndromes and match.syndromes[0].syndrome_id == EXPECTED_PERSON,
              "the label ranking does not put the same person first")
        done("match")

        step("explain")
        result = reader.explain(query, top_k=3, overlays=True)
        check(len(result.explanations) == 3, f"{len(result.explanations)} explanations, not 3")
        for explained in result.explanations:
            sides = {m.side for m in explained.maps}
            check(len(sides) >= 2, f"match {explained.index} has maps on {sides} only")
            for m in explained.maps:
                check(m.aligned.ndim == 2 and np.isfinite(m.aligned).all(),
                      f"map {m.method}/{m.side} is not a finite 2-D array")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for explained in result.explanations:
                explained.save_overlay(out / f"explain_{explained.index}.png")
        done("explain")

        step("health_after")
        check(health_status(target) == "SERVING", "health is not SERVING after the calls")
        done("health_after")

    print(f"[smoke] ok: {len(photos)} images imported, top match {top.subject_id} "
          f"(cosine {match.hits[0].cosine:.3f}), {len(result.explanations)} explained matches",
          flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--read-token", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        timings = run(args.target, args.admin_token, args.read_token, args.out)
    except SmokeFailure as failure:
        print(f"[smoke] FAILED: {failure}", file=sys.stderr)
        return 1
    for name, seconds in timings.items():
        print(f"[smoke] {name:15s} {seconds:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
