"""Tessera revocation (PROTOCOL.md §2, §5, §6.6, §11) in Python, independently of the Rust core.

Used by ``verify_revocation_vectors.py`` and ``make_revocations.py``. Built from the
protocol text with ``cbor2`` (values) and ``pycose`` (ES256 signatures); nothing here is
translated from the Rust code.

cbor2 5.9 is lenient where Tessera is strict: ``cbor2.loads`` ignores bytes after the first
item, keeps the last of repeated map keys, accepts indefinite lengths and turns some tags
into plain values (tag 2 into an int). So every byte string is first walked by
``scan`` below, which enforces PROTOCOL §2.3 rules 1–6 on the raw bytes, and only then
handed to cbor2 for its values. Like the reference receiver (§2.3, last paragraph), it
accepts integers and lengths that are not in their shortest form, and map entries in any
order.

Every refusal is a ``Refused(reason, detail)`` whose ``reason`` uses the vocabulary of
``shared/testdata/revocation_vectors.json`` (see ``shared/testdata/README.md``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import cbor2
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

ES256 = -7
TAG_SIGN1 = 18
TAG_CWT = 61

# PROTOCOL §2.4.
MAX_SIGN1_LEN = 16_384
MAX_PAGE_LEN = 16_000
MAX_PROTECTED_LEN = 64
MAX_KID_LEN = 32
MAX_MAP_ENTRIES = 32
MAX_ENTRIES_PER_PAGE = 2048
MAX_ID_LEN = 64
MAX_DEPTH = 16  # nesting the scanner follows; revocation payloads nest 3 deep

# §5.5 message types, §11.3 keys.
TYPE_PAGE = 20
TYPE_RETIRED = 21
TYPE_HEARTBEAT = 22
KEY_TYPE, KEY_SEQ, KEY_ISSUED_AT, KEY_ENTRIES, KEY_STREAM, KEY_FROM, KEY_TO, KEY_MAX_AGE = range(8)
FIELD_NAMES = {
    KEY_TYPE: "type",
    KEY_SEQ: "seq",
    KEY_ISSUED_AT: "issued_at",
    KEY_ENTRIES: "entries",
    KEY_STREAM: "stream",
    KEY_FROM: "from",
    KEY_TO: "to",
    KEY_MAX_AGE: "max_age",
}
PAGE_KEYS = (KEY_TYPE, KEY_SEQ, KEY_ISSUED_AT, KEY_ENTRIES, KEY_STREAM, KEY_FROM, KEY_TO)
HEARTBEAT_KEYS = (KEY_TYPE, KEY_SEQ, KEY_ISSUED_AT, KEY_STREAM, KEY_MAX_AGE)
ENTRY_TOKEN, ENTRY_SUBJECT = 0, 1

# §3 identifiers, §11.3 stream names.
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
STREAM_RE = re.compile(r"devices/[0-9a-f]{2}|service/[A-Za-z0-9._-]{1,64}")

# Order of P-256 (§4.1, §6.6).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

DEFAULT_LEEWAY = 30  # §6.5, §11.6
DEFAULT_MAX_AGE = 90  # §11.7: before any heartbeat


class Refused(Exception):
    """A message or token that a Tessera receiver must refuse, and why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- strict CBOR


def _argument(buf: bytes, pos: int, ai: int) -> tuple[int, int]:
    if ai < 24:
        return ai, pos
    if ai > 27:
        raise Refused("malformed", f"reserved additional information {ai} at {pos - 1}")
    n = 1 << (ai - 24)
    if pos + n > len(buf):
        raise Refused("malformed", "ends early")
    return int.from_bytes(buf[pos : pos + n], "big"), pos + n


