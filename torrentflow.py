"""TorrentFlow: a BitTorrent daemon driven by an HTTP JSON API.

One process runs one libtorrent session behind a JSON API: add, inspect, pause, resume and
remove torrents, and /health; extensions add listing queries (filter, sort, page, fields),
per-torrent control and /settings, peer and tracker views, prompt queue starts and paced
checks, /events with webhooks, /metrics, Transmission's RPC, a disk watch, streaming a file
while it downloads, and GET /openapi.json, which describes every route. README.md is the manual.

Run ``python torrentflow.py --local-only`` to try it on one machine, or leave out
--local-only to join the public swarm; ``--help`` lists every option. Each option is also
read from the environment as TORRENTFLOW_<OPTION> (TORRENTFLOW_TOKEN, TORRENTFLOW_PORT...);
the command line wins. With a token set, every request but GET /health and /openapi.json
must carry ``Authorization: Bearer <token>``; without one the daemon refuses to listen
beyond loopback and answers only requests addressed to localhost. Cross-site browser
requests are always refused. A torrent is saved in the state directory before the API
confirms it, and again whenever it changes.

The map, top to bottom; the core first, in order of trust:

    Constants, Configuration   limits with their reasons; OPTIONS -> argparse, Config
    Unauthenticated reach      connection guard, access checks, public routes, /health
    What strangers control     hashes, save paths, magnets, .torrent files, URL fetches;
                               metadata, trackers and DHT nodes from peers
    The state directory        StateStore, and the checks on what it gives back
    Status                     the STATUS table -> status dicts, and their JSON
    Engine                     TorrentEngine, the one owner of the libtorrent session
    HTTP API                   request bodies; add, list, status, pause, resume, remove
    Application                make_app, serve, main

Then the line "The core ends here", and one section per extension: each adds rows to the
core's tables (ROUTES via @api, OPTIONS, STATUS, NOTES, ADD_FIELDS, QUERIES), a setup function
to EXTENSIONS and listeners to the engine (listen, on_alert); the core never names one. The
API description comes first: it completes each ROUTES row into OpenAPI, in words (_answer,
_query, INFOHASH_PARAMETER...) that the extensions after it describe their routes with.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import aiohttp
import libtorrent as lt
from aiohttp import web

__version__ = "0.2.0"

log = logging.getLogger("torrentflow")


# --------------------------------------------------------------------------- #
# Constants
# --------------------------------------------------------------------------- #

MAX_TORRENT_BYTES = 10 * 1024 * 1024  #: largest .torrent, by upload or URL; real ones: a few MB
MAX_REQUEST_BYTES = MAX_TORRENT_BYTES + 64 * 1024  #: one .torrent plus form overhead, no more
MAX_FORM_BYTES = 64 * 1024  #: JSON and urlencoded bodies hold a URL and a path, no more
MAX_TORRENT_FILES = 100_000  #: more than any real torrent has; every status lists them all
#: Trackers and web seeds per torrent: libtorrent's cost of adding grows with the square.
MAX_TRACKERS = 200
MAX_WEB_SEEDS = 100
MAX_TEXT = 4096  #: characters kept of a torrent's free text (comment, creator, dn=)
MAX_LOGGED = 300  #: characters of any one value in a log line; longer ones are cut
MIN_TOKEN_LENGTH = 16  #: shorter tokens can be guessed by a client free to try at will
#: Limits handed to libtorrent's bdecoder, so a crafted file cannot exhaust memory or stack.
TORRENT_LIMITS = {"max_buffer_size": MAX_TORRENT_BYTES, "max_pieces": 2_000_000,
                  "max_decode_depth": 100, "max_decode_tokens": 3_000_000}
FETCH_MAX_REDIRECTS = 5  #: indexers redirect once or twice; more is a loop or an attack
STATUS_INTERVAL = 0.5  #: seconds between status updates; state changes refresh at once
TIMES_INTERVAL = 60.0  #: seconds between updates of an idle torrent's time counters
LOAD_BATCH = 200  #: saved torrents added per batch at start, so requests are served between
HEAD_TIMEOUT = 5.0  #: seconds a new API connection has for its head, so half-open ones go
KEEPALIVE_TIMEOUT = 15.0  #: seconds an idle keep-alive API connection stays open
BODY_TIMEOUT = 30.0  #: seconds a request body may take to arrive, in all: 10 MiB at 350 kB/s
BODY_BUDGET = 64 * 1024 * 1024  #: bytes of bodies read at once, all clients; past it 503
#: Answers from LARGE_BODY bytes: LARGE_AT_ONCE at once, WRITE_PIECE per send, so the loop runs.
LARGE_BODY = 256 * 1024
LARGE_AT_ONCE = 4
WRITE_PIECE = 512 * 1024
JSON_SLICE = 500  #: file entries per json.dumps call (see _json), so the loop gets the GIL
LISTEN_BACKLOG = 128  #: connections the kernel queues for the API before we accept them
REQUEST_DRAIN_SECONDS = 1.0  #: for in-flight requests at stop; all but URL fetches take ms
SHUTDOWN_MARGIN = 2.0  #: seconds past --shutdown-timeout after which a hung stop exits
STOP_TRACKER_TIMEOUT = 1  #: s for trackers' "stopped" (GIL held); a stop must fit a 10 s grace
ALERT_WAIT = 30.0  #: longest wait for libtorrent's confirmation, so a lost alert cannot hang
FLUSH_WAIT = 10.0  #: longest a finished torrent shows unfinished while a flush never reports
RETRY_AFTER = {"Retry-After": "1"}  #: what a 503 tells: libtorrent answers in milliseconds
RESUME_NOT_MODIFIED = 143  #: libtorrent's "resume data not modified": not a failure
NOTES_KEY = b"x-torrentflow"  #: our key in resume files; it sorts last: bencoding stays canonical
CLEAN_MARK = "clean-shutdown"  #: state file whose presence says the last run saved all

#: Alerts the daemon acts on. The *_log categories would flood the queue.
ALERT_MASK = (lt.alert_category.error | lt.alert_category.status
              | lt.alert_category.storage | lt.alert_category.tracker)
#: Resume data with the info dict (a magnet's metadata), once pending writes reach the disk.
SAVE_FULL = lt.save_resume_flags_t.save_info_dict | lt.save_resume_flags_t.flush_disk_cache
#: The same, skipped (error 143) when nothing changed since the last save.
SAVE_IF_MODIFIED = SAVE_FULL | lt.save_resume_flags_t.only_if_modified


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

def _seconds(text):
    seconds = float(text)
    if not 0 < seconds < 86400:
        raise ValueError("give a number of seconds above 0 and under 86400")
    return seconds


def _host(text):
    """An IP address or localhost: a name that DNS resolves could point anywhere."""
    if text.lower() == "localhost":
        return "localhost"
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ValueError("give an IP address (0.0.0.0 or :: for every interface) or "
                         "localhost") from None


def _boolean(value):
    """true or false; as text also 1/0, yes/no or on/off."""
    if isinstance(value, str):
        value = {"1": True, "true": True, "yes": True, "on": True, "0": False,
                 "false": False, "no": False, "off": False}.get(value.strip().lower(), value)
    if not isinstance(value, bool):
        raise TypeError("must be true or false (or 1 or 0)")
    return value


def _number(kind, low, *special, high=2**31 - 1):  # libtorrent's numbers are 32-bit
    """A parser of numbers of kind (int or float) from low to high, or one of special."""
    def parse(value):
        if isinstance(value, str) and value.isascii() and "_" not in value:  # not "1_0", "١"
            with contextlib.suppress(ValueError):  # text that is no number: the TypeError below
                value = kind(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)):
            raise TypeError(f"must be a {'whole number' if kind is int else 'number'}")
        # low <= value first: math.isfinite(10 ** 400) raises OverflowError.
        if value not in special and not (low <= value <= high and math.isfinite(value)):
            raise ValueError("must be " + "".join(f"{s} or " for s in special)
                             + f"from {low} to {high}")
        return kind(value)
    return parse


_port = _number(int, 0, high=65535)


def _choice(*names):
    """One of names, case-insensitive."""
    def parse(text):
        if not isinstance(text, str):
            raise TypeError("must be a string")
        if text.lower() not in names:
            raise ValueError(f"give one of {', '.join(names)}")
        return text.lower()
    parse.choices = names
    return parse


def _absolute_path(text):
    if not os.path.isabs(text):
        raise ValueError("give an absolute path")
    return Path(text)


def _interfaces(text):
    """(address, port) of each ADDRESS:PORT entry of a listen_interfaces string."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        address, _, port = item.rpartition(":")
        yield address.strip("[]"), port


def _listen_interfaces(text):
    """ADDRESS:PORT,... as libtorrent expects it."""
    for address, port in _interfaces(text):
        if not address:
            raise ValueError("give ADDRESS:PORT entries separated by commas")
        _port(port.rstrip("sS"))  # a trailing s asks libtorrent for TLS on that port
    return text


def _is_loopback_interfaces(text):
    """True when every listen interface is a loopback address (not a device name)."""
    try:
        return all(ipaddress.ip_address(address).is_loopback for address, _ in _interfaces(text))
    except ValueError:  # a device name such as eth0
        return False


def _is_loopback_name(host):
    """True for "localhost" and loopback addresses: no DNS-rebinding page can use them."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration option: a flag, an environment variable and a Config field."""

    name: str
    parse: object          # text -> value; raises ValueError with a plain message
    default: object
    help: str
    repeat: str = ""       # for repeatable options, the separator in the environment
    flag_name: str = ""    # the flag, when not --<name> (one flag of a repeatable list)
    setting: str = ""      # its key in GET/PATCH /settings, if it can change at run time
    schema: object = None  # and the JSON schema of its value there
    pack: str = ""         # and its name in libtorrent's settings_pack, if libtorrent holds it
    secret: bool = False   # out of repr(), so no log shows it; --<name>-file reads it too
    check: object = None   # (every value) -> why this value does not fit the others, or None
    shown: object = repr   # the value as a start error quotes it; a mask hides a secret

    @property
    def flag(self):
        return "--" + (self.flag_name or self.name.replace("_", "-"))

    @property
    def env(self):
        return "TORRENTFLOW_" + self.name.upper()


#: Every option: argparse, the environment lookup, Config and the README's table (a test
#: holds it to them) come from here. Extensions add rows.
OPTIONS = [
    Option("host", _host, "127.0.0.1", "address the API listens on; beyond loopback a token "
           "is required"),
    Option("port", _port, 8080, "API port; 0 picks a free one"),
    Option("download_dir", Path, Path("downloads"), "where torrents are saved; every "
           "save_path must stay inside it or an allowed save root"),
    Option("state_dir", Path, Path("state"), "where resume data is kept"),
    Option("listen_interfaces", _listen_interfaces, "0.0.0.0:6881,[::]:6881", "BitTorrent "
           "listen addresses, ADDRESS:PORT,... (127.0.0.1:6881 with --local-only)"),
    Option("dht", _boolean, True, "the distributed hash table, for trackerless torrents "
           "and magnets"),
    Option("lsd", _boolean, False, "local service discovery (multicast on the LAN)"),
    Option("upnp", _boolean, False, "UPnP port mapping on the router"),
    Option("natpmp", _boolean, False, "NAT-PMP port mapping on the router"),
    Option("local_only", _boolean, False, "keep all BitTorrent traffic on loopback: DHT, "
           "LSD, UPnP and NAT-PMP off, listen on 127.0.0.1, peers and trackers outside "
           "127.0.0.0/8 and ::1 blocked"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info",
           "log verbosity on stderr"),
    #: A crash loses at most this much progress; libtorrent's own example saves as often.
    Option("save_interval", _seconds, 30.0, "seconds between saves of changed torrents"),
    #: Saving at SIGTERM must end inside the 10 s that Docker and Kubernetes allow.
    Option("shutdown_timeout", _seconds, 8.0, "seconds allowed for saving every torrent "
           "on SIGTERM; keep it under your container's stop grace"),
    #: A silent server must not hold a request (and its memory) forever.
    Option("fetch_timeout", _seconds, 30.0, "seconds allowed for downloading a "
           "torrent_url, redirects included"),
    Option("token", str, None, "API token: every request but GET /health and "
           "/openapi.json must send 'Authorization: Bearer TOKEN'. Other users can read "
           "command lines, so prefer the environment or --token-file", secret=True,
           check=lambda values: _token_problem(values["token"])),
    Option("token_file", Path, None, "read the API token from this file at start, for "
           "example a Docker secret (/run/secrets/...)"),
    Option("insecure_no_auth", _boolean, False, "serve the API without a token on a "
           "non-loopback --host; only when something else guards the port"),
    #: Each API connection costs a descriptor; the rest go to peers and files.
    Option("max_connections", _number(int, 1), 256, "simultaneous API connections; past it, the "
           "oldest one still sending its request head, else the longest-idle one, is closed"),
    Option("allowed_save_roots", _absolute_path, (), "a directory an absolute save_path "
           "may point into, besides --download-dir; repeat for more", repeat=":",
           flag_name="allowed-save-root"),
]


class Config:
    """What the daemon reads from the outside world at start: one frozen field per OPTIONS row."""

    def __init__(self, **values):
        unknown = set(values) - {option.name for option in OPTIONS}
        if unknown:
            raise TypeError(f"unknown option {sorted(unknown)[0]!r}")
        self.__dict__.update({option.name: option.default for option in OPTIONS}, **values)

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other):
        return isinstance(other, Config) and vars(self) == vars(other)

    def __repr__(self):
        shown = (f"{o.name}={getattr(self, o.name)!r}" for o in OPTIONS if not o.secret)
        return f"Config({', '.join(shown)})"


class _Parser(argparse.ArgumentParser):
    """argparse, with an error that is one line and a pointer to --help, not the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\nsee {self.prog} --help\n")


def _shown(value):
    """An option's default as --help and the README show it."""
    if value in (None, ()):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _option_parser():
    """argparse for OPTIONS; values stay text here and are parsed once, in parse_config."""
    parser = _Parser(
        "torrentflow.py", description="TorrentFlow: a BitTorrent daemon with an HTTP JSON API.",
        epilog="Every option also reads TORRENTFLOW_<NAME> from the environment (for "
        "example TORRENTFLOW_PORT); the command line wins. See README.md.")
    parser.add_argument("--version", action="version", version=f"TorrentFlow {__version__}")
    for option in OPTIONS:
        choices = getattr(option.parse, "choices", None)
        text = (option.help + (f": {', '.join(choices)}" if choices else "")
                + f" (default {_shown(option.default)}; {option.env})")
        if option.parse is _boolean:
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(option.flag, action="append" if option.repeat else None,
                                dest=option.name, metavar=option.name.upper(), help=text)
    return parser


def _option_values(parser, args, environ):
    """Each option's value (the flag, else the environment, else the default); names given."""
    values, given_names = {}, set()
    for option in OPTIONS:
        given, source = getattr(args, option.name), option.flag
        if given is None and environ.get(option.env):
            given, source = environ[option.env], option.env
            if option.repeat:
                given = [part for part in given.split(option.repeat) if part]
        if given is None:
            values[option.name] = option.default
            continue
        given_names.add(option.name)
        try:  # a repeated value counts once: the same webhook twice would post twice
            values[option.name] = (tuple(dict.fromkeys(map(option.parse, given)))
                                   if option.repeat else option.parse(given))
        except (ValueError, TypeError) as error:
            parser.error(f"{source} ({option.flag} / {option.env}): "
                         f"{option.shown(given)} is not valid: {error}")
    return values, given_names


def _read_secret(parser, values, option):
    """A secret from --NAME or --NAME-file (read here, once), or None."""
    secret, path = values[option.name], values[f"{option.name}_file"]
    flag, env = option.flag, option.env
    if secret is not None and path is not None:
        parser.error(f"give {flag} or {flag}-file ({env} or {env}_FILE), not both")
    if path is not None:
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"{flag}-file ({env}_FILE): cannot read {path}: "
                         f"{getattr(error, 'strerror', None) or error}")
        if not secret:
            parser.error(f"{flag}-file ({env}_FILE): {path} is empty")
    return secret


def _token_problem(token):
    """Why a token is too weak, or None; in an HTTP header only visible ASCII is safe."""
    if token is not None and (len(token) < MIN_TOKEN_LENGTH
                              or not all("!" <= c <= "~" for c in token)):
        return (f"the token must be at least {MIN_TOKEN_LENGTH} visible ASCII characters "
                "without spaces; `openssl rand -hex 32` makes a good one")
    return None


def parse_config(argv=None, environ=None):
    """Build the Config from argv and the environment; a bad value exits with status 2."""
    environ = os.environ if environ is None else environ
    parser = _option_parser()
    values, given = _option_values(parser, parser.parse_args(argv), environ)
    if values["local_only"]:
        for name in ("dht", "lsd", "upnp", "natpmp"):
            if name in given and values[name]:
                parser.error(f"--local-only cannot be combined with --{name}")
            values[name] = False
        if "listen_interfaces" not in given:
            values["listen_interfaces"] = "127.0.0.1:6881"
        elif not _is_loopback_interfaces(values["listen_interfaces"]):
            parser.error("--local-only needs loopback --listen-interfaces, "
                         f"not {values['listen_interfaces']!r}")
    for option in OPTIONS:
        if option.secret:
            values[option.name] = _read_secret(parser, values, option)
        if problem := option.check and option.check(values):
            parser.error(f"{option.flag} ({option.env}): {problem}")
    if (values["token"] is None and not values["insecure_no_auth"]
            and not _is_loopback_name(values["host"])):
        parser.error(
            f"refusing to serve the API on {values['host'] or 'every interface'} without a "
            "token: anyone who can reach the port could download anything and write files. "
            "Set TORRENTFLOW_TOKEN (or --token-file / TORRENTFLOW_TOKEN_FILE, e.g. a Docker "
            "secret) to a random string such as the output of `openssl rand -hex 32`, or "
            "pass --insecure-no-auth if something else guards the port")
    return Config(**values)


def session_settings(config):
    """The libtorrent settings_pack for this config (the benchmark reuses it)."""
    settings = {
        "listen_interfaces": config.listen_interfaces, "enable_dht": config.dht,
        "enable_lsd": config.lsd, "enable_upnp": config.upnp, "enable_natpmp": config.natpmp,
        # A taken port must stop the start, not become another: peers knock at the forwarded one.
        "max_retry_port_bind": 0, "listen_system_port_fallback": False,
        # Bursts of state changes must not push out the alerts that resolve requests.
        "alert_mask": int(ALERT_MASK), "alert_queue_size": 10000,
        "stop_tracker_timeout": STOP_TRACKER_TIMEOUT,
        "user_agent": f"TorrentFlow/{__version__} libtorrent/{lt.__version__}",
        "peer_fingerprint": lt.generate_fingerprint("TF", *map(int, __version__.split(".")), 0),
        "hashing_threads": 2,  # verifying pieces is a fast download's CPU bottleneck
        "max_metadata_size": MAX_TORRENT_BYTES,  # a magnet's metadata is a stranger's
        # Never: libtorrent would also free a magnet held in upload mode (_add); an
        # extension may retry a disk error itself, knowing which torrents are held.
        "optimistic_disk_retry": 10 * 365 * 86400,
    }
    if config.local_only:
        # uTP over loopback collapses to a few MB/s; local peers share 127.0.0.1 (tell them
        # apart by port) and are all ours: redial at once, not after the 60 s strangers get.
        settings.update(dht_bootstrap_nodes="", enable_outgoing_utp=False,
                        allow_multiple_connections_per_ip=True, min_reconnect_time=1)
    return settings


# --------------------------------------------------------------------------- #
# What an unauthenticated connection reaches: the connection guard, the access
# checks, the route table and its public routes (/health; /openapi.json after the seam)
# --------------------------------------------------------------------------- #

class ApiError(Exception):
    """A failure the client caused or must know about; becomes {"detail": ...}."""

    def __init__(self, status, detail, headers=None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


ENGINE = web.AppKey("engine", "TorrentEngine")
CONFIG = web.AppKey("config", Config)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
REQUESTS = web.AppKey("requests", collections.Counter)
LARGE_WRITES = web.AppKey("large_writes", asyncio.Semaphore)
BODIES = web.AppKey("bodies", collections.Counter)  # "bytes": of bodies being read

#: Route path prefixes whose clients send only a user and password -> their 401's realm; there
#: HTTP Basic with the token as the password (any user name) is taken too. Extensions add rows.
BASIC_REALMS = {}

#: Requests anyone may make: a health check cannot carry a secret; the API description has none.
PUBLIC_ROUTES = {("GET", "/health"), ("GET", "/openapi.json")}


def served(app, method, path, handler, public=None):
    """handler behind the access checks, every error as {"detail": ...}, answers counted."""
    public = (method, path) in PUBLIC_ROUTES if public is None else public
    route = re.sub(r":[^}]*}", "}", path)  # its label: aiohttp's {path:.*} is {path}
    config, counts = app[CONFIG], app[REQUESTS]
    realm = next((name for prefix, name in BASIC_REALMS.items() if path.startswith(prefix)), None)

    async def serve(request):
        try:
            _check_access(request, config, public, realm)
            response = await handler(request)
        except ApiError as error:
            response = web.json_response({"detail": error.detail}, status=error.status,
                                         headers=error.headers)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            # Keep headers that carry meaning (Allow on 405), not the text body's type.
            response = web.json_response({"detail": error.reason}, status=error.status,
                                         headers={k: v for k, v in error.headers.items()
                                                  if k.lower() != "content-type"})
        except web.RequestPayloadError as error:  # such as a body that does not decompress
            reason = str(error).splitlines()[-1].strip()  # aiohttp's is "400, message:\n ..."
            response = web.json_response({"detail": f"malformed request body: {reason}"},
                                         status=400)
        except ConnectionResetError:  # the client hung up mid-body: nobody to answer
            log.info("the client of %s %s hung up", request.method, request.path)
            response = web.json_response({"detail": "the client hung up"}, status=400)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = web.json_response({"detail": "internal server error"}, status=500)
        counts[route, response.status] += 1
        return response
    return serve


async def _no_route(request):
    """404, or 405 with Allow; needs no token, as the routes are public in /openapi.json."""
    allowed = set()
    for candidate in request.app.router.resources():
        match, methods = await candidate.resolve(request)
        allowed |= methods if match is None and "*" not in methods else set()
    if allowed:
        raise ApiError(405, "Method Not Allowed", {"Allow": ",".join(sorted(allowed))})
    raise ApiError(404, "Not Found")


def _check_access(request, config, public, realm):
    """Refuse cross-site requests; without a token set, foreign Hosts; with one, no token."""
    if reason := _cross_site(request):
        raise ApiError(403, f"cross-site request refused: {reason}")
    if config.token is None:
        if not _host_allowed(request.headers.get("Host"), config.insecure_no_auth):
            raise ApiError(403, "without an API token only requests to localhost or a "
                           "loopback address are served (this blocks DNS rebinding); set a "
                           "token to use another name")
    elif not public:
        if failure := _bearer_error(request, config.token, realm):
            raise ApiError(401, failure[0], {"WWW-Authenticate": failure[1]})


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


def _bearer_error(request, token, realm=None):
    """(detail, challenge) when the request lacks the token, or None; with a realm, Basic too."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if realm and scheme.lower() == "basic":
        try:
            given = base64.b64decode(given.strip(), validate=True).decode().partition(":")[2]
        except ValueError:  # not base64 of user:password, such as the raw token
            given = ""
    elif scheme.lower() != "bearer":
        given = ""
    challenge = f'Basic realm="{realm}"' if realm else 'Bearer realm="torrentflow"'
    if not given.strip():
        return "this API needs the header Authorization: " + (
            "Basic, the token as the password" if realm else "Bearer <token>"), challenge
    # Constant time, so response timing does not reveal how much of a guess was right.
    if hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        return None
    return "invalid token", challenge + ('' if realm else ', error="invalid_token"')


class _Connection(asyncio.Protocol):
    """An API connection, aiohttp's inside; state is head, ready (head in), busy or idle."""

    def __init__(self, guard):
        self.guard, self.inner, self.transport = guard, guard.server(), None
        self.state, self.head_since, self.tail = "head", time.monotonic(), b""
        # The rest of the protocol is aiohttp's own.
        self.eof_received, self.pause_writing, self.resume_writing = (
            self.inner.eof_received, self.inner.pause_writing, self.inner.resume_writing)

    def connection_made(self, transport):
        self.transport = transport
        self.inner.connection_made(transport)
        self.guard.admit(self)

    def data_received(self, data):
        if self.state in ("head", "idle"):
            if self.state == "idle":
                self.state, self.head_since, self.tail = "head", time.monotonic(), b""
                self.guard.idle.pop(self, None)
            # A head ends with CRLF CRLF after a request line: aiohttp skips blank lines
            # before one, so bare CRLFs must not shield a connection from eviction.
            text = self.tail + data if self.tail else data.lstrip(b"\r\n")
            if b"\r\n\r\n" in text:  # the head is in: never evicted now
                self.state, self.tail = "ready", b""
            else:
                self.tail = text[-3:]
        self.inner.data_received(data)

    def connection_lost(self, exc):
        self.guard.forget(self)
        self.inner.connection_lost(exc)


class ConnectionGuard:
    """The API socket's protocol factory: bounds what idle and half-open connections hold."""

    def __init__(self, server, limit):
        self.server, self.limit = server, limit
        self.connections = {}   # _Connection -> None, oldest first
        self.idle = {}          # the idle ones -> None, longest idle first
        self._by_handler = {}   # aiohttp's protocol -> _Connection
        self._dropped = 0       # since the last log line
        server.request_handler = self._tracked(server.request_handler)

    def __call__(self):
        return _Connection(self)

    def admit(self, connection):
        self.connections[connection] = None
        self._by_handler[connection.inner] = connection
        if len(self.connections) > self.limit:
            # Drop the oldest still sending its head, else the longest idle, else this one: a
            # request in or running is never dropped, so a client with a token gets through.
            heads = (c for c in self.connections if c.state == "head" and c is not connection)
            self.drop(next(heads, None) or next(iter(self.idle), connection))

    def forget(self, connection):
        self.connections.pop(connection, None)
        self.idle.pop(connection, None)
        self._by_handler.pop(connection.inner, None)

    def drop(self, connection):
        self.forget(connection)
        connection.transport.abort()  # frees the descriptor now, without TIME_WAIT
        self._dropped += 1

    def _tracked(self, handle):
        """aiohttp's request handler, telling each connection when a request runs."""
        async def tracked(request):
            connection = self._by_handler.get(request.protocol)
            if connection is not None:
                connection.state = "busy"
            try:
                response = await handle(request)
                # Near the cap, a stranger's socket is not kept for its next request.
                if len(self.connections) * 4 >= self.limit * 3 and (
                        response.status == 401 or "Authorization" not in request.headers):
                    response.force_close()
                return response
            finally:
                if connection is not None and connection in self.connections:
                    connection.state = "idle"
                    self.idle[connection] = None
        return tracked

    async def sweep(self):
        """Close connections slow to send a head; log drops at most every 10 s."""
        reported = time.monotonic()
        while True:
            await asyncio.sleep(1)
            late = time.monotonic() - HEAD_TIMEOUT
            for connection in [c for c in self.connections
                               if c.state == "head" and c.head_since < late]:
                self.drop(connection)
            if self._dropped and time.monotonic() - reported >= 10:
                log.warning("closed %d API connections that were slow to send a request "
                            "or over --max-connections (%d open)", self._dropped,
                            len(self.connections))
                self._dropped, reported = 0, time.monotonic()


class GuardedSite(web.BaseSite):
    """aiohttp's TCP site, with its connections made through a ConnectionGuard."""

    def __init__(self, runner, host, port, limit):
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host, self._port = host, port
        self.guard = ConnectionGuard(runner.server, limit)

    @property
    def name(self):
        return f"http://{self._host}:{self._port}"

    async def start(self):
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self._host, self._port, backlog=self._backlog)


#: (method, path, handler, operation) of every route, for make_app. operation: the route's id,
#: the errors it answers beyond the access checks' (400, 401, 403), and its description, which
#: the API description extension completes.
ROUTES = []


def api(method, path, operation_id, errors=(), **description):
    """Declare a handler's route, the errors it answers and its description (see ROUTES)."""
    def register(handler):
        ROUTES.append((method, path, handler,
                       {"operationId": operation_id, "errors": errors, **description}))
        return handler
    return register


@api("GET", "/health", "health", (503,))
async def health(request):
    """Whether the daemon is healthy; needs no token, and tells more with it"""
    engine, token = request.app[ENGINE], request.app[CONFIG].token
    problems = engine.health()
    # Without the token, only the verdict: nothing for a stranger to learn.
    stranger = token is not None and _bearer_error(request, token) is not None
    if problems:
        raise ApiError(503, "unhealthy" if stranger else "unhealthy: " + "; ".join(problems))
    if stranger:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "ok", "torrents": engine.count(),
                              "loading": engine.loading, "listen_port": engine.listen_port})


# --------------------------------------------------------------------------- #
# What strangers control: hashes, save paths, magnets, .torrent files, URL fetches,
# and the metadata, trackers and DHT nodes that come from peers
# --------------------------------------------------------------------------- #

def parse_infohash(text):
    """Lower-case a 40-hex (v1) or 64-hex (v2) infohash, or raise 400."""
    infohash = text.strip().lower()
    if len(infohash) not in (40, 64) or any(c not in "0123456789abcdef" for c in infohash):
        raise ApiError(400, "infohash must be 40 (v1) or 64 (v2) hexadecimal digits")
    return infohash


def _hash_ids(info_hashes):
    """The hex ids a torrent answers to, canonical (v1 when there is one) first."""
    ids = [str(info_hashes.v1)] if info_hashes.has_v1() else []
    return ids + ([str(info_hashes.v2)] if info_hashes.has_v2() else [])


def _params_ids(params):
    """The hex ids of add_torrent_params, from its torrent_info when it has one."""
    return _hash_ids(params.ti.info_hashes() if params.ti else params.info_hashes)


def _resolved(path, roots):
    """(path with symlinks and .. resolved, whether it lies inside a root). Blocking."""
    real = Path(os.path.realpath(path))
    return real, any(real.is_relative_to(root) for root in roots)


def resolve_save_path(roots, requested):
    """The real directory save_path names, checked to lie inside the roots. Blocking."""
    if "\x00" in requested:
        raise ApiError(400, "save_path contains a NUL byte")
    absolute = os.path.isabs(requested)
    allowed = roots if absolute else roots[:1]  # a relative one goes under the download dir
    outside = ApiError(400, "save_path must stay inside the download directory"
                       + (" or an allowed save root" if len(allowed) > 1 else ""))
    # Decided on the text first: a .. that climbs out and back in (a/../../x/../a) would
    # otherwise tell, by the answer, what is on the disk.
    depth = 0
    for part in Path(requested).parts[1 if absolute else 0:]:
        depth += -1 if part == ".." else part != "."
        if depth < 0 or (part == ".." and absolute):
            raise outside
    target, inside = _resolved(roots[0] / requested, allowed)
    if not inside:
        raise outside
    try:
        a_file = target.exists() and not target.is_dir()
    except OSError as error:  # a name too long, or a directory it may not look into
        raise ApiError(400, f"save_path cannot be used: {error.strerror}") from None
    if a_file:
        raise ApiError(400, "save_path names a file, not a directory")
    return str(target)  # not created: libtorrent makes it at the first write


def _readable(params):
    """False if a name, path or URL in params is not UTF-8."""
    try:  # libtorrent keeps such text as bytes, and Python raises on every read of them
        params.name, params.save_path, params.trackers, params.url_seeds, params.dht_nodes
    except UnicodeDecodeError:
        return False
    return True


