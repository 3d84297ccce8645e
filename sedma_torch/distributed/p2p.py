"""Content-addressed tensor exchange over Lattica (libp2p: Kademlia DHT, BitSwap, RTT).

The SPEC's stage-2 algorithm: content id of a tensor -> DHT lookup of its providers ->
score the providers (Eq. 7, with the availability and free memory each peer publishes
with an expiry, and Lattica's measured RTT) -> fetch from the top ``k``.

* Serialisation: a tensor travels as a safetensors file (a JSON header and raw bytes;
  nothing is ever unpickled). Lattica's own ``Lattica.store``/``get`` and its RPC handler
  wrappers pickle values, so this module only uses its raw-bytes calls
  (``store_with_subkey``/``get_with_subkey``, ``put_block``/``get_block``, and an RPC
  service with its own raw ``_handle_fetch``).
* Content id: the CIDv1 (raw codec, sha2-256, base32) of the payload bytes, the same id
  Lattica's ``put_block`` would return.
* Membership: a training group is the set of libp2p peer ids in ``members``. It is
  enforced when *serving* as well as when receiving:

  - Lattica hands an RPC handler the request bytes only, not the caller's peer id, so a
    request names its sender (``from``) and the server checks that sender. With a
    ``group_key`` every request carries an HMAC-SHA256 (key derived from ``group_key``)
    over the whole request (op, CID, sender, addressee, offset, length, timestamp, random
    nonce); the server refuses a bad tag, a non-member sender, another addressee, a
    timestamp outside +-``REQUEST_WINDOW_S`` and a nonce it has already seen (replay).
    Any holder of the key can claim any member's id: the key is the credential.
  - Without a ``group_key`` (allowlist only) the server proves the sender's identity with
    libp2p itself: it dials the claimed member (libp2p authenticates the peer id in the
    handshake) and asks it to confirm the request's random nonce; only then does it hand
    out a session token for the body. (Lattica runs a handler inside its swarm loop, so the
    call-back runs on a background thread and the requester polls ``head`` meanwhile.)
  - Lattica's BitSwap serves any block in the blockstore to any peer that asks, and its
    Python API cannot restrict that. So the plaintext payload is never put on BitSwap:
    in a keyed group it is split into chunks, each sealed with AES-256-GCM (key derived
    from ``group_key``, random 96-bit nonce, the CID/chunk size/index/count as associated
    data), and only the ciphertext blocks are published. This needs the ``cryptography``
    package; without it, or without a ``group_key``, BitSwap is off for this peer
    (``fetch(via="bitswap")`` raises a clear error) and tensors travel by RPC only.

* Size limit before download: a fetch first asks the provider for a small header (the
  payload size, its chunk size and, for BitSwap, the ciphertext block CIDs); a payload over
  ``max_bytes`` is refused before any byte of it moves. The body then comes in chunks of at
  most ``chunk_bytes`` (RPC requests with offset and length, or one BitSwap block per
  chunk), so the receiver holds at most ``max_bytes`` plus one chunk while downloading, and
  a server never builds a response larger than one chunk (it refuses larger requests).
  Limit: a *member* that ignores the requested length can still make Lattica buffer one
  oversized RPC response before it is refused (Lattica reads each response whole).
* Validation on receipt, before anything is decoded: the announced size and every chunk's
  length, the CID of the bytes (must equal the requested one), then the safetensors header
  (exactly one tensor, an allowed dtype, the expected shape/dtype when given).
* Telemetry: each peer keeps its latest record (HMAC-signed with a ``group_key``) and
  publishes it in the DHT under its own key (``telemetry_key(peer_id)``, subkey = its peer
  id) with an expiry of at most ``MAX_TELEMETRY_TTL_S``. The DHT is writable by anyone: a
  peer can fill every node's record store (Lattica refuses new records with
  ``MaxRecords``) with records whose expiry it chooses. So a failed store is a counted
  warning, not an error, and a reader takes a member's record from the DHT only when it
  verifies (keyed group: HMAC, peer, issue time, expiry not too far in the future) and
  otherwise asks the member itself over RPC (authenticated by the libp2p dial).
* Lookups are bounded and have a second source. Lattica's ``get_providers`` never returns
  when its DHT query ends without a provider and without a peer to ask (the last peer
  alive in a group, a joiner whose bootstrap dial has not completed), so every DHT read
  and provider announcement runs with a deadline of ``request_timeout_s`` (a failed or
  abandoned call is counted in ``dht_failures``; a failed announcement does not stop the
  payload from being served). Lattica keeps the subkeys of a key in one index record
  that each store reads, extends and writes back: members storing under one key at once
  (every peer posting its round record) can drop each other's subkey from the index, and
  a query times out after 1 s on a loaded machine. So a reader that misses a member's record can
  ask that member for it (``get_records(key, ask=...)``: each peer keeps the records it
  stored and serves them to members, op ``record``), and a fetch whose DHT lookup finds
  no provider that delivers can ask named members directly (``fetch(cid, ask=...)``, e.g.
  the peer that signed the record naming the CID). Both are counted
  (``record_fallbacks``, ``provider_fallbacks``); every check above still applies (member
  senders only, request HMAC, size and CID checks; the caller authenticates records).
* Identity: ``key_path`` keeps the libp2p key in a folder (mode 0700, the key 0600), so a
  restarted peer has the same peer id, and with the same long-term ``memory`` its
  :class:`PeerSelector` (stored under ``p2p/<peer id>``) continues its Eq. 8 weights.
* Rejections are counted in :class:`P2PStats` (both as a requester and as a server).
* A :class:`~sedma_torch.distributed.UtilityCache` (Eq. 10) sits in front of fetches.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .cache import UtilityCache
from .selection import PeerFeatures, PeerSelector, normalised_terms
from .telemetry import measure_local

try:  # AES-GCM for BitSwap blocks in a keyed group (optional dependency)
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # pragma: no cover - environment dependent
    AESGCM = None
    InvalidTag = ValueError

__all__ = [
    "MAX_TELEMETRY_TTL_S",
    "P2PStats",
    "PayloadRejected",
    "TensorPeer",
    "content_id",
    "decode_tensor",
    "encode_tensor",
    "telemetry_key",
]

TELEMETRY_KEY = "sedma/telemetry/v1"
"""Prefix of the per-peer DHT telemetry keys (see :func:`telemetry_key`)."""
MAX_TELEMETRY_TTL_S = 3600.0
"""Longest accepted telemetry expiry (s); records expiring later are ignored."""
CLOCK_SKEW_S = 60.0
"""Tolerated clock difference between peers for telemetry issue times (s)."""
REQUEST_WINDOW_S = 30.0
"""A request's timestamp must be within this many seconds of the server's clock."""
UNREACHABLE_BACKOFF_S = 60.0
"""A provider that did not answer (timeout, dial failure) is tried after the others for
this long (s): a killed peer's provider records stay in the DHT until they expire."""
DEFAULT_CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_BYTES = 16 * 2**20
"""Largest chunk a server serves and a receiver accepts per request/block (bytes)."""
MAX_REQUEST_BYTES = 4096
MAX_HEAD_BYTES = 64 * 1024
MAX_RECORD_BYTES = 16 * 1024
"""Largest record value a peer keeps to answer members directly and accepts from one."""
MAX_RECORD_KEY = 256
"""Longest DHT key (characters) a direct record request may name."""
RECORD_RETRY_S = 5.0
"""A member that did not answer a direct record request is not asked again for this long (s)."""
SERVICE_METHOD = "SedmaTensorService.fetch"

