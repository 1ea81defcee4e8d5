"""Benchmark TorrentFlow against raw libtorrent, all on 127.0.0.1.

One run measures, side by side:

1. Download throughput: the daemon (a subprocess, torrent added by upload, progress
   polled through GET) against raw libtorrent, also in a process of its own, with
   the daemon's own settings ("raw") and tuned as ANCHORS.md's lt-tuned ("tuned":
   high_performance_seed, hashing_threads=2, aio_threads=4, default disk backend),
   all fetching from one loopback seeder in this process over TCP, in alternating
   runs. MB/s runs from the add to "every piece verified"; the seeder's peer
   counters split that into the wait for the first byte and the transfer. The file
   is checked with sha1 twice: at that moment (libtorrent may still be writing it)
   and after a graceful stop. --contenders also offers raw-default-disk and
   tuned-pread, to tell settings from disk backends, and --try races the daemon's
   settings plus any you name. One more daemon run polls GET /health every 10 ms:
   its slowest answer is the longest event-loop stall during a download.
2. Status API: req/s, p50 and p99 of GET /torrents/{infohash} and GET /torrents
   with 1, 1000 (and, with --counts, 10000) torrents loaded, via wrk when it is
   installed, else a bounded aiohttp load generator. The daemon has an API token
   here, and every request carries its Authorization: Bearer header. GET
   /torrents/{infohash} is measured again right after the daemon, with the same tool,
   against "the aiohttp floor": a bare aiohttp app in a child process (the same
   Python and the daemon's choice of loop, uvloop if it imports, else asyncio's) that
   serves at the same route the exact bytes and Content-Type the daemon answered,
   fetched from the daemon first, to the same request headers; the TF/floor column
   is the daemon's req/s divided by the floor's, what is left to the daemon's own
   work. With --anchors transmission, a transmission-daemon holding the same
   torrents answers the same requests as torrent-get POSTs (40 fields), each right
   after the daemon's (and the floor's), and the table shows TorrentFlow's req/s
   divided by Transmission's.
3. Memory: VmRSS of the idle daemon, empty and with each count; KiB per torrent.
4. Restart: with the torrents saved, the time from process start until GET /health
   answers and until GET /torrents lists them all.

Sections 1 to 4 are "download" and "api" in --sections; six more follow, each
named after its --sections name:

5. library: N torrents of 64 KiB (one file, 16 KiB pieces) whose data is already
   there, N being each count of --counts above 1: seconds from the last add until
   GET /torrents?fields=state shows every one seeding; then SIGKILL and a new start,
   timed from spawn until all seed again; and a fresh daemon killed the moment its
   last add answers, while its torrents still check. The same for raw libtorrent
   (the daemon's settings, torrents not auto-managed, a process of its own, which
   saves its own resume data before it is killed) and, with --anchors
   transmission, for transmission-daemon, which verifies the data it finds (its
   waits are cut off after --library-anchor-limit seconds).
6. many: --many-torrents downloads of --many-size-mib each, every torrent from its
   own seeder session (all of them in one child process), added together; MB/s of
   all bytes until every torrent is verified and flushed, the daemon against raw
   libtorrent (its settings, in a child, the seeders given as peers), alternating
   --runs times, with GET /health probed every 10 ms during the daemon's runs.
7. memory: RSS, PSS and USS (/proc/PID/smaps_rollup) of the daemon empty and with
   each count of idle torrents, the same torrents in raw libtorrent, and the steps
   from a bare python3 to an empty daemon: where the memory goes.
8. listing: GET /health p50/p99/max, probed every 10 ms, while --listing-clients
   clients fetch GET /torrents over --listing-torrents torrents.
9. bulk: PUT /torrents/pause, then /resume, over --bulk-torrents torrents (10,001 by
   default), with GET /health probed every 10 ms; and the alerts libtorrent dropped.
10. stream: GET /torrents/{infohash}/files/0 of a --stream-size-mib file (the daemon
    has a token), with GET /health probed every 10 ms: read whole from the moment of
    the add while it downloads from an unlimited seeder (MB/s, first byte); then
    --stream-seeks reads of 1 MiB at fixed pseudo-random offsets of a second torrent
    held to --stream-rate-mb MB/s (time to the first byte after each seek, and to the
    whole MiB); then the first file again, whole, from disk (MB/s).

--quick measures, in under a minute (about 40 s on 2 cores), the two ratios to
watch while changing the daemon, and ends with one line:

    quick: download X.XXx raw, status X.XXx aiohttp floor (N req/s)

download: the median MB/s of the daemon divided by raw libtorrent's (the daemon's
settings, section 1's "raw") on a 128 MiB torrent, alternating runs, 2 each and then
up to --runs (5) while they fit in 25 s, every file's sha1 checked when reported
complete and after the stop. status: GET /torrents/{infohash} with 1 torrent, the
daemon's median req/s divided by the aiohttp floor's, 3 alternating rounds of 3 s
(wrk, else the Python generator, which on 2 cores limits both); N is the daemon's
median req/s. It exits 0 whatever the figures (a measurement, not a test), and 1
only if a downloaded file's sha1 did not match. It writes JSON only with --out.

Run it beside torrentflow.py:

    python bench_torrentflow.py --quick              # two ratios, under a minute
    python bench_torrentflow.py                      # every section, about 4 minutes
    python bench_torrentflow.py --sections download,api   # sections 1 to 4 only
    python bench_torrentflow.py --size-mib 128 --duration 2 --counts 1,100
    python bench_torrentflow.py --counts 1,1000,10000 --out bench.json
    python bench_torrentflow.py --sections api --anchors transmission
    python bench_torrentflow.py --sections library,many,memory,listing \
        --counts 1000,10000 --anchors transmission --many-contenders \
        daemon,raw,daemon-unqueued,raw-queued

Every peer listens on 127.0.0.1 with DHT, LSD, UPnP and NAT-PMP off and uTP off.
The benchmark only starts and stops processes it started, and removes its temp dir.
MB means 10**6 bytes; KiB and MiB mean 1024 and 1024**2.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import aiohttp
import libtorrent as lt
from aiohttp import web


# --------------------------------------------------------------------------- #
# Constants
# --------------------------------------------------------------------------- #

#: Every peer the benchmark runs itself: loopback only, no discovery, TCP only.
LOOPBACK_SETTINGS = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": "",
    "enable_outgoing_utp": False,
    "enable_incoming_utp": False,
    "allow_multiple_connections_per_ip": True,
    "stop_tracker_timeout": 0,
}
#: The seeder: libtorrent's defaults otherwise, as in ANCHORS.md.
SEEDER_SETTINGS = {**LOOPBACK_SETTINGS, "alert_mask": 0}
#: ANCHORS.md's lt-tuned, a fixed reference that does not follow torrentflow.py:
#: high_performance_seed(), uTP off, hashing_threads=2, aio_threads=4.
TUNED_SETTINGS = {**lt.high_performance_seed(), **LOOPBACK_SETTINGS,
                  "hashing_threads": 2, "aio_threads": 4, "alert_queue_size": 10000}
PREAD = "pread_disk_io_constructor"
#: Raw libtorrent downloaders: name -> (settings, or None for the daemon's own
#: settings, and the disk I/O backend, None being libtorrent's default: mmap on
#: 64-bit Linux). "raw" is the daemon's exact setup; --try adds "raw+try".
RAW_CONTENDERS = {
    "raw": (None, PREAD),
    "raw-default-disk": (None, None),
    "tuned": (TUNED_SETTINGS, None),
    "tuned-pread": (TUNED_SETTINGS, PREAD),
}
#: How often a download's progress and GET /health are polled.
POLL_INTERVAL = 0.01
#: A download slower than this (MB/s) counts as hung and is abandoned.
MIN_RATE = 5e6
#: Daemon start-up, loading and shutdown must finish within this many seconds.
PROCESS_DEADLINE = 120.0
#: Tiny torrents: one file of this many bytes, a single piece.
TINY_SIZE = 4096
#: Upper bound on requests made by the Python load generator in one measurement.
MAX_PYTHON_REQUESTS = 2_000_000
#: wrk prints one JSON line through this Lua hook (latency figures are in microseconds).
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
#: The status loads measured: name, which request ("one" torrent or "all"), and the
#: connections (None: --connections). "all, 1 connection": one full listing alone.
STATUS_SCENARIOS = (("one", "one", None), ("all", "all", None),
                    ("all, 1 connection", "all", 1), ("metrics, 1 connection", "metrics", 1))
#: Same-run peers that --anchors can start: name -> (program, how to install it).
ANCHOR_PROGRAMS = {"transmission": ("transmission-daemon",
                                    "apt-get install -y transmission-daemon")}
#: Anchors' names in the table's ratio columns, which are 10 characters wide.
ANCHOR_SHORT_NAMES = {"transmission": "Transm", "floor": "floor"}
#: Anchors' names in the table's server column, where they differ from the JSON's.
ANCHOR_LABELS = {"floor": "aiohttp floor"}
#: The figures of one status load, as the table's columns (see _load_cells).
LOAD_COLUMNS = ("req/s", "p50 ms", "p99 ms", "max ms", "errors", "body KiB")
#: The torrent-get fields asked of Transmission: 40, as in ANCHORS.md, picked to match
#: TorrentFlow's status fields (identity, state, progress, rates, counters, peers,
#: sizes, dates, times, queue, path and the .torrent's metadata).
TRANSMISSION_FIELDS = (
    "id", "hashString", "name", "status", "error", "errorString", "percentDone",
    "rateDownload", "rateUpload", "downloadedEver", "uploadedEver", "corruptEver",
    "peersConnected", "peersSendingToUs", "peersGettingFromUs", "sizeWhenDone",
    "leftUntilDone", "haveValid", "haveUnchecked", "totalSize", "pieceCount", "pieceSize",
    "addedDate", "doneDate", "activityDate", "startDate", "secondsDownloading",
    "secondsSeeding", "queuePosition", "downloadDir", "isFinished", "isStalled",
    "metadataPercentComplete", "recheckProgress", "eta", "uploadRatio", "desiredAvailable",
    "dateCreated", "creator", "comment",
)
#: Transmission's CSRF token: a 409 answer hands it out, every request must carry it.
TRANSMISSION_SESSION_HEADER = "X-Transmission-Session-Id"
#: First argument of the benchmark re-run as a raw libtorrent downloader (raw_child).
RAW_CHILD = "--raw-child"
#: First arguments of the other child modes (see CHILDREN).
LIBRARY_CHILD = "--library-child"
MANY_CHILD = "--many-child"
SEEDERS_CHILD = "--seeders-child"
LOAD_CHILD = "--load-child"
FLOOR_CHILD = "--floor-child"
#: The sections, in the order they run.
SECTIONS = ("download", "api", "library", "many", "memory", "listing", "bulk", "stream")
#: library: one torrent's data (one file) and its piece size.
LIBRARY_SIZE = 64 * 1024
LIBRARY_PIECE = 16 * 1024
#: library: (most torrents, seconds from the last add until all seed) from the issue.
LIBRARY_TARGETS = ((1000, 5.0), (10000, 60.0))
#: many: the contenders. The daemon with its defaults (libtorrent's queue runs 3
#: downloads at once) or with --max-active-downloads -1; raw libtorrent with the
#: daemon's settings, its torrents out of the queue (all download at once) or in it.
MANY_CONTENDERS = {
    "daemon": ("daemon", ()),
    "daemon-unqueued": ("daemon", ("--max-active-downloads", "-1")),
    "raw": ("raw", False),
    "raw-queued": ("raw", True),
}
#: many: the daemon must reach this fraction of raw's throughput.
MANY_TARGET_RATIO = 0.9
#: GET /health p99 under load must stay under this many milliseconds.
HEALTH_TARGET_MS = 50.0
#: memory: targets for 1,000 idle torrents.
MEMORY_TARGET_RSS_MIB = 70.0
MEMORY_TARGET_KIB_PER_TORRENT = 14.0
#: Transmission's torrent status codes (tr_torrent_activity), by number.
TRANSMISSION_STATUSES = ("stopped", "check-wait", "check", "download-wait", "download",
                         "seed-wait", "seed")
#: library: an anchor whose torrents neither seed nor check, with none more seeding for
#: this many seconds, will not get there by itself.
STALL_SECONDS = 10.0
#: --quick: the download's MiB and alternating runs per contender (daemon and raw),
#: the seconds of each status load, and the alternating status rounds (daemon, then
#: the aiohttp floor). About 40 s in all on 2 cores; it must stay under 60 s.
QUICK_SIZE_MIB = 128
QUICK_RUNS = 5
QUICK_DURATION = 3.0
QUICK_STATUS_ROUNDS = 3
#: --quick: the download race runs QUICK_MIN_RUNS rounds, then more (up to --runs)
#: only while they fit in QUICK_DOWNLOAD_BUDGET seconds, so that a slow machine
#: trades runs, not the minute.
QUICK_MIN_RUNS = 2
QUICK_DOWNLOAD_BUDGET = 25.0
#: stream: the bytes each seek reads, and the seed of the seeks' offsets (the same
#: offsets every run, so that runs compare).
STREAM_SEEK_BYTES = 1024 * 1024
STREAM_SEEK_SEED = 19
MB = 1e6
MIB = 1024 * 1024


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

def parse_args(argv=None):
    """The benchmark's options; sizes and counts are flags, defaults take a few minutes."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(
        description="Benchmark TorrentFlow's downloads, status API, memory and restart "
        "against raw libtorrent, all on 127.0.0.1.")
    parser.add_argument("--daemon", type=Path, default=here / "torrentflow.py",
                        help="torrentflow.py to benchmark (default: the one beside this file)")
    parser.add_argument("--quick", action="store_true",
                        help=f"within a minute: the daemon against raw libtorrent on a "
                        f"{QUICK_SIZE_MIB} MiB download ({QUICK_MIN_RUNS} to --runs "
                        f"alternating runs each, as many as fit in "
                        f"{QUICK_DOWNLOAD_BUDGET:g} s) "
                        "and GET /torrents/{infohash} with 1 torrent against the aiohttp "
                        "floor; ends with one 'quick: ...' line. --sections, --contenders "
                        "and --counts do not apply; no JSON unless --out is given")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"any of {', '.join(SECTIONS)} (api includes its own VmRSS "
                        "and restart figures); default: all of them")
    parser.add_argument("--size-mib", type=int, default=None,
                        help=f"download payload in MiB (default 1024; {QUICK_SIZE_MIB} "
                        "with --quick)")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"alternating download runs per contender (default 3; "
                        f"{QUICK_RUNS} with --quick)")
    parser.add_argument("--contenders", default="daemon,raw,tuned",
                        help="download contenders: daemon, then any of "
                        f"{', '.join(RAW_CONTENDERS)} (default %(default)s)")
    parser.add_argument("--try", dest="try_settings", type=json.loads, default=None,
                        metavar="JSON", help="also race contender raw+try: the daemon's "
                        "settings and disk backend plus these, e.g. '{\"tick_interval\": 100}'")
    parser.add_argument("--counts", default="1,1000",
                        help="torrent counts for the API, memory and restart figures; "
                        "library and memory use the counts above 1; add 10000 for the "
                        "large library (default %(default)s)")
    parser.add_argument("--restart-min", type=int, default=1000,
                        help="measure restart for counts at least this big (default %(default)s)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds per load measurement (default 5; {QUICK_DURATION:g} "
                        "with --quick)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent connections for the load (default %(default)s)")
    parser.add_argument("--add-concurrency", type=int, default=16,
                        help="parallel POST /torrents while loading (default %(default)s)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="idle seconds before reading RSS (default %(default)s)")
    parser.add_argument("--anchors", default="",
                        help="same-run peers for the status API, started beside the daemon "
                        f"with the same torrents: any of {', '.join(ANCHOR_PROGRAMS)} "
                        "(default: none)")
    parser.add_argument("--library-anchor-limit", type=float, default=180.0,
                        help="library: seconds an anchor gets to check its torrents, "
                        "each time, before its count so far is taken (default %(default)s)")
    parser.add_argument("--many-torrents", type=int, default=20,
                        help="many: torrents downloading together, each from its own "
                        "seeder (default %(default)s)")
    parser.add_argument("--many-size-mib", type=int, default=32,
                        help="many: MiB per torrent (default %(default)s)")
    parser.add_argument("--many-contenders", default="daemon,raw",
                        help="many: any of " + ", ".join(MANY_CONTENDERS)
                        + " (default %(default)s)")
    parser.add_argument("--bulk-torrents", type=int, default=10_001,
                        help="bulk: torrents paused and resumed at once (default 10001)")
    parser.add_argument("--listing-torrents", type=int, default=2000,
                        help="listing: torrents loaded (default %(default)s)")
    parser.add_argument("--listing-clients", type=int, default=200,
                        help="listing: concurrent GET /torrents clients (default %(default)s)")
    parser.add_argument("--listing-duration", type=float, default=10.0,
                        help="listing: seconds of load (default %(default)s)")
    parser.add_argument("--listing-nice", type=int, default=19,
                        help="listing: niceness of the load generator, so that on a small "
                        "machine it takes the CPU the daemon leaves, as clients on other "
                        "machines would; 0 to let them compete (default %(default)s)")
    parser.add_argument("--stream-size-mib", type=int, default=256,
                        help="stream: MiB of each streamed file (default %(default)s)")
    parser.add_argument("--stream-rate-mb", type=float, default=4.0,
                        help="stream: MB/s the seeker's seeder sends (default %(default)s)")
    parser.add_argument("--stream-seeks", type=int, default=6,
                        help="stream: seeks of the second file (default %(default)s)")
    parser.add_argument("--no-wrk", action="store_true",
                        help="use the Python load generator even when wrk is installed")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON results (default "
                        "bench_torrentflow.json; none with --quick)")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="parent of the temp dir (default: the system's)")
    args = parser.parse_args(argv)
    for name, full, quick in (("size_mib", 1024, QUICK_SIZE_MIB), ("runs", 3, QUICK_RUNS),
                              ("duration", 5.0, QUICK_DURATION)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.out is None and not args.quick:
        args.out = Path("bench_torrentflow.json")
    if args.quick:
        if args.try_settings is not None:
            parser.error("--quick races the daemon against raw only: no --try")
        args.contenders = "daemon,raw"
    args.sections = _choices(parser, "--sections", args.sections, SECTIONS)
    args.many_contenders = _choices(parser, "--many-contenders", args.many_contenders,
                                    tuple(MANY_CONTENDERS))
    args.contenders = _choices(parser, "--contenders", args.contenders,
                               ("daemon", *RAW_CONTENDERS))
    args.anchors = (_choices(parser, "--anchors", args.anchors, tuple(ANCHOR_PROGRAMS))
                    if args.anchors else [])
    if args.try_settings is not None:
        if not isinstance(args.try_settings, dict):
            parser.error("--try takes a JSON object of libtorrent settings")
        args.contenders.append("raw+try")
    try:
        args.counts = [int(count) for count in args.counts.split(",")]
    except ValueError:
        parser.error("--counts takes comma-separated integers")
    if not args.daemon.is_file():
        parser.error(f"--daemon {args.daemon} does not exist")
    if args.size_mib < 1 or args.runs < 1 or min(args.counts) < 1 or args.duration <= 0:
        parser.error("--size-mib, --runs, --duration and every count must be positive")
    if min(args.many_torrents, args.many_size_mib, args.listing_torrents,
           args.listing_clients) < 1 or args.listing_duration <= 0:
        parser.error("the --many-* and --listing-* figures must be positive")
    if args.stream_size_mib < 32 or args.stream_rate_mb <= 0 or args.stream_seeks < 1:
        parser.error("--stream-size-mib must be at least 32, --stream-rate-mb and "
                     "--stream-seeks positive")
    return args


def _choices(parser, option, text, allowed):
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in chosen if item not in allowed]
    if bad or not chosen:
        parser.error(f"{option} takes a comma-separated subset of {', '.join(allowed)}")
    return chosen