def scan(buf: bytes, pos: int = 0, depth: int = 0) -> int:
    """Walks one data item at ``pos`` under PROTOCOL §2.3 and returns where it ends.

    Refuses: ill-formed or truncated items (``malformed``), indefinite lengths
    (``indefinite_length``), repeated map keys (``duplicate_key``), map keys that are not
    integers in the signed 64-bit range, tags, floats and simple values (none of which a
    payload, header or entry holds: ``unexpected_type``), and text that is not UTF-8.
    """
    if depth > MAX_DEPTH:
        raise Refused("too_deep", f"nesting deeper than {MAX_DEPTH}")
    if pos >= len(buf):
        raise Refused("malformed", "ends early")
    initial = buf[pos]
    major, ai = initial >> 5, initial & 0x1F
    if ai == 31:
        if major in (2, 3, 4, 5):
            raise Refused("indefinite_length", f"indefinite-length item (0x{initial:02x}) at {pos}")
        raise Refused("malformed", f"0x{initial:02x} at {pos}")
    arg, pos = _argument(buf, pos + 1, ai)
    if major in (0, 1):
        return pos
    if major in (2, 3):
        end = pos + arg
        if end > len(buf):
            raise Refused("malformed", "string runs past the end")
        if major == 3:
            try:
                buf[pos:end].decode("utf-8")
            except UnicodeDecodeError as e:
                raise Refused("malformed", f"text is not UTF-8: {e}") from e
        return end
    if major == 4:
        for _ in range(arg):
            pos = scan(buf, pos, depth + 1)
        return pos
    if major == 5:
        seen: set[int] = set()
        for _ in range(arg):
            if pos >= len(buf):
                raise Refused("malformed", "ends early")
            kmajor, kai = buf[pos] >> 5, buf[pos] & 0x1F
            if kmajor not in (0, 1) or kai == 31:
                raise Refused("non_integer_key", f"map key of major type {kmajor} at {pos}")
            karg, after = _argument(buf, pos + 1, kai)
            key = karg if kmajor == 0 else -1 - karg
            if not -(2**63) <= key < 2**63:
                raise Refused("malformed", f"map key {key} outside the signed 64-bit range")
            if key in seen:
                raise Refused("duplicate_key", f"map key {key} appears twice")
            seen.add(key)
            pos = scan(buf, after, depth + 1)
        return pos
    if major == 6:
        raise Refused("unexpected_type", f"tag {arg} inside a message")
    raise Refused("unexpected_type", f"float or simple value (0x{initial:02x}) at {pos}")


def strict_loads(buf: bytes) -> Any:
    """One data item that fills ``buf`` exactly, checked by ``scan``, decoded by cbor2."""
    end = scan(buf)
    if end != len(buf):
        raise Refused("trailing_bytes", f"{len(buf) - end} byte(s) after the item")
    return cbor2.loads(buf)


def is_uint(v: Any) -> bool:
    # bool is an int in Python; scan() already refused CBOR true/false, this is belt and braces.
    return type(v) is int and 0 <= v < 2**64


def is_id(v: Any) -> bool:
    return isinstance(v, str) and ID_RE.fullmatch(v) is not None


# --------------------------------------------------------------------------- COSE_Sign1


@dataclass
class Envelope:
    """A COSE_Sign1 decoded per PROTOCOL §5.4 steps 1–3, signature not yet checked."""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes
    tagged: bool  # carried tag 18