_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw codec, sha2-256, 32 bytes
_CID_RE = re.compile(r"^b[a-z2-7]{58}$")
_PEER_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_OPS = frozenset({"head", "body", "telemetry", "record", "confirm"})
_OK = b"\x00"
_ERR = b"\x01"
_BLOCK_MAGIC = b"SDB1"
_GCM_NONCE = 12
_GCM_TAG = 16
_MAX_PENDING_VERIFICATIONS = 64
_MAX_NONCES = 200_000
_SESSION_TTL_S = 120.0
_MAX_KEPT_RECORDS = 1024
_MAX_LOOKUPS_IN_FLIGHT = 8
ALLOWED_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


class PayloadRejected(ValueError):
    """A payload from a peer failed validation.

    ``reason`` is ``"oversized"`` (over ``max_bytes``, or a chunk longer than asked),
    ``"cid"`` (bytes do not match the requested CID) or ``"malformed"`` (format, dtype,
    shape, truncated or undecryptable data).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class _Refused(Exception):
    """A request this peer refuses to serve (``code`` goes back to the requester)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _RemoteError(Exception):
    """A provider answered with an error frame (or an unreadable one)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def content_id(data: bytes | bytearray | memoryview) -> str:
    """CIDv1 (raw, sha2-256) of ``data`` in base32, e.g. ``bafkrei...``."""
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_CID_PREFIX + digest).decode().lower().rstrip("=")


def telemetry_key(peer_id: str) -> str:
    """The DHT key under which ``peer_id`` publishes its telemetry record."""
    return f"{TELEMETRY_KEY}/{peer_id}"


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """The safetensors bytes of ``tensor`` (moved to the CPU, made contiguous)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {tensor.dtype} is not allowed; use one of {_dtype_names()}")
    return st_save({"tensor": tensor.detach().cpu().contiguous()})


