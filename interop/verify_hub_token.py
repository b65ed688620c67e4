#!/usr/bin/env python3
"""Verify a token issued by a running Tessera hub with the Python `cwt` package, given only
the hub's trust anchor as `tessera-hub init` printed it.

Usage:
  verify_hub_token.py (--anchor-pem FILE | --anchor-cose-hex HEX) --token-hex HEX
                      --audience AUD [--issuer ISS] [--scope SCOPE]

The anchor is either the SPKI PEM file that init wrote (trust-anchor.pem) or the COSE_Key
hex that it printed. A PEM carries no kid, so the script derives the one Tessera uses (the
first 8 bytes of the RFC 9679 thumbprint) and refuses a COSE_Key whose kid differs.

Checks, in order:
* cwt 3.3.0 ``CWT.decode`` with the anchor (30 s leeway, the real clock): the ES256
  signature, exp and nbf;
* what cwt leaves to its caller: protected alg is ES256 (-7) and protected kid is the
  anchor's; the unprotected header is empty; aud equals --audience; iss equals --issuer;
  the scope grants --scope (equal tokens, or ``res:*`` covering ``res:action``); cnf is
  ``{1: COSE_Key}`` of an EC2 P-256 key; iat is not in the future;
* pycose verifies the signature once more, independently of cwt.

On success prints one JSON object with the claims (bytes as hex) and exits 0; otherwise
prints ``REFUSED: <reason>`` on stderr and exits 1. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import cbor2
import cwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

ES256 = -7
LEEWAY_S = 30
KID_LEN = 8


class Refused(Exception):
    """The token is not acceptable."""


def thumbprint_kid(x: bytes, y: bytes) -> bytes:
    """First 8 bytes of the RFC 9679 thumbprint of an EC2 P-256 key."""
    return hashlib.sha256(cbor2.dumps({1: 2, -1: 1, -2: x, -3: y}, canonical=True)).digest()[:KID_LEN]


def anchor_from_pem(path: str) -> dict:
    with open(path, "rb") as f:
        key = serialization.load_pem_public_key(f.read())
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise Refused(f"{path} is not a P-256 public key")
    n = key.public_numbers()
    x, y = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
    return {1: 2, 2: thumbprint_kid(x, y), 3: ES256, -1: 1, -2: x, -3: y}


def anchor_from_cose_hex(text: str) -> dict:
    params = cbor2.loads(bytes.fromhex(text))
    if not isinstance(params, dict) or (params.get(1), params.get(-1)) != (2, 1):
        raise Refused("the COSE_Key is not an EC2 P-256 key")
    x, y = params.get(-2), params.get(-3)
    kid = thumbprint_kid(x, y)
    if params.get(2, kid) != kid:
        raise Refused(f"the COSE_Key's kid {params[2].hex()} is not its thumbprint {kid.hex()}")
    if params.get(3, ES256) != ES256:
        raise Refused(f"the COSE_Key's alg is {params.get(3)}, not ES256")
    return {1: 2, 2: kid, 3: ES256, -1: 1, -2: x, -3: y}


def grants(granted: str, required: str) -> bool:
    """Whether a scope string grants one required scope token (PROTOCOL.md §6.3)."""
    for token in granted.split(" "):
        if token == required:
            return True
        if token.endswith(":*") and required.startswith(token[:-1]) and len(required) > len(token) - 1:
            return True
    return False


def hexify(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): hexify(x) for k, x in v.items()}
    if isinstance(v, list):
        return [hexify(x) for x in v]
    return v


def verify(token: bytes, anchor: dict, audience: str, issuer: str | None, scope: str | None) -> dict:
    kid = anchor[2]
    # 1. cwt: signature, exp, nbf.
    try:
        claims = cwt.CWT.new(leeway=LEEWAY_S).decode(token, cwt.COSEKey.new(dict(anchor)))
    except Exception as e:  # noqa: BLE001 - any library error is a refusal
        raise Refused(f"cwt: {type(e).__name__}: {e}") from e
    if not isinstance(claims, dict):
        raise Refused(f"cwt returned {type(claims).__name__}, not a claims map")

    # 2. What cwt leaves to the application.
    top = cbor2.loads(token)
    if isinstance(top, cbor2.CBORTag) and top.tag == 18:
        top = top.value
    protected, unprotected, _payload, signature = top
    header = cbor2.loads(protected)
    if header.get(1) != ES256:
        raise Refused(f"protected alg is {header.get(1)!r}, not ES256")
    if header.get(4) != kid:
        raise Refused(f"protected kid {header.get(4)!r} is not the anchor's {kid.hex()}")
    if unprotected != {}:
        raise Refused(f"unprotected header is not empty: {unprotected!r}")
    if len(signature) != 64:
        raise Refused(f"signature is {len(signature)} bytes, not r||s")
    if claims.get(3) != audience:
        raise Refused(f"aud {claims.get(3)!r} is not {audience!r}")
    if issuer is not None and claims.get(1) != issuer:
        raise Refused(f"iss {claims.get(1)!r} is not {issuer!r}")
    if scope is not None and not grants(str(claims.get(9, "")), scope):
        raise Refused(f"scope {claims.get(9)!r} does not grant {scope!r}")
    if not isinstance(claims.get(6), int) or claims[6] > time.time() + LEEWAY_S:
        raise Refused(f"iat {claims.get(6)!r} is missing or in the future")
    cnf = claims.get(8)
    if not isinstance(cnf, dict) or list(cnf) != [1] or not isinstance(cnf[1], dict):
        raise Refused(f"cnf is not {{1: COSE_Key}}: {cnf!r}")
    holder = cnf[1]
    if (holder.get(1), holder.get(-1)) != (2, 1) or len(holder.get(-2, b"")) != 32 or len(holder.get(-3, b"")) != 32:
        raise Refused("cnf is not an EC2 P-256 key")

    # 3. pycose, independently of cwt.
    message = Sign1Message.decode(token if token[:1] == b"\xd2" else cbor2.dumps(cbor2.CBORTag(18, top)))
    message.key = CoseKey.decode(cbor2.dumps(anchor))
    if not message.verify_signature():
        raise Refused("pycose: the signature does not verify")
    return claims


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    anchor = ap.add_mutually_exclusive_group(required=True)
    anchor.add_argument("--anchor-pem", help="trust-anchor.pem as init wrote it")
    anchor.add_argument("--anchor-cose-hex", help="the COSE_Key hex init printed")
    ap.add_argument("--token-hex", required=True)
    ap.add_argument("--audience", required=True)
    ap.add_argument("--issuer")
    ap.add_argument("--scope", help="a scope token the token must grant")
    args = ap.parse_args()
    try:
        key = anchor_from_pem(args.anchor_pem) if args.anchor_pem else anchor_from_cose_hex(args.anchor_cose_hex)
        claims = verify(bytes.fromhex(args.token_hex), key, args.audience, args.issuer, args.scope)
    except Exception as e:  # noqa: BLE001 - whatever fails, the token is not accepted
        print(f"REFUSED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    names = {1: "iss", 2: "sub", 3: "aud", 4: "exp", 5: "nbf", 6: "iat", 7: "cti", 8: "cnf", 9: "scope"}
    print(json.dumps({names.get(k, str(k)): hexify(v) for k, v in claims.items()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