def params_from_magnet(uri):
    """Parse a magnet link (honouring tr= trackers and x.pe= peers), or raise 400."""
    # Counted before libtorrent sees them: an add costs the session thread time that
    # grows with the square of the trackers. The length is capped: parsed on the loop.
    if len(uri) > MAX_FORM_BYTES:
        raise ApiError(413, f"a magnet link may be at most {MAX_FORM_BYTES} characters")
    # libtorrent reads tr.1=, tr.2=... as tr=, and TR= too: count them as such.
    keys = [re.sub(r"\.\d+$", "", key.lower())
            for key, _ in urllib.parse.parse_qsl(uri.partition("?")[2])]
    for key, most in (("tr", MAX_TRACKERS), ("ws", MAX_WEB_SEEDS), ("x.pe", MAX_TRACKERS)):
        if keys.count(key) > most:
            raise ApiError(422, f"a magnet link may name at most {most} {key}= values")
    try:
        params = lt.parse_magnet_uri(uri)
    except RuntimeError as error:
        raise ApiError(400, f"invalid magnet link: {error}") from None
    if not _hash_ids(params.info_hashes):
        raise ApiError(400, "invalid magnet link: no btih or btmh infohash")
    if not _readable(params):
        raise ApiError(400, "invalid magnet link: dn=, tr= or dht= is not UTF-8 once decoded")
    if len(params.trackers) > MAX_TRACKERS or len(params.url_seeds) > MAX_WEB_SEEDS:
        raise ApiError(422, f"a magnet link may name at most {MAX_TRACKERS} trackers and "
                       f"{MAX_WEB_SEEDS} web seeds")
    params.name = params.name[:MAX_TEXT]
    return params


def params_from_torrent(data):
    """Parse .torrent bytes under TORRENT_LIMITS, or raise 422. CPU-bound: call in a thread."""
    if len(data) > MAX_TORRENT_BYTES:
        raise ApiError(413, f"a .torrent may be at most {MAX_TORRENT_BYTES} bytes")
    try:
        params = lt.load_torrent_buffer(data, TORRENT_LIMITS)
    except RuntimeError as error:
        raise ApiError(422, f"not a valid torrent file: {error}") from None
    if not _readable(params):
        raise ApiError(422, "not a valid torrent file: a tracker URL or DHT node is not UTF-8")
    if len(params.trackers) > MAX_TRACKERS or len(params.url_seeds) > MAX_WEB_SEEDS:
        raise ApiError(422, f"a torrent may name at most {MAX_TRACKERS} trackers and "
                       f"{MAX_WEB_SEEDS} web seeds")
    params.comment, params.created_by = params.comment[:MAX_TEXT], params.created_by[:MAX_TEXT]
    # libtorrent would rename hostile file names quietly; refusing tells the client.
    if problem := _unsafe_info(params.ti):
        raise ApiError(422, f"not a valid torrent file: {problem}")
    return params


def _unsafe_info(info):
    """Why a torrent's info dict must not be served, or None."""
    piece_length = info.piece_length()
    if piece_length & (piece_length - 1):
        return f"piece length {piece_length} is not a power of two"
    if info.num_files() > MAX_TORRENT_FILES:  # padding counts here: count real files
        layout = info.layout()
        pads = sum(1 for index in range(layout.num_files())
                   if layout.file_flags(index) & lt.file_storage.flag_pad_file)
        if info.num_files() - pads > MAX_TORRENT_FILES:
            return f"more than {MAX_TORRENT_FILES} files"
    try:
        unsafe = _unsafe_file_name(_bdecode(info.info_section())[0])
    except (ValueError, TypeError, IndexError, RecursionError):
        return "a malformed info dictionary"
    return None if unsafe is None else f"unsafe file name {unsafe[:200]!r}"  # not 10 MiB of it


def _bdecode(data, start=0):
    """(the bencoded value at start, the index after it), for bytes libtorrent parsed."""
    # Not lt.bdecode: it holds the GIL for the whole call and would stall the event loop.
    kind = data[start:start + 1]
    if kind in (b"d", b"l"):
        items, index = [], start + 1
        while data[index:index + 1] != b"e":
            item, index = _bdecode(data, index)
            items.append(item)
        return (dict(zip(items[::2], items[1::2])) if kind == b"d" else items), index + 1
    if kind == b"i":
        end = data.index(b"e", start)
        return int(data[start + 1:end]), end + 1
    colon = data.index(b":", start)
    end = colon + 1 + int(data[start:colon])
    if not colon + 1 <= end <= len(data):
        raise ValueError("a string runs past the end")
    return data[colon + 1:end], end


def _unsafe_file_name(info):
    """The first file name element in a raw info dict that could leave save_path, or None."""
    # The .utf-8 variants count too: libtorrent prefers them to the plain keys.
    paths = [[info.get(b"name", b"")], [info.get(b"name.utf-8", b"x")]]
    files = info.get(b"files")  # v1 multi-file; libtorrent ignores it if not a list
    for entry in files if isinstance(files, list) else ():
        if isinstance(entry, dict):
            paths += [entry.get(b"path") or [b""]] + [entry.get(key) or [] for key in (
                b"path.utf-8", b"symlink path", b"symlink path.utf-8")]
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


def _files_of(torrent_info):
    """(index, path, size) of each file of a torrent, padding left out."""
    layout = torrent_info.layout()
    return [(index, layout.file_path(index), layout.file_size(index))
            for index in range(layout.num_files())
            if not layout.file_flags(index) & lt.file_storage.flag_pad_file]


def _metadata(torrent_info, creation):
    """Fields that need metadata; computed once, when metadata first arrives."""
    files = _files_of(torrent_info)
    return {
        "total_size": sum(size for _, _, size in files), "num_files": len(files),
        "total_pieces": torrent_info.num_pieces(), "piece_length": torrent_info.piece_length(),
        "creation_date": _epoch_or_none(creation[0] or torrent_info.creation_date()),
        "creator": creation[1] or None, "comment": creation[2] or None, "files": files,
        "all_files": torrent_info.num_files()}  # libtorrent's count, padding included


def _checked_metadata(torrent_info, creation):
    """(why the metadata is refused, None) or (None, its _metadata). In a thread."""
    problem = _unsafe_info(torrent_info)
    return (problem, None) if problem else (None, _metadata(torrent_info, creation))


#: This host's own addresses, IPv4-mapped too (::ffff:127.0.0.1 reaches 127.0.0.1, and
#: Python does not call it loopback): local services that trust local callers listen there.
_HOST_OWN = tuple(map(ipaddress.ip_network, (
    "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::/127", "fe80::/10",
    "::ffff:127.0.0.0/104", "::ffff:0.0.0.0/104", "::ffff:169.254.0.0/112")))
#: Characters no working tracker or web-seed URL holds, which a web page that shows the
#: URL inside an attribute (Transmission's web client does) would read as markup.
_MARKUP = frozenset("\"' <>\\`")


def keep_reachable(params, local_only):
    """Drop the trackers, web seeds and DHT nodes the daemon may not call (_url_allowed)."""
    # Tiers are a list beside the URLs: filter the pairs, or tiers slide onto other URLs.
    tiers = list(params.tracker_tiers) + [0] * (len(params.trackers) - len(params.tracker_tiers))
    kept = [(url, tier) for url, tier in zip(params.trackers, tiers)
            if _url_allowed(url, local_only)]
    params.trackers, params.tracker_tiers = [url for url, _ in kept], [tier for _, tier in kept]
    params.url_seeds = [url for url in params.url_seeds if _url_allowed(url, local_only)]
    params.dht_nodes = [(host, port) for host, port in params.dht_nodes if _url_allowed(
        f"udp://[{host.strip('[]')}]:{port}" if ":" in host else f"udp://{host}:{port}",
        local_only)]
    return params


def _is_local_url(url):
    """True when a URL names a loopback address or localhost, so no lookup leaves the host."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and _is_loopback_name(host)


def _url_allowed(url, local_only):
    """Whether the daemon may call and show a URL: not this host, or only it (--local-only)."""
    if not _MARKUP.isdisjoint(url):
        return False
    if local_only:
        return _is_local_url(url)
    try:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
    except ValueError:  # such as an unclosed [ in http://[::1/announce: too malformed to tell
        return False
    try:  # so that a .torrent cannot reach a local service; the IP filter checks after DNS
        return not any(ipaddress.ip_address(host) in network for network in _HOST_OWN)
    except ValueError:
        return host != "localhost" and not host.endswith(".localhost")


def _ip_filter(local_only):
    """The session's IP filter for peers, trackers and web seeds: what _url_allowed allows."""
    ip_filter = lt.ip_filter()
    rules = [("0.0.0.0", "255.255.255.255", 1), ("127.0.0.0", "127.255.255.255", 0),
             ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1), ("::1", "::1", 0)]
    for rule in rules if local_only else [(str(net[0]), str(net[-1]), 1) for net in _HOST_OWN]:
        ip_filter.add_rule(*rule)
    return ip_filter


async def fetch_torrent_url(client, url, timeout, local_only=False):
    """Fetch a .torrent over http(s); returns its bytes, or a magnet URI it redirected to."""
    try:
        async with asyncio.timeout(timeout):  # one deadline for all: hops must not add up
            for _ in range(FETCH_MAX_REDIRECTS + 1):
                fetched = await _fetch_once(client, url, local_only)
                if not isinstance(fetched, tuple):
                    return fetched
                url = fetched[0]
    except TimeoutError:
        raise ApiError(502, f"fetching torrent_url timed out after {timeout:g} s") from None
    except (aiohttp.ClientError, ValueError) as error:
        raise ApiError(502, f"fetching torrent_url failed: {error}") from None
    raise ApiError(502, f"fetching torrent_url failed: more than "
                   f"{FETCH_MAX_REDIRECTS} redirects")


async def _fetch_once(client, url, local_only):
    """One hop of a fetch: the body, a magnet URI, or (the URL it redirects to,)."""
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as error:  # a malformed address, such as http://[::1/x
        raise ApiError(400, f"torrent_url is not a valid URL: {error}") from None
    if scheme not in ("http", "https"):
        raise ApiError(400, "torrent_url must be a magnet link or an http(s) URL")
    if local_only and not _is_local_url(url):
        raise ApiError(400, "with --local-only, torrent_url must name localhost or a "
                       "loopback address")
    async with client.get(url, allow_redirects=False) as response:
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location", "")
            if location.lower().startswith("magnet:"):
                return location
            return (urllib.parse.urljoin(str(response.url), location),)
        if response.status != 200:
            raise ApiError(502, f"fetching torrent_url failed: HTTP {response.status}")
        # Content-Length may be absent (chunked) or lie: count while streaming.
        return await _read_limited(response.content.read, MAX_TORRENT_BYTES,
                                   "torrent_url served")


async def _read_limited(read_chunk, limit, what="request body", already=0):
    """Read a stream to its end; 413 once the bytes counted (a length may lie) pass limit."""
    data = bytearray()
    while chunk := await read_chunk(64 * 1024):
        data += chunk
        if already + len(data) > limit:
            raise ApiError(413, f"{what} too large: more than {limit} bytes")
    return bytes(data)


# --------------------------------------------------------------------------- #
# The state directory, and what it gives back
# --------------------------------------------------------------------------- #

def _with_notes(resume_data, notes):
    """Bencoded resume data with the daemon's notes appended under NOTES_KEY."""
    value = json.dumps(notes, separators=(",", ":")).encode()
    return b"%s%d:%s%d:%se" % (resume_data[:-1], len(NOTES_KEY), NOTES_KEY, len(value), value)


def _notes_of(resume_data):
    """The daemon's notes in bencoded resume data; {} if it has none or they are bad."""
    # The key is the last one, its value ending just before the dict's e: the same bytes
    # inside the notes (a label, a path) are not it.
    key, end = b"%d:%s" % (len(NOTES_KEY), NOTES_KEY), len(resume_data)
    while (at := resume_data.rfind(key, 0, end)) >= 0:
        length, _, rest = resume_data[at + len(key):].partition(b":")
        if length.isdigit() and len(rest) == int(length) + 1:
            try:
                notes = json.loads(rest[:-1])
            except (ValueError, RecursionError):
                return {}
            return notes if isinstance(notes, dict) else {}
        end = at
    return {}


def _fsync_dir(path):
    """Make a rename in this directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _regular_file(path):
    """Whether a state file is a regular file; if not, it is skipped with a warning."""
    if stat.S_ISREG(path.lstat().st_mode):
        return True
    # A FIFO or a device would block the read, and a link may point anywhere.
    log.warning("skipping %s: not a regular file", path)
    return False


#: Largest file StateStore.read gives back (a queued event, the event counter): a few kB.
MAX_STATE_FILE = 1024 * 1024


def _on_state_thread(method):
    """A StateStore method that runs on the store's thread: a call returns an awaitable."""
    return functools.wraps(method)(lambda self, *args: self._submit(method, self, *args))


class StateStore:
    """The state directory: resume files written atomically, by one thread of its own."""

    def __init__(self, root):
        self.root = root
        self.resume_dir = root / "resume"
        self.quarantine_dir = root / "quarantine"
        self._jobs = queue.SimpleQueue()  # in order: a write and a delete never cross
        self._renamed = set()  # directories the job under way renamed or deleted in
        self._lock_fd = None   # the state directory, held with flock while running
        self.failure = ""      # why the last write failed, until a write succeeds
        self._busy_since = None  # when the job under way began, or last made progress
        # A daemon thread: a disk that hangs cannot keep the process from exiting.
        self._thread = threading.Thread(target=self._run, name="tf-state", daemon=True)
        self._thread.start()

    def _submit(self, function, *args):
        """Run function(*args) on the state thread; an awaitable of its result."""
        future = concurrent.futures.Future()
        self._jobs.put((function, args, future))
        return asyncio.wrap_future(future)

    def _run(self):
        """Run jobs in order; a batch's directories are fsynced once, before any answer."""
        while True:
            batch = [self._jobs.get()]
            while not self._jobs.empty() and len(batch) < 1000:
                batch.append(self._jobs.get_nowait())
            done, failed = [], {}
            for function, args, future in batch:
                if function is None:
                    break  # close: after the jobs before it are synced and answered
                if not future.set_running_or_notify_cancel():
                    continue  # whoever asked has given up (the daemon is stopping)
                self._renamed, self._busy_since = set(), time.monotonic()
                try:
                    done.append((future, function(*args), None, self._renamed))
                except BaseException as error:
                    done.append((future, None, error, self._renamed))
            # A directory that fails its fsync fails only the jobs that changed it.
            for directory in set().union(*(renamed for *_, renamed in done)):
                try:
                    self._busy_since = time.monotonic()
                    _fsync_dir(directory)
                except OSError as error:
                    failed[directory] = error
            self._busy_since = None
            for future, result, error, renamed in done:
                error = error or next((failed[path] for path in renamed if path in failed), None)
                if isinstance(error, OSError):  # kept for /health: a failed add leaves no trace
                    self.failure = (f"the state directory failed: {error.strerror or error}"
                                    + (f" ({error.filename})" if error.filename else ""))
                elif renamed:
                    self.failure = ""
                if error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            if function is None:
                return

    def problems(self):
        """What /health should tell of the state directory: a failed write, a hung one."""
        problems = [self.failure] if self.failure else []
        since = self._busy_since  # read once: the state thread sets it to None meanwhile
        busy = since and time.monotonic() - since
        if busy and busy > ALERT_WAIT:  # a hung mount: a liveness probe should restart us
            problems.append(f"the state directory has not answered for {busy:.0f} s")
        return problems

    def barrier(self):
        """An awaitable done once every job asked for before it is done."""
        return self._submit(lambda: None)

    def close(self):
        """End the thread once the jobs before this one are done; let the directory go."""
        self._jobs.put((None, (), None))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _path(self, name):
        return self.resume_dir / f"{name}.resume"

    @_on_state_thread
    def prepare(self, download_dir):
        """Set up the directory and its lock; return whether the last run stopped clean."""
        first_run = not self.resume_dir.is_dir()
        for directory, option in ((download_dir, "--download-dir (TORRENTFLOW_DOWNLOAD_DIR)"),
                                  (self.resume_dir, "--state-dir (TORRENTFLOW_STATE_DIR)")):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StartupError(_directory_problem(directory, error, option)) from None
        # Held for the life of the process (the kernel lets go however it ends): a second
        # daemon would load the same torrents, and its clean stop would vouch for ours.
        self._lock_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StartupError(f"--state-dir (TORRENTFLOW_STATE_DIR): {self.root} is in use "
                               "by another TorrentFlow; give each daemon its own") from None
        # Writes a crash interrupted; the old files stand. Only in the daemon's own
        # folders: the state directory itself may hold someone else's files.
        for leftover in [*self.resume_dir.glob("*.tmp"), *self.root.glob("webhooks/*/*.tmp")]:
            leftover.unlink()
        mark = self.root / CLEAN_MARK
        was_clean = first_run or mark.exists()
        mark.unlink(missing_ok=True)
        _fsync_dir(self.root)
        return was_clean

    @_on_state_thread
    def put(self, relative, data):
        """Write state/relative atomically (its directory made if need be)."""
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        self._atomic(self.root / relative, data)

    @_on_state_thread
    def drop(self, relative):
        """Delete state/relative, durably."""
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            return  # nothing changed: its directory, maybe never made, needs no fsync
        self._renamed.add((self.root / relative).parent)

    @_on_state_thread
    def read(self, relative):
        """The bytes of the file state/relative, or None if there is none (see _read_file)."""
        return self._read_file(self.root / relative)

    @_on_state_thread
    def read_folder(self, relative):
        """{name: bytes} of the files in the folder state/relative (see _read_file)."""
        folder = self.root / relative
        found = {file.name: self._read_file(file)
                 for file in (sorted(folder.iterdir()) if folder.is_dir() else ())}
        return {name: data for name, data in found.items() if data is not None}

    def _read_file(self, path):
        """A state file's bytes; None if it is absent, or not a regular file, or too large."""
        try:
            if not _regular_file(path):
                return None
        except FileNotFoundError:
            return None
        with open(path, "rb") as stream:
            data = stream.read(MAX_STATE_FILE + 1)
        if len(data) > MAX_STATE_FILE:  # corrupt or planted: not in memory
            log.warning("%s: more than %d bytes", path, MAX_STATE_FILE)
            self._quarantine([path])
            return None
        return data

    @_on_state_thread
    def write(self, name, data, old_name=None):
        """Write a resume file durably, the previous copy kept as .bak; drop old_name's."""
        self._atomic(self._path(name), data, backup=True)
        if old_name:  # a v2-only magnet that gained its v1 id with the metadata
            self._delete(old_name)

    def _atomic(self, path, data, backup=False):
        """Replace a file so that a crash leaves the old or the new one whole."""
        temp = path.with_suffix(".tmp")
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if backup and path.exists():
            os.replace(path, path.with_suffix(".bak"))
        os.replace(temp, path)
        self._renamed.add(path.parent)

    def _delete(self, name):
        """Delete a torrent's resume file and its backup, durably."""
        path = self._path(name)
        for file in (path, path.with_suffix(".bak")):
            file.unlink(missing_ok=True)
        self._renamed.add(self.resume_dir)

    delete = _on_state_thread(_delete)  # write() calls _delete itself, on the thread

    @_on_state_thread
    def load(self, allowed):
        """(file name, add_torrent_params, notes) of every saved torrent, in order of adding."""
        names = sorted({path.stem for path in self.resume_dir.iterdir()
                        if path.suffix in (".resume", ".bak") and _regular_file(path)})
        reads = {name: self._read(name, allowed) for name in names}
        loaded = self._unique([(name, *read) for name, read in reads.items() if read is not None])
        # The order the daemon noted, else libtorrent's time of adding; a hand-edited
        # order that is no number must not stop the load (its note is refused later).
        loaded.sort(key=lambda read: read[2]["order"] if type(read[2].get("order")) is int
                    else read[1].added_time * 10**9)
        return loaded

    def _unique(self, loaded):
        """One entry per torrent; a second file with the same torrent is set aside."""
        # Kept: the file named by its own id, else the one that knows more ids (a crash
        # between writing a v2 magnet's file under its new v1 id and deleting the old).
        loaded.sort(key=lambda read: (read[0] != _hash_ids(read[1].info_hashes)[0],
                                      -len(_hash_ids(read[1].info_hashes))))
        kept, known = [], set()
        for name, params, notes in loaded:
            ids = set(_hash_ids(params.info_hashes))
            if ids & known:
                log.warning("resume file %s holds a torrent another file holds", name)
                self._quarantine([path for path in (
                    self._path(name), self._path(name).with_suffix(".bak")) if path.exists()])
                continue
            known |= ids
            kept.append((name, params, notes))
        return kept

    def _read(self, name, allowed):
        """One torrent's params and notes from its file, else its .bak; or None."""
        self._busy_since = time.monotonic()  # a long load is slow, not hung
        path = self._path(name)
        result, unusable = None, []
        for candidate in (path, path.with_suffix(".bak")):
            try:
                if not stat.S_ISREG(candidate.lstat().st_mode):
                    unusable.append(candidate)  # a directory there would fail every save
                    continue
                data = candidate.read_bytes()
                params = lt.read_resume_data(data)
            except FileNotFoundError:
                continue
            except (OSError, RuntimeError) as error:
                log.warning("resume file %s is unreadable: %s", candidate, error)
                unusable.append(candidate)
                continue
            if (not _hash_ids(params.info_hashes) or not _readable(params)
                    or not params.save_path or not allowed(params.save_path)):
                log.warning("resume file %s names no torrent, no save path or one outside "
                            "the save roots, or holds text that is not UTF-8", candidate)
                unusable.append(candidate)
                continue
            if candidate is not path:
                log.warning("using the backup %s", candidate)
            params.flags &= ~lt.torrent_flags.duplicate_is_error
            result = params, _notes_of(data)
            break
        # A bad main file goes even when its .bak is good: the next save would
        # otherwise rotate it over that good .bak.
        self._quarantine(unusable)
        return result

    def _quarantine(self, files):
        """Move unreadable state files aside, so they are kept but never read again."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for file in files:
            target = self.quarantine_dir / f"{file.name}.{stamp}"
            try:
                self.quarantine_dir.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
            except OSError as error:  # one file that cannot go aside must not stop the load
                log.error("cannot move unreadable %s aside to %s: %s", file, target, error)
                continue
            log.warning("moved unreadable %s file %s to %s", file.parent.name, file, target)
            self._renamed.update((file.parent, self.quarantine_dir))


#: The daemon's notes on each torrent, kept in its resume file: name -> (default, parse);
#: parse checks a value read back with the API's own rules. Extensions add rows.
NOTES = {
    "order": (None, _number(int, 1, high=2**63)),  # the order of adding (ns since epoch)
    "finished": (None, _boolean),  # whether the finished event was announced
    # payload bytes over its life: libtorrent's all-time counters drop the last tick's
    "downloaded": (None, _number(int, 0, high=2**63)),
    "uploaded": (None, _number(int, 0, high=2**63)),
}


def _checked_notes(notes, params, infohash):
    """A resume file's notes, each checked by its NOTES row; defaults fill the rest."""
    # A torrent starts with what libtorrent knows of it, beside NOTES' defaults.
    known = {"order": time.time_ns(), "finished": params.completed_time > 0,
             "downloaded": params.total_downloaded, "uploaded": params.total_uploaded}
    checked = {}
    for name, (default, parse) in NOTES.items():
        fallback = known.get(name, default)
        value = notes.get(name, fallback)
        try:
            checked[name] = value if value is None or value == default else parse(value)
        except (TypeError, ValueError) as error:  # one bad value must not stop the load
            log.warning("torrent %s: ignoring its saved %s %.60r: %s", infohash, name,
                        value, error)
            checked[name] = fallback
    return checked


def _session_pack(settings):
    """The session settings libtorrent holds, as settings_pack entries (see Option.pack)."""
    return {o.pack: settings[o.setting] for o in OPTIONS if o.pack}


def _outside_roots(roots, places):
    """Why one of places (a save path and what is in it) leads outside the roots. Blocking."""
    for place in places:
        real, inside = _resolved(place, roots)
        if not inside:
            return f"{place} now leads outside the save roots (to {real})"
    return None


# --------------------------------------------------------------------------- #
# Status: the STATUS table, and status as JSON
# --------------------------------------------------------------------------- #

def _epoch_or_none(value):
    """A Unix time as an int, or None for libtorrent's 0 (never)."""
    return int(value) if value and value > 0 else None


def _seconds_since(moment):
    """Whole seconds since a naive local datetime or a Unix time, or None if never."""
    if moment is None:
        return None
    then = moment if isinstance(moment, float) else moment.timestamp()
    return max(0, int(time.time() - then))


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a torrent's status: its JSON type, meaning and source."""

    name: str
    type: object           # a JSON type name, or a JSON schema
    nullable: bool
    description: str
    value: object = None   # (torrent, torrent_status) -> JSON; None: the status attribute
    listed: bool = True    # in GET /torrents without fields=; a per-file list is not


def _flag(name):
    bit = getattr(lt.torrent_flags, name)
    return lambda torrent, status: bool(status.flags & bit)


def _info(name):
    return lambda torrent, status: torrent.info and torrent.info[name]


_QUEUED = lt.torrent_flags.paused | lt.torrent_flags.auto_managed
#: The states libtorrent reports.
STATES = sorted(str(state) for state in lt.torrent_status.states.values.values())

#: Every field of a torrent's status: the status dicts, the OpenAPI schema, the names
#: fields= and sort= take, and README.md (a test holds it to this table) come from it.
STATUS = [
    Field("infohash", "string", False, "the id: v1 hash if there is one, else v2 hash",
          lambda torrent, status: torrent.infohash),
    Field("info_hash_v1", "string", True, "the v1 (SHA-1) hash",
          lambda torrent, status: next((i for i in torrent.ids if len(i) == 40), None)),
    Field("info_hash_v2", "string", True, "the v2 (SHA-256) hash",
          lambda torrent, status: next((i for i in torrent.ids if len(i) == 64), None)),
    Field("state", {"type": "string", "enum": STATES}, False,
        "libtorrent's state; paused and queued torrents keep theirs",
        lambda torrent, status: str(status.state)),
    Field("paused", "boolean", False, "paused, by the API or by the queue", _flag("paused")),
    Field("queued", "boolean", False, "paused by libtorrent's queue, not by you",
          lambda torrent, status: status.flags & _QUEUED == _QUEUED),
    Field("auto_managed", "boolean", False, "libtorrent's queue may start and stop it",
          _flag("auto_managed")),
    Field("sequential_download", "boolean", False, "pieces are fetched in order",
          _flag("sequential_download")),
    Field("seed_mode", "boolean", False, "seeding without having checked the data",
          _flag("seed_mode")),
    Field("upload_mode", "boolean", False, "not downloading, after a disk error",
          lambda torrent, status: bool(status.flags & lt.torrent_flags.upload_mode)
          and torrent.info is not None),  # not while a magnet's metadata is held
    Field("share_mode", "boolean", False, "downloading only to upload", _flag("share_mode")),
    Field("super_seeding", "boolean", False, "super-seeding is on", _flag("super_seeding")),
    Field("is_seeding", "boolean", False, "it has every piece"),
    # Not while a magnet's chosen file priorities wait to be mapped: all its files are
    # at 0 meanwhile, which libtorrent calls finished.
    Field("is_finished", "boolean", False, "it has every wanted piece",
          lambda torrent, status: status.is_finished
          and torrent.notes.get("chosen_priorities") is None),
    Field("has_metadata", "boolean", False, "the info dict is known"),
    Field("has_incoming", "boolean", False, "a peer has connected to us for it"),
    Field("progress", {"type": "number", "minimum": 0, "maximum": 100}, False,
          "percent of all files done; while checking, of the check",
          lambda torrent, status: round(100 * (
              status.progress if str(status.state).startswith("checking")
              else status.total_done / status.total if status.total else 0), 4)),
    Field("error", "string", False, "empty, or why the torrent stopped",
          lambda torrent, status: torrent.error(status)),
    Field("download_rate", "integer", False, "payload bytes/s received over the last "
          "second; 0 when paused", lambda torrent, status: torrent.rates[0]),
    Field("upload_rate", "integer", False, "payload bytes/s sent over the last second; 0 "
          "when paused", lambda torrent, status: torrent.rates[1]),
    Field("total_download", "integer", False, "payload bytes received over its life",
          lambda torrent, status: torrent.notes["downloaded"]),
    Field("total_upload", "integer", False, "payload bytes sent over its life",
          lambda torrent, status: torrent.notes["uploaded"]),
    Field("num_peers", "integer", False, "connected peers, seeds included"),
    Field("num_seeds", "integer", False, "connected seeds"),
    Field("list_peers", "integer", False, "peers known"),
    Field("list_seeds", "integer", False, "seeds known"),
    Field("connect_candidates", "integer", False, "known peers we could still connect to"),
    Field("num_pieces", "integer", False, "pieces we have"),
    Field("total_pieces", "integer", True, "pieces in the torrent", _info("total_pieces")),
    Field("total_done", "integer", False, "bytes we have, of all files"),
    Field("total_wanted_done", "integer", False, "bytes we have, of wanted files"),
    Field("total_wanted", "integer", False, "bytes wanted"),
    Field("distributed_copies", "number", False, "copies among peers; -1 when a seed",
          lambda torrent, status: round(status.distributed_copies, 4)),
    Field("num_complete", "integer", False, "seeds the tracker reports; -1 if unknown"),
    Field("num_incomplete", "integer", False, "leechers the tracker reports; -1 if unknown"),
    Field("last_seen_complete", "integer", True, "when a complete copy was last seen",
          lambda torrent, status: _epoch_or_none(status.last_seen_complete)),
    Field("time_since_upload", "integer", True, "seconds since payload was last sent",
          lambda torrent, status: _seconds_since(status.last_upload)),
    Field("time_since_download", "integer", True, "seconds since payload was last received",
          lambda torrent, status: _seconds_since(status.last_download)),
    Field("active_time", "integer", False, "seconds active, over its life",
          lambda torrent, status: int(status.active_duration.total_seconds())),
    Field("finished_time", "integer", False, "seconds finished, over its life",
          lambda torrent, status: int(status.finished_duration.total_seconds())),
    Field("seeding_time", "integer", False, "seconds seeding, over its life",
          lambda torrent, status: int(status.seeding_duration.total_seconds())),
    Field("seed_rank", "integer", False, "libtorrent's rank of its need for seeding"),
    Field("priority", "integer", False, "same as queue_position",
          lambda torrent, status: status.queue_position),
    Field("queue_position", "integer", False, "position in the queue; -1 for seeds"),
    Field("added_time", "integer", False, "when it was added (Unix time)",
          lambda torrent, status: int(status.added_time)),
    Field("completed_time", "integer", True, "when it completed",
          lambda torrent, status: _epoch_or_none(status.completed_time)),
    Field("storage_mode", {"type": "string", "enum": ["allocate", "sparse"]}, False,
          "how files are allocated",
          lambda torrent, status: str(status.storage_mode).removeprefix("storage_mode_")),
    Field("save_path", "string", False, "the real directory the files go into"),
    Field("name", "string", False, "the torrent's name; its infohash until a magnet "
          "without dn= has metadata", lambda torrent, status: status.name or torrent.infohash),
    Field("total_size", "integer", True, "size of all files, padding not counted",
          _info("total_size")),
    Field("num_files", "integer", True, "number of files, padding not counted",
          _info("num_files")),
    Field("piece_length", "integer", True, "bytes per piece", _info("piece_length")),
    Field("creation_date", "integer", True, "from the .torrent", _info("creation_date")),
    Field("creator", "string", True, "from the .torrent", _info("creator")),
    Field("comment", "string", True, "from the .torrent", _info("comment")),
    Field("ratio", "number", False, "bytes uploaded over its life per byte wanted",
          lambda torrent, status: round(torrent.notes["uploaded"] / status.total_wanted, 4)
          if status.total_wanted else 0.0),
    Field("files", "array", True,
          "one entry per file: index, path, size, downloaded, progress, priority",
          lambda torrent, status: torrent.files(), listed=False),
]


