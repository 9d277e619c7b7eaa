#!/usr/bin/env bash
# `make container-test`: build the PhenoLens image with buildah, start the server
# from it, and drive it from the host through the client (import the demo
# gallery, match, explain, health), then stop and remove the container.
#
# Needs root and buildah (installed by ../shared/container/make-base-image.sh
# when missing); anywhere else it skips with a message and exit status 0.
#
# Environment:
#   PHENOLENS_IMAGE        tag to build (default phenolens:container-test)
#   PHENOLENS_BASE_SCRIPT  base-image script (default /work/shared/container/make-base-image.sh)
#   PHENOLENS_WHEELS       folder with the CPU torch 2.13.0 wheel, mounted into the build
#                          (default: pip's find-links when it holds one; else the build
#                          downloads torch from download.pytorch.org/whl/cpu)
#   PHENOLENS_SERVE_TIMEOUT  seconds to wait for SERVING (default 300)
#   PHENOLENS_NO_CACHE=1   build without buildah's layer cache (a cold build; default: use it)
#   KEEP_IMAGE=0           remove the image afterwards (default: keep it)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
IMAGE=${PHENOLENS_IMAGE:-phenolens:container-test}
BASE_SCRIPT=${PHENOLENS_BASE_SCRIPT:-/work/shared/container/make-base-image.sh}
SERVE_TIMEOUT=${PHENOLENS_SERVE_TIMEOUT:-300}
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}

