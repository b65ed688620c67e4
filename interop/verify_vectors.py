#!/usr/bin/env python3
"""Verify Tessera's committed token vectors with two independent Python libraries.

Usage: verify_vectors.py <vectors.json>

Every case is checked with:

* pycose -- a COSE library only: it decodes the COSE_Sign1 and checks the ES256
  signature with the issuer's COSE_Key (and refuses a protected ``alg`` that
  conflicts with the key's ``alg``). It knows nothing about CWT claims, so this
  script does what an application using pycose must do itself: pick the key by
  the protected ``kid``, decode the claims, and check exp/nbf (30 s leeway, the
  core's default) and aud against the case's ``now`` and ``audience``.

* cwt -- ``cwt.CWT.decode`` with the issuer key as a COSEKey, leeway 30 s, the
  clock set to the case's ``now`` with time-machine (cwt 3.3.0 reads
  ``datetime.now()`` and offers no way to pass "now"). cwt 3.3.0 has no audience
  option, so the script checks aud on the claims cwt returns. cwt verifies with
  the *key's* algorithm and never compares the protected ``alg`` with it, so the
  script also checks protected alg == -7 after cwt accepts; whenever that check
  is what refused a token, a NOTE line says that cwt alone accepted it.

Expectations:
* ``valid``: both libraries accept (and decode the same claims).
* ``invalid`` with a signature/key/algorithm/time/audience reason: both refuse.
* ``invalid`` with a structural reason: recorded, never a failure; a library
  that accepts it gets a ``LENIENT:`` line.

The last line is ``N passed, M failed``; the exit status is non-zero on any
failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import cbor2
import cwt
import time_machine
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

LEEWAY_S = 30  # the core's default clock-skew leeway
ES256 = -7
TAG_CWT = 61
TAG_SIGN1 = 18

# Reasons every independent verifier must refuse.
MUST_REFUSE = {
    "expired",
    "not_yet_valid",
    "wrong_audience",
    "bad_signature",
    "wrong_key",
    "unsupported_algorithm",
}
# Reasons where the Rust core is stricter than COSE/CWT require: only recorded.
STRUCTURAL = {
    "trailing_bytes",
    "truncated",
    "duplicate_claim",
    "unprotected_alg",
    "missing_exp",
    "missing_cnf",
    "unknown_critical_header",
    "indefinite_length",
}

LIBS = ("pycose", "cwt")


@dataclass
class Outcome:
    """What one library (plus the script's own application checks) made of a token."""

    lib_ok: bool  # the library itself decoded and verified the token
    lib_error: str = ""  # why the library refused
    script_error: str = ""  # why the script's own checks refused (only if lib_ok)
    claims: Optional[dict] = None

    @property
    def accepted(self) -> bool:
        return self.lib_ok and not self.script_error

    def describe(self, lib: str) -> str:
        if not self.lib_ok:
            return f"refused by {lib}: {self.lib_error}"
        if self.script_error:
            return f"{lib} accepted, refused by the script's check: {self.script_error}"
        return f"accepted by {lib}"


@dataclass
class Tally:
    passed: int = 0
    failed: int = 0
    refused_by_lib: list = field(default_factory=list)
    refused_by_script: list = field(default_factory=list)
    lenient: list = field(default_factory=list)
    strict: list = field(default_factory=list)


def err(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- helpers


def unwrap(obj: Any) -> Any:
    """Strip an optional tag 61 and an optional tag 18 from a decoded token."""
    if isinstance(obj, cbor2.CBORTag) and obj.tag == TAG_CWT:
        obj = obj.value
    if isinstance(obj, cbor2.CBORTag) and obj.tag == TAG_SIGN1:
        obj = obj.value
    return obj


def protected_header(token: bytes) -> dict:
    """The decoded protected header of a (possibly tagged) COSE_Sign1."""
    arr = unwrap(cbor2.loads(token))
    if not isinstance(arr, list) or len(arr) != 4 or not isinstance(arr[0], bytes):
        raise ValueError("not a COSE_Sign1 array")
    hdr = cbor2.loads(arr[0]) if arr[0] else {}
    if not isinstance(hdr, dict):
        raise ValueError("protected header is not a map")
    return hdr


def claim_checks(claims: Any, now: int, audience: str) -> str:
    """The application-level claim checks the libraries leave to their caller.

    Returns "" when the claims pass, else the reason. Only exp, nbf and aud:
    presence rules (exp, cnf, ...) are the core's own and stay structural.
    """
    if not isinstance(claims, dict):
        return "claims are not a CBOR map"
    exp = claims.get(4)
    if exp is not None:
        if not isinstance(exp, (int, float)):
            return f"exp is not a number: {exp!r}"
        if now >= exp + LEEWAY_S:  # the core's rule: expired from exp + leeway on
            return f"expired (exp {exp} + {LEEWAY_S}s <= now {now})"
    nbf = claims.get(5)
    if nbf is not None:
        if not isinstance(nbf, (int, float)):
            return f"nbf is not a number: {nbf!r}"
        if now < nbf - LEEWAY_S:
            return f"not yet valid (nbf {nbf} > now {now} + {LEEWAY_S}s)"
    aud = claims.get(3)
    if aud is None:
        return "no aud claim"
    if isinstance(aud, str):
        ok = aud == audience
    elif isinstance(aud, list):
        ok = audience in aud
    else:
        return f"aud is neither text nor array: {aud!r}"
    if not ok:
        return f"aud {aud!r} != expected {audience!r}"
    return ""


# --------------------------------------------------------------------------- pycose


def pycose_sign1(token: bytes) -> Sign1Message:
    """Decode with pycose, accepting the optional outer tag 61 the core accepts."""
    data = token
    if data[:2] == b"\xd8\x3d":  # tag 61 (CWT), minimal encoding: pycose only knows COSE tags
        data = data[2:]
    if data[:1] == b"\xd2":  # tag 18: pycose's own entry point
        msg = Sign1Message.decode(data)
    else:  # untagged COSE_Sign1 (the core accepts tag 18 as optional)
        obj = cbor2.loads(data)
        if not isinstance(obj, list):
            raise ValueError("not a COSE_Sign1")
        msg = Sign1Message.from_cose_obj(obj, True)
    return msg


def verify_pycose(token: bytes, key: CoseKey, kid: bytes, now: int, audience: str) -> Outcome:
    try:
        msg = pycose_sign1(token)
        msg.key = key
        if not msg.verify_signature():
            return Outcome(False, "signature does not verify")
    except Exception as e:  # noqa: BLE001 - any library error is a refusal
        return Outcome(False, err(e))
    # From here on: what an application using pycose does itself.
    try:
        p_kid = protected_header(token).get(4)
    except Exception as e:  # noqa: BLE001
        return Outcome(True, script_error=f"protected header: {err(e)}")
    if p_kid != kid:
        return Outcome(True, script_error=f"protected kid {p_kid!r} is not the issuer's {kid.hex()}")
    try:
        claims = cbor2.loads(msg.payload)
    except Exception as e:  # noqa: BLE001
        return Outcome(True, script_error=f"payload is not CBOR: {err(e)}")
    return Outcome(True, script_error=claim_checks(claims, now, audience), claims=claims)


# --------------------------------------------------------------------------- cwt


def verify_cwt(token: bytes, key: Any, now: int, audience: str) -> Outcome:
    try:
        ctx = cwt.CWT.new(leeway=LEEWAY_S)
        # cwt reads the clock itself (datetime.now); travel to the case's "now".
        with time_machine.travel(now, tick=False):
            claims = ctx.decode(token, key)
    except Exception as e:  # noqa: BLE001 - any library error is a refusal
        return Outcome(False, err(e))
    # cwt 3.3.0 has no audience option, and ignores the protected alg (it
    # verifies with the key's alg): both are the application's job.
    script_error = ""
    try:
        alg = protected_header(token).get(1)
        if alg != ES256:
            script_error = f"protected alg {alg!r} is not ES256 (-7)"
    except Exception as e:  # noqa: BLE001
        script_error = f"protected header: {err(e)}"
    if not script_error:
        script_error = claim_checks(claims, now, audience)
    return Outcome(True, script_error=script_error, claims=claims)


# --------------------------------------------------------------------------- main


def load_issuer(vectors: dict) -> tuple[CoseKey, Any, bytes, str]:
    """Issuer key for pycose and cwt, its kid, and a PEM/COSE consistency error ("" if none)."""
    raw = bytes.fromhex(vectors["issuer_public_key_cose_hex"])
    pk = CoseKey.decode(raw)
    ck = cwt.COSEKey.from_bytes(raw)
    params = cbor2.loads(raw)
    kid = params.get(2, b"")
    problem = ""
    pem = vectors.get("issuer_public_key_pem", "")
    try:
        pub = serialization.load_pem_public_key(pem.encode())
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            problem = "PEM key is not a P-256 key"
        else:
            n = pub.public_numbers()
            if (n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")) != (params.get(-2), params.get(-3)):
                problem = "PEM and COSE_Key are different keys"
    except Exception as e:  # noqa: BLE001
        problem = f"cannot load the PEM key: {err(e)}"
    if not problem and (params.get(1), params.get(-1), params.get(3)) != (2, 1, ES256):
        problem = f"COSE_Key is not EC2/P-256/ES256: kty={params.get(1)} crv={params.get(-1)} alg={params.get(3)}"
    return pk, ck, kid, problem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vectors", help="path to vectors.json")
    args = ap.parse_args()
    try:
        with open(args.vectors, encoding="utf-8") as f:
            vectors = json.load(f)
        cases = vectors["cases"]
    except (OSError, ValueError, KeyError) as e:
        print(f"verify_vectors: cannot read {args.vectors}: {err(e)}", file=sys.stderr)
        print("0 passed, 1 failed")
        return 2

    tallies = {lib: Tally() for lib in LIBS}
    passed = failed = 0

    def record(ok: bool, line: str) -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
        print(("ok    " if ok else "FAIL  ") + line)

    try:
        pk, ck, kid, key_problem = load_issuer(vectors)
    except Exception as e:  # noqa: BLE001
        print(f"verify_vectors: cannot load the issuer key: {err(e)}", file=sys.stderr)
        print("0 passed, 1 failed")
        return 2
    record(not key_problem, f"issuer key: {key_problem or 'PEM and COSE_Key agree (EC2 P-256, ES256), kid ' + kid.hex()}")
    if not cases:
        record(False, "vectors contain no cases")

    for case in cases:
        name, expect, reason = case.get("name", "?"), case.get("expect"), case.get("reason", "")
        try:
            token = bytes.fromhex(case["token_hex"])
            now, audience = int(case["now"]), case["audience"]
        except (KeyError, ValueError, TypeError) as e:
            record(False, f"{name}: malformed case: {err(e)}")
            continue
        if expect not in ("valid", "invalid") or (expect == "invalid" and reason not in MUST_REFUSE | STRUCTURAL):
            record(False, f"{name}: unknown expectation {expect!r} / reason {reason!r}")
            continue
        label = f"{name} ({reason})" if reason else name
        outcomes = {
            "pycose": verify_pycose(token, pk, kid, now, audience),
            "cwt": verify_cwt(token, ck, now, audience),
        }
        for lib, out in outcomes.items():
            t = tallies[lib]
            desc = out.describe(lib)
            if expect == "valid":
                ok = out.accepted
                record(ok, f"{lib:6} {label}: {desc}")
            elif reason in MUST_REFUSE:
                ok = not out.accepted
                record(ok, f"{lib:6} {label}: {desc}")
                if ok and out.lib_ok:
                    t.refused_by_script.append(name)
                    if lib == "cwt" and reason == "unsupported_algorithm":
                        print(f"NOTE: cwt.decode alone accepts {name} ({reason}): it verifies with the key's "
                              "algorithm and ignores the protected alg; refused by the script's alg check")
                elif ok:
                    t.refused_by_lib.append(name)
            else:  # structural: record, never fail
                ok = True
                record(ok, f"{lib:6} {label}: {desc}")
                if out.lib_ok:
                    t.lenient.append(name)
                    print(f"LENIENT: {lib} accepts {name} ({reason}); the Rust core refuses it")
                else:
                    t.strict.append(name)
            if ok:
                t.passed += 1
            else:
                t.failed += 1
        if expect == "valid" and all(o.accepted for o in outcomes.values()):
            same = outcomes["pycose"].claims == outcomes["cwt"].claims
            record(same, f"both   {label}: pycose and cwt decode {'the same' if same else 'DIFFERENT'} claims")

    print()
    for lib in LIBS:
        t = tallies[lib]
        print(
            f"{lib}: {t.passed} as expected, {t.failed} failed; "
            f"refused itself: {', '.join(t.refused_by_lib) or '-'}; "
            f"refused by the script's own checks: {', '.join(t.refused_by_script) or '-'}; "
            f"structural refused: {', '.join(t.strict) or '-'}; "
            f"lenient on: {', '.join(t.lenient) or '-'}"
        )
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