def _status_dict(torrent, status):
    """The JSON status of one torrent from a libtorrent torrent_status, files aside."""
    return {field.name: field.value(torrent, status) if field.value
            else getattr(status, field.name) for field in STATUS if field.listed}


class _Slices(list):
    """A list that may be long (an entry per file or torrent): _json does it in slices."""


def _json(value):
    """value as JSON bytes, _Slices a slice at a time."""
    # json.dumps holds the GIL for a whole call: one long list would stall the event loop.
    if isinstance(value, _Slices):
        return b"[%s]" % b",".join(_json_slice(value[start:start + JSON_SLICE])
                                   for start in range(0, len(value), JSON_SLICE))
    if isinstance(value, dict):
        return b"{%s}" % b",".join(b"%s:%s" % (json.dumps(str(key)).encode(), _json(item))
                                   for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return b"[%s]" % b",".join(_json(item) for item in value)
    return json.dumps(value).encode()


def _json_slice(items):
    """The JSON of a slice of a _Slices, without its brackets; nested _Slices one by one."""
    if any(isinstance(inner, _Slices) for item in items if isinstance(item, (dict, list))
           for inner in (item.values() if isinstance(item, dict) else item)):
        return b",".join(_json(item) for item in items)
    return json.dumps(items, separators=(",", ":")).encode()[1:-1]


def _listing_body(items, total):
    """{"torrents": [items], "total": total} from already serialised items."""
    return b"".join((b'{"torrents":[', items, b'],"total":%d}' % total))


# --------------------------------------------------------------------------- #
# Engine: the owner of the libtorrent session
# --------------------------------------------------------------------------- #

#: The key of waits on alerts that concern the session rather than one torrent.
SESSION = "session"


class _Torrent:
    """One torrent: its handle, cached status, and what libtorrent does not keep."""

    # Slots: a library of ten thousand torrents holds ten thousand of these.
    __slots__ = ("handle", "ids", "infohash", "notes", "creation", "extra", "magnet_peers",
                 "file_priorities", "save_path", "info", "file_progress", "status", "_summary",
                 "full", "total_done", "progress_stale", "counted", "sample", "rates",
                 "updated", "flushing_since", "saved_as", "disk_error", "fault", "learning",
                 "dirty", "added", "saving", "next_save", "force_save", "removing")

    def __init__(self, params, notes=None, saved_as=None):
        self.handle = None            # once libtorrent has added it
        self.ids = _params_ids(params)
        self.infohash = self.ids[0]
        self.saved_as = saved_as      # the name of its resume file, once it has one
        #: The daemon's notes (NOTES), saved with the resume data.
        self.notes = _checked_notes(notes or {}, params, self.infohash)
        self.extra = {}               # what extensions keep on it, by their own keys
        # libtorrent drops the .torrent's fields outside the info dict, and every
        # x.pe peer that failed to connect, yet they may be a magnet's only source.
        self.creation = (params.creation_date, params.created_by, params.comment)
        self.magnet_peers = list(params.peers) if params.ti is None else []
        self.file_priorities, self.save_path = list(params.file_priorities), params.save_path
        self.info = None              # _metadata() once known
        self.file_progress = None     # bytes downloaded per file index
        self.status = None            # the status dict (files aside), once one arrived
        self._summary = self.full = None  # the status serialised, without and with files
        self.total_done = -1          # bytes done when file progress was last asked for
        self.progress_stale = False   # whether file_progress lags total_done
        # The byte counters last added to notes; (time, down, up) the rates start at; rates.
        self.counted, self.sample, self.rates = (0, 0), (0.0, 0, 0), (0, 0)
        # When the last status arrived, on the monotonic clock (as every interval here): a
        # step of the wall clock must not count as seeding time.
        self.updated = 0.0
        self.flushing_since = None    # when a flush of its finished download was asked for
        self.disk_error = ""          # the last file error, while it keeps the torrent stuck
        self.fault = ""               # why the daemon stopped it, until it is resumed
        self.learning = False         # whether its metadata is being read, or was
        self.added = None             # the task of its add, until it is saved
        self.removing = False         # a removal is under way (see TorrentEngine._removing)
        # Its saving state, described in _Saves.
        self.dirty, self.saving, self.next_save, self.force_save = False, None, None, False

    @property
    def aliases(self):
        """Every id it answers to, and a v2 hash's first 40 digits (qBittorrent's form)."""
        return [*self.ids, *(key[:40] for key in self.ids if len(key) == 64)]

    def error(self, status):
        """libtorrent's error, the daemon's reason to stop it, or a disk error (upload mode)."""
        return status.errc.message() if status.errc.value() else self.fault or self.disk_error

    def snapshot(self):
        """The status and per-file lists: a thread may read them, as none changes in place."""
        return self.status, self.file_progress, self.file_priorities

    def files(self, snapshot=None):
        """The files list (of a snapshot) with progress and priority, or None."""
        if self.info is None:
            return None
        status, progress, priorities = snapshot or self.snapshot()
        finished, seeding, progress = status["is_finished"], status["is_seeding"], progress or ()
        entries = _Slices()
        for index, path, size in self.info["files"]:
            priority = int(priorities[index]) if index < len(priorities) else 4
            downloaded = (size if seeding or (finished and priority)
                          else progress[index] if index < len(progress) else 0)
            entries.append({"index": index, "path": path, "size": size,
                            "downloaded": downloaded, "priority": priority,
                            "progress": round(100 * downloaded / size, 4) if size else 100.0})
        return entries

    def update(self, status):
        """Take a fresh torrent_status; return the old id if the canonical one changed."""
        ids = _hash_ids(status.info_hashes) or self.ids
        old = self.infohash if ids[0] != self.infohash else None
        self.ids, self.infohash, self.updated = ids, ids[0], time.monotonic()
        self.save_path = status.save_path
        self._measure(status)
        if not status.flags & lt.torrent_flags.upload_mode:
            self.disk_error = ""  # libtorrent retried the disk by itself, and it worked
        self.status = _status_dict(self, status)
        self._summary = self.full = None
        return old

    def _measure(self, status):
        """Payload rates over the last second: libtorrent's own lag tens of seconds, then stop."""
        now, down = time.monotonic(), status.total_payload_download
        up = status.total_payload_upload
        counted_down, counted_up = self.counted
        if down < counted_down or up < counted_up:  # libtorrent started them again
            counted_down = counted_up = 0
        self.notes["downloaded"] += down - counted_down
        self.notes["uploaded"] += up - counted_up
        self.counted = (down, up)
        then, down_before, up_before = self.sample
        if status.flags & lt.torrent_flags.paused or down < down_before or up < up_before:
            self.sample, self.rates = (now, down, up), (0, 0)
        elif now - then >= 1.0:
            self.rates = (int((down - down_before) / (now - then)),
                          int((up - up_before) / (now - then)))
            self.sample = (now, down, up)

    def refreshed_files(self):
        """The per-file progress changed: the full status must be serialised again."""
        self.full = None

    @property
    def summary(self):
        """The status without its files, serialised once per change, for listings."""
        if self._summary is None:
            self._summary = json.dumps(self.status, separators=(",", ":")).encode()
        return self._summary

    async def body(self):
        """The whole status with files, serialised once per change, in a thread."""
        if self.full is None:
            # The summary is taken here: cached from the thread, it could outlive its status.
            snapshot, summary = self.snapshot(), self.summary
            full = await asyncio.to_thread(
                lambda: b"".join((summary[:-1], b',"files":', _json(self.files(snapshot)), b"}")))
            if all(now is then for now, then in zip(self.snapshot(), snapshot)):
                self.full = full  # nothing changed meanwhile
            return full
        return self.full


@contextlib.contextmanager
def _handle_call():
    """A handle that libtorrent already dropped means the torrent is gone: 404."""
    try:
        yield
    except RuntimeError as error:
        raise ApiError(404, f"torrent not found ({error})") from None


@contextlib.contextmanager
def _state_io(what):
    """A state directory that fails is the daemon's trouble, not the client's: 503."""
    try:
        yield
    except OSError as error:
        log.error("state directory: %s failed: %s", what, error)
        raise ApiError(503, f"the state directory failed while {what}: "
                       f"{error.strerror or error}", RETRY_AFTER) from None


def _file_progress(handles):
    """Bytes per file for each handle (None if it is gone); called in a thread."""
    # Not file_progress_alert: the 2.1.1 bindings cannot read its list.
    result = []
    for handle in handles:
        try:
            result.append(handle.file_progress(lt.torrent_handle.piece_granularity))
        except RuntimeError:
            result.append(None)
    return result


def _log_failure(task):
    """Report a task nobody awaits that failed: its work would stop silently."""
    error = None if task.cancelled() else task.exception()
    if isinstance(error, ApiError):  # a client's 4xx is no trouble of the daemon's
        log.log(logging.ERROR if error.status >= 500 else logging.INFO, "%s: %s",
                task.get_name(), error.detail)
    elif error is not None:
        log.error("%s failed", task.get_name(), exc_info=error)


class TorrentEngine:
    """Owns the libtorrent session, its alert loop, the status cache and the state dir."""

    def __init__(self, config):
        self.config = config
        self.store = StateStore(config.state_dir)
        self.counts = collections.Counter()  # alerts_dropped, saves, save_failures
        self.started = time.monotonic()
        #: Where files may be written: the download directory, then the allowed roots.
        self.roots = [Path(os.path.realpath(root)) for root in
                      (config.download_dir, *config.allowed_save_roots)]
        self.listen_port = None
        self.was_clean = True         # whether the last run ended with a clean shutdown
        #: The session's settings (GET/PATCH /settings): flags, then what PATCH saved.
        self.settings = {o.setting: getattr(config, o.name) for o in OPTIONS if o.setting}
        self.listen_failure = ""      # why a listen socket failed after the start (/health)
        self._session = None
        self._torrents = {}           # _Torrent -> None: every torrent, in added order
        self._by_id = {}              # hex id -> _Torrent
        self._by_handle = {}          # libtorrent handle -> _Torrent
        self._waiters = collections.defaultdict(list)  # id or SESSION -> waits on alerts
        # kind -> callbacks: start, close (async); task() -> (name, coroutine); event(kind,
        # torrent, detail); status(t, the status before); tick; resume(t); metadata(t, async);
        # load(params, notes; in a thread) -> why to hold it; forget(t); health() -> problems;
        # admit(t) -> whether it started it
        self._listeners = collections.defaultdict(list)
        self._alert_handlers = {kind: [handler] for kind, handler in self._ALERT_HANDLERS.items()}
        self._unlisted = 0            # torrents without a status yet
        self._loaded = asyncio.Event()  # set once every saved torrent was handed over
        self._listing = None          # the plain listing body, until a status changes
        self._tasks = {}              # name -> the engine's long-running tasks
        self._background = set()      # short tasks nobody awaits (saves, removals)
        self._wakeup = asyncio.Event()
        self._alert_socket = self._notify_socket = None
        self.saves = _Saves(self)

    # -- extensions ---------------------------------------------------------- #

    def listen(self, kind, callback):
        """Call callback at each moment of this kind (the kinds: see self._listeners)."""
        self._listeners[kind].append(callback)

    def on_alert(self, kind, handler):
        """Call handler(engine, alert) at once for each alert of this type, after the engine's."""
        self._alert_handlers.setdefault(kind, []).append(handler)

    def _notify(self, kind, *args):
        """Tell the listeners of kind, and return their answers; one that fails is logged."""
        answers = []
        for callback in self._listeners[kind]:
            try:
                answers.append(callback(*args))
            except Exception:
                log.exception("a %s listener failed", kind)
        return answers

    def emit(self, kind, torrent=None, detail=None):
        """Something happened (an event, see the listeners)."""
        self._notify("event", kind, torrent, detail)

    def settled(self):
        """Done once the state directory holds what listeners wrote (so a crash keeps it)."""
        return self.store.barrier()

    # -- lifecycle ---------------------------------------------------------- #

    async def start(self):
        """Create the session, start the alert loop, and begin loading saved torrents."""
        self.was_clean = await self.store.prepare(self.config.download_dir)
        for start in self._listeners["start"]:
            await start()
        params = lt.session_params({**session_settings(self.config),
                                    **_session_pack(self.settings)})
        # pread avoids the RSS growth of memory-mapped I/O on large torrents.
        params.disk_io_constructor = "pread_disk_io_constructor"
        self._session = lt.session(params)
        self._session.set_ip_filter(_ip_filter(self.config.local_only))
        # Every peer in one class, so the session's limits hold for peers on the LAN and
        # on loopback too (libtorrent exempts those by default).
        everyone = lt.ip_filter()
        for first, last in (("0.0.0.0", "255.255.255.255"),
                            ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")):
            everyone.add_rule(first, last, 1 << self._session.global_peer_class_id)
        self._session.set_peer_class_filter(everyone)
        self.listen_port = self._session.listen_port()  # a blocking call: once, at start
        self._check_listening()
        self._alert_socket, self._notify_socket = socket.socketpair()
        self._alert_socket.setblocking(False)
        # libtorrent writes a byte here when alerts arrive; it must never block its thread.
        self._notify_socket.setblocking(False)
        self._session.set_alert_fd(self._notify_socket.fileno())
        asyncio.get_running_loop().add_reader(self._alert_socket.fileno(), self._on_alert_fd)
        # A task() listener gives (name, coroutine): run as the engine's own, cancelled likewise.
        for name, work in (("alerts", self._alert_loop()), ("status", self._status_loop()),
                           ("save", self.saves.run()), ("load", _load_library(self)),
                           *(task() for task in self._listeners["task"])):
            self._tasks[name] = asyncio.create_task(work, name=f"tf-{name}")
            self._tasks[name].add_done_callback(_log_failure)
        log.info("BitTorrent listening on %s, port %d (DHT %s, LSD %s, UPnP %s, NAT-PMP %s)",
                 self.config.listen_interfaces, self.listen_port,
                 *("on" if flag else "off" for flag in (
                     self.config.dht, self.config.lsd, self.config.upnp, self.config.natpmp)))

    async def close(self):
        """Finish adds under way, pause, save every torrent that changed, drop the session."""
        if self._session is None:
            return
        others = [task for name, task in self._tasks.items() if name != "alerts"]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        deadline = time.monotonic() + self.config.shutdown_timeout
        adding = [t.added for t in self._torrents if t.added and not t.added.done()]
        if adding:
            # An add whose request was cut off by the shutdown still ends saved.
            await asyncio.wait(adding, timeout=self.config.shutdown_timeout)
        self._session.pause()
        torrents = [t for t in self._torrents if t.handle is not None and not t.removing]
        saves = [self.save(torrent, force=False) for torrent in torrents]
        done, pending = await asyncio.wait(
            saves, timeout=max(0.1, deadline - time.monotonic())) if saves else (set(), set())
        failed = [f for f in done if f.exception()]
        saved = sum(1 for f in done if not f.exception() and f.result())
        log.info("saved %d changed torrents of %d at shutdown", saved, len(torrents))
        # A check cut short saved only the pieces checked so far: the next start must
        # check again, as after a crash, or a whole torrent would stay short of 100.
        checking = sum(1 for t in torrents if t.status and t.status["state"] == "checking_files")
        if pending or failed or checking:
            log.warning("not marking the stop clean: %d torrents could not be saved, %d "
                        "were being checked", len(pending) + len(failed), checking)
        else:  # only then may the next start trust the resume files
            with contextlib.suppress(OSError):
                await asyncio.wait_for(self.store.put(CLEAN_MARK, b""),
                                       max(0.1, deadline - time.monotonic()))
        for close in self._listeners["close"]:
            await close()
        for task in [self._tasks["alerts"], *self._background]:
            task.cancel()
        await asyncio.gather(self._tasks["alerts"], *self._background, return_exceptions=True)
        asyncio.get_running_loop().remove_reader(self._alert_socket.fileno())
        self.store.close()
        # The session's destructor waits up to STOP_TRACKER_TIMEOUT for trackers to
        # acknowledge "stopped", holding the GIL: let the last reference go in a thread.
        last_reference = [self._session]
        self._session = None
        await asyncio.to_thread(last_reference.clear)
        self._alert_socket.close()
        self._notify_socket.close()

    def _check_listening(self):
        """Stop the start if a listen address is taken or nothing listens at all."""
        # listen_port() waited for the bind: its alerts are queued, and the loop is not reading.
        failures = [alert for alert in self._session.pop_alerts()
                    if isinstance(alert, lt.listen_failed_alert)]
        for alert in failures:
            log.warning("cannot listen on %s:%d: %s", alert.address, alert.port,
                        alert.error.message())
        taken = [a for a in failures if a.error.value() == errno.EADDRINUSE]
        if taken or not self.listen_port:
            alert = (taken or failures or [None])[0]
            where = f"{alert.address}:{alert.port}" if alert else self.config.listen_interfaces
            raise StartupError(f"BitTorrent cannot listen on {where}"
                               + (f" ({alert.error.message()})" if alert else "")
                               + "; choose another address or port with --listen-interfaces "
                               "(TORRENTFLOW_LISTEN_INTERFACES), or port 0 for any free one")

    def _on_listen(self, alert):
        """A listen socket failed or came back after the start: /health tells."""
        self.listen_failure = alert.message() if isinstance(alert, lt.listen_failed_alert) else ""

    @property
    def loading(self):
        """True until every saved torrent is back and listed."""
        return not self._loaded.is_set() or self._unlisted > 0

    def health(self):
        """What is wrong with the daemon as a whole: a list of reasons, empty if nothing."""
        dead = [f"the {name} task stopped" for name, task in self._tasks.items()
                if task.done() and (name != "load" or task.cancelled() or task.exception())]
        found = [problem for check in self._listeners["health"] for problem in check()]
        return [*dead, *found, *([self.listen_failure] if self.listen_failure else []),
                *self.store.problems(), *itertools.islice(self.saves.unsaved.values(), 1)]

    # -- waiting on libtorrent ------------------------------------------------ #

    async def expect(self, ids, kinds, what, match=None, timeout=ALERT_WAIT):
        """The first match(alert) not None of these kinds about ids (or SESSION); 503 if late."""
        # match copies what the caller needs: alerts die at the next pop. A late one was lost.
        future = asyncio.get_running_loop().create_future()
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        waiter = (kinds, match or (lambda alert: True), future)
        self._waiters[ids[0]].append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"libtorrent did not confirm {what} within {timeout:g} s; "
                           "try again", RETRY_AFTER) from None
        finally:
            # Still under ids[0]: a torrent's ids only grow, and alerts match against all.
            self._waiters[ids[0]].remove(waiter)
            if not self._waiters[ids[0]]:
                del self._waiters[ids[0]]

    def _settle(self, ids, alert):
        """Resolve the waits this alert answers; a match that fails fails its wait only."""
        for key in ids:
            for kinds, match, future in self._waiters.get(key, ()):
                if isinstance(alert, kinds) and not future.done():
                    try:
                        value = match(alert)
                    except Exception as error:
                        future.set_exception(error)
                        continue
                    if value is not None:
                        future.set_result(value)

    def spawn(self, coroutine, name):
        """Run work nobody awaits; kept referenced, and its failure logged."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    def refresh(self, torrent=None):
        """Ask for a fresh status of a torrent (ignored if it is gone), or of all that changed."""
        if torrent is None:
            self._session.post_torrent_updates()
            return
        with contextlib.suppress(RuntimeError):  # removed meanwhile
            torrent.handle.post_status()

    def apply_settings(self, extra=None):
        """Hand libtorrent self.settings, or only extra: settings_pack entries no option holds."""
        self._session.apply_settings(_session_pack(self.settings) if extra is None else extra)

    async def confirm(self, torrent, what, predicate=lambda status: True):
        """Ask for a fresh status and wait until one satisfies predicate(status dict)."""
        with _handle_call():
            torrent.handle.post_status()
        await self.expect(torrent.ids, lt.state_update_alert, what,
                          lambda alert: True if predicate(torrent.status) else None)

    # -- requests ----------------------------------------------------------- #

    def lookup(self, infohash):
        """This id's torrent: 404 if unknown or being removed, 503 while being added or loaded."""
        torrent = self._by_id.get(infohash)
        if torrent is None:
            self.check_loaded()
        if torrent is None or torrent.removing:
            raise ApiError(404, f"no torrent with infohash {infohash}")
        if torrent.status is None:
            raise ApiError(503, f"torrent {infohash} is still being added; try again", RETRY_AFTER)
        return torrent

    def check_loaded(self):
        """503 while the saved torrents are handed over: the one asked for may be among them."""
        if not self._loaded.is_set():
            raise ApiError(503, "the saved torrents are still being loaded; try again",
                           RETRY_AFTER)

    def knows(self, infohash):
        """Whether a torrent answers to this id, exactly as written."""
        return infohash in self._by_id

    def torrents(self):
        """Every torrent that has a status to serve, in the order they were added."""
        return (t for t in self._torrents if t.status is not None and not t.removing)

    def listing(self):
        """The body of a plain GET /torrents, rebuilt only after something changed."""
        if self._listing is None:
            bodies = [t.summary for t in self.torrents()]
            self._listing = _listing_body(b",".join(bodies), len(bodies))
        return self._listing

    def count(self):
        """How many torrents the daemon holds, those still loading included."""
        return len(self._torrents)

    def inside_roots(self, path):
        """Whether a path really lies inside a save root. Touches the disk: in a thread."""
        return _resolved(path, self.roots)[1]

    def shown(self, path):
        """A path as the API shows it: relative to the download directory when inside."""
        path = Path(path)
        return str(path.relative_to(self.roots[0]) if path.is_relative_to(self.roots[0]) else path)

    async def add(self, params, presets=(), anywhere=False):
        """(infohash, created) once it is saved and has a status; presets apply to a new one."""
        if not self._loaded.is_set():  # a saved copy of it not yet back would be doubled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._loaded.wait()), ALERT_WAIT)
            self.check_loaded()
        ids = _params_ids(params)
        existing = next((self._by_id[i] for i in ids if i in self._by_id), None)
        if existing is not None and existing.removing:
            # Being deleted: let that finish, then add it afresh.
            await self.expect(existing.ids, lt.torrent_removed_alert,
                              "the removal of the earlier copy")
            existing = None
        if existing is not None:
            if existing.added is not None:
                # Asked for twice, maybe at once: answer when the first add is saved.
                await asyncio.shield(existing.added)
            if existing.status is None:  # a saved one just handed back: its status is next
                await self.expect(existing.ids, lt.state_update_alert, "its first status",
                                  lambda alert: existing.status is not None or None)
            if existing.save_path != params.save_path and not anywhere:
                raise ApiError(409, f"torrent {existing.infohash} is already there, with "
                               f"save_path {self.shown(existing.save_path)!r}")
            return existing.infohash, False
        keep_reachable(params, self.config.local_only)
        torrent = _Torrent(params)
        self._register(torrent)
        torrent.added = self.spawn(self._add(torrent, params, presets),
                                   f"add {torrent.infohash}")
        # Shielded: a client that hangs up must not leave a torrent added but unsaved.
        await asyncio.shield(torrent.added)
        return torrent.infohash, True

    async def _add(self, torrent, params, presets):
        """Apply the presets, post the add, wait for libtorrent to take it, admit it."""
        if params.ti is None:
            # A magnet's metadata comes from a stranger: upload mode requests no piece,
            # so no file is made, until _learn has checked it.
            params.flags |= lt.torrent_flags.upload_mode
        try:
            if presets:  # on a worker thread: a preset may list 100,000 files
                made = await asyncio.to_thread(lambda: [preset(params) for preset in presets])
                for notes in made:
                    torrent.notes.update(notes or {})
                torrent.file_priorities = list(params.file_priorities)
            self._session.async_add_torrent(params)
        except (ValueError, RuntimeError) as error:
            self._forget(torrent)
            raise ApiError(422, f"libtorrent refused the torrent: {error}") from None
        except BaseException:  # a preset's 4xx, or its failure: nothing stays half added
            self._forget(torrent)
            raise
        try:
            refusal = await self.expect(torrent.ids, lt.add_torrent_alert, "the add",
                                        lambda alert: alert.error.message()
                                        if alert.error.value() else "")
        except ApiError:
            if torrent.handle is None:
                self._forget(torrent)  # if the alert comes after all, _on_add admits it
            raise
        if refusal:
            raise ApiError(422, f"libtorrent refused the torrent: {refusal}")
        await self._admit(torrent)

    async def _admit(self, torrent):
        """Let the listeners start a just-added torrent, then save it; or take it out again."""
        if torrent.status is None:
            await self.confirm(torrent, "the first status", lambda status: status is not None)
        # A listener may start it now, as the queue would at its next tick up to a second
        # later; before the save, whose fsync need not delay it.
        started = any(self._notify("admit", torrent))
        try:
            await self.save(torrent)
        except ApiError:
            with contextlib.suppress(ApiError):
                await self.remove(torrent, delete_files=False)
            raise
        if started:
            await self.confirm(torrent, "the start")
        await self.settled()
        torrent.added = None  # saved: a second add of it need not wait

    async def pause(self, torrent):
        """Pause and take it out of the queue, so libtorrent does not restart it."""
        with _handle_call():
            torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            torrent.handle.pause()
        await self.confirm(torrent, "the pause",
                           lambda status: status["paused"] and not status["auto_managed"])
        await self.save(torrent)

    async def resume(self, torrent, queued=True):
        """Resume into the queue, or (queued false) start now past its limits; recheck an error."""
        if torrent.info is None and torrent.status["has_metadata"]:
            raise ApiError(409, f"torrent {torrent.infohash}: its metadata is being checked, "
                           "or was refused (see error)")
        await self.confined(torrent)
        self._notify("resume", torrent)
        with _handle_call():
            if queued:
                torrent.handle.set_flags(lt.torrent_flags.auto_managed)
            else:
                torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            if torrent.disk_error or torrent.fault or torrent.status["error"]:
                # Resuming says the fault is fixed. A piece can pass its hash check in
                # memory and then fail to be written, so check what reached the disk.
                torrent.disk_error = torrent.fault = ""
                torrent.handle.clear_error()
                if torrent.info is not None:  # a magnet stays held until _learn passed it
                    torrent.handle.unset_flags(lt.torrent_flags.upload_mode)
                torrent.handle.force_recheck()
            torrent.handle.resume()
        await self.confirm(torrent, "the resume", lambda status: status["auto_managed"]
                           if queued else not status["paused"])
        await self.save(torrent)

    def _removing(self, torrent, removing=True):
        """Mark a removal under way, or undone: the one place the flag is set; listings follow."""
        torrent.removing = removing
        self._listing = None

    async def remove(self, torrent, delete_files):
        """Remove it, its resume file first; return why its files could not be deleted, or None."""
        if delete_files:
            await self.confined(torrent)  # never delete outside the roots
        # Checked after that wait, so two DELETEs at once remove it once.
        if torrent.removing:
            raise ApiError(404, f"no torrent with infohash {torrent.infohash}")
        self._removing(torrent)
        # Shielded: a client that hangs up must not leave a removal half done.
        return await asyncio.shield(self.spawn(self._remove(torrent, delete_files),
                                               f"remove {torrent.infohash}"))

    async def _remove(self, torrent, delete_files):
        # A save under way may be writing the file still (the add's first one, say).
        pending = [task for task in (torrent.saving, torrent.next_save) if task is not None]
        if pending:
            await asyncio.wait(pending)
        name = torrent.saved_as
        try:  # a failure (503) leaves the torrent whole, so a retry can finish
            # After a hybrid conflict the survivor may keep its file under this name.
            if name and not any(t.saved_as == name for t in self._torrents if t is not torrent):
                with _state_io(f"deleting the resume file of {torrent.infohash}"):
                    await self.store.delete(name)
            torrent.saved_as = None
            failure = await self._drop(torrent, delete_files and torrent.info is not None)
        except BaseException:
            if torrent in self._torrents:
                self._removing(torrent, False)
                if name is not None:
                    self.save(torrent)  # the resume file comes back for the retry
            raise
        self.emit("removed", torrent, failure)
        await self.settled()
        return failure

    async def _drop(self, torrent, delete_files):
        """Remove it from libtorrent, files too if asked; return why they stayed, or None."""
        steps = {lt.torrent_removed_alert, *([lt.torrent_deleted_alert] if delete_files else [])}
        failure = None

        def step(alert):
            nonlocal failure
            if isinstance(alert, lt.torrent_delete_failed_alert):
                failure = f"its files could not be deleted: {alert.error.message()}"
            steps.discard(lt.torrent_removed_alert if isinstance(
                alert, lt.torrent_removed_alert) else lt.torrent_deleted_alert)
            return None if steps else True
        try:
            self._session.remove_torrent(torrent.handle,
                                         lt.session.delete_files if delete_files else 0)
        except RuntimeError:  # libtorrent dropped it already (a removal's alert was lost)
            self._forget(torrent)
            return
        await self.expect(torrent.ids, (lt.torrent_removed_alert, lt.torrent_deleted_alert,
                                        lt.torrent_delete_failed_alert), "the removal", step)
        return failure

    async def session_stats(self):
        """libtorrent's session counters, fresh: {metric name: value}."""
        self._session.post_session_stats()
        return await self.expect((SESSION,), lt.session_stats_alert, "the statistics",
                                 lambda alert: dict(alert.values))

    def save(self, torrent, force=True):
        """A future of a save of the torrent as it is now (see _Saves.save)."""
        return self.saves.save(torrent, force)

    # -- the alert loop ----------------------------------------------------- #

    def _on_alert_fd(self):
        """libtorrent wrote to the alert socket: drain it and wake the alert loop."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._alert_socket.recv(4096):
                pass
        self._wakeup.set()

    async def _alert_loop(self):
        """The only caller of pop_alerts(); synchronous dispatch, as alerts die at the next pop."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            for alert in self._session.pop_alerts():
                try:
                    if self._waiters:
                        self._settle(self._alert_ids(alert), alert)
                    for handler in self._alert_handlers.get(type(alert), ()):
                        handler(self, alert)
                except Exception:
                    log.exception("error while handling %s", type(alert).__name__)

    def _alert_ids(self, alert):
        """The ids of the torrent an alert is about, or (SESSION,)."""
        if isinstance(alert, lt.add_torrent_alert):
            return _params_ids(alert.params)
        torrent = self.torrent_of(alert) if isinstance(alert, lt.torrent_alert) else None
        if torrent is not None:
            return torrent.ids
        hashes = getattr(alert, "info_hashes", None)
        return _hash_ids(hashes) if hashes is not None else (SESSION,)

    def torrent_of(self, alert):
        return self._by_handle.get(alert.handle)

    def _on_state_update(self, alert):
        """Cache each changed torrent's status and wake requests waiting for it."""
        self._listing = None
        for status in alert.status:
            torrent = self._by_handle.get(status.handle)
            if torrent is None or _holding_back(torrent, status):
                continue
            try:
                self._take_status(torrent, status)
                self._settle(torrent.ids, alert)
            except Exception:  # one bad status must not keep the others from the cache
                log.exception("could not take the status of %s", torrent.infohash)

    def _take_status(self, torrent, status):
        """Cache one torrent's status and do the bookkeeping that follows it."""
        if status.has_metadata and torrent.info is None:
            if not torrent.learning:
                torrent.learning = True
                self.spawn(self._learn(torrent, status.torrent_file), f"read {torrent.infohash}")
            if not torrent.fault:
                # Its metadata is being read and checked: no status shows it before its
                # sizes and files, and a stranger's only once it passed (or the refusal).
                return
        before = torrent.status
        old = torrent.update(status)
        if old:
            log.info("%s is now known by its v1 id %s", old, torrent.infohash)
        self._index(torrent)
        if before is None:
            self._unlisted -= 1
        if torrent.info is not None and torrent.total_done != status.total_done:
            torrent.total_done = status.total_done
            torrent.progress_stale = True
        torrent.dirty = bool(status.need_save_resume_data)
        self._announce(torrent, before)

    async def _learn(self, torrent, torrent_info):
        """Read the metadata off the loop, held to an upload's checks: peers are strangers."""
        problem, info = await asyncio.to_thread(_checked_metadata, torrent_info,
                                                torrent.creation)
        if not problem:
            torrent.info, torrent.progress_stale = info, True
            try:
                for listener in self._listeners["metadata"]:
                    await listener(torrent)
            except Exception as error:  # held still, but the status must say why
                log.exception("a metadata listener failed on %s", torrent.infohash)
                problem = f"it could not be taken: {error}"
        if problem:
            torrent.fault = f"refused its metadata: {problem}"
            self.stop(torrent)
            return
        with contextlib.suppress(RuntimeError):
            torrent.handle.unset_flags(lt.torrent_flags.upload_mode)  # see _add
        self.refresh(torrent)

    def _announce(self, torrent, before):
        """Tell the status listeners of a new status; note a finish, and save it."""
        now = torrent.status
        self._notify("status", torrent, before)
        if now["is_finished"] and not torrent.notes["finished"]:
            torrent.notes["finished"] = True  # once per torrent, restarts included
            self.emit("finished", torrent)
            self.save(torrent)
        elif now["state"] == "downloading" and not now["is_finished"]:
            torrent.notes["finished"] = False  # wanted again: it may finish again

    def _register(self, torrent):
        """Make a torrent known by its ids, before libtorrent has it."""
        self._torrents[torrent] = None
        self._index(torrent)
        self._unlisted += 1

    def _index(self, torrent):
        """Point each of the torrent's ids at it; an alias never takes another's id."""
        for key in torrent.aliases:
            if key in torrent.ids:
                self._by_id[key] = torrent
            else:
                self._by_id.setdefault(key, torrent)

    def _forget(self, torrent):
        """Drop every trace of a torrent libtorrent no longer holds."""
        if self._torrents.pop(torrent, False) is False:
            return
        self._listing = None
        self.saves.unsaved.pop(torrent, None)
        self._notify("forget", torrent)
        self._by_handle.pop(torrent.handle, None)
        for key in torrent.aliases:
            if self._by_id.get(key) is torrent:
                del self._by_id[key]
        if torrent.status is None:
            self._unlisted -= 1
        # Every wait on it fails, but a removal's: torrent_deleted_alert is yet to come.
        for key in torrent.ids:
            for kinds, _, future in self._waiters.get(key, ()):
                if not future.done() and lt.torrent_deleted_alert not in kinds:
                    future.set_exception(ApiError(404, f"torrent {torrent.infohash} was removed"))

    def _on_add(self, alert):
        """Attach the handle of a torrent libtorrent added, or forget a refused one."""
        ids = _params_ids(alert.params)
        torrent = next((self._by_id[i] for i in ids if i in self._by_id), None)
        if alert.error.value():
            log.warning("could not add torrent %s: %s", ids[0], alert.error.message())
            if torrent is not None and torrent.handle is None:
                self._forget(torrent)
            return
        if torrent is None:  # its request gave up waiting: save it now, or take it out
            torrent = _Torrent(alert.params)
            self._register(torrent)
            torrent.added = self.spawn(self._admit(torrent), f"add {torrent.infohash}")
        if torrent.handle is None:
            torrent.handle = alert.handle
            self._by_handle[alert.handle] = torrent

    def _on_removed(self, alert):
        self._forget(self.torrent_of(alert))  # of None (unknown): does nothing

    def _on_conflict(self, alert):
        """Magnets by v1 and v2 hash are one hybrid torrent: keep the one with metadata."""
        keep, drop = self.torrent_of(alert), self._by_handle.get(alert.conflicting_torrent)
        if None in (keep, drop) or keep.removing or drop.removing:
            return  # a DELETE under way settles it
        log.warning("%s and %s are the same hybrid torrent: keeping %s", keep.infohash,
                    drop.infohash, keep.infohash)
        self._removing(drop)
        self.spawn(self._remove(drop, delete_files=False), f"drop {drop.infohash}")
        with contextlib.suppress(RuntimeError):
            keep.handle.clear_error()
            if keep.status is None or keep.status["auto_managed"]:
                keep.handle.resume()
            keep.handle.post_status()

    def _on_flushed(self, alert):
        """The finished torrent's bytes are in its files: now it may show as finished."""
        torrent = self.torrent_of(alert)
        if torrent is not None and torrent.flushing_since:
            torrent.flushing_since = None
            self.refresh(torrent)

    def _on_dropped(self, alert):
        self.counts["alerts_dropped"] += 1
        log.warning("libtorrent dropped alerts: the queue overflowed")

    def _on_change(self, alert):
        """Refresh the cache at once on a change of state, and save what must be saved."""
        torrent = self.torrent_of(alert)
        if torrent is None:
            return
        if isinstance(alert, lt.file_error_alert):
            torrent.disk_error = f"{alert.error.message()}: {alert.filename()}"
        if isinstance(alert, lt.torrent_finished_alert):
            # The last pieces may still sit in libtorrent's write buffer; see _on_flushed.
            with contextlib.suppress(RuntimeError):
                torrent.handle.flush_cache()
                torrent.flushing_since = time.monotonic()
        if isinstance(alert, (lt.metadata_received_alert, lt.torrent_finished_alert)):
            self.save(torrent)
        self.refresh(torrent)

    _ALERT_HANDLERS = {
        lt.state_update_alert: _on_state_update, lt.add_torrent_alert: _on_add,
        lt.torrent_removed_alert: _on_removed, lt.cache_flushed_alert: _on_flushed,
        lt.torrent_conflict_alert: _on_conflict, lt.alerts_dropped_alert: _on_dropped,
        **dict.fromkeys((lt.listen_failed_alert, lt.listen_succeeded_alert), _on_listen),
        **dict.fromkeys((lt.metadata_received_alert, lt.torrent_finished_alert,
                         lt.torrent_paused_alert, lt.torrent_resumed_alert,
                         lt.state_changed_alert, lt.torrent_error_alert,
                         lt.file_error_alert), _on_change),
    }

    # -- periodic work ------------------------------------------------------ #

    async def _status_loop(self):
        """Feed the cache: changed torrents' status, then their per-file progress."""
        while True:
            self._session.post_torrent_updates()
            await asyncio.sleep(STATUS_INTERVAL)
            # libtorrent stops reporting torrents that went idle: ask, so rates reach 0, and
            # (LOAD_BATCH a tick) so a running one's time counters (seeding_time...) move.
            now, stale, due = time.monotonic(), [], LOAD_BATCH
            for torrent in self._torrents:
                if any(torrent.rates) and torrent.updated < now - 2 * STATUS_INTERVAL:
                    self.refresh(torrent)
                elif due and torrent.updated < now - TIMES_INTERVAL and torrent.status and (
                        not torrent.status["paused"]):
                    due -= 1
                    self.refresh(torrent)
                if torrent.progress_stale:
                    torrent.progress_stale = False
                    stale.append(torrent)
            self._notify("tick")
            if stale:
                progress = await asyncio.to_thread(_file_progress, [t.handle for t in stale])
                for torrent, files in zip(stale, progress):
                    if files is not None and not torrent.removing:
                        torrent.file_progress = files
                        torrent.refreshed_files()

    async def confined(self, torrent):
        """Stop the torrent with a 409 if its save path now resolves outside the roots."""
        fault = await asyncio.to_thread(_outside_roots, self.roots, _places(torrent))
        if fault:
            torrent.fault = fault
            self.stop(torrent)
            raise ApiError(409, f"torrent {torrent.infohash}: {fault}")

    def stop(self, torrent):
        """Pause a torrent the daemon found a fault in, or at a limit; resume clears the fault."""
        with contextlib.suppress(RuntimeError):
            torrent.handle.unset_flags(lt.torrent_flags.auto_managed)
            torrent.handle.pause()
            torrent.handle.post_status()
        self.save(torrent)


def _holding_back(torrent, status):
    """Whether to serve the previous status while a finished torrent's writes are flushed."""
    # A script that sees "finished" reads the files next; FLUSH_WAIT bounds a lost flush.
    return (torrent.flushing_since is not None
            and time.monotonic() - torrent.flushing_since < FLUSH_WAIT
            and status.is_finished and torrent.status is not None
            and not torrent.status["is_finished"])


class _Saves:
    """Each torrent's resume data written to the state directory: when asked, and if changed."""
    # A torrent's state: dirty (unsaved in libtorrent), saving (in flight), next_save (shared
    # by all who ask next), force_save (it writes even if unchanged), saved_as (its file).

    def __init__(self, engine):
        self.engine = engine
        self.unsaved = {}             # torrent -> why its last save failed, until one works

    def save(self, torrent, force=True):
        """A future of a save of it as it is now: True once written, False if not needed."""
        # Joining the save queued behind the one in flight holds every change made before now.
        torrent.force_save |= force
        if torrent.next_save is None:
            torrent.next_save = self.engine.spawn(self._save(torrent, torrent.saving),
                                                  f"save {torrent.infohash}")
        return torrent.next_save

    async def _save(self, torrent, previous):
        """Ask libtorrent for the resume data once the previous save is done; write it."""
        if previous is not None:
            await asyncio.wait([previous])
        torrent.saving, torrent.next_save = torrent.next_save, None
        flags = SAVE_FULL if torrent.force_save else SAVE_IF_MODIFIED
        torrent.force_save = False
        try:
            if torrent.handle is None or torrent.removing:
                return False
            try:
                torrent.handle.save_resume_data(flags)
            except RuntimeError:  # already removed: nothing left to save
                return False
            data = await self.engine.expect(torrent.ids, (lt.save_resume_data_alert,
                                                          lt.save_resume_data_failed_alert),
                                            "saving the torrent", self._resume_data(torrent))
            if not data or torrent.removing:
                return False
            # The name now: the metadata of a v2 magnet may rename it during the write.
            name = torrent.infohash
            old = torrent.saved_as if torrent.saved_as != name else None
            try:
                with _state_io(f"saving {name}"):
                    await self.engine.store.write(name, data, old)
            except ApiError as error:
                self.engine.counts["save_failures"] += 1
                self.unsaved[torrent] = error.detail
                # libtorrent has handed this data over: write it in full at the next try.
                torrent.force_save = True
                raise
            self.engine.counts["saves"] += 1
            self.unsaved.pop(torrent, None)
            torrent.saved_as = name
            return True
        finally:
            if torrent.saving is asyncio.current_task():
                torrent.saving = None

    def _resume_data(self, torrent):
        """A match for a save's alert: the bytes to write, or b"" if there are none."""
        def take(alert):
            if isinstance(alert, lt.save_resume_data_failed_alert):
                if alert.error.value() != RESUME_NOT_MODIFIED and not torrent.removing:
                    log.warning("could not save resume data for %s: %s", torrent.infohash,
                                alert.error.message())
                return b""
            params = alert.params
            torrent.file_priorities = list(params.file_priorities)
            if params.ti is None and torrent.magnet_peers:
                params.peers = list(dict.fromkeys([*params.peers, *torrent.magnet_peers]))
            # A copy: the alert dies at the next pop.
            return _with_notes(lt.write_resume_data_buf(params), torrent.notes)
        return take

    async def run(self):
        """Save torrents that changed, so a crash loses at most one interval."""
        while True:
            await asyncio.sleep(self.engine.config.save_interval)
            for torrent in self.engine._torrents:
                if ((torrent.dirty or torrent.force_save) and not torrent.removing
                        and torrent.saving is None and torrent.next_save is None):
                    torrent.dirty = False
                    self.save(torrent, force=False)


async def _load_library(engine):
    """Hand every saved torrent back to libtorrent, in batches as the API already answers."""
    saved = await engine.store.load(engine.inside_roots)
    prepared = await asyncio.to_thread(_prepare_library, engine, saved)
    checking = 0
    for start in range(0, len(prepared), LOAD_BATCH):
        for name, params, notes, fault in prepared[start:start + LOAD_BATCH]:
            checking += _revive(engine, name, params, notes, fault)
        await asyncio.sleep(0)
    if saved:
        log.info("loading %d saved torrents", len(saved))
    if not engine.was_clean:
        log.warning("the last run did not stop cleanly: checking the data of %d "
                    "torrents that were downloading", checking)
    # Not if the load failed: an unknown id stays 503, as a saved one may be it (/health
    # names the dead task), and an add of it must not write over its file.
    engine._loaded.set()


def _prepare_library(engine, saved):
    """Check the notes, call the load listeners; each with why it is to be held, or None."""
    prepared = []  # in a thread: a listener may read the disk
    for name, params, notes in saved:
        notes = _checked_notes(notes, params, name)
        fault = next(filter(None, engine._notify("load", params, notes)), None)
        prepared.append((name, params, notes, fault))
    return prepared


def _revive(engine, name, params, notes, fault):
    """Add a saved torrent to libtorrent (held for a fault); return whether it is checked."""
    checking = False
    running = params.flags & lt.torrent_flags.auto_managed or not (
        params.flags & lt.torrent_flags.paused)
    if fault:
        params.flags = params.flags & ~lt.torrent_flags.auto_managed | lt.torrent_flags.paused
    elif (not engine.was_clean and running and params.ti is not None
          and sum(params.have_pieces) < params.ti.num_pieces()):
        # A crash may leave its files ahead of its resume data: without the pieces it was
        # saved with, libtorrent checks them, keeping what reached the disk.
        params.have_pieces = []
        checking = True
    torrent = _Torrent(params, notes, saved_as=name)
    torrent.fault = fault or ""
    engine._register(torrent)
    try:
        engine._session.async_add_torrent(params)
    except (ValueError, RuntimeError) as error:
        log.error("could not load saved torrent %s: %s", torrent.infohash, error)
        engine._forget(torrent)
    return checking


def _places(torrent):
    """Where a torrent's files go: its save path, and the top file or directory of its name."""
    name = torrent.info and torrent.status["name"]
    return [torrent.save_path, *([os.path.join(torrent.save_path, name)] if name else [])]


# --------------------------------------------------------------------------- #
# HTTP API: request bodies, and the seed's verbs (add, list, status, pause,
# resume, remove), each declared with its route and the errors it answers
# --------------------------------------------------------------------------- #

def _require_utf8(charset, what):
    # Every text field is UTF-8; guessing another charset would turn bytes into paths.
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise ApiError(400, f"{what} must be UTF-8, not {charset!r}")


#: The request bodies the API reads.
BODY_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")


@contextlib.asynccontextmanager
async def _body_deadline(request, limit):
    """Hold a body's share of BODY_BUDGET (else 503) and one deadline to read it (else 408)."""
    size = min(limit, request.content_length or limit)
    reading = request.app[BODIES]
    if reading["bytes"] + size > BODY_BUDGET:
        raise ApiError(503, "too many request bodies are being read at once; try again",
                       {**RETRY_AFTER, "Connection": "close"})
    reading["bytes"] += size
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            yield
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s",
                       {"Connection": "close"}) from None
    finally:
        reading["bytes"] -= size


