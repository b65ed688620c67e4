//! Revocation through the hub's request pipeline, without a broker: an in-memory store, a
//! fake clock, and requests signed by real client keys. What the hub answers and what it
//! would publish are checked as a verifier would: signatures, streams, entries.

use std::sync::Arc;

use tessera_hub::clock::{Clock, FakeClock};
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::pipeline::{Echo, Handled, Hub, PipelineConfig, Publication};
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::revocation::Target;
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{
    ClientKind, ClientRecord, IssuedToken, Sqlite, Store, TokenKind, Unmatched,
};
use tessera_shared::cose::Sign1;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::message::{
    Command, Control, ErrorCode, IdList, Request, RequestBody, ResponseBody, RevokeTarget,
    SignedResponse,
};
use tessera_shared::revocation::{
    Bounded, Entry, Indexed, PARTITIONS, PageOutcome, RevocationList, Stream, StreamMessage,
    recommended_max_age,
};
use tessera_shared::scope::Scopes;
use tessera_shared::topic;

const T0: u64 = 1_767_225_600;
const LEEWAY: u64 = 30;

const POLICY: &str = r#"
[defaults]
leeway_s = 30
device_token_lifetime_s = 900
access_token_lifetime_s = 300
grant_lifetime_s = 86400
device_audience = "tessera"

[groups]
building-a = "A"
building-b = "B"

[roles.sensor]
kind = "device"
scopes = ["telemetry:write"]

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
device_groups = ["building-a", "building-b"]
scopes = ["door:open"]
"#;

fn signer(n: u32) -> P256Signer {
    let mut scalar = [0u8; 32];
    scalar[28..].copy_from_slice(&n.to_be_bytes());
    scalar[0] = 0x11;
    P256Signer::from_scalar(&scalar).expect("scalar")
}

fn client(
    id: &str,
    kind: ClientKind,
    role: &str,
    groups: &[&str],
    key: Option<&P256Signer>,
) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind,
        public_key: key.map(|k| k.public_key().to_sec1().to_vec()),
        role: role.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: T0,
    }
}

struct Rig {
    hub: Arc<Hub<Sqlite>>,
    clock: FakeClock,
    anchor: PublicKey,
    next_id: u64,
}

impl Rig {
    async fn new(policy: &str) -> Self {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![9; 32]).expect("kek");
        let anchor = keys::create_key(&store, &kek, "hub-1", T0, T0, Some(T0))
            .await
            .expect("key");
        let ring = KeyRing::load(&store, &kek, "hub-1", T0)
            .await
            .expect("ring");
        let clock = FakeClock::at_ms(T0 * 1000);
        let policy = Policy::from_toml(policy, "policy.toml").expect("policy");
        let hub = Hub {
            store,
            policy: SharedPolicy::new(policy),
            keys: tokio::sync::RwLock::new(ring),
            clock: Arc::new(clock.clone()),
            config: PipelineConfig {
                hub_id: "hub-1".into(),
                ..PipelineConfig::default()
            },
            rng: Arc::new(tessera_hub::rng::SeededRng::new([3; 32])),
            metrics: Arc::new(tessera_hub::metrics::Metrics::new()),
        };
        hub.store
            .add_client(client(
                "ops-1",
                ClientKind::Operator,
                "ops",
                &[],
                Some(&signer(1)),
            ))
            .await
            .expect("operator");
        hub.store
            .add_client(client(
                "app-7",
                ClientKind::App,
                "controller",
                &[],
                Some(&signer(2)),
            ))
            .await
            .expect("app");
        Self {
            hub: Arc::new(hub),
            clock,
            anchor,
            next_id: 1,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    async fn ask(&mut self, id: &str, key: &P256Signer, body: RequestBody<'_>) -> Handled {
        self.next_id += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.next_id.to_be_bytes());
        let request = Request {
            client: id,
            request_id: self.next_id,
            issued_at: self.now(),
            nonce,
            body,
        };
        let mut out = vec![0u8; tessera_shared::cose::MAX_REQUEST_LEN];
        let n = request.sign(key, &mut out).expect("sign");
        self.hub.handle(id, &out[..n]).await
    }

