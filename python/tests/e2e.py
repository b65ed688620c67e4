"""The Python package against a real hub (run by tests/tests/hub_python.rs, which starts
the hub and broker and registers the clients): access tokens, the cache, refusals as typed
exceptions, token checks, presentations and revocation by an operator.

Environment: TESSERA_HOST, TESSERA_PORT, TESSERA_TLS_CA (the broker's CA: TLS; unset:
plain MQTT), TESSERA_ANCHOR (a trust-anchor PEM file),
TESSERA_DEVICE, TESSERA_APP and TESSERA_APP_KEY, TESSERA_OPS and TESSERA_OPS_KEY (id and
PKCS#8 PEM file each). Prints one JSON line for the caller: the presentation and the token
(hex), and the revocation's counts.
"""

import json
import os
import sys

import tessera


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def main() -> None:
    env = os.environ
    host, port = env["TESSERA_HOST"], int(env["TESSERA_PORT"])
    anchor = read(env["TESSERA_ANCHOR"])
    device = env["TESSERA_DEVICE"]
    tls = {"tls_ca_file": env["TESSERA_TLS_CA"]} if env.get("TESSERA_TLS_CA") else {}

    app = tessera.Client(
        host, port, env["TESSERA_APP"], read(env["TESSERA_APP_KEY"]), anchor, **tls
    )
    token = app.access_token(device, "door:open")
    assert token.device == device and token.scope == "door:open", token
    again = app.access_token(device, "door:open")
    assert again.token == token.token, "the token held is reused before it is due"
    renewed = app.renew(device, "door:open")
    assert renewed.token != token.token, "renewed through the grant: a new token"

    claims = tessera.verify_token(renewed.token, anchor, device, "door:open")
    assert claims["sub"] == env["TESSERA_APP"] and claims["aud"] == device, claims
    for wrong in (dict(audience="another-device"), dict(audience=device, scope="door:unlock")):
        try:
            tessera.verify_token(renewed.token, anchor, **wrong)
        except tessera.InvalidTokenError:
            pass
        else:
            raise AssertionError(f"verify_token accepted {wrong}")
    try:
        app.access_token(device, "door:unlock")
    except tessera.RefusedError as e:
        code, reason = e.args
        assert code == "denied", e.args
        assert isinstance(e, tessera.TesseraError)
    else:
        raise AssertionError("a scope no rule grants was issued")
    try:
        tessera.Client(host, port, "x", "not a key", anchor, **tls)
    except tessera.InvalidKeyError:
        pass
    else:
        raise AssertionError("a garbage key was taken")

    presentation = app.present(renewed)
    app.close()

    ops = tessera.Client(
        host, port, env["TESSERA_OPS"], read(env["TESSERA_OPS_KEY"]), anchor, **tls
    )
    revoked = ops.revoke("token_hash", token.hash.hex())
    ops.close()
    print(json.dumps({
        "presentation": presentation.hex(),
        "token": renewed.token.hex(),
        "revoked": list(revoked),
    }))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"assertion failed: {e}", file=sys.stderr)
        sys.exit(1)
