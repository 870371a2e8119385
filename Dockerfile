# One image for every eglo process: `eglo worker` (default), `eglo embedder`, `eglo migrate`,
# `eglo emulator`. Build from the repository root:  docker build -t eglo:dev .
# With podman or buildah add --format docker: the default OCI format drops HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: compilers and pip live here only ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Wheels exist for every dependency on linux/amd64 and arm64; the toolchain is the fallback for a
# platform where pip has to build one from source. Unpinned: it never reaches the final image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# Same path as in the final stage: a venv's scripts hard-code their interpreter's path.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, from the lock alone, so a code-only change reuses this layer: exact
# versions with their hashes (`make lock` writes it from pyproject.toml), so two builds a week
# apart install the same files. Runtime dependencies only (matplotlib included: the API draws
# runs); the demo extra (the embedded Postgres) stays out of the image.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock

# Then the code, installed as a regular (non-editable) package: the final image needs no source.
# pip check: the lock covers every dependency pyproject.toml declares.
COPY . .
RUN pip install --no-deps . \
    && pip check \
    && eglo --help > /dev/null

# ---- runtime: the venv and nothing else -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric UID lets Kubernetes' runAsNonRoot verify the user without a name lookup.
RUN groupadd --system --gid 10001 eglo \
    && useradd --system --uid 10001 --gid eglo --home-dir /home/eglo --create-home \
       --shell /usr/sbin/nologin eglo

COPY --from=builder /opt/venv /opt/venv

# The image has no embedded Postgres (demo extra): EGLO_DATABASE_URL must be set. EGLO_DATA_DIR
# (demo and chaos logs) must be writable by the eglo user.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EGLO_METRICS_HOST=0.0.0.0 \
    EGLO_METRICS_PORT=9108 \
    EGLO_DATA_DIR=/home/eglo/.eglo

WORKDIR /home/eglo
USER 10001:10001

EXPOSE 9108

# slim has no curl; the venv's Python does the probe. The port follows EGLO_METRICS_PORT when a
# deployment overrides it. start-period covers connecting to the broker and database, which
# happens before the metrics server starts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('EGLO_METRICS_PORT') or '9108'; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % port, timeout=4).status == 200 else 1)"]

ENTRYPOINT ["eglo"]
CMD ["worker"]
