"""Tests for torrentflow.py: real libtorrent swarms on loopback, no mocks.

Every download test starts a seeding libtorrent session on 127.0.0.1 (TCP only,
discovery off), drives the daemon through its HTTP API, and compares the bytes on
disk with the source. Most tests run the app in-process (make_app with aiohttp's test
client); the persistence tests run ``python torrentflow.py`` as a child process and
send it real signals. Waits poll a condition under a deadline; nothing sleeps blindly.
The one stand-in, for an alert libtorrent loses, says so in its test.

Sections: downloads, pause/resume/delete, status fields, bad input, configuration,
security (token, browser defences, hostile input, OpenAPI), persistence, review edge
cases.
"""

import ast
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.parse
from pathlib import Path

import aiohttp
import libtorrent as lt
import pytest
from aiohttp import FormData, web

import torrentflow

#: Settings for every test peer: loopback only, no discovery, TCP only.
PEER_SETTINGS = {
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
    "alert_mask": 0,
}
#: Generous: the suite shares 2 cores with the seeders.
DEADLINE = 60.0
#: The piece size of the test torrents.
PIECE = 16384
#: The environment of daemons the tests start: without the operator's TORRENTFLOW_*
#: settings, which would change what the tests expect.
CLEAN_ENV = {key: value for key, value in os.environ.items()
             if not key.startswith("TORRENTFLOW_")}


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def make_payload(root, layout):
    """Write random files {relative path: size} under root; return root."""
    for relative, size in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return root


def make_torrent(path, piece_size=16384, version=lt.create_torrent.v1_only, comment=None,
                 tracker=None):
    """Bencoded .torrent bytes for a file or a directory."""
    torrent = lt.create_torrent(lt.list_files(str(path)), piece_size, version)
    if tracker:
        torrent.add_tracker(tracker)
    if comment:
        torrent.set_comment(comment)
        torrent.set_creator("test_torrentflow")
    lt.set_piece_hashes(torrent, str(path.parent))
    return lt.bencode(torrent.generate())


def infohash_of(torrent_bytes):
    hashes = lt.load_torrent_buffer(torrent_bytes).ti.info_hashes()
    return str(hashes.v1) if hashes.has_v1() else str(hashes.v2)


class Seeder:
    """A libtorrent session on loopback that seeds the given torrents."""

    def __init__(self, rate_limit=0):
        self.session = lt.session(PEER_SETTINGS)
        if rate_limit:
            # Loopback peers sit in the local peer class, which ignores session limits.
            self.session.set_peer_class(self.session.local_peer_class_id,
                                        {"upload_limit": rate_limit,
                                         "download_limit": rate_limit})
        self.handles = []

    @property
    def port(self):
        return self.session.listen_port()

    def seed(self, torrent_bytes, data_root):
        params = lt.load_torrent_buffer(torrent_bytes)
        params.save_path = str(data_root)
        params.flags |= lt.torrent_flags.seed_mode  # data is known good: skip hashing
        params.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
        self.handles.append(self.session.add_torrent(params))
        return self

    def magnet(self, torrent_bytes):
        hashes = lt.load_torrent_buffer(torrent_bytes).ti.info_hashes()
        uri = f"magnet:?xt=urn:btih:{hashes.v1}" if hashes.has_v1() else (
            f"magnet:?xt=urn:btmh:1220{hashes.v2}")
        return f"{uri}&x.pe=127.0.0.1:{self.port}"

    def total_upload(self):
        return sum(handle.status().all_time_upload for handle in self.handles)

    def num_peers(self):
        return sum(handle.status().num_peers for handle in self.handles)


class Web:
    """A loopback HTTP server playing tracker and indexer for the daemon under test.

    /announce answers every announce with the seeder's address, /t/NAME serves a
    .torrent, /magnet/NAME redirects to a magnet as Jackett and Prowlarr do, and
    /huge, /silent, /missing misbehave on purpose.
    """

    def __init__(self, seeder):
        self.seeder = seeder
        self.torrents = {}
        self.announces = 0
        self.app = web.Application()
        self.app.add_routes([
            web.get("/announce", self.announce),
            web.get("/t/{name}", self.torrent),
            web.get("/magnet/{name}", self.magnet),
            web.get("/hop/{count}/{name}", self.hop),
            web.get("/slowhop/{count}/{name}", self.slow_hop),
            web.get("/huge", self.huge),
            web.get("/silent", self.silent),
        ])

    def url(self, path):
        return str(self.server.make_url(path))

    async def announce(self, request):
        self.announces += 1
        peer = bytes([127, 0, 0, 1]) + self.seeder.port.to_bytes(2, "big")
        body = lt.bencode({"interval": 1800, "peers": peer})
        return web.Response(body=body, content_type="text/plain")

    async def torrent(self, request):
        return web.Response(body=self.torrents[request.match_info["name"]],
                            content_type="application/x-bittorrent")

    async def magnet(self, request):
        magnet = self.seeder.magnet(self.torrents[request.match_info["name"]])
        raise web.HTTPFound(magnet)

    async def hop(self, request):
        count = int(request.match_info["count"])
        name = request.match_info["name"]
        raise web.HTTPFound(f"/hop/{count - 1}/{name}" if count else f"/t/{name}")

    async def slow_hop(self, request):
        await asyncio.sleep(0.4)
        count = int(request.match_info["count"])
        name = request.match_info["name"]
        raise web.HTTPFound(f"/slowhop/{count - 1}/{name}" if count else f"/t/{name}")

    async def huge(self, request):
        # Chunked, no Content-Length: the daemon must count the bytes itself.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(2000):
            await response.write(b"x" * 65536)
        return response

    async def silent(self, request):
        await asyncio.Event().wait()  # never answers; the daemon's timeout must fire


async def wait_until(condition, deadline=DEADLINE, interval=0.05, what="condition"):
    """Poll an async or sync condition until it returns something truthy."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        await asyncio.sleep(interval)


def same_tree(source_root, target_root, layout):
    """Every file of layout has identical bytes under both roots."""
    for relative in layout:
        a, b = source_root / relative, target_root / relative
        if not b.is_file():
            return False
        if hashlib.sha1(a.read_bytes()).digest() != hashlib.sha1(b.read_bytes()).digest():
            return False
    return True


def daemon_config(tmp_path, *extra):
    return torrentflow.parse_config([
        "--local-only", "--listen-interfaces", "127.0.0.1:0", "--port", "0",
        "--download-dir", str(tmp_path / "downloads"),
        "--state-dir", str(tmp_path / "state"), *extra], environ={})


async def add(client, expect=(201,), **fields):
    """POST /torrents as multipart; torrent_file given as bytes becomes an upload."""
    form = FormData()
    for name, value in fields.items():
        if name == "torrent_file":
            form.add_field(name, value, filename="x.torrent",
                           content_type="application/x-bittorrent")
        else:
            form.add_field(name, value)
    response = await client.post("/torrents", data=form)
    body = await response.json()
    assert response.status in expect, (response.status, body)
    return response, body


async def error_of(response, status, words=""):
    """The detail of an error answer, checked: its status, the one error shape, and
    words (case-insensitive) in the detail."""
    body = await response.json()
    assert response.status == status, (response.status, body)
    assert response.content_type == "application/json"
    assert set(body) == {"detail"} and body["detail"], body
    assert words.lower() in body["detail"].lower(), body
    return body["detail"]


async def status_of(client, infohash):
    response = await client.get(f"/torrents/{infohash}")
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_status(client, infohash, predicate, deadline=DEADLINE, what=None):
    """Poll a torrent's status until predicate(status) holds; return that status."""
    async def check():
        status = await status_of(client, infohash)
        return status if predicate(status) else None
    return await wait_until(check, deadline, what=what or f"{infohash} to change")


async def wait_complete(client, infohash, deadline=DEADLINE):
    async def done():
        status = await status_of(client, infohash)
        files_done = status["files"] and all(
            f["downloaded"] == f["size"] for f in status["files"])
        return status if status["progress"] == 100 and status["is_seeding"] and files_done \
            else None
    return await wait_until(done, deadline, what=f"{infohash} to complete")


async def slow_download(client, tmp_path, name, size, rate, **fields):
    """A download by magnet from a loopback seeder held to rate bytes/s: (seeder,
    source root, layout, infohash), once the add is answered."""
    layout = {name: size}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / name)
    seeder = Seeder(rate_limit=rate).seed(torrent, source)
    _, body = await add(client, torrent_url=seeder.magnet(torrent), **fields)
    return seeder, source, layout, body["infohash"]


async def downloaded(client, seeder, source):
    """Seed source/single.bin, download it through the API by magnet; its infohash."""
    torrent = make_torrent(source / "single.bin")
    seeder.seed(torrent, source)
    _, body = await add(client, torrent_url=seeder.magnet(torrent))
    await wait_complete(client, body["infohash"])
    return body["infohash"]


@pytest.fixture
def payload(tmp_path):
    layout = {"single.bin": 3 * 1024 * 1024 + 123}
    return make_payload(tmp_path / "source", layout), layout


async def loaded(client):
    """A client of a daemon that has its saved torrents back (till then unknown ids: 503)."""
    await wait_until(lambda: not client.app[torrentflow.ENGINE].loading,
                     what="the saved torrents to load")
    return client


@pytest.fixture
async def daemon(tmp_path, aiohttp_client):
    return await loaded(await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path))))


@pytest.fixture
def seeder():
    seeder = Seeder()
    yield seeder
    del seeder.session


@pytest.fixture
async def swarm(seeder, aiohttp_server):
    site = Web(seeder)
    site.server = await aiohttp_server(site.app)
    return site


# --------------------------------------------------------------------------- #
# Downloads through every add method
# --------------------------------------------------------------------------- #

async def test_upload_downloads_the_exact_bytes(daemon, swarm, payload, tmp_path):
    source, layout = payload
    torrent = make_torrent(source / "single.bin", tracker=swarm.url("/announce"))
    swarm.seeder.seed(torrent, source)
    response, body = await add(daemon, torrent_file=torrent)
    infohash = infohash_of(torrent)
    assert body == {"infohash": infohash}
    assert response.headers["Location"] == f"/torrents/{infohash}"
    # 201 promises the torrent survives a crash: it is on disk before the answer.
    saved = lt.read_resume_data((tmp_path / "state" / "resume" / f"{infohash}.resume")
                                .read_bytes())
    assert str(saved.info_hashes.v1) == infohash and saved.ti is not None
    status = await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads", layout)
    assert swarm.announces >= 1
    assert status["files"] == [{"index": 0, "path": "single.bin", "size": layout["single.bin"],
                                "downloaded": layout["single.bin"], "progress": 100.0,
                                "priority": 4}]


async def test_magnet_with_peer_downloads_a_nested_multi_file_torrent(daemon, seeder, tmp_path):
    layout = {"album/cd1/track1.bin": 700_001, "album/cd1/track2.bin": 65_536,
              "album/cd2/deep/track3.bin": 1_200_000, "album/notes.txt": 17}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "album")
    seeder.seed(torrent, source)
    response, body = await add(daemon, torrent_url=seeder.magnet(torrent), save_path="music")
    assert response.status == 201
    status = await wait_complete(daemon, body["infohash"])
    assert same_tree(source, tmp_path / "downloads" / "music", layout)
    assert status["num_files"] == 4
    assert sorted(f["path"] for f in status["files"]) == sorted(layout)
    assert status["save_path"] == str((tmp_path / "downloads" / "music").resolve())
    assert status["name"] == "album"


@pytest.mark.parametrize("path, tracked", [
    ("/hop/2/one", True),    # a .torrent behind two redirects; the tracker names the seeder
    ("/magnet/one", False),  # a redirect to a magnet, as indexers do; x.pe names the seeder
])
async def test_http_url_downloads(daemon, swarm, payload, tmp_path, path, tracked):
    source, layout = payload
    swarm.torrents["one"] = make_torrent(source / "single.bin",
                                         tracker=swarm.url("/announce") if tracked else None)
    swarm.seeder.seed(swarm.torrents["one"], source)
    _, body = await add(daemon, torrent_url=swarm.url(path))
    assert body["infohash"] == infohash_of(swarm.torrents["one"])
    await wait_complete(daemon, body["infohash"])
    assert same_tree(source, tmp_path / "downloads", layout)
    assert (swarm.announces > 0) is tracked


async def test_json_body_adds_a_magnet(daemon, seeder, payload, tmp_path):
    source, layout = payload
    torrent = make_torrent(source / "single.bin")
    seeder.seed(torrent, source)
    response = await daemon.post("/torrents", json={"torrent_url": seeder.magnet(torrent),
                                                    "save_path": "from-json"})
    assert response.status == 201
    infohash = (await response.json())["infohash"]
    await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads" / "from-json", layout)


async def test_urlencoded_form_adds_a_magnet_and_duplicates_answer_200(daemon, seeder, payload):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    seeder.seed(torrent, source)
    form = {"torrent_url": seeder.magnet(torrent)}
    first = await daemon.post("/torrents", data=form)
    assert first.status == 201
    infohash = (await first.json())["infohash"]
    await wait_complete(daemon, infohash)
    # The same torrent again, by magnet and by upload: 200, same id, still one torrent.
    again = await daemon.post("/torrents", data=form)
    assert again.status == 200 and (await again.json()) == {"infohash": infohash}
    _, body = await add(daemon, expect=(200,), torrent_file=torrent)
    assert body == {"infohash": infohash}
    listing = await (await daemon.get("/torrents")).json()
    assert [t["infohash"] for t in listing["torrents"]] == [infohash]


async def test_concurrent_duplicate_adds_make_one_torrent(daemon, payload):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    results = await asyncio.gather(*(add(daemon, expect=(200, 201), torrent_file=torrent)
                                     for _ in range(5)))
    statuses = sorted(response.status for response, _ in results)
    assert statuses == [200, 200, 200, 200, 201]
    assert {body["infohash"] for _, body in results} == {infohash_of(torrent)}
    listing = await (await daemon.get("/torrents")).json()
    assert len(listing["torrents"]) == 1


