# One image for every Relais process: `relais serve intake|referral|notifications`, `relais migrate SERVICE`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

WORKDIR /app

# Dependencies first, pinned by the lock file, so code changes reuse this layer.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY . ./
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --system --create-home --uid 10001 --user-group relais \
    && mkdir -p /data \
    && chown relais:relais /data \
    && chmod 700 /data

USER relais
# Data dir of a process, this user's only (a secret key is generated here only in the demo, RELAIS_DEMO=true).
ENV RELAIS_DATA_DIR=/data \
    RELAIS_HOST=0.0.0.0
EXPOSE 8001 8002 8003

ENTRYPOINT ["relais"]
CMD ["--help"]