def main(argv=None):
    """Run the chosen sections, print the table and write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RAW_CHILD]:
        return raw_child(argv[1])
    if argv[:1] and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](argv[1])
    started = time.perf_counter()
    args = parse_args(argv)
    torrentflow = import_daemon(args.daemon)
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-", dir=args.tmp))
    try:
        results = asyncio.run((run_quick if args.quick else run_benchmark)(
            args, torrentflow, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.quick:
        results["seconds"] = round(time.perf_counter() - started, 1)
    print(render_quick(results) if args.quick else render_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nJSON written to {args.out}")
    if args.quick:
        return quick_verdict(results)
    return 0


def import_daemon(path):
    """Import the torrentflow.py under test, for its settings: "raw" is then like-for-like."""
    spec = importlib.util.spec_from_file_location("torrentflow", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["torrentflow"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def run_benchmark(args, torrentflow, workdir):
    """Every section in order, with a CPU probe before and after to show machine drift."""
    results = {"machine": machine_info(), "args": _jsonable(vars(args)),
               "daemon_sha1": sha1_file(args.daemon),
               "cpu_probe_before_mb_s": cpu_probe()}
    if "download" in args.sections:
        results["download"] = await bench_downloads(args, torrentflow, workdir / "download")
    if {"api", "library"} & set(args.sections):
        args.anchors, results["anchors"] = available_anchors(args.anchors)
    if "api" in args.sections:
        results["api"] = [await bench_library_beside_anchors(args, count,
                                                             workdir / f"api-{count}")
                          for count in args.counts]
    if "library" in args.sections:
        results["library"] = [await bench_present_library(args, torrentflow, count,
                                                          workdir / f"library-{count}")
                              for count in scale_counts(args)]
    if "many" in args.sections:
        results["many"] = await bench_many(args, torrentflow, workdir / "many")
    if "memory" in args.sections:
        results["memory"] = await bench_memory(args, torrentflow, workdir / "memory")
    if "listing" in args.sections:
        results["listing"] = await bench_listing(args, workdir / "listing")
    if "bulk" in args.sections:
        results["bulk"] = await bench_bulk(args, workdir / "bulk")
    if "stream" in args.sections:
        results["stream"] = await bench_stream(args, workdir / "stream")
    results["cpu_probe_after_mb_s"] = cpu_probe()
    return results



# --------------------------------------------------------------------------- #
# --quick: download against raw, status against the aiohttp floor
# --------------------------------------------------------------------------- #

async def run_quick(args, torrentflow, workdir):
    """--quick: the download race (daemon and raw, --size-mib, --runs alternating
    runs, sha1 checked at done and after stop, no probe run), then the status race."""
    progress(f"quick: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
             f"load tool {load_tool(args)}")
    results = {"quick": True, "machine": machine_info(), "args": _jsonable(vars(args)),
               "daemon_sha1": sha1_file(args.daemon)}
    results["download"] = await bench_downloads(args, torrentflow, workdir / "download",
                                                probe_run=False,
                                                budget=QUICK_DOWNLOAD_BUDGET)
    results["status"] = await quick_status(args, workdir / "status")
    return results


async def quick_status(args, root):
    """GET /torrents/{infohash} with 1 torrent: the daemon (with a token) against the
    aiohttp floor serving its answer, QUICK_STATUS_ROUNDS alternating rounds of
    --duration seconds each, daemon first; ratio = median daemon req/s / median floor's.
    """
    tool = load_tool(args)
    runs = {"daemon": [], "floor": []}
    async with aiohttp.ClientSession() as client, \
            Daemon(args.daemon, root / "daemon", token=True) as daemon:
        await daemon.start(client)
        infohash = await api_add(client, daemon.url, library_torrents(1)[0], daemon.headers)
        await poll_until(lambda: listed(client, daemon.url, 1, daemon.headers),
                         PROCESS_DEADLINE, "the torrent to be listed")
        request = daemon_requests(daemon.url, infohash, daemon.headers)["one"]
        async with AiohttpFloor(client, request, root / "floor") as floor:
            requests = {"daemon": request, "floor": floor.status_requests(infohash)["one"]}
            for round_ in range(QUICK_STATUS_ROUNDS):
                for name, which in requests.items():
                    figures = await measure_request(args, tool, client, which, "one",
                                                    args.connections)
                    runs[name].append(figures)
                    progress(f"status round {round_ + 1} {name}: {_load_summary(figures)}")
        await daemon.stop()
    medians = {name: statistics.median(f["req_s"] for f in figures)
               for name, figures in runs.items()}
    return {"request": "GET /torrents/{infohash}, 1 torrent", "tool": tool,
            "connections": args.connections, "duration_s": args.duration,
            "rounds": QUICK_STATUS_ROUNDS, "runs": runs, "floor": floor.facts,
            "daemon_req_s": medians["daemon"], "floor_req_s": medians["floor"],
            "ratio_to_floor": (round(medians["daemon"] / medians["floor"], 3)
                               if medians["floor"] else None)}


def quick_line(results):
    """The line --quick ends with."""
    contenders = results["download"]["contenders"]
    download = contenders["daemon"]["median_mb_s"] / contenders["raw"]["median_mb_s"]
    status = results["status"]
    floor = status["daemon_req_s"] / status["floor_req_s"] if status["floor_req_s"] else 0
    return (f"quick: download {download:.2f}x raw, status {floor:.2f}x aiohttp floor "
            f"({status['daemon_req_s']:.0f} req/s)")


def quick_verdict(results):
    """--quick's exit status: 0 whatever the figures, 1 only if a downloaded file's
    sha1 did not match (when reported complete, or after the stop)."""
    bad = [f"{name} run {index + 1}" for name, runs in results["download"]["runs"].items()
           for index, run in enumerate(runs)
           if not (run["sha1_at_done"] and run["sha1_after_stop"])]
    if bad:
        progress(f"quick: sha1 MISMATCH in {', '.join(bad)}")
    print(quick_line(results), flush=True)
    return 1 if bad else 0


# --------------------------------------------------------------------------- #
# Section 1: download throughput
# --------------------------------------------------------------------------- #

async def bench_downloads(args, torrentflow, root, probe_run=True, budget=None):
    """Alternate the contenders, each downloading one payload from one seeder.

    The daemon's runs poll only its progress. One extra daemon run afterwards (unless
    probe_run is false) also polls GET /health every 10 ms, whose slowest answer
    shows the longest loop stall. budget: seconds; past QUICK_MIN_RUNS rounds, no
    round starts that would (at the pace of the rounds so far) end after it.
    """
    started = time.perf_counter()
    payload = make_payload(root / "source" / "payload.bin", args.size_mib * MIB)
    torrent = make_torrent(payload)
    seeder = Seeder().seed(torrent, payload.parent)
    runs = {name: [] for name in args.contenders}
    try:
        async with Tracker(seeder) as tracker, aiohttp.ClientSession() as client:
            race = DownloadRace(args, torrentflow, client, seeder, payload,
                                with_tracker(torrent, tracker.url), root)
            for run in range(args.runs):
                elapsed = time.perf_counter() - started
                if (budget is not None and run >= QUICK_MIN_RUNS
                        and elapsed * (run + 1) / run > budget):
                    progress(f"download: {run} runs each fill the {budget:g} s budget")
                    break
                shift = run % len(args.contenders)  # nobody always goes first
                for name in args.contenders[shift:] + args.contenders[:shift]:
                    runs[name].append(await race.run(name, f"run {run + 1}"))
            probed = None
            if "daemon" in runs and probe_run:
                probed = await race.run("daemon", "probe run", with_probe=True)
    finally:
        seeder.close()
        shutil.rmtree(payload.parent, ignore_errors=True)
    return summarise_downloads(args, runs, probed)


class DownloadRace:
    """Runs one download of the payload by one contender and checks the bytes."""

    def __init__(self, args, torrentflow, client, seeder, payload, torrent, root):
        self.args = args
        self.seeder = seeder
        self.torrentflow = torrentflow
        self.client = client
        self.payload = payload
        self.source_sha1 = sha1_file(payload)
        self.torrent = torrent
        self.root = root
        self.deadline = 30 + payload.stat().st_size / MIN_RATE

    def raw_setup(self, name):
        """(settings, disk backend) of a raw contender."""
        if name == "raw+try":
            return {**daemon_settings(self.torrentflow), **self.args.try_settings}, PREAD
        settings, backend = RAW_CONTENDERS[name]
        return settings or daemon_settings(self.torrentflow), backend

    async def run(self, name, label, with_probe=False):
        """Download with contender name; return the run's figures.

        with_probe: a daemon run also polls GET /health every 10 ms (see HealthProbe).
        """
        target = self.root / f"{name}-{label.replace(' ', '-')}"
        downloaded = target / "downloads" / self.payload.name

        probe = HealthProbe(self.client) if with_probe else None
        async with self.seeder.watching() as upload:
            if name == "daemon":
                started, seconds, cpu, at_done = await daemon_download(
                    self.client, self.args.daemon, self.torrent, target, downloaded,
                    self.deadline, self.source_sha1, probe)
            else:
                started, seconds, cpu, at_done = await raw_download(
                    *self.raw_setup(name), self.torrent, downloaded, self.deadline,
                    self.source_sha1)
        size = self.payload.stat().st_size
        result = {"seconds": round(seconds, 3), "mb_s": round(size / MB / seconds, 1),
                  "cpu_s": round(cpu, 2), **upload.phases(started, size),
                  "sha1_at_done": at_done,
                  "sha1_after_stop": sha1_file(downloaded) == self.source_sha1}
        if probe is not None:
            result["health"] = probe.summary()
        progress(f"download {label} {name}: {result['mb_s']:.0f} MB/s in {seconds:.2f} s "
                 f"(first byte {result['first_byte_s']} s, 99% sent "
                 f"{result['sent_99_s']} s), {cpu:.2f} CPU s, sha1 at done {_ok(at_done)}, "
                 f"after stop {_ok(result['sha1_after_stop'])}")
        shutil.rmtree(target, ignore_errors=True)
        os.sync()  # the next run should not pay for this one's writeback
        return result


async def daemon_download(client, script, torrent, root, downloaded, deadline, source_sha1,
                          probe=None):
    """Add by upload and poll GET until verified, check the file, then stop gracefully.

    Returns (start time, seconds, CPU seconds the daemon used meanwhile, whether the
    file matched when the API first reported it complete). A HealthProbe runs
    alongside if given.
    """
    async with Daemon(script, root) as daemon:
        await daemon.start(client)
        async with probe.watching(daemon.url) if probe else contextlib.nullcontext():
            # The "finished" event says when to look, as a script would wait: polling
            # GET every 10 ms costs the daemon a few per cent of a core that libtorrent
            # needs, where raw libtorrent's poll is an in-process call.
            async with client.get(f"{daemon.url}/events?types=finished") as events:
                cpu_before = daemon.cpu_seconds()
                started = time.perf_counter()
                infohash = await api_add(client, daemon.url, torrent)

                async def finished():
                    async with client.get(f"{daemon.url}/torrents/{infohash}") as response:
                        status = await response.json()
                    return status["progress"] == 100 and status["is_seeding"]

                await asyncio.wait_for(_event_for(events, infohash), deadline)
                await poll_until(finished, deadline, "the daemon's download")
                seconds = time.perf_counter() - started
            cpu = daemon.cpu_seconds() - cpu_before
        at_done = sha1_file(downloaded) == source_sha1
        await daemon.stop()
        return started, seconds, cpu, at_done


async def _event_for(events, infohash):
    """Read a Server-Sent Events stream until an event names infohash."""
    async for line in events.content:
        if line.startswith(b"data:") and infohash.encode() in line:
            return


async def raw_download(settings, backend, torrent, downloaded, deadline, source_sha1):
    """Download in a fresh libtorrent process (see raw_child), as the daemon does.

    A separate process, not this one: a downloader sharing the seeder's process ran
    about 15% faster than the same settings in a process of its own.
    Returns (start time, seconds, CPU seconds, whether the file matched when complete).
    """
    torrent_path = downloaded.parent.parent / "raw.torrent"
    torrent_path.parent.mkdir(parents=True, exist_ok=True)
    torrent_path.write_bytes(torrent)
    spec = {"settings": settings, "backend": backend, "torrent": str(torrent_path),
            "file": str(downloaded), "sha1": source_sha1, "deadline": deadline}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), RAW_CHILD, json.dumps(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(process.stdout.readline(), PROCESS_DEADLINE)  # "ready"
        started = time.perf_counter()
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), deadline + PROCESS_DEADLINE)
        if not line:
            raise RuntimeError(f"the raw downloader exited with {await process.wait()}")
        result = json.loads(line)
        await asyncio.wait_for(process.wait(), PROCESS_DEADLINE)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return started, result["seconds"], result["cpu_s"], result["sha1_at_done"]


def raw_child(spec_text):
    """Child mode: one download in a libtorrent session, started by a line on stdin.

    Prints "ready" once the session is up, then one JSON line with the seconds from
    the add until every piece was verified, the CPU seconds spent meanwhile, and
    whether the file already matched the source at that moment.
    """
    spec = json.loads(spec_text)
    params = lt.session_params(spec["settings"])
    if spec["backend"]:
        params.disk_io_constructor = spec["backend"]
    session = lt.session(params)
    # cache_flushed_alert, awaited below, is in the storage category.
    mask = session.get_settings()["alert_mask"] | int(lt.alert_category.storage)
    session.apply_settings({"alert_mask": mask})
    print("ready", flush=True)
    sys.stdin.readline()
    cpu_before = _stat_cpu_seconds(Path("/proc/self/stat"))
    started = time.perf_counter()
    add_params = lt.load_torrent_buffer(Path(spec["torrent"]).read_bytes())
    add_params.save_path = str(Path(spec["file"]).parent)
    # Started at once, as the daemon starts a download when its queue has room; added
    # paused, libtorrent's queue would start it at its next tick, up to a second later.
    add_params.flags &= ~lt.torrent_flags.paused
    handle = session.add_torrent(add_params)
    while not _is_complete(handle.status()):
        if time.perf_counter() - started > spec["deadline"]:
            raise TimeoutError("the raw download did not finish")
        time.sleep(POLL_INTERVAL)
    # The daemon calls a download complete only once its writes reached the file; so
    # must raw libtorrent, or the race compares different finish lines.
    handle.flush_cache()
    while not any(isinstance(alert, lt.cache_flushed_alert) for alert in session.pop_alerts()):
        if time.perf_counter() - started > spec["deadline"]:
            raise TimeoutError("the raw download's writes were not flushed")
        session.wait_for_alert(int(POLL_INTERVAL * 1000))
    seconds = time.perf_counter() - started
    cpu = _stat_cpu_seconds(Path("/proc/self/stat")) - cpu_before
    matched = sha1_file(spec["file"]) == spec["sha1"]
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "sha1_at_done": matched}), flush=True)
    session.apply_settings({"stop_tracker_timeout": 0})
    return 0


def _is_complete(status):
    """Every piece downloaded and verified: what the daemon reports as 100 and seeding."""
    return status.progress == 1 and status.is_seeding


def _stat_cpu_seconds(stat_path):
    """utime + stime from a /proc .../stat file, in seconds."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_settings(torrentflow):
    """The settings_pack the daemon builds for --local-only."""
    config = torrentflow.parse_config(
        ["--local-only", "--listen-interfaces", "127.0.0.1:0"], environ={})
    return torrentflow.session_settings(config)


