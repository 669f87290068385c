# syntax=docker/dockerfile:1
# segs-stream container: `docker build -t segs-stream .`
#   docker run --rm -p 3002:3002 -e KAFKA_BROKERS=… -e POSTGRES_URL=… segs-stream        (run)
#   docker run --rm segs-stream simulate --rate 2000 --meters 1000                       (simulator)

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a wheel of the project, installed with its dependencies into a venv ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A C compiler for the decoder's native fast path (segs/intake/_fastscan.c); only in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The venv lives at its final path: its scripts carry absolute shebangs.
RUN python -m venv /opt/segs-stream/.venv \
 && /opt/segs-stream/.venv/bin/pip install --upgrade pip setuptools wheel
# Dependencies first (a layer that survives source edits), then the project itself.
COPY pyproject.toml setup.py README.md* ./
RUN test -f README.md || echo "# segs-stream" > README.md
COPY segs ./segs
COPY cli ./cli
COPY schema ./schema
RUN /opt/segs-stream/.venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/segs-stream/.venv/bin/pip install /wheels/*.whl \
 && /opt/segs-stream/.venv/bin/segs-stream --help > /dev/null \
 && /opt/segs-stream/.venv/bin/python -c "import segs.intake._fastscan"

# --- final: the venv on a clean slim image, run as an unprivileged user ---------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="segs-stream" \
      org.opencontainers.image.description="Smart-meter telemetry processor: Kafka -> 1m/15m aggregates in TimescaleDB, anomaly alerts" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 segs \
 && useradd --system --uid 10001 --gid segs --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin segs
COPY --from=builder /opt/segs-stream/.venv /opt/segs-stream/.venv
ENV PATH=/opt/segs-stream/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    HOST=0.0.0.0 \
    PORT=3002
WORKDIR /opt/segs-stream
USER segs:segs
EXPOSE 3002
# slim has no curl: probe /health with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3002'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]
# SIGTERM (docker stop) starts the orderly shutdown; give it more than SHUTDOWN_TIMEOUT:
# `docker stop -t 45` / compose `stop_grace_period: 45s`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["segs-stream"]
CMD ["run"]
