"""TorrentFlow: a BitTorrent daemon driven by an HTTP JSON API.

One process runs one libtorrent session and serves a small REST API over it:

    POST   /torrents                      add a magnet, an http(s) .torrent URL or an upload
    GET    /torrents                      every torrent's status
    GET    /torrents/{infohash}           one torrent's full status
    PUT    /torrents/{infohash}/pause     stop transferring (the queue will not restart it)
    PUT    /torrents/{infohash}/resume    back to normal operation
    DELETE /torrents/{infohash}           remove it (?delete_files=true also removes the data)
    GET    /health                        liveness for container health checks
    GET    /openapi.json                  this API as an OpenAPI 3.1 document

Run it with ``python torrentflow.py`` (``--help`` lists every option). Each option
can also be set through an environment variable; the command line wins:

    TORRENTFLOW_HOST, TORRENTFLOW_PORT, TORRENTFLOW_DOWNLOAD_DIR, TORRENTFLOW_STATE_DIR,
    TORRENTFLOW_LISTEN_INTERFACES, TORRENTFLOW_DHT, TORRENTFLOW_LSD, TORRENTFLOW_UPNP,
    TORRENTFLOW_NATPMP, TORRENTFLOW_LOCAL_ONLY, TORRENTFLOW_LOG_LEVEL,
    TORRENTFLOW_SAVE_INTERVAL, TORRENTFLOW_SHUTDOWN_TIMEOUT, TORRENTFLOW_FETCH_TIMEOUT,
    TORRENTFLOW_TOKEN, TORRENTFLOW_TOKEN_FILE, TORRENTFLOW_INSECURE_NO_AUTH,
    TORRENTFLOW_ALLOWED_SAVE_ROOTS

With a token set, every request but GET /health and GET /openapi.json must carry
``Authorization: Bearer <token>``. Without one the daemon refuses to listen beyond
loopback, and answers only requests addressed to localhost. Requests a browser sends
on behalf of another site are always refused.

Every torrent is written to the state directory before the API confirms it, and
again whenever it changes, so a crash loses nothing but the last few seconds of
progress. README.md documents every field, error and option.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
import libtorrent as lt
from aiohttp import web

__version__ = "0.1.0"

log = logging.getLogger("torrentflow")


# --------------------------------------------------------------------------- #
# Constants
# --------------------------------------------------------------------------- #

#: Largest .torrent accepted, by upload or by URL. Real ones are kilobytes to a few
#: MB (a 100 GiB torrent with 16 KiB pieces is about 130 MB of hashes, which nobody makes).
MAX_TORRENT_BYTES = 10 * 1024 * 1024
#: Request bodies may carry one .torrent plus form overhead, nothing more.
MAX_REQUEST_BYTES = MAX_TORRENT_BYTES + 64 * 1024
#: JSON and urlencoded bodies hold a URL and a path: a 10 MB one is only there to make
#: the parser build millions of objects.
MAX_FORM_BYTES = 64 * 1024
#: More files than any real torrent has; every status answer lists them all, so a
#: torrent with millions of tiny files would make each GET cost megabytes.
MAX_TORRENT_FILES = 100_000
#: Shorter tokens can be guessed by a client that is free to try as often as it likes.
MIN_TOKEN_LENGTH = 16
#: Requests anyone may make: a health check cannot carry a secret, and the API
#: description holds none.
PUBLIC_ROUTES = {("GET", "/health"), ("HEAD", "/health"),
                 ("GET", "/openapi.json"), ("HEAD", "/openapi.json")}
#: Limits handed to libtorrent's bdecoder, so a crafted file cannot exhaust memory or stack.
TORRENT_LIMITS = {
    "max_buffer_size": MAX_TORRENT_BYTES,
    "max_pieces": 2_000_000,
    "max_decode_depth": 100,
    "max_decode_tokens": 3_000_000,
}
#: Indexers redirect once or twice; more than this is a loop or an attack.
FETCH_MAX_REDIRECTS = 5
#: How often libtorrent is asked for the status of torrents that changed. Events
#: that matter (state changes, finishing) refresh the cache at once besides.
STATUS_INTERVAL = 0.5
#: Startup adds saved torrents in batches this size, so requests are served in between:
#: posting 200 adds takes about a millisecond, well under any request's patience.
LOAD_BATCH = 200
#: In-flight requests get this long to finish when the daemon stops. Every request
#: answers in milliseconds except a torrent_url fetch, which is not worth waiting for.
REQUEST_DRAIN_SECONDS = 1.0
#: Seconds the session waits for trackers to acknowledge "stopped" at shutdown. The
#: session's destructor holds the GIL for that long, so it is short: with the saves,
#: the whole stop must fit in a container's 10 s grace.
STOP_TRACKER_TIMEOUT = 1
#: Longest wait for libtorrent to confirm a request (add, pause, save...). It answers in
#: milliseconds; an alert lost in a full queue must not hang the request for ever.
ALERT_WAIT = 30.0
#: Seconds a finished torrent may keep showing as unfinished while its writes are flushed;
#: flushing takes milliseconds, so this only bounds a flush that never reports back.
FLUSH_WAIT = 10.0
#: libtorrent's error for "resume data not modified since the last save": not a failure.
RESUME_NOT_MODIFIED = 143

#: Alerts the daemon acts on. The *_log categories would flood the queue.
ALERT_MASK = (
    lt.alert_category.error
    | lt.alert_category.status
    | lt.alert_category.storage
    | lt.alert_category.tracker
)
#: Resume data with the info dict, so a magnet's metadata survives, written after the
#: torrent's pending writes reach the disk, so the saved pieces are really there.
SAVE_FULL = lt.save_resume_flags_t.save_info_dict | lt.save_resume_flags_t.flush_disk_cache
#: The same, skipped (error 143) when nothing changed since the last save.
SAVE_IF_MODIFIED = SAVE_FULL | lt.save_resume_flags_t.only_if_modified

#: torrent_status.flags bits exposed as booleans (the bool attributes are deprecated).
FLAG_FIELDS = {
    "paused": lt.torrent_flags.paused,
    "auto_managed": lt.torrent_flags.auto_managed,
    "sequential_download": lt.torrent_flags.sequential_download,
    "seed_mode": lt.torrent_flags.seed_mode,
    "upload_mode": lt.torrent_flags.upload_mode,
    "share_mode": lt.torrent_flags.share_mode,
    "super_seeding": lt.torrent_flags.super_seeding,
}


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the daemon reads from the outside world, read once at start."""

    #: The API answers on loopback unless told otherwise; beyond it, a token is required.
    host: str = "127.0.0.1"
    port: int = 8080
    download_dir: Path = Path("downloads")
    state_dir: Path = Path("state")
    listen_interfaces: str = "0.0.0.0:6881,[::]:6881"
    dht: bool = True
    lsd: bool = False
    upnp: bool = False
    natpmp: bool = False
    local_only: bool = False
    log_level: str = "info"
    #: A crash loses at most this much progress; libtorrent's own example saves as often.
    save_interval: float = 30.0
    #: Saving at SIGTERM must end inside the 10 s that Docker and Kubernetes allow.
    shutdown_timeout: float = 8.0
    #: A torrent_url fetch must finish within this many seconds, connection included,
    #: so a silent server cannot hold a request (and its memory) forever.
    fetch_timeout: float = 30.0
    #: The API bearer token, or None. Kept out of repr() so no log line can show it.
    token: str | None = dataclasses.field(default=None, repr=False)
    insecure_no_auth: bool = False
    #: Directories besides download_dir that an absolute save_path may point into.
    allowed_save_roots: tuple[Path, ...] = ()


def _env_bool(parser, environ, name):
    """Read a 1/0 style environment variable, or None when it is unset."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    parser.error(f"{name} must be 1 or 0, not {raw!r}")


def _port(text):
    """Parse a TCP port, 0 to 65535."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


def _positive_seconds(text):
    """Parse a number of seconds above 0 and under a day."""
    seconds = float(text)
    if not 0 < seconds < 86400:
        raise ValueError(text)
    return seconds


def _interfaces(text):
    """(address, port) of each ADDRESS:PORT entry of a listen_interfaces string."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        address, _, port = item.rpartition(":")
        yield address.strip("[]"), port


def _listen_interfaces(text):
    """Check that every entry is ADDRESS:PORT, the form libtorrent expects."""
    for address, port in _interfaces(text):
        if not address:
            raise ValueError(text)
        _port(port.rstrip("sS"))  # a trailing s asks libtorrent for TLS on that port
    return text


def _is_loopback_interfaces(text):
    """True when every listen interface is a loopback address (not a device name)."""
    try:
        return all(ipaddress.ip_address(address).is_loopback
                   for address, _ in _interfaces(text))
    except ValueError:  # a device name such as eth0
        return False


def _is_loopback_name(host):
    """True for "localhost" and loopback addresses: the only names a browser on another
    machine can never reach, and a DNS-rebinding page can never use."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_token(parser, args):
    """The API token from --token or --token-file (read here, once), or None."""
    if args.token is not None and args.token_file is not None:
        parser.error("give --token or --token-file, not both")
    token = args.token
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"cannot read the token file {args.token_file}: "
                         f"{getattr(error, 'strerror', None) or error}")
        if not token:
            parser.error(f"the token file {args.token_file} is empty")
    if token is None:
        return None
    # The token travels in an HTTP header: visible ASCII only, so no client mangles it.
    if len(token) < MIN_TOKEN_LENGTH or not all("!" <= c <= "~" for c in token):
        parser.error(f"the token must be at least {MIN_TOKEN_LENGTH} visible ASCII characters "
                     "without spaces; `openssl rand -hex 32` makes a good one")
    return token


