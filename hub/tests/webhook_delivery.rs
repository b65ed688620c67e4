//! Webhook delivery against a local receiver (an axum server on 127.0.0.1:0): the signature
//! header, retries with backoff until a 2xx answer, and dead letters after the last attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use tessera_hub::metrics::Metrics;
use tessera_hub::webhooks::{self, NotificationKind, WebhookConfig, Webhooks};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::watch;

const SECRET: &str = "0123456789abcdef-secret";

/// A receiver that answers 503 to its first `fail` requests, then 200; every request it
/// gets is handed over with the attempt's number (1 for the first).
async fn receiver(fail: usize) -> (String, UnboundedReceiver<(usize, HeaderMap, Bytes)>) {
    let (tx, rx) = unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tx.send((n, headers, body));
                if n <= fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
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

fn config(url: &str, max_attempts: u32) -> WebhookConfig {
    WebhookConfig {
        name: "pager".into(),
        url: url.into(),
        secret: SECRET.into(),
        events: vec![NotificationKind::Alert],
        max_attempts,
        backoff_initial_ms: 2,
        backoff_max_ms: 8,
        timeout_ms: 10_000,
        queue: 16,
    }
}

/// Waits until `done` holds, checking every few milliseconds (a minute at most).
async fn eventually(done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the condition holds within a minute");
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_notification_is_retried_with_the_same_signed_body_until_the_receiver_takes_it() {
    let (url, mut got) = receiver(3).await;
    let metrics = Arc::new(Metrics::new());
    let (_stop_tx, stop) = watch::channel(false);
    let (hooks, tasks) = Webhooks::start(&[config(&url, 5)], &metrics, &stop).expect("client");
    for t in tasks {
        tokio::spawn(t);
    }
    hooks.notify(
        NotificationKind::Alert,
        serde_json::json!({"kind": "refusals", "client": "app-7"}),
    );
    let mut bodies = Vec::new();
    for attempt in 1..=4 {
        let (n, headers, body) = got.recv().await.expect("an attempt");
        assert_eq!(n, attempt);
        // The signature is the HMAC-SHA256 of the exact body, in hex.
        assert_eq!(
            header(&headers, webhooks::SIGNATURE_HEADER),
            webhooks::signature(SECRET.as_bytes(), &body)
        );
        assert!(
            header(&headers, webhooks::SIGNATURE_HEADER).starts_with("sha256="),
            "{headers:?}"
        );
        assert_eq!(header(&headers, webhooks::EVENT_HEADER), "alert");
        bodies.push(body);
    }
    // Every attempt carries the same notification: a receiver can drop duplicates by id.
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    let json: serde_json::Value = serde_json::from_slice(&bodies[0]).expect("JSON");
    assert_eq!(json["type"], "alert");
    assert_eq!(json["client"], "app-7");
    assert_eq!(json["id"].as_str().map(str::len), Some(32));
    let c = metrics.webhook("pager");
    eventually(|| c.delivered.get() == 1).await;
    assert_eq!(c.failed_attempts.get(), 3);
    assert_eq!(c.dead_letters.get(), 0);
    // A forged signature does not verify against the body.
    assert_ne!(
        webhooks::signature(b"another secret of 16+ bytes", &bodies[0]),
        webhooks::signature(SECRET.as_bytes(), &bodies[0])
    );
}

#[tokio::test]
async fn a_notification_the_receiver_never_takes_is_a_dead_letter_after_the_last_attempt() {
    let (url, mut got) = receiver(usize::MAX).await;
    let metrics = Arc::new(Metrics::new());
    let (_stop_tx, stop) = watch::channel(false);
    let (hooks, tasks) = Webhooks::start(&[config(&url, 3)], &metrics, &stop).expect("client");
    for t in tasks {
        tokio::spawn(t);
    }
    hooks.notify(NotificationKind::Alert, serde_json::json!({"n": 1}));
    hooks.notify(NotificationKind::Alert, serde_json::json!({"n": 2}));
    let c = metrics.webhook("pager");
    eventually(|| c.dead_letters.get() == 2).await;
    assert_eq!(c.failed_attempts.get(), 6, "three attempts each");
    assert_eq!(c.delivered.get(), 0);
    // In order: all attempts at the first, then the second.
    let mut order = Vec::new();
    while let Ok((_, _, body)) = got.try_recv() {
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        order.push(json["n"].as_u64().expect("n"));
    }
    assert_eq!(order, [1, 1, 1, 2, 2, 2]);
    let text = metrics.render(0, Default::default());
    assert!(
        text.contains("tessera_hub_webhook_dead_letters_total{webhook=\"pager\"} 2\n"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_then_given_up_and_a_stop_ends_the_retries() {
    // A port nobody listens on: every attempt fails to connect.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop) = watch::channel(false);
    let mut c = config(&format!("http://127.0.0.1:{port}/hook"), 100);
    // Retries that would take far longer than the test.
    c.backoff_initial_ms = 3_600_000;
    c.backoff_max_ms = 3_600_000;
    let (hooks, tasks) = Webhooks::start(&[c], &metrics, &stop).expect("client");
    let tasks: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    hooks.notify(NotificationKind::Alert, serde_json::json!({}));
    let counters = metrics.webhook("pager");
    eventually(|| counters.failed_attempts.get() == 1).await;
    // A shutdown: no more waiting to retry. The notification waiting for its retry gets
    // one last attempt at once, then is a dead letter; the task ends.
    stop_tx.send(true).expect("stop");
    drop(hooks);
    for t in tasks {
        t.await.expect("delivery task ends");
    }
    assert_eq!(counters.dead_letters.get(), 1);
    assert_eq!(counters.failed_attempts.get(), 2);
}
