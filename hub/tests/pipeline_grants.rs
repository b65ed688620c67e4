//! Refresh grants belong to the client they were issued to: another client presenting one
//! (it read the grant off the broker, say) is refused without touching the owner's grants,
//! while a reuse by the owner's own key still revokes the whole family. Driven by the real
//! device agent on an in-memory bus, with an in-memory store and a fake clock.

use std::collections::{BTreeMap, VecDeque};

use tessera_hub::clock::{Clock, FakeClock};
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::pipeline::{FOREIGN_GRANT, Hub, PipelineConfig, Publication};
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Report, State};
use tessera_shared::crypto::{P256Signer, Signer, sha256};
use tessera_shared::message::{
    ErrorCode, NONCE_LEN, Operation, Request, RequestBody, ResponseBody, SignedRequest,
    SignedResponse,
};
use tessera_shared::scope::Scopes;
use tessera_shared::topic;

const T0: u64 = 1_767_225_600;
const HUB_ID: &str = "hub-1";

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
scopes = ["telemetry:write"]
token_lifetime_s = 600

[roles.controller]
kind = "app"

[[access]]
app_roles = ["controller"]
device_groups = ["building-a"]
scopes = ["door:open"]
"#;

/// The owner, an enrolled lock run by the real agent.
const OWNER: &str = "door-1";
const OWNER_KEY: u32 = 10;
/// Another lock, registered with its own key: it signs its own requests.
const OTHER: &str = "door-2";
const OTHER_KEY: u32 = 11;
/// A control app.
const APP: &str = "app-7";
const APP_KEY: u32 = 2;

fn signer(n: u32) -> P256Signer {
    let mut scalar = [0u8; 32];
    scalar[28..].copy_from_slice(&n.to_be_bytes());
    scalar[0] = 0x33;
    P256Signer::from_scalar(&scalar).expect("scalar")
}

fn record(id: &str, kind: ClientKind, role: &str, key: u32) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind,
        public_key: Some(signer(key).public_key().to_sec1().to_vec()),
        role: role.to_owned(),
        groups: if kind == ClientKind::Device {
            vec!["building-a".to_owned()]
        } else {
            Vec::new()
        },
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: T0,
    }
}

/// Whether an MQTT topic filter matches a topic name.
fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The hub, the owner's agent and a bus between them; test-side clients sign their own
/// requests on the same bus.
struct Rig {
    hub: Hub<Sqlite>,
    clock: FakeClock,
    agent: Agent<P256Signer>,
    subscriptions: Vec<String>,
    /// What the owner's agent asked, in order, and what it reported.
    asked: Vec<(Operation, Option<Vec<u8>>)>,
    reports: Vec<Report>,
    draws: u64,
    retained: BTreeMap<String, Vec<u8>>,
    carried: Vec<Publication>,
    queue: VecDeque<Publication>,
    next_request: u64,
}

