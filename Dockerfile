# chatglm-bot on CPU PyTorch: `chatglm-bot serve` by default; any other command as the arguments
# (`docker run IMAGE api --host 0.0.0.0`, `... doctor`, `... chat`).
FROM python:3.11-slim

# g++ builds the native int4 kernel once, at the first start (without it PyTorch's slower int4 path runs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# The CPU wheel first, from PyTorch's index: PyPI's torch for x86-64 is the multi-GB CUDA build. The
# project pins torch==2.13.0, which 2.13.0+cpu satisfies, so the install below keeps it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md LICENSE ./
COPY bot ./bot
COPY adapters ./adapters
COPY storage ./storage
RUN pip install .

RUN useradd --create-home --uid 10001 chatglm \
    && mkdir /data \
    && chown chatglm /data
USER chatglm

# SQLite history (the default BOT_DATABASE_URL) and the compiled int4 kernel persist in the volume.
# The kernel is deliberately not built here (no `RUN chatglm-bot build-kernel`): it is compiled with
# -march=native, so a build during `docker build` would target the build machine's CPU, not the one
# the container runs on (its cache key holds the CPU flags, so another CPU would compile again anyway),
# and a build under /data/cache would be hidden by any bind-mounted or existing volume. The first
# container start compiles it once (a few minutes) into the volume; later starts only load it. To do
# that ahead of the first `serve` on the target machine: `docker run -v DATA:/data IMAGE build-kernel`
# (or `docker compose run --rm api build-kernel`).
# Inside a container the servers must listen on every interface to be reachable.
ENV BOT_DATA_DIR=/data \
    XDG_CACHE_HOME=/data/cache \
    BOT_HTTP_HOST=0.0.0.0 \
    BOT_API_HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 8080 8000

ENTRYPOINT ["chatglm-bot"]
CMD ["serve"]