async def test_a_library_with_its_data_present_is_checked_in_seconds(daemon, tmp_path,
                                                                      monkeypatch):
    """200 torrents whose files are already in place all reach seeding quickly:
    libtorrent's queue alone would start one check a second (about 200 s)."""
    source, count = tmp_path / "downloads", 200
    torrents = []
    for number in range(count):
        root = make_payload(source, {f"lib{number}.bin": 32 * 1024 + number})
        torrents.append(make_torrent(root / f"lib{number}.bin"))
    for torrent in torrents:
        await add(daemon, torrent_file=torrent)
    started = time.monotonic()

    async def all_seeding():
        listing = await (await daemon.get("/torrents?fields=state")).json()
        return listing["total"] == count and all(
            t["state"] == "seeding" for t in listing["torrents"])
    await wait_until(all_seeding, deadline=30, what=f"{count} torrents to be checked")
    print(f"{count} present torrents seeding {time.monotonic() - started:.1f} s after the "
          "last add")

    # The full listing is a large answer: written a few at a time, in pieces (smaller
    # here, so that 200 torrents make several). More readers than LARGE_AT_ONCE all get
    # the whole body, with its length announced.
    monkeypatch.setattr(torrentflow, "WRITE_PIECE", 64 * 1024)
    async def full_listing():
        response = await daemon.get("/torrents")
        body = await response.read()
        assert int(response.headers["Content-Length"]) == len(body)
        return body
    bodies = await asyncio.gather(*(full_listing()
                                    for _ in range(torrentflow.LARGE_AT_ONCE * 2)))
    assert len(bodies[0]) > torrentflow.LARGE_BODY > torrentflow.WRITE_PIECE
    for body in bodies:
        listing = json.loads(body)
        assert listing["total"] == count and len(listing["torrents"]) == count

    # Past LARGE_LISTING torrents, a fields= listing is built on a thread and serialised
    # in slices (smaller here, so that they are many and uneven): the same answer.
    path = "/torrents?fields=infohash,name,state,progress"
    on_the_loop = await (await daemon.get(path)).json()
    monkeypatch.setattr(torrentflow, "LARGE_LISTING", count // 2)
    monkeypatch.setattr(torrentflow, "JSON_SLICE", 7)
    assert await (await daemon.get(path)).json() == on_the_loop
    with_files = await (await daemon.get(path + ",files")).json()
    for listed in with_files["torrents"][::50]:
        alone = await status_of(daemon, listed["infohash"])
        assert listed["files"] == alone["files"] and len(alone["files"]) == 1


# --------------------------------------------------------------------------- #
# Pause, resume, delete
# --------------------------------------------------------------------------- #

async def test_the_queue_runs_as_many_downloads_as_allowed_and_each_hands_on(daemon, tmp_path):
    """max_active_downloads 1: the rest wait queued, never two download at once, and
    each finished download hands its place to the next (the daemon starts it at once
    rather than on libtorrent's tick; how much sooner is the benchmark's many section)."""
    assert (await daemon.patch("/settings", json={"max_active_downloads": 1})).status == 200
    layout = {f"queued{n}.bin": 1024 * 1024 + n for n in range(4)}
    source = make_payload(tmp_path / "source", layout)
    seeder = Seeder(rate_limit=4_000_000)
    for name in layout:
        torrent = make_torrent(source / name)
        await add(daemon, torrent_url=seeder.seed(torrent, source).magnet(torrent))
    seen = {"queued": 0, "running": 0}

    async def all_finished_one_at_a_time():
        listing = await (await daemon.get(
            "/torrents?fields=name,queued,paused,is_finished")).json()
        running = [t for t in listing["torrents"] if not t["paused"] and not t["is_finished"]]
        assert len(running) <= 1, listing
        seen["queued"] = max(seen["queued"], sum(t["queued"] for t in listing["torrents"]))
        seen["running"] = max(seen["running"], len(running))
        return all(t["is_finished"] for t in listing["torrents"])
    await wait_until(all_finished_one_at_a_time, what="four queued downloads to finish")
    assert seen["queued"] >= 3 and seen["running"] == 1, seen
    await wait_until(lambda: same_tree(source, tmp_path / "downloads", layout),
                     what="the files to match")


async def test_pause_stops_transfer_and_resume_completes(daemon, tmp_path):
    seeder, source, layout, infohash = await slow_download(
        daemon, tmp_path, "slow.bin", 2 * 1024 * 1024, 400_000)
    await wait_status(daemon, infohash, lambda s: s["progress"] > 5, what="some progress")

    response = await daemon.put(f"/torrents/{infohash}/pause")
    assert response.status == 200 and "paused" in (await response.json())["detail"]
    status = await status_of(daemon, infohash)
    assert status["paused"] is True and status["auto_managed"] is False
    # Pausing disconnects the peer. The seeder's counter lags up to a second, so wait
    # for it to settle; a running transfer (400 kB/s) never would.
    await wait_until(lambda: seeder.num_peers() == 0, deadline=10,
                     what="the seeder to lose its peer")
    await wait_until(lambda: _settled(seeder.total_upload), deadline=15,
                     what="the seeder's upload counter to stop")
    held_upload, held_done = payload_sent(seeder), (await status_of(daemon, infohash))
    # Pausing again is fine, and each pause waits for a fresh status from libtorrent's
    # thread: two of them are two status ticks over which nothing may move.
    for _ in range(2):
        assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
    assert payload_sent(seeder) == held_upload and seeder.num_peers() == 0
    status = await status_of(daemon, infohash)
    assert status["total_done"] == held_done["total_done"] and status["progress"] < 100

    response = await daemon.put(f"/torrents/{infohash}/resume")
    assert response.status == 200 and "resumed" in (await response.json())["detail"]
    status = await status_of(daemon, infohash)
    assert status["paused"] is False and status["auto_managed"] is True
    seeder.session.set_peer_class(seeder.session.local_peer_class_id,
                                  {"upload_limit": 0, "download_limit": 0})
    await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads", layout)
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200


async def _settled(read, window=1.2):
    """True when read() gives the same value before and after a window."""
    before = read()
    await asyncio.sleep(window)
    return read() == before


@pytest.mark.parametrize("delete_files", [False, True])
async def test_delete_removes_the_torrent_and_optionally_its_files(
        daemon, seeder, payload, tmp_path, delete_files):
    infohash = await downloaded(daemon, seeder, payload[0])
    query = "?delete_files=true" if delete_files else ""
    # Two at once (a double click): one removes it, the other finds it gone.
    response, twin = await asyncio.gather(daemon.delete(f"/torrents/{infohash.upper()}{query}"),
                                          daemon.delete(f"/torrents/{infohash}{query}"))
    assert sorted((response.status, twin.status)) == [200, 404]
    if response.status == 404:
        response = twin
    assert response.status == 200, await response.text()
    ring = daemon.app[torrentflow.EVENTS].ring
    assert [event["type"] for event in ring].count("removed") == 1
    assert infohash in (await response.json())["detail"]
    # Confirmed removal: gone from the API at once, files gone or kept as asked.
    assert (await daemon.get(f"/torrents/{infohash}")).status == 404
    assert (await (await daemon.get("/torrents")).json()) == {"torrents": [], "total": 0}
    assert (tmp_path / "downloads" / "single.bin").exists() is not delete_files
    assert not list((tmp_path / "state" / "resume").iterdir())
    assert (await daemon.delete(f"/torrents/{infohash}")).status == 404


async def test_a_delete_whose_files_stay_says_so(small_disk, tmp_path, aiohttp_client):
    daemon = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--allowed-save-root", str(small_disk))))
    source = make_payload(small_disk, {"kept.bin": 100_000})
    _, body = await add(daemon, torrent_file=make_torrent(source / "kept.bin"),
                        save_path=str(small_disk))
    await wait_complete(daemon, body["infohash"])
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    response = await daemon.delete(f"/torrents/{body['infohash']}?delete_files=true")
    assert response.status == 200  # removed, but not "and its files":
    assert "could not be deleted" in (await response.json())["detail"]
    assert (small_disk / "kept.bin").exists()
    assert (await daemon.get(f"/torrents/{body['infohash']}")).status == 404

# --------------------------------------------------------------------------- #
# Status fields and their types
# --------------------------------------------------------------------------- #

METADATA_FIELDS = ("total_pieces", "total_size", "num_files", "creation_date", "creator",
                   "comment", "piece_length", "files")


def assert_status(status):
    """The status has every field of torrentflow.STATUS, each of its type, and no other."""
    validate(torrentflow.openapi_document(), {"$ref": "#/components/schemas/Status"}, status)


async def test_every_field_has_its_type_for_a_complete_torrent(daemon, swarm, payload):
    source, layout = payload
    torrent = make_torrent(source / "single.bin", comment="test payload",
                           tracker=swarm.url("/announce"))
    swarm.seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_file=torrent)
    status = await wait_complete(daemon, body["infohash"])
    assert_status(status)
    assert status["state"] == "seeding" and status["progress"] == 100
    assert status["total_size"] == layout["single.bin"] == status["total_wanted"]
    assert status["total_pieces"] == status["num_pieces"] == -(-layout["single.bin"] // 16384)
    assert status["comment"] == "test payload" and status["creator"] == "test_torrentflow"
    assert status["piece_length"] == 16384 and status["num_files"] == 1
    assert status["info_hash_v1"] == body["infohash"] and status["info_hash_v2"] is None
    assert abs(status["added_time"] - time.time()) < 120
    assert status["completed_time"] >= status["added_time"]
    assert status["last_scrape"] is not None and status["error"] == ""
    assert status["storage_mode"] == "sparse"


async def test_magnet_without_metadata_answers_200_with_nulls(daemon, payload):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    infohash = infohash_of(torrent)
    # x.pe names a port where nobody listens: the metadata can never arrive.
    magnet = f"magnet:?xt=urn:btih:{infohash.upper()}&dn=waiting&x.pe=127.0.0.1:9"
    _, body = await add(daemon, torrent_url=magnet)
    assert body == {"infohash": infohash}
    status = await status_of(daemon, infohash)
    assert_status(status)
    assert status["has_metadata"] is False and status["state"] == "downloading_metadata"
    assert status["name"] == "waiting"
    assert all(status[name] is None for name in METADATA_FIELDS)
    listing = await (await daemon.get("/torrents")).json()
    assert [t["infohash"] for t in listing["torrents"]] == [infohash]


async def test_hashes_are_case_insensitive_and_malformed_ones_are_400(daemon, payload):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    _, body = await add(daemon, torrent_file=torrent)
    infohash = body["infohash"]
    assert infohash == infohash.lower()
    assert (await status_of(daemon, infohash.upper()))["infohash"] == infohash
    for bad in ("xyz", infohash[:-1], infohash + "0", "g" * 40, "-" * 64):
        for method, path in (("GET", f"/torrents/{bad}"), ("DELETE", f"/torrents/{bad}"),
                             ("PUT", f"/torrents/{bad}/pause"),
                             ("PUT", f"/torrents/{bad}/resume")):
            response = await daemon.request(method, path)
            assert response.status == 400, (method, path)
            assert "hexadecimal" in (await response.json())["detail"]
    unknown = "0" * 40
    for method, path in (("GET", f"/torrents/{unknown}"), ("DELETE", f"/torrents/{unknown}"),
                         ("PUT", f"/torrents/{unknown}/pause"),
                         ("PUT", f"/torrents/{unknown}/resume"),
                         ("GET", f"/torrents/{'0' * 64}")):
        response = await daemon.request(method, path)
        assert response.status == 404 and "no torrent" in (await response.json())["detail"]


@pytest.mark.parametrize("version", ["hybrid", "v2"])
async def test_v2_and_hybrid_torrents_download_and_answer_to_their_hashes(
        daemon, seeder, tmp_path, version):
    layout = {"pack/a.bin": 300_000, "pack/b.bin": 1_000_000}
    source = make_payload(tmp_path / "source", layout)
    flags = 0 if version == "hybrid" else lt.create_torrent.v2_only
    torrent = make_torrent(source / "pack", version=flags)
    hashes = lt.load_torrent_buffer(torrent).ti.info_hashes()
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    if version == "hybrid":
        assert body["infohash"] == str(hashes.v1)  # the v1 hash is canonical
    else:
        assert body["infohash"] == str(hashes.v2) and len(body["infohash"]) == 64
    status = await wait_complete(daemon, body["infohash"])
    assert same_tree(source, tmp_path / "downloads", layout)
    assert status["num_files"] == 2  # pad files are not files, nor counted in sizes
    assert status["total_size"] == sum(layout.values())
    assert sorted(f["path"] for f in status["files"]) == sorted(layout)
    assert status["info_hash_v2"] == str(hashes.v2)
    v2_status = await status_of(daemon, str(hashes.v2).upper())
    assert v2_status["infohash"] == body["infohash"]
    # qBittorrent lists v2 and hybrid torrents by the v2 hash cut to 40 digits.
    assert (await status_of(daemon, str(hashes.v2)[:40]))["infohash"] == body["infohash"]
    if version == "hybrid":
        assert status["info_hash_v1"] == str(hashes.v1)
        # Adding it again by its other hash is the same torrent.
        again = await daemon.post("/torrents", data={
            "torrent_url": f"magnet:?xt=urn:btmh:1220{hashes.v2}"})
        assert again.status == 200 and (await again.json())["infohash"] == body["infohash"]


# --------------------------------------------------------------------------- #
# Bad input: a clear 4xx, and nothing broken
# --------------------------------------------------------------------------- #

async def test_bad_add_requests_are_4xx(daemon, swarm, payload, tmp_path):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    cases = [
        (dict(data={}), 400, "exactly one"),
        (dict(data={"save_path": "x"}), 400, "exactly one"),
        (dict(json={"torrent_url": "magnet:?xt=urn:btih:zz"}), 400, "invalid magnet"),
        (dict(json={"torrent_url": "magnet:?dn=nohash"}), 400, "invalid magnet"),
        (dict(json={"torrent_url": "ftp://127.0.0.1/x.torrent"}), 400, "http"),
        (dict(json={"torrent_url": "file:///etc/passwd"}), 400, "http"),
        (dict(json={"torrent_url": 5}), 400, "must be a string"),
        (dict(json=["torrent_url"]), 400, "object"),
        (dict(json={"torrent_url": "magnet:?xt=urn:btih:" + "a" * 40, "colour": "red"}),
         400, "unknown field"),
        (dict(data="{not json", headers={"Content-Type": "application/json"}), 400,
         "malformed json"),
        (dict(data='{"torrent_url": "magnet:?xt=urn:btih:' + "a" * 40 + '", "torrent_url": '
              '"magnet:?xt=urn:btih:' + "b" * 40 + '"}', headers={
                  "Content-Type": "application/json"}), 400, "repeated"),
        (dict(data=b"torrent", headers={"Content-Type": "text/plain"}), 415, "multipart"),
        (dict(json={"torrent_url": swarm.url("/missing")}), 502, "http 404"),
        (dict(json={"torrent_url": swarm.url("/hop/9/x")}), 502, "redirects"),
        (dict(json={"torrent_url": swarm.url("/huge")}), 413, "more than"),
        (dict(json={"torrent_url": "http://127.0.0.1:9/x.torrent"}), 502, "failed"),
        (dict(json={"torrent_url": MAGNET, "save_path": "a" * 300}), 400, "cannot be used"),
        (dict(json={"torrent_url": MAGNET, "download_limit": 10 ** 400}), 422, "from 0"),
        (dict(data={"torrent_url": MAGNET, "download_limit": "fast"}), 400,
         "download_limit must be a whole number"),
        (dict(data={"torrent_url": MAGNET, "ratio_limit": "high"}), 400,
         "ratio_limit must be a number"),
    ]
    for request, status, words in cases:
        await error_of(await daemon.post("/torrents", **request), status, words)
    for garbage in (b"", b"garbage", b"d4:infod6:lengthi-5eee", torrent[:-10]):
        if garbage:
            response, _ = await add(daemon, expect=(422,), torrent_file=garbage)
            await error_of(response, 422, "not a valid torrent")
    response, _ = await add(daemon, expect=(400,), torrent_file=torrent,
                            torrent_url="magnet:?xt=urn:btih:" + "a" * 40)
    await error_of(response, 400, "exactly one")
    response, _ = await add(daemon, expect=(413,),
                            torrent_file=b"x" * (torrentflow.MAX_REQUEST_BYTES + 1))
    await error_of(response, 413, "too large")
    # None of that left a torrent behind or broke the daemon.
    assert (await (await daemon.get("/torrents")).json()) == {"torrents": [], "total": 0}
    await add(daemon, torrent_file=torrent)
    # libtorrent takes a "files" that is not a list as a single-file torrent.
    await add(daemon, torrent_file=b"d4:infod5:filesi1e6:lengthi1e4:name1:a12:piece lengthi"
              b"16384e6:pieces20:" + b"A" * 20 + b"ee")


async def test_a_url_that_never_answers_times_out(tmp_path, aiohttp_client, swarm):
    client = await aiohttp_client(torrentflow.make_app(
        daemon_config(tmp_path, "--fetch-timeout", "1")))
    response = await client.post("/torrents", json={"torrent_url": swarm.url("/silent")})
    await error_of(response, 502, "timed out")


async def test_routes_methods_and_query_errors_share_the_error_shape(daemon, payload):
    await error_of(await daemon.get("/nope"), 404, "not found")
    response = await daemon.post("/torrents/" + "a" * 40)
    await error_of(response, 405, "not allowed")
    assert "GET" in response.headers["Allow"]
    await error_of(await daemon.get("/torrents/" + "a" * 40 + "/pause"), 405, "not allowed")
    source, _ = payload
    _, body = await add(daemon, torrent_file=make_torrent(source / "single.bin"))
    response = await daemon.delete(f"/torrents/{body['infohash']}?delete_files=maybe")
    await error_of(response, 400, "delete_files")
    assert (await daemon.get(f"/torrents/{body['infohash']}")).status == 200


async def test_health_answers_with_the_bittorrent_port(daemon):
    response = await daemon.get("/health")
    assert response.status == 200
    health = await response.json()
    assert health["status"] == "ok" and health["torrents"] == 0
    # The port is the real one: a peer can connect to it.
    reader, writer = await asyncio.open_connection("127.0.0.1", health["listen_port"])
    writer.close()
    await writer.wait_closed()


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

def test_config_reads_flags_then_environment_then_defaults(tmp_path):
    environ = {"TORRENTFLOW_PORT": "9000", "TORRENTFLOW_DHT": "0", "TORRENTFLOW_LSD": "1",
               "TORRENTFLOW_DOWNLOAD_DIR": str(tmp_path)}
    config = torrentflow.parse_config(["--port", "9001"], environ)
    assert config.port == 9001 and config.download_dir == tmp_path
    assert config.dht is False and config.lsd is True and config.upnp is False
    defaults = torrentflow.parse_config([], {})
    assert defaults == torrentflow.Config()
    assert defaults.host == "127.0.0.1" and defaults.dht is True
    assert defaults.listen_interfaces == "0.0.0.0:6881,[::]:6881"


def test_local_only_turns_everything_off_and_stays_on_loopback():
    config = torrentflow.parse_config([], {"TORRENTFLOW_LOCAL_ONLY": "1"})
    assert (config.dht, config.lsd, config.upnp, config.natpmp) == (False,) * 4
    assert config.listen_interfaces == "127.0.0.1:6881"
    settings = torrentflow.session_settings(config)
    assert settings["enable_dht"] is False and settings["listen_interfaces"].startswith("127.")


@pytest.mark.parametrize("argv, environ", [
    (["--port", "70000"], {}),
    (["--port", "http"], {}),
    ([], {"TORRENTFLOW_PORT": "-1"}),
    ([], {"TORRENTFLOW_DHT": "maybe"}),
    (["--local-only", "--dht"], {}),
    (["--local-only", "--listen-interfaces", "0.0.0.0:6881"], {}),
    (["--listen-interfaces", "nonsense"], {}),
    (["--save-interval", "0"], {}),
    (["--log-level", "loud"], {}),
])
def test_bad_config_exits_with_a_message(argv, environ, capsys):
    with pytest.raises(SystemExit) as exit_info:
        torrentflow.parse_config(argv, environ)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


async def test_local_only_blocks_peers_outside_loopback(daemon):
    """The session's IP filter refuses any address but 127/8 and ::1."""
    engine = daemon.app[torrentflow.ENGINE]
    ip_filter = engine._session.get_ip_filter()
    assert ip_filter.access("127.0.0.1") == 0 and ip_filter.access("::1") == 0
    assert ip_filter.access("10.0.0.1") == 1 and ip_filter.access("8.8.8.8") == 1
    assert ip_filter.access("2001:db8::1") == 1


async def test_adding_during_a_delete_waits_and_adds_afresh(daemon, payload, tmp_path):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    _, body = await add(daemon, torrent_file=torrent)
    infohash = body["infohash"]
    # Drive the engine directly: over HTTP the removal may finish before the add arrives.
    engine = daemon.app[torrentflow.ENGINE]
    entry = engine.lookup(infohash)
    removing = asyncio.ensure_future(engine.remove(entry, False))
    await asyncio.sleep(0)  # one step of the event loop: remove() posts before it awaits
    assert entry.removing and not removing.done()
    params = torrentflow.params_from_torrent(torrent)
    params.save_path = str(tmp_path / "downloads")
    assert await engine.add(params) == (infohash, True)
    assert removing.done()
    assert (await status_of(daemon, infohash))["infohash"] == infohash
    assert (tmp_path / "state" / "resume" / f"{infohash}.resume").exists()


async def test_lifecycle_events_are_logged_once_with_name_and_infohash(daemon, seeder,
                                                                       payload, caplog):
    caplog.set_level("INFO", logger="torrentflow")
    infohash = await downloaded(daemon, seeder, payload[0])
    for action in ("pause", "resume"):
        assert (await daemon.put(f"/torrents/{infohash}/{action}")).status == 200
    assert (await daemon.delete(f"/torrents/{infohash}")).status == 200

    def events():
        return [r.getMessage().split(" ")[0] for r in caplog.records
                if r.name == "torrentflow" and infohash in r.getMessage()
                and not r.getMessage().startswith("state ")]
    # What happened, once each, in order: no "resumed" after the add, no "paused"
    # when the download finishes.
    await wait_until(lambda: "removed" in events(), deadline=10, what="the removal logged")
    assert events() == ["added", "metadata", "finished", "paused", "resumed", "removed"]
    lines = [r.getMessage() for r in caplog.records if r.name == "torrentflow"]
    assert any(line.startswith(f"finished single.bin ({infohash})") for line in lines)
    assert not any(r.levelname == "ERROR" for r in caplog.records), lines


async def test_listing_filters_sorts_pages_and_selects_fields(daemon, tmp_path):
    infohashes = []
    for number in range(5):
        root = make_payload(tmp_path / f"src{number}", {f"file{number}.bin": 20_000 + number})
        _, body = await add(daemon, torrent_file=make_torrent(root / f"file{number}.bin"))
        infohashes.append(body["infohash"])
    await daemon.put(f"/torrents/{infohashes[1]}/pause")
    await daemon.put(f"/torrents/{infohashes[3]}/pause")

    async def listing(query):
        response = await daemon.get(f"/torrents?{query}")
        assert response.status == 200, await response.text()
        return await response.json()

    everything = await listing("")
    assert everything["total"] == 5 and len(everything["torrents"]) == 5
    by_name = await listing("sort=-name&fields=name,infohash")
    assert [t["name"] for t in by_name["torrents"]] == [f"file{n}.bin" for n in (4, 3, 2, 1, 0)]
    assert all(set(t) == {"name", "infohash"} for t in by_name["torrents"])
    page = await listing("sort=name&offset=1&limit=2&fields=infohash")
    assert page == {"torrents": [{"infohash": infohashes[1]}, {"infohash": infohashes[2]}],
                    "total": 5}
    # Peerless torrents may sit in libtorrent's queue, which also counts as paused.
    paused = await listing("paused=true&fields=infohash,paused,queued")
    assert {infohashes[1], infohashes[3]} <= {t["infohash"] for t in paused["torrents"]}
    assert paused["total"] == sum(t["paused"] for t in everything["torrents"])
    running = await listing("paused=false&fields=paused")
    assert running["total"] == 5 - paused["total"]
    assert all(t == {"paused": False} for t in running["torrents"])
    states = {t["state"] for t in everything["torrents"]}
    some_state = sorted(states)[0]
    filtered = await listing(f"state={some_state},seeding")
    assert filtered["total"] == sum(t["state"] in (some_state, "seeding")
                                    for t in everything["torrents"])
    for bad in ("state=bogus", f"state={some_state},bogus"):
        detail = await error_of(await daemon.get(f"/torrents?{bad}"), 400, "bogus")
        assert "downloading" in detail and "seeding" in detail  # the valid ones
    for bad in ("sort=colour", "fields=name,colour", "fields=-name", "limit=-1", "limit=x",
                "offset=1.5", "paused=maybe", "colour=red", "fields="):
        await error_of(await daemon.get(f"/torrents?{bad}"), 400, "")
    # One torrent: fields= as in the list, nothing else.
    one = await (await daemon.get(f"/torrents/{infohashes[0]}?fields=name,files")).json()
    assert one == {"name": "file0.bin", "files": one["files"]} and len(one["files"]) == 1
    for bad in ("fields=colour", "colour=red", "state=seeding"):
        await error_of(await daemon.get(f"/torrents/{infohashes[0]}?{bad}"), 400, "")
    # A query string that holds no parameter is no query (it was a 500).
    whole = await (await daemon.get(f"/torrents/{infohashes[0]}")).json()
    for empty in ("?", "?&", "?&&"):
        answer = await daemon.get(f"/torrents/{infohashes[0]}{empty}")
        assert answer.status == 200 and (await answer.json()).keys() == whole.keys()


# --------------------------------------------------------------------------- #
# Security: token, browser defences, hostile input, OpenAPI
# --------------------------------------------------------------------------- #

TOKEN = "s3cret-Token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAGNET = "magnet:?xt=urn:btih:" + "ab" * 20
PROTECTED = [("GET", "/torrents"), ("POST", "/torrents"), ("GET", "/torrents/" + "ab" * 20),
             ("DELETE", "/torrents/" + "ab" * 20), ("PUT", f"/torrents/{'ab' * 20}/pause"),
             ("PUT", f"/torrents/{'ab' * 20}/resume")]


@pytest.fixture
async def guarded(tmp_path, aiohttp_client):
    """A daemon with a token; the client sends none unless told to."""
    # Its own state directory: a test may run it beside the daemon fixture.
    return await loaded(await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--token", TOKEN, "--state-dir", str(tmp_path / "guarded-state")))))


# --------------------------------------------------------------------------- #
# Token authentication
# --------------------------------------------------------------------------- #

async def test_every_route_but_health_and_spec_needs_the_token(guarded):
    for method, path in PROTECTED:
        response = await guarded.request(method, path)
        assert "Authorization" in await error_of(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/health", "/openapi.json"):
        assert (await guarded.get(path)).status == 200
    # A path no route has says so before any token is asked for (stig reported a wrong
    # URL as "Authentication failed"); the route table is public in /openapi.json.
    for method, path in (("GET", "/nowhere"), ("POST", "/rpc"), ("GET", "/transmission/x"),
                         ("GET", "/x%0Ay")):
        basic = "Basic " + base64.b64encode(b"user:wrong-password").decode()
        for headers in ({}, {"Authorization": basic}):
            response = await guarded.request(method, path, headers=headers)
            await error_of(response, 404)
    await error_of(await guarded.request("PATCH", "/health"), 405)
    # HEAD as GET, without a body (monitors probe so); a token is asked for as by GET.
    async with guarded.head("/health") as response:
        assert response.status == 200 and await response.read() == b""
    assert (await guarded.head("/torrents")).status == 401
    assert (await guarded.head("/torrents", headers=AUTH)).status == 200


async def _head_then_health(client, path):
    """HEAD path, then GET /health on the same connection: both answers, as raw bytes."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health HTTP/1.1\r\n"
                 "Host: localhost\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


async def test_head_sends_no_body_and_holds_nothing(daemon, monkeypatch):
    """HEAD of a large answer (written in pieces) sent the body anyway, and the next
    request on the connection read it as its status line; HEAD /events opened a stream,
    took a subscriber's place and held the connection."""
    monkeypatch.setattr(torrentflow, "LARGE_BODY", 100)  # the listing below is larger
    _, body = await add(daemon, torrent_url=MAGNET)
    answer = await _head_then_health(daemon, "/torrents")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head, answer
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.partition(b"\r\n\r\n")[2].startswith(
        b'{"status": "ok"'), answer
    answer = await _head_then_health(daemon, "/events")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, answer
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.partition(b"\r\n\r\n")[2].startswith(
        b'{"status": "ok"'), answer
    assert not daemon.app[torrentflow.EVENTS].subscribers


async def test_a_wrong_token_is_refused_and_the_right_one_accepted(guarded):
    for header in (f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN,
                   "Bearer", "Bearer caf\u00e9-not-ascii-at-all"):
        response = await guarded.get("/torrents", headers={"Authorization": header})
        await error_of(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await guarded.get("/torrents", headers={"Authorization": "Bearer wrong"})
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    for header in (f"Bearer {TOKEN}", f"bearer  {TOKEN} "):
        response = await guarded.get("/torrents", headers={"Authorization": header})
        assert response.status == 200 and (await response.json())["torrents"] == []
    response = await guarded.post("/torrents", json={"torrent_url": MAGNET}, headers=AUTH)
    assert response.status == 201


async def test_token_file_is_read_once_and_stripped(tmp_path, aiohttp_client):
    secret = tmp_path / "secret"
    secret.write_text(TOKEN + "\n")
    config = daemon_config(tmp_path, "--token-file", str(secret))
    assert config.token == TOKEN
    from_env = torrentflow.parse_config([], {"TORRENTFLOW_TOKEN_FILE": str(secret)})
    assert from_env.token == TOKEN
    secret.write_text("changed-after-start-0123456789")
    client = await aiohttp_client(torrentflow.make_app(config))
    assert (await client.get("/torrents")).status == 401
    assert (await client.get("/torrents", headers=AUTH)).status == 200


@pytest.mark.parametrize("argv", [
    ["--token-file", "/nonexistent/secret"],
    ["--token-file", "{empty}"],
    ["--token", TOKEN, "--token-file", "{empty}"],
    ["--token", "short"],
    ["--token", "has a space in the middle"],
    ["--token", ""],
])
def test_bad_tokens_stop_the_start(argv, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        torrentflow.parse_config([a.replace("{empty}", str(empty)) for a in argv], {})


@pytest.mark.parametrize("host", ["", "example.com", "localhost.", "127.0.0.1.nip.io"])
def test_host_must_be_an_address_or_localhost(host, capsys):
    """A name that DNS resolves could point anywhere, so it is never a --host."""
    for argv, environ in ((["--host", host, "--token", TOKEN], {}),
                          ([], {"TORRENTFLOW_HOST": host or " "})):
        with pytest.raises(SystemExit) as exit_info:
            torrentflow.parse_config(argv, environ)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "--host" in error and "TORRENTFLOW_HOST" in error and "Traceback" not in error


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_no_token_on_a_public_address_refuses_to_start(host, capsys):
    with pytest.raises(SystemExit):
        torrentflow.parse_config(["--host", host], {})
    assert "TORRENTFLOW_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        torrentflow.parse_config([], {"TORRENTFLOW_HOST": host})
    assert torrentflow.parse_config(["--host", host, "--token", TOKEN], {}).token == TOKEN
    assert torrentflow.parse_config(["--host", host, "--insecure-no-auth"], {}).insecure_no_auth
    assert torrentflow.parse_config(["--host", host], {"TORRENTFLOW_INSECURE_NO_AUTH": "1"})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_no_token_on_loopback_starts(host):
    assert torrentflow.parse_config(["--host", host], {}).token is None


async def test_the_token_is_never_logged(tmp_path, aiohttp_client, caplog):
    caplog.set_level("DEBUG")
    config = daemon_config(tmp_path, "--token", TOKEN)
    assert TOKEN not in repr(config)
    client = await aiohttp_client(torrentflow.make_app(config))
    for headers in (AUTH, {"Authorization": f"Bearer {TOKEN}x"}):
        await client.post("/torrents", json={"torrent_url": MAGNET}, headers=headers)
    await client.close()
    assert caplog.records and TOKEN not in caplog.text


# --------------------------------------------------------------------------- #
# Browser defences
# --------------------------------------------------------------------------- #

async def test_cross_site_origin_is_refused(daemon, guarded):
    own = f"http://127.0.0.1:{daemon.server.port}"
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "http://localhost",
                   f"ftp://127.0.0.1:{daemon.server.port}", "garbage"):
        response = await daemon.post("/torrents", data={"torrent_url": MAGNET},
                                     headers={"Origin": origin})
        assert "cross-site" in await error_of(response, 403)
    # A token does not make a cross-site form any more welcome.
    response = await guarded.get("/torrents", headers={**AUTH, "Origin": "http://evil.example"})
    await error_of(response, 403)
    response = await daemon.get("/torrents", headers={"Origin": own})
    assert response.status == 200
    assert (await daemon.get("/torrents")).status == 200  # no Origin: not a browser


async def test_an_https_proxy_origin_with_the_same_name_is_same_site(guarded):
    headers = {**AUTH, "Host": "tf.example.org", "Origin": "https://tf.example.org"}
    assert (await guarded.get("/torrents", headers=headers)).status == 200


async def test_sec_fetch_site_cross_site_is_refused(daemon):
    response = await daemon.post("/torrents", data={"torrent_url": MAGNET},
                                 headers={"Sec-Fetch-Site": "cross-site"})
    await error_of(response, 403)
    for value in ("same-origin", "none"):
        response = await daemon.get("/torrents", headers={"Sec-Fetch-Site": value})
        assert response.status == 200


async def test_a_foreign_host_is_refused_without_a_token(daemon, guarded, tmp_path,
                                                         aiohttp_client):
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io", "192.168.1.5",
                 "localhost.evil.example", "user@localhost", "[::1"):
        response = await daemon.get("/health", headers={"Host": host})
        assert "DNS rebinding" in await error_of(response, 403), host
    for host in ("localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.2:80", "[::1]:8080"):
        assert (await daemon.get("/torrents", headers={"Host": host})).status == 200, host
    # With a token the name does not matter: a reverse proxy may use any.
    response = await guarded.get("/torrents", headers={**AUTH, "Host": "tf.example.org"})
    assert response.status == 200
    # --insecure-no-auth also takes IP addresses (no rebinding without a name), no names.
    config = daemon_config(tmp_path / "insecure", "--insecure-no-auth")
    insecure = await aiohttp_client(torrentflow.make_app(config))
    assert (await insecure.get("/torrents", headers={"Host": "192.168.1.5:8080"})).status == 200
    await error_of(await insecure.get("/torrents", headers={"Host": "evil.example"}), 403)


# --------------------------------------------------------------------------- #
# Hostile .torrent files
# --------------------------------------------------------------------------- #


def _single(name=b"file.bin", data=b"x" * 40000, piece_length=PIECE, length=None):
    pieces = b"".join(hashlib.sha1(data[i:i + piece_length]).digest()
                      for i in range(0, len(data), piece_length)) if piece_length > 0 else b""
    return {b"name": name, b"piece length": piece_length, b"pieces": pieces,
            b"length": len(data) if length is None else length}


def _multi(paths, name=b"dir", extra=None, size=10):
    data = b"y" * size * len(paths)
    return {b"name": name, b"piece length": PIECE,
            b"pieces": b"".join(hashlib.sha1(data[i:i + PIECE]).digest()
                                for i in range(0, len(data), PIECE)),
            b"files": [{b"length": size, b"path": path, **(extra or {})} for path in paths]}


def _bencoded(info):
    return lt.bencode({b"announce": b"http://127.0.0.1:1/announce", b"info": info})


def _raw(info_tail):
    """A .torrent whose info dict ends with hand-written bencode (for bombs)."""
    return (b"d8:announce3:abc4:infod6:lengthi10e4:name1:x12:piece lengthi16384e6:pieces20:"
            + b"a" * 20 + info_tail + b"ee")


HOSTILE = {
    "garbage": os.urandom(2048),
    "deep nesting": _raw(b"1:z" + b"l" * 5000 + b"e" * 5000),
    "token bomb": _raw(b"1:z" + b"l" + b"le" * 1_600_000 + b"e"),
    "piece length 0": _bencoded(_single(piece_length=0)),
    "piece length not a power of two": _bencoded(_single(piece_length=20000)),
    "millions of pieces": _bencoded(_single(length=1 << 45)),
    "negative length": _bencoded(_single(length=-5)),
    "name ..": _bencoded(_single(name=b"..")),
    "name with a slash": _bencoded(_single(name=b"../../escape")),
    "absolute name": _bencoded(_single(name=b"/tmp/escape")),
    "empty name": _bencoded(_single(name=b"")),
    "path with ..": _bencoded(_multi([[b"..", b"..", b"escape"], [b"ok"]])),
    "absolute path": _bencoded(_multi([[b"/etc/escape"], [b"ok"]])),
    "empty path element": _bencoded(_multi([[b"a", b"", b"b"], [b"ok"]])),
    "dot path element": _bencoded(_multi([[b".", b"b"], [b"ok"]])),
    "backslash path": _bencoded(_multi([[b"..\\..\\escape"], [b"ok"]])),
    "NUL in a name": _bencoded(_multi([[b"a\x00b"], [b"ok"]])),
    "symlink out": _bencoded({**_multi([[b"ok"]]), b"files": [
        {b"length": 10, b"path": [b"ok"]},
        {b"length": 0, b"path": [b"link"], b"attr": b"l",
         b"symlink path": [b"..", b"..", b"etc"]}]}),
    "too many files": _bencoded(_multi([[str(i).encode()]
                                        for i in range(torrentflow.MAX_TORRENT_FILES + 1)],
                                       size=1)),
}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_every_hostile_torrent_gets_422_and_writes_nothing(daemon, tmp_path):
    before = files_under(tmp_path)
    for name, data in HOSTILE.items():
        response, body = await add(daemon, expect=(422,), torrent_file=data)
        assert set(body) == {"detail"}, (name, body)
    assert (await (await daemon.get("/torrents")).json())["torrents"] == []
    assert (await daemon.get("/health")).status == 200
    assert files_under(tmp_path) == before


async def test_an_oversized_torrent_file_gets_413(daemon):
    await add(daemon, expect=(413,), torrent_file=b"d" * (torrentflow.MAX_TORRENT_BYTES + 1))


def _hostile_swarm_torrent(root):
    """A torrent whose raw file paths climb out with .. and an absolute path, with the
    seeder's data placed where libtorrent (which sanitises) will look for it."""
    escape = root.parent / "escaped-absolute"
    paths = [[b"..", b"..", b"..", b"escaped-dotdot"], [str(escape).encode()], [b"inside"]]
    info = _multi(paths, name=b"hostile", size=20000)
    data = _bencoded(info)
    params = lt.load_torrent_buffer(data)
    layout = params.ti.layout()
    for index in range(layout.num_files()):
        target = root / layout.file_path(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"y" * 20000)
    return data, escape


async def test_hostile_metadata_from_a_peer_is_refused_as_an_upload_is(daemon, seeder,
                                                                        tmp_path):
    """A magnet's metadata comes from a peer: it gets the checks an upload gets."""
    data, escape = _hostile_swarm_torrent(tmp_path / "seed")
    seeder.seed(data, tmp_path / "seed")
    before = set(files_under(tmp_path)) - set(files_under(tmp_path / "seed"))
    _, body = await add(daemon, torrent_url=seeder.magnet(data), save_path="a/b")
    status = await wait_status(daemon, body["infohash"], lambda s: s["error"],
                               what="the metadata to be refused")
    assert "refused its metadata: unsafe file name" in status["error"]
    assert status["paused"] and not status["auto_managed"]
    assert status["files"] is None and status["num_files"] is None
    after = set(files_under(tmp_path)) - set(files_under(tmp_path / "seed"))
    # Nothing in the download directory: pieces could come before the check refused it.
    assert all(path.startswith("state") for path in after - before), after
    assert not escape.exists() and not (tmp_path.parent / "escaped-dotdot").exists()


async def test_a_failing_metadata_listener_stops_the_magnet_and_says_why(
        tmp_path, aiohttp_client, seeder, payload, monkeypatch):
    """An extension's bug must not leave a magnet held in silence. The fault is injected
    (a listener that raises): no real extension fails on demand."""
    async def broken(torrent):
        raise RuntimeError("a broken extension")
    monkeypatch.setattr(torrentflow, "EXTENSIONS", [
        *torrentflow.EXTENSIONS, lambda app, engine: engine.listen("metadata", broken)])
    daemon = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))
    source, layout = payload
    data = make_torrent(source / "single.bin")
    seeder.seed(data, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(data))
    status = await wait_status(daemon, body["infohash"], lambda s: s["error"],
                               what="the listener's failure to show")
    assert status["error"] == "refused its metadata: it could not be taken: a broken extension"
    assert status["paused"] and not status["auto_managed"]
    assert not (tmp_path / "downloads" / "single.bin").exists()
    # Resumed, it downloads: the metadata itself passed its checks.
    assert (await daemon.put(f"/torrents/{body['infohash']}/resume")).status == 200
    await wait_complete(daemon, body["infohash"])
    assert (tmp_path / "downloads" / "single.bin").read_bytes() == (
        source / "single.bin").read_bytes()


# --------------------------------------------------------------------------- #
# save_path confinement
# --------------------------------------------------------------------------- #

async def test_every_save_path_escape_is_refused(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "downloads").mkdir(exist_ok=True)
    (tmp_path / "downloads" / "link").symlink_to(outside, target_is_directory=True)
    before = files_under(tmp_path)
    for save_path in ("..", "../outside", "a/../../outside", "/", str(outside), "/etc",
                      str(outside / "new"), "link", "link/new", "a\x00b", str(tmp_path)):
        response, body = await add(daemon, expect=(400,), torrent_url=MAGNET,
                                   save_path=save_path)
        assert "save_path" in body["detail"], (save_path, body)
        assert str(tmp_path) not in body["detail"]  # the server's own paths stay private
    assert files_under(tmp_path) == before
    assert (await (await daemon.get("/torrents")).json())["torrents"] == []
    # Inside is fine, absolute or relative; libtorrent creates what is missing.
    inside = tmp_path / "downloads" / "x" / "y"
    _, body = await add(daemon, torrent_url=MAGNET, save_path=str(inside))
    assert (await status_of(daemon, body["infohash"]))["save_path"] == str(inside.resolve())


async def test_allowed_save_roots(tmp_path, aiohttp_client):
    media = tmp_path / "media"
    config = daemon_config(tmp_path, "--allowed-save-root", str(media))
    assert config.allowed_save_roots == (media,)
    client = await aiohttp_client(torrentflow.make_app(config))
    _, body = await add(client, torrent_url=MAGNET, save_path=str(media / "films"))
    status = await status_of(client, body["infohash"])
    # Nothing is created before libtorrent writes a file: a magnet has none yet.
    assert status["save_path"] == str(media / "films") and not (media / "films").exists()
    inside = tmp_path / "downloads" / "x"
    _, body = await add(client, torrent_url="magnet:?xt=urn:btih:" + "cd" * 20,
                        save_path=str(inside))
    assert (await status_of(client, body["infohash"]))["save_path"] == str(inside)
    # Relative paths stay under the download dir, even when they would land in a root.
    for save_path in ("../media/other", str(tmp_path / "mediax"), str(media / ".." / "x")):
        await add(client, expect=(400,), torrent_url=MAGNET, save_path=save_path)
    roots = torrentflow.parse_config([], {"TORRENTFLOW_ALLOWED_SAVE_ROOTS": "/srv/a::/srv/b"})
    assert [str(root) for root in roots.allowed_save_roots] == ["/srv/a", "/srv/b"]
    with pytest.raises(SystemExit):
        torrentflow.parse_config(["--allowed-save-root", "relative"], {})


# --------------------------------------------------------------------------- #
# Request limits and malformed bodies
# --------------------------------------------------------------------------- #

async def test_oversized_bodies_get_413(daemon):
    big = torrentflow.MAX_REQUEST_BYTES + 1

    async def chunked(total, prefix=b""):
        yield prefix
        for _ in range(total // 65536 + 1):
            yield b"z" * 65536

    form = FormData()
    form.add_field("torrent_file", b"d" * big, filename="x.torrent")
    await error_of(await daemon.post("/torrents", data=form), 413)
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"torrent_file\"; "
            f"filename=\"x\"\r\n\r\n").encode()
    response = await daemon.post("/torrents", data=chunked(big, head), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "too large" in await error_of(response, 413)
    small = torrentflow.MAX_FORM_BYTES + 1
    for content_type in ("application/json", "application/x-www-form-urlencoded"):
        response = await daemon.post("/torrents", data=b"z" * small,
                                     headers={"Content-Type": content_type})
        await error_of(response, 413)
        response = await daemon.post("/torrents", data=chunked(small),
                                     headers={"Content-Type": content_type})
        await error_of(response, 413)


async def test_malformed_bodies_get_400(daemon):
    cases = [
        ("application/json", b'{"torrent_url": '),
        ("application/json", b"\xff\xfe{}"),
        ("application/json", json.dumps({"torrent_url": MAGNET}).encode("utf-16")),
        ("application/json", b"[1, 2]"),
        ("application/json", b"[" * 60000),
        ("application/json", b'{"torrent_url": "x", "bogus": 1}'),
        ("application/json", b'{"torrent_url": 5}'),
        ("application/x-www-form-urlencoded", b"torrent_url=%ff%fe"),
        ("application/x-www-form-urlencoded", b"torrent_url=a&torrent_url=b"),
        ("application/x-www-form-urlencoded", b"bogus=1"),
        ("application/x-www-form-urlencoded", b"a=1&b=2&c=3&d=4&e=5"),
        ("multipart/form-data", b"--x\r\n\r\n"),
        ("multipart/form-data; boundary=x", b"no boundary in here at all"),
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="torrent_url"\r\n\r\nmag'),
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="bogus"\r\n\r\n1\r\n--x--\r\n'),
        ("multipart/form-data; boundary=x", b"--x\r\n-5.9e+16--x--\r\n"),
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="save_path"\r\n\r\n\xff\r\n--x--\r\n'),
    ]
    for content_type, body in cases:
        response = await daemon.post("/torrents", data=body,
                                     headers={"Content-Type": content_type})
        await error_of(response, 400)
    # Bodies that would be accepted, but for the charset they declare.
    magnet = MAGNET.encode()
    for content_type, body in [
        ("application/json; charset=latin-1", b'{"torrent_url": "%s"}' % magnet),
        ("application/json; charset=nonsense", b'{"torrent_url": "%s"}' % magnet),
        ("application/x-www-form-urlencoded; charset=iso-8859-1", b"torrent_url=" + magnet),
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="torrent_url"\r\n'
         b'Content-Type: text/plain; charset=latin-1\r\n\r\n%s\r\n--x--\r\n' % magnet),
    ]:
        response = await daemon.post("/torrents", data=body,
                                     headers={"Content-Type": content_type})
        assert "UTF-8" in await error_of(response, 400), content_type
    response = await daemon.post("/torrents", data=b"x", headers={"Content-Type": "text/xml"})
    await error_of(response, 415)
    assert (await (await daemon.get("/torrents")).json())["torrents"] == []


# --------------------------------------------------------------------------- #
# The OpenAPI document stays true
# --------------------------------------------------------------------------- #

async def test_the_spec_documents_every_route(daemon):
    spec = await (await daemon.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1") and spec == json.loads(json.dumps(
        torrentflow.openapi_document()))
    routed = set()
    for route in daemon.app.router.routes():
        if route.method == "*":
            continue  # the catch-all that answers 404 and 405 for paths no route has
        path = route.resource.canonical
        if route.method == "HEAD" and "head" not in spec["paths"].get(path, {}):
            assert "get" in spec["paths"][path] and "HEAD" in spec["info"]["description"]
            continue  # a GET's twin, which the description names once
        routed.add((route.method.lower(), path))
        assert route.method.lower() in spec["paths"].get(path, {}), (route.method, path)
    documented = {(method, path) for path, operations in spec["paths"].items()
                  for method in operations}
    assert documented == routed
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for method, path in documented:
        operation = spec["paths"][path][method]
        public = (method.upper(), path) in torrentflow.PUBLIC_ROUTES
        assert (operation.get("security") == []) == public, (method, path)
        assert "403" in operation["responses"] and ("401" in operation["responses"]) != public
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert "{%s}" % parameter["name"] in path


