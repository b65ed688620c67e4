//! The agent against a fake hub made of the crate's own codecs: plain values for time and
//! randomness, real signatures, real tokens.

use std::collections::{BTreeSet, VecDeque};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::claims::Claims;
use crate::cose;
use crate::crypto::testing::signer;
use crate::crypto::{P256Signer, Signer};
use crate::error::SignatureError;
use crate::message::{Presentation, SignedRequest, WireError};
use crate::revocation::{
    Addressed, DEFAULT_MAX_AGE, Entry, MAX_HEARTBEAT_LEN, MAX_LEEWAY, MAX_REVOKED, Stream,
    encode_heartbeat, encode_page, max_page_len, partition, token_hash,
};
use crate::scope::Scopes;

const DEVICE: &str = "device-42";
/// Another device of `DEVICE`'s partition (`devices/03`): its entries travel on the same
/// stream.
const NEIGHBOUR: &str = "device-1";
const AUDIENCE: &str = "tessera";
const T0: u64 = 1_700_000_000_000;
const HUB_KEY: u8 = 1;
const DEVICE_KEY: u8 = 2;
const APP_KEY: u8 = 5;

fn config() -> AgentConfig {
    AgentConfig::new(DEVICE, AUDIENCE).expect("valid ids")
}

/// An action, owned, so a test can keep it past the next `handle`.
#[derive(Debug, Clone, PartialEq)]
enum Done {
    Subscribe(String),
    Publish(Vec<u8>),
    Store(Vec<u8>),
    Wipe,
    WakeAt(u64),
    Report(Report),
}

impl From<&Action<'_>> for Done {
    fn from(a: &Action<'_>) -> Self {
        match *a {
            Action::Subscribe(t) => Done::Subscribe(t.to_string()),
            Action::Publish { topic, payload } => {
                assert_eq!(topic, "tessera/v1/client/device-42/req");
                Done::Publish(payload.to_vec())
            }
            Action::Store { plaintext } => Done::Store(plaintext.to_vec()),
            Action::Wipe => Done::Wipe,
            Action::WakeAt(t) => Done::WakeAt(t),
            Action::Report(r) => Done::Report(r),
        }
    }
}

fn ops(done: &[Done]) -> Vec<Operation> {
    requests(done).iter().map(|r| r.op).collect()
}

/// What a published request asked, read back from its bytes.
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    op: Operation,
    request_id: u64,
    nonce: [u8; NONCE_LEN],
    issued_at: u64,
    grant: Option<Vec<u8>>,
    /// For `fetch_revocations`: the stream's name and the first change asked for.
    fetch: Option<(String, u64)>,
}

fn asked(bytes: &[u8]) -> Asked {
    let signed = SignedRequest::decode(bytes).expect("a well-formed request");
    let r = signed
        .verify(&signer(DEVICE_KEY).public_key())
        .expect("signed with the device key");
    Asked {
        op: r.operation(),
        request_id: r.request_id,
        nonce: r.nonce,
        issued_at: r.issued_at,
        grant: match r.body {
            RequestBody::Refresh { grant } => Some(grant.to_vec()),
            _ => None,
        },
        fetch: match r.body {
            RequestBody::FetchRevocations { stream, from } => {
                Some((stream.name().to_string(), from))
            }
            _ => None,
        },
    }
}

fn requests(done: &[Done]) -> Vec<Asked> {
    done.iter()
        .filter_map(|d| match d {
            Done::Publish(p) => Some(asked(p)),
            _ => None,
        })
        .collect()
}

/// The `from` of every `fetch_revocations` published, in order.
fn fetched_from(done: &[Done]) -> Vec<u64> {
    requests(done)
        .into_iter()
        .filter_map(|r| r.fetch)
        .map(|(name, from)| {
            assert_eq!(
                name,
                stream().name().as_str(),
                "the agent asks for its own stream"
            );
            from
        })
        .collect()
}

/// The reports about the revocation list, in order.
fn revocation_reports(done: &[Done]) -> Vec<Report> {
    reports(done)
        .into_iter()
        .filter(|r| {
            matches!(
                r,
                Report::RevocationsApplied { .. }
                    | Report::RevocationGap { .. }
                    | Report::RevocationListFull
            )
        })
        .collect()
}

