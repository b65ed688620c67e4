#!/usr/bin/env python3
"""Build and sign revocation pages and heartbeats in Python, for the Rust core to apply.

Usage: make_revocations.py <revocation_vectors.json> <out.json>

Acts as a hub with a fresh P-256 key (kid: the RFC 9679 thumbprint, PROTOCOL §4.3) for the
device ``device-py-01``: computes its stream (§11.2) and the token hash (§6.6) of the
committed vector tokens (re-encodings included), encodes pages and heartbeats with cbor2
(deterministic encoding, §2.2) and signs them with pycose (ES256; tag 18, and one message
untagged). The script's own list (``tessera_revocation.RevocationList``, from §11.5)
applies every valid message and records the outcome and the state after it; a few
messages are invalid on purpose, each with the reason it must be refused. Before writing,
every message goes through the script's own verifier, so Python agrees with itself.

``shared/examples/check_python_revocations.rs`` then reads the file and must reach the same
verdicts, contents, states, revocations and freshness with the Rust core, and the same
streams and token hashes.

``spec_probes`` are messages that PROTOCOL.md says a receiver must refuse but that are
otherwise well formed (a subject that is not an identifier, §11.1; a page above 16 000
bytes, §2.4); the Rust core must refuse each too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

import tessera_revocation as tr

DEVICE = "device-py-01"
SERVICE = "svc.python"
P = 1_800_000_000  # the timeline's origin: no wall clock, so every run applies the same way
LIFE = 1_000  # how long after P the entries' tokens live
MAX_AGE = 75


def thumbprint_kid(x: bytes, y: bytes) -> bytes:
    return hashlib.sha256(cbor2.dumps({1: 2, -1: 1, -2: x, -3: y}, canonical=True)).digest()[:8]


class Hub:
    """A fresh signing key, as a hub holds it."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        n = key.public_key().public_numbers()
        x, y = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
        d = key.private_numbers().private_value.to_bytes(32, "big")
        self.kid = thumbprint_kid(x, y)
        self.public = cbor2.dumps({1: 2, 2: self.kid, 3: tr.ES256, -1: 1, -2: x, -3: y}, canonical=True)
        self.signing = CoseKey.from_dict({1: 2, -1: 1, -2: x, -3: y, -4: d})

    def sign(self, payload: bytes, tagged: bool = True) -> bytes:
        msg = Sign1Message(phdr={Algorithm: Es256, KID: self.kid}, uhdr={}, payload=payload)
        msg.key = self.signing
        out = msg.encode(tag=tagged)
        expect = (b"\xd2\x84" if tagged else b"\x84") + b"\x4d\xa2\x01\x26\x04\x48" + self.kid + b"\xa0"
        if not out.startswith(expect):
            sys.exit(f"make_revocations: pycose wrote {out[:24].hex()}, want {expect.hex()} (PROTOCOL §5.1)")
        return out


def first(prefix: str, same_partition_as: str, same: bool) -> str:
    want = tr.device_stream(same_partition_as)
    for i in range(100_000):
        name = f"{prefix}{i}"
        if (tr.device_stream(name) == want) == same:
            return name
    raise RuntimeError("no such id")


def page(seq: int, t: int, stream: str, frm: int, to: int, entries: list) -> dict:
    return {"type": "page", "seq": seq, "issued_at": t, "stream": stream, "from": frm, "to": to, "entries": entries}


def heartbeat(seq: int, t: int, stream: str, max_age: int = MAX_AGE) -> dict:
    return {"type": "heartbeat", "seq": seq, "issued_at": t, "stream": stream, "max_age": max_age}


def token_entry(audience: str, digest: bytes, expires_at: int = P + LIFE) -> dict:
    return {"kind": "token", "audience": audience, "hash_hex": digest.hex(), "expires_at": expires_at}


