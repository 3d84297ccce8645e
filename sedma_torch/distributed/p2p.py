"""Content-addressed tensor exchange over Lattica (libp2p: Kademlia DHT, BitSwap, RTT).

The SPEC's stage-2 algorithm: content id of a tensor -> DHT lookup of its providers ->
score the providers (Eq. 7, with the availability and free memory each peer publishes in
the DHT with an expiry, and Lattica's measured RTT) -> fetch from the top ``k``.

* Serialisation: a tensor travels as a safetensors file (a JSON header and raw bytes;
  nothing is ever unpickled). Lattica's own ``Lattica.store``/``get`` and its RPC handler
  wrappers pickle values, so this module only uses its raw-bytes calls
  (``store_with_subkey``/``get_with_subkey``, ``put_block``/``get_block``, and an RPC
  service with its own raw ``_handle_fetch``).
* Content id: the CIDv1 (raw codec, sha2-256, base32) of the payload bytes, the same id
  Lattica's ``put_block`` returns (checked on publish).
* Validation on receipt, before anything is decoded: the payload size (``max_bytes``), the
  CID of the bytes (must equal the requested one), then the safetensors header (exactly
  one tensor, an allowed dtype, the expected shape/dtype when given).
* Membership: a training group is the set of libp2p peer ids in ``members`` (libp2p
  authenticates peer ids in its handshake). Providers and telemetry records from other
  peers are dropped and counted, never used. With a ``group_key``, telemetry records
  also carry an HMAC-SHA256 tag, so a non-member cannot publish under a member's id.
* Transfer: ``via="rpc"`` asks the chosen providers themselves, best score first (a raw
  request/response stream to that peer); ``via="bitswap"`` asks BitSwap
  (``get_block``) after limiting its peer selection to ``k`` peers, and rejects the block
  when the peer that served it is not a member (Lattica's Python API cannot pin a BitSwap
  request to given peers).
* A :class:`~sedma_torch.distributed.UtilityCache` (Eq. 10) sits in front of fetches.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .cache import UtilityCache
from .selection import PeerFeatures, PeerSelector, normalised_terms
from .telemetry import measure_local

__all__ = [
    "P2PStats",
    "PayloadRejected",
    "TensorPeer",
    "content_id",
    "decode_tensor",
    "encode_tensor",
]

TELEMETRY_KEY = "sedma/telemetry/v1"
_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw codec, sha2-256, 32 bytes
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
    """A payload from a peer failed validation (size, CID, format, dtype, shape)."""


def content_id(data: bytes) -> str:
    """CIDv1 (raw, sha2-256) of ``data`` in base32, e.g. ``bafkrei...``."""
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_CID_PREFIX + digest).decode().lower().rstrip("=")


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
        raise PayloadRejected(f"payload of {len(data)} bytes exceeds max_bytes={max_bytes}")
    if expected_cid is not None and content_id(bytes(data)) != expected_cid:
        raise PayloadRejected(f"payload bytes do not match the requested CID {expected_cid}")
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
    """Counters of one :class:`TensorPeer`."""

    published: int = 0
    fetched: int = 0
    cache_hits: int = 0
    unknown_peer: int = 0
    """Providers or telemetry records from peers outside ``members`` (dropped)."""
    bad_signature: int = 0
    """Telemetry records whose HMAC did not verify (dropped)."""
    rejected_payloads: int = 0
    """Payloads that failed validation (size, CID, format, dtype, shape)."""
    failed_requests: int = 0
    """Requests to a provider that errored or timed out."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TensorPeer:
    """One member of a training group on a Lattica network.

    Args:
        host: listen address (``127.0.0.1`` in tests).
        port: TCP port (0 picks a free one).
        bootstrap: multiaddrs (``/ip4/.../tcp/.../p2p/<id>``) of peers to join through.
        members: peer ids of the training group; this peer is always a member.
        group_key: shared secret that signs telemetry records (None: allowlist only).
        k: providers to try per fetch (top-k by Eq. 7).
        max_bytes: largest payload accepted from a peer (bytes).
        cache_mb: capacity of the utility cache in MB (0 disables it).
        memory: long-term memory for transfer outcomes and cache statistics (duck-typed).
        telemetry_ttl_s: expiry of the published telemetry records (s).
        request_timeout_s: timeout of one request to a provider (whole seconds, >= 1).
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
        cache_mb: float = 64.0,
        memory: Any | None = None,
        telemetry_ttl_s: float = 60.0,
        request_timeout_s: int = 10,
    ) -> None:
        from lattica import ConnectionHandler, Lattica, rpc_method

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if group_key is not None and not isinstance(group_key, bytes):
            raise TypeError(f"group_key must be bytes or None, got {type(group_key).__name__}")
        if isinstance(request_timeout_s, bool) or not isinstance(request_timeout_s, int):
            raise ValueError(f"request_timeout_s must be whole seconds, got {request_timeout_s!r}")
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
        self._node = builder.build()
        self.peer_id: str = self._node.peer_id()
        self.address = f"/ip4/{host}/tcp/{port}/p2p/{self.peer_id}"
        self.members: set[str] = {self.peer_id, *members}
        self.group_key = group_key
        self.k = k
        self.max_bytes = max_bytes
        self.telemetry_ttl_s = float(telemetry_ttl_s)
        self.request_timeout_s = max(int(request_timeout_s), 1)
        self.selector = PeerSelector(memory=memory, name=f"p2p/{self.peer_id}")
        self.cache = UtilityCache(cache_mb, memory=self.selector.memory) if cache_mb > 0 else None
        self.stats = P2PStats()
        self._last_candidates: dict[str, PeerFeatures] = {}
        self._blocks: dict[str, bytes] = {}
        blocks = self._blocks

        class SedmaTensorService(ConnectionHandler):
            """Serves this peer's published payloads by CID (raw bytes in and out)."""

            @rpc_method
            def fetch(self, request: bytes) -> bytes:
                return blocks.get(bytes(request).decode("ascii", "replace"), b"")

            def _handle_fetch(self, data: bytes) -> bytes:
                return self.fetch(data)

        self._service = SedmaTensorService(self._node)

    # ----- membership ----------------------------------------------------------------
    def add_members(self, peer_ids: Iterable[str]) -> None:
        """Admit ``peer_ids`` to the training group."""
        self.members.update(peer_ids)

    # ----- publishing ----------------------------------------------------------------
    def publish(self, tensor: torch.Tensor) -> str:
        """Store ``tensor`` under the CID of its safetensors bytes and advertise it in the
        DHT; returns the CID."""
        data = encode_tensor(tensor)
        if len(data) > self.max_bytes:
            raise ValueError(f"tensor payload of {len(data)} bytes exceeds max_bytes")
        cid = content_id(data)
        lattica_cid = self._node.put_block(data)
        if lattica_cid != cid:
            raise RuntimeError(f"Lattica returned CID {lattica_cid}, expected {cid}")
        self._blocks[cid] = data
        self._node.start_providing(cid)
        self.stats.published += 1
        return cid

    def _sign(self, body: bytes) -> str:
        assert self.group_key is not None
        return hmac.new(self.group_key, body, hashlib.sha256).hexdigest()

    def publish_telemetry(self) -> dict[str, Any]:
        """Publish this peer's availability and free memory in the DHT (with an expiry)."""
        availability, host_free, device_free = measure_local()
        expires = time.time() + self.telemetry_ttl_s
        record = {
            "peer": self.peer_id,
            "availability": availability,
            "mem_free_gb": device_free if device_free is not None else host_free,
            "expires": expires,
        }
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        payload = {"body": body.decode()}
        if self.group_key is not None:
            payload["hmac"] = self._sign(body)
        self._node._lattica_instance.store_with_subkey(
            TELEMETRY_KEY, json.dumps(payload).encode(), expires, self.peer_id
        )
        return record

    def peer_telemetry(self) -> dict[str, dict[str, float]]:
        """Valid, unexpired telemetry of member peers from the DHT (others dropped)."""
        raw = self._node._lattica_instance.get_with_subkey(TELEMETRY_KEY)
        out: dict[str, dict[str, float]] = {}
        if not isinstance(raw, dict):
            return out
        now = time.time()
        for subkey, entry in raw.items():
            if subkey not in self.members:
                self.stats.unknown_peer += 1
                continue
            record = self._parse_telemetry(subkey, entry, now)
            if record is not None:
                out[subkey] = record
        return out

    def _parse_telemetry(self, subkey: str, entry: Any, now: float) -> dict[str, float] | None:
        try:
            value, _ = entry
            if len(value) > 4096:
                return None
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
            expires = float(record["expires"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        if record.get("peer") != subkey or expires < now:
            return None
        if not (0.0 <= availability <= 1.0) or not (mem >= 0 and math.isfinite(mem)):
            return None
        return {"availability": availability, "mem_free_gb": mem, "expires": expires}

    # ----- finding and fetching ------------------------------------------------------
    def providers(self, cid: str) -> list[str]:
        """Member peers that advertise ``cid`` in the DHT (unknown ones dropped, counted)."""
        found = [p for p in self._node.get_providers(cid) if p != self.peer_id]
        unknown = [p for p in found if p not in self.members]
        self.stats.unknown_peer += len(unknown)
        return [p for p in found if p in self.members]

    def rtt_ms(self, peer: str) -> float:
        """Lattica's measured round-trip time to ``peer`` in ms (inf when unknown)."""
        try:
            rtt_s = float(self._node.get_peer_rtt(peer))
        except RuntimeError:
            return math.inf
        return rtt_s * 1e3 if rtt_s > 0 else math.inf

    def rank_providers(self, cid: str) -> list[str]:
        """The member providers of ``cid``, best Eq. 7 score first (the top ``k``)."""
        providers = self.providers(cid)
        telemetry = self.peer_telemetry()
        candidates = {}
        for p in providers:
            t = telemetry.get(p, {"availability": 0.0, "mem_free_gb": 0.0})
            rtt = self.rtt_ms(p)
            candidates[p] = PeerFeatures(
                t["availability"], rtt if math.isfinite(rtt) else 1e6, t["mem_free_gb"]
            )
        self._last_candidates = candidates
        return self.selector.select(candidates, self.k)

    def fetch(
        self,
        cid: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        via: str = "rpc",
    ) -> torch.Tensor:
        """Fetch and validate the tensor with content id ``cid`` (cache first).

        Raises :class:`LookupError` when no member provider delivered a valid payload.
        """
        if via not in ("rpc", "bitswap"):
            raise ValueError(f"via must be 'rpc' or 'bitswap', got {via!r}")
        if cid in self._blocks:
            return decode_tensor(
                self._blocks[cid], max_bytes=self.max_bytes, shape=shape, dtype=dtype
            )
        if self.cache is not None:
            cached = self.cache.get(cid)
            if cached is not None:
                self.stats.cache_hits += 1
                return decode_tensor(cached, max_bytes=self.max_bytes, shape=shape, dtype=dtype)
        chosen = self.rank_providers(cid)
        if via == "bitswap":
            data = self._fetch_bitswap(cid, chosen)
        else:
            data = None
            for peer in chosen:
                data = self._fetch_rpc(cid, peer, shape, dtype)
                if data is not None:
                    break
        if data is None:
            raise LookupError(f"no member provider delivered a valid payload for {cid}")
        tensor = decode_tensor(
            data, max_bytes=self.max_bytes, expected_cid=cid, shape=shape, dtype=dtype
        )
        if self.cache is not None:
            self.cache.put(cid, data)
        self.stats.fetched += 1
        return tensor

    def _record(self, peer: str, ok: bool, latency_ms: float, nbytes: int) -> None:
        terms = normalised_terms(self._last_candidates)
        if peer in terms:
            self.selector.record_outcome(peer, terms[peer], ok, latency_ms, nbytes)
            self.selector.flush()
        else:
            self.selector.memory.record_transfer(peer, ok, latency_ms, nbytes)

    def _validate(self, cid, data, shape, dtype) -> bool:
        try:
            decode_tensor(
                data, max_bytes=self.max_bytes, expected_cid=cid, shape=shape, dtype=dtype
            )
        except PayloadRejected:
            self.stats.rejected_payloads += 1
            return False
        return True

    def _fetch_rpc(self, cid, peer, shape, dtype) -> bytes | None:
        start = time.perf_counter()
        try:
            client = self._node.get_client(peer)
            data = client.call("SedmaTensorService.fetch", cid.encode()).result(
                self.request_timeout_s
            )
        except Exception:  # unreachable peer, timeout, remote error
            self.stats.failed_requests += 1
            self._record(peer, False, (time.perf_counter() - start) * 1e3, 0)
            return None
        data = bytes(data) if data is not None else b""
        ok = bool(data) and self._validate(cid, data, shape, dtype)
        self._record(peer, ok, (time.perf_counter() - start) * 1e3, len(data))
        return data if ok else None

    def _fetch_bitswap(self, cid: str, chosen: list[str]) -> bytes | None:
        if not chosen:
            return None
        self._node.configure_bitswap_peer_selection(
            top_n=len(chosen), enabled=True, min_peers=1, enable_randomness=False
        )
        start = time.perf_counter()
        try:
            provider, data = self._node.get_block(cid, timeout_secs=self.request_timeout_s)
        except RuntimeError:
            self.stats.failed_requests += 1
            return None
        latency_ms = (time.perf_counter() - start) * 1e3
        if provider is not None and provider not in self.members:
            self.stats.unknown_peer += 1
            return None
        data = bytes(data)
        ok = self._validate(cid, data, None, None)
        self._record(provider or "bitswap", ok, latency_ms, len(data))
        return data if ok else None

    def close(self) -> None:
        """Stop providing and shut the node down."""
        for cid in list(self._blocks):
            with contextlib.suppress(RuntimeError):
                self._node.stop_providing(cid)
        self._node.close()