    /// The answer's body, or its refusal.
    fn answer<'a>(&self, handled: &'a Handled) -> Result<ResponseBody<'a>, (ErrorCode, String)> {
        let reply = handled.reply.as_ref().expect("a reply");
        let r = SignedResponse::decode(&reply.payload)
            .expect("decode")
            .verify(&self.anchor)
            .expect("hub signature");
        r.outcome.map_err(|e| (e.code, e.reason.to_owned()))
    }

    async fn revoke(&mut self, target: RevokeTarget<'_>) -> (Handled, (u64, u64, u64)) {
        let handled = self
            .ask("ops-1", &signer(1), RequestBody::Revoke(target))
            .await;
        match self.answer(&handled) {
            Ok(ResponseBody::Revoked {
                revoked,
                entries,
                notified,
            }) => (handled, (revoked, entries, notified)),
            other => panic!("revoke: {other:?}"),
        }
    }

    /// Registers `n` devices `prefix-0000…` in `group`; the first `enrolled` of them
    /// enroll and get a device token through the pipeline.
    async fn fleet(&mut self, prefix: &str, n: u32, group: &str, enrolled: u32) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        // Only the devices that enroll need a key (a P-256 key takes a while in a debug
        // build); the others wait for a one-time code they will never use.
        let records = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let n = u32::try_from(i).expect("small");
                let key = (n < enrolled).then(|| signer(1000 + n));
                client(id, ClientKind::Device, "sensor", &[group], key.as_ref())
            })
            .collect();
        self.hub
            .store
            .add_clients(records)
            .await
            .expect("add_clients");
        for (i, id) in ids.iter().enumerate().take(enrolled as usize) {
            let key = signer(1000 + u32::try_from(i).expect("small"));
            let enroll = self
                .ask(
                    id,
                    &key,
                    RequestBody::Enroll {
                        key: key.public_key(),
                        code_proof: None,
                    },
                )
                .await;
            assert!(self.answer(&enroll).is_ok(), "enroll {id}");
            let token = self.ask(id, &key, RequestBody::DeviceToken).await;
            assert!(
                matches!(self.answer(&token), Ok(ResponseBody::Token { .. })),
                "token {id}"
            );
        }
        ids
    }
}

/// The control messages among `pubs`, verified: (device, command).
fn controls(pubs: &[Publication], anchor: &PublicKey) -> Vec<(String, Command)> {
    pubs.iter()
        .filter_map(|p| {
            let device = topic::controlled_device(&p.topic)?;
            let c = Control::verify(&p.payload, anchor).expect("a signed control message");
            assert_eq!(c.device, device, "a control message on its device's topic");
            Some((c.device.to_owned(), c.command))
        })
        .collect()
}

/// Applies every delta among `pubs` to `list`.
fn apply_deltas<S: tessera_shared::revocation::EntryStore, const P: usize>(
    pubs: &[Publication],
    anchor: &PublicKey,
    list: &mut RevocationList<S, P>,
    now: u64,
) -> usize {
    let mut n = 0;
    for p in pubs {
        if topic::delta_stream(&p.topic) != Some(list.stream()) {
            continue;
        }
        let payload = Sign1::decode(&p.payload)
            .expect("decode")
            .verify(anchor)
            .expect("verify");
        let StreamMessage::Page(page) = StreamMessage::decode(payload).expect("page") else {
            panic!("a heartbeat on a delta topic");
        };
        assert!(p.payload.len() <= tessera_shared::revocation::MAX_PAGE_LEN);
        let _ = list.apply_page(&page, now).expect("apply");
        n += 1;
    }
    n
}

#[tokio::test]
async fn a_group_of_a_thousand_devices_is_revoked_in_one_request_and_only_its_enrolled_ones_cost_anything()
 {
    let mut rig = Rig::new(POLICY).await;
    let revoked = rig.fleet("a", 1000, "building-a", 20).await;
    let kept = rig.fleet("b", 1, "building-b", 1).await;
    let (handled, counts) = rig.revoke(RevokeTarget::Group("building-a")).await;
    assert_eq!(counts, (1000, 20, 20), "(revoked, entries, notified)");

    // Every enrolled device of the group is told, once, and no other device.
    let mut told = controls(&handled.broadcast, &rig.anchor);
    told.sort_by(|a, b| a.0.cmp(&b.0));
    let expected: Vec<(String, Command)> = revoked[..20]
        .iter()
        .map(|id| (id.clone(), Command::Revoked))
        .collect();
    assert_eq!(told, expected);
    // The entries go to the service that accepts device tokens; a device's stream gets none.
    let mut service =
        RevocationList::for_service(Indexed::with_capacity(10_000), "tessera", LEEWAY)
            .expect("service list");
    assert!(apply_deltas(&handled.broadcast, &rig.anchor, &mut service, rig.now()) >= 1);
    assert_eq!(service.len(), 20);
    assert!(service.is_complete());
    for p in &handled.broadcast {
        if let Some(stream) = topic::delta_stream(&p.topic) {
            assert_eq!(stream, Stream::Service("tessera"));
        }
    }
    // The revoked devices are refused from now on; a device of another group is not.
    let refused = rig
        .ask(&revoked[0], &signer(1000), RequestBody::DeviceToken)
        .await;
    assert_eq!(
        rig.answer(&refused).map(|_| ()).map_err(|e| e.0),
        Err(ErrorCode::Revoked)
    );
    let other = rig
        .ask(&kept[0], &signer(1000), RequestBody::DeviceToken)
        .await;
    assert!(matches!(rig.answer(&other), Ok(ResponseBody::Token { .. })));
}

