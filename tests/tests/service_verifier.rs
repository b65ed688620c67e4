//! Token checking for services, end to end: the example HTTP service of the client library
//! (`client/examples/telemetry_service.rs`: the library's `ServiceVerifier` following the
//! hub's key set and the `service/tessera` revocation stream over MQTT, behind its axum
//! middleware) takes a device's presentation of its device token, refuses a call without
//! one, a replayed one, and, once an operator revokes the device, every later one.
//!
//! Needs Mosquitto; `tessera-hub` and the example are built if needed.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::Answer;
use tessera_shared::message::{RequestBody, RevokeTarget};
use tessera_tests::hub::{TestHub, unix_now};
use tessera_tests::{ChildGuard, cargo_example, wait_until_blocking};

const WAIT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request to `addr` (the connection closed after it): the status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(WAIT))?;
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let body = "21.5";
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_takes_a_devices_presentation_and_refuses_it_once_revoked() -> Result<()>
{
    // Heartbeats every second: the service's knowledge is current from the first one on.
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 1")
        .start()
        .await?;
    let device_id = "sv-sensor-1";
    let (mut device, key) = hub
        .enrolled_device(device_id, "sensor", &["building-a"])
        .await?;
    let ops_key = hub.dir().add_operator("sv-ops", "ops")?;
    let Answer::Token { token, .. } = device.request(RequestBody::DeviceToken, WAIT).await? else {
        bail!("no device token");
    };
    let signer = key.signer()?;
    let present = || -> Result<String> {
        let presentation = tessera_client::present(&signer, &token, "tessera", unix_now())?;
        Ok(tessera_client::http::authorization(&presentation))
    };

    let example = cargo_example("tessera-client", "telemetry_service", "axum")?;
    let mut service = ChildGuard::spawn(
        Command::new(example)
            .args(["--broker", &format!("127.0.0.1:{}", hub.broker().port())])
            .args(["--trust-anchor", hub.dir().trust_anchor_cose_hex()])
            .args(["--service", "tessera", "--listen", "127.0.0.1:0"]),
    )?;
    let addr: SocketAddr =
        wait_until_blocking("the service to listen", Duration::from_secs(30), || {
            if let Some(status) = service.try_wait()? {
                bail!("the service exited ({status}):\n{}", service.output());
            }
            Ok(service
                .output()
                .lines()
                .find_map(|l| l.strip_prefix("listening on "))
                .and_then(|a| a.trim().parse().ok()))
        })?;
    // Current once it holds the stream's snapshot and a heartbeat.
    wait_until_blocking(
        "the service's revocation knowledge to be current",
        Duration::from_secs(30),
        || Ok((http(addr, "GET", "/healthz", None)?.0 == 200).then_some(())),
    )?;

    let (status, body) = http(addr, "POST", "/telemetry", None)?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_request"), "{body}");
    let (status, body) = http(addr, "POST", "/telemetry", Some("Tessera not-base64!"))?;
    assert_eq!(status, 401, "{body}");

    let authorization = present()?;
    let (status, body) = http(addr, "POST", "/telemetry", Some(&authorization))?;
    assert_eq!(status, 200, "{body}\n{}", service.output());
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(answer["device"], device_id, "{body}");
    let (status, body) = http(addr, "POST", "/telemetry", Some(&authorization))?;
    assert_eq!(status, 401, "a replayed presentation: {body}");
    assert!(body.contains("replayed"), "{body}");

    let mut operator = hub.client("sv-ops", &ops_key).await?;
    let revoked = operator.revoke(RevokeTarget::Device(device_id)).await?;
    assert_eq!(revoked.revoked, 1, "{revoked:?}");
    operator.close().await;
    // Each try is a fresh presentation; the revocation reaches the service on its stream.
    let refused = wait_until_blocking(
        "the service to refuse the revoked device",
        Duration::from_secs(30),
        || {
            let (status, body) = http(addr, "POST", "/telemetry", Some(&present()?))?;
            Ok((status != 200).then_some((status, body)))
        },
    )?;
    assert_eq!(refused.0, 401, "{}", refused.1);
    assert!(refused.1.contains("\"revoked\""), "{}", refused.1);

    device.close().await;
    service.terminate(Duration::from_secs(5))?;
    Ok(())
}