def _resolve(spec, schema):
    while "$ref" in schema:
        node = spec
        for key in schema["$ref"].removeprefix("#/").split("/"):
            node = node[key]
        schema = node
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, kind):
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(spec, schema, value, where="$"):
    """A JSON-schema validator for the subset the spec uses; raises AssertionError."""
    schema = _resolve(spec, schema)
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    assert not kinds or any(_is_type(value, k) for k in kinds), f"{where}: {value!r} not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, str) and "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    if _is_type(value, "number"):
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value), \
            f"{where}: {value} out of range"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(properties)
            assert not extra, f"{where}: undocumented {sorted(extra)}"
        for name, item in value.items():
            if name in properties:
                validate(spec, properties[name], item, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(spec, schema["items"], item, f"{where}[{index}]")


async def conforms(response, method, path):
    """Check a real answer against the operation the spec gives for it."""
    spec = torrentflow.openapi_document()
    responses = spec["paths"][path][method]["responses"]
    assert str(response.status) in responses, (method, path, response.status)
    documented = _resolve(spec, responses[str(response.status)])
    assert response.content_type == "application/json"
    for header, rule in documented.get("headers", {}).items():
        assert not rule.get("required") or header in response.headers, header
    body = await response.json()
    validate(spec, documented["content"]["application/json"]["schema"], body)
    return body


async def test_real_answers_match_the_spec(daemon, swarm, payload, tmp_path):
    source, layout = payload
    torrent = make_torrent(source / "single.bin", tracker=swarm.url("/announce"),
                           comment="hello")
    swarm.seeder.seed(torrent, source)
    form = FormData()
    form.add_field("torrent_file", torrent, filename="x.torrent")
    added = await conforms(await daemon.post("/torrents", data=form), "post", "/torrents")
    complete = await wait_complete(daemon, added["infohash"])
    assert complete["files"] and complete["has_metadata"]
    await conforms(await daemon.get(f"/torrents/{added['infohash']}"), "get",
                   "/torrents/{infohash}")
    nobody = "magnet:?xt=urn:btih:" + "ef" * 20
    magnet = await conforms(await daemon.post("/torrents", json={"torrent_url": nobody}),
                            "post", "/torrents")
    bare = await conforms(await daemon.get(f"/torrents/{magnet['infohash']}"), "get",
                          "/torrents/{infohash}")
    assert bare["has_metadata"] is False and bare["files"] is None
    listing = await conforms(await daemon.get("/torrents"), "get", "/torrents")
    assert len(listing["torrents"]) == 2
    for status in listing["torrents"]:
        validate(torrentflow.openapi_document(), {"$ref": "#/components/schemas/Summary"}, status)
        assert "files" not in status  # only on request: fields=files
    trimmed = await conforms(await daemon.get("/torrents?fields=name,files&sort=-progress"
                                              "&limit=1"), "get", "/torrents")
    assert [set(t) for t in trimmed["torrents"]] == [{"name", "files"}]
    await conforms(await daemon.get("/health"), "get", "/health")
    for action in ("pause", "resume"):
        await conforms(await daemon.put(f"/torrents/{magnet['infohash']}/{action}"), "put",
                       f"/torrents/{{infohash}}/{action}")
    await conforms(await daemon.delete(f"/torrents/{magnet['infohash']}"), "delete",
                   "/torrents/{infohash}")
    # Errors: every one has the {"detail"} shape and a documented status.
    await conforms(await daemon.get("/torrents/nothex"), "get", "/torrents/{infohash}")
    await conforms(await daemon.get("/torrents/" + "0" * 40), "get", "/torrents/{infohash}")
    await conforms(await daemon.post("/torrents", data=b"x", headers={
        "Content-Type": "text/plain"}), "post", "/torrents")
    await conforms(await daemon.post("/torrents", json={"bogus": 1}), "post", "/torrents")
    form = FormData()
    form.add_field("torrent_file", b"not bencode", filename="x.torrent")
    await conforms(await daemon.post("/torrents", data=form), "post", "/torrents")
    await conforms(await daemon.get("/torrents", headers={"Origin": "http://evil.example"}),
                   "get", "/torrents")


async def test_auth_errors_match_the_spec(guarded):
    await conforms(await guarded.get("/torrents"), "get", "/torrents")
    await conforms(await guarded.delete("/torrents/" + "ab" * 20), "delete",
                   "/torrents/{infohash}")


# --------------------------------------------------------------------------- #
# A burst of bad requests leaves the daemon working
# --------------------------------------------------------------------------- #

async def _raw_exchange(port, data):
    """Send raw bytes over a fresh connection; return the status line (or b"")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        with_eof = data.endswith(b"\r\n\r\n")
        if not with_eof:
            writer.write_eof()
        return await asyncio.wait_for(reader.readline(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_a_burst_of_bad_requests_leaves_the_daemon_working(daemon, swarm, payload,
                                                                  tmp_path):
    rng = random.Random(4)
    valid = FormData()
    valid.add_field("torrent_url", MAGNET)
    valid.add_field("save_path", "fuzz")
    payload_bytes = valid()
    multipart = b"".join([part async for part in _iterate(payload_bytes)])
    content_type = payload_bytes.content_type
    statuses = []
    for round_number in range(60):
        kind = round_number % 6
        if kind == 0:  # random bytes under a random content type
            body = rng.randbytes(rng.randrange(0, 3000))
            ctype = rng.choice(["application/json", "multipart/form-data; boundary=zz",
                                "application/x-www-form-urlencoded", "application/x-bittorrent",
                                "multipart/form-data", ""])
            response = await daemon.post("/torrents", data=body, headers={"Content-Type": ctype})
        elif kind == 1:  # truncated multipart
            cut = rng.randrange(0, len(multipart))
            response = await daemon.post("/torrents", data=multipart[:cut],
                                         headers={"Content-Type": content_type})
        elif kind == 2:  # wrong methods and odd paths
            method = rng.choice(["PATCH", "POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
            path = rng.choice(["/health", "/torrents", "/openapi.json", "/torrents/x/pause",
                               "/torrents/" + rng.randbytes(8).hex(), "/%00", "/torrents/%2e%2e"])
            response = await daemon.request(method, path)
        elif kind == 3:  # hostile torrents and JSON
            form = FormData()
            form.add_field("torrent_file", rng.choice(list(HOSTILE.values()))[:rng.randrange(
                1, 5000)], filename="x.torrent")
            response = await daemon.post("/torrents", data=form)
        elif kind == 4:  # huge headers and many headers
            headers = {"X-Big": "a" * rng.choice([9000, 20000])} if rng.random() < 0.5 else {
                f"X-{i}": "b" * 100 for i in range(200)}
            response = await daemon.get("/torrents", headers=headers)
        else:  # raw garbage on the socket
            junk = rng.choice([rng.randbytes(200), b"GET / HTTP/9.9\r\n\r\n",
                               b"POST /torrents HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                               b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                               b"POST /torrents HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                               b"Content-Type: application/json\r\n\r\nzz\r\n"])
            line = await _raw_exchange(daemon.server.port, junk)
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else 400
            statuses.append(status)
            continue
        statuses.append(response.status)
        await response.read()
    assert all(status < 500 for status in statuses), statuses
    # ...and then a normal add, download and delete still work.
    source, layout = payload
    torrent = make_torrent(source / "single.bin", tracker=swarm.url("/announce"))
    swarm.seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_file=torrent)
    await wait_complete(daemon, body["infohash"])
    assert same_tree(source, tmp_path / "downloads", layout)
    response = await daemon.delete(f"/torrents/{body['infohash']}?delete_files=true")
    assert response.status == 200
    listing = await (await daemon.get("/torrents")).json()
    assert body["infohash"] not in [t["infohash"] for t in listing["torrents"]]


async def _iterate(payload):
    """The bytes an aiohttp payload would send."""
    chunks = []

    class Sink:
        async def write(self, data):
            chunks.append(bytes(data))

    await payload.write(Sink())
    for chunk in chunks:
        yield chunk


async def test_local_only_sends_nothing_off_the_host(daemon, swarm, payload):
    """No fetch, tracker announce or web seed may name a host outside loopback."""
    response = await daemon.post("/torrents", json={"torrent_url": "http://example.com/x"})
    await error_of(response, 400, "--local-only")
    source, _ = payload
    recipe = lt.create_torrent(lt.list_files(str(source / "single.bin")), 16384,
                               lt.create_torrent.v1_only)
    for url in ("http://tracker.example/announce", "udp://10.0.0.1:6969/announce",
                swarm.url("/announce")):
        recipe.add_tracker(url)
    recipe.add_url_seed("http://seed.example/single.bin")
    lt.set_piece_hashes(recipe, str(source))
    _, body = await add(daemon, torrent_file=lt.bencode(recipe.generate()))
    handle = daemon.app[torrentflow.ENGINE].lookup(body["infohash"]).handle
    assert [tracker["url"] for tracker in handle.trackers()] == [swarm.url("/announce")]
    assert handle.url_seeds() == []


async def test_finished_means_every_byte_is_in_the_file(daemon, seeder, tmp_path):
    """The moment the API first says finished, the file already holds the source bytes."""
    layout = {"big.bin": 128 * 1024 * 1024}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "big.bin", piece_size=1024 * 1024)
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))

    async def finished():
        return (await status_of(daemon, body["infohash"]))["is_finished"]
    await wait_until(finished, interval=0.005, what="the download to finish")
    # The file is sparse: a block still in libtorrent's write buffer is a hole on disk.
    # Checking the allocation is instant, where reading it all would give writes time.
    on_disk = os.stat(tmp_path / "downloads" / "big.bin")
    assert on_disk.st_blocks * 512 >= layout["big.bin"]
    assert same_tree(source, tmp_path / "downloads", layout)


# --------------------------------------------------------------------------- #
# Persistence: the daemon as a child process, real signals
# --------------------------------------------------------------------------- #

HERE = Path(__file__).resolve().parent
LISTENING = re.compile(rb"API listening on http://127\.0\.0\.1:(\d+)")
#: Container runtimes give 10 s between SIGTERM and SIGKILL.
STOP_GRACE = 10.0
#: Seconds between the daemon's periodic saves in these tests.
SAVE_INTERVAL = 1.0


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

class DaemonProcess:
    """torrentflow.py as a child process on fixed directories, with an HTTP client on it."""

    def __init__(self, root, download_dir=None, save_interval=SAVE_INTERVAL, extra=(),
                 prefix=(), headers=None, script=HERE / "torrentflow.py"):
        self.root, self.script = root, script
        self.download_dir = download_dir or root / "downloads"
        self.state_dir = root / "state"
        self.save_interval = save_interval
        self.extra, self.prefix, self.headers = list(extra), list(prefix), headers
        self.runs = 0
        self.process = None
        self.client = None
        self.log_path = None

    async def start(self):
        """Start it, wait for the API port and for the saved torrents to be handed over."""
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.log_path = self.root / f"daemon-{self.runs}.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, str(self.script), "--local-only",
                 "--listen-interfaces", "127.0.0.1:0", "--port", "0",
                 "--download-dir", str(self.download_dir), "--state-dir", str(self.state_dir),
                 "--save-interval", str(self.save_interval), *self.extra],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=self.root,
                env=CLEAN_ENV)
        port = self.port = await wait_until(self._port, deadline=30, what="the API port")
        self.client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}",
                                            headers=self.headers)

        async def loaded():
            async with self.client.get("/health") as response:
                return not (await response.json())["loading"]
        await wait_until(loaded, deadline=30, what="saved torrents to load")
        return self

    def _port(self):
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        match = LISTENING.search(self.log_path.read_bytes())
        return int(match[1]) if match else None

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    async def stop(self, signum=signal.SIGTERM):
        """Send signum to our child and wait for it; return (exit code, seconds taken)."""
        await self.client.close()
        self.client = None
        started = time.monotonic()
        os.kill(self.process.pid, signum)
        await wait_until(lambda: self.process.poll() is not None, deadline=30,
                         what="the daemon to exit")
        return self.process.returncode, time.monotonic() - started

    async def restart(self, signum=signal.SIGTERM):
        code, _ = await self.stop(signum)
        expected = 0 if signum in (signal.SIGTERM, signal.SIGINT) else -signum
        assert code == expected, self.log()
        return await self.start()

    async def close(self):
        if self.client is not None:
            await self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    async def status(self, infohash):
        return await status_of(self.client, infohash)

    async def infohashes(self):
        async with self.client.get("/torrents") as response:
            assert response.status == 200
            return {t["infohash"] for t in (await response.json())["torrents"]}

    async def put(self, infohash, action):
        async with self.client.put(f"/torrents/{infohash}/{action}") as response:
            assert response.status == 200, await response.text()

    async def wait_listed(self, infohash):
        """The status of a torrent that must come back, once it finished checking."""
        async def listed():
            async with self.client.get(f"/torrents/{infohash}") as response:
                if response.status != 200:
                    return None
                status = await response.json()
                # Its metadata is read off the loop a moment after its first status.
                read = status["files"] is not None or not status["has_metadata"]
                return status if read and not status["state"].startswith("checking") else None
        return await wait_until(listed, deadline=30, what=f"{infohash} to come back")


class Tracker(Web):
    """The test web server; its tracker knows no peer until a seeder is set."""

    async def announce(self, request):
        if self.seeder is None:
            self.announces += 1
            return web.Response(body=lt.bencode({"interval": 1800, "peers": b""}),
                                content_type="text/plain")
        return await super().announce(request)


def unlimit(seeder):
    seeder.session.set_peer_class(seeder.session.local_peer_class_id,
                                  {"upload_limit": 0, "download_limit": 0})


def payload_sent(seeder):
    """Payload bytes the seeder sent, counted at once (all_time_upload lags a second)."""
    return sum(handle.status().total_payload_upload for handle in seeder.handles)


def kept(status):
    """The fields a restart must not change."""
    return {name: status[name] for name in ("infohash", "save_path", "added_time", "name",
                                            "total_size")}


@pytest.fixture
async def process(tmp_path):
    process = DaemonProcess(tmp_path)
    yield process
    await process.close()


@pytest.fixture
def seeders():
    """A factory of Seeders, all dropped at the end of the test."""
    made = []

    def make(rate_limit=0):
        made.append(Seeder(rate_limit))
        return made[-1]
    yield make
    for seeder in made:
        del seeder.session


@pytest.fixture
async def tracker(aiohttp_server):
    site = Tracker(None)
    site.server = await aiohttp_server(site.app)
    return site


def swarm_torrent(tmp_path, tracker, seeder, size, name="data.bin"):
    """Random payload of size bytes, its .torrent announcing to tracker, seeded by seeder."""
    layout = {name: size}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / name, piece_size=PIECE, tracker=tracker.url("/announce"))
    seeder.seed(torrent, source)
    tracker.seeder = seeder
    return torrent, source, layout


def idle_torrent(tmp_path, name):
    """A .torrent nobody seeds (its payload lives outside the daemon's download dir)."""
    source = make_payload(tmp_path / "idle", {name: 40000})
    return make_torrent(source / name, piece_size=PIECE)


# --------------------------------------------------------------------------- #
# Shutdown and crashes mid-download
# --------------------------------------------------------------------------- #

async def test_sigterm_mid_download_stops_fast_and_resumes(seeders, tracker, tmp_path):
    # No periodic save in this test: whatever comes back was saved at shutdown.
    process = DaemonProcess(tmp_path, save_interval=600)
    try:
        seeder = seeders(512 * 1024)
        torrent, source, layout = swarm_torrent(tmp_path, tracker, seeder, 3 * 1024 * 1024)
        infohash = infohash_of(torrent)
        await process.start()
        await add(process.client, torrent_file=torrent)
        before = await wait_status(process.client, infohash,
                                   lambda s: s["total_done"] >= 1024 * 1024,
                                   what="a third downloaded")

        code, seconds = await process.stop(signal.SIGTERM)
        print(f"SIGTERM stop took {seconds:.2f} s")
        assert code == 0, process.log()
        assert seconds < STOP_GRACE / 2, f"SIGTERM took {seconds:.2f} s"
        assert "saved 1 changed torrents of 1 at shutdown" in process.log()
        on_disk = pieces_on_disk(source / "data.bin", process.download_dir / "data.bin")
        saved = saved_pieces(process, infohash)
        print(f"SIGTERM: {on_disk} pieces on disk, {saved} in the resume file")
        # A clean stop keeps every piece that reached the disk (one may be mid-check).
        assert before["num_pieces"] <= saved and on_disk - 1 <= saved <= on_disk

        await process.start()
        after = await process.wait_listed(infohash)
        assert kept(after) == kept(before)
        assert after["total_download"] >= before["total_download"] > 0  # over its life
        assert not after["is_finished"]
        # Pausing the session at shutdown must not bring the torrent back paused.
        await wait_status(process.client, infohash, lambda s: not s["paused"], deadline=5,
                          what="it to run")
        assert after["num_pieces"] >= saved
        unlimit(seeder)
        await wait_complete(process.client, infohash)
        assert same_tree(source, process.download_dir, layout)
        redownloaded = payload_sent(seeder) - layout["data.bin"]
        print(f"seeder sent {redownloaded} bytes twice after SIGTERM")
    finally:
        await process.close()


async def test_sigkill_mid_download_keeps_what_reached_the_disk(seeders, tracker, tmp_path):
    """Two SIGKILLs at 30% and 60%, before any periodic save: the resume files say "no
    pieces", yet the pieces on disk are found by checking, not downloaded again."""
    process = DaemonProcess(tmp_path, save_interval=600)
    try:
        rate, size = 1024 * 1024, 6 * 1024 * 1024
        seeder = seeders(rate)
        torrent, source, layout = swarm_torrent(tmp_path, tracker, seeder, size)
        infohash = infohash_of(torrent)
        complete = idle_torrent(tmp_path, "complete.bin")  # its data is all there
        (tmp_path / "downloads").mkdir()
        (tmp_path / "downloads" / "complete.bin").write_bytes(
            (tmp_path / "idle" / "complete.bin").read_bytes())
        await process.start()
        await add(process.client, torrent_file=torrent)
        await add(process.client, torrent_file=complete)
        first = await wait_status(process.client, infohash, lambda s: s["total_done"] > 0,
                                  what="the first piece")
        for kill_at in (size * 3 // 10, size * 6 // 10):
            await wait_until(lambda: payload_sent(seeder) >= kill_at,
                             what=f"{kill_at} bytes sent")
            code, _ = await process.stop(signal.SIGKILL)
            assert code == -signal.SIGKILL
            on_disk = pieces_on_disk(source / "data.bin", process.download_dir / "data.bin")
            assert saved_pieces(process, infohash) < on_disk  # the resume file lags
            await process.start()
            after = await process.wait_listed(infohash)
            assert kept(after) == kept(first)
            assert after["num_pieces"] >= on_disk - 1  # one piece may have been mid-write
            # Only the torrent that was downloading is checked; the complete one is not,
            # nor announced as finished again.
            assert "checking the data of 1 torrents" in process.log()
            assert "finished complete.bin" not in process.log()
        unlimit(seeder)
        await wait_complete(process.client, infohash)
        assert same_tree(source, process.download_dir, layout)
        resent = payload_sent(seeder) - size
        print(f"two SIGKILLs at 30% and 60%: the seeder resent {resent} bytes, "
              f"{100 * resent / size:.1f}% of the torrent")
        assert resent < 0.15 * size
    finally:
        await process.close()


def saved_pieces(process, infohash):
    """How many pieces the resume file says are done: what a restart will keep."""
    data = (process.state_dir / "resume" / f"{infohash}.resume").read_bytes()
    return sum(lt.read_resume_data(data).have_pieces)


def pieces_on_disk(source, target):
    """How many whole pieces of target already hold the source's bytes."""
    count = 0
    with open(source, "rb") as expected, open(target, "rb") as actual:
        while chunk := expected.read(PIECE):
            count += actual.read(PIECE) == chunk
    return count


# --------------------------------------------------------------------------- #
# What comes back: paused torrents, magnets, removals
# --------------------------------------------------------------------------- #

async def test_a_stop_during_a_check_checks_again_at_the_next_start(process, tmp_path):
    """The stop saves only the pieces checked so far; were it called clean, a whole
    torrent would stay short of 100% until rechecked by hand."""
    source = make_payload(process.download_dir, {"big.bin": 128 * 1024 * 1024})
    torrent = make_torrent(source / "big.bin", piece_size=1024 * 1024)
    infohash = infohash_of(torrent)
    await process.start()
    await add(process.client, torrent_file=torrent)
    await wait_complete(process.client, infohash)
    await process.put(infohash, "recheck")
    await process.stop(signal.SIGTERM)
    assert "were being checked" in process.log()
    assert not (process.state_dir / torrentflow.CLEAN_MARK).exists()
    await process.start()
    await wait_complete(process.client, infohash)

async def test_paused_torrent_comes_back_paused(process, tmp_path):
    paused, running = idle_torrent(tmp_path, "paused.bin"), idle_torrent(tmp_path, "running.bin")
    paused_id, running_id = infohash_of(paused), infohash_of(running)
    await process.start()
    for torrent in (paused, running):
        await add(process.client, torrent_file=torrent)
    await process.put(paused_id, "pause")
    before = {i: await process.status(i) for i in (paused_id, running_id)}
    assert before[paused_id]["paused"] and not before[paused_id]["auto_managed"]

    # PUT /pause answers once saved, so a crash right after keeps it; and pausing the
    # session at a clean shutdown must not leave the running one paused.
    for signum in (signal.SIGKILL, signal.SIGTERM):
        await process.restart(signum)
        for infohash in (paused_id, running_id):
            assert kept(await process.wait_listed(infohash)) == kept(before[infohash])
        status = await process.status(paused_id)
        assert status["paused"] and not status["auto_managed"], signum
        await wait_status(process.client, running_id, lambda s: not s["paused"], deadline=5,
                          what="the running torrent to start")

    await process.put(paused_id, "resume")
    await process.restart(signal.SIGKILL)
    await process.wait_listed(paused_id)
    status = await wait_status(process.client, paused_id, lambda s: not s["paused"],
                               deadline=5, what="the resumed torrent to start")
    assert status["auto_managed"]


@pytest.mark.parametrize("found_by", ["tracker", "x.pe", "x.pe-closed"])
async def test_magnet_without_metadata_comes_back_and_completes(found_by, process, seeders,
                                                                tracker, tmp_path):
    layout = {"magnet.bin": 1024 * 1024 + 7}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "magnet.bin", piece_size=PIECE)
    infohash = infohash_of(torrent)
    seeder = seeders()  # it does not have the torrent yet
    if found_by == "x.pe-closed":  # nobody listens there until after the crash
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        seeder = None
        magnet = f"magnet:?xt=urn:btih:{infohash}&x.pe=127.0.0.1:{port}"
    elif found_by == "tracker":
        magnet = (f"magnet:?xt=urn:btih:{infohash}"
                  f"&tr={urllib.parse.quote(tracker.url('/announce'), safe='')}")
    else:
        magnet = seeder.magnet(torrent)
    await process.start()
    await add(process.client, torrent_url=magnet)
    await wait_status(process.client, infohash, lambda s: not s["paused"],
                      what="it to look for peers")
    # Pausing and resuming saves it again, after its peer let it down.
    await process.put(infohash, "pause")
    await process.put(infohash, "resume")
    before = await process.status(infohash)
    assert not before["has_metadata"]

    # No peer has it; the daemon crashes; then the seeder gets it.
    await process.stop(signal.SIGKILL)
    if seeder is None:
        seeder = seeders()
        seeder.session.apply_settings({"listen_interfaces": f"127.0.0.1:{port}"})
        await wait_until(lambda: seeder.port == port, deadline=10,
                         what="the seeder on the x.pe port")
    seeder.seed(torrent, source)
    tracker.seeder = seeder
    await process.start()
    after = await process.wait_listed(infohash)
    assert {k: after[k] for k in ("infohash", "save_path", "added_time")} == \
        {k: before[k] for k in ("infohash", "save_path", "added_time")}
    await wait_complete(process.client, infohash, deadline=20)
    assert same_tree(source, process.download_dir, layout)

    # With its metadata saved, it restarts as a complete torrent with no peer at all.
    tracker.seeder = None
    await process.restart(signal.SIGTERM)
    status = await process.wait_listed(infohash)
    assert status["has_metadata"] and status["progress"] == 100


async def test_removal_survives_restart(process, tmp_path):
    names = ("gone", "gone_with_files", "stays")
    torrents = {name: idle_torrent(tmp_path, f"{name}.bin") for name in names}
    ids = {name: infohash_of(torrent) for name, torrent in torrents.items()}
    await process.start()
    for torrent in torrents.values():
        await add(process.client, torrent_file=torrent)
    for name, query in (("gone", ""), ("gone_with_files", "?delete_files=true")):
        async with process.client.delete(f"/torrents/{ids[name]}{query}") as response:
            assert response.status == 200, await response.text()
    # DELETE answered: the removal must hold even if the daemon dies right now.
    for signum in (signal.SIGKILL, signal.SIGINT):
        await process.restart(signum)
        await process.wait_listed(ids["stays"])
        assert await process.infohashes() == {ids["stays"]}
    resume_files = {path.name.split(".")[0] for path in (process.state_dir / "resume").iterdir()}
    assert resume_files == {ids["stays"]}


# --------------------------------------------------------------------------- #
# Disk faults
# --------------------------------------------------------------------------- #

async def test_a_torrent_in_two_resume_files_loads_once_and_deletes_for_good(process,
                                                                           tmp_path):
    """A crash between writing a v2 magnet's file under its new v1 id and deleting the
    old one leaves two files of one torrent; here, a copy under another name."""
    torrent = idle_torrent(tmp_path, "twice.bin")
    infohash = infohash_of(torrent)
    await process.start()
    await add(process.client, torrent_file=torrent)
    await process.stop(signal.SIGTERM)
    resume = process.state_dir / "resume"
    (resume / f"{'ab' * 20}.resume").write_bytes((resume / f"{infohash}.resume").read_bytes())
    await process.start()  # waits for loading to end, which it never did
    assert await process.infohashes() == {infohash}
    assert [path.name.rsplit(".", 1)[0] for path in (process.state_dir / "quarantine")
            .iterdir()] == [f"{'ab' * 20}.resume"]
    assert (await process.client.delete(f"/torrents/{infohash}")).status == 200
    await process.restart(signal.SIGKILL)
    assert await process.infohashes() == set()
    assert not list(resume.glob("*.resume"))

async def test_corrupt_resume_files_are_quarantined(process, tmp_path):
    # name: (what becomes of the main file, whether a good .bak sits beside it)
    cases = {"good": ("keep", False), "truncated": ("truncate", False),
             "garbage": ("garbage", False), "truncated_bak": ("truncate", True),
             "garbage_bak": ("garbage", True), "only_bak": ("delete", True)}
    torrents = {name: idle_torrent(tmp_path, f"{name}.bin") for name in cases}
    ids = {name: infohash_of(torrent) for name, torrent in torrents.items()}
    await process.start()
    for torrent in torrents.values():
        await add(process.client, torrent_file=torrent)
    before = {name: await process.status(ids[name]) for name in cases}
    await process.stop(signal.SIGTERM)

    resume = process.state_dir / "resume"
    for name, (damage, backup) in cases.items():
        main, bak = resume / f"{ids[name]}.resume", resume / f"{ids[name]}.bak"
        good = main.read_bytes()
        bak.unlink(missing_ok=True)
        if backup:
            bak.write_bytes(good)
        if damage == "truncate":
            main.write_bytes(good[:len(good) // 2])
        elif damage == "garbage":
            main.write_bytes(os.urandom(len(good)))
        elif damage == "delete":
            main.unlink()

    await process.start()
    survivors = {name for name, (damage, backup) in cases.items() if damage == "keep" or backup}
    for name in survivors:
        assert kept(await process.wait_listed(ids[name])) == kept(before[name])
    assert await process.infohashes() == {ids[name] for name in survivors}
    # Every unreadable file is moved aside, also one whose good .bak took its place.
    quarantined = {path.name.rsplit(".", 1)[0]
                   for path in (process.state_dir / "quarantine").iterdir()}
    assert quarantined == {f"{ids[name]}.resume" for name, (damage, _) in cases.items()
                           if damage in ("truncate", "garbage")}
    assert process.log().count("moved unreadable resume file") == len(quarantined)

    # The next start finds nothing wrong and loses nothing.
    await process.restart(signal.SIGTERM)
    for name in survivors:
        await process.wait_listed(ids[name])
    assert await process.infohashes() == {ids[name] for name in survivors}
    assert "unreadable" not in process.log()


@contextlib.contextmanager
def mounted(mount_point, *how):
    """`mount *how mount_point` for the block (made first); the test skips without root."""
    mount_point.mkdir()
    result = subprocess.run(["mount", *how, str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def tmpfs(mount_point, size):
    """A tmpfs of size mounted at mount_point for the block."""
    return mounted(mount_point, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "4m") as mount_point:
        yield mount_point


#: fault: (payload size, remount options that cause it, remount options that fix it)
DISK_FAULTS = {
    "full": (6 * 1024 * 1024, None, "remount,size=64m"),
    "read_only": (1024 * 1024, "remount,ro", "remount,rw"),
}


@pytest.mark.parametrize("fault", DISK_FAULTS)
async def test_disk_fault_reports_error_and_recovers(fault, small_disk, seeders, tracker,
                                                     tmp_path):
    size, cause, fix = DISK_FAULTS[fault]
    process = DaemonProcess(tmp_path, download_dir=small_disk)
    try:
        seeder = seeders()
        torrent, source, layout = swarm_torrent(tmp_path, tracker, seeder, size)
        infohash = infohash_of(torrent)
        await process.start()
        if cause:
            subprocess.run(["mount", "-o", cause, str(small_disk)], check=True)
        await add(process.client, torrent_file=torrent)

        async def failed():
            status = await process.status(infohash)
            return status if status["error"] else None
        status = await wait_until(failed, deadline=30, what=f"the {fault} disk error")
        print(f"{fault} disk error: {status['error']} ({status['state']})")
        # A full disk leaves the directory writable; a read-only one does not, and the
        # daemon as a whole says so.
        if fault == "read_only":  # the watch loop looks every WATCH_INTERVAL
            async def unhealthy():
                async with process.client.get("/health") as response:
                    return response.status == 503 and await response.json()
            answer = await wait_until(unhealthy, deadline=10, what="/health to say so")
            assert "not writable" in answer["detail"] and str(small_disk) in answer["detail"]
        else:
            async with process.client.get("/health") as response:
                assert response.status == 200
        assert (await process.status(infohash))["error"]

        subprocess.run(["mount", "-o", fix, str(small_disk)], check=True)

        async def healthy():
            async with process.client.get("/health") as response:
                return response.status == 200
        await wait_until(healthy, deadline=10, what="/health to recover")
        await process.put(infohash, "resume")
        await wait_complete(process.client, infohash)
        assert (await process.status(infohash))["error"] == ""
        assert same_tree(source, small_disk, layout)
    finally:
        await process.close()


# --------------------------------------------------------------------------- #
# Edge cases found in review
# --------------------------------------------------------------------------- #

async def test_odd_but_well_formed_input_is_a_400_not_a_500(daemon, tmp_path):
    root = make_payload(tmp_path / "src", {"f.bin": 20_000})
    _, body = await add(daemon, torrent_file=make_torrent(root / "f.bin"))
    await wait_status(daemon, body["infohash"], lambda s: s["files"], what="metadata")
    # A list does not sort: two streams at different places were a 500.
    for query, words in (("sort=files", "sort"), ("sort=-files", "sort"),
                         ("sort=streams", "sort"), ("sort=-streams", "sort"),
                         ("limit=%C2%B2", "whole number"), ("offset=%D9%A3", "whole number")):
        await error_of(await daemon.get(f"/torrents?{query}"), 400, words)
    await error_of(await daemon.put(f"/torrents/{body['infohash']}/pause?now=1"), 400,
                   "unknown query parameter")
    for number in ("1_000", "\u0661\u0662"):  # int() takes both; a form's text is no JSON
        await error_of(await daemon.post("/torrents", data={
            "torrent_url": MAGNET, "download_limit": number}), 400, "download_limit")
    # A body that does not decompress was a 500 on every route that reads one.
    for method, path in (("POST", "/torrents"), ("PATCH", "/settings"),
                         ("PATCH", f"/torrents/{body['infohash']}")):
        reader, writer = await asyncio.open_connection(daemon.host, daemon.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     "Content-Length: 2\r\n\r\n{}".encode())
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(
            b'{"detail": "malformed request body: Can not decode content-encoding: gzip"}'), answer
    magnet = "magnet:?xt=urn:btih:" + "ab" * 20
    for raw_json, words in (
            ('{"torrent_url": "http://[::1/x.torrent"}', "not a valid url"),
            ('{"torrent_url": "%s", "save_path": "\\ud800"}' % magnet, "not valid unicode"),
            ('{"torrent_url": "%s&dn=\\ud800"}' % magnet, "not valid unicode")):
        response = await daemon.post("/torrents", data=raw_json,
                                     headers={"Content-Type": "application/json"})
        await error_of(response, 400, words)


async def test_concurrent_deletes_answer_once_and_truthfully(daemon, tmp_path):
    root = make_payload(tmp_path / "src", {"seeded.bin": 40_000})
    (tmp_path / "downloads").mkdir(exist_ok=True)
    (tmp_path / "downloads" / "seeded.bin").write_bytes((root / "seeded.bin").read_bytes())
    _, body = await add(daemon, torrent_file=make_torrent(root / "seeded.bin"))
    infohash = body["infohash"]
    await wait_status(daemon, infohash, lambda s: s["is_seeding"], what="its data checked")
    keep, delete = await asyncio.gather(
        daemon.delete(f"/torrents/{infohash}"),
        daemon.delete(f"/torrents/{infohash}?delete_files=true"))
    # The one that came second finds the torrent already going: 404.
    assert sorted((keep.status, delete.status)) == [200, 404]
    files_deleted = delete.status == 200
    said = (await (delete if files_deleted else keep).json())["detail"]
    assert ("and its files" in said) is files_deleted
    assert (tmp_path / "downloads" / "seeded.bin").exists() is not files_deleted


async def test_pause_racing_a_removal_does_not_hang(daemon, payload):
    source, _ = payload
    _, body = await add(daemon, torrent_file=make_torrent(source / "single.bin"))
    engine = daemon.app[torrentflow.ENGINE]
    entry = engine.lookup(body["infohash"])
    # Over HTTP the pause would meet a 404; the engine is called directly to race them.
    removing = asyncio.ensure_future(engine.remove(entry, False))
    pausing = asyncio.ensure_future(engine.pause(entry))
    await asyncio.wait_for(asyncio.gather(removing, pausing, return_exceptions=True), 10)
    assert removing.exception() is None
    assert pausing.exception() is None or pausing.exception().status == 404
    assert (await daemon.get(f"/torrents/{body['infohash']}")).status == 404


@pytest.mark.parametrize("save_path", [None, b"/etc/cron.d", b"{tmp}", b"{tmp}/downloads/../.."])
async def test_a_resume_file_with_no_usable_save_path_is_quarantined(save_path, tmp_path,
                                                                   aiohttp_client):
    """No save path, or one outside the save roots (a planted or edited resume file):
    quarantined, and the other torrents still load."""
    resume = tmp_path / "state" / "resume"
    resume.mkdir(parents=True)
    bad, good = "01" * 20, "ff" * 20  # the bad one loads first
    inside = str(tmp_path / "downloads").encode()
    for infohash, path in ((bad, save_path), (good, inside)):
        extra = {} if path is None else {
            b"save_path": path.replace(b"{tmp}", str(tmp_path).encode())}
        resume.joinpath(f"{infohash}.resume").write_bytes(lt.bencode({
            b"file-format": b"libtorrent resume file", b"file-version": 1,
            b"info-hash": bytes.fromhex(infohash), **extra}))
    client = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))

    async def loaded():
        health = await (await client.get("/health")).json()
        return not health["loading"] and (await client.get(f"/torrents/{good}")).status == 200
    await wait_until(loaded, what="the good resume file to load")
    assert [p.name.split(".")[0] for p in (tmp_path / "state" / "quarantine").iterdir()] == [bad]
    assert (await client.get(f"/torrents/{bad}")).status == 404


def hybrid_swarm(tmp_path, seeder):
    layout = {"pack/a.bin": 300_000, "pack/b.bin": 200_000}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "pack", version=0)
    seeder.seed(torrent, source)
    return lt.load_torrent_buffer(torrent).ti.info_hashes(), source, layout


async def test_a_v2_magnet_of_a_hybrid_takes_its_v1_id_with_the_metadata(
        daemon, seeder, tmp_path):
    hashes, source, layout = hybrid_swarm(tmp_path, seeder)
    magnet = f"magnet:?xt=urn:btmh:1220{hashes.v2}&x.pe=127.0.0.1:{seeder.port}"
    _, body = await add(daemon, torrent_url=magnet)
    # A download starts at once: the metadata, and with it the v1 id, may come before
    # the add is answered.
    assert body["infohash"] in (str(hashes.v2), str(hashes.v1))

    async def renamed():
        status = await status_of(daemon, str(hashes.v2))
        names = sorted(p.name for p in (tmp_path / "state" / "resume").glob("*.resume"))
        return status["infohash"] == str(hashes.v1) and names == [f"{hashes.v1}.resume"]
    await wait_until(renamed, what="the v1 id and its resume file")
    await wait_complete(daemon, str(hashes.v1))
    assert same_tree(source, tmp_path / "downloads", layout)


async def test_v1_and_v2_magnets_of_one_hybrid_end_as_one_torrent(daemon, seeder, tmp_path):
    hashes, source, layout = hybrid_swarm(tmp_path, seeder)
    await add(daemon, torrent_url=f"magnet:?xt=urn:btmh:1220{hashes.v2}")  # no peer yet
    await add(daemon, torrent_url=f"magnet:?xt=urn:btih:{hashes.v1}&x.pe=127.0.0.1:{seeder.port}")

    async def one_healthy_torrent():
        listing = await (await daemon.get("/torrents")).json()
        return (listing["total"] == 1 and listing["torrents"][0]["error"] == ""
                and listing["torrents"][0]["is_seeding"])
    await wait_until(one_healthy_torrent, what="the two magnets to become one torrent")
    for infohash in (str(hashes.v1), str(hashes.v2)):
        assert (await status_of(daemon, infohash))["infohash"] == str(hashes.v1)
    assert same_tree(source, tmp_path / "downloads", layout)
    names = sorted(p.name for p in (tmp_path / "state" / "resume").glob("*.resume"))
    assert names == [f"{hashes.v1}.resume"]


async def test_malformed_http_is_refused_without_filling_the_log(process):
    """aiohttp logs each malformed request with a traceback unless --log-level debug."""
    await process.start()
    for garbage in (b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(garbage)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 10)
        assert answer.split(b"\r\n")[0].split()[1] == b"400", answer
        writer.close()
    async with process.client.get("/health") as response:
        assert response.status == 200
    await process.stop(signal.SIGTERM)
    assert "Traceback" not in process.log() and "Error handling request" not in process.log()


async def test_an_unanswered_request_to_libtorrent_becomes_a_503(daemon):
    """A lost alert cannot be provoked on demand: a wait for an alert that never comes
    (the removal of a torrent nobody removes) stands in for one."""
    engine = daemon.app[torrentflow.ENGINE]
    with pytest.raises(torrentflow.ApiError) as error:
        await engine.expect(["0" * 40], lt.torrent_removed_alert, "the test", timeout=0.05)
    assert error.value.status == 503 and "the test" in error.value.detail
    assert error.value.headers == {"Retry-After": "1"}
    assert not engine._waiters  # the wait left nothing behind


async def test_text_that_is_not_utf8_once_decoded_is_refused_at_once(daemon):
    # %ff is plain ASCII in the request but libtorrent keeps the decoded byte; Python
    # cannot read it back, so the torrent would never get a status (503, stuck unseen).
    magnet = "magnet:?xt=urn:btih:" + "cd" * 20
    for extra in ("&dn=%ff%fe", "&tr=http%3A%2F%2F127.0.0.1%3A1%2F%ff"):
        response = await asyncio.wait_for(daemon.post(
            "/torrents", data=json.dumps({"torrent_url": magnet + extra}),
            headers={"Content-Type": "application/json"}), 5)
        await error_of(response, 400, "not UTF-8")
    for outside in ({b"announce": b"http://127.0.0.1:1/\xff"},
                    {b"nodes": [[b"\xff\xfe", 6881]]}):  # a DHT node, read when added
        torrent = lt.bencode({**outside, b"info": _single()})
        _, body = await add(daemon, expect=(422,), torrent_file=torrent)
        assert "not UTF-8" in body["detail"]
    assert daemon.app[torrentflow.ENGINE].count() == 0


async def test_a_resume_file_with_a_save_path_that_is_not_utf8_is_quarantined(
        tmp_path, aiohttp_client):
    resume = tmp_path / "state" / "resume"
    resume.mkdir(parents=True)
    bad, good = "01" * 20, "ff" * 20
    for infohash, save_path in ((bad, str(tmp_path / "downloads").encode() + b"/\xff"),
                                (good, str(tmp_path / "downloads").encode())):
        resume.joinpath(f"{infohash}.resume").write_bytes(lt.bencode({
            b"file-format": b"libtorrent resume file", b"file-version": 1,
            b"info-hash": bytes.fromhex(infohash), b"save_path": save_path}))
    client = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))

    async def loaded():
        health = await (await client.get("/health")).json()
        return not health["loading"] and (await client.get(f"/torrents/{good}")).status == 200
    await wait_until(loaded, deadline=10, what="the good resume file to load")
    assert [p.name.split(".")[0] for p in (tmp_path / "state" / "quarantine").iterdir()] == [bad]


# --------------------------------------------------------------------------- #
# Under attack: the promises hold
# --------------------------------------------------------------------------- #

def _percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _sample(client, path, until, latencies, interval=0.1):
    """GET path on one keep-alive connection every interval until `until`; each
    answer's latency goes to latencies (a failure counts as infinitely slow)."""
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with client.get(path, timeout=aiohttp.ClientTimeout(total=5)) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        latencies.append(time.monotonic() - started if ok else float("inf"))
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def guarded_site(limit):
    """A one-route aiohttp app ("ok" at /) behind the daemon's ConnectionGuard, on a free
    loopback port: (the guard, the port)."""
    app = web.Application()

    async def hello(request):
        return web.Response(text="ok")
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = torrentflow.GuardedSite(runner, "127.0.0.1", 0, limit)
    await site.start()
    try:
        yield site.guard, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_the_connection_guard_forgets_closed_connections():
    """The guard tracks each API connection, and forgets it when it closes: a daemon
    that served a million requests must not hold a million records."""
    async with guarded_site(256) as (guard, port):
        for _ in range(20):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200
        await wait_until(lambda: not guard.connections and not guard._by_handler,
                         deadline=5, what="closed connections to be forgotten")


async def test_blank_lines_do_not_shield_a_connection_from_the_guard():
    """aiohttp skips blank lines before a request line: a connection that sends only
    CRLF CRLF has not sent a head, and must not hold a place past the cap."""
    held = []
    async with guarded_site(4) as (guard, port):
        try:
            for _ in range(4):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"\r\n\r\n")
                held.append(writer)
            await wait_until(lambda: len(guard.connections) == 4, deadline=5,
                             what="the four connections to be admitted")
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200 and await response.text() == "ok"
        finally:
            for writer in held:
                writer.close()


async def test_half_open_connections_do_not_take_the_daemon_down(tmp_path):
    """2,000 sockets that never finish their request head, against a daemon with 1,024
    descriptors, for 20 s: /health and an authenticated listing keep answering in under
    a second, and the log stays small."""
    process = DaemonProcess(tmp_path, extra=["--token", TOKEN], headers=AUTH,
                            prefix=["prlimit", "--nofile=1024:1024", "--"])
    try:
        await process.start()
        attacker = subprocess.Popen([sys.executable, "-c", FLOOD_ATTACK,
                                     str(process.port), "heads", "2000", "20"])
        try:
            until = time.monotonic() + 20
            health, listing = [], []
            await asyncio.gather(_sample(process.client, "/health", until, health),
                                 _sample(process.client, "/torrents", until, listing))
        finally:
            attacker.kill()
            attacker.wait(10)
        log_size = process.log_path.stat().st_size
        for name, latencies in (("/health", health), ("GET /torrents", listing)):
            print(f"{name} under 2,000 half-open connections: {len(latencies)} samples, "
                  f"p99 {1000 * _percentile(latencies, 0.99):.1f} ms, "
                  f"max {1000 * max(latencies):.1f} ms")
            assert max(latencies) < 1.0, latencies
        print(f"log: {log_size} bytes")
        assert log_size < 100_000
        assert "Too many open files" not in process.log()
    finally:
        await process.close()