fn reports(done: &[Done]) -> Vec<Report> {
    done.iter()
        .filter_map(|d| match d {
            Done::Report(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn last_store(done: &[Done]) -> Option<Vec<u8>> {
    done.iter().rev().find_map(|d| match d {
        Done::Store(p) => Some(p.clone()),
        _ => None,
    })
}

/// What the fake hub answers instead of doing what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuse {
    Not,
    With(ErrorCode),
}

/// What the fake hub answers a request it grants with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Granted {
    Enrolled,
    /// A token of this length, in the answer's buffer.
    Token(usize),
    /// A signed page.
    Page(Vec<u8>),
}

/// The agent's revocation stream.
fn stream() -> Stream<'static> {
    Stream::of_device(DEVICE)
}

/// `entry`, addressed to the agent's device.
fn to_device(entry: Entry) -> Addressed {
    Addressed::new(DEVICE, entry).expect("a valid id")
}

/// A hub that answers the agent's requests the way the real one does, in memory.
struct FakeHub {
    key: P256Signer,
    /// The hub's clock, ms.
    now_ms: u64,
    lifetime_s: u64,
    /// How far a request's `issued_at` may be from the hub's clock.
    window_s: u64,
    audience: String,
    code_key: Option<[u8; 32]>,
    device_key: Option<PublicKey>,
    device_revoked: bool,
    /// The one grant that refreshes, single-use.
    grant: Option<[u8; 32]>,
    issued: u8,
    refusals: VecDeque<ErrorCode>,
    /// Requests still to be swallowed without an answer.
    drop: usize,
    /// The changes of the agent's stream (`devices/03`) in order, change n at index n - 1:
    /// the entries each added, for the device and its neighbours alike.
    changes: Vec<Vec<Addressed>>,
    /// Most changes one `fetch_revocations` answer carries.
    changes_per_page: u64,
    /// The maximum age of knowledge its heartbeats announce, seconds.
    max_age: u64,
    last_response: Option<Vec<u8>>,
}

impl FakeHub {
    fn new() -> Self {
        Self {
            key: signer(HUB_KEY),
            now_ms: T0,
            lifetime_s: 600,
            window_s: 60,
            audience: AUDIENCE.to_string(),
            code_key: None,
            device_key: None,
            device_revoked: false,
            grant: None,
            issued: 0,
            refusals: VecDeque::new(),
            drop: 0,
            changes: Vec::new(),
            changes_per_page: 100,
            max_age: DEFAULT_MAX_AGE,
            last_response: None,
        }
    }

    fn now_s(&self) -> u64 {
        self.now_ms / 1000
    }

    fn answer(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let signed = SignedRequest::decode(request).expect("a well-formed request");
        let key = signed
            .enrollment_key()
            .or(self.device_key)
            .expect("enrolled, or enrolling");
        let req = signed.verify(&key).expect("signed by the client's key");
        if self.drop > 0 {
            self.drop -= 1;
            return None;
        }
        let refusal = if req.issued_at.abs_diff(self.now_s()) > self.window_s {
            Refuse::With(ErrorCode::Stale)
        } else if self.device_revoked {
            Refuse::With(ErrorCode::Revoked)
        } else {
            self.refusals.pop_front().map_or(Refuse::Not, Refuse::With)
        };
        let mut token = vec![0u8; MAX_TOKEN_LEN];
        let grant_expires_at = self.now_s() + 86_400;
        let outcome = match (refusal, req.body) {
            (Refuse::With(code), _) => Err(code),
            (Refuse::Not, RequestBody::Enroll { key, code_proof }) => {
                let proved = self.code_key.is_none_or(|ck| {
                    code_proof.is_some_and(|p| {
                        EnrollmentCode::check(&ck, req.client, &key.kid(), &req.nonce, &p)
                    })
                });
                if proved {
                    self.device_key = Some(key);
                    Ok(Granted::Enrolled)
                } else {
                    Err(ErrorCode::Denied)
                }
            }
            (Refuse::Not, RequestBody::DeviceToken) => {
                Ok(Granted::Token(self.issue(req.client, &mut token)))
            }
            (Refuse::Not, RequestBody::Refresh { grant }) => {
                if self.grant.is_some_and(|g| g[..] == *grant) {
                    Ok(Granted::Token(self.issue(req.client, &mut token)))
                } else {
                    Err(ErrorCode::Revoked)
                }
            }
            (Refuse::Not, RequestBody::FetchRevocations { stream: s, from }) => {
                assert_eq!(s, stream(), "the agent asks for its own stream");
                Ok(Granted::Page(self.fetch_answer(from)))
            }
            (Refuse::Not, other) => panic!("the agent never asks {other:?}"),
        };
        let grant = self.grant;
        let outcome = match &outcome {
            Err(code) => Err(WireError {
                code: *code,
                reason: code.name(),
            }),
            Ok(Granted::Enrolled) => Ok(ResponseBody::Enrolled),
            Ok(Granted::Page(page)) => Ok(ResponseBody::Revocations { page }),
            Ok(Granted::Token(n)) => Ok(ResponseBody::Token {
                token: &token[..*n],
                grant: grant.as_ref().map(|g| (&g[..], grant_expires_at)),
            }),
        };
        let response = Response {
            op: Some(req.operation()),
            client: req.client,
            request_id: req.request_id,
            hub_time: self.now_s(),
            nonce: req.nonce,
            outcome,
        };
        let mut out = vec![0u8; 4096];
        let n = response.sign(&self.key, &mut out).expect("sign");
        out.truncate(n);
        self.last_response = Some(out.clone());
        Some(out)
    }

    /// Issues a device token and rotates the grant.
    fn issue(&mut self, device: &str, out: &mut [u8]) -> usize {
        self.issued += 1;
        self.grant = Some([self.issued; 32]);
        let iat = self.now_s();
        let claims = Claims {
            iss: "hub",
            sub: device,
            aud: &self.audience,
            exp: iat + self.lifetime_s,
            nbf: None,
            iat,
            cti: &[self.issued; 16],
            cnf: self.device_key.expect("enrolled"),
            scope: Scopes::parse("telemetry:write").expect("valid"),
        };
        token::issue(&claims, &self.key, out).expect("issue")
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; payload.len() + cose::OVERHEAD];
        let n = cose::sign(&self.key, payload, &mut out).expect("sign");
        out.truncate(n);
        out
    }

    fn control(&self, device: &str, command: Command, issued_at: u64) -> Vec<u8> {
        let mut out = vec![0u8; 256];
        let n = Control {
            device,
            command,
            issued_at,
        }
        .sign(&self.key, &mut out)
        .expect("sign");
        out.truncate(n);
        out
    }

    /// The latest change of the agent's stream.
    fn seq(&self) -> u64 {
        self.changes.len() as u64
    }

    /// Records a change of the agent's stream made of `entries` and returns its delta (the
    /// page `from = to = seq`), signed, as the hub publishes it.
    fn revoke(&mut self, entries: Vec<Addressed>) -> Vec<u8> {
        self.changes.push(entries);
        self.page(self.seq(), self.seq())
    }

    /// The signed page of the agent's stream with the entries of changes `from..=to` the
    /// hub still serves now: as the real one, until `expires_at + MAX_LEEWAY`, so that a
    /// verifier with any leeway finds every entry it needs, and the agent is shown entries
    /// it must itself skip as spent.
    fn page(&self, from: u64, to: u64) -> Vec<u8> {
        let now = self.now_s();
        let entries: Vec<&Addressed> = self.changes
            [usize::try_from(from - 1).expect("fits")..usize::try_from(to).expect("fits")]
            .iter()
            .flatten()
            .filter(|e| e.entry.expires_at() + MAX_LEEWAY >= now)
            .collect();
        self.page_on(&stream(), self.seq(), from, to, &entries)
    }

    /// The answer to `fetch_revocations` from `from`: one page, of at most
    /// `changes_per_page` changes.
    fn fetch_answer(&self, from: u64) -> Vec<u8> {
        let seq = self.seq();
        assert!(
            (1..=seq).contains(&from),
            "the agent asks from change {from}; the stream is at {seq}"
        );
        self.page(from, seq.min(from + self.changes_per_page - 1))
    }

    /// A signed page of any stream, with whatever numbers and entries a test needs.
    fn page_on(
        &self,
        stream: &Stream<'_>,
        seq: u64,
        from: u64,
        to: u64,
        entries: &[&Addressed],
    ) -> Vec<u8> {
        let len = entries.iter().map(|e| e.encoded_len()).sum();
        let mut out = vec![0u8; max_page_len(stream, len)];
        let n = encode_page(
            seq,
            self.now_s(),
            stream,
            from,
            to,
            entries.iter().copied(),
            &mut out,
        )
        .expect("encode");
        self.sign(&out[..n])
    }

    /// A signed heartbeat of the agent's stream, naming its latest change as of now.
    fn heartbeat(&self) -> Vec<u8> {
        self.heartbeat_on(&stream(), self.seq())
    }

    /// A signed heartbeat of any stream, naming change `seq`.
    fn heartbeat_on(&self, stream: &Stream<'_>, seq: u64) -> Vec<u8> {
        let mut out = [0u8; MAX_HEARTBEAT_LEN];
        let n =
            encode_heartbeat(seq, self.now_s(), stream, self.max_age, &mut out).expect("encode");
        self.sign(&out[..n])
    }

    /// An access token issued now to the app `app-7` for `door:open` on the device, bound to
    /// the app's key.
    fn access_token(&self, lifetime_s: u64) -> Vec<u8> {
        let iat = self.now_s();
        let claims = Claims {
            iss: "hub",
            sub: "app-7",
            aud: DEVICE,
            exp: iat + lifetime_s,
            nbf: None,
            iat,
            cti: &[0xa7; 16],
            cnf: signer(APP_KEY).public_key(),
            scope: Scopes::parse("door:open").expect("valid"),
        };
        let mut token = vec![0u8; 512];
        let n = token::issue(&claims, &self.key, &mut token).expect("issue");
        token.truncate(n);
        token
    }

    /// The app's presentation of `token` to the device, made now with `nonce`.
    fn present(&self, token: &[u8], nonce: u8) -> Vec<u8> {
        let mut out = vec![0u8; 1024];
        let n = Presentation {
            token,
            audience: DEVICE,
            issued_at: self.now_s(),
            nonce: [nonce; NONCE_LEN],
        }
        .sign(&signer(APP_KEY), &mut out)
        .expect("sign");
        out.truncate(n);
        out
    }

    /// A new access token, presented with `nonce`.
    fn presentation(&self, lifetime_s: u64, nonce: u8) -> Vec<u8> {
        self.present(&self.access_token(lifetime_s), nonce)
    }
}

/// One device and the hub, on a simulated clock.
struct Sim {
    agent: Agent<P256Signer>,
    config: AgentConfig,
    hub: FakeHub,
    /// The device's local clock, ms.
    now: u64,
    /// Hub clock minus device clock, ms.
    hub_skew_ms: i64,
    hub_online: bool,
    seed: u64,
    draws: u64,
    log: Vec<Done>,
}

impl Sim {
    fn new(config: AgentConfig) -> Self {
        Self::with_seed(config, 1)
    }

    fn with_seed(config: AgentConfig, seed: u64) -> Self {
        let hub = FakeHub::new();
        let agent = Agent::new(config.clone(), signer(DEVICE_KEY), hub.key.public_key())
            .expect("valid configuration");
        Self {
            agent,
            config,
            hub,
            now: T0,
            hub_skew_ms: 0,
            hub_online: true,
            seed,
            draws: 0,
            log: Vec::new(),
        }
    }

    /// The random bytes of the next call: a plain function of the seed and a counter.
    fn random(&mut self) -> [u8; 32] {
        self.draws += 1;
        sha256(&[&self.seed.to_be_bytes(), &self.draws.to_be_bytes()])
    }

    fn hub_now(&self) -> u64 {
        self.now.saturating_add_signed(self.hub_skew_ms)
    }

    fn handle(&mut self, event: Event<'_>) -> Vec<Done> {
        let random = self.random();
        let done: Vec<Done> = self
            .agent
            .handle(event, self.now, &random)
            .expect("handle")
            .iter()
            .map(Done::from)
            .collect();
        self.log.extend(done.iter().cloned());
        done
    }

    /// Handles `event`, then lets the hub answer every request published (while it is
    /// online) and feeds its answers back, until nothing more is published.
    fn step(&mut self, event: Event<'_>) -> Vec<Done> {
        let mut all = self.handle(event);
        let mut next = 0;
        while next < all.len() {
            if let Done::Publish(request) = all[next].clone() {
                self.hub.now_ms = self.hub_now();
                if let Some(response) = self.hub_online.then(|| self.hub.answer(&request)).flatten()
                {
                    let more = self.deliver(RESPONSE_TOPIC, &response);
                    all.extend(more);
                }
            }
            next += 1;
        }
        all
    }

    fn deliver(&mut self, topic: &str, payload: &[u8]) -> Vec<Done> {
        self.handle(Event::Message { topic, payload })
    }

    /// Delivers a message on the agent's delta topic and lets the hub answer what it asks.
    fn on_delta_topic(&mut self, payload: &[u8]) -> Vec<Done> {
        let topic = topic::revocation_delta(&stream());
        self.step(Event::Message {
            topic: &topic,
            payload,
        })
    }

    /// Delivers a message on the agent's heartbeat topic and lets the hub answer what it
    /// asks.
    fn on_heartbeat_topic(&mut self, payload: &[u8]) -> Vec<Done> {
        let topic = topic::revocation_heartbeat(&stream());
        self.step(Event::Message {
            topic: &topic,
            payload,
        })
    }

    /// Moves both clocks to `s` seconds after T0 (no skew), running no wake-ups.
    fn at(&mut self, s: u64) {
        self.now = T0 + s * 1000;
        self.hub.now_ms = self.hub_now();
    }

    /// Checks a presentation for `door:open` now.
    fn check(&mut self, presentation: &[u8]) -> Result<(), Error> {
        self.agent
            .check_presentation(presentation, "door:open", self.now)
            .map(|_| ())
    }

    fn boot_and_connect(&mut self) -> Vec<Done> {
        let mut done = self.step(Event::Boot { stored: None });
        done.extend(self.step(Event::Connected));
        done
    }

