"""``make demo``: a PhenoLens server on loopback, driven by the Python client.

IDENTITY DEMO, NOT SYNDROMES: the bundled photos are of ordinary people; each
person is used as a "syndrome" label so that matching and explanations can be
shown on real faces. Nothing here says anything about genetic syndromes.

Steps: start ``phenolens serve`` as a subprocess on a free loopback port with a
fresh gallery and throwaway tokens; import the bundled photos through the
client (ImportGallery); match two held-out photos; explain the top 3 with maps
on both faces; write overlays, ``summary.md``, ``summary.json`` and the match
report of the first query (``report.html``, ``Client.report``) into
``demo-output/``; stop the server with SIGTERM (graceful shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import phenolens
from phenolens import GalleryRecord, ImportItem

from encoder.assets import PHOTOS, REPO_ROOT
from explain.defaults import DEFAULT_METHODS

QUERIES = ("person_a_2.jpg", "person_b_2.jpg")
METHODS = DEFAULT_METHODS  # contrast first: what differs; then what pulls together
DISCLAIMER = ("This is an identity demo, not a syndrome demo: the bundled photos show "
              "ordinary people, and each person's name stands in for a syndrome label.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(address: str, process: subprocess.Popen, timeout: float) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} while starting")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the server did not report SERVING within {timeout:g} s")


def run(out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    (out / "overlays").mkdir(parents=True)
    work = out / "server"
    work.mkdir()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    admin_token, read_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    config = {
        "listen": address,
        "gallery": {"path": str(work / "demo-gallery.sqlite")},
        "auth": {"tokens": [{"name": "demo-admin", "scopes": ["admin"], "token": admin_token},
                            {"name": "demo-reader", "scopes": ["read"], "token": read_token}]},
        "log": {"level": "INFO"},
    }
    (work / "demo.yaml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    log_file = open(work / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(work / "demo.yaml")],
        cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary: dict = {"disclaimer": DISCLAIMER, "server": {"address": address}}
    try:
        summary["server"]["start_to_serving_s"] = round(
            _wait_until_serving(address, process, timeout=180), 2)
        print(f"server SERVING on {address}")
        with phenolens.Client(address, token=admin_token) as admin:
            gallery = [p for p in PHOTOS if p.faces == 1 and p.name not in QUERIES]
            items = [ImportItem(GalleryRecord("", image_id=p.name, subject_id=p.person,
                                              syndrome_id=p.person,
                                              syndrome_name=p.person.replace("_", " "),
                                              source=p.source),
                                image=p.path, aligned=p.aligned) for p in gallery]
            t0 = time.monotonic()
            imported = admin.import_gallery(items)
            summary["gallery"] = {"images": imported.added + imported.unchanged,
                                  "import_s": round(time.monotonic() - t0, 2),
                                  "labels": sorted({p.person for p in gallery})}
            print(f"imported {imported.added} photos through ImportGallery")
        with phenolens.Client(address, token=read_token) as client:
            info = client.server_info()
            summary["server"].update(encoder_id=info.encoder_id, view_scheme=info.view_scheme,
                                     gallery_version=info.gallery_version)
            summary["queries"] = [_query(client, name, out) for name in QUERIES]
            query = next(p.path for p in PHOTOS if p.name == QUERIES[0])
            client.report(query, out / "report.html", top_k=3, title="identity demo")
            summary["report"] = "report.html"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            summary["server"]["exit_code"] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            summary["server"]["exit_code"] = process.wait()
        log_file.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _query(client: phenolens.Client, name: str, out: Path) -> dict:
    path = next(p.path for p in PHOTOS if p.name == name)
    t0 = time.monotonic()
    match = client.match(path, top_k=5)
    match_s = time.monotonic() - t0
    t0 = time.monotonic()
    explained = client.explain(path, top_k=3, methods=METHODS, photo_maps=True)
    explain_s = time.monotonic() - t0
    stem = Path(name).stem
    matches = []
    for e in explained.explanations:
        files = {}
        for method in METHODS:
            pair = e.save_overlay(out / "overlays" / f"{stem}_top{e.hit.rank}_{method}.png",
                                  method, "both")
            files[method] = str(pair.relative_to(out))
        photo = e.save_overlay(out / "overlays" / f"{stem}_top{e.hit.rank}_photo.png",
                               METHODS[0], "query", coords="photo")
        files["photo"] = str(photo.relative_to(out))
        matches.append({"rank": e.hit.rank, "image_id": e.hit.record.image_id,
                        "label": e.hit.syndrome_id, "cosine": round(e.hit.cosine, 4),
                        "residual": float(f"{e.residual:.2e}"), "overlays": files})
    return {
        "query": name,
        "true_label": next(p.person for p in PHOTOS if p.name == name),
        "match_s": round(match_s, 3), "explain_top3_s": round(explain_s, 3),
        "hits": [{"rank": h.rank, "image_id": h.record.image_id, "label": h.syndrome_id,
                  "cosine": round(h.cosine, 4)} for h in match.hits],
        "label_ranking": [{"rank": s.rank, "label": s.syndrome_id, "cosine": round(s.cosine, 4)}
                          for s in match.syndromes],
        "explained": matches,
    }


def _markdown(summary: dict) -> str:
    s = summary["server"]
    lines = [
        "# PhenoLens demo", "",
        f"> **{DISCLAIMER}**", "",
        f"Server: `{s['address']}`, encoder `{s.get('encoder_id')}`, view scheme "
        f"`{s.get('view_scheme')}`, SERVING {s.get('start_to_serving_s')} s after start, "
        f"exit code after SIGTERM: {s.get('exit_code')}.", "",
    ]
    if summary.get("report"):
        lines += [f"Match report of `{QUERIES[0]}`: [{summary['report']}]({summary['report']}) "
                  "(one self-contained HTML page; each person is a one-subject \"syndrome\" "
                  "here, so the page explains why confidence is not calibrated).", ""]
    g = summary.get("gallery", {})
    lines += [f"Gallery: {g.get('images')} photos imported through the client in "
              f"{g.get('import_s')} s; labels: {', '.join(g.get('labels', []))}.", ""]
    for q in summary.get("queries", []):
        lines += [f"## Query `{q['query']}` (true label: {q['true_label']})", "",
                  f"Match {q['match_s']} s, explain of the top 3 {q['explain_top3_s']} s.", "",
                  "| rank | gallery photo | label | cosine |", "|---|---|---|---|"]
        lines += [f"| {h['rank']} | {h['image_id']} | {h['label']} | {h['cosine']:+.4f} |"
                  for h in q["hits"]]
        lines += ["", "Explained matches (red: regions that make the faces similar, blue: "
                  "regions that make them differ; query left, gallery right):", ""]
        for m in q["explained"]:
            lines.append(f"- top {m['rank']} `{m['image_id']}` cosine {m['cosine']:+.4f}, "
                         f"sum-rule residual {m['residual']:.1e}: "
                         + ", ".join(f"[{k}]({v})" for k, v in m["overlays"].items()))
        lines.append("")
    lines += ["Call it from your own script:", "", "```python",
              "from phenolens import Client",
              "with Client('127.0.0.1:50051', token='...') as pl:",
              "    result = pl.explain('face.jpg', top_k=3)",
              "    result.explanations[0].save_overlay('top1.png')", "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo-output")
    args = parser.parse_args(argv)
    print(DISCLAIMER)
    summary = run(args.out)
    for q in summary["queries"]:
        top = q["hits"][0]
        print(f"{q['query']}: top match {top['image_id']} ({top['label']}, cosine "
              f"{top['cosine']:+.3f}); true label {q['true_label']}")
    print(f"wrote {args.out / 'summary.md'}, {args.out / 'summary.json'} and "
          f"{len(list((args.out / 'overlays').glob('*.png')))} overlays")
    return 0 if summary["server"].get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