def decode_tensor(
    data: bytes,
    *,
    max_bytes: int,
    expected_cid: str | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Validate and decode a payload from a peer; raises :class:`PayloadRejected`."""
    if not isinstance(data, bytes | bytearray):
        raise PayloadRejected(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadRejected(
            f"payload of {len(data)} bytes exceeds max_bytes={max_bytes}", "oversized"
        )
    if expected_cid is not None and content_id(data) != expected_cid:
        raise PayloadRejected(f"payload bytes do not match the requested CID {expected_cid}", "cid")
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PayloadRejected(f"payload is not a valid safetensors file: {exc}") from exc
    if set(tensors) != {"tensor"}:
        raise PayloadRejected(f"payload must hold one tensor named 'tensor', got {sorted(tensors)}")
    tensor = tensors["tensor"]
    if tensor.dtype not in ALLOWED_DTYPES:
        raise PayloadRejected(f"payload dtype {tensor.dtype} is not allowed")
    if dtype is not None and tensor.dtype != dtype:
        raise PayloadRejected(f"payload dtype {tensor.dtype} != expected {dtype}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise PayloadRejected(f"payload shape {tuple(tensor.shape)} != expected {tuple(shape)}")
    return tensor


def _dtype_names() -> list[str]:
    return sorted(str(d) for d in ALLOWED_DTYPES)


@dataclass
class P2PStats:
    """Counters of one :class:`TensorPeer` (as a requester and as a server)."""

    published: int = 0
    fetched: int = 0
    cache_hits: int = 0
    unknown_peer: int = 0
    """Providers or telemetry records from peers outside ``members`` (dropped)."""
    bad_signature: int = 0
    """Telemetry records whose HMAC did not verify (dropped)."""
    rejected_payloads: int = 0
    """Payloads that failed validation (all reasons: the three counters below)."""
    rejected_oversized: int = 0
    """Payloads refused by size: announced over ``max_bytes``, or a chunk longer than asked."""
    rejected_cid: int = 0
    """Payloads whose bytes did not match the requested CID."""
    rejected_malformed: int = 0
    """Malformed payloads, headers or telemetry received, and malformed requests served."""
    rejected_unauthorized: int = 0
    """Requests refused as a server: non-member, bad or missing HMAC, unconfirmed identity,
    addressed to another peer."""
    rejected_replayed: int = 0
    """Requests refused as a server: nonce seen before or timestamp outside the window."""
    rejected_expiry: int = 0
    """Telemetry records (or DHT entries) expiring too far in the future, or issued in it."""
    telemetry_store_failed: int = 0
    """``publish_telemetry`` calls whose DHT store failed (warned; record still served)."""
    failed_requests: int = 0
    """Requests to a provider that errored, were refused or timed out."""
    dht_failures: int = 0
    """DHT calls (lookups, provider announcements) that raised (Lattica's queries time out
    after 1 s) or were abandoned after ``request_timeout_s`` (``get_providers`` can wait
    forever)."""
    record_fallbacks: int = 0
    """Records asked from their author directly because the DHT answer lacked them."""
    provider_fallbacks: int = 0
    """Fetches that asked named members directly: no provider from the DHT delivered."""
    served_bytes: int = 0
    """Payload bytes this peer served over RPC."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TensorPeer:
    """One member of a training group on a Lattica network.

    Args:
        host: listen address (``127.0.0.1`` in tests).
        port: TCP port (0 picks a free one).
        bootstrap: multiaddrs (``/ip4/.../tcp/.../p2p/<id>``) of peers to join through.
        members: peer ids of the training group; this peer is always a member.
        group_key: shared secret of the group: authenticates requests, signs telemetry and
            encrypts BitSwap blocks (None: allowlist only, no BitSwap).
        k: providers to try per fetch (top-k by Eq. 7).
        max_bytes: largest payload accepted from a peer (bytes); refused before download.
        chunk_bytes: transfer chunk (bytes, 1 ... ``MAX_CHUNK_BYTES``).
        bitswap: publish (encrypted) BitSwap blocks. None: when a ``group_key`` and the
            ``cryptography`` package are there; True: require it (error otherwise).
        cache_mb: capacity of the utility cache in MB (0 disables it).
        memory: long-term memory for transfer outcomes and cache statistics (duck-typed).
        telemetry_ttl_s: expiry of the published telemetry records (s, <= 3600).
        request_timeout_s: timeout of one request to a provider and of one DHT lookup
            (whole seconds, >= 1).
        key_path: folder of this peer's libp2p key (Lattica's ``p2p.key``, made on first
            use; the folder is kept at mode 0700, the key at 0600) and of a ``peer_id``
            file naming the id it gave: the same folder gives the same peer id after a
            restart. None: a new identity every time.
        admit_key_holders: in a keyed group, admit the sender of a request whose group-key
            HMAC (and timestamp, nonce) verifies, as p2p training admits the author of a
            record with a valid HMAC: the key is then the only credential. A peer whose
            announcement the DHT lost still becomes known to those it asks. False: only
            ``members`` and :meth:`add_members` admit.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Iterable[str] = (),
        members: Iterable[str] = (),
        group_key: bytes | None = None,
        k: int = 2,
        max_bytes: int = 256 * 2**20,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        bitswap: bool | None = None,
        cache_mb: float = 64.0,
        memory: Any | None = None,
        telemetry_ttl_s: float = 60.0,
        request_timeout_s: int = 10,
        key_path: str | os.PathLike[str] | None = None,
        admit_key_holders: bool = False,
    ) -> None:
        from lattica import ConnectionHandler, Lattica, rpc_method

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not _is_int(max_bytes) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if not _is_int(chunk_bytes) or not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be an integer in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes!r}"
            )
        if group_key is not None and not isinstance(group_key, bytes):
            raise TypeError(f"group_key must be bytes or None, got {type(group_key).__name__}")
        if group_key is not None and not group_key:
            raise ValueError("group_key must not be empty (use None for an allowlist-only group)")
        if isinstance(request_timeout_s, bool) or not isinstance(request_timeout_s, int):
            raise ValueError(f"request_timeout_s must be whole seconds, got {request_timeout_s!r}")
        ttl = float(telemetry_ttl_s)
        if not (0 < ttl <= MAX_TELEMETRY_TTL_S):
            raise ValueError(
                f"telemetry_ttl_s must be in (0, {MAX_TELEMETRY_TTL_S:g}], got {telemetry_ttl_s!r}"
            )
        if bitswap not in (None, True, False):
            raise ValueError(f"bitswap must be None, True or False, got {bitswap!r}")
        self._bitswap_off_reason: str | None = None
        if bitswap is False:
            self._bitswap_off_reason = "this peer was built with bitswap=False"
        elif group_key is None:
            self._bitswap_off_reason = (
                "BitSwap needs a group_key: Lattica's BitSwap serves any block to any peer "
                "that asks, so blocks are only published encrypted with a key derived from "
                "the group key"
            )
        elif AESGCM is None:
            self._bitswap_off_reason = (
                "BitSwap in a keyed group needs the 'cryptography' package (AES-GCM) to "
                "encrypt blocks; install it or use via='rpc'"
            )
        if bitswap is True and self._bitswap_off_reason is not None:
            raise ValueError(f"bitswap=True is not possible: {self._bitswap_off_reason}")

        port = port or _free_port(host)
        builder = (
            Lattica.builder()
            .with_listen_addrs([f"/ip4/{host}/tcp/{port}"])
            .with_mdns(False)
            .with_upnp(False)
            .with_autonat(False)
            .with_dcutr(False)
        )
        bootstrap = list(bootstrap)
        if bootstrap:
            builder = builder.with_bootstraps(bootstrap)
        key_folder = None
        if key_path is not None:
            key_folder = Path(key_path)
            key_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(key_folder, 0o700)  # it holds a private key
            builder = builder.with_key_path(str(key_folder))
        self._node = builder.build()
        # Lattica's public ``store``/``get`` pickle values (``get`` would unpickle whatever
        # any peer stored), so DHT records use the raw-bytes calls of its core SDK object
        # (lattica_python_core.LatticaSDK, public in that module), reached through the one
        # attribute Lattica keeps it in; no other private part of Lattica is used
        self._dht = self._node._lattica_instance
        self.peer_id: str = self._node.peer_id()
        if key_folder is not None:
            self._check_identity(key_folder)
        self.address = f"/ip4/{host}/tcp/{port}/p2p/{self.peer_id}"
        self.members: set[str] = {self.peer_id, *members}
        self.admit_key_holders = bool(admit_key_holders)
        self.group_key = group_key
        self.k = k
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.telemetry_ttl_s = ttl
        self.request_timeout_s = max(int(request_timeout_s), 1)
        self.selector = PeerSelector(memory=memory, name=f"p2p/{self.peer_id}")
        off = isinstance(cache_mb, int | float) and not isinstance(cache_mb, bool) and cache_mb == 0
        # 0 switches the cache off; anything else (NaN, a bool, a negative size) is checked
        # and refused by UtilityCache, naming capacity_mb
        self.cache = None if off else UtilityCache(cache_mb, memory=self.selector.memory)
        self.stats = P2PStats()
        self._last_candidates: dict[str, PeerFeatures] = {}
        self._blocks: dict[str, bytes] = {}
        self._manifests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._seen_nonces: dict[str, float] = {}
        self._pending: dict[str, tuple[str, str, float]] = {}
        self._verifications: dict[tuple[str, str], dict[str, Any]] = {}
        self._sessions: dict[str, tuple[str, str, float]] = {}
        self._last_prune = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._telemetry_payload: bytes | None = None
        self._telemetry_cache: dict[str, dict[str, float]] = {}
        self._telemetry_retry: dict[str, float] = {}
        # providers that did not answer (killed, partitioned): tried last until this time
        self._unreachable_until: dict[str, float] = {}
        # records this peer stored (its own subkey): key -> (value, expiry), for members
        self._records: dict[str, tuple[bytes, float]] = {}
        self._record_retry: dict[str, float] = {}
        self._lookups_in_flight = 0
        self._answered: dict[str, float] = {}  # peer -> time.monotonic() of its last answer
        self._closed = False
        if group_key is not None:
            self._request_key = hmac.new(group_key, b"sedma/p2p/request/v1", "sha256").digest()
            self._telemetry_key = hmac.new(group_key, b"sedma/p2p/telemetry/v1", "sha256").digest()
            self._block_key = hmac.new(group_key, b"sedma/p2p/bitswap/v1", "sha256").digest()
        ref = weakref.ref(self)

        class SedmaTensorService(ConnectionHandler):
            """Serves this peer's published payloads (raw framed bytes in and out)."""

            @rpc_method
            def fetch(self, request: bytes) -> bytes:
                peer = ref()
                if peer is None:
                    return _ERR + b'{"error":"closed","message":"peer closed"}'
                return peer._serve(bytes(request))

            def _handle_fetch(self, data: bytes) -> bytes:
                return self.fetch(data)

        self._service = SedmaTensorService(self._node)

    def _check_identity(self, folder: Path) -> None:
        """Keep the key at mode 0600 and check that the folder's key gave the id it gave
        before: Lattica makes a new key, without a word, when ``p2p.key`` does not load."""
        key_file = folder / "p2p.key"
        if key_file.is_file():
            os.chmod(key_file, 0o600)
        id_file = folder / "peer_id"
        if id_file.is_file():
            known = id_file.read_text().strip()
            if known != self.peer_id:
                self._node.close()
                raise ValueError(
                    f"key_path {folder}: {key_file} did not load (Lattica made a new peer id "
                    f"{self.peer_id}, the folder's key is {known}); restore the key or use "
                    "a new folder"
                )
        else:
            id_file.write_text(self.peer_id + "\n")

    # ----- membership ----------------------------------------------------------------
    def add_members(self, peer_ids: Iterable[str]) -> None:
        """Admit ``peer_ids`` to the training group."""
        admitted = set(peer_ids)
        with self._lock:  # a new set, as the server's admissions (admit_key_holders) make
            self.members = self.members | admitted

    @property
    def bitswap_enabled(self) -> bool:
        """Whether this peer publishes and fetches (encrypted) BitSwap blocks."""
        return self._bitswap_off_reason is None

    # ----- publishing ----------------------------------------------------------------
    def publish(self, tensor: torch.Tensor) -> str:
        """Keep ``tensor``'s safetensors bytes under their CID, advertise the CID in the DHT
        (and, in a keyed group, publish the encrypted BitSwap blocks); returns the CID.

        The advertisement is best effort (a failed or late one is counted in
        ``dht_failures``): the payload is served all the same, to providers' lookups that
        still find it and to members that ask this peer directly (``fetch(ask=...)``)."""
        data = encode_tensor(tensor)
        if len(data) > self.max_bytes:
            raise ValueError(f"tensor payload of {len(data)} bytes exceeds max_bytes")
        cid = content_id(data)
        if cid not in self._blocks:
            if self.bitswap_enabled:
                self._manifests[cid] = self._put_encrypted_blocks(cid, data)
            self._blocks[cid] = data
        self._bounded(lambda: self._node.start_providing(cid) or True)
        self.stats.published += 1
        return cid

    def unpublish(self, cid: str) -> None:
        """Stop serving and advertising ``cid`` (and drop its BitSwap blocks)."""
        self._blocks.pop(cid, None)
        for block_cid in self._manifests.pop(cid, {}).get("blocks", ()):
            with contextlib.suppress(RuntimeError):
                self._node.remove_block(block_cid)
        with contextlib.suppress(RuntimeError):
            self._node.stop_providing(cid)

    def _block_aad(self, cid: str, chunk: int, index: int, count: int) -> bytes:
        return f"sedma/bitswap/v1|{cid}|{chunk}|{index}|{count}".encode()

    def _put_encrypted_blocks(self, cid: str, data: bytes) -> dict[str, Any]:
        aead = AESGCM(self._block_key)
        chunk = self.chunk_bytes
        count = max(1, math.ceil(len(data) / chunk))
        view = memoryview(data)
        blocks = []
        for i in range(count):
            nonce = os.urandom(_GCM_NONCE)
            sealed = aead.encrypt(
                nonce, view[i * chunk : (i + 1) * chunk], self._block_aad(cid, chunk, i, count)
            )
            block = _BLOCK_MAGIC + nonce + sealed
            del sealed
            block_cid = content_id(block)
            lattica_cid = self._node.put_block(block)
            if lattica_cid != block_cid:
                raise RuntimeError(f"Lattica returned CID {lattica_cid}, expected {block_cid}")
            blocks.append(block_cid)
        return {"chunk": chunk, "blocks": blocks}

    def _sign(self, body: bytes) -> str:
        assert self.group_key is not None
        return hmac.new(self._telemetry_key, body, hashlib.sha256).hexdigest()

    def publish_telemetry(self) -> dict[str, Any]:
        """Publish this peer's availability and free memory (with an expiry).

        The record is kept here (members can ask for it over RPC) and stored in the DHT
        under :func:`telemetry_key`. The DHT store is best effort: when it fails (e.g. a
        peer filled the record stores, ``MaxRecords``) this warns and counts
        ``stats.telemetry_store_failed`` instead of raising.
        """
        availability, host_free, device_free = measure_local()
        now = time.time()
        expires = now + self.telemetry_ttl_s
        record = {
            "peer": self.peer_id,
            "availability": availability,
            "mem_free_gb": device_free if device_free is not None else host_free,
            "issued": now,
            "expires": expires,
        }
        body = _canonical(record)
        payload = {"body": body.decode()}
        if self.group_key is not None:
            payload["hmac"] = self._sign(body)
        raw = json.dumps(payload).encode()
        self._telemetry_payload = raw
        try:
            self.store_record(telemetry_key(self.peer_id), raw, expires)
        except Exception as exc:  # record store full, no peers, ...
            self.stats.telemetry_store_failed += 1
            warnings.warn(
                f"telemetry of {self.peer_id} not stored in the DHT ({_first_line(exc)}); "
                "members still get it over RPC",
                RuntimeWarning,
                stacklevel=2,
            )
        return record

    def store_record(self, key: str, value: bytes, expires: float) -> None:
        """Store raw ``value`` in the DHT under ``key`` with this peer's id as subkey, until
        unix time ``expires``. Raises what Lattica raises (``MaxRecords``, no peers).

        The latest record per key (up to ``MAX_RECORD_BYTES``, at most 1024 keys) is also
        kept here, before the DHT store, so members can ask for it directly when the DHT
        loses it (see :meth:`get_records`)."""
        if not isinstance(value, bytes):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        if len(value) <= MAX_RECORD_BYTES and len(key) <= MAX_RECORD_KEY:
            now = time.time()
            with self._lock:
                self._records[key] = (value, float(expires))
                for old in [k for k, (_, exp) in self._records.items() if exp < now]:
                    del self._records[old]
                while len(self._records) > _MAX_KEPT_RECORDS:  # drop the first to expire
                    del self._records[min(self._records, key=lambda k: self._records[k][1])]
        self._dht.store_with_subkey(key, value, float(expires), self.peer_id)

    def get_records(self, key: str, ask: Iterable[str] = ()) -> dict[str, tuple[bytes, float]]:
        """Every subkey's raw ``(value, expiry)`` under ``key`` in the DHT ({} when none).

        ``ask``: members whose own record (subkey = their peer id) is asked from them
        directly when the DHT answer lacks it (see the module docstring: concurrent
        stores can drop a subkey from Lattica's index); a member that does not answer is
        not asked again for ``RECORD_RETRY_S``, non-members are not asked (counted in
        ``unknown_peer``). The DHT is writable by anyone: the caller authenticates what
        it reads, a member's direct answer included."""
        raw = self._bounded(self._dht.get_with_subkey, key)
        out = {}
        for sub, entry in raw.items() if isinstance(raw, dict) else ():
            try:
                value, expiry = entry
                out[str(sub)] = (bytes(value), float(expiry))
            except (TypeError, ValueError):
                self.stats.rejected_malformed += 1
        for peer in dict.fromkeys(ask):
            if peer in out:
                continue
            if peer not in self.members:
                self.stats.unknown_peer += 1
                continue
            entry = self._records.get(key) if peer == self.peer_id else self._record_from(peer, key)
            if entry is not None and entry[1] >= time.time():
                out[peer] = entry
                self.stats.record_fallbacks += 1
        return out

    def _record_from(self, peer: str, key: str) -> tuple[bytes, float] | None:
        """The record ``peer`` stored under ``key``, asked from it over RPC (None: it has
        none, refused, or did not answer)."""
        now = time.time()
        if len(key) > MAX_RECORD_KEY or self._record_retry.get(peer, 0.0) > now:
            return None
        try:
            raw = self._call(peer, self._request("record", peer, key=key), timeout=2)
        except _RemoteError as err:
            if err.code == "unreachable":
                self._record_retry[peer] = now + RECORD_RETRY_S
            return None
        try:
            if len(raw) > 2 * MAX_RECORD_BYTES:
                raise ValueError("answer too long")
            answer = json.loads(bytes(raw))
            value = base64.b64decode(answer["value"], validate=True)
            expiry = float(answer["expires"])
            if len(value) > MAX_RECORD_BYTES or not math.isfinite(expiry):
                raise ValueError("record too long or expiry not finite")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.stats.rejected_malformed += 1
            return None
        return (value, expiry) if expiry >= now else None

    def _bounded(self, fn, *args: Any) -> Any:
        """``fn(*args)`` (a Lattica DHT call) waited for at most ``request_timeout_s``;
        None when it raised or has not returned by then (counted in ``dht_failures``).

        Lattica's ``get_providers`` never returns when its query ends without a provider
        and without a peer to ask, so the call runs on a daemon thread that is abandoned
        at the deadline (Lattica releases the GIL while such a call waits; closing the
        node ends the wait). At most ``_MAX_LOOKUPS_IN_FLIGHT`` calls run at once: past that a lookup
        fails at once, since the node has stopped answering anyway."""
        with self._lock:
            if self._lookups_in_flight >= _MAX_LOOKUPS_IN_FLIGHT:
                self.stats.dht_failures += 1
                return None
            self._lookups_in_flight += 1
        box: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                box["value"] = fn(*args)
            except Exception:  # Lattica raises RuntimeError on a query timeout
                pass
            finally:
                with self._lock:
                    self._lookups_in_flight -= 1
                done.set()

        threading.Thread(target=call, name="sedma-p2p-lookup", daemon=True).start()
        if not done.wait(self.request_timeout_s) or "value" not in box:
            self.stats.dht_failures += 1
            return None
        return box["value"]

    def peer_telemetry(self, peers: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """Valid, unexpired telemetry of member peers (of ``peers``, default all members).

        In a keyed group a member's record comes from the DHT when it verifies; otherwise
        (and always without a key, where DHT records cannot be authenticated) it is asked
        from the member itself over RPC. Records from non-members are dropped and counted.
        """
        targets = sorted(self.members) if peers is None else list(dict.fromkeys(peers))
        out: dict[str, dict[str, float]] = {}
        now = time.time()
        for peer in targets:
            if peer not in self.members:
                self.stats.unknown_peer += 1
                continue
            if peer == self.peer_id:
                record = (
                    self._parse_telemetry(peer, self._telemetry_payload, None, now)
                    if self._telemetry_payload is not None
                    else None
                )
            else:
                record = self._telemetry_from_dht(peer, now) if self.group_key else None
                if record is None:
                    record = self._telemetry_from_rpc(peer, now)
            if record is not None:
                out[peer] = record
        return out

    def _telemetry_from_dht(self, peer: str, now: float) -> dict[str, float] | None:
        try:
            raw = self.get_records(telemetry_key(peer))
        except Exception:
            return None
        self.stats.unknown_peer += sum(1 for s in raw if s != peer)  # junk under its key
        entry = raw.get(peer)
        if entry is None:
            return None
        try:
            value, expiration = entry
            expiration = float(expiration)
        except (TypeError, ValueError):
            self.stats.rejected_malformed += 1
            return None
        return self._parse_telemetry(peer, value, expiration, now)

    def _telemetry_from_rpc(self, peer: str, now: float) -> dict[str, float] | None:
        cached = self._telemetry_cache.get(peer)
        if cached is not None and cached["expires"] >= now:
            return cached
        if self._telemetry_retry.get(peer, 0.0) > now:
            return None
        try:
            value = self._call(peer, self._request("telemetry", peer), timeout=2)
        except _RemoteError as err:
            if err.code == "unreachable":  # timeouts are what costs: back off a little
                self._telemetry_retry[peer] = now + 5.0
            return None
        if len(value) > 4096:
            self.stats.rejected_malformed += 1
            return None
        record = self._parse_telemetry(peer, bytes(value), None, now)
        if record is not None:
            self._telemetry_cache[peer] = record
        return record

    def _parse_telemetry(
        self, peer: str, value: Any, expiration: float | None, now: float
    ) -> dict[str, float] | None:
        horizon = now + MAX_TELEMETRY_TTL_S + CLOCK_SKEW_S
        if expiration is not None and not (expiration <= horizon):
            self.stats.rejected_expiry += 1  # attacker-chosen DHT expiry
            return None
        try:
            if len(value) > 4096:
                raise ValueError("record too long")
            payload = json.loads(bytes(value))
            body = payload["body"].encode()
            if self.group_key is not None and not hmac.compare_digest(
                str(payload.get("hmac", "")), self._sign(body)
            ):
                self.stats.bad_signature += 1
                return None
            record = json.loads(body)
            availability = float(record["availability"])
            mem = float(record["mem_free_gb"])
            issued = float(record["issued"])
            expires = float(record["expires"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            self.stats.rejected_malformed += 1
            return None
        if record.get("peer") != peer:
            self.stats.rejected_malformed += 1
            return None
        if not (issued <= now + CLOCK_SKEW_S and expires - issued <= MAX_TELEMETRY_TTL_S):
            self.stats.rejected_expiry += 1
            return None
        if not (expires >= now):
            return None  # expired: normal, not an attack
        if not (0.0 <= availability <= 1.0) or not (mem >= 0 and math.isfinite(mem)):
            self.stats.rejected_malformed += 1
            return None
        return {"availability": availability, "mem_free_gb": mem, "expires": expires}

    # ----- requests (client side) ----------------------------------------------------
    def _request(self, op: str, to: str, cid: str = "", **extra: Any) -> bytes:
        """A signed (keyed group) request from this peer to ``to``."""
        req: dict[str, Any] = {
            "v": 1,
            "op": op,
            "cid": cid,
            "from": self.peer_id,
            "to": to,
            "ts": time.time(),
            "nonce": secrets.token_hex(16),
            **extra,
        }
        if self.group_key is not None:
            req["mac"] = hmac.new(self._request_key, _canonical(req), "sha256").hexdigest()
        return _canonical(req)

    def _call(self, peer: str, request: bytes, timeout: int | None = None) -> memoryview:
        """Send ``request`` to ``peer``; the response's payload or :class:`_RemoteError`."""
        try:
            client = self._node.get_client(peer)
            raw = client.call(SERVICE_METHOD, request).result(timeout or self.request_timeout_s)
        except Exception as exc:  # unreachable peer, timeout
            raise _RemoteError("unreachable", _first_line(exc)) from exc
        self._answered[peer] = time.monotonic()
        if not raw:
            raise _RemoteError("empty", "empty response")
        if raw[:1] == _OK:
            return memoryview(raw)[1:]
        if raw[:1] == _ERR and len(raw) <= MAX_HEAD_BYTES:
            try:
                err = json.loads(bytes(raw[1:]))
                raise _RemoteError(str(err["error"]), str(err.get("message", "")))
            except (ValueError, KeyError, TypeError):
                pass
        raise _RemoteError("malformed", "unreadable response frame")

    def _head(self, peer: str, cid: str) -> dict[str, Any]:
        """The size/chunk header of ``cid`` from ``peer`` (raises :class:`_RemoteError`,
        :class:`PayloadRejected`)."""
        if self.group_key is not None:
            raw = self._call(peer, self._request("head", peer, cid))
        else:  # the server confirms our identity by dialling us back: poll while it does
            request = self._request("head", peer, cid)
            nonce = json.loads(request)["nonce"]
            deadline = time.monotonic() + self.request_timeout_s
            with self._lock:
                self._pending[nonce] = (cid, peer, time.time() + 2 * REQUEST_WINDOW_S)
            try:
                delay = 0.01
                while True:
                    try:
                        raw = self._call(peer, request)
                        break
                    except _RemoteError as err:
                        if err.code != "pending" or time.monotonic() > deadline:
                            raise
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
            finally:
                with self._lock:
                    self._pending.pop(nonce, None)
        if len(raw) > MAX_HEAD_BYTES:
            raise PayloadRejected(f"header of {len(raw)} bytes from {peer} is too long")
        try:
            head = json.loads(bytes(raw))
            size, chunk = head["size"], head["chunk"]
            if not (_is_int(size) and size >= 0 and _is_int(chunk) and chunk >= 1):
                raise ValueError("size/chunk must be non-negative integers")
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadRejected(f"malformed header from {peer}: {exc}") from exc
        if size > self.max_bytes:
            raise PayloadRejected(
                f"{peer} announces {size} bytes for {cid}, over max_bytes={self.max_bytes}",
                "oversized",
            )
        return head

    # ----- serving -------------------------------------------------------------------
    def _serve(self, data: bytes) -> bytes:
        try:
            req = self._parse_request(data)
            op = req["op"]
            if op == "confirm":
                return self._serve_confirm(req)
            self._authorize(req)
            if op == "telemetry":
                if self._telemetry_payload is None:
                    raise _Refused("not_found", "no telemetry published yet")
                return _OK + self._telemetry_payload
            if op == "record":
                return self._serve_record(req)
            if op == "head":
                return self._serve_head(req)
            return self._serve_body(req)
        except _Refused as ref:
            counter = {
                "unauthorized": "rejected_unauthorized",
                "replayed": "rejected_replayed",
                "malformed": "rejected_malformed",
            }.get(ref.code)
            if counter is not None:
                with self._lock:
                    setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            return _ERR + _canonical({"error": ref.code, "message": str(ref)})
        except Exception as exc:  # never raise into Lattica (it would retry the call)
            return _ERR + _canonical({"error": "internal", "message": _first_line(exc)})

    def _parse_request(self, data: bytes) -> dict[str, Any]:
        if len(data) > MAX_REQUEST_BYTES:
            raise _Refused("malformed", f"request of {len(data)} bytes > {MAX_REQUEST_BYTES}")
        try:
            req = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused("malformed", f"request is not JSON: {exc}") from exc
        if not isinstance(req, dict) or req.get("v") != 1 or req.get("op") not in _OPS:
            raise _Refused("malformed", "request must be a v1 object with a known op")
        checks = {
            "from": lambda v: isinstance(v, str) and bool(_PEER_RE.match(v)),
            "to": lambda v: isinstance(v, str) and bool(_PEER_RE.match(v)),
            "nonce": lambda v: isinstance(v, str) and bool(_NONCE_RE.match(v)),
            "ts": lambda v: (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ),
            "cid": lambda v: isinstance(v, str) and (v == "" or bool(_CID_RE.match(v))),
        }
        for name, ok in checks.items():
            if not ok(req.get(name)):
                raise _Refused("malformed", f"request field {name!r} is missing or invalid")
        if req["op"] in ("head", "body", "confirm") and not req["cid"]:
            raise _Refused("malformed", f"op {req['op']!r} needs a cid")
        if req["op"] == "record":
            key = req.get("key")
            if not (isinstance(key, str) and 1 <= len(key) <= MAX_RECORD_KEY):
                raise _Refused("malformed", f"record request needs a key of 1-{MAX_RECORD_KEY}")
        if req["op"] == "body":
            off, length = req.get("off"), req.get("len")
            if not (_is_int(off) and _is_int(length) and off >= 0 and length >= 1):
                raise _Refused("malformed", "body request needs integer off >= 0 and len >= 1")
            if length > MAX_CHUNK_BYTES:
                raise _Refused("malformed", f"chunk of {length} bytes > {MAX_CHUNK_BYTES}")
        return req

    def _check_nonce(self, nonce: str, now: float) -> None:
        """Refuse a nonce seen before; remember it (caller holds the lock)."""
        if now - self._last_prune > 1.0:
            self._last_prune = now
            for nonce_seen in [n for n, exp in self._seen_nonces.items() if exp < now]:
                del self._seen_nonces[nonce_seen]
            for tok in [t for t, s in self._sessions.items() if s[2] < now]:
                del self._sessions[tok]
            for key in [k for k, v in self._verifications.items() if v["expires"] < now]:
                del self._verifications[key]
        if nonce in self._seen_nonces:
            raise _Refused("replayed", "request nonce was already used")
        if len(self._seen_nonces) >= _MAX_NONCES:
            raise _Refused("busy", "too many recent requests")
        self._seen_nonces[nonce] = now + 2 * REQUEST_WINDOW_S

    def _authorize(self, req: dict[str, Any]) -> None:
        sender = req["from"]
        if req["to"] != self.peer_id:
            raise _Refused("unauthorized", "request is addressed to another peer")
        key_admits = self.admit_key_holders and self.group_key is not None
        if sender not in self.members and not key_admits:
            raise _Refused("unauthorized", f"{sender} is not a member of this group")
        now = time.time()
        if self.group_key is not None:
            claimed = req.get("mac")
            body = _canonical({k: v for k, v in req.items() if k != "mac"})
            expected = hmac.new(self._request_key, body, "sha256").hexdigest()
            if not isinstance(claimed, str) or not hmac.compare_digest(claimed, expected):
                raise _Refused("unauthorized", "missing or wrong group-key HMAC")
            if abs(req["ts"] - now) > REQUEST_WINDOW_S:
                raise _Refused("replayed", "request timestamp outside the window")
            with self._lock:
                self._check_nonce(req["nonce"], now)
                if sender not in self.members:  # admit_key_holders: the key is the credential
                    self.members = self.members | {sender}  # a new set: readers iterate theirs
            return
        # allowlist only: the claimed member confirms by libp2p-authenticated call-back
        if req["op"] in ("telemetry", "record"):
            return  # public records (they are in the DHT in the clear anyway)
        if req["op"] == "body":
            with self._lock:
                session = self._sessions.get(str(req.get("tok", "")))
                if session is None or session[:2] != (sender, req["cid"]) or session[2] < now:
                    raise _Refused("unauthorized", "no valid session token for this body")
                self._sessions[req["tok"]] = (sender, req["cid"], now + _SESSION_TTL_S)
            return
        key = (sender, req["nonce"])
        with self._lock:
            state = self._verifications.get(key)
            if state is None:
                if abs(req["ts"] - now) > REQUEST_WINDOW_S:
                    raise _Refused("replayed", "request timestamp outside the window")
                self._check_nonce(req["nonce"], now)
                pending = sum(1 for v in self._verifications.values() if v["state"] == "pending")
                if pending >= _MAX_PENDING_VERIFICATIONS:
                    del self._seen_nonces[req["nonce"]]
                    raise _Refused("busy", "too many identity checks in flight")
                self._verifications[key] = {
                    "state": "pending",
                    "cid": req["cid"],
                    "expires": now + 2 * REQUEST_WINDOW_S,
                }
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(2, thread_name_prefix="sedma-p2p-verify")
                self._executor.submit(self._verify_identity, sender, req["nonce"], req["cid"])
                raise _Refused("pending", "confirming the requester's identity; retry")
            if state["cid"] != req["cid"]:
                raise _Refused("malformed", "nonce reused for another cid")
            if state["state"] == "pending":
                raise _Refused("pending", "confirming the requester's identity; retry")
            del self._verifications[key]
            if state["state"] != "ok":
                raise _Refused("unauthorized", f"{sender} did not confirm this request")
            token = secrets.token_hex(16)
            self._sessions[token] = (sender, req["cid"], now + _SESSION_TTL_S)
            req["_token"] = token

    def _verify_identity(self, sender: str, nonce: str, cid: str) -> None:
        """Dial ``sender`` (libp2p authenticates its peer id) and ask it to confirm."""
        ok = False
        if not self._closed:
            try:
                raw = self._call(
                    sender, self._request("confirm", sender, cid, ask=nonce), timeout=5
                )
                ok = bytes(raw) == b"confirmed"
            except _RemoteError:
                ok = False
        with self._lock:
            state = self._verifications.get((sender, nonce))
            if state is not None:
                state["state"] = "ok" if ok else "failed"

    def _serve_confirm(self, req: dict[str, Any]) -> bytes:
        nonce = req.get("ask")
        with self._lock:
            pending = self._pending.get(nonce) if isinstance(nonce, str) else None
        if pending is None or pending[:2] != (req["cid"], req["from"]) or pending[2] < time.time():
            raise _Refused("denied", "no such pending request")
        return _OK + b"confirmed"

    def _serve_record(self, req: dict[str, Any]) -> bytes:
        """The record this peer stored under the requested key (its own subkey only)."""
        with self._lock:
            entry = self._records.get(req["key"])
        if entry is None or entry[1] < time.time():
            raise _Refused("not_found", "no record of this peer under that key")
        value, expiry = entry
        return _OK + _canonical({"value": base64.b64encode(value).decode(), "expires": expiry})

    def _serve_head(self, req: dict[str, Any]) -> bytes:
        data = self._blocks.get(req["cid"])
        if data is None:
            raise _Refused("not_found", f"{req['cid']} is not published here")
        head: dict[str, Any] = {"size": len(data), "chunk": self.chunk_bytes}
        if "_token" in req:
            head["token"] = req["_token"]
        manifest = self._manifests.get(req["cid"])
        if manifest is not None:
            head["bitswap"] = manifest
        return _OK + _canonical(head)

    def _serve_body(self, req: dict[str, Any]) -> bytes:
        data = self._blocks.get(req["cid"])
        if data is None:
            raise _Refused("not_found", f"{req['cid']} is not published here")
        off, length = req["off"], req["len"]
        if off + length > len(data):
            raise _Refused("malformed", f"range {off}+{length} past the end ({len(data)})")
        with self._lock:
            self.stats.served_bytes += length
        return _OK + data[off : off + length]

    # ----- finding and fetching ------------------------------------------------------
    def providers(self, cid: str) -> list[str]:
        """Member peers that advertise ``cid`` in the DHT (unknown ones dropped, counted);
        [] when the lookup fails or does not return within ``request_timeout_s``."""
        found = self._bounded(self._node.get_providers, cid) or []
        found = [p for p in found if p != self.peer_id]
        unknown = [p for p in found if p not in self.members]
        self.stats.unknown_peer += len(unknown)
        return [p for p in found if p in self.members]

    def answered_since(self, peer: str, since: float) -> bool:
        """Whether ``peer`` answered a request of this peer (with data or a refusal: it is
        alive and reachable) at or after ``since``, a :func:`time.monotonic` value."""
        return self._answered.get(peer, -math.inf) >= since

    def rtt_ms(self, peer: str) -> float:
        """Lattica's measured round-trip time to ``peer`` in ms (inf when unknown)."""
        try:
            rtt_s = float(self._node.get_peer_rtt(peer))
        except RuntimeError:
            return math.inf
        return rtt_s * 1e3 if rtt_s > 0 else math.inf

    def peer_features(self, peers: Iterable[str]) -> dict[str, PeerFeatures]:
        """Eq. 7's inputs for each of ``peers``: availability and free memory from their DHT
        telemetry (0 without any), latency from Lattica's RTT (1e6 ms when unmeasured)."""
        peers = list(peers)
        telemetry = self.peer_telemetry(peers)
        out = {}
        for p in peers:
            t = telemetry.get(p, {"availability": 0.0, "mem_free_gb": 0.0})
            rtt = self.rtt_ms(p)
            out[p] = PeerFeatures(
                t["availability"], rtt if math.isfinite(rtt) else 1e6, t["mem_free_gb"]
            )
        return out

    def rank_providers(self, cid: str) -> list[str]:
        """The member providers of ``cid``, best Eq. 7 score first (the top ``k``)."""
        candidates = self.peer_features(self.providers(cid))
        self._last_candidates = candidates
        return self.selector.select(candidates, self.k)

    def fetch(
        self,
        cid: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        via: str = "rpc",
        ask: Iterable[str] = (),
    ) -> torch.Tensor:
        """Fetch and validate the tensor with content id ``cid`` (cache first).

        ``ask``: members to ask directly when no provider found in the DHT delivers, e.g.
        the peer that signed a record naming ``cid`` (a lookup can come back empty while
        the provider is alive); ranked by Eq. 7 like providers, non-members dropped
        (counted in ``unknown_peer``), every check on the payload still applied.

        Raises :class:`LookupError` when no member provider delivered a valid payload.
        """
        if via not in ("rpc", "bitswap"):
            raise ValueError(f"via must be 'rpc' or 'bitswap', got {via!r}")
        if via == "bitswap" and self._bitswap_off_reason is not None:
            raise RuntimeError(f"fetch(via='bitswap') is not available: {self._bitswap_off_reason}")
        if cid in self._blocks:
            return decode_tensor(
                self._blocks[cid], max_bytes=self.max_bytes, shape=shape, dtype=dtype
            )
        if self.cache is not None:
            cached = self.cache.get(cid)
            if cached is not None:
                self.stats.cache_hits += 1
                return decode_tensor(cached, max_bytes=self.max_bytes, shape=shape, dtype=dtype)
        chosen = self._answering_first(self.rank_providers(cid))
        result = self._fetch_first(chosen, cid, shape, dtype, via)
        if result is None:
            result = self._fetch_asked(ask, chosen, cid, shape, dtype, via)
        if result is None:
            raise LookupError(f"no member provider delivered a valid payload for {cid}")
        data, tensor = result
        if self.cache is not None:
            self.cache.put(cid, data)
        self.stats.fetched += 1
        return tensor

    def _fetch_first(self, peers, cid, shape, dtype, via) -> tuple[bytes, torch.Tensor] | None:
        """The payload from the first of ``peers`` that delivers a valid one (None: none)."""
        for peer in peers:
            result = self._fetch_from(peer, cid, shape, dtype, via)
            if result is not None:
                return result
        return None

    def _fetch_asked(self, ask, tried, cid, shape, dtype, via) -> tuple[bytes, torch.Tensor] | None:
        """:meth:`fetch`'s second source: the members of ``ask`` not ``tried`` yet, ranked
        by Eq. 7 (their outcomes are recorded like any provider's)."""
        extra = [p for p in dict.fromkeys(ask) if p != self.peer_id and p not in tried]
        self.stats.unknown_peer += sum(1 for p in extra if p not in self.members)
        extra = [p for p in extra if p in self.members]
        if not extra:
            return None
        self.stats.provider_fallbacks += 1
        self._last_candidates = self.peer_features(extra)
        ranked = self.selector.select(self._last_candidates, self.k)
        return self._fetch_first(self._answering_first(ranked), cid, shape, dtype, via)

    def _answering_first(self, ranked: list[str]) -> list[str]:
        """``ranked`` with the providers that recently timed out or could not be dialled
        moved to the end (in their order): a killed peer's DHT records outlive it, and
        without this every fetch would first wait ``request_timeout_s`` for it. Each
        unanswered request backs the peer off for ``UNREACHABLE_BACKOFF_S``; a peer that
        answers again is forgiven at once."""
        now = time.monotonic()
        down = {p for p in ranked if self._unreachable_until.get(p, 0.0) > now}
        return [p for p in ranked if p not in down] + [p for p in ranked if p in down]

    def _record(self, peer: str, ok: bool, latency_ms: float, nbytes: int) -> None:
        terms = normalised_terms(self._last_candidates)
        if peer in terms:
            self.selector.record_outcome(peer, terms[peer], ok, latency_ms, nbytes)
            self.selector.flush()
        else:
            self.selector.memory.record_transfer(peer, ok, latency_ms, nbytes)

    def _reject(self, exc: PayloadRejected) -> None:
        self.stats.rejected_payloads += 1
        name = f"rejected_{exc.reason}"
        setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _fetch_from(self, peer, cid, shape, dtype, via) -> tuple[bytes, torch.Tensor] | None:
        start = time.perf_counter()
        nbytes = 0
        try:
            head = self._head(peer, cid)
            nbytes = head["size"]
            if via == "bitswap":
                self._node.configure_bitswap_peer_selection(
                    top_n=max(1, len(self._last_candidates)),
                    enabled=True,
                    min_peers=1,
                    enable_randomness=False,
                )
                buf = self._download_bitswap(cid, head)
            else:
                buf = self._download_rpc(peer, cid, head)
            if content_id(buf) != cid:
                raise PayloadRejected(f"payload bytes do not match the requested CID {cid}", "cid")
            data = bytes(buf)
            del buf
            tensor = decode_tensor(data, max_bytes=self.max_bytes, shape=shape, dtype=dtype)
        except _RemoteError as err:
            self.stats.failed_requests += 1
            if err.code == "unreachable":
                self._unreachable_until[peer] = time.monotonic() + UNREACHABLE_BACKOFF_S
            self._record(peer, False, (time.perf_counter() - start) * 1e3, 0)
            return None
        except PayloadRejected as exc:
            self._reject(exc)
            self._record(peer, False, (time.perf_counter() - start) * 1e3, 0)
            return None
        self._unreachable_until.pop(peer, None)
        self._record(peer, True, (time.perf_counter() - start) * 1e3, nbytes)
        return data, tensor

    def _download_rpc(self, peer: str, cid: str, head: dict[str, Any]) -> bytearray:
        size = head["size"]
        chunk = min(self.chunk_bytes, head["chunk"], MAX_CHUNK_BYTES)
        extra = {}
        if self.group_key is None:
            token = head.get("token")
            if not isinstance(token, str):
                raise PayloadRejected(f"header from {peer} has no session token")
            extra["tok"] = token
        buf = bytearray(size)
        off = 0
        while off < size:
            length = min(chunk, size - off)
            part = self._call(peer, self._request("body", peer, cid, off=off, len=length, **extra))
            if len(part) > length:
                raise PayloadRejected(
                    f"{peer} sent {len(part)} bytes for a {length}-byte chunk", "oversized"
                )
            if len(part) < length:
                raise PayloadRejected(f"{peer} sent a truncated chunk ({len(part)} < {length})")
            buf[off : off + length] = part
            del part
            off += length
        return buf

    def _download_bitswap(self, cid: str, head: dict[str, Any]) -> bytearray:
        size = head["size"]
        manifest = head.get("bitswap")
        try:
            chunk, blocks = manifest["chunk"], manifest["blocks"]
            if not (_is_int(chunk) and 1 <= chunk <= MAX_CHUNK_BYTES):
                raise ValueError(f"chunk {chunk!r} not in [1, {MAX_CHUNK_BYTES}]")
            count = max(1, math.ceil(size / chunk))
            if not isinstance(blocks, list) or len(blocks) != count:
                raise ValueError(f"expected {count} block CIDs")
            if not all(isinstance(b, str) and _CID_RE.match(b) for b in blocks):
                raise ValueError("invalid block CID")
        except (TypeError, KeyError, ValueError) as exc:
            raise PayloadRejected(f"malformed BitSwap manifest for {cid}: {exc}") from exc
        aead = AESGCM(self._block_key)
        buf = bytearray(size)
        for i, block_cid in enumerate(blocks):
            expected = min(chunk, size - i * chunk)
            try:
                _, block = self._node.get_block(block_cid, timeout_secs=self.request_timeout_s)
            except RuntimeError as exc:
                raise _RemoteError("unreachable", _first_line(exc)) from exc
            if len(block) > len(_BLOCK_MAGIC) + _GCM_NONCE + expected + _GCM_TAG:
                raise PayloadRejected(f"BitSwap block {i} of {cid} is too long", "oversized")
            if content_id(block) != block_cid:
                raise PayloadRejected(f"BitSwap block {i} does not match its CID", "cid")
            view = memoryview(block)
            if bytes(view[:4]) != _BLOCK_MAGIC:
                raise PayloadRejected(f"BitSwap block {i} of {cid} is not a sealed block")
            try:
                plain = aead.decrypt(
                    view[4 : 4 + _GCM_NONCE],
                    view[4 + _GCM_NONCE :],
                    self._block_aad(cid, chunk, i, count),
                )
            except InvalidTag as exc:
                raise PayloadRejected(f"BitSwap block {i} of {cid} does not decrypt") from exc
            del view, block
            if len(plain) != expected:
                raise PayloadRejected(f"BitSwap block {i} holds {len(plain)} != {expected} bytes")
            buf[i * chunk : i * chunk + expected] = plain
            del plain
        return buf

    def close(self) -> None:
        """Stop providing and shut the node down."""
        self._closed = True
        for cid in list(self._blocks):
            with contextlib.suppress(RuntimeError):
                self._node.stop_providing(cid)
        for manifest in self._manifests.values():
            for block_cid in manifest["blocks"]:
                with contextlib.suppress(RuntimeError):
                    self._node.remove_block(block_cid)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._node.close()
