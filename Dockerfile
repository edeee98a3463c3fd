# syntax=docker/dockerfile:1
# Sluice gateway image. The same image runs the simulator:
#   docker run sluice:local sluice simulate --host 0.0.0.0 --port 9000
# See docs/deployment.md.

# --- build: install the project and its dependencies into a venv ----------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# README.md is the package's long description (pyproject.toml: readme).
COPY pyproject.toml README.md ./
COPY service ./service
RUN /opt/venv/bin/pip install .

# --- run: the venv alone, as an unprivileged user --------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8000
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
# /health answers 200 while serving and 503 while draining after SIGTERM, so a
# draining replica turns unhealthy at once. No curl in slim: python's urllib
# (urlopen raises on 503, which exits 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SLUICE_PORT', '8000'), timeout=2)"]
# SIGTERM starts the drain (--drain-timeout, default 10 s): give the container
# longer than that to stop (compose: stop_grace_period; docker run --stop-timeout).
STOPSIGNAL SIGTERM
CMD ["sluice", "serve", "--host", "0.0.0.0"]