def parse_config(argv=None, environ=None):
    """Build the Config from argv and the environment; bad values exit with usage."""
    environ = os.environ if environ is None else environ

    def env(name, default):
        return environ.get("TORRENTFLOW_" + name) or default

    parser = argparse.ArgumentParser(
        prog="torrentflow.py",
        description="TorrentFlow: a BitTorrent daemon with an HTTP JSON API.",
        epilog="Every option also reads TORRENTFLOW_<NAME> from the environment "
        "(for example TORRENTFLOW_PORT); the command line wins. See README.md.",
    )
    parser.add_argument("--host", default=env("HOST", Config.host),
                        help="address the API listens on (default %(default)s)")
    parser.add_argument("--port", type=_port, default=env("PORT", str(Config.port)),
                        help="API port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--download-dir", type=Path,
                        default=env("DOWNLOAD_DIR", str(Config.download_dir)),
                        help="where torrents are saved; every save_path must stay inside "
                        "it (default %(default)s)")
    parser.add_argument("--state-dir", type=Path,
                        default=env("STATE_DIR", str(Config.state_dir)),
                        help="where resume data is kept (default %(default)s)")
    parser.add_argument("--listen-interfaces", type=_listen_interfaces,
                        default=env("LISTEN_INTERFACES", None),
                        help="BitTorrent listen addresses, ADDRESS:PORT,... (default "
                        f"{Config.listen_interfaces}; 127.0.0.1:6881 with --local-only)")
    for name, help_text in (
        ("dht", "the distributed hash table, for trackerless torrents and magnets"),
        ("lsd", "local service discovery (multicast on the LAN)"),
        ("upnp", "UPnP port mapping on the router"),
        ("natpmp", "NAT-PMP port mapping on the router"),
    ):
        default = "on" if getattr(Config, name) else "off"
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"{help_text} (default {default}; "
                            f"TORRENTFLOW_{name.upper()}=1|0)")
    parser.add_argument("--local-only", action=argparse.BooleanOptionalAction, default=None,
                        help="keep all BitTorrent traffic on loopback: DHT, LSD, UPnP and "
                        "NAT-PMP off, listen on 127.0.0.1, peers and trackers outside "
                        "127.0.0.0/8 and ::1 blocked (TORRENTFLOW_LOCAL_ONLY=1)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=env("LOG_LEVEL", Config.log_level).lower(),
                        help="log verbosity on stderr (default %(default)s)")
    parser.add_argument("--save-interval", type=_positive_seconds,
                        default=env("SAVE_INTERVAL", str(Config.save_interval)),
                        help="seconds between saves of changed torrents; a crash loses at "
                        "most this much progress (default %(default)s)")
    parser.add_argument("--shutdown-timeout", type=_positive_seconds,
                        default=env("SHUTDOWN_TIMEOUT", str(Config.shutdown_timeout)),
                        help="seconds allowed for saving every torrent on SIGTERM; keep "
                        "it under your container's stop grace (default %(default)s)")
    parser.add_argument("--fetch-timeout", type=_positive_seconds,
                        default=env("FETCH_TIMEOUT", str(Config.fetch_timeout)),
                        help="seconds allowed for downloading a torrent_url, redirects "
                        "included (default %(default)s)")
    parser.add_argument("--token", default=env("TOKEN", None),
                        help="API token: every request but GET /health and /openapi.json "
                        "must send 'Authorization: Bearer TOKEN'. Other users can read "
                        "command lines, so prefer TORRENTFLOW_TOKEN or --token-file")
    parser.add_argument("--token-file", type=Path, default=env("TOKEN_FILE", None),
                        help="read the API token from this file at start, for example "
                        "a Docker secret (/run/secrets/...)")
    parser.add_argument("--insecure-no-auth", action="store_const", const=True, default=None,
                        help="serve the API without a token on a non-loopback --host; only "
                        "when something else guards the port (TORRENTFLOW_INSECURE_NO_AUTH=1)")
    parser.add_argument("--allowed-save-root", type=Path, action="append", default=None,
                        metavar="DIR", help="a directory an absolute save_path may point "
                        "into, besides --download-dir; repeat for more (TORRENTFLOW_ALLOWED_"
                        "SAVE_ROOTS, ':'-separated)")
    args = parser.parse_args(argv)

    def flag(name):
        given = getattr(args, name)
        if given is not None:
            return given
        return _env_bool(parser, environ, f"TORRENTFLOW_{name.upper()}")

    local_only = bool(flag("local_only"))
    switches = {name: flag(name) for name in ("dht", "lsd", "upnp", "natpmp")}
    interfaces = args.listen_interfaces
    if local_only:
        enabled = [name for name, value in switches.items() if value]
        if enabled:
            parser.error(f"--local-only cannot be combined with --{enabled[0]}")
        if interfaces is None:
            interfaces = "127.0.0.1:6881"
        elif not _is_loopback_interfaces(interfaces):
            parser.error("--local-only needs loopback --listen-interfaces, "
                         f"not {interfaces!r}")
        switches = dict.fromkeys(switches, False)
    token = _read_token(parser, args)
    insecure_no_auth = bool(flag("insecure_no_auth"))
    if token is None and not insecure_no_auth and not _is_loopback_name(args.host):
        parser.error(
            f"refusing to serve the API on {args.host or 'every interface'} without a token: "
            "anyone who can reach the port could download anything and write files. Set "
            "TORRENTFLOW_TOKEN (or --token-file / TORRENTFLOW_TOKEN_FILE, e.g. a Docker "
            "secret) to a random string such as the output of `openssl rand -hex 32`, or "
            "pass --insecure-no-auth if something else guards the port")
    save_roots = args.allowed_save_root
    if save_roots is None:
        save_roots = [Path(part) for part in
                      environ.get("TORRENTFLOW_ALLOWED_SAVE_ROOTS", "").split(":") if part]
    relative = [str(root) for root in save_roots if not root.is_absolute()]
    if relative:
        parser.error(f"--allowed-save-root must be absolute, not {relative[0]!r}")
    return Config(
        host=args.host,
        port=args.port,
        download_dir=args.download_dir,
        state_dir=args.state_dir,
        listen_interfaces=interfaces or Config.listen_interfaces,
        local_only=local_only,
        log_level=args.log_level,
        save_interval=args.save_interval,
        shutdown_timeout=args.shutdown_timeout,
        fetch_timeout=args.fetch_timeout,
        token=token,
        insecure_no_auth=insecure_no_auth,
        allowed_save_roots=tuple(save_roots),
        **{name: getattr(Config, name) if value is None else value
           for name, value in switches.items()},
    )


def session_settings(config):
    """The libtorrent settings_pack for this config (the benchmark reuses it)."""
    settings = {
        "listen_interfaces": config.listen_interfaces,
        "enable_dht": config.dht,
        "enable_lsd": config.lsd,
        "enable_upnp": config.upnp,
        "enable_natpmp": config.natpmp,
        "alert_mask": int(ALERT_MASK),
        # Bursts of state changes on thousands of torrents must not push out the
        # alerts that resolve requests; the loop drains the queue continuously.
        "alert_queue_size": 10000,
        "stop_tracker_timeout": STOP_TRACKER_TIMEOUT,
        "user_agent": f"TorrentFlow/{__version__} libtorrent/{lt.__version__}",
        "peer_fingerprint": lt.generate_fingerprint("TF", *map(int, __version__.split(".")), 0),
        # Verifying pieces is the CPU bottleneck of a fast download; use both cores.
        "hashing_threads": 2,
        # A magnet's metadata comes from a stranger: hold it to the upload size cap.
        "max_metadata_size": MAX_TORRENT_BYTES,
    }
    if config.local_only:
        settings["dht_bootstrap_nodes"] = ""
        # uTP over loopback collapses to a few MB/s; every local peer speaks TCP.
        settings["enable_outgoing_utp"] = False
        # Every local peer has the address 127.0.0.1: tell them apart by port.
        settings["allow_multiple_connections_per_ip"] = True
        # A few local peers, all ours: after a pause, dial them again at once instead
        # of the 60 s that spares strangers on the internet.
        settings["min_reconnect_time"] = 1
    return settings


# --------------------------------------------------------------------------- #
# Errors and access control
# --------------------------------------------------------------------------- #