skip() { echo "container-test: SKIPPED: $*"; exit 0; }
log() { echo "container-test: $*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# -- can this machine build and run the image? ---------------------------------
[ "$(id -u)" = 0 ] || skip "needs root for buildah (chroot isolation); run as root"
[ -x "$HOST_PY" ] || skip "no host virtual environment at $HOST_PY (run make setup)"
if ! buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null \
        | grep -qx 'docker.io/library/debian:bookworm-slim'; then
    [ -f "$BASE_SCRIPT" ] || skip "no buildah base image and no $BASE_SCRIPT to make one"
    log "making the base image debian:bookworm-slim with $BASE_SCRIPT"
    if ! bash "$BASE_SCRIPT"; then
        command -v buildah >/dev/null && buildah info >/dev/null 2>&1 \
            || skip "buildah cannot be installed or used here"
        echo "container-test: FAILED: $BASE_SCRIPT could not make the base image" >&2
        exit 1
    fi
fi
buildah info >/dev/null 2>&1 || skip "buildah is installed but cannot be used here"

WORK=$(mktemp -d /tmp/phenolens-container-test.XXXXXX)
CONTAINER=""
REPLICA=""
ROOTFS=""
SERVER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${ROOTFS:-}" ] && buildah umount "$CONTAINER" >/dev/null 2>&1 || true
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        sleep 2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    [ -n "$CONTAINER" ] && buildah rm "$CONTAINER" >/dev/null 2>&1 || true
    [ -n "$REPLICA" ] && buildah rm "$REPLICA" >/dev/null 2>&1 || true
    if [ "${KEEP_IMAGE:-1}" = 0 ]; then buildah rmi "$IMAGE" >/dev/null 2>&1 || true; fi
    if [ "$rc" != 0 ] && [ -f "$WORK/server.log" ]; then
        echo "---- server log (last 40 lines) ----" >&2
        tail -40 "$WORK/server.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# -- build ----------------------------------------------------------------------
build_args=(--pull-never --isolation chroot --format docker --layers --force-rm -t "$IMAGE"
            --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
            --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
wheels=${PHENOLENS_WHEELS:-$("$HOST_PY" -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$wheels" ] && ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    log "torch 2.13.0 CPU from the local wheel folder $wheels (mounted into the build)"
    build_args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels --build-arg TORCH_INDEX=)
fi
# networks that intercept TLS: give pip inside the build the host's trust store
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    build_args+=(-v /etc/ssl/certs:/host-certs:ro
                 --build-arg PIP_CA_BUNDLE=/host-certs/ca-certificates.crt)
fi
[ "${PHENOLENS_NO_CACHE:-0}" = 1 ] && build_args+=(--no-cache)
old_id=$(buildah images -q "$IMAGE" 2>/dev/null || true)
log "building $IMAGE (log: $WORK/build.log)"
t0=$(now)
if ! buildah bud "${build_args[@]}" . >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    echo "container-test: FAILED: the image did not build" >&2
    exit 1
fi
BUILD_S=$(elapsed "$t0" "$(now)")
new_id=$(buildah images -q "$IMAGE")
log "built in ${BUILD_S} s"

# -- what the image declares ----------------------------------------------------
"$HOST_PY" - "$IMAGE" <<'EOF'
import json, subprocess, sys
cfg = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", sys.argv[1]],
                                check=True, capture_output=True, text=True).stdout)
docker = cfg.get("Docker", {}).get("config", {})
oci = cfg.get("OCIv1", {}).get("config", {})
problems = []
if (oci.get("User") or docker.get("User") or "0").split(":")[0] in ("", "0", "root"):
    problems.append("runs as root")
if "50051/tcp" not in (oci.get("ExposedPorts") or {}):
    problems.append("does not expose 50051")
if not (docker.get("Healthcheck") or {}).get("Test"):
    problems.append("has no HEALTHCHECK (build with --format docker)")
if "/var/lib/phenolens" not in (oci.get("Volumes") or {}):
    problems.append("declares no /var/lib/phenolens volume")
if not (oci.get("Labels") or {}).get("org.opencontainers.image.title"):
    problems.append("has no OCI labels")
if problems:
    sys.exit("container-test: FAILED: the image " + ", ".join(problems))
print("container-test: image config: user", oci.get("User"), "| healthcheck",
      docker["Healthcheck"]["Test"][1:])
EOF

# -- start the server from the image -------------------------------------------
PORT=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADMIN_TOKEN=$("$HOST_PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
READ_TOKEN=$("$HOST_PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
mkdir -p "$WORK/volume"
chown 10001:10001 "$WORK/volume"
# The image's VOLUME is dropped from the working containers' config: buildah 1.28
# then mounts -v onto /var/lib/phenolens deterministically (with it kept, its own
# anonymous volume and the bind mount race, and a replica's restore lands in
# either one about half the time).
CONTAINER=$(buildah from --pull-never --name "phenolens-ct-$$" "$IMAGE")
buildah config --volume /var/lib/phenolens- "$CONTAINER"
ROOTFS=$(buildah mount "$CONTAINER")
touch "$WORK/rootfs-marker"
sleep 1
# `buildah run --isolation chroot` shares the host network: 127.0.0.1:$PORT is the server.
t0=$(now)
buildah run --isolation chroot \
    -v "$WORK/volume:/var/lib/phenolens" \
    -e "PHENOLENS_LISTEN=127.0.0.1:$PORT" \
    -e "PHENOLENS_AUTH__TOKENS=[{name: smoke-admin, scopes: [read, admin], token: $ADMIN_TOKEN}, {name: smoke-read, scopes: [read], token: $READ_TOKEN}]" \
    "$CONTAINER" -- phenolens serve --config /etc/phenolens/phenolens.yaml \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
log "server starting in $CONTAINER on 127.0.0.1:$PORT"
until "$HOST_PY" deploy/healthcheck.py "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "container-test: FAILED: the server exited before SERVING" >&2
        exit 1
    fi
    if [ "$(elapsed "$t0" "$(now)" | cut -d. -f1)" -ge "$SERVE_TIMEOUT" ]; then
        echo "container-test: FAILED: not SERVING after ${SERVE_TIMEOUT} s" >&2
        exit 1
    fi
    sleep 0.5
done
SERVING_S=$(elapsed "$t0" "$(now)")
log "SERVING after ${SERVING_S} s"

# the image's own HEALTHCHECK command, run inside the container
buildah run --isolation chroot -e "PHENOLENS_LISTEN=127.0.0.1:$PORT" "$CONTAINER" -- \
    python /usr/local/bin/phenolens-healthcheck \
    || { echo "container-test: FAILED: the image's HEALTHCHECK command" >&2; exit 1; }
uid=$(buildah run --isolation chroot "$CONTAINER" -- id -u)
[ "$uid" = 10001 ] || { echo "container-test: FAILED: runs as uid $uid" >&2; exit 1; }

# -- drive it from the host ------------------------------------------------------
"$HOST_PY" tests/container/smoke.py --target "127.0.0.1:$PORT" \
    --admin-token "$ADMIN_TOKEN" --read-token "$READ_TOKEN" --out "$WORK/overlays"
ls "$WORK/volume"/gallery.sqlite >/dev/null \
    || { echo "container-test: FAILED: the gallery is not on the volume" >&2; exit 1; }

# -- replicas: publish a snapshot of the live gallery, restore it as a replica would --
mkdir -p "$WORK/replica"
chown 10001:10001 "$WORK/replica"
buildah run --isolation chroot -v "$WORK/volume:/var/lib/phenolens" "$CONTAINER" -- \
    phenolens-snapshot publish /var/lib/phenolens/gallery.sqlite /var/lib/phenolens/snapshots
# the replica is its own container, as in Kubernetes (deploy/k8s/deployment.yaml)
REPLICA=$(buildah from --pull-never --name "phenolens-ct-replica-$$" "$IMAGE")
buildah config --volume /var/lib/phenolens- "$REPLICA"
buildah run --isolation chroot -v "$WORK/replica:/var/lib/phenolens" \
    -v "$WORK/volume/snapshots:/snapshots:ro" "$REPLICA" -- \
    phenolens-snapshot restore /snapshots /var/lib/phenolens/gallery.sqlite
buildah rm "$REPLICA" >/dev/null
REPLICA=""
count='import sqlite3, sys; print(sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True).execute("SELECT COUNT(*) FROM records").fetchone()[0])'
live=$("$HOST_PY" -c "$count" "$WORK/volume/gallery.sqlite") \
    || { ls -la "$WORK/volume" >&2; echo "container-test: FAILED: cannot read the live gallery" >&2; exit 1; }
copy=$("$HOST_PY" -c "$count" "$WORK/replica/gallery.sqlite") \
    || { ls -la "$WORK/replica" >&2; echo "container-test: FAILED: cannot read the restored snapshot" >&2; exit 1; }
[ "$live" = "$copy" ] && [ "$copy" -gt 0 ] \
    || { echo "container-test: FAILED: snapshot holds $copy records, live gallery $live" >&2; exit 1; }
log "snapshot published and restored: $copy records"

# -- graceful stop ---------------------------------------------------------------
# SIGTERM goes to the server process itself, as `docker stop` sends it to PID 1
# (`buildah run` does not forward it; it kills its child).
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
server_proc=""
for p in $(descendants "$SERVER_PID"); do
    case "$(cat "/proc/$p/comm" 2>/dev/null)" in phenolens|python*) server_proc=$p ;; esac
done
[ -n "$server_proc" ] || { echo "container-test: FAILED: no server process under $SERVER_PID" >&2; exit 1; }
t0=$(now)
kill -TERM "$server_proc"
for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "container-test: FAILED: the server did not stop within 30 s of SIGTERM" >&2
    exit 1
fi
wait "$SERVER_PID" 2>/dev/null && stop_rc=0 || stop_rc=$?
SERVER_PID=""
STOP_S=$(elapsed "$t0" "$(now)")
if [ "$stop_rc" != 0 ] || ! grep -q '"msg": "stopped"' "$WORK/server.log"; then
    tail -5 "$WORK/server.log" >&2
    echo "container-test: FAILED: no graceful stop on SIGTERM (exit status $stop_rc)" >&2
    exit 1
fi
log "stopped gracefully in ${STOP_S} s"

# -- a read-only root file system suffices: nothing written outside /tmp and the volume --
written=$(find "$ROOTFS" -xdev -mindepth 1 -newer "$WORK/rootfs-marker" 2>/dev/null | sed "s#^$ROOTFS##" \
    | grep -Ev '^(/tmp|/run|/var/lib/phenolens)(/|$)' || true)
if [ -n "$written" ]; then
    echo "$written" | head -20 >&2
    echo "container-test: FAILED: the server wrote to the root file system (above)" >&2
    exit 1
fi
log "root file system untouched outside /tmp and /var/lib/phenolens (read-only root works)"
buildah umount "$CONTAINER" >/dev/null
ROOTFS=""
buildah rm "$CONTAINER" >/dev/null
CONTAINER=""

# the image this build replaced (its layers stay cached for the next build)
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then buildah rmi "$old_id" >/dev/null 2>&1 || true; fi
SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
echo
echo "container-test: PASSED"
printf '  %-22s %s\n' image "$IMAGE" "image size" "$SIZE" "build time" "${BUILD_S} s" \
    "start -> SERVING" "${SERVING_S} s" "SIGTERM -> stopped" "${STOP_S} s"