def decode_envelope(msg: bytes, limit: int = MAX_SIGN1_LEN) -> Envelope:
    if len(msg) > limit:
        raise Refused("too_large", f"{len(msg)} bytes > {limit}")
    pos, tagged = 0, False
    # Tags 61 then 18, each optional (§5.4 step 2); scan() refuses any other tag.
    for tag in (TAG_CWT, TAG_SIGN1):
        if pos < len(msg) and msg[pos] >> 5 == 6:
            value, after = _argument(msg, pos + 1, msg[pos] & 0x1F)
            if value == tag:
                pos, tagged = after, tagged or tag == TAG_SIGN1
            elif tag == TAG_SIGN1 or value != TAG_SIGN1:
                raise Refused("unexpected_tag", f"tag {value}")
    end = scan(msg, pos)
    if end != len(msg):
        raise Refused("trailing_bytes", f"{len(msg) - end} byte(s) after the COSE_Sign1")
    arr = cbor2.loads(msg[pos:end])
    if not isinstance(arr, list) or len(arr) != 4:
        raise Refused("malformed", "not an array of four items")
    protected, unprotected, payload, signature = arr
    if not isinstance(protected, bytes) or len(protected) > MAX_PROTECTED_LEN:
        raise Refused("malformed", "protected header is not a bstr of at most 64 bytes")
    header = strict_loads(protected)
    if not isinstance(header, dict) or len(header) > 8:
        raise Refused("malformed", "protected header is not a map of at most 8 entries")
    if 2 in header:
        raise Refused("unknown_critical_header", "crit is present")
    if 1 not in header:
        raise Refused("missing_alg")
    if header[1] != ES256:
        raise Refused("unsupported_algorithm", f"alg {header[1]!r}")
    kid = header.get(4)
    if kid is None:
        raise Refused("missing_kid")
    if not isinstance(kid, bytes) or len(kid) > MAX_KID_LEN:
        raise Refused("malformed", "kid is not a bstr of at most 32 bytes")
    if unprotected != {}:
        raise Refused("unprotected_header_not_empty", repr(unprotected))
    if not isinstance(payload, bytes):
        raise Refused("malformed", "payload is not a bstr")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise Refused("malformed", "signature is not 64 bytes")
    return Envelope(protected, kid, payload, signature, tagged)


def verify_envelope(env: Envelope, keys: dict[bytes, CoseKey]) -> bytes:
    """§5.4 steps 4–5: the key named by kid, then the signature, with pycose."""
    key = keys.get(env.kid)
    if key is None:
        raise Refused("unknown_key", f"no trusted key with kid {env.kid.hex()}")
    msg = Sign1Message.from_cose_obj([env.protected, {}, env.payload, env.signature], True)
    msg.key = key
    try:
        ok = msg.verify_signature()
    except Exception as e:  # noqa: BLE001 - pycose raising is a refusal too
        raise Refused("bad_signature", f"pycose: {type(e).__name__}: {e}") from e
    if not ok:
        raise Refused("bad_signature", "the signature does not verify")
    return env.payload


# --------------------------------------------------------------------------- §6.6, §11.2


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | ai]) + n.to_bytes(size, "big")
    raise ValueError("too long")


def low_s(signature: bytes) -> bytes:
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < P256_N and 0 < s < P256_N):
        return signature  # not a signature at all: never verifies, hashed as it is
    if s > P256_N // 2:
        s = P256_N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def token_hash(token: bytes) -> bytes:
    """PROTOCOL §6.6: SHA-256 of the canonical encoding, or of the bytes if no COSE_Sign1."""
    try:
        env = decode_envelope(token)
    except Refused:
        return hashlib.sha256(token).digest()
    canonical = (
        b"\xd2\x84"
        + _head(2, len(env.protected))
        + env.protected
        + b"\xa0"
        + _head(2, len(env.payload))
        + env.payload
        + b"\x58\x40"
        + low_s(env.signature)
    )
    return hashlib.sha256(canonical).digest()


def device_stream(device: str) -> str:
    """PROTOCOL §11.2: devices/ and the first byte of SHA-256 of the id, lowercase hex."""
    return f"devices/{hashlib.sha256(device.encode()).digest()[0]:02x}"


def service_stream(service: str) -> str:
    if not is_id(service):
        raise ValueError(f"{service!r} is not an identifier")
    return f"service/{service}"


def carries(stream: str, audience: str) -> bool:
    """Whether an entry addressed to ``audience`` belongs on ``stream``."""
    if stream.startswith("devices/"):
        return device_stream(audience) == stream
    return stream == f"service/{audience}"


# --------------------------------------------------------------------------- §11.3