async def read_fields(request, names, upload=None, types=BODY_TYPES):
    """The fields of a form or JSON object body: only names, each once; upload is a file."""
    content_type = request.content_type
    if content_type not in types:
        raise ApiError(415, f"send {', '.join(types)}")
    multipart = content_type == "multipart/form-data"
    # Refuse early what aiohttp would otherwise receive in full before refusing.
    limit = MAX_REQUEST_BYTES if multipart else MAX_FORM_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body too large: more than {limit} bytes")
    async with _body_deadline(request, limit):
        if multipart:
            fields = await _multipart_fields(request, names, upload)
        else:
            body = await _read_limited(request.content.read, MAX_FORM_BYTES)
            _require_utf8(request.charset, "the body")
            kind = "JSON" if content_type == "application/json" else "form"
            try:
                if kind == "JSON":
                    fields = json.loads(body.decode(), object_pairs_hook=_unique_keys)
                else:
                    fields = _unique_keys(urllib.parse.parse_qsl(
                        body.decode(), keep_blank_values=True, strict_parsing=True,
                        errors="strict", max_num_fields=len(names)))
            except (ValueError, UnicodeDecodeError, RecursionError) as error:
                raise ApiError(400, f"malformed {kind} body: {error}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the JSON body must be an object")
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; expected {', '.join(names)}")
    if upload in fields and not isinstance(fields[upload], bytes):
        raise ApiError(400, f"{upload} must be uploaded as a file in multipart/form-data")
    return fields


def _unique_keys(pairs):
    """A dict of (key, value) pairs; a repeated key is refused, never last-wins."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ValueError("a field is repeated")
    return fields


async def _multipart_fields(request, names, upload):
    """A multipart body's fields: the upload within the request's cap, text within a form's."""
    fields, size = {}, 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                raise ApiError(400, "nested multipart bodies are not accepted")
            if part.name not in names or part.name in fields:
                raise ApiError(400, f"unexpected or repeated form field {part.name!r}")
            cap = MAX_REQUEST_BYTES if part.name == upload else size + MAX_FORM_BYTES
            data = await _read_limited(part.read_chunk, cap, f"form field {part.name}", size)
            size += len(data)
            if part.name != upload:
                _require_utf8(part.get_charset(None), f"form field {part.name}")
                data = data.decode()
            fields[part.name] = data
    except (ValueError, AssertionError, UnicodeDecodeError, aiohttp.ClientError,
            aiohttp.http_exceptions.HttpProcessingError) as error:
        raise ApiError(400, f"malformed multipart body: {error}") from None
    return fields


def _text(fields, name):
    """A text field as a string that any path or URL can hold, or "" if absent."""
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    try:  # JSON can carry lone surrogates, which no path or URL can hold
        value.encode()
    except UnicodeEncodeError:
        raise ApiError(400, f"{name} is not valid Unicode") from None
    return value


async def _params_from_source(request, url, upload):
    """Turn torrent_url or torrent_file into libtorrent add_torrent_params."""
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


#: Fields POST /torrents takes besides torrent_url, torrent_file and save_path: name ->
#: (JSON schema, parse(value, json_body) -> a preset(add_torrent_params) -> notes, which
#: engine.add runs on a worker thread). Extensions add rows (the per-torrent settings).
ADD_FIELDS = {}


@api("POST", "/torrents", "addTorrent", (408, 409, 413, 415, 422, 502, 503))
async def add_torrent(request):
    """Add a magnet link, an http(s) .torrent URL or an upload"""
    fields = await read_fields(request, ("torrent_url", "torrent_file", "save_path",
                                         *ADD_FIELDS), upload="torrent_file")
    json_body = request.content_type == "application/json"
    presets = [ADD_FIELDS[name][1](value, json_body) for name, value in fields.items()
               if name in ADD_FIELDS]
    params = await _params_from_source(request, _text(fields, "torrent_url"),
                                       fields.get("torrent_file"))
    engine = request.app[ENGINE]
    params.save_path = await asyncio.to_thread(resolve_save_path, engine.roots,
                                               _text(fields, "save_path"))
    infohash, created = await engine.add(params, presets)
    return web.json_response({"infohash": infohash}, status=201 if created else 200,
                             headers={"Location": f"/torrents/{infohash}"})


def _known_parameters(query, known):
    """Refuse query parameters other than the known ones."""
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r}")


#: Operation id -> async function(request) giving the answer's bytes to a query string:
#: an extension's filters or fields on a core listing. Without one, a query is refused.
QUERIES = {}


async def _queried(request, operation):
    """QUERIES' answer to the request's query string; None, or 400, if it has no entry."""
    if operation not in QUERIES:
        _known_parameters(request.query, ())
        return None
    return await QUERIES[operation](request)


@api("GET", "/torrents", "listTorrents")
async def list_torrents(request):
    """Torrents' status: filtered, sorted, paged, trimmed"""
    body = request.query_string and await _queried(request, "listTorrents")
    return await _respond(request, body or request.app[ENGINE].listing())


async def _respond(request, body):
    """A JSON answer of serialised bytes; a large one waits its turn and goes out in pieces."""
    if len(body) < LARGE_BODY or request.method == "HEAD":  # HEAD: aiohttp leaves it out
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    async with request.app[LARGE_WRITES]:
        await response.prepare(request)
        view = memoryview(body)
        for start in range(0, len(body), WRITE_PIECE):
            await response.write(view[start:start + WRITE_PIECE])
            await asyncio.sleep(0)  # write() yields only when the socket is full
        await response.write_eof()
    return response


def _requested_torrent(request):
    """The torrent named by the path's {infohash}: 400 if malformed, 404 if unknown."""
    text, engine = request.match_info["infohash"], request.app[ENGINE]
    # An id as the daemon writes it needs no parsing: status reads are the hot path.
    return engine.lookup(text if engine.knows(text) else parse_infohash(text))


@api("GET", "/torrents/{infohash}", "getTorrent", (404, 503))
async def get_torrent(request):
    """One torrent's status"""
    torrent = _requested_torrent(request)
    body = request.query_string and await _queried(request, "getTorrent")
    return await _respond(request, body or torrent.full or await torrent.body())


@api("DELETE", "/torrents/{infohash}", "deleteTorrent", (404, 409, 503))
async def delete_torrent(request):
    """Remove a torrent, and its data with delete_files=true"""
    torrent = _requested_torrent(request)
    flag = request.query.get("delete_files", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, "delete_files must be true or false")
    delete_files = flag in ("true", "1")
    failure = await request.app[ENGINE].remove(torrent, delete_files)
    return web.json_response({"detail": f"removed {torrent.infohash}" + (
        f", but {failure}" if failure else " and its files" if delete_files else "")})


def _one(action, act, done, summary, errors=(404, 503), **description):
    """PUT /torrents/{infohash}/<action>: act(engine, torrent) on that torrent."""
    async def handler(request):
        torrent = _requested_torrent(request)
        _known_parameters(request.query, ())
        await act(request.app[ENGINE], torrent)
        return web.json_response({"detail": f"{done} {torrent.infohash}"})
    handler.__doc__ = summary
    return api("PUT", f"/torrents/{{infohash}}/{action}", f"{action}Torrent", errors,
               **description)(handler)


pause_torrent = _one("pause", TorrentEngine.pause, "paused", "Pause it")
resume_torrent = _one("resume", TorrentEngine.resume, "resumed", "Resume it")


# --------------------------------------------------------------------------- #
# Application and command line
# --------------------------------------------------------------------------- #

#: The extensions' setup(app, engine), called by make_app before the engine starts.
EXTENSIONS = []


def make_app(config):
    """Build the aiohttp application; the engine and the extensions start and stop with it."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[CONFIG] = config
    app[REQUESTS] = collections.Counter()
    app[LARGE_WRITES] = asyncio.Semaphore(LARGE_AT_ONCE)
    app[BODIES] = collections.Counter()
    declared = {(method, path) for method, path, *_ in ROUTES}
    for method, path, handler, _ in ROUTES:
        if method == "GET":  # HEAD too (monitors probe /health so), unless declared apart
            app.router.add_get(path, served(app, method, path, handler),
                               allow_head=("HEAD", path) not in declared)
        else:
            app.router.add_route(method, path, served(app, method, path, handler))
    # Last: any other path or method, without a token (see _no_route).
    app.router.add_route("*", r"/{path:[\s\S]*}", served(app, "*", "unmatched", _no_route,
                                                         public=True))

    async def lifecycle(app):
        engine = TorrentEngine(config)
        for setup in EXTENSIONS:
            setup(app, engine)
        await engine.start()
        app[ENGINE] = engine
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=config.fetch_timeout),
                headers={"User-Agent": f"TorrentFlow/{__version__}"}) as client:
            app[HTTP_CLIENT] = client
            yield
        await engine.close()

    app.cleanup_ctx.append(lifecycle)
    return app


class StartupError(Exception):
    """A problem that keeps the daemon from starting; main() reports it and exits 2."""


def _directory_problem(directory, error, option):
    """Why the directory an option names cannot be used, and which user would need it."""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return (f"{option}: {directory}, or a directory above it, is a file, not a "
                "directory; give a directory")
    return (f"{option}: cannot use the directory {directory}: {error.strerror or error} "
            f"(the daemon runs as uid {os.getuid()}; create the directory and give that "
            "user write access, for example with mkdir and chown)")


def _quiet_resource_errors(loop):
    """Log running out of descriptors at most every 10 s: asyncio retries accept() at once."""
    last = [0.0]

    def handler(loop, context):
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE,
                                                          errno.ENOBUFS, errno.ENOMEM):
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                log.error("%s: %s (see --max-connections and ulimit -n)",
                          context.get("message"), error.strerror)
            return
        loop.default_exception_handler(context)
    loop.set_exception_handler(handler)


async def serve(config):
    """Run until SIGTERM or SIGINT, then shut down in order: requests, torrents, session."""
    loop = asyncio.get_running_loop()
    _quiet_resource_errors(loop)
    runner = web.AppRunner(make_app(config), access_log=None,
                           shutdown_timeout=REQUEST_DRAIN_SECONDS,
                           keepalive_timeout=KEEPALIVE_TIMEOUT, lingering_time=2.0)
    await runner.setup()
    site = GuardedSite(runner, config.host, config.port, config.max_connections)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise StartupError(f"the API cannot listen on {config.host}:{config.port} "
                           f"({error.strerror or error}); choose another port with --port "
                           "(TORRENTFLOW_PORT), or another address with --host "
                           "(TORRENTFLOW_HOST)") from None
    sweep = asyncio.create_task(site.guard.sweep())
    for host, port, *_ in runner.addresses:
        log.info("TorrentFlow %s API listening on http://%s:%d", __version__,
                 f"[{host}]" if ":" in host else host, port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    started = time.monotonic()
    # The process ends whatever the disk does: a hung mount must not outlive the stop grace.
    watchdog = threading.Timer(config.shutdown_timeout + SHUTDOWN_MARGIN, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    sweep.cancel()
    await runner.cleanup()
    log.info("stopped in %.2f s", time.monotonic() - started)


def _exit_now():
    """End the process at once: the shutdown overran its deadline."""
    log.error("shutdown took longer than --shutdown-timeout plus %g s; exiting now",
              SHUTDOWN_MARGIN)
    logging.shutdown()
    os._exit(1)


class _SafeLog(logging.Filter):
    """Escape control characters and cut long values: strangers' names must not forge lines."""

    _CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

    def filter(self, record):
        if isinstance(record.args, tuple):
            record.args = tuple(map(_cut, record.args))
        elif record.args:  # else logging's one mapping argument, for %(name)s
            record.args = {key: _cut(value) for key, value in record.args.items()}
        record.msg = self._CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}",
                                       record.getMessage())
        record.args = ()
        return True


def _cut(value):
    """A value for a log line: strings longer than MAX_LOGGED are cut."""
    if isinstance(value, (str, bytes)) and len(value) > MAX_LOGGED:
        return f"{value[:MAX_LOGGED]!s}... ({len(value)} in all)"
    return value


def main(argv=None):
    """Entry point: parse the config, log to stderr, serve."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_SafeLog())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # peers, files and requests need many
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    log.info("open-file limit: %d", soft)
    if config.log_level != "debug":
        # aiohttp logs each malformed request with a traceback: anyone could fill the log.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    try:
        import uvloop  # optional: a faster event loop
    except ImportError:
        uvloop = None
    log.info("event loop: %s", "uvloop" if uvloop else "asyncio (install uvloop for speed)")
    try:
        (uvloop.run if uvloop else asyncio.run)(serve(config))
    except (StartupError, OSError) as error:
        log.error("cannot start: %s", error)
        return 2 if isinstance(error, StartupError) else 1
    return 0


# The core ends here


# --------------------------------------------------------------------------- #
# Extension: the API description. GET /openapi.json (public, see PUBLIC_ROUTES): an
# OpenAPI 3.1 document built from ROUTES, STATUS and the errors below. It comes first, so
# that the extensions after it describe their routes in its words (_answer, _query...)
# --------------------------------------------------------------------------- #

def _ref(name, kind="schemas"):
    """A reference to one of this document's components."""
    return {"$ref": f"#/components/{kind}/{name}"}


def _object(properties, required=None):
    """A closed object: every property required unless told otherwise."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False}


def _answer(description, schema, headers=None, links=None, media="application/json"):
    """An OpenAPI response."""
    return {"description": description, "content": {media: {"schema": schema}},
            **({"headers": headers} if headers else {}), **({"links": links} if links else {})}


def _query(name, description, **schema):
    """An optional query parameter."""
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", **schema}}


INFOHASH_PARAMETER = {
    "name": "infohash", "in": "path", "required": True,
    "description": "v1 or v2 infohash, any case",
    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{40}([0-9a-fA-F]{24})?$"}}
DONE = _answer("done", _ref("Message"))
_FILE_ENTRY = _object({
    "index": {"type": "integer", "minimum": 0}, "path": {"type": "string"},
    "size": {"type": "integer", "minimum": 0}, "downloaded": {"type": "integer", "minimum": 0},
    "progress": {"type": "number", "minimum": 0, "maximum": 100},
    "priority": {"type": "integer", "minimum": 0, "maximum": 7}})


def field_schema(field):
    """The JSON schema of a status field, from its row in STATUS."""
    schema = field.type if isinstance(field.type, dict) else {"type": field.type}
    if field.name == "files":  # STATUS says only "array"; its entries are described here
        schema = {**schema, "items": _FILE_ENTRY}
    if field.nullable:
        schema = {**schema, "type": [schema["type"], "null"]}
    return {**schema, "description": field.description}


def describe(operation_id, parameters=(), **description):
    """Add to the description of a route in ROUTES: parameters after its own, and the rest."""
    for *_, operation in ROUTES:
        if operation["operationId"] == operation_id:
            operation["parameters"] = [*operation.get("parameters", ()), *parameters]
            operation.update(description)


_ADD_FIELDS = {
    "torrent_url": {"type": "string", "description": "a magnet link or an http(s) URL of "
                    "a .torrent; give this or torrent_file"},
    "save_path": {"type": "string", "description": "relative to the download directory, "
                  "or absolute inside it or an --allowed-save-root"}}
_ADDED = {"headers": {"Location": {"required": True, "schema": {"type": "string"}}}, "links": {
    name: {"operationId": name, "parameters": {"infohash": "$response.body#/infohash"}}
    for name in ("getTorrent", "pauseTorrent", "resumeTorrent", "deleteTorrent")}}


def _add_body():
    """The request body POST /torrents takes, ADD_FIELDS' rows included."""
    form = {**_ADD_FIELDS, **{name: {"type": "string"} for name in ADD_FIELDS}}
    upload = {"type": "string", "contentMediaType": "application/x-bittorrent",
              "description": f"a .torrent file of at most {MAX_TORRENT_BYTES} bytes"}
    content = {media: {"schema": {"type": "object", "additionalProperties": False,
                                  "properties": properties}} for media, properties in (
        ("multipart/form-data", {**form, "torrent_file": upload}),
        ("application/x-www-form-urlencoded", form),
        ("application/json", {**_ADD_FIELDS, **{name: schema for name, (schema, _)
                                                in ADD_FIELDS.items()}}))}
    content["application/json"]["example"] = {
        "torrent_url": "magnet:?xt=urn:btih:" + "0123456789" * 4, "save_path": "example"}
    return {"required": True, "content": content}


