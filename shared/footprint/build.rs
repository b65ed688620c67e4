//! Links `memory.x` for cortex-m-rt and makes the image's inputs with the host build of the
//! same core, so the image does on the device what it would do in the field:
//!
//! - the hub's public key (the trust anchor) and the device's private scalar;
//! - the device's stored state: an agent on the host enrolls with a small in-memory hub and
//!   receives a device token and a refresh grant; its last `Store` is sealed into a record
//!   under the device secret, as the device's shell would have written it;
//! - a page and a heartbeat of the device's revocation stream, signed by the hub, and the
//!   topics they arrive on;
//! - an access token the hub issued to an app for this device, and the app's signed
//!   presentation of it (proof of possession).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;

use tessera_shared::agent::{Action, Agent, AgentConfig, Event};
use tessera_shared::claims::Claims;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::message::{
    NONCE_LEN, Presentation, RequestBody, Response, ResponseBody, SignedRequest,
};
use tessera_shared::record::{self, RecordKey};
use tessera_shared::revocation::{self, Addressed, Entry, Stream};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, MAX_TOKEN_LEN};
use tessera_shared::{cose, topic};

/// The image's "now", Unix seconds.
const NOW: u64 = 1_750_000_000;
const DEVICE_ID: &str = "device-42";
/// The audience of the device's own tokens: the hub's services.
const AUDIENCE: &str = "tessera-hub";
/// When the device enrolled and got its token: its refresh point (50–75 % of a 600 s
/// lifetime) falls between NOW + 100 s and NOW + 250 s.
const ENROLLED_AT: u64 = NOW - 200;
const DEVICE_TOKEN_LIFETIME: u64 = 600;
/// When the image's refresh timer fires: past the refresh point, before expiry.
const TIMER_AT: u64 = NOW + 260;
/// The counter of the stored record.
const RECORD_COUNTER: u64 = 7;
/// The revocation knowledge age the hub's heartbeat announces.
const MAX_AGE: u64 = 90;

