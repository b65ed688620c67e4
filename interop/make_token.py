#!/usr/bin/env python3
"""Issue a Tessera-shaped token with the Python `cwt` library, for the Rust core to verify.

Usage: make_token.py <out.json>

Generates a fresh issuer P-256 key and a fresh holder P-256 key, and signs a CWT
(COSE_Sign1, tag 18, ES256) carrying iss, sub, aud, exp (now + 600), nbf, iat,
cti (16 random bytes), cnf {1: holder COSE_Key} and scope.

Headers: cwt's high-level ``CWT.encode_and_sign`` always puts ``kid`` in the
*unprotected* header (its COSE context has kid_auto_inclusion=True) and offers no
way to pass headers, while Tessera requires protected = {1: -7, 4: kid} and an
empty unprotected header. So the claims are validated with ``cwt.Claims`` and
serialised the way ``CWT.encode_and_sign`` does (a plain CBOR map), and the
COSE_Sign1 is built and signed by cwt's ``COSE.encode_and_sign`` with automatic
alg/kid inclusion off and explicit header maps. cwt emits tag 18 and, since
``tagged`` is not asked for, no CWT tag 61. The script checks the result's
layout and verifies it with cwt and pycose before writing it.

The issuer kid is the first 8 bytes of the RFC 9679 COSE Key thumbprint:
SHA-256 of the deterministic CBOR map {1: 2, -1: 1, -2: x, -3: y}.

Writes JSON: issuer_public_key_cose_hex, issuer_public_key_pem, token_hex, now,
audience, required_scope, issuer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

import cbor2
import cwt
import time_machine
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

ISSUER = "hub.python-interop"
SUBJECT = "app:python-interop"
AUDIENCE = "device:python-interop-01"
SCOPE = "door:open telemetry:read"
REQUIRED_SCOPE = "door:open"
LIFETIME_S = 600
ES256 = -7
KID_LEN = 8


def new_p256() -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_numbers()
    return (
        key,
        pub.x.to_bytes(32, "big"),
        pub.y.to_bytes(32, "big"),
        key.private_numbers().private_value.to_bytes(32, "big"),
    )


def thumbprint_kid(x: bytes, y: bytes) -> bytes:
    """First 8 bytes of the RFC 9679 thumbprint of an EC2 P-256 key."""
    required = cbor2.dumps({1: 2, -1: 1, -2: x, -3: y}, canonical=True)
    expected = bytes.fromhex("a401022001215820") + x + bytes.fromhex("225820") + y
    assert required == expected, "thumbprint input is not the deterministic encoding"
    return hashlib.sha256(required).digest()[:KID_LEN]


def public_cose_key(kid: bytes, x: bytes, y: bytes) -> dict:
    """{1: 2, 2: kid, 3: -7, -1: 1, -2: x, -3: y} (kty EC2, crv P-256, alg ES256)."""
    return {1: 2, 2: kid, 3: ES256, -1: 1, -2: x, -3: y}


def diag(v: Any) -> str:
    """CBOR diagnostic notation (RFC 8949 §8) of a decoded value; bstr that hold CBOR are shown as <<...>>."""
    if isinstance(v, cbor2.CBORTag):
        return f"{v.tag}({diag(v.value)})"
    if isinstance(v, bytes):
        if v:
            try:
                inner = cbor2.loads(v)
                if isinstance(inner, (dict, list, cbor2.CBORTag)) and cbor2.dumps(inner) == v:
                    return f"<< {diag(inner)} >>"
            except Exception:  # noqa: BLE001 - not CBOR: show as hex
                pass
        return f"h'{v.hex()}'"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{diag(k)}: {diag(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(diag(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    if v is True or v is False:
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def self_check(token: bytes, kid: bytes, pub_cose: bytes, now: int) -> None:
    """Fail loudly if the token is not shaped as Tessera requires or does not verify."""
    top = cbor2.loads(token)
    if not isinstance(top, cbor2.CBORTag) or top.tag != 18:
        sys.exit(f"make_token: cwt did not emit a tag-18 COSE_Sign1 (got {diag(top)[:80]})")
    prot_bstr, unprot, _payload, sig = top.value
    if prot_bstr != cbor2.dumps({1: ES256, 4: kid}):
        sys.exit(f"make_token: protected header is {diag(prot_bstr)}, want {{1: -7, 4: h'{kid.hex()}'}}")
    if unprot != {}:
        sys.exit(f"make_token: unprotected header is not empty: {diag(unprot)}")
    if len(sig) != 64:
        sys.exit(f"make_token: signature is {len(sig)} bytes, want raw r||s (64)")
    with time_machine.travel(now, tick=False):
        claims = cwt.CWT.new(leeway=30).decode(token, cwt.COSEKey.from_bytes(pub_cose))
    if claims.get(3) != AUDIENCE:
        sys.exit("make_token: cwt decoded a different audience")
    msg = Sign1Message.decode(token)
    msg.key = CoseKey.decode(pub_cose)
    if not msg.verify_signature():
        sys.exit("make_token: pycose does not verify the token")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="path of the JSON file to write")
    args = ap.parse_args()

    now = int(time.time())
    issuer, ix, iy, id_ = new_p256()
    kid = thumbprint_kid(ix, iy)
    issuer_pub = public_cose_key(kid, ix, iy)
    issuer_pub_cose = cbor2.dumps(issuer_pub, canonical=True)
    signing_key = cwt.COSEKey.new({**issuer_pub, -4: id_})
    issuer_pem = issuer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()

    _holder, hx, hy, _hd = new_p256()
    holder_pub = public_cose_key(thumbprint_kid(hx, hy), hx, hy)

    claims = cwt.Claims.new(
        {
            1: ISSUER,
            2: SUBJECT,
            3: AUDIENCE,
            4: now + LIFETIME_S,
            5: now,
            6: now,
            7: os.urandom(16),
            8: {1: holder_pub},
            9: SCOPE,
        }
    ).to_dict()
    # What CWT.encode_and_sign does with its claims: one CBOR map, here in ascending key order.
    payload = cbor2.dumps(claims)

    cose = cwt.COSE.new(alg_auto_inclusion=False, kid_auto_inclusion=False)
    token = cose.encode_and_sign(payload, signing_key, protected={1: ES256, 4: kid}, unprotected={})
    self_check(token, kid, issuer_pub_cose, now)

    out = {
        "issuer_public_key_cose_hex": issuer_pub_cose.hex(),
        "issuer_public_key_pem": issuer_pem,
        "token_hex": token.hex(),
        "now": now,
        "audience": AUDIENCE,
        "required_scope": REQUIRED_SCOPE,
        "issuer": ISSUER,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")

    print(f"make_token: wrote {args.out}: {len(token)}-byte token, issuer kid h'{kid.hex()}', tag 18, no tag 61")
    print(diag(cbor2.loads(token)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
