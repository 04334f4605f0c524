# syntax=docker/dockerfile:1
#
# micro-sidecar as a container: the companion of an app container in the same
# pod (Kubernetes) or network namespace (docker compose `network_mode:
# service:<app>`). Configure it with flags after the image name or with the
# MICRO_SIDECAR_* environment variables, e.g.
#   docker run -e MICRO_SIDECAR_APP_PORT=3000 -e MICRO_SIDECAR_NAME=greeter micro-sidecar
#
# Stage 1 builds a wheel of this repo and of its dependencies and installs
# them into a venv; stage 2 copies only that venv onto a clean slim image.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml setup.cfg ./
COPY sidecar/ ./sidecar/
# README.md is the package's long description; it may be absent in a trimmed
# build context, and setuptools then builds without it.
COPY README.m[d] ./

# Wheels only from the local build: the venv gets exactly the versions that
# `pip wheel` resolved, with no second trip to the index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python -m venv /opt/micro-sidecar \
    && /opt/micro-sidecar/bin/pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl \
    && /opt/micro-sidecar/bin/micro-sidecar --help > /dev/null


FROM python:3.11-slim

LABEL org.opencontainers.image.title="micro-sidecar" \
      org.opencontainers.image.description="A per-service sidecar proxy: registry, health checks and HTTP forwarding for apps in any language" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

COPY --from=build /opt/micro-sidecar /opt/micro-sidecar

# Inbound listens on every interface of the pod/namespace so the mesh can
# reach it; outbound and admin stay on loopback (shared with the app
# container). Set MICRO_SIDECAR_ADMIN_HOST=0.0.0.0 where kubelet probes admin.
ENV PATH="/opt/micro-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MICRO_SIDECAR_INBOUND_HOST=0.0.0.0 \
    MICRO_SIDECAR_INBOUND_PORT=15006 \
    MICRO_SIDECAR_OUTBOUND_PORT=15001 \
    MICRO_SIDECAR_ADMIN_PORT=15020

USER 10001:10001

EXPOSE 15006

# /live answers while the process runs its event loop; readiness (/ready) is
# the orchestrator's business, not a reason to restart the container.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/micro-sidecar/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/live' % os.environ.get('MICRO_SIDECAR_ADMIN_PORT', '15020'), timeout=2)"]

# The sidecar drains on SIGTERM (registry -> critical, propagation delay,
# in-flight requests finish) before it exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["micro-sidecar"]
