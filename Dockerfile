# kiln: serve an exported model over HTTP. Install steps mirror the Makefile's (`make install`).
# Build:  docker build -t kiln .            (exports the default digits model at build time)
# Run:    docker run -p 8000:8000 kiln
# Own artifacts: docker run -p 8000:8000 -v $PWD/artifacts/minilm:/artifacts:ro kiln
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --create-home --home-dir /home/kiln kiln

WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY kiln ./kiln
COPY core ./core
COPY models ./models
COPY export ./export
COPY bench ./bench
COPY serve ./serve

# The same steps as the Makefile: a virtual environment, then `pip install` of this project.
RUN python3.11 -m venv /opt/kiln/.venv \
    && /opt/kiln/.venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/kiln/.venv/bin/python -m pip install --quiet .

ENV PATH="/opt/kiln/.venv/bin:${PATH}"

# Export the default model at build time; mount another artifact folder over /artifacts to serve it instead.
RUN kiln export digits --out /artifacts && chown -R 10001:10001 /artifacts

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]

# 0.0.0.0 is explicit here: inside a container the port must be reachable from outside it.
CMD ["kiln", "serve", "/artifacts", "--host", "0.0.0.0", "--port", "8000"]
