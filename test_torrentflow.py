"""Tests for torrentflow.py: real libtorrent swarms on loopback, no mocks.

Every download test starts a seeding libtorrent session on 127.0.0.1 (TCP only,
discovery off), drives the daemon through its HTTP API, and compares the bytes on
disk with the source. Waits poll a condition under a deadline; nothing sleeps blindly.
"""

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import libtorrent as lt
import pytest
from aiohttp import web

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
    from aiohttp import FormData
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


async def status_of(client, infohash):
    response = await client.get(f"/torrents/{infohash}")
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_complete(client, infohash, deadline=DEADLINE):
    async def done():
        status = await status_of(client, infohash)
        files_done = status["files"] and all(
            f["downloaded"] == f["size"] for f in status["files"])
        return status if status["progress"] == 100 and status["is_seeding"] and files_done \
            else None
    return await wait_until(done, deadline, what=f"{infohash} to complete")


@pytest.fixture
def payload(tmp_path):
    layout = {"single.bin": 3 * 1024 * 1024 + 123}
    return make_payload(tmp_path / "source", layout), layout


@pytest.fixture
async def daemon(tmp_path, aiohttp_client):
    return await aiohttp_client(torrentflow.make_app(daemon_config(tmp_path)))


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
    status = await wait_complete(daemon, infohash)
    assert same_tree(source, tmp_path / "downloads", layout)
    assert swarm.announces >= 1
    assert status["files"] == [{"index": 0, "path": "single.bin", "size": layout["single.bin"],
                                "downloaded": layout["single.bin"], "progress": 100.0,
                                "priority": 4}]
