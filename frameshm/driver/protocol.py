"""SBE codec of the driver's control plane (docs/driver-protocol.md).

One message per SOCK_SEQPACKET packet, at most :data:`MAX_MESSAGE` bytes, little-endian
SBE: an 8-byte message header (blockLength, templateId, schemaId, version), the fixed
block, then groups (blockLength u16 + numInGroup u16, entries), then var data (u32 length +
ASCII bytes). Driver messages use schema 901 version 1 (SHM Driver Model Spec v1.0,
Appendix A); ShmPoolAnnounce is the wire spec's schema 900 template 1.

:func:`decode` never trusts its input: anything short, out of bounds, of an unknown
schema/version/template or not ASCII raises :class:`DecodeError` carrying the response
code the driver answers with and, when it could be read, the request's correlationId.
Blocks longer than this version's are accepted (the extra bytes are skipped: forward
compatibility); shorter ones are not.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from ..errors import FrameshmError, InvalidArgument

MAX_MESSAGE = 4096
DRIVER_SCHEMA_ID = 901
DRIVER_SCHEMA_VERSION = 1
ANNOUNCE_SCHEMA_ID = 900
ANNOUNCE_SCHEMA_VERSION = 1

U8_NULL = 0xFF
U16_NULL = 0xFFFF
U32_NULL = 0xFFFFFFFF
U64_NULL = 0xFFFFFFFFFFFFFFFF


class Code(enum.IntEnum):
    OK = 0
    UNSUPPORTED = 1
    INVALID_PARAMS = 2
    REJECTED = 3
    INTERNAL_ERROR = 4


class Role(enum.IntEnum):
    PRODUCER = 1
    CONSUMER = 2


class PublishMode(enum.IntEnum):
    REQUIRE_EXISTING = 1
    EXISTING_OR_CREATE = 2
    UNKNOWN = 255  # the null value: treated as EXISTING_OR_CREATE


class Bool(enum.IntEnum):
    FALSE = 0
    TRUE = 1
    UNKNOWN = 255


class RevokeReason(enum.IntEnum):
    DETACHED = 1
    EXPIRED = 2
    REVOKED = 3


class ShutdownReason(enum.IntEnum):
    NORMAL = 0
    ADMIN = 1
    ERROR = 2


class ClockDomain(enum.IntEnum):
    MONOTONIC = 1
    REALTIME_SYNCED = 2


# template ids
T_ATTACH_REQUEST = 1
T_ATTACH_RESPONSE = 2
T_DETACH_REQUEST = 3
T_DETACH_RESPONSE = 4
T_KEEPALIVE = 5
T_SHUTDOWN = 6
T_REVOKED = 7
T_POOL_ANNOUNCE = 1  # schema 900
# frameshm's extensions (not in the SHM Driver Model Spec; docs/driver-protocol.md): under
# the sealed transport consumers map the control region read-only and ask the driver to
# write their consumer-table entry and the stream's control bytes. Template ids far above
# the spec's keep clear of its future ones; a driver without them answers UNSUPPORTED.
T_CONSUMER_REGISTER = 101
T_SET_CONTROL = 102
T_CONTROL_RESPONSE = 103

HEADER = struct.Struct("<HHHH")
GROUP = struct.Struct("<HH")
VARLEN = struct.Struct("<I")
POOL_ENTRY = struct.Struct("<HII")  # poolId, poolNslots, strideBytes

ATTACH_REQUEST = struct.Struct("<qIIBIBBB")  # 24
ATTACH_RESPONSE = struct.Struct("<qiQQIQIIHB")  # 51
DETACH_REQUEST = struct.Struct("<qQIIB")  # 25
DETACH_RESPONSE = struct.Struct("<qi")  # 12
KEEPALIVE = struct.Struct("<QIIBQ")  # 25
SHUTDOWN = struct.Struct("<QB")  # 9
REVOKED = struct.Struct("<QQIIBB")  # 26
POOL_ANNOUNCE = struct.Struct("<IIQQBIIH")  # 35
CONSUMER_REGISTER = struct.Struct("<qQIIII")  # 32: corr, lease, stream, client, flags, maxRateHz
SET_CONTROL = struct.Struct("<qQIBB")  # 22: corr, lease, stream, index, value
CONTROL_RESPONSE = struct.Struct("<qii")  # 16: corr, code, value
# ShmConsumerRegister.flags (the consumer table's CONS_FLAG_*)
CONSUMER_FLAG_PROCESS_ALL = 1
CONSUMER_FLAG_NO_QUEUE = 2

assert (ATTACH_REQUEST.size, ATTACH_RESPONSE.size, DETACH_REQUEST.size, DETACH_RESPONSE.size) == (24, 51, 25, 12)
assert (KEEPALIVE.size, SHUTDOWN.size, REVOKED.size, POOL_ANNOUNCE.size, POOL_ENTRY.size) == (25, 9, 26, 35, 10)


class DecodeError(FrameshmError, ValueError):
    """A message that cannot be accepted (a ValueError, like other decoders'). `code` is
    what the driver answers with; `correlation_id`/`template_id` are set when they could be
    read from the packet."""

    def __init__(self, code: Code, message: str, correlation_id: Optional[int] = None, template_id: Optional[int] = None):
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.correlation_id = correlation_id
        self.template_id = template_id

    def __reduce__(self):
        # args holds only the message; rebuild from every field (pickling across processes)
        return (type(self), (self.code, self.message, self.correlation_id, self.template_id))


# ---- messages ----------------------------------------------------------------------


@dataclass
class PoolInfo:
    pool_id: int
    nslots: int
    stride_bytes: int
    uri: str


@dataclass
class AttachRequest:
    correlation_id: int
    stream_id: int
    client_id: int
    role: int
    expected_layout_version: int = 0
    max_dims: int = 0
    publish_mode: int = PublishMode.UNKNOWN
    require_hugepages: int = Bool.UNKNOWN


@dataclass
class AttachResponse:
    correlation_id: int
    code: int
    lease_id: int = U64_NULL
    lease_expiry_ns: int = U64_NULL
    stream_id: int = U32_NULL
    epoch: int = U64_NULL
    layout_version: int = U32_NULL
    header_nslots: int = U32_NULL
    header_slot_bytes: int = U16_NULL
    max_dims: int = U8_NULL
    pools: List[PoolInfo] = field(default_factory=list)
    header_uri: str = ""
    error_message: str = ""


@dataclass
class DetachRequest:
    correlation_id: int
    lease_id: int
    stream_id: int
    client_id: int
    role: int


@dataclass
class DetachResponse:
    correlation_id: int
    code: int
    error_message: str = ""


@dataclass
class LeaseKeepalive:
    lease_id: int
    stream_id: int
    client_id: int
    role: int
    client_timestamp_ns: int = 0


@dataclass
class DriverShutdown:
    timestamp_ns: int
    reason: int = ShutdownReason.NORMAL
    error_message: str = ""


@dataclass
class LeaseRevoked:
    timestamp_ns: int
    lease_id: int
    stream_id: int
    client_id: int
    role: int
    reason: int
    error_message: str = ""


@dataclass
class PoolAnnounce:
    stream_id: int
    producer_id: int
    epoch: int
    announce_timestamp_ns: int
    layout_version: int
    header_nslots: int
    header_slot_bytes: int
    pools: List[PoolInfo] = field(default_factory=list)
    header_uri: str = ""
    clock_domain: int = ClockDomain.MONOTONIC


@dataclass
class ConsumerRegister:
    correlation_id: int
    lease_id: int
    stream_id: int
    client_id: int
    flags: int = 0
    max_rate_hz: int = 0
    consumer_name: str = ""
    queue_name: str = ""


@dataclass
class SetControl:
    correlation_id: int
    lease_id: int
    stream_id: int
    index: int
    value: int


@dataclass
class ControlResponse:
    correlation_id: int
    code: int
    value: int = 0  # ShmConsumerRegister: the entry index; on refusal, frameshm's error code
    error_message: str = ""


Message = Union[
    AttachRequest, AttachResponse, DetachRequest, DetachResponse, LeaseKeepalive, DriverShutdown, LeaseRevoked,
    PoolAnnounce, ConsumerRegister, SetControl, ControlResponse,
]

# ---- encoding ----------------------------------------------------------------------


def _ascii(s: str, what: str, limit: int = MAX_MESSAGE) -> bytes:
    b = s.encode("ascii", "replace")
    if b"\x00" in b:
        b = b.replace(b"\x00", b"?")
    return b[:limit]


def _var(s: str, what: str = "text") -> bytes:
    b = _ascii(s, what)
    return VARLEN.pack(len(b)) + b


def _pools(pools: List[PoolInfo]) -> bytes:
    out = [GROUP.pack(POOL_ENTRY.size, len(pools))]
    for p in pools:
        out.append(POOL_ENTRY.pack(p.pool_id, p.nslots, p.stride_bytes))
        out.append(_var(p.uri, "regionUri"))
    return b"".join(out)


def _hdr(block: struct.Struct, tid: int, schema: int = DRIVER_SCHEMA_ID) -> bytes:
    version = DRIVER_SCHEMA_VERSION if schema == DRIVER_SCHEMA_ID else ANNOUNCE_SCHEMA_VERSION
    return HEADER.pack(block.size, tid, schema, version)


def _error_text(s: str) -> str:
    """Error messages are truncated so that every response fits in one packet."""
    return s if len(s) <= 1024 else s[:1021] + "..."


def encode(msg: Message) -> bytes:
    """One packet for `msg` (raises ValueError if it would exceed MAX_MESSAGE)."""
    if isinstance(msg, AttachRequest):
        out = _hdr(ATTACH_REQUEST, T_ATTACH_REQUEST) + ATTACH_REQUEST.pack(
            msg.correlation_id, msg.stream_id, msg.client_id, msg.role, msg.expected_layout_version,
            msg.max_dims, msg.publish_mode, msg.require_hugepages,
        )
    elif isinstance(msg, AttachResponse):
        out = (
            _hdr(ATTACH_RESPONSE, T_ATTACH_RESPONSE)
            + ATTACH_RESPONSE.pack(
                msg.correlation_id, msg.code, msg.lease_id, msg.lease_expiry_ns, msg.stream_id, msg.epoch,
                msg.layout_version, msg.header_nslots, msg.header_slot_bytes, msg.max_dims,
            )
            + _pools(msg.pools)
            + _var(msg.header_uri)
            + _var(_error_text(msg.error_message))
        )
    elif isinstance(msg, DetachRequest):
        out = _hdr(DETACH_REQUEST, T_DETACH_REQUEST) + DETACH_REQUEST.pack(
            msg.correlation_id, msg.lease_id, msg.stream_id, msg.client_id, msg.role
        )
    elif isinstance(msg, DetachResponse):
        out = (
            _hdr(DETACH_RESPONSE, T_DETACH_RESPONSE)
            + DETACH_RESPONSE.pack(msg.correlation_id, msg.code)
            + _var(_error_text(msg.error_message))
        )
    elif isinstance(msg, LeaseKeepalive):
        out = _hdr(KEEPALIVE, T_KEEPALIVE) + KEEPALIVE.pack(
            msg.lease_id, msg.stream_id, msg.client_id, msg.role, msg.client_timestamp_ns
        )
    elif isinstance(msg, DriverShutdown):
        out = _hdr(SHUTDOWN, T_SHUTDOWN) + SHUTDOWN.pack(msg.timestamp_ns, msg.reason) + _var(_error_text(msg.error_message))
    elif isinstance(msg, LeaseRevoked):
        out = (
            _hdr(REVOKED, T_REVOKED)
            + REVOKED.pack(msg.timestamp_ns, msg.lease_id, msg.stream_id, msg.client_id, msg.role, msg.reason)
            + _var(_error_text(msg.error_message))
        )
    elif isinstance(msg, PoolAnnounce):
        out = (
            _hdr(POOL_ANNOUNCE, T_POOL_ANNOUNCE, ANNOUNCE_SCHEMA_ID)
            + POOL_ANNOUNCE.pack(
                msg.stream_id, msg.producer_id, msg.epoch, msg.announce_timestamp_ns, msg.clock_domain,
                msg.layout_version, msg.header_nslots, msg.header_slot_bytes,
            )
            + _pools(msg.pools)
            + _var(msg.header_uri)
        )
    elif isinstance(msg, ConsumerRegister):
        out = (
            _hdr(CONSUMER_REGISTER, T_CONSUMER_REGISTER)
            + CONSUMER_REGISTER.pack(msg.correlation_id, msg.lease_id, msg.stream_id, msg.client_id, msg.flags,
                                     msg.max_rate_hz)
            + _var(msg.consumer_name)
            + _var(msg.queue_name)
        )
    elif isinstance(msg, SetControl):
        out = _hdr(SET_CONTROL, T_SET_CONTROL) + SET_CONTROL.pack(
            msg.correlation_id, msg.lease_id, msg.stream_id, msg.index, msg.value
        )
    elif isinstance(msg, ControlResponse):
        out = (
            _hdr(CONTROL_RESPONSE, T_CONTROL_RESPONSE)
            + CONTROL_RESPONSE.pack(msg.correlation_id, msg.code, msg.value)
            + _var(_error_text(msg.error_message))
        )
    else:
        raise TypeError(f"not a driver message: {msg!r}")
    if len(out) > MAX_MESSAGE:
        raise InvalidArgument(f"{type(msg).__name__} would be {len(out)} bytes (at most {MAX_MESSAGE})")
    return out


# ---- decoding ----------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "off", "what", "corr", "tid")

    def __init__(self, data: bytes, off: int, what: str, corr: Optional[int], tid: int):
        self.data = data
        self.off = off
        self.what = what
        self.corr = corr
        self.tid = tid

    def fail(self, why: str) -> DecodeError:
        return DecodeError(Code.INVALID_PARAMS, f"malformed {self.what}: {why}", self.corr, self.tid)

    def take(self, n: int, part: str) -> bytes:
        if n > len(self.data) - self.off:
            raise self.fail(f"{part} needs {n} bytes at offset {self.off}, the packet has {len(self.data)}")
        b = self.data[self.off:self.off + n]
        self.off += n
        return b

    def text(self, part: str, optional: bool = False) -> str:
        if optional and self.off == len(self.data):
            return ""  # an absent trailing optional var field reads as empty
        (n,) = VARLEN.unpack(self.take(VARLEN.size, f"{part} length"))
        raw = self.take(n, part)
        if any(c == 0 or c > 0x7E for c in raw):
            raise self.fail(f"{part} is not printable ASCII")
        return raw.decode("ascii")

    def pools(self) -> List[PoolInfo]:
        entry, count = GROUP.unpack(self.take(GROUP.size, "payloadPools group header"))
        if count and entry < POOL_ENTRY.size:
            raise self.fail(f"payloadPools entries of {entry} bytes (at least {POOL_ENTRY.size})")
        out = []
        for i in range(count):
            block = self.take(entry, f"payloadPools[{i}]")
            pid, nslots, stride = POOL_ENTRY.unpack_from(block)
            out.append(PoolInfo(pid, nslots, stride, self.text(f"payloadPools[{i}].regionUri")))
        return out


_NAMES = {
    (DRIVER_SCHEMA_ID, T_ATTACH_REQUEST): ("ShmAttachRequest", ATTACH_REQUEST),
    (DRIVER_SCHEMA_ID, T_ATTACH_RESPONSE): ("ShmAttachResponse", ATTACH_RESPONSE),
    (DRIVER_SCHEMA_ID, T_DETACH_REQUEST): ("ShmDetachRequest", DETACH_REQUEST),
    (DRIVER_SCHEMA_ID, T_DETACH_RESPONSE): ("ShmDetachResponse", DETACH_RESPONSE),
    (DRIVER_SCHEMA_ID, T_KEEPALIVE): ("ShmLeaseKeepalive", KEEPALIVE),
    (DRIVER_SCHEMA_ID, T_SHUTDOWN): ("ShmDriverShutdown", SHUTDOWN),
    (DRIVER_SCHEMA_ID, T_REVOKED): ("ShmLeaseRevoked", REVOKED),
    (ANNOUNCE_SCHEMA_ID, T_POOL_ANNOUNCE): ("ShmPoolAnnounce", POOL_ANNOUNCE),
    (DRIVER_SCHEMA_ID, T_CONSUMER_REGISTER): ("ShmConsumerRegister", CONSUMER_REGISTER),
    (DRIVER_SCHEMA_ID, T_SET_CONTROL): ("ShmSetControl", SET_CONTROL),
    (DRIVER_SCHEMA_ID, T_CONTROL_RESPONSE): ("ShmControlResponse", CONTROL_RESPONSE),
}

# Requests whose answer echoes their correlationId (first 8 block bytes).
REQUESTS = (T_ATTACH_REQUEST, T_DETACH_REQUEST, T_CONSUMER_REGISTER, T_SET_CONTROL)


def peek_header(data: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(blockLength, templateId, schemaId, version), or None if shorter than a header."""
    if len(data) < HEADER.size:
        return None
    return HEADER.unpack_from(data)


def correlation_of(data: bytes) -> Optional[int]:
    """The correlationId of an attach/detach request when the packet holds its first 8 block bytes."""
    hdr = peek_header(data)
    if hdr is None:
        return None
    _block, tid, schema, _version = hdr
    if schema == DRIVER_SCHEMA_ID and tid in REQUESTS and len(data) >= HEADER.size + 8:
        return struct.unpack_from("<q", data, HEADER.size)[0]
    return None


def decode(data: bytes) -> Message:
    """Decodes one packet; raises DecodeError for anything not acceptable."""
    if len(data) > MAX_MESSAGE:
        raise DecodeError(Code.INVALID_PARAMS, f"message of {len(data)} bytes is larger than {MAX_MESSAGE}")
    hdr = peek_header(data)
    if hdr is None:
        raise DecodeError(Code.INVALID_PARAMS, f"message of {len(data)} bytes is shorter than the 8-byte SBE header")
    block, tid, schema, version = hdr
    corr = correlation_of(data)
    if schema not in (DRIVER_SCHEMA_ID, ANNOUNCE_SCHEMA_ID):
        raise DecodeError(Code.UNSUPPORTED, f"unknown schemaId {schema} (driver messages use {DRIVER_SCHEMA_ID})", None, None)
    want_version = DRIVER_SCHEMA_VERSION if schema == DRIVER_SCHEMA_ID else ANNOUNCE_SCHEMA_VERSION
    known = _NAMES.get((schema, tid))
    if known is None:
        raise DecodeError(Code.UNSUPPORTED, f"unknown templateId {tid} of schema {schema}", None, None)
    name, fixed = known
    if version != want_version:
        raise DecodeError(
            Code.UNSUPPORTED, f"{name} of schema version {version}; this driver speaks version {want_version}", corr, tid
        )
    if block < fixed.size:
        raise DecodeError(Code.INVALID_PARAMS, f"{name} blockLength {block} is shorter than {fixed.size}", corr, tid)
    r = _Reader(data, HEADER.size, name, corr, tid)
    body = r.take(block, "block")
    v = fixed.unpack_from(body)
    if schema == ANNOUNCE_SCHEMA_ID:
        pools = r.pools()
        uri = r.text("headerRegionUri")
        return PoolAnnounce(
            stream_id=v[0], producer_id=v[1], epoch=v[2], announce_timestamp_ns=v[3], clock_domain=v[4],
            layout_version=v[5], header_nslots=v[6], header_slot_bytes=v[7], pools=pools, header_uri=uri,
        )
    if tid == T_ATTACH_REQUEST:
        return AttachRequest(*v)
    if tid == T_ATTACH_RESPONSE:
        pools = r.pools()
        uri = r.text("headerRegionUri", optional=True)
        err = r.text("errorMessage", optional=True)
        return AttachResponse(*v, pools=pools, header_uri=uri, error_message=err)
    if tid == T_DETACH_REQUEST:
        return DetachRequest(*v)
    if tid == T_DETACH_RESPONSE:
        return DetachResponse(*v, error_message=r.text("errorMessage", optional=True))
    if tid == T_KEEPALIVE:
        return LeaseKeepalive(*v)
    if tid == T_SHUTDOWN:
        return DriverShutdown(*v, error_message=r.text("errorMessage", optional=True))
    if tid == T_CONSUMER_REGISTER:
        return ConsumerRegister(*v, consumer_name=r.text("consumerName"), queue_name=r.text("queueName"))
    if tid == T_SET_CONTROL:
        return SetControl(*v)
    if tid == T_CONTROL_RESPONSE:
        return ControlResponse(*v, error_message=r.text("errorMessage", optional=True))
    return LeaseRevoked(*v, error_message=r.text("errorMessage", optional=True))


def message_name(msg: Message) -> str:
    return {
        AttachRequest: "ShmAttachRequest",
        AttachResponse: "ShmAttachResponse",
        DetachRequest: "ShmDetachRequest",
        DetachResponse: "ShmDetachResponse",
        LeaseKeepalive: "ShmLeaseKeepalive",
        DriverShutdown: "ShmDriverShutdown",
        LeaseRevoked: "ShmLeaseRevoked",
        PoolAnnounce: "ShmPoolAnnounce",
        ConsumerRegister: "ShmConsumerRegister",
        SetControl: "ShmSetControl",
        ControlResponse: "ShmControlResponse",
    }[type(msg)]