class ApiError(Exception):
    """A failure the client caused or must know about; becomes {"detail": ...}."""

    def __init__(self, status, detail, headers=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _error_response(status, detail, headers=None):
    """The one error shape: {"detail": ...} with its status code."""
    return web.json_response({"detail": detail}, status=status, headers=headers)


@web.middleware
async def error_middleware(request, handler):
    """Give every error, ours or aiohttp's, the one {"detail": ...} shape."""
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(error.status, error.detail, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        # Keep headers that carry meaning (Allow on 405), not the text body's type.
        headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
        return _error_response(error.status, error.reason, headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal server error")


def _host_and_port(netloc):
    """(hostname, port or None) of a Host header or an origin, or None if malformed."""
    if not netloc or any(c in netloc for c in "@/?#\\ "):
        return None
    try:
        parts = urllib.parse.urlsplit("//" + netloc)
        return parts.hostname, parts.port
    except ValueError:
        return None


def _cross_site(request):
    """Why a browser sent this request on behalf of another site, or None if it did not."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "Sec-Fetch-Site is cross-site"
    origin = request.headers.get("Origin")
    if origin is None:
        return None  # not a browser, or a same-origin GET
    try:
        parts = urllib.parse.urlsplit(origin)
        origin_host, origin_port = parts.hostname, parts.port
    except ValueError:
        return f"Origin {origin!r} is malformed"
    # A TLS proxy in front changes the scheme, not the name: compare names and ports,
    # an absent port meaning the origin scheme's default.
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = _host_and_port(request.headers.get("Host", ""))
    if (default is None or host is None or origin_host != host[0]
            or (origin_port or default) != (host[1] or default)):
        return f"Origin {origin!r} is another site"
    return None


def _host_allowed(host_header, insecure_no_auth):
    """Without a token, only names a DNS-rebinding page cannot use may reach the API."""
    if host_header is None:
        return True  # HTTP/1.0 without Host is not a browser
    host = _host_and_port(host_header)
    if host is None or host[0] is None:
        return False
    if _is_loopback_name(host[0]):
        return True
    # Rebinding needs a name the attacker controls; an address typed by the operator of
    # an --insecure-no-auth daemon on the LAN is not one.
    try:
        ipaddress.ip_address(host[0])
    except ValueError:
        return False
    return insecure_no_auth


def _bearer_error(request, token):
    """Why the Authorization header does not carry the token, or None if it does."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "this API needs the header Authorization: Bearer <token>", \
            'Bearer realm="torrentflow"'
    # Constant time, so response timing does not reveal how much of a guess was right.
    if hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                           token.encode()):
        return None
    return "invalid bearer token", 'Bearer realm="torrentflow", error="invalid_token"'


@web.middleware
async def access_middleware(request, handler):
    """Refuse cross-site browser requests, foreign Host names without a token, and
    requests without the token when one is set."""
    config = request.app[CONFIG]
    reason = _cross_site(request)
    if reason:
        raise ApiError(403, f"cross-site request refused: {reason}")
    if config.token is None and not _host_allowed(request.headers.get("Host"),
                                                  config.insecure_no_auth):
        raise ApiError(403, "without an API token only requests to localhost or a loopback "
                       "address are served (this blocks DNS rebinding); set a token to "
                       "use another name")
    if config.token is not None and (request.method, request.path) not in PUBLIC_ROUTES:
        failure = _bearer_error(request, config.token)
        if failure:
            detail, challenge = failure
            raise ApiError(401, detail, {"WWW-Authenticate": challenge})
    return await handler(request)


# --------------------------------------------------------------------------- #
# Helpers: hashes, paths, torrent sources, status fields
# --------------------------------------------------------------------------- #

def parse_infohash(text):
    """Lower-case a 40-hex (v1) or 64-hex (v2) infohash, or raise 400."""
    infohash = text.strip().lower()
    if len(infohash) not in (40, 64) or any(c not in "0123456789abcdef" for c in infohash):
        raise ApiError(400, "infohash must be 40 (v1) or 64 (v2) hexadecimal digits")
    return infohash


def _hash_ids(info_hashes):
    """The hex ids a torrent answers to, canonical (v1 when there is one) first."""
    ids = []
    if info_hashes.has_v1():
        ids.append(str(info_hashes.v1))
    if info_hashes.has_v2():
        ids.append(str(info_hashes.v2))
    return ids


def resolve_save_path(download_dir, requested, allowed_roots=()):
    """Map a requested save_path onto a real directory inside an allowed root, creating it.

    A relative path lies under download_dir; an absolute one may also name a directory
    inside one of allowed_roots. Runs in a thread: it touches the disk. Symlinks and
    ``..`` are resolved before the containment check, and again after creation in case
    a link appeared meanwhile.
    """
    root = download_dir.resolve()
    if not requested:
        root.mkdir(parents=True, exist_ok=True)
        return str(root)
    if "\x00" in requested:
        raise ApiError(400, "save_path contains a NUL byte")
    if os.path.isabs(requested):
        roots = [root, *(Path(other).resolve() for other in allowed_roots)]
        where = "the download directory or an allowed save root"
    else:
        roots = [root]
        where = f"the download directory {root}"
    for attempt in ("before", "after"):
        try:
            target = (root / requested).resolve()
        except (OSError, RuntimeError) as error:  # a path too long, a symlink loop
            raise ApiError(400, f"save_path cannot be resolved: {error}") from None
        if not any(target.is_relative_to(allowed) for allowed in roots):
            raise ApiError(400, f"save_path must stay inside {where}")
        if attempt == "before":
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ApiError(400, f"save_path cannot be created: {error.strerror}") from None
    if not target.is_dir():
        raise ApiError(400, "save_path is not a directory")
    return str(target)


def _readable(params):
    """False if a name, path or URL in params is not UTF-8.

    libtorrent keeps a magnet's %-decoded dn= and tr=, a .torrent's announce and a resume
    file's save_path as raw bytes; Python raises on every later read of them, in the
    add, in each status and in each alert, so such a torrent could never be served.
    """
    try:
        params.name, params.save_path, params.trackers, params.url_seeds
    except UnicodeDecodeError:
        return False
    return True


def params_from_magnet(uri):
    """Parse a magnet link (honouring tr= trackers and x.pe= peers), or raise 400."""
    try:
        params = lt.parse_magnet_uri(uri)
    except RuntimeError as error:
        raise ApiError(400, f"invalid magnet link: {error}") from None
    if not _hash_ids(params.info_hashes):
        raise ApiError(400, "invalid magnet link: no btih or btmh infohash")
    if not _readable(params):
        raise ApiError(400, "invalid magnet link: dn= or tr= is not UTF-8 once decoded")
    return params


def params_from_torrent(data):
    """Parse .torrent bytes under TORRENT_LIMITS, or raise 422. CPU-bound: call in a thread.

    libtorrent would sanitise hostile file names and write inside save_path anyway;
    refusing them tells the client the file is hostile instead of renaming quietly.
    """
    if len(data) > MAX_TORRENT_BYTES:
        raise ApiError(413, f"a .torrent may be at most {MAX_TORRENT_BYTES} bytes")
    try:
        params = lt.load_torrent_buffer(data, TORRENT_LIMITS)
    except RuntimeError as error:
        raise ApiError(422, f"not a valid torrent file: {error}") from None
    if not _readable(params):
        raise ApiError(422, "not a valid torrent file: a tracker URL is not UTF-8")
    info = params.ti
    piece_length = info.piece_length()
    if piece_length & (piece_length - 1):
        raise ApiError(422, f"not a valid torrent file: piece length {piece_length} "
                       "is not a power of two")
    if info.num_files() > MAX_TORRENT_FILES:
        raise ApiError(422, f"not a valid torrent file: more than {MAX_TORRENT_FILES} files")
    unsafe = _unsafe_file_name(lt.bdecode(info.info_section()))
    if unsafe is not None:
        raise ApiError(422, f"not a valid torrent file: unsafe file name {unsafe!r}")
    return params


def _unsafe_file_name(info):
    """The first file name element in a raw info dict that could leave save_path:
    empty, ".", "..", or holding a separator or NUL; None if all are safe."""
    paths = [[info.get(b"name", b"")]]
    for entry in info.get(b"files") or ():  # v1 multi-file
        if isinstance(entry, dict):
            paths += [entry.get(b"path") or [b""], entry.get(b"symlink path") or []]
    pending = [info.get(b"file tree") or {}]  # v2, nested: {element: {...}, b"": leaf}
    while pending:  # depth is bounded by the decoder's max_decode_depth
        tree = pending.pop()
        for element, subtree in tree.items() if isinstance(tree, dict) else ():
            if element == b"":
                if isinstance(subtree, dict) and subtree.get(b"symlink path"):
                    paths.append(subtree[b"symlink path"])
                continue
            paths.append([element])
            pending.append(subtree)
    for path in paths:
        for element in path if isinstance(path, list) else [path]:
            if isinstance(element, bytes) and (
                    element in (b"", b".", b"..") or any(c in element for c in b"/\\\x00")):
                return element.decode("utf-8", "replace")
    return None


def _is_local_url(url):
    """True when a URL names a loopback address or localhost, so no lookup leaves the host."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and _is_loopback_name(host)


def keep_local(params):
    """Drop trackers and web seeds outside loopback: --local-only sends nothing off the host.

    The IP filter already blocks such peers and trackers, but only after a DNS lookup.
    """
    params.trackers = [url for url in params.trackers if _is_local_url(url)]
    params.url_seeds = [url for url in params.url_seeds if _is_local_url(url)]
    return params


async def fetch_torrent_url(client, url, timeout, local_only=False):
    """Fetch a .torrent over http(s); returns its bytes, or a magnet URI it redirected to."""
    for _ in range(FETCH_MAX_REDIRECTS + 1):
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError as error:  # a malformed address, such as http://[::1/x
            raise ApiError(400, f"torrent_url is not a valid URL: {error}") from None
        if scheme not in ("http", "https"):
            raise ApiError(400, "torrent_url must be a magnet link or an http(s) URL")
        if local_only and not _is_local_url(url):
            raise ApiError(400, "with --local-only, torrent_url must name localhost or a "
                           "loopback address")
        try:
            async with client.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    if location.lower().startswith("magnet:"):
                        return location
                    url = urllib.parse.urljoin(str(response.url), location)
                    continue
                if response.status != 200:
                    raise ApiError(502, f"fetching torrent_url failed: HTTP {response.status}")
                # Content-Length may be absent (chunked) or lie: count while streaming.
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_TORRENT_BYTES:
                        raise ApiError(413, f"torrent_url served more than "
                                       f"{MAX_TORRENT_BYTES} bytes")
                return bytes(body)
        except asyncio.TimeoutError:
            raise ApiError(502, f"fetching torrent_url timed out after {timeout:g} s") from None
        except (aiohttp.ClientError, ValueError) as error:
            raise ApiError(502, f"fetching torrent_url failed: {error}") from None
    raise ApiError(502, f"fetching torrent_url failed: more than "
                   f"{FETCH_MAX_REDIRECTS} redirects")


def _epoch_or_none(value):
    """A Unix time as an int, or None for libtorrent's 0 (never)."""
    return int(value) if value and value > 0 else None


def _seconds_since(moment, now):
    """Whole seconds since a naive local datetime or a Unix time, or None if never."""
    if moment is None:
        return None
    return max(0, int(now - (moment if isinstance(moment, float) else moment.timestamp())))


def _metadata_fields(torrent_info, params):
    """Fields that need metadata; computed once, when metadata first arrives."""
    layout = torrent_info.layout()
    files = []
    for index in range(layout.num_files()):
        if layout.file_flags(index) & lt.file_storage.flag_pad_file:
            continue
        files.append({"index": index, "path": layout.file_path(index),
                      "size": layout.file_size(index)})
    return {
        "total_size": torrent_info.total_size(),
        "num_files": len(files),
        "total_pieces": torrent_info.num_pieces(),
        "piece_length": torrent_info.piece_length(),
        "creation_date": _epoch_or_none(params["creation_date"] or torrent_info.creation_date()),
        "creator": params["creator"] or None,
        "comment": params["comment"] or None,
        "files": files,
    }


#: The fields that need metadata, null until a magnet's metadata arrives.
EMPTY_METADATA = dict.fromkeys(
    ("total_size", "num_files", "total_pieces", "piece_length", "creation_date", "creator",
     "comment", "files"))

#: Every field of the status object (README has the table, /openapi.json the schema).
STATUS_FIELDS = (
    "infohash", "paused", "auto_managed", "sequential_download", "seed_mode", "upload_mode",
    "share_mode", "super_seeding", "queued", "state", "is_seeding", "is_finished",
    "has_metadata", "progress", "error", "download_rate", "upload_rate", "total_download",
    "total_upload", "all_time_download", "all_time_upload", "num_peers", "list_peers",
    "list_seeds", "connect_candidates", "num_pieces", "total_done", "total_wanted_done",
    "total_wanted", "distributed_copies", "num_seeds", "num_complete", "num_incomplete",
    "last_seen_complete", "time_since_upload", "time_since_download", "active_time",
    "finished_time", "seeding_time", "seed_rank", "has_incoming", "priority",
    "queue_position", "added_time", "completed_time", "storage_mode", "save_path", "name",
    "last_scrape", "info_hash_v1", "info_hash_v2", *EMPTY_METADATA,
)


def status_fields(status, now):
    """The JSON fields of one libtorrent torrent_status (metadata fields excluded)."""
    flags = status.flags
    fields = {name: bool(flags & bit) for name, bit in FLAG_FIELDS.items()}
    fields["queued"] = fields["paused"] and fields["auto_managed"]
    fields.update(
        state=str(status.state),
        is_seeding=status.is_seeding,
        is_finished=status.is_finished,
        has_metadata=status.has_metadata,
        progress=round(status.progress * 100, 4),
        error=status.errc.message() if status.errc.value() else "",
        download_rate=status.download_rate,
        upload_rate=status.upload_rate,
        total_download=status.total_download,
        total_upload=status.total_upload,
        all_time_download=status.all_time_download,
        all_time_upload=status.all_time_upload,
        num_peers=status.num_peers,
        list_peers=status.list_peers,
        list_seeds=status.list_seeds,
        connect_candidates=status.connect_candidates,
        num_pieces=status.num_pieces,
        total_done=status.total_done,
        total_wanted_done=status.total_wanted_done,
        total_wanted=status.total_wanted,
        distributed_copies=round(status.distributed_copies, 4),
        num_seeds=status.num_seeds,
        num_complete=status.num_complete,
        num_incomplete=status.num_incomplete,
        last_seen_complete=_epoch_or_none(status.last_seen_complete),
        time_since_upload=_seconds_since(status.last_upload, now),
        time_since_download=_seconds_since(status.last_download, now),
        active_time=int(status.active_duration.total_seconds()),
        finished_time=int(status.finished_duration.total_seconds()),
        seeding_time=int(status.seeding_duration.total_seconds()),
        seed_rank=status.seed_rank,
        has_incoming=status.has_incoming,
        priority=status.queue_position,
        queue_position=status.queue_position,
        added_time=int(status.added_time),
        completed_time=_epoch_or_none(status.completed_time),
        storage_mode=str(status.storage_mode).removeprefix("storage_mode_"),
        save_path=status.save_path,
        name=status.name,
    )
    return fields


# --------------------------------------------------------------------------- #
# The session owner
# --------------------------------------------------------------------------- #

def _listing_body(items, total):
    """{"torrents": [items], "total": total} from already serialised items."""
    return b"".join((b'{"torrents":[', items, b'],"total":%d}' % total))


def _params_hashes(params):
    """The info_hash_t of add_torrent_params, from its torrent_info when it has one."""
    return params.ti.info_hashes() if params.ti else params.info_hashes


class _Adding:
    """What an add must remember until its add_torrent_alert, which does not carry it.

    That is the request waiting for the outcome, the .torrent's fields outside the info
    dict, and a magnet's x.pe peers: libtorrent saves no peer that failed to connect,
    yet with no tracker and no DHT they may be the only way to the metadata.
    """

    def __init__(self, params, future=None):
        self.future = future
        self.creation_info = {"creation_date": params.creation_date,
                              "creator": params.created_by, "comment": params.comment}
        self.magnet_peers = list(params.peers) if params.ti is None else []


async def _confirmed(future, what, timeout=ALERT_WAIT):
    """Await a future the alert loop resolves, but not forever: libtorrent may drop alerts."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        raise ApiError(503, f"libtorrent did not confirm {what} within {timeout:g} s; "
                       "try again") from None


def _paused_by_user(status):
    """The status a pause through the API must lead to."""
    return status["paused"] and not status["auto_managed"]


def _handed_to_queue(status):
    """The status a resume through the API must lead to."""
    return status["auto_managed"]


def _log_crash(task):
    """Report a background task that died: its work (saves, status) would stop silently."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def _chain(source, target, result):
    """Complete target when source does: with result, or source's exception."""
    def done(future):
        if target.done():
            return
        if future.exception() is not None:
            log.error("state directory I/O failed: %s", future.exception())
            target.set_exception(future.exception())
            # Logged just above; periodic saves have nobody awaiting them, and asyncio
            # would log it again as "never retrieved". Awaiters still get the error.
            target.exception()
        else:
            target.set_result(result)
    source.add_done_callback(done)


def _fsync_dir(path):
    """Make a rename in this directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_progress(handles):
    """Bytes per file for each handle (None if it is gone). Blocking: run in a thread."""
    result = []
    for handle in handles:
        try:
            result.append(handle.file_progress(lt.torrent_handle.piece_granularity))
        except RuntimeError:
            result.append(None)
    return result


def _loopback_only_filter():
    """An IP filter that blocks every peer and tracker outside loopback."""
    ip_filter = lt.ip_filter()
    ip_filter.add_rule("0.0.0.0", "255.255.255.255", 1)
    ip_filter.add_rule("127.0.0.0", "127.255.255.255", 0)
    ip_filter.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
    ip_filter.add_rule("::1", "::1", 0)
    return ip_filter


class _Torrent:
    """What the daemon knows about one torrent: its handle and its cached status."""

    def __init__(self, handle, params, creation_info):
        self.handle = handle
        self.ids = _hash_ids(params.info_hashes)
        self.infohash = self.ids[0]
        self.creation_info = creation_info
        self.file_priorities = list(params.file_priorities)
        self.metadata = None          # _metadata_fields() once known
        self.file_progress = None     # bytes downloaded per file index
        self.status = None            # the dict served by GET, once the first status arrived
        self.body = b""               # that dict, serialised once per change
        self.total_done = -1          # bytes done when file progress was last asked for
        self.updated = 0.0            # when the last status arrived
        self.last_scrape = None       # when a tracker last reported swarm counts
        self.flushing_since = None    # when a flush of its finished download was asked for
        self.saved_as = None          # the id its resume file carries
        self.magnet_peers = []        # its x.pe= peers, saved until the metadata is here
        self.disk_error = ""          # the last file error, while it keeps the torrent stuck
        self.status_waiters = []      # (future, until) pairs, for a status to come
        self.save_waiters = collections.deque()  # one future per save_resume_data call
        self.removal = None           # future for DELETE, once requested
        self.removal_steps = set()    # alerts that removal still waits for

    def update(self, status, now):
        """Take a fresh torrent_status; return the old id if the canonical one changed."""
        ids = _hash_ids(status.info_hashes) or self.ids
        old = self.infohash if ids[0] != self.infohash else None
        self.ids, self.infohash, self.updated = ids, ids[0], now
        if self.metadata is None and status.has_metadata:
            self.metadata = _metadata_fields(status.torrent_file, self.creation_info)
        fields = status_fields(status, now)
        if not fields["upload_mode"]:
            self.disk_error = ""  # libtorrent retried the disk by itself, and it worked
        # libtorrent meets a full disk with upload mode, not an error: report it as one.
        fields["error"] = fields["error"] or self.disk_error
        fields["last_scrape"] = _seconds_since(self.last_scrape, now)
        fields["info_hash_v1"] = next((i for i in ids if len(i) == 40), None)
        fields["info_hash_v2"] = next((i for i in ids if len(i) == 64), None)
        self.status = {"infohash": self.infohash, **fields}
        self.render()
        return old

    def render(self):
        """Serialise the status once, so every GET serves the same bytes."""
        if self.metadata is None:
            self.status.update(EMPTY_METADATA)
        else:
            self.status.update(self.metadata, files=[self._file_entry(f)
                                                      for f in self.metadata["files"]])
        self.body = json.dumps(self.status, separators=(",", ":")).encode()

    def _file_entry(self, file):
        """One entry of the files list, with its progress and priority."""
        index, size = file["index"], file["size"]
        downloaded = (self.file_progress[index] if self.file_progress
                      and index < len(self.file_progress) else 0)
        priority = (self.file_priorities[index] if index < len(self.file_priorities) else 4)
        return {**file, "downloaded": downloaded,
                "progress": round(100 * downloaded / size, 4) if size else 100.0,
                "priority": int(priority)}


@contextlib.contextmanager
def _handle_call():
    """A handle that libtorrent already dropped means the torrent is gone: 404."""
    try:
        yield
    except RuntimeError as error:
        raise ApiError(404, f"torrent not found ({error})") from None


class TorrentEngine:
    """Owns the libtorrent session, its alert loop, the status cache and the state dir.

    Only the alert loop calls pop_alerts(); every request either reads the cache or
    posts work to libtorrent and awaits a future that the alert loop resolves.
    """

    def __init__(self, config):
        self.config = config
        self.download_dir = config.download_dir
        self.resume_dir = config.state_dir / "resume"
        self.quarantine_dir = config.state_dir / "quarantine"
        self.loading = True
        self.listen_port = None
        self._session = None
        self._by_handle = {}          # handle -> _Torrent, every torrent libtorrent holds
        self._by_id = {}              # hex id -> _Torrent, those with a status to serve
        self._adds = {}               # hex id -> task of an API add under way
        self._adding = {}             # hex id -> _Adding, until its add_torrent_alert
        self._removing = {}           # hex id -> _Torrent awaiting removal/deletion alerts
        self._dirty = set()           # torrents that changed since the last periodic save
        self._progressed = set()      # torrents whose per-file progress is out of date
        self._moving = set()          # torrents whose cached rates are not zero
        self._listing = None          # listing() until a status changes
        self._tasks = []
        self._wakeup = asyncio.Event()
        self._alert_socket = None
        self._notify_socket = None
        # One thread writes the state dir, so writes and deletes of a file stay in order.
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tf-state")

    # -- lifecycle ---------------------------------------------------------- #

    async def start(self):
        """Create the session, start the alert loop, and begin loading saved torrents."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._disk, self._prepare_dirs)
        params = lt.session_params(session_settings(self.config))
        # pread avoids the RSS growth of memory-mapped I/O on large torrents.
        params.disk_io_constructor = "pread_disk_io_constructor"
        self._session = lt.session(params)
        if self.config.local_only:
            self._session.set_ip_filter(_loopback_only_filter())
        self.listen_port = self._session.listen_port()  # a blocking call: once, at start
        self._alert_socket, self._notify_socket = socket.socketpair()
        self._alert_socket.setblocking(False)
        # libtorrent writes a byte here when alerts arrive; it must never block its thread.
        self._notify_socket.setblocking(False)
        self._session.set_alert_fd(self._notify_socket.fileno())
        loop.add_reader(self._alert_socket.fileno(), self._on_alert_fd)
        self._tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("tf-alerts", self._alert_loop()),
            ("tf-status", self._status_loop()),
            ("tf-save", self._save_loop()),
            ("tf-load", self._load_saved()),
        )]
        for task in self._tasks:
            task.add_done_callback(_log_crash)
        log.info("BitTorrent listening on %s, port %d (DHT %s, LSD %s, UPnP %s, NAT-PMP %s)",
                 self.config.listen_interfaces, self.listen_port,
                 *("on" if flag else "off" for flag in (
                     self.config.dht, self.config.lsd, self.config.upnp, self.config.natpmp)))

    async def close(self):
        """Finish adds under way, pause, save every torrent that changed, drop the session."""
        if self._session is None:
            return
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        deadline = time.monotonic() + self.config.shutdown_timeout
        if self._adds:
            # An add whose request was cut off by the shutdown still ends saved.
            await asyncio.wait(set(self._adds.values()), timeout=self.config.shutdown_timeout)
        self._session.pause()
        torrents = [t for t in self._by_handle.values() if t.removal is None]
        saved = 0
        if torrents:
            saves = [self._save(torrent, SAVE_IF_MODIFIED) for torrent in torrents]
            done, pending = await asyncio.wait(
                saves, timeout=max(0.1, deadline - time.monotonic()))
            saved = sum(1 for f in done if not f.exception() and f.result())
            if pending:
                log.warning("shutdown deadline: %d torrents were not saved", len(pending))
        log.info("saved %d changed torrents of %d at shutdown", saved, len(torrents))
        self._tasks[0].cancel()
        await asyncio.gather(self._tasks[0], return_exceptions=True)
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._alert_socket.fileno())
        await loop.run_in_executor(None, self._disk.shutdown)
        # The session's destructor waits up to STOP_TRACKER_TIMEOUT for trackers to
        # acknowledge "stopped", holding the GIL: let the last reference go in a thread.
        last_reference = [self._session]
        self._session = None
        await asyncio.to_thread(last_reference.clear)
        self._alert_socket.close()
        self._notify_socket.close()

    # -- requests ----------------------------------------------------------- #

    def lookup(self, infohash):
        """The torrent with this v1 or v2 id, or 404 (also while it is being removed)."""
        torrent = self._by_id.get(infohash)
        if torrent is None or torrent.removal is not None:
            raise ApiError(404, f"no torrent with infohash {infohash}")
        return torrent

    def torrents(self):
        """Every torrent that has a status to serve, in the order they were added."""
        return (t for t in self._by_handle.values() if t.status is not None)

    def listing(self):
        """The body of a plain GET /torrents, rebuilt only after something changed."""
        if self._listing is None:
            bodies = [t.body for t in self.torrents()]
            self._listing = _listing_body(b",".join(bodies), len(bodies))
        return self._listing

    def count(self):
        """How many torrents libtorrent holds, those still loading included."""
        return len(self._by_handle)

    async def add(self, params):
        """Add a torrent; return (infohash, created) once it is saved and has a status."""
        ids = _hash_ids(_params_hashes(params))
        existing = next((self._by_id[i] for i in ids if i in self._by_id), None)
        if existing is not None and existing.removal is not None:
            # Being deleted: let that finish, then add it afresh.
            await _confirmed(existing.removal, "the removal of the earlier copy")
            existing = None
        if existing is not None:
            return existing.infohash, False
        running = next((self._adds[i] for i in ids if i in self._adds), None)
        if running is not None:
            # Asked for twice at once: answer when the first add is saved, as it does.
            infohash, _ = await asyncio.shield(running)
            return infohash, False
        task = asyncio.ensure_future(self._add(params, ids))

        def forget(_task):
            for infohash in ids:
                self._adds.pop(infohash, None)
        self._adds.update(dict.fromkeys(ids, task))
        task.add_done_callback(forget)
        # Shielded: a client that hangs up must not leave a torrent added but unsaved.
        return await asyncio.shield(task)

    async def _add(self, params, ids):
        """Post the add, then save it and wait for its first status."""
        added = asyncio.get_running_loop().create_future()
        self._add_async(params, added)
        torrent, created = await _confirmed(added, "the add")
        if created:
            # The answer promises the torrent survives a crash: write it first.
            await _confirmed(self._save(torrent, SAVE_FULL), "saving the torrent")
        if torrent.status is None:
            await _confirmed(self._refresh(torrent), "the first status")
        return torrent.infohash, created

    async def pause(self, torrent):
        """Pause and take it out of the queue, so libtorrent does not restart it."""
        with _handle_call():
            torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            torrent.handle.pause()
        await _confirmed(self._refresh(torrent, _paused_by_user), "the pause")
        await _confirmed(self._save(torrent, SAVE_FULL), "saving the pause")

    async def resume(self, torrent):
        """Resume and hand it back to the queue; after an error, recheck and retry."""
        with _handle_call():
            torrent.handle.set_flags(lt.torrent_flags.auto_managed)
            if torrent.disk_error or (torrent.status and torrent.status["error"]):
                # Resuming says the fault is fixed. A piece can pass its hash check in
                # memory and then fail to be written, so check what reached the disk.
                torrent.disk_error = ""
                torrent.handle.clear_error()
                torrent.handle.unset_flags(lt.torrent_flags.upload_mode)
                torrent.handle.force_recheck()
            torrent.handle.resume()
        await _confirmed(self._refresh(torrent, _handed_to_queue), "the resume")
        await _confirmed(self._save(torrent, SAVE_FULL), "saving the resume")

    async def remove(self, torrent, delete_files):
        """Remove it; return once libtorrent confirmed and its resume file is gone."""
        self._start_removal(torrent, delete_files)
        await _confirmed(torrent.removal, "the removal")

    def _start_removal(self, torrent, delete_files):
        """Post the removal and note which alerts will confirm it."""
        with _handle_call():
            self._session.remove_torrent(
                torrent.handle, lt.session.delete_files if delete_files else 0)
        torrent.removal = asyncio.get_running_loop().create_future()
        # Deleting needs storage; a magnet without metadata has nothing on disk.
        torrent.removal_steps = ({"removed", "deleted"} if delete_files
                                 and torrent.metadata is not None else {"removed"})
        for infohash in torrent.ids:
            self._removing[infohash] = torrent

    # -- internals: requests that wait on alerts ----------------------------- #

    def _add_async(self, params, added=None):
        """Add without waiting; _on_add resolves added with (_Torrent, created)."""
        if self.config.local_only:
            keep_local(params)
        key = _hash_ids(_params_hashes(params))[0]
        self._adding[key] = _Adding(params, added)
        try:
            self._session.async_add_torrent(params)
        except BaseException:
            del self._adding[key]
            raise

    def _refresh(self, torrent, until=None):
        """Ask for this torrent's status; the future resolves once the cache holds one
        that satisfies until(status). A status posted before the change may come first."""
        future = asyncio.get_running_loop().create_future()
        with _handle_call():
            torrent.handle.post_status()
        torrent.status_waiters.append((future, until))
        return future

    def _save(self, torrent, flags):
        """Ask for resume data; the future gives True once written, False if unchanged."""
        future = asyncio.get_running_loop().create_future()
        try:
            torrent.handle.save_resume_data(flags)
        except RuntimeError:  # already removed: nothing left to save
            future.set_result(False)
            return future
        torrent.save_waiters.append(future)
        return future

    # -- internals: the alert loop ------------------------------------------ #

    def _on_alert_fd(self):
        """libtorrent wrote to the alert socket: drain it and wake the alert loop."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._alert_socket.recv(4096):
                pass
        self._wakeup.set()

    async def _alert_loop(self):
        """The only caller of pop_alerts(). Dispatch is synchronous: alerts die at the next pop."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            for alert in self._session.pop_alerts():
                try:
                    self._dispatch(alert)
                except Exception:
                    log.exception("error while handling %s", type(alert).__name__)

    def _dispatch(self, alert):
        """Hand an alert to its _on_* handler, if the daemon acts on that kind."""
        handler = self._ALERT_HANDLERS.get(type(alert))
        if handler is not None:
            handler(self, alert)

    def _on_state_update(self, alert):
        """Cache each changed torrent's status and wake requests waiting for it."""
        now = time.time()
        self._listing = None
        for status in alert.status:
            torrent = self._by_handle.get(status.handle)
            if torrent is None or self._holding_back(torrent, status, now):
                continue
            try:
                self._take_status(torrent, status, now)
            except Exception:  # one bad status must not keep the others from the cache
                log.exception("could not take the status of %s", torrent.infohash)

    def _take_status(self, torrent, status, now):
        """Cache one torrent's status and do the bookkeeping that follows it."""
        old = torrent.update(status, now)
        if old:
            log.info("%s is now known by its v1 id %s", old, torrent.infohash)
        if torrent.removal is None:
            self._by_id.update(dict.fromkeys(torrent.ids, torrent))
        self._dirty.add(torrent)
        if torrent.metadata is not None and torrent.total_done != status.total_done:
            torrent.total_done = status.total_done
            self._progressed.add(torrent)
        if status.download_rate or status.upload_rate:
            self._moving.add(torrent)
        else:
            self._moving.discard(torrent)
        waiting = []
        for future, until in torrent.status_waiters:
            if until is None or until(torrent.status):
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((future, until))
        torrent.status_waiters = waiting

    @staticmethod
    def _holding_back(torrent, status, now):
        """Serve the previous status while a just-finished torrent's writes are flushed.

        A script that sees "finished" reads the files next; they must be complete by
        then. A flush that never reports back is not waited for beyond FLUSH_WAIT.
        """
        return (torrent.flushing_since is not None and now - torrent.flushing_since < FLUSH_WAIT
                and status.is_finished and torrent.status is not None
                and not torrent.status["is_finished"])

    def _on_add(self, alert):
        """Register a torrent libtorrent added, or fail the request that asked for it."""
        ids = _hash_ids(_params_hashes(alert.params))
        adding = self._adding.pop(ids[0] if ids else None, None) or _Adding(alert.params)
        future = adding.future
        if alert.error.value():
            log.warning("could not add torrent %s: %s", ids[0] if ids else "?",
                        alert.error.message())
            if future is not None and not future.done():
                future.set_exception(ApiError(422, f"libtorrent refused the torrent: "
                                              f"{alert.error.message()}"))
            return
        handle = alert.handle
        torrent = self._by_handle.get(handle)
        created = torrent is None
        if created:
            torrent = _Torrent(handle, alert.params, adding.creation_info)
            torrent.magnet_peers = adding.magnet_peers
            self._by_handle[handle] = torrent
            torrent.saved_as = None if future is not None else torrent.infohash
        if future is not None and not future.done():
            future.set_result((torrent, created))
        if created:
            log.info("added %s (%s)", alert.torrent_name or "(no metadata yet)",
                     torrent.infohash)

    def _on_save(self, alert):
        """Write the resume data of a save_resume_data call, in order, off the loop."""
        torrent = self._by_handle.get(alert.handle)
        if torrent is None or not torrent.save_waiters:
            return
        future = torrent.save_waiters.popleft()
        params = alert.params
        torrent.file_priorities = list(params.file_priorities)
        if params.ti is None and torrent.magnet_peers:
            params.peers = list(dict.fromkeys([*params.peers, *torrent.magnet_peers]))
        data = lt.write_resume_data_buf(params)  # copy now: the alert dies at the next pop
        old_name, torrent.saved_as = torrent.saved_as, torrent.infohash
        write = asyncio.get_running_loop().run_in_executor(
            self._disk, self._write_resume, torrent.infohash, data,
            old_name if old_name != torrent.infohash else None)
        _chain(write, future, True)

    def _on_save_failed(self, alert):
        """A save that did not happen: normal when nothing changed, logged otherwise."""
        torrent = self._by_handle.get(alert.handle)
        if torrent is None or not torrent.save_waiters:
            return
        if alert.error.value() != RESUME_NOT_MODIFIED and torrent.removal is None:
            log.warning("could not save resume data for %s: %s", torrent.infohash,
                        alert.error.message())
        future = torrent.save_waiters.popleft()
        if not future.done():
            future.set_result(False)

    def _torrent_for_hashes(self, info_hashes):
        """The torrent being removed that these hashes name, if any."""
        return next((self._removing[i] for i in _hash_ids(info_hashes) if i in self._removing),
                    None)

    def _on_removed(self, alert):
        """libtorrent dropped the torrent: forget it and settle what waited on it."""
        torrent = self._torrent_for_hashes(alert.info_hashes)
        if torrent is None:
            return
        self._by_handle.pop(torrent.handle, None)
        self._listing = None
        for tracked in (self._dirty, self._progressed, self._moving):
            tracked.discard(torrent)
        for infohash in torrent.ids:
            if self._by_id.get(infohash) is torrent:
                del self._by_id[infohash]
        for future in [*torrent.save_waiters, *(f for f, _ in torrent.status_waiters)]:
            if not future.done():
                future.set_result(False)
        torrent.save_waiters.clear()
        torrent.status_waiters.clear()
        log.info("removed %s (%s)", torrent.status and torrent.status["name"], torrent.infohash)
        self._removal_step(torrent, "removed")

    def _on_deleted(self, alert):
        """The data of a DELETE ?delete_files=true is gone (or could not be)."""
        torrent = self._torrent_for_hashes(alert.info_hashes)
        if torrent is None:
            return
        if isinstance(alert, lt.torrent_delete_failed_alert):
            log.warning("could not delete the files of %s: %s", torrent.infohash,
                        alert.error.message())
        self._removal_step(torrent, "deleted")

    def _removal_step(self, torrent, step):
        """Count off the alerts a removal waits for (their order varies), then forget it.

        The resume file goes before the DELETE is answered: a removal must survive a crash.
        """
        torrent.removal_steps.discard(step)
        if torrent.removal_steps:
            return
        for infohash in torrent.ids:
            self._removing.pop(infohash, None)
        name = torrent.saved_as
        # After a hybrid conflict the survivor may already keep its file under this name.
        if name is None or any(t.saved_as == name for t in self._by_handle.values()):
            torrent.removal.set_result(None)
            return
        delete = asyncio.get_running_loop().run_in_executor(
            self._disk, self._delete_resume, name)
        _chain(delete, torrent.removal, None)

    def _on_conflict(self, alert):
        """Two magnets, one by v1 and one by v2 hash, turned out to be one hybrid torrent.

        libtorrent stops both with an error. Keep the one that has the metadata, drop the
        other (its data, if any, stays), and let the survivor answer to both hashes.
        """
        keep = self._by_handle.get(alert.handle)
        drop = self._by_handle.get(alert.conflicting_torrent)
        if None in (keep, drop) or keep.removal is not None or drop.removal is not None:
            return  # a DELETE under way settles it
        log.warning("%s and %s are the same hybrid torrent: keeping %s", keep.infohash,
                    drop.infohash, keep.infohash)
        with contextlib.suppress(ApiError):
            self._start_removal(drop, delete_files=False)
        with contextlib.suppress(RuntimeError):
            keep.handle.clear_error()
            if keep.status is None or keep.status["auto_managed"]:
                keep.handle.resume()
            keep.handle.post_status()

    def _on_flushed(self, alert):
        """The finished torrent's bytes are in its files: now it may show as finished."""
        torrent = self._by_handle.get(alert.handle)
        if torrent is not None and torrent.flushing_since:
            torrent.flushing_since = None
            with contextlib.suppress(RuntimeError):
                torrent.handle.post_status()

    def _on_tracker_reply(self, alert):
        """Note when a tracker last reported on the swarm, for last_scrape."""
        torrent = self._by_handle.get(alert.handle)
        if torrent is not None:
            torrent.last_scrape = time.time()

    def _on_event(self, alert):
        """Log lifecycle events, refresh the cache at once and save what must be saved."""
        torrent = self._by_handle.get(alert.handle)
        if torrent is None:
            return
        name = alert.torrent_name
        if isinstance(alert, lt.torrent_error_alert):
            log.error("error in %s (%s): %s", name, torrent.infohash, alert.error.message())
        elif isinstance(alert, lt.file_error_alert):
            error = f"{alert.error.message()}: {alert.filename()}"
            if error != torrent.disk_error:  # every block that failed to write says it again
                log.error("file error in %s (%s): %s", name, torrent.infohash, error)
            torrent.disk_error = error
        elif not isinstance(alert, lt.state_changed_alert):
            log.info("%s %s (%s)", self._EVENT_WORDS[type(alert)], name, torrent.infohash)
        if isinstance(alert, lt.torrent_finished_alert):
            # The last pieces may still sit in libtorrent's write buffer; see _on_flushed.
            with contextlib.suppress(RuntimeError):
                torrent.handle.flush_cache()
                torrent.flushing_since = time.time()
        if isinstance(alert, (lt.metadata_received_alert, lt.torrent_finished_alert)):
            self._save(torrent, SAVE_FULL)
        # A finished download should not wait for the next tick to show as finished.
        with contextlib.suppress(RuntimeError):
            torrent.handle.post_status()

    _EVENT_WORDS = {
        lt.metadata_received_alert: "metadata received for",
        lt.torrent_finished_alert: "finished",
        lt.torrent_paused_alert: "paused",
        lt.torrent_resumed_alert: "resumed",
    }
    _ALERT_HANDLERS = {
        lt.state_update_alert: _on_state_update,
        lt.add_torrent_alert: _on_add,
        lt.save_resume_data_alert: _on_save,
        lt.save_resume_data_failed_alert: _on_save_failed,
        lt.torrent_removed_alert: _on_removed,
        lt.torrent_deleted_alert: _on_deleted,
        lt.torrent_delete_failed_alert: _on_deleted,
        lt.cache_flushed_alert: _on_flushed,
        lt.torrent_conflict_alert: _on_conflict,
        lt.tracker_reply_alert: _on_tracker_reply,
        lt.scrape_reply_alert: _on_tracker_reply,
        lt.alerts_dropped_alert: lambda self, alert: log.warning(
            "libtorrent dropped alerts: the queue overflowed"),
        **dict.fromkeys((*_EVENT_WORDS, lt.state_changed_alert, lt.torrent_error_alert,
                         lt.file_error_alert), _on_event),
    }

    # -- internals: periodic work -------------------------------------------- #

    async def _status_loop(self):
        """Feed the cache: changed torrents' status, then their per-file progress."""
        while True:
            self._session.post_torrent_updates()
            await asyncio.sleep(STATUS_INTERVAL)
            # libtorrent stops reporting torrents that went idle, rates and all: ask.
            quiet = time.time() - 2 * STATUS_INTERVAL
            for torrent in [t for t in self._moving if t.updated < quiet]:
                with contextlib.suppress(RuntimeError):
                    torrent.handle.post_status()
            stale, self._progressed = list(self._progressed), set()
            if stale:
                progress = await asyncio.to_thread(_file_progress, [t.handle for t in stale])
                for torrent, files in zip(stale, progress):
                    if files is not None and torrent.removal is None:
                        torrent.file_progress = files
                        torrent.render()
                self._listing = None

    async def _save_loop(self):
        """Save torrents that changed, so a crash loses at most one interval."""
        while True:
            await asyncio.sleep(self.config.save_interval)
            dirty, self._dirty = self._dirty, set()
            for torrent in dirty:
                if torrent.removal is None:
                    self._save(torrent, SAVE_IF_MODIFIED)

    async def _load_saved(self):
        """Add every saved torrent back, in batches, while the API already answers."""
        loop = asyncio.get_running_loop()
        try:
            saved = await loop.run_in_executor(self._disk, self._read_all_resume)
            for start in range(0, len(saved), LOAD_BATCH):
                for params in saved[start:start + LOAD_BATCH]:
                    try:
                        self._add_async(params)
                    except (ValueError, RuntimeError) as error:
                        log.error("could not load saved torrent %s: %s",
                                  _hash_ids(_params_hashes(params))[0], error)
                await asyncio.sleep(0)
            if saved:
                log.info("loading %d saved torrents", len(saved))
        finally:
            self.loading = False

    # -- internals: the state directory (run on the state thread) ------------ #

    def _prepare_dirs(self):
        """Create the directories and clear writes a crash interrupted."""
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.resume_dir.glob("*.tmp"):
            leftover.unlink()  # a write that a crash interrupted; the old file stands

    def _resume_path(self, infohash):
        """Where a torrent's resume file lives."""
        return self.resume_dir / f"{infohash}.resume"

    def _write_resume(self, infohash, data, old_infohash=None):
        """Write atomically and durably, keeping the previous good copy as .bak."""
        path = self._resume_path(infohash)
        temp = path.with_suffix(".tmp")
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.replace(path, path.with_suffix(".bak"))
        os.replace(temp, path)
        _fsync_dir(self.resume_dir)
        if old_infohash:  # a v2-only magnet that gained its v1 id with the metadata
            self._delete_resume(old_infohash)

    def _delete_resume(self, infohash):
        """Delete a torrent's resume file and its backup, durably."""
        path = self._resume_path(infohash)
        for file in (path, path.with_suffix(".bak")):
            file.unlink(missing_ok=True)
        _fsync_dir(self.resume_dir)

    def _read_all_resume(self):
        """Parse every resume file, falling back to .bak and quarantining what is unreadable."""
        names = {p.stem for p in self.resume_dir.iterdir() if p.suffix in (".resume", ".bak")}
        loaded = []
        for name in sorted(names):
            path = self._resume_path(name)
            params, unreadable = None, []
            for candidate in (path, path.with_suffix(".bak")):
                try:
                    params = lt.read_resume_data(candidate.read_bytes())
                except FileNotFoundError:
                    continue
                except (OSError, RuntimeError) as error:
                    log.warning("resume file %s is unreadable: %s", candidate, error)
                    unreadable.append(candidate)
                    continue
                if (not _hash_ids(params.info_hashes) or not _readable(params)
                        or not params.save_path):
                    log.warning("resume file %s names no torrent or no save path, or holds "
                                "text that is not UTF-8", candidate)
                    unreadable.append(candidate)
                    params = None
                    continue
                if candidate is not path:
                    log.warning("using the backup %s", candidate)
                break
            # A bad main file goes even when its .bak is good: the next save would
            # otherwise rotate it over that good .bak.
            self._quarantine(unreadable)
            if params is not None:
                params.flags &= ~lt.torrent_flags.duplicate_is_error
                loaded.append(params)
        return loaded

    def _quarantine(self, files):
        """Move unreadable resume files aside, so they are kept but never loaded."""
        if not files:
            return
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for file in files:
            target = self.quarantine_dir / f"{file.name}.{stamp}"
            os.replace(file, target)
            log.warning("moved unreadable resume file %s to %s", file, target)
        _fsync_dir(self.resume_dir)


