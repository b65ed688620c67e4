//! The hub's HTTP listener, off the MQTT path: `/metrics` (the Prometheus text format,
//! [`crate::metrics`]), `/healthz` (the process answers) and `/readyz` (broker connected,
//! store writable, signing key usable, heartbeats flowing), and when configured the
//! operator dashboard under `/dashboard` ([`crate::dashboard`], behind a credential).
//! Read-only; nothing here changes the hub's state. docs/METRICS.md documents every
//! endpoint and metric, docs/OPERATING.md the dashboard.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::dashboard::Dashboard;
use crate::metrics::CONTENT_TYPE;
use crate::pipeline::Hub;
use crate::store::Store;

const TEXT: &str = "text/plain; charset=utf-8";

/// The routes, over `hub`, with the dashboard's if there is one.
pub fn router<S: Store>(hub: Arc<Hub<S>>, dashboard: Option<Arc<Dashboard<S>>>) -> Router {
    let routes = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .with_state(hub);
    match dashboard {
        Some(d) => routes.merge(crate::dashboard::router(d)),
        None => routes,
    }
}

/// Serves the routes on `listener` until `stop` completes; an error only if the listener
/// fails (the serving loop then stops the hub).
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub<S>>,
    dashboard: Option<Arc<Dashboard<S>>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(hub, dashboard))
        .with_graceful_shutdown(stop)
        .await
}

async fn metrics<S: Store>(State(hub): State<Arc<Hub<S>>>) -> impl IntoResponse {
    let body = hub.metrics.render(hub.clock.now(), hub.store.write_stats());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

async fn healthz() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, TEXT)], "ok\n")
}

async fn readyz<S: Store>(State(hub): State<Arc<Hub<S>>>) -> impl IntoResponse {
    let now = hub.clock.now();
    let not_ready = hub
        .metrics
        .readiness(now, key_usable(&hub, now).await, hub.config.heartbeat_s);
    if not_ready.is_empty() {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT)],
            "ready\n".to_owned(),
        )
    } else {
        let mut body = String::from("not ready:\n");
        for reason in not_ready {
            body.push_str(&reason);
            body.push('\n');
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            body,
        )
    }
}

/// Whether the active signing key signs: what every answer needs.
async fn key_usable<S: Store>(hub: &Hub<S>, now: u64) -> bool {
    const PROBE: &[u8] = b"readyz";
    let mut out = [0u8; PROBE.len() + tessera_shared::cose::OVERHEAD];
    let keys = hub.keys.read().await;
    tessera_shared::cose::sign(keys.active(now), PROBE, &mut out).is_ok()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::clock::FakeClock;
    use crate::server::tests::{T0, hub};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn readiness_lists_what_is_missing_until_everything_is_there_and_shutdown_stops_it() {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, hub.clone(), None, async {
            let _ = stop_rx.await;
        }));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(
            get(addr, "/readyz").await,
            (
                503,
                "not ready:\nbroker: not connected\nheartbeat: none published yet\n".to_owned()
            )
        );
        hub.metrics.broker_up();
        hub.metrics.heartbeat(T0);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
        // Two heartbeat intervals (30 s) later and a second, heartbeats count as stopped.
        clock.advance_ms(61_000);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(
            body.contains("heartbeat: last published 61 s ago"),
            "{body}"
        );

        hub.metrics.request("device_token", "ok");
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            text.contains(
                "tessera_hub_requests_total{operation=\"device_token\",outcome=\"ok\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("tessera_hub_last_heartbeat_age_seconds 61\n"),
            "{text}"
        );

        stop_tx.send(()).expect("serving");
        // Returns once stopped: the serving loop's shutdown waits for it.
        served.await.expect("joined").expect("stopped cleanly");
    }
}