def subject_entry(audience: str, subject: str, before: int, expires_at: int = P + LIFE) -> dict:
    return {"kind": "subject", "audience": audience, "subject": subject, "issued_before": before, "expires_at": expires_at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vectors", help="shared/testdata/revocation_vectors.json")
    ap.add_argument("out", help="path of the JSON file to write")
    args = ap.parse_args()
    with open(args.vectors, encoding="utf-8") as f:
        vectors = json.load(f)

    hub = Hub()
    keys = {hub.kid: CoseKey.decode(hub.public)}
    stream = tr.device_stream(DEVICE)
    neighbour = first("device-py-n", DEVICE, True)
    elsewhere = first("device-py-x", DEVICE, False)
    service = tr.service_stream(SERVICE)

    # §6.6: the hash of every committed token, computed here; the entries revoke one
    # re-encoded copy, which must name the token as issued.
    token_hashes = [
        {"name": t["name"], "token_hex": t["token_hex"], "token_hash_hex": tr.token_hash(bytes.fromhex(t["token_hex"])).hex()}
        for t in vectors["tokens"]
    ]
    by_name = {t["name"]: bytes.fromhex(t["token_hash_hex"]) for t in token_hashes}
    h_copy = by_name["access_app7_every_re_encoding"]
    h_device_token = by_name["device_token_42"]
    h3 = hashlib.sha256(b"python change 3").digest()
    other = hashlib.sha256(b"not revoked").digest()

    streams = [
        {"audience": a, "follows": "device", "stream": tr.device_stream(a)}
        for a in (DEVICE, neighbour, elsewhere, "device-42", "device-43", "x", "Z" * 64)
    ] + [{"audience": SERVICE, "follows": "service", "stream": service}]

    c1 = [
        token_entry(DEVICE, h_copy),
        subject_entry(DEVICE, "app-7", P + 10),
        subject_entry(neighbour, "app-9", P + 10),
    ]
    c2 = [subject_entry(neighbour, "app-9", P + 20)]
    c3 = [token_entry(DEVICE, h3)]
    plan = [
        # (name, content, now, tagged, how to spoil it or None)
        ("page_change_1", page(1, P + 10, stream, 1, 1, c1), P + 11, True, None),
        ("page_change_3_before_2", page(3, P + 30, stream, 3, 3, c3), P + 31, True, None),
        ("heartbeat_seq_3_while_behind", heartbeat(3, P + 35, stream), P + 36, True, None),
        ("page_changes_2_to_3", page(3, P + 40, stream, 2, 3, c2 + c3), P + 41, True, None),
        ("heartbeat_seq_3", heartbeat(3, P + 50, stream), P + 51, True, None),
        ("service_page", page(1, P + 55, service, 1, 1, [token_entry(SERVICE, h_device_token)]), P + 56, True, None),
        ("heartbeat_seq_3_untagged", heartbeat(3, P + 60, stream), P + 61, False, None),
        ("page_entry_on_other_partition", page(4, P + 70, stream, 4, 4, [token_entry(elsewhere, h3)]), P + 71, True, "entry_on_other_stream"),
        ("page_of_retired_type_21", page(4, P + 70, stream, 4, 4, c3), P + 71, True, "retired_message_type"),
        ("heartbeat_with_from", heartbeat(3, P + 70, stream), P + 71, True, "field_not_allowed"),
        ("page_signed_by_unknown_key", page(4, P + 70, stream, 4, 4, c3), P + 71, True, "unknown_key"),
    ]
    stranger = Hub()
    lst = tr.RevocationList(audience=DEVICE, service=False, capacity=64)
    messages = []
    for name, content, now, tagged, spoil in plan:
        payload = tr.encode_payload(content)
        signer = hub
        if spoil == "retired_message_type":
            payload = payload.replace(b"\x00\x14", b"\x00\x15", 1)  # {0: 20} -> {0: 21}
        elif spoil == "field_not_allowed":
            m = cbor2.loads(payload)
            m[tr.KEY_FROM] = 1
            payload = cbor2.dumps(m, canonical=True)
        elif spoil == "unknown_key":
            signer = stranger
        message = signer.sign(payload, tagged)
        # The script's own verifier first.
        try:
            decoded = tr.verify_stream_message(message, keys)
            verdict = None
        except tr.Refused as e:
            decoded, verdict = None, e.reason
        if verdict != spoil or (decoded is not None and decoded != content):
            sys.exit(f"make_revocations: {name}: Python's verifier says {verdict or decoded}, meant {spoil or content}")
        entry = {"name": name, "message_hex": message.hex(), "now": now}
        if spoil is None:
            entry |= {"expect": "valid", "reason": "", "decoded": decoded, "outcome": lst.apply(decoded, now), "state": lst.state()}
        else:
            entry |= {"expect": "invalid", "reason": spoil, "decoded": None, "outcome": None, "state": None}
        messages.append(entry)
        print(f"make_revocations: {name:32} {len(message):5} bytes  {entry['outcome'] or 'invalid ' + entry['reason']}")

    probes = [
        (h_copy, "app-7", P, True),  # by hash, and by subject
        (other, "app-7", P + 9, True),  # by subject only
        (other, "app-7", P + 10, False),  # issued in the cut-off second: not before it
        (h3, "app-x", P + 100, True),  # change 3, by hash
        (other, "app-9", P, False),  # addressed to the neighbour, not kept
        (h_device_token, "device-42", P, False),  # on the service stream only
    ]
    revoked = []
    for digest, subject, iat, want in probes:
        got = lst.is_revoked(digest, subject, iat)
        if got != want:
            sys.exit(f"make_revocations: the Python list says {got} for {subject}@{iat}, meant {want}")
        revoked.append({"token_hash_hex": digest.hex(), "subject": subject, "issued_at": iat, "revoked": got})
    fresh = [{"now": now, "fresh": lst.is_fresh(now)} for now in (P + 60 + MAX_AGE, P + 61 + MAX_AGE)]
    if [f["fresh"] for f in fresh] != [True, False]:
        sys.exit(f"make_revocations: the Python list's freshness is {fresh}")

    # Spec probes: each is refused by the script per PROTOCOL.md, and must be by Rust too.
    spec_probes = []
    odd_subject = page(4, P + 80, stream, 4, 4, [subject_entry(DEVICE, "app 7", P + 80)])
    big_entries = []
    big = page(4, P + 80, stream, 4, 4, big_entries)
    # A signed page is its payload plus 86 bytes once the payload takes a 3-byte head.
    while len(tr.encode_payload(big)) + 86 <= tr.MAX_PAGE_LEN:
        big_entries.append(token_entry(neighbour, hashlib.sha256(b"%d" % len(big_entries)).digest()))
    for name, content, section, reason in (
        ("subject_not_an_identifier", odd_subject, "§11.1 (subject is an identifier; CDDL entry = [1, id, id, uint, uint])", "invalid_subject"),
        ("page_over_16000_bytes", big, "§2.4 (a revocation page, the whole COSE_Sign1, is at most 16 000 bytes; receivers MUST refuse larger)", "too_large"),
    ):
        message = hub.sign(tr.encode_payload(content))
        try:
            tr.verify_stream_message(message, keys)
            sys.exit(f"make_revocations: Python accepts the spec probe {name}")
        except tr.Refused as e:
            if e.reason != reason:
                sys.exit(f"make_revocations: Python refuses {name} as {e.reason}, meant {reason}")
        spec_probes.append({"name": name, "message_hex": message.hex(), "protocol": section, "reason": reason})
        print(f"make_revocations: spec probe {name:22} {len(message):5} bytes  refused by Python: {reason}")

    out = {
        "hub_public_key_cose_hex": hub.public.hex(),
        "leeway": tr.DEFAULT_LEEWAY,
        "audience": DEVICE,
        "follows": "device",
        "capacity": 64,
        "streams": streams,
        "token_hashes": token_hashes,
        "messages": messages,
        "revoked": revoked,
        "fresh": fresh,
        "spec_probes": spec_probes,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"make_revocations: wrote {args.out}: {len(messages)} messages for {DEVICE} on {stream}, hub kid h'{hub.kid.hex()}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