#[tokio::test]
async fn a_list_of_devices_far_larger_than_an_ordinary_request_is_one_request() {
    let mut rig = Rig::new(POLICY).await;
    let ids = rig.fleet("listed-device", 2000, "building-a", 0).await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (handled, counts) = rig.revoke(RevokeTarget::Devices(IdList::new(&refs))).await;
    assert_eq!(counts, (2000, 0, 0), "never enrolled: nothing on the wire");
    assert!(handled.broadcast.is_empty());
    // One unknown id refuses the whole list, naming it.
    let mut with_ghost = refs.clone();
    with_ghost.push("ghost");
    let handled = rig
        .ask(
            "ops-1",
            &signer(1),
            RequestBody::Revoke(RevokeTarget::Devices(IdList::new(&with_ghost))),
        )
        .await;
    let (code, reason) = rig.answer(&handled).map(|_| ()).expect_err("refused");
    assert_eq!(code, ErrorCode::Denied);
    assert!(reason.contains("ghost"), "{reason}");
    // Another client's request of that size is refused as malformed, naming the ordinary
    // limit, before the hub reads more than its head: an app's device list too.
    let handled = rig
        .ask(
            "app-7",
            &signer(2),
            RequestBody::Revoke(RevokeTarget::Devices(IdList::new(&refs))),
        )
        .await;
    let (code, reason) = rig.answer(&handled).map(|_| ()).expect_err("refused");
    assert_eq!(code, ErrorCode::Malformed);
    assert!(reason.contains("the limit is 4096"), "{reason}");
}

