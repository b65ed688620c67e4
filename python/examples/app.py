"""A control app in Python: gets an access token for a device from the hub, presents it,
and checks what it got. Prints the presentation (hex) for the device, e.g. for
`tessera-agent verify --scope door:open HEX`.

    python app.py HOST PORT APP_ID APP_KEY.pem TRUST_ANCHOR DEVICE [SCOPE]

TRUST_ANCHOR is the hub's trust-anchor.pem or the COSE_Key hex `tessera-hub init` printed.
"""

import sys

import tessera


def main() -> int:
    host, port, app_id, key_file, anchor_arg, device = sys.argv[1:7]
    scope = sys.argv[7] if len(sys.argv) > 7 else "door:open"
    with open(key_file) as f:
        key = f.read()
    try:
        with open(anchor_arg) as f:
            anchor = f.read()
    except OSError:
        anchor = anchor_arg  # COSE_Key hex
    app = tessera.Client(host, int(port), app_id, key, anchor)
    try:
        token = app.access_token(device, scope)
        claims = tessera.verify_token(token.token, anchor, device, scope)
        print(f"token for {claims['aud']} ({claims['scope']}) until {claims['exp']}", file=sys.stderr)
        print(app.present(token).hex())
    except tessera.RefusedError as e:
        code, reason = e.args
        print(f"refused: {code}: {reason}", file=sys.stderr)
        return 1
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
