//! The hub's request pipeline driven by the real device agent, without a broker.
//!
//! An in-memory SQLite store, a fake clock, and a tiny in-memory bus: what an agent
//! publishes on its request topic goes to [`Hub::handle`]; the hub's replies and broadcasts
//! (key set, revocation deltas, snapshots, heartbeats, control messages) go to every agent
//! subscribed to their topic, retained messages included. Control apps and operators are
//! test-side clients signing their own requests on the same bus. Time moves only when a test
//! moves it: the rig runs every agent wake-up and every hub heartbeat in order, advancing the
//! fake clock (and tokio's paused clock with it), so a test of minutes of protocol time
//! takes milliseconds.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tessera_hub::anomaly::{Alert, AlertKind, AnomalyConfig, Detector};
use tessera_hub::client::Answer;
use tessera_hub::clock::{Clock, FakeClock};
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::pipeline::{Echo, FOREIGN_GRANT, Hub, PipelineConfig, Publication};
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::policy_change;
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store, StoreError};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Report, State};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer, sha256};
use tessera_shared::error::{ClaimsError, Error};
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{
    EnrollmentCode, ErrorCode, NONCE_LEN, Operation, Presentation, Request, RequestBody,
    ResponseBody, RevokeTarget, SignedRequest, SignedResponse,
};
use tessera_shared::revocation::{Stream, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;

/// The rig's start, Unix seconds.
const T0: u64 = 1_767_225_600;
const HUB_ID: &str = "hub-1";
/// The hub's heartbeat interval, seconds.
const HEARTBEAT_S: u64 = 30;
/// How long a new signing key is announced before it signs, seconds.
const ANNOUNCE_S: u64 = 60;
const APP: &str = "app-7";
const OPERATOR: &str = "ops-1";
const APP_KEY: u32 = 2;
const OPERATOR_KEY: u32 = 1;

const POLICY: &str = r#"
[defaults]
leeway_s = 30
device_token_lifetime_s = 900
access_token_lifetime_s = 300
grant_lifetime_s = 86400
device_audience = "tessera"

[groups]
building-a = "Doors in building A"

[roles.lock]
kind = "device"
scopes = ["telemetry:write", "events:publish"]
token_lifetime_s = 600

[roles.controller]
kind = "app"
token_lifetime_s = 120

[roles.ops]
kind = "operator"
operations = ["revoke"]

[[access]]
app_roles = ["controller"]
device_groups = ["building-a"]
scopes = ["door:open", "light:on"]
"#;

/// A deterministic client key: devices, the app and the operator each have their own.
fn signer(n: u32) -> P256Signer {
    let mut scalar = [0u8; 32];
    scalar[28..].copy_from_slice(&n.to_be_bytes());
    scalar[0] = 0x22;
    P256Signer::from_scalar(&scalar).expect("scalar")
}

/// Whether an MQTT topic filter (`+` and `#` wildcards) matches a topic name, as the
/// broker decides what to deliver to whom.
fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// An agent's action, owned, so the rig can act on it after the agent's next event.
#[derive(Debug, Clone, PartialEq)]
enum Done {
    Subscribe(String),
    Publish(String, Vec<u8>),
    Store,
    Wipe,
    WakeAt,
    Report(Report),
}

impl From<&Action<'_>> for Done {
    fn from(a: &Action<'_>) -> Self {
        match *a {
            Action::Subscribe(t) => Done::Subscribe(t.to_owned()),
            Action::Publish { topic, payload } => Done::Publish(topic.to_owned(), payload.to_vec()),
            Action::Store { .. } => Done::Store,
            Action::Wipe => Done::Wipe,
            Action::WakeAt(_) => Done::WakeAt,
            Action::Report(r) => Done::Report(r),
        }
    }
}

/// What an agent asked the hub, read back from a request it published.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Asked {
    op: Operation,
    /// The grant a refresh presented.
    grant: Option<Vec<u8>>,
}

/// One device: the real agent, and what it did.
struct Device {
    id: String,
    /// Its client key's number (see [`signer`]).
    key: u32,
    agent: Box<Agent<P256Signer>>,
    subscriptions: Vec<String>,
    log: Vec<Done>,
    draws: u64,
}

/// A message on its way: published to the bus, or a retained one delivered to one device
/// that just subscribed.
enum Delivery {
    Publish(Publication),
    Retained(usize, String, Vec<u8>),
}

/// A reply to a test-side client: the answer, or the refusal's code and reason.
type Reply = Result<Answer, (ErrorCode, String)>;

/// How a device is registered before it first connects.
enum Registration<'a> {
    /// With its public key (client key `n`).
    Key(u32),
    /// With a one-time enrollment code: it brings a key of its own.
    Code(&'a str),
}

struct Rig {
    hub: Hub<Sqlite>,
    clock: FakeClock,
    kek: Kek,
    anchor: PublicKey,
    devices: Vec<Device>,
    /// What the broker retains, by topic.
    retained: BTreeMap<String, Vec<u8>>,
    /// Every message the bus carried, in order.
    carried: Vec<Publication>,
    queue: VecDeque<Delivery>,
    /// When the hub's next heartbeat is due, if it runs them.
    next_beat_ms: Option<u64>,
    next_request: u64,
    /// Anomaly detection over every decision the hub reports, as the serving loop runs
    /// it, and the alerts it raised.
    detector: Detector,
    alerts: Vec<Alert>,
}

impl Rig {
    /// A hub with its first signing key (the devices' trust anchor), the policy, a control
    /// app and an operator; it has published its key set and a first round of heartbeats,
    /// as on connecting to the broker.
    async fn new() -> Self {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![9; 32]).expect("kek");
        let anchor = keys::create_key(&store, &kek, HUB_ID, T0, T0, Some(T0))
            .await
            .expect("key");
        let ring = KeyRing::load(&store, &kek, HUB_ID, T0).await.expect("ring");
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = Hub {
            store,
            policy: SharedPolicy::new(Policy::from_toml(POLICY, "policy.toml").expect("policy")),
            keys: tokio::sync::RwLock::new(ring),
            clock: std::sync::Arc::new(clock.clone()),
            config: PipelineConfig {
                hub_id: HUB_ID.into(),
                heartbeat_s: HEARTBEAT_S,
                ..PipelineConfig::default()
            },
            rng: std::sync::Arc::new(tessera_hub::rng::SeededRng::new([5; 32])),
            metrics: std::sync::Arc::new(tessera_hub::metrics::Metrics::new()),
        };
        for (id, kind, role, key) in [
            (OPERATOR, ClientKind::Operator, "ops", OPERATOR_KEY),
            (APP, ClientKind::App, "controller", APP_KEY),
        ] {
            hub.store
                .add_client(record(id, kind, role, Some(&signer(key)), None))
                .await
                .expect("client");
        }
        let mut rig = Self {
            hub,
            clock,
            kek,
            anchor,
            devices: Vec::new(),
            retained: BTreeMap::new(),
            carried: Vec::new(),
            queue: VecDeque::new(),
            next_beat_ms: Some(T0 * 1000),
            next_request: 0,
            detector: Detector::new(AnomalyConfig::default()),
            alerts: Vec::new(),
        };
        rig.publish_key_set().await;
        rig.run_until(T0 * 1000).await;
        rig
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    // --- the bus ---