# --------------------------------------------------------------------------- #
# HTTP handlers and routes
# --------------------------------------------------------------------------- #

ENGINE = web.AppKey("engine", TorrentEngine)
CONFIG = web.AppKey("config", Config)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)

ADD_FIELDS = ("torrent_url", "torrent_file", "save_path")
routes = web.RouteTableDef()


def _json(data, status=200, headers=None):
    """A JSON response."""
    return web.json_response(data, status=status, headers=headers)


def _require_utf8(charset, what):
    """Refuse a declared charset other than UTF-8."""
    # Every text field is UTF-8; guessing another charset would turn bytes into paths.
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise ApiError(400, f"{what} must be UTF-8, not {charset!r}")


async def _read_limited(read_chunk, limit, already=0):
    """Read a body or a multipart part to its end, or raise 413 once the total passes
    limit. Counts the bytes itself: a chunked body announces no length."""
    data = bytearray()
    while chunk := await read_chunk(64 * 1024):
        data += chunk
        if already + len(data) > limit:
            raise ApiError(413, f"request body too large: more than {limit} bytes")
    return bytes(data)


async def _read_multipart(request):
    """The fields of a multipart body, each read under the size cap."""
    fields, size = {}, 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name not in ADD_FIELDS or part.name in fields:
                raise ApiError(400, f"unexpected or repeated form field {part.name!r}")
            data = await _read_limited(part.read_chunk, MAX_REQUEST_BYTES, size)
            size += len(data)
            if part.name != "torrent_file":
                _require_utf8(part.get_charset(None), f"form field {part.name}")
                data = data.decode()
            fields[part.name] = data
    except (ValueError, AssertionError, UnicodeDecodeError, aiohttp.ClientError,
            aiohttp.http_exceptions.HttpProcessingError) as error:
        raise ApiError(400, f"malformed multipart body: {error}") from None
    return fields


