//! The dashboard end to end: a real Mosquitto (started by the test on a free port), a hub
//! serving its HTTP listener with the dashboard, a known sequence of requests over MQTT
//! (enrollments, device and access tokens, a burst of forged requests that alerts and
//! quarantines an app, an operator's revocation of a device), then headless Chromium
//! logging in with an operator's dashboard password: the numbers and rows it renders
//! must be the hub's state. A screenshot is left under the cargo target directory.
//!
//! Chromium is required: the test fails (it does not skip) without it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tessera_hub::anomaly::{AlertKind, AnomalyConfig};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::DashboardSection;
use tessera_hub::dashboard;
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::limiter::Limit;
use tessera_hub::metrics::Metrics;
use tessera_hub::mqtt::MqttConfig;
use tessera_hub::pipeline::{Hub, PipelineConfig};
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::server::{self, ServeConfig};
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store, TokenKind};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::message::{ErrorCode, NONCE_LEN, Request, RequestBody, Response, RevokeTarget};
use tessera_shared::scope::Scopes;
use tessera_shared::topic;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const CHROMIUM: &str = "chromium";
const OPERATOR: &str = "ops-1";
const APP: &str = "app-1";
/// The app whose topic gets the forged burst.
const VICTIM: &str = "app-2";
const DEVICES: [&str; 3] = ["door-1", "door-2", "door-3"];

/// A Mosquitto on a free loopback port, stopped on drop.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts Mosquitto; tries another port if the one picked was taken meanwhile.
fn broker() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..10 {
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "persistence false\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
                 set_tcp_nodelay true\n"
            ),
        )
        .expect("config");
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package `mosquitto`) runs");
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Broker {
                    child,
                    port,
                    _dir: dir,
                };
            }
            if child.try_wait().expect("status").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("mosquitto could not listen on a free port");
}

/// Chromium's version line, or a failure saying how to get it.
fn chromium_version() -> String {
    match Command::new(CHROMIUM).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => panic!(
            "`{CHROMIUM} --version` failed ({}): {}. This test needs a headless Chromium: \
             install the Debian package `chromium`",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run `{CHROMIUM}` ({e}). This test needs a headless Chromium: install the \
             Debian package `chromium` (apt-get install chromium)"
        ),
    }
}

fn signer(n: u8) -> P256Signer {
    let mut scalar = [0x42; 32];
    scalar[31] = n;
    P256Signer::from_scalar(&scalar).expect("scalar")
}

fn record(id: &str, kind: ClientKind, role: &str, key: u8, now: u64) -> ClientRecord {
    ClientRecord {
        id: id.into(),
        kind,
        public_key: Some(signer(key).public_key().to_sec1().to_vec()),
        role: role.into(),
        groups: if kind == ClientKind::Device {
            vec!["building-a".into()]
        } else {
            Vec::new()
        },
        enrollment_code_key: None,
        enrolled_at: None,
        revoked_at: None,
        created_at: now,
    }
}

/// The key number of each client.
fn key_of(id: &str) -> u8 {
    match id {
        OPERATOR => 1,
        APP => 2,
        VICTIM => 3,
        "door-1" => 10,
        "door-2" => 11,
        _ => 12,
    }
}

async fn hub() -> Arc<Hub<Sqlite>> {
    let now = SystemClock.now();
    let store = Sqlite::open_in_memory().expect("store");
    let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
    keys::create_key(&store, &kek, "hub", now, now, Some(now))
        .await
        .expect("key");
    let ring = KeyRing::load(&store, &kek, "hub", now).await.expect("ring");
    let mut clients = vec![
        record(OPERATOR, ClientKind::Operator, "ops", key_of(OPERATOR), now),
        record(APP, ClientKind::App, "controller", key_of(APP), now),
        record(VICTIM, ClientKind::App, "controller", key_of(VICTIM), now),
    ];
    for d in DEVICES {
        clients.push(record(d, ClientKind::Device, "sensor", key_of(d), now));
    }
    store.add_clients(clients).await.expect("clients");
    Arc::new(Hub {
        store,
        policy: SharedPolicy::new(
            Policy::from_toml(Policy::DEFAULT_TOML, "policy.toml").expect("policy"),
        ),
        keys: tokio::sync::RwLock::new(ring),
        clock: Arc::new(SystemClock),
        config: PipelineConfig {
            anomaly: AnomalyConfig {
                refusals: 5,
                // With a per-client broker ACL, as recommended (docs/OPERATING.md).
                quarantine_on: vec![AlertKind::Refusals],
                ..AnomalyConfig::default()
            },
            webhooks: Vec::new(),
            ..PipelineConfig::default()
        },
        rng: Arc::new(tessera_hub::rng::OsRng),
        metrics: Arc::new(Metrics::new()),
    })
}