#: The core's routes, described: operation id -> what an extension would give @api.
CORE_OPERATIONS = {
    "health": {"responses": {"200": _answer("healthy", _ref("Health")),
                             "503": _ref("503", "responses")}},
    "addTorrent": {"requestBody": _add_body, "responses": {
        "201": _answer("added", _ref("Added"), **_ADDED),
        "200": _answer("already present", _ref("Added"), **_ADDED)}},
    "listTorrents": {"responses": {"200": _answer("the torrents", _ref("TorrentList"))}},
    "getTorrent": {"parameters": [INFOHASH_PARAMETER], "responses": {"200": _answer(
        "its status", {"anyOf": [_ref("Status"), _ref("StatusFields")]})}},
    "deleteTorrent": {"responses": {"200": DONE}, "parameters": [INFOHASH_PARAMETER, _query(
        "delete_files", "true also deletes the data; case-insensitive",
        enum=["true", "false", "1", "0"], default="false")]},
    **dict.fromkeys(("pauseTorrent", "resumeTorrent"), {
        "responses": {"200": DONE}, "parameters": [INFOHASH_PARAMETER]})}
for _operation_id, _description in CORE_OPERATIONS.items():
    describe(_operation_id, **_description)


#: What each error status means, for the API description.
_ERRORS = {
    400: "malformed request, unknown field or bad value",
    401: "missing or wrong bearer token",
    403: "a cross-site browser request, or a Host other than localhost while no token is set",
    404: "no such torrent",
    408: "the request body did not arrive in time",
    409: "the torrent's state forbids it (no metadata yet, a move under way, a save path "
         "that leads outside the roots), or it is there with another save_path",
    413: "body, upload or fetched .torrent too large",
    415: "unsupported Content-Type",
    422: "not a valid, or not a safe, .torrent; or a value out of range",
    502: "fetching torrent_url failed",
    503: "libtorrent did not confirm the change in time, or the torrent is still being "
         "added; retry"}


@functools.cache
def openapi_document():
    """The API description at /openapi.json, from the tables once the extensions filled them."""
    status = _object({field.name: field_schema(field) for field in STATUS})
    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    schemas = {
        "Error": _object({"detail": string}), "Message": _object({"detail": string}),
        "Added": _object({"infohash": {
            "type": "string", "pattern": "^[0-9a-f]{40}([0-9a-f]{24})?$",
            "description": "v1 infohash (40 hex digits), or v2 (64) if it has no v1"}}),
        "Health": _object({"status": {"type": "string", "enum": ["ok"]}, "torrents": count,
                           "loading": {"type": "boolean"}, "listen_port": count},
                          required=["status"]),
        "TorrentList": _object({
            "torrents": {"type": "array", "items": _ref("StatusFields")},
            "total": {**count, "description": "matching torrents before paging"}}),
        "Status": status,
        "Summary": {**status, "required": [f.name for f in STATUS if f.listed],
                    "description": "a torrent in GET /torrents without fields=: its status "
                    "without the per-file list"},
        "StatusFields": {**status, "required": [],
                         "description": "every Status field, or those named by ?fields="}}
    responses = {str(code): _answer(description, _ref("Error"), {
        "WWW-Authenticate": {"required": True, "schema": string}} if code == 401 else None)
        for code, description in _ERRORS.items()}
    bearer = {"type": "http", "scheme": "bearer", "description": "--token, --token-file or "
              "TORRENTFLOW_TOKEN. Without one no token is asked for, but only requests "
              "addressed to localhost are served."}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "TorrentFlow", "version": __version__, "description":
                 "A BitTorrent daemon driven by an HTTP JSON API. Every error answers "
                 "{\"detail\": \"...\"}; unknown request fields are refused with 400. "
                 "Every GET also answers HEAD, as GET without its body."},
        "security": [{"bearerAuth": []}], "paths": {}, "components": {
            "securitySchemes": {"bearerAuth": bearer}, "schemas": schemas,
            "responses": responses}}
    # This document's own route last, after those it describes.
    for method, path, handler, operation in sorted(ROUTES, key=lambda row: row[2] is openapi):
        document["paths"].setdefault(re.sub(r":[^}]*}", "}", path), {})[method.lower()] = (
            _operation(method, path, handler, operation))  # aiohttp's {path:.*} is {path}
    return document


def _operation(method, path, handler, operation):
    """A route's OpenAPI operation: its description, summary, security and error answers."""
    public = (method, path) in PUBLIC_ROUTES
    codes = (403, *operation["errors"]) if public else (400, 401, 403, *operation["errors"])
    # A request body may be built from tables that extensions fill: built now, once all did.
    extra = {key: value() if callable(value) else value for key, value in operation.items()
             if key not in ("operationId", "errors", "parameters", "responses")}
    return {"operationId": operation["operationId"], "summary": handler.__doc__.split("\n")[0],
            **({"parameters": operation["parameters"]} if operation.get("parameters") else {}),
            **extra, **({"security": []} if public else {}),
            "responses": {**operation.get("responses", {}), **{
                str(code): _ref(str(code), "responses") for code in sorted(codes)}}}


@api("GET", "/openapi.json", "openapi",
     responses={"200": _answer("this document", {"type": "object"})})
async def openapi(request):
    """This document; needs no token"""
    return web.json_response(openapi_document())


# --------------------------------------------------------------------------- #
# Extension: listing queries. GET /torrents' filters (state=, paused=, label=), sort=,
# limit=, offset= and fields=, and GET /torrents/{infohash}?fields=
# --------------------------------------------------------------------------- #

LARGE_LISTING = 500  #: torrents above which a listing is serialised on a worker thread


def _count(query, name, default):
    """A whole number from the query string, or default."""
    text = query.get(name)
    if text is None:
        return default
    if not re.fullmatch("[0-9]{1,18}", text):  # not isdigit(): "²".isdigit() is True
        raise ApiError(400, f"{name} must be a whole number below 10**18")
    return int(text)


def status_fields():
    """The names of every status field, in the order of STATUS."""
    return [field.name for field in STATUS]


def _names(text, what, allowed):
    """A comma-separated list of names from allowed, or 400."""
    chosen = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    bad = [name for name in chosen if name not in allowed]
    if bad or not chosen:
        valid = ", ".join(name for name in allowed if not name.startswith("-"))
        raise ApiError(400, f"{what}: unknown name {(bad or [''])[0]!r}; valid: {valid}")
    return chosen


async def _to_json(build, in_thread):
    """build() serialised as JSON bytes; in a thread when large, lest it stall the loop."""
    if in_thread:
        return await asyncio.to_thread(lambda: _json(build()))
    return json.dumps(build(), separators=(",", ":")).encode()


_FIELDS_PARAMETER = _query("fields", "only these status fields, comma-separated; files "
                           "only appears in a listing when named here")
_FILTERS = [_query("state", "only these states, comma-separated"),
            _query("paused", "only paused (true) or running (false) ones", enum=["true", "false"]),
            _query("label", "only torrents with this label")]


def _matching(engine, query, known):
    """The torrents that query's filters choose; other parameters than known are refused."""
    _known_parameters(query, known)
    paused = query.get("paused")
    if paused not in (None, "true", "false"):
        raise ApiError(400, "paused must be true or false")
    states = set(_names(query["state"], "state", STATES)) if "state" in query else None
    label = query.get("label")
    return [t for t in engine.torrents() if (states is None or t.status["state"] in states)
            and (paused is None or t.status["paused"] is (paused == "true"))
            and (label is None or label in t.notes["labels"])]


def _select(engine, query):
    """The torrents that GET /torrents' query chooses, and their total before paging."""
    torrents = _matching(engine, query, ("state", "paused", "label", "sort", "limit",
                                         "offset", "fields"))
    if "sort" in query:
        kinds = {f.name: f.type["type"] if isinstance(f.type, dict) else f.type for f in STATUS}
        sortable = [name for name, kind in kinds.items() if kind != "array"]  # lists do not sort
        sort = _names(query["sort"], "sort", [*sortable, *("-" + n for n in sortable)])[0]
        name = sort.removeprefix("-")
        # null sorts first ascending; tuples keep None away from comparisons with numbers.
        torrents.sort(key=lambda t: (t.status[name] is not None, t.status[name]),
                      reverse=sort.startswith("-"))
    offset, limit = _count(query, "offset", 0), _count(query, "limit", None)
    return torrents[offset:None if limit is None else offset + limit], len(torrents)


def _fields(torrent, names):
    """A function giving these status fields of torrent as they are now, even if called later."""
    snapshot = torrent.snapshot()
    return lambda: {name: torrent.files(snapshot) if name == "files" else snapshot[0][name]
                    for name in names}


async def _query_listing(request):
    """GET /torrents' answer to a query string: filtered, sorted, paged, trimmed."""
    torrents, total = _select(request.app[ENGINE], request.query)
    if "fields" not in request.query:
        # The common case, polling everything, joins bytes serialised at status changes.
        items = b",".join(t.summary for t in torrents)
    else:
        fields = _names(request.query["fields"], "fields", status_fields())
        builders = [_fields(t, fields) for t in torrents]
        items = (await _to_json(lambda: _Slices(build() for build in builders),
                                "files" in fields or len(torrents) > LARGE_LISTING))[1:-1]
    return _listing_body(items, total)


async def _query_torrent(request):
    """GET /torrents/{infohash}'s answer to a query string: only the fields= named."""
    torrent = _requested_torrent(request)
    _known_parameters(request.query, ("fields",))
    if "fields" not in request.query:  # "?&": no parameter, so the whole status
        return None
    fields = _names(request.query["fields"], "fields", status_fields())
    return await _to_json(_fields(torrent, fields), "files" in fields)


QUERIES.update(listTorrents=_query_listing, getTorrent=_query_torrent)
describe("listTorrents", [
    *_FILTERS, _query("sort", "a status field; a leading - sorts descending"),
    _query("limit", "at most this many", pattern="^[0-9]+$"),
    _query("offset", "skip this many first", pattern="^[0-9]+$"), _FIELDS_PARAMETER])
describe("getTorrent", [_FIELDS_PARAMETER])


# --------------------------------------------------------------------------- #
# Extension: per-torrent control and /settings. Labels; PATCH /torrents/{infohash} (file
# priorities, limits, trackers, moves), recheck, reannounce, bulk pause and resume,
# seeding limits, and GET/PATCH /settings
# --------------------------------------------------------------------------- #

#: Seconds a PATCH of save_path waits for the move; past it, 202 (the status shows moving_to).
MOVE_WAIT = 10.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """A per-torrent setting: what POST /torrents and PATCH /torrents/{infohash} take."""

    name: str
    schema: dict
    parse: object          # JSON (or a form's text) -> the value; TypeError: 400, ValueError: 422
    #: (add_torrent_params or handle, value): libtorrent's part. For the params of an
    #: add it runs on a worker thread, and may return notes to keep on the torrent.
    apply: object = None
    noted: bool = False    # kept in the daemon's notes on the torrent, not libtorrent's
    when: str = "add, change"


def settings_for(when):
    """The settings that "add" or "change" takes, by name."""
    return {setting.name: setting for setting in SETTINGS if when in setting.when}


def _presets(settings):
    """Parsed settings given at add, as presets for engine.add (see ADD_FIELDS)."""
    return [functools.partial(_preset, settings_for("add")[name], value)
            for name, value in settings.items()]


def _preset(setting, value, params):
    """Put a setting given at add into add_torrent_params; the notes it makes. In a thread."""
    return {setting.name: value} if setting.noted else setting.apply(params, value)


def _add_field(name, value, json_body):
    """A setting's value given to POST /torrents, parsed, as a preset (ADD_FIELDS' parse)."""
    return _presets(parse_settings({name: value}, "add", json_body))[0]


def parse_values(fields, parsers, schemas=None):
    """Each field named in parsers, parsed: 400 if malformed, 422 if out of range."""
    values = {}
    for name, value in fields.items():
        if name not in parsers:
            continue
        try:  # in JSON (with schemas), text is refused where the schema wants another type
            if schemas and isinstance(value, str) and schemas[name].get("type") != "string":
                raise TypeError("must not be a string in JSON")
            values[name] = parsers[name](value)
        except TypeError as error:
            raise ApiError(400, f"{name} {error}") from None
        except ValueError as error:
            raise ApiError(422, f"{name} {error}") from None
    return values


def parse_settings(fields, when, json_body=True):
    """The per-torrent settings among fields, parsed; when is "add" or "change"."""
    chosen = settings_for(when).values()
    return parse_values(fields, {s.name: s.parse or (lambda value: value) for s in chosen},
                        {s.name: s.schema for s in chosen} if json_body else None)


def _priorities_value(value):
    """File priorities 0-7: a list, one per file (comma-separated in a form), or {index: p}."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (dict, list)):
        raise TypeError("must be a list of priorities, or an object of index: priority")
    chosen = {}
    for index, priority in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(index, str) and not re.fullmatch("0|[1-9][0-9]{0,8}", index):
            raise TypeError(f"{index!r} is not a file index")  # "1" and "01" would be one
        chosen[int(index)] = _number(int, 0, high=7)(priority)
    return chosen if isinstance(value, dict) else list(chosen.values())


#: Labels one torrent may carry: enough to group, too few to be a database.
MAX_LABELS = 32


def _labels_value(value):
    """A list of labels; in a form, comma-separated."""
    if isinstance(value, str):
        value = [label.strip() for label in value.split(",") if label.strip()]
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise TypeError("must be a list of strings")
    if len(value) > MAX_LABELS or any(not 0 < len(label) <= 64 or not label.isprintable()
                                      for label in value):
        raise ValueError(f"at most {MAX_LABELS} labels of 1 to 64 printable characters")
    return list(dict.fromkeys(value))


def _trackers_value(value):
    """Tracker URLs: a list of them (one tier each), or a list of lists (tiers)."""
    if not isinstance(value, list) or not all(isinstance(item, (str, list)) for item in value):
        raise TypeError("must be a list of URLs, or a list of lists of URLs for tiers")
    tiers = [[item] if isinstance(item, str) else item for item in value]
    urls = [(url, tier) for tier, urls in enumerate(tiers) for url in urls]
    if not all(isinstance(url, str) for url, _ in urls):
        raise TypeError("every tracker must be a URL string")
    if len(urls) > MAX_TRACKERS:
        raise ValueError(f"at most {MAX_TRACKERS} trackers")
    for url, _ in urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "udp") or \
                not url.isprintable():
            raise ValueError(f"{url!r} is not an http(s) or udp tracker URL")
    return urls


def _flag_setter(bit):
    """Set or clear a torrent flag, in add_torrent_params or on a handle."""
    def apply(target, value):
        if isinstance(target, lt.add_torrent_params):
            target.flags = target.flags | bit if value else target.flags & ~bit
        elif value:
            target.set_flags(bit)
        else:
            target.unset_flags(bit)
    return apply


def _limit_setter(name):
    """Set a limit, 0 meaning none, in add_torrent_params or on a handle (set_<name>)."""
    def apply(target, value):
        if isinstance(target, lt.add_torrent_params):
            setattr(target, name, value or -1)
        else:
            getattr(target, "set_" + name)(value or -1)
    return apply


def _preset_priorities(params, chosen):
    """file_priorities at add (in a thread): libtorrent's full list, or a magnet's notes."""
    if isinstance(chosen, dict):
        raise ApiError(400, "file_priorities must be a list when adding a torrent")
    if params.ti is None:
        # A magnet's files are unknown, padding files too: libtorrent downloads nothing
        # when the metadata comes, and _map_chosen then maps the list past the padding.
        params.flags |= lt.torrent_flags.default_dont_download
        return {"chosen_priorities": chosen}
    params.file_priorities = _full_priorities(_files_of(params.ti), params.ti.num_files(), [],
                                              chosen)
    return None


def _saved_path(value):
    """A path the daemon wrote into a resume file: absolute, without NUL."""
    if not isinstance(value, str) or "\x00" in value or not os.path.isabs(value):
        raise ValueError("not an absolute path")
    return value


def _saved_text(value):
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value[:MAX_TEXT]


def _saved_mark(value):
    """The limits a torrent last reached: [ratio, seconds]."""
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(limit, (int, float)) and not isinstance(limit, bool) for limit in value):
        raise TypeError("not two limits")
    return value


_PRIORITY = {"type": "integer", "minimum": 0, "maximum": 7}
_LIMIT = {"type": "integer", "minimum": 0}
#: Every per-torrent setting, also in the status (STATUS): parsing, the request schemas
#: and the README come from it; those taken at add are ADD_FIELDS' rows (below).
SETTINGS = [
    Setting("paused", {"type": "boolean"}, _boolean, lambda params, value: setattr(
        params, "flags", params.flags & ~lt.torrent_flags.auto_managed | lt.torrent_flags.paused
        if value else params.flags), when="add"),
    Setting("labels", {"type": "array", "items": {"type": "string"}}, _labels_value, noted=True),
    Setting("sequential_download", {"type": "boolean"}, _boolean,
            _flag_setter(lt.torrent_flags.sequential_download)),
    Setting("file_priorities", {"anyOf": [
        {"type": "array", "items": _PRIORITY},
        {"type": "object", "additionalProperties": _PRIORITY}]}, _priorities_value,
        _preset_priorities),
    Setting("download_limit", _LIMIT, _number(int, 0), _limit_setter("download_limit")),
    Setting("upload_limit", _LIMIT, _number(int, 0), _limit_setter("upload_limit")),
    Setting("max_connections", _LIMIT, _number(int, 2, 0), _limit_setter("max_connections")),
    Setting("max_uploads", _LIMIT, _number(int, 0), _limit_setter("max_uploads")),
    Setting("ratio_limit", {"type": "number", "minimum": -2}, _number(float, 0, -1, -2),
            noted=True),
    Setting("seeding_time_limit", {"type": "integer", "minimum": -2},
            _number(int, 0, -1, -2), noted=True),
    Setting("trackers", {"type": "array", "items": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
        _trackers_value, when="change"),
    Setting("save_path", {"type": "string"}, None, when="change"),
]
ADD_FIELDS.update((name, (setting.schema, functools.partial(_add_field, name)))
                  for name, setting in settings_for("add").items())
NOTES.update({
    "labels": ([], _labels_value),
    "ratio_limit": (-1, _number(float, 0, -1, -2)),
    "seeding_time_limit": (-1, _number(int, 0, -1, -2)),
    "limit_reached": (None, _saved_text),
    "limit_mark": (None, _saved_mark),
    # file priorities given for a magnet, until its metadata comes
    "chosen_priorities": (None, lambda value: _priorities_value(value) if isinstance(
        value, list) else _priorities_value(None)),
    "moving_to": (None, _saved_path),  # during a move
})
STATUS.extend((
    Field("labels", {"type": "array", "items": {"type": "string"}}, False,
          "the torrent's labels", lambda torrent, status: torrent.notes["labels"]),
    Field("download_limit", "integer", False, "its own limit, bytes/s; 0 for none",
          lambda torrent, status: max(0, status.download_limit)),
    Field("upload_limit", "integer", False, "its own limit, bytes/s; 0 for none",
          lambda torrent, status: max(0, status.upload_limit)),
    Field("max_connections", "integer", False, "its own peer connection limit; 0 for none",
          lambda torrent, status: max(0, status.connections_limit)),
    Field("max_uploads", "integer", False, "its own unchoke slot limit; 0 for none",
          lambda torrent, status: max(0, status.uploads_limit)),
    Field("ratio_limit", "number", False, "the ratio at which it stops seeding: -1 the "
          "session's default, -2 none", lambda torrent, status: torrent.notes["ratio_limit"]),
    Field("seeding_time_limit", "integer", False, "seconds of seeding after which it stops: "
          "-1 the session's default, -2 none",
          lambda torrent, status: torrent.notes["seeding_time_limit"]),
    Field("limit_reached", "string", True, "which seeding limit stopped it, until resumed",
          lambda torrent, status: torrent.notes["limit_reached"]),
    Field("moving_to", "string", True, "where its data is being moved, during a move",
          lambda torrent, status: torrent.notes["moving_to"]),
))


async def configure(engine, torrent, settings):
    """Change a torrent's parsed settings, saved and shown; whether a move ended in MOVE_WAIT."""
    priorities, trackers = settings.pop("file_priorities", None), settings.pop("trackers", None)
    save_path = settings.pop("save_path", torrent.save_path)
    if priorities is not None:
        priorities = _priorities(torrent, priorities)
    for url, _ in trackers or ():
        if not _url_allowed(url, engine.config.local_only):
            raise ApiError(422, f"tracker {url!r} is not allowed here: it names this host, "
                           "or leaves it under --local-only, or holds a quote, space, <, >, "
                           "backslash or backtick")
    with _handle_call():
        for name, value in settings.items():
            setting = settings_for("change")[name]
            if setting.noted:
                torrent.notes[name] = value
            elif setting.apply:
                setting.apply(torrent.handle, value)
        if trackers is not None:
            torrent.handle.replace_trackers([{"url": url, "tier": tier} for url, tier in trackers])
    if priorities is not None:
        await _prioritize(engine, torrent, priorities)
    moved = save_path == torrent.save_path or await move(engine, torrent, save_path)
    await engine.save(torrent)  # libtorrent answers it after every change posted above
    await engine.confirm(torrent, "the change")
    if torrent.removing:  # a DELETE took it while its move ran: no status to answer with
        raise ApiError(404, f"no torrent with infohash {torrent.infohash}")
    return moved


async def _prioritize(engine, torrent, priorities):
    """Set libtorrent's full list of file priorities; return once it has them."""
    if priorities == torrent.file_priorities:
        return  # libtorrent would not say so
    with _handle_call():
        torrent.handle.prioritize_files(priorities)
    # libtorrent applies them on its disk thread and says so in file_prio_alert.
    await engine.expect(torrent.ids, lt.file_prio_alert, "the file priorities")
    torrent.file_priorities = priorities
    torrent.refreshed_files()


def _priorities(torrent, chosen):
    """libtorrent's full list of file priorities from a list or an {index: priority} object."""
    if torrent.info is None:
        raise ApiError(409, "file_priorities need the metadata, which has not arrived")
    return _full_priorities(torrent.info["files"], torrent.info["all_files"],
                            torrent.file_priorities, chosen)


def _full_priorities(files, all_files, current, chosen):
    """current, 4 for each file past its end, changed by chosen: a list, one per file of files
    (padding left out), or an {index: priority} object."""
    full = list(current) + [4] * (all_files - len(current))
    indexes = [index for index, _, _ in files]
    if isinstance(chosen, list):
        if len(chosen) != len(indexes):
            raise ApiError(422, f"file_priorities has {len(chosen)} entries; the "
                           f"torrent has {len(indexes)} files")
        chosen = dict(zip(indexes, chosen))
    indexes = set(indexes)  # a list would make this loop quadratic: minutes at 100,000
    for index, priority in chosen.items():
        if index not in indexes:
            raise ApiError(422, f"file_priorities: no file with index {index}")
        full[index] = priority
    return full


async def _map_chosen(engine, torrent):
    """A metadata listener: apply a magnet's chosen priorities, or stop it if they misfit."""
    chosen = torrent.notes["chosen_priorities"]
    if chosen is None:
        return
    try:
        await _prioritize(engine, torrent, _priorities(torrent, chosen))
        torrent.notes["chosen_priorities"] = None
        await engine.save(torrent)
    except ApiError as error:
        torrent.fault = error.detail
        engine.stop(torrent)


def _hold_chosen(params, notes):
    """A load listener: nothing downloads until a magnet's chosen priorities are mapped."""
    if notes["chosen_priorities"] is not None:
        # libtorrent keeps no default_dont_download in resume data.
        params.flags |= lt.torrent_flags.default_dont_download
        if params.ti is not None:
            params.file_priorities = [0] * params.ti.num_files()


async def move(engine, torrent, save_path):
    """Move a torrent's data within the roots; True once moved, False if past MOVE_WAIT."""
    if torrent.notes["moving_to"] is not None:
        raise ApiError(409, f"torrent {torrent.infohash} is already moving")
    # Saved first: a crash in the middle leaves files in both places, and the next
    # start must know where to look (see _where_data_is).
    torrent.notes["moving_to"] = save_path
    try:
        await engine.save(torrent)
        with _handle_call():
            torrent.handle.move_storage(save_path, lt.move_flags_t.fail_if_exist)
            torrent.handle.post_status()  # a move changes nothing else the status shows
    except BaseException:  # a failed save, or the request cancelled at shutdown
        torrent.notes["moving_to"] = None
        raise
    moving = engine.spawn(_moved(engine, torrent, save_path), f"move {torrent.infohash}")
    done, _ = await asyncio.wait([moving], timeout=MOVE_WAIT)
    if done:
        moving.result()  # the failure, if it failed
    return bool(done)


async def _moved(engine, torrent, save_path):
    """Wait for a move to end, however long it takes; record how it went."""
    def outcome(alert):
        if isinstance(alert, lt.storage_moved_alert):
            return ""
        # fail_if_exist reports a file in the way as error 0, "Success", with the
        # path of the file it would have moved, not of the one in the way.
        if not alert.error.value():
            return "one of its files is already there"
        return f"{alert.error.message()}: {engine.shown(alert.file_path())}"
    try:
        failure = await engine.expect(torrent.ids, (lt.storage_moved_alert,
                                                    lt.storage_moved_failed_alert),
                                      "the move", outcome, timeout=None)
    finally:
        torrent.notes["moving_to"] = None
        engine.refresh(torrent)
    if failure:
        torrent.fault = f"moving to {engine.shown(save_path)} failed: {failure}"
        engine.save(torrent)
        raise ApiError(409, torrent.fault)
    # The event carries the torrent's status: wait for one that shows the new place.
    await engine.confirm(torrent, "the move")
    engine.emit("moved", torrent, engine.shown(save_path))
    await engine.settled()
    engine.save(torrent)


def _missing_file(save_path, files, priorities):
    """The first wanted file that is missing or shorter than it should be, or None."""
    for index, path, size in files:  # sizes only: reading the data would take hours
        if index < len(priorities) and not priorities[index]:
            continue
        try:
            if os.stat(os.path.join(save_path, path)).st_size < size:
                return path
        except (OSError, ValueError):  # ValueError: a NUL in a name, from a state file
            return path
    return None


def _finish_move(engine, params, notes):
    """A load listener: a move a crash cut short ends where the data is whole, rechecked."""
    if notes["moving_to"]:
        params.save_path = _where_data_is(params, notes["moving_to"], engine.inside_roots)
        notes["moving_to"] = None
        params.have_pieces = []  # check what reached that place


def _where_data_is(params, moving_to, inside_roots):
    """Where a half-moved torrent's data is: where it was if whole, else the target if whole,
    else the target if the originals went after copies, else where it was, the moved files
    put back; in a thread."""
    if not (params.ti and inside_roots(moving_to)):
        return params.save_path
    files = _files_of(params.ti)
    # Across file systems libtorrent copies every file, then deletes the originals: while
    # it copies, a copy has its full size but not yet its data, and every original is whole.
    if _missing_file(params.save_path, files, params.file_priorities) is None:
        return params.save_path
    if _missing_file(moving_to, files, params.file_priorities) is None:
        return moving_to
    # Files only at the target were renamed there (one file system, file by file: they go
    # back), or copied and their originals deleted, which libtorrent does to none before
    # every copy is made: across file systems, one such file means the copies are all.
    for _, path, _ in files:
        moved, original = os.path.join(moving_to, path), os.path.join(params.save_path, path)
        if os.path.isfile(moved) and not os.path.islink(moved) and not os.path.lexists(
                original):
            try:
                os.makedirs(os.path.dirname(original), exist_ok=True)
                os.rename(moved, original)
            except OSError as error:  # not st_dev: two bind mounts of one disk share it
                if error.errno == errno.EXDEV:
                    return moving_to
    return params.save_path


async def recheck(engine, torrent):
    """Check every piece on disk (a paused torrent is checked when resumed)."""
    await engine.confined(torrent)
    with _handle_call():
        torrent.handle.force_recheck()
    await engine.confirm(torrent, "the recheck")


async def reannounce(engine, torrent):
    """Announce to every tracker now, minimum intervals notwithstanding."""
    with _handle_call():
        torrent.handle.force_reannounce(0, lt.reannounce_flags_t.ignore_min_interval)


_INTEGER = {"type": "integer"}
ON_LIMIT = ("pause", "remove", "remove_with_files")  #: what on_limit does at a seeding limit
#: The session's settings: PATCH /settings changes them; what it set beats flags at restart.
OPTIONS.extend((
    Option("download_limit", _number(int, 0), 0, "bytes/s all downloads may use together; 0 "
           "for no limit", setting="download_limit", schema=_INTEGER, pack="download_rate_limit"),
    Option("upload_limit", _number(int, 0), 0, "bytes/s all uploads may use together; 0 for "
           "no limit", setting="upload_limit", schema=_INTEGER, pack="upload_rate_limit"),
    Option("max_active_downloads", _number(int, 0, -1), 3, "torrents that download at once, "
           "the rest queued; -1 for no limit", setting="max_active_downloads", schema=_INTEGER,
           pack="active_downloads"),
    Option("max_active_seeds", _number(int, 0, -1), 5, "torrents that seed at once; -1 for no "
           "limit", setting="max_active_seeds", schema=_INTEGER, pack="active_seeds"),
    Option("max_active_torrents", _number(int, 0, -1), 500, "torrents active at once, "
           "downloading or seeding; -1 for no limit", setting="max_active_torrents",
           schema=_INTEGER, pack="active_limit"),
    Option("max_peer_connections", _number(int, 2), 200, "peer connections of all torrents "
           "together", setting="max_connections", schema=_INTEGER, pack="connections_limit"),
    Option("ratio_limit", _number(float, 0, -1), -1.0, "the ratio at which torrents "
           "without their own limit stop seeding; -1 for none", setting="ratio_limit",
           schema={"type": "number"}),
    Option("seeding_time_limit", _number(int, 0, -1), -1, "seconds of seeding after which "
           "torrents without their own limit stop; -1 for none",
           setting="seeding_time_limit", schema=_INTEGER),
    Option("on_limit", _choice(*ON_LIMIT), "pause", "what happens to a torrent that "
           "reaches a seeding limit", setting="on_limit",
           schema={"type": "string", "enum": list(ON_LIMIT)}),
))


def _enforce_limits(engine, torrent):
    """Apply on_limit to a finished torrent that reached its ratio or seeding time."""
    status, notes = torrent.status, torrent.notes
    if not status["is_finished"] or status["paused"] or torrent.removing:
        return
    limits = [engine.settings[key] if notes[key] == -1 else notes[key]
              for key in ("ratio_limit", "seeding_time_limit")]
    if limits == notes["limit_mark"]:  # resumed after reaching these: it seeds on
        return
    seeding = status["seeding_time"] + int(time.monotonic() - torrent.updated)
    if 0 <= limits[0] <= status["ratio"]:
        reached = f"ratio {status['ratio']:g} reached its limit {limits[0]:g}"
    elif 0 <= limits[1] <= seeding:
        reached = f"{seeding} s of seeding reached its limit {limits[1]} s"
    else:
        return
    notes["limit_mark"], notes["limit_reached"] = limits, reached
    action = engine.settings["on_limit"]
    engine.emit("limit_reached", torrent, f"{reached}; {action.replace('_', ' ')}")
    if action == "pause":
        engine.stop(torrent)
    else:
        engine.spawn(engine.remove(torrent, action == "remove_with_files"),
                     f"remove {torrent.infohash}")