    /// Runs every wake-up up to and including local time `until`.
    fn advance_to(&mut self, until: u64) -> Vec<Done> {
        let mut all = Vec::new();
        for _ in 0..100_000 {
            match self.agent.next_wake() {
                Some(wake) if wake <= until => {
                    self.now = self.now.max(wake);
                    all.extend(self.step(Event::Timer));
                }
                _ => {
                    self.now = self.now.max(until);
                    return all;
                }
            }
        }
        panic!("the agent keeps asking to be woken before {until}");
    }

    /// A new agent for the same device, booted from `stored`, as after a power cycle.
    fn restart(&mut self, stored: &[u8]) -> Vec<Done> {
        self.agent = Agent::new(
            self.config.clone(),
            signer(DEVICE_KEY),
            self.hub.key.public_key(),
        )
        .expect("valid configuration");
        let mut done = self.step(Event::Boot {
            stored: Some(stored),
        });
        done.extend(self.step(Event::Connected));
        done
    }
}

const RESPONSE_TOPIC: &str = "tessera/v1/client/device-42/resp";
const CONTROL_TOPIC: &str = "tessera/v1/client/device-42/control";

#[test]
fn boots_enrolls_with_its_code_gets_a_token_and_refreshes_it_with_a_new_grant() {
    let code_key = EnrollmentCode::derive_key("ABCD-EFGH-IJKL");
    let mut sim = Sim::new(AgentConfig {
        enrollment_code_key: Some(code_key),
        ..config()
    });
    sim.hub.code_key = Some(code_key);

    let booted = sim.step(Event::Boot { stored: None });
    assert_eq!(sim.agent.state(), State::AwaitingEnrollment);
    assert!(
        ops(&booted).is_empty(),
        "nothing is published before the connection is up"
    );

    let connected = sim.step(Event::Connected);
    let subscribed: Vec<&Done> = connected
        .iter()
        .filter(|d| matches!(d, Done::Subscribe(_)))
        .collect();
    assert_eq!(subscribed.len(), SUBSCRIPTIONS);
    assert!(connected.contains(&Done::Subscribe(RESPONSE_TOPIC.to_string())));
    assert!(connected.contains(&Done::Subscribe(CONTROL_TOPIC.to_string())));
    assert_eq!(ops(&connected), [Operation::Enroll, Operation::DeviceToken]);
    assert!(reports(&connected).contains(&Report::Enrolled { at: T0 / 1000 }));
    assert_eq!(sim.agent.state(), State::Holding);
    assert_eq!(sim.agent.enrolled_at(), Some(T0 / 1000));

    let first_token = sim.agent.token().expect("holds a token").to_vec();
    let first_grant = sim.hub.grant.expect("the hub issued a grant");
    let stored = last_store(&connected).expect("token and grant are persisted");
    let saved = persisted::Saved::decode(&stored).expect("decodes");
    assert_eq!(saved.token.map(|t| t.bytes), Some(&first_token[..]));
    assert_eq!(saved.grant.map(|g| g.bytes), Some(&first_grant[..]));

    let refresh_at = sim.agent.next_wake().expect("wakes at the refresh point");
    let refreshed = sim.advance_to(refresh_at);
    let asked = requests(&refreshed);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].op, Operation::Refresh);
    assert_eq!(asked[0].grant.as_deref(), Some(&first_grant[..]));
    assert_eq!(sim.agent.state(), State::Holding);
    assert_ne!(sim.agent.token(), Some(&first_token[..]));

    let second_grant = sim.hub.grant.expect("rotated");
    assert_ne!(second_grant, first_grant, "each grant is single-use");
    let saved_again = last_store(&refreshed).expect("the new grant is persisted");
    let saved_again = persisted::Saved::decode(&saved_again).expect("decodes");
    assert_eq!(saved_again.grant.map(|g| g.bytes), Some(&second_grant[..]));
}

#[test]
fn a_wrong_enrollment_code_is_refused_and_retried_with_backoff() {
    let mut sim = Sim::new(AgentConfig {
        enrollment_code_key: Some(EnrollmentCode::derive_key("WRONG")),
        ..config()
    });
    sim.hub.code_key = Some(EnrollmentCode::derive_key("RIGHT"));
    let done = sim.boot_and_connect();
    assert!(reports(&done).contains(&Report::RequestFailed {
        op: Operation::Enroll,
        code: ErrorCode::Denied
    }));
    assert_eq!(sim.agent.state(), State::AwaitingEnrollment);
    assert_eq!(
        sim.agent.last_error(),
        Some(LastError::Refused(ErrorCode::Denied))
    );
    // A refusal that needs an operator first is asked again only at the backoff's cap.
    let retry = sim.agent.next_wake().expect("retries");
    let cap = Backoff::default().cap_ms;
    assert!((T0 + schedule::MIN_RETRY_DELAY_MS..=T0 + cap).contains(&retry));
    sim.hub.code_key = None;
    sim.advance_to(retry);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn the_refresh_point_lies_between_half_and_three_quarters_of_the_lifetime() {
    let mut points = BTreeSet::new();
    for seed in 0..10 {
        let mut sim = Sim::with_seed(config(), seed);
        sim.hub.lifetime_s = 900;
        sim.boot_and_connect();
        let exp_ms = sim.agent.token_expires_at().expect("holds a token") * 1000;
        let iat_ms = exp_ms - 900_000;
        let at = sim.agent.next_wake().expect("wakes to refresh");
        assert!(
            (iat_ms + 450_000..=iat_ms + 675_000).contains(&at),
            "seed {seed}: refresh at {} s of 900",
            (at - iat_ms) / 1000
        );
        points.insert(at);
    }
    assert!(
        points.len() >= 8,
        "different random inputs spread the refresh: {points:?}"
    );
}

/// Runs 100 s of 10-second tokens with a hub that answers everything; returns when the
/// agent refreshed.
fn rotation(seed: u64) -> Vec<u64> {
    let mut sim = Sim::with_seed(config(), seed);
    sim.hub.lifetime_s = 10;
    sim.boot_and_connect();
    let end = T0 + 100_000;
    let mut refreshed_at = Vec::new();
    while let Some(wake) = sim.agent.next_wake().filter(|w| *w <= end) {
        // Nothing happens between wake-ups, so the token held until `wake` must still be
        // valid at `wake`.
        let exp = sim.agent.token_expires_at().expect("always holds a token");
        assert!(
            exp * 1000 > wake,
            "seed {seed}: token lapsed at {exp} before {wake}"
        );
        sim.now = wake;
        let done = sim.step(Event::Timer);
        if ops(&done).contains(&Operation::Refresh) {
            refreshed_at.push(wake);
        }
        assert_eq!(sim.agent.state(), State::Holding);
        assert!(sim.agent.token_expires_at().expect("renewed") * 1000 > sim.now);
    }
    assert!(!reports(&sim.log).contains(&Report::TokenExpired));
    assert!(
        refreshed_at.len() >= 12,
        "seed {seed}: {} refreshes in 100 s of 10 s tokens",
        refreshed_at.len()
    );
    refreshed_at
}

#[test]
fn a_rotation_run_never_lapses_and_its_refresh_times_depend_on_the_random_input() {
    assert_ne!(rotation(1), rotation(2));
}

#[test]
fn a_response_to_another_request_or_client_is_ignored() {
    let mut sim = Sim::new(config());
    sim.hub_online = false;
    sim.boot_and_connect();
    assert_eq!(sim.agent.state(), State::AwaitingEnrollment);

    // The agent takes no answer to a request of its own device that it never sent...
    let mut other = vec![0u8; REQUEST_BUF_LEN];
    let n = Request {
        client: DEVICE,
        request_id: 999,
        issued_at: T0 / 1000,
        nonce: [7; NONCE_LEN],
        body: RequestBody::Enroll {
            key: signer(DEVICE_KEY).public_key(),
            code_proof: None,
        },
    }
    .sign(&signer(DEVICE_KEY), &mut other)
    .expect("sign");
    let answer = sim.hub.answer(&other[..n]).expect("answered");
    let done = sim.deliver(RESPONSE_TOPIC, &answer);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::Unsolicited)]);

    // ...nor the hub's report of an undecodable request (op 0), even if it named the
    // agent's request id and nonce.
    let pending = asked(
        sim.log
            .iter()
            .find_map(|d| match d {
                Done::Publish(p) => Some(p.as_slice()),
                _ => None,
            })
            .expect("enrollment published"),
    );
    let mut op_zero = vec![0u8; 512];
    let n = Response {
        op: None,
        client: DEVICE,
        request_id: pending.request_id,
        hub_time: T0 / 1000,
        nonce: pending.nonce,
        outcome: Err(WireError {
            code: ErrorCode::Malformed,
            reason: "not CBOR",
        }),
    }
    .sign(&sim.hub.key, &mut op_zero)
    .expect("sign");
    let done = sim.deliver(RESPONSE_TOPIC, &op_zero[..n]);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::Unsolicited)]);

    // ...nor another device's request.
    let n = Request {
        client: "device-43",
        request_id: 1,
        issued_at: T0 / 1000,
        nonce: [8; NONCE_LEN],
        body: RequestBody::Enroll {
            key: signer(3).public_key(),
            code_proof: None,
        },
    }
    .sign(&signer(3), &mut other)
    .expect("sign");
    let answer = sim.hub.answer(&other[..n]).expect("answered");
    let done = sim.deliver(RESPONSE_TOPIC, &answer);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::Unsolicited)]);
    assert_eq!(sim.agent.state(), State::AwaitingEnrollment);
    assert_eq!(sim.agent.enrolled_at(), None);
}

