#!/usr/bin/env python3
"""Check Tessera's committed revocation vectors in Python, independently of the Rust core.

Usage: verify_revocation_vectors.py <revocation_vectors.json>

With ``tessera_revocation.py`` (pycose for ES256, cbor2 for values, the script's own strict
CBOR walk and PROTOCOL.md §11 rules), for the file's four parts:

* streams: the stream of every audience (§11.2: ``devices/`` and the first byte of
  SHA-256 of the device id in two lowercase hex digits; ``service/{name}``);
* tokens: the token hash (§6.6) of every token, re-encodings included, and its aud, sub
  and iat;
* messages: every COSE_Sign1 verified with the hub key named by its kid and its payload
  decoded per §11.3: a valid vector must decode to exactly its ``decoded`` content, an
  invalid one must be refused for its ``reason`` (``wrong_key`` counts as
  ``bad_signature``: without the other key the two cannot be told apart);
* lists: the verifier state of §11.5 after every step, which tokens are revoked, and
  freshness (§11.7), from the script's own list.

Where the libraries alone (pycose ``Sign1Message.decode`` + ``verify_signature`` with the
hub key, then ``cbor2.loads`` of the payload) accept an invalid vector for a CBOR reason
(trailing bytes, indefinite lengths, repeated keys), a ``LENIENT:`` line says so: the
script's strict walk refuses it. Rules of §11 (streams, ranges, keys, entry kinds) are
the application's to check; pycose and cbor2 know nothing of them.

The last line is ``N passed, M failed``; the exit status is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import cbor2
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

import tessera_revocation as tr

# Reasons the script reports as one when the vectors name two (see the docstring).
SAME_AS = {"wrong_key": "bad_signature"}
# Reasons about CBOR itself, where a library accepting the message is lenient.
CBOR_REASONS = {"trailing_bytes", "indefinite_length", "duplicate_key"}
KNOWN_REASONS = {
    "unknown_key",
    "bad_signature",
    "wrong_key",
    "entry_on_other_stream",
    "page_range",
    "unknown_payload_key",
    "field_not_allowed",
    "unknown_entry_kind",
    "invalid_audience",
    "invalid_stream",
    "trailing_bytes",
    "retired_message_type",
    "indefinite_length",
    "duplicate_key",
    "missing_max_age",
    "missing_to",
    "invalid_token_hash",
    "entry_length",
}


class Run:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.lenient: list[str] = []

    def record(self, ok: bool, line: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(("ok    " if ok else "FAIL  ") + line)
        return ok


def libraries_accept(message: bytes, key: CoseKey) -> tuple[bool, str]:
    """What pycose and cbor2 alone make of a message: (accepted, why not)."""
    try:
        if message[:1] == b"\xd2":
            msg = Sign1Message.decode(message)
        else:
            msg = Sign1Message.from_cose_obj(cbor2.loads(message), True)
        msg.key = key
        if not msg.verify_signature():
            return False, "pycose: the signature does not verify"
        payload = cbor2.loads(msg.payload)
    except Exception as e:  # noqa: BLE001 - any library error is a refusal
        return False, f"{type(e).__name__}: {e}"
    if not isinstance(payload, dict):
        return False, "cbor2: the payload is not a map"
    return True, ""


def check_streams(vectors: dict, run: Run) -> None:
    for s in vectors["streams"]:
        aud, want = s["audience"], s["stream"]
        got = tr.device_stream(aud) if s["follows"] == "device" else tr.service_stream(aud)
        run.record(got == want, f"stream  {aud}: {got} (vectors: {want})")


def check_tokens(vectors: dict, run: Run) -> None:
    by_name = {t["name"]: t for t in vectors["tokens"]}
    for t in vectors["tokens"]:
        token = bytes.fromhex(t["token_hex"])
        got = tr.token_hash(token).hex()
        note = f" (a re-encoding of {t['same_token_as']})" if t["same_token_as"] else ""
        run.record(got == t["token_hash_hex"], f"hash    {t['name']}{note}: {got[:16]}… (vectors: {t['token_hash_hex'][:16]}…)")
        if t["same_token_as"]:
            original = by_name[t["same_token_as"]]
            run.record(
                token.hex() != original["token_hex"] and got == tr.token_hash(bytes.fromhex(original["token_hex"])).hex(),
                f"hash    {t['name']}: other bytes than {original['name']}, same hash",
            )
        if t["audience"] is not None:
            try:
                claims = tr.token_claims(token)
            except tr.Refused as e:
                run.record(False, f"claims  {t['name']}: {e}")
                continue
            want = {"audience": t["audience"], "subject": t["subject"], "issued_at": t["issued_at"]}
            run.record(claims == want, f"claims  {t['name']}: {claims}")


def check_messages(vectors: dict, keys: dict, hub: CoseKey, run: Run) -> dict[str, dict]:
    """Checks every message vector; returns the decoded valid ones by name."""
    decoded_ok: dict[str, dict] = {}
    for m in vectors["messages"]:
        name, expect, reason = m["name"], m["expect"], m["reason"]
        message = bytes.fromhex(m["message_hex"])
        if expect not in ("valid", "invalid") or (expect == "invalid" and reason not in KNOWN_REASONS):
            run.record(False, f"message {name}: unknown expectation {expect!r} / reason {reason!r}")
            continue
        try:
            got: Any = tr.verify_stream_message(message, keys)
            verdict = "valid"
        except tr.Refused as e:
            got, verdict = e, "invalid"
        if expect == "valid":
            if verdict != "valid":
                run.record(False, f"message {name}: valid, but refused: {got}")
            elif got != m["decoded"]:
                run.record(False, f"message {name}: decodes to {json.dumps(got)}, vectors say {json.dumps(m['decoded'])}")
            else:
                decoded_ok[name] = got
                run.record(True, f"message {name}: valid {got['type']} seq {got['seq']} on {got['stream']}, same content")
            continue
        want = SAME_AS.get(reason, reason)
        if verdict == "valid":
            run.record(False, f"message {name}: must be refused ({reason}), but decodes to {json.dumps(got)}")
            continue
        run.record(got.reason == want, f"message {name}: refused, {got.reason} ({got.detail}); vectors: {reason}")
        accepted, why = libraries_accept(message, hub)
        if reason in CBOR_REASONS:
            if accepted:
                run.lenient.append(name)
                print(f"LENIENT: pycose + cbor2.loads accept {name} ({reason}); the strict walk refuses it")
            else:
                print(f"        the libraries refuse {name} too: {why}")
    return decoded_ok


def check_lists(vectors: dict, decoded: dict[str, dict], run: Run) -> None:
    tokens = {t["name"]: t for t in vectors["tokens"]}
    for case in vectors["lists"]:
        name = case["name"]
        lst = tr.RevocationList(
            audience=case["audience"],
            service=case["follows"] == "service",
            capacity=case["capacity"],
            leeway=vectors["leeway"],
        )
        for i, step in enumerate(case["steps"]):
            d = decoded.get(step["message"])
            if d is None:
                run.record(False, f"list    {name} step {i}: {step['message']} is not a valid message")
                break
            outcome = lst.apply(d, step["now"])
            state = lst.state()
            ok = outcome == step["outcome"] and state == step["state"]
            run.record(
                ok,
                f"list    {name} step {i} {step['message']}: {outcome} {json.dumps(state)}"
                + ("" if ok else f"; vectors: {step['outcome']} {json.dumps(step['state'])}"),
            )
        for probe in case["revoked"]:
            t = tokens[probe["token"]]
            got = lst.is_revoked(tr.token_hash(bytes.fromhex(t["token_hex"])), t["subject"], t["issued_at"])
            run.record(got == probe["revoked"], f"list    {name}: {probe['token']} revoked: {got} (vectors: {probe['revoked']})")
        for f in case["fresh"]:
            got = lst.is_fresh(f["now"])
            run.record(got == f["fresh"], f"list    {name}: fresh at {f['now']}: {got} (vectors: {f['fresh']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vectors", help="path to revocation_vectors.json")
    args = ap.parse_args()
    try:
        with open(args.vectors, encoding="utf-8") as f:
            vectors = json.load(f)
        raw_key = bytes.fromhex(vectors["hub_public_key_cose_hex"])
    except (OSError, ValueError, KeyError) as e:
        print(f"verify_revocation_vectors: cannot read {args.vectors}: {e}", file=sys.stderr)
        print("0 passed, 1 failed")
        return 2

    run = Run()
    params = tr.strict_loads(raw_key)
    kid = params.get(2)
    run.record(
        kid is not None and kid.hex() == vectors["hub_kid_hex"] and (params.get(1), params.get(3), params.get(-1)) == (2, tr.ES256, 1),
        f"hub key: EC2 P-256 ES256, kid {kid.hex() if kid else None}",
    )
    hub = CoseKey.decode(raw_key)
    keys = {kid: hub}
    run.record(
        (vectors["leeway"], vectors["default_max_age"]) == (tr.DEFAULT_LEEWAY, tr.DEFAULT_MAX_AGE),
        f"leeway {vectors['leeway']} s, default max_age {vectors['default_max_age']} s (PROTOCOL §11.6, §11.7)",
    )

    check_streams(vectors, run)
    check_tokens(vectors, run)
    decoded = check_messages(vectors, keys, hub, run)
    check_lists(vectors, decoded, run)

    n_valid = sum(m["expect"] == "valid" for m in vectors["messages"])
    print()
    print(
        f"revocation vectors: {len(vectors['streams'])} streams, {len(vectors['tokens'])} tokens, "
        f"{len(vectors['messages'])} messages ({n_valid} valid), {len(vectors['lists'])} lists; "
        f"libraries lenient on: {', '.join(run.lenient) or '-'}"
    )
    print(f"{run.passed} passed, {run.failed} failed")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