SETTINGS_LOCK = web.AppKey("settings_lock", asyncio.Lock)
SETTINGS_FILE = "settings.json"  #: state file that keeps what PATCH /settings set


async def _load_settings(engine):
    """Take back what PATCH /settings saved, which beats the flags; a bad value is logged."""
    try:
        saved = json.loads(await engine.store.read(SETTINGS_FILE) or b"{}")
    except (OSError, ValueError, RecursionError) as error:
        log.warning("ignoring %s: %s", engine.store.root / SETTINGS_FILE, error)
        return
    options = _session_options()
    for key, value in saved.items() if isinstance(saved, dict) else ():
        try:
            engine.settings[key] = options[key].parse(value)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring the saved setting %s=%.60r", key, value)


async def configure_session(engine, lock, changes):
    """Save parsed session settings, then apply and announce them; unsaved, none is made."""
    async with lock:  # each write holds every change before it
        changes = {key: value for key, value in changes.items()
                   if engine.settings[key] != value}
        if not changes:
            return
        settings = {**engine.settings, **changes}
        with _state_io("saving the settings"):
            await engine.store.put(SETTINGS_FILE, json.dumps(settings, indent=1).encode())
        engine.settings.update(changes)
    engine.apply_settings()
    engine.emit("settings", detail=", ".join(f"{k}={v}" for k, v in changes.items()))
    await engine.settled()


def _control_setup(app, engine):
    app[SETTINGS_LOCK] = asyncio.Lock()
    engine.listen("start", lambda: _load_settings(engine))
    engine.listen("tick", lambda: [_enforce_limits(engine, t) for t in engine.torrents()])
    engine.listen("resume", lambda torrent: torrent.notes.update(limit_reached=None))
    engine.listen("metadata", lambda torrent: _map_chosen(engine, torrent))
    engine.listen("load", _hold_chosen)
    engine.listen("load", lambda params, notes: _finish_move(engine, params, notes))


EXTENSIONS.append(_control_setup)


@api("PATCH", "/torrents/{infohash}", "changeTorrent", (404, 408, 409, 415, 422, 503),
     responses={"200": _answer("changed; its new status", _ref("Status")),
                "202": _answer("changed; its data is still being moved", _ref("Status"))},
     parameters=[INFOHASH_PARAMETER],
     requestBody=lambda: {"required": True, "content": {"application/json": {
         "schema": _object({name: setting.schema for name, setting
                            in settings_for("change").items()}, required=[])}}})
async def change_torrent(request):
    """Change a torrent's settings; save_path moves its data"""
    torrent, engine = _requested_torrent(request), request.app[ENGINE]
    fields = await read_fields(request, list(settings_for("change")),
                               types=("application/json",))
    settings = parse_settings(fields, "change")
    if "save_path" in settings:
        settings["save_path"] = await asyncio.to_thread(resolve_save_path, engine.roots,
                                                        _text(settings, "save_path"))
    moved = await configure(engine, torrent, settings)
    return web.Response(body=await torrent.body(), status=200 if moved else 202,
                        content_type="application/json")


recheck_torrent = _one("recheck", recheck, "rechecking", "Check every piece on disk again",
                       (404, 409, 503), responses={"200": DONE},
                       parameters=[INFOHASH_PARAMETER])
reannounce_torrent = _one("reannounce", reannounce, "announcing",
                          "Announce to every tracker now", responses={"200": DONE},
                          parameters=[INFOHASH_PARAMETER])


def _bulk(action):
    """PUT /torrents/pause or /resume: the action on every torrent the filters choose."""
    async def handler(request):
        engine = request.app[ENGINE]
        torrents = _matching(engine, request.query, ("state", "paused", "label"))
        count = 0
        # LOAD_BATCH at a time: all at once overflows libtorrent's alert queue.
        for start in range(0, len(torrents), LOAD_BATCH):
            done = await asyncio.gather(*(getattr(engine, action)(t) for t in
                                          torrents[start:start + LOAD_BATCH]),
                                        return_exceptions=True)
            count += sum(1 for outcome in done if not isinstance(outcome, BaseException))
        return web.json_response({"detail": f"{action}d {count} of {len(torrents)} "
                                  "torrents", "count": count})
    handler.__doc__ = f"{action.capitalize()} every torrent, or those the filters choose"
    return api("PUT", f"/torrents/{action}", f"{action}Torrents", responses={
        "200": _answer("how many", _object({"detail": {"type": "string"},
                                            "count": {"type": "integer"}}))},
        parameters=_FILTERS)(handler)


pause_torrents, resume_torrents = _bulk("pause"), _bulk("resume")


def _session_options():
    """The options PATCH /settings changes, by their key there."""
    return {option.setting: option for option in OPTIONS if option.setting}


def _settings_schema():
    return _object({key: {**option.schema, "description": option.help}
                    for key, option in _session_options().items()})


@api("GET", "/settings", "getSettings",
     responses={"200": _answer("the settings", _settings_schema())})
async def get_settings(request):
    """The session's settings"""
    return web.json_response(request.app[ENGINE].settings)


@api("PATCH", "/settings", "changeSettings", (408, 415, 422, 503),
     responses={"200": _answer("the settings", _settings_schema())},
     requestBody={"required": True, "content": {"application/json": {
         "schema": {**_settings_schema(), "required": []}}}})
async def change_settings(request):
    """Change session settings; they are kept for the next start"""
    engine, options = request.app[ENGINE], _session_options()
    fields = await read_fields(request, list(options), types=("application/json",))
    await configure_session(engine, request.app[SETTINGS_LOCK], parse_values(
        fields, {key: option.parse for key, option in options.items()},
        {key: option.schema for key, option in options.items()}))
    return web.json_response(engine.settings)


# --------------------------------------------------------------------------- #
# Extension: peer and tracker views. GET /torrents/{infohash}/peers and /trackers,
# and when a tracker last reported on the swarm
# --------------------------------------------------------------------------- #

#: Peer flag bits by name; the 2.1.1 bindings lack uTP's and SSL's.
_PEER_FLAGS = {**{name: getattr(lt.peer_info, name) for name in (
    "interesting", "choked", "remote_interested", "remote_choked", "supports_extensions",
    "outgoing_connection", "handshake", "connecting", "on_parole", "seed",
    "optimistic_unchoke", "snubbed", "upload_only", "endgame_mode", "holepunched",
    "rc4_encrypted", "plaintext_encrypted")}, "utp_socket": 1 << 17, "ssl_socket": 1 << 18}
#: How a peer was found, by bit; the bindings lack "incoming".
_PEER_SOURCES = {"tracker": 1, "dht": 2, "pex": 4, "lsd": 8, "resume": 16, "incoming": 32}


def _peer(info):
    """One connected peer as the API shows it."""
    (host, port), flags = info.ip, info.flags
    kind = "web" if info.connection_type != lt.peer_info.standard_bittorrent else \
        "utp" if flags & _PEER_FLAGS["utp_socket"] else "tcp"
    return {"ip": host, "port": port, "client": info.client.decode("utf-8", "replace")[:64],
            "progress": round(info.progress * 100, 2),
            "download_rate": info.payload_down_speed, "upload_rate": info.payload_up_speed,
            "total_download": info.total_download, "total_upload": info.total_upload,
            "connection": kind, "encrypted": bool(flags & (
                lt.peer_info.rc4_encrypted | lt.peer_info.plaintext_encrypted)),
            "flags": [name for name, bit in _PEER_FLAGS.items() if flags & bit],
            "source": [name for name, bit in _PEER_SOURCES.items() if info.source & bit]}


def _tracker(entry, heard, slot):
    """One tracker as the API shows it; heard is what its alerts said, slot 0 v1 or 1 v2."""
    answered, error = heard.get(entry["url"], (None, ""))
    # libtorrent copies only the first endpoint's v1 state to the top: v2-only never has it.
    # Until it has an endpoint (just added, or paused), nothing is known.
    state = entry["endpoints"][0]["info_hashes"][slot] if entry["endpoints"] else {
        **entry, "scrape_complete": -1, "scrape_incomplete": -1, "scrape_downloaded": -1}
    failed = state["fails"] or state["last_error"]["value"]
    status = ("updating" if state["updating"] else "error" if failed
              else "working" if entry["verified"] or answered else "not_contacted")
    return {"url": entry["url"], "tier": entry["tier"], "status": status,
            "message": state["message"] or (error if failed else ""),
            "seeds": state["scrape_complete"], "peers": state["scrape_incomplete"],
            "downloaded": state["scrape_downloaded"], "last_announce": answered,
            "next_announce": state["next_announce"] if (state["next_announce"] or 0) > 0
            else None}


async def peers(engine, torrent):
    """The connected peers."""
    # peer_info_alert's list raises TypeError in the 2.1.1 bindings: a thread asks instead.
    with _handle_call():
        return [_peer(peer) for peer in await asyncio.to_thread(torrent.handle.get_peer_info)]


async def trackers(engine, torrent):
    """The torrent's trackers (tracker_list_alert's list has the same gap)."""
    heard = torrent.extra.get("trackers_heard", {})
    with _handle_call():
        return [_tracker(entry, heard, int(len(torrent.ids[0]) == 64))
                for entry in await asyncio.to_thread(torrent.handle.trackers)]


def _on_tracker_reply(engine, alert):
    """Note when a tracker last reported on the swarm, or why it did not."""
    torrent = engine.torrent_of(alert)
    if torrent is None:
        return
    heard, url = torrent.extra.setdefault("trackers_heard", {}), alert.tracker_url()
    if isinstance(alert, lt.tracker_error_alert):
        heard[url] = (None, alert.failure_reason() or alert.error_message() or alert.message())
    else:
        torrent.extra["last_scrape"] = time.time()
        heard[url] = (int(torrent.extra["last_scrape"]), "")


def _views_setup(app, engine):
    for kind in (lt.tracker_reply_alert, lt.scrape_reply_alert, lt.tracker_error_alert):
        engine.on_alert(kind, _on_tracker_reply)


EXTENSIONS.append(_views_setup)
STATUS.append(Field("last_scrape", "integer", True, "seconds since a tracker last "
                    "reported counts", lambda torrent, status: _seconds_since(
                        torrent.extra.get("last_scrape"))))


@api("GET", "/torrents/{infohash}/peers", "listPeers", (404, 503), responses={
    "200": _answer("its connected peers", _object({"peers": {"type": "array", "items": _object({
        "ip": {"type": "string"}, "port": {"type": "integer"}, "client": {"type": "string"},
        "progress": {"type": "number"}, **dict.fromkeys((
            "download_rate", "upload_rate", "total_download", "total_upload"), {
                "type": "integer"}),
        "connection": {"type": "string", "enum": ["tcp", "utp", "web"]},
        "encrypted": {"type": "boolean"}, **{key: {"type": "array", "items": {
            "type": "string", "enum": list(names)}} for key, names in (
                ("flags", _PEER_FLAGS), ("source", _PEER_SOURCES))}})}}))},
    parameters=[INFOHASH_PARAMETER])
async def torrent_peers(request):
    """Its connected peers"""
    torrent = _requested_torrent(request)
    return web.json_response({"peers": await peers(request.app[ENGINE], torrent)})


@api("GET", "/torrents/{infohash}/trackers", "listTrackers", (404, 503), responses={
    "200": _answer("its trackers", _object({"trackers": {"type": "array", "items": _object({
        "url": {"type": "string"}, "tier": {"type": "integer"}, "status": {
            "type": "string", "enum": ["not_contacted", "working", "updating", "error"]},
        "message": {"type": "string"}, **dict.fromkeys(("seeds", "peers", "downloaded"), {
            "type": "integer", "description": "from the last scrape or announce; -1 if unknown"}),
        **dict.fromkeys(("last_announce", "next_announce"), {
            "type": ["integer", "null"], "description": "Unix time"})})}}))},
    parameters=[INFOHASH_PARAMETER])
async def torrent_trackers(request):
    """Its trackers and what they last said"""
    torrent = _requested_torrent(request)
    return web.json_response({"trackers": await trackers(request.app[ENGINE], torrent)})


# --------------------------------------------------------------------------- #
# Extension: the queue. A download starts as soon as libtorrent's queue would let it (at
# its add, or when the one before it finishes), as many data checks run as fit, and the
# order queue-move-* gives outlives a restart
# --------------------------------------------------------------------------- #

CHECK_BUDGET = 1024 ** 3  #: bytes of torrent data checked at once (see _pace_checks)


def _queue_has_room(torrents, settings):
    """Whether libtorrent's queue would start one more download now."""
    running = [t for t in torrents if t.status["auto_managed"] and not t.status["paused"]]
    downloads = sum(1 for t in running if not t.status["is_finished"])
    return all(limit < 0 or used < limit for limit, used in (
        (settings["max_active_downloads"], downloads),
        (settings["max_active_torrents"], len(running))))


def _next_in_queue(engine, candidate=None):
    """The queued download the next tick would start first (a just added candidate counts)."""
    waiting = [t for t in engine.torrents() if t.status["queued"] and (
        t is candidate or t.status["state"] in ("downloading", "downloading_metadata"))]
    return min(waiting, key=lambda t: t.status["queue_position"], default=None)


def _start_if_next(engine, torrent):
    """Start a just-added torrent if the queue's next tick would: True if it did."""
    # Only if next, or the tick would pause it again for the one it prefers.
    if _next_in_queue(engine, torrent) is not torrent or not _queue_has_room(
            engine.torrents(), engine.settings):
        return False
    with contextlib.suppress(RuntimeError):
        torrent.handle.resume()
    return True


def _hand_on(engine, alert):
    """One finished: the next queued download starts now, not at the queue's next tick."""
    torrent = engine.torrent_of(alert)
    if torrent is not None and torrent.status is not None and torrent.status["auto_managed"]:
        following = _next_in_queue(engine)  # the tick keeps this choice too
        if following is not None:
            with contextlib.suppress(RuntimeError):
                following.handle.resume()


def _pace_checks(engine, paced):
    """Let libtorrent's queue start as many checks at once as fit CHECK_BUDGET."""
    # It starts active_checking per one-second tick (default 1); large ones take turns.
    sizes = [t.status["total_wanted"] for t in engine.torrents()
             if t.status["state"] == "checking_files"]
    wanted = max(1, min(len(sizes), CHECK_BUDGET * len(sizes) // max(1, sum(sizes))))
    if wanted != paced[0]:
        paced[0] = wanted
        engine.apply_settings({"active_checking": wanted})


QUEUE_FILE = "queue.json"  #: state file: the queue's order, kept since a move changed it


async def queue_move(engine, torrent, move):
    """Move it in libtorrent's queue (top, up, down, bottom); answer once the order is saved."""
    with _handle_call():
        getattr(torrent.handle, f"queue_position_{move}")()
    # The torrents it passed moved too. libtorrent answers in order, so their fresh
    # status is in the cache by the time this torrent's is.
    engine.refresh()
    await engine.confirm(torrent, "the queue move")
    queued = sorted((t for t in engine.torrents() if t.status["queue_position"] >= 0),
                    key=lambda t: t.status["queue_position"])
    with _state_io("saving the queue's order"):
        await engine.store.put(QUEUE_FILE, json.dumps([t.infohash for t in queued]).encode())


async def _restore_order(engine):
    """After the load, put the saved torrents back in the queue's order (a restart keeps it)."""
    try:
        order = json.loads(await engine.store.read(QUEUE_FILE) or b"[]")
    except (OSError, ValueError, RecursionError) as error:
        log.warning("ignoring %s: %s", QUEUE_FILE, error)
        return
    while engine.loading:  # till each has its first status, and so its handle
        await asyncio.sleep(STATUS_INTERVAL)
    known = []
    for infohash in order if isinstance(order, list) else ():
        with contextlib.suppress(ApiError, TypeError):  # removed since, or not an id
            known.append(engine.lookup(infohash))
    for torrent in reversed(known):  # to the top, last first: then any added since
        with contextlib.suppress(RuntimeError):
            torrent.handle.queue_position_top()
    engine.refresh()


def _queue_setup(app, engine):
    """Start downloads as soon as the queue lets them, and pace the checks at each tick."""
    paced = [1]  # libtorrent's active_checking, as last set
    async def start():  # a task of its own: it waits for the load, which runs after start
        engine.spawn(_restore_order(engine), "restore the queue's order")
    engine.listen("start", start)
    engine.listen("admit", functools.partial(_start_if_next, engine))
    engine.on_alert(lt.torrent_finished_alert, _hand_on)
    engine.listen("tick", lambda: _pace_checks(engine, paced))


EXTENSIONS.append(_queue_setup)


# --------------------------------------------------------------------------- #
# Extension: events. The event log, GET /events streams (Server-Sent Events) and
# webhooks, all fed from the engine's "event" listener
# --------------------------------------------------------------------------- #

#: Every kind of event.
EVENT_TYPES = ("added", "metadata", "state", "paused", "resumed", "finished", "error", "moved",
               "limit_reached", "removed", "settings")
#: Events kept for GET /events clients that reconnect with Last-Event-ID.
EVENT_RING = 10_000
#: Event ids reserved at a time in the state directory (EVENT_COUNTER).
EVENT_ID_BLOCK = 10_000
EVENT_COUNTER = "event-id"
#: Events a GET /events client may fall behind before it is cut off: never waited for.
SUBSCRIBER_QUEUE = 1000
#: GET /events streams at once; each holds an API connection for as long as it lasts.
MAX_SUBSCRIBERS = 32
#: Seconds between comments on an idle event stream, so proxies keep it open.
HEARTBEAT = 15.0
#: Bytes an event stream may have in flight to its reader, in the daemon and the kernel each.
STREAM_BUFFER = 32 * 1024
#: Seconds a write to an event stream may wait for the client to read.
STREAM_WRITE_TIMEOUT = 10.0
#: Webhook delivery: seconds per attempt, longest pause between attempts, how long an
#: event is retried, and how many events each target's queue holds.
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_MAX_DELAY = 600.0
WEBHOOK_RETRY_FOR = 24 * 3600.0
WEBHOOK_QUEUE = 10_000
#: The status fields an event carries about its torrent.
EVENT_FIELDS = ("infohash", "name", "state", "progress", "paused", "error", "save_path",
                "total_size", "labels")


def _webhook_url(text):
    """An http(s) URL without spaces or control characters."""
    # urlsplit drops CR and LF quietly, but the URL as given is the one posted to.
    if re.search("[\x00-\x20\x7f]", text):
        raise ValueError("a URL holds no spaces or control characters (CR, LF, tab...)")
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # its message would quote the URL's user info
        raise ValueError("not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("give an http:// or https:// URL")
    return text


def _shown_url(url):
    """A webhook URL as shown: its password, or a lone user name (often a token), as ***."""
    try:
        netloc = urllib.parse.urlsplit(_webhook_url(url)).netloc
    except ValueError:  # refused, maybe for CR or LF, which urlsplit drops: all to the last @
        return re.sub(r"^([^:/@]*://)?.*@", r"\1***@", url, flags=re.S)
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return url.replace(netloc, f"{user}:***@{host}" if colon else f"***@{host}", 1)


def _event_types(text):
    """Event types, comma-separated."""
    types = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in types if name not in EVENT_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown event type {(unknown or [''])[0]!r}; give some of "
                         + ", ".join(EVENT_TYPES))
    return types


def _local_webhooks(values):
    """With --local-only, every webhook must name this host: nothing leaves it."""
    for url in values["webhooks"] if values["local_only"] else ():
        if not _is_local_url(url):
            return (f"with --local-only, {_shown_url(url)!r} must name localhost or a "
                    "loopback address")
    return None


OPTIONS.extend((
    Option("webhooks", _webhook_url, (), "POST events as JSON to this http(s) URL; repeat "
           "for more", repeat=" ", flag_name="webhook", check=_local_webhooks,
           shown=lambda urls: repr([_shown_url(url) for url in urls])),
    Option("webhook_events", _event_types, ("finished", "error", "removed"), "the events "
           "webhooks get, comma-separated"),
    Option("webhook_secret", str, None, "sign webhook bodies with HMAC-SHA256 under this "
           "key (X-TorrentFlow-Signature)", secret=True),
    Option("webhook_secret_file", Path, None, "read the webhook secret from this file"),
))


def _logged(awaitable, what):
    """Let state directory work run on without a waiter, its failure logged."""
    future = asyncio.ensure_future(awaitable)
    future.add_done_callback(lambda done: done.cancelled() or done.exception() is None or
                             log.error("state directory: %s failed: %s", what,
                                       done.exception()))
    return future


class _Subscriber:
    """One GET /events stream: the events it asked for, queued until written."""

    def __init__(self, types, infohashes):
        self.types, self.infohashes = types, infohashes
        self.queue = collections.deque()
        self.wake = asyncio.Event()
        self.overflowed = False

    def wants(self, event):
        return event["type"] in self.types and (not self.infohashes
                                                or event["infohash"] in self.infohashes)

    def offer(self, event):
        if self.wants(event):
            # A reader that falls this far behind is cut off, never waited for.
            self.overflowed |= len(self.queue) >= SUBSCRIBER_QUEUE
            if not self.overflowed:
                self.queue.append(event)
            self.wake.set()


def _queued_problem(name, body):
    """Why a file of a webhook's queue cannot be delivered, or None."""
    # A disk fault or a hand edit that broke the task would stop its target for good.
    number = name.removesuffix(".json")
    if number == name or not (number.isascii() and number.isdigit() and len(number) < 19):
        return "not named <event id>.json"
    try:
        event = json.loads(body.decode())
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        return f"not UTF-8 JSON: {error}"
    if not isinstance(event, dict):
        return "not a JSON object"
    # The type goes into a header, and the time decides when retrying ends.
    if event.get("type") not in EVENT_TYPES:
        return "no known event type"
    if type(event.get("time")) is not int:
        return "no time"
    return None


class _Webhook:
    """One webhook target: its queue of events, kept on disk, delivered in order with retries."""

    def __init__(self, url, types, secret, store):
        self.url, self.types, self.secret, self.store = url, types, secret, store
        self.shown = _shown_url(url)  # the URL wherever it is shown: no credentials
        self.folder = f"webhooks/{hashlib.sha1(url.encode()).hexdigest()[:16]}"
        self.pending = {}             # event id -> the JSON body, oldest first
        self.posting = None           # the id of the event being posted
        self.wake = asyncio.Event()
        self.last_success = self.last_error = None
        self.counts = collections.Counter()  # delivered, failed (attempts), dropped

    def offer(self, event):
        if event["type"] not in self.types:
            return
        body = json.dumps(event, separators=(",", ":")).encode()
        self.pending[event["id"]] = body
        # Written before delivery is tried: a crash from here on still delivers it.
        _logged(self.store.put(f"{self.folder}/{event['id']}.json", body), "queueing an event")
        if len(self.pending) > WEBHOOK_QUEUE:  # the oldest but the one being posted
            oldest = next(i for i in self.pending if i != self.posting)
            self._give_up(oldest, f"the queue holds {WEBHOOK_QUEUE} events")
        self.wake.set()

    def _give_up(self, event_id, why):
        if self.pending.pop(event_id, None) is None:
            return  # dropped already: the queue overflowed while it was being posted
        self.counts["dropped"] += 1
        _logged(self.store.drop(f"{self.folder}/{event_id}.json"), "dropping an event")
        log.warning("webhook %s: dropped event %d: %s", self.shown, event_id, why)

    async def deliver(self, client):
        """Post the queued events one by one, for ever."""
        for name, body in (await self.store.read_folder(self.folder)).items():
            if problem := _queued_problem(name, body):
                await self._quarantine(name, body, problem)
            else:
                self.pending.setdefault(int(name.removesuffix(".json")), body)
        self.pending = dict(sorted(self.pending.items()))
        attempt = 0
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            event_id, body = next(iter(self.pending.items()))
            self.posting = event_id
            delivered = await self._post(client, event_id, body)
            self.posting, attempt = None, attempt + 1
            if delivered:
                self.pending.pop(event_id, None)
                _logged(self.store.drop(f"{self.folder}/{event_id}.json"), "a delivered event")
            elif time.time() - json.loads(body)["time"] > WEBHOOK_RETRY_FOR:
                self._give_up(event_id, f"undelivered for {WEBHOOK_RETRY_FOR:g} s")
            else:  # exponential backoff with jitter, so that retries from many daemons spread
                await asyncio.sleep(min(WEBHOOK_MAX_DELAY, 2 ** (attempt - 1))
                                    * random.uniform(0.5, 1.5))
                continue
            attempt = 0

    async def _quarantine(self, name, body, why):
        """Move a queue file that cannot be delivered aside, under quarantine/."""
        target = f"quarantine/{self.folder}/{name}.{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            await self.store.put(target, body)
            await self.store.drop(f"{self.folder}/{name}")
        except OSError as error:
            log.warning("webhook %s: skipping queue file %s (%s), which cannot be moved "
                        "aside: %s", self.shown, name, why, error)
            return
        log.warning("webhook %s: moved queue file %s to %s: %s", self.shown, name, target, why)

    async def _post(self, client, event_id, body):
        """One delivery; True on a 2xx answer."""
        event = json.loads(body)
        headers = {"Content-Type": "application/json", "X-TorrentFlow-Event": event["type"],
                   "X-TorrentFlow-Delivery": str(event_id)}
        if self.secret:
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-TorrentFlow-Signature"] = f"sha256={digest}"
        try:
            async with client.post(self.url, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT),
                                   allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    self.counts["delivered"] += 1
                    self.last_success = int(time.time())
                    return True
                self.last_error = f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            # An error may quote the URL: shown in GET /webhooks, it must not hold secrets.
            self.last_error = (str(error) or type(error).__name__).replace(self.url, self.shown)
        self.counts["failed"] += 1
        return False

    def view(self):
        """What GET /webhooks shows of this target."""
        return {"url": self.shown, "events": sorted(self.types), "queued": len(self.pending),
                "last_success": self.last_success, "last_error": self.last_error,
                **{name: self.counts[name] for name in ("delivered", "failed", "dropped")}}


class Events:
    """Events: each logged once, kept in a ring, handed to subscribers and queued for webhooks."""

    def __init__(self, config, store):
        self.store = store
        self.ring = collections.deque(maxlen=EVENT_RING)
        self.subscribers = set()
        self.next_id = 0              # the id of the last event
        self._reserved = 0            # ids up to this are reserved in the state directory
        self.webhooks = [_Webhook(url, set(config.webhook_events), config.webhook_secret,
                                  store) for url in config.webhooks]
        self.tasks = []               # one per webhook target
        self.client = None            # the webhooks' HTTP client, while they run

    async def start(self):
        """Continue the ids where the last run left them; start delivering webhooks."""
        saved = await self.store.read(EVENT_COUNTER)
        saved = "0" if saved is None else saved.decode("ascii", "replace")
        # A Last-Event-ID has at most 18 digits: a counter past 17 cannot be resumed from.
        if not re.fullmatch("[0-9]{1,17}", saved):
            log.warning("ignoring the event counter %.60r", saved)
            saved = "0"
        # Past the queued events too: a counter lost, or restored older, must not write a new
        # event over a queued one.
        queued = [name.partition(".")[0] for hook in self.webhooks
                  for name in await self.store.read_folder(hook.folder)]
        self.next_id = max(int(n) for n in [saved, *queued] if re.fullmatch("[0-9]{1,17}", n))
        await self._reserve()
        self.client = aiohttp.ClientSession(headers={"User-Agent": f"TorrentFlow/{__version__}"})
        for hook in self.webhooks:
            task = asyncio.create_task(hook.deliver(self.client), name=f"webhook {hook.shown}")
            task.add_done_callback(_log_failure)
            self.tasks.append(task)

    async def close(self):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    async def _reserve(self):
        """Reserve a block of ids on disk: after a crash ids start past it; no write per event."""
        self._reserved = self.next_id + EVENT_ID_BLOCK
        await self.store.put(EVENT_COUNTER, str(self._reserved).encode())

    def publish(self, kind, infohash=None, status=None, detail=None):
        """One thing that happened; status is the torrent's status dict, if any."""
        self.next_id += 1
        if self.next_id == self._reserved - EVENT_ID_BLOCK // 2:
            _logged(self._reserve(), "reserving event ids")
        event = {"id": self.next_id, "type": kind, "time": int(time.time()),
                 "infohash": infohash, "detail": detail,
                 "torrent": {name: status[name] for name in EVENT_FIELDS} if status else None}
        name = status["name"] if status else infohash
        log.info("%s %s%s%s", kind, name or "", f" ({infohash})" if infohash else "",
                 f": {detail}" if detail else "")
        self.ring.append(event)
        for reader in (*self.subscribers, *self.webhooks):
            reader.offer(event)

    def subscribe(self, types, infohashes):
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise ApiError(503, f"at most {MAX_SUBSCRIBERS} event streams at once", RETRY_AFTER)
        subscriber = _Subscriber(types, infohashes)
        self.subscribers.add(subscriber)
        return subscriber

    def since(self, last_id):
        """The events after last_id, or None if the ring no longer holds them all."""
        if last_id == self.next_id:
            return []
        if not self.ring or not self.ring[0]["id"] <= last_id + 1 <= self.next_id:
            return None
        return [event for event in self.ring if event["id"] > last_id]


EVENTS = web.AppKey("events", Events)


def _held(status):
    """Paused by hand or by a fault, not by libtorrent's queue."""
    return status["paused"] and (not status["auto_managed"] or bool(status["error"]))


def _status_events(engine, torrent, before):
    """Emit the events a new status means, compared with the one before it."""
    now = torrent.status
    if before is None:
        if torrent.added is not None:
            engine.emit("added", torrent)  # an add of the API: first, as its download starts
        return
    if now["has_metadata"] and not before["has_metadata"]:
        engine.emit("metadata", torrent)
    if now["state"] != before["state"]:
        engine.emit("state", torrent, f"{before['state']} -> {now['state']}")
    if _held(now) != _held(before):
        engine.emit("paused" if _held(now) else "resumed", torrent)
    if now["error"] and now["error"] != before["error"]:
        engine.emit("error", torrent, now["error"])


def _events_setup(app, engine):
    events = app[EVENTS] = Events(engine.config, engine.store)
    engine.listen("start", events.start)
    engine.listen("close", events.close)
    engine.listen("status", lambda torrent, before: _status_events(engine, torrent, before))
    engine.listen("event", lambda kind, torrent, detail: events.publish(
        kind, torrent and torrent.infohash, torrent and torrent.status, detail))
    engine.listen("health", lambda: [f"the {task.get_name()} task stopped"
                                     for task in events.tasks if task.done()])


EXTENSIONS.append(_events_setup)


#: One event, as the data of a GET /events event and the body of a webhook's POST.
EVENT_SCHEMA = _object({
    "id": {"type": "integer", "minimum": 1},
    "type": {"type": "string", "enum": list(EVENT_TYPES)},
    "time": {"type": "integer", "description": "Unix time"},
    "infohash": {"type": ["string", "null"]},
    "detail": {"type": ["string", "null"]},
    "torrent": {**_object({field.name: field_schema(field) for field in STATUS
                           if field.name in EVENT_FIELDS}), "type": ["object", "null"]}})
#: One Server-Sent Event of GET /events: event (its type), id, data (JSON; {} for reset and
#: overflow). The stream's schema is one item's: OpenAPI 3.1 lacks 3.2's itemSchema.
SSE_SCHEMA = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"enum": [*EVENT_TYPES, "reset", "overflow"]},
    "id": {"type": "string", "pattern": "^[0-9]+$"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [EVENT_SCHEMA, {"type": "object", "maxProperties": 0}]}}}}