def summarise_downloads(args, runs, probed):
    """Median, range and ratios of the download runs, and the probe run's stalls."""
    summary = {"size_mib": args.size_mib, "runs": runs, "contenders": {}}
    for name, results in runs.items():
        rates = [result["mb_s"] for result in results]
        summary["contenders"][name] = {
            "median_mb_s": statistics.median(rates), "min_mb_s": min(rates),
            "max_mb_s": max(rates),
            "median_cpu_s": round(statistics.median(r["cpu_s"] for r in results), 2),
            **_phase_medians(results, args.size_mib * MIB),
            "sha1_at_done": sum(bool(r["sha1_at_done"]) for r in results),
            "sha1_after_stop": sum(bool(r["sha1_after_stop"]) for r in results)}
    medians = {name: figures["median_mb_s"] for name, figures in summary["contenders"].items()}
    for name in medians:
        for baseline in ("raw", "tuned"):
            if baseline in medians:
                summary["contenders"][name][f"ratio_to_{baseline}"] = round(
                    medians[name] / medians[baseline], 3)
    if probed:
        summary["probe_run"] = probed
    return summary


def _phase_medians(results, size):
    """Median first-byte time and transfer rate (first byte to 99% sent), where known."""
    first = [r["first_byte_s"] for r in results if r["first_byte_s"] is not None]
    transfer = [0.99 * size / MB / (r["sent_99_s"] - r["first_byte_s"]) for r in results
                if r["first_byte_s"] is not None and r["sent_99_s"] is not None
                and r["sent_99_s"] > r["first_byte_s"]]
    return {"median_first_byte_s": round(statistics.median(first), 2) if first else None,
            "median_transfer_mb_s": round(statistics.median(transfer)) if transfer else None}


class HealthProbe:
    """GET /health every POLL_INTERVAL in the background; its latency shows loop stalls."""

    def __init__(self, client):
        self.client = client
        self.latencies = []

    @contextlib.asynccontextmanager
    async def watching(self, url):
        """Probe url's /health for as long as the block runs."""
        task = asyncio.create_task(self._run(f"{url}/health"))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, url):
        while len(self.latencies) < MAX_PYTHON_REQUESTS:
            started = time.perf_counter()
            async with self.client.get(url) as response:
                await response.read()
            self.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(POLL_INTERVAL)

    def summary(self):
        return {"samples": len(self.latencies), **latency_summary(self.latencies)}


# --------------------------------------------------------------------------- #
# Sections 2-4: status API, memory and restart with a library of torrents
# --------------------------------------------------------------------------- #

def available_anchors(names):
    """(the anchors whose program is installed, what the JSON says of each); say how
    to install the missing ones, which are skipped."""
    usable, facts = [], {}
    for name in names:
        program, install = ANCHOR_PROGRAMS[name]
        if shutil.which(program) is None:
            progress(f"--anchors {name}: {program} is not installed, skipping it "
                     f"(install it with: {install})")
            facts[name] = {"skipped": f"{program} is not installed; {install}"}
        else:
            usable.append(name)
            facts[name] = {"version": program_version(program)}
    return usable, facts


async def bench_library_beside_anchors(args, count, root):
    """bench_library, with each anchor running the same library of torrents beside it.

    The anchors are loaded first and then idle (their torrents are paused) while the
    daemon is loaded and measured, so their status requests interleave with the daemon's.
    """
    async with contextlib.AsyncExitStack() as stack:
        anchors = []
        for name in args.anchors:
            anchor = await stack.enter_async_context(Transmission(root / name))
            await anchor.start()
            await anchor.load(library_torrents(count), args.add_concurrency)
            progress(f"{count} torrents: {name} loaded in {anchor.facts['add_s']:.1f} s")
            anchors.append(anchor)
        return await bench_library(args, count, root / "torrentflow", anchors)


async def bench_library(args, count, root, anchors=()):
    """Load count tiny torrents into a fresh daemon; measure RSS, the API, then restart.

    anchors: started peers holding the same torrents, measured beside the daemon's API.
    The daemon has an API token, as it must have beyond loopback: every request
    carries its Authorization header.
    """
    connector = aiohttp.TCPConnector(limit=args.add_concurrency)
    async with aiohttp.ClientSession(connector=connector) as client, \
            Daemon(args.daemon, root, token=True) as daemon:
        result = {"count": count, "start_s": round(await daemon.start(client), 3)}
        await asyncio.sleep(args.settle)
        result["rss_empty_kib"] = daemon.rss_kib()
        started = time.perf_counter()
        infohashes = await add_many(
            lambda torrent: api_add(client, daemon.url, torrent, daemon.headers),
            library_torrents(count), args.add_concurrency)
        await poll_until(lambda: listed(client, daemon.url, count, daemon.headers),
                         PROCESS_DEADLINE,
                         f"{count} torrents to be listed", interval=0.1)
        result["add_s"] = round(time.perf_counter() - started, 3)
        progress(f"{count} torrents: added and listed in {result['add_s']:.1f} s")
        result["idle_cpu_pct"] = await idle_cpu_percent(daemon, args.settle)
        result["rss_loaded_kib"] = daemon.rss_kib()
        result["kib_per_torrent"] = round(
            (result["rss_loaded_kib"] - result["rss_empty_kib"]) / count, 1)
        requests = daemon_requests(daemon.url, infohashes[0], daemon.headers)
        # The aiohttp floor goes first, so that it is measured right after the daemon.
        async with AiohttpFloor(client, requests["one"], root / "floor") as floor:
            anchors = [floor, *anchors]
            result["load"], anchor_loads = await measure_status_api(
                args, client, requests,
                {anchor.name: anchor.status_requests(infohashes[0]) for anchor in anchors})
        if anchors:
            result["anchors"] = {anchor.name: {**anchor.facts, "load": anchor_loads[anchor.name]}
                                 for anchor in anchors}
            result["ratios"] = {
                anchor.name: {figures["request"]: figures[f"ratio_to_{anchor.name}"]
                              for figures in result["load"]
                              if f"ratio_to_{anchor.name}" in figures}
                for anchor in anchors}
        result["rss_after_load_kib"] = daemon.rss_kib()
        if count >= args.restart_min:
            result["restart"] = await measure_restart(args, client, daemon, count)
    return result


async def idle_cpu_percent(daemon, seconds):
    """The daemon's CPU use while nobody talks to it, as % of one core."""
    before, started = daemon.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    return round(100 * (daemon.cpu_seconds() - before) / (time.perf_counter() - started), 1)


def library_torrents(count):
    """count distinct tiny torrents: the same library for the same count, run after run."""
    rng = random.Random(count)
    return [tiny_torrent(index, rng) for index in range(count)]


async def add_many(add, torrents, concurrency):
    """Await add(torrent) for each torrent, concurrency at a time; return what they return."""
    pending = iter(torrents)
    infohashes = []

    async def worker():
        for torrent in pending:
            infohashes.append(await add(torrent))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(torrents)))))
    return infohashes


async def listed(client, url, count, headers=None):
    """True once GET /torrents lists at least count torrents."""
    async with client.get(f"{url}/torrents", headers=headers) as response:
        body = await response.read()
    # Every status has one "infohash" key; counting it is much cheaper than parsing
    # megabytes of JSON, which would slow this poller and so the timing.
    return response.status == 200 and body.count(b'"infohash":') >= count


def daemon_requests(url, infohash, headers=None):
    """The daemon's status requests: one torrent's (infohash) and all of them.

    headers: the daemon's Authorization header, if it has a token (Daemon.headers)."""
    return {"one": StatusRequest(f"{url}/torrents/{infohash}", headers=headers),
            "all": StatusRequest(f"{url}/torrents", headers=headers),
            "metrics": StatusRequest(f"{url}/metrics", headers=headers)}


async def measure_status_api(args, client, requests, anchor_requests=None):
    """req/s and latency of one status, all statuses, and all statuses one at a time.

    requests: the daemon's, as daemon_requests builds them. anchor_requests: name ->
    the same requests to a same-run peer, each measured right after the daemon's;
    the daemon's figures then carry ratio_to_NAME, its req/s divided by the peer's.
    Returns (the daemon's figures, name -> the peer's figures).
    """
    anchor_requests = anchor_requests or {}
    tool = load_tool(args)
    results, anchor_results = [], {name: [] for name in anchor_requests}
    for name, which, connections in STATUS_SCENARIOS:
        connections = connections or args.connections
        figures = await measure_request(args, tool, client, requests[which], name, connections)
        progress(f"  GET {name}: {_load_summary(figures)}")
        for anchor, their_requests in anchor_requests.items():
            if which not in their_requests:
                continue  # a Prometheus scrape has no equivalent there
            theirs = await measure_request(args, tool, client, their_requests[which], name,
                                           connections)
            anchor_results[anchor].append(theirs)
            figures[f"ratio_to_{anchor}"] = (round(figures["req_s"] / theirs["req_s"], 2)
                                             if theirs["req_s"] else None)
            progress(f"  {anchor} {name}: {_load_summary(theirs)}; TorrentFlow / {anchor} "
                     f"{figures[f'ratio_to_{anchor}']}")
        results.append(figures)
    return results, anchor_results


def load_tool(args):
    """wrk when it is installed (and not --no-wrk), else the Python load generator."""
    return "wrk" if shutil.which("wrk") and not args.no_wrk else "python"


async def measure_request(args, tool, client, request, name, connections):
    """Load one StatusRequest with wrk or Python; the figures, named name."""
    status, body = await request.send(client)
    if status != 200:
        raise RuntimeError(f"{request.method} {request.url} answered {status}: {body[:300]!r}")
    load = wrk_load if tool == "wrk" else python_load
    figures = await load(request, connections, args.duration)
    figures.update(request=name, connections=connections, response_bytes=len(body), tool=tool)
    return figures


def _load_summary(figures):
    return (f"{figures['req_s']:.0f} req/s, p50 {figures['p50_ms']} ms, "
            f"p99 {figures['p99_ms']} ms, {figures['errors'] + figures['non2xx']} errors")


async def measure_restart(args, client, daemon, count):
    """Stop gracefully, start again on the same state dir, time /health and the full list."""
    result = {"stop_s": round(await daemon.stop(), 3)}
    result["health_s"] = round(await daemon.start(client), 3)
    await poll_until(lambda: listed(client, daemon.url, count, daemon.headers),
                     PROCESS_DEADLINE, f"{count} torrents to be listed after the restart",
                     interval=0.02)
    result["all_listed_s"] = round(time.perf_counter() - daemon.started_at, 3)
    await asyncio.sleep(args.settle)
    result["rss_kib"] = daemon.rss_kib()
    progress(f"{count} torrents: restart /health {result['health_s']} s, "
             f"all listed {result['all_listed_s']} s")
    return result


# --------------------------------------------------------------------------- #
# Section 5: a library of torrents whose data is present
# --------------------------------------------------------------------------- #

def scale_counts(args):
    """The library and memory sections' counts: those of --counts above 1."""
    return [count for count in args.counts if count > 1] or [1000]


def library_target(count):
    """The issue's limit for count present torrents to be seeding, or None."""
    return next((seconds for most, seconds in LIBRARY_TARGETS if count <= most), None)


def library_poll_interval(count):
    """How often "are they all seeding?" is asked: often enough for the 5 s target,
    seldom enough that a listing of 10,000 does not load the daemon much."""
    return 0.05 if count <= 2000 else 0.2


async def bench_present_library(args, torrentflow, count, root):
    """count torrents of 64 KiB whose data is present: the daemon, raw libtorrent and
    each anchor in turn check them all after the adds, and again after a SIGKILL.

    They share one copy of the data, in the page cache for all (it was just written),
    and run one after another, never together.
    """
    data = root / "data"
    torrents = await asyncio.to_thread(present_library, count, data)
    progress(f"library {count}: {count} x {LIBRARY_SIZE // 1024} KiB written")
    result = {"count": count, "size_kib": LIBRARY_SIZE // 1024,
              "target_s": library_target(count)}
    try:
        result["daemon"] = await library_daemon(args, torrents, root / "torrentflow", data)
        result["raw"] = await library_raw(args, torrentflow, torrents, root / "raw", data)
        for name in args.anchors:
            result[name] = await library_transmission(args, torrents, root / name, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def present_library(count, data):
    """count single-file torrents of LIBRARY_SIZE bytes, LIBRARY_PIECE pieces, with their
    files written to data; the same library for the same count, run after run."""
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"present-{count}")
    torrents = []
    for index in range(count):
        content = rng.randbytes(LIBRARY_SIZE)
        name = "present-%05d.bin" % index
        (data / name).write_bytes(content)
        pieces = b"".join(hashlib.sha1(content[offset:offset + LIBRARY_PIECE]).digest()
                          for offset in range(0, LIBRARY_SIZE, LIBRARY_PIECE))
        info = {b"name": name.encode(), b"length": LIBRARY_SIZE,
                b"piece length": LIBRARY_PIECE, b"pieces": pieces}
        torrents.append(lt.bencode({b"info": info}))
    return torrents