impl Rig {
    /// A hub with its first key and key set, the three clients registered, and the
    /// owner's agent enrolled and holding its device token and grant.
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
                ..PipelineConfig::default()
            },
            rng: std::sync::Arc::new(tessera_hub::rng::SeededRng::new([6; 32])),
        };
        for (id, kind, role, key) in [
            (OWNER, ClientKind::Device, "lock", OWNER_KEY),
            (OTHER, ClientKind::Device, "lock", OTHER_KEY),
            (APP, ClientKind::App, "controller", APP_KEY),
        ] {
            hub.store
                .add_client(record(id, kind, role, key))
                .await
                .expect("client");
        }
        let config = AgentConfig::new(OWNER, "tessera").expect("config");
        let agent = Agent::new(config, signer(OWNER_KEY), anchor).expect("agent");
        let mut rig = Self {
            hub,
            clock,
            agent,
            subscriptions: Vec::new(),
            asked: Vec::new(),
            reports: Vec::new(),
            draws: 0,
            retained: BTreeMap::new(),
            carried: Vec::new(),
            queue: VecDeque::new(),
            next_request: 0,
        };
        let keyset = rig.hub.keyset_publication(1).await.expect("key set");
        rig.queue.push_back(keyset);
        rig.pump().await;
        rig.event(Event::Boot { stored: None });
        rig.event(Event::Connected);
        rig.pump().await;
        assert_eq!(rig.agent.state(), State::Holding, "{:?}", rig.agent);
        rig
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Hands an event to the owner's agent now and queues what it publishes.
    fn event(&mut self, event: Event<'_>) {
        self.draws += 1;
        let random = sha256(&[OWNER.as_bytes(), &self.draws.to_be_bytes()]);
        let actions = self
            .agent
            .handle(event, self.clock.now_ms(), &random)
            .expect("the agent handles every event");
        let mut retained = Vec::new();
        for a in actions.iter() {
            match *a {
                Action::Subscribe(filter) => {
                    self.subscriptions.push(filter.to_owned());
                    retained.extend(
                        self.retained
                            .iter()
                            .filter(|(t, _)| matches(filter, t))
                            .map(|(t, p)| (t.clone(), p.clone())),
                    );
                }
                Action::Publish { topic, payload } => {
                    let r = SignedRequest::decode(payload)
                        .expect("a request")
                        .verify(&signer(OWNER_KEY).public_key())
                        .expect("signed by the owner");
                    let grant = match r.body {
                        RequestBody::Refresh { grant } => Some(grant.to_vec()),
                        _ => None,
                    };
                    self.asked.push((r.operation(), grant));
                    self.queue.push_back(Publication {
                        topic: topic.to_owned(),
                        payload: payload.to_vec(),
                        retain: false,
                    });
                }
                Action::Report(r) => self.reports.push(r),
                _ => {}
            }
        }
        drop(actions);
        for (t, payload) in retained {
            self.event(Event::Message {
                topic: &t,
                payload: &payload,
            });
        }
    }

    /// Delivers everything queued, and everything that causes.
    async fn pump(&mut self) {
        while let Some(p) = self.queue.pop_front() {
            self.carried.push(p.clone());
            if p.retain {
                self.retained.insert(p.topic.clone(), p.payload.clone());
            }
            if let Some(client) = topic::requesting_client(&p.topic) {
                let handled = self.hub.handle(client, &p.payload).await;
                self.queue
                    .extend(handled.reply.into_iter().chain(handled.broadcast));
                continue;
            }
            if self.subscriptions.iter().any(|f| matches(f, &p.topic)) {
                self.event(Event::Message {
                    topic: &p.topic,
                    payload: &p.payload,
                });
            }
        }
    }

    /// Runs the owner's agent's wake-ups up to and including `until_ms`.
    async fn run_until(&mut self, until_ms: u64) {
        while let Some(at) = self.agent.next_wake().filter(|t| *t <= until_ms) {
            self.clock.set_ms(at.max(self.clock.now_ms()));
            self.event(Event::Timer);
            self.pump().await;
        }
        self.clock.set_ms(until_ms.max(self.clock.now_ms()));
    }

    /// The grant in the latest token answer to `client`, as anyone reading its response
    /// topic on the broker sees it.
    async fn latest_grant(&self, client: &str) -> Vec<u8> {
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
                    Ok(ResponseBody::Token { grant, .. }) => grant.map(|(g, _)| g.to_vec()),
                    _ => None,
                }
            })
            .expect("a grant was issued")
    }

    /// A request from `client` signed with its own key `key`, issued now, published on its
    /// own request topic; the hub's answer (success body dropped), or the refusal.
    async fn ask(
        &mut self,
        client: &str,
        key: u32,
        body: RequestBody<'_>,
    ) -> Result<(), (ErrorCode, String)> {
        self.next_request += 1;
        let mut nonce = [0xd0; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.next_request.to_be_bytes());
        let request = Request {
            client,
            request_id: self.next_request,
            issued_at: self.now(),
            nonce,
            body,
        };
        let mut signed = vec![0u8; tessera_shared::cose::MAX_REQUEST_LEN];
        let n = request.sign(&signer(key), &mut signed).expect("sign");
        signed.truncate(n);
        let from = self.carried.len();
        self.queue.push_back(Publication {
            topic: topic::request(client).expect("topic").to_string(),
            payload: signed,
            retain: false,
        });
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
                r.answers(client, self.next_request, &nonce).then(|| {
                    r.outcome
                        .map(|_| ())
                        .map_err(|e| (e.code, e.reason.to_owned()))
                })
            })
            .expect("the hub answers every request")
    }

    /// `client` (key `key`) presents `grant`.
    async fn present(
        &mut self,
        client: &str,
        key: u32,
        grant: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        self.ask(client, key, RequestBody::Refresh { grant }).await
    }

    /// The grant as stored: (used, family revoked).
    async fn grant_state(&self, grant: &[u8]) -> (bool, bool) {
        let s = self
            .hub
            .store
            .grant(&sha256(&[grant]))
            .await
            .expect("store")
            .expect("recorded");
        (s.used, s.family_revoked)
    }
}