#: Four floods of a client without the token, each in a process of its own: COUNT
#: sockets that keep up, for SECONDS, "keepalive" (GET /health, then a request every 2 s
#: on the same socket), "body" (a POST head whose body never comes), "heads" (half a
#: head) or "silent" (nothing). Each socket starts again when the daemon closes it.
#: Arguments: PORT MODE COUNT SECONDS.
FLOOD_ATTACK = """
import asyncio, resource, sys, time
port, mode, count, seconds = int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
FIRST = {"keepalive": b"GET /health HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n",
         "body": b"POST /torrents HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: "
                 b"application/json\\r\\nContent-Length: 1000\\r\\n\\r\\n{",
         "heads": b"GET /health HTTP/1.1\\r\\nHost: localhost\\r\\n", "silent": b""}[mode]

async def hold(until):
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until:
                writer.write(FIRST)
                if mode != "keepalive":
                    await asyncio.wait_for(reader.read(1), max(0.01, until - time.monotonic()))
                    break
                if not await asyncio.wait_for(reader.read(65536), 5):
                    break
                await asyncio.sleep(2)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.transport.abort()

async def main():
    until = time.monotonic() + seconds
    await asyncio.gather(*(hold(until) for _ in range(count)))

asyncio.run(main())
"""


def connections_to(port):
    """How many established TCP connections the kernel holds to a local port (their
    server side, in /proc/net/tcp: state 01, local port in hex)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}")
               and line.split()[3] == "01")


async def test_a_client_with_the_token_gets_through_every_flood(tmp_path):
    """Past --max-connections, idle and half-sent connections make room, oldest first,
    for a fresh one; a stranger's are not kept alive near the cap. So a client with the
    token, opening a fresh connection every 100 ms, gets through each flood."""
    process = DaemonProcess(tmp_path, extra=["--token", TOKEN, "--max-connections", "64"],
                            headers=AUTH)
    try:
        await process.start()
        for mode in ("keepalive", "body", "heads", "silent"):
            attacker = subprocess.Popen([sys.executable, "-c", FLOOD_ATTACK,
                                         str(process.port), mode, "300", "8"])
            try:
                # The flood fills every place first.
                await wait_until(lambda: connections_to(process.port) >= 64,
                                 what=f"the {mode} flood to fill the places")
                tried = succeeded = 0
                until = time.monotonic() + 5
                while time.monotonic() < until:
                    tried += 1
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with aiohttp.ClientSession(headers=AUTH) as session:
                            async with session.get(f"http://127.0.0.1:{process.port}/torrents",
                                                   timeout=aiohttp.ClientTimeout(total=2)) as r:
                                succeeded += r.status == 200
                    await asyncio.sleep(0.1)
            finally:
                attacker.kill()
                attacker.wait(10)
            print(f"{mode} flood: {succeeded} of {tried} fresh connections with the token "
                  "got through")
            # 90 to 100% here (the body flood lowest: its strangers' heads are in, so a fresh
            # connection may find no place to free), 88% once in CI's load; before the guard
            # made room from idle connections, 0% under the keep-alive flood.
            assert succeeded >= 0.8 * tried, (mode, succeeded, tried)
        assert process.log_path.stat().st_size < 100_000
    finally:
        await process.close()


async def test_a_magnet_with_thousands_of_trackers_is_refused_at_once(daemon, tmp_path):
    """Adding 20,000 trackers would freeze libtorrent's session thread for a minute."""
    seeder, source, _, infohash = await slow_download(
        daemon, tmp_path, "slow.bin", 2 * 1024 * 1024, 300_000)
    moving = await wait_status(daemon, infohash, lambda s: s["total_done"] > 0,
                               what="the download to start")
    for count, status, words, key in ((20_000, 413, "too large", "tr"),
                                      (2_000, 422, "at most 200 tr=", "tr"),
                                      (300, 422, "at most 200 tr=", "tr.{n}"),
                                      (300, 422, "at most 200 x.pe=", "X.PE")):
        # libtorrent reads tr.1=, tr.2=... as tr= too, and names in any case.
        trackers = "".join(f"&{key.format(n=n)}=" + (f"127.0.0.1:{1000 + n}" if "PE" in key
                                                        else f"http://h{n}")
                           for n in range(count))
        started = time.monotonic()
        response = await daemon.post("/torrents", data={
            "torrent_url": "magnet:?xt=urn:btih:" + "cd" * 20 + trackers})
        assert time.monotonic() - started < 1.0
        await error_of(response, status, words)
    many = lt.create_torrent(lt.list_files(str(source / "slow.bin")), PIECE,
                             lt.create_torrent.v1_only)
    for number in range(300):
        many.add_tracker(f"http://127.0.0.1:1/{number}/announce", number)
    lt.set_piece_hashes(many, str(source))
    response, _ = await add(daemon, expect=(422,), torrent_file=lt.bencode(many.generate()))
    await error_of(response, 422, "at most 200 trackers")
    # ...while the download went on.
    await wait_status(daemon, infohash,
                      lambda s: s["total_done"] > moving["total_done"], deadline=10,
                      what="the download to keep moving")
    assert (await (await daemon.get("/torrents")).json())["total"] == 1


def _many_files_torrent(count):
    """A .torrent of count one-byte files in folders of 1,000, and where it is seeded."""
    files = [{b"length": 1, b"path": [b"d%d" % (n // 1000), b"f%d" % n]} for n in range(count)]
    data = b"\0" * count
    pieces = b"".join(hashlib.sha1(data[i:i + PIECE]).digest()
                      for i in range(0, count, PIECE))
    return lt.bencode({b"info": {b"name": b"many", b"piece length": PIECE, b"pieces": pieces,
                                 b"files": files}})


@contextlib.asynccontextmanager
async def health_waits(client, what):
    """GET /health every 10 ms while the block runs; yields the list of waits (s), and
    prints their p99 and max for what."""
    waits, stop = [], asyncio.Event()

    async def probe():
        while not stop.is_set():
            started = time.monotonic()
            assert (await client.get("/health")).status == 200
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
    probing = asyncio.ensure_future(probe())
    try:
        yield waits
    finally:
        stop.set()
        await probing
        print(f"/health while {what}: p99 {1000 * _percentile(waits, 0.99):.1f} ms, max "
              f"{1000 * max(waits):.1f} ms ({len(waits)} samples)")


async def test_metadata_with_too_many_files_from_a_peer_is_refused_without_a_stall(
        daemon, seeder, tmp_path):
    """250,000 files behind a magnet: a clear error, and /health (every 10 ms) never
    waits more than 100 ms meanwhile. The files are never rendered."""
    torrent = _many_files_torrent(250_000)
    seeder.seed(torrent, tmp_path / "seed")  # seed mode: the metadata is all it serves
    async with health_waits(daemon, "250,000 files were refused") as waits:
        _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
        status = await wait_status(daemon, body["infohash"], lambda s: s["error"],
                                   what="the metadata to be refused")
    assert "more than 100000 files" in status["error"]
    assert status["paused"] and status["files"] is None and status["num_files"] is None
    assert max(waits) < 0.1


async def test_the_files_of_a_large_torrent_are_served_without_a_stall(daemon):
    """60,000 files: the full status, fields=files and Transmission's file fields are
    built in a thread and serialised in slices (json.dumps holds the GIL for a whole
    call), so /health (every 10 ms) never waits 100 ms meanwhile. The add waits longer:
    libtorrent parses an upload holding the GIL (README, Not covered)."""
    count = 60_000
    torrent = _many_files_torrent(count)
    # Printed, not asserted (it varies from 65 to 135 ms here): libtorrent's parse keeps
    # the GIL for about 50 ms; lt.bdecode, for the file-name check, kept it for 0.14 s
    # more, twice, before that check decoded in Python (then 125 to 180 ms).
    async with health_waits(daemon, f"{count:,} files were added"):
        _, body = await add(daemon, torrent_file=torrent)
        infohash = body["infohash"]
        await wait_status(daemon, infohash, lambda s: s["num_files"] == count,
                          what="the metadata to be read")
    async with health_waits(daemon, f"{count:,} files were served") as waits:
        for path in (f"/torrents/{infohash}", f"/torrents/{infohash}?fields=name,files",
                     "/torrents?fields=files"):
            answer = await (await daemon.get(path)).json()
            files = answer["torrents"][0]["files"] if "torrents" in answer else answer["files"]
            assert len(files) == count and files[-1]["path"].endswith(f"f{count - 1}")
        # 5,000 indices at once: checked against a set (a list took seconds).
        response = await daemon.patch(f"/torrents/{infohash}", json={
            "file_priorities": {str(index): 0 for index in range(count - 5000, count)}})
        assert response.status == 200, await response.text()
        assert (await response.json())["files"][-1]["priority"] == 0
        _, answer = await rpc(daemon, "torrent-get", {
            "ids": [infohash], "fields": ["files", "fileStats", "priorities", "wanted"]})
        rpc_torrent = answer["arguments"]["torrents"][0]
        assert len(rpc_torrent["files"]) == len(rpc_torrent["wanted"]) == count
    assert max(waits) < 0.1


@pytest.mark.parametrize("pause_first", [False, True])
async def test_a_symlink_swapped_in_after_the_add_never_leads_outside(daemon, tmp_path,
                                                                     pause_first):
    seeder, source, layout, infohash = await slow_download(
        daemon, tmp_path, "victim.bin", 4 * 1024 * 1024, 400_000, save_path="victim")
    await wait_status(daemon, infohash, lambda s: s["total_done"] > 0, what="some data")
    outside = tmp_path / "outside"
    outside.mkdir()
    bystander = outside / "victim.bin"  # a file outside, with the torrent's file name
    bystander.write_bytes(b"not the torrent's")
    victim = tmp_path / "downloads" / "victim"
    victim.rename(tmp_path / "downloads" / "moved-away")
    victim.symlink_to(outside, target_is_directory=True)
    if pause_first:
        assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
        await error_of(await daemon.put(f"/torrents/{infohash}/resume"), 409, "outside")
    status = await wait_status(daemon, infohash, lambda s: "outside" in s["error"],
                               deadline=5, what="the swap to be noticed")
    assert status["paused"] and not status["auto_managed"]
    await error_of(await daemon.delete(f"/torrents/{infohash}?delete_files=true"), 409,
                   "outside")
    assert bystander.read_bytes() == b"not the torrent's"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.bin"]
    # Put right, the torrent resumes and completes where it belongs.
    victim.unlink()
    (tmp_path / "downloads" / "moved-away").rename(victim)
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
    seeder.session.set_peer_class(seeder.session.local_peer_class_id,
                                  {"upload_limit": 0, "download_limit": 0})
    await wait_complete(daemon, infohash)
    assert same_tree(source, victim, layout)
    assert bystander.read_bytes() == b"not the torrent's"


async def test_smaller_holes_are_closed(daemon, swarm, payload, tmp_path, aiohttp_client):
    source, _ = payload
    # .utf-8 keys are checked as the plain ones are: libtorrent prefers them.
    for info in (_single(name=b"ok") | {b"name.utf-8": b"../escape"},
                 _multi([[b"ok"]], extra={b"path.utf-8": [b"..", b"x"]}),
                 _multi([[b"ok"]], extra={b"path.utf-8": [b"/etc/x"]})):
        response, _ = await add(daemon, expect=(422,), torrent_file=_bencoded(info))
        await error_of(response, 422, "unsafe file name")
    # One deadline for a fetch, redirects included: five slow hops do not take longer.
    swarm.torrents["slow"] = make_torrent(source / "single.bin")
    client = await aiohttp_client(torrentflow.make_app(
        daemon_config(tmp_path / "fetch", "--fetch-timeout", "1")))
    started = time.monotonic()
    response = await client.post("/torrents", json={"torrent_url": swarm.url("/slowhop/5/slow")})
    await error_of(response, 502, "timed out")
    assert time.monotonic() - started < 1.5
    # localhost. (a trailing dot) is a name for the resolver, not loopback.
    port = swarm.server.port
    await error_of(await daemon.post("/torrents", json={
        "torrent_url": f"http://localhost.:{port}/t/slow"}), 400, "--local-only")
    _, body = await add(daemon, torrent_url=MAGNET + f"&tr=http://localhost.:{port}/announce"
                        + f"&tr=http://localhost:{port}/announce")
    handle = daemon.app[torrentflow.ENGINE].lookup(body["infohash"]).handle
    assert [t["url"] for t in handle.trackers()] == [f"http://localhost:{port}/announce"]
    # Free text from a torrent is capped: a 60,000-character dn= and a 5 MB comment.
    long_name = "n" * 60_000
    _, body = await add(daemon, torrent_url="magnet:?xt=urn:btih:" + "12" * 20
                        + "&dn=" + long_name)
    assert len((await status_of(daemon, body["infohash"]))["name"]) == torrentflow.MAX_TEXT
    commented = make_torrent(source / "single.bin", comment="c" * 5_000_000)
    _, body = await add(daemon, torrent_file=commented)
    status = await status_of(daemon, body["infohash"])
    assert len(status["comment"]) == torrentflow.MAX_TEXT
    # What used to answer 500.
    for query in ("limit=" + "9" * 5000, "offset=" + "1" * 4301):
        await error_of(await daemon.get(f"/torrents?{query}"), 400, "whole number")
    nested = (b"--zz\r\nContent-Type: multipart/mixed; boundary=yy\r\n"
              b"Content-Disposition: form-data; name=\"torrent_url\"\r\n\r\n"
              b"--yy\r\nContent-Type: text/plain\r\n\r\nx\r\n--yy--\r\n--zz--\r\n")
    await error_of(await daemon.post("/torrents", data=nested, headers={
        "Content-Type": "multipart/form-data; boundary=zz"}), 400, "nested")


async def test_a_client_that_hangs_up_mid_body_leaves_one_quiet_line(process):
    await process.start()
    for content_type in (b"application/json", b"multipart/form-data; boundary=zz"):
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(b"POST /torrents HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     + content_type + b"\r\nContent-Length: 1000\r\n\r\n--zz\r\n"
                     b"Content-Disposition: form-data; name=\"torrent_url\"\r\n\r\nm")
        await writer.drain()
        writer.transport.abort()
    await wait_until(lambda: process.log().count("hung up") == 2, deadline=10,
                     what="two hang-ups noted")
    async with process.client.get("/health") as response:
        assert response.status == 200
    await process.stop()
    assert " ERROR " not in process.log() and "Traceback" not in process.log()


async def test_health_without_the_token_says_only_whether_it_is_healthy(guarded):
    answer = await (await guarded.get("/health")).json()
    assert answer == {"status": "ok"}
    full = await (await guarded.get("/health", headers=AUTH)).json()
    assert set(full) == {"status", "torrents", "loading", "listen_port"}


async def test_torrents_cannot_aim_the_daemon_at_this_host(tmp_path, aiohttp_client, payload):
    """Outside --local-only, trackers and web seeds on this host's own addresses are
    dropped, and the IP filter refuses those addresses after DNS too. (The daemon
    still listens on loopback only here, with DHT off.)"""
    config = torrentflow.parse_config([
        "--listen-interfaces", "127.0.0.1:0", "--no-dht", "--port", "0",
        "--download-dir", str(tmp_path / "downloads"), "--state-dir", str(tmp_path / "state")],
        environ={})
    client = await aiohttp_client(torrentflow.make_app(config))
    source, _ = payload
    recipe = lt.create_torrent(lt.list_files(str(source / "single.bin")), PIECE,
                               lt.create_torrent.v1_only)
    for url in ("http://127.0.0.1:9/announce", "http://localhost:9/announce",
                "http://[::1]:9/announce", "http://169.254.169.254/announce",
                "udp://0.0.0.0:9/announce", "http://[::ffff:127.0.0.1]:9/announce",
                "http://[::ffff:169.254.169.254]/announce", "http://tracker.example/announce"):
        recipe.add_tracker(url)
    for url in ("http://127.0.0.1:8080/torrents", "http://[::ffff:127.0.0.1]:8080/x",
                "http://seed.example/single.bin"):
        recipe.add_url_seed(url)
    lt.set_piece_hashes(recipe, str(source))
    _, body = await add(client, torrent_file=lt.bencode(recipe.generate()))
    engine = client.app[torrentflow.ENGINE]
    handle = engine.lookup(body["infohash"]).handle
    assert [t["url"] for t in handle.trackers()] == ["http://tracker.example/announce"]
    assert handle.url_seeds() == ["http://seed.example/single.bin"]
    ip_filter = engine._session.get_ip_filter()
    for address in ("127.0.0.1", "::1", "169.254.1.1", "0.0.0.0", "fe80::1",
                    "::ffff:127.0.0.1", "::ffff:169.254.169.254"):
        assert ip_filter.access(address) == 1, address
    for address in ("10.0.0.1", "192.168.1.5", "8.8.8.8", "2001:db8::1"):
        assert ip_filter.access(address) == 0, address
    # DHT nodes that a magnet or a .torrent names are held to the same rule.
    magnet = lt.parse_magnet_uri("magnet:?xt=urn:btih:" + "ab" * 20 + "&dht=127.0.0.1:6881"
                                 "&dht=[::ffff:169.254.169.254]:1&dht=router.example:6881")
    kept = torrentflow.keep_reachable(magnet, local_only=False).dht_nodes
    assert kept == [("router.example", 6881)]


def test_the_log_filter_cuts_a_mapping_argument():
    """logging hands a lone mapping over as the one for %(name)s: cut and escaped as well."""
    long = {"name": "b\nc" + "z" * 400}
    for mapping, end in ((long, "(403 in all)"), (types.MappingProxyType({"name": "b\nc"}), "c")):
        record = logging.LogRecord("aiohttp", logging.WARNING, __file__, 1, "a %(name)s",
                                   (mapping,), None)
        assert torrentflow._SafeLog().filter(record)
        message = record.getMessage()
        assert message.startswith("a b\\x0ac") and message.endswith(end), message
    # A lone mapping shown with %s stays whole, as before.
    record = logging.LogRecord("aiohttp", logging.WARNING, __file__, 1, "headers %s",
                               (types.MappingProxyType({"Host": "h"}),), None)
    assert torrentflow._SafeLog().filter(record)
    assert record.getMessage() == "headers {'Host': 'h'}"


async def test_names_cannot_forge_log_lines(process):
    """A dn= with a newline, a forged log line, terminal escapes and 60,000 more
    characters: one line in the log, escaped and cut."""
    await process.start()
    forged = "2026-01-01 00:00:00,000 ERROR torrentflow: forged"
    name = urllib.parse.quote("evil\n" + forged + "\x1b[31m" + "z" * 60_000)
    await add(process.client, torrent_url=f"magnet:?xt=urn:btih:{'ef' * 20}&dn={name}")
    await wait_until(lambda: "added evil" in process.log(), deadline=10, what="the add logged")
    await process.stop()
    log = process.log()
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert "\x1b" not in log and "evil\\x0a2026" in log
    assert max(len(line) for line in log.splitlines()) < 1000


# --------------------------------------------------------------------------- #
# Honest answers: a 2xx means it happened
# --------------------------------------------------------------------------- #

def remount(mount_point, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)


async def test_a_state_directory_that_fails_gives_503_and_loses_nothing(
        small_disk, tmp_path, aiohttp_client, payload):
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--state-dir", str(small_disk / "state"), "--save-interval", "0.2")))
    source, _ = payload
    kept_one = make_torrent(source / "single.bin")
    _, body = await add(client, torrent_file=kept_one)
    infohash = body["infohash"]
    remount(small_disk, "ro")
    try:
        # An add that cannot be saved is undone, and says why.
        response = await client.post("/torrents", json={"torrent_url": MAGNET})
        assert "state directory" in await error_of(response, 503, "read-only")
        assert response.headers["Retry-After"]
        listed = await (await client.get("/torrents?fields=infohash")).json()
        assert listed["torrents"] == [{"infohash": infohash}]
        # A DELETE that cannot remove the resume file leaves the torrent whole.
        await error_of(await client.delete(f"/torrents/{infohash}"), 503, "read-only")
        assert (await status_of(client, infohash))["infohash"] == infohash
        # A settings change it cannot keep is not made.
        await error_of(await client.patch("/settings", json={"upload_limit": 31337}), 503,
                       "read-only")
        assert (await (await client.get("/settings")).json())["upload_limit"] == 0
        # A pause it cannot save takes effect, and is saved once the disk can be written.
        await error_of(await client.put(f"/torrents/{infohash}/pause"), 503, "read-only")
        await wait_until(lambda: _unhealthy(client, "state directory"), deadline=5,
                         what="/health to name the state directory")
    finally:
        remount(small_disk, "rw")
    resume = small_disk / "state" / "resume" / f"{infohash}.resume"
    await wait_until(lambda: lt.read_resume_data(resume.read_bytes()).flags
                     & lt.torrent_flags.paused, deadline=10, what="the pause to be saved")
    # Put right, both retries succeed, and the answers are true on disk.
    assert (await client.post("/torrents", json={"torrent_url": MAGNET})).status == 201
    assert (small_disk / "state" / "resume" / f"{MAGNET[-40:]}.resume").exists()
    assert (await client.delete(f"/torrents/{infohash}")).status == 200
    assert not (small_disk / "state" / "resume" / f"{infohash}.resume").exists()


async def test_a_full_state_directory_shows_in_health_until_saves_work(small_disk, tmp_path,
                                                                       aiohttp_client):
    """A full disk is still writable, so only the failing writes can tell: an add that
    could not be saved was undone, and /health forgot why with it."""
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--state-dir", str(small_disk / "state"), "--save-interval", "0.2")))
    filler = small_disk / "filler"

    def fill():
        with open(filler, "wb", buffering=0) as file, contextlib.suppress(OSError):
            while True:
                file.write(b"\0" * 65536)
    fill()
    await error_of(await client.post("/torrents", json={"torrent_url": MAGNET}), 503,
                   "no space left")
    assert (await (await client.get("/torrents")).json())["total"] == 0
    await wait_until(lambda: _unhealthy(client, "no space left"), deadline=5,
                     what="/health to tell of the failed add")
    filler.unlink()
    _, body = await add(client, torrent_file=idle_torrent(tmp_path, "full.bin"))
    await wait_until(lambda: _healthy(client), deadline=5, what="a write to clear it")
    fill()
    await error_of(await client.put(f"/torrents/{body['infohash']}/pause"), 503,
                   "no space left")
    await wait_until(lambda: _unhealthy(client, "no space left"), deadline=5,
                     what="/health to tell")
    filler.unlink()
    resume = small_disk / "state" / "resume" / f"{body['infohash']}.resume"
    await wait_until(lambda: lt.read_resume_data(resume.read_bytes()).flags
                     & lt.torrent_flags.paused, deadline=10, what="the pause to be saved")
    await wait_until(lambda: _healthy(client), deadline=5, what="/health to be well again")


async def test_a_hung_state_directory_shows_in_health(daemon, tmp_path, monkeypatch):
    """A write that never returns (a dead network mount) left /health answering ok, so no
    liveness probe would restart the daemon. The fake: a FIFO where the resume file's
    temporary copy goes, whose open blocks until a reader comes, as a dead mount's does."""
    monkeypatch.setattr(torrentflow, "ALERT_WAIT", 1.0)
    fifo = tmp_path / "state" / "resume" / f"{MAGNET[-40:]}.tmp"
    os.mkfifo(fifo)
    adding = asyncio.ensure_future(daemon.post("/torrents", json={"torrent_url": MAGNET}))
    await wait_until(lambda: _unhealthy(daemon, "has not answered"), deadline=10,
                     what="/health to tell of the hung state directory")
    assert not adding.done()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the mount comes back
    try:
        await error_of(await adding, 503, "state directory")
    finally:
        os.close(reader)
        fifo.unlink()
    _, body = await add(daemon, torrent_url=MAGNET)
    await wait_until(lambda: _healthy(daemon), deadline=5, what="a write to clear it")


async def test_health_tells_of_a_torrent_that_cannot_be_saved_while_others_can(daemon,
                                                                               tmp_path):
    """One torrent's saves fail (a directory where its temporary file goes), another's
    work: /health flapped to ok with each success of the other. It names the unsaved one
    until its own save works."""
    _, first = await add(daemon, torrent_url=MAGNET)
    _, second = await add(daemon, torrent_url=MAGNET[:-2] + "cd")
    blocker = tmp_path / "state" / "resume" / f"{first['infohash']}.tmp"
    blocker.mkdir()
    await error_of(await daemon.put(f"/torrents/{first['infohash']}/pause"), 503, "")
    assert (await daemon.put(f"/torrents/{second['infohash']}/pause")).status == 200
    assert await _unhealthy(daemon, first["infohash"])  # the other's save just worked
    blocker.rmdir()
    assert (await daemon.put(f"/torrents/{first['infohash']}/pause")).status == 200
    await wait_until(lambda: _healthy(daemon), deadline=5, what="/health to be well again")


async def test_a_slow_load_is_not_a_hung_state_directory(tmp_path, aiohttp_client,
                                                         monkeypatch):
    """A library read from a slow disk (a NAS, an SD card) took one job longer than the
    hang limit: /health said the state directory hung, and a liveness probe would have
    restarted the daemon in a loop. The fake: each resume file's read made slow (0.1 s,
    the limit 0.3 s), as such a disk's; loopback cannot make one."""
    resume = tmp_path / "state" / "resume"
    resume.mkdir(parents=True)
    for number in range(1, 16):
        params = lt.parse_magnet_uri(f"magnet:?xt=urn:btih:{number:040x}")
        params.save_path = str(tmp_path / "downloads")
        (resume / f"{number:040x}.resume").write_bytes(lt.write_resume_data_buf(params))
    monkeypatch.setattr(torrentflow, "ALERT_WAIT", 0.3)
    read = torrentflow.StateStore._read

    def slow_read(self, name, allowed):
        time.sleep(0.1)
        return read(self, name, allowed)
    monkeypatch.setattr(torrentflow.StateStore, "_read", slow_read)
    client = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))
    seen = set()

    async def loaded_watching_health():
        response = await client.get("/health")
        seen.add((response.status, (await response.json()).get("detail")))
        return engine_loaded(client)
    await wait_until(loaded_watching_health, what="the slow load to end")
    assert seen <= {(200, None)}, seen
    assert (await (await client.get("/torrents")).json())["total"] == 15


async def _healthy(client):
    return (await client.get("/health")).status == 200


async def _unhealthy(client, words):
    response = await client.get("/health")
    return response.status == 503 and words in (await response.json())["detail"].lower()


def test_a_file_name_no_disk_can_hold_counts_as_missing(tmp_path):
    """A NUL in a name (a hand-edited resume file) is a missing file, not a failed load."""
    assert torrentflow._missing_file(str(tmp_path), [(0, "a\x00b", 1)], [4]) == "a\x00b"


async def test_vanished_data_is_an_error_and_resume_fetches_it_again(process, seeders,
                                                                     tracker, tmp_path):
    seeder = seeders()
    torrent, source, layout = swarm_torrent(tmp_path, tracker, seeder, 1024 * 1024)
    infohash = infohash_of(torrent)
    await process.start()
    await add(process.client, torrent_file=torrent, save_path="kept")
    await wait_complete(process.client, infohash)
    # While it runs: noticed within DATA_CHECK_INTERVAL.
    (process.download_dir / "kept" / "data.bin").unlink()
    # The fault shows with the status that follows it; the pause a moment later.
    status = await wait_status(process.client, infohash, lambda s: s["error"] and s["paused"],
                               deadline=torrentflow.DATA_CHECK_INTERVAL + 5,
                               what="the missing file to be noticed")
    assert "missing or truncated file: data.bin" in status["error"]
    # libtorrent 2.1.1 does not dial again a peer it left as a fellow seed, so another
    # peer of the swarm serves the data this time.
    tracker.seeder = seeders().seed(torrent, source)
    await process.put(infohash, "resume")
    await wait_complete(process.client, infohash)
    # At start-up: a truncated file is noticed before anything is served from it.
    await process.stop()
    with open(process.download_dir / "kept" / "data.bin", "r+b") as file:
        file.truncate(1000)
    await process.start()  # waits for the load: the first status already holds it
    status = await status_of(process.client, infohash)
    assert "truncated" in status["error"] and status["paused"], status
    tracker.seeder = seeders().seed(torrent, source)
    await process.put(infohash, "resume")
    await wait_complete(process.client, infohash)
    assert same_tree(source, process.download_dir / "kept", layout)


async def test_the_state_directory_cannot_hang_the_daemon(process, tmp_path):
    """A FIFO where a resume file should be would block a read for ever."""
    torrent = idle_torrent(tmp_path, "good.bin")
    await process.start()
    await add(process.client, torrent_file=torrent)
    await process.stop()
    os.mkfifo(process.state_dir / "resume" / ("ab" * 20 + ".resume"))
    await process.start()  # waits for loading to end
    assert await process.infohashes() == {infohash_of(torrent)}
    assert "not a regular file" in process.log()
    code, seconds = await process.stop()
    assert code == 0 and seconds < STOP_GRACE
    # A directory where its resume file goes, its backup whole: it loads from the backup,
    # and the directory goes aside, or every save of it would fail (503) for ever.
    saved = process.state_dir / "resume" / f"{infohash_of(torrent)}.resume"
    saved.rename(saved.with_suffix(".bak"))
    saved.mkdir()
    await process.start()
    assert await process.infohashes() == {infohash_of(torrent)}
    async with process.client.put(f"/torrents/{infohash_of(torrent)}/pause") as response:
        assert response.status == 200, await response.text()
    assert saved.is_file()
    assert any(path.is_dir() for path in (process.state_dir / "quarantine").iterdir())


async def test_a_load_goes_on_when_a_bad_file_cannot_be_moved_aside(process, tmp_path):
    """quarantine/ a file, and a resume file that cannot be read: the move aside failed,
    the whole load with it, and every saved torrent answered 404 (an add of one wrote
    over its file). The bad file stays where it is, with an error in the log."""
    torrent = idle_torrent(tmp_path, "kept.bin")
    await process.start()
    await add(process.client, torrent_file=torrent, labels="kept")
    await process.stop()
    (process.state_dir / "resume" / ("cd" * 20 + ".resume")).write_bytes(b"not bencode")
    (process.state_dir / "quarantine").write_bytes(b"")
    await process.start()
    kept = await status_of(process.client, infohash_of(torrent))
    assert kept["labels"] == ["kept"]
    assert "cannot move unreadable" in process.log()
    assert (await process.client.get("/health")).status == 200


async def test_a_dead_background_task_makes_health_fail(daemon):
    engine = daemon.app[torrentflow.ENGINE]
    assert (await daemon.get("/health")).status == 200
    engine._tasks["save"].cancel()  # stands in for a crash: the task is gone either way
    await wait_until(lambda: _unhealthy(daemon, "the save task stopped"), deadline=5,
                     what="/health to report the dead task")


async def test_a_taken_bittorrent_port_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = DaemonProcess(tmp_path, extra=["--listen-interfaces", f"127.0.0.1:{port}"])
        with pytest.raises(AssertionError, match="daemon exited with 2"):
            await process.start()
        assert "--listen-interfaces" in process.log() and f"127.0.0.1:{port}" in process.log()
        assert "Traceback" not in process.log()
        await process.close()


# --------------------------------------------------------------------------- #
# Status fields that scripts can trust
# --------------------------------------------------------------------------- #

async def test_rates_fall_to_zero_and_totals_last(daemon, tmp_path):
    seeder, _, layout, infohash = await slow_download(
        daemon, tmp_path, "rated.bin", 3 * 1024 * 1024, 500_000)
    moving = await wait_status(daemon, infohash, lambda s: s["download_rate"] > 0,
                               what="a download rate")
    assert moving["download_rate"] < 2 * 500_000  # payload, about what the seeder sends
    assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
    paused = await status_of(daemon, infohash)
    assert paused["download_rate"] == 0 and paused["upload_rate"] == 0  # at once
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
    resumed = await status_of(daemon, infohash)
    # Lifetime counters: a pause and resume do not start them again.
    assert resumed["total_download"] >= paused["total_download"] > 0
    seeder.session.set_peer_class(seeder.session.local_peer_class_id,
                                  {"upload_limit": 0, "download_limit": 0})
    done = await wait_complete(daemon, infohash)
    assert done["total_download"] >= layout["rated.bin"]
    # Nothing moves after the last byte: 0 within two seconds (and a tick).
    await wait_status(daemon, infohash, lambda s: s["download_rate"] == 0, deadline=3,
                      what="the rate to fall to 0")


async def test_the_first_finished_status_already_shows_every_file_complete(daemon, seeder,
                                                                           tmp_path):
    layout = {"set/a.bin": 5 * 1024 * 1024 + 1, "set/b.bin": 7 * 1024 * 1024 + 3}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "set")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    status = await wait_status(daemon, body["infohash"], lambda s: s["is_finished"],
                               what="it to finish")
    # One document: finished, so every wanted file is whole in it.
    assert all(f["downloaded"] == f["size"] and f["progress"] == 100 for f in status["files"])


async def test_names_ids_and_order(daemon, seeder, tmp_path):
    # A magnet without dn= is named by its infohash, as other clients do.
    _, body = await add(daemon, torrent_url="magnet:?xt=urn:btih:" + "34" * 20)
    assert (await status_of(daemon, body["infohash"]))["name"] == "34" * 20
    # A v2-only torrent also answers to the first 40 hex digits of its hash, the form
    # qBittorrent lists it under.
    root = make_payload(tmp_path / "v2", {"v2.bin": 50_000})
    _, body = await add(daemon, torrent_file=make_torrent(root / "v2.bin",
                                                          version=lt.create_torrent.v2_only))
    assert len(body["infohash"]) == 64
    assert (await status_of(daemon, body["infohash"][:40].upper()))["infohash"] == body["infohash"]


async def test_the_list_keeps_the_added_order_across_a_restart(process, tmp_path):
    torrents = [idle_torrent(tmp_path / f"t{n}", f"order{n}.bin") for n in range(6)]
    ids = [infohash_of(t) for t in torrents]
    assert ids != sorted(ids)  # the order added is not the order of the names on disk
    await process.start()
    for torrent in torrents:
        await add(process.client, torrent_file=torrent)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        await process.restart(signum)
        async with process.client.get("/torrents?fields=infohash") as response:
            listed = [t["infohash"] for t in (await response.json())["torrents"]]
        assert listed == ids, signum


async def test_adding_again_with_another_save_path_is_a_conflict(daemon, tmp_path):
    _, body = await add(daemon, torrent_url=MAGNET, save_path="first")
    response, again = await add(daemon, expect=(409,), torrent_url=MAGNET, save_path="other")
    assert "'first'" in again["detail"]
    await add(daemon, expect=(200,), torrent_url=MAGNET, save_path="first")
    # Neither add created a directory; libtorrent makes it with the first file.
    assert not (tmp_path / "downloads" / "first").exists()
    assert not (tmp_path / "downloads" / "other").exists()


async def test_deleting_a_magnet_without_metadata_logs_no_failure(daemon, caplog):
    caplog.set_level("INFO")
    _, body = await add(daemon, torrent_url=MAGNET)
    response = await daemon.delete(f"/torrents/{body['infohash']}?delete_files=true")
    assert response.status == 200
    assert "could not delete" not in caplog.text and "Success" not in caplog.text


@pytest.mark.parametrize("argv, environ, words", [
    ([], {"TORRENTFLOW_PORT": "99999"}, "TORRENTFLOW_PORT"),
    ([], {"TORRENTFLOW_SAVE_INTERVAL": "0"}, "TORRENTFLOW_SAVE_INTERVAL"),
    ([], {"TORRENTFLOW_LOG_LEVEL": "loud"}, "TORRENTFLOW_LOG_LEVEL"),
    (["--port", "http"], {}, "--port"),
    (["--web-ui", "/nonexistent/web"], {}, "--web-ui"),
])
def test_configuration_errors_name_the_flag_and_the_variable(argv, environ, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        torrentflow.parse_config(argv, environ)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert words in error and "Traceback" not in error
    assert "_port" not in error and "_seconds" not in error  # no internal names


def test_a_download_dir_that_is_a_file_stops_the_start_with_its_name(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    result = subprocess.run(
        [sys.executable, str(HERE / "torrentflow.py"), "--local-only", "--listen-interfaces",
         "127.0.0.1:0", "--port", "0", "--download-dir", str(tmp_path / "afile"),
         "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert str(tmp_path / "afile") in result.stderr and "is a file" in result.stderr
    assert "--download-dir (TORRENTFLOW_DOWNLOAD_DIR)" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_api_port_in_use_names_the_option_to_change(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, str(HERE / "torrentflow.py"), "--local-only",
             "--listen-interfaces", "127.0.0.1:0", "--port", str(taken.getsockname()[1]),
             "--download-dir", str(tmp_path / "d"), "--state-dir", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
    assert result.returncode == 2, result.stderr
    assert "--port (TORRENTFLOW_PORT)" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_line_speaks_plainly():
    run = lambda *argv: subprocess.run([sys.executable, str(HERE / "torrentflow.py"), *argv],
                                       capture_output=True, text=True, timeout=30,
                                       env=CLEAN_ENV)
    bad = run("--bogus")
    assert bad.returncode == 2 and "usage:" not in bad.stderr
    assert bad.stderr.splitlines() == ["torrentflow.py: error: unrecognized arguments: --bogus",
                                       "see torrentflow.py --help"]
    text = " ".join(run("--help").stdout.split())
    assert "(default on; TORRENTFLOW_DHT)" in text and "True" not in text
    assert "(default finished,error,removed;" in text and "('" not in text
    assert "pause, remove, remove_with_files (default pause;" in text
    assert "debug, info, warning, error (default info;" in text


def test_version():
    result = subprocess.run([sys.executable, str(HERE / "torrentflow.py"), "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == (
        f"TorrentFlow {torrentflow.__version__}")


async def test_the_container_health_check_follows_the_configured_port(process):
    """The Dockerfile's HEALTHCHECK command, run as Docker would, against a daemon on a
    port other than 8080 (no Docker engine is needed to run the command itself)."""
    dockerfile = (HERE / "Dockerfile").read_text()
    command = re.search(r'HEALTHCHECK[^\n]*\\\n\s*CMD (python -c "[^\n]*")', dockerfile)[1]
    await process.start()
    environ = {**CLEAN_ENV, "TORRENTFLOW_PORT": str(process.port)}
    result = await asyncio.to_thread(subprocess.run, command, shell=True, env=environ,
                                     capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    environ["TORRENTFLOW_PORT"] = "9"  # nobody listens there: unhealthy
    result = await asyncio.to_thread(subprocess.run, command, shell=True, env=environ,
                                     capture_output=True, timeout=30)
    assert result.returncode != 0


# --------------------------------------------------------------------------- #
# Operator control: settings, views and actions
# --------------------------------------------------------------------------- #

def sha1_of(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


class Leecher(Seeder):
    """A loopback libtorrent session that downloads from the daemon."""

    def leech(self, torrent_bytes, save_root, peer_port):
        params = lt.load_torrent_buffer(torrent_bytes)
        params.save_path = str(save_root)
        params.peers = [("127.0.0.1", peer_port)]
        params.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
        self.handles.append(self.session.add_torrent(params))
        return self

    def done(self):
        return all(handle.status().is_seeding for handle in self.handles)


async def bt_port(client):
    return (await (await client.get("/health")).json())["listen_port"]


async def patch(client, path, body, expect=200):
    response = await client.patch(path, json=body)
    answer = await response.json()
    assert response.status == expect, (response.status, answer)
    return answer


async def test_added_paused_sends_nothing_until_resumed(daemon, tmp_path):
    source = make_payload(tmp_path / "source", {"held.bin": 1024 * 1024})
    torrent = make_torrent(source / "held.bin")
    seeder = Seeder().seed(torrent, source)
    tracker = "http://127.0.0.1:9/announce"
    _, body = await add(daemon, torrent_url=f"{seeder.magnet(torrent)}&tr={tracker}",
                        paused="true", labels="films,4k")
    infohash = body["infohash"]
    status = await status_of(daemon, infohash)
    assert status["paused"] and not status["auto_managed"]
    assert status["labels"] == ["films", "4k"]
    # A tracker of a paused torrent has no next announce yet.
    view = await conforms(await daemon.get(f"/torrents/{infohash}/trackers"), "get",
                          "/torrents/{infohash}/trackers")
    assert view["trackers"] == [{"url": tracker, "tier": 0, "status": "not_contacted",
                                 "message": "", "seeds": -1, "peers": -1, "downloaded": -1,
                                 "last_announce": None, "next_announce": None}]
    # Two confirmed status ticks later the seeder still has sent nothing.
    for _ in range(2):
        assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
    assert payload_sent(seeder) == 0 and seeder.num_peers() == 0
    listed = await (await daemon.get("/torrents?label=4k&fields=infohash")).json()
    assert listed["torrents"] == [{"infohash": infohash}]
    assert (await (await daemon.get("/torrents?label=none")).json())["total"] == 0
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
    await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads", {"held.bin": 1})


async def test_file_selection_downloads_only_the_chosen_files(daemon, tmp_path):
    layout = {"three/a.bin": 300_000, "three/b.bin": 500_000, "three/c.bin": 700_000}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "three")
    seeder = Seeder().seed(torrent, source)
    _, body = await add(daemon, torrent_file=torrent, file_priorities="0,4,0")
    infohash = body["infohash"]
    # The upload names no peer: introduce the seeder.
    daemon.app[torrentflow.ENGINE].lookup(infohash).handle.connect_peer(
        ("127.0.0.1", seeder.port))
    status = await wait_status(daemon, infohash, lambda s: s["is_finished"],
                               what="the chosen file")
    downloads = tmp_path / "downloads" / "three"
    assert sha1_of(downloads / "b.bin") == sha1_of(source / "three" / "b.bin")
    assert [f["priority"] for f in status["files"]] == [0, 4, 0]
    assert [f["downloaded"] == f["size"] for f in status["files"]] == [False, True, False]
    # libtorrent counts wanted bytes in whole pieces, so a little more than the file.
    assert not status["is_seeding"] and 500_000 <= status["total_wanted"] < 600_000
    # progress counts all files: the wanted third and the pieces it shares.
    assert 100 * 500_000 / 1_500_000 <= status["progress"] < 100 * 600_000 / 1_500_000
    # Unwanted files get at most the pieces they share with the wanted one.
    for name in ("a.bin", "c.bin"):
        path = downloads / name
        assert not path.exists() or sha1_of(path) != sha1_of(source / "three" / name)
    changed = await conforms(await daemon.patch(f"/torrents/{infohash}", json={
        "file_priorities": [4, 4, 4]}), "patch", "/torrents/{infohash}")
    assert [f["priority"] for f in changed["files"]] == [4, 4, 4]
    await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads", layout)
    # The object form changes some files only.
    changed = await patch(daemon, f"/torrents/{infohash}", {"file_priorities": {"2": 7}})
    assert [f["priority"] for f in changed["files"]] == [4, 4, 7]


async def test_file_priorities_given_with_a_magnet_skip_padding_and_survive_a_crash(
        process, seeders, tmp_path):
    """A hybrid's files have padding between them, unknown until the metadata comes;
    the choice is kept in the resume file until then."""
    layout = {"three/a.bin": 300_000, "three/b.bin": 500_000, "three/c.bin": 200_000}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "three", version=0)
    seeder = seeders()
    await process.start()
    _, body = await add(process.client, torrent_url=seeder.magnet(torrent),
                        file_priorities="4,0,4")
    await process.restart(signal.SIGKILL)  # before any metadata: the seeder has none yet
    seeder.seed(torrent, source)
    status = await wait_status(process.client, body["infohash"],
                               lambda s: s["is_finished"], what="the chosen files")
    assert [f["priority"] for f in status["files"]] == [4, 0, 4]
    assert [f["downloaded"] == f["size"] for f in status["files"]] == [True, False, True]
    downloads = process.download_dir / "three"
    for name in ("a.bin", "c.bin"):
        assert sha1_of(downloads / name) == sha1_of(source / "three" / name)
    assert not status["is_seeding"]
    # All its files sat at 0 until the list was mapped: not "finished" for that.
    assert process.log().count("torrentflow: finished ") == 1, process.log()
    await process.restart(signal.SIGTERM)  # the mapped list is what was saved
    status = await process.wait_listed(body["infohash"])
    assert [f["priority"] for f in status["files"]] == [4, 0, 4] and status["is_finished"]

async def test_a_download_limit_holds(daemon, tmp_path):
    source = make_payload(tmp_path / "source", {"big.bin": 16 * 1024 * 1024})
    torrent = make_torrent(source / "big.bin")
    seeder = Seeder().seed(torrent, source)
    limit = 2 * 1024 * 1024
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent), download_limit=str(limit))
    await wait_until(lambda: payload_sent(seeder) > 0, what="the first byte")
    started = time.monotonic()
    status = await status_of(daemon, body["infohash"])
    assert status["download_limit"] == limit
    # Over six seconds: the limiter lets bursts through, which socket buffers hold.
    await wait_until(lambda: time.monotonic() - started > 6, interval=0.5, what="6 s")
    rate = payload_sent(seeder) / (time.monotonic() - started)
    print(f"download limit {limit} B/s: the seeder sent {rate:.0f} B/s")
    assert 0 < rate < 1.5 * limit


async def test_a_ratio_limit_pauses_the_torrent_and_says_why(daemon, seeder, tmp_path):
    source = make_payload(tmp_path / "source", {"share.bin": 2 * 1024 * 1024})
    torrent = make_torrent(source / "share.bin")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent), ratio_limit="1.0")
    infohash = body["infohash"]
    await wait_complete(daemon, infohash)
    seeder.session.pause()  # the daemon must be the only source now
    settings = await patch(daemon, "/settings", {"on_limit": "pause"})
    assert settings["on_limit"] == "pause"
    leecher = Leecher().leech(torrent, tmp_path / "leech", await bt_port(daemon))
    status = await wait_status(daemon, infohash, lambda s: s["limit_reached"],
                               what="the ratio limit")
    assert "ratio" in status["limit_reached"] and status["ratio"] >= 1.0
    await wait_status(daemon, infohash, lambda s: s["paused"], deadline=5,
                      what="the pause")
    assert leecher.done()
    # Resumed by hand, it seeds on: the limit it reached does not act again.
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
    await wait_until(lambda: _stays_running(daemon, infohash), deadline=10,
                     what="it to stay running")


async def test_a_clock_step_is_no_seeding_time_and_idle_seeds_count_theirs(daemon, tmp_path,
                                                                            monkeypatch):
    """A seed, idle (no peer): its seeding_time stayed 0 in the status, for libtorrent
    does not report a torrent whose only change is its time counters; now it is asked each
    TIMES_INTERVAL (1 s here). And the wall clock stepping two hours ahead (an NTP step, a
    VM restored) counted as two hours of seeding: with on_limit remove_with_files, the
    data went. The fake: time.time moved for this process; loopback cannot step a clock."""
    monkeypatch.setattr(torrentflow, "TIMES_INTERVAL", 1.0)
    torrent, top = in_place(tmp_path, {"seed/kept.bin": 100_000})
    infohash = await added_and_checked(daemon, torrent)
    await patch(daemon, "/settings", {"on_limit": "remove_with_files"})
    await patch(daemon, f"/torrents/{infohash}", {"seeding_time_limit": 3600})
    await wait_status(daemon, infohash, lambda s: s["seeding_time"] >= 2, deadline=15,
                      what="seeding_time to count while idle")
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 7200)
    ticks = []
    daemon.app[torrentflow.ENGINE].listen("tick", lambda: ticks.append(1))
    await wait_until(lambda: len(ticks) >= 6, what="six status ticks")
    status = await status_of(daemon, infohash)
    assert status["limit_reached"] is None and status["seeding_time"] < 600, status
    assert (top / "kept.bin").exists()


async def _stays_running(client, infohash):
    for _ in range(3):  # three confirmed status ticks
        assert (await client.put(f"/torrents/{infohash}/resume")).status == 200
    status = await status_of(client, infohash)
    return not status["paused"] and status["limit_reached"] is None


async def test_moving_keeps_seeding_and_stays_inside_the_roots(daemon, seeder, tmp_path):
    source = make_payload(tmp_path / "source", {"move.bin": 1024 * 1024})
    torrent = make_torrent(source / "move.bin")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent), save_path="before")
    infohash = body["infohash"]
    await wait_complete(daemon, infohash)
    for outside in ("../elsewhere", "/etc", str(tmp_path)):
        await error_of(await daemon.patch(f"/torrents/{infohash}",
                                          json={"save_path": outside}), 400, "save_path")
    moved = await patch(daemon, f"/torrents/{infohash}", {"save_path": "after/deep"})
    assert moved["save_path"] == str(tmp_path / "downloads" / "after" / "deep")
    assert moved["moving_to"] is None and moved["error"] == ""
    assert not (tmp_path / "downloads" / "before" / "move.bin").exists()
    assert sha1_of(tmp_path / "downloads" / "after" / "deep" / "move.bin") == \
        sha1_of(source / "move.bin")
    seeder.session.pause()
    leecher = Leecher().leech(torrent, tmp_path / "leech", await bt_port(daemon))
    await wait_until(leecher.done, what="a new leecher served from the new place")
    # Seeding says every piece passed its hash check; libtorrent may still hold the last
    # blocks in its write buffer for a moment, so the file is compared once written.
    leeched = tmp_path / "leech" / "move.bin"
    await wait_until(lambda: leeched.exists() and sha1_of(leeched) == sha1_of(
        source / "move.bin"), what="the leeched file on disk")


