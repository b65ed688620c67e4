//! Prints the examples appendix of `docs/PROTOCOL.md` as markdown.
//!
//! ```text
//! cargo run -p tessera-shared --example protocol_examples                     # print them
//! cargo run -p tessera-shared --example protocol_examples -- --update docs/PROTOCOL.md
//! cargo run -p tessera-shared --example protocol_examples -- --check docs/PROTOCOL.md
//! ```
//!
//! The output belongs between the `BEGIN GENERATED EXAMPLES` and `END GENERATED EXAMPLES`
//! markers of the document: `--update` rewrites that part of the file in place, `--check`
//! exits with status 1 if it differs. The output is the same byte for byte on every run: the
//! keys are fixed scalars, the times, nonces, token ids and grants are constants, and ES256
//! with the `p256` backend is deterministic (RFC 6979).
//!
//! Nothing here is written by hand: every message is built with the `tessera-shared` codecs,
//! then decoded and verified again with them before it is printed, and every diagnostic
//! notation block is parsed back (`cbor-diag`) and must re-encode to the exact payload bytes.
//! A mismatch aborts the program rather than print a wrong example.

use std::fmt::Write as _;
use std::process::ExitCode;

use cbor_diag::{DataItem, IntegerWidth};
use hkdf::Hkdf;
use sha2::Sha256;
use tessera_shared::claims::Claims;
use tessera_shared::cose::{self, Sign1};
use tessera_shared::crypto::{self, COSE_KEY_LEN, P256Signer, PublicKey, Signer};
use tessera_shared::keyset::{KeySet, KeySetOutcome};
use tessera_shared::message::{
    Command, Control, EnrollmentCode, ErrorCode, IdList, NONCE_LEN, Operation, Presentation,
    Request, RequestBody, Response, ResponseBody, RevokeTarget, SignedPresentation, SignedRequest,
    SignedResponse, WireError,
};
use tessera_shared::record::{self, RecordKey};
use tessera_shared::revocation::{
    self, Addressed, Bounded, Entry, HeartbeatOutcome, Page, PageOutcome, RevocationList, Stream,
    StreamMessage,
};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;

/// 2026-01-01T00:00:00Z: every time in the examples is an offset from it.
const T0: u64 = 1_767_225_600;

const HUB: &str = "hub-1";
const DEVICE: &str = "device-42";
const APP: &str = "app-7";
const OPERATOR: &str = "operator-1";
/// The audience of the example device token: a service the device calls.
const SERVICE: &str = "svc.telemetry";

const DEVICE_SCOPE: &str = "telemetry:write config:read";
const ACCESS_SCOPE: &str = "door:open";

const DEVICE_TOKEN_LIFETIME: u64 = 900;
const ACCESS_TOKEN_LIFETIME: u64 = 300;
const GRANT_LIFETIME: u64 = 86_400;
/// The hub's clock-skew leeway, added to the expiry of every revocation entry.
const LEEWAY: u64 = 30;
/// The hub's heartbeat interval.
const HEARTBEAT_INTERVAL: u64 = 30;

/// A group and a role of the example policy, for the revoke examples.
const GROUP: &str = "building-a";
const ROLE: &str = "controller";
/// A second device, for the device-list revoke example.
const OTHER_DEVICE: &str = "device-43";

/// The one-time enrollment code printed for the device.
const ENROLLMENT_CODE: &str = "K7QFM-2XD9W-PLR4T-HN6JA";

/// Largest buffer any example needs.
const BUF: usize = 4096;

/// A scalar made of one repeated byte; every one used here is a valid P-256 private key.
fn key(byte: u8) -> P256Signer {
    P256Signer::from_scalar(&[byte; 32]).expect("a valid example scalar")
}

/// Sixteen bytes counting up from `first`: the example nonces and token ids.
fn counting<const N: usize>(first: u8) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = first.wrapping_add(u8::try_from(i).expect("small index"));
    }
    out
}

// ----- formatting -------------------------------------------------------------------------

/// Hex in lines of `per_line` bytes.
fn hex_lines(bytes: &[u8], per_line: usize) -> String {
    bytes
        .chunks(per_line)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fenced block of wrapped hex.
fn hex_block(bytes: &[u8]) -> String {
    format!("```text\n{}\n```\n", hex_lines(bytes, 32))
}

/// Forgets how each integer and length was encoded, so the notation shows plain values (the
/// encoding is always the shortest one, which is also what the parser assumes).
fn plain(item: DataItem) -> DataItem {
    match item {
        DataItem::Integer { value, .. } => DataItem::Integer {
            value,
            bitwidth: IntegerWidth::Unknown,
        },
        DataItem::Negative { value, .. } => DataItem::Negative {
            value,
            bitwidth: IntegerWidth::Unknown,
        },
        DataItem::ByteString(mut b) => {
            b.bitwidth = IntegerWidth::Unknown;
            DataItem::ByteString(b)
        }
        DataItem::TextString(mut t) => {
            t.bitwidth = IntegerWidth::Unknown;
            DataItem::TextString(t)
        }
        DataItem::Array { data, .. } => DataItem::Array {
            data: data.into_iter().map(plain).collect(),
            bitwidth: Some(IntegerWidth::Unknown),
        },
        DataItem::Map { data, .. } => DataItem::Map {
            data: data
                .into_iter()
                .map(|(k, v)| (plain(k), plain(v)))
                .collect(),
            bitwidth: Some(IntegerWidth::Unknown),
        },
        DataItem::Tag { tag, value, .. } => DataItem::Tag {
            tag,
            bitwidth: IntegerWidth::Unknown,
            value: Box::new(plain(*value)),
        },
        other => other,
    }
}

/// Byte strings known by name, shown with a comment after their value.
type Notes<'a> = &'a [(&'a [u8], &'a str)];

/// CBOR diagnostic notation (RFC 8949 §8, with the RFC 8610 Appendix G extensions the
/// `cbor-diag` crate supports) of `bytes`: long byte strings wrapped over several lines
/// (whitespace inside `h'...'` is allowed), named byte strings followed by a `/ comment /`.
///
/// The text is parsed back and must encode to `bytes` exactly.
fn diag(bytes: &[u8], notes: Notes<'_>) -> String {
    let item = cbor_diag::parse_bytes(bytes).expect("example bytes are CBOR");
    let pretty = plain(item).to_diag_pretty();
    let mut out = String::new();
    for line in pretty.lines() {
        out.push_str(&wrap_line(line, notes));
        out.push('\n');
    }
    let back = cbor_diag::parse_diag(&out).expect("the notation parses back");
    assert_eq!(
        back.to_bytes(),
        bytes,
        "diagnostic notation does not re-encode to the example bytes:\n{out}"
    );
    out
}

/// Wraps the one `h'...'` literal a pretty-printed line may hold, and names it.
fn wrap_line(line: &str, notes: Notes<'_>) -> String {
    let Some(start) = line.find("h'") else {
        return line.to_owned();
    };
    let hex_start = start + 2;
    let Some(len) = line[hex_start..].find('\'') else {
        return line.to_owned();
    };
    let hex_str = &line[hex_start..hex_start + len];
    let rest = &line[hex_start + len + 1..];
    let note = hex::decode(hex_str).ok().and_then(|b| {
        notes
            .iter()
            .find(|(bytes, _)| *bytes == b.as_slice())
            .map(|(_, n)| *n)
    });
    let comment = note.map(|n| format!(" / {n} /")).unwrap_or_default();
    if hex_str.len() <= 64 {
        return format!("{}h'{hex_str}'{comment}{rest}", &line[..start]);
    }
    let indent = line.len() - line.trim_start().len() + 4;
    let pad = " ".repeat(indent);
    let mut s = String::new();
    s.push_str(&line[..start]);
    s.push_str("h'");
    for chunk in hex_str.as_bytes().chunks(64) {
        s.push('\n');
        s.push_str(&pad);
        s.push_str(std::str::from_utf8(chunk).expect("hex is ASCII"));
    }
    s.push('\n');
    s.push_str(&" ".repeat(indent - 4));
    s.push('\'');
    s.push_str(&comment);
    s.push_str(rest);
    s
}

/// A fenced diagnostic-notation block.
fn diag_block(bytes: &[u8], notes: Notes<'_>) -> String {
    format!("```cbor-diag\n{}```\n", diag(bytes, notes))
}

/// The payload (already decoded and verified by the caller) and the whole message.
fn message_section(out: &mut String, payload: &[u8], signed: &[u8], notes: Notes<'_>) {
    let _ = writeln!(out, "Payload ({} bytes):\n", payload.len());
    out.push_str(&diag_block(payload, notes));
    let _ = writeln!(out, "\nSigned message ({} bytes):\n", signed.len());
    out.push_str(&hex_block(signed));
    out.push('\n');
}

/// Signs `payload` and checks the signature round-trips; returns the message.
fn sign(signer: &dyn Signer, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; BUF];
    let n = cose::sign(signer, payload, &mut out).expect("sign");
    out.truncate(n);
    let back = Sign1::decode(&out)
        .expect("decode")
        .verify(&signer.public_key())
        .expect("verify");
    assert_eq!(back, payload);
    out
}