#[tokio::test]
async fn a_stream_larger_than_one_message_is_fetched_page_by_page_into_a_complete_list() {
    let mut rig = Rig::new(POLICY).await;
    // 3000 devices with a device token each (recorded directly: signing 3000 tokens would
    // only slow the test), revoked as a group: 3000 entries on the service stream.
    let ids = rig.fleet("big", 3000, "building-a", 0).await;
    for (i, id) in ids.iter().enumerate() {
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&u32::try_from(i).expect("small").to_be_bytes());
        let t = IssuedToken {
            cti: hash[..16].try_into().expect("16"),
            hash,
            kind: TokenKind::Device,
            subject: id.clone(),
            audience: "tessera".into(),
            scope: "telemetry:write".into(),
            issued_at: T0 - 10,
            expires_at: T0 + 890,
        };
        rig.hub.store.record_issued(t, None).await.expect("record");
    }
    let (handled, counts) = rig.revoke(RevokeTarget::Group("building-a")).await;
    assert_eq!((counts.0, counts.1), (3000, 3000));
    let deltas = handled
        .broadcast
        .iter()
        .filter(|p| topic::delta_stream(&p.topic).is_some())
        .count();
    assert!(deltas >= 3, "3000 entries take several changes: {deltas}");

    // A new service verifier fetches from change 1 until it has everything.
    let mut list = RevocationList::for_service(Indexed::with_capacity(100_000), "tessera", LEEWAY)
        .expect("list");
    let mut fetches = 0;
    let mut from = 1;
    loop {
        fetches += 1;
        let handled = rig
            .ask(
                "app-7",
                &signer(2),
                RequestBody::FetchRevocations {
                    stream: Stream::Service("tessera"),
                    from,
                },
            )
            .await;
        let Ok(ResponseBody::Revocations { page }) = rig.answer(&handled) else {
            panic!("fetch from {from}: {:?}", rig.answer(&handled).map(|_| ()));
        };
        assert!(page.len() <= tessera_shared::revocation::MAX_PAGE_LEN);
        let payload = Sign1::decode(page)
            .expect("decode")
            .verify(&rig.anchor)
            .expect("verify");
        let StreamMessage::Page(p) = StreamMessage::decode(payload).expect("page") else {
            panic!("not a page");
        };
        assert_eq!(p.from(), from);
        let outcome = list.apply_page(&p, rig.now()).expect("apply");
        match list.wanted_from() {
            None => {
                assert_eq!(outcome, PageOutcome::Applied);
                break;
            }
            Some(next) => from = next,
        }
        assert!(fetches < 100);
    }
    assert!(fetches >= 3, "{fetches} fetches");
    assert_eq!(list.len(), 3000);
    assert!(list.is_revoked(&[9; 32], &ids[1234], T0 - 10));
    assert!(
        !list.is_revoked(&[9; 32], &ids[1234], T0),
        "issued after the cut-off"
    );
    // Asking beyond the stream is refused, with the reason.
    let beyond = rig
        .ask(
            "app-7",
            &signer(2),
            RequestBody::FetchRevocations {
                stream: Stream::Service("tessera"),
                from: list.seq() + 1,
            },
        )
        .await;
    assert_eq!(
        rig.answer(&beyond).map(|_| ()).map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );

    // The retained snapshot: pages covering every change, and empty retained messages
    // clearing what a longer snapshot left before.
    let mut state = rig
        .hub
        .store
        .streams()
        .await
        .expect("streams")
        .into_iter()
        .find(|s| s.name == "service/tessera")
        .expect("the service stream");
    state.snapshot_pages = 50;
    let (pubs, latest) = rig
        .hub
        .snapshot_publications(&state, rig.now())
        .await
        .expect("snapshot");
    assert_eq!(latest, list.seq());
    let pages: Vec<&Publication> = pubs.iter().filter(|p| !p.payload.is_empty()).collect();
    let cleared: Vec<&Publication> = pubs.iter().filter(|p| p.payload.is_empty()).collect();
    assert!(pages.len() >= 3 && pubs.iter().all(|p| p.retain));
    assert_eq!(pages.len() + cleared.len(), 50);
    // A service takes hundreds of retained pages in any order: room for as many ranges.
    let mut fresh = RevocationList::for_service(Indexed::with_capacity(100_000), "tessera", LEEWAY)
        .expect("list")
        .with_pending_ranges::<1024>();
    // In any order.
    for p in pages.iter().rev() {
        let payload = Sign1::decode(&p.payload)
            .expect("decode")
            .verify(&rig.anchor)
            .expect("verify");
        let StreamMessage::Page(page) = StreamMessage::decode(payload).expect("page") else {
            panic!("not a page");
        };
        let _ = fresh.apply_page(&page, rig.now()).expect("apply");
    }
    assert!(fresh.is_complete());
    assert_eq!(fresh.len(), 3000);
}

#[tokio::test]
async fn heartbeats_cover_every_partition_and_the_service_and_announce_their_max_age() {
    let rig = Rig::new(POLICY).await;
    let pubs = rig
        .hub
        .heartbeats(&[], rig.now())
        .await
        .expect("heartbeats");
    assert_eq!(pubs.len(), PARTITIONS + 1);
    let h = PipelineConfig::default().heartbeat_s;
    for p in &pubs {
        let payload = Sign1::decode(&p.payload)
            .expect("decode")
            .verify(&rig.anchor)
            .expect("verify");
        let StreamMessage::Heartbeat(hb) = StreamMessage::decode(payload).expect("heartbeat")
        else {
            panic!("a page on a heartbeat topic");
        };
        assert_eq!(p.topic, topic::revocation_heartbeat(&hb.stream()).as_str());
        assert_eq!((hb.seq(), hb.issued_at()), (0, rig.now()));
        let expected = match hb.stream() {
            // Controllers' 120 s access tokens: half of that.
            Stream::Devices(_) => recommended_max_age(h, 120),
            // Locks' 600 s device tokens: capped at three heartbeats.
            Stream::Service(_) => recommended_max_age(h, 600),
        };
        assert_eq!(hb.max_age(), expected);
    }
    assert_eq!(
        (recommended_max_age(h, 120), recommended_max_age(h, 600)),
        (60, 90)
    );
}