@pytest.mark.parametrize("cut", ["copying", "copied", "renamed"])
async def test_a_move_a_crash_cut_short_resumes_where_the_data_is_whole(process, tmp_path,
                                                                        cut):
    """Across file systems libtorrent copies every file, then deletes the originals: a
    crash while it copies leaves the originals whole and a copy of full size but not yet
    of full data; one between the two leaves the target whole. Within one file system it
    renames file by file: a crash leaves some files in each place, and the moved ones go
    back."""
    layout = {"pack/a.bin": 200_000, "pack/b.bin": 300_000}
    source = make_payload(process.download_dir, layout)
    torrent = make_torrent(source / "pack")
    infohash = infohash_of(torrent)
    await process.start()
    await add(process.client, torrent_file=torrent)
    await wait_complete(process.client, infohash)
    await process.stop(signal.SIGTERM)
    # The state such a crash leaves, made by hand: copied, one original deleted, the
    # move noted in the resume file, no clean-shutdown mark.
    target = process.download_dir / "moved"
    sums = {name: sha1_of(source / name) for name in layout}
    if cut == "copying":
        shutil.copytree(source / "pack", target / "pack")
        (target / "pack" / "b.bin").write_bytes(bytes(layout["pack/b.bin"]))
    elif cut == "copied":
        shutil.copytree(source / "pack", target / "pack")
        (source / "pack" / "a.bin").unlink()
    else:
        (target / "pack").mkdir(parents=True)
        (source / "pack" / "a.bin").rename(target / "pack" / "a.bin")
    resume_file = process.state_dir / "resume" / f"{infohash}.resume"
    resume = lt.bdecode(resume_file.read_bytes())
    notes = json.loads(resume[torrentflow.NOTES_KEY])
    resume[torrentflow.NOTES_KEY] = json.dumps({**notes, "moving_to": str(target)}).encode()
    resume_file.write_bytes(lt.bencode(resume))
    (process.state_dir / torrentflow.CLEAN_MARK).unlink()
    await process.start()
    status = await wait_complete(process.client, infohash)
    place = target if cut == "copied" else process.download_dir
    assert status["save_path"] == str(place) and status["moving_to"] is None
    assert not status["error"]
    assert {name: sha1_of(place / name) for name in layout} == sums


def bind_mount(mount_point):
    """A bind mount of a directory beside it at mount_point: one file system, yet rename()
    across fails (EXDEV), as between a container's volumes."""
    (source := mount_point.with_name(mount_point.name + "-source")).mkdir()
    return mounted(mount_point, "--bind", str(source))


async def stopped_half_done(process, tmp_path):
    """A two-file download with one file in place and none to fetch the other from, added
    to process and stopped by SIGTERM: (its infohash, its last status)."""
    source = make_payload(tmp_path / "source", {"pack/a.bin": 300_000, "pack/b.bin": 200_000})
    torrent = make_torrent(source / "pack")
    (process.download_dir / "pack").mkdir(parents=True)
    shutil.copy(source / "pack" / "a.bin", process.download_dir / "pack")  # b: none
    await process.start()
    await add(process.client, torrent_file=torrent)
    before = await wait_status(process.client, infohash_of(torrent), lambda s: s["state"] ==
                               "downloading", what="the check of a.bin")
    assert 0 < before["progress"] < 100
    await process.stop(signal.SIGTERM)
    return infohash_of(torrent), before


@pytest.mark.parametrize("other_disk", [lambda path: tmpfs(path, "16m"), bind_mount],
                         ids=["tmpfs", "bind-mount"])
async def test_a_partial_download_a_crash_cut_moving_keeps_its_data(tmp_path, other_disk):
    """A download not yet whole, moved to another file system: a crash after libtorrent
    copied every file and deleted an original left the copies the only data. The start
    took the old place, empty then, and downloaded it all again. A bind mount shares its
    disk's device number, so only the rename's EXDEV tells."""
    with other_disk(tmp_path / "other") as other:
        process = DaemonProcess(tmp_path, extra=["--allowed-save-root", str(other)])
        try:
            infohash, before = await stopped_half_done(process, tmp_path)
            # What the crash leaves, made by hand: copied, the original deleted, the move
            # noted in the resume file, no clean-shutdown mark.
            (other / "pack").mkdir()
            shutil.copy(process.download_dir / "pack" / "a.bin", other / "pack")
            (process.download_dir / "pack" / "a.bin").unlink()
            resume_file = process.state_dir / "resume" / f"{infohash}.resume"
            resume = lt.bdecode(resume_file.read_bytes())
            notes = json.loads(resume[torrentflow.NOTES_KEY])
            resume[torrentflow.NOTES_KEY] = json.dumps(
                {**notes, "moving_to": str(other)}).encode()
            resume_file.write_bytes(lt.bencode(resume))
            (process.state_dir / torrentflow.CLEAN_MARK).unlink()
            await process.start()
            after = await wait_status(process.client, infohash, lambda s: s["state"] ==
                                      "downloading", what="the start")
            assert after["save_path"] == str(other) and after["moving_to"] is None
            assert after["total_done"] == before["total_done"], (before, after)
        finally:
            await process.close()


async def test_a_download_whose_files_vanished_while_stopped_is_held(tmp_path):
    """A download half done, its files gone while the daemon was stopped (a drive not
    mounted): it went on downloading everything again into the empty place. It is held,
    with the missing file in error, as a finished one is; resume starts it again."""
    process = DaemonProcess(tmp_path)
    try:
        infohash, before = await stopped_half_done(process, tmp_path)
        shutil.rmtree(process.download_dir / "pack")
        await process.start()
        held = await status_of(process.client, infohash)
        assert held["error"] == "missing or truncated file: pack/a.bin", held
        assert held["paused"] and not held["auto_managed"]
        assert not (process.download_dir / "pack").exists()
        assert (await process.client.put(f"/torrents/{infohash}/resume")).status == 200
        again = await wait_status(process.client, infohash, lambda s: s["state"] ==
                                  "downloading", what="the resumed download")
        assert again["error"] == "" and again["progress"] == 0
    finally:
        await process.close()


async def test_a_move_a_delete_cut_short_answers_404(tmp_path):
    """A DELETE with its files while a PATCH waits for its move across file systems: the
    PATCH answered 200 with the status of a torrent that was gone."""
    with tmpfs(tmp_path / "other", "512m") as other:
        process = DaemonProcess(tmp_path, extra=["--allowed-save-root", str(other)])
        try:
            # Large enough that copying it takes a good part of a second.
            source = make_payload(process.download_dir, {"big.bin": 300 * 1024 * 1024})
            torrent = make_torrent(source / "big.bin", piece_size=4 * 1024 * 1024)
            infohash = infohash_of(torrent)
            await process.start()
            await add(process.client, torrent_file=torrent)
            await wait_complete(process.client, infohash)
            patch = asyncio.ensure_future(process.client.patch(
                f"/torrents/{infohash}", json={"save_path": str(other / "moved")}))
            await wait_status(process.client, infohash, lambda s: s["moving_to"],
                              what="the move to start")
            assert not patch.done(), "the move ended before the DELETE: nothing was raced"
            async with process.client.delete(
                    f"/torrents/{infohash}?delete_files=true") as removed:
                assert removed.status == 200, await removed.text()
            await error_of(await patch, 404, infohash)
            assert (await process.client.get(f"/torrents/{infohash}")).status == 404
        finally:
            await process.close()


async def test_a_recheck_finds_a_flipped_byte(daemon, seeder, tmp_path):
    source = make_payload(tmp_path / "source", {"flip.bin": 1024 * 1024})
    torrent = make_torrent(source / "flip.bin")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_complete(daemon, infohash)
    assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
    target = tmp_path / "downloads" / "flip.bin"
    data = bytearray(target.read_bytes())
    data[500_000] ^= 0xFF
    target.write_bytes(bytes(data))
    assert (await daemon.put(f"/torrents/{infohash}/recheck")).status == 200
    # A paused torrent is checked once resumed.
    assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
    await wait_status(daemon, infohash, lambda s: s["progress"] < 100, what="the bad piece")
    await wait_complete(daemon, infohash)
    assert sha1_of(target) == sha1_of(source / "flip.bin")


async def test_peers_trackers_and_reannounce(daemon, tracker, tmp_path):
    seeder = Seeder(rate_limit=300_000)
    torrent, source, _ = swarm_torrent(tmp_path, tracker, seeder, 2 * 1024 * 1024)
    _, body = await add(daemon, torrent_file=torrent)
    infohash = body["infohash"]

    async def seeder_listed():
        peers = await (await daemon.get(f"/torrents/{infohash}/peers")).json()
        return [p for p in peers["peers"] if p["port"] == seeder.port
                and "seed" in p["flags"]]
    peer = (await wait_until(seeder_listed, what="the seeder among the peers"))[0]
    assert peer["ip"] == "127.0.0.1" and peer["connection"] == "tcp"
    assert "seed" in peer["flags"] and peer["source"] == ["tracker"]
    await conforms(await daemon.get(f"/torrents/{infohash}/peers"), "get",
                   "/torrents/{infohash}/peers")

    async def tracker_view():
        listed = await conforms(await daemon.get(f"/torrents/{infohash}/trackers"), "get",
                                "/torrents/{infohash}/trackers")
        return listed["trackers"] if listed["trackers"][0]["status"] == "working" else None
    view = await wait_until(tracker_view, what="the tracker to work")
    assert view[0]["url"] == tracker.url("/announce") and view[0]["last_announce"]
    before = tracker.announces
    assert (await daemon.put(f"/torrents/{infohash}/reannounce")).status == 200
    await wait_until(lambda: tracker.announces > before, deadline=10, what="a second announce")
    other = tracker.url("/announce?other=1")
    changed = await patch(daemon, f"/torrents/{infohash}", {"trackers": [[other]]})
    assert changed["infohash"] == infohash
    listed = await (await daemon.get(f"/torrents/{infohash}/trackers")).json()
    assert [t["url"] for t in listed["trackers"]] == [other]


async def test_the_tracker_view_of_v1_v2_and_hybrid_torrents(daemon, aiohttp_server, tmp_path):
    """libtorrent keeps each hash's announces apart, and copies only the v1 one to the
    top of a tracker entry: a v2-only torrent's tracker must show its own."""
    async def announce(request):
        return web.Response(body=lt.bencode({"interval": 1800, "complete": 3,
                                             "incomplete": 5, "peers": b""}))
    app = web.Application()
    app.router.add_get("/announce", announce)
    url = str((await aiohttp_server(app)).make_url("/announce"))
    for version in (lt.create_torrent.v1_only, lt.create_torrent.v2_only, 0):
        source = make_payload(tmp_path / f"v{version}", {"t.bin": 40000})
        _, body = await add(daemon, torrent_file=make_torrent(source / "t.bin", PIECE,
                                                              version, tracker=url),
                            save_path=f"v{version}")

        async def view():
            answer = await daemon.get(f"/torrents/{body['infohash']}/trackers")
            tracker, = (await answer.json())["trackers"]
            return tracker if tracker["status"] == "working" and tracker["seeds"] == 3 else None
        tracker = await wait_until(view, what=f"the announce of version {version}")
        assert tracker["peers"] == 5 and tracker["next_announce"] > tracker["last_announce"]
    # A tracker dropped at add (not on loopback, with --local-only) takes no tier along.
    many = lt.create_torrent(lt.list_files(str(source / "t.bin")), PIECE,
                             lt.create_torrent.v1_only)
    for tier, tracker in enumerate(("http://tracker.example.com/announce", url, url + "?b")):
        many.add_tracker(tracker, tier)
    many.add_tracker(url + "?c", 1)  # beside url
    lt.set_piece_hashes(many, str(source))
    _, body = await add(daemon, torrent_file=lt.bencode(many.generate()),
                        save_path="elsewhere")
    listed = await (await daemon.get(f"/torrents/{body['infohash']}/trackers")).json()
    tiers = {tracker["url"]: tracker["tier"] for tracker in listed["trackers"]}
    assert tiers[url] == tiers[url + "?c"] < tiers[url + "?b"] and len(tiers) == 3

async def test_the_bindings_cannot_read_the_peer_tracker_and_file_alerts(tmp_path):
    """Why the peer and tracker views and per-file progress use libtorrent's getters on a
    worker thread instead of TorrentEngine.expect(): the alerts that carry the same lists
    cannot be read in these bindings. When this fails, the bindings learned to, and the
    views can wait on those alerts like every other request."""
    seeder = Seeder()
    root = make_payload(tmp_path / "a", {"a.bin": 3 * PIECE})
    seeder.seed(make_torrent(root / "a.bin", tracker="http://127.0.0.1:1/announce"), root)
    handle = seeder.handles[0]
    handle.post_peer_info()
    handle.post_trackers()
    handle.post_file_progress(lt.torrent_handle.piece_granularity)
    lists = {lt.peer_info_alert: "peer_info", lt.tracker_list_alert: "trackers",
             lt.file_progress_alert: "files"}
    seen = {}

    def collect():
        # Read at once: an alert dies at the next pop.
        for alert in seeder.session.pop_alerts():
            if type(alert) in lists:
                try:
                    seen[type(alert)] = type(getattr(alert, lists[type(alert)])).__name__
                except TypeError as error:
                    seen[type(alert)] = str(error)
        return len(seen) == len(lists)
    await wait_until(collect, deadline=10, what="the three alerts")
    assert all("No to_python (by-value) converter" in outcome for outcome in seen.values()), \
        seen


async def test_bulk_pause_and_resume_by_label(daemon, tmp_path):
    ids = {}
    for name, labels in (("a", "x"), ("b", "x,y"), ("c", "")):
        root = make_payload(tmp_path / name, {f"{name}.bin": 30_000})
        fields = {"labels": labels} if labels else {}
        _, body = await add(daemon, torrent_file=make_torrent(root / f"{name}.bin"), **fields)
        ids[name] = body["infohash"]
    answer = await conforms(await daemon.put("/torrents/pause?label=x"), "put",
                            "/torrents/pause")
    assert answer["count"] == 2
    paused = await (await daemon.get("/torrents?paused=true&fields=infohash,auto_managed")).json()
    assert {t["infohash"] for t in paused["torrents"] if not t["auto_managed"]} == {
        ids["a"], ids["b"]}
    assert (await (await daemon.put("/torrents/resume")).json())["count"] == 3
    await error_of(await daemon.put("/torrents/pause?colour=red"), 400, "colour")


async def test_settings_change_and_survive_a_restart(process, tmp_path):
    await process.start()
    async with process.client.get("/settings") as response:
        settings = await conforms(response, "get", "/settings")
    assert settings["on_limit"] == "pause" and settings["max_active_downloads"] == 3
    changes = {"download_limit": 500_000, "max_active_downloads": 7, "ratio_limit": 2.5,
               "on_limit": "remove"}
    async with process.client.patch("/settings", json=changes) as response:
        assert {**settings, **changes} == await conforms(response, "patch", "/settings")
    await process.restart(signal.SIGKILL)
    async with process.client.get("/settings") as response:
        assert await response.json() == {**settings, **changes}


async def test_a_bad_saved_settings_file_is_logged_and_the_rest_kept(process, tmp_path):
    """The state directory is not trusted: a bad value, an unknown key or bad JSON in
    settings.json is logged and left out; the daemon starts with the flags."""
    settings = process.state_dir / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"upload_limit": 1234, "max_active_downloads": "many",
                                    "on_limit": "explode", "colour": "red"}))
    await process.start()
    async with process.client.get("/settings") as response:
        chosen = await response.json()
    assert chosen["upload_limit"] == 1234 and chosen["max_active_downloads"] == 3
    assert chosen["on_limit"] == "pause" and "colour" not in chosen
    log = process.log()
    assert "max_active_downloads='many'" in log and "colour='red'" in log, log
    for bad in (b"{not json", b"[" * 100_000 + b"]" * 100_000):  # past the parser's depth
        await process.stop()
        settings.write_bytes(bad)
        await process.start()
        async with process.client.get("/settings") as response:
            assert (await response.json())["upload_limit"] == 0
        assert "ignoring " + str(settings) in process.log()
    # Not a regular file: a directory holding a settings.json, or a link, is not read.
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"upload_limit": 555}))
    for kind in ("directory", "link"):
        await process.stop()
        if kind == "directory":
            settings.unlink()
            settings.mkdir()
            (settings / "settings.json").write_bytes(elsewhere.read_bytes())
        else:
            shutil.rmtree(settings)
            settings.symlink_to(elsewhere)
        await process.start()
        async with process.client.get("/settings") as response:
            assert (await response.json())["upload_limit"] == 0
        assert f"skipping {settings}: not a regular file" in process.log()


async def test_every_setting_survives_a_crash(process, seeders, tmp_path):
    layout = {"kept/one.bin": 200_000, "kept/two.bin": 300_000}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "kept")
    seeder = seeders().seed(torrent, source)
    await process.start()
    _, body = await add(process.client, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_complete(process.client, infohash)
    # The second label looks like the daemon's own key in the resume file.
    chosen = {"labels": ["keep", "13:x-torrentflow2:{}"], "file_priorities": [7, 1],
              "sequential_download": True, "download_limit": 100_000, "upload_limit": 200_000,
              "max_connections": 30, "max_uploads": 4, "ratio_limit": 3.0,
              "seeding_time_limit": 3600, "trackers": ["http://127.0.0.1:9/announce"],
              "save_path": "moved"}
    async with process.client.patch(f"/torrents/{infohash}", json=chosen) as response:
        before = await response.json()
        assert response.status == 200, before
    await process.restart(signal.SIGKILL)
    after = await process.wait_listed(infohash)
    for name in ("labels", "sequential_download", "download_limit", "upload_limit",
                 "max_connections", "max_uploads", "ratio_limit", "seeding_time_limit",
                 "save_path"):
        assert after[name] == before[name], name
    assert [f["priority"] for f in after["files"]] == [7, 1]
    assert after["save_path"] == str(process.download_dir / "moved")
    async with process.client.get(f"/torrents/{infohash}/trackers") as response:
        assert [t["url"] for t in (await response.json())["trackers"]] == chosen["trackers"]


@pytest.mark.parametrize("body, status, words", [
    ({"colour": "red"}, 400, "unknown field"),
    ({"download_limit": "fast"}, 400, "download_limit"),
    ({"download_limit": -5}, 422, "download_limit"),
    ({"download_limit": 2**40}, 422, "download_limit"),
    ({"max_connections": 1}, 422, "max_connections"),
    ({"ratio_limit": True}, 400, "ratio_limit"),
    ({"ratio_limit": -3}, 422, "ratio_limit"),
    ({"labels": "a"}, 400, "labels"),
    ({"labels": [""]}, 422, "labels"),
    ({"file_priorities": [9]}, 422, "file_priorities"),
    ({"file_priorities": "x"}, 400, "file_priorities"),
    ({"file_priorities": [4, 4]}, 422, "entries"),
    ({"file_priorities": {"99": 4}}, 422, "no file"),
    ({"file_priorities": {"0": 4, "00": 1}}, 400, "file index"),  # which one wins?
    ({"trackers": "http://x"}, 400, "trackers"),
    ({"trackers": ["ftp://x/announce"]}, 422, "trackers"),
    ({"trackers": ["http://tracker.example/announce"]}, 422, "not allowed"),
    ({"sequential_download": "yes please"}, 400, "sequential_download"),
    ({"save_path": 5}, 400, "save_path"),
    ({"paused": True}, 400, "unknown field"),
])
async def test_bad_changes_are_refused(daemon, tmp_path, body, status, words):
    root = make_payload(tmp_path / "src", {"one.bin": 30_000})
    _, added = await add(daemon, torrent_file=make_torrent(root / "one.bin"))
    path = f"/torrents/{added['infohash']}"
    await error_of(await daemon.patch(path, json=body), status, words)
    assert (await status_of(daemon, added["infohash"]))["download_limit"] == 0


async def test_bad_control_requests_are_refused(daemon, tmp_path):
    unknown = "0" * 40
    for method, path in (("PATCH", f"/torrents/{unknown}"), ("GET", f"/torrents/{unknown}/peers"),
                         ("GET", f"/torrents/{unknown}/trackers"),
                         ("PUT", f"/torrents/{unknown}/recheck"),
                         ("PUT", f"/torrents/{unknown}/reannounce")):
        await error_of(await daemon.request(method, path, json={}), 404, "no torrent")
    _, body = await add(daemon, torrent_url=MAGNET)
    path = f"/torrents/{body['infohash']}"
    await error_of(await daemon.patch(path, json={"file_priorities": [4]}), 409, "metadata")
    await conforms(await daemon.patch(path, json={"file_priorities": [4]}), "patch",
                   "/torrents/{infohash}")
    await conforms(await daemon.patch(path, json={"labels": ["a"]}), "patch",
                   "/torrents/{infohash}")
    await error_of(await daemon.patch(path, data="x", headers={"Content-Type": "text/plain"}),
                   415, "application/json")
    await error_of(await daemon.patch(path, data="{", headers={
        "Content-Type": "application/json"}), 400, "malformed")
    for settings, status in (({"colour": 1}, 400), ({"on_limit": "explode"}, 422),
                             ({"max_active_seeds": -2}, 422), ({"upload_limit": "x"}, 400),
                             ({"ratio_limit": 10 ** 400}, 422)):
        await error_of(await daemon.patch("/settings", json=settings), status, "")
    for fields, status in (({"ratio_limit": "x"}, 400), ({"file_priorities": "4,9"}, 422),
                           ({"paused": "maybe"}, 400), ({"labels": "a" * 65}, 422)):
        response, _ = await add(daemon, expect=(status,), torrent_url=MAGNET[:-2] + "77",
                                **fields)
    root = make_payload(tmp_path / "src", {"one.bin": 30_000})
    response, _ = await add(daemon, expect=(422,), torrent_file=make_torrent(root / "one.bin"),
                            file_priorities="4,4")


# --------------------------------------------------------------------------- #
# Watching it live: events, webhooks, metrics
# --------------------------------------------------------------------------- #

class EventReader:
    """A GET /events subscriber: yields (event type, data, id) as they come."""

    def __init__(self, response):
        self.response = response

    async def next(self, deadline=DEADLINE):
        fields = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), deadline)
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if not line and fields:
                return (fields.get("event"), json.loads(fields.get("data", "{}")),
                        fields.get("id"))
            if line and not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value

    async def until(self, wanted, infohash=None, deadline=DEADLINE):
        """Events up to and including the first of type wanted (for infohash)."""
        seen = []
        while True:
            event = await self.next(deadline)
            assert event is not None, f"the stream ended before {wanted}: {seen}"
            seen.append(event)
            if event[0] == wanted and (infohash is None or event[1]["infohash"] == infohash):
                return seen


