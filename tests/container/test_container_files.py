"""Cheap checks of the container and deployment files (no image build here).

The build itself runs in `make container-test` (tests/container/run.sh). These
pin what an operator relies on: the CPU torch pin, a non-root user, the port,
the health check, labels, the volume, and Kubernetes/compose files that parse
and wire probes, volumes, secrets and selectors together.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import shutil
import sqlite3
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "k8s"
RUNTIME_PACKAGES = ("encoder", "gallery", "explain", "server", "client/phenolens")
# import name of each distribution the Dockerfile may leave out of the image
IMPORT_NAMES = {
    "pytest": "pytest", "pytest-timeout": "pytest_timeout", "iniconfig": "iniconfig",
    "pluggy": "pluggy", "pygments": "pygments", "ruff": "ruff",
    "grad-cam": "pytorch_grad_cam", "ttach": "ttach", "grpcio-tools": "grpc_tools",
    "hypothesis": "hypothesis", "sortedcontainers": "sortedcontainers",
}
# development tools that may import what the image leaves out
DEV_MODULES = {"server/protogen.py"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


healthcheck = _load("phenolens_healthcheck", REPO / "deploy" / "healthcheck.py")
snapshot = _load("phenolens_gallery_snapshot", REPO / "deploy" / "gallery_snapshot.py")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _args() -> dict[str, str]:
    return {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') if "=" in rest else ""
            for word, rest in _instructions() if word == "ARG"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s(kind: str) -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


# -- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_debian_bookworm_slim():
    froms = [rest.split() for word, rest in _instructions() if word == "FROM"]
    stages = {f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert len(froms) >= 2
    assert froms[0][0] == froms[-1][0] == "debian:bookworm-slim"
    assert all(f[0] == "debian:bookworm-slim" or f[0] in stages for f in froms)
    copies = [rest for word, rest in _final_stage() if word == "COPY"]
    assert any(c.startswith("--from=") and c.endswith("/opt/venv /opt/venv") for c in copies)
    assert any(c.startswith("--from=") and c.endswith("/opt/phenolens /opt/phenolens")
               for c in copies)


def test_dockerfile_pins_torch_2_13_0_cpu_by_default():
    args = _args()
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX"] == "auto"
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert "download.pytorch.org/whl/$TORCH_VARIANT" in runs
    assert '"torch==$TORCH_VERSION"' in runs
    # the torch check (version and CPU/CUDA build) runs before and after the other requirements
    assert "torch.version.cuda" in runs
    assert runs.count('python -W ignore -c "$check_torch"') == 2
    assert runs.index('"$check_torch"') < runs.index("-r /tmp/requirements.txt") < runs.rindex(
        '"$check_torch"')
    assert "torch" not in args["DEV_ONLY"].split()


def test_dockerfile_installs_the_repository_requirement_files():
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert "requirements.txt" in runs and "requirements-nodeps.txt" in runs
    assert "--no-deps -r /tmp/requirements-nodeps.txt" in runs
    assert re.search(r"pip install -q --no-deps .*/src/client /src;", runs)
    assert "python -m encoder.assets fetch" in runs


def test_packages_left_out_of_the_image_are_real_requirements():
    pinned = set()
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (REPO / name).read_text().splitlines():
            if "==" in line and not line.lstrip().startswith("#"):
                pinned.add(line.split("==")[0].strip().lower())
    left_out = _args()["DEV_ONLY"].split()
    assert set(left_out) <= pinned
    assert set(left_out) <= set(IMPORT_NAMES)


def test_runtime_code_never_imports_packages_left_out_of_the_image():
    banned = {IMPORT_NAMES[d] for d in _args()["DEV_ONLY"].split()}
    offenders = []
    for package in RUNTIME_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in DEV_MODULES:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in banned]
    assert not offenders, "imported at run time but left out of the image: " + ", ".join(offenders)


def test_runtime_stage_runs_as_a_numeric_non_root_user():
    users = [rest for word, rest in _final_stage() if word == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes runAsNonRoot can verify it


def test_runtime_stage_exposes_the_grpc_port_volume_and_health_check():
    final = _final_stage()
    assert ("EXPOSE", "50051") in final
    volumes = " ".join(rest for word, rest in final if word == "VOLUME")
    assert "/var/lib/phenolens" in volumes
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "/usr/local/bin/phenolens-healthcheck" in checks[0]
    copies = [rest for word, rest in final if word == "COPY"]
    assert "deploy/healthcheck.py /usr/local/bin/phenolens-healthcheck" in copies
    assert "grpc_health.v1" in (REPO / "deploy" / "healthcheck.py").read_text()
    cmd = [rest for word, rest in final if word == "CMD"][-1]
    assert '"serve"' in cmd and "/etc/phenolens/phenolens.yaml" in cmd


@pytest.mark.parametrize("tool", ["healthcheck.py", "gallery_snapshot.py"])
def test_operator_tools_are_executable_python_scripts(tool):
    path = REPO / "deploy" / tool
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert path.stat().st_mode & 0o111  # COPY keeps the mode: runnable by name in the image


def test_default_container_config_listens_on_all_interfaces_and_keeps_the_gallery_on_the_volume():
    from server.config import load_config

    config = load_config(REPO / "deploy" / "phenolens.yaml", env={})
    assert config.listen == "0.0.0.0:50051"
    assert str(config.gallery.path).startswith("/var/lib/phenolens/")


def test_runtime_stage_has_oci_labels():
    labels = " ".join(rest for word, rest in _final_stage() if word == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_files_the_dockerfile_copies_are_not_excluded_by_dockerignore():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(rel: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            parts = rel.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
            if hit:
                result = not negate
        return result

    for rel in (".venv/bin/python", "data/models/x.onnx", ".git/HEAD", "tests/conftest.py"):
        assert ignored(rel), rel
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                if src != ".":
                    assert (REPO / src).exists(), src
                    assert not ignored(src), f"{src} is copied but excluded by .dockerignore"
    for rel in ("encoder/assets.py", "server/cli.py", "client/pyproject.toml", "pyproject.toml"):
        assert not ignored(rel), rel


# -- health check and snapshots ------------------------------------------------------------


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_healthcheck_passes_only_while_the_server_reports_serving(health_server):
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([target, "--timeout", "3"]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([target, "--timeout", "3"]) == 1


def test_healthcheck_fails_when_nothing_listens():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck.main([f"127.0.0.1:{port}", "--timeout", "1"]) == 1


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_healthcheck_speaks_tls_to_a_tls_only_port(tmp_path):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=phenolens-test-ca", cwd=tmp_path)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=tmp_path)
    (tmp_path / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.cnf",
             cwd=tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((tmp_path / "server.key").read_bytes(), (tmp_path / "server.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        assert healthcheck.main([target, "--timeout", "3"]) == 1  # plain text is refused
        assert healthcheck.main([target, "--timeout", "3", "--ca", str(tmp_path / "ca.pem")]) == 0
    finally:
        server.stop(None)


def test_healthcheck_targets_the_port_of_phenolens_listen():
    assert healthcheck.default_target({"PHENOLENS_LISTEN": "0.0.0.0:6000"}) == "127.0.0.1:6000"
    assert healthcheck.default_target({}) == "127.0.0.1:50051"


def _gallery_with(path: Path, people: list[str]):
    from gallery import Entry, Gallery

    g = Gallery.open(path, encoder_id="test-encoder", view_scheme="test:orig")
    rng = np.random.default_rng(0)
    g.add_many([Entry(image_id=p, subject_id=p, syndrome_id=p, syndrome_name=p,
                      views=rng.standard_normal((1, 8)).astype(np.float32)) for p in people])
    return g


def test_published_snapshot_restores_to_a_gallery_a_replica_can_search(tmp_path):
    from gallery import Gallery

    live = _gallery_with(tmp_path / "writer" / "gallery.sqlite", ["a", "b", "c"])
    first = snapshot.publish(live.path, tmp_path / "snapshots")
    live.add_many([__import__("gallery").Entry(
        image_id="d", subject_id="d", syndrome_id="d", syndrome_name="d",
        views=np.ones((1, 8), np.float32))])
    second = snapshot.publish(live.path, tmp_path / "snapshots", keep=1)
    live.close()
    assert not first.exists()  # pruned by keep=1
    assert (tmp_path / "snapshots" / "current").resolve() == second

    target = tmp_path / "replica" / "gallery.sqlite"
    assert snapshot.restore(tmp_path / "snapshots", target) == second
    replica = Gallery.open(target, encoder_id="test-encoder", view_scheme="test:orig")
    try:
        assert len(replica) == 4
        assert replica.search(np.ones((1, 8), np.float32), k=1)[0].image_id == "d"
    finally:
        replica.close()


def test_restored_snapshot_brings_its_faiss_index_and_needs_no_rebuild(tmp_path, caplog):
    from gallery import Gallery

    live = _gallery_with(tmp_path / "writer" / "gallery.sqlite", ["a", "b"])
    live.close()  # the index sidecar is saved at the gallery's version
    sidecars = sorted(p.name for p in live.path.parent.glob("gallery.sqlite.faiss*"))
    assert sidecars
    snapshot.publish(live.path, tmp_path / "snapshots")
    target = tmp_path / "replica" / "gallery.sqlite"
    snapshot.restore(tmp_path / "snapshots", target)
    assert sorted(p.name for p in target.parent.glob("gallery.sqlite.faiss*")) == sidecars
    caplog.set_level("INFO", logger="gallery")
    replica = Gallery.open(target, encoder_id="test-encoder", view_scheme="test:orig")
    replica.close()
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]


def test_snapshot_is_a_single_file_without_a_write_ahead_log(tmp_path):
    live = _gallery_with(tmp_path / "gallery.sqlite", ["a"])
    published = snapshot.publish(live.path, tmp_path / "snapshots")
    live.close()
    assert sorted(p.name for p in published.iterdir() if "-wal" in p.name or "-shm" in p.name) == []
    mode = sqlite3.connect(published / "gallery.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "delete"


def test_restore_without_a_published_snapshot_says_what_to_do(tmp_path):
    with pytest.raises(snapshot.SnapshotError, match="publish"):
        snapshot.restore(tmp_path / "empty", tmp_path / "gallery.sqlite")


# -- compose -------------------------------------------------------------------------------


def test_compose_runs_the_service_with_a_named_gallery_volume_and_health_check():
    compose = _docs(REPO / "deploy" / "compose.yaml")[0]
    service = compose["services"]["phenolens"]
    assert "gallery:/var/lib/phenolens" in service["volumes"]
    assert "gallery" in compose["volumes"]
    assert service["healthcheck"]["test"][-1] == "/usr/local/bin/phenolens-healthcheck"
    assert any(str(p).endswith(":50051") for p in service["ports"])
    assert service["build"]["context"] == ".."
    assert service["read_only"] is True


# -- Kubernetes ----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("name", ["phenolens", "phenolens-writer"])
def test_deployment_has_grpc_probes_limits_and_a_locked_down_container(name):
    deployment = next(d for d in _k8s("Deployment") if d["metadata"]["name"] == name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]
    server = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051, probe
    assert {"containerPort": 50051, "name": "grpc"} in server["ports"]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert "/var/lib/phenolens" in mounts and "/tmp" in mounts
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts.values()) <= volumes


def test_tokens_come_from_the_secret_and_only_the_writer_accepts_the_admin_token():
    def env(name):
        d = next(d for d in _k8s("Deployment") if d["metadata"]["name"] == name)
        return {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}

    writer, replica = env("phenolens-writer"), env("phenolens")
    assert writer["ADMIN_TOKEN_SHA256"]["valueFrom"]["secretKeyRef"]["name"] == "phenolens-auth"
    assert "ADMIN_TOKEN_SHA256" not in replica
    for tokens in (writer["PHENOLENS_AUTH__TOKENS"]["value"],
                   replica["PHENOLENS_AUTH__TOKENS"]["value"]):
        parsed = yaml.safe_load(tokens)
        assert all(t["sha256"].startswith("$(") for t in parsed)  # never a literal
    assert {s for t in yaml.safe_load(replica["PHENOLENS_AUTH__TOKENS"]["value"])
            for s in t["scopes"]} == {"read"}


def test_gallery_claims_exist_and_the_writer_owns_the_read_write_one():
    claims = {c["metadata"]["name"]: c for c in _k8s("PersistentVolumeClaim")}
    assert claims["phenolens-gallery"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    writer = next(d for d in _k8s("Deployment") if d["metadata"]["name"] == "phenolens-writer")
    assert writer["spec"]["replicas"] == 1
    assert writer["spec"]["strategy"]["type"] == "Recreate"
    used = {v["persistentVolumeClaim"]["claimName"]
            for d in _k8s("Deployment") for v in d["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v}
    assert used == set(claims)


def test_services_select_the_pods_of_a_deployment():
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in _k8s("Deployment")]
    for service in _k8s("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods), service["metadata"]
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