def _sse(event, kind=None):
    """One Server-Sent Event."""
    head = f"id: {event['id']}\nevent: {event['type']}\n" if event else f"event: {kind}\n"
    return (head + f"data: {json.dumps(event or {}, separators=(',', ':'))}\n\n").encode()


@api("GET", "/events", "events", (503,), responses={"200": _answer(
    "a stream of Server-Sent Events, each described here: id, event (its type) and data "
    "(the event as JSON); a comment every 15 s while idle; event: reset when "
    "Last-Event-ID is too old, event: overflow before a reader that fell behind is cut "
    "off", SSE_SCHEMA, media="text/event-stream")},
    parameters=[_query("types", "only these event types, comma-separated",
                       pattern=f"^({'|'.join(EVENT_TYPES)})(,({'|'.join(EVENT_TYPES)}))*$"),
                _query("infohash", "only events of this torrent; repeatable",
                       pattern=INFOHASH_PARAMETER["schema"]["pattern"]),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "resume after this event id",
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}}])
async def event_stream(request):
    """What happens, as it happens (Server-Sent Events)"""
    _known_parameters(request.query, ("types", "infohash"))
    types = _names(request.query["types"], "types", EVENT_TYPES) \
        if "types" in request.query else EVENT_TYPES
    engine, events = request.app[ENGINE], request.app[EVENTS]
    infohashes = {_main_id(engine, parse_infohash(text))
                  for text in request.query.getall("infohash", [])}
    last = request.headers.get("Last-Event-ID")
    if last is not None and not (last.isascii() and last.isdigit() and len(last) < 19):
        raise ApiError(400, "Last-Event-ID must be an event id")
    if request.method == "HEAD":  # a probe: no place taken, no stream held open
        return web.Response(headers={"Content-Type": "text/event-stream"})
    subscriber = events.subscribe(set(types), infohashes)
    try:
        return await _stream(request, subscriber, events, last)
    finally:
        events.subscribers.discard(subscriber)


def _main_id(engine, infohash):
    """The id events carry for a torrent known by any of its ids; an unknown id as it is."""
    with contextlib.suppress(ApiError):
        return engine.lookup(infohash).infohash
    return infohash


async def _stream(request, subscriber, events, last):
    """Write a subscriber's events, those after last first, until it falls behind or leaves."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    # Small buffers: a reader that stops is noticed soon and holds little memory till cut.
    request.transport.set_write_buffer_limits(high=STREAM_BUFFER)
    with contextlib.suppress(OSError, AttributeError):
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
    missed = events.since(int(last)) if last is not None else []
    write = lambda data: asyncio.wait_for(response.write(data), STREAM_WRITE_TIMEOUT)
    sent = 0
    with contextlib.suppress(ConnectionError):
        try:
            if missed is None:
                await write(_sse(None, "reset"))
            for event in filter(subscriber.wants, missed or ()):
                await write(_sse(event))
                sent = event["id"]
            while not subscriber.overflowed:
                while subscriber.queue:
                    event = subscriber.queue.popleft()
                    if event["id"] > sent:
                        await write(_sse(event))
                        sent = event["id"]
                subscriber.wake.clear()
                if not await _woken(subscriber.wake, request):
                    await write(b": heartbeat\n\n")
        except asyncio.TimeoutError:
            subscriber.overflowed = True  # it stopped reading
        # Queued behind what the reader has not read yet; the connection then closes.
        response.force_close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(response.write(_sse(None, "overflow")), 0.1)
    return response


async def _woken(wake, request):
    """Wait up to HEARTBEAT for wake; whether it came."""
    for _ in range(int(HEARTBEAT)):  # each second: a client that hung up frees its place now
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), 1.0)
            return True
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("the client hung up")
    return False


@api("GET", "/webhooks", "webhooks", responses={"200": _answer("each target", _object({
    "webhooks": {"type": "array", "items": _object({
        "url": {"type": "string"}, "events": {"type": "array", "items": {"type": "string"}},
        "queued": {"type": "integer"}, "last_success": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        **dict.fromkeys(("delivered", "failed", "dropped"), {"type": "integer"})})}}))})
async def webhooks(request):
    """Each webhook target: its queue, last success and last error"""
    return web.json_response({"webhooks": [hook.view() for hook in request.app[EVENTS].webhooks]})


# --------------------------------------------------------------------------- #
# Extension: metrics. GET /metrics in Prometheus' text format
# --------------------------------------------------------------------------- #

#: (name, type, help, libtorrent session counter, scale) of post_session_stats()'s metrics.
SESSION_METRICS = (
    ("payload_received_bytes_total", "counter", "payload bytes received",
     "net.recv_payload_bytes", 1),
    ("payload_sent_bytes_total", "counter", "payload bytes sent", "net.sent_payload_bytes", 1),
    ("received_bytes_total", "counter", "bytes received, protocol included",
     "net.recv_bytes", 1),
    ("sent_bytes_total", "counter", "bytes sent, protocol included", "net.sent_bytes", 1),
    ("peers_connected", "gauge", "connected peers", "peer.num_peers_connected", 1),
    ("dht_nodes", "gauge", "DHT nodes known", "dht.dht_nodes", 1),
    ("disk_read_bytes_total", "counter", "bytes read from disk", "disk.num_blocks_read", 16384),
    ("disk_written_bytes_total", "counter", "bytes written to disk",
     "disk.num_blocks_written", 16384),
    ("disk_queued_jobs", "gauge", "disk jobs waiting", "disk.queued_disk_jobs", 1),
)

OPTIONS.append(Option("metrics_per_torrent", _boolean, False, "GET /metrics also gives "
                      "series per torrent, labelled by infohash and name (many torrents "
                      "make many series)"))


def _label(value):
    """A Prometheus label value, escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def process_figures():
    """(resident bytes, open descriptors) of this process, from /proc; slow: in a thread."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE"), len(os.listdir("/proc/self/fd"))


def render_metrics(engine, events, stats, requests, per_torrent, process):
    """GET /metrics in Prometheus' text format 0.0.4; process is process_figures()."""
    lines, torrents, hooks, counts = [], list(engine.torrents()), events.webhooks, engine.counts

    def metric(name, kind, help_text, samples):
        """One metric: samples is [(labels, value)], or a value without labels."""
        lines.extend((f"# HELP torrentflow_{name} {help_text}",
                      f"# TYPE torrentflow_{name} {kind}"))
        for labels, value in samples if isinstance(samples, list) else [({}, samples)]:
            text = ",".join(f'{key}="{_label(label)}"' for key, label in labels.items())
            lines.append(f"torrentflow_{name}{{{text}}} {value}" if text
                         else f"torrentflow_{name} {value}")
    states = collections.Counter(t.status["state"] for t in torrents)
    metric("torrents", "gauge", "torrents by state",
           [({"state": state}, states[state]) for state in STATES])
    metric("torrents_paused", "gauge", "paused torrents, by you or by the queue",
           sum(t.status["paused"] for t in torrents))
    for name, kind, help_text, key, scale in SESSION_METRICS:
        metric(name, kind, help_text, stats.get(key, 0) * scale)
    for direction, index in (("download", 0), ("upload", 1)):
        metric(f"{direction}_rate_bytes", "gauge", f"payload bytes/s, {direction}",
               sum(t.rates[index] for t in torrents))
    metric("alerts_dropped_total", "counter", "times libtorrent's alert queue overflowed",
           counts["alerts_dropped"])
    metric("resume_saves_total", "counter", "resume files written", counts["saves"])
    metric("resume_save_failures_total", "counter", "resume files that could not be written",
           counts["save_failures"])
    for name, key in (("deliveries", "delivered"), ("delivery_failures", "failed"),
                      ("dropped", "dropped")):
        metric(f"webhook_{name}_total", "counter", f"webhook {name.replace('_', ' ')}",
               [({"url": h.shown}, h.counts[key]) for h in hooks])
    metric("webhook_queued", "gauge", "events waiting for delivery",
           [({"url": h.shown}, len(h.pending)) for h in hooks])
    metric("event_subscribers", "gauge", "open GET /events streams", len(events.subscribers))
    metric("http_requests_total", "counter", "API requests by route and status",
           [({"route": route, "status": status}, count)
            for (route, status), count in sorted(requests.items())])
    metric("resident_memory_bytes", "gauge", "the process's resident memory", process[0])
    metric("open_fds", "gauge", "the process's open file descriptors", process[1])
    for field, kind, name in (
            ("progress", "gauge", "progress"), ("download_rate", "gauge", "download_rate"),
            ("upload_rate", "gauge", "upload_rate"),
            ("total_download", "counter", "downloaded_bytes_total"),
            ("total_upload", "counter", "uploaded_bytes_total"),
            ("num_peers", "gauge", "num_peers")) if per_torrent else ():
        metric(f"torrent_{name}", kind, f"each torrent's {field}", [
            ({"infohash": t.infohash, "name": t.status["name"]}, t.status[field])
            for t in torrents])
    return "\n".join(lines) + "\n"


@api("GET", "/metrics", "metrics", (503,), responses={"200": _answer(
    "Prometheus text format", {"type": "string"}, media="text/plain")})