#[tokio::test]
async fn a_subject_entry_lives_as_long_as_the_tokens_issued_even_after_the_policy_cut_their_lifetime()
 {
    let mut rig =
        Rig::new(&POLICY.replace("token_lifetime_s = 120", "token_lifetime_s = 3600")).await;
    rig.fleet("door", 1, "building-a", 1).await;
    let handled = rig
        .ask(
            "app-7",
            &signer(2),
            RequestBody::AccessToken {
                device: "door-0000",
                scope: Scopes::parse("door:open").expect("scope"),
            },
        )
        .await;
    assert!(matches!(
        rig.answer(&handled),
        Ok(ResponseBody::Token { .. })
    ));
    let issued_at = rig.now();
    // Every lifetime cut to 20 s, then the app revoked as a subject a minute later.
    rig.hub.policy.replace(
        Policy::from_toml(
            &POLICY
                .replace("token_lifetime_s = 120", "token_lifetime_s = 20")
                .replace("token_lifetime_s = 600", "token_lifetime_s = 20")
                .replace("_token_lifetime_s = 900", "_token_lifetime_s = 20")
                .replace("_token_lifetime_s = 300", "_token_lifetime_s = 20"),
            "policy.toml",
        )
        .expect("policy"),
    );
    rig.clock.advance_ms(60_000);
    let (handled, counts) = rig.revoke(RevokeTarget::Subject("app-7")).await;
    assert_eq!(counts, (1, 1, 0));
    let mut device = RevocationList::<Bounded<64>>::for_device("door-0000", LEEWAY).expect("list");
    apply_deltas(&handled.broadcast, &rig.anchor, &mut device, rig.now());
    let entries: Vec<Entry> = device.entries().collect();
    assert_eq!(
        entries,
        [Entry::for_subject("app-7", issued_at + 60, issued_at + 3600 + LEEWAY).expect("id")]
    );
    // 58 minutes later the token is still revoked, and the entry still held.
    device.prune(issued_at + 3540);
    assert!(device.is_revoked(&[0; 32], "app-7", issued_at));
}

#[tokio::test]
async fn a_role_change_revokes_exactly_the_tokens_it_disallows_and_tells_the_device() {
    let mut rig = Rig::new(POLICY).await;
    // A lock gets a device token with events:publish, then becomes a sensor.
    rig.hub
        .store
        .add_client(client(
            "lock-1",
            ClientKind::Device,
            "lock",
            &["building-a"],
            Some(&signer(50)),
        ))
        .await
        .expect("add");
    let k = signer(50);
    let e = rig
        .ask(
            "lock-1",
            &k,
            RequestBody::Enroll {
                key: k.public_key(),
                code_proof: None,
            },
        )
        .await;
    assert!(rig.answer(&e).is_ok());
    let t = rig.ask("lock-1", &k, RequestBody::DeviceToken).await;
    assert!(matches!(rig.answer(&t), Ok(ResponseBody::Token { .. })));
    let lock = rig
        .hub
        .store
        .client("lock-1")
        .await
        .expect("client")
        .expect("kept");
    let policy = rig.hub.policy.current();
    let out = tessera_hub::policy_change::change_role(
        &rig.hub.store,
        &policy,
        &lock,
        "sensor",
        rig.now(),
    )
    .await
    .expect("role change")
    .expect("something revoked");
    let updated = rig
        .hub
        .store
        .client("lock-1")
        .await
        .expect("client")
        .expect("kept");
    assert_eq!(updated.role, "sensor");
    assert_eq!((out.revoked, out.entry_count()), (1, 1));
    assert_eq!(out.changes[0].stream, "service/tessera");
    assert!(
        matches!(out.changes[0].entries[0].entry, Entry::Token { .. }),
        "by hash"
    );
    assert_eq!(out.controls.len(), 1);
    assert_eq!(
        (out.controls[0].device.as_str(), out.controls[0].command),
        ("lock-1", Command::RefreshNow)
    );
    // The same sweep again revokes nothing: an unchanged policy is not a revocation.
    assert!(
        tessera_hub::policy_change::revoke_disallowed(
            &rig.hub.store,
            &policy,
            &[updated],
            rig.now()
        )
        .await
        .expect("sweep")
        .is_none()
    );
    // The running hub publishes it at its heartbeat: the delta and the control message.
    let pending = rig
        .hub
        .pending_broadcasts(u64::MAX, usize::MAX)
        .await
        .expect("pending");
    assert_eq!(
        controls(&pending, &rig.anchor),
        [("lock-1".to_owned(), Command::RefreshNow)]
    );
    assert_eq!(
        pending
            .iter()
            .filter(|p| topic::delta_stream(&p.topic).is_some())
            .count(),
        1
    );
}

