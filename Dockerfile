# syntax=docker/dockerfile:1
# One image for all four services and the operations CLI. The command picks what runs:
#   docker run dealstream capture|pipeline|notify|reporting   a service
#   docker run dealstream migrate                              apply the schema migrations
#   docker run dealstream token issue --role ops --user me     any other `dealstream` command
# Infrastructure comes from DEALSTREAM_* variables (shared/settings.py), business rules from
# the dealstream.toml at DEALSTREAM_CONFIG_FILE (SPEC defaults while there is none).

ARG PYTHON_IMAGE=python:3.11-slim

# Build: the project and its pinned dependencies into a virtual environment (no dev extras).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install .

# Runtime: the same slim Python with only the virtual environment, run as an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 dealstream \
    && useradd --system --uid 10001 --gid dealstream --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin dealstream
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEALSTREAM_HTTP_HOST=0.0.0.0 \
    DEALSTREAM_CONFIG_FILE=/etc/dealstream/dealstream.toml
# The working directory belongs to root and stays unwritable: a container started without
# DEALSTREAM_TOKEN_SECRET fails at once instead of inventing a secret of its own there.
WORKDIR /app
USER 10001:10001
# capture, pipeline, notify, reporting (their DEALSTREAM_<service>_PORT defaults).
EXPOSE 8001 8002 8003 8004
# DEALSTREAM_SERVICE names the service this container runs; its port is the one the settings
# give it (its DEALSTREAM_..._PORT, or the default). Orchestrators use their own probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; from shared.settings import Settings; \
service = os.environ.get('DEALSTREAM_SERVICE') or sys.exit('set DEALSTREAM_SERVICE'); \
urllib.request.urlopen('http://127.0.0.1:%d/healthz' % getattr(Settings(), service + '_port'), \
timeout=4)"]
ENTRYPOINT ["dealstream"]
CMD ["--help"]