#[test]
fn a_replayed_response_is_ignored() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let token = sim.agent.token().expect("holds a token").to_vec();
    let replay = sim.hub.last_response.clone().expect("answered");
    let done = sim.deliver(RESPONSE_TOPIC, &replay);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::Unsolicited)]);
    assert_eq!(last_store(&done), None);
    assert_eq!(sim.agent.token(), Some(&token[..]));
}

#[test]
fn a_forged_response_is_ignored() {
    let mut sim = Sim::new(config());
    sim.hub_online = false;
    let done = sim.boot_and_connect();
    let Some(Done::Publish(enroll)) = done.iter().find(|d| matches!(d, Done::Publish(_))) else {
        panic!("enrollment published");
    };
    // Someone with another key answers the agent's real request, id and nonce and all.
    let mut forger = FakeHub::new();
    forger.key = signer(9);
    let forged = forger.answer(enroll).expect("answered");
    let done = sim.deliver(RESPONSE_TOPIC, &forged);
    let refused = Ignored::Invalid(SignatureError::UnknownKey.into());
    assert_eq!(reports(&done), [Report::Ignored(refused)]);
    assert_eq!(sim.agent.state(), State::AwaitingEnrollment);
    assert_eq!(
        sim.agent.last_error(),
        Some(LastError::Rejected(SignatureError::UnknownKey.into()))
    );

    // The real hub's answer to the same request still counts.
    let real = sim.hub.answer(enroll).expect("answered");
    sim.deliver(RESPONSE_TOPIC, &real);
    assert_eq!(sim.agent.state(), State::AwaitingToken);
}

#[test]
fn a_stale_refusal_adopts_the_hub_clock_and_retries_at_once() {
    for trust_local_clock in [false, true] {
        let mut sim = Sim::new(AgentConfig {
            trust_local_clock,
            ..config()
        });
        sim.hub_skew_ms = 3_600_000;
        let done = sim.boot_and_connect();
        let asked = requests(&done);
        assert_eq!(
            asked.iter().map(|a| a.op).collect::<Vec<_>>(),
            [Operation::Enroll, Operation::Enroll, Operation::DeviceToken]
        );
        assert_eq!(asked[0].issued_at, T0 / 1000, "first with the local clock");
        assert_eq!(asked[1].issued_at, T0 / 1000 + 3600, "then with the hub's");
        let r = reports(&done);
        assert!(r.contains(&Report::RequestFailed {
            op: Operation::Enroll,
            code: ErrorCode::Stale
        }));
        let offset = sim.agent.clock_offset_ms();
        assert!(
            (3_600_000 - 1000..=3_600_000 + 1000).contains(&offset),
            "offset {offset}"
        );
        assert!(r.contains(&Report::ClockAdjusted { offset_ms: offset }));
        assert_eq!(sim.agent.state(), State::Holding);
        // Refresh and expiry are scheduled on the hub's clock, woken on the local one.
        let exp_local = sim.agent.token_expires_at().expect("holds a token") * 1000
            - u64::try_from(offset).expect("positive");
        let wake = sim.agent.next_wake().expect("wakes to refresh");
        assert!(wake < exp_local && wake > T0 + 300_000, "wake {wake}");
    }
}

#[test]
fn without_a_trusted_clock_the_agent_keeps_the_hub_time_of_every_answer() {
    let mut sim = Sim::new(config());
    // Within the hub's freshness window, so nothing is refused as stale.
    sim.hub_skew_ms = 5_000;
    let done = sim.boot_and_connect();
    let offset = sim.agent.clock_offset_ms();
    assert!((4_000..=6_000).contains(&offset), "offset {offset}");
    assert!(reports(&done).contains(&Report::ClockAdjusted { offset_ms: offset }));
    assert!(
        !reports(&done)
            .iter()
            .any(|r| matches!(r, Report::RequestFailed { .. }))
    );
    // Later answers narrow the estimate towards the true offset.
    for _ in 0..4 {
        let at = sim.agent.next_wake().expect("wakes to refresh");
        assert_eq!(ops(&sim.advance_to(at)), [Operation::Refresh]);
    }
    let offset = sim.agent.clock_offset_ms();
    assert!((5_000..=5_999).contains(&offset), "offset {offset}");
}

#[test]
fn internal_errors_back_off_and_keep_retrying_before_the_token_expires() {
    let mut sim = Sim::new(config());
    sim.hub.lifetime_s = 60;
    sim.boot_and_connect();
    let exp_ms = sim.agent.token_expires_at().expect("holds a token") * 1000;
    sim.hub.refusals = core::iter::repeat_n(ErrorCode::Internal, 1000).collect();

    // The hub fails every attempt until two seconds before the token would lapse.
    let until = exp_ms - 2000;
    let mut attempts = Vec::new();
    while let Some(wake) = sim.agent.next_wake().filter(|w| *w < until) {
        sim.now = wake;
        let done = sim.step(Event::Timer);
        attempts.extend(requests(&done).iter().map(|_| wake));
        assert_eq!(sim.agent.state(), State::Refreshing);
    }
    assert!(attempts.len() >= 4, "retried {} times", attempts.len());
    assert!(attempts.iter().all(|t| *t < exp_ms));
    let gaps: BTreeSet<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() > 1, "jittered delays: {gaps:?}");
    assert!(reports(&sim.log).contains(&Report::RequestFailed {
        op: Operation::Refresh,
        code: ErrorCode::Internal
    }));

    // The hub recovers with two seconds left: the next retry comes in time.
    sim.hub.refusals.clear();
    sim.advance_to(exp_ms - 1);
    assert_eq!(sim.agent.state(), State::Holding);
    assert!(sim.agent.token_expires_at().expect("renewed") * 1000 > exp_ms);
    assert!(!reports(&sim.log).contains(&Report::TokenExpired));
}

#[test]
fn a_revoked_or_denied_grant_falls_back_to_the_device_key() {
    for code in [ErrorCode::Revoked, ErrorCode::Denied] {
        let mut sim = Sim::new(config());
        sim.boot_and_connect();
        // The hub no longer honours the grant (its family was revoked after a reuse, or it
        // expired).
        sim.hub.refusals.push_back(code);
        let at = sim.agent.next_wake().expect("wakes to refresh");
        let done = sim.advance_to(at);
        assert_eq!(
            ops(&done),
            [Operation::Refresh, Operation::DeviceToken],
            "{code}"
        );
        assert_eq!(sim.agent.state(), State::Holding);
        assert!(!done.contains(&Done::Wipe));
    }
}

#[test]
fn a_replay_refusal_waits_for_the_answer_to_the_first_copy() {
    let mut sim = Sim::new(config());
    sim.hub_online = false;
    let done = sim.boot_and_connect();
    let Some(Done::Publish(enroll)) = done.into_iter().find(|d| matches!(d, Done::Publish(_)))
    else {
        panic!("enrollment published");
    };
    // The broker delivered the request twice; the hub answered the copy first.
    sim.hub.refusals.push_back(ErrorCode::Replay);
    let replay = sim.hub.answer(&enroll).expect("answered");
    let original = sim.hub.answer(&enroll).expect("answered");
    let done = sim.deliver(RESPONSE_TOPIC, &replay);
    assert!(
        ops(&done).is_empty(),
        "no new attempt while the first may still be answered"
    );
    sim.hub_online = true;
    sim.step(Event::Message {
        topic: RESPONSE_TOPIC,
        payload: &original,
    });
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn a_revoked_device_is_told_so_by_the_hub_and_stops() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    sim.hub.device_revoked = true;
    let at = sim.agent.next_wake().expect("wakes to refresh");
    let done = sim.advance_to(at);
    assert_eq!(ops(&done), [Operation::Refresh, Operation::DeviceToken]);
    assert!(done.contains(&Done::Wipe));
    assert!(reports(&done).contains(&Report::Revoked));
    assert_eq!(sim.agent.state(), State::Revoked);
    assert_eq!(sim.agent.token(), None);
}

fn assert_silent_forever(sim: &mut Sim) {
    assert_eq!(sim.agent.next_wake(), None);
    let mut later = Vec::new();
    for hour in 1..=48 {
        sim.now = T0 + hour * 3_600_000;
        later.extend(sim.step(Event::Timer));
    }
    later.extend(sim.step(Event::Disconnected));
    later.extend(sim.step(Event::Connected));
    assert!(
        later
            .iter()
            .all(|d| !matches!(d, Done::Publish(_) | Done::Subscribe(_) | Done::Store(_))),
        "{later:?}"
    );
}

