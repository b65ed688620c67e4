//! The monitoring "done when", end to end through a real Mosquitto (started by the test on
//! a free port): a burst of forged requests from one client raises an alert on the alerts
//! topic, quarantines the client (its next request is answered `quarantined`), shows in
//! `/metrics`, and reaches a webhook receiver with a valid signature.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tessera_hub::anomaly::{AlertKind, AnomalyConfig};
use tessera_hub::clock::SystemClock;
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::limiter::Limit;
use tessera_hub::metrics::Metrics;
use tessera_hub::mqtt::MqttConfig;
use tessera_hub::pipeline::{Hub, PipelineConfig};
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::server::{self, ServeConfig};
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store};
use tessera_hub::webhooks::{self, NotificationKind, WebhookConfig};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::message::{ErrorCode, NONCE_LEN, Request, RequestBody, Response};
use tessera_shared::topic;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const APP: &str = "app-1";
const SECRET: &str = "the receiver's shared secret";
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

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
        // Up when it accepts connections; gone when the port was taken.
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

fn signer(n: u8) -> P256Signer {
    let mut scalar = [0x42; 32];
    scalar[31] = n;
    P256Signer::from_scalar(&scalar).expect("scalar")
}

/// A webhook receiver on 127.0.0.1:0: every request it gets, handed over.
async fn receiver() -> (String, UnboundedReceiver<(HeaderMap, Bytes)>) {
    let (tx, rx) = unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, body));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), rx)
}

/// A test-side MQTT client: what arrives on its subscriptions, handed over.
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
        subscribed.recv().await.expect("SUBACK");
    }
    (client, rx)
}

async fn hub() -> Arc<Hub<Sqlite>> {
    let now = tessera_hub::clock::Clock::now(&SystemClock);
    let store = Sqlite::open_in_memory().expect("store");
    let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
    keys::create_key(&store, &kek, "hub", now, now, Some(now))
        .await
        .expect("key");
    let ring = KeyRing::load(&store, &kek, "hub", now).await.expect("ring");
    store
        .add_client(ClientRecord {
            id: APP.into(),
            kind: ClientKind::App,
            public_key: Some(signer(2).public_key().to_sec1().to_vec()),
            role: "controller".into(),
            groups: Vec::new(),
            enrollment_code_key: None,
            enrolled_at: None,
            revoked_at: None,
            created_at: now,
        })
        .await
        .expect("client");
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

/// A `device_token` request of `APP`, signed with key `key`.
fn request(n: u64, key: u8) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..8].copy_from_slice(&n.to_be_bytes());
    let request = Request {
        client: APP,
        request_id: n,
        issued_at: tessera_hub::clock::Clock::now(&SystemClock),
        nonce,
        body: RequestBody::DeviceToken,
    };
    let mut out = vec![0u8; 1024];
    let len = request.sign(&signer(key), &mut out).expect("sign");
    out.truncate(len);
    out
}

/// The refusal code of a signed response from the hub.
fn refusal(anchor: &PublicKey, signed: &[u8]) -> Option<ErrorCode> {
    let payload = tessera_shared::cose::Sign1::decode(signed)
        .expect("COSE")
        .verify(anchor)
        .expect("signed by the hub");
    Response::decode(payload)
        .expect("response")
        .outcome
        .err()
        .map(|e| e.code)
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} within a minute"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_forged_requests_alerts_quarantines_and_shows_in_metrics_and_at_a_webhook() {
    let broker = broker();
    let (url, mut hooks) = receiver().await;
    let mut hub = hub().await;
    Arc::get_mut(&mut hub).expect("unshared").config.webhooks = vec![WebhookConfig {
        name: "ops".into(),
        url,
        secret: SECRET.into(),
        events: vec![NotificationKind::Alert],
        max_attempts: 3,
        backoff_initial_ms: 10,
        backoff_max_ms: 100,
        timeout_ms: 10_000,
        queue: 64,
    }];
    let anchor = hub.active_public_key().await;
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(hub.clone(), config, async {
        let _ = stopped.await;
    }));
    let web = reqwest::Client::new();
    let get = |path: &str| {
        let request = web.get(format!("http://{http}{path}"));
        async move {
            let r = request.send().await.ok()?;
            let ok = r.status().is_success();
            Some((ok, r.text().await.ok()?))
        }
    };
    // Ready: connected, subscribed, heartbeats out.
    within("the hub is ready", async {
        while !matches!(get("/readyz").await, Some((true, _))) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let (_watcher, mut alerts) = mqtt_client(broker.port, "watcher", &[topic::ALERTS]).await;
    let resp = topic::response(APP).expect("id").to_string();
    let (app, mut answers) = mqtt_client(broker.port, APP, &[&resp]).await;
    let req = topic::request(APP).expect("id").to_string();
    // Five requests on the app's topic, signed with a key that is not the app's.
    for n in 1..=5 {
        app.publish(&req, QoS::AtLeastOnce, false, request(n, 9))
            .await
            .expect("publish");
        let (_, answer) = within("an answer", answers.recv()).await.expect("answer");
        assert_eq!(refusal(&anchor, &answer), Some(ErrorCode::BadSignature));
    }
    // The app itself, properly signed, is now refused without being read.
    app.publish(&req, QoS::AtLeastOnce, false, request(6, 2))
        .await
        .expect("publish");
    let (_, answer) = within("an answer", answers.recv()).await.expect("answer");
    assert_eq!(refusal(&anchor, &answer), Some(ErrorCode::Quarantined));

    // On the alerts topic.
    let (_, alert) = within("the alert", alerts.recv()).await.expect("alert");
    let alert: serde_json::Value = serde_json::from_slice(&alert).expect("JSON");
    assert_eq!(alert["kind"], "refusals");
    assert_eq!(alert["client"], APP);
    assert!(alert["quarantined_until_ms"].is_u64(), "{alert}");

    // At the webhook, signed.
    let (headers, body) = within("the webhook", hooks.recv()).await.expect("hook");
    assert_eq!(
        headers
            .get(webhooks::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(webhooks::signature(SECRET.as_bytes(), &body).as_str())
    );
    let hook: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        (&hook["type"], &hook["kind"]),
        (&"alert".into(), &"refusals".into())
    );
    assert_eq!(hook["client"], APP);

    // In /metrics.
    let (_, metrics) = get("/metrics").await.expect("metrics");
    for line in [
        "tessera_hub_alerts_total{kind=\"refusals\"} 1",
        "tessera_hub_quarantined_clients 1",
        "tessera_hub_quarantines_total 1",
        "tessera_hub_admission_refusals_total{code=\"quarantined\",result=\"answered\"} 1",
        "tessera_hub_requests_total{operation=\"device_token\",outcome=\"bad_signature\"} 5",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }

    stop.send(()).expect("serving");
    within("the hub stops", serving)
        .await
        .expect("task")
        .expect("a clean stop");
}