/// The payload of a signed message (after checking the signature).
fn payload_of<'a>(signed: &'a [u8], key: &PublicKey) -> &'a [u8] {
    Sign1::decode(signed)
        .expect("decode")
        .verify(key)
        .expect("verify")
}

/// A revocation page payload, decoded again and checked field by field.
fn page_payload(
    seq: u64,
    issued_at: u64,
    stream: &Stream<'_>,
    from: u64,
    to: u64,
    entries: &[&Addressed],
) -> Vec<u8> {
    let len = entries.iter().map(|e| e.encoded_len()).sum();
    let mut out = vec![0u8; revocation::max_page_len(stream, len)];
    let n = revocation::encode_page(
        seq,
        issued_at,
        stream,
        from,
        to,
        entries.iter().copied(),
        &mut out,
    )
    .expect("page");
    out.truncate(n);
    let page = Page::decode(&out).expect("the page decodes");
    assert_eq!(
        (
            page.seq(),
            page.issued_at(),
            page.stream(),
            page.from(),
            page.to()
        ),
        (seq, issued_at, *stream, from, to)
    );
    let back: Vec<Addressed> = page
        .entries()
        .iter()
        .collect::<Result<_, _>>()
        .expect("entries");
    assert_eq!(back.iter().collect::<Vec<_>>(), entries);
    assert_eq!(StreamMessage::decode(&out), Ok(StreamMessage::Page(page)));
    out
}

// ----- the example world ----------------------------------------------------------------

struct Keys {
    hub: P256Signer,
    hub_next: P256Signer,
    device: P256Signer,
    app: P256Signer,
    operator: P256Signer,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn keys() -> Keys {
    Keys {
        hub: key(0x11),
        hub_next: key(0x12),
        device: key(0x22),
        app: key(0x33),
        operator: key(0x44),
    }
}

fn issue(claims: &Claims<'_>, hub: &P256Signer) -> Vec<u8> {
    let mut out = vec![0u8; BUF];
    let n = token::issue(claims, hub, &mut out).expect("issue");
    out.truncate(n);
    out
}

fn sign_request(req: &Request<'_>, signer: &P256Signer) -> (Vec<u8>, Vec<u8>) {
    let mut payload = vec![0u8; BUF];
    let pn = req.encode_to(&mut payload).expect("encode request");
    payload.truncate(pn);
    let mut out = vec![0u8; BUF];
    let n = req.sign(signer, &mut out).expect("sign request");
    out.truncate(n);
    let decoded = SignedRequest::decode(&out).expect("decode request");
    assert_eq!(decoded.client(), req.client);
    let verified = decoded
        .verify(&signer.public_key())
        .expect("verify request");
    assert_eq!(&verified, req);
    assert_eq!(payload_of(&out, &signer.public_key()), payload.as_slice());
    (payload, out)
}

fn sign_response(resp: &Response<'_>, hub: &P256Signer) -> (Vec<u8>, Vec<u8>) {
    let mut payload = vec![0u8; BUF];
    let pn = resp.encode_to(&mut payload).expect("encode response");
    payload.truncate(pn);
    let mut out = vec![0u8; BUF];
    let n = resp.sign(hub, &mut out).expect("sign response");
    out.truncate(n);
    let anchor = KeySet::from_anchor(hub.public_key());
    let verified = SignedResponse::decode(&out)
        .expect("decode response")
        .verify(&anchor)
        .expect("verify response");
    assert_eq!(&verified, resp);
    (payload, out)
}

const BEGIN_MARKER: &str = "<!-- BEGIN GENERATED EXAMPLES -->\n";
const END_MARKER: &str = "<!-- END GENERATED EXAMPLES -->";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let examples = examples();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => {
            print!("{examples}");
            ExitCode::SUCCESS
        }
        [mode @ ("--update" | "--check"), path] => update(path, &examples, *mode == "--check"),
        _ => {
            eprintln!("usage: protocol_examples [--update PATH | --check PATH]");
            ExitCode::from(2)
        }
    }
}