    /// Delivers everything queued, and everything that causes, until nothing moves.
    async fn pump(&mut self) {
        let mut steps = 0;
        while let Some(delivery) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "messages keep causing messages");
            let p = match delivery {
                Delivery::Retained(i, topic, payload) => {
                    self.event(
                        i,
                        Event::Message {
                            topic: &topic,
                            payload: &payload,
                        },
                    );
                    continue;
                }
                Delivery::Publish(p) => p,
            };
            self.carried.push(p.clone());
            if p.retain {
                if p.payload.is_empty() {
                    self.retained.remove(&p.topic);
                } else {
                    self.retained.insert(p.topic.clone(), p.payload.clone());
                }
            }
            // The hub is subscribed to every client's request topic.
            if let Some(client) = topic::requesting_client(&p.topic) {
                let handled = self.hub.handle(client, &p.payload).await;
                let now_ms = self.now_ms();
                for decision in handled.decision.iter().chain(&handled.reported) {
                    let raised = self.detector.observe(decision, now_ms);
                    self.alerts.extend(raised);
                }
                self.queue.extend(
                    handled
                        .reply
                        .into_iter()
                        .chain(handled.broadcast)
                        .map(Delivery::Publish),
                );
                continue;
            }
            // ... and to its own deltas and control messages: seeing one back confirms the
            // broker took it.
            if topic::delta_stream(&p.topic).is_some()
                || topic::controlled_device(&p.topic).is_some()
            {
                self.confirm(&p).await;
            }
            for i in 0..self.devices.len() {
                if self.devices[i]
                    .subscriptions
                    .iter()
                    .any(|f| matches(f, &p.topic))
                {
                    self.event(
                        i,
                        Event::Message {
                            topic: &p.topic,
                            payload: &p.payload,
                        },
                    );
                }
            }
        }
    }

    /// What the server does with its own message seen back from the broker.
    async fn confirm(&self, p: &Publication) {
        match self.hub.echo(&p.topic, &p.payload).await {
            Some(Echo::Changes(stream, from, to)) => self
                .hub
                .store
                .mark_published(vec![(stream, from, to)])
                .await
                .expect("mark published"),
            Some(Echo::Control(c)) => self
                .hub
                .store
                .mark_controls_sent(vec![c])
                .await
                .expect("mark sent"),
            None => panic!("the hub does not recognise its own message on {}", p.topic),
        }
    }

    /// Hands an event to device `i`'s agent at the current time and queues what it does.
    fn event(&mut self, i: usize, event: Event<'_>) {
        let now = self.clock.now_ms();
        let device = &mut self.devices[i];
        device.draws += 1;
        // Each agent its own draws, even two agents of one device (one provisioned again).
        let random = sha256(&[
            device.id.as_bytes(),
            &i.to_be_bytes(),
            &device.draws.to_be_bytes(),
        ]);
        let done: Vec<Done> = device
            .agent
            .handle(event, now, &random)
            .expect("the agent handles every event")
            .iter()
            .map(Done::from)
            .collect();
        for d in &done {
            match d {
                Done::Subscribe(filter) => {
                    if !device.subscriptions.contains(filter) {
                        device.subscriptions.push(filter.clone());
                    }
                    for (t, payload) in &self.retained {
                        if matches(filter, t) {
                            self.queue
                                .push_back(Delivery::Retained(i, t.clone(), payload.clone()));
                        }
                    }
                }
                Done::Publish(t, payload) => {
                    assert_eq!(
                        topic::requesting_client(t),
                        Some(device.id.as_str()),
                        "an agent publishes on its own request topic only"
                    );
                    self.queue.push_back(Delivery::Publish(Publication {
                        topic: t.clone(),
                        payload: payload.clone(),
                        retain: false,
                    }));
                }
                Done::Store | Done::Wipe | Done::WakeAt | Done::Report(_) => {}
            }
        }
        device.log.extend(done);
    }

    fn publish(&mut self, pubs: impl IntoIterator<Item = Publication>) {
        self.queue.extend(pubs.into_iter().map(Delivery::Publish));
    }

    // --- time ---

    /// Moves the fake clock, and tokio's paused clock with it, to `ms`.
    async fn set_time(&mut self, ms: u64) {
        let now = self.clock.now_ms();
        assert!(ms >= now, "time only moves forward");
        self.clock.set_ms(ms);
        tokio::time::advance(Duration::from_millis(ms - now)).await;
    }

    /// Runs every hub heartbeat and agent wake-up due up to and including `until_ms`, in
    /// time order, and leaves the clock at `until_ms`.
    async fn run_until(&mut self, until_ms: u64) {
        for _ in 0..10_000 {
            let next = self
                .devices
                .iter()
                .filter_map(|d| d.agent.next_wake())
                .chain(self.next_beat_ms)
                .min();
            let Some(at) = next.filter(|t| *t <= until_ms) else {
                self.set_time(until_ms).await;
                return;
            };
            let at = at.max(self.now_ms());
            self.set_time(at).await;
            if let Some(beat) = self.next_beat_ms.filter(|t| *t <= at) {
                self.next_beat_ms = Some(beat + HEARTBEAT_S * 1000);
                self.beat().await;
            }
            for i in 0..self.devices.len() {
                if self.devices[i].agent.next_wake().is_some_and(|w| w <= at) {
                    self.event(i, Event::Timer);
                }
            }
            self.pump().await;
        }
        panic!("something keeps asking to be woken before {until_ms}");
    }

    /// Stops the hub's heartbeats (each signs one for each of the 257 streams a verifier
    /// may follow) for a test that needs no revocation knowledge, so it runs faster.
    fn without_heartbeats(&mut self) {
        self.next_beat_ms = None;
    }

    /// [`Rig::run_until`] `s` seconds from now.
    async fn run_for(&mut self, s: u64) {
        self.run_until(self.now_ms() + s * 1000).await;
    }

    /// The server's heartbeat: what was recorded but not yet confirmed (a policy sweep's
    /// revocations), the snapshots of streams that changed, and a heartbeat on every stream.
    async fn beat(&mut self) {
        let now = self.now();
        let pending = self
            .hub
            .pending_broadcasts(now, usize::MAX)
            .await
            .expect("pending broadcasts");
        self.publish(pending);
        for state in self.hub.store.streams().await.expect("streams") {
            if state.snapshot_seq >= state.seq {
                continue;
            }
            let (pubs, latest) = self
                .hub
                .snapshot_publications(&state, now)
                .await
                .expect("snapshot");
            let pages = pubs.iter().filter(|p| !p.payload.is_empty()).count() as u64;
            self.publish(pubs);
            self.hub
                .store
                .set_snapshot_published(&state.name, latest, pages)
                .await
                .expect("snapshot recorded");
        }
        let streams = self.hub.store.streams().await.expect("streams");
        let beats = self
            .hub
            .heartbeats(&streams, now)
            .await
            .expect("heartbeats");
        self.publish(beats);
        self.pump().await;
    }

    // --- keys ---

    /// Publishes the key set (retained) under a new version, and records the first
    /// publication of the keys it announces, as the server does.
    async fn publish_key_set(&mut self) {
        let version = self.hub.keys.read().await.keyset_version();
        let p = self.hub.keyset_publication(version).await.expect("key set");
        self.publish([p]);
        self.pump().await;
        let policy = self.hub.policy.current();
        let mut ring = self.hub.keys.write().await;
        keys::announce_published(
            &self.hub.store,
            &mut ring,
            self.clock.now(),
            ANNOUNCE_S,
            policy.longest_token_lifetime_s(),
            policy.leeway_s(),
        )
        .await
        .expect("announce");
    }

    /// `keys rotate`, then the running hub picks the new key up and publishes the key set.
    async fn rotate(&mut self) -> PublicKey {
        let policy = self.hub.policy.current();
        let next = keys::rotate(
            &self.hub.store,
            &self.kek,
            HUB_ID,
            self.now(),
            ANNOUNCE_S,
            policy.longest_token_lifetime_s(),
            policy.leeway_s(),
        )
        .await
        .expect("rotate");
        let ring = KeyRing::load(&self.hub.store, &self.kek, HUB_ID, self.now())
            .await
            .expect("reload");
        *self.hub.keys.write().await = ring;
        self.publish_key_set().await;
        next
    }

    // --- devices ---

    async fn register(&self, id: &str, registration: Registration<'_>) {
        let (key, code) = match registration {
            Registration::Key(n) => (Some(signer(n)), None),
            Registration::Code(code) => (None, Some(EnrollmentCode::derive_key(code))),
        };
        self.hub
            .store
            .add_client(record(id, ClientKind::Device, "lock", key.as_ref(), code))
            .await
            .expect("device");
    }

    /// Starts an agent for `config`'s device with client key `key`, trusting the hub's
    /// first key, and connects it to the bus; returns its index.
    async fn connect(&mut self, key: u32, config: AgentConfig) -> usize {
        let agent = Agent::new(config.clone(), signer(key), self.anchor).expect("agent");
        self.devices.push(Device {
            id: config.device_id().to_owned(),
            key,
            agent: Box::new(agent),
            subscriptions: Vec::new(),
            log: Vec::new(),
            draws: 0,
        });
        let i = self.devices.len() - 1;
        self.event(i, Event::Boot { stored: None });
        self.event(i, Event::Connected);
        self.pump().await;
        i
    }

    /// A lock registered with client key `key`, enrolled and holding its device token.
    async fn enrolled_lock(&mut self, id: &str, key: u32) -> usize {
        self.register(id, Registration::Key(key)).await;
        let i = self
            .connect(key, AgentConfig::new(id, "tessera").expect("config"))
            .await;
        assert_eq!(self.agent(i).state(), State::Holding, "{:?}", self.agent(i));
        i
    }

    fn agent(&self, i: usize) -> &Agent<P256Signer> {
        &self.devices[i].agent
    }

    fn mark(&self, i: usize) -> usize {
        self.devices[i].log.len()
    }

    /// The reports of device `i` since `mark`.
    fn reports(&self, i: usize, mark: usize) -> Vec<Report> {
        self.devices[i].log[mark..]
            .iter()
            .filter_map(|d| match d {
                Done::Report(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// What device `i` asked the hub since `mark`.
    fn asked(&self, i: usize, mark: usize) -> Vec<Asked> {
        self.devices[i].log[mark..]
            .iter()
            .filter_map(|d| match d {
                Done::Publish(_, payload) => {
                    let r = SignedRequest::decode(payload)
                        .expect("a request")
                        .verify(&signer(self.devices[i].key).public_key())
                        .expect("signed by the device");
                    Some(Asked {
                        op: r.operation(),
                        grant: match r.body {
                            RequestBody::Refresh { grant } => Some(grant.to_vec()),
                            _ => None,
                        },
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// The grant in the latest token answer on `client`'s response topic.
    async fn latest_grant(&self, client: &str) -> Option<Vec<u8>> {
        let resp = topic::response(client).expect("topic");
        let ring = self.hub.keys.read().await;
        self.carried
            .iter()
            .rev()
            .filter(|p| p.topic == resp.as_str())
            .find_map(|p| {
                let r = SignedResponse::decode(&p.payload)
                    .expect("a response")
                    .verify(&*ring)
                    .expect("signed by the hub");
                match r.outcome {
                    Ok(ResponseBody::Token { grant, .. }) => Some(grant.map(|(g, _)| g.to_vec())),
                    _ => None,
                }
            })
            .flatten()
    }

    // --- test-side clients: apps, operators, and anyone with a key ---

    /// Signs a request from `client` with `key`, issued at `issued_at`, whose body may
    /// depend on its nonce, and returns it.
    fn request<'b>(
        &mut self,
        client: &str,
        key: &P256Signer,
        issued_at: u64,
        body: impl FnOnce([u8; NONCE_LEN]) -> RequestBody<'b>,
    ) -> Vec<u8> {
        self.next_request += 1;
        let mut nonce = [0xc0; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.next_request.to_be_bytes());
        signed_request(
            client,
            key,
            self.next_request,
            issued_at,
            nonce,
            body(nonce),
        )
    }

    /// Publishes signed request bytes on `client`'s request topic, delivers everything
    /// that causes, and returns the hub's reply to them.
    async fn send(&mut self, client: &str, signed: &[u8]) -> Reply {
        let (request_id, nonce) = SignedRequest::decode(signed)
            .expect("a request")
            .correlation();
        let from = self.carried.len();
        self.publish([Publication {
            topic: topic::request(client).expect("topic").to_string(),
            payload: signed.to_vec(),
            retain: false,
        }]);
        self.pump().await;
        let resp = topic::response(client).expect("topic");
        let ring = self.hub.keys.read().await;
        self.carried[from..]
            .iter()
            .filter(|p| p.topic == resp.as_str())
            .find_map(|p| {
                let r = SignedResponse::decode(&p.payload)
                    .expect("a response")
                    .verify(&*ring)
                    .expect("signed by the hub");
                r.answers(client, request_id, &nonce).then(|| {
                    r.outcome
                        .map(Answer::from)
                        .map_err(|e| (e.code, e.reason.to_owned()))
                })
            })
            .expect("the hub answers every request")
    }

    /// A request from `client` signed with `key` and issued now.
    async fn ask(&mut self, client: &str, key: &P256Signer, body: RequestBody<'_>) -> Reply {
        let signed = self.request(client, key, self.now(), |_| body);
        self.send(client, &signed).await
    }

    /// An access token for the app on `device` with `scope`, and its grant.
    async fn access_token(&mut self, device: &str, scope: &str) -> (Vec<u8>, Vec<u8>) {
        let reply = self
            .ask(
                APP,
                &signer(APP_KEY),
                RequestBody::AccessToken {
                    device,
                    scope: Scopes::parse(scope).expect("scope"),
                },
            )
            .await;
        match reply {
            Ok(Answer::Token {
                token,
                grant: Some((grant, _)),
            }) => (token, grant),
            other => panic!("access token for {device} {scope}: {other:?}"),
        }
    }

    /// An operator's revocation: (revoked, entries, notified).
    async fn revoke(&mut self, target: RevokeTarget<'_>) -> (u64, u64, u64) {
        match self
            .ask(OPERATOR, &signer(OPERATOR_KEY), RequestBody::Revoke(target))
            .await
        {
            Ok(Answer::Revoked {
                revoked,
                entries,
                notified,
            }) => (revoked, entries, notified),
            other => panic!("revoke {target:?}: {other:?}"),
        }
    }

    /// The app's presentation of `token` to `device`, made now with `nonce`.
    fn present(&self, token: &[u8], device: &str, nonce: u8) -> Vec<u8> {
        let mut out = vec![0u8; 1024];
        let n = Presentation {
            token,
            audience: device,
            issued_at: self.now(),
            nonce: [nonce; NONCE_LEN],
        }
        .sign(&signer(APP_KEY), &mut out)
        .expect("sign");
        out.truncate(n);
        out
    }

    /// Device `i`'s agent checks a presentation for `scope` now; the subject it accepted.
    fn check(&mut self, i: usize, presentation: &[u8], scope: &str) -> Result<String, Error> {
        let now = self.now_ms();
        self.devices[i]
            .agent
            .check_presentation(presentation, scope, now)
            .map(|p| p.token.claims().sub.to_owned())
    }
}

/// A request from `client` with these fields, signed with `key`.
fn signed_request(
    client: &str,
    key: &P256Signer,
    request_id: u64,
    issued_at: u64,
    nonce: [u8; NONCE_LEN],
    body: RequestBody<'_>,
) -> Vec<u8> {
    let request = Request {
        client,
        request_id,
        issued_at,
        nonce,
        body,
    };
    let mut out = vec![0u8; tessera_shared::cose::MAX_REQUEST_LEN];
    let n = request.sign(key, &mut out).expect("sign");
    out.truncate(n);
    out
}

fn record(
    id: &str,
    kind: ClientKind,
    role: &str,
    key: Option<&P256Signer>,
    enrollment_code_key: Option<[u8; 32]>,
) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind,
        public_key: key.map(|k| k.public_key().to_sec1().to_vec()),
        role: role.to_owned(),
        groups: if kind == ClientKind::Device {
            vec!["building-a".to_owned()]
        } else {
            Vec::new()
        },
        enrollment_code_key,
        enrolled_at: None,
        revoked_at: None,
        created_at: T0,
    }
}

/// A grant as stored: (used, family revoked).
async fn grant_state(rig: &Rig, grant: &[u8]) -> (bool, bool) {
    let s = rig
        .hub
        .store
        .grant(&sha256(&[grant]))
        .await
        .expect("store")
        .expect("recorded");
    (s.used, s.family_revoked)
}

/// What a device agent needs to verify a token the hub issued, with the hub's first key.
fn anchor_set(rig: &Rig) -> KeySet {
    KeySet::from_anchor(rig.anchor)
}

#[tokio::test(start_paused = true)]
async fn a_device_enrolls_with_its_one_time_code_and_an_app_it_was_granted_to_is_accepted() {
    const CODE: &str = "K7Q2-M4PX-9TZR";
    let mut rig = Rig::new().await;
    rig.register("door-1", Registration::Code(CODE)).await;
    let mut config = AgentConfig::new("door-1", "tessera").expect("config");
    config.enrollment_code_key = Some(EnrollmentCode::derive_key(CODE));
    let door = rig.connect(10, config).await;

    // The agent subscribed to the topics the protocol names for it, and got the retained
    // key set on subscribing.
    let mut subscribed = rig.devices[door].subscriptions.clone();
    subscribed.sort();
    let mut expected = vec![
        topic::response("door-1").expect("topic").to_string(),
        topic::control("door-1").expect("topic").to_string(),
        topic::KEYS.to_owned(),
        topic::revocation_filter(&Stream::of_device("door-1")).to_string(),
    ];
    expected.sort();
    assert_eq!(subscribed, expected);
    let reports = rig.reports(door, 0);
    let version = rig.hub.keys.read().await.keyset_version();
    assert!(
        reports.contains(&Report::KeySetUpdated { version }),
        "{reports:?}"
    );

    // Enrolled with its code, then a device token with its key: nothing else was asked.
    let ops: Vec<Operation> = rig.asked(door, 0).into_iter().map(|a| a.op).collect();
    assert_eq!(ops, [Operation::Enroll, Operation::DeviceToken]);
    assert!(
        reports.contains(&Report::Enrolled { at: T0 }),
        "{reports:?}"
    );
    assert_eq!(rig.agent(door).state(), State::Holding);

    // The token it holds verifies with the hub's key, for the service audience, with the
    // lock role's scopes, bound to the device's own key.
    let held = rig.agent(door).token().expect("holds a token").to_vec();
    let verified = token::verify(
        &held,
        &anchor_set(&rig),
        &Validation::new(rig.now(), "tessera")
            .with_issuer(HUB_ID)
            .with_scope("events:publish"),
    )
    .expect("a token the hub signed");
    let claims = verified.claims();
    assert_eq!(claims.sub, "door-1");
    assert_eq!(claims.aud, "tessera");
    assert_eq!(claims.scope.as_str(), "telemetry:write events:publish");
    assert_eq!(claims.cnf, signer(10).public_key());
    assert_eq!((claims.iat, claims.exp), (T0, T0 + 600));
    // The token id starts with the hub's clock in milliseconds (PROTOCOL.md §6.1).
    assert_eq!(claims.cti.len(), 16);
    let mut millis = [0u8; 8];
    millis[2..].copy_from_slice(&claims.cti[..6]);
    assert!(
        (T0 * 1000..(T0 + 1) * 1000).contains(&u64::from_be_bytes(millis)),
        "cti {:02x?} does not start with the issue time",
        claims.cti
    );

    // The hub registered the device's key and spent the code: nobody enrolls with it again.
    let stored = rig
        .hub
        .store
        .client("door-1")
        .await
        .expect("store")
        .expect("registered");
    assert_eq!(
        stored.public_key.as_deref(),
        Some(&signer(10).public_key().to_sec1()[..])
    );
    assert_eq!(stored.enrolled_at, Some(T0));
    assert_eq!(stored.enrollment_code_key, None);
    let thief = signer(66);
    let code_key = EnrollmentCode::derive_key(CODE);
    let again = rig.request("door-1", &thief, rig.now(), |nonce| RequestBody::Enroll {
        key: thief.public_key(),
        code_proof: Some(EnrollmentCode::proof(
            &code_key,
            "door-1",
            &thief.public_key().kid(),
            &nonce,
        )),
    });
    assert_eq!(
        rig.send("door-1", &again).await.map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );

    // A control app obtains an access token for the device and presents it. Until a
    // heartbeat has vouched for the device's revocation list, the agent refuses.
    let (access, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(
        rig.check(door, &rig.present(&access, "door-1", 1), "door:open"),
        Err(ClaimsError::RevocationsStale.into())
    );
    rig.run_for(HEARTBEAT_S).await;
    let presented = rig.present(&access, "door-1", 2);
    assert_eq!(rig.check(door, &presented, "door:open"), Ok(APP.to_owned()));
    // Once only; and only for what it grants.
    assert_eq!(
        rig.check(door, &presented, "door:open"),
        Err(ClaimsError::PresentationReplayed.into())
    );
    assert_eq!(
        rig.check(door, &rig.present(&access, "door-1", 3), "light:on"),
        Err(ClaimsError::MissingScope.into())
    );
    assert_eq!(
        rig.check(door, &rig.present(&access, "door-2", 4), "door:open"),
        Err(ClaimsError::WrongAudience.into())
    );
}

#[tokio::test(start_paused = true)]
async fn the_agent_refreshes_at_its_refresh_point_and_a_reused_grant_revokes_its_whole_family() {
    let mut rig = Rig::new().await;
    rig.without_heartbeats();
    let door = rig.enrolled_lock("door-1", 10).await;
    let first_token = rig.agent(door).token().expect("token").to_vec();
    let first_grant = rig.latest_grant("door-1").await.expect("a grant");

    // Its refresh point lies between half and three quarters of the 600 s lifetime; up to
    // a millisecond before it, the agent asks nothing.
    let refresh_at = rig.agent(door).next_wake().expect("a refresh point");
    assert!(
        ((T0 + 300) * 1000..=(T0 + 450) * 1000).contains(&refresh_at),
        "{refresh_at}"
    );
    let mark = rig.mark(door);
    rig.run_until(refresh_at - 1).await;
    assert_eq!(rig.asked(door, mark), []);
    rig.run_until(refresh_at).await;
    assert_eq!(
        rig.asked(door, mark),
        [Asked {
            op: Operation::Refresh,
            grant: Some(first_grant.clone()),
        }]
    );
    assert_eq!(rig.agent(door).state(), State::Holding);
    let second_token = rig.agent(door).token().expect("token").to_vec();
    assert_ne!(second_token, first_token);
    let second_grant = rig.latest_grant("door-1").await.expect("a rotated grant");
    assert_ne!(second_grant, first_grant, "a grant is used once");
    let verified = token::verify(
        &second_token,
        &anchor_set(&rig),
        &Validation::new(rig.now(), "tessera"),
    )
    .expect("valid");
    assert_eq!(verified.claims().iat, refresh_at / 1000);

    // The first grant, presented again (copied off the device, say): refused as revoked,
    // and the whole family with it.
    let stolen = rig
        .ask(
            "door-1",
            &signer(10),
            RequestBody::Refresh {
                grant: &first_grant,
            },
        )
        .await;
    let (code, reason) = stolen.expect_err("a spent grant");
    assert_eq!(code, ErrorCode::Revoked);
    assert!(reason.contains("already used"), "{reason}");
    let family = rig
        .hub
        .store
        .grant(&sha256(&[&second_grant]))
        .await
        .expect("store")
        .expect("recorded");
    assert!(family.family_revoked);

    // At its next refresh point the agent's grant is refused too; it drops it and asks with
    // its device key alone, at once, and holds a new token with a grant of a new family.
    let next = rig.agent(door).next_wake().expect("a refresh point");
    let mark = rig.mark(door);
    rig.run_until(next).await;
    assert_eq!(
        rig.asked(door, mark),
        [
            Asked {
                op: Operation::Refresh,
                grant: Some(second_grant.clone()),
            },
            Asked {
                op: Operation::DeviceToken,
                grant: None,
            },
        ]
    );
    let reports = rig.reports(door, mark);
    assert!(
        reports.contains(&Report::RequestFailed {
            op: Operation::Refresh,
            code: ErrorCode::Revoked,
        }),
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, Report::TokenRenewed { .. })),
        "{reports:?}"
    );
    assert_eq!(rig.agent(door).state(), State::Holding);
    let third_grant = rig.latest_grant("door-1").await.expect("a new grant");
    assert!(third_grant != first_grant && third_grant != second_grant);
    let fresh = rig
        .hub
        .store
        .grant(&sha256(&[&third_grant]))
        .await
        .expect("store")
        .expect("recorded");
    assert!(!fresh.family_revoked && !fresh.used);
    assert_ne!(fresh.record.family, family.record.family);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_key_signs_after_its_announce_period_and_the_old_keys_tokens_live_out_their_time()
{
    let mut rig = Rig::new().await;
    let door = rig.enrolled_lock("door-1", 10).await;
    rig.run_for(10).await;
    let old = rig.anchor;
    let (before, _) = rig.access_token("door-1", "door:open").await;

    let mark = rig.mark(door);
    let rotated_at = rig.now();
    let before_rotation = rig.hub.keys.read().await.keyset_version();
    let new = rig.rotate().await;
    // The agent adopted the key set announcing the new key, signed by the old one.
    let version = rig.hub.keys.read().await.keyset_version();
    assert!(version > before_rotation);
    assert!(
        rig.reports(door, mark)
            .contains(&Report::KeySetUpdated { version }),
        "{:?}",
        rig.reports(door, mark)
    );
    let trusted: Vec<PublicKey> = rig.agent(door).key_set().keys().to_vec();
    assert!(
        trusted.contains(&new) && trusted.contains(&old),
        "{trusted:?}"
    );
    // Announced, not yet signing.
    assert_eq!(rig.hub.active_public_key().await, old);
    let (announced, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(signed_by(&announced, &[old, new]), old);

    // One second before the announce period ends the old key still signs; then the new.
    rig.run_until((rotated_at + ANNOUNCE_S) * 1000 - 1000).await;
    assert_eq!(rig.hub.active_public_key().await, old);
    rig.run_until((rotated_at + ANNOUNCE_S) * 1000).await;
    assert_eq!(rig.hub.active_public_key().await, new);
    let (after, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(signed_by(&after, &[old, new]), new);
    // A verifier that never got the key set could not check it; the agent can.
    assert!(
        token::verify(
            &after,
            &anchor_set(&rig),
            &Validation::new(rig.now(), "door-1")
        )
        .is_err()
    );
    assert_eq!(
        rig.check(door, &rig.present(&after, "door-1", 1), "door:open"),
        Ok(APP.to_owned())
    );
    // Tokens the old key signed stay good until they expire.
    assert_eq!(
        rig.check(door, &rig.present(&before, "door-1", 2), "door:open"),
        Ok(APP.to_owned())
    );
    assert_eq!(
        rig.check(door, &rig.present(&announced, "door-1", 3), "door:open"),
        Ok(APP.to_owned())
    );
    // The old key's last access token lives its 120 s (plus the agent's leeway), and not
    // a second longer.
    let expires = token::dangerous_verify_signature_only(&announced, &old)
        .expect("old key")
        .exp;
    let leeway = rig.agent(door).config().leeway_s;
    rig.run_until((expires + leeway - 1) * 1000).await;
    assert_eq!(
        rig.check(door, &rig.present(&announced, "door-1", 4), "door:open"),
        Ok(APP.to_owned())
    );
    rig.run_until((expires + leeway) * 1000).await;
    assert_eq!(
        rig.check(door, &rig.present(&announced, "door-1", 5), "door:open"),
        Err(ClaimsError::Expired.into())
    );
    // The device's own token from the old key is held until its refresh point, and the
    // token that replaces it is signed by the new key.
    let held = rig.agent(door).token().expect("token").to_vec();
    assert_eq!(signed_by(&held, &[old, new]), old);
    let refresh_at = rig.agent(door).next_wake().expect("a refresh point");
    rig.run_until(refresh_at).await;
    assert_eq!(rig.agent(door).state(), State::Holding);
    let renewed = rig.agent(door).token().expect("token").to_vec();
    assert_eq!(signed_by(&renewed, &[old, new]), new);
}

/// Which of `keys` signed `token` (its header names it, and its signature verifies).
fn signed_by(token: &[u8], keys: &[PublicKey]) -> PublicKey {
    let kid = tessera_shared::cose::Sign1::decode(token)
        .expect("a token")
        .kid()
        .to_vec();
    let key = keys
        .iter()
        .find(|k| k.kid()[..] == kid[..])
        .copied()
        .expect("signed by one of these keys");
    token::dangerous_verify_signature_only(token, &key).expect("its signature verifies");
    key
}

#[tokio::test(start_paused = true)]
async fn an_operators_revocations_reach_the_agent_through_the_bus_and_a_revoked_device_wipes_itself()
 {
    let mut rig = Rig::new().await;
    let door = rig.enrolled_lock("door-1", 10).await;
    rig.run_for(HEARTBEAT_S).await;
    let (first, _) = rig.access_token("door-1", "door:open").await;
    let (second, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(
        rig.check(door, &rig.present(&first, "door-1", 1), "door:open"),
        Ok(APP.to_owned())
    );
    let delta_topic = topic::revocation_delta(&Stream::of_device("door-1")).to_string();

    // One token, by its hash: the delta goes out on the device's partition, the agent
    // applies it, and refuses that token; the app's other token still passes.
    let mark = rig.mark(door);
    let carried = rig.carried.len();
    assert_eq!(
        rig.revoke(RevokeTarget::TokenHash(token_hash(&first)))
            .await,
        (1, 1, 0)
    );
    assert!(
        rig.carried[carried..]
            .iter()
            .any(|p| p.topic == delta_topic)
    );
    assert!(
        rig.reports(door, mark)
            .contains(&Report::RevocationsApplied { seq: 1 }),
        "{:?}",
        rig.reports(door, mark)
    );
    assert_eq!(
        rig.check(door, &rig.present(&first, "door-1", 2), "door:open"),
        Err(ClaimsError::Revoked.into())
    );
    assert_eq!(
        rig.check(door, &rig.present(&second, "door-1", 3), "door:open"),
        Ok(APP.to_owned())
    );

    // The app as a subject: every token issued to it before now, on every device. A token
    // issued after the cut-off passes.
    rig.run_for(1).await;
    let mark = rig.mark(door);
    assert_eq!(rig.revoke(RevokeTarget::Subject(APP)).await.1, 1);
    assert!(
        rig.reports(door, mark)
            .contains(&Report::RevocationsApplied { seq: 2 }),
        "{:?}",
        rig.reports(door, mark)
    );
    assert_eq!(
        rig.check(door, &rig.present(&second, "door-1", 4), "door:open"),
        Err(ClaimsError::Revoked.into())
    );
    rig.run_for(1).await;
    let (third, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(
        rig.check(door, &rig.present(&third, "door-1", 5), "door:open"),
        Ok(APP.to_owned())
    );
    // Heartbeats keep the list fresh, and name the changes it holds.
    rig.run_for(2 * HEARTBEAT_S).await;
    assert_eq!(rig.agent(door).revocations().seq(), 2);
    assert_eq!(
        rig.check(door, &rig.present(&third, "door-1", 6), "door:open"),
        Ok(APP.to_owned())
    );

    // The device: its control message tells the agent, which wipes its state and stops.
    let mark = rig.mark(door);
    assert_eq!(rig.revoke(RevokeTarget::Device("door-1")).await.2, 1);
    let done = &rig.devices[door].log[mark..];
    assert!(done.contains(&Done::Wipe), "{done:?}");
    assert!(done.contains(&Done::Report(Report::Revoked)), "{done:?}");
    assert_eq!(rig.agent(door).state(), State::Revoked);
    assert_eq!(rig.agent(door).token(), None);
    assert_eq!(
        rig.check(door, &rig.present(&third, "door-1", 7), "door:open"),
        Err(ClaimsError::RevocationsStale.into())
    );
    // The hub refuses the device's key, and tokens for the device.
    assert_eq!(
        rig.ask("door-1", &signer(10), RequestBody::DeviceToken)
            .await
            .map_err(|e| e.0),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(
        rig.ask(
            APP,
            &signer(APP_KEY),
            RequestBody::AccessToken {
                device: "door-1",
                scope: Scopes::parse("door:open").expect("scope"),
            },
        )
        .await
        .map_err(|e| e.0),
        Err(ErrorCode::Revoked)
    );
    // And the agent never publishes again, whatever the hub's heartbeats say.
    let mark = rig.mark(door);
    rig.run_for(4 * HEARTBEAT_S).await;
    assert_eq!(rig.asked(door, mark), []);
    assert_eq!(rig.agent(door).next_wake(), None);
}

#[tokio::test(start_paused = true)]
async fn presentations_of_a_revoked_token_reported_by_the_device_raise_an_alert_on_the_holder() {
    let mut rig = Rig::new().await;
    let door = rig.enrolled_lock("door-1", 10).await;
    let other = rig.enrolled_lock("door-2", 11).await;
    rig.run_for(HEARTBEAT_S).await;
    let (first, _) = rig.access_token("door-1", "door:open").await;
    let (live, _) = rig.access_token("door-1", "door:open").await;
    rig.revoke(RevokeTarget::TokenHash(token_hash(&first)))
        .await;

    // The device refuses the revoked token and reports each presentation, signed by
    // its own key, as its shell does; the hub takes each once, as evidence against the
    // app, whose own signature is on it.
    let report = |rig: &mut Rig, i: usize, presentation: &[u8]| {
        let now = rig.now_ms();
        let mut out = vec![0u8; 4096];
        let n = rig.devices[i]
            .agent
            .sign_report(presentation, now, &mut out)
            .expect("signed report");
        out.truncate(n);
        out
    };
    let mut reports = Vec::new();
    for nonce in [21, 22, 23] {
        let presented = rig.present(&first, "door-1", nonce);
        assert_eq!(
            rig.check(door, &presented, "door:open"),
            Err(ClaimsError::Revoked.into())
        );
        let signed = report(&mut rig, door, &presented);
        let mark = rig.mark(door);
        assert_eq!(rig.send("door-1", &signed).await, Ok(Answer::Enrolled));
        // The agent takes the hub's answer quietly: it expected it.
        assert!(
            !rig.reports(door, mark)
                .iter()
                .any(|r| matches!(r, Report::Ignored(_))),
            "{:?}",
            rig.reports(door, mark)
        );
        reports.push(presented);
    }
    let raised: Vec<_> = rig
        .alerts
        .iter()
        .filter(|a| a.kind == AlertKind::RevokedUse)
        .collect();
    assert_eq!(raised.len(), 1, "{:?}", rig.alerts);
    assert_eq!((raised[0].client.as_str(), raised[0].count), (APP, 3));

    // The same presentation reported again (a device replaying it to get the app
    // quarantined) counts nothing.
    let again = report(&mut rig, door, &reports[0]);
    assert_eq!(
        rig.send("door-1", &again).await.map_err(|e| e.0),
        Err(ErrorCode::Replay)
    );
    // A presentation made to another device cannot be reported by this one, a token the
    // list does not cover is no evidence, and a forged presentation proves nothing.
    let elsewhere = rig.present(&first, "door-2", 24);
    let signed = report(&mut rig, door, &elsewhere);
    assert_eq!(
        rig.send("door-1", &signed).await.map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );
    let unrevoked = rig.present(&live, "door-1", 25);
    let signed = report(&mut rig, door, &unrevoked);
    let refused = rig.send("door-1", &signed).await.expect_err("not revoked");
    assert_eq!(refused.0, ErrorCode::Denied);
    assert!(refused.1.contains("does not cover"), "{}", refused.1);
    let mut forged = vec![0u8; 1024];
    let n = Presentation {
        token: &first,
        audience: "door-1",
        issued_at: rig.now(),
        nonce: [26; NONCE_LEN],
    }
    .sign(&signer(99), &mut forged)
    .expect("sign");
    let signed = report(&mut rig, door, &forged[..n]);
    assert_eq!(
        rig.send("door-1", &signed).await.map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );
    // Only devices report: the app cannot report on others.
    let app_report = rig
        .ask(
            APP,
            &signer(APP_KEY),
            RequestBody::ReportPresentation {
                presentation: &reports[1],
            },
        )
        .await;
    assert_eq!(app_report.map_err(|e| e.0), Err(ErrorCode::Denied));
    // None of that counted against the app; the other device was never involved.
    let counted: u64 = rig
        .alerts
        .iter()
        .filter(|a| a.kind == AlertKind::RevokedUse)
        .map(|a| a.count)
        .sum();
    assert_eq!(counted, 3);
    assert_eq!(rig.agent(other).state(), State::Holding);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_device_provisioned_again_enrolls_with_a_new_key_only_and_a_code_typed_loosely() {
    const CODE: &str = "K7QFM-2XD9W-PLR4T-HN6JA";
    let mut rig = Rig::new().await;
    let old = rig.enrolled_lock("door-1", 10).await;
    // Provisioning again needs a revocation first: an enrolled device keeps its key.
    let code_key = EnrollmentCode::derive_key(CODE);
    assert!(matches!(
        rig.hub
            .store
            .reprovision_device("door-1", None, Some(code_key))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(rig.revoke(RevokeTarget::Device("door-1")).await.2, 1);
    assert_eq!(rig.agent(old).state(), State::Revoked);
    rig.hub
        .store
        .reprovision_device("door-1", None, Some(code_key))
        .await
        .expect("provisioned again");

    // The revoked key is refused, even with the right code...
    let mut config = AgentConfig::new("door-1", "tessera").expect("config");
    config.enrollment_code_key = Some(EnrollmentCode::derive_key(CODE));
    let reused = rig.connect(10, config).await;
    assert_ne!(rig.agent(reused).state(), State::Holding);
    assert!(
        rig.reports(reused, 0).contains(&Report::RequestFailed {
            op: Operation::Enroll,
            code: ErrorCode::Denied
        }),
        "{:?}",
        rig.reports(reused, 0)
    );
    // ...and under another id: a revoked device's key is never registered again.
    let again = rig
        .hub
        .store
        .add_client(record(
            "door-2",
            ClientKind::Device,
            "lock",
            Some(&signer(10)),
            None,
        ))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");

    // A new key with the code as a person types it: lower case, spaces for dashes.
    let mut config = AgentConfig::new("door-1", "tessera").expect("config");
    config.enrollment_code_key = Some(EnrollmentCode::derive_key("k7qfm 2xd9w plr4t hn6ja"));
    let fresh = rig.connect(11, config).await;
    assert_eq!(
        rig.agent(fresh).state(),
        State::Holding,
        "{:?}",
        rig.agent(fresh)
    );
    let (token, _) = rig.access_token("door-1", "door:open").await;
    rig.run_for(HEARTBEAT_S).await;
    assert_eq!(
        rig.check(fresh, &rig.present(&token, "door-1", 1), "door:open"),
        Ok(APP.to_owned())
    );
}

#[tokio::test(start_paused = true)]
async fn a_policy_reload_that_drops_a_scope_revokes_its_tokens_for_the_agent_and_denies_new_ones() {
    let mut rig = Rig::new().await;
    let door = rig.enrolled_lock("door-1", 10).await;
    rig.run_for(HEARTBEAT_S).await;
    let (light, light_grant) = rig.access_token("door-1", "light:on").await;
    let (open, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(
        rig.check(door, &rig.present(&light, "door-1", 1), "light:on"),
        Ok(APP.to_owned())
    );

    // The operator edits the file and the hub reloads it; the sweep revokes, by hash, the
    // one live token the new policy no longer grants.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        POLICY.replace(
            r#"scopes = ["door:open", "light:on"]"#,
            r#"scopes = ["door:open"]"#,
        ),
    )
    .expect("write");
    rig.hub.policy.reload_from(&path).expect("a valid policy");
    let policy = rig.hub.policy.current();
    let outcome = policy_change::revoke_disallowed_everywhere(&rig.hub.store, &policy, rig.now())
        .await
        .expect("sweep")
        .expect("something revoked");
    assert_eq!((outcome.revoked, outcome.entry_count()), (1, 1));
    assert!(
        outcome.controls.is_empty(),
        "an access token: no device to tell"
    );

    // The sweep's change goes out with the next heartbeat; the agent applies it.
    let mark = rig.mark(door);
    rig.run_for(HEARTBEAT_S).await;
    assert!(
        rig.reports(door, mark)
            .contains(&Report::RevocationsApplied { seq: 1 }),
        "{:?}",
        rig.reports(door, mark)
    );
    assert_eq!(
        rig.check(door, &rig.present(&light, "door-1", 2), "light:on"),
        Err(ClaimsError::Revoked.into())
    );
    assert_eq!(
        rig.check(door, &rig.present(&open, "door-1", 3), "door:open"),
        Ok(APP.to_owned())
    );
    // Asking again, or refreshing the old one, is denied; the scope still granted is not.
    let (code, reason) = rig
        .ask(
            APP,
            &signer(APP_KEY),
            RequestBody::AccessToken {
                device: "door-1",
                scope: Scopes::parse("light:on").expect("scope"),
            },
        )
        .await
        .expect_err("no longer granted");
    assert_eq!(code, ErrorCode::Denied);
    assert!(reason.contains("light:on"), "{reason}");
    assert_eq!(
        rig.ask(
            APP,
            &signer(APP_KEY),
            RequestBody::Refresh {
                grant: &light_grant,
            },
        )
        .await
        .map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );
    let (again, _) = rig.access_token("door-1", "door:open").await;
    assert_eq!(
        rig.check(door, &rig.present(&again, "door-1", 4), "door:open"),
        Ok(APP.to_owned())
    );
    // The same sweep again revokes nothing.
    assert!(
        policy_change::revoke_disallowed_everywhere(&rig.hub.store, &policy, rig.now())
            .await
            .expect("sweep")
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn an_enrollment_guess_learns_nothing_from_stale_or_replayed_requests() {
    const CODE: &str = "K7Q2-M4PX-9TZR";
    let mut rig = Rig::new().await;
    rig.without_heartbeats();
    rig.register("door-9", Registration::Code(CODE)).await;
    let guesser = signer(66);
    let right = EnrollmentCode::derive_key(CODE);
    let wrong = EnrollmentCode::derive_key("AAAA-AAAA-AAAA");
    let guess = |rig: &mut Rig, code_key: [u8; 32], issued_at: u64| {
        rig.request("door-9", &guesser, issued_at, |nonce| RequestBody::Enroll {
            key: guesser.public_key(),
            code_proof: Some(EnrollmentCode::proof(
                &code_key,
                "door-9",
                &guesser.public_key().kid(),
                &nonce,
            )),
        })
    };

    // A wrong guess, fresh: denied.
    let now = rig.now();
    let fresh_wrong = guess(&mut rig, wrong, now);
    let (code, reason) = rig.send("door-9", &fresh_wrong).await.expect_err("denied");
    assert_eq!(code, ErrorCode::Denied, "{reason}");

    // A right guess and a wrong one, both stale by a minute and a second: the same answer,
    // word for word, so staleness tells nothing about the code. Nothing is enrolled.
    let stale = rig.now() - 61;
    let stale_right = guess(&mut rig, right, stale);
    let stale_wrong = guess(&mut rig, wrong, stale);
    let right_answer = rig.send("door-9", &stale_right).await;
    let wrong_answer = rig.send("door-9", &stale_wrong).await;
    assert_eq!(
        right_answer.as_ref().map_err(|e| e.0),
        Err(ErrorCode::Stale)
    );
    assert_eq!(right_answer, wrong_answer);
    let record = rig
        .hub
        .store
        .client("door-9")
        .await
        .expect("store")
        .expect("registered");
    assert_eq!(record.public_key, None);
    assert_eq!(
        record.enrollment_code_key,
        Some(right),
        "the code is not spent"
    );

    // The device itself enrolls with the code, through the agent.
    let mut config = AgentConfig::new("door-9", "tessera").expect("config");
    config.enrollment_code_key = Some(right);
    let door = rig.connect(20, config).await;
    assert_eq!(rig.agent(door).state(), State::Holding);
    let request_topic = topic::request("door-9").expect("topic");
    let enrollment = rig
        .carried
        .iter()
        .find(|p| {
            p.topic == request_topic.as_str()
                && SignedRequest::decode(&p.payload).is_ok_and(|r| {
                    r.operation() == Operation::Enroll && r.kid() == signer(20).public_key().kid()
                })
        })
        .expect("the agent's enrollment")
        .payload
        .clone();
    // Replayed as it was: `replay`.
    assert_eq!(
        rig.send("door-9", &enrollment).await.map_err(|e| e.0),
        Err(ErrorCode::Replay)
    );
    // A guess that reuses its nonce is refused as a replay before its proof is looked at,
    // whether the proof is right or wrong (and the device's key is another).
    let (_, used) = SignedRequest::decode(&enrollment)
        .expect("a request")
        .correlation();
    for (request_id, code_key) in [(1_001, wrong), (1_002, right)] {
        let replayed = signed_request(
            "door-9",
            &guesser,
            request_id,
            rig.now(),
            used,
            RequestBody::Enroll {
                key: guesser.public_key(),
                code_proof: Some(EnrollmentCode::proof(
                    &code_key,
                    "door-9",
                    &guesser.public_key().kid(),
                    &used,
                )),
            },
        );
        assert_eq!(
            rig.send("door-9", &replayed).await.map_err(|e| e.0),
            Err(ErrorCode::Replay)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn another_clients_presentation_of_a_grant_is_refused_and_the_owner_keeps_refreshing() {
    let mut rig = Rig::new().await;
    rig.without_heartbeats();
    let door = rig.enrolled_lock("door-1", 10).await;
    // Another lock, registered with its own key: it signs its own requests.
    rig.register("door-2", Registration::Key(11)).await;
    let first = rig.latest_grant("door-1").await.expect("a grant");
    let refused = Err((ErrorCode::Denied, FOREIGN_GRANT.to_owned()));

    // Another device and an app, each signing with its own registered key on its own
    // topic (a grant read off the broker, say), present the owner's fresh grant: refused,
    // typed, and nothing happens to it.
    for (client, key) in [("door-2", 11), (APP, APP_KEY)] {
        let reply = rig
            .ask(client, &signer(key), RequestBody::Refresh { grant: &first })
            .await;
        assert_eq!(reply, refused, "{client}");
    }
    assert_eq!(grant_state(&rig, &first).await, (false, false));

    // At its refresh point the owner's agent refreshes with that very grant, and nothing
    // else: no fallback to its device key.
    let refresh_at = rig.agent(door).next_wake().expect("a refresh point");
    let mark = rig.mark(door);
    rig.run_until(refresh_at).await;
    assert_eq!(
        rig.asked(door, mark),
        [Asked {
            op: Operation::Refresh,
            grant: Some(first.clone()),
        }]
    );
    let reports = rig.reports(door, mark);
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, Report::TokenRenewed { .. })),
        "{reports:?}"
    );
    assert_eq!(rig.agent(door).state(), State::Holding);
    let second = rig.latest_grant("door-1").await.expect("a rotated grant");
    assert_ne!(second, first);
    assert_eq!(grant_state(&rig, &first).await, (true, false));

    // The spent grant presented by another client is not a reuse: the same refusal, and
    // the owner's family lives on.
    let reply = rig
        .ask(
            "door-2",
            &signer(11),
            RequestBody::Refresh { grant: &first },
        )
        .await;
    assert_eq!(reply, refused);
    assert_eq!(grant_state(&rig, &second).await, (false, false));
    let next = rig.agent(door).next_wake().expect("a refresh point");
    let mark = rig.mark(door);
    rig.run_until(next).await;
    assert_eq!(
        rig.asked(door, mark),
        [Asked {
            op: Operation::Refresh,
            grant: Some(second.clone()),
        }]
    );
    assert_eq!(rig.agent(door).state(), State::Holding);

    // Presented by the owner's own key, the spent grant is a reuse: the whole family is
    // revoked, as before.
    let third = rig.latest_grant("door-1").await.expect("a grant");
    let (code, reason) = rig
        .ask(
            "door-1",
            &signer(10),
            RequestBody::Refresh { grant: &first },
        )
        .await
        .expect_err("a reuse");
    assert_eq!(code, ErrorCode::Revoked, "{reason}");
    assert_eq!(grant_state(&rig, &third).await, (false, true));
}

#[tokio::test(start_paused = true)]
async fn an_apps_grant_presented_by_a_device_is_refused_and_the_app_still_refreshes_with_it() {
    let mut rig = Rig::new().await;
    rig.without_heartbeats();
    rig.enrolled_lock("door-1", 10).await;
    let (_, grant) = rig.access_token("door-1", "door:open").await;

    let reply = rig
        .ask(
            "door-1",
            &signer(10),
            RequestBody::Refresh { grant: &grant },
        )
        .await;
    assert_eq!(reply, Err((ErrorCode::Denied, FOREIGN_GRANT.to_owned())));
    assert_eq!(grant_state(&rig, &grant).await, (false, false));
    rig.ask(
        APP,
        &signer(APP_KEY),
        RequestBody::Refresh { grant: &grant },
    )
    .await
    .expect("the app refreshes with its grant");
}

/// The value of one series (`name{labels}` exactly as rendered) in the metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a number"))
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn the_metrics_count_each_request_by_operation_and_outcome_and_what_it_issued_or_revoked() {
    let mut rig = Rig::new().await;
    rig.without_heartbeats();
    rig.enrolled_lock("door-1", 10).await;
    // Counting starts here: the agent's own enrollment is not part of the sequence.
    rig.hub.metrics = std::sync::Arc::new(tessera_hub::metrics::Metrics::new());

    // Issued, denied, refreshed, reused, revoked, malformed: one of each.
    let (_, grant) = rig.access_token("door-1", "door:open").await;
    let denied = rig
        .ask(
            APP,
            &signer(APP_KEY),
            RequestBody::AccessToken {
                device: "door-1",
                scope: Scopes::parse("door:lock").expect("scope"),
            },
        )
        .await;
    assert_eq!(
        denied.map(|_| ()).map_err(|(c, _)| c),
        Err(ErrorCode::Denied)
    );
    for expected in [Ok(()), Err(ErrorCode::Revoked)] {
        let reply = rig
            .ask(
                APP,
                &signer(APP_KEY),
                RequestBody::Refresh { grant: &grant },
            )
            .await;
        assert_eq!(reply.map(|_| ()).map_err(|(c, _)| c), expected);
    }
    rig.revoke(RevokeTarget::Device("door-1")).await;
    rig.publish([Publication {
        topic: topic::request(APP).expect("topic").to_string(),
        payload: b"not a request".to_vec(),
        retain: false,
    }]);
    rig.pump().await;

    let text = rig
        .hub
        .metrics
        .render(rig.now(), rig.hub.store.write_stats());
    let requests = |operation: &str, outcome: &str| {
        metric(
            &text,
            &format!(
                "tessera_hub_requests_total{{operation=\"{operation}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(requests("access_token", "ok"), 1.0);
    assert_eq!(requests("access_token", "denied"), 1.0);
    assert_eq!(requests("refresh", "ok"), 1.0);
    assert_eq!(requests("refresh", "revoked"), 1.0);
    assert_eq!(requests("revoke", "ok"), 1.0);
    assert_eq!(requests("unknown", "malformed"), 1.0);
    let requests_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("tessera_hub_requests_total{"))
        .map(|l| {
            l.rsplit_once(' ')
                .expect("value")
                .1
                .parse::<f64>()
                .expect("n")
        })
        .sum();
    assert_eq!(requests_total, 6.0, "{text}");
    let tokens = |kind: &str| {
        metric(
            &text,
            &format!("tessera_hub_tokens_issued_total{{kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(tokens("access"), 2.0);
    assert_eq!(tokens("refresh_grant"), 2.0);
    assert!(!text.contains("tessera_hub_tokens_issued_total{kind=\"device\"}"));
    assert_eq!(
        metric(&text, "tessera_hub_issuance_duration_seconds_count"),
        2.0
    );
    assert_eq!(metric(&text, "tessera_hub_refresh_grant_reuse_total"), 1.0);
    assert_eq!(
        metric(&text, "tessera_hub_revocations_total{kind=\"device\"}"),
        1.0
    );
    // Committed: the two issued, the reuse (which revokes the family) and the revocation.
    assert_eq!(
        metric(&text, "tessera_hub_store_commit_duration_seconds_count"),
        4.0
    );
    assert!(rig.hub.metrics.store_writable());
}

#[tokio::test(start_paused = true)]
async fn a_refused_request_is_audited_with_what_it_asked_about() {
    let mut rig = Rig::new().await;
    rig.enrolled_lock("door-1", 10).await;
    let now = rig.now();
    let asked = [
        (
            rig.request(APP, &signer(APP_KEY), now, |_| RequestBody::AccessToken {
                device: "door-1",
                scope: Scopes::parse("door:never-granted").expect("scope"),
            }),
            "door-1",
        ),
        (
            rig.request(APP, &signer(APP_KEY), now, |_| {
                RequestBody::Revoke(RevokeTarget::Device("door-1"))
            }),
            "device door-1",
        ),
    ];
    for (signed, about) in asked {
        let handled = rig.hub.handle(APP, &signed).await;
        let audit = handled.audit.expect("audited");
        assert_ne!(audit.outcome, "ok", "{audit:?}");
        assert_eq!(audit.target, about, "{audit:?}");
    }
}