async def library_daemon(args, torrents, root, data):
    """Add by upload; seconds from the last add's answer until GET /torrents?fields=state
    shows every one seeding. Then SIGKILL, start again, and time the same from spawn.

    Once more with a fresh state directory, killed the moment the last add answers,
    while most torrents still check: what a crash mid-check costs at the next start.
    """
    count = len(torrents)
    connector = aiohttp.TCPConnector(limit=args.add_concurrency + 2)
    async with aiohttp.ClientSession(connector=connector) as client:
        async with Daemon(args.daemon, root / "first", download_dir=data) as daemon:
            await daemon.start(client)
            first = time.perf_counter()
            await add_many(lambda torrent: api_add(client, daemon.url, torrent), torrents,
                           args.add_concurrency)
            last = time.perf_counter()
            seeding_then = (await daemon_seeding(client, daemon.url))[1]
            await poll_until(lambda: all_seeding(daemon_seeding(client, daemon.url), count),
                             max(PROCESS_DEADLINE, count * 0.05),
                             f"the daemon's {count} torrents to seed",
                             library_poll_interval(count))
            done = time.perf_counter()
            result = {"adds_s": round(last - first, 3), "seeding_at_last_add": seeding_then,
                      "seconds": round(done - last, 3),
                      "from_first_add_s": round(done - first, 3),
                      "memory_kib": daemon.memory_kib()}
            progress(f"library {count}: daemon all seeding {result['seconds']} s after the "
                     f"last add ({result['adds_s']} s of adds, {seeding_then} seeding at the "
                     "last)")
            await asyncio.sleep(args.settle)  # a crash some time later, not mid-save
            result["after_kill"] = await _daemon_crash(client, daemon, count, "seeding")
        async with Daemon(args.daemon, root / "mid-check", download_dir=data) as daemon:
            await daemon.start(client)
            await add_many(lambda torrent: api_add(client, daemon.url, torrent), torrents,
                           args.add_concurrency)
            result["killed_mid_check"] = await _daemon_crash(client, daemon, count,
                                                             "still checking")
    return result


async def _daemon_crash(client, daemon, count, when):
    """SIGKILL the daemon, start it again; seconds from the spawn until /health answers
    and until all count torrents seed, and how many it said it would check."""
    seeding = (await daemon_seeding(client, daemon.url))[1]
    daemon.kill()
    restart = {"seeding_at_kill": seeding, "health_s": round(await daemon.start(client), 3)}
    await poll_until(lambda: all_seeding(daemon_seeding(client, daemon.url), count),
                     max(PROCESS_DEADLINE, count * 0.05),
                     f"the daemon's {count} torrents to seed after a crash",
                     library_poll_interval(count))
    restart["seconds"] = round(time.perf_counter() - daemon.started_at, 3)
    restart["rechecked"] = rechecked_after_crash(daemon.root / "daemon.log")
    progress(f"library {count}: daemon after SIGKILL ({when}, {seeding} seeding): /health "
             f"{restart['health_s']} s, all seeding {restart['seconds']} s from spawn "
             f"({restart['rechecked']} rechecked)")
    await daemon.stop()
    return restart


async def daemon_seeding(client, url):
    """(torrents GET /torrents?fields=state lists, how many of them are seeding)."""
    async with client.get(f"{url}/torrents", params={"fields": "state"}) as response:
        body = await response.read()
    if response.status != 200:
        raise RuntimeError(f"GET /torrents?fields=state answered {response.status}")
    return body.count(b'"state":'), body.count(b'"seeding"')


async def all_seeding(counting, count):
    """Whether counting (a coroutine giving (listed, seeding)) shows count seeding."""
    listed_now, seeding = await counting
    return listed_now >= count and seeding >= count


def rechecked_after_crash(log_path):
    """How many torrents the daemon's last start said it would check after a crash."""
    found = re.findall(rb"checking the data of (\d+) torrents", log_path.read_bytes())
    return int(found[-1]) if found else None


async def library_raw(args, torrentflow, torrents, root, data):
    """The same in raw libtorrent (library_child): the daemon's settings and disk
    backend, torrents added neither paused nor auto-managed, each process timing itself
    from the last add. After all seed it saves their resume data; it is then killed and
    a new process adds them back from that data, timed from spawn."""
    count = len(torrents)
    root.mkdir(parents=True, exist_ok=True)
    (root / "torrents.bin").write_bytes(lt.bencode(list(torrents)))
    spec = {"settings": full_daemon_settings(torrentflow), "backend": PREAD,
            "torrents": str(root / "torrents.bin"), "save_path": str(data),
            "resume_dir": str(root / "resume"), "count": count,
            "deadline": max(PROCESS_DEADLINE, count * 0.05),
            "interval": library_poll_interval(count)}
    async with ChildProcess(LIBRARY_CHILD, {**spec, "phase": "check"}) as child:
        await child.ready()
        result = await child.go()
        child.kill()
    progress(f"library {count}: raw all seeding {result['seconds']} s after the last add "
             f"({result['adds_s']} s of adds)")
    async with ChildProcess(LIBRARY_CHILD, {**spec, "phase": "restart"}) as child:
        restart = await child.result()
        restart["seconds"] = round(time.perf_counter() - child.started_at, 3)
    result["after_kill"] = restart
    progress(f"library {count}: raw after SIGKILL: all seeding {restart['seconds']} s "
             "from spawn")
    return result


async def library_transmission(args, torrents, root, data):
    """The same in transmission-daemon: torrent-add unpaused with the data in its
    download-dir, which it verifies; then SIGKILL and start again, timed from spawn.

    It verifies one torrent at a time, about ten a second here, so each wait is cut
    off after --library-anchor-limit seconds; the figures then say how many seed.
    """
    count = len(torrents)
    interval = library_poll_interval(count)
    async with Transmission(root, download_dir=data, start_added=True) as anchor:
        await anchor.start()
        first = time.perf_counter()
        await add_many(lambda torrent: anchor.add(torrent, paused=False), torrents,
                       args.add_concurrency)
        last = time.perf_counter()
        seeding_then = (await anchor.seeding())[1]
        seconds, seeding = await seeding_within(anchor.seeding, count,
                                                args.library_anchor_limit, interval)
        result = {"version": program_version("transmission-daemon"),
                  "adds_s": round(last - first, 3), "seeding_at_last_add": seeding_then,
                  **_capped(seconds, seeding, time.perf_counter() - last, count),
                  "memory_kib": memory_kib(anchor.process.pid)}
        if seconds is None:
            result["statuses"] = dict(await anchor.statuses())
        progress(f"library {count}: transmission {_capped_text(result, count)} after the "
                 f"last add ({result['adds_s']} s of adds)")
        await asyncio.sleep(args.settle)
        anchor.kill()
        started = time.perf_counter()
        await anchor.start()
        restart = {"rpc_s": anchor.facts["start_s"]}
        seconds, seeding = await seeding_within(anchor.seeding, count,
                                                args.library_anchor_limit, interval)
        restart.update(_capped(seconds, seeding, time.perf_counter() - started, count))
        if seconds is not None:  # from the spawn, as for the others
            restart["seconds"] = round(time.perf_counter() - started, 3)
        else:
            restart["statuses"] = dict(await anchor.statuses())
        result["after_kill"] = restart
        progress(f"library {count}: transmission after SIGKILL: {_capped_text(restart, count)} "
                 "from spawn")
    return result


async def seeding_within(counting, count, limit, interval):
    """Poll counting() ((listed, seeding, checking)) until count seed, limit seconds
    passed, or for STALL_SECONDS none checked and no more seeded; (the seconds it took
    or None, how many were seeding at the end)."""
    started = changed = time.perf_counter()
    before = None
    while True:
        listed_now, seeding, checking = await counting()
        now = time.perf_counter()
        if listed_now >= count and seeding >= count:
            return now - started, seeding
        if checking or (listed_now, seeding) != before:
            before, changed = (listed_now, seeding), now
        if now - started > limit or now - changed > STALL_SECONDS:
            return None, seeding
        await asyncio.sleep(interval)


def _capped(seconds, seeding, waited, count):
    """A capped wait's figures: seconds (None when cut off), or how many seed by then."""
    if seconds is not None:
        return {"seconds": round(seconds, 3)}
    rate = seeding / waited if waited else 0
    return {"seconds": None, "cut_off_s": round(waited, 1), "seeding_at_cut_off": seeding,
            "per_second": round(rate, 1),
            "estimated_s": round(count / rate, 0) if rate else None}


def _capped_text(figures, count):
    if figures["seconds"] is not None:
        return f"all seeding {figures['seconds']} s"
    statuses = ", ".join(f"{n} {name}" for name, n in figures.get("statuses", {}).items())
    if not figures["seeding_at_cut_off"]:
        return (f"none of {count} seeding after {figures['cut_off_s']} s, nor checking: "
                f"given up ({statuses})")
    return (f"{figures['seeding_at_cut_off']} of {count} seeding after "
            f"{figures['cut_off_s']} s (cut off; {figures['per_second']}/s, all in about "
            f"{_or_dash(figures['estimated_s'])} s; {statuses})")


def library_child(spec_text):
    """Child mode: raw libtorrent checks a library of present torrents.

    phase "check": prints "ready", adds every torrent on a line on stdin, then prints
    one JSON line (seconds from the last add until all seed; the adds' seconds), after
    saving every torrent's resume data; then waits to be killed. phase "restart": adds
    them back from that resume data at once and prints the seconds until all seed.
    """
    spec = json.loads(spec_text)
    session = _child_session(spec["settings"], spec["backend"])
    resume_dir = Path(spec["resume_dir"])
    if spec["phase"] == "check":
        params = []
        for torrent in lt.bdecode(Path(spec["torrents"]).read_bytes()):
            atp = lt.load_torrent_buffer(torrent)
            atp.save_path = spec["save_path"]
            atp.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
            params.append(atp)
        print("ready", flush=True)
        sys.stdin.readline()
    else:
        params = [lt.read_resume_data(path.read_bytes())
                  for path in sorted(resume_dir.glob("*.resume"))]
    cpu_before = _stat_cpu_seconds(Path("/proc/self/stat"))
    first = time.perf_counter()
    for atp in params:
        session.async_add_torrent(atp)
    last = time.perf_counter()
    seeding_then = len(session.get_torrent_status(
        lambda status: status.state == lt.torrent_status.states.seeding, 0))
    _wait_all_seeding(session, spec["count"], last + spec["deadline"], spec["interval"])
    done = time.perf_counter()
    result = {"adds_s": round(last - first, 3), "seeding_at_last_add": seeding_then,
              "seconds": round(done - last, 3),
              "from_first_add_s": round(done - first, 3),
              "cpu_s": round(_stat_cpu_seconds(Path("/proc/self/stat")) - cpu_before, 2),
              "memory_kib": memory_kib(os.getpid())}
    if spec["phase"] == "check":
        result["saved"] = _save_all_resume(session, resume_dir, last + spec["deadline"])
    print(json.dumps(result), flush=True)
    sys.stdin.readline()  # killed here in phase "check"; the parent closes stdin after "restart"
    return 0


def _child_session(settings, backend):
    params = lt.session_params(settings)
    if backend:
        params.disk_io_constructor = backend
    return lt.session(params)


def _wait_all_seeding(session, count, end, interval):
    """Until count torrents were added and every one seeds; alerts are drained meanwhile."""
    seeding = lt.torrent_status.states.seeding
    added = 0
    while True:
        session.pop_alerts()
        if added < count:
            added = len(session.get_torrents())
        if added >= count and not session.get_torrent_status(
                lambda status: status.state != seeding, 0):
            return
        if time.perf_counter() > end:
            raise TimeoutError(f"{added} of {count} torrents added; not all seeding")
        time.sleep(interval)


def _save_all_resume(session, resume_dir, end):
    """Save every torrent's resume data (with its info dict) to resume_dir; how many."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    handles = session.get_torrents()
    flags = lt.save_resume_flags_t.save_info_dict | lt.save_resume_flags_t.flush_disk_cache
    saved = failed = 0
    for start in range(0, len(handles), 500):  # the alert queue holds 10,000
        for handle in handles[start:start + 500]:
            handle.save_resume_data(flags)
        while saved + failed < min(len(handles), start + 500):
            if time.perf_counter() > end:
                raise TimeoutError(f"{saved} of {len(handles)} resume files saved")
            session.wait_for_alert(100)
            for alert in session.pop_alerts():
                if isinstance(alert, lt.save_resume_data_alert):
                    (resume_dir / f"{saved:05d}.resume").write_bytes(
                        lt.write_resume_data_buf(alert.params))
                    saved += 1
                elif isinstance(alert, lt.save_resume_data_failed_alert):
                    failed += 1
    return saved


def full_daemon_settings(torrentflow):
    """daemon_settings plus the queue and connection limits the daemon applies from its
    defaults (libtorrent's own defaults today, so this changes nothing unless they do)."""
    settings = daemon_settings(torrentflow)
    # Private names of torrentflow.py, which may change: without them, the settings
    # are session_settings' alone.
    pack = getattr(torrentflow, "_session_pack", None)
    if pack is not None:
        with contextlib.suppress(AttributeError, KeyError, TypeError):
            defaults = {option.setting: option.default for option in torrentflow.OPTIONS
                        if option.setting}
            settings.update(pack(defaults))
    return settings


class ChildProcess:
    """This benchmark re-run in a child mode (CHILDREN), stopped by its own PID.

    It speaks lines: "ready" from the child, "go" to it, one JSON line of results.
    """

    def __init__(self, mode, spec):
        self.command = [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)]
        self.deadline = spec.get("deadline", PROCESS_DEADLINE) + PROCESS_DEADLINE
        self.process = None
        self.started_at = None

    async def __aenter__(self):
        self.started_at = time.perf_counter()
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self

    async def __aexit__(self, *exc_info):
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def _line(self, deadline):
        line = await asyncio.wait_for(self.process.stdout.readline(), deadline)
        if not line:
            raise RuntimeError(f"{self.command[2]} exited with {await self.process.wait()}")
        return line

    async def ready(self):
        """Wait for "ready" (or what the child says instead, returned as text): the
        child has set up and waits for "go"."""
        return (await self._line(PROCESS_DEADLINE)).decode()

    async def go(self):
        """Send "go"; return its JSON result."""
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()
        return await self.result()

    async def result(self):
        return json.loads(await self._line(self.deadline))

    def kill(self):
        """SIGKILL, by PID."""
        self.process.kill()


# --------------------------------------------------------------------------- #
# Section 6: many downloads at once
# --------------------------------------------------------------------------- #

async def bench_many(args, torrentflow, root):
    """--many-torrents downloads of --many-size-mib each, every torrent from its own
    seeder, all added at once: the daemon against raw libtorrent, alternating runs.

    The seeders are libtorrent sessions, one per torrent, each on its own port, all in
    one child process of their own (seeders_child). Not in this process: here the
    GET /health probe and the progress polls run, and on 2 cores the seeders' threads
    would delay them and so inflate the probe's figures (the download section's note
    on its 80 ms probe). Not one process each: 20 processes with their threads share 2
    cores no better, and cost 20 interpreters. Each contender downloads from the same
    seeder process, so whatever it costs, both pay it.
    """
    size = args.many_size_mib * MIB
    count = args.many_torrents
    source = root / "source"
    payloads = await asyncio.to_thread(
        lambda: [make_payload(source / f"many-{index:02d}.bin", size) for index in range(count)])
    torrents = await asyncio.to_thread(lambda: [make_torrent(path) for path in payloads])
    sha1s = await asyncio.to_thread(lambda: [sha1_file(path) for path in payloads])
    (root / "torrents").mkdir(parents=True, exist_ok=True)
    paths = []
    for index, torrent in enumerate(torrents):
        paths.append(root / "torrents" / f"many-{index:02d}.torrent")
        paths[-1].write_bytes(torrent)
    progress(f"many: {count} x {args.many_size_mib} MiB written")
    deadline = 30 + count * size / MIN_RATE
    runs = {name: [] for name in args.many_contenders}
    probes = []
    spec = {"torrents": [str(path) for path in paths], "data": str(source)}
    async with ChildProcess(SEEDERS_CHILD, spec) as seeders:
        ports = (await seeders.result())["ports"]
        tracker_ports = {_infohash_v1(torrent): port for torrent, port in zip(torrents, ports)}
        async with ManyTracker(tracker_ports) as tracker, aiohttp.ClientSession() as client:
            tracked = [with_tracker(torrent, tracker.url) for torrent in torrents]
            for run in range(args.runs):
                shift = run % len(args.many_contenders)
                order = args.many_contenders[shift:] + args.many_contenders[:shift]
                for name in order:
                    target = root / f"{name}-{run + 1}"
                    kind, how = MANY_CONTENDERS[name]
                    if kind == "daemon":
                        probe = HealthProbe(client)
                        result = await many_daemon(args, client, tracked, target, how, probe,
                                                   deadline)
                        result["health"] = probe.summary()
                        probes.append(probe.latencies)
                    else:
                        result = await many_raw(torrentflow, paths, ports, target, how,
                                                deadline)
                    result["sha1_ok"] = await asyncio.to_thread(
                        lambda: sum(sha1_file(target / "downloads" / path.name) == sha1
                                    for path, sha1 in zip(payloads, sha1s)))
                    result["mb_s"] = round(count * size / MB / result["seconds"], 1)
                    shutil.rmtree(target, ignore_errors=True)
                    os.sync()  # the next run should not pay for this one's writeback
                    runs[name].append(result)
                    health = result.get("health")
                    progress(f"many run {run + 1} {name}: {result['mb_s']:.0f} MB/s in "
                             f"{result['seconds']:.2f} s, {result['cpu_s']} CPU s, sha1 ok "
                             f"{result['sha1_ok']}/{count}"
                             + (f", /health p99 {health['p99_ms']} ms max {health['max_ms']} ms"
                                if health else ""))
    shutil.rmtree(root, ignore_errors=True)
    return summarise_many(args, runs, probes)