def _parse_urlencoded(body):
    """The fields of an urlencoded body, strictly parsed."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True,
                                       strict_parsing=True, errors="strict",
                                       max_num_fields=len(ADD_FIELDS))
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"malformed form body: {error}") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ApiError(400, "repeated form field")
    return fields


def _parse_json(body):
    """A JSON body, or 400."""
    try:
        return json.loads(body.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(400, f"malformed JSON body: {error}") from None


async def _read_add_form(request):
    """The POST /torrents fields from multipart, urlencoded or JSON, with unknown ones refused."""
    content_type = request.content_type
    # Refuse early what aiohttp would otherwise receive in full before refusing.
    limit = MAX_REQUEST_BYTES if content_type == "multipart/form-data" else MAX_FORM_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body too large: more than {limit} bytes")
    if content_type == "multipart/form-data":
        fields = await _read_multipart(request)
    elif content_type == "application/x-www-form-urlencoded":
        _require_utf8(request.charset, "the form body")
        fields = _parse_urlencoded(await _read_limited(request.content.read, MAX_FORM_BYTES))
    elif content_type == "application/json":
        _require_utf8(request.charset, "the JSON body")
        fields = _parse_json(await _read_limited(request.content.read, MAX_FORM_BYTES))
        if not isinstance(fields, dict):
            raise ApiError(400, "the JSON body must be an object")
        if "torrent_file" in fields:
            raise ApiError(400, "torrent_file must be uploaded as multipart/form-data")
    else:
        raise ApiError(415, "send multipart/form-data, application/x-www-form-urlencoded "
                       "or application/json")
    unknown = sorted(set(fields) - set(ADD_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; expected {', '.join(ADD_FIELDS)}")
    for name in ("torrent_url", "save_path"):
        value = fields.get(name, "")
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
        if not value.isascii():
            try:  # JSON can carry lone surrogates, which no path or URL can hold
                value.encode()
            except UnicodeEncodeError:
                raise ApiError(400, f"{name} is not valid Unicode") from None
    if isinstance(fields.get("torrent_file"), str):
        raise ApiError(400, "torrent_file must be a file upload")
    return fields


async def _params_from_source(request, fields):
    """Turn torrent_url or torrent_file into libtorrent add_torrent_params."""
    url, upload = fields.get("torrent_url"), fields.get("torrent_file")
    if bool(url) == bool(upload):
        raise ApiError(400, "give exactly one of torrent_url or torrent_file")
    if url:
        if url.lower().startswith("magnet:"):
            return params_from_magnet(url)
        config = request.app[CONFIG]
        fetched = await fetch_torrent_url(request.app[HTTP_CLIENT], url,
                                          config.fetch_timeout, config.local_only)
        if isinstance(fetched, str):
            return params_from_magnet(fetched)
        upload = fetched
    return await asyncio.to_thread(params_from_torrent, upload)


@routes.post("/torrents")
async def add_torrent(request):
    """Add a torrent; 201 when new, 200 when it was already there."""
    fields = await _read_add_form(request)
    params = await _params_from_source(request, fields)
    config = request.app[CONFIG]
    params.save_path = await asyncio.to_thread(
        resolve_save_path, config.download_dir, fields.get("save_path"),
        config.allowed_save_roots)
    infohash, created = await request.app[ENGINE].add(params)
    return _json({"infohash": infohash}, status=201 if created else 200,
                 headers={"Location": f"/torrents/{infohash}"})


def _list_query(query):
    """Validate GET /torrents' filter, sort, paging and field selection parameters."""
    unknown = sorted(set(query) - {"state", "paused", "sort", "limit", "offset", "fields"})
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r}")

    def names(text, what, signed=False):
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        bad = [name for name in chosen
               if (name.removeprefix("-") if signed else name) not in STATUS_FIELDS
               or signed and name.removeprefix("-") == "files"]  # lists do not sort
        if bad or not chosen:
            raise ApiError(400, f"{what}: unknown status field {(bad or [''])[0]!r}")
        return chosen

    def count(name, default):
        text = query.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()):  # "²".isdigit() is True
            raise ApiError(400, f"{name} must be a whole number")
        return int(text)

    paused = query.get("paused")
    if paused not in (None, "true", "false"):
        raise ApiError(400, "paused must be true or false")
    return {
        "states": set(query["state"].split(",")) if "state" in query else None,
        "paused": None if paused is None else paused == "true",
        "sort": names(query["sort"], "sort", signed=True)[0] if "sort" in query else None,
        "limit": count("limit", None),
        "offset": count("offset", 0),
        "fields": names(query["fields"], "fields") if "fields" in query else None,
    }


