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


# --------------------------------------------------------------------------- #
# Pause, resume, delete
# --------------------------------------------------------------------------- #

async def test_pause_stops_transfer_and_resume_completes(daemon, tmp_path):
    layout = {"slow.bin": 2 * 1024 * 1024}
    source = make_payload(tmp_path / "source", layout)
    torrent = make_torrent(source / "slow.bin")
    seeder = Seeder(rate_limit=400_000).seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_until(lambda: _progress_above(daemon, infohash, 5), what="some progress")

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
    held_upload, held_done = seeder.total_upload(), (await status_of(daemon, infohash))
    await asyncio.sleep(2)  # an observation window, not synchronisation
    assert seeder.total_upload() == held_upload
    status = await status_of(daemon, infohash)
    assert status["total_done"] == held_done["total_done"] and status["progress"] < 100
    # Pausing twice is fine.
    assert (await daemon.put(f"/torrents/{infohash}/pause")).status == 200

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


async def _progress_above(client, infohash, percent):
    return (await status_of(client, infohash))["progress"] > percent


@pytest.mark.parametrize("delete_files", [False, True])
async def test_delete_removes_the_torrent_and_optionally_its_files(
        daemon, seeder, payload, tmp_path, delete_files):
    source, layout = payload
    torrent = make_torrent(source / "single.bin")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_complete(daemon, infohash)
    query = "?delete_files=true" if delete_files else ""
    response = await daemon.delete(f"/torrents/{infohash.upper()}{query}")
    assert response.status == 200, await response.text()
    assert infohash in (await response.json())["detail"]
    # Confirmed removal: gone from the API at once, files gone or kept as asked.
    assert (await daemon.get(f"/torrents/{infohash}")).status == 404
    assert (await (await daemon.get("/torrents")).json()) == {"torrents": [], "total": 0}
    assert (tmp_path / "downloads" / "single.bin").exists() is not delete_files
    assert not list((tmp_path / "state" / "resume").iterdir())
    assert (await daemon.delete(f"/torrents/{infohash}")).status == 404


# --------------------------------------------------------------------------- #
# Status fields and their types
# --------------------------------------------------------------------------- #

#: Every status field with its JSON type; README.md documents the same table.
NULLABLE = type(None)
FIELD_TYPES = {
    "infohash": str, "info_hash_v1": (str, NULLABLE), "info_hash_v2": (str, NULLABLE),
    "state": str, "paused": bool, "auto_managed": bool, "queued": bool,
    "sequential_download": bool, "seed_mode": bool, "upload_mode": bool, "share_mode": bool,
    "super_seeding": bool, "is_seeding": bool, "is_finished": bool, "has_metadata": bool,
    "has_incoming": bool, "progress": float, "error": str,
    "download_rate": int, "upload_rate": int, "total_download": int, "total_upload": int,
    "all_time_download": int, "all_time_upload": int, "num_peers": int, "list_peers": int,
    "list_seeds": int, "connect_candidates": int, "num_pieces": int,
    "total_pieces": (int, NULLABLE), "total_done": int, "total_wanted_done": int,
    "total_wanted": int, "distributed_copies": float, "num_seeds": int, "num_complete": int,
    "num_incomplete": int, "last_seen_complete": (int, NULLABLE),
    "time_since_upload": (int, NULLABLE), "time_since_download": (int, NULLABLE),
    "active_time": int, "finished_time": int, "seeding_time": int, "seed_rank": int,
    "last_scrape": (int, NULLABLE), "priority": int, "queue_position": int,
    "added_time": int, "completed_time": (int, NULLABLE), "storage_mode": str,
    "save_path": str, "name": str, "total_size": (int, NULLABLE), "num_files": (int, NULLABLE),
    "creation_date": (int, NULLABLE), "creator": (str, NULLABLE), "comment": (str, NULLABLE),
    "piece_length": (int, NULLABLE), "files": (list, NULLABLE),
}
FILE_TYPES = {"index": int, "path": str, "size": int, "downloaded": int, "progress": float,
              "priority": int}