#[test]
fn revocation_by_control_message_wipes_and_nothing_is_published_ever_after() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let revoke = sim.hub.control(DEVICE, Command::Revoked, T0 / 1000 + 5);
    let done = sim.deliver(CONTROL_TOPIC, &revoke);
    assert_eq!(done, [Done::Wipe, Done::Report(Report::Revoked)]);
    assert_eq!(sim.agent.state(), State::Revoked);
    assert_eq!(sim.agent.token(), None);
    assert_eq!(sim.agent.grant_expires_at(), None);
    assert_silent_forever(&mut sim);
}

#[test]
fn a_control_message_for_another_device_is_ignored() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let revoke = sim
        .hub
        .control("device-43", Command::Revoked, T0 / 1000 + 5);
    let done = sim.deliver(CONTROL_TOPIC, &revoke);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::OtherDevice)]);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn a_control_message_issued_before_enrollment_or_forged_is_ignored() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let old = sim.hub.control(DEVICE, Command::Revoked, T0 / 1000 - 1);
    let done = sim.deliver(CONTROL_TOPIC, &old);
    assert_eq!(reports(&done), [Report::Ignored(Ignored::BeforeEnrollment)]);

    let mut forger = FakeHub::new();
    forger.key = signer(9);
    let forged = forger.control(DEVICE, Command::Revoked, T0 / 1000 + 5);
    let done = sim.deliver(CONTROL_TOPIC, &forged);
    let refused = Ignored::Invalid(SignatureError::UnknownKey.into());
    assert_eq!(reports(&done), [Report::Ignored(refused)]);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn refresh_now_refreshes_at_once_and_only_once() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    sim.now += 2000;
    let first = sim.agent.token().expect("holds a token").to_vec();
    let command = sim.hub.control(DEVICE, Command::RefreshNow, T0 / 1000 + 1);
    let done = sim.step(Event::Message {
        topic: CONTROL_TOPIC,
        payload: &command,
    });
    assert_eq!(ops(&done), [Operation::Refresh]);
    assert_ne!(sim.agent.token(), Some(&first[..]));
    let replayed = sim.step(Event::Message {
        topic: CONTROL_TOPIC,
        payload: &command,
    });
    assert_eq!(reports(&replayed), [Report::Ignored(Ignored::Outdated)]);
    assert!(ops(&replayed).is_empty());
}

#[test]
fn a_restart_from_the_stored_state_resumes_without_enrolling_again() {
    let mut sim = Sim::new(AgentConfig {
        trust_local_clock: true,
        ..config()
    });
    let done = sim.boot_and_connect();
    let stored = last_store(&done).expect("persisted");
    let token = sim.agent.token().expect("holds a token").to_vec();

    sim.now += 1000;
    let resumed = sim.restart(&stored);
    assert!(
        ops(&resumed).is_empty(),
        "neither enrolls nor asks for a token"
    );
    assert_eq!(sim.agent.state(), State::Holding);
    assert_eq!(sim.agent.token(), Some(&token[..]));
    assert_eq!(sim.agent.enrolled_at(), Some(T0 / 1000));

    // It refreshes with the stored grant, at a point of its own in the same window.
    let at = sim.agent.next_wake().expect("wakes to refresh");
    let exp_ms = sim.agent.token_expires_at().expect("token") * 1000;
    assert!((exp_ms - 300_000..=exp_ms - 150_000).contains(&at));
    let refreshed = sim.advance_to(at);
    assert_eq!(ops(&refreshed), [Operation::Refresh]);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn a_restart_without_a_trusted_clock_refreshes_at_once_to_learn_the_time() {
    let mut sim = Sim::new(config());
    let done = sim.boot_and_connect();
    let stored = last_store(&done).expect("persisted");
    // The device lost its clock in the power cycle: local time restarts near zero.
    sim.now = 5_000;
    sim.hub_skew_ms = i64::try_from(T0).expect("fits");
    let resumed = sim.restart(&stored);
    // The first refresh carries the local time and is refused as stale; the answer teaches
    // the agent the hub's time, and the second goes through.
    assert_eq!(ops(&resumed), [Operation::Refresh, Operation::Refresh]);
    assert!(reports(&resumed).contains(&Report::RequestFailed {
        op: Operation::Refresh,
        code: ErrorCode::Stale
    }));
    assert_eq!(sim.agent.state(), State::Holding);
    let offset = sim.agent.clock_offset_ms();
    assert!(offset.abs_diff(i64::try_from(T0).expect("fits")) <= 1000);
}

#[test]
fn a_stored_state_of_another_device_is_refused() {
    let mut sim = Sim::new(config());
    let done = sim.boot_and_connect();
    let stored = last_store(&done).expect("persisted");
    let mut other = Agent::<P256Signer>::new(
        AgentConfig::new("device-43", AUDIENCE).expect("valid"),
        signer(DEVICE_KEY),
        sim.hub.key.public_key(),
    )
    .expect("valid");
    let booted = other.handle(
        Event::Boot {
            stored: Some(&stored),
        },
        T0,
        &[0; 32],
    );
    assert_eq!(
        booted.map(|_| ()),
        Err(DecodeError::InvalidValue("device").into())
    );
    assert_eq!(other.state(), State::Starting);
}

#[test]
fn an_unanswered_request_is_resent_with_a_new_nonce_and_request_id() {
    let mut sim = Sim::new(config());
    sim.hub.drop = 1;
    let done = sim.boot_and_connect();
    let first = requests(&done);
    assert_eq!(first.len(), 1);
    assert_eq!(sim.agent.next_wake(), Some(T0 + DEFAULT_REQUEST_TIMEOUT_MS));

    let done = sim.advance_to(T0 + DEFAULT_REQUEST_TIMEOUT_MS + 1000);
    assert!(reports(&done).contains(&Report::RequestTimedOut {
        op: Operation::Enroll
    }));
    let resent = requests(&done);
    assert_eq!(resent[0].op, Operation::Enroll);
    assert_ne!(resent[0].nonce, first[0].nonce);
    assert_ne!(resent[0].request_id, first[0].request_id);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn a_late_answer_to_an_earlier_attempt_still_counts() {
    let mut sim = Sim::new(config());
    sim.hub_online = false;
    let done = sim.boot_and_connect();
    let Some(Done::Publish(first)) = done.into_iter().find(|d| matches!(d, Done::Publish(_)))
    else {
        panic!("enrollment published");
    };
    let resent = sim.advance_to(T0 + DEFAULT_REQUEST_TIMEOUT_MS + 1000);
    assert_eq!(ops(&resent), [Operation::Enroll]);
    let answer = sim.hub.answer(&first).expect("answered");
    sim.hub_online = true;
    sim.step(Event::Message {
        topic: RESPONSE_TOPIC,
        payload: &answer,
    });
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn requests_wait_for_the_connection_and_go_out_again_after_a_reconnect() {
    let mut sim = Sim::new(config());
    let booted = sim.step(Event::Boot { stored: None });
    assert!(ops(&booted).is_empty());
    assert_eq!(sim.agent.next_wake(), None, "nothing to do until connected");

    sim.hub_online = false;
    let connected = sim.step(Event::Connected);
    let first = requests(&connected);
    assert_eq!(first.len(), 1);
    sim.now += 2000;
    let down = sim.step(Event::Disconnected);
    assert!(ops(&down).is_empty());
    sim.now += 60_000;
    assert!(ops(&sim.step(Event::Timer)).is_empty());

    sim.hub_online = true;
    let again = sim.step(Event::Connected);
    assert_eq!(
        again
            .iter()
            .filter(|d| matches!(d, Done::Subscribe(_)))
            .count(),
        SUBSCRIPTIONS
    );
    let resent = requests(&again);
    assert_eq!(resent[0].op, Operation::Enroll);
    assert_ne!(resent[0].nonce, first[0].nonce);
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn a_token_for_another_audience_is_not_held() {
    let mut sim = Sim::new(config());
    sim.hub.audience = "elsewhere".to_string();
    let done = sim.boot_and_connect();
    assert!(reports(&done).contains(&Report::ResponseRejected {
        op: Operation::DeviceToken,
        error: ClaimsError::WrongAudience.into()
    }));
    assert_eq!(sim.agent.token(), None);
    assert_eq!(sim.agent.state(), State::AwaitingToken);
    // The grant that came with it is kept: the hub considers the old one spent.
    assert!(sim.agent.grant_expires_at().is_some());
}

/// A token entry for the device, expiring with the device's 600 s tokens.
fn revoked_hash(byte: u8) -> Addressed {
    to_device(Entry::Token {
        hash: [byte; 32],
        expires_at: T0 / 1000 + 600,
    })
}

#[test]
fn a_delta_after_a_gap_makes_the_agent_fetch_from_the_first_missing_change() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let delta1 = sim.hub.revoke(vec![revoked_hash(1)]);
    let done = sim.on_delta_topic(&delta1);
    assert_eq!(
        revocation_reports(&done),
        [Report::RevocationsApplied { seq: 1 }]
    );
    assert!(ops(&done).is_empty(), "nothing is missing");

    // The deltas of changes 2 and 3 are lost; the one of change 4 arrives.
    sim.hub.revoke(vec![revoked_hash(2)]);
    sim.hub.revoke(vec![revoked_hash(3)]);
    let delta4 = sim.hub.revoke(vec![revoked_hash(4)]);
    let done = sim.on_delta_topic(&delta4);
    assert_eq!(fetched_from(&done), [2]);
    assert_eq!(
        revocation_reports(&done),
        [
            Report::RevocationGap { have: 1, got: 4 },
            Report::RevocationsApplied { seq: 4 },
        ]
    );
    let list = sim.agent.revocations();
    assert_eq!((list.seq(), list.latest(), list.len()), (4, 4, 4));
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000));
}

#[test]
fn a_heartbeat_ahead_of_the_list_makes_the_agent_fetch_what_it_lacks() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    // Both deltas are lost.
    sim.hub.revoke(vec![revoked_hash(1)]);
    sim.hub.revoke(vec![revoked_hash(2)]);
    sim.at(20);
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
    assert_eq!(
        revocation_reports(&done),
        [
            Report::RevocationGap { have: 0, got: 2 },
            Report::RevocationsApplied { seq: 2 },
        ]
    );
    assert_eq!(sim.agent.revocations().seq(), 2);
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000 + 20));
    // Once in step, the same heartbeat again asks for nothing and reports nothing.
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert!(done.is_empty(), "{done:?}");
}

