# One image for every Relais process: `relais serve intake|referral|notifications`, `relais migrate SERVICE`.
# With a registry: `docker build -t relais .` (BASE_IMAGE: the official slim Python image, packages from PyPI).
# Without one: `./dev images` builds relais-python:bookworm from Debian packages and a wheelhouse on the host
# (deploy/wheelhouse), then this file with BASE_IMAGE=relais-python:bookworm PIP_INSTALL_FLAGS=--no-index.
# Only Relais's runtime dependencies are installed (pyproject's, at requirements.lock's versions): no test tools.
ARG BASE_IMAGE=python:3.11-slim

# The runtime dependencies' names, from pyproject.toml: a stage of its own, so that an edit of pyproject.toml that
# leaves them as they are (tool settings, test extras) does not install them all again below.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    >runtime.txt

FROM ${BASE_IMAGE} AS build
ARG PIP_INSTALL_FLAGS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, so code changes reuse this layer. /wheels holds the wheelhouse when there is one (else only a
# README, and pip uses the index).
COPY requirements.lock ./
COPY --from=requirements /src/runtime.txt ./
COPY deploy/wheelhouse/ /wheels/
RUN python3 -m venv /opt/relais \
    && /opt/relais/bin/pip install $PIP_INSTALL_FLAGS --find-links /wheels -c requirements.lock -r runtime.txt
COPY . ./
RUN /opt/relais/bin/pip install $PIP_INSTALL_FLAGS --find-links /wheels --no-deps . \
    && /opt/relais/bin/pip uninstall -y pip

FROM ${BASE_IMAGE}
COPY --from=build /opt/relais /opt/relais
RUN useradd --system --no-create-home --home-dir /data --uid 10001 --user-group relais \
    && mkdir -p /data \
    && chown relais:relais /data \
    && chmod 700 /data
USER relais
# Data dir of a process, this user's only (a secret key is generated here only in the demo, RELAIS_DEMO=true). The
# root filesystem can be read-only: nothing else is written but /tmp (mount a tmpfs there).
ENV PATH=/opt/relais/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAIS_DATA_DIR=/data \
    RELAIS_HOST=0.0.0.0
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8001 8002 8003

ENTRYPOINT ["relais"]
CMD ["--help"]