def _infohash_v1(torrent):
    return hashlib.sha1(lt.bencode(lt.bdecode(torrent)[b"info"])).digest()


async def many_daemon(args, client, torrents, root, extra_args, probe, deadline):
    """Add every torrent by upload at once, poll GET /torrents?fields=progress,is_seeding
    every 10 ms until all are complete (the daemon says so once their writes reached the
    files), with probe on GET /health throughout."""
    count = len(torrents)
    async with Daemon(args.daemon, root, extra_args=extra_args) as daemon:
        await daemon.start(client)
        async with probe.watching(daemon.url):
            cpu_before = daemon.cpu_seconds()
            started = time.perf_counter()
            await add_many(lambda torrent: api_add(client, daemon.url, torrent), torrents,
                           count)

            async def finished():
                async with client.get(f"{daemon.url}/torrents",
                                      params={"fields": "progress,is_seeding"}) as response:
                    body = await response.json()
                return sum(t["progress"] == 100 and t["is_seeding"]
                           for t in body["torrents"]) >= count

            await poll_until(finished, deadline, f"the daemon's {count} downloads")
            seconds = time.perf_counter() - started
            cpu = daemon.cpu_seconds() - cpu_before
        await daemon.stop()
    return {"seconds": round(seconds, 3), "cpu_s": round(cpu, 2)}


async def many_raw(torrentflow, paths, ports, root, queued, deadline):
    """The same downloads in raw libtorrent (many_child), each torrent added with its
    seeder as a peer; timed by the child from the first add to the last flush."""
    spec = {"settings": full_daemon_settings(torrentflow), "backend": PREAD,
            "torrents": [str(path) for path in paths], "ports": ports,
            "save_path": str(root / "downloads"), "queued": queued, "deadline": deadline}
    async with ChildProcess(MANY_CHILD, spec) as child:
        await child.ready()
        return await child.go()


def many_child(spec_text):
    """Child mode: raw libtorrent downloads many torrents at once, started by "go".

    Each torrent comes with its seeder as a peer; queued=false takes it out of
    libtorrent's queue, as library_child does. A torrent counts as done when every piece
    is verified and its writes were flushed, as the daemon's; prints one JSON line with
    the seconds from the first add until the last is done, and the CPU seconds.
    """
    spec = json.loads(spec_text)
    session = _child_session(spec["settings"], spec["backend"])
    session.apply_settings({"alert_mask": session.get_settings()["alert_mask"]
                            | int(lt.alert_category.storage)})
    params = []
    for path, port in zip(spec["torrents"], spec["ports"]):
        atp = lt.load_torrent_buffer(Path(path).read_bytes())
        atp.save_path = spec["save_path"]
        if not spec["queued"]:
            atp.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
        atp.peers = [("127.0.0.1", port)]
        params.append(atp)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu_before = _stat_cpu_seconds(Path("/proc/self/stat"))
    started = time.perf_counter()
    handles = [session.add_torrent(atp) for atp in params]
    flushing, flushed = set(), set()
    while len(flushed) < len(handles):
        if time.perf_counter() - started > spec["deadline"]:
            raise TimeoutError(f"{len(flushed)} of {len(handles)} raw downloads done")
        for index, handle in enumerate(handles):
            if index not in flushing and _is_complete(handle.status()):
                handle.flush_cache()
                flushing.add(index)
        session.wait_for_alert(int(POLL_INTERVAL * 1000))
        flushed.update(str(alert.handle.info_hash()) for alert in session.pop_alerts()
                       if isinstance(alert, lt.cache_flushed_alert))
    seconds = time.perf_counter() - started
    cpu = _stat_cpu_seconds(Path("/proc/self/stat")) - cpu_before
    print(json.dumps({"seconds": round(seconds, 3), "cpu_s": round(cpu, 2)}), flush=True)
    return 0


def seeders_child(spec_text):
    """Child mode: one libtorrent session per torrent on 127.0.0.1, each seeding its
    torrent's known-good data (seed_mode); prints their ports, runs until stdin closes."""
    spec = json.loads(spec_text)
    seeders = [Seeder().seed(Path(path).read_bytes(), spec["data"])
               for path in spec["torrents"]]
    print(json.dumps({"ports": [seeder.port for seeder in seeders]}), flush=True)
    sys.stdin.read()
    for seeder in seeders:
        seeder.close()
    return 0


def summarise_many(args, runs, probes):
    """Median MB/s per contender, each daemon's ratio to each raw, /health over all runs."""
    summary = {"torrents": args.many_torrents, "size_mib": args.many_size_mib,
               "runs": runs, "contenders": {}}
    for name, results in runs.items():
        rates = [result["mb_s"] for result in results]
        summary["contenders"][name] = {
            "median_mb_s": statistics.median(rates), "min_mb_s": min(rates),
            "max_mb_s": max(rates),
            "median_s": round(statistics.median(r["seconds"] for r in results), 3),
            "median_cpu_s": round(statistics.median(r["cpu_s"] for r in results), 2),
            "sha1_ok": sum(r["sha1_ok"] for r in results)}
    medians = {name: figures["median_mb_s"] for name, figures in summary["contenders"].items()}
    for name in medians:
        for raw in ("raw", "raw-queued"):
            if raw in medians and name != raw:
                summary["contenders"][name][f"ratio_to_{raw}"] = round(
                    medians[name] / medians[raw], 3)
    if probes:
        summary["health"] = {"samples": sum(map(len, probes)),
                             **latency_summary([x for probe in probes for x in probe])}
    return summary


# --------------------------------------------------------------------------- #
# Section 7: memory, and where it goes
# --------------------------------------------------------------------------- #

#: Steps towards the daemon's memory, each a fresh python3 doing all the steps before
#: it too: (name, what it adds, code). {settings} and {daemon} are filled in.
MEMORY_STEPS = (
    ("python", "bare python3", "pass"),
    ("stdlib", "+ the stdlib modules torrentflow imports",
     "import argparse, asyncio, base64, collections, concurrent.futures, contextlib, "
     "dataclasses, errno, hashlib, hmac, ipaddress, itertools, json, logging, math, os, "
     "queue, random, re, resource, secrets, shutil, signal, socket, stat, sys, threading, "
     "time, urllib.parse, pathlib"),
    ("libtorrent", "+ import libtorrent", "import libtorrent as lt"),
    ("aiohttp", "+ import aiohttp, aiohttp.web", "import aiohttp\nfrom aiohttp import web"),
    ("uvloop", "+ import uvloop (the daemon's loop)", "import uvloop"),
    ("session", "+ an idle lt.session, daemon's settings",
     "import json, time\n"
     "params = lt.session_params(json.loads({settings!r}))\n"
     "params.disk_io_constructor = 'pread_disk_io_constructor'\n"
     "session = lt.session(params)\ntime.sleep(0.5)"),
    ("module", "+ import torrentflow.py (not run)",
     "import importlib.util, sys\n"
     "spec = importlib.util.spec_from_file_location('torrentflow', {daemon!r})\n"
     "module = importlib.util.module_from_spec(spec)\n"
     "sys.modules['torrentflow'] = module\nspec.loader.exec_module(module)"),
)
#: The end of each step's program: say "ready", then wait until stdin closes.
MEMORY_READY = "\nimport sys\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\nsys.stdin.read()\n"
#: A raw libtorrent process holding the same idle torrents as the daemon, to split the
#: daemon's per-torrent memory into libtorrent's part and the rest.
RAW_MEMORY_CHILD = """
import json, sys, time
import libtorrent as lt
spec = json.loads(sys.argv[1])
params = lt.session_params(spec["settings"])
params.disk_io_constructor = "pread_disk_io_constructor"
session = lt.session(params)
torrents = lt.bdecode(open(spec["torrents"], "rb").read())
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for torrent in torrents:
    atp = lt.load_torrent_buffer(torrent)
    atp.save_path = spec["save_path"]
    session.async_add_torrent(atp)
while len(session.get_torrents()) < len(torrents):
    session.pop_alerts()
    time.sleep(0.05)
session.pop_alerts()
sys.stdout.write("added\\n"); sys.stdout.flush()
sys.stdin.read()
"""


async def bench_memory(args, torrentflow, root):
    """RSS, PSS and USS of the idle daemon, empty and with each count of idle torrents
    (the api section's tiny torrents, whose data nobody has); the same torrents in raw
    libtorrent; and the steps from a bare python3 up to an empty daemon."""
    settings = full_daemon_settings(torrentflow)
    result = {"steps": await memory_steps(args, settings), "libraries": []}
    connector = aiohttp.TCPConnector(limit=args.add_concurrency)
    for count in scale_counts(args):
        async with aiohttp.ClientSession(connector=connector, connector_owner=False) as client, \
                Daemon(args.daemon, root / f"daemon-{count}") as daemon:
            await daemon.start(client)
            await asyncio.sleep(args.settle)
            library = {"count": count, "empty": daemon.memory_kib()}
            await add_many(lambda torrent: api_add(client, daemon.url, torrent),
                           library_torrents(count), args.add_concurrency)
            await poll_until(lambda: listed(client, daemon.url, count), PROCESS_DEADLINE,
                             f"{count} torrents to be listed", interval=0.1)
            await asyncio.sleep(args.settle)
            library["loaded"] = daemon.memory_kib()
            library["per_torrent_kib"] = {
                kind: round((library["loaded"][kind] - library["empty"][kind]) / count, 1)
                for kind in ("rss", "pss", "uss", "anon")}
            await daemon.stop()
        library["raw"] = await raw_memory(settings, count, root / f"raw-{count}", args.settle)
        result["libraries"].append(library)
        progress(f"memory {count}: daemon RSS {library['empty']['rss'] / 1024:.1f} -> "
                 f"{library['loaded']['rss'] / 1024:.1f} MiB "
                 f"({library['per_torrent_kib']['rss']} KiB/torrent, USS "
                 f"{library['per_torrent_kib']['uss']}); raw libtorrent "
                 f"{library['raw']['per_torrent_kib']['rss']} KiB/torrent")
    await connector.close()
    shutil.rmtree(root, ignore_errors=True)
    return result


async def memory_steps(args, settings):
    """Each MEMORY_STEPS program's memory once it is ready (uvloop only if installed)."""
    steps, code = [], ""
    for name, what, step in MEMORY_STEPS:
        if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
            continue
        code += "\n" + step.format(settings=json.dumps(settings), daemon=str(args.daemon))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code + MEMORY_READY,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            await asyncio.wait_for(process.stdout.readline(), PROCESS_DEADLINE)
            await asyncio.sleep(0.5)
            steps.append({"step": name, "what": what, **memory_kib(process.pid)})
        finally:
            process.stdin.close()
            await asyncio.wait_for(process.wait(), PROCESS_DEADLINE)
    return steps


async def raw_memory(settings, count, root, settle):
    """Memory of a raw libtorrent process (RAW_MEMORY_CHILD) before and after adding the
    same idle torrents as the daemon; KiB per torrent."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "torrents.bin").write_bytes(lt.bencode(library_torrents(count)))
    spec = {"settings": settings, "torrents": str(root / "torrents.bin"),
            "save_path": str(root / "downloads")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RAW_MEMORY_CHILD, json.dumps(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(process.stdout.readline(), PROCESS_DEADLINE)
        await asyncio.sleep(settle)
        empty = memory_kib(process.pid)
        process.stdin.write(b"add\n")
        await process.stdin.drain()
        await asyncio.wait_for(process.stdout.readline(), PROCESS_DEADLINE)
        await asyncio.sleep(settle)
        loaded = memory_kib(process.pid)
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), PROCESS_DEADLINE)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
    return {"empty": empty, "loaded": loaded,
            "per_torrent_kib": {kind: round((loaded[kind] - empty[kind]) / count, 1)
                                for kind in ("rss", "pss", "uss", "anon")}}


# --------------------------------------------------------------------------- #
# Section 8: GET /health while many clients fetch the full listing
# --------------------------------------------------------------------------- #

async def bench_listing(args, root):
    """--listing-clients concurrent GET /torrents (no query) over --listing-torrents
    torrents for --listing-duration seconds, with GET /health probed every 10 ms.

    The load runs in a process of its own (wrk, else load_child), so the probe in this
    process waits only for the daemon; before it, the probe alone for a baseline. On 2
    cores a load generator at the daemon's priority takes CPU the daemon needs (a run
    with 200 clients: /health p99 262 ms against 49 ms with the generator at nice 19),
    so it runs at --listing-nice: the figure is then the daemon's, not the machine's.
    """
    count = args.listing_torrents
    connector = aiohttp.TCPConnector(limit=args.add_concurrency)
    async with aiohttp.ClientSession(connector=connector) as client, \
            Daemon(args.daemon, root) as daemon:
        await _start_with_library(args, client, daemon, count)
        idle = HealthProbe(client)
        async with idle.watching(daemon.url):
            await asyncio.sleep(2)
        request = StatusRequest(f"{daemon.url}/torrents")
        status, body = await request.send(client)
        if status != 200:
            raise RuntimeError(f"GET /torrents answered {status}")
        tool = load_tool(args)
        probe = HealthProbe(client)
        cpu_before = daemon.cpu_seconds()
        async with probe.watching(daemon.url):
            if tool == "wrk":
                load = await wrk_load(request, args.listing_clients, args.listing_duration,
                                      args.listing_nice)
            else:
                async with ChildProcess(LOAD_CHILD, {
                        "url": request.url, "connections": args.listing_clients,
                        "duration": args.listing_duration, "nice": args.listing_nice}) as child:
                    load = await child.result()
        cpu = daemon.cpu_seconds() - cpu_before
        await daemon.stop()
    result = {"torrents": count, "clients": args.listing_clients,
              "duration_s": args.listing_duration, "tool": tool, "nice": args.listing_nice,
              "response_bytes": len(body), "listing": load,
              "daemon_cpu_pct": round(100 * cpu / args.listing_duration),
              "health_idle": idle.summary(), "health": probe.summary()}
    progress(f"listing: {count} torrents, {args.listing_clients} clients: "
             f"{_load_summary(load)}; /health p50 {result['health']['p50_ms']} p99 "
             f"{result['health']['p99_ms']} max {result['health']['max_ms']} ms "
             f"({result['health']['samples']} samples)")
    return result


async def _start_with_library(args, client, daemon, count):
    """Start the daemon, add count tiny torrents, and wait until all are listed and the
    daemon has settled."""
    await daemon.start(client)
    await add_many(lambda torrent: api_add(client, daemon.url, torrent),
                   library_torrents(count), args.add_concurrency)
    await poll_until(lambda: listed(client, daemon.url, count), PROCESS_DEADLINE,
                     f"{count} torrents to be listed", interval=0.1)
    await asyncio.sleep(args.settle)


async def bench_bulk(args, root):
    """PUT /torrents/pause, then /resume, over --bulk-torrents torrents, with GET /health
    probed every 10 ms: seconds each, /health p99 and max, and the alerts libtorrent
    dropped (torrentflow_alerts_dropped_total) before and after."""
    count = args.bulk_torrents
    connector = aiohttp.TCPConnector(limit=args.add_concurrency)
    async with aiohttp.ClientSession(connector=connector) as client, \
            Daemon(args.daemon, root) as daemon:
        await _start_with_library(args, client, daemon, count)
        result = {"torrents": count, "dropped_before": await _dropped_alerts(client, daemon)}
        for action in ("pause", "resume"):
            probe = HealthProbe(client)
            started = time.perf_counter()
            async with probe.watching(daemon.url):
                async with client.put(f"{daemon.url}/torrents/{action}",
                                      timeout=aiohttp.ClientTimeout(total=600)) as response:
                    answer = await response.json()
            result[action] = {"seconds": round(time.perf_counter() - started, 2),
                              "count": answer.get("count"), "health": probe.summary()}
        result["dropped_after"] = await _dropped_alerts(client, daemon)
        await daemon.stop()
    for action in ("pause", "resume"):
        figures = result[action]
        progress(f"bulk {action} of {count}: {figures['seconds']} s, {figures['count']} done; "
                 f"/health p99 {figures['health']['p99_ms']} max {figures['health']['max_ms']} ms")
    progress(f"bulk: alerts dropped {result['dropped_before']} -> {result['dropped_after']}")
    return result


async def _dropped_alerts(client, daemon):
    """torrentflow_alerts_dropped_total from the daemon's /metrics."""
    async with client.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    match = re.search(r"^torrentflow_alerts_dropped_total (\d+)", text, re.M)
    return int(match.group(1)) if match else None