#[tokio::test]
async fn another_clients_presentation_of_a_grant_is_refused_and_the_owner_keeps_refreshing() {
    let mut rig = Rig::new().await;
    let first = rig.latest_grant(OWNER).await;

    // Another device and an app, each signing with its own registered key on its own
    // topic, present the owner's fresh grant: refused, typed, and nothing happens to it.
    for (client, key) in [(OTHER, OTHER_KEY), (APP, APP_KEY)] {
        assert_eq!(
            rig.present(client, key, &first).await,
            Err((ErrorCode::Denied, FOREIGN_GRANT.to_owned())),
            "{client}"
        );
    }
    assert_eq!(rig.grant_state(&first).await, (false, false));

    // At its refresh point the owner's agent refreshes with that very grant, and nothing
    // else: no fallback to its device key.
    let refresh_at = rig.agent.next_wake().expect("a refresh point");
    let asked_before = rig.asked.len();
    rig.run_until(refresh_at).await;
    assert_eq!(
        rig.asked[asked_before..],
        [(Operation::Refresh, Some(first.clone()))]
    );
    assert!(
        rig.reports
            .iter()
            .any(|r| matches!(r, Report::TokenRenewed { .. })),
        "{:?}",
        rig.reports
    );
    assert_eq!(rig.agent.state(), State::Holding);
    let second = rig.latest_grant(OWNER).await;
    assert_ne!(second, first);
    assert_eq!(rig.grant_state(&first).await, (true, false));

    // The spent grant presented by another client is not a reuse: the same refusal, and
    // the owner's family lives on.
    assert_eq!(
        rig.present(OTHER, OTHER_KEY, &first).await,
        Err((ErrorCode::Denied, FOREIGN_GRANT.to_owned()))
    );
    assert_eq!(rig.grant_state(&second).await, (false, false));
    let asked_before = rig.asked.len();
    let next = rig.agent.next_wake().expect("a refresh point");
    rig.run_until(next).await;
    assert_eq!(
        rig.asked[asked_before..],
        [(Operation::Refresh, Some(second.clone()))]
    );
    assert_eq!(rig.agent.state(), State::Holding);

    // Presented by the owner's own key, the spent grant is a reuse: the whole family is
    // revoked, as before.
    let third = rig.latest_grant(OWNER).await;
    let (code, reason) = rig
        .present(OWNER, OWNER_KEY, &first)
        .await
        .expect_err("a reuse");
    assert_eq!(code, ErrorCode::Revoked, "{reason}");
    assert_eq!(rig.grant_state(&third).await, (false, true));
}

#[tokio::test]
async fn an_apps_grant_presented_by_a_device_is_refused_and_the_app_still_refreshes_with_it() {
    let mut rig = Rig::new().await;
    rig.ask(
        APP,
        APP_KEY,
        RequestBody::AccessToken {
            device: OWNER,
            scope: Scopes::parse("door:open").expect("scope"),
        },
    )
    .await
    .expect("an access token");
    let grant = rig.latest_grant(APP).await;

    assert_eq!(
        rig.present(OWNER, OWNER_KEY, &grant).await,
        Err((ErrorCode::Denied, FOREIGN_GRANT.to_owned()))
    );
    assert_eq!(rig.grant_state(&grant).await, (false, false));
    rig.present(APP, APP_KEY, &grant)
        .await
        .expect("the app refreshes with its grant");
}