def _uint_field(value: Any, name: str) -> int:
    if not is_uint(value):
        raise Refused("unexpected_type", f"{name} is not an unsigned integer: {value!r}")
    return value


def decode_entry(e: Any) -> dict:
    """§11.1: [0, audience, hash, expires_at] or [1, audience, subject, issued_before, expires_at]."""
    if not isinstance(e, list) or not e:
        raise Refused("malformed", f"entry is not a non-empty array: {e!r}")
    kind = _uint_field(e[0], "entry kind")
    if kind not in (ENTRY_TOKEN, ENTRY_SUBJECT):
        raise Refused("unknown_entry_kind", f"kind {kind}")
    want = 4 if kind == ENTRY_TOKEN else 5
    if len(e) != want:
        raise Refused("entry_length", f"kind {kind} entry with {len(e)} items, not {want}")
    audience = e[1]
    if not is_id(audience):
        raise Refused("invalid_audience", f"{audience!r} is not an identifier")
    if kind == ENTRY_TOKEN:
        digest = e[2]
        if not isinstance(digest, bytes) or len(digest) != 32:
            size = f"{len(digest)} bytes" if isinstance(digest, bytes) else type(digest).__name__
            raise Refused("invalid_token_hash", f"a token hash of {size}, not 32 bytes")
        return {
            "kind": "token",
            "audience": audience,
            "hash_hex": digest.hex(),
            "expires_at": _uint_field(e[3], "expires_at"),
        }
    subject = e[2]
    # §11.1: "subject is an identifier" (CDDL: [1, id, id, uint, uint]).
    if not is_id(subject):
        raise Refused("invalid_subject", f"{subject!r} is not an identifier")
    return {
        "kind": "subject",
        "audience": audience,
        "subject": subject,
        "issued_before": _uint_field(e[3], "issued_before"),
        "expires_at": _uint_field(e[4], "expires_at"),
    }


def decode_stream_message(payload: bytes) -> dict:
    """A page or a heartbeat payload (§11.3), told apart by key 0 wherever it is."""
    m = strict_loads(payload)
    if not isinstance(m, dict):
        raise Refused("unexpected_type", "payload is not a map")
    if len(m) > MAX_MAP_ENTRIES:
        raise Refused("too_large", f"{len(m)} map entries")
    if KEY_TYPE not in m:
        raise Refused("missing_type")
    mtype = _uint_field(m[KEY_TYPE], "type")
    is_page = mtype != TYPE_HEARTBEAT
    if mtype not in (TYPE_PAGE, TYPE_HEARTBEAT):
        reason = "retired_message_type" if mtype == TYPE_RETIRED else "wrong_message_type"
        raise Refused(reason, f"message type {mtype}")
    own = PAGE_KEYS if is_page else HEARTBEAT_KEYS
    other = HEARTBEAT_KEYS if is_page else PAGE_KEYS
    for k in m:
        if k not in own:
            if k in other:
                raise Refused("field_not_allowed", f"{FIELD_NAMES[k]} (key {k}) in a {'page' if is_page else 'heartbeat'}")
            raise Refused("unknown_payload_key", f"key {k}")
    for k in own:
        if k not in m:
            raise Refused(f"missing_{FIELD_NAMES[k]}")
    out: dict = {"type": "page" if is_page else "heartbeat"}
    out["seq"] = _uint_field(m[KEY_SEQ], "seq")
    out["issued_at"] = _uint_field(m[KEY_ISSUED_AT], "issued_at")
    stream = m[KEY_STREAM]
    if not isinstance(stream, str) or STREAM_RE.fullmatch(stream) is None:
        raise Refused("invalid_stream", f"{stream!r}")
    out["stream"] = stream
    if not is_page:
        out["max_age"] = _uint_field(m[KEY_MAX_AGE], "max_age")
        return out
    frm, to = _uint_field(m[KEY_FROM], "from"), _uint_field(m[KEY_TO], "to")
    raw = m[KEY_ENTRIES]
    if not isinstance(raw, list):
        raise Refused("unexpected_type", "entries is not an array")
    if len(raw) > MAX_ENTRIES_PER_PAGE:
        raise Refused("too_large", f"{len(raw)} entries")
    entries = [decode_entry(e) for e in raw]
    if not 1 <= frm <= to <= out["seq"]:
        raise Refused("page_range", f"from {frm}, to {to}, seq {out['seq']}")
    for e in entries:
        if not carries(stream, e["audience"]):
            raise Refused("entry_on_other_stream", f"{e['audience']} is not on {stream}")
    # Key order of the committed vectors' "decoded" objects.
    return {
        "type": "page",
        "seq": out["seq"],
        "issued_at": out["issued_at"],
        "stream": stream,
        "from": frm,
        "to": to,
        "entries": entries,
    }