#[tokio::test]
async fn what_comes_back_from_the_broker_confirms_exactly_that_and_nothing_forged() {
    let mut rig = Rig::new(POLICY).await;
    rig.fleet("c", 2, "building-a", 2).await;
    let (handled, _) = rig.revoke(RevokeTarget::Device("c-0000")).await;
    let delta = handled
        .broadcast
        .iter()
        .find(|p| topic::delta_stream(&p.topic).is_some())
        .expect("a delta");
    let control = handled
        .broadcast
        .iter()
        .find(|p| topic::controlled_device(&p.topic).is_some())
        .expect("a control message");
    assert_eq!(
        rig.hub.echo(&delta.topic, &delta.payload).await,
        Some(Echo::Changes("service/tessera".into(), 1, 1))
    );
    assert!(
        matches!(rig.hub.echo(&control.topic, &control.payload).await, Some(Echo::Control(c)) if c.device == "c-0000")
    );
    // Signed by anyone else: ignored.
    let forged = Control {
        device: "c-0001",
        command: Command::Revoked,
        issued_at: rig.now(),
    };
    let mut out = [0u8; 256];
    let n = forged.sign(&signer(77), &mut out).expect("sign");
    let topic = topic::control("c-0001").expect("topic");
    assert_eq!(rig.hub.echo(&topic, &out[..n]).await, None);
    // Before confirmation both are owed; afterwards neither.
    assert_eq!(
        rig.hub
            .pending_broadcasts(u64::MAX, usize::MAX)
            .await
            .expect("pending")
            .len(),
        2
    );
    rig.hub
        .store
        .mark_published(vec![("service/tessera".into(), 1, 1)])
        .await
        .expect("mark");
    let Some(Echo::Control(c)) = rig.hub.echo(&control.topic, &control.payload).await else {
        panic!("not a control echo");
    };
    rig.hub
        .store
        .mark_controls_sent(vec![c])
        .await
        .expect("mark");
    assert!(
        rig.hub
            .pending_broadcasts(u64::MAX, usize::MAX)
            .await
            .expect("pending")
            .is_empty()
    );
}

#[tokio::test]
async fn revoking_what_does_not_exist_is_refused_with_a_reason() {
    let mut rig = Rig::new(POLICY).await;
    rig.fleet("d", 1, "building-a", 0).await;
    for (target, phrase) in [
        (RevokeTarget::TokenHash([1; 32]), "no live token"),
        (RevokeTarget::Device("app-7"), "not a device"),
        (RevokeTarget::Group("building-b"), "no device in group"),
        (RevokeTarget::Role("nobody"), "no client with role"),
        (RevokeTarget::Subject("ghost"), "no client"),
    ] {
        let handled = rig
            .ask("ops-1", &signer(1), RequestBody::Revoke(target))
            .await;
        let (code, reason) = rig.answer(&handled).map(|_| ()).expect_err("refused");
        assert_eq!(code, ErrorCode::Denied, "{target:?}");
        assert!(reason.contains(phrase), "{target:?}: {reason}");
    }
    // An app may not revoke.
    let handled = rig
        .ask(
            "app-7",
            &signer(2),
            RequestBody::Revoke(RevokeTarget::Device("d-0000")),
        )
        .await;
    assert_eq!(
        rig.answer(&handled).map(|_| ()).map_err(|e| e.0),
        Err(ErrorCode::Denied)
    );
}

/// The token answer's claims, verified with the hub's key.
fn claims_of<'a>(rig: &Rig, handled: &'a Handled) -> tessera_shared::claims::Claims<'a> {
    let Ok(ResponseBody::Token { token, .. }) = rig.answer(handled) else {
        panic!("not a token: {:?}", rig.answer(handled).map(|_| ()));
    };
    tessera_shared::token::dangerous_verify_signature_only(token, &rig.anchor).expect("hub token")
}