async def test_the_event_stream_tells_what_happens(daemon, seeder, tmp_path):
    source = make_payload(tmp_path / "source", {"live.bin": 3 * 1024 * 1024})
    torrent = make_torrent(source / "live.bin")
    seeder.seed(torrent, source)
    infohash = infohash_of(torrent)
    response = await daemon.get("/events")
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    reader = EventReader(response)
    await add(daemon, torrent_url=seeder.magnet(torrent))
    seen = await reader.until("finished", infohash)
    # The moment "finished" arrives, the file is complete on disk.
    assert sha1_of(tmp_path / "downloads" / "live.bin") == sha1_of(source / "live.bin")
    kinds = [kind for kind, _, _ in seen]
    assert kinds[0] == "added" and kinds.count("finished") == 1
    assert seen[-1][1]["torrent"]["name"] == "live.bin" and seen[-1][1]["infohash"] == infohash
    ids = [int(event_id) for _, _, event_id in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for action in ("pause", "resume"):
        assert (await daemon.put(f"/torrents/{infohash}/{action}")).status == 200
        assert (await reader.until(action + "d", infohash))[-1][0] == action + "d"
    last_id = ids[-1]
    response.close()
    # Reconnected with Last-Event-ID: what happened since comes first.
    replay = EventReader(await daemon.get("/events", headers={"Last-Event-ID": str(last_id)}))
    replayed = await replay.until("resumed", infohash)
    assert [kind for kind, _, _ in replayed][:2] == ["paused", "resumed"][:len(replayed[:2])]
    assert all(int(event_id) > last_id for _, _, event_id in replayed)
    # A replay honours the filters too: only the settings change comes, not the pauses.
    assert (await daemon.patch("/settings", json={"upload_limit": 0})).status == 200
    assert (await daemon.patch("/settings", json={"upload_limit": 5_000_000})).status == 200
    picky = EventReader(await daemon.get("/events?types=settings",
                                         headers={"Last-Event-ID": str(last_id)}))
    kind, data, _ = await picky.next()  # the first PATCH changed nothing: no event
    assert kind == "settings" and data["detail"] == "upload_limit=5000000"
    # Filters, and an id the ring does not hold.
    filtered = EventReader(await daemon.get(f"/events?types=removed&infohash={infohash}",
                                            headers={"Last-Event-ID": "999999999"}))
    assert (await filtered.next())[0] == "reset"
    assert (await daemon.delete(f"/torrents/{infohash}")).status == 200
    kind, data, _ = await filtered.next()
    assert kind == "removed" and data["infohash"] == infohash


async def test_an_event_filter_takes_any_id_of_a_torrent(daemon, tmp_path):
    source = make_payload(tmp_path / "hybrid", {"both.bin": 40_000})
    torrent = make_torrent(source / "both.bin", version=0)
    _, body = await add(daemon, torrent_file=torrent)
    v2 = str(lt.load_torrent_buffer(torrent).ti.info_hashes().v2)
    stream = EventReader(await daemon.get(f"/events?types=paused&infohash={v2.upper()}"))
    assert (await daemon.put(f"/torrents/{v2}/pause")).status == 200
    kind, data, _ = await stream.next()
    assert kind == "paused" and data["infohash"] == body["infohash"] != v2


async def test_bad_event_requests_are_refused(daemon, tmp_path):
    for query, headers in (("types=finished,bogus", {}), ("infohash=xyz", {}),
                           ("colour=red", {}), ("", {"Last-Event-ID": "abc"}),
                           ("", {"Last-Event-ID": "9" * 40})):
        await error_of(await daemon.get(f"/events?{query}", headers=headers), 400, "")
    for argv in (["--webhook", "ftp://127.0.0.1/hook"], ["--webhook", "http://example.com/x"],
                 ["--webhook-events", "finished,bogus"]):
        with pytest.raises(SystemExit):
            daemon_config(tmp_path, *argv)


async def test_event_streams_that_hang_up_free_their_places_at_once(process):
    """In the daemon as it runs (aiohttp's test server notices hang-ups by itself)."""
    await process.start()
    streams = []
    for _ in range(torrentflow.MAX_SUBSCRIBERS):
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # Read what came, so that closing sends a plain FIN, not a reset.
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        streams.append(writer)
    await error_of(await process.client.get("/events"), 503, "at most")
    for writer in streams:
        writer.close()

    async def a_place():
        async with process.client.get("/events") as response:
            return response.status == 200
    # Within a couple of seconds, not at the next heartbeat.
    await wait_until(a_place, deadline=torrentflow.HEARTBEAT / 3, interval=0.2,
                     what="a place to free")


async def test_a_reader_that_never_reads_is_cut_off_and_the_daemon_stays_fast(
        daemon, tmp_path):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", daemon.server.port, limit=1024)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                         socket.SO_RCVBUF, 4096)
    writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    events = daemon.app[torrentflow.EVENTS]
    await wait_until(lambda: events.subscribers, deadline=10, what="the subscriber")
    subscriber = next(iter(events.subscribers))
    for count in range(150):
        root = make_payload(tmp_path / "many", {f"e{count}.bin": 1000 + count})
        await add(daemon, torrent_file=make_torrent(root / f"e{count}.bin"))
    waits, stop = [], asyncio.Event()

    async def probe():
        while not stop.is_set():
            started = time.monotonic()
            assert (await daemon.get("/health")).status == 200
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
    probing = asyncio.ensure_future(probe())
    # Every pause and resume of all 150 is 150 events, while the reader reads nothing.
    for _ in range(10):
        if subscriber not in events.subscribers:
            break
        for action in ("pause", "resume"):
            assert (await daemon.put(f"/torrents/{action}")).status == 200
    assert subscriber.overflowed
    # Its writer, stuck on a full socket, lets go within STREAM_WRITE_TIMEOUT.
    await wait_until(lambda: subscriber not in events.subscribers,
                     deadline=torrentflow.STREAM_WRITE_TIMEOUT + 5, what="the cut-off")
    stop.set()
    await probing
    print(f"cut off after {events.next_id} events; /health p99 "
          f"{1000 * _percentile(waits, 0.99):.1f} ms, max {1000 * max(waits):.1f} ms")
    assert _percentile(waits, 0.99) < 0.1
    data = await asyncio.wait_for(reader.read(), 30)  # read it all now:
    # ...the last event is overflow, and the chunked body ends.
    assert data.endswith(b"event: overflow\ndata: {}\n\n\r\n0\r\n\r\n")
    writer.close()


class Receiver:
    """A loopback webhook receiver: answers with the statuses given, then 200."""

    def __init__(self, statuses=(), hang=False):
        self.statuses, self.hang = list(statuses), hang
        self.received = []  # (headers, body) of every delivery attempt
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)

    async def hook(self, request):
        self.received.append((dict(request.headers), await request.read()))
        if self.hang:
            await asyncio.Event().wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def delivered(self):
        """The events received, deduplicated by delivery id as a receiver would."""
        return {headers["X-TorrentFlow-Delivery"]: json.loads(body)
                for headers, body in self.received}


async def receiver_at(aiohttp_server, **options):
    receiver = Receiver(**options)
    receiver.server = await aiohttp_server(receiver.app)
    receiver.url = str(receiver.server.make_url("/hook"))
    return receiver


SECRET = "webhook-secret-0123"


async def test_webhooks_retry_sign_and_survive_a_crash(aiohttp_server, tmp_path):
    flaky = await receiver_at(aiohttp_server, statuses=[500, 500])
    hanging = await receiver_at(aiohttp_server, hang=True)
    process = DaemonProcess(tmp_path, extra=[
        "--webhook", flaky.url, "--webhook", hanging.url, "--webhook", flaky.url,
        "--webhook-secret", SECRET, "--webhook-events", "added,paused,removed"])
    try:
        await process.start()
        _, body = await add(process.client, torrent_url=MAGNET)
        # Two refusals, then the delivery lands, signed; the hanging target holds no one up.
        await wait_until(lambda: len(flaky.received) == 3, deadline=30,
                         what="two retries and a delivery")
        headers, raw = flaky.received[-1]
        expected = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["X-TorrentFlow-Signature"] == f"sha256={expected}"
        assert headers["X-TorrentFlow-Event"] == "added"
        assert json.loads(raw)["infohash"] == body["infohash"]
        async def views():
            started = time.monotonic()
            async with process.client.get("/webhooks") as response:
                shown = {view["url"]: view for view in (await response.json())["webhooks"]}
            assert time.monotonic() - started < 1  # the API does not wait on receivers
            return shown if shown[flaky.url]["delivered"] == 1 else None
        shown = await wait_until(views, deadline=10, what="the delivery counted")
        assert shown[flaky.url]["failed"] == 2 and shown[hanging.url]["queued"] == 1
        # A delivery pending when the daemon is killed arrives after the restart.
        flaky.statuses = [503] * 1000  # it refuses until told otherwise
        await process.put(body["infohash"], "pause")
        await wait_until(lambda: len(flaky.received) >= 5, deadline=30, what="refusals")
        # Killed the moment the DELETE answers: its event is on disk already.
        assert (await process.client.delete(f"/torrents/{body['infohash']}")).status == 200
        code, _ = await process.stop(signal.SIGKILL)
        assert code == -signal.SIGKILL
        # As a kill in the middle of a write leaves it: the start clears it.
        for folder in (process.state_dir / "webhooks").iterdir():
            (folder / "999.tmp").write_bytes(b'{"half": ')
        await process.start()
        flaky.statuses = []
        await wait_until(lambda: "removed" in [e["type"] for e in flaky.delivered().values()],
                         deadline=30, what="the pending delivery after the restart")
        delivered = flaky.delivered()
        assert [e["type"] for e in sorted(delivered.values(), key=lambda e: e["id"])] == [
            "added", "paused", "removed"]

        async def emptied():
            async with process.client.get("/webhooks") as response:
                return {v["url"]: v for v in (await response.json())["webhooks"]}[
                    flaky.url]["queued"] == 0
        await wait_until(emptied, deadline=10, what="the queue to empty")
        assert not list((process.state_dir / "webhooks").rglob("*.tmp"))
    finally:
        await process.close()


async def test_metrics_parse_and_follow_a_download(daemon, seeder, payload, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape():
        response = await daemon.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        return families

    def value(families, name, **labels):
        family = families[name]
        return sum(s.value for s in family.samples
                   if all(s.labels.get(k) == v for k, v in labels.items()))
    before = await scrape()
    assert before["torrentflow_payload_received_bytes"].type == "counter"
    await downloaded(daemon, seeder, payload[0])
    after = await scrape()
    received = value(after, "torrentflow_payload_received_bytes")
    assert received - value(before, "torrentflow_payload_received_bytes") >= 3 * 1024 * 1024
    listing = await (await daemon.get("/torrents?fields=state")).json()
    for state in torrentflow.STATES:
        assert value(after, "torrentflow_torrents", state=state) == sum(
            t["state"] == state for t in listing["torrents"]), state
    assert value(after, "torrentflow_http_requests", route="/torrents/{infohash}",
                 status="200") > 0
    assert value(after, "torrentflow_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(after, "torrentflow_resume_saves") >= 1
    assert "torrentflow_torrent_progress" not in after  # per torrent only when asked for


async def test_metrics_per_torrent_and_the_token(tmp_path, aiohttp_client, payload):
    from prometheus_client.parser import text_string_to_metric_families
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--metrics-per-torrent", "--token", TOKEN)))
    assert (await client.get("/metrics")).status == 401
    _, body = await add(client, torrent_url=MAGNET + "&dn=quote%22d", expect=(401,))
    response = await client.post("/torrents", json={"torrent_url": MAGNET + "&dn=quote%22d"},
                                 headers=AUTH)
    assert response.status == 201
    text = await (await client.get("/metrics", headers=AUTH)).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["torrentflow_torrent_progress"].samples
    assert [(s.labels["infohash"], s.labels["name"]) for s in samples] == [
        (MAGNET[-40:], 'quote"d')]
    # Counters end in _total, so the parser keeps their names.
    assert families["torrentflow_torrent_downloaded_bytes"].type == "counter"


# --------------------------------------------------------------------------- #
# Transmission's RPC, driven by real clients
# --------------------------------------------------------------------------- #

REMOTE = shutil.which("transmission-remote")
#: The fields Sonarr's and Radarr's TransmissionProxy read for their queue.
SONARR_FIELDS = ["id", "hashString", "name", "downloadDir", "totalSize", "leftUntilDone",
                 "isFinished", "eta", "status", "secondsDownloading", "secondsSeeding",
                 "errorString", "uploadedEver", "downloadedEver", "seedRatioLimit",
                 "seedRatioMode", "seedIdleLimit", "seedIdleMode", "fileCount", "labels"]


async def remote(process, *args):
    """Run transmission-remote against the daemon, authenticated with the token."""
    result = await asyncio.to_thread(
        subprocess.run, [REMOTE, f"127.0.0.1:{process.port}", "--auth", f"sonarr:{TOKEN}",
                         *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@pytest.fixture
async def guarded_process(tmp_path):
    process = DaemonProcess(tmp_path, extra=["--token", TOKEN], headers=AUTH)
    yield process
    await process.close()


@pytest.mark.skipif(REMOTE is None, reason="transmission-remote (Debian transmission-cli) "
                    "is not installed")
async def test_transmission_remote_drives_the_daemon(guarded_process, seeders, tracker,
                                                     tmp_path):
    process = guarded_process
    torrent, source, layout = swarm_torrent(tmp_path, tracker, seeders(), 1024 * 1024)
    (tmp_path / "data.torrent").write_bytes(torrent)
    infohash = infohash_of(torrent)
    await process.start()
    assert 'responded: "success"' in await remote(process, "-a", str(tmp_path / "data.torrent"))
    await remote(process, "-a", "magnet:?xt=urn:btih:" + "56" * 20 + "&dn=Remote.Magnet")
    await wait_complete(process.client, infohash)
    listing = (await remote(process, "-l")).splitlines()
    assert listing[1].split()[:2] == ["1", "100%"] and listing[1].endswith("data.bin")
    assert "Remote.Magnet" in listing[2] and listing[-1].startswith("Sum:")
    details = await remote(process, "-t", "1", "-i")
    assert f"Hash: {infohash}" in details and "Name: data.bin" in details
    assert f"Location: {process.download_dir}" in details
    await remote(process, "-t", "1", "-S")
    assert (await process.status(infohash))["paused"]
    assert "Stopped" in (await remote(process, "-l")).splitlines()[1]
    await remote(process, "-t", "1", "-s")
    assert not (await process.status(infohash))["paused"]
    await remote(process, "-t", "1", "--verify")
    await wait_complete(process.client, infohash)
    session = await remote(process, "-si")
    assert "RPC version: 17" in session
    assert f"Download directory: {process.download_dir}" in session
    await remote(process, "-t", "2", "-r")
    assert await process.infohashes() == {infohash}
    await remote(process, "-t", infohash, "--remove-and-delete")
    assert await process.infohashes() == set()
    assert not (process.download_dir / "data.bin").exists()


async def rpc(client, method, arguments=None, session=None, **extra):
    """One RPC call with the session-id dance; returns (status, answer)."""
    body = {"method": method, **({} if arguments is None else {"arguments": arguments}),
            **extra}
    headers = {**AUTH, **({"X-Transmission-Session-Id": session} if session else {})}
    response = await client.post("/transmission/rpc", json=body, headers=headers)
    if response.status == 409 and session is None:
        return await rpc(client, method, arguments,
                         response.headers["X-Transmission-Session-Id"], **extra)
    return response.status, await response.json()


async def test_the_rpc_protocol_and_its_errors(guarded, payload, tmp_path):
    # Sonarr's probe: a GET without the session id must get the 409 and the id.
    probe = await guarded.get("/transmission/rpc", headers=AUTH)
    assert probe.status == 409 and probe.headers["X-Transmission-Session-Id"]
    session = probe.headers["X-Transmission-Session-Id"]
    assert (await guarded.get("/transmission/rpc", headers={
        **AUTH, "X-Transmission-Session-Id": session})).status == 405
    # Basic auth with the token as password; a bad one gets Transmission's challenge.
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    ok = await guarded.post("/transmission/rpc", json={"method": "session-get"}, headers={
        "Authorization": basic, "X-Transmission-Session-Id": session})
    assert ok.status == 200 and (await ok.json())["arguments"]["rpc-version"] == 17
    wrong = await guarded.post("/transmission/rpc/", json={"method": "session-get"}, headers={
        "Authorization": "Basic " + base64.b64encode(b"u:wrong-token-xyz").decode()})
    assert wrong.status == 401
    assert wrong.headers["WWW-Authenticate"] == 'Basic realm="Transmission"'
    missing = await guarded.post("/transmission/rpc", json={"method": "session-get"})
    await error_of(missing, 401, "Authorization: Basic, the token as the password")
    # The raw token after "Basic", without base64 of user:password, is no credential.
    raw_token = await guarded.post("/transmission/rpc", json={"method": "session-get"},
                                   headers={"Authorization": f"Basic {TOKEN}",
                                            "X-Transmission-Session-Id": session})
    assert raw_token.status == 401
    raw = await guarded.post("/transmission/rpc", data=b"{not json", headers={
        **AUTH, "X-Transmission-Session-Id": session,
        "Content-Type": "application/x-www-form-urlencoded"})
    assert (await raw.json())["result"] == "no method name"
    added = await guarded.post("/torrents", json={"torrent_url": MAGNET}, headers=AUTH)
    assert added.status == 201
    for method, arguments, words in (
            ("torrent-explode", {}, "method not supported"),
            ("torrent-get", {}, "no fields"),
            ("torrent-get", {"fields": ["id"], "ids": {"x": 1}}, "ids must be"),
            ("torrent-add", {}, "no filename or metainfo"),
            ("torrent-add", {"metainfo": "!!!"}, "invalid or corrupt"),
            # Directories are refused in the RPC's words: the key the client sent.
            ("torrent-add", {"filename": MAGNET, "download-dir": "/etc"},
             "download-dir must stay inside the download directory"),
            ("torrent-set-location", {"ids": [1], "move": True}, "no location"),
            ("torrent-set-location", {"ids": [1], "move": True, "location": "/etc"},
             "location must stay inside the download directory"),
            ("torrent-set-location", {"ids": [1], "move": True, "location": "a\x00b"},
             "location contains a NUL byte"),
            ("torrent-set", {"ids": [1], "labels": "x"}, "labels"),
            ("torrent-set", {"ids": [1], "files-wanted": [0]}, "metadata"),
            ("torrent-set", {"ids": [1], "seedRatioMode": [1]}, "0, 1 or 2"),
            ("torrent-add", {"filename": MAGNET[:-2] + "99", "files-wanted": [0]}, "metadata"),
            ("session-set", {"speed-limit-down": "9" * 100_000}, "must be a number"),
            ("session-set", {"speed-limit-up": "fast"}, "must be a number"),
            ("free-space", {"path": "/etc"}, "path must stay inside the download directory"),
            ("free-space", {"path": "\udcff"}, "not valid Unicode")):
        status, answer = await rpc(guarded, method, arguments, session, tag=7)
        assert status == 200 and words in answer["result"] and answer["result"] != "success"
        assert "save_path" not in answer["result"], answer
        assert answer["tag"] == 7
    # A refused add added nothing.
    assert (await guarded.get("/torrents/" + "ab" * 19 + "99", headers=AUTH)).status == 404
    # File choices at add, for a .torrent: refused before the add if they name no file...
    torrent = make_torrent(payload[0] / "single.bin")
    status, answer = await rpc(guarded, "torrent-add", {
        "metainfo": base64.b64encode(torrent).decode(), "files-wanted": [5]}, session)
    assert "file indices from 0 to 0" in answer["result"], answer
    assert (await guarded.get(f"/torrents/{infohash_of(torrent)}", headers=AUTH)).status == 404
    # ...else applied once its metadata is read.
    status, answer = await rpc(guarded, "torrent-add", {
        "metainfo": base64.b64encode(torrent).decode(), "files-unwanted": [0]}, session)
    assert answer["result"] == "success", answer
    number = answer["arguments"]["torrent-added"]["id"]
    added = await (await guarded.get(f"/torrents/{infohash_of(torrent)}", headers=AUTH)).json()
    assert added["files"][0]["priority"] == 0
    # An empty list names every file (transmission-remote -g all); torrent-set answers {}.
    status, answer = await rpc(guarded, "torrent-set", {"ids": [number], "files-wanted": []},
                               session)
    assert answer == {"result": "success", "arguments": {}}
    added = await (await guarded.get(f"/torrents/{infohash_of(torrent)}", headers=AUTH)).json()
    assert added["files"][0]["priority"] == 4
    # Added again elsewhere, it is a duplicate, as in Transmission.
    status, answer = await rpc(guarded, "torrent-add", {
        "metainfo": base64.b64encode(torrent).decode(), "download-dir": "elsewhere"}, session)
    assert answer["arguments"]["torrent-duplicate"]["id"] == number, answer
    # A queue move shows at once, in every torrent it passed.
    status, answer = await rpc(guarded, "queue-move-top", {"ids": [number]}, session)
    assert answer["result"] == "success"
    status, answer = await rpc(guarded, "torrent-get", {"fields": ["id", "queuePosition"]},
                               session)
    assert sorted((t["queuePosition"], t["id"]) for t in answer["arguments"]["torrents"]) == [
        (0, number), (1, 1)]
    # start-now starts a stopped torrent past the queue, which may not stop it again.
    await rpc(guarded, "torrent-stop", {"ids": [number]}, session)
    status, answer = await rpc(guarded, "torrent-start-now", {"ids": [number]}, session)
    assert answer["result"] == "success"
    started = await (await guarded.get(f"/torrents/{infohash_of(torrent)}", headers=AUTH)).json()
    assert not started["paused"] and not started["auto_managed"]
    # Booleans as Transmission reads them: "false" added it paused; 1 (Transmission Remote
    # GUI's) then did not; anything else is refused.
    for end, paused in (("77", "false"), ("78", 1)):
        status, answer = await rpc(guarded, "torrent-add", {"filename": MAGNET[:-2] + end,
                                                            "paused": paused}, session)
        assert answer["result"] == "success", answer
        added = await (await guarded.get("/torrents/" + MAGNET[-40:-2] + end,
                                         headers=AUTH)).json()
        assert (added["paused"] and not added["queued"]) is (paused == 1), added
    status, answer = await rpc(guarded, "torrent-add", {"filename": MAGNET[:-2] + "79",
                                                        "paused": "maybe"}, session)
    assert answer["result"] == "paused must be true or false", answer
    status, answer = await rpc(guarded, "session-set", {"speed-limit-down": 50,
                                                        "speed-limit-down-enabled": 1}, session)
    assert answer["result"] == "success", answer
    settings = await (await guarded.get("/settings", headers=AUTH)).json()
    assert settings["download_limit"] == 50_000
    # Ids that do not exist are left out, as Transmission does.
    status, answer = await rpc(guarded, "torrent-stop", {"ids": [4242, "ab" * 20]}, session)
    assert answer["result"] == "success"
    status, answer = await rpc(guarded, "torrent-get", {"fields": ["id"], "ids": [4242]},
                               session)
    assert answer["arguments"]["torrents"] == []


async def test_rpc_arguments_of_any_shape_never_give_a_500(guarded, payload, caplog):
    """Transmission's arguments are untyped JSON. Every method, given every argument the
    RPC reads, all of one wrong (or odd) shape, answers 200 with a result string, and
    the daemon stays healthy. Too many values in one call are refused before parsing."""
    caplog.set_level("WARNING")
    session = (await guarded.get("/transmission/rpc", headers=AUTH)).headers[
        "X-Transmission-Session-Id"]
    assert (await guarded.post("/torrents", json={"torrent_url": MAGNET},
                               headers=AUTH)).status == 201
    metainfo = base64.b64encode(make_torrent(payload[0] / "single.bin")).decode()
    _, answer = await rpc(guarded, "torrent-add", {"metainfo": metainfo}, session)
    assert answer["result"] == "success", answer
    keys = {"ids", "fields", "format", "filename", "metainfo", "download-dir", "paused",
            "labels", "peer-limit", "location", "move", "delete-local-data", "path",
            "trackerAdd", "trackerRemove", "trackerList", "seedRatioLimit", "seedRatioMode",
            "seedIdleLimit", "seedIdleMode", "downloadLimit", "downloadLimited",
            "uploadLimit", "uploadLimited", *torrentflow.RPC_FILE_CHOICES,
            *torrentflow.RPC_SESSION_SET,
            *(enabled for _, _, enabled in torrentflow.RPC_SESSION_SET.values() if enabled)}
    for method in torrentflow.RPC_METHODS:
        for value in (None, True, -1, 2 ** 70, 10 ** 400, 1.5, "x", "a" * 300, "", [],
                      [None], [{"a": 1}], {"a": [1]}, ["ab" * 20], [-1, 2 ** 70]):
            status, answer = await rpc(guarded, method, dict.fromkeys(keys, value), session)
            assert status == 200 and isinstance(answer["result"], str), (method, value)
    flood = {"x": [{}] * (torrentflow.RPC_MAX_VALUES + 1)}
    _, answer = await rpc(guarded, "session-stats", flood, session)
    assert "values in one call" in answer["result"]
    assert (await guarded.get("/health", headers=AUTH)).status == 200
    assert "unhandled error" not in caplog.text
    # Each shape was refused by a check of its own, not by _rpc_call's last resort.
    assert "unexpected shape" not in caplog.text


async def test_rpc_file_choices_hold_from_the_first_byte(streaming, tracker, seeders,
                                                         tmp_path):
    """torrent-add's files-unwanted and priority-* were set after the add: the download
    had begun, an unwanted file was written, and a crash in between lost the choices.
    They are presets now, as the REST add's file_priorities."""
    layout = {"pack/a.bin": 256 * 1024, "pack/b.bin": 1024 * 1024}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "pack", tracker=tracker.url("/announce"))
    tracker.seeder = seeders().seed(torrent, source)
    paths = [path for _, path, _ in torrentflow._files_of(lt.load_torrent_buffer(torrent).ti)]
    _, answer = await rpc(streaming, "torrent-add", {
        "metainfo": base64.b64encode(torrent).decode(),
        "files-unwanted": [paths.index("pack/b.bin")],
        "priority-high": [paths.index("pack/a.bin")]})
    assert "torrent-added" in answer["arguments"], answer
    infohash = infohash_of(torrent)
    status = await status_of(streaming, infohash)  # the first status: before any byte
    assert {f["path"]: f["priority"] for f in status["files"]} == {
        "pack/a.bin": 7, "pack/b.bin": 0}
    await wait_status(streaming, infohash, lambda s: s["is_finished"], what="a.bin")
    downloads = tmp_path / "downloads" / "pack"
    assert sha1_of(downloads / "a.bin") == sha1_of(source / "pack" / "a.bin")
    assert not (downloads / "b.bin").exists()


async def test_rpc_recently_active_leaves_out_idle_torrents(streaming, tmp_path,
                                                            monkeypatch):
    """The refresh of idle torrents' time counters made every running torrent look
    recently active, so clients that poll for changes got the whole list every time."""
    monkeypatch.setattr(torrentflow, "TIMES_INTERVAL", 0.5)
    monkeypatch.setattr(torrentflow, "RPC_RECENT", 1.0)
    torrent, _ = in_place(tmp_path, {"idle/seed.bin": 50_000})
    infohash = await added_and_checked(streaming, torrent)
    _, answer = await rpc(streaming, "torrent-get", {"fields": ["hashString"],
                                                     "ids": "recently-active"})
    assert [t["hashString"] for t in answer["arguments"]["torrents"]] == [infohash]
    await wait_status(streaming, infohash, lambda s: s["seeding_time"] >= 3, deadline=15,
                      what="a few refreshes of an idle seed")
    _, answer = await rpc(streaming, "torrent-get", {"fields": ["hashString"],
                                                     "ids": "recently-active"})
    assert answer["arguments"]["torrents"] == [], answer


async def test_the_queue_order_outlives_a_crash(tmp_path):
    """queue-move-* (Sonarr sends queue-move-top after each grab) answered before anything
    was saved, and a restart, clean or not, put the queue back in the order of adding."""
    process = DaemonProcess(tmp_path)
    try:
        await process.start()
        hashes = [MAGNET[:-2] + end for end in ("a1", "a2", "a3")]
        for magnet in hashes:
            await add(process.client, torrent_url=magnet)
        hashes = [magnet[-40:] for magnet in hashes]
        _, answer = await rpc(process.client, "queue-move-top", {"ids": [hashes[2]]})
        assert answer["result"] == "success", answer

        async def order():
            _, answer = await rpc(process.client, "torrent-get",
                                  {"fields": ["hashString", "queuePosition"]})
            return [t["hashString"] for t in sorted(answer["arguments"]["torrents"],
                                                    key=lambda t: t["queuePosition"])]
        assert await order() == [hashes[2], hashes[0], hashes[1]]
        await process.restart(signal.SIGKILL)
        await wait_until(lambda: _in_order(order, [hashes[2], hashes[0], hashes[1]]),
                         what="the saved queue order")
    finally:
        await process.close()


async def _in_order(order, wanted):
    return await order() == wanted


async def test_transmission_rpc_python_client(guarded_process, seeders, tracker, tmp_path):
    """The transmission-rpc package as Sonarr-like tools use it, each call checked
    against the REST view of the same torrent; the add is a real download."""
    transmission_rpc = pytest.importorskip("transmission_rpc")
    process = guarded_process
    torrent, source, layout = swarm_torrent(tmp_path, tracker, seeders(), 2 * 1024 * 1024)
    infohash = infohash_of(torrent)
    await process.start()
    rpc_client = await asyncio.to_thread(
        transmission_rpc.Client, host="127.0.0.1", port=process.port, username="sonarr",
        password=TOKEN)
    added = await asyncio.to_thread(rpc_client.add_torrent, torrent, labels=["tv-sonarr"],
                                    download_dir=str(process.download_dir / "tv"))
    assert added.hash_string == infohash
    assert (await process.status(infohash))["save_path"] == str(process.download_dir / "tv")

    def finished():
        torrent, = rpc_client.get_torrents(arguments=[*SONARR_FIELDS, "percentDone"])
        return torrent if torrent.percent_done == 1 else None
    seen = await wait_until(lambda: asyncio.to_thread(finished), what="percentDone 1")
    assert same_tree(source, process.download_dir / "tv", layout)
    assert seen.seeding and seen.labels == ["tv-sonarr"] and seen.eta is None
    assert seen.download_dir == str(process.download_dir / "tv") and seen.error_string == ""
    fresh, = await asyncio.to_thread(rpc_client.get_torrents,
                                     arguments=["id", "activityDate", "magnetLink"])
    assert abs(fresh.activity_date.timestamp() - time.time()) < DEADLINE  # it just downloaded
    assert fresh.magnet_link.startswith(f"magnet:?xt=urn:btih:{infohash}&dn=")
    # trackerAdd and trackerRemove keep the tiers they do not touch.
    first, second, third = (tracker.url(f"/announce?tier={n}") for n in range(3))
    async with process.client.patch(f"/torrents/{infohash}",
                                    json={"trackers": [[first, second]]}) as response:
        assert response.status == 200, await response.text()

    async def tiers():
        async with process.client.get(f"/torrents/{infohash}/trackers") as response:
            return {t["url"]: t["tier"] for t in (await response.json())["trackers"]}
    await asyncio.to_thread(rpc_client.change_torrent, added.id, tracker_add=[third])
    assert await tiers() == {first: 0, second: 0, third: 1}
    await asyncio.to_thread(rpc_client.change_torrent, added.id, tracker_remove=[1])
    assert await tiers() == {first: 0, third: 1}
    await asyncio.to_thread(rpc_client.stop_torrent, added.id)
    assert (await process.status(infohash))["paused"]
    await asyncio.to_thread(rpc_client.start_torrent, added.id)
    assert not (await process.status(infohash))["paused"]
    await asyncio.to_thread(rpc_client.change_torrent, added.id, labels=["done"],
                            seed_ratio_limit=1.5, seed_ratio_mode=1)
    status = await process.status(infohash)
    assert status["labels"] == ["done"] and status["ratio_limit"] == 1.5
    await asyncio.to_thread(rpc_client.move_torrent_data, added.id,
                            str(process.download_dir / "moved"))
    assert (await process.status(infohash))["save_path"] == str(process.download_dir / "moved")
    session = await asyncio.to_thread(rpc_client.get_session)
    assert session.download_dir == str(process.download_dir)
    free = await asyncio.to_thread(rpc_client.free_space, str(process.download_dir))
    assert free > 0
    await asyncio.to_thread(rpc_client.remove_torrent, added.id, delete_data=True)
    assert await process.infohashes() == set()
    assert not (process.download_dir / "moved" / "data.bin").exists()


WEB_CLIENT = Path("/usr/share/transmission/web")  # Debian's transmission-common
CHROMIUM = shutil.which("chromium")


class Chromium:
    """Headless Chromium driven over its DevTools protocol, with aiohttp's websocket
    client. It listens on loopback only, with its background networking off."""

    def __init__(self, profile):
        self.profile, self.process, self.http, self.socket, self.calls = \
            profile, None, None, None, 0

    async def start(self):
        self.process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-breakpad", "--disable-quic",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}", "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"  # Chromium writes it when ready
        await wait_until(lambda: port_file.is_file() and port_file.read_text().strip(),
                         what="Chromium's DevTools port")
        port = port_file.read_text().split()[0]
        self.http = aiohttp.ClientSession()
        targets = await (await self.http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(target for target in targets if target["type"] == "page")
        self.socket = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method, **params):
        """One DevTools command's result; the events that arrive meanwhile are skipped."""
        self.calls += 1
        await self.socket.send_json({"id": self.calls, "method": method, "params": params})
        async with asyncio.timeout(DEADLINE):
            while True:
                message = await self.socket.receive_json()
                if message.get("id") == self.calls:
                    assert "error" not in message, message
                    return message["result"]

    async def evaluate(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True)
        return result["result"].get("value")

    async def close(self):
        if self.socket is not None:
            await self.socket.close()
        if self.http is not None:
            await self.http.close()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.mark.skipif(CHROMIUM is None or not (WEB_CLIENT / "index.html").is_file(),
                    reason="needs Debian's chromium and transmission-common")
async def test_transmissions_web_client_lists_and_pauses_a_torrent(aiohttp_client, tmp_path):
    """Transmission 3.00's own web client, served by --web-ui and run in headless
    Chromium: it lists the daemon's torrent and pauses it, and the REST API agrees."""
    web_ui = tmp_path / "web"
    shutil.copytree(WEB_CLIENT, web_ui)
    (tmp_path / "secret.txt").write_text("outside the web client")
    (web_ui / "leak.txt").symlink_to(tmp_path / "secret.txt")
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--token", TOKEN, "--web-ui", str(web_ui))), headers=AUTH)
    async with aiohttp.request("GET", client.make_url("/transmission/web/")) as refused:
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="Transmission"'
    basic = "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    page = await client.get("/transmission/web/", headers={"Authorization": basic})
    assert page.status == 200 and page.content_type == "text/html"
    for path in ("leak.txt", "..%2F..%2Fsecret.txt", "javascript/missing.js", "a" * 300):
        await error_of(await client.get("/transmission/web/" + path), 404, "no such file")
    _, body = await add(client, torrent_url=MAGNET + "&dn=webui-torrent")

    browser = Chromium(tmp_path / "chromium")
    try:
        await browser.start()
        await browser.call("Network.enable")
        await browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": basic})
        await browser.call("Page.navigate", url=str(client.make_url("/transmission/web/")))
        button = "document.querySelector('#torrent_list .torrent_pause')"
        await wait_until(lambda: browser.evaluate(
            f"document.body.innerText.includes('webui-torrent') && {button} !== null"),
            what="the web client to list the torrent as running")
        await browser.evaluate(f"{button}.click()")
        await wait_status(client, body["infohash"], lambda s: s["paused"]
                          and not s["auto_managed"], what="the web client's pause")
        await wait_until(lambda: browser.evaluate(
            "document.querySelector('#torrent_list .torrent_resume') !== null"),
            what="the web client to show it paused")
    finally:
        await browser.close()


async def test_the_rpc_keeps_each_torrents_file_as_transmission_does(guarded_process,
                                                                      seeders, tmp_path):
    """Transmission keeps a copy of each .torrent and names it in torrentFile (FlexGet's
    from_transmission reads it). TorrentFlow writes it to the state directory once the
    metadata is known, whether from a file or from peers; a copy lost while the daemon
    was down is written again at the next start, and a removal takes it along."""
    process = guarded_process
    await process.start()
    source = make_payload(tmp_path / "source", {"uploaded.bin": 40_000, "fetched.bin": 100_000})
    uploaded = make_torrent(source / "uploaded.bin", comment="kept as added",
                            tracker="http://127.0.0.1:9/announce")
    fetched = make_torrent(source / "fetched.bin")
    seeder = seeders().seed(fetched, source)
    for arguments in ({"metainfo": base64.b64encode(uploaded).decode()},
                      {"filename": seeder.magnet(fetched)}, {"filename": MAGNET}):
        _, answer = await rpc(process.client, "torrent-add", arguments)
        assert answer["result"] == "success", answer
    _, answer = await rpc(process.client, "torrent-get", {"fields": ["hashString",
                                                                      "torrentFile"]})
    copies = {torrent["hashString"]: Path(torrent["torrentFile"])
              for torrent in answer["arguments"]["torrents"]}
    assert copies == {infohash: process.state_dir / "torrents" / f"{infohash}.torrent"
                      for infohash in (infohash_of(uploaded), infohash_of(fetched), "ab" * 20)}
    uploaded_copy, fetched_copy = copies[infohash_of(uploaded)], copies[infohash_of(fetched)]
    await wait_until(lambda: uploaded_copy.is_file() and fetched_copy.is_file(),
                     what="the .torrent copies")
    assert uploaded_copy.read_bytes() == uploaded  # its tracker and comment too
    assert infohash_of(fetched_copy.read_bytes()) == infohash_of(fetched)
    assert not copies["ab" * 20].exists()  # no metadata, no .torrent
    # At a start, each torrent's metadata is read again, and a missing copy comes back.
    await process.stop()
    uploaded_copy.unlink()
    await process.start()
    await wait_until(uploaded_copy.is_file, what="the lost copy to be written again")
    assert uploaded_copy.read_bytes() == uploaded
    # Removed, the copy is gone by the time the answer comes.
    for infohash, delete in ((infohash_of(uploaded), False), (infohash_of(fetched), True)):
        _, answer = await rpc(process.client, "torrent-remove", {
            "ids": [infohash], "delete-local-data": delete})
        assert answer["result"] == "success", answer
        assert not copies[infohash].exists()
    assert await process.infohashes() == {"ab" * 20}


async def stig(process, tmp_path, *command, succeeds=True):
    """The output of stig's CLI run against the daemon. It takes where to connect only
    from settings, so they come in an rc file: Basic auth, any user, the token as
    password. Not on a terminal, its listings are tab-separated and unformatted."""
    rc = tmp_path / "stig.rc"
    rc.write_text(f"set connect.host 127.0.0.1\nset connect.port {process.port}\n"
                  f"set connect.user stig\nset connect.password {TOKEN}\n")
    home = tmp_path / "stig-home"  # stig reads (and may write) nothing of the user's
    env = {key: value for key, value in CLEAN_ENV.items() if key not in ("COLUMNS", "LINES")}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "stig", "--rcfile", str(rc), "--notui",
                         *command], capture_output=True, text=True, timeout=DEADLINE,
        env={**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
             "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")})
    assert (result.returncode == 0) == succeeds, (command, result.stdout, result.stderr)
    return result.stdout + result.stderr