def _sort_key(name):
    """A sort key for one status field that copes with null."""
    # null sorts first ascending; tuples keep None away from comparisons with numbers.
    return lambda torrent: (torrent.status[name] is not None, torrent.status[name])


@routes.get("/torrents")
async def list_torrents(request):
    """Statuses as {"torrents": [...], "total": N}: filtered, sorted, paged, trimmed."""
    engine = request.app[ENGINE]
    if not request.query:
        return web.Response(body=engine.listing(), content_type="application/json")
    query = _list_query(request.query)
    torrents = list(engine.torrents())
    if query["states"] is not None:
        torrents = [t for t in torrents if t.status["state"] in query["states"]]
    if query["paused"] is not None:
        torrents = [t for t in torrents if t.status["paused"] is query["paused"]]
    if query["sort"]:
        name = query["sort"].removeprefix("-")
        torrents.sort(key=_sort_key(name), reverse=query["sort"].startswith("-"))
    total = len(torrents)
    end = None if query["limit"] is None else query["offset"] + query["limit"]
    torrents = torrents[query["offset"]:end]
    if query["fields"] is None:
        # The common case, polling everything, joins bytes serialised at status changes.
        items = b",".join(t.body for t in torrents)
    else:
        fields = query["fields"]
        items = json.dumps([{name: t.status[name] for name in fields} for t in torrents],
                           separators=(",", ":")).encode()[1:-1]
    return web.Response(body=_listing_body(items, total), content_type="application/json")