/// One MQTT client of the test, acting as `id`: sends its requests and hands over the
/// hub's answers (and whatever else it subscribed to).
struct Requester {
    id: &'static str,
    client: AsyncClient,
    answers: UnboundedReceiver<(String, Vec<u8>)>,
    sent: u64,
}

async fn mqtt_client(
    port: u16,
    id: &str,
    filters: &[&str],
) -> (AsyncClient, UnboundedReceiver<(String, Vec<u8>)>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut event_loop) = AsyncClient::new(options, 64);
    let (tx, rx) = unbounded_channel();
    let (subscribed_tx, mut subscribed) = unbounded_channel();
    tokio::spawn(async move {
        loop {
            match event_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let _ = tx.send((topic, p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for filter in filters {
        client
            .subscribe(*filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        within("SUBACK", subscribed.recv()).await.expect("SUBACK");
    }
    (client, rx)
}

impl Requester {
    async fn new(port: u16, id: &'static str) -> Self {
        let resp = topic::response(id).expect("id").to_string();
        let (client, answers) = mqtt_client(port, id, &[&resp]).await;
        Self {
            id,
            client,
            answers,
            sent: 0,
        }
    }

    /// Sends a request signed with key `key`; returns the hub's refusal code, if any.
    async fn send(
        &mut self,
        anchor: &PublicKey,
        key: u8,
        body: RequestBody<'_>,
    ) -> Option<ErrorCode> {
        self.sent += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.sent.to_be_bytes());
        nonce[8] = key;
        let request = Request {
            client: self.id,
            request_id: self.sent,
            issued_at: SystemClock.now(),
            nonce,
            body,
        };
        let mut out = vec![0u8; 2048];
        let len = request.sign(&signer(key), &mut out).expect("sign");
        out.truncate(len);
        let req = topic::request(self.id).expect("id").to_string();
        self.client
            .publish(&req, QoS::AtLeastOnce, false, out)
            .await
            .expect("publish");
        let (_, answer) = within("an answer", self.answers.recv())
            .await
            .expect("answer");
        let payload = tessera_shared::cose::Sign1::decode(&answer)
            .expect("COSE")
            .verify(anchor)
            .expect("signed by the hub");
        let response = Response::decode(payload).expect("response");
        response.outcome.err().map(|e| e.code)
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} within a minute"))
}

/// Polls `check` until it gives a value (at most a minute).
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    within(what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Runs headless Chromium on `url` with `args`, killed after two minutes; returns its
/// stdout.
async fn chromium(profile: &Path, url: &str, args: &[String]) -> String {
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=5", "120", CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Runs the page's timers and fetches, then stops: no waiting on a clock.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("joined")
        .expect("chromium runs (through coreutils `timeout`)");
    assert!(
        out.status.success(),
        "chromium failed ({}; 124: it ran for two minutes): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 DOM")
}

/// The start tag of the element with this id, and its text up to the next tag.
fn element<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let needle = format!("id=\"{id}\"");
    let at = dom
        .find(&needle)
        .unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    let start = dom[..at].rfind('<').expect("a tag");
    let end = at + dom[at..].find('>').expect("tag end");
    let tag = &dom[start..=end];
    let rest = &dom[end + 1..];
    (tag, &rest[..rest.find('<').unwrap_or(rest.len())])
}

fn text(dom: &str, id: &str) -> String {
    element(dom, id).1.trim().to_owned()
}

fn number(dom: &str, id: &str) -> u64 {
    let t = text(dom, id);
    t.parse()
        .unwrap_or_else(|_| panic!("#{id} shows {t:?}, not a number"))
}

/// A metric's value in the text format (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_issuance_alerts_quarantines_and_revocations_as_the_hub_has_them()
 {
    let started = Instant::now();
    let version = chromium_version();
    let broker = broker();
    let hub = hub().await;
    let anchor = hub.active_public_key().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("dashboard-passwords");
    let password = dashboard::new_password(&tessera_hub::rng::OsRng).expect("password");
    assert!(!dashboard::set_password(&passwords, OPERATOR, Some(&password)).expect("set"));

    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = ServeConfig {
        mqtt: MqttConfig::plain("127.0.0.1", broker.port, "tessera-hub"),
        shared_subscription: false,
        concurrency: 2,
        queue: 64,
        admission: Limit {
            burst: 100,
            per_second: 100.0,
        },
        drain: Duration::from_secs(5),
        heartbeat_s: 30,
        audit_retention_s: 86_400,
        kek: None,
        rotation_announce_s: 300,
        http: Some(http),
    };
    let settings = DashboardSection {
        passwords: passwords.clone(),
        session_s: 600,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run_with_dashboard(
        hub.clone(),
        config,
        Some(settings),
        async {
            let _ = stopped.await;
        },
    ));
    let web = reqwest::Client::new();
    let base = format!("http://{http}");
    eventually("the hub is ready", || async {
        let r = web.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    // Refused without the password, or with a wrong one: 401 with a reason.
    let r = web
        .get(format!("{base}/dashboard"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = web
        .get(format!("{base}/dashboard/api/overview"))
        .basic_auth(OPERATOR, Some("not the password"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 401);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("wrong operator id or dashboard password"),
        "{body}"
    );

    // The known sequence.
    let (_watcher, mut alerts) = mqtt_client(broker.port, "watcher", &[topic::ALERTS]).await;
    for d in &DEVICES[..2] {
        let mut device = Requester::new(broker.port, d).await;
        let key = signer(key_of(d)).public_key();
        assert_eq!(
            device
                .send(
                    &anchor,
                    key_of(d),
                    RequestBody::Enroll {
                        key,
                        code_proof: None
                    }
                )
                .await,
            None,
            "{d} enrolls"
        );
        assert_eq!(
            device
                .send(&anchor, key_of(d), RequestBody::DeviceToken)
                .await,
            None,
            "{d} gets a device token"
        );
    }
    let mut app = Requester::new(broker.port, APP).await;
    const ACCESS_TOKENS: u64 = 3;
    for _ in 0..ACCESS_TOKENS {
        let body = RequestBody::AccessToken {
            device: "door-1",
            scope: Scopes::parse("door:open").expect("scope"),
        };
        assert_eq!(app.send(&anchor, key_of(APP), body).await, None);
    }
    // A burst of forged requests on the victim's topic (signed with a key not its own):
    // five refusals alert and quarantine it.
    let mut victim = Requester::new(broker.port, VICTIM).await;
    for _ in 0..5 {
        assert_eq!(
            victim.send(&anchor, 99, RequestBody::DeviceToken).await,
            Some(ErrorCode::BadSignature)
        );
    }
    let (_, alert) = within("the alert", alerts.recv()).await.expect("alert");
    let alert: serde_json::Value = serde_json::from_slice(&alert).expect("JSON");
    assert_eq!(
        (&alert["kind"], &alert["client"]),
        (&"refusals".into(), &VICTIM.into())
    );
    let until_ms = alert["quarantined_until_ms"].as_u64().expect("quarantined");
    // The operator revokes door-2 whole.
    let mut operator = Requester::new(broker.port, OPERATOR).await;
    assert_eq!(
        operator
            .send(
                &anchor,
                key_of(OPERATOR),
                RequestBody::Revoke(RevokeTarget::Device("door-2")),
            )
            .await,
        None
    );

    // The audit rows (the alert, the revocation) are written off the request path: wait
    // until the dashboard's own API shows them, logged in with Basic credentials.
    let overview: serde_json::Value = eventually("the alert and revocation audited", || async {
        let r = web
            .get(format!("{base}/dashboard/api/overview"))
            .basic_auth(OPERATOR, Some(&password))
            .send()
            .await
            .ok()?;
        assert_eq!(r.status(), 200);
        let o: serde_json::Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
        let audited = o["alerts"].as_array()?.len() == 1 && o["revocations"].as_array()?.len() == 1;
        audited.then_some(o)
    })
    .await;
    assert_eq!(overview["operator"], OPERATOR);

    // What the hub's state says, read independently of the dashboard.
    let now = SystemClock.now();
    let clients = hub
        .store
        .clients(Some(ClientKind::Device))
        .await
        .expect("clients");
    let enrolled = clients
        .iter()
        .filter(|c| c.enrolled_at.is_some() && c.revoked_at.is_none())
        .count() as u64;
    let revoked = clients.iter().filter(|c| c.revoked_at.is_some()).count() as u64;
    assert_eq!((clients.len(), enrolled, revoked), (3, 1, 1));
    let mut live = [0u64; 2];
    for c in hub.store.clients(None).await.expect("clients") {
        if c.revoked_at.is_some() {
            continue;
        }
        for t in hub.store.issued_to(&c.id, now).await.expect("tokens") {
            live[usize::from(t.kind == TokenKind::Access)] += 1;
        }
    }
    assert_eq!(live, [1, ACCESS_TOKENS]);
    let entries = hub
        .store
        .revocation_entries(now, tessera_shared::revocation::MAX_LEEWAY)
        .await
        .expect("entries");
    assert!(entries > 0, "the revocation is on the list");
    let metrics = web
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let issued = metric(&metrics, "tessera_hub_tokens_issued_total{kind=\"device\"}")
        + metric(&metrics, "tessera_hub_tokens_issued_total{kind=\"access\"}");
    assert_eq!(issued, 2 + ACCESS_TOKENS);
    let refused: u64 = metrics
        .lines()
        .filter(|l| {
            (l.starts_with("tessera_hub_requests_total{") && !l.contains("outcome=\"ok\""))
                || l.starts_with("tessera_hub_admission_refusals_total{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(refused, 5);

    // Headless Chromium: logs in with Basic credentials on the navigation (the hub sets
    // the session cookie its fetches then use), and opens door-2's history.
    let url = format!("http://{OPERATOR}:{password}@{http}/dashboard#device=door-2");
    let profile = tempfile::tempdir().expect("profile");
    let browsed = Instant::now();
    let dom = chromium(profile.path(), &url, &["--dump-dom".to_owned()]).await;
    let dom_took = browsed.elapsed();
    assert!(
        element(&dom, "error").0.contains("hidden"),
        "the page shows an error: {}\n{dom}",
        text(&dom, "error")
    );
    assert!(dom.contains("data-loaded=\"true\""), "never loaded:\n{dom}");
    assert_eq!(text(&dom, "operator"), OPERATOR);
    assert_eq!(number(&dom, "devices"), clients.len() as u64);
    assert_eq!(number(&dom, "enrolled"), enrolled);
    assert_eq!(number(&dom, "revoked-devices"), revoked);
    assert_eq!(number(&dom, "apps"), 2);
    assert_eq!(number(&dom, "operators"), 1);
    assert_eq!(number(&dom, "tokens-device"), live[0]);
    assert_eq!(number(&dom, "tokens-access"), live[1]);
    assert_eq!(number(&dom, "revocation-entries"), entries);
    assert_eq!(number(&dom, "issued-total"), issued);
    assert_eq!(number(&dom, "refused-total"), refused);
    let heartbeat = element(&dom, "heartbeat-age").0;
    assert!(heartbeat.contains("data-fresh=\"true\""), "{heartbeat}");
    // The charts drew the sampled counters.
    assert!(
        element(&dom, "chart-issued").0.contains("data-points="),
        "{dom}"
    );
    // The quarantine, until when the alert said.
    assert_eq!(number(&dom, "quarantine-count"), 1);
    assert!(
        dom.contains(&format!(
            "<tr data-client=\"{VICTIM}\" data-until-ms=\"{until_ms}\">"
        )),
        "no quarantine row for {VICTIM} until {until_ms}:\n{dom}"
    );
    // The alert.
    assert!(
        dom.contains(&format!(
            "<tr data-kind=\"refusals\" data-client=\"{VICTIM}\">"
        )),
        "no alert row:\n{dom}"
    );
    // The revocation.
    assert!(
        dom.contains(&format!(
            "<tr data-target=\"device door-2\" data-outcome=\"ok\" data-actor=\"{OPERATOR}\">"
        )),
        "no revocation row:\n{dom}"
    );
    // door-2's history: registered, revoked, its revocation and its audit events.
    let (result, _) = element(&dom, "device-result");
    for attr in [
        "data-id=\"door-2\"",
        "data-found=\"true\"",
        "data-kind=\"device\"",
        "data-revoked=\"true\"",
        "data-loaded=\"true\"",
    ] {
        assert!(result.contains(attr), "{attr} not in {result}");
    }
    // Its token, unexpired, is shown revoked with it.
    let tokens = &dom[dom.find("id=\"device-tokens\"").expect("device tokens")..];
    assert!(
        tokens.contains("data-kind=\"device\" data-revoked=\"true\""),
        "{tokens}"
    );
    let history = &dom[dom.find("id=\"device-events\"").expect("device events")..];
    for action in ["enroll", "device_token", "revoke"] {
        assert!(
            history.contains(&format!("data-action=\"{action}\"")),
            "no {action} in door-2's history:\n{history}"
        );
    }
    let revocations = &dom[dom.find("id=\"device-revocations\"").expect("revocations")..];
    assert!(
        revocations.contains("data-action=\"revoke\""),
        "{revocations}"
    );

    // A screenshot, for a human to look at.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        profile.path(),
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000".to_owned(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!(
        "{version}: DOM in {:.1} s, whole test {:.1} s; screenshot {}",
        dom_took.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        shot.display()
    );

    stop.send(()).expect("serving");
    within("the hub stops", serving)
        .await
        .expect("task")
        .expect("a clean stop");
}