METADATA_FIELDS = ("total_pieces", "total_size", "num_files", "creation_date", "creator",
                   "comment", "piece_length", "files")


def assert_types(document, types):
    assert set(document) == set(types), set(document) ^ set(types)
    for name, expected in types.items():
        value = document[name]
        allowed = expected if isinstance(expected, tuple) else (expected,)
        # JSON has no int/float split for whole floats, and bool is an int in Python.
        ok = any(type(value) is kind or (kind is float and type(value) is int)
                 for kind in allowed)
        assert ok, f"{name}={value!r} is not {expected}"


async def test_every_field_has_its_type_for_a_complete_torrent(daemon, swarm, payload):
    source, layout = payload
    torrent = make_torrent(source / "single.bin", comment="test payload",
                           tracker=swarm.url("/announce"))
    swarm.seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_file=torrent)
    status = await wait_complete(daemon, body["infohash"])
    assert_types(status, FIELD_TYPES)
    for entry in status["files"]:
        assert_types(entry, FILE_TYPES)
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
    assert_types(status, FIELD_TYPES)
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
    assert status["num_files"] == 2  # pad files are not files
    assert sorted(f["path"] for f in status["files"]) == sorted(layout)
    assert status["info_hash_v2"] == str(hashes.v2)
    v2_status = await status_of(daemon, str(hashes.v2).upper())
    assert v2_status["infohash"] == body["infohash"]
    if version == "hybrid":
        assert status["info_hash_v1"] == str(hashes.v1)
        # Adding it again by its other hash is the same torrent.
        again = await daemon.post("/torrents", data={
            "torrent_url": f"magnet:?xt=urn:btmh:1220{hashes.v2}"})
        assert again.status == 200 and (await again.json())["infohash"] == body["infohash"]


# --------------------------------------------------------------------------- #
# Bad input: a clear 4xx, and nothing broken
# --------------------------------------------------------------------------- #

async def assert_error(response, status, words):
    body = await response.json()
    assert response.status == status, (response.status, body)
    assert set(body) == {"detail"} and words.lower() in body["detail"].lower(), body
    assert response.content_type == "application/json"


async def test_save_path_escapes_are_refused(daemon, payload, tmp_path):
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "downloads").mkdir(exist_ok=True)
    (tmp_path / "downloads" / "link").symlink_to(outside)
    for save_path in ("../outside", "a/../../outside", str(outside), "/etc", "link",
                      "link/deeper"):
        response, _ = await add(daemon, expect=(400,), torrent_file=torrent,
                                save_path=save_path)
        await assert_error(response, 400, "inside the download directory")
    assert not any(outside.iterdir()) and not (tmp_path / "downloads" / "link").resolve() \
        .joinpath("deeper").exists()
    assert (await (await daemon.get("/torrents")).json()) == {"torrents": [], "total": 0}
    # Inside is fine, absolute or relative, and missing directories are created.
    inside = tmp_path / "downloads" / "x" / "y"
    response, body = await add(daemon, torrent_file=torrent, save_path=str(inside))
    assert (await status_of(daemon, body["infohash"]))["save_path"] == str(inside.resolve())


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
        (dict(data=b"torrent", headers={"Content-Type": "text/plain"}), 415, "multipart"),
        (dict(json={"torrent_url": swarm.url("/missing")}), 502, "http 404"),
        (dict(json={"torrent_url": swarm.url("/hop/9/x")}), 502, "redirects"),
        (dict(json={"torrent_url": swarm.url("/huge")}), 413, "more than"),
        (dict(json={"torrent_url": "http://127.0.0.1:9/x.torrent"}), 502, "failed"),
    ]
    for request, status, words in cases:
        await assert_error(await daemon.post("/torrents", **request), status, words)
    for garbage in (b"", b"garbage", b"d4:infod6:lengthi-5eee", torrent[:-10]):
        if garbage:
            response, _ = await add(daemon, expect=(422,), torrent_file=garbage)
            await assert_error(response, 422, "not a valid torrent")
    response, _ = await add(daemon, expect=(400,), torrent_file=torrent,
                            torrent_url="magnet:?xt=urn:btih:" + "a" * 40)
    await assert_error(response, 400, "exactly one")
    response, _ = await add(daemon, expect=(413,),
                            torrent_file=b"x" * (torrentflow.MAX_REQUEST_BYTES + 1))
    await assert_error(response, 413, "too large")
    # None of that left a torrent behind or broke the daemon.
    assert (await (await daemon.get("/torrents")).json()) == {"torrents": [], "total": 0}
    await add(daemon, torrent_file=torrent)