fn signer(seed: u8) -> P256Signer {
    let mut s = [seed; 32];
    s[0] = 0x01;
    P256Signer::from_scalar(&s).expect("valid scalar")
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");

    let (hub, device, app) = (signer(0x11), signer(0x22), signer(0x33));
    let device_secret = [0xd5u8; 32];

    // Change 1 of the device's stream, as its delta (the page 1..=1): one token by hash and
    // one subject, addressed to the device; then the hub's heartbeat naming change 1.
    let stream = Stream::of_device(DEVICE_ID);
    let entries = [
        Entry::Token {
            hash: revocation::token_hash(b"some other token"),
            expires_at: NOW + 600,
        },
        Entry::for_subject("app-9", NOW - 5, NOW + 900).expect("subject"),
    ]
    .map(|entry| Addressed::new(DEVICE_ID, entry).expect("entry"));
    let len = entries.iter().map(Addressed::encoded_len).sum();
    let mut payload = vec![0u8; revocation::max_page_len(&stream, len)];
    let payload_len =
        revocation::encode_page(1, NOW - 1, &stream, 1, 1, &entries, &mut payload).expect("page");
    let page = sign(&hub, &payload[..payload_len]);
    let mut payload = [0u8; revocation::MAX_HEARTBEAT_LEN];
    let payload_len =
        revocation::encode_heartbeat(1, NOW, &stream, MAX_AGE, &mut payload).expect("heartbeat");
    let heartbeat = sign(&hub, &payload[..payload_len]);
    let delta_topic = topic::revocation_delta(&stream);
    let heartbeat_topic = topic::revocation_heartbeat(&stream);

    // An access token the app presents to this device: cnf, 16-byte cti, two scopes.
    let claims = Claims {
        iss: "hub-1",
        sub: "app-7",
        aud: DEVICE_ID,
        exp: NOW + 300,
        nbf: None,
        iat: NOW - 10,
        cti: &[0x5a; 16],
        cnf: app.public_key(),
        scope: Scopes::parse("door:open telemetry:read").expect("scope"),
    };
    let mut tok = [0u8; MAX_TOKEN_LEN];
    let tok_len = token::issue(&claims, &hub, &mut tok).expect("issue");
    let mut presentation = [0u8; MAX_TOKEN_LEN + 64];
    let presentation_len = Presentation {
        token: &tok[..tok_len],
        audience: DEVICE_ID,
        issued_at: NOW,
        nonce: [0x9c; NONCE_LEN],
    }
    .sign(&app, &mut presentation)
    .expect("sign presentation");

    // The device's stored state, sealed as its shell would have written it.
    let state = enrolled_state(&hub, &device);
    let key = RecordKey::derive(&device_secret, DEVICE_ID).expect("record key");
    let mut rec = vec![0u8; record::sealed_len(state.len())];
    record::plaintext_mut(&mut rec)[..state.len()].copy_from_slice(&state);
    let rec_len = record::seal(
        &key,
        DEVICE_ID,
        RECORD_COUNTER,
        [0x4e; 12],
        &mut rec,
        state.len(),
    )
    .expect("seal");

    // The hub's answer to the refresh request the image will send: the agent is
    // deterministic given its inputs, so the same steps on the host send the same request.
    let refresh_response = refresh_response(
        &hub,
        &device,
        &state,
        [(&delta_topic, &page), (&heartbeat_topic, &heartbeat)],
        &presentation[..presentation_len],
    );

    let mut src = String::from("// Generated by build.rs: inputs for the footprint image.\n");
    writeln!(src, "pub const NOW: u64 = {NOW};").unwrap();
    writeln!(src, "pub const DEVICE_ID: &str = {DEVICE_ID:?};").unwrap();
    writeln!(src, "pub const AUDIENCE: &str = {AUDIENCE:?};").unwrap();
    writeln!(src, "pub const RECORD_COUNTER: u64 = {RECORD_COUNTER};").unwrap();
    writeln!(src, "pub const TIMER_AT: u64 = {TIMER_AT};").unwrap();
    writeln!(
        src,
        "pub const DELTA_TOPIC: &str = {:?};",
        delta_topic.as_str()
    )
    .unwrap();
    writeln!(
        src,
        "pub const HEARTBEAT_TOPIC: &str = {:?};",
        heartbeat_topic.as_str()
    )
    .unwrap();
    bytes(&mut src, "HUB_KEY_SEC1", &hub.public_key().to_sec1());
    bytes(&mut src, "DEVICE_SCALAR", &device.to_scalar());
    bytes(&mut src, "DEVICE_SECRET", &device_secret);
    bytes(&mut src, "RECORD", &rec[..rec_len]);
    bytes(&mut src, "SIGNED_PAGE", &page);
    bytes(&mut src, "SIGNED_HEARTBEAT", &heartbeat);
    bytes(&mut src, "ACCESS_TOKEN", &tok[..tok_len]);
    bytes(&mut src, "PRESENTATION", &presentation[..presentation_len]);
    bytes(&mut src, "REFRESH_RESPONSE", &refresh_response);
    std::fs::write(out.join("fixtures.rs"), src).expect("write fixtures.rs");
}

/// `payload` in a COSE_Sign1 signed by `hub`.
fn sign(hub: &P256Signer, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; payload.len() + cose::OVERHEAD];
    let n = cose::sign(hub, payload, &mut out).expect("sign");
    out.truncate(n);
    out
}

fn bytes(src: &mut String, name: &str, b: &[u8]) {
    writeln!(src, "pub static {name}: [u8; {}] = {b:?};", b.len()).unwrap();
}

fn new_agent(hub: &P256Signer, device: &P256Signer) -> Agent<P256Signer> {
    let signer = P256Signer::from_scalar(&device.to_scalar()).expect("scalar");
    let mut config = AgentConfig::new(DEVICE_ID, AUDIENCE).expect("config");
    config.trust_local_clock = true;
    Agent::new(config, signer, hub.public_key()).expect("agent")
}

/// Runs an agent on the host through enrollment and its first device token, answering its
/// requests as the hub would, and returns the last state it asked to store.
fn enrolled_state(hub: &P256Signer, device: &P256Signer) -> Vec<u8> {
    let mut agent = new_agent(hub, device);
    let response_topic = topic::response(DEVICE_ID).expect("topic");
    let mut io = HostShell::new(hub, device);
    let now_ms = ENROLLED_AT * 1000;
    io.step(&mut agent, Event::Boot { stored: None }, now_ms);
    io.step(&mut agent, Event::Connected, now_ms);
    while let Some(response) = io.responses.pop_front() {
        let event = Event::Message {
            topic: response_topic.as_str(),
            payload: &response,
        };
        io.step(&mut agent, event, now_ms);
        assert!(io.events < 32, "the agent did not settle");
    }
    assert!(agent.token().is_some(), "the agent holds a device token");
    io.stored.expect("the agent stored its state")
}