async def test_stig_drives_the_daemon(guarded_process, seeders, tracker, tmp_path):
    """stig (a Transmission TUI and CLI, PyPI's stig) adds, lists, stops, starts,
    verifies, moves and removes with data, each step checked against the REST view."""
    pytest.importorskip("stig", reason="stig is a test-only dependency; .ci/run installs it")
    process = guarded_process
    torrent, source, layout = swarm_torrent(tmp_path, tracker, seeders(), 1024 * 1024)
    (tmp_path / "data.torrent").write_bytes(torrent)
    infohash = infohash_of(torrent)
    await process.start()
    assert "Added data.bin" in await stig(process, tmp_path, "add",
                                          str(tmp_path / "data.torrent"))
    await wait_complete(process.client, infohash)

    async def listed():
        row, = (await stig(process, tmp_path, "ls", "--columns",
                           "id,infohash,name,path,%downloaded,status")).splitlines()
        return row.split("\t")
    assert (await listed())[:5] == ["1", infohash, "data.bin", str(process.download_dir),
                                    "100.0"]
    assert "Stopping data.bin" in await stig(process, tmp_path, "stop", "data.bin")
    assert (await process.status(infohash))["paused"]
    assert (await listed())[5] == "stopped"
    # A byte flipped while it is stopped: only a verify finds the piece and fetches it again.
    target = process.download_dir / "data.bin"
    data = bytearray(target.read_bytes())
    data[500_000] ^= 0xFF
    target.write_bytes(bytes(data))
    assert "Verifying data.bin" in await stig(process, tmp_path, "verify", "data.bin")
    assert "Starting data.bin" in await stig(process, tmp_path, "start", "data.bin")
    assert not (await process.status(infohash))["paused"]
    assert (await listed())[5] != "stopped"
    await wait_status(process.client, infohash, lambda s: not s["state"].startswith(
        "checking"), what="the check to end")
    # The piece the check found bad comes from the seeder the tracker names: a new one, as
    # libtorrent waits a minute (min_reconnect_time) to dial the one the stop hung up on.
    tracker.seeder = seeders().seed(torrent, source)
    assert "Announcing: data.bin" in await stig(process, tmp_path, "announce", "data.bin")
    await wait_until(lambda: same_tree(source, process.download_dir, layout),
                     what="the verify to find the flipped byte")
    await wait_complete(process.client, infohash)
    moved = process.download_dir / "moved"
    await stig(process, tmp_path, "move", "data.bin", str(moved))
    await wait_status(process.client, infohash, lambda s: s["save_path"] == str(moved),
                      what="stig's move")
    await wait_until(lambda: same_tree(source, moved, layout), what="the moved data")
    assert (await listed())[3] == str(moved)
    # A refusal names the RPC's word for the directory (stig capitalises it).
    refused = await stig(process, tmp_path, "move", "data.bin", "/etc", succeeds=False)
    assert "Location must stay inside the download directory" in refused
    assert "Deleting data.bin (including files)" in await stig(
        process, tmp_path, "rm", "--delete-files", "data.bin")
    assert await process.infohashes() == set()
    assert not (moved / "data.bin").exists()


#: FlexGet: .ci/run installs it in a venv of its own (it pins dozens of packages) and
#: names its program in $FLEXGET.
FLEXGET = os.environ.get("FLEXGET") or shutil.which("flexget")


async def flexget(tmp_path, *arguments):
    """The output of one FlexGet run on the config in tmp_path/flexget, which also
    holds its database and log. Wide columns, so that --dump cuts no value short."""
    folder = tmp_path / "flexget"
    result = await asyncio.to_thread(
        subprocess.run, [FLEXGET, "-c", str(folder / "config.yml"), *arguments],
        capture_output=True, text=True, timeout=2 * DEADLINE, cwd=folder,
        env={**CLEAN_ENV, "HOME": str(folder), "COLUMNS": "1000"})
    assert result.returncode == 0, (arguments, result.stdout, result.stderr)
    return result.stdout + result.stderr


@pytest.mark.skipif(FLEXGET is None, reason="FlexGet is a test-only dependency: .ci/run "
                    "installs it and names it in $FLEXGET")
async def test_flexget_lists_and_purges_a_torrent(guarded_process, seeders, tracker,
                                                  tmp_path):
    """FlexGet's from_transmission input, the cleanup FlexGet recommends, lists the
    torrent with its .torrent copy, and its transmission output purges it with its data."""
    process = guarded_process
    torrent, source, layout = swarm_torrent(tmp_path, tracker, seeders(), 1024 * 1024)
    infohash = infohash_of(torrent)
    await process.start()
    await add(process.client, torrent_file=torrent)
    await wait_complete(process.client, infohash)
    copy = process.state_dir / "torrents" / f"{infohash}.torrent"
    await wait_until(copy.is_file, what="the .torrent copy")
    daemon = {"host": "127.0.0.1", "port": process.port, "username": "flexget",
              "password": TOKEN}
    (tmp_path / "flexget").mkdir()
    (tmp_path / "flexget" / "config.yml").write_text(json.dumps({"tasks": {  # JSON is YAML
        "list": {"from_transmission": daemon},
        "purge": {"from_transmission": daemon, "accept_all": True,
                  "transmission": {**daemon, "action": "purge"}}}}))
    listed = await flexget(tmp_path, "execute", "--tasks", "list", "--dump")
    entry = dict(re.findall(r"^(\w+)\s*: (.*?)\s*$", listed, re.MULTILINE))
    assert entry["title"] == "data.bin", listed
    assert entry["torrent_info_hash"].lower() == infohash
    assert entry["transmission_torrentFile"] == entry["location"] == str(copy)
    assert entry["transmission_downloadDir"] == str(process.download_dir)
    purged = await flexget(tmp_path, "execute", "--tasks", "purge")
    assert "purged data.bin from transmission" in purged, purged
    assert await process.infohashes() == set()
    assert not (process.download_dir / "data.bin").exists() and not copy.exists()


# --------------------------------------------------------------------------- #
# Hardened extensions: webhooks, RPC bodies, the web client
# --------------------------------------------------------------------------- #

async def rpc_session(client):
    """The RPC's session id, as a client's first request learns it."""
    return (await client.get("/transmission/rpc", headers=AUTH)).headers[
        "X-Transmission-Session-Id"]


async def test_rpc_refuses_repeated_keys(guarded):
    """{"method": "session-get", "method": "torrent-stop"} stopped every torrent: the
    RPC took the last of repeated keys. A repeated key, at any depth, is refused with a
    result string, and nothing happens."""
    added = await guarded.post("/torrents", json={"torrent_url": MAGNET}, headers=AUTH)
    assert added.status == 201
    headers = {**AUTH, "X-Transmission-Session-Id": await rpc_session(guarded)}
    for body in ('{"method":"session-get","method":"torrent-stop"}',
                 '{"method":"torrent-stop","arguments":{"ids":["%s"],"ids":["%s"]}}'
                 % ("cd" * 20, MAGNET[-40:]),
                 '{"method":"torrent-stop","arguments":{"ids":[{"a":1,"a":2}]}}'):
        response = await guarded.post("/transmission/rpc", data=body, headers=headers)
        answer = await response.json()
        assert response.status == 200 and set(answer) == {"arguments", "result"}, answer
        assert "repeated" in answer["result"], answer
    # Not stopped (a stop takes it out of the queue's hands).
    assert (await status_of_guarded(guarded, MAGNET[-40:]))["auto_managed"]
    # The same call without the repeat does what it says.
    _, answer = await rpc(guarded, "torrent-stop", {"ids": [MAGNET[-40:]]},
                          headers["X-Transmission-Session-Id"])
    assert answer["result"] == "success"
    stopped = await status_of_guarded(guarded, MAGNET[-40:])
    assert stopped["paused"] and not stopped["auto_managed"]


async def test_a_malformed_webhook_queue_file_is_quarantined_and_the_rest_delivered(
        aiohttp_server, tmp_path):
    """One malformed file in a webhook's queue (not JSON, a list, not UTF-8, CR/LF in
    its type, no time) stopped every delivery to its target, at every start. Each is
    moved to quarantine/ with one warning, and the events around them are delivered."""
    receiver = await receiver_at(aiohttp_server)
    now = int(time.time())

    def event(number, **fields):
        return json.dumps({"id": number, "type": "added", "time": now, "infohash": None,
                           "detail": f"queued {number}", "torrent": None, **fields}).encode()
    malformed = {"1.json": b"{not json", "2.json": b"[1, 2]",
                 "3.json": event(3).replace(b"added", b"added\xff"),
                 "4.json": event(4, type="added\r\nX-Injected: yes"),
                 "5.json": json.dumps({"id": 5, "type": "added"}).encode(),
                 "notes.json": event(6)}
    process = DaemonProcess(tmp_path, extra=["--webhook", receiver.url,
                                             "--webhook-events", "added"])
    folder = process.state_dir / "webhooks" / hashlib.sha1(
        receiver.url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True)
    for name, body in {**malformed, "7.json": event(7), "9.json": event(9)}.items():
        (folder / name).write_bytes(body)
    (process.state_dir / "event-id").write_text("100")  # new events follow the queue
    try:
        await process.start()
        _, body = await add(process.client, torrent_url=MAGNET)

        def delivered():
            return sorted(e["id"] for e in receiver.delivered().values())
        await wait_until(lambda: len(delivered()) == 3, deadline=30, what="the deliveries")
        ordered = [json.loads(raw)["id"] for _, raw in receiver.received]
        assert ordered == delivered() == [7, 9, 101]
        assert json.loads(receiver.received[-1][1])["infohash"] == body["infohash"]
        assert all("X-Injected" not in headers for headers, _ in receiver.received)
        async with process.client.get("/health") as response:
            assert response.status == 200, await response.text()
    finally:
        await process.close()
    assert not list(folder.iterdir())
    aside = {path.name.rpartition(".")[0]: path.read_bytes()
             for path in (process.state_dir / "quarantine" / "webhooks" / folder.name).iterdir()}
    assert aside == malformed
    log = process.log()
    for name in malformed:
        assert log.count(f"moved queue file {name} ") == 1, log


async def test_a_bad_event_counter_in_the_state_directory_starts_ids_at_one(tmp_path):
    """The saved event counter is read back like every state file: a negative one, one
    with spaces or too many digits for a Last-Event-ID, or bytes, is ignored with a
    warning, and the ids start at 1 again, not at -4 or past what a client can resume."""
    for number, counter in enumerate((b"-5", b" 7 ", b"9" * 30, b"\xff")):
        process = DaemonProcess(tmp_path / str(number))
        process.state_dir.mkdir(parents=True)
        (process.state_dir / "event-id").write_bytes(counter)
        try:
            await process.start()
            reader = EventReader(await process.client.get("/events"))
            await add(process.client, torrent_url=MAGNET)
            kind, _, event_id = await reader.next(deadline=10)
            assert (kind, event_id) == ("added", "1"), counter
            reader.response.close()
        finally:
            await process.close()
        assert "ignoring the event counter" in process.log(), counter


@pytest.mark.parametrize("counter", [b"garbage", None, b"2"])
async def test_a_bad_event_counter_does_not_reuse_queued_ids(tmp_path, counter):
    """With events queued for a webhook that is down, a damaged, lost or older counter
    restarted ids at 1: new events wrote over the queued ones, lost with their ids."""
    url = "http://127.0.0.1:1/hook"  # nobody listens: everything stays queued
    process = DaemonProcess(tmp_path, extra=["--webhook", url, "--webhook-events", "added"])
    folder = process.state_dir / "webhooks" / hashlib.sha1(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True)
    queued = json.dumps({"id": 5, "type": "added", "time": int(time.time()), "infohash": None,
                         "detail": "queued before", "torrent": None}).encode()
    (folder / "5.json").write_bytes(queued)
    if counter is not None:
        (process.state_dir / "event-id").write_bytes(counter)
    try:
        await process.start()
        reader = EventReader(await process.client.get("/events"))
        await add(process.client, torrent_url=MAGNET)
        assert (await reader.next(deadline=10))[2] == "6"
        reader.response.close()
    finally:
        await process.close()
    assert (folder / "5.json").read_bytes() == queued and (folder / "6.json").exists()


async def test_webhook_credentials_show_as_stars(aiohttp_server, tmp_path, capsys):
    """A webhook URL's credentials are used, and shown nowhere: not in GET /webhooks,
    /metrics, /health or the log, nor in the message that refuses the URL at start."""
    receiver = await receiver_at(aiohttp_server)
    password, token = "hook-pass-0123456789", "hook-token-0123456789"
    with_password = receiver.url.replace("http://", f"http://hook-user:{password}@")
    # Nothing listens: it fails. An @ after the host is not the user information's end.
    user_only = f"http://{token}@127.0.0.1:1/hook?notify=ops@example.com"
    process = DaemonProcess(tmp_path, extra=[
        "--webhook", with_password, "--webhook", user_only, "--webhook-events", "added"])
    try:
        await process.start()
        await add(process.client, torrent_url=MAGNET)
        await wait_until(lambda: receiver.received, deadline=30, what="the delivery")
        assert receiver.received[0][0]["Authorization"] == "Basic " + base64.b64encode(
            f"hook-user:{password}".encode()).decode()

        async def failed_once():
            async with process.client.get("/webhooks") as response:
                views = (await response.json())["webhooks"]
            return views if all(view["last_error"] or view["last_success"]
                                for view in views) else None
        views = await wait_until(failed_once, deadline=30, what="the failed delivery")
        shown = receiver.url.replace("http://", "http://hook-user:***@")
        assert [view["url"] for view in views] == [
            shown, "http://***@127.0.0.1:1/hook?notify=ops@example.com"]
        async with process.client.get("/metrics") as response:
            metrics = await response.text()
        assert f'url="{shown}"' in metrics
        async with process.client.get("/health") as response:
            health = await response.text()
    finally:
        await process.close()
    for text in (json.dumps(views), metrics, health, process.log()):
        assert password not in text and token not in text
    # Refused at start, the URL is named without its password.
    with pytest.raises(SystemExit):
        daemon_config(tmp_path, "--webhook", f"http://someone:{password}@example.com/x")
    error = capsys.readouterr().err
    assert "someone:***@example.com" in error and password not in error
    for refused in (f"http://{token}@example.com:8443/x?cc=ops@example.com",
                    f"http://{token}@127.0.0.1:8443/x?cc=ops@example.com\n"):
        with pytest.raises(SystemExit):
            daemon_config(tmp_path, "--webhook", refused)
        error = capsys.readouterr().err
        assert "***@" in error and token not in error, error


async def test_a_webhook_url_with_cr_or_lf_stops_the_start(tmp_path, capsys):
    """urlsplit drops CR and LF quietly, so such a URL passed the check, and the text
    as given was posted to. It stops the start with status 2, naming the option."""
    url = "http://127.0.0.1:9/hook\r\nX-Injected: yes"
    started = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HERE / "torrentflow.py"), "--local-only",
                         "--listen-interfaces", "127.0.0.1:0", "--port", "0",
                         "--download-dir", str(tmp_path / "downloads"),
                         "--state-dir", str(tmp_path / "state"), "--webhook", url],
        capture_output=True, text=True, timeout=15, env=CLEAN_ENV, cwd=tmp_path)
    assert started.returncode == 2, started.stderr
    assert "--webhook / TORRENTFLOW_WEBHOOKS" in started.stderr
    assert "control characters" in started.stderr
    for url in ("http://127.0.0.1:9/a\nb", "http://127.0.0.1:9/a\rb"):
        with pytest.raises(SystemExit) as stopped:
            torrentflow.parse_config(["--local-only"], environ={"TORRENTFLOW_WEBHOOKS": url})
        assert stopped.value.code == 2
        assert "--webhook / TORRENTFLOW_WEBHOOKS" in capsys.readouterr().err


#: Collects the page's Content-Security-Policy violations, from before its first script:
#: "<directive> <what was blocked> <the class of the element that asked>".
VIOLATIONS = """window.violations = [];
document.addEventListener("securitypolicyviolation", event => window.violations.push(
    [event.violatedDirective, event.blockedURI, event.target.className].join(" ")));"""


@pytest.mark.skipif(CHROMIUM is None or not (WEB_CLIENT / "index.html").is_file(),
                    reason="needs Debian's chromium and transmission-common")