#[tokio::test]
async fn a_device_token_decided_before_a_subject_revocation_committed_is_issued_at_its_cut_off_not_refused()
 {
    let mut rig = Rig::new(POLICY).await;
    let id = rig.fleet("race", 1, "building-a", 1).await.remove(0);
    let key = signer(1000);
    // Another replica, whose clock is a second ahead, revokes the device's tokens (not the
    // device) while this hub is still deciding with its own `now`.
    let cut_off = rig.now() + 1;
    let outcome = rig
        .hub
        .store
        .revoke(
            vec![Target::Subject(id.clone())],
            cut_off,
            LEEWAY,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke");
    let handled = rig.ask(&id, &key, RequestBody::DeviceToken).await;
    let claims = claims_of(&rig, &handled);
    // The request counts as arriving after the revocation: its token is issued at the
    // cut-off, which the subject entry does not cover, and lasts its whole lifetime.
    assert_eq!(claims.iat, cut_off);
    assert_eq!(claims.exp, cut_off + 900);
    let mut service =
        RevocationList::for_service(Indexed::with_capacity(100), "tessera", LEEWAY).expect("list");
    let deltas = rig
        .hub
        .outcome_publications(&outcome, cut_off)
        .await
        .expect("deltas");
    assert_eq!(
        apply_deltas(&deltas, &rig.anchor, &mut service, rig.now()),
        1
    );
    assert!(!service.is_revoked(&[0; 32], &id, claims.iat));
    assert!(
        service.is_revoked(&[0; 32], &id, rig.now()),
        "what was issued before is"
    );
    // The token is recorded as issued, so a later revocation covers it.
    let recorded = rig.hub.store.issued(claims.cti).await.expect("issued");
    assert_eq!(recorded.map(|t| t.issued_at), Some(cut_off));

    // A cut-off further ahead than a verifier's leeway would make a token issued at it
    // unusable: the answer is a retryable `internal`, never `revoked`.
    rig.hub
        .store
        .revoke(
            vec![Target::Subject(id.clone())],
            rig.now() + 10 * LEEWAY,
            LEEWAY,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke");
    let handled = rig.ask(&id, &key, RequestBody::DeviceToken).await;
    assert_eq!(
        rig.answer(&handled).map(|_| ()).map_err(|e| e.0),
        Err(ErrorCode::Internal)
    );

    // Revoked whole meanwhile: still `revoked`.
    rig.hub
        .store
        .revoke(
            vec![Target::Device(id.clone())],
            rig.now() + 1,
            LEEWAY,
            Unmatched::Refuse,
        )
        .await
        .expect("revoke");
    let handled = rig.ask(&id, &key, RequestBody::DeviceToken).await;
    assert_eq!(
        rig.answer(&handled).map(|_| ()).map_err(|e| e.0),
        Err(ErrorCode::Revoked)
    );
}

/// How many entries a `fetch_revocations` of the service stream from change 1 returns.
async fn fetched_entries(rig: &mut Rig) -> usize {
    let body = RequestBody::FetchRevocations {
        stream: Stream::Service("tessera"),
        from: 1,
    };
    let handled = rig.ask("app-7", &signer(2), body).await;
    let Ok(ResponseBody::Revocations { page }) = rig.answer(&handled) else {
        panic!("fetch: {:?}", rig.answer(&handled).map(|_| ()));
    };
    let payload = Sign1::decode(page)
        .expect("decode")
        .verify(&rig.anchor)
        .expect("verify");
    let StreamMessage::Page(p) = StreamMessage::decode(payload).expect("page") else {
        panic!("not a page");
    };
    p.entries().iter().count()
}

#[tokio::test]
async fn an_entry_is_served_and_kept_until_the_largest_leeway_a_verifier_may_use_has_passed() {
    let mut rig = Rig::new(POLICY).await;
    let id = rig.fleet("kept", 1, "building-a", 1).await.remove(0);
    let token = rig
        .hub
        .store
        .issued_to(&id, 0)
        .await
        .expect("issued_to")
        .remove(0);
    let (_, counts) = rig.revoke(RevokeTarget::TokenHash(token.hash)).await;
    assert_eq!(counts.1, 1);
    let expires_at = token.expires_at + LEEWAY;
    // Spent for a verifier with the hub's 30 s leeway, not for one allowed up to
    // MAX_LEEWAY: the hub keeps it, and serves it.
    rig.clock.set_ms((expires_at + 61) * 1000);
    rig.hub.prune(86_400).await.expect("prune");
    assert_eq!(fetched_entries(&mut rig).await, 1);
    let state = rig.hub.store.streams().await.expect("streams").remove(0);
    let (pubs, _) = rig
        .hub
        .snapshot_publications(&state, rig.now())
        .await
        .expect("snapshot");
    assert!(!pubs.is_empty() && !pubs[0].payload.is_empty());
    // Once no verifier may need it any more, it goes.
    rig.clock
        .set_ms((expires_at + tessera_shared::revocation::MAX_LEEWAY + 1) * 1000);
    let pruned = rig.hub.prune(86_400).await.expect("prune");
    assert_eq!(pruned.revocation_entries, 1);
    assert_eq!(fetched_entries(&mut rig).await, 0);
}

#[tokio::test]
async fn control_messages_owed_longer_than_any_token_lives_are_forgotten() {
    let mut rig = Rig::new(POLICY).await;
    let id = rig.fleet("old", 1, "building-a", 1).await.remove(0);
    rig.revoke(RevokeTarget::Subject(&id)).await;
    let owed = |rig: &Rig| {
        let hub = rig.hub.clone();
        async move {
            hub.store
                .unsent_controls(u64::MAX, usize::MAX)
                .await
                .expect("unsent_controls")
                .len()
        }
    };
    assert_eq!(owed(&rig).await, 1);
    // The longest lifetime of the policy (900 s device tokens) plus leeway later, it
    // still counts; a second more and the device's tokens have all expired.
    rig.clock.advance_ms((900 + LEEWAY) * 1000);
    rig.hub.prune(86_400).await.expect("prune");
    assert_eq!(owed(&rig).await, 1);
    rig.clock.advance_ms(1000);
    assert_eq!(rig.hub.prune(86_400).await.expect("prune").controls, 1);
    assert_eq!(owed(&rig).await, 0);
}

#[tokio::test]
async fn only_a_single_change_page_on_its_own_delta_topic_confirms_a_delta() {
    let mut rig = Rig::new(POLICY).await;
    rig.fleet("e", 3, "building-a", 3).await;
    for id in ["e-0000", "e-0001", "e-0002"] {
        rig.revoke(RevokeTarget::Device(id)).await;
    }
    let state = rig.hub.store.streams().await.expect("streams").remove(0);
    assert_eq!(state.seq, 3);
    // The retained snapshot page covers changes 1..=3 and is signed by the hub: replayed
    // on the delta topic it confirms nothing.
    let (pubs, _) = rig
        .hub
        .snapshot_publications(&state, rig.now())
        .await
        .expect("snapshot");
    let delta_topic = topic::revocation_delta(&Stream::Service("tessera")).to_string();
    assert_eq!(rig.hub.echo(&delta_topic, &pubs[0].payload).await, None);
    // A delta on another stream's delta topic neither.
    let change = rig
        .hub
        .store
        .unpublished_changes(u64::MAX)
        .await
        .expect("unpublished")
        .remove(0);
    let delta = rig.hub.delta(&change, 3, rig.now()).await.expect("delta");
    let other = topic::revocation_delta(&Stream::Devices(7)).to_string();
    assert_eq!(rig.hub.echo(&other, &delta.payload).await, None);
    assert_eq!(
        rig.hub.echo(&delta.topic, &delta.payload).await,
        Some(Echo::Changes("service/tessera".into(), 1, 1))
    );
}

#[tokio::test]
async fn an_oversized_revoke_is_refused_for_its_signature_before_its_body_is_read() {
    let rig = Rig::new(POLICY).await;
    // A device list well over the 4096-byte ordinary limit, whose last id is invalid.
    let ids: Vec<String> = (0..400).map(|i| format!("listed-device-{i:04}")).collect();
    let mut refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    refs.push("zz-bad-device");
    let request = Request {
        client: "ops-1",
        request_id: 7,
        issued_at: rig.now(),
        nonce: [7; 16],
        body: RequestBody::Revoke(RevokeTarget::Devices(IdList::new(&refs))),
    };
    let mut payload = vec![0u8; tessera_shared::cose::MAX_REQUEST_LEN];
    let n = request.encode_to(&mut payload).expect("encode");
    payload.truncate(n);
    let at = payload
        .windows(13)
        .position(|w| w == b"zz-bad-device")
        .expect("the last id");
    payload[at + 2] = b' ';
    let signed = |key: &P256Signer| {
        let mut out = vec![0u8; payload.len() + tessera_shared::cose::OVERHEAD];
        let n = tessera_shared::cose::sign(key, &payload, &mut out).expect("sign");
        out.truncate(n);
        out
    };
    // Signed by someone else: a bad signature, whatever the body holds.
    let forged = signed(&signer(99));
    assert!(forged.len() > PipelineConfig::default().max_request_bytes);
    let handled = rig.hub.handle("ops-1", &forged).await;
    let (code, reason) = rig.answer(&handled).map(|_| ()).expect_err("refused");
    assert_eq!(code, ErrorCode::BadSignature, "{reason}");
    // Signed by the operator: only then is the body read, and found malformed.
    let genuine = signed(&signer(1));
    let handled = rig.hub.handle("ops-1", &genuine).await;
    let (code, reason) = rig.answer(&handled).map(|_| ()).expect_err("refused");
    assert_eq!(code, ErrorCode::Malformed, "{reason}");
}