def verify_stream_message(message: bytes, keys: dict[bytes, CoseKey]) -> dict:
    """Everything a verifier does to a message from a stream topic before applying it."""
    env = decode_envelope(message)
    payload = verify_envelope(env, keys)
    decoded = decode_stream_message(payload)
    if decoded["type"] == "page" and len(message) > MAX_PAGE_LEN:
        # §2.4: a revocation page, the whole COSE_Sign1, is at most 16 000 bytes.
        raise Refused("too_large", f"a {len(message)}-byte page > {MAX_PAGE_LEN}")
    return decoded


# --------------------------------------------------------------------------- encoding


def entry_value(e: dict) -> list:
    if e["kind"] == "token":
        return [ENTRY_TOKEN, e["audience"], bytes.fromhex(e["hash_hex"]), e["expires_at"]]
    return [ENTRY_SUBJECT, e["audience"], e["subject"], e["issued_before"], e["expires_at"]]


def encode_payload(d: dict) -> bytes:
    """The deterministic encoding (§2.2) of a decoded page or heartbeat."""
    if d["type"] == "page":
        m = {
            KEY_TYPE: TYPE_PAGE,
            KEY_SEQ: d["seq"],
            KEY_ISSUED_AT: d["issued_at"],
            KEY_ENTRIES: [entry_value(e) for e in d["entries"]],
            KEY_STREAM: d["stream"],
            KEY_FROM: d["from"],
            KEY_TO: d["to"],
        }
    else:
        m = {
            KEY_TYPE: TYPE_HEARTBEAT,
            KEY_SEQ: d["seq"],
            KEY_ISSUED_AT: d["issued_at"],
            KEY_STREAM: d["stream"],
            KEY_MAX_AGE: d["max_age"],
        }
    return cbor2.dumps(m, canonical=True)


# --------------------------------------------------------------------------- §11.5