#[test]
fn a_fetch_takes_page_after_page_until_the_list_holds_every_change() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    sim.hub.changes_per_page = 2;
    // Five changes whose deltas are all lost: more than one page carries.
    for byte in 1..=5 {
        sim.hub.revoke(vec![revoked_hash(byte)]);
    }
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1, 3, 5]);
    assert_eq!(
        revocation_reports(&done),
        [
            Report::RevocationGap { have: 0, got: 5 },
            Report::RevocationGap { have: 2, got: 5 },
            Report::RevocationGap { have: 4, got: 5 },
            Report::RevocationsApplied { seq: 5 },
        ]
    );
    let list = sim.agent.revocations();
    assert_eq!((list.seq(), list.len()), (5, 5));
    assert!(list.wanted_from().is_none());
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000));
}

#[test]
fn a_list_that_overflows_fetches_again_once_per_heartbeat_not_in_a_loop() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    // One entry more than the list holds, all addressed to this device, in one change whose
    // delta is lost.
    sim.hub.revoke(
        (0..=MAX_REVOKED)
            .map(|i| revoked_hash(u8::try_from(i).expect("small")))
            .collect(),
    );
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1], "one fetch");
    assert!(revocation_reports(&done).contains(&Report::RevocationListFull));
    assert_eq!(
        sim.agent.revocations().len(),
        MAX_REVOKED,
        "what fits is kept"
    );
    // Time passes without a heartbeat: no further fetch, however long.
    let done = sim.advance_to(T0 + 120_000);
    assert_eq!(fetched_from(&done), Vec::<u64>::new());
    // The next heartbeat allows one more try.
    sim.hub.now_ms = sim.hub_now();
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
}

#[test]
fn while_changes_are_missing_presentations_are_refused_until_the_fetch_is_answered() {
    let mut sim = presenting();
    let p = sim.hub.presentation(3600, 1);
    sim.hub_online = false;
    sim.hub.revoke(vec![revoked_hash(1)]);
    let delta2 = sim.hub.revoke(vec![revoked_hash(2)]);
    let done = sim.on_delta_topic(&delta2);
    assert_eq!(
        fetched_from(&done),
        [1],
        "asked, but the hub is unreachable"
    );
    assert_eq!(
        sim.check(&p),
        Err(ClaimsError::RevocationsStale.into()),
        "knowledge is recent but misses change 1"
    );

    sim.hub_online = true;
    // The first backoff after a timeout is at most a second.
    let done = sim.advance_to(T0 + DEFAULT_REQUEST_TIMEOUT_MS + 1000);
    assert!(reports(&done).contains(&Report::RequestTimedOut {
        op: Operation::FetchRevocations
    }));
    assert_eq!(fetched_from(&done), [1], "asked again after the timeout");
    assert_eq!(sim.agent.revocations().seq(), 2);
    assert!(sim.check(&p).is_ok());
}

#[test]
fn entries_addressed_to_another_device_of_the_partition_are_not_kept() {
    assert_eq!(partition(NEIGHBOUR), partition(DEVICE), "same stream");
    let mut sim = presenting();
    let token = sim.hub.access_token(3600);
    sim.at(5);
    // What the hub revoked for the neighbour: the same token bytes and the same app, so
    // only the address tells them apart.
    let for_neighbour = |entry| Addressed::new(NEIGHBOUR, entry).expect("a valid id");
    let delta = sim.hub.revoke(vec![
        for_neighbour(Entry::Token {
            hash: token_hash(&token),
            expires_at: T0 / 1000 + 3600,
        }),
        for_neighbour(Entry::for_subject("app-7", T0 / 1000 + 5, T0 / 1000 + 3605).expect("id")),
    ]);
    let done = sim.on_delta_topic(&delta);
    assert_eq!(
        revocation_reports(&done),
        [Report::RevocationsApplied { seq: 1 }]
    );
    assert!(sim.agent.revocations().is_empty());
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000 + 5));
    let p = sim.hub.present(&token, 1);
    assert!(sim.check(&p).is_ok());
}

#[test]
fn a_page_or_heartbeat_of_another_stream_is_ignored_and_does_not_refresh_knowledge() {
    let mut sim = presenting();
    sim.at(80);
    let other_partition = Stream::of_device("device-43");
    assert_ne!(other_partition, stream());
    let entry = Addressed::new(
        "device-43",
        Entry::Token {
            hash: [7; 32],
            expires_at: T0 / 1000 + 600,
        },
    )
    .expect("a valid id");
    let service = Stream::of_service(AUDIENCE).expect("a valid id");
    // Signed by the hub for other verifiers, and delivered (by a broker that mixes streams
    // up) on the agent's own topics, numbered ahead of the agent's stream.
    let foreign = [
        sim.hub.page_on(&other_partition, 7, 7, 7, &[&entry]),
        sim.hub.heartbeat_on(&other_partition, 7),
        sim.hub.heartbeat_on(&service, 7),
    ];
    for message in &foreign {
        for done in [sim.on_delta_topic(message), sim.on_heartbeat_topic(message)] {
            assert_eq!(
                reports(&done),
                [Report::Ignored(Ignored::Invalid(
                    DecodeError::InvalidValue("stream").into()
                ))]
            );
            assert!(ops(&done).is_empty(), "nothing is fetched");
        }
    }
    let list = sim.agent.revocations();
    assert_eq!((list.seq(), list.latest(), list.len()), (0, 0, 0));
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000));
    sim.at(DEFAULT_MAX_AGE + 1);
    let p = sim.hub.presentation(3600, 1);
    assert_eq!(sim.check(&p), Err(ClaimsError::RevocationsStale.into()));
}

#[test]
fn a_newer_key_set_is_trusted_and_persisted() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let next = signer(7);
    let set =
        KeySet::new(1, T0 / 1000, &[sim.hub.key.public_key(), next.public_key()]).expect("fits");
    let mut out = [0u8; 1024];
    let n = set.sign(&sim.hub.key, &mut out).expect("sign");
    let done = sim.deliver(topic::KEYS, &out[..n]);
    assert!(reports(&done).contains(&Report::KeySetUpdated { version: 1 }));
    let stored = last_store(&done).expect("persisted");
    let saved = persisted::Saved::decode(&stored).expect("decodes");
    assert_eq!(saved.keys, set);
    assert_eq!(
        reports(&sim.deliver(topic::KEYS, &out[..n])),
        [Report::Ignored(Ignored::Outdated)]
    );

    // The hub now signs with the next key; the agent follows.
    sim.hub.key = next;
    let at = sim.agent.next_wake().expect("wakes to refresh");
    let refreshed = sim.advance_to(at);
    assert!(reports(&refreshed).contains(&Report::TokenRenewed {
        expires_at: at / 1000 + 600
    }));
    assert_eq!(sim.agent.state(), State::Holding);
}

/// An agent holding a token, with revocation knowledge fresh as of T0: the hub's heartbeat
/// of the device's (still empty) stream.
fn presenting() -> Sim {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let heartbeat = sim.hub.heartbeat();
    assert!(sim.on_heartbeat_topic(&heartbeat).is_empty());
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000));
    sim
}

#[test]
fn a_presentation_is_accepted_once_and_refused_when_replayed() {
    let mut sim = presenting();
    let p = sim.hub.presentation(300, 1);
    let checked = sim
        .agent
        .check_presentation(&p, "door:open", sim.now)
        .expect("accepted");
    assert_eq!(checked.token.claims().sub, "app-7");
    assert_eq!(
        sim.agent
            .check_presentation(&p, "door:open", sim.now + 1000)
            .map(|_| ()),
        Err(ClaimsError::PresentationReplayed.into())
    );
    assert_eq!(
        sim.agent
            .check_presentation(&sim.hub.presentation(300, 2), "door:close", sim.now)
            .map(|_| ()),
        Err(ClaimsError::MissingScope.into())
    );
}

#[test]
fn a_presentation_is_refused_when_revocation_knowledge_is_stale() {
    let mut sim = presenting();
    assert_eq!(sim.agent.revocation_max_age(), DEFAULT_MAX_AGE);
    sim.at(DEFAULT_MAX_AGE + 1);
    let p = sim.hub.presentation(3600, 1);
    assert_eq!(sim.check(&p), Err(ClaimsError::RevocationsStale.into()));
    // A heartbeat makes the same presentation acceptable.
    let heartbeat = sim.hub.heartbeat();
    sim.on_heartbeat_topic(&heartbeat);
    assert!(sim.check(&p).is_ok());
}

