//! The hub's monitoring HTTP listener (`[http] listen`, docs/METRICS.md) on a real hub:
//! `/healthz`, `/readyz` following the broker connection, and `/metrics` counting a
//! client's requests (issue 11, item 1).

use std::time::Duration;

use anyhow::Result;
use tessera_hub::client::Answer;
use tessera_shared::message::RequestBody;
use tessera_tests::http::{http_get, metric};
use tessera_tests::hub::TestHub;
use tessera_tests::{free_port, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// The `[http]` section of the default config, commented out.
const HTTP_OFF: &str = "# [http]\n# listen = \"127.0.0.1:9464\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_request_metrics_are_served_and_readiness_follows_the_broker()
-> Result<()> {
    let port = free_port()?;
    let mut hub = TestHub::builder()
        .config(HTTP_OFF, &format!("[http]\nlisten = \"127.0.0.1:{port}\""))
        .start()
        .await?;

    assert_eq!(http_get(port, "/healthz").await?, (200, "ok\n".to_owned()));
    wait_until("the hub to be ready", WAIT, async || {
        Ok((http_get(port, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    assert_eq!(http_get(port, "/nothing-here").await?.0, 404);

    // A device enrolls and gets its device token: one request of each, both ok.
    let id = "metrics-dev-1";
    let key = hub.dir().add_device(id, "sensor", &["building-a"])?;
    let mut device = hub.raw(id, key.signer()?).await?;
    let enrolled = device
        .ask(RequestBody::Enroll {
            key: key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled));
    device.ask(RequestBody::DeviceToken).await?.expect_token()?;

    let (status, text) = http_get(port, "/metrics").await?;
    assert_eq!(status, 200);
    let series = [
        (
            "tessera_hub_requests_total{operation=\"enroll\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "tessera_hub_requests_total{operation=\"device_token\",outcome=\"ok\"}",
            1.0,
        ),
        ("tessera_hub_tokens_issued_total{kind=\"device\"}", 1.0),
        ("tessera_hub_issuance_duration_seconds_count", 1.0),
        ("tessera_hub_broker_connected", 1.0),
        ("tessera_hub_broker_reconnects_total", 0.0),
        ("tessera_hub_refresh_grant_reuse_total", 0.0),
    ];
    for (name, value) in series {
        assert_eq!(metric(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(
        metric(&text, "tessera_hub_last_heartbeat_timestamp_seconds").is_some_and(|t| t > 0.0),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    // Without the broker the hub is alive but not ready, and says why.
    hub.broker_mut().stop()?;
    let body = wait_until("/readyz to fail", WAIT, async || {
        let (status, body) = http_get(port, "/readyz").await?;
        Ok((status == 503).then_some(body))
    })
    .await?;
    assert!(body.contains("broker: not connected"), "{body}");
    assert_eq!(http_get(port, "/healthz").await?.0, 200);

    hub.broker_mut().restart()?;
    wait_until("/readyz to pass again", WAIT, async || {
        Ok((http_get(port, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    let (_, text) = http_get(port, "/metrics").await?;
    assert_eq!(
        metric(&text, "tessera_hub_broker_reconnects_total"),
        Some(1.0),
        "{text}"
    );
    Ok(())
}