async def test_a_url_that_never_answers_times_out(tmp_path, aiohttp_client, swarm):
    client = await aiohttp_client(torrentflow.make_app(
        daemon_config(tmp_path, "--fetch-timeout", "1")))
    response = await client.post("/torrents", json={"torrent_url": swarm.url("/silent")})
    await assert_error(response, 502, "timed out")


async def test_routes_methods_and_query_errors_share_the_error_shape(daemon, payload):
    await assert_error(await daemon.get("/nope"), 404, "not found")
    response = await daemon.post("/torrents/" + "a" * 40)
    await assert_error(response, 405, "not allowed")
    assert "GET" in response.headers["Allow"]
    await assert_error(await daemon.get("/torrents/" + "a" * 40 + "/pause"), 405, "not allowed")
    source, _ = payload
    _, body = await add(daemon, torrent_file=make_torrent(source / "single.bin"))
    response = await daemon.delete(f"/torrents/{body['infohash']}?delete_files=maybe")
    await assert_error(response, 400, "delete_files")
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
    removing = asyncio.ensure_future(engine.remove(engine.lookup(infohash), False))
    await asyncio.sleep(0)  # let the removal post its request to libtorrent
    assert engine.lookup(infohash).removal is not None
    params = torrentflow.params_from_torrent(torrent)
    params.save_path = str(tmp_path / "downloads")
    assert await engine.add(params) == (infohash, True)
    assert removing.done()
    assert (await status_of(daemon, infohash))["infohash"] == infohash
    assert (tmp_path / "state" / "resume" / f"{infohash}.resume").exists()


async def test_lifecycle_events_are_logged_with_name_and_infohash(daemon, seeder, payload,
                                                                  caplog):
    caplog.set_level("INFO", logger="torrentflow")
    source, _ = payload
    torrent = make_torrent(source / "single.bin")
    seeder.seed(torrent, source)
    _, body = await add(daemon, torrent_url=seeder.magnet(torrent))
    infohash = body["infohash"]
    await wait_complete(daemon, infohash)
    await daemon.put(f"/torrents/{infohash}/pause")
    await daemon.put(f"/torrents/{infohash}/resume")
    await daemon.delete(f"/torrents/{infohash}")
    lines = [r.getMessage() for r in caplog.records if r.name == "torrentflow"]
    for event in ("added", "metadata received for single.bin", "finished single.bin",
                  "paused single.bin", "resumed single.bin", "removed single.bin"):
        await wait_until(lambda: any(line.startswith(event) and infohash in line
                                     for line in [r.getMessage() for r in caplog.records]),
                         deadline=10, what=f"a log line {event!r}")
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
    filtered = await listing(f"state={some_state},no_such_state")
    assert filtered["total"] == sum(t["state"] == some_state for t in everything["torrents"])
    assert (await listing("state=no_such_state")) == {"torrents": [], "total": 0}
    for bad in ("sort=colour", "fields=name,colour", "fields=-name", "limit=-1", "limit=x",
                "offset=1.5", "paused=maybe", "colour=red", "fields="):
        await assert_error(await daemon.get(f"/torrents?{bad}"), 400, "")


def test_status_fields_constant_names_every_served_field():
    assert set(torrentflow.STATUS_FIELDS) == set(FIELD_TYPES)
    assert len(torrentflow.STATUS_FIELDS) == len(set(torrentflow.STATUS_FIELDS))