#[test]
fn a_presentation_of_a_token_revoked_by_hash_or_by_subject_is_refused() {
    let mut sim = presenting();
    let earlier = sim.hub.access_token(300);
    sim.at(2);
    let token = sim.hub.access_token(300);
    assert!(sim.check(&sim.hub.present(&token, 1)).is_ok());

    sim.at(5);
    let delta = sim.hub.revoke(vec![to_device(Entry::Token {
        hash: token_hash(&token),
        expires_at: T0 / 1000 + 302,
    })]);
    sim.on_delta_topic(&delta);
    assert_eq!(
        sim.check(&sim.hub.present(&token, 2)),
        Err(ClaimsError::Revoked.into())
    );
    assert!(sim.check(&sim.hub.present(&earlier, 3)).is_ok());

    // Everything issued to the app before T0+1.
    let delta = sim.hub.revoke(vec![to_device(
        Entry::for_subject("app-7", T0 / 1000 + 1, T0 / 1000 + 301).expect("id"),
    )]);
    sim.on_delta_topic(&delta);
    assert_eq!(
        sim.check(&sim.hub.present(&earlier, 4)),
        Err(ClaimsError::Revoked.into())
    );
    let later = sim.hub.access_token(300);
    assert!(sim.check(&sim.hub.present(&later, 5)).is_ok());
}

#[test]
fn a_suppressed_revocation_passes_only_until_knowledge_is_older_than_the_max_age() {
    let mut sim = presenting();
    let token = sim.hub.access_token(3600);
    let old_heartbeat = sim.hub.heartbeat();
    sim.at(10);
    // The hub revokes the app's token; the broker drops the delta and, from then on, only
    // replays the hub's old heartbeat, which it cannot forge anew.
    sim.hub.revoke(vec![to_device(Entry::Token {
        hash: token_hash(&token),
        expires_at: T0 / 1000 + 3600,
    })]);
    for (s, nonce) in [(30, 1), (DEFAULT_MAX_AGE, 2)] {
        sim.at(s);
        assert!(sim.on_heartbeat_topic(&old_heartbeat).is_empty());
        assert!(
            sim.check(&sim.hub.present(&token, nonce)).is_ok(),
            "T0+{s}: knowledge is {s} s old, within the max age"
        );
    }
    assert_eq!(sim.agent.revocation_fresh_as_of(), Some(T0 / 1000));
    sim.at(DEFAULT_MAX_AGE + 1);
    assert!(sim.on_heartbeat_topic(&old_heartbeat).is_empty());
    assert_eq!(
        sim.check(&sim.hub.present(&token, 3)),
        Err(ClaimsError::RevocationsStale.into())
    );

    // A new heartbeat gets through and names the change the agent never saw.
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
    assert_eq!(
        sim.check(&sim.hub.present(&token, 4)),
        Err(ClaimsError::Revoked.into())
    );
}

#[test]
fn the_max_age_is_the_one_the_hubs_heartbeat_announces() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    assert_eq!(
        sim.agent.revocation_max_age(),
        DEFAULT_MAX_AGE,
        "before any heartbeat"
    );
    sim.hub.max_age = 40;
    let heartbeat = sim.hub.heartbeat();
    sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(sim.agent.revocation_max_age(), 40);
    let token = sim.hub.access_token(3600);
    sim.at(40);
    assert!(sim.check(&sim.hub.present(&token, 1)).is_ok());
    sim.at(41);
    assert_eq!(
        sim.check(&sim.hub.present(&token, 2)),
        Err(ClaimsError::RevocationsStale.into())
    );
}

#[test]
fn a_configured_max_age_only_tightens_the_announced_one() {
    // (configured, announced, what applies): a larger configured one, as older default
    // configs wrote, is ignored; a smaller one applies.
    for (configured, announced, applies) in [(300, 40, 40), (20, 40, 20)] {
        let mut sim = Sim::new(AgentConfig {
            revocation_max_age_s: Some(configured),
            ..config()
        });
        sim.boot_and_connect();
        assert_eq!(
            sim.agent.revocation_max_age(),
            configured.min(DEFAULT_MAX_AGE),
            "before any heartbeat, against the default"
        );
        sim.hub.max_age = announced;
        let heartbeat = sim.hub.heartbeat();
        sim.on_heartbeat_topic(&heartbeat);
        assert_eq!(sim.agent.revocation_max_age(), applies);
        let token = sim.hub.access_token(3600);
        sim.at(applies);
        assert!(sim.check(&sim.hub.present(&token, 1)).is_ok());
        sim.at(applies + 1);
        assert_eq!(
            sim.check(&sim.hub.present(&token, 2)),
            Err(ClaimsError::RevocationsStale.into()),
            "configured {configured}, announced {announced}"
        );
    }
}

#[test]
fn presentations_are_refused_before_the_clock_is_learned() {
    let mut sim = Sim::new(config());
    sim.step(Event::Boot { stored: None });
    let p = sim.hub.presentation(300, 1);
    assert_eq!(sim.check(&p), Err(ClaimsError::RevocationsStale.into()));
}

#[test]
fn the_most_actions_one_event_can_cause_fit() {
    // Both exchanges open and unanswered, then a reconnect: subscriptions, two publishes.
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    sim.hub_online = false;
    for byte in 1..=5 {
        sim.hub.revoke(vec![revoked_hash(byte)]);
    }
    let heartbeat = sim.hub.heartbeat();
    sim.on_heartbeat_topic(&heartbeat);
    sim.now += 1;
    let command = sim.hub.control(DEVICE, Command::RefreshNow, T0 / 1000);
    sim.step(Event::Message {
        topic: CONTROL_TOPIC,
        payload: &command,
    });
    let done = sim.step(Event::Connected);
    assert_eq!(
        ops(&done),
        [Operation::Refresh, Operation::FetchRevocations]
    );
    assert!(done.len() <= MAX_ACTIONS);
}

#[test]
fn unknown_topics_and_garbage_are_reported_not_fatal() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    assert_eq!(
        reports(&sim.deliver("tessera/v1/hub/other", b"x")),
        [Report::Ignored(Ignored::UnknownTopic)]
    );
    // Another partition's stream is not one the agent follows.
    let elsewhere = topic::revocation_delta(&Stream::of_device("device-43"));
    assert_eq!(
        reports(&sim.deliver(&elsewhere, b"x")),
        [Report::Ignored(Ignored::UnknownTopic)]
    );
    let own = stream();
    for topic in [
        RESPONSE_TOPIC,
        CONTROL_TOPIC,
        topic::KEYS,
        &topic::revocation_delta(&own),
        &topic::revocation_heartbeat(&own),
        &topic::revocation_snapshot_page(&own, 0),
    ] {
        let r = reports(&sim.deliver(topic, &[0xff, 0x00, 0x13]));
        assert!(
            matches!(r[..], [Report::Ignored(Ignored::Invalid(_))]),
            "{topic}: {r:?}"
        );
    }
    // The hub clearing a retained snapshot page it no longer needs.
    assert_eq!(
        reports(&sim.deliver(&topic::revocation_snapshot_page(&own, 3), &[])),
        [Report::Ignored(Ignored::Outdated)]
    );
    assert_eq!(sim.agent.state(), State::Holding);
}

#[test]
fn the_clock_keeps_an_offset_every_answer_agrees_with_and_follows_a_jump() {
    let mut clock = Clock::new(false);
    // Hub second 1000 seen between local 0 and 0: the offset is in [1_000_000, 1_000_999].
    assert_eq!(clock.learn(1000, 0, 0), Some(1_000_499));
    // An answer that agrees leaves it alone.
    assert_eq!(clock.learn(1001, 800, 900), None);
    // One that narrows the interval below the estimate moves it into the overlap.
    assert_eq!(clock.learn(1002, 2_600, 2_600), Some(1_000_249));
    // The local clock restarts from zero: nothing agrees any more, the new answer counts.
    assert_eq!(clock.learn(1003, 0, 10), Some(1_003_494));
    assert_eq!(clock.hub_s(10), 1003);
}

#[test]
fn the_longest_request_fits_its_buffer() {
    let id = "d".repeat(crate::MAX_ID_LEN);
    let config = AgentConfig {
        enrollment_code_key: Some([7; 32]),
        ..AgentConfig::new(&id, AUDIENCE).expect("valid")
    };
    let mut agent =
        Agent::<P256Signer>::new(config, signer(DEVICE_KEY), signer(HUB_KEY).public_key())
            .expect("valid");
    agent
        .handle(Event::Boot { stored: None }, T0, &[1; 32])
        .expect("boots");
    let actions = agent
        .handle(Event::Connected, T0, &[2; 32])
        .expect("connects");
    let len = actions
        .iter()
        .find_map(|a| match a {
            Action::Publish { payload, .. } => Some(payload.len()),
            _ => None,
        })
        .expect("the enrollment is published");
    assert!((300..=REQUEST_BUF_LEN).contains(&len), "{len} bytes");
}