def load_child(spec_text):
    """Child mode: python_load of one GET in a process of its own; prints its figures."""
    spec = json.loads(spec_text)
    os.nice(spec.get("nice", 0))
    figures = asyncio.run(python_load(StatusRequest(spec["url"]), spec["connections"],
                                      spec["duration"]))
    print(json.dumps(figures), flush=True)
    return 0


# --------------------------------------------------------------------------- #
# Section 9: streaming a file while it downloads
# --------------------------------------------------------------------------- #

async def bench_stream(args, root):
    """Three phases on one daemon with a token, GET /health probed every 10 ms in each:
    a file read whole from its add while it downloads from an unlimited seeder; seeks
    in a second file whose seeder is held to --stream-rate-mb; the first file again,
    whole, once it is on disk. Every read is checked against the source's bytes."""
    size = args.stream_size_mib * MIB
    fast_path = make_payload(root / "source" / "fast.bin", size)
    slow_path = make_payload(root / "source" / "slow.bin", size)
    fast, slow = Seeder(), Seeder()
    rate = int(args.stream_rate_mb * MB)
    slow.session.set_peer_class(slow.session.local_peer_class_id,
                                {"upload_limit": rate, "download_limit": rate})
    fast_torrent, slow_torrent = make_torrent(fast_path), make_torrent(slow_path)
    fast.seed(fast_torrent, fast_path.parent)
    slow.seed(slow_torrent, slow_path.parent)
    result = {"size_mib": args.stream_size_mib, "seeker_rate_mb_s": args.stream_rate_mb,
              "piece_kib": lt.load_torrent_buffer(fast_torrent).ti.piece_length() // 1024}
    try:
        async with aiohttp.ClientSession() as client, \
                Daemon(args.daemon, root / "daemon", token=True) as daemon, \
                Tracker(fast) as fast_tracker, Tracker(slow) as slow_tracker:
            await daemon.start(client)
            reader = StreamReader(client, daemon)
            async with HealthProbe(client).watching(daemon.url) as probe:
                started = time.perf_counter()
                infohash = await api_add(client, daemon.url, with_tracker(
                    fast_torrent, fast_tracker.url), daemon.headers)
                first, _, data = await reader.read(infohash, started=started)
                result["downloading"] = reader.figures(size, first, started, probe)
                reader.check(data, fast_path.read_bytes())
            async with HealthProbe(client).watching(daemon.url) as probe:
                infohash = await api_add(client, daemon.url, with_tracker(
                    slow_torrent, slow_tracker.url), daemon.headers)
                result["seeks"] = await reader.seeks(args, infohash, slow_path, probe)
            async with HealthProbe(client).watching(daemon.url) as probe:
                started = time.perf_counter()
                first, _, data = await reader.read(reader.first_infohash, started=started)
                result["from_disk"] = reader.figures(size, first, started, probe)
                reader.check(data, fast_path.read_bytes())
            await daemon.stop()
    finally:
        fast.close()
        slow.close()
        shutil.rmtree(root / "source", ignore_errors=True)
    for phase in ("downloading", "from_disk"):
        figures = result[phase]
        progress(f"stream {phase}: {figures['mb_s']} MB/s, first byte "
                 f"{figures['first_byte_ms']} ms; /health p99 {figures['health']['p99_ms']} ms")
    seeks = result["seeks"]
    progress(f"stream seeks: first byte median {seeks['first_byte_ms']['median']} ms, max "
             f"{seeks['first_byte_ms']['max']} ms; torrent at {seeks['progress_after']}%; "
             f"/health p99 {seeks['health']['p99_ms']} ms")
    return result


class StreamReader:
    """Reads a daemon's file streams: the time to each one's first byte and its end."""

    def __init__(self, client, daemon):
        self.client, self.daemon = client, daemon
        self.first_infohash = None

    async def read(self, infohash, byte_range=None, started=None):
        """(seconds to the first byte, seconds to the last, the bytes) of file 0."""
        self.first_infohash = self.first_infohash or infohash
        started = started or time.perf_counter()
        headers = {**self.daemon.headers, **({"Range": byte_range} if byte_range else {})}
        url = f"{self.daemon.url}/torrents/{infohash}/files/0"
        timeout = aiohttp.ClientTimeout(total=PROCESS_DEADLINE)
        async with self.client.get(url, headers=headers, timeout=timeout) as response:
            if response.status not in (200, 206):
                raise RuntimeError(f"GET {url} answered {response.status}: "
                                   f"{await response.text()}")
            chunks = [await response.content.readany()]
            first = time.perf_counter() - started
            chunks += [chunk async for chunk in response.content.iter_chunked(MIB)]
        return first, time.perf_counter() - started, b"".join(chunks)

    async def seeks(self, args, infohash, source, probe):
        """--stream-seeks reads of STREAM_SEEK_BYTES at offsets past the first 16 MiB."""
        data, rng = source.read_bytes(), random.Random(STREAM_SEEK_SEED)
        firsts, wholes = [], []
        for _ in range(args.stream_seeks):
            offset = rng.randrange(16 * MIB, len(data) - STREAM_SEEK_BYTES)
            end = offset + STREAM_SEEK_BYTES
            first, whole, got = await self.read(infohash, f"bytes={offset}-{end - 1}")
            self.check(got, data[offset:end])
            firsts.append(first)
            wholes.append(whole)
        async with self.client.get(f"{self.daemon.url}/torrents/{infohash}",
                                   headers=self.daemon.headers) as response:
            done = (await response.json())["progress"]
        return {"seeks": args.stream_seeks, "bytes_each": STREAM_SEEK_BYTES,
                "first_byte_ms": _spread(firsts), "whole_ms": _spread(wholes),
                "progress_after": round(done, 1), "health": probe.summary()}

    @staticmethod
    def figures(size, first, started, probe):
        seconds = time.perf_counter() - started
        return {"mb_s": round(size / seconds / MB, 1), "seconds": round(seconds, 2),
                "first_byte_ms": round(first * 1000, 1), "health": probe.summary()}

    @staticmethod
    def check(got, expected):
        if got != expected:
            raise RuntimeError(f"a stream sent {len(got)} bytes that are not the source's")


def _spread(seconds):
    """Median and max of durations in seconds, as milliseconds."""
    return {"median": round(statistics.median(seconds) * 1000, 1),
            "max": round(max(seconds) * 1000, 1)}


# --------------------------------------------------------------------------- #
# Load generators
# --------------------------------------------------------------------------- #

class StatusRequest:
    """One request to put under load: a GET, or a POST with a body, plus headers."""

    def __init__(self, url, method="GET", body=None, headers=None):
        self.url = url
        self.method = method
        self.body = body
        self.headers = headers or {}

    async def send(self, client):
        """Make the request once, as wrk does (no Accept-Encoding); (status, body bytes)."""
        async with client.request(self.method, self.url, data=self.body, headers=self.headers,
                                  skip_auto_headers=("Accept-Encoding",)) as response:
            return response.status, await response.read()

    async def answer(self, client):
        """As send, with the response's headers too: (status, headers, body bytes)."""
        async with client.request(self.method, self.url, data=self.body, headers=self.headers,
                                  skip_auto_headers=("Accept-Encoding",)) as response:
            return response.status, response.headers.copy(), await response.read()

    def wrk_lua(self):
        """Lua that makes wrk send this request instead of its default GET."""
        lines = [f'wrk.method = "{self.method}"']
        if self.body is not None:
            lines.append(f"wrk.body = [==[{self.body}]==]")  # a long string: no escaping
        lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in self.headers.items()]
        return "\n".join(lines) + "\n"