/// Runs the image's steps up to its timer on the host and returns the hub's answer to the
/// refresh request the agent sends then. Keep in step with `run` in src/main.rs.
fn refresh_response(
    hub: &P256Signer,
    device: &P256Signer,
    state: &[u8],
    revocations: [(&str, &[u8]); 2],
    presentation: &[u8],
) -> Vec<u8> {
    let mut agent = new_agent(hub, device);
    let mut io = HostShell::new(hub, device);
    let now_ms = NOW * 1000;
    io.step(
        &mut agent,
        Event::Boot {
            stored: Some(state),
        },
        now_ms,
    );
    io.step(&mut agent, Event::Connected, now_ms);
    for (topic, payload) in revocations {
        io.step(&mut agent, Event::Message { topic, payload }, now_ms);
    }
    assert_eq!(agent.revocations().seq(), 1);
    assert_eq!(agent.revocation_fresh_as_of(), Some(NOW));
    agent
        .check_presentation(presentation, "door:open", now_ms)
        .expect("the presentation is accepted");
    assert!(io.responses.is_empty(), "nothing asked before the timer");
    io.step(&mut agent, Event::Timer, TIMER_AT * 1000);
    assert_eq!(io.responses.len(), 1, "the timer sends one refresh request");
    io.responses.pop_front().expect("a response")
}

/// What the device's shell and the hub do with the agent's actions, in memory.
struct HostShell<'h> {
    hub: &'h P256Signer,
    device_key: PublicKey,
    /// The hub's answers not yet delivered.
    responses: VecDeque<Vec<u8>>,
    /// The plaintext of the last `Store`.
    stored: Option<Vec<u8>>,
    /// Events handled; the n-th gets `[n; 32]` as its random bytes, as in the image.
    events: u8,
}

impl<'h> HostShell<'h> {
    fn new(hub: &'h P256Signer, device: &P256Signer) -> Self {
        Self {
            hub,
            device_key: device.public_key(),
            responses: VecDeque::new(),
            stored: None,
            events: 0,
        }
    }

    fn step(&mut self, agent: &mut Agent<P256Signer>, event: Event<'_>, now_ms: u64) {
        self.events += 1;
        let random = [self.events; 32];
        let actions = agent.handle(event, now_ms, &random).expect("handle");
        for action in actions.iter() {
            match action {
                Action::Publish { payload, .. } => {
                    self.responses
                        .push_back(answer(self.hub, &self.device_key, payload))
                }
                Action::Store { plaintext } => self.stored = Some(plaintext.to_vec()),
                _ => {}
            }
        }
    }
}

/// The hub's signed answer to one request: enrollment, or a device token with a grant.
fn answer(hub: &P256Signer, device_key: &PublicKey, request: &[u8]) -> Vec<u8> {
    let signed = SignedRequest::decode(request).expect("a well-formed request");
    let req = signed.verify(device_key).expect("signed by the device key");
    let mut tok = [0u8; MAX_TOKEN_LEN];
    let body = match req.body {
        RequestBody::Enroll { .. } => ResponseBody::Enrolled,
        RequestBody::DeviceToken | RequestBody::Refresh { .. } => {
            let claims = Claims {
                iss: "hub-1",
                sub: DEVICE_ID,
                aud: AUDIENCE,
                exp: req.issued_at + DEVICE_TOKEN_LIFETIME,
                nbf: None,
                iat: req.issued_at,
                cti: &[0x42; 16],
                cnf: *device_key,
                scope: Scopes::parse("telemetry:write firmware:read").expect("scope"),
            };
            let n = token::issue(&claims, hub, &mut tok).expect("issue");
            ResponseBody::Token {
                token: &tok[..n],
                grant: Some((&[0x67; 32], req.issued_at + 86_400)),
            }
        }
        other => panic!("the image's agent never asks {other:?}"),
    };
    let response = Response {
        op: Some(req.operation()),
        client: req.client,
        request_id: req.request_id,
        hub_time: req.issued_at,
        nonce: req.nonce,
        outcome: Ok(body),
    };
    let mut out = vec![0u8; 2048];
    let n = response.sign(hub, &mut out).expect("sign response");
    out.truncate(n);
    out
}