/// Replaces (or, with `check_only`, compares) the generated part of the document at `path`.
fn update(path: &str, examples: &str, check_only: bool) -> ExitCode {
    let doc = match std::fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("protocol_examples: cannot read {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (Some(begin), Some(end)) = (doc.find(BEGIN_MARKER), doc.find(END_MARKER)) else {
        eprintln!("protocol_examples: {path} lacks the generated-examples markers");
        return ExitCode::FAILURE;
    };
    let start = begin + BEGIN_MARKER.len();
    if end < start {
        eprintln!("protocol_examples: the markers in {path} are out of order");
        return ExitCode::FAILURE;
    }
    let updated = format!("{}{examples}{}", &doc[..start], &doc[end..]);
    if check_only {
        if updated == doc {
            println!("protocol_examples: {path} is up to date");
            return ExitCode::SUCCESS;
        }
        eprintln!("protocol_examples: {path} differs from the generator; run with --update");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(path, updated) {
        eprintln!("protocol_examples: cannot write {path}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Every example, as the markdown of Appendix B.
fn examples() -> String {
    let k = keys();
    let mut out = String::new();
    let o = &mut out;

    // ---- E.1 keys ------------------------------------------------------------------------
    o.push_str("### B.1 Keys and identities used in the examples\n\n");
    o.push_str(
        "Private scalars are 32 bytes of one repeated value: **example keys only, never use \
         them**. `kid` is the first 8 bytes of the RFC 9679 thumbprint ([§4.3](#43-key-identifier-kid)).\n\n",
    );
    o.push_str("| role | id | private scalar | public x | public y | kid |\n");
    o.push_str("|---|---|---|---|---|---|\n");
    for (role, id, s) in [
        ("hub, current key", HUB, &k.hub),
        ("hub, next key", HUB, &k.hub_next),
        ("device", DEVICE, &k.device),
        ("app", APP, &k.app),
        ("operator", OPERATOR, &k.operator),
    ] {
        let (x, y) = s.public_key().coordinates();
        let _ = writeln!(
            o,
            "| {role} | `{id}` | `{:02x}` × 32 | `{}` | `{}` | `{}` |",
            s.to_scalar()[0],
            hex::encode(x),
            hex::encode(y),
            hex::encode(s.kid()),
        );
    }
    let _ = writeln!(
        o,
        "\nTimes are offsets from T0 = {T0} (2026-01-01T00:00:00Z). Hub id `{HUB}`; the device \
         token's audience is the service `{SERVICE}`.\n"
    );

    // Worked kid derivation.
    let dev_pub = k.device.public_key();
    let (dx, dy) = dev_pub.coordinates();
    let mut thumb_input = vec![0xa4, 0x01, 0x02, 0x20, 0x01, 0x21, 0x58, 0x20];
    thumb_input.extend_from_slice(&dx);
    thumb_input.extend_from_slice(&[0x22, 0x58, 0x20]);
    thumb_input.extend_from_slice(&dy);
    let thumb = crypto::sha256(&[&thumb_input]);
    assert_eq!(thumb, dev_pub.thumbprint());
    assert_eq!(thumb[..8], dev_pub.kid());
    o.push_str("#### Worked example: the device key's kid\n\n");
    o.push_str(
        "Thumbprint input: the deterministic encoding of `{1: 2, -1: 1, -2: x, -3: y}` \
         (kty, crv, x, y only; ",
    );
    let _ = writeln!(o, "{} bytes):\n", thumb_input.len());
    o.push_str(&diag_block(&thumb_input, &[]));
    o.push('\n');
    o.push_str(&hex_block(&thumb_input));
    let _ = writeln!(
        o,
        "\nSHA-256 of it (the RFC 9679 thumbprint):\n\n```text\n{}\n```\n\nkid = its first 8 \
         bytes: `{}`\n",
        hex::encode(thumb),
        hex::encode(dev_pub.kid())
    );

    // ---- E.2 COSE_Key ---------------------------------------------------------------------
    let mut cose_key = [0u8; COSE_KEY_LEN];
    let n = dev_pub.to_cose_key(&mut cose_key).expect("cose key");
    assert_eq!(n, COSE_KEY_LEN);
    assert_eq!(PublicKey::from_cose_key(&cose_key), Ok(dev_pub));
    o.push_str("### B.2 COSE_Key (the device's public key)\n\n");
    let _ = writeln!(
        o,
        "As carried in `cnf`, in enrollment requests and in key sets ({n} bytes):\n"
    );
    o.push_str(&diag_block(&cose_key, &[]));
    o.push('\n');
    o.push_str(&hex_block(&cose_key));
    o.push('\n');

    // ---- E.3 device token -----------------------------------------------------------------
    let dt1_iat = T0 + 2;
    let cti1: [u8; 16] = counting(0xa0);
    let device_claims = Claims {
        iss: HUB,
        sub: DEVICE,
        aud: SERVICE,
        exp: dt1_iat + DEVICE_TOKEN_LIFETIME,
        nbf: None,
        iat: dt1_iat,
        cti: &cti1,
        cnf: dev_pub,
        scope: Scopes::parse(DEVICE_SCOPE).expect("scope"),
    };
    let device_token = issue(&device_claims, &k.hub);
    let v = token::verify(
        &device_token,
        &k.hub.public_key(),
        &Validation::new(dt1_iat + 60, SERVICE)
            .with_issuer(HUB)
            .with_scope("telemetry:write"),
    )
    .expect("device token verifies");
    assert_eq!(v.claims(), &device_claims);
    let claims_bytes = payload_of(&device_token, &k.hub.public_key()).to_vec();

    o.push_str("### B.3 Device token\n\n");
    let _ = writeln!(
        o,
        "Issued to `{DEVICE}` at T0+2 for {DEVICE_TOKEN_LIFETIME} s, audience `{SERVICE}`, \
         signed with the hub's current key.\n"
    );
    let _ = writeln!(
        o,
        "Claims (the COSE payload, {} bytes):\n",
        claims_bytes.len()
    );
    o.push_str(&diag_block(&claims_bytes, &[]));
    let _ = writeln!(o, "\nToken ({} bytes):\n", device_token.len());
    o.push_str(&hex_block(&device_token));
    o.push_str("\nThe same token, item by item:\n\n```text\n");
    o.push_str(&envelope_breakdown(&device_token));
    o.push_str("```\n\n");
    let sig_structure = sig_structure(&device_token);
    let _ = writeln!(
        o,
        "`Sig_structure` that was signed ({} bytes; [§5.3](#53-sig_structure-and-signature)):\n",
        sig_structure.len()
    );
    o.push_str(&diag_block(
        &sig_structure,
        &[(&claims_bytes, "the claims above")],
    ));
    o.push('\n');
    o.push_str(&hex_block(&sig_structure));
    let device_token_hash = revocation::token_hash(&device_token);
    let _ = writeln!(
        o,
        "\nToken hash (SHA-256 of the token bytes, names it on the revocation list, [§6.6](#66-token-hash)):\n\n\
         ```text\n{}\n```\n",
        hex::encode(device_token_hash)
    );

    // ---- E.4 access token -----------------------------------------------------------------
    let at_iat = T0 + 700;
    let cti2: [u8; 16] = counting(0xb0);
    let access_claims = Claims {
        iss: HUB,
        sub: APP,
        aud: DEVICE,
        exp: at_iat + ACCESS_TOKEN_LIFETIME,
        nbf: None,
        iat: at_iat,
        cti: &cti2,
        cnf: k.app.public_key(),
        scope: Scopes::parse(ACCESS_SCOPE).expect("scope"),
    };
    let access_token = issue(&access_claims, &k.hub);
    let v = token::verify(
        &access_token,
        &k.hub.public_key(),
        &Validation::new(at_iat + 10, DEVICE).with_scope(ACCESS_SCOPE),
    )
    .expect("access token verifies");
    assert_eq!(v.claims(), &access_claims);
    let access_claims_bytes = payload_of(&access_token, &k.hub.public_key()).to_vec();
    o.push_str("### B.4 Access token\n\n");
    let _ = writeln!(
        o,
        "Issued to the app `{APP}` at T0+700 for {ACCESS_TOKEN_LIFETIME} s, for the device \
         `{DEVICE}` (its `aud`), bound to the app's key.\n"
    );
    let _ = writeln!(o, "Claims ({} bytes):\n", access_claims_bytes.len());
    o.push_str(&diag_block(&access_claims_bytes, &[]));
    let _ = writeln!(o, "\nToken ({} bytes):\n", access_token.len());
    o.push_str(&hex_block(&access_token));
    o.push('\n');

    // ---- E.5 requests ---------------------------------------------------------------------
    o.push_str("### B.5 Requests\n\n");
    o.push_str(
        "Each request is signed with the sender's own key and published on \
         `tessera/v1/client/{id}/req`.\n\n",
    );

    // Enroll with a code proof.
    let enroll_nonce: [u8; NONCE_LEN] = counting(0x01);
    let code_key = EnrollmentCode::derive_key(ENROLLMENT_CODE);
    let dev_kid = k.device.kid();
    let proof = EnrollmentCode::proof(&code_key, DEVICE, &dev_kid, &enroll_nonce);
    assert!(EnrollmentCode::check(
        &code_key,
        DEVICE,
        &dev_kid,
        &enroll_nonce,
        &proof
    ));
    let mut mac_input = DEVICE.as_bytes().to_vec();
    mac_input.push(0);
    mac_input.extend_from_slice(&dev_kid);
    mac_input.extend_from_slice(&enroll_nonce);
    let enroll = Request {
        client: DEVICE,
        request_id: 1,
        issued_at: T0,
        nonce: enroll_nonce,
        body: RequestBody::Enroll {
            key: dev_pub,
            code_proof: Some(proof),
        },
    };
    let (p, s) = sign_request(&enroll, &k.device);
    o.push_str("#### B.5.1 `enroll` (op 1) with an enrollment code\n\n");
    let _ = writeln!(
        o,
        "The device `{DEVICE}` generated its key on first boot; its enrollment code is \
         `{ENROLLMENT_CODE}` (typed as `{}`, it is the same code). It sends at T0, request \
         id 1 ([§8.5.1](#851-enroll-op-1)):\n",
        ENROLLMENT_CODE.to_lowercase().replace('-', " ")
    );
    let mut code_input = b"tessera-enroll-v1".to_vec();
    code_input.extend_from_slice(ENROLLMENT_CODE.as_bytes());
    let _ = writeln!(
        o,
        "```text\ncode_key   = SHA-256(\"tessera-enroll-v1\" ‖ code)\n           input {}\n           \
         = {}\nHMAC input = client ‖ 00 ‖ kid ‖ nonce\n           = {}\ncode_proof = \
         HMAC-SHA256(code_key, HMAC input)\n           = {}\n```\n",
        hex::encode(&code_input),
        hex::encode(code_key),
        hex::encode(&mac_input),
        hex::encode(proof)
    );
    message_section(o, &p, &s, &[]);

    let no_proof = RequestBody::Enroll {
        key: dev_pub,
        code_proof: None,
    };
    o.push_str(
        "A device whose key the operator registered beforehand sends the same request \
         without key 2 in the body:\n\n",
    );
    o.push_str(&diag_block(&body_bytes(no_proof), &[]));
    o.push('\n');

    // DeviceToken.
    let dt_req = Request {
        client: DEVICE,
        request_id: 2,
        issued_at: T0 + 2,
        nonce: counting(0x11),
        body: RequestBody::DeviceToken,
    };
    let (p, s) = sign_request(&dt_req, &k.device);
    o.push_str("#### B.5.2 `device_token` (op 2)\n\n");
    o.push_str("The device asks for its token at T0+2, request id 2:\n\n");
    message_section(o, &p, &s, &[]);

    // Refresh.
    let grant1: [u8; 32] = counting(0xc0);
    let grant2: [u8; 32] = counting(0xe0);
    let refresh_req = Request {
        client: DEVICE,
        request_id: 3,
        issued_at: T0 + 602,
        nonce: counting(0x21),
        body: RequestBody::Refresh { grant: &grant1 },
    };
    let (p, s) = sign_request(&refresh_req, &k.device);
    o.push_str("#### B.5.3 `refresh` (op 4)\n\n");
    o.push_str(
        "At T0+602 (two thirds into the token's lifetime) the device presents the grant it got \
         with its token, request id 3:\n\n",
    );
    message_section(o, &p, &s, &[(&grant1, "the current refresh grant")]);

    // AccessToken.
    let at_req = Request {
        client: APP,
        request_id: 1,
        issued_at: T0 + 700,
        nonce: counting(0x31),
        body: RequestBody::AccessToken {
            device: DEVICE,
            scope: Scopes::parse(ACCESS_SCOPE).expect("scope"),
        },
    };
    let (p, s) = sign_request(&at_req, &k.app);
    o.push_str("#### B.5.4 `access_token` (op 3)\n\n");
    let _ = writeln!(
        o,
        "The app `{APP}` asks for `{ACCESS_SCOPE}` on `{DEVICE}` at T0+700, request id 1:\n"
    );
    message_section(o, &p, &s, &[]);

    // Revoke.
    let revoke_at = T0 + 800;
    let revoke_req = Request {
        client: OPERATOR,
        request_id: 1,
        issued_at: revoke_at,
        nonce: counting(0x41),
        body: RequestBody::Revoke(RevokeTarget::Subject(APP)),
    };
    let (p, s) = sign_request(&revoke_req, &k.operator);
    o.push_str("#### B.5.5 `revoke` (op 5)\n\n");
    let _ = writeln!(
        o,
        "The operator `{OPERATOR}` revokes everything issued to `{APP}` so far (kind 2, \
         subject) at T0+800, request id 1:\n"
    );
    message_section(o, &p, &s, &[]);
    o.push_str("The bodies of the other kinds:\n\n");
    let access_hash = revocation::token_hash(&access_token);
    let device_list = [DEVICE, OTHER_DEVICE];
    let kinds: [(&str, RevokeTarget<'_>, Notes<'_>); 6] = [
        (
            "kind 0, one token by its hash (here the access token of B.4, revoked at T0+750: \
             change 1 of B.8)",
            RevokeTarget::TokenHash(access_hash),
            &[(&access_hash, "token hash of the access token of B.4")],
        ),
        (
            "kind 1, one token by its `cti` (the access token of B.4)",
            RevokeTarget::TokenId(&cti2),
            &[(&cti2, "its cti")],
        ),
        ("kind 3, a whole device", RevokeTarget::Device(DEVICE), &[]),
        (
            "kind 4, every device of a group, each as kind 3",
            RevokeTarget::Group(GROUP),
            &[],
        ),
        (
            "kind 5, every client with a role: devices as kind 3, apps and operators as kind 2",
            RevokeTarget::Role(ROLE),
            &[],
        ),
        (
            "kind 6, a list of devices (1 to 16 384), each as kind 3",
            RevokeTarget::Devices(IdList::new(&device_list)),
            &[],
        ),
    ];
    for (what, target, notes) in kinds {
        assert_eq!(
            target.kind(),
            u64::from(body_bytes(RequestBody::Revoke(target))[2])
        );
        let _ = writeln!(o, "{what}:\n");
        o.push_str(&diag_block(&body_bytes(RequestBody::Revoke(target)), notes));
        o.push('\n');
    }

    // FetchRevocations.
    let device_stream = Stream::of_device(DEVICE);
    let device_stream_name = device_stream.name();
    let fetch_at = T0 + 870;
    let fetch_req = Request {
        client: DEVICE,
        request_id: 4,
        issued_at: fetch_at,
        nonce: counting(0x51),
        body: RequestBody::FetchRevocations {
            stream: device_stream,
            from: 1,
        },
    };
    let (p, s) = sign_request(&fetch_req, &k.device);
    o.push_str("#### B.5.6 `fetch_revocations` (op 6)\n\n");
    let _ = writeln!(
        o,
        "`{DEVICE}` follows the stream `{device_stream_name}` (its partition: the first byte of \
         SHA-256 of its id, [§11.2](#112-streams)). It holds no change of it yet and the heartbeat of B.8.4 names \
         change 2, so at T0+870 it asks for a page from change 1, request id 4:\n"
    );
    message_section(o, &p, &s, &[]);

    // Lift a quarantine.
    let lift_req = Request {
        client: OPERATOR,
        request_id: 2,
        issued_at: T0 + 880,
        nonce: counting(0x71),
        body: RequestBody::LiftQuarantine { client: APP },
    };
    let (p, s) = sign_request(&lift_req, &k.operator);
    o.push_str("#### B.5.7 `lift_quarantine` (op 7)\n\n");
    let _ = writeln!(
        o,
        "The operator `{OPERATOR}` lifts the quarantine of `{APP}` ([§7.5](#75-alerts)) at \
         T0+880, request id 2. The answer, on success, is the empty body `{{}}`, as for \
         `enroll` (B.6.1):\n"
    );
    message_section(o, &p, &s, &[]);

    // Report a presentation refused as revoked.
    let reported = Presentation {
        token: &access_token,
        audience: DEVICE,
        issued_at: T0 + 760,
        nonce: counting(0x81),
    };
    let mut reported_signed = vec![0u8; BUF];
    let n = reported
        .sign(&k.app, &mut reported_signed)
        .expect("sign presentation");
    reported_signed.truncate(n);
    SignedPresentation::verify(
        &reported_signed,
        &k.hub.public_key(),
        &Validation::new(T0 + 760, DEVICE),
        60,
    )
    .expect("the reported presentation verifies");
    let report_req = Request {
        client: DEVICE,
        request_id: 5,
        issued_at: T0 + 761,
        nonce: counting(0x91),
        body: RequestBody::ReportPresentation {
            presentation: &reported_signed,
        },
    };
    let (p, s) = sign_request(&report_req, &k.device);
    o.push_str("#### B.5.8 `report_presentation` (op 8)\n\n");
    let _ = writeln!(
        o,
        "At T0+760 `{APP}` presents the access token of B.4 to `{DEVICE}` again (as in B.10, \
         with another nonce). The device refuses it: change 1 of its partition (B.8.1) revoked \
         that token at T0+750. It reports the presentation, byte for byte, at T0+761, request \
         id 5 ([§8.5.8](#858-report_presentation-op-8)). The answer, on success, is the empty \
         body `{{}}`:\n"
    );
    message_section(
        o,
        &p,
        &s,
        &[(
            &reported_signed,
            "the signed presentation the device refused",
        )],
    );

    // ---- revocation payloads (needed by responses) -----------------------------------------
    // devices/03: change 1 (T0+750) revokes the access token of B.4 by hash; change 2
    // (T0+800, B.5.5) revokes the subject app-7. Both are addressed to device-42, the
    // audience of app-7's tokens. The entries last until the tokens they cover expire, plus
    // the hub's leeway.
    let token_revoked_at = T0 + 750;
    let access_entry = Addressed::new(
        DEVICE,
        Entry::Token {
            hash: access_hash,
            expires_at: access_claims.exp + LEEWAY,
        },
    )
    .expect("entry");
    let subject_entry = Addressed::new(
        DEVICE,
        Entry::for_subject(APP, revoke_at, access_claims.exp + LEEWAY).expect("subject"),
    )
    .expect("entry");
    let delta1_payload = page_payload(1, token_revoked_at, &device_stream, 1, 1, &[&access_entry]);
    let delta1_signed = sign(&k.hub, &delta1_payload);
    let delta2_payload = page_payload(2, revoke_at, &device_stream, 2, 2, &[&subject_entry]);
    let delta2_signed = sign(&k.hub, &delta2_payload);
    // Republished at the first heartbeat after change 2.
    let snapshot_at = T0 + 830;
    let snapshot_payload = page_payload(
        2,
        snapshot_at,
        &device_stream,
        1,
        2,
        &[&access_entry, &subject_entry],
    );
    let snapshot_signed = sign(&k.hub, &snapshot_payload);
    // What `fetch_revocations` returns at T0+870: the same changes, built then.
    let fetched_payload = page_payload(
        2,
        fetch_at,
        &device_stream,
        1,
        2,
        &[&access_entry, &subject_entry],
    );
    let fetched_signed = sign(&k.hub, &fetched_payload);
    let heartbeat_at = T0 + 860;
    let max_age = revocation::recommended_max_age(HEARTBEAT_INTERVAL, ACCESS_TOKEN_LIFETIME);
    let mut heartbeat_payload = [0u8; revocation::MAX_HEARTBEAT_LEN];
    let n = revocation::encode_heartbeat(
        2,
        heartbeat_at,
        &device_stream,
        max_age,
        &mut heartbeat_payload,
    )
    .expect("hb");
    let heartbeat_payload = heartbeat_payload[..n].to_vec();
    let heartbeat_signed = sign(&k.hub, &heartbeat_payload);
    // service/svc.telemetry: change 1 (T0+650) revokes the device token of B.3.
    let service_stream = Stream::of_service(SERVICE).expect("service");
    let device_token_revoked_at = T0 + 650;
    let device_token_entry = Addressed::new(
        SERVICE,
        Entry::Token {
            hash: device_token_hash,
            expires_at: device_claims.exp + LEEWAY,
        },
    )
    .expect("entry");
    let service_payload = page_payload(
        1,
        device_token_revoked_at,
        &service_stream,
        1,
        1,
        &[&device_token_entry],
    );
    let service_signed = sign(&k.hub, &service_payload);

    // The verifiers that follow them.
    {
        let hub_pub = k.hub.public_key();
        let page = |signed| Page::decode(payload_of(signed, &hub_pub)).expect("page");
        // device-42 from the retained snapshot page, then the deltas and the heartbeat.
        let mut list = RevocationList::<Bounded<8>>::for_device(DEVICE, LEEWAY).expect("id");
        assert_eq!(
            list.apply_page(&page(&snapshot_signed), snapshot_at),
            Ok(PageOutcome::Applied)
        );
        for delta in [&delta1_signed, &delta2_signed] {
            assert_eq!(
                list.apply_page(&page(delta), revoke_at),
                Ok(PageOutcome::AlreadyApplied)
            );
        }
        let StreamMessage::Heartbeat(hb) =
            StreamMessage::decode(payload_of(&heartbeat_signed, &hub_pub)).expect("hb")
        else {
            panic!("a heartbeat");
        };
        assert_eq!(list.apply_heartbeat(&hb), Ok(HeartbeatOutcome::InSync));
        assert!(list.is_revoked(&access_hash, APP, at_iat));
        assert!(list.is_revoked(&[0; 32], APP, revoke_at - 1));
        assert!(!list.is_revoked(&[0; 32], APP, revoke_at));
        assert_eq!(list.fresh_as_of(), Some(heartbeat_at));
        assert_eq!(list.max_age(None), max_age);
        assert!(list.is_fresh(heartbeat_at + max_age, list.max_age(None)));
        assert!(!list.is_fresh(heartbeat_at + max_age + 1, list.max_age(None)));
        // device-42 from the deltas, and from the fetched page after a gap.
        let mut from_deltas = RevocationList::<Bounded<8>>::for_device(DEVICE, LEEWAY).expect("id");
        assert_eq!(
            from_deltas.apply_page(&page(&delta2_signed), revoke_at),
            Ok(PageOutcome::Gap { have: 0, latest: 2 })
        );
        assert_eq!(from_deltas.wanted_from(), Some(1));
        assert_eq!(
            from_deltas.apply_page(&page(&delta1_signed), revoke_at),
            Ok(PageOutcome::Applied)
        );
        assert_eq!(from_deltas.seq(), 2);
        let mut fetched = RevocationList::<Bounded<8>>::for_device(DEVICE, LEEWAY).expect("id");
        assert_eq!(
            fetched.apply_page(&page(&fetched_signed), fetch_at),
            Ok(PageOutcome::Applied)
        );
        assert_eq!(fetched.fresh_as_of(), Some(fetch_at));
        // device-43 follows another partition: device-42's pages are not for it.
        let mut other = RevocationList::<Bounded<8>>::for_device(OTHER_DEVICE, LEEWAY).expect("id");
        assert_ne!(other.stream(), device_stream);
        assert!(
            other
                .apply_page(&page(&snapshot_signed), snapshot_at)
                .is_err()
        );
        // The service keeps the device-token revocations addressed to it.
        let mut service =
            RevocationList::for_service(Bounded::<8>::new(), SERVICE, LEEWAY).expect("id");
        assert_eq!(
            service.apply_page(&page(&service_signed), device_token_revoked_at),
            Ok(PageOutcome::Applied)
        );
        assert!(service.is_revoked(&device_token_hash, DEVICE, dt1_iat));
    }

    // ---- E.6 responses --------------------------------------------------------------------
    o.push_str("### B.6 Responses\n\n");
    o.push_str(
        "Each response is signed with the hub's current key and published on \
         `tessera/v1/client/{id}/resp`; it echoes the request's client, request id and nonce.\n\n",
    );

    let resp = Response {
        op: Some(Operation::Enroll),
        client: DEVICE,
        request_id: 1,
        hub_time: T0 + 1,
        nonce: enroll_nonce,
        outcome: Ok(ResponseBody::Enrolled),
    };
    assert!(resp.answers(DEVICE, 1, &enroll_nonce));
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.1 `enroll` succeeded\n\n");
    o.push_str("Answer to B.5.1; `hub_time` T0+1 is when the device counts as enrolled:\n\n");
    message_section(o, &p, &s, &[]);

    let resp = Response {
        op: Some(Operation::DeviceToken),
        client: DEVICE,
        request_id: 2,
        hub_time: T0 + 2,
        nonce: dt_req.nonce,
        outcome: Ok(ResponseBody::Token {
            token: &device_token,
            grant: Some((&grant1, dt1_iat + GRANT_LIFETIME)),
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.2 `device_token` succeeded (token and refresh grant)\n\n");
    o.push_str(
        "Answer to B.5.2, carrying the device token of B.3 and a refresh grant valid for one \
         day:\n\n",
    );
    message_section(
        o,
        &p,
        &s,
        &[
            (&device_token, "the device token of B.3"),
            (&grant1, "refresh grant, opaque"),
        ],
    );

    // Refresh response with a new token.
    let dt2_iat = T0 + 602;
    let cti3: [u8; 16] = counting(0xd0);
    let refreshed_claims = Claims {
        exp: dt2_iat + DEVICE_TOKEN_LIFETIME,
        iat: dt2_iat,
        cti: &cti3,
        ..device_claims
    };
    let refreshed = issue(&refreshed_claims, &k.hub);
    let resp = Response {
        op: Some(Operation::Refresh),
        client: DEVICE,
        request_id: 3,
        hub_time: T0 + 602,
        nonce: refresh_req.nonce,
        outcome: Ok(ResponseBody::Token {
            token: &refreshed,
            grant: Some((&grant2, dt2_iat + GRANT_LIFETIME)),
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.3 `refresh` succeeded (new token, rotated grant)\n\n");
    let _ = writeln!(
        o,
        "Answer to B.5.3: a new device token (iat T0+602, cti `{}`) and the next grant; the \
         grant of B.6.2 is now spent.\n",
        hex::encode(cti3)
    );
    message_section(
        o,
        &p,
        &s,
        &[
            (
                &refreshed,
                "a new device token, same claims as B.3 but iat, exp, cti",
            ),
            (&grant2, "the next refresh grant"),
        ],
    );

    let resp = Response {
        op: Some(Operation::AccessToken),
        client: APP,
        request_id: 1,
        hub_time: T0 + 700,
        nonce: at_req.nonce,
        outcome: Ok(ResponseBody::Token {
            token: &access_token,
            grant: None,
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.4 `access_token` succeeded (token only)\n\n");
    o.push_str("Answer to B.5.4, carrying the access token of B.4 and no grant:\n\n");
    message_section(o, &p, &s, &[(&access_token, "the access token of B.4")]);

    let resp = Response {
        op: Some(Operation::Revoke),
        client: OPERATOR,
        request_id: 1,
        hub_time: revoke_at,
        nonce: revoke_req.nonce,
        outcome: Ok(ResponseBody::Revoked {
            revoked: 1,
            entries: 1,
            notified: 0,
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.5 `revoke` succeeded\n\n");
    let _ = writeln!(
        o,
        "Answer to B.5.5, sent once the revocation is durable: it revoked one client (`{APP}`), \
         added one entry (the subject entry addressed to `{DEVICE}`, the one audience `{APP}` \
         holds live tokens for: change 2 of `{device_stream_name}`, B.8.2) and sends no \
         control message (`{APP}` is not a device).\n"
    );
    message_section(o, &p, &s, &[]);

    let resp = Response {
        op: Some(Operation::FetchRevocations),
        client: DEVICE,
        request_id: 4,
        hub_time: T0 + 870,
        nonce: fetch_req.nonce,
        outcome: Ok(ResponseBody::Revocations {
            page: &fetched_signed,
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.6 `fetch_revocations` succeeded\n\n");
    let _ = writeln!(
        o,
        "Answer to B.5.6: one signed page of `{device_stream_name}` from change 1, as far as \
         one page goes (here to change 2, the latest). It holds the same entries as the \
         snapshot page of B.8.3 but is built when asked, at T0+870:\n"
    );
    message_section(
        o,
        &p,
        &s,
        &[(&fetched_signed, "a signed page, payload below")],
    );
    let _ = writeln!(o, "The page's payload ({} bytes):\n", fetched_payload.len());
    o.push_str(&diag_block(
        &fetched_payload,
        &[(&access_hash, "token hash of the access token of B.4")],
    ));
    o.push('\n');

    let stale_nonce: [u8; NONCE_LEN] = counting(0x61);
    let resp = Response {
        op: Some(Operation::AccessToken),
        client: APP,
        request_id: 2,
        hub_time: T0 + 1075,
        nonce: stale_nonce,
        outcome: Err(WireError {
            code: ErrorCode::Stale,
            reason: "issued_at is 75 s behind the hub clock; the window is 60 s",
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.7 An error: `stale`\n\n");
    let _ = writeln!(
        o,
        "The app's access-token request with request id 2, nonce `{}` and `issued_at` \
         T0+1000 reached the hub at T0+1075. The response still answers that request, so \
         the client may take `hub_time` as the time and retry with a new nonce:\n",
        hex::encode(stale_nonce)
    );
    message_section(o, &p, &s, &[]);

    let resp = Response {
        op: None,
        client: APP,
        request_id: 0,
        hub_time: T0 + 1080,
        nonce: [0; NONCE_LEN],
        outcome: Err(WireError {
            code: ErrorCode::Malformed,
            reason: "not a COSE_Sign1: bytes follow the top-level item",
        }),
    };
    let (p, s) = sign_response(&resp, &k.hub);
    o.push_str("#### B.6.8 An error for a request that could not be decoded: `malformed`\n\n");
    let _ = writeln!(
        o,
        "Published on `{}`, the topic the bytes arrived on; op 0, request id 0 and an all-zero \
         nonce because nothing could be read from them. It answers no request ([§9.2](#92-matching-a-response-to-its-request)):\n",
        topic::response(APP).expect("topic")
    );
    message_section(o, &p, &s, &[]);

    // ---- E.7 key set ----------------------------------------------------------------------
    let set = KeySet::new(7, T0, &[k.hub.public_key(), k.hub_next.public_key()]).expect("set");
    let mut set_payload = vec![0u8; BUF];
    let n = set.encode_to(&mut set_payload).expect("set payload");
    set_payload.truncate(n);
    let mut set_signed = vec![0u8; BUF];
    let n = set.sign(&k.hub, &mut set_signed).expect("sign set");
    set_signed.truncate(n);
    let mut held = KeySet::from_anchor(k.hub.public_key());
    assert_eq!(held.update(&set_signed), Ok(KeySetOutcome::Updated));
    assert_eq!(held, set);
    assert_eq!(payload_of(&set_signed, &k.hub.public_key()), set_payload);
    o.push_str("### B.7 Key set\n\n");
    let _ = writeln!(
        o,
        "Version 7, published retained on `{}` at T0 and signed with the current key: it \
         announces the next key (`{}`) before the hub signs anything with it ([§10](#10-key-set-and-key-rotation)).\n",
        topic::KEYS,
        hex::encode(k.hub_next.kid())
    );
    message_section(o, &set_payload, &set_signed, &[]);

    // ---- E.8 revocation -------------------------------------------------------------------
    o.push_str("### B.8 Revocation messages\n\n");
    let _ = writeln!(
        o,
        "Two streams have changes ([§11.2](#112-streams)). `{device_stream_name}`, the \
         partition of `{DEVICE}`, carries access-token revocations addressed to the devices \
         of that partition: change 1 (T0+750) revoked the access token of B.4 by its hash, \
         change 2 (T0+800) is the operator's revocation of `{APP}` (B.5.5), every token \
         issued to it before T0+800. `service/{SERVICE}` carries device-token revocations \
         addressed to that service: its change 1 (T0+650) revoked the device token of B.3. \
         Each entry lasts until the tokens it covers have expired (the latest `exp`) plus the \
         hub's {LEEWAY} s leeway.\n"
    );
    let access_note: Notes<'_> = &[(&access_hash, "token hash of the access token of B.4")];
    o.push_str("#### B.8.1 Delta: change 1 of the device's partition\n\n");
    let _ = writeln!(
        o,
        "The page `from` = `to` = `seq` = 1 ([§11.3](#113-pages-and-heartbeats)), published \
         on `{}` at T0+750:\n",
        topic::revocation_delta(&device_stream)
    );
    message_section(o, &delta1_payload, &delta1_signed, access_note);
    o.push_str("#### B.8.2 Delta: change 2 of the device's partition\n\n");
    let _ = writeln!(o, "Published on the same topic at T0+800:\n");
    message_section(o, &delta2_payload, &delta2_signed, &[]);
    o.push_str("#### B.8.3 Snapshot page\n\n");
    let _ = writeln!(
        o,
        "At its first heartbeat after change 2 (T0+830) the hub republishes the snapshot of \
         the stream: the pages covering changes 1 to 2, here one page, retained on `{}`:\n",
        topic::revocation_snapshot_page(&device_stream, 0)
    );
    message_section(o, &snapshot_payload, &snapshot_signed, access_note);
    o.push_str("#### B.8.4 Heartbeat\n\n");
    let _ = writeln!(
        o,
        "Published on `{}` at T0+860: the stream is still at change 2. `max_age` {max_age} s \
         is what the hub recommends for this stream with a {HEARTBEAT_INTERVAL} s heartbeat \
         and {ACCESS_TOKEN_LIFETIME} s access tokens ([§11.7](#117-freshness)):\n",
        topic::revocation_heartbeat(&device_stream)
    );
    message_section(o, &heartbeat_payload, &heartbeat_signed, &[]);
    o.push_str("#### B.8.5 Delta of a service stream\n\n");
    let _ = writeln!(
        o,
        "Change 1 of `service/{SERVICE}`, published on `{}` at T0+650:\n",
        topic::revocation_delta(&service_stream)
    );
    message_section(
        o,
        &service_payload,
        &service_signed,
        &[(&device_token_hash, "token hash of the device token of B.3")],
    );

    // ---- E.9 control ----------------------------------------------------------------------
    let control = Control {
        device: DEVICE,
        command: Command::Revoked,
        issued_at: T0 + 1200,
    };
    let mut control_payload = [0u8; 128];
    let n = control.encode_to(&mut control_payload).expect("control");
    let control_payload = control_payload[..n].to_vec();
    let mut control_signed = vec![0u8; BUF];
    let n = control
        .sign(&k.hub, &mut control_signed)
        .expect("sign control");
    control_signed.truncate(n);
    assert_eq!(
        Control::verify(&control_signed, &k.hub.public_key()),
        Ok(control)
    );
    o.push_str("### B.9 Control message\n\n");
    let _ = writeln!(
        o,
        "The hub tells `{DEVICE}` at T0+1200 that it is revoked, on `{}`. The device enrolled \
         at T0+1 (B.6.1) and T0+1200 ≥ T0+1, so it acts on it ([§12](#12-control-messages)):\n",
        topic::control(DEVICE).expect("topic")
    );
    message_section(o, &control_payload, &control_signed, &[]);

    // ---- E.10 presentation ----------------------------------------------------------------
    let presentation = Presentation {
        token: &access_token,
        audience: DEVICE,
        issued_at: T0 + 710,
        nonce: counting(0x71),
    };
    let mut pres_payload = vec![0u8; BUF];
    let n = presentation
        .encode_to(&mut pres_payload)
        .expect("presentation");
    pres_payload.truncate(n);
    let mut pres_signed = vec![0u8; BUF];
    let n = presentation
        .sign(&k.app, &mut pres_signed)
        .expect("sign presentation");
    pres_signed.truncate(n);
    let checked = SignedPresentation::verify(
        &pres_signed,
        &k.hub.public_key(),
        &Validation::new(T0 + 712, DEVICE).with_scope(ACCESS_SCOPE),
        60,
    )
    .expect("presentation verifies");
    assert_eq!(checked.nonce, presentation.nonce);
    assert_eq!(payload_of(&pres_signed, &k.app.public_key()), pres_payload);
    o.push_str("### B.10 Presentation (proof of possession)\n\n");
    let _ = writeln!(
        o,
        "The app presents the access token of B.4 to `{DEVICE}` at T0+710, signed with the \
         app's key (the token's `cnf`). The device accepts it at T0+712 with a 60 s window and \
         required scope `{ACCESS_SCOPE}`:\n"
    );
    message_section(
        o,
        &pres_payload,
        &pres_signed,
        &[(&access_token, "the access token of B.4")],
    );

    // ---- E.11 record ----------------------------------------------------------------------
    let secret: [u8; 32] = counting(0x00);
    let counter = 3u64;
    let record_nonce: [u8; record::NONCE_LEN] = counting(0x90);
    let plaintext = b"example record plaintext";
    let record_key = RecordKey::derive(&secret, DEVICE).expect("record key");
    let mut okm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"tessera-record-v1"), &secret)
        .expand_multi_info(&[b"tessera/record/key", DEVICE.as_bytes()], &mut okm)
        .expect("hkdf");
    let mut buf = vec![0u8; record::sealed_len(plaintext.len())];
    record::plaintext_mut(&mut buf)[..plaintext.len()].copy_from_slice(plaintext);
    let len = record::seal(
        &record_key,
        DEVICE,
        counter,
        record_nonce,
        &mut buf,
        plaintext.len(),
    )
    .expect("seal");
    let sealed = buf[..len].to_vec();
    let mut reopen = sealed.clone();
    let opened = record::open(&record_key, DEVICE, counter, &mut reopen).expect("open");
    assert_eq!(opened.plaintext, plaintext);
    let mut aad = sealed[..record::HEADER_LEN].to_vec();
    aad.extend_from_slice(DEVICE.as_bytes());
    o.push_str("### B.11 Encrypted record (Appendix A)\n\n");
    let _ = writeln!(
        o,
        "```text\ndevice secret  {}\ndevice id      \"{DEVICE}\"\nHKDF-SHA256    salt \
         \"tessera-record-v1\", info \"tessera/record/key\" ‖ \"{DEVICE}\"\nrecord key     \
         {}\ncounter        {counter}\nnonce          {}\nplaintext      \"{}\" ({} bytes)\n\
         AAD            {}\n```\n",
        hex::encode(secret),
        hex::encode(okm),
        hex::encode(record_nonce),
        std::str::from_utf8(plaintext).expect("ASCII"),
        plaintext.len(),
        hex::encode(&aad),
    );
    let _ = writeln!(o, "Record ({} bytes):\n", sealed.len());
    let _ = writeln!(
        o,
        "```text\nmagic      {}\nversion    {}\ncounter    {}\nnonce      {}\nciphertext {}\n\
         tag        {}\n```\n",
        hex::encode(&sealed[..4]),
        hex::encode(&sealed[4..5]),
        hex::encode(&sealed[5..13]),
        hex::encode(&sealed[13..25]),
        hex::encode(&sealed[25..len - record::TAG_LEN]),
        hex::encode(&sealed[len - record::TAG_LEN..]),
    );
    o.push_str("The whole record:\n\n");
    o.push_str(&hex_block(&sealed));

    out
}

/// The encoded body of a request, as it sits under key 6.
fn body_bytes(body: RequestBody<'_>) -> Vec<u8> {
    // Encode a whole request and cut the body out: it is the last item of the map.
    let req = Request {
        client: "x",
        request_id: 0,
        issued_at: 0,
        nonce: [0; NONCE_LEN],
        body,
    };
    let mut buf = vec![0u8; BUF];
    let n = req.encode_to(&mut buf).expect("encode");
    // a7 00 01 01 <op> 02 61 78 03 00 04 00 05 50 <16 bytes> 06 <body>
    let prefix = 1 + 2 + 2 + 3 + 2 + 2 + 2 + NONCE_LEN + 1;
    buf[prefix..n].to_vec()
}

/// The `Sig_structure` a COSE_Sign1 was signed over.
fn sig_structure(message: &[u8]) -> Vec<u8> {
    let (protected, payload) = parts(message);
    let mut out = vec![0x84, 0x6a];
    out.extend_from_slice(b"Signature1");
    out.extend_from_slice(&bstr_head(protected.len()));
    out.extend_from_slice(protected);
    out.push(0x40);
    out.extend_from_slice(&bstr_head(payload.len()));
    out.extend_from_slice(payload);
    out
}

fn bstr_head(len: usize) -> Vec<u8> {
    let l = u64::try_from(len).expect("fits");
    match l {
        0..=23 => vec![0x40 | u8::try_from(l).expect("small")],
        24..=0xff => vec![0x58, u8::try_from(l).expect("byte")],
        _ => {
            let mut v = vec![0x59];
            v.extend_from_slice(&u16::try_from(l).expect("short").to_be_bytes());
            v
        }
    }
}

/// The protected header bytes and the payload of a tag-18 COSE_Sign1 as `cose::sign` writes
/// it.
fn parts(message: &[u8]) -> (&[u8], &[u8]) {
    assert_eq!(&message[..3], &[0xd2, 0x84, 0x4d]);
    let protected = &message[3..16];
    assert_eq!(message[16], 0xa0);
    let (len, head) = match message[17] {
        b @ 0x40..=0x57 => (usize::from(b - 0x40), 1),
        0x58 => (usize::from(message[18]), 2),
        0x59 => (
            usize::from(u16::from_be_bytes([message[18], message[19]])),
            3,
        ),
        other => panic!("unexpected payload head {other:#x}"),
    };
    let start = 17 + head;
    (protected, &message[start..start + len])
}

/// The envelope of a tag-18 COSE_Sign1, one item per line.
fn envelope_breakdown(message: &[u8]) -> String {
    let (protected, payload) = parts(message);
    let payload_head_len = bstr_head(payload.len()).len();
    let payload_at = 17 + payload_head_len;
    let sig_at = payload_at + payload.len();
    let mut s = String::new();
    let _ = writeln!(s, "d2                          tag 18 (COSE_Sign1)");
    let _ = writeln!(s, "84                          array of 4");
    let _ = writeln!(s, "4d                          protected: bstr of 13 bytes");
    let _ = writeln!(
        s,
        "   {}      {{1: -7, 4: h'{}'}}",
        hex::encode(protected),
        hex::encode(&protected[5..])
    );
    let _ = writeln!(
        s,
        "a0                          unprotected: {{}} (empty map)"
    );
    let _ = writeln!(
        s,
        "{:<27} payload: bstr of {} bytes (the claims)",
        hex::encode(&message[17..payload_at]),
        payload.len()
    );
    for chunk in payload.chunks(32) {
        let _ = writeln!(s, "   {}", hex::encode(chunk));
    }
    let _ = writeln!(
        s,
        "{:<27} signature: bstr of 64 bytes, r ‖ s",
        hex::encode(&message[sig_at..sig_at + 2])
    );
    for chunk in message[sig_at + 2..].chunks(32) {
        let _ = writeln!(s, "   {}", hex::encode(chunk));
    }
    s
}