#[test]
fn a_refresh_lost_near_expiry_is_resent_in_time_to_keep_the_token() {
    let mut sim = Sim::new(config());
    // Shorter than the default request timeout: waiting the full timeout would lapse.
    sim.hub.lifetime_s = 8;
    sim.boot_and_connect();
    assert_eq!(sim.agent.state(), State::Holding);
    let expires_ms = T0 + 8_000;
    let refresh_at = sim.agent.next_wake().expect("a refresh is scheduled");
    sim.hub.drop = 1;
    let done = sim.advance_to(refresh_at);
    assert_eq!(
        ops(&done),
        [Operation::Refresh],
        "the refresh went out and was lost"
    );
    let deadline = sim.agent.next_wake().expect("waits for the answer");
    assert!(
        deadline <= refresh_at + (expires_ms - refresh_at) / 2,
        "waits at most half of the remaining lifetime: {deadline} vs expiry {expires_ms}"
    );
    let done = sim.advance_to(expires_ms - 1);
    assert!(
        reports(&done)
            .iter()
            .any(|r| matches!(r, Report::TokenRenewed { .. })),
        "renewed before expiry: {:?}",
        reports(&done)
    );
    assert!(!reports(&done).contains(&Report::TokenExpired));
}

// --- revocations and the clock ---

/// One hour, in ms: how far the device clocks below are off.
const HOUR_MS: u64 = 3_600_000;

#[test]
fn a_snapshot_received_before_the_clock_is_learned_loses_no_entry() {
    let mut sim = Sim::new(config());
    // The device's clock is an hour fast, and no answer from the hub has told it yet.
    sim.hub_skew_ms = -i64::try_from(HOUR_MS).expect("fits");
    sim.hub.now_ms = sim.hub_now();
    let token = sim.hub.access_token(300);
    sim.hub.revoke(vec![to_device(Entry::Token {
        hash: token_hash(&token),
        expires_at: sim.hub.now_s() + 300 + 30,
    })]);
    // The hub is slow to answer; meanwhile the retained snapshot arrives on subscribing.
    sim.hub_online = false;
    sim.boot_and_connect();
    let snapshot = sim.hub.page(1, sim.hub.seq());
    let done = sim.deliver(&topic::revocation_snapshot_page(&stream(), 0), &snapshot);
    assert_eq!(
        revocation_reports(&done),
        [Report::RevocationsApplied { seq: 1 }]
    );
    assert_eq!(
        sim.agent.revocations().len(),
        1,
        "spent by the device's own clock, but that clock is not known to be right"
    );
    // The hub answers the resent enrollment: `stale`, which sets the clock, then the rest.
    sim.hub_online = true;
    let until = sim.now + 2 * DEFAULT_REQUEST_TIMEOUT_MS;
    sim.advance_to(until);
    assert_eq!(sim.agent.state(), State::Holding);
    let offset = sim.agent.clock_offset_ms();
    assert!(
        offset.abs_diff(-i64::try_from(HOUR_MS).expect("fits")) <= 1000,
        "offset {offset}"
    );
    sim.hub.now_ms = sim.hub_now();
    let heartbeat = sim.hub.heartbeat();
    sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(
        sim.check(&sim.hub.present(&token, 1)),
        Err(ClaimsError::Revoked.into())
    );
}

#[test]
fn a_clock_set_back_after_entries_were_skipped_as_spent_fetches_the_stream_again() {
    for trust_local_clock in [false, true] {
        let mut sim = Sim::new(AgentConfig {
            trust_local_clock,
            ..config()
        });
        sim.boot_and_connect();
        let heartbeat = sim.hub.heartbeat();
        sim.on_heartbeat_topic(&heartbeat);
        let token = sim.hub.access_token(300);
        // The device's clock steps an hour ahead (a bad time source); the hub's does not.
        sim.now += HOUR_MS;
        sim.hub_skew_ms -= i64::try_from(HOUR_MS).expect("fits");
        let delta = sim.hub.revoke(vec![to_device(Entry::Token {
            hash: token_hash(&token),
            expires_at: T0 / 1000 + 300 + 30,
        })]);
        // By the device's clock the entry is spent. Its token looks expired too, so it asks
        // for a new one: the hub refuses it as `stale`, which sets the clock back an hour.
        let done = sim.on_delta_topic(&delta);
        assert!(reports(&done).contains(&Report::RequestFailed {
            op: Operation::Refresh,
            code: ErrorCode::Stale
        }));
        assert!(
            reports(&done).contains(&Report::RevocationsRefetching { latest: 1 }),
            "{done:?}"
        );
        assert_eq!(fetched_from(&done), [1], "from the start of the stream");
        assert_eq!(sim.agent.state(), State::Holding);
        let list = sim.agent.revocations();
        assert_eq!((list.seq(), list.len()), (1, 1));
        assert_eq!(
            sim.check(&sim.hub.present(&token, 1)),
            Err(ClaimsError::Revoked.into()),
            "trust_local_clock = {trust_local_clock}"
        );
    }
}

#[test]
fn between_a_clock_set_back_and_the_next_event_knowledge_is_not_fresh() {
    let mut sim = presenting();
    let token = sim.hub.access_token(3600);
    // Applied while the device's clock was an hour ahead.
    sim.now += HOUR_MS;
    sim.hub_skew_ms -= i64::try_from(HOUR_MS).expect("fits");
    let delta = sim.hub.revoke(vec![revoked_hash(1)]);
    sim.deliver(&topic::revocation_delta(&stream()), &delta);
    // The local clock steps back, and an app presents before the agent handles anything.
    sim.now -= HOUR_MS;
    sim.hub_skew_ms += i64::try_from(HOUR_MS).expect("fits");
    assert_eq!(
        sim.check(&sim.hub.present(&token, 1)),
        Err(ClaimsError::RevocationsStale.into())
    );
    // The next event has it fetch the stream again; then it vouches once more.
    let done = sim.step(Event::Timer);
    assert_eq!(fetched_from(&done), [1]);
    assert!(sim.check(&sim.hub.present(&token, 2)).is_ok());
}

#[test]
fn a_clock_correction_within_the_leeway_keeps_what_the_list_applied() {
    for (ahead_s, refetched) in [
        (token::DEFAULT_LEEWAY - 10, false),
        (token::DEFAULT_LEEWAY + 10, true),
    ] {
        let mut sim = presenting();
        // The device's clock runs ahead of the hub's (within the hub's request window) when
        // a change arrives; a RefreshNow makes it ask, and the answer corrects the clock.
        sim.now += ahead_s * 1000;
        sim.hub_skew_ms -= i64::try_from(ahead_s * 1000).expect("fits");
        let delta = sim.hub.revoke(vec![revoked_hash(1)]);
        sim.on_delta_topic(&delta);
        let command = sim.hub.control(DEVICE, Command::RefreshNow, T0 / 1000);
        let done = sim.step(Event::Message {
            topic: CONTROL_TOPIC,
            payload: &command,
        });
        assert!(
            reports(&done)
                .iter()
                .any(|r| matches!(r, Report::ClockAdjusted { .. })),
            "{done:?}"
        );
        assert_eq!(
            reports(&done).contains(&Report::RevocationsRefetching { latest: 1 }),
            refetched,
            "{ahead_s} s ahead: {done:?}"
        );
        let list = sim.agent.revocations();
        assert_eq!((list.seq(), list.len()), (1, 1));
    }
}

#[test]
fn an_entry_the_hub_still_serves_but_spent_by_the_agents_clock_is_skipped() {
    let mut sim = presenting();
    // Expired 10 s after T0: the hub serves it until expires_at + MAX_LEEWAY.
    sim.hub.revoke(vec![to_device(Entry::Token {
        hash: [9; 32],
        expires_at: T0 / 1000 + 10,
    })]);
    sim.at(10 + token::DEFAULT_LEEWAY + 1);
    let served = sim.hub.page(1, 1);
    let payload = revocation::verify(&served, &sim.hub.key.public_key()).expect("verifies");
    assert_eq!(Page::decode(payload).expect("a page").entries().len(), 1);
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
    let list = sim.agent.revocations();
    assert_eq!((list.seq(), list.len()), (1, 0), "applied, nothing kept");
    assert!(list.is_complete());
}

#[test]
fn a_replayed_heartbeat_does_not_retry_a_list_that_overflowed() {
    let mut sim = Sim::new(config());
    sim.boot_and_connect();
    let before = sim.hub.heartbeat();
    sim.at(1);
    sim.hub.revoke(
        (0..=MAX_REVOKED)
            .map(|i| revoked_hash(u8::try_from(i).expect("small")))
            .collect(),
    );
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
    assert!(revocation_reports(&done).contains(&Report::RevocationListFull));
    // A broker replays the hub's heartbeats: the one that named the change (Behind), and
    // an older one (Outdated). Neither is a new heartbeat interval.
    sim.at(30);
    for replay in [&heartbeat, &before, &heartbeat] {
        let done = sim.on_heartbeat_topic(replay);
        assert_eq!(fetched_from(&done), Vec::<u64>::new(), "{done:?}");
    }
    // A new heartbeat allows one more try.
    let heartbeat = sim.hub.heartbeat();
    let done = sim.on_heartbeat_topic(&heartbeat);
    assert_eq!(fetched_from(&done), [1]);
}