async def metrics(request):
    """Metrics for Prometheus"""
    engine = request.app[ENGINE]
    stats = await engine.session_stats()
    process = await asyncio.to_thread(process_figures)
    text = render_metrics(engine, request.app[EVENTS], stats, request.app[REQUESTS],
                          request.app[CONFIG].metrics_per_torrent, process)
    return web.Response(text=text, headers={
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# --------------------------------------------------------------------------- #
# Extension: Transmission RPC, the subset that transmission-remote, Sonarr, Radarr
# and transmission-rpc use, mapped onto the engine and the status table; and a
# directory served at /transmission/web/ for Transmission's web client
# --------------------------------------------------------------------------- #

#: What the RPC reports about itself: Sonarr reads version (>= 2.40, and >= 4 for labels).
RPC_VERSION = {"version": f"4.0.6 (TorrentFlow {__version__})", "rpc-version": 17,
               "rpc-version-semver": "5.3.0", "rpc-version-minimum": 14}
#: Seconds a torrent counts as "recently-active" after a change, and a removal too.
RPC_RECENT = 60.0

#: Transmission's clients know only a user name and a password.
BASIC_REALMS["/transmission/"] = "Transmission"


def _directory(text):
    """A directory that exists, by its real path."""
    if not os.path.isdir(text):
        raise ValueError("give a directory that exists")
    return Path(os.path.realpath(text))


OPTIONS.append(Option("web_ui", _directory, None, "serve this directory at "
                      "/transmission/web/, with the API's token rules: Transmission's web "
                      "client, for example /usr/share/transmission/web (Debian's "
                      "transmission-common)"))


#: The state directory's folder of .torrent copies, which torrent-get's torrentFile names.
RPC_TORRENT_FILES = "torrents"


class RpcState:
    """The RPC's state: its session id, torrent numbers, recent removals, .torrent copies."""

    def __init__(self, state_dir):
        self.session_id = secrets.token_urlsafe(24)
        self.numbers = {}                                # _Torrent -> its number
        self._next = itertools.count(1)
        self.removed = collections.deque(maxlen=10_000)  # (time, number)
        self.root = os.path.abspath(state_dir)
        self.copies = {}  # a .torrent copy's name in the state directory -> its torrent

    def number(self, torrent):
        if torrent not in self.numbers:
            self.numbers[torrent] = next(self._next)
        return self.numbers[torrent]

    def torrent_file(self, torrent):
        """The absolute path of the torrent's .torrent copy, there once its metadata is."""
        return os.path.join(self.root, self.copy_name(torrent))

    @staticmethod
    def copy_name(torrent):
        """The name of the torrent's .torrent copy, relative to the state directory."""
        return f"{RPC_TORRENT_FILES}/{torrent.infohash}.torrent"

    def forget(self, engine, torrent):
        number = self.numbers.pop(torrent, None)
        if number is not None:
            self.removed.append((time.time(), number))
        name = self.copy_name(torrent)
        if self.copies.get(name) is torrent:  # not a same-named survivor's
            del self.copies[name]
            _logged(engine.store.drop(name), f"dropping {name}")

    async def keep(self, engine, torrent):
        """A metadata listener: write the torrent's .torrent copy unless it exists."""
        name = self.copy_name(torrent)
        self.copies[name] = torrent
        try:
            data = await asyncio.to_thread(_rpc_torrent_bytes, engine.store.root / name,
                                           torrent)
        except RuntimeError:  # libtorrent dropped it meanwhile
            return
        if data is not None and self.copies.get(name) is torrent:  # not removed meanwhile
            _logged(engine.store.put(name, data), f"writing {name}")


def _rpc_torrent_bytes(path, torrent):
    """The torrent's .torrent (its info dict byte for byte), or None if path holds it; threaded."""
    # No v2 piece layers: libtorrent writes them only by a slow Python copy, GIL held.
    if os.path.exists(path):
        return None
    metadata = torrent.handle.torrent_file()
    if metadata is None:
        return None
    tiers = {}  # bencoded text is bytes (lt.bencode deprecates str)
    for tracker in torrent.handle.trackers():
        tiers.setdefault(tracker["tier"], []).append(tracker["url"].encode())
    urls = [url for tier in tiers.values() for url in tier]
    created, creator, comment = torrent.creation
    fields = {"announce": urls[0] if urls else None,
              "announce-list": list(tiers.values()) if len(urls) > 1 else None,
              "comment": comment.encode(), "created by": creator.encode(),
              "creation date": created,
              "url-list": [url.encode() for url in torrent.handle.url_seeds()]}
    fields = {key: value for key, value in fields.items() if value}
    # A bencoded dict is its keys in order: the info dict goes between the two halves.
    before = lt.bencode({key: value for key, value in fields.items() if key < "info"})
    after = lt.bencode({key: value for key, value in fields.items() if key > "info"})
    return before[:-1] + b"4:info" + metadata.info_section() + after[1:]


RPC = web.AppKey("rpc", RpcState)


def _rpc_setup(app, engine):
    state = app[RPC] = RpcState(engine.config.state_dir)
    engine.listen("status", _rpc_activity)
    engine.listen("forget", lambda torrent: state.forget(engine, torrent))
    engine.listen("metadata", lambda torrent: state.keep(engine, torrent))


EXTENSIONS.append(_rpc_setup)


def _rpc_activity(torrent, before):
    """A status listener: note when it last moved data or changed state ("recently-active")."""
    now = torrent.status
    if before is None or any(now[key] != before[key] for key in (
            "state", "paused", "error", "total_download", "total_upload")):
        torrent.extra["rpc_active"] = time.monotonic()


def _rpc_status(status):
    """Transmission's status: 0 stopped, 1-2 (queued to) verify, 3-4 download, 5-6 seed."""
    done = status["is_finished"]
    if status["paused"] and not status["queued"]:  # even with a check asked: stig starts it
        return 0
    if status["state"].startswith("checking"):
        return 1 if status["queued"] else 2
    if status["paused"]:
        return 5 if done else 3
    return 6 if done else 4


def _rpc_priority(priority):
    """libtorrent's file priority 0-7 as Transmission's -1, 0 or 1."""
    return -1 if priority < 4 else 1 if priority > 5 else 0


def _rpc_limit(torrent, settings, key):
    """(limit, mode) of seedRatio*/seedIdle* (minutes): mode 0 the session's, 1 own, 2 none."""
    value = torrent.notes[key]
    limit, mode = (0, 2) if value == -2 else (value, 1) if value >= 0 else (
        max(0, settings[key]), 0)
    return (int(limit // 60), mode) if key == "seeding_time_limit" else (limit, mode)


def _rpc_tracker(index, tracker):
    """A trackerStats entry from the trackers view of one tracker."""
    heard = tracker["last_announce"] or 0
    return {"announce": tracker["url"], "scrape": "", "tier": tracker["tier"], "id": index,
            "host": "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(tracker["url"])),
            "sitename": urllib.parse.urlsplit(tracker["url"]).hostname or "",
            "announceState": 3 if tracker["status"] == "updating" else 1,
            "scrapeState": 0, "isBackup": False, "hasAnnounced": bool(heard),
            "hasScraped": False, "lastAnnounceSucceeded": tracker["status"] == "working",
            "lastAnnounceResult": tracker["message"] or ("Success" if heard else ""),
            "lastAnnounceTime": heard, "lastAnnounceStartTime": heard,
            "lastAnnounceTimedOut": False, "lastAnnouncePeerCount": 0,
            "nextAnnounceTime": tracker["next_announce"] or 0, "lastScrapeResult": "",
            "lastScrapeStartTime": 0, "lastScrapeSucceeded": False, "lastScrapeTime": 0,
            "lastScrapeTimedOut": False, "nextScrapeTime": 0,
            "seederCount": tracker["seeds"], "leecherCount": tracker["peers"],
            "downloadCount": tracker["downloaded"]}


#: torrent-get fields that are a status field as it is: {field: status key}.
RPC_STATUS_KEYS = {
    "name": "name", "downloadDir": "save_path", "sizeWhenDone": "total_wanted",
    "haveValid": "total_done", "errorString": "error", "uploadedEver": "total_upload",
    "downloadedEver": "total_download", "secondsSeeding": "seeding_time", "labels": "labels",
    "rateDownload": "download_rate", "rateUpload": "upload_rate", "peersConnected": "num_peers",
    "addedDate": "added_time", "startDate": "added_time"}
#: Those whose status field is null without metadata: {field: (status key, value then)}.
RPC_NULLABLE_KEYS = {
    "totalSize": ("total_size", 0), "fileCount": ("num_files", 0),
    "file-count": ("num_files", 0), "doneDate": ("completed_time", 0),
    "dateCreated": ("creation_date", 0), "pieceCount": ("total_pieces", 0),
    "pieceSize": ("piece_length", 0), "comment": ("comment", ""), "creator": ("creator", "")}
#: Those the daemon has no counterpart of: always the same.
RPC_CONSTANTS = {
    "haveUnchecked": 0, "corruptEver": 0, "desiredAvailable": 0, "isStalled": False,
    "isPrivate": False, "etaIdle": -1, "group": "", "editDate": 0, "manualAnnounceTime": -1,
    "honorsSessionLimits": True, "bandwidthPriority": 0, "webseeds": [],
    "webseedsSendingToUs": 0}


def _per_file(entry):
    """A torrent-get field with entry(file) for each file."""
    return lambda t, s, c, x: _Slices(entry(file) for file in t.files() or ())


#: Every torrent-get field: f(torrent, status, session settings, extra: id, torrentFile, views).
RPC_FIELDS = {
    **{name: lambda t, s, c, x, key=key: s[key] for name, key in RPC_STATUS_KEYS.items()},
    **{name: lambda t, s, c, x, key=key, null=null: s[key] or null
       for name, (key, null) in RPC_NULLABLE_KEYS.items()},
    **{name: lambda t, s, c, x, value=value: value for name, value in RPC_CONSTANTS.items()},
    "id": lambda t, s, c, x: x["id"], "torrentFile": lambda t, s, c, x: x["torrentFile"],
    "hashString": lambda t, s, c, x: t.infohash,
    "leftUntilDone": lambda t, s, c, x: s["total_wanted"] - s["total_wanted_done"],
    "percentDone": lambda t, s, c, x: round(s["total_wanted_done"] / s["total_wanted"], 4)
    if s["total_wanted"] else float(s["has_metadata"]),
    "percentComplete": lambda t, s, c, x: round(s["progress"] / 100, 4),
    "metadataPercentComplete": lambda t, s, c, x: int(s["has_metadata"]),
    "recheckProgress": lambda t, s, c, x: round(s["progress"] / 100, 4)
    if s["state"] == "checking_files" else 0,
    # Done seeding: stopped by a seeding limit, which Sonarr waits for to remove it.
    "isFinished": lambda t, s, c, x: bool(s["paused"] and s["limit_reached"]),
    "status": lambda t, s, c, x: _rpc_status(s),
    "eta": lambda t, s, c, x: -1 if s["is_finished"] or s["paused"] else -2
    if not s["download_rate"] else (s["total_wanted"] - s["total_wanted_done"])
    // s["download_rate"],
    "error": lambda t, s, c, x: 3 if s["error"] else 0,
    "uploadRatio": lambda t, s, c, x: s["ratio"] if s["total_wanted"] else -1,
    "secondsDownloading": lambda t, s, c, x: s["active_time"] - s["finished_time"],
    "seedRatioLimit": lambda t, s, c, x: _rpc_limit(t, c, "ratio_limit")[0],
    "seedRatioMode": lambda t, s, c, x: _rpc_limit(t, c, "ratio_limit")[1],
    "seedIdleLimit": lambda t, s, c, x: _rpc_limit(t, c, "seeding_time_limit")[0],
    "seedIdleMode": lambda t, s, c, x: _rpc_limit(t, c, "seeding_time_limit")[1],
    "peersGettingFromUs": lambda t, s, c, x: s["num_peers"] if s["upload_rate"] else 0,
    "peersSendingToUs": lambda t, s, c, x: s["num_seeds"] if s["download_rate"] else 0,
    "peersFrom": lambda t, s, c, x: dict.fromkeys(
        ("fromCache", "fromDht", "fromIncoming", "fromLpd", "fromLtep", "fromPex"), 0)
    | {"fromTracker": s["num_peers"]},
    **dict.fromkeys(("peer-limit", "maxConnectedPeers"), lambda t, s, c, x: s[
        "max_connections"] or c["max_connections"]),
    # When payload last moved, as a Unix time; 0 if it never did.
    "activityDate": lambda t, s, c, x: max((int(time.time()) - seconds for seconds in (
        s["time_since_upload"], s["time_since_download"]) if seconds is not None), default=0),
    "magnetLink": lambda t, s, c, x: (f"magnet:?xt=urn:btih:{s['info_hash_v1']}"
                                      if s["info_hash_v1"] else
                                      f"magnet:?xt=urn:btmh:1220{s['info_hash_v2']}")
    + f"&dn={urllib.parse.quote(s['name'])}",
    "downloadLimit": lambda t, s, c, x: s["download_limit"] // 1000,
    "downloadLimited": lambda t, s, c, x: s["download_limit"] > 0,
    "uploadLimit": lambda t, s, c, x: s["upload_limit"] // 1000,
    "uploadLimited": lambda t, s, c, x: s["upload_limit"] > 0,
    "queuePosition": lambda t, s, c, x: max(0, s["queue_position"]),
    "files": _per_file(lambda file: {"name": file["path"], "length": file["size"],
                                     "bytesCompleted": file["downloaded"]}),
    "fileStats": _per_file(lambda file: {"bytesCompleted": file["downloaded"], "wanted": bool(
        file["priority"]), "priority": _rpc_priority(file["priority"])}),
    "priorities": _per_file(lambda file: _rpc_priority(file["priority"])),
    "wanted": _per_file(lambda file: int(bool(file["priority"]))),
    "trackers": lambda t, s, c, x: [{"announce": tracker["url"], "scrape": "",
                                     "tier": tracker["tier"], "id": index}
                                    for index, tracker in enumerate(x["trackers"])],
    "trackerStats": lambda t, s, c, x: [_rpc_tracker(index, tracker)
                                        for index, tracker in enumerate(x["trackers"])],
    "trackerList": lambda t, s, c, x: "\n\n".join("\n".join(tracker["url"] for tracker in tier)
                                                for _, tier in itertools.groupby(
                                                    x["trackers"], lambda tr: tr["tier"])),
    "peers": lambda t, s, c, x: [{
        "address": peer["ip"], "port": peer["port"], "clientName": peer["client"],
        "progress": round(peer["progress"] / 100, 4), "rateToClient": peer["download_rate"],
        "rateToPeer": peer["upload_rate"], "isEncrypted": peer["encrypted"],
        "isUTP": peer["connection"] == "utp", "isIncoming": "incoming" in peer["source"],
        "flagStr": ("D" if peer["download_rate"] else "") + ("U" if peer["upload_rate"] else ""),
        "isDownloadingFrom": bool(peer["download_rate"]),
        "isUploadingTo": bool(peer["upload_rate"]),
        "clientIsChoked": "choked" in peer["flags"],
        "clientIsInterested": "interesting" in peer["flags"],
        "peerIsChoked": "remote_choked" in peer["flags"],
        "peerIsInterested": "remote_interested" in peer["flags"]} for peer in x["peers"]],
}

#: Values (JSON commas, lists and objects) one RPC call may hold: 100,000 file indices fit.
RPC_MAX_VALUES = 200_000

#: The torrent-get fields with an entry per file.
RPC_FILE_FIELDS = {"files", "fileStats", "priorities", "wanted"}


class RpcError(Exception):
    """A request the RPC refuses: its result string."""


def _rpc_ids(request, arguments):
    """The torrents ids names (numbers, hashes, "recently-active", absent: all); unknown: none."""
    torrents, rpc = list(request.app[ENGINE].torrents()), request.app[RPC]
    ids = arguments.get("ids")
    if ids is None:
        return torrents
    if ids == "recently-active":
        since = time.monotonic() - RPC_RECENT
        return [t for t in torrents if t.extra.get("rpc_active", 0) >= since]
    ids = ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
        raise RpcError("ids must be numbers, hash strings or lists of them")
    request.app[ENGINE].check_loaded()  # one named may be a saved one not yet back
    wanted = {i.lower() if isinstance(i, str) else i for i in ids}
    return [t for t in torrents if rpc.number(t) in wanted or wanted & set(t.aliases)]


def _rpc_flag(arguments, key, default=False):
    """A boolean argument as Transmission reads one: true or false, 1 or 0, or as text."""
    value = arguments.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or type(value) is int and value in (0, 1):
        return bool(value)  # Transmission Remote GUI sends "paused": 1
    if value in ("true", "false"):
        return value == "true"
    raise RpcError(f"{key} must be true or false")


def _rpc_indices(arguments, key, count):
    """File indices given under key, of count real files; an empty list means every file."""
    if key not in arguments:
        return []
    chosen = arguments[key]
    if chosen == []:
        return range(count)
    if not isinstance(chosen, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chosen):
        raise RpcError(f"{key} must list file indices from 0 to {count - 1}")
    return chosen


#: The arguments that choose files, in order, with the priority each gives (None: wanted).
RPC_FILE_CHOICES = {"files-unwanted": 0, "files-wanted": None, "priority-low": 1,
                    "priority-normal": 4, "priority-high": 7}


def _rpc_priorities(torrent, arguments):
    """File priorities from files-wanted/-unwanted and priority-high/-normal/-low."""
    if not any(key in arguments for key in RPC_FILE_CHOICES):
        return None
    if torrent.info is None:
        raise RpcError("file choices need the torrent's metadata")
    return _rpc_chosen([f["priority"] for f in torrent.files()], arguments)


def _rpc_chosen(current, arguments):
    """Priorities, one per file, changed by the file choices arguments hold."""
    for key, priority in RPC_FILE_CHOICES.items():
        for index in _rpc_indices(arguments, key, len(current)):
            current[index] = (current[index] or 4) if priority is None else \
                priority if current[index] else 0
    return current


def _rpc_settings(torrent, arguments, trackers=None):
    """The settings a torrent-set (torrent None: a torrent-add) names, as PATCH takes them."""
    changes = {}
    if "labels" in arguments:
        changes["labels"] = arguments["labels"]
    for mode_key, limit_key, setting, scale in (
            ("seedRatioMode", "seedRatioLimit", "ratio_limit", 1),
            ("seedIdleMode", "seedIdleLimit", "seeding_time_limit", 60)):
        if mode_key in arguments or limit_key in arguments:
            mode, limit = arguments.get(mode_key, 1), arguments.get(limit_key, 0)
            if not isinstance(limit, (int, float)) or isinstance(limit, bool):
                raise RpcError(f"{limit_key} must be a number")
            if mode not in (0, 1, 2) or isinstance(mode, bool):
                raise RpcError(f"{mode_key} must be 0, 1 or 2")
            changes[setting] = {0: -1, 2: -2}.get(mode, limit * scale)
    for key, setting in (("downloadLimit", "download_limit"), ("uploadLimit", "upload_limit")):
        if key in arguments or key + "ed" in arguments:
            kilobytes = arguments.get(key, torrent.status[setting] // 1000 if torrent else 0)
            if not isinstance(kilobytes, int) or isinstance(kilobytes, bool):
                raise RpcError(f"{key} must be a whole number of kB/s")
            changes[setting] = kilobytes * 1000 if _rpc_flag(arguments, key + "ed", True) else 0
    if "peer-limit" in arguments:
        changes["max_connections"] = arguments["peer-limit"]
    if trackers is not None:
        changes["trackers"] = _rpc_trackers(trackers, arguments)
    if torrent is not None:
        priorities = _rpc_priorities(torrent, arguments)
        if priorities is not None:
            changes["file_priorities"] = priorities
    return changes


def _rpc_trackers(current, arguments):
    """The tracker tiers after trackerList, or trackerRemove (ids or URLs) and trackerAdd."""
    if "trackerList" in arguments:
        text = arguments["trackerList"]
        if not isinstance(text, str):
            raise RpcError("trackerList must be a string")
        return [tier for tier in ([url.strip() for url in block.split("\n") if url.strip()]
                                  for block in text.split("\n\n")) if tier]
    added, removed = arguments.get("trackerAdd", []), arguments.get("trackerRemove", [])
    if not isinstance(added, list) or not isinstance(removed, list):
        raise RpcError("trackerAdd and trackerRemove must be lists")
    tiers = {}
    for index, (url, tier) in enumerate(current):
        if index not in removed and url not in removed:
            tiers.setdefault(tier, []).append(url)
    known = {url for url, _ in current}
    return [*tiers.values(), *([url] for url in added if url not in known)]


async def _rpc_set(engine, torrents, arguments):
    """torrent-set, and torrent-add's file choices."""
    for torrent in torrents:
        current = None
        if {"trackerList", "trackerAdd", "trackerRemove"} & set(arguments):
            current = [(tracker["url"], tracker["tier"])
                       for tracker in await trackers(engine, torrent)]
        await configure(engine, torrent, parse_settings(
            _rpc_settings(torrent, arguments, current), "change"))
    return {}


async def _rpc_get(request, engine, arguments):
    """torrent-get: the fields asked for, as objects or as a table."""
    fields = arguments.get("fields")
    if not isinstance(fields, list) or not fields:
        raise RpcError("no fields specified")
    if not all(isinstance(name, str) for name in fields):
        raise RpcError("fields must be names")
    known = [name for name in dict.fromkeys(fields) if name in RPC_FIELDS]
    slow = {"trackers": {"trackers", "trackerStats", "trackerList"} & set(known),
            "peers": "peers" in known}
    torrents, table = _rpc_ids(request, arguments), arguments.get("format") == "table"
    views, rpc = {"trackers": trackers, "peers": peers}, request.app[RPC]
    extras = [{"id": rpc.number(torrent), "torrentFile": rpc.torrent_file(torrent),
               **{name: await views[name](engine, torrent) if needed else []
                  for name, needed in slow.items()}}
              for torrent in torrents]

    def build():
        rows = [[RPC_FIELDS[name](torrent, torrent.status, engine.settings, extra)
                 for name in known] for torrent, extra in zip(torrents, extras)]
        return _Slices([known, *rows] if table else (dict(zip(known, row)) for row in rows))
    # Large answers are built and serialised off the loop; see _to_json.
    request["large_answer"] = (not RPC_FILE_FIELDS.isdisjoint(known)
                               or len(torrents) > LARGE_LISTING)
    answer = {"torrents": await asyncio.to_thread(build) if request["large_answer"]
              else build()}
    if arguments.get("ids") == "recently-active":
        answer["removed"] = [number for moment, number in rpc.removed
                             if moment >= time.time() - RPC_RECENT]
    return answer


async def _rpc_directory(engine, arguments, key):
    """The directory the argument key names, confined as save_path is; refusals name key."""
    try:
        return await asyncio.to_thread(resolve_save_path, engine.roots, _text(arguments, key))
    except ApiError as error:
        raise RpcError(error.detail.replace("save_path", key, 1)) from None


async def _rpc_add(request, engine, arguments):
    """torrent-add: a magnet or URL in filename, or a .torrent in base64 metainfo."""
    if "metainfo" in arguments:
        try:
            upload = base64.b64decode(arguments["metainfo"], validate=True)
        except (ValueError, TypeError):
            raise RpcError("invalid or corrupt torrent file") from None
        params = await _params_from_source(request, "", upload)
    elif isinstance(arguments.get("filename"), str):
        params = await _params_from_source(request, arguments["filename"], None)
    else:
        raise RpcError("no filename or metainfo specified")
    params.save_path = await _rpc_directory(engine, arguments, "download-dir")
    chosen = {}
    if any(key in arguments for key in RPC_FILE_CHOICES):  # set at the add, as the REST's
        if params.ti is None:
            raise RpcError("file choices need the torrent's metadata: add a .torrent")
        count = len(await asyncio.to_thread(_files_of, params.ti))
        chosen["file_priorities"] = _rpc_chosen([4] * count, arguments)
    settings = parse_settings({**_rpc_settings(None, arguments), **chosen,
                               "paused": _rpc_flag(arguments, "paused")}, "add")
    # A duplicate whatever download-dir says: the REST API's 409 for another save_path
    # would fail Sonarr's grab of a torrent that was moved since.
    infohash, created = await engine.add(params, _presets(settings), anywhere=True)
    torrent = engine.lookup(infohash)
    return {"torrent-added" if created else "torrent-duplicate": {
        "id": request.app[RPC].number(torrent), "name": torrent.status["name"],
        "hashString": torrent.infohash}}


def _rpc_each(action):
    """A method that does action(engine, torrent, arguments) to each torrent named."""
    async def method(request, engine, arguments):
        for torrent in _rpc_ids(request, arguments):
            await action(engine, torrent, arguments)
        return {}
    return method


async def _rpc_location(engine, torrent, arguments):
    if not _text(arguments, "location"):
        raise RpcError("no location")
    if not _rpc_flag(arguments, "move"):
        raise RpcError("only a move of the data (move: true) is supported")
    await configure(engine, torrent, {
        "save_path": await _rpc_directory(engine, arguments, "location")})


#: session-set's writable keys: (setting, scale, the *-enabled key). Off is 0 for speeds, else -1.
RPC_SESSION_SET = {
    "speed-limit-down": ("download_limit", 1000, "speed-limit-down-enabled"),
    "speed-limit-up": ("upload_limit", 1000, "speed-limit-up-enabled"),
    "seedRatioLimit": ("ratio_limit", 1, "seedRatioLimited"),
    "idle-seeding-limit": ("seeding_time_limit", 60, "idle-seeding-limit-enabled"),
    "download-queue-size": ("max_active_downloads", 1, "download-queue-enabled"),
    "seed-queue-size": ("max_active_seeds", 1, "seed-queue-enabled"),
    "peer-limit-global": ("max_connections", 1, None),
}


def _rpc_session(request):
    """session-get's fields."""
    engine, config = request.app[ENGINE], request.app[CONFIG]
    answer = {**RPC_VERSION, "session-id": request.app[RPC].session_id,
              "download-dir": str(engine.roots[0]), "config-dir": str(config.state_dir),
              "peer-port": engine.listen_port, "blocklist-size": 0, "blocklist-enabled": False}
    for key, (setting, scale, enabled) in RPC_SESSION_SET.items():
        value = max(0, engine.settings[setting])
        answer[key] = value // scale if isinstance(value, int) else value
        if enabled:
            answer[enabled] = engine.settings[setting] > (0 if "speed" in key else -1)
    return {**answer, "peer-limit-per-torrent": 0, "alt-speed-enabled": False, "alt-speed-down": 0,
            "alt-speed-up": 0, "alt-speed-time-enabled": False, "alt-speed-time-begin": 0,
            "alt-speed-time-end": 0, "alt-speed-time-day": 0, "start-added-torrents": True,
            "dht-enabled": config.dht, "lpd-enabled": config.lsd, "pex-enabled": True,
            "utp-enabled": not config.local_only, "encryption": "preferred",
            "port-forwarding-enabled": config.upnp or config.natpmp,
            "units": {"speed-units": ["kB/s", "MB/s", "GB/s", "TB/s"], "speed-bytes": 1000,
                      "size-units": ["kB", "MB", "GB", "TB"], "size-bytes": 1000,
                      "memory-units": ["KiB", "MiB", "GiB", "TiB"], "memory-bytes": 1024}}


async def _rpc_session_get(request, engine, arguments):
    """session-get: the fields asked for, or all."""
    answer, fields = _rpc_session(request), arguments.get("fields")
    return {key: value for key, value in answer.items()
            if key in fields} if isinstance(fields, list) else answer


async def _rpc_session_set(request, engine, arguments):
    """session-set: the keys above, mapped onto PATCH /settings; others are ignored."""
    changes, current = {}, _rpc_session(request)
    for key, (setting, scale, enabled) in RPC_SESSION_SET.items():
        if key in arguments or enabled in arguments:
            value = arguments.get(key, current[key])
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RpcError(f"{key} must be a number")
            on = _rpc_flag(arguments, enabled, current.get(enabled, True))
            off = 0 if "speed" in key else -1
            changes[setting] = value * scale if on else off
    ignored = sorted(set(arguments) - set(RPC_SESSION_SET)
                     - {e for _, _, e in RPC_SESSION_SET.values()})
    if ignored:
        log.debug("session-set ignores %s", ", ".join(ignored))
    await configure_session(engine, request.app[SETTINGS_LOCK], parse_values(
        changes, {key: option.parse for key, option in _session_options().items()}))
    return {}


async def _rpc_stats(request, engine, arguments):
    torrents = list(engine.torrents())
    stats = await engine.session_stats()
    totals = {"uploadedBytes": stats.get("net.sent_payload_bytes", 0),
              "downloadedBytes": stats.get("net.recv_payload_bytes", 0),
              "filesAdded": len(torrents), "sessionCount": 1,
              "secondsActive": int(time.monotonic() - engine.started)}
    return {"activeTorrentCount": sum(not t.status["paused"] for t in torrents),
            "pausedTorrentCount": sum(t.status["paused"] for t in torrents),
            "torrentCount": len(torrents),
            "downloadSpeed": sum(t.rates[0] for t in torrents),
            "uploadSpeed": sum(t.rates[1] for t in torrents),
            "current-stats": totals, "cumulative-stats": totals}


async def _rpc_free_space(request, engine, arguments):
    path = _text(arguments, "path")
    if not path:
        raise RpcError("directory path argument is missing")
    target = await _rpc_directory(engine, arguments, "path")
    usage = await asyncio.to_thread(_disk_usage, target)
    return {"path": path, "size-bytes": usage.free, "total_size": usage.total}


def _disk_usage(path):
    """The usage of the disk that holds path, or its nearest existing directory; threaded."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path)


#: Every method the RPC speaks; anything else answers "method not supported".
RPC_METHODS = {
    "session-get": _rpc_session_get,
    "session-set": _rpc_session_set,
    "session-stats": _rpc_stats,
    "free-space": _rpc_free_space,
    "torrent-get": _rpc_get,
    "torrent-add": _rpc_add,
    "torrent-set": lambda request, engine, arguments: _rpc_set(
        engine, _rpc_ids(request, arguments), arguments),
    "torrent-start": _rpc_each(lambda engine, torrent, arguments: engine.resume(torrent)),
    "torrent-start-now": _rpc_each(lambda engine, torrent, arguments: engine.resume(
        torrent, queued=False)),
    "torrent-stop": _rpc_each(lambda engine, torrent, arguments: engine.pause(torrent)),
    "torrent-verify": _rpc_each(lambda engine, torrent, arguments: recheck(engine, torrent)),
    "torrent-reannounce": _rpc_each(lambda engine, torrent, arguments: reannounce(
        engine, torrent)),
    "torrent-remove": _rpc_each(lambda engine, torrent, arguments: engine.remove(
        torrent, _rpc_flag(arguments, "delete-local-data"))),
    "torrent-set-location": _rpc_each(_rpc_location),
    **{f"queue-move-{move}": _rpc_each(lambda engine, torrent, arguments, move=move:
                                       queue_move(engine, torrent, move))
       for move in ("top", "up", "down", "bottom")},
}


def _rpc_object(pairs):
    """A JSON object of an RPC call; a repeated key is refused, as the REST API does."""
    # Last-wins would let a proxy or a log that reads the first "method" see another call.
    try:
        return _unique_keys(pairs)
    except ValueError:
        counts = collections.Counter(key for key, _ in pairs)
        repeated = next(key for key, count in counts.items() if count > 1)
        raise RpcError(f"the key {_cut(repeated)!r} is repeated") from None


async def _rpc_call(request, body):
    """One RPC request: {"result", "arguments", "tag"}, never an exception."""
    answer = {"arguments": {}, "result": "success"}
    # json.loads builds every value on the loop, GIL held; a real call has a few thousand.
    if sum(body.count(mark) for mark in (b",", b"[", b"{")) > RPC_MAX_VALUES:
        return {**answer, "result": f"more than {RPC_MAX_VALUES} values in one call"}
    try:
        call = json.loads(body, object_pairs_hook=_rpc_object)
        method, arguments = call["method"], call.get("arguments") or {}
        if not isinstance(method, str) or not isinstance(arguments, dict):
            raise ValueError
        # As in Transmission, null means "not given" (stig sends "labels": null).
        arguments = {key: value for key, value in arguments.items() if value is not None}
    except RpcError as error:
        return {**answer, "result": str(error)}
    except (ValueError, KeyError, TypeError, RecursionError):
        return {**answer, "result": "no method name"}
    if isinstance(call.get("tag"), int) and not isinstance(call["tag"], bool):
        answer["tag"] = call["tag"]
    if method not in RPC_METHODS:
        return {**answer, "result": "method not supported"}
    try:
        answer["arguments"] = await RPC_METHODS[method](request, request.app[ENGINE], arguments)
    except RpcError as error:
        answer["result"] = str(error)
    except ApiError as error:
        answer["result"] = error.detail
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        # Untyped JSON of a shape no check expected: the caller's error, logged in one line.
        log.warning("RPC %s: arguments of an unexpected shape: %s: %s", method,
                    type(error).__name__, error)
        answer["result"] = f"invalid arguments for {method}"
    return answer


@api("POST", "/transmission/rpc", "transmissionRpc", (409, 413), responses={"200": _answer(
    "the answer, whether the call succeeded or not (see result)", _object({
        "result": {"type": "string"}, "arguments": {"type": "object"},
        "tag": {"type": "integer"}}, required=["result", "arguments"]))},
    requestBody={"required": True, "content": {"application/json": {
        "schema": {"type": "object"}}}})
async def transmission_rpc(request):
    """Transmission's RPC, for the tools that speak it"""
    session_id = request.app[RPC].session_id
    # Transmission's defence against cross-site requests, which its clients expect.
    if request.headers.get("X-Transmission-Session-Id") != session_id:
        raise ApiError(409, "send the X-Transmission-Session-Id header of this answer",
                       {"X-Transmission-Session-Id": session_id})
    if request.method != "POST":
        raise ApiError(405, "send the call as a POST", {"Allow": "POST"})
    # Any Content-Type: transmission-remote sends a form's.
    async with _body_deadline(request, 2 * MAX_REQUEST_BYTES):
        answer = await _rpc_call(request, await _read_limited(request.content.read,
                                                              2 * MAX_REQUEST_BYTES))
    return web.Response(body=await _to_json(lambda: answer, request.get("large_answer")),
                        content_type="application/json")


# The same on the paths and methods its clients use: transmission-remote posts to
# .../rpc/, and Sonarr first GETs, expecting the 409 that hands out the session id.
for _method, _path in (("POST", "/transmission/rpc/"), ("GET", "/transmission/rpc"),
                       ("GET", "/transmission/rpc/")):
    api(_method, _path, "transmissionRpc" + _method.title() + "Slash" * _path.endswith("/"),
        (409, 413), responses={"405": _answer("POST it instead", _ref("Error"))})(transmission_rpc)


#: A web client page runs and loads only the daemon's files, no inline script (Transmission
#: 3.00 puts tracker URLs in attributes); jQuery UI needs inline styles, a data: image.
WEB_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
              "form-action 'self'; frame-ancestors 'none'")
#: The Content-Type of each kind of web client file; others are bytes, nosniff: not run.
WEB_TYPES = {".html": "text/html", ".htm": "text/html", ".js": "text/javascript",
             ".mjs": "text/javascript", ".css": "text/css", ".json": "application/json",
             ".map": "application/json", ".webmanifest": "application/manifest+json",
             ".txt": "text/plain", ".png": "image/png", ".gif": "image/gif",
             ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
             ".svg": "image/svg+xml", ".ico": "image/x-icon", ".woff": "font/woff",
             ".woff2": "font/woff2", ".ttf": "font/ttf"}
#: Bytes of a web client file read at once, in a worker thread.
WEB_PIECE = 256 * 1024
_WEB_PATH = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "a file under the --web-ui directory; empty for its index.html"}
#: Every path under /transmission/web/: [\s\S], as . misses a %0A that must get our 404.
WEB_ROUTE = r"/transmission/web/{path:[\s\S]*}"


@api("GET", WEB_ROUTE, "transmissionWeb", (404,), responses={"200": _answer(
    "the file", {"type": "string"}, media="*/*")}, parameters=[_WEB_PATH])
async def transmission_web(request):
    """A file of the --web-ui directory, such as Transmission's web client"""
    root = request.app[CONFIG].web_ui
    if root is None:
        raise ApiError(404, "no web client is served; start the daemon with --web-ui DIR")
    descriptor, name, size = await asyncio.to_thread(_web_file, root,
                                                     request.match_info["path"])
    # The file served is the one _web_file opened: its name may point elsewhere now.
    with open(descriptor, "rb") as file:
        response = web.StreamResponse(headers={
            "Content-Type": WEB_TYPES.get(os.path.splitext(name)[1].lower(),
                                          "application/octet-stream"),
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": WEB_POLICY})
        response.content_length = size
        await response.prepare(request)
        await _write_file(response, file, size if request.method == "GET" else 0)
        await response.write_eof()
    return response


async def _write_file(response, file, left):
    """Write left bytes of file, read WEB_PIECE at a time in a thread."""
    while left > 0:
        piece = await asyncio.to_thread(file.read, min(left, WEB_PIECE))
        if not piece:  # it shrank since: end the connection, so the cut shows
            response.force_close()
            return
        await response.write(piece)
        left -= len(piece)


api("HEAD", WEB_ROUTE, "transmissionWebHead", (404,), responses={"200": {
    "description": "the file's headers"}}, parameters=[_WEB_PATH])(transmission_web)


def _web_file(root, relative):
    """(open descriptor, name, size) of the regular file relative names under root; threaded."""
    # Each name is opened in the directory opened before it, never via a symlink or ..:
    # a name swapped for a symlink after a check cannot lead outside root.
    missing = ApiError(404, "no such file in the web client")
    names = [name for name in relative.split("/") if name not in ("", ".")]
    if "\x00" in relative or ".." in names:
        raise missing
    # O_NONBLOCK: opening a FIFO someone put there must not wait for a writer.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # it went away since the start
        raise missing from None

    def enter(name):
        nonlocal descriptor
        parent = descriptor
        descriptor = os.open(name, flags, dir_fd=parent)
        os.close(parent)
    try:
        for name in names:
            enter(name)
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            names.append("index.html")
            enter("index.html")
        info = os.fstat(descriptor)
    except OSError:  # missing, a symlink, a name too long, a directory it may not enter
        os.close(descriptor)
        raise missing from None
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise missing
    return descriptor, names[-1], info.st_size


# --------------------------------------------------------------------------- #
# Extension: the disk watch. Holds at start, and stops while running, a torrent whose files
# vanish or whose save path comes to lead outside the roots; tries the disk again after a
# disk error; tells /health of a directory that is not writable
# --------------------------------------------------------------------------- #

#: Seconds between checks of the directories and downloading torrents' save paths: the
#: longest a symlink swapped into the download directory redirects writes.
WATCH_INTERVAL = 1.0
DATA_CHECK_INTERVAL = 10.0  #: seconds between checks of all save paths and finished sizes
DISK_RETRY = 600.0  #: seconds a torrent stopped by a disk error waits to try the disk again


def _inspect_disk(roots, directories, places, checks):
    """({directory name: problem}, each torrent's reason to stop or None). Blocking."""
    problems = {name: f"the {name} directory {directory} is not writable"
                for name, directory in directories.items()
                if not os.access(directory, os.W_OK | os.X_OK)}
    faults = []
    for where, check in zip(places, checks):
        fault = _outside_roots(roots, where)
        if fault is None and check is not None:
            missing = _missing_file(*check)
            fault = missing and f"missing or truncated file: {missing}"
        faults.append(fault)
    return problems, faults


async def _watch_disk(engine, problems):
    """Stop torrents whose save path leaves the roots or whose files vanish; watch the dirs."""
    # Every second the downloading ones (a symlink swapped in redirects writes), and all of them
    # every DATA_CHECK_INTERVAL, with files written by the check before (not racing a write).
    while engine.loading:
        await asyncio.sleep(STATUS_INTERVAL)
    next_full_check = 0.0
    while True:
        full = time.monotonic() >= next_full_check
        if full:
            next_full_check = time.monotonic() + DATA_CHECK_INTERVAL
        torrents = [t for t in engine.torrents() if not t.fault and (
            full or t.status["state"] == "downloading" and not t.status["paused"])]
        places = [_places(t) for t in torrents]
        checks = [_files_to_check(t) if full else None for t in torrents]
        dirs = {"download": engine.config.download_dir, "state": engine.store.root}
        found, faults = await asyncio.to_thread(_inspect_disk, engine.roots, dirs,
                                                places, checks)
        problems[:] = found.values()
        for torrent, fault in zip(torrents, faults):
            if fault and not torrent.fault and not torrent.removing:
                torrent.fault = fault
                engine.stop(torrent)
        await asyncio.sleep(WATCH_INTERVAL)


def _files_to_check(torrent):
    """(save path, files (index, path, least size) that must be on disk, priorities), or None."""
    if torrent.info is None:
        return None
    files, written = torrent.info["files"], torrent.extra.get("written")
    torrent.extra["written"] = torrent.file_progress  # what the next full check may expect
    if not torrent.status["is_finished"]:
        files = [(index, path, 0) for index, path, _ in files
                 if index < len(written or ()) and written[index]]
    return torrent.save_path, files, list(torrent.file_priorities)


async def _retry_disk(torrent):
    """Take it out of the upload mode a disk error put it in, DISK_RETRY later."""
    # The disk may have room again. A magnet whose metadata is unchecked stays held (_add).
    await asyncio.sleep(DISK_RETRY)
    del torrent.extra["disk_retry"]
    if torrent.disk_error and torrent.info is not None and not torrent.removing:
        with contextlib.suppress(RuntimeError):
            torrent.handle.unset_flags(lt.torrent_flags.upload_mode)


def _hold_missing(params, notes):
    """A load listener: a torrent whose files are gone is held, with the reason."""
    # A drive not mounted must not mean downloading it all again, into the mount point.
    if not params.ti:
        return None
    files, had = _files_of(params.ti), params.have_pieces
    if not notes["finished"]:  # a download: the files holding a piece it had must be there
        files = [(index, path, 0) for index, path, size in files
                 if size and any(had[slice(*_piece_span(params.ti, index, size))])]
    missing = _missing_file(params.save_path, files, params.file_priorities)
    return missing and f"missing or truncated file: {missing}"


def _piece_span(info, index, size):
    """(first, end) of the pieces a file of size bytes spans; end is one past its last."""
    return info.map_file(index, 0, 0).piece, info.map_file(index, size - 1, 0).piece + 1


def _on_file_error(engine, alert):
    """The first disk error of a burst: try the disk again DISK_RETRY later."""
    torrent = engine.torrent_of(alert)
    if torrent is not None and "disk_retry" not in torrent.extra:
        torrent.extra["disk_retry"] = engine.spawn(_retry_disk(torrent),
                                                   f"retry {torrent.infohash}")


def _watch_setup(app, engine):
    """Watch the disk from the engine's start; /health tells its directory problems."""
    problems = []  # the directories' problems the last look found
    engine.listen("task", lambda: ("watch", _watch_disk(engine, problems)))
    engine.listen("health", lambda: list(problems))
    engine.on_alert(lt.file_error_alert, _on_file_error)
    engine.listen("load", _hold_missing)


EXTENSIONS.append(_watch_setup)


# --------------------------------------------------------------------------- #
# Extension: streaming. GET /torrents/{infohash}/files/{index}: a file in byte ranges
# while it downloads, the pieces ahead of each reader under deadline, verified bytes only
# --------------------------------------------------------------------------- #

#: Bytes ahead of a reader under deadline: libtorrent's deadline picker scales badly.
READ_AHEAD = 8 * 1024 * 1024
#: A deadline's milliseconds per MiB between the reader and the piece: a 4 MiB/s player.
DEADLINE_PER_MIB = 250
#: The deadline (ms) of a piece a reader waits for: a minute ago, before any read-ahead.
LATE = -60_000
#: Bytes the kernel and each write hold for a stream's client: one that stops reading stops.
STREAM_SEND_BUFFER = 256 * 1024

OPTIONS.append(Option("max_streams", _number(int, 1), 16, "file streams served at once "
                      "(GET /torrents/{infohash}/files/{index}); past it the answer is 503"))
STATUS.append(Field("streams", {"type": "array", "items": _object({
    "file": {"type": "integer"}, "position": {"type": "integer"}})}, False,
    "its file streams: each one's file index and next byte", lambda torrent, status: [
        {"file": r.index, "position": r.position} for r in torrent.extra.get("streams", ())]))
#: Players know only a user name and a password: http://any:TOKEN@host:port/...
BASIC_REALMS["/torrents/{infohash}/files/"] = "TorrentFlow"


def _streams_setup(app, engine):
    # The status shows where each reader is, even in a torrent that is idle otherwise.
    engine.listen("tick", lambda: [engine.refresh(torrent) for torrent in engine.torrents()
                                   if torrent.extra.get("streams")])


EXTENSIONS.append(_streams_setup)


class _Reader:
    """One GET of a file: where it is in its range, and the deadlines it gave."""

    def __init__(self, torrent, entry, offset, span):
        self.torrent, self.index, self.size, self.offset = torrent, entry[0], entry[2], offset
        self.position, self.end = span
        self.armed = -1             # the farthest piece ahead given a deadline

    def piece(self, position):
        return (self.offset + position) // self.torrent.info["piece_length"]

    def window(self):
        """Pieces it wants soon: READ_AHEAD from here, and its file's ends, where indexes sit."""
        front = self.piece(min(self.end, self.position + READ_AHEAD) - 1)
        return {*range(self.piece(self.position), front + 1), self.piece(0),
                self.piece(self.size - 1)}, front

    def arm(self, pieces):
        """Deadlines: LATE for pieces a reader awaits (read once verified), others by distance."""
        start, waited = self.offset + self.position, {
            reader.piece(reader.position) for reader in self.torrent.extra["streams"]}
        with _handle_call():
            for piece in sorted(pieces):
                distance = max(0, piece * self.torrent.info["piece_length"] - start)
                self.torrent.handle.set_piece_deadline(*(
                    (piece, LATE, lt.deadline_flags_t.alert_when_available) if piece in waited
                    else (piece, distance * DEADLINE_PER_MIB >> 20)))

    async def verified(self, request, engine):
        """Its bytes to the end of their piece, once verified, checking the client each second."""
        (window, front), piece = self.window(), self.piece(self.position)
        pieces = window if self.armed < 0 else {piece, *range(self.armed + 1, front + 1)}
        while True:
            self.arm(pieces)  # again each second: a recheck drops the deadlines
            self.armed, pieces = max(self.armed, front), window
            with contextlib.suppress(ApiError):  # 503 after a second; 404 once removed
                data = await engine.expect(self.torrent.ids, lt.read_piece_alert, "a piece",
                                           lambda alert: alert.buffer if alert.piece == piece
                                           and not alert.error.value() else None, 1.0)
                begin = self.offset + self.position - piece * self.torrent.info["piece_length"]
                return memoryview(data)[begin:begin + self.end - self.position]
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client hung up")
            if self.torrent.status["error"]:
                raise ApiError(409, f"torrent {self.torrent.infohash} stopped: "
                               f"{self.torrent.status['error']}")

    def close(self):
        """Clear the deadlines no other reader of its torrent needs."""
        self.torrent.extra["streams"].remove(self)
        needed = {piece for other in self.torrent.extra["streams"] for piece in other.window()[0]}
        with contextlib.suppress(RuntimeError):  # the torrent is gone
            for piece in self.window()[0] - needed:
                self.torrent.handle.reset_piece_deadline(piece)


def _byte_range(header, size):
    """(first, end) of the bytes a Range header's first range asks for, or None; 416 if none."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)(,.*)?", header.replace(" ", ""))
    # Past 18 digits a number is past any file; int() of 5,000 digits would raise.
    first, last = (int(text or 0) if len(text.lstrip("0")) < 19 else 10**18 for text in (
        match.group(1, 2) if match else ("", "")))
    if match and match[1]:
        span = first, min(size, last + 1) if match[2] else size
    elif match and match[2]:
        span = max(0, size - last), size
    if not (match and (match[1] or match[2]) and span[0] < span[1]):
        raise ApiError(416, f"{header!r} holds no byte of this file of {size} bytes",
                       {"Content-Range": f"bytes */{size}"})
    return span


def _in_place(save_path, path, roots):
    """Whether a torrent's file is inside the roots, no symlink on its way. In a thread."""
    real, inside = _resolved(os.path.join(save_path, path), roots)
    return inside and real == Path(os.path.realpath(save_path), path)


_TEXT = {"required": True, "schema": {"type": "string"}}
_FILE = dict.fromkeys(("Accept-Ranges", "ETag", "Content-Disposition"), _TEXT)


def _file_entry(torrent, text):
    """(the file entry of index text, its headers): 409 before the metadata, 404 if none."""
    if torrent.info is None:
        raise ApiError(409, f"torrent {torrent.infohash}: metadata not yet known", RETRY_AFTER)
    entry = next((entry for entry in torrent.info["files"] if str(entry[0]) == text), None)
    if entry is None:
        raise ApiError(404, f"torrent {torrent.infohash} has no file with index {text}")
    name = os.path.basename(entry[1])
    # A page in a torrent, opened from here, would run with the API's origin: sandboxed, it
    # runs no script and sends no form. Its own origin kept: else a browser plays no video.
    return entry, {"Accept-Ranges": "bytes", "ETag": f'"{torrent.infohash}-{entry[0]}"',
                   "Content-Security-Policy": "sandbox allow-same-origin",
                   "X-Content-Type-Options": "nosniff",
                   "Content-Disposition": (  # RFC 6266
                       "inline; filename=\"%s\"; filename*=UTF-8''%s" % (
                           re.sub(r'[^ -~]|["\\]', "_", name), urllib.parse.quote(name, ""))),
                   "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream"}


async def stream_file(request):
    """A file's bytes, in byte ranges too, while it downloads"""
    torrent = _requested_torrent(request)
    entry, headers = _file_entry(torrent, request.match_info["index"])
    (index, _, size), etag = entry, headers["ETag"]
    if etag in request.headers.get("If-None-Match", "") or request.headers.get(
            "If-None-Match", "").strip() == "*":
        return web.Response(status=304, headers=headers)
    span = _byte_range(request.headers.get("Range") if request.headers.get(
        "If-Range", etag) == etag else None, size)
    headers.update({"Content-Range": f"bytes {span[0]}-{span[1] - 1}/{size}"} if span else {})
    if torrent.status["error"]:
        raise ApiError(409, f"torrent {torrent.infohash} stopped: {torrent.status['error']}")
    status = torrent.status
    if _held(status) and not status["is_seeding"] and _have(torrent, index) < size:
        raise ApiError(409, f"torrent {torrent.infohash} is paused: resume it to stream this")
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    response.content_length = span[1] - span[0] if span else size
    if request.method != "HEAD" and response.content_length:
        await _send_range(request, response, torrent, entry, span or (0, size))
    return response


def _have(torrent, index):
    """Bytes of a file that libtorrent verified, as of the last file progress."""
    return (torrent.file_progress or [0] * (index + 1))[index]


async def _send_range(request, response, torrent, entry, span):
    """Send a file's range, each piece once verified, within --max-streams; priority 0 -> 4."""
    engine = request.app[ENGINE]
    with _handle_call():
        offset = await asyncio.to_thread(
            lambda: torrent.handle.torrent_file().layout().file_offset(entry[0]))
    streams = sum(len(other.extra.get("streams", ())) for other in engine.torrents())
    if streams >= request.app[CONFIG].max_streams:
        raise ApiError(503, f"already {streams} streams, the most allowed", RETRY_AFTER)
    reader = _Reader(torrent, entry, offset, span)
    torrent.extra.setdefault("streams", []).append(reader)
    with contextlib.suppress(OSError, AttributeError):  # see STREAM_SEND_BUFFER
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
    try:
        await engine.confined(torrent)
        if torrent.file_priorities[entry[0]:entry[0] + 1] == [0]:
            await _prioritize(engine, torrent, _priorities(torrent, {entry[0]: 4}))
            engine.save(torrent)
            response.headers["X-File-Priority"] = "raised from 0 to 4: it downloads now"
        if torrent.status["queued"] and _have(torrent, entry[0]) < entry[2]:  # for hours maybe
            await engine.resume(torrent, queued=False)
            response.headers["X-Queue"] = "started now, past the queue"
        while reader.position < reader.end:
            data = await reader.verified(request, engine)
            if not await asyncio.to_thread(_in_place, torrent.save_path, entry[1], engine.roots):
                raise ApiError(409, f"{entry[1]} of {torrent.infohash} is not in its place")
            await response.prepare(request)  # once: it returns at once after that
            for start in range(0, len(data), STREAM_SEND_BUFFER):  # what waits is copied
                await response.write(data[start:start + STREAM_SEND_BUFFER])
            reader.position += len(data)
    except ApiError:
        if not response.prepared:
            raise
        response.force_close()  # cut short: the client sees the body end early
    except ConnectionError:
        pass  # the client hung up
    finally:
        reader.close()
        engine.refresh(torrent)


for _method in ("GET", "HEAD"):
    api(_method, "/torrents/{infohash}/files/{index}", f"streamFile{_method.title()}",
        (404, 409, 503), responses={
        "200": _answer("the file", {"type": "string"}, _FILE, media="*/*"),
        "206": _answer("the range Content-Range names", {"type": "string"},
                       {**_FILE, "Content-Range": _TEXT}, media="*/*"),
        "304": {"description": "unchanged: If-None-Match holds its ETag"},
        "416": _answer("no byte of the range is in the file", _ref("Error"),
                       {"Content-Range": _TEXT})}, parameters=[
        INFOHASH_PARAMETER, {"name": "index", "in": "path", "required": True, "schema": {
            "type": "integer"}, "description": "the file's index in its status' files"}])(
        stream_file)


if __name__ == "__main__":
    sys.exit(main())