def _requested_torrent(request):
    """The torrent named by the path's {infohash}: 400 if malformed, 404 if unknown."""
    return request.app[ENGINE].lookup(parse_infohash(request.match_info["infohash"]))


@routes.get("/torrents/{infohash}")
async def get_torrent(request):
    """One torrent's full status, from the cache."""
    return web.Response(body=_requested_torrent(request).body, content_type="application/json")


@routes.delete("/torrents/{infohash}")
async def delete_torrent(request):
    """Remove a torrent, and its data with ?delete_files=true."""
    torrent = _requested_torrent(request)
    flag = request.query.get("delete_files", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, "delete_files must be true or false")
    delete_files = flag in ("true", "1")
    await request.app[ENGINE].remove(torrent, delete_files)
    return _json({"detail": f"removed {torrent.infohash}"
                  + (" and its files" if delete_files else "")})


@routes.put("/torrents/{infohash}/pause")
async def pause_torrent(request):
    """Pause a torrent; pausing a paused torrent is fine."""
    torrent = _requested_torrent(request)
    await request.app[ENGINE].pause(torrent)
    return _json({"detail": f"paused {torrent.infohash}"})


@routes.put("/torrents/{infohash}/resume")
async def resume_torrent(request):
    """Resume a torrent; resuming a running torrent is fine."""
    torrent = _requested_torrent(request)
    await request.app[ENGINE].resume(torrent)
    return _json({"detail": f"resumed {torrent.infohash}"})


@routes.get("/health")
async def health(request):
    """Liveness: answers as soon as the API is up, even while torrents load."""
    engine = request.app[ENGINE]
    return _json({"status": "ok", "torrents": engine.count(), "loading": engine.loading,
                  "listen_port": engine.listen_port})


@routes.get("/openapi.json")
async def openapi(request):
    """This API as an OpenAPI 3.1 document."""
    return _json(OPENAPI)


# --------------------------------------------------------------------------- #
# API description (OpenAPI)
# --------------------------------------------------------------------------- #

def _typed(kind, nullable=False, **extra):
    return {"type": [kind, "null"] if nullable else kind, **extra}


def _ref(name, kind="schemas"):
    return {"$ref": f"#/components/{kind}/{name}"}