async def wrk_load(request, connections, duration, nice=0):
    """Run wrk with a Lua hook that prints its figures as one JSON line; nice: its
    scheduling niceness (0: the same as everything else). wrk takes whole seconds
    only: a fractional duration is rounded up (req/s uses wrk's own elapsed time)."""
    seconds = max(1, int(-(-duration // 1)))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(request.wrk_lua() + WRK_SCRIPT)
    try:
        process = await asyncio.create_subprocess_exec(
            *(("nice", "-n", str(nice)) if nice else ()),
            "wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "30s", "-s", script.name, request.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise
    finally:
        os.unlink(script.name)
    line = next((line for line in output.decode().splitlines()
                 if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no figures:\n{output.decode()}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    return {"req_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "requests": raw["requests"], "errors": raw["errors"], "non2xx": raw["non2xx"],
            "p50_ms": round(raw["p50_us"] / 1000, 2), "p99_ms": round(raw["p99_us"] / 1000, 2),
            "max_ms": round(raw["max_us"] / 1000, 2)}


async def python_load(request, connections, duration):
    """A bounded aiohttp load generator: connections workers for duration seconds."""
    latencies = []
    errors = non2xx = 0
    end = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:

        async def worker():
            nonlocal errors, non2xx
            while time.monotonic() < end and len(latencies) < MAX_PYTHON_REQUESTS:
                started = time.perf_counter()
                try:
                    status, _ = await request.send(client)
                    non2xx += status >= 300
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"req_s": round(len(latencies) / elapsed, 1), "requests": len(latencies),
            "errors": errors, "non2xx": non2xx, **latency_summary(latencies)}


def latency_summary(latencies):
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(latencies)

    def milliseconds(fraction):
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 2)

    return {"p50_ms": milliseconds(0.50), "p99_ms": milliseconds(0.99),
            "max_ms": milliseconds(1.0)}


# --------------------------------------------------------------------------- #
# Peers: the daemon process, the seeder, the tracker and Transmission
# --------------------------------------------------------------------------- #

class Daemon:
    """One torrentflow.py process on 127.0.0.1, started and stopped by its own PID.

    With token=True it gets a random API token (through --token-file) and then
    refuses requests without it; headers holds the Authorization header to send.
    """

    def __init__(self, script, root, download_dir=None, extra_args=(), token=False):
        self.script = script
        self.root = root
        self.download_dir = download_dir or root / "downloads"
        self.extra_args = list(extra_args)
        self.token = secrets.token_hex(16) if token else None
        self.headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.started_at = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=PROCESS_DEADLINE)

    def command(self):
        return [sys.executable, str(self.script), "--local-only",
                "--listen-interfaces", "127.0.0.1:0", "--host", "127.0.0.1",
                "--port", str(self.port), "--download-dir", str(self.download_dir),
                "--state-dir", str(self.root / "state"),
                *(("--token-file", str(self.root / "token")) if self.token else ()),
                *self.extra_args]

    async def start(self, client):
        """Spawn it; return the seconds from spawn until GET /health answered 200."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.token:
            token_file = self.root / "token"
            token_file.touch(mode=0o600)
            token_file.write_text(self.token + "\n")
        # The environment must not override the command line's loopback-only setup.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TORRENTFLOW_")}
        with open(self.root / "daemon.log", "ab") as log:  # a file: a pipe could fill up
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, env=environ)
        await poll_until(lambda: self._healthy(client), PROCESS_DEADLINE, "GET /health",
                         interval=0.002)
        return time.perf_counter() - self.started_at

    async def _healthy(self, client):
        if self.process.poll() is not None:
            log = (self.root / "daemon.log").read_text(errors="replace")
            raise RuntimeError(f"the daemon exited with {self.process.returncode}:\n{log[-2000:]}")
        try:
            async with client.get(f"{self.url}/health",
                                  timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status == 200
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            return False

    async def stop(self):
        """SIGTERM, then wait for the exit; return the seconds the shutdown took."""
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        await poll_until(lambda: self.process.poll() is not None, PROCESS_DEADLINE,
                         "the daemon to exit")
        return time.perf_counter() - started

    def kill(self):
        """SIGKILL, a crash: nothing is saved on the way out."""
        self.process.kill()
        self.process.wait(timeout=PROCESS_DEADLINE)

    def cpu_seconds(self):
        return _stat_cpu_seconds(Path(f"/proc/{self.process.pid}/stat"))

    def rss_kib(self):
        """VmRSS from /proc, in KiB."""
        return _vm_rss_kib(self.process.pid)

    def memory_kib(self):
        """RSS, PSS and USS from /proc/PID/smaps_rollup, in KiB."""
        return memory_kib(self.process.pid)


def memory_kib(pid):
    """{"rss", "pss", "uss", "anon"} of a process, in KiB, from /proc/PID/smaps_rollup.

    USS, what the process alone holds, is its private pages, clean and dirty; PSS
    adds its share of the pages it shares (the libraries' code, mostly).
    """
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"],
            "anon": fields["Anonymous"]}


def _vm_rss_kib(pid):
    """A process's VmRSS from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class Transmission:
    """transmission-daemon in the foreground, a same-run anchor for the status API.

    Its own config dir gets a settings.json before the start: RPC on a free port of
    127.0.0.1 without auth, whitelisted to 127.0.0.1; peers on 127.0.0.1; DHT, LPD,
    PEX, uTP and port forwarding off; added torrents stay paused (unless start_added:
    then torrents it finds at start, with no resume file, start too). It is stopped by
    its own PID. It owns an aiohttp session for its RPC calls.
    """

    name = "transmission"

    def __init__(self, root, download_dir=None, start_added=False):
        self.root = root
        self.download_dir = download_dir or root / "downloads"
        self.start_added = start_added
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/transmission/rpc"
        self.session_id = ""
        self.process = None
        self.client = None
        self.infohashes = set()
        self.facts = {}

    async def __aenter__(self):
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *exc_info):
        try:
            if self.process is not None and self.process.poll() is None:
                await self.stop()
        finally:
            await self.client.close()

    def settings(self):
        """settings.json: loopback only, no discovery, no auth, nothing starts by itself."""
        return {
            "rpc-enabled": True, "rpc-bind-address": "127.0.0.1", "rpc-port": self.port,
            "rpc-authentication-required": False, "rpc-whitelist-enabled": True,
            "rpc-whitelist": "127.0.0.1", "bind-address-ipv4": "127.0.0.1",
            "bind-address-ipv6": "::1", "peer-port": free_port(),
            "peer-port-random-on-start": False, "dht-enabled": False, "lpd-enabled": False,
            "pex-enabled": False, "utp-enabled": False, "port-forwarding-enabled": False,
            "blocklist-enabled": False, "start-added-torrents": self.start_added,
            "download-dir": str(self.download_dir), "incomplete-dir-enabled": False,
            "watch-dir-enabled": False, "scrape-paused-torrents-enabled": False,
            "message-level": 1,
        }

    async def start(self):
        """Write the settings, spawn it, wait until its RPC answers; return the seconds."""
        config = self.root / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "settings.json").write_text(json.dumps(self.settings(), indent=1))
        with open(self.root / "transmission.log", "ab") as log:  # a file: a pipe could fill up
            started = time.perf_counter()
            self.process = subprocess.Popen(
                ["transmission-daemon", "-f", "-g", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        await poll_until(self._answers, PROCESS_DEADLINE, "transmission's RPC", interval=0.01)
        self.facts["start_s"] = round(time.perf_counter() - started, 3)
        return self.facts["start_s"]

    async def _answers(self):
        if self.process.poll() is not None:
            log = (self.root / "transmission.log").read_text(errors="replace")
            raise RuntimeError(f"transmission-daemon exited with {self.process.returncode}:"
                               f"\n{log[-2000:]}")
        try:
            await self.rpc("session-get", {"fields": ["version"]})
        except aiohttp.ClientConnectionError:
            return False
        return True

    async def rpc(self, method, arguments=None):
        """One RPC call; made again once with the session id a 409 answer hands out."""
        body = json.dumps({"method": method, "arguments": arguments or {}})
        for _ in range(2):
            async with self.client.post(
                    self.url, data=body,
                    headers={TRANSMISSION_SESSION_HEADER: self.session_id}) as response:
                if response.status == 409:
                    self.session_id = response.headers[TRANSMISSION_SESSION_HEADER]
                    continue
                reply = await response.json(content_type=None)
            if response.status != 200 or reply.get("result") != "success":
                raise RuntimeError(f"transmission {method} answered {response.status}: "
                                   f"{str(reply)[:300]}")
            return reply["arguments"]
        raise RuntimeError(f"transmission {method}: still 409 after the session id handshake")

    async def add(self, torrent, paused=True):
        """torrent-add one .torrent, paused unless told; return its infohash."""
        reply = await self.rpc("torrent-add", {
            "metainfo": base64.b64encode(torrent).decode(), "paused": paused})
        added = reply.get("torrent-added") or reply.get("torrent-duplicate")
        return added["hashString"]

    async def load(self, torrents, concurrency):
        """Add the torrents, wait until torrent-get lists them all; note time and RSS."""
        started = time.perf_counter()
        self.infohashes.update(await add_many(self.add, torrents, concurrency))

        async def listed():
            reply = await self.rpc("torrent-get", {"fields": ["id"]})
            return len(reply["torrents"]) >= len(torrents)

        await poll_until(listed, PROCESS_DEADLINE, f"transmission to list {len(torrents)} "
                         "torrents", interval=0.1)
        self.facts["add_s"] = round(time.perf_counter() - started, 3)
        self.facts["rss_loaded_kib"] = _vm_rss_kib(self.process.pid)
        self.facts["fields"] = len(TRANSMISSION_FIELDS)

    def status_requests(self, infohash):
        """torrent-get POSTs for one torrent (by infohash) and for all, as StatusRequests."""
        if infohash not in self.infohashes:  # it would answer 200 with no torrent
            raise RuntimeError(f"transmission does not hold torrent {infohash}")
        headers = {TRANSMISSION_SESSION_HEADER: self.session_id,
                   "Content-Type": "application/json"}

        def torrent_get(**ids):
            return json.dumps({"method": "torrent-get",
                               "arguments": {"fields": list(TRANSMISSION_FIELDS), **ids}})

        return {"one": StatusRequest(self.url, "POST", torrent_get(ids=[infohash]), headers),
                "all": StatusRequest(self.url, "POST", torrent_get(), headers)}

    async def seeding(self):
        """(torrents it lists, how many of them seed, how many check or wait to)."""
        statuses = await self.statuses()
        return (sum(statuses.values()), statuses.get("seed", 0),
                statuses.get("check", 0) + statuses.get("check-wait", 0))

    async def statuses(self):
        """How many torrents are in each status, by name."""
        reply = await self.rpc("torrent-get", {"fields": ["status"]})
        return collections.Counter(TRANSMISSION_STATUSES[t["status"]]
                                   for t in reply["torrents"])

    def kill(self):
        """SIGKILL, a crash."""
        self.process.kill()
        self.process.wait(timeout=PROCESS_DEADLINE)

    async def stop(self):
        """SIGTERM its PID, then SIGKILL if it has not exited within PROCESS_DEADLINE."""
        self.process.send_signal(signal.SIGTERM)
        try:
            await poll_until(lambda: self.process.poll() is not None, PROCESS_DEADLINE,
                             "transmission-daemon to exit")
        except TimeoutError:
            self.process.kill()
            self.process.wait(timeout=PROCESS_DEADLINE)


class AiohttpFloor:
    """The aiohttp floor: a bare aiohttp app answering one of the daemon's requests.

    It runs in a child process (floor_child: the same Python, and the daemon's choice
    of event loop, uvloop if it imports, else asyncio's) and serves, at the same route
    GET /torrents/{infohash}, the exact bytes the daemon answered that request with,
    fetched from the daemon first (with its Authorization header), under the same
    Content-Type. Its requests carry the same headers as the daemon's, so a load tool
    sends both the same request but for the port. What the daemon's req/s lacks of
    the floor's is then the daemon's own work: routing, auth, the status cache and
    JSON, its middlewares; what aiohttp and the loop cost is common to both.
    Measured like an anchor (name "floor"), right after the daemon.
    """

    name = "floor"

    def __init__(self, client, request, root):
        self.client = client
        self.request = request  # the daemon's StatusRequest for one torrent
        self.root = root
        self.url = None
        self.facts = {}
        self.child = None

    async def __aenter__(self):
        status, headers, body = await self.request.answer(self.client)
        if status != 200:
            raise RuntimeError(f"GET {self.request.url} answered {status}: {body[:300]!r}")
        path = urllib.parse.urlsplit(self.request.url).path
        infohash = path.rsplit("/", 1)[1]
        self.root.mkdir(parents=True, exist_ok=True)
        body_file = self.root / "answer.bin"
        body_file.write_bytes(body)
        content_type = headers.get("Content-Type", "application/octet-stream")
        self.child = ChildProcess(FLOOR_CHILD, {
            "answers": {infohash: str(body_file)}, "content_type": content_type})
        await self.child.__aenter__()
        try:
            started = json.loads(await self.child.ready())
            self.url = f"http://127.0.0.1:{started['port']}"
            # Check that it answers what the daemon did, byte for byte.
            mirror = self.status_requests(infohash)["one"]
            their_status, their_headers, their_body = await mirror.answer(self.client)
            if (their_status, their_body, their_headers.get("Content-Type")) != (
                    200, body, content_type):
                raise RuntimeError(f"the aiohttp floor answered {their_status}, "
                                   f"{their_headers.get('Content-Type')!r}, "
                                   f"{len(their_body)} bytes, not the daemon's answer")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self.facts = {"loop": started["loop"], "aiohttp": aiohttp.__version__,
                      "python": platform.python_version(), "route": "/torrents/{infohash}",
                      "content_type": content_type, "response_bytes": len(body),
                      # the daemon's answer had these headers too; the floor's does not
                      "daemon_only_headers": sorted({name.lower() for name in headers}
                                                     - {name.lower() for name in their_headers})}
        progress(f"  aiohttp floor ({started['loop']}) serves the daemon's {len(body)}-byte "
                 f"answer to GET {path}")
        return self

    async def __aexit__(self, *exc_info):
        if self.child is not None:
            await self.child.__aexit__(*exc_info)
            self.child = None

    def status_requests(self, infohash):
        """The daemon's request for one torrent, to the floor: the same headers."""
        return {"one": StatusRequest(f"{self.url}/torrents/{infohash}",
                                     headers=self.request.headers)}


def floor_child(spec_text):
    """Child mode: the aiohttp floor (see AiohttpFloor). Prints {"port", "loop"} as
    one JSON line once it listens, and serves until its stdin closes."""
    spec = json.loads(spec_text)
    answers = {infohash: Path(file).read_bytes() for infohash, file in spec["answers"].items()}
    try:
        import uvloop  # the daemon's choice: uvloop when it imports, else asyncio's loop
    except ImportError:
        uvloop = None
    run = uvloop.run if uvloop else asyncio.run
    run(_serve_floor(answers, spec["content_type"], "uvloop" if uvloop else "asyncio"))
    return 0


async def _serve_floor(answers, content_type, loop_name):
    headers = {"Content-Type": content_type}

    async def status(request):
        body = answers.get(request.match_info["infohash"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/torrents/{infohash}", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(json.dumps({"port": runner.addresses[0][1], "loop": loop_name}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


class Seeder:
    """A libtorrent session on 127.0.0.1 seeding known-good data (seed_mode, TCP only)."""

    def __init__(self):
        self.session = lt.session(SEEDER_SETTINGS)

    @property
    def port(self):
        return self.session.listen_port()

    def seed(self, torrent, data_root):
        params = lt.load_torrent_buffer(torrent)
        params.save_path = str(data_root)
        params.flags |= lt.torrent_flags.seed_mode  # data is known good: skip hashing
        params.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
        self.handle = self.session.add_torrent(params)
        return self

    @contextlib.asynccontextmanager
    async def watching(self):
        """Sample the bytes this seeder sends while the block runs."""
        watch = UploadWatch(self.handle)
        task = asyncio.create_task(watch.run())
        try:
            yield watch
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def close(self):
        del self.session


class UploadWatch:
    """The seeder's payload upload, sampled every POLL_INTERVAL: when bytes flowed.

    Seen from the seeder, the same for every contender, it splits add-to-verified
    into waiting for the first byte, the transfer, and the tail after the last byte.
    It reads the peers' counters, which move with every send; the torrent's own
    counter only moves once per libtorrent tick.
    """

    def __init__(self, handle):
        self.handle = handle
        self.samples = []  # (perf_counter, bytes sent to peers connected now)

    async def run(self):
        for _ in range(int(PROCESS_DEADLINE * 10 / POLL_INTERVAL)):  # bounded
            sent = sum(peer.total_upload for peer in self.handle.get_peer_info())
            self.samples.append((time.perf_counter(), sent))
            await asyncio.sleep(POLL_INTERVAL)

    def phases(self, started, size):
        """Seconds from started until the first byte and until 99% of size was sent.

        99%, because the run may end before a sample sees the very last byte.
        """
        first = next((moment for moment, sent in self.samples if sent > 0), None)
        most = next((moment for moment, sent in self.samples if sent >= 0.99 * size), None)
        return {"first_byte_s": None if first is None else round(first - started, 3),
                "sent_99_s": None if most is None else round(most - started, 3)}


class Tracker:
    """A loopback HTTP tracker that answers every announce with the seeder."""

    def __init__(self, seeder):
        self.seeder = seeder
        self.url = None
        self._runner = None

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/announce", self._announce)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/announce"
        return self

    async def __aexit__(self, *exc_info):
        await self._runner.cleanup()

    async def _announce(self, request):
        peer = bytes([127, 0, 0, 1]) + self.seeder.port.to_bytes(2, "big")
        return web.Response(body=lt.bencode({b"interval": 1800, b"peers": peer}),
                            content_type="text/plain")


class ManyTracker(Tracker):
    """A loopback HTTP tracker that answers each torrent's announce with its seeder."""

    def __init__(self, ports):
        super().__init__(None)
        self.ports = ports  # v1 infohash (20 bytes) -> the port of its seeder

    async def _announce(self, request):
        query = urllib.parse.parse_qs(request.rel_url.raw_query_string, encoding="latin-1")
        port = self.ports.get(query.get("info_hash", [""])[0].encode("latin-1"))
        peers = b"" if port is None else bytes([127, 0, 0, 1]) + port.to_bytes(2, "big")
        return web.Response(body=lt.bencode({b"interval": 1800, b"peers": peers}),
                            content_type="text/plain")


async def api_add(client, url, torrent, headers=None):
    """POST /torrents with torrent_file as a multipart upload; return the infohash.

    headers: the daemon's Authorization header, if it has a token (Daemon.headers)."""
    form = aiohttp.FormData()
    form.add_field("torrent_file", torrent, filename="bench.torrent",
                   content_type="application/x-bittorrent")
    async with client.post(f"{url}/torrents", data=form, headers=headers) as response:
        body = await response.json()
        if response.status not in (200, 201):
            raise RuntimeError(f"POST /torrents answered {response.status}: {body}")
    return body["infohash"]


# --------------------------------------------------------------------------- #
# Helpers: payloads, torrents, polling, machine facts
# --------------------------------------------------------------------------- #

def make_payload(path, size):
    """Write size random bytes to path; return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 4 * MIB
    with open(path, "wb") as file:
        for offset in range(0, size, chunk):
            file.write(os.urandom(min(chunk, size - offset)))
    return path


def make_torrent(path):
    """A v1 .torrent for one file, libtorrent choosing the piece size, no tracker."""
    torrent = lt.create_torrent(lt.list_files(str(path)), 0, lt.create_torrent.v1_only)
    lt.set_piece_hashes(torrent, str(path.parent))
    return lt.bencode(torrent.generate())


def with_tracker(torrent, url):
    """The same torrent (same infohash) with an announce URL."""
    decoded = lt.bdecode(torrent)
    decoded[b"announce"] = url.encode()
    return lt.bencode(decoded)


def tiny_torrent(index, rng):
    """A distinct single-piece torrent of TINY_SIZE bytes whose data nobody has."""
    content = rng.randbytes(TINY_SIZE)
    info = {b"name": b"tiny-%05d.bin" % index, b"length": TINY_SIZE, b"piece length": 16384,
            b"pieces": hashlib.sha1(content).digest()}
    return lt.bencode({b"info": info})


def sha1_file(path):
    """Hex sha1 of a file, or None when it is missing."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as file:
            while block := file.read(4 * MIB):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


async def poll_until(condition, deadline, what, interval=POLL_INTERVAL):
    """Call a sync or async condition until it is truthy, or raise after deadline seconds."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_probe(size=64 * MIB, repeats=3):
    """sha1 MB/s over a buffer in RAM: shows how fast this machine is right now."""
    buffer = os.urandom(size)
    best = min(_timed(hashlib.sha1, buffer) for _ in range(repeats))
    return round(size / MB / best, 1)


def _timed(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def machine_info():
    """What the figures depend on: CPUs, load, versions."""
    wrk = shutil.which("wrk")
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(),
            "libtorrent": lt.__version__, "aiohttp": aiohttp.__version__,
            "wrk": wrk is not None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def program_version(program):
    """The first line a program prints for --version (transmission writes it to stderr)."""
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    return (done.stdout or done.stderr).strip().split("\n")[0]


def _or_dash(value):
    return "-" if value is None else value


def _ok(flag):
    return "ok" if flag else "MISMATCH"


def progress(message):
    print(message, file=sys.stderr, flush=True)


def _jsonable(mapping):
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in mapping.items()}


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

def render_table(results):
    """The human-readable report."""
    lines = [f"TorrentFlow benchmark, {results['machine']['time']}, "
             f"{results['machine']['cpus']} CPUs, libtorrent {results['machine']['libtorrent']}",
             f"CPU probe (sha1 in RAM): {results['cpu_probe_before_mb_s']} MB/s before, "
             f"{results['cpu_probe_after_mb_s']} after"]
    if "download" in results:
        lines += _download_table(results["download"])
    for name, facts in results.get("anchors", {}).items():
        lines.append(f"Anchor {name}: {facts.get('version') or facts['skipped']}")
    if "api" in results:
        lines += _api_table(results["api"])
        lines += _memory_table(results["api"])
        lines += _restart_table(results["api"])
    if "library" in results:
        lines += _library_table(results["library"])
    if "many" in results:
        lines += _many_table(results["many"])
    if "memory" in results:
        lines += _memory_section_table(results["memory"])
    if "listing" in results:
        lines += _listing_table(results["listing"])
    if "bulk" in results:
        bulk = results["bulk"]
        lines += ["", f"Bulk actions over {bulk['torrents']} torrents (GET /health probed "
                  "every 10 ms)", _row("action", "seconds", "done", "p99 ms", "max ms",
                                       widths=(10,))]
        lines += [_row(action, bulk[action]["seconds"], bulk[action]["count"],
                       bulk[action]["health"]["p99_ms"], bulk[action]["health"]["max_ms"],
                       widths=(10,)) for action in ("pause", "resume")]
        lines.append(f"Alerts libtorrent dropped: {bulk['dropped_before']} before, "
                     f"{bulk['dropped_after']} after")
    if "stream" in results:
        lines += _stream_table(results["stream"])
    return "\n".join(lines)


def render_quick(results):
    """--quick's report, without its last line (quick_line)."""
    status = results["status"]
    lines = [f"TorrentFlow --quick, {results['machine']['time']}, "
             f"{results['machine']['cpus']} CPUs, load average "
             f"{' '.join(f'{x:.2f}' for x in results['machine']['loadavg'])}"]
    lines += _download_table(results["download"])
    lines += ["", f"Status API: {status['request']} ({status['tool']}, "
              f"{status['connections']} connections, {status['rounds']} alternating rounds "
              f"of {status['duration_s']:g} s; the daemon has a token, both requests carry it)",
              _row("server", "round", *LOAD_COLUMNS, widths=(14,))]
    for name, label in (("daemon", "torrentflow"), ("floor", "aiohttp floor")):
        lines += [_row(label, index + 1, *_load_cells(figures), widths=(14,))
                  for index, figures in enumerate(status["runs"][name])]
    lines.append(f"Medians: torrentflow {status['daemon_req_s']:.0f} req/s, aiohttp floor "
                 f"({status['floor']['loop']}) {status['floor_req_s']:.0f} req/s")
    if status["tool"] == "python":
        lines.append("No wrk: the Python load generator shares 2 cores with the server and "
                     "is likely the limit of both; install wrk for a meaningful ratio.")
    lines.append(f"\nWhole run: {results['seconds']} s")
    return "\n".join(lines)


def _download_table(download):
    runs = len(next(iter(download["runs"].values())))
    lines = ["", f"Download {download['size_mib']} MiB over TCP on 127.0.0.1, {runs} "
             "alternating runs; MB/s from add to every piece verified",
             _row("contender", "median", "min-max", "/ raw", "/ tuned", "1st byte s",
                  "transfer", "CPU s", "sha1 done", "sha1 stop", widths=(17,))]
    for name, figures in download["contenders"].items():
        lines.append(_row(name, f"{figures['median_mb_s']:.0f}",
                          f"{figures['min_mb_s']:.0f}-{figures['max_mb_s']:.0f}",
                          figures.get("ratio_to_raw", "-"), figures.get("ratio_to_tuned", "-"),
                          _or_dash(figures["median_first_byte_s"]),
                          _or_dash(figures["median_transfer_mb_s"]), figures["median_cpu_s"],
                          f"{figures['sha1_at_done']}/{runs}",
                          f"{figures['sha1_after_stop']}/{runs}", widths=(17,)))
    lines += ["Medians. 1st byte: seconds from the add until the seeder sent a byte; "
              "transfer: MB/s from the",
              "first byte to 99% sent; CPU s: the downloader process's own;",
              "sha1 done: runs whose file already matched when reported complete; "
              "sha1 stop: after a graceful stop."]
    if "probe_run" in download:
        probed = download["probe_run"]
        health = probed["health"]
        lines.append(f"Loop stall: one more daemon download ({probed['mb_s']:.0f} MB/s) with "
                     f"GET /health every 10 ms: max {health['max_ms']} ms, p99 "
                     f"{health['p99_ms']} ms, p50 {health['p50_ms']} ms "
                     f"({health['samples']} samples)")
    return lines


def _api_table(libraries):
    """Without anchors, one row per request; with them, a server column, each anchor's
    row under the daemon's, and a ratio column per anchor: TorrentFlow's req/s / theirs."""
    first = libraries[0]["load"][0]
    anchors = sorted({name for library in libraries for name in library.get("anchors", {})})
    lines = ["", f"Status API ({first['tool']}, {first['connections']} connections unless noted)"]
    if not anchors:
        lines.append(_row("torrents", "request", *LOAD_COLUMNS, widths=(9, 24)))
        for library in libraries:
            lines += [_row(library["count"], figures["request"], *_load_cells(figures),
                           widths=(9, 24)) for figures in library["load"]]
        return lines
    widths = (9, 13, 22)
    lines.append(_row("torrents", "server", "request", *LOAD_COLUMNS,
                      *(f"TF/{ANCHOR_SHORT_NAMES[name]}" for name in anchors), widths=widths))
    for library in libraries:
        theirs = library.get("anchors", {})
        for figures in library["load"]:
            lines.append(_row(library["count"], "torrentflow", figures["request"],
                              *_load_cells(figures),
                              *(_or_dash(figures.get(f"ratio_to_{name}")) for name in anchors),
                              widths=widths))
            lines += [_row(library["count"], ANCHOR_LABELS.get(name, name), their["request"],
                           *_load_cells(their), widths=widths)
                      for name in anchors for their in theirs.get(name, {}).get("load", ())
                      if their["request"] == figures["request"]]
    for name in anchors:
        label = ANCHOR_LABELS.get(name, name)
        lines.append(f"TF/{ANCHOR_SHORT_NAMES[name]}: TorrentFlow's req/s divided by "
                     f"{label}'s for the same request in this run; " + (
                         "the aiohttp floor is a bare aiohttp app (same Python and loop) "
                         "serving the daemon's answer, fetched first, as is."
                         if name == "floor" else
                         f"{name} answers torrent-get POSTs with {len(TRANSMISSION_FIELDS)} "
                         "fields."))
    lines.append("The daemon has an API token; its requests and the floor's carry its "
                 "Authorization header.")
    return lines


def _load_cells(figures):
    return (f"{figures['req_s']:.0f}", figures["p50_ms"], figures["p99_ms"], figures["max_ms"],
            figures["errors"] + figures["non2xx"], f"{figures['response_bytes'] / 1024:.1f}")


def _memory_table(libraries):
    lines = ["", "Memory (VmRSS) and CPU, idle with the torrents loaded; 'after load': "
             "after the status API runs",
             _row("torrents", "empty MiB", "loaded MiB", "KiB/torrent", "idle CPU %",
                  "after load MiB", "add+list s", widths=(9, 11))]
    for library in libraries:
        lines.append(_row(library["count"], f"{library['rss_empty_kib'] / 1024:.1f}",
                          f"{library['rss_loaded_kib'] / 1024:.1f}", library["kib_per_torrent"],
                          library["idle_cpu_pct"], f"{library['rss_after_load_kib'] / 1024:.1f}",
                          library["add_s"], widths=(9, 11)))
    for library in libraries:
        for name, facts in library.get("anchors", {}).items():
            if "rss_loaded_kib" not in facts:
                continue  # the aiohttp floor holds no torrents
            lines.append(f"{name} beside it, {library['count']} paused torrents: "
                         f"{facts['rss_loaded_kib'] / 1024:.1f} MiB, added and listed in "
                         f"{facts['add_s']} s")
    return lines


def _restart_table(libraries):
    restarts = [library for library in libraries if "restart" in library]
    if not restarts:
        return []
    lines = ["", "Restart with the torrents saved (seconds from process start)",
             _row("torrents", "stop s", "/health s", "all listed s", "RSS MiB")]
    for library in restarts:
        restart = library["restart"]
        lines.append(_row(library["count"], restart["stop_s"], restart["health_s"],
                          restart["all_listed_s"], f"{restart['rss_kib'] / 1024:.1f}"))
    return lines


def _library_table(libraries):
    """library: seconds from the last add until all seed, and after a SIGKILL."""
    names = [name for name in ("daemon", "raw", *ANCHOR_PROGRAMS)
             if any(name in library for library in libraries)]
    lines = ["", f"Library of present torrents ({LIBRARY_SIZE // 1024} KiB each, one file, "
             f"{LIBRARY_PIECE // 1024} KiB pieces): seconds until every one seeds",
             _row("torrents", "server", "adds s", "at last", "after add", "target",
                  "met", "KILL: s", "rechecked", "RSS MiB", widths=(9, 16))]
    for library in libraries:
        target = library["target_s"]
        for name in names:
            if name not in library:
                continue
            figures = library[name]
            after = figures["after_kill"]
            met = "-" if target is None else (
                "yes" if figures["seconds"] is not None and figures["seconds"] <= target
                else "NO")
            lines.append(_row(library["count"], name, figures["adds_s"],
                              figures["seeding_at_last_add"], _seconds_cell(figures),
                              _or_dash(target), met, _seconds_cell(after),
                              _or_dash(after.get("rechecked")),
                              f"{figures['memory_kib']['rss'] / 1024:.1f}", widths=(9, 16)))
            if "killed_mid_check" in figures:
                crash = figures["killed_mid_check"]
                lines.append(_row(library["count"], f"{name} mid-check", "", "", "", "", "",
                                  crash["seconds"], _or_dash(crash["rechecked"]), "",
                                  widths=(9, 16)))
    lines += [f"{name} after SIGKILL: {_capped_text(library[name]['after_kill'], library['count'])}"
              for library in libraries for name in names
              if name in library and library[name]["after_kill"]["seconds"] is None]
    lines += [f"{name}: {_capped_text(library[name], library['count'])} after the last add"
              for library in libraries for name in names
              if name in library and library[name]["seconds"] is None]
    lines += ["adds s: first to last add answered; at last: seeding when the last add "
              "answered; after add: seconds from",
              "then until all seed (target: the issue's); KILL: s: after SIGKILL, seconds "
              "from the new process's spawn",
              "until all seed again; rechecked: torrents the daemon said it would check "
              "after the crash; RSS once all seed.",
              "raw: libtorrent with the daemon's settings, not auto-managed; it restarts "
              "from resume data it saved itself; its RSS",
              "includes this benchmark's own imports (aiohttp among them).",
              "mid-check: a fresh daemon killed the moment its last add answered, while "
              "its torrents still checked."]
    return lines


def _seconds_cell(figures):
    """Seconds, or for a wait cut off ">cut-off" and how many seeded by then."""
    if figures["seconds"] is not None:
        return figures["seconds"]
    return f">{figures['cut_off_s']:.0f}:{figures['seeding_at_cut_off']}"


def _many_table(many):
    runs = len(next(iter(many["runs"].values())))
    raws = [name for name in ("raw", "raw-queued") if name in many["contenders"]]
    lines = ["", f"Many downloads: {many['torrents']} x {many['size_mib']} MiB at once, each "
             f"from its own seeder; {runs} alternating runs; MB/s of all bytes until all "
             "verified",
             _row("contender", "median", "min-max", "median s", *(f"/ {raw}" for raw in raws),
                  "CPU s", "sha1 ok", widths=(17,))]
    for name, figures in many["contenders"].items():
        lines.append(_row(name, f"{figures['median_mb_s']:.0f}",
                          f"{figures['min_mb_s']:.0f}-{figures['max_mb_s']:.0f}",
                          figures["median_s"],
                          *(_or_dash(figures.get(f"ratio_to_{raw}")) for raw in raws),
                          figures["median_cpu_s"],
                          f"{figures['sha1_ok']}/{runs * many['torrents']}", widths=(17,)))
    lines.append(f"Target: the daemon at least {MANY_TARGET_RATIO} of raw. raw: the daemon's "
                 "settings, torrents out of libtorrent's queue;")
    lines.append("raw-queued: in it (3 downloads at once, as the daemon's default); "
                 "daemon-unqueued: --max-active-downloads -1.")
    if "health" in many:
        health = many["health"]
        lines.append(f"GET /health every 10 ms during the daemon's runs: p50 "
                     f"{health['p50_ms']} ms, p99 {health['p99_ms']} ms, max "
                     f"{health['max_ms']} ms ({health['samples']} samples; target p99 < "
                     f"{HEALTH_TARGET_MS:g} ms)")
    return lines


def _memory_section_table(memory):
    lines = ["", "Memory from /proc/PID/smaps_rollup, MiB (USS: private pages; PSS: plus a "
             "share of shared ones)",
             _row("step", "RSS", "PSS", "USS", "+RSS", "+USS", widths=(40,))]
    before = None
    for step in memory["steps"]:
        lines.append(_row(step["what"][:40], *(f"{step[kind] / 1024:.1f}"
                                               for kind in ("rss", "pss", "uss")),
                          *((f"{(step[kind] - before[kind]) / 1024:+.1f}"
                             for kind in ("rss", "uss")) if before else ("", "")),
                          widths=(40,)))
        before = step
    for library in memory["libraries"]:
        for label, figures in (("the daemon, empty", library["empty"]),
                               (f"the daemon, {library['count']} idle torrents",
                                library["loaded"])):
            lines.append(_row(label, *(f"{figures[kind] / 1024:.1f}"
                                       for kind in ("rss", "pss", "uss")),
                              *((f"{(figures[kind] - before[kind]) / 1024:+.1f}"
                                 for kind in ("rss", "uss")) if before else ("", "")),
                              widths=(40,)))
            before = figures
    lines.append(_row("KiB per added torrent", "RSS", "PSS", "USS", "anon", "target", "met",
                      widths=(40,)))
    for library in memory["libraries"]:
        per = library["per_torrent_kib"]
        rss_mib = library["loaded"]["rss"] / 1024
        met = per["rss"] <= MEMORY_TARGET_KIB_PER_TORRENT and (
            library["count"] > 1000 or rss_mib <= MEMORY_TARGET_RSS_MIB)
        lines.append(_row(f"daemon, {library['count']} torrents", per["rss"], per["pss"],
                          per["uss"], _or_dash(per.get("anon")), f"{MEMORY_TARGET_KIB_PER_TORRENT:g}",
                          "yes" if met else "NO", widths=(40,)))
        raw = library["raw"]["per_torrent_kib"]
        lines.append(_row(f"raw libtorrent, {library['count']} torrents", raw["rss"],
                          raw["pss"], raw["uss"], _or_dash(raw.get("anon")), widths=(40,)))
    lines.append(f"Targets: at most {MEMORY_TARGET_RSS_MIB:g} MiB RSS with 1,000 idle "
                 f"torrents and {MEMORY_TARGET_KIB_PER_TORRENT:g} KiB per added torrent. "
                 "Each step is a fresh python3")
    lines.append("doing every step above it; the idle torrents are the api section's "
                 f"{TINY_SIZE // 1024} KiB ones, whose data nobody has. PSS and USS")
    lines.append("deltas move with what other processes map the same libraries; anon "
                 "(anonymous pages) is the steadiest per-torrent figure.")
    return lines


def _listing_table(listing):
    load, health, idle = listing["listing"], listing["health"], listing["health_idle"]
    return ["", f"GET /health while {listing['clients']} clients fetch GET /torrents "
            f"({listing['torrents']} torrents, {listing['response_bytes'] / 1024:.0f} KiB) "
            f"for {listing['duration_s']:g} s ({listing['tool']} at nice "
            f"{listing.get('nice', 0)})",
            _row("requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "samples",
                 widths=(24,)),
            _row("GET /torrents", f"{load['req_s']:.0f}", load["p50_ms"], load["p99_ms"],
                 load["max_ms"], load["errors"] + load["non2xx"], load["requests"],
                 widths=(24,)),
            _row("GET /health, idle", "", idle["p50_ms"], idle["p99_ms"], idle["max_ms"], "",
                 idle["samples"], widths=(24,)),
            _row("GET /health, under load", "", health["p50_ms"], health["p99_ms"],
                 health["max_ms"], "", health["samples"], widths=(24,)),
            f"Target: /health p99 under {HEALTH_TARGET_MS:g} ms: "
            + ("met" if health["p99_ms"] is not None and health["p99_ms"] < HEALTH_TARGET_MS
               else "NOT met") + f"; the daemon used {listing['daemon_cpu_pct']}% of a core."]


def _stream_table(stream):
    seeks, health = stream["seeks"], lambda figures: figures["health"]
    rows = [("downloading, unlimited", stream["downloading"]),
            ("from disk", stream["from_disk"])]
    return ["", f"Streaming GET /torrents/{{infohash}}/files/0: {stream['size_mib']} MiB, "
            f"{stream['piece_kib']} KiB pieces, with a token; GET /health every 10 ms",
            _row("read", "MB/s", "1st byte ms", "/health p50", "p99 ms", "max ms",
                 widths=(24,)),
            *(_row(name, figures["mb_s"], figures["first_byte_ms"], health(figures)["p50_ms"],
                   health(figures)["p99_ms"], health(figures)["max_ms"], widths=(24,))
              for name, figures in rows),
            _row(f"{seeks['seeks']} seeks, 1 MiB each", "", seeks["first_byte_ms"]["median"],
                 health(seeks)["p50_ms"], health(seeks)["p99_ms"], health(seeks)["max_ms"],
                 widths=(24,)),
            f"Seeks in a file whose seeder sends {stream['seeker_rate_mb_s']:g} MB/s: first "
            f"byte median {seeks['first_byte_ms']['median']} ms, max "
            f"{seeks['first_byte_ms']['max']} ms; the whole MiB median "
            f"{seeks['whole_ms']['median']} ms; the torrent was at {seeks['progress_after']}% "
            "after the last."]


def _row(*cells, widths=(9,)):
    """Left-align the first cells to widths, right-align the rest to 10 characters."""
    out = []
    for index, cell in enumerate(cells):
        if index < len(widths):
            out.append(str(cell).ljust(widths[index]))
        else:
            out.append(str(cell).rjust(10))
    return " ".join(out)


#: Child modes: the first argument -> the function that runs it (with the second).
CHILDREN = {LIBRARY_CHILD: library_child, MANY_CHILD: many_child,
            SEEDERS_CHILD: seeders_child, LOAD_CHILD: load_child,
            FLOOR_CHILD: floor_child}


if __name__ == "__main__":
    sys.exit(main())