async def test_an_injected_handler_in_the_web_client_runs_no_script(
        aiohttp_client, aiohttp_server, tmp_path):
    """Transmission 3.00's web client writes a tracker's URL into a title attribute with
    only < and > escaped, so a URL holding "onmouseover=" ran a stranger's script on the
    daemon's origin. Under the policy /transmission/web/ is served with, hovering over
    it in Chromium runs nothing, and nothing reaches another origin."""
    spy = Receiver()  # another origin: whatever reaches it leaked
    spy.app.router.add_get("/{name}", spy.hook)
    spy.server = await aiohttp_server(spy.app)
    web_ui = tmp_path / "web"
    shutil.copytree(WEB_CLIENT, web_ui)
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--token", TOKEN, "--web-ui", str(web_ui))), headers=AUTH)
    _, body = await add(client, torrent_url=MAGNET + "&dn=hostile-tracker")
    leak = str(spy.server.make_url("/"))
    hostile = (f"http://127.0.0.1:1/announce\"onmouseover=\"window.injected=true;"
               f"fetch('{leak}script')\"style=\"background:url({leak}style)\"x=\"")
    # Put straight into libtorrent, as a URL that got past the daemon's input checks
    # would be: the policy is the defence under test, not those checks.
    engine = client.app[torrentflow.ENGINE]
    engine.lookup(body["infohash"]).handle.add_tracker({"url": hostile, "tier": 0})
    page = await client.get("/transmission/web/")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split(
        "script-src")[1].split(";")[0] and "connect-src 'self'" in policy

    browser = Chromium(tmp_path / "chromium")
    try:
        await browser.start()
        await browser.call("Page.enable")
        await browser.call("Page.addScriptToEvaluateOnNewDocument", source=VIOLATIONS)
        await browser.call("Network.enable")
        await browser.call("Network.setExtraHTTPHeaders", headers={
            "Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()})
        await browser.call("Page.navigate", url=str(client.make_url("/transmission/web/")))
        row = "document.querySelector('#torrent_list li')"
        await wait_until(lambda: browser.evaluate(f"{row} !== null"), what="the torrent's row")
        await browser.evaluate(f"{row}.click(); $('#toolbar-inspector').click(); "
                               "$('#inspector-tab-trackers').click(); 0")
        tracker = "document.querySelector('.tracker_host[onmouseover]')"
        await wait_until(lambda: browser.evaluate(
            f"{tracker} !== null && {tracker}.getBoundingClientRect().width > 0"),
            what="the Trackers tab to show the injected attribute")
        x, y = await browser.evaluate(f"(box => [box.x + box.width / 2, box.y + box.height / 2])"
                                      f"({tracker}.getBoundingClientRect())")
        await browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        # Either the handler ran, or the browser reports that it refused it.
        await wait_until(lambda: browser.evaluate(
            "window.injected === true || window.violations.includes("
            "'script-src-attr inline tracker_host')"), what="the hover's outcome")
        assert await browser.evaluate("window.injected === undefined")
        await wait_until(lambda: browser.evaluate(
            f"window.violations.some(v => v.startsWith('img-src {leak}style'))"),
            what="the foreign background to be refused")
        # A script that does run (here, the test's own) cannot reach another origin either.
        fetched = await browser.call("Runtime.evaluate", awaitPromise=True, expression=(
            f"fetch('{leak}fetch').then(() => 'sent', error => 'refused')"))
        assert fetched["result"]["value"] == "refused"
    finally:
        await browser.close()
    assert spy.received == []


#: Swaps a name between a regular file and a symlink to a secret, as fast as it can,
#: for a few seconds: python3 -c FLIP NAME SECRET SECONDS.
FLIP = """import os, sys, time
name, secret, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.symlink(secret, name + ".link")
    os.replace(name + ".link", name)
    with open(name + ".plain", "w") as file:
        file.write("plain")
    os.replace(name + ".plain", name)
"""


async def test_the_web_client_serves_the_file_it_opened_and_answers_head(
        aiohttp_client, tmp_path):
    """A file of the web directory flipped between a regular file and a symlink to a
    secret outside it: answers carried the secret, as the path was checked and then
    opened again. Every answer is now the regular file or a 404. HEAD answers too; a
    FIFO, and a symlink even to a file inside, are not served."""
    web_ui = tmp_path / "web"
    web_ui.mkdir()
    (web_ui / "index.html").write_text("<p>the index</p>")
    (web_ui / "flip.txt").write_text("plain")
    (web_ui / "inner.html").symlink_to(web_ui / "index.html")
    os.mkfifo(web_ui / "pipe")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET from outside")
    client = await aiohttp_client(torrentflow.make_app(daemon_config(
        tmp_path, "--token", TOKEN, "--web-ui", str(web_ui))), headers=AUTH)
    head = await client.head("/transmission/web/")
    assert head.status == 200 and head.content_type == "text/html"
    assert head.headers["Content-Length"] == str(len("<p>the index</p>"))
    assert await head.read() == b""
    assert (await client.head("/transmission/web/missing.js")).status == 404
    for name in ("pipe", "inner.html", "flip.txt/x", "..%2Fsecret.txt", "a%0Ab"):
        await error_of(await client.get(f"/transmission/web/{name}"), 404, "no such file")

    async def fetch():
        async with client.get("/transmission/web/flip.txt") as response:
            return response.status, await response.read()
    flipper = subprocess.Popen([sys.executable, "-c", FLIP, str(web_ui / "flip.txt"),
                                str(secret), "10"])
    answers = collections.Counter()
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            answers.update(await asyncio.gather(*(fetch() for _ in range(8))))
    finally:
        flipper.kill()
        flipper.wait()
    print(dict(answers))
    assert {status for status, _ in answers} == {200, 404}
    assert {body for status, body in answers if status == 200} == {b"plain"}


async def test_every_event_the_stream_sends_matches_its_description(daemon, tmp_path):
    """schemathesis 4 checks each Server-Sent Event against the schema of GET /events
    (ST108), which described the stream as a string. Each event of a real stream, a
    reset included, matches the schema of one event, its data the event schema."""
    spec = torrentflow.openapi_document()
    media = spec["paths"]["/events"]["get"]["responses"]["200"]["content"][
        "text/event-stream"]
    item = media.get("itemSchema", media["schema"])  # OpenAPI 3.2 has a keyword for it
    reader = EventReader(await daemon.get("/events"))
    _, body = await add(daemon, torrent_url=MAGNET + "&dn=described")
    for action in ("pause", "resume"):
        assert (await daemon.put(f"/torrents/{body['infohash']}/{action}")).status == 200
    assert (await daemon.patch("/settings", json={"upload_limit": 1000})).status == 200
    assert (await daemon.delete(f"/torrents/{body['infohash']}")).status == 200
    seen = await reader.until("removed")
    reset = EventReader(await daemon.get("/events", headers={"Last-Event-ID": "99999"}))
    seen.append(await reset.next())
    assert [kind for kind, _, _ in seen] == [
        "added", "paused", "resumed", "settings", "removed", "reset"], seen
    for kind, data, event_id in seen:
        event = {"event": kind, "data": json.dumps(data),
                 **({"id": event_id} if event_id else {})}
        validate(spec, item, event)
        choices = item["properties"]["data"]["contentSchema"]["anyOf"]
        errors = []
        for choice in choices:
            try:
                validate(spec, choice, data)
            except AssertionError as error:
                errors.append(str(error))
        assert len(errors) < len(choices), (kind, errors)


async def status_of_guarded(client, infohash):
    response = await client.get(f"/torrents/{infohash}", headers=AUTH)
    assert response.status == 200, await response.text()
    return await response.json()


# --------------------------------------------------------------------------- #
# The README is held to the tables in the code
# --------------------------------------------------------------------------- #

def readme_table(heading):
    """The rows of the first table after a README heading, as lists of cells."""
    text = (HERE / "README.md").read_text()
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_the_readme_lists_every_option_with_its_flag_and_variable():
    rows = readme_table("## Configuration")
    flags = {re.findall(r"`(--[a-z-]+)`", row[1])[0] for row in rows}
    variables = {re.findall(r"`(TORRENTFLOW_[A-Z_]+)`", row[2])[0] for row in rows}
    assert flags == {option.flag for option in torrentflow.OPTIONS}
    assert variables == {option.env for option in torrentflow.OPTIONS}
    for row, option in zip(rows, torrentflow.OPTIONS):
        default = option.default
        shown = ("none" if default in (None, ()) else ("on" if default else "off")
                 if isinstance(default, bool) else ",".join(default)
                 if isinstance(default, tuple) else str(default))
        assert row[3] == f"`{shown}`", (option.name, row[3])


def test_every_readme_table_row_has_its_header_s_cells():
    """A row pasted into the wrong table (it happened, to the endpoint table) shows."""
    lines = (HERE / "README.md").read_text().splitlines()
    cells = lambda line: len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
    for number, line in enumerate(lines):
        if line.startswith("|") and not lines[number - 1].startswith("|"):
            width = cells(line)
            for offset, row in enumerate(itertools.takewhile(
                    lambda text: text.startswith("|"), lines[number:])):
                assert cells(row) == width, (number + offset + 1, row)


def test_the_readme_documents_every_status_field():
    rows = readme_table("### The status object")
    documented = [name for row in rows for name in re.findall(r"`(\w+)`", row[0])]
    assert documented == torrentflow.status_fields()


# --------------------------------------------------------------------------- #
# The seam: the core never names an extension
# --------------------------------------------------------------------------- #

def test_nothing_above_the_seam_names_anything_defined_below_it():
    """The core reads alone: extensions plug in through its tables and the engine's
    listeners, so no module-level name defined only below "# The core ends here" is
    used above it."""
    source = (HERE / "torrentflow.py").read_text()
    seam = source.splitlines().index("# The core ends here") + 1
    tree = ast.parse(source)
    defined = {True: set(), False: set()}  # above the seam, below it
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {name.id for target in targets for name in ast.walk(target)
                     if isinstance(name, ast.Name)}
        else:
            names = set()
        defined[node.lineno < seam] |= names
    below_only = defined[False] - defined[True]
    assert {"configure", "Events", "RpcState", "render_metrics", "peers"} <= below_only
    used_above = {node.id for node in ast.walk(tree)
                  if isinstance(node, ast.Name) and node.lineno < seam}
    assert not used_above & below_only, sorted(used_above & below_only)


async def test_the_core_alone_is_a_working_daemon(seeders, tmp_path):
    """Cut at the seam, the core runs by itself: it downloads, lists, pauses, resumes and
    removes through its API, and refuses what only extensions serve."""
    source = (HERE / "torrentflow.py").read_text()
    core = tmp_path / "core.py"
    core.write_text(source[:source.index("# The core ends here")]
                    + 'if __name__ == "__main__":\n    sys.exit(main())\n')
    layout = {"single.bin": 2_000_000}
    data = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(data / "single.bin")
    seeder = seeders().seed(torrent, data)
    (tmp_path / "daemon").mkdir()
    process = DaemonProcess(tmp_path / "daemon", script=core)
    try:
        await process.start()
        _, body = await add(process.client, torrent_url=seeder.magnet(torrent))
        infohash = body["infohash"]
        await wait_complete(process.client, infohash)
        assert (process.download_dir / "single.bin").read_bytes() == (
            data / "single.bin").read_bytes()
        assert await process.infohashes() == {infohash}
        for action in ("pause", "resume"):
            await process.put(infohash, action)
        await error_of(await process.client.get("/torrents?state=seeding"), 400, "state")
        await error_of(await process.client.post("/torrents", data={
            "torrent_url": seeder.magnet(torrent), "paused": "true"}), 400, "'paused'")
        await error_of(await process.client.get("/events"), 404)
        await error_of(await process.client.get("/openapi.json"), 404)
        async with process.client.delete(f"/torrents/{infohash}") as response:
            assert response.status == 200, await response.text()
        assert await process.infohashes() == set()
        await process.restart()
        assert await process.infohashes() == set()
    finally:
        await process.close()


# --------------------------------------------------------------------------- #
# Clients and what they send
# --------------------------------------------------------------------------- #

async def test_rpc_null_arguments_mean_not_given(guarded, payload):
    """stig sends "labels": null when no label is given; Transmission reads it as absent."""
    source, _ = payload
    metainfo = base64.b64encode(make_torrent(source / "single.bin")).decode()
    status, answer = await rpc(guarded, "torrent-add", {
        "metainfo": metainfo, "labels": None, "paused": None, "download-dir": None})
    assert status == 200 and "torrent-added" in answer["arguments"], answer
    status, answer = await rpc(guarded, "torrent-get", {"fields": ["labels", "downloadDir"],
                                                        "ids": None})
    assert answer["result"] == "success", answer
    assert answer["arguments"]["torrents"][0]["labels"] == []
    session = (await guarded.get("/transmission/rpc", headers=AUTH)).headers[
        "X-Transmission-Session-Id"]
    answer = await (await guarded.post("/transmission/rpc", headers={
        **AUTH, "X-Transmission-Session-Id": session},
        json={"method": "session-get", "arguments": None})).json()
    assert answer["result"] == "success" and answer["arguments"]["rpc-version"] >= 14


@pytest.mark.parametrize("note, value", [
    ("order", "zzz"), ("order", [1, 2]), ("moving_to", 12345), ("moving_to", "/a\x00b"),
    ("ratio_limit", "x"), ("seeding_time_limit", [1]), ("downloaded", "abc"),
    ("chosen_priorities", "zzz"), ("labels", [f"l{n}" for n in range(10_000)]),
    ("labels", "just-a-string"), ("limit_mark", {"a": 1})])
async def test_a_bad_note_in_one_resume_file_falls_back_and_the_rest_load(process, tmp_path,
                                                                          note, value, caplog):
    """One hand-edited note, in one resume file of three (its .bak gone too), must not
    hide the library or stop the loops: the note falls back to its default."""
    hashes = []
    for name in ("a.bin", "b.bin", "c.bin"):
        source = make_payload(process.download_dir, {name: 50_000 + len(hashes)})
        torrent = make_torrent(source / name)
        hashes.append(infohash_of(torrent))
    await process.start()
    for name in ("a.bin", "b.bin", "c.bin"):
        await add(process.client, torrent_file=make_torrent(process.download_dir / name))
    for infohash in hashes:
        await wait_complete(process.client, infohash)
    await process.stop(signal.SIGTERM)
    resume_file = process.state_dir / "resume" / f"{hashes[1]}.resume"
    resume = lt.bdecode(resume_file.read_bytes())
    notes = json.loads(resume[torrentflow.NOTES_KEY])
    resume[torrentflow.NOTES_KEY] = json.dumps({**notes, note: value}).encode()
    resume_file.write_bytes(lt.bencode(resume))
    resume_file.with_suffix(".bak").unlink(missing_ok=True)
    await process.start()
    for infohash in hashes:
        status = await wait_complete(process.client, infohash)
        assert status["state"] == "seeding" and not status["error"], status
    listed = await (await process.client.get("/torrents")).json()
    assert listed["total"] == 3
    health = await (await process.client.get("/health")).json()
    assert health["status"] == "ok" and health["loading"] is False
    if note == "labels":
        assert (await status_of(process.client, hashes[1]))["labels"] in ([], ["just-a-string"])
        filtered = await (await process.client.get("/torrents?label=just")).json()
        assert filtered["total"] == 0  # never a substring match
    if value != "just-a-string":  # a form's comma-separated labels: one valid label
        assert "ignoring its saved" in process.log_path.read_text()


#: A tracker URL that Transmission's web client would render as an attribute holding an
#: inline event handler: a stranger's script on the daemon's origin.
HOSTILE_TRACKER = ("http://127.0.0.1:1/\"style=\"position:fixed;top:0;left:0;width:100%;"
                   "height:100%\"onmouseover=\"fetch('/transmission/rpc')\"x=\"")


async def test_tracker_urls_that_hold_markup_are_refused_from_every_source(daemon, payload):
    source, _ = payload
    _, body = await add(daemon, torrent_file=make_torrent(source / "single.bin",
                                                          tracker=HOSTILE_TRACKER))
    infohash = body["infohash"]
    _, magnet_body = await add(daemon, torrent_url="magnet:?xt=urn:btih:" + "cd" * 20
                               + "&tr=" + urllib.parse.quote(HOSTILE_TRACKER, safe="")
                               + "&tr=http%3A%2F%2F127.0.0.1%3A1%2Fannounce")
    for added in (infohash, magnet_body["infohash"]):
        answer = await (await daemon.get(f"/torrents/{added}/trackers")).json()
        assert HOSTILE_TRACKER not in [tracker["url"] for tracker in answer["trackers"]]
    # The magnet's harmless tracker stays: only the one with markup went.
    answer = await (await daemon.get(f"/torrents/{magnet_body['infohash']}/trackers")).json()
    assert [tracker["url"] for tracker in answer["trackers"]] == [
        "http://127.0.0.1:1/announce"]
    for mark in ('"', "'", " ", "<", ">", "\\", "`"):
        await error_of(await daemon.patch(f"/torrents/{infohash}", json={
            "trackers": [f"http://127.0.0.1:1/a{mark}b"]}), 422, "backtick")
    _, answer = await rpc(daemon, "torrent-set", {"ids": [infohash],
                                                  "trackerAdd": [HOSTILE_TRACKER]})
    assert "backtick" in answer["result"], answer
    _, answer = await rpc(daemon, "torrent-get", {"ids": [infohash],
                                                  "fields": ["trackerStats"]})
    assert answer["arguments"]["torrents"][0]["trackerStats"] == []


async def test_a_path_that_climbs_out_of_its_root_is_refused_by_its_text(daemon, tmp_path):
    """A .. that leaves the root and comes back in is refused before the disk is looked
    at, with one answer whatever is there: else the answers map what is outside."""
    (tmp_path / "outside" / "realdir").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "outside" / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    downloads = tmp_path / "downloads"
    answers = set()
    for name in ("realdir", "link", "nosuchdir"):
        for path in (f"{downloads}/../outside/{name}/../../downloads",
                     f"../outside/{name}/../../downloads/x"):
            response = await daemon.post("/torrents", data={"torrent_url": MAGNET,
                                                            "save_path": path})
            answers.add((response.status, (await response.json())["detail"]))
            _, answer = await rpc(daemon, "free-space", {"path": path})
            answers.add(("rpc", answer["result"]))
    assert len(answers) == 2 and all("inside the download directory" in detail
                                     for _, detail in answers), answers
    assert (400, "save_path must stay inside the download directory") in answers
    assert (await (await daemon.get("/torrents")).json())["total"] == 0


async def test_a_second_daemon_on_the_same_state_dir_stops_at_once(process, tmp_path):
    """It would load the same torrents, and its clean stop would vouch for the first
    daemon's files after that one crashed."""
    await process.start()
    second = subprocess.run(
        [sys.executable, str(HERE / "torrentflow.py"), "--local-only", "--listen-interfaces",
         "127.0.0.1:0", "--port", "0", "--download-dir", str(tmp_path / "other"),
         "--state-dir", str(process.state_dir)], capture_output=True, text=True, timeout=60,
        env=CLEAN_ENV)
    assert second.returncode == 2, second.stderr
    assert str(process.state_dir) in second.stderr and "in use" in second.stderr
    assert not (process.state_dir / torrentflow.CLEAN_MARK).exists()
    assert (await process.client.get("/health")).status == 200
    await process.stop(signal.SIGTERM)
    assert (process.state_dir / torrentflow.CLEAN_MARK).exists()
    await process.start()  # the lock went with the first process
    assert (await process.client.get("/health")).status == 200


def rss_of(pid):
    """Resident bytes of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def test_large_bodies_in_flight_share_one_budget(tmp_path):
    """Eight 20 MiB RPC bodies at once: those past the budget are answered 503 with
    Retry-After before their bodies are read, and the daemon's memory stays bounded."""
    process = DaemonProcess(tmp_path, extra=["--token", TOKEN], headers=AUTH)
    try:
        await process.start()
        pid, url = process.process.pid, f"http://127.0.0.1:{process.port}/transmission/rpc"
        session = (await process.client.get("/transmission/rpc")).headers[
            "X-Transmission-Session-Id"]
        before, peak = rss_of(pid), [0]

        head, tail = b'{"method": "session-get", "arguments": {"x": "', b'"}}'

        async def body():
            yield head
            for _ in range(20):
                peak[0] = max(peak[0], rss_of(pid))
                yield b"a" * (1024 * 1024)
                await asyncio.sleep(0.05)
            yield tail

        async def call(client):
            with contextlib.suppress(aiohttp.ClientError):
                async with client.post(url, data=body(), headers={
                        "X-Transmission-Session-Id": session, "Content-Type": "application/json",
                        "Content-Length": str(len(head) + 20 * 1024 * 1024 + len(tail))},
                        ) as response:
                    return response.status, response.headers.get("Retry-After")
            return "closed", None
        async with aiohttp.ClientSession(headers=AUTH) as client:
            answers = await asyncio.gather(*(call(client) for _ in range(8)))
        print(f"answers: {answers}; RSS {before >> 20} MiB before, {peak[0] >> 20} at most")
        assert (503, "1") in answers and (200, None) in answers, answers
        assert peak[0] - before < 200 * 1024 * 1024
        assert (await process.client.get("/health")).status == 200
    finally:
        await process.close()


async def test_data_deleted_during_a_download_stops_it_with_the_reason(daemon, tmp_path):
    """A download whose file was deleted went on from 17% to 100% into the unlinked file:
    the periodic data check now covers the files a download has written to."""
    seeder, _, _, infohash = await slow_download(daemon, tmp_path, "gone.bin",
                                                 8 * 1024 * 1024, 150_000)
    written = tmp_path / "downloads" / "gone.bin"
    await wait_until(lambda: written.exists() and written.stat().st_size > 0,
                     what="the download to write its file")
    written.unlink()
    status = await wait_status(daemon, infohash, lambda s: s["error"],
                               deadline=2 * torrentflow.DATA_CHECK_INTERVAL + 10,
                               what="the deleted file to be noticed")
    assert "missing or truncated file: gone.bin" in status["error"] and status["paused"]
    assert status["progress"] < 100


async def test_a_new_torrent_shows_the_state_it_is_in_at_once(daemon, payload):
    """Not paused and queued until libtorrent's queue ticks, up to a second later, when
    the queue has room: started at once, as that tick would."""
    source, _ = payload
    _, body = await add(daemon, torrent_file=make_torrent(source / "single.bin"))
    status = await status_of(daemon, body["infohash"])
    assert status["paused"] is False and status["queued"] is False, status


# --------------------------------------------------------------------------- #
# Streaming: play while it downloads
# --------------------------------------------------------------------------- #

MIB = 1024 * 1024


def file_url(infohash, index=0):
    return f"/torrents/{infohash}/files/{index}"


async def read_range(client, url, byte_range=None):
    """The body of GET url, checked 206 with a Range header (bytes=first-last), else 200."""
    headers = {"Range": f"bytes={byte_range}"} if byte_range else {}
    async with client.get(url, headers=headers) as response:
        assert response.status == (206 if byte_range else 200), await response.text()
        return await response.read()


async def test_a_stream_sends_the_end_first_and_every_byte_from_a_slow_seeder(daemon, seeders,
                                                                             tmp_path):
    """A 64 MiB file from a seeder held to 2 MB/s: its last MiB is complete while the
    torrent is below 50%; a full read from the start and a read from the middle, begun
    at the same time, both match the source."""
    source = make_payload(tmp_path / "source", {"movie.mkv": 64 * MIB})
    torrent = make_torrent(source / "movie.mkv", piece_size=256 * 1024)
    seeder = seeders(rate_limit=2_000_000).seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    url, original = file_url(body["infohash"]), (source / "movie.mkv").read_bytes()
    await wait_status(daemon, body["infohash"], lambda s: s["has_metadata"], what="metadata")
    whole = asyncio.create_task(read_range(daemon, url))
    middle = asyncio.create_task(read_range(daemon, url, f"{40 * MIB}-"))
    assert await read_range(daemon, url, f"-{MIB}") == original[-MIB:]
    assert (await status_of(daemon, body["infohash"]))["progress"] < 50
    unlimit(seeder)  # the rest need not take half a minute
    assert await middle == original[40 * MIB:]
    assert hashlib.sha1(await whole).digest() == hashlib.sha1(original).digest()
    await wait_status(daemon, body["infohash"], lambda s: s["streams"] == [], what="no streams")


FFMPEG_MISSING = not (shutil.which("ffmpeg") and shutil.which("ffprobe"))


async def run_tool(*argv):
    """The output of a command that must succeed within DEADLINE; a failure shows its
    stderr."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode == 0, (argv, err.decode(errors="replace"))
    return out.decode()


@pytest.fixture
async def streaming(tmp_path, aiohttp_client):
    """A daemon with a token, and a client that sends it."""
    return await loaded(await aiohttp_client(torrentflow.make_app(
        daemon_config(tmp_path, "--token", TOKEN)), headers=AUTH))


async def slow_movie(client, seeders, tmp_path, rate):
    """A 40 s MP4 with its index (moov) at the end, the hard case, seeded at rate bytes/s
    and added by magnet: (its stream URL, its infohash), once its metadata is in."""
    movie = tmp_path / "source" / "clip.mp4"
    movie.parent.mkdir()
    await run_tool("ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=duration=40:"
                   "size=320x180:rate=25,noise=alls=40:allf=t", "-c:v", "mpeg4", "-b:v", "3M",
                   str(movie))
    data = movie.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat") > 0
    torrent = make_torrent(movie, piece_size=64 * 1024)
    seeder = seeders(rate_limit=rate).seed(torrent, movie.parent)
    _, body = await add(client, torrent_url=seeder.magnet(torrent))
    await wait_status(client, body["infohash"], lambda s: s["has_metadata"], what="metadata")
    return str(client.make_url(file_url(body["infohash"]))), body["infohash"]


@pytest.mark.skipif(FFMPEG_MISSING, reason="needs ffmpeg and ffprobe (Debian's ffmpeg)")
async def test_ffprobe_and_ffmpeg_play_a_file_while_it_downloads(streaming, seeders, tmp_path):
    """ffprobe reads the duration, which takes the index at the end, and ffmpeg a frame
    from the middle, while the torrent comes from a seeder held to 400 kB/s."""
    url, infohash = await slow_movie(streaming, seeders, tmp_path, 400_000)
    bearer = ["-headers", f"Authorization: Bearer {TOKEN}\r\n"]
    duration = await run_tool("ffprobe", "-v", "error", *bearer, "-show_entries",
                              "format=duration", "-of", "csv=p=0", url)
    assert abs(float(duration) - 40) < 0.5
    assert (await status_of(streaming, infohash))["progress"] < 50
    frame = tmp_path / "middle.png"
    await run_tool("ffmpeg", "-v", "error", *bearer, "-ss", "20", "-i", url, "-frames:v", "1",
                   str(frame))
    assert frame.read_bytes().startswith(b"\x89PNG")
    assert (await status_of(streaming, infohash))["progress"] < 100


def in_place(tmp_path, layout, piece=PIECE):
    """Random files already in the daemon's download directory, and their .torrent: the
    daemon finds every piece when it adds it, and seeds."""
    root = make_payload(tmp_path / "downloads", layout)
    top = root / Path(next(iter(layout))).parts[0]
    return make_torrent(top, piece_size=piece), top


def half_there(tmp_path, name, size, tracker=None, save_path=""):
    """A .torrent of a random file of which only the first half is in the download
    directory (under save_path): the daemon has those pieces at the add, and waits for
    the rest until a peer has them. (torrent, the whole file's bytes)."""
    source = make_payload(tmp_path / "source", {name: size})
    data = (source / name).read_bytes()
    target = tmp_path / "downloads" / save_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:size // 2])
    return make_torrent(source / name, tracker=tracker), data


def file_indexes(torrent):
    """{path: index} of a .torrent's files (libtorrent orders them its own way)."""
    layout = lt.load_torrent_buffer(torrent).ti.layout()
    return {layout.file_path(index): index for index in range(layout.num_files())}


async def added_and_checked(client, torrent, **fields):
    """Add a .torrent; its infohash once the check of the data in place is over."""
    _, body = await add(client, torrent_file=torrent, **fields)
    await wait_status(client, body["infohash"], lambda s: not s["state"].startswith(
        "checking") and s["has_metadata"], what="the check")
    return body["infohash"]


async def test_ranges_headers_and_errors_of_a_file_that_is_there(daemon, tmp_path):
    torrent, top = in_place(tmp_path, {"Films/\u00c9t\u00e9 2024.mp4": 300_000,
                                       "Films/notes.txt": 1000})
    infohash = await added_and_checked(daemon, torrent)
    url, data = file_url(infohash, file_indexes(torrent)["Films/\u00c9t\u00e9 2024.mp4"]), (
        top / "\u00c9t\u00e9 2024.mp4").read_bytes()
    async with daemon.get(url) as response:
        assert response.status == 200 and await response.read() == data
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.headers["Content-Type"] == "video/mp4"
        assert response.headers["Content-Disposition"] == (
            "inline; filename=\"_t_ 2024.mp4\"; filename*=UTF-8''%C3%89t%C3%A9%202024.mp4")
        assert response.headers["Content-Security-Policy"] == "sandbox allow-same-origin"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        etag = response.headers["ETag"]
    assert infohash in etag
    for asked, first, last in (("0-99", 0, 99), ("299000-", 299000, 299999), ("-500", 299500,
                               299999), ("10-20, 30-40", 10, 20), ("1000-99999999", 1000,
                               299999), ("0-" + "9" * 4400, 0, 299999)):
        async with daemon.get(url, headers={"Range": f"bytes={asked}"}) as response:
            assert response.status == 206, asked
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/300000"
            assert await response.read() == data[first:last + 1]
    # Numbers of thousands of digits were a 500; other scripts' digits were read as numbers.
    for asked in ("bytes=300000-", "bytes=5-3", "bytes=-0", "items=0-1", "bytes=-",
                  "bytes=" + "1" * 5000 + "-", "bytes=\u0661-\u0665"):
        response = await daemon.get(url, headers={"Range": asked})
        await error_of(response, 416, "no byte")
        assert response.headers["Content-Range"] == "bytes */300000"
    await conforms(await daemon.get(url, headers={"Range": "bytes=400000-"}), "get",
                   "/torrents/{infohash}/files/{index}")
    async with daemon.head(url, headers={"Range": "bytes=0-9"}) as response:
        assert response.status == 206 and response.headers["Content-Length"] == "10"
        assert await response.read() == b""
    for unchanged in (etag, "*"):
        assert (await daemon.get(url, headers={"If-None-Match": unchanged})).status == 304
    async with daemon.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}) as response:
        assert response.status == 200 and await response.read() == data  # changed: all of it
    for index in ("2", "99", "x", "-1"):
        await error_of(await daemon.get(file_url(infohash, index)), 404, "no file")
    await conforms(await daemon.get(file_url(infohash, 7)), "get",
                   "/torrents/{infohash}/files/{index}")
    assert (await status_of(daemon, infohash))["streams"] == []


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
async def test_a_page_in_a_torrent_runs_no_script_with_the_apis_address(daemon, tmp_path):
    """An HTML file streamed from a torrent and opened in a browser was a page of the API's
    own origin: its script changed the settings (and could delete every torrent). It is
    sandboxed now: no script runs, in real Chromium; and a video still plays."""
    folder = tmp_path / "downloads" / "site"
    folder.mkdir(parents=True)
    (folder / "page.html").write_text(
        "<title>page</title><script>document.title = 'ran'; fetch('/settings', {method: "
        "'PATCH', headers: {'Content-Type': 'application/json'}, body: "
        "'{\"upload_limit\": 12345}'})</script>")
    if not FFMPEG_MISSING:  # a sandbox without its origin stopped the video of a movie
        await run_tool("ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=duration=2:"
                       "size=160x90:rate=25", "-pix_fmt", "yuv420p", str(folder / "clip.mp4"))
    torrent = make_torrent(folder)
    infohash, indexes = await added_and_checked(daemon, torrent), file_indexes(torrent)
    browser = Chromium(tmp_path / "chromium")
    try:
        await browser.start()
        await browser.call("Page.navigate", url=str(daemon.make_url(
            file_url(infohash, indexes["site/page.html"]))))
        await wait_until(lambda: browser.evaluate("document.readyState === 'complete' && "
                                                  "document.title !== ''"),
                         what="the page to load")
        assert await browser.evaluate("document.title") == "page"
        if not FFMPEG_MISSING:
            await browser.call("Page.navigate", url=str(daemon.make_url(
                file_url(infohash, indexes["site/clip.mp4"]))))
            await wait_until(lambda: browser.evaluate(
                "(document.querySelector('video') || {}).readyState >= 2"),
                what="the video to play")
    finally:
        await browser.close()
    assert (await (await daemon.get("/settings")).json())["upload_limit"] == 0


async def test_a_stream_starts_a_queued_torrent_past_the_queue(daemon, seeders, tmp_path):
    """A stream of a torrent libtorrent's queue held waited, unanswered, until the queue
    let it run, maybe hours later. It starts the torrent now, as a player needs."""
    source = make_payload(tmp_path / "source", {"queued.bin": 2 * MIB})
    torrent = make_torrent(source / "queued.bin")
    seeder = seeders(rate_limit=100_000).seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_status(daemon, infohash, lambda s: s["has_metadata"], what="metadata")
    assert (await daemon.patch("/settings", json={"max_active_downloads": 0})).status == 200
    await wait_status(daemon, infohash, lambda s: s["queued"], what="the queue to hold it")
    # Bounded: before, no answer came at all.
    async with await asyncio.wait_for(daemon.get(file_url(infohash)), DEADLINE) as response:
        assert response.status == 200
        assert response.headers["X-Queue"] == "started now, past the queue"
        unlimit(seeder)
        assert await asyncio.wait_for(response.read(), DEADLINE) == (
            source / "queued.bin").read_bytes()
    status = await status_of(daemon, infohash)
    assert not status["queued"] and not status["auto_managed"], status


async def test_a_waiting_reader_shows_in_the_status_and_a_hang_up_leaves_nothing(daemon,
                                                                              tmp_path):
    torrent, data = half_there(tmp_path, "half.bin", 2 * MIB)
    infohash = await added_and_checked(daemon, torrent)
    engine, tasks = daemon.app[torrentflow.ENGINE], len(asyncio.all_tasks())
    response = await daemon.get(file_url(infohash))
    assert response.status == 200 and await response.content.readexactly(MIB) == data[:MIB]
    await wait_status(daemon, infohash, lambda s: s["streams"] == [
        {"file": 0, "position": MIB}], what="the reader, waiting at the first missing byte")
    response.close()  # the player goes away
    await wait_status(daemon, infohash, lambda s: s["streams"] == [], what="the reader gone")
    # Nothing waits on libtorrent for it any more, and no task of it is left.
    await wait_until(lambda: not engine._waiters and len(asyncio.all_tasks()) <= tasks,
                     what="no waits and no tasks left")


async def test_a_read_waits_through_a_pause_and_a_recheck_and_ends_with_every_byte(
        daemon, tracker, seeders, tmp_path):
    """The reader has the first half and waits; the torrent is paused (a request that comes
    now is refused), resumed and rechecked; once a seeder comes the read ends, right."""
    torrent, data = half_there(tmp_path, "wait.bin", 2 * MIB, tracker.url("/announce"))
    infohash = await added_and_checked(daemon, torrent)
    url = file_url(infohash)
    async with daemon.get(url) as response:
        assert await response.content.readexactly(MIB) == data[:MIB]
        assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
        await error_of(await daemon.get(url), 409, "paused")
        await error_of(await daemon.get(url, headers={"Range": "bytes=0-9"}), 409, "paused")
        assert (await daemon.put(f"/torrents/{infohash}/resume")).status == 200
        assert (await daemon.put(f"/torrents/{infohash}/recheck")).status == 200
        assert (await status_of(daemon, infohash))["streams"] == [{"file": 0, "position": MIB}]
        source = tmp_path / "source"
        tracker.seeder = seeders().seed(make_torrent(source / "wait.bin"), source)
        assert (await daemon.put(f"/torrents/{infohash}/reannounce")).status == 200
        assert await response.content.read() == data[MIB:]
    assert (await status_of(daemon, infohash))["progress"] == 100
    assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200
    assert await read_range(daemon, url, "-10") == data[-10:]  # paused, but all there


async def test_a_removal_or_an_error_ends_the_read_and_closes_the_connection(daemon, tmp_path):
    """Each reader has the first half and waits: the torrent is removed, or stopped with an
    error (a symlink swapped in); its stream ends cut short, and a new request fails."""
    for name, save_path, status, words in (("gone.bin", "", 404, "no torrent"),
                                           ("broken.bin", "broken", 409, "outside")):
        torrent, data = half_there(tmp_path, name, 2 * MIB, save_path=save_path)
        infohash = await added_and_checked(daemon, torrent, save_path=save_path)
        async with daemon.get(file_url(infohash)) as response:
            assert await response.content.readexactly(MIB) == data[:MIB]
            if not save_path:
                assert (await daemon.delete(f"/torrents/{infohash}")).status == 200
            else:
                broken = tmp_path / "downloads" / save_path
                broken.rename(tmp_path / "elsewhere")
                broken.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.read()
        await error_of(await daemon.get(file_url(infohash)), status, words)


async def test_past_max_streams_the_answer_is_503_and_a_place_frees_when_one_ends(
        tmp_path, aiohttp_client):
    daemon = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path,
                                                                     "--max-streams", "1")))
    torrent, data = half_there(tmp_path, "one.bin", 2 * MIB)
    infohash = await added_and_checked(daemon, torrent)
    async with daemon.get(file_url(infohash)) as waiting:
        assert await waiting.content.readexactly(MIB) == data[:MIB]
        refused = await daemon.get(file_url(infohash), headers={"Range": "bytes=0-9"})
        await error_of(refused, 503, "streams")
        assert refused.headers["Retry-After"]
        assert (await daemon.head(file_url(infohash))).status == 200  # HEAD reads nothing
    await wait_status(daemon, infohash, lambda s: s["streams"] == [], what="the place freed")
    assert await read_range(daemon, file_url(infohash), "0-9") == data[:10]


async def test_a_magnet_without_metadata_is_409_and_a_file_at_priority_0_starts(
        daemon, tracker, seeders, tmp_path):
    nobody = await add(daemon, torrent_url="magnet:?xt=urn:btih:" + "cd" * 20)
    response = await daemon.get(file_url(nobody[1]["infohash"]))
    await error_of(response, 409, "metadata not yet known")
    assert response.headers["Retry-After"]
    source = make_payload(tmp_path / "source", {"pair/skipped.mkv": 200_000,
                                                "pair/wanted.txt": 1000})
    torrent = make_torrent(source / "pair", tracker=tracker.url("/announce"))
    tracker.seeder = seeders().seed(torrent, source)
    skipped = file_indexes(torrent)["pair/skipped.mkv"]
    _, body = await add(daemon, torrent_file=torrent, file_priorities=",".join(
        "0" if index == skipped else "4" for index in range(2)))
    infohash = body["infohash"]
    await wait_status(daemon, infohash, lambda s: s["is_finished"], what="the wanted file")
    async with daemon.get(file_url(infohash, skipped)) as response:
        assert response.status == 200 and "raised" in response.headers["X-File-Priority"]
        assert await response.read() == (source / "pair" / "skipped.mkv").read_bytes()
        assert response.headers["Content-Type"] == "video/x-matroska"
    assert [f["priority"] for f in (await status_of(daemon, infohash))["files"]] == [4, 4]


async def test_a_file_swapped_for_a_symlink_is_never_served(daemon, tmp_path):
    torrent, top = in_place(tmp_path, {"two/a.bin": 100_000, "two/b.bin": 100_000})
    infohash = await added_and_checked(daemon, torrent)
    url = file_url(infohash, file_indexes(torrent)["two/a.bin"])
    (top / "a.bin").unlink()
    (top / "a.bin").symlink_to(top / "b.bin")  # inside the roots, but not the torrent's a.bin
    await error_of(await daemon.get(url), 409, "not in its place")
    (tmp_path / "secret").write_bytes(b"s" * 100_000)
    (top / "a.bin").unlink()
    (top / "a.bin").symlink_to(tmp_path / "secret")  # outside the roots
    response = await daemon.get(url)
    assert b"sss" not in await response.read()
    await error_of(response, 409)
    assert (await status_of(daemon, infohash))["streams"] == []


async def test_a_stream_needs_the_token_as_every_route(streaming, tmp_path):
    torrent, top = in_place(tmp_path, {"t/clip.mp4": 50_000, "t/x": 1})
    infohash = await added_and_checked(streaming, torrent)
    path = file_url(infohash, file_indexes(torrent)["t/clip.mp4"])
    async with aiohttp.ClientSession() as stranger:
        for headers in ({}, {"Authorization": "Bearer wrong-token-123456"}):
            async with stranger.get(streaming.make_url(path), headers=headers) as response:
                await error_of(response, 401)
    assert await read_range(streaming, path) == (top / "clip.mp4").read_bytes()


@pytest.mark.skipif(FFMPEG_MISSING, reason="needs ffmpeg and ffprobe (Debian's ffmpeg)")
async def test_a_player_may_carry_the_token_in_the_url(streaming, tmp_path):
    movie = tmp_path / "downloads" / "short.mp4"
    movie.parent.mkdir(exist_ok=True)
    await run_tool("ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                   "testsrc=duration=2:size=160x120:rate=10", str(movie))
    infohash = await added_and_checked(streaming, make_torrent(movie))
    url = str(streaming.make_url(file_url(infohash))).replace("//", f"//anyone:{TOKEN}@", 1)
    duration = await run_tool("ffprobe", "-v", "error", "-show_entries", "format=duration",
                              "-of", "csv=p=0", url)
    assert abs(float(duration) - 2) < 0.5


@pytest.mark.parametrize("version", [0, lt.create_torrent.v2_only], ids=["hybrid", "v2"])
async def test_files_of_hybrid_and_v2_torrents_stream_past_their_padding(daemon, tmp_path,
                                                                        version):
    layout = {"mixed/a.bin": 100_000, "mixed/b.bin": 50_000, "mixed/c.bin": 70_000}
    root = make_payload(tmp_path / "downloads", layout)
    torrent = make_torrent(root / "mixed", version=version)
    infohash = await added_and_checked(daemon, torrent)
    for path, index in file_indexes(torrent).items():
        if path in layout:  # not a padding file
            data = (root / path).read_bytes()
            assert await read_range(daemon, file_url(infohash, index)) == data
            assert await read_range(daemon, file_url(infohash, index), "16000-40000") == \
                data[16000:40001]


def test_notes_nested_past_the_parser_s_depth_read_as_none():
    """A resume file's notes come from the disk: JSON nested deeper than the parser goes
    must not stop the load (it raised RecursionError), only lose the notes."""
    deep = b"[" * 100_000 + b"]" * 100_000
    key = torrentflow.NOTES_KEY
    assert torrentflow._notes_of(b"d%d:%s%d:%se" % (len(key), key, len(deep), deep)) == {}
    assert torrentflow._notes_of(torrentflow._with_notes(b"de", {"a": 1})) == {"a": 1}


async def test_the_state_store_skips_a_file_too_large_to_read_whole(tmp_path, caplog):
    """A queue file over MAX_STATE_FILE (corrupt, or planted) is moved to quarantine/
    with a warning, never read whole into memory; the files beside it are read."""
    store = torrentflow.StateStore(tmp_path)
    try:
        folder = tmp_path / "webhooks" / "target"
        folder.mkdir(parents=True)
        (folder / "1.json").write_bytes(b'{"type": "added"}')
        with open(folder / "2.json", "wb") as huge:  # sparse: no disk space taken
            huge.truncate(torrentflow.MAX_STATE_FILE + 1)
        assert await store.read_folder("webhooks/target") == {"1.json": b'{"type": "added"}'}
        assert any("2.json: more than" in r.getMessage() for r in caplog.records)
        assert not (folder / "2.json").exists()
        assert [p.name.split(".")[:2] for p in (tmp_path / "quarantine").iterdir()] == [
            ["2", "json"]]
    finally:
        store.close()


async def test_a_failed_directory_fsync_fails_only_the_jobs_that_changed_it(tmp_path):
    """In one batch of the state thread, a directory whose fsync fails (here, removed
    before the batch's fsyncs) fails the write into it, not the others."""
    store = torrentflow.StateStore(tmp_path)
    try:
        started, release = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def hold():  # keeps the thread busy until the next jobs are queued, as one batch
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        held = store._submit(hold)
        await started.wait()
        lost = store.put("gone/a", b"a")
        removed = store._submit(shutil.rmtree, tmp_path / "gone")
        kept = store.put("kept/b", b"b")
        release.set()
        await held
        results = await asyncio.gather(lost, removed, kept, return_exceptions=True)
        assert isinstance(results[0], OSError) and results[1:] == [None, None]
        assert (tmp_path / "kept" / "b").read_bytes() == b"b"
    finally:
        store.close()


def test_a_bad_webhook_url_is_reported_without_its_password(capsys):
    """A webhook URL refused at start is named in the error with its user info as ***,
    by the flag and by the environment alike."""
    url = "http://user:SECRET@127.0.0.1:9/x\r\ny"
    for argv, environ in ((["--webhook", url], {}), ([], {"TORRENTFLOW_WEBHOOKS": url}),
                          (["--webhook", "user:SECRET@host\n"], {}),
                          (["--webhook", "http://u:SECRET\uff03x@127.0.0.1/"], {})):
        with pytest.raises(SystemExit) as stopped:
            torrentflow.parse_config(["--local-only", *argv], environ=environ)
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert "--webhook / TORRENTFLOW_WEBHOOKS" in error and "***@" in error
        assert "SECRET" not in error


async def test_every_ref_in_the_spec_resolves(daemon):
    """Each $ref of /openapi.json names a node of the same document."""
    spec = await (await daemon.get("/openapi.json")).json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)
    dangling = []
    for ref in set(refs(spec)):
        node = spec if ref.startswith("#/") else None  # only refs within the document
        for key in ref.removeprefix("#/").split("/"):
            key = key.replace("~1", "/").replace("~0", "~")  # JSON Pointer escapes
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            dangling.append(ref)
    assert not dangling, f"$refs that name nothing in the document: {sorted(dangling)}"


async def test_a_delete_during_the_first_save_does_not_come_back(daemon, tmp_path,
                                                                 aiohttp_client):
    """A download starts before its first save; a DELETE that lands while that save is
    writing waits for it, then deletes the file. The fake: the resume file's write is
    made slow (0.3 s), as a loaded disk's fsync can be; loopback cannot make one on cue."""
    engine = daemon.app[torrentflow.ENGINE]
    loop, writing, write = asyncio.get_running_loop(), asyncio.Event(), engine.store._atomic

    def slow_write(path, data, backup=False):
        if path.suffix == ".resume":
            loop.call_soon_threadsafe(writing.set)
            time.sleep(0.3)
        return write(path, data, backup)
    engine.store._atomic = slow_write
    infohash = "cd" * 20
    adding = asyncio.ensure_future(add(daemon, expect=(201, 404),
                                       torrent_url=f"magnet:?xt=urn:btih:{infohash}"))
    await writing.wait()
    response = await daemon.delete(f"/torrents/{infohash}")
    assert response.status == 200, await response.text()
    await adding
    assert not list((tmp_path / "state" / "resume").iterdir())
    await daemon.close()
    again = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))
    await wait_until(lambda: engine_loaded(again), what="the saved torrents to load")
    assert (await (await again.get("/torrents")).json())["total"] == 0


async def test_an_add_during_the_start_up_load_finds_the_saved_copy(tmp_path, aiohttp_client):
    """A saved torrent added again while the start-up load had not reached it was added
    twice (201, two entries); a DELETE of it answered 200 and it came back at the next
    start; a GET of it answered 404. Now the add waits for the load, and a GET says 503."""
    resume, downloads = tmp_path / "state" / "resume", tmp_path / "downloads"
    resume.mkdir(parents=True)
    for number in range(1, 1501):  # saved magnets (not 0: no hash), for a long load
        params = lt.parse_magnet_uri(f"magnet:?xt=urn:btih:{number:040x}")
        params.save_path = str(downloads)
        (resume / f"{number:040x}.resume").write_bytes(lt.write_resume_data_buf(params))
    source = make_payload(tmp_path / "source", {"again.bin": 40_000})
    torrent = make_torrent(source / "again.bin")
    params = lt.load_torrent_buffer(torrent)
    params.save_path, params.added_time = str(downloads), int(time.time()) + 10  # loaded last
    infohash = infohash_of(torrent)
    (resume / f"{infohash}.resume").write_bytes(lt.write_resume_data_buf(params))
    client = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))
    early = await client.get(f"/torrents/{infohash}")
    assert early.status in (200, 503), await early.text()
    # The RPC's torrent-remove answered success and removed nothing.
    _, removal = await rpc(client, "torrent-remove", {"ids": [infohash]})
    assert removal["result"] in ("success", "the saved torrents are still being loaded; "
                                 "try again"), removal
    if removal["result"] == "success":  # the load was over (not seen here so far)
        await wait_until(lambda: engine_loaded(client), what="the saved torrents to load")
        assert (await client.get(f"/torrents/{infohash}")).status == 404
        return
    _, body = await add(client, expect=(200,), torrent_file=torrent)
    assert body["infohash"] == infohash
    _, refused = await add(client, expect=(409,), torrent_file=torrent, save_path="other")
    assert "already there" in refused["detail"]
    await wait_until(lambda: engine_loaded(client), what="the saved torrents to load")
    listing = await (await client.get("/torrents?fields=infohash")).json()
    assert [t["infohash"] for t in listing["torrents"]].count(infohash) == 1
    assert listing["total"] == 1501
    assert (await client.delete(f"/torrents/{infohash}")).status == 200
    await client.close()
    again = await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))
    await wait_until(lambda: engine_loaded(again), what="the saved torrents to load")
    assert (await again.get(f"/torrents/{infohash}")).status == 404
    assert (await (await again.get("/torrents")).json())["total"] == 1500


def engine_loaded(client):
    return not client.app[torrentflow.ENGINE].loading


async def test_a_refused_magnet_cannot_be_resumed_into_downloading(daemon, seeder, tmp_path):
    """Its metadata failed the checks: resuming it is refused, and still nothing is written."""
    data, _ = _hostile_swarm_torrent(tmp_path / "seed")
    seeder.seed(data, tmp_path / "seed")
    _, body = await add(daemon, torrent_url=seeder.magnet(data), save_path="held")
    await wait_status(daemon, body["infohash"], lambda s: s["error"] and s["paused"],
                      what="the metadata to be refused")
    response = await daemon.put(f"/torrents/{body['infohash']}/resume")
    assert response.status == 409 and "refused" in (await response.json())["detail"]
    assert (await daemon.put("/torrents/resume")).status == 200  # the bulk one skips it
    status = await status_of(daemon, body["infohash"])
    assert status["paused"] and not (tmp_path / "downloads" / "held").exists()
    engine = daemon.app[torrentflow.ENGINE]
    # libtorrent's own retry would free a magnet held in upload mode after this long.
    assert engine._session.get_settings()["optimistic_disk_retry"] >= 10 ** 8