@dataclass
class RevocationList:
    """A verifier's list, written from PROTOCOL §11.5 and §11.6."""

    audience: str
    service: bool
    capacity: int
    leeway: int = DEFAULT_LEEWAY
    entries: list = field(default_factory=list)  # dicts as decode_entry makes, audience dropped
    prefix: int = 0
    latest: int = 0
    ranges: list = field(default_factory=list)  # applied (from, to) beyond prefix + 1
    fresh_as_of: Optional[int] = None
    announced: Optional[int] = None  # max_age of the newest heartbeat seen
    newest_heartbeat: Optional[int] = None  # issued_at of the newest heartbeat of the stream seen

    @property
    def stream(self) -> str:
        return service_stream(self.audience) if self.service else device_stream(self.audience)

    @property
    def complete(self) -> bool:
        return self.prefix >= self.latest

    def spent(self, e: dict, now: int) -> bool:
        return now > e["expires_at"] + self.leeway  # §11.6

    def _fold(self, e: dict) -> bool:
        for held in self.entries:
            if held["kind"] != e["kind"]:
                continue
            if e["kind"] == "token" and held["hash_hex"] == e["hash_hex"]:
                held["expires_at"] = max(held["expires_at"], e["expires_at"])
                return True
            if e["kind"] == "subject" and held["subject"] == e["subject"]:
                held["issued_before"] = max(held["issued_before"], e["issued_before"])
                held["expires_at"] = max(held["expires_at"], e["expires_at"])
                return True
        return False

    def _insert(self, e: dict, now: int) -> bool:
        if self._fold(e):
            return True
        if len(self.entries) >= self.capacity:
            # §11.6: spent entries may be forgotten; only then does an entry not fit.
            self.entries = [h for h in self.entries if not self.spent(h, now)]
        if len(self.entries) >= self.capacity:
            return False
        self.entries.append({k: v for k, v in e.items() if k != "audience"})
        return True

    def _cover(self, frm: int, to: int) -> None:
        self.ranges.append((frm, to))
        changed = True
        while changed:
            changed = False
            for r in list(self.ranges):
                if r[0] <= self.prefix + 1:
                    self.prefix = max(self.prefix, r[1])
                    self.ranges.remove(r)
                    changed = True

    def _in_sync(self, t: int) -> None:
        self.fresh_as_of = t if self.fresh_as_of is None else max(self.fresh_as_of, t)

    def apply(self, d: dict, now: int) -> str:
        """Applies a verified, decoded message; returns the step's outcome word."""
        if d["stream"] != self.stream:
            return "refused_other_stream"
        if d["type"] == "heartbeat":
            h, t = d["seq"], d["issued_at"]
            # "m becomes the announced max_age if t is at least the issued_at of every
            # heartbeat of the stream seen before" (§11.5), whatever the list's state.
            if self.newest_heartbeat is None or t >= self.newest_heartbeat:
                self.newest_heartbeat = t
                self.announced = d["max_age"]
            if h > self.prefix:
                self.latest = max(self.latest, h)
                return "behind"
            if h < self.latest:
                return "outdated"
            self._in_sync(t)
            return "in_sync"
        self.latest = max(self.latest, d["seq"])  # step 1
        already = d["to"] <= self.prefix
        overflowed = False
        for e in d["entries"]:  # step 2
            if e["audience"] != self.audience or self.spent(e, now):
                continue
            if not self._insert(e, now):  # step 3: the other entries are still added
                overflowed = True
        if overflowed:  # step 3: do not count the range, not fresh, stop here
            self.fresh_as_of = None
            return "overflow"
        self._cover(d["from"], d["to"])  # step 4
        if d["seq"] == self.latest and self.complete:  # step 5
            self._in_sync(d["issued_at"])
        if already:
            return "already_applied"
        return "applied" if self.complete else "gap"

    def is_revoked(self, digest: bytes, subject: str, iat: int) -> bool:
        for e in self.entries:
            if e["kind"] == "token" and e["hash_hex"] == digest.hex():
                return True
            if e["kind"] == "subject" and e["subject"] == subject and iat < e["issued_before"]:
                return True
        return False

    def max_age(self) -> int:
        return DEFAULT_MAX_AGE if self.announced is None else self.announced

    def is_fresh(self, now: int) -> bool:
        if not self.complete or self.fresh_as_of is None:
            return False
        return max(0, now - self.fresh_as_of) <= self.max_age()  # §11.7

    def state(self) -> dict:
        return {
            "prefix": self.prefix,
            "latest": self.latest,
            "complete": self.complete,
            "fresh_as_of": self.fresh_as_of,
            "wanted_from": None if self.complete else self.prefix + 1,
            "max_age": self.max_age(),
            "entries": len(self.entries),
        }


# --------------------------------------------------------------------------- tokens


def token_claims(token: bytes) -> dict:
    """The claims of a token (signature not checked here): aud, sub, iat."""
    env = decode_envelope(token, limit=1024)
    claims = strict_loads(env.payload)
    if not isinstance(claims, dict):
        raise Refused("unexpected_type", "claims are not a map")
    return {"audience": claims.get(3), "subject": claims.get(2), "issued_at": claims.get(6)}
