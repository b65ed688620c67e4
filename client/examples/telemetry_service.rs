//! An HTTP service that devices call with their device token: `POST /telemetry` takes a
//! reading from a device whose presentation carries the `telemetry:write` scope, and
//! answers who sent it; `GET /healthz` says whether the service's revocation knowledge is
//! current. It follows the hub's key set and its revocation stream over MQTT
//! (`tessera_client::verifier`) and checks every call with the axum middleware
//! (`tessera_client::http`): a revoked device is refused from the next heartbeat on.
//!
//! ```text
//! cargo run -p tessera-client --features axum --example telemetry_service -- \
//!     --broker 127.0.0.1:1883 --trust-anchor <COSE_Key hex> \
//!     [--service tessera] [--listen 127.0.0.1:8080]
//! ```
//!
//! `--trust-anchor` is the `COSE_Key hex` that `tessera-hub init` (and `keys list`) print;
//! `--service` the device tokens' audience (the policy's `device_audience`). Prints
//! `listening on ADDR` once it serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Extension, Router};
use tessera_client::MqttConfig;
use tessera_client::http::{Gate, require};
use tessera_client::verifier::{ServiceVerifier, Verified, VerifierConfig};
use tessera_shared::crypto::PublicKey;

/// The reading a device posts, answered with who sent it.
async fn telemetry(Extension(caller): Extension<Verified>, body: String) -> String {
    serde_json::json!({
        "stored": body.len(),
        "device": caller.device,
    })
    .to_string()
}

async fn healthz(verifier: Arc<ServiceVerifier>) -> (axum::http::StatusCode, String) {
    let status = verifier.status();
    let code = if status.fresh {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{status:?}\n"))
}

/// `--name value` pairs.
fn arg(args: &[String], name: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: telemetry_service --broker HOST:PORT --trust-anchor COSE_KEY_HEX \
                 [--service NAME] [--listen ADDR]";
    let broker = arg(&args, "--broker").ok_or(usage)?;
    let (host, port) = broker.rsplit_once(':').ok_or("--broker is HOST:PORT")?;
    let anchor = hex::decode(arg(&args, "--trust-anchor").ok_or(usage)?)?;
    let anchor = PublicKey::from_cose_key(&anchor).map_err(|e| format!("--trust-anchor: {e}"))?;
    let service = arg(&args, "--service").unwrap_or_else(|| "tessera".to_owned());
    let listen: SocketAddr = arg(&args, "--listen")
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned())
        .parse()?;

    // The service only subscribes: any client id its broker login allows.
    let mqtt = MqttConfig::plain(host, port.parse()?, &format!("svc-{service}"));
    let verifier = Arc::new(
        ServiceVerifier::start(
            &mqtt,
            VerifierConfig::new(&service, anchor),
            Duration::from_secs(10),
        )
        .await?,
    );
    let health = Arc::clone(&verifier);
    let app = Router::new()
        .route("/telemetry", post(telemetry))
        .route_layer(axum::middleware::from_fn_with_state(
            Gate::new(Arc::clone(&verifier), "telemetry:write"),
            require,
        ))
        .route("/healthz", get(move || healthz(Arc::clone(&health))));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