def _object(properties):
    """A closed object: every property required, nothing else allowed."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _answer(description, schema, headers=None, links=None):
    response = {"description": description,
                "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return response


def _operation(operation_id, summary, responses, errors=(), **extra):
    """A protected operation: the token, and the refusals every protected route gives."""
    codes = (400, *errors, 401, 403)
    return {"operationId": operation_id, "summary": summary, **extra, "responses": {
        **responses, **{str(code): _ref(str(code), "responses") for code in codes}}}


def _public(operation_id, summary, schema):
    """An operation anyone may call; only the browser defences apply."""
    return {"operationId": operation_id, "summary": summary, "security": [], "responses": {
        "200": _answer(summary, schema), "403": _ref("403", "responses")}}


def _query(name, description, **schema):
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": _typed("string", **schema)}


def _torrent_action(operation_id, summary, *query):
    """PUT pause/resume and DELETE: they name a torrent and wait for libtorrent."""
    return _operation(operation_id, summary, {"200": _answer("done", _ref("Message"))},
                      (404, 503), parameters=[_INFOHASH_PARAMETER, *query])


_COUNT = _typed("integer", minimum=0)
_EPOCH = _typed("integer", nullable=True, description="Unix time, or null if never")
_NULLABLE_COUNT = _typed("integer", nullable=True, minimum=0)
_TORRENT_ID = _typed("string", pattern="^[0-9a-f]{40}([0-9a-f]{24})?$",
                     description="v1 infohash (40 hex digits), or v2 (64) if it has no v1")
_INFOHASH_PARAMETER = {
    "name": "infohash", "in": "path", "required": True,
    "description": "v1 or v2 infohash, any case",
    "schema": _typed("string", pattern="^[0-9a-fA-F]{40}([0-9a-fA-F]{24})?$")}
_ADD_FIELDS = {
    "torrent_url": _typed("string", description="a magnet link or an http(s) URL of a "
                          ".torrent; give this or torrent_file"),
    "save_path": _typed("string", description="relative to the download directory, or "
                        "absolute inside it or an --allowed-save-root"),
}
_ADD_FORM = {"type": "object", "properties": _ADD_FIELDS, "additionalProperties": False}
_ADD_UPLOAD = {**_ADD_FORM, "properties": {**_ADD_FIELDS, "torrent_file": _typed(
    "string", contentMediaType="application/x-bittorrent",
    description=f"a .torrent file of at most {MAX_TORRENT_BYTES} bytes")}}
#: What a client can do next with the infohash that POST /torrents answers.
_ADDED_LINKS = {name: {"operationId": name,
                       "parameters": {"infohash": "$response.body#/infohash"}}
                for name in ("getTorrent", "pauseTorrent", "resumeTorrent", "deleteTorrent")}
_ADDED_HEADERS = {"Location": {"required": True, "schema": _typed("string")}}
#: Every field of a torrent's status, as status_fields, _Torrent.update and
#: _metadata_fields produce it; the metadata ones are null until metadata arrives.
_STATUS = _object({
    "infohash": _TORRENT_ID,
    **{name: _typed("boolean") for name in (*FLAG_FIELDS, "queued")},
    "state": _typed("string", enum=sorted(
        str(state) for state in lt.torrent_status.states.values.values())),
    **{name: _typed("boolean") for name in ("is_seeding", "is_finished", "has_metadata")},
    "progress": _typed("number", minimum=0, maximum=100, description="percent"),
    "error": _typed("string", description="empty when there is none"),
    **{name: _COUNT for name in (
        "download_rate", "upload_rate", "total_download", "total_upload",
        "all_time_download", "all_time_upload", "num_peers", "list_peers", "list_seeds",
        "connect_candidates", "num_pieces", "total_done", "total_wanted_done",
        "total_wanted")},
    "distributed_copies": _typed("number", description="-1 while seeding"),
    **{name: _typed("integer", description="-1 when unknown")
       for name in ("num_seeds", "num_complete", "num_incomplete")},
    "last_seen_complete": _EPOCH,
    "last_scrape": _typed("integer", nullable=True, minimum=0,
                          description="seconds since a tracker last reported swarm counts"),
    "time_since_upload": _NULLABLE_COUNT, "time_since_download": _NULLABLE_COUNT,
    **{name: _COUNT for name in ("active_time", "finished_time", "seeding_time")},
    "seed_rank": _typed("integer"), "has_incoming": _typed("boolean"),
    "priority": _typed("integer", description="same as queue_position"),
    "queue_position": _typed("integer", description="-1 for seeds"),
    "added_time": _typed("integer", description="Unix time"), "completed_time": _EPOCH,
    "storage_mode": _typed("string", enum=["allocate", "sparse"]),
    "save_path": _typed("string"), "name": _typed("string"),
    "info_hash_v1": _typed("string", nullable=True),
    "info_hash_v2": _typed("string", nullable=True),
    **{name: _NULLABLE_COUNT
       for name in ("total_size", "num_files", "total_pieces", "piece_length")},
    "creation_date": _EPOCH,
    "creator": _typed("string", nullable=True), "comment": _typed("string", nullable=True),
    "files": _typed("array", nullable=True, items=_ref("FileEntry")),
})

#: The API description served at /openapi.json. test_torrentflow.py checks that it
#: names every route, and that real answers match its schemas.
OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "TorrentFlow", "version": __version__, "description":
             "A BitTorrent daemon driven by an HTTP JSON API. Every error answers "
             "{\"detail\": \"...\"}; unknown request fields are refused with 400."},
    "security": [{"bearerAuth": []}],
    "paths": {
        "/torrents": {
            "post": _operation(
                "addTorrent", "Add a magnet link, an http(s) .torrent URL or an upload",
                {"201": _answer("added", _ref("Added"), _ADDED_HEADERS, _ADDED_LINKS),
                 "200": _answer("already present", _ref("Added"), _ADDED_HEADERS,
                                _ADDED_LINKS)},
                (413, 415, 422, 502, 503),
                requestBody={"required": True, "content": {
                    "multipart/form-data": {"schema": _ADD_UPLOAD},
                    "application/x-www-form-urlencoded": {"schema": _ADD_FORM},
                    "application/json": {"schema": _ADD_FORM, "example": {
                        "torrent_url": "magnet:?xt=urn:btih:" + "0123456789" * 4,
                        "save_path": "example"}},
                }}),
            "get": _operation(
                "listTorrents", "Torrents' status: filtered, sorted, paged, trimmed",
                {"200": _answer("the torrents", _ref("TorrentList"))},
                parameters=[_query("state", "only these states, comma-separated"),
                            _query("paused", "only paused (true) or running (false) ones",
                                   enum=["true", "false"]),
                            _query("sort", "a status field; a leading - sorts descending"),
                            _query("limit", "at most this many", pattern="^[0-9]+$"),
                            _query("offset", "skip this many first", pattern="^[0-9]+$"),
                            _query("fields", "only these status fields, comma-separated")]),
        },
        "/torrents/{infohash}": {
            "get": _operation("getTorrent", "One torrent's status",
                              {"200": _answer("its status", _ref("Status"))}, (404,),
                              parameters=[_INFOHASH_PARAMETER]),
            "delete": _torrent_action(
                "deleteTorrent", "Remove a torrent, and its data with delete_files=true",
                _query("delete_files", "true also deletes the data; case-insensitive",
                       enum=["true", "false", "1", "0"], default="false")),
        },
        "/torrents/{infohash}/pause": {"put": _torrent_action("pauseTorrent", "Pause it")},
        "/torrents/{infohash}/resume": {"put": _torrent_action("resumeTorrent", "Resume it")},
        "/health": {"get": _public("health", "Liveness; needs no token", _ref("Health"))},
        "/openapi.json": {"get": _public("openapi", "This document; needs no token",
                                         {"type": "object"})},
    },
    "components": {
        "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "--token, --token-file or TORRENTFLOW_TOKEN. Without one no "
            "token is asked for, but only requests addressed to localhost are served."}},
        "schemas": {
            "Error": _object({"detail": _typed("string")}),
            "Message": _object({"detail": _typed("string")}),
            "Added": _object({"infohash": _TORRENT_ID}),
            "Health": _object({"status": _typed("string", enum=["ok"]), "torrents": _COUNT,
                               "loading": _typed("boolean"), "listen_port": _COUNT}),
            "TorrentList": _object({"torrents": _typed("array", items=_ref("StatusFields")),
                                    "total": _typed("integer", minimum=0, description=
                                                    "matching torrents before paging")}),
            "Status": _STATUS,
            "StatusFields": {**_STATUS, "required": [], "description":
                             "every Status field, or those named by ?fields="},
            "FileEntry": _object({
                "index": _COUNT, "path": _typed("string"), "size": _COUNT,
                "downloaded": _COUNT, "progress": _typed("number", minimum=0, maximum=100),
                "priority": _typed("integer", minimum=0, maximum=7)}),
        },
        "responses": {str(code): _answer(description, _ref("Error"), headers)
                      for code, description, headers in (
            (400, "malformed request, unknown field or bad value", None),
            (401, "missing or wrong bearer token",
             {"WWW-Authenticate": {"required": True, "schema": _typed("string")}}),
            (403, "a cross-site browser request, or a Host other than localhost while "
                  "no token is set", None),
            (404, "no such torrent", None),
            (413, "body, upload or fetched .torrent too large", None),
            (415, "unsupported Content-Type", None),
            (422, "not a valid, or not a safe, .torrent", None),
            (502, "fetching torrent_url failed", None),
            (503, "libtorrent did not confirm the change in time (a lost alert); retry", None),
        )},
    },
}


# --------------------------------------------------------------------------- #
# Application
# --------------------------------------------------------------------------- #

def make_app(config):
    """Build the aiohttp application; the engine starts and stops with it."""
    app = web.Application(middlewares=[error_middleware, access_middleware],
                          client_max_size=MAX_REQUEST_BYTES)
    app[CONFIG] = config
    app.add_routes(routes)

    async def lifecycle(app):
        engine = TorrentEngine(config)
        await engine.start()
        app[ENGINE] = engine
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.fetch_timeout),
            headers={"User-Agent": f"TorrentFlow/{__version__}"},
        ) as client:
            app[HTTP_CLIENT] = client
            yield
        await engine.close()

    app.cleanup_ctx.append(lifecycle)
    return app


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

async def serve(config):
    """Run until SIGTERM or SIGINT, then shut down in order: requests, torrents, session."""
    runner = web.AppRunner(make_app(config), access_log=None,
                           shutdown_timeout=REQUEST_DRAIN_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    for host, port, *_ in runner.addresses:
        log.info("TorrentFlow %s API listening on http://%s:%d", __version__,
                 f"[{host}]" if ":" in host else host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    started = time.monotonic()
    await runner.cleanup()
    log.info("stopped in %.2f s", time.monotonic() - started)


def main(argv=None):
    """Entry point: parse the config, log to stderr, serve."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level != "debug":
        # aiohttp logs every malformed request with a traceback at ERROR: anyone who
        # can connect could fill the log. Handler errors are logged by error_middleware.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    try:
        import uvloop  # optional: about 1.6x the requests per second of asyncio's loop
    except ImportError:
        uvloop = None
    log.info("event loop: %s", "uvloop" if uvloop else "asyncio (install uvloop for speed)")
    try:
        (uvloop.run if uvloop else asyncio.run)(serve(config))
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
