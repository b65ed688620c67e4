//! The client (`tessera_hub::client`, behind the operator and app commands): it keeps
//! working across a broker restart (the broker starts every session clean, so it subscribes
//! again when it reconnects), and a wrong trust anchor is named as such, not as a silent hub.

use std::time::Duration;

use anyhow::{Result, bail};
use tessera_hub::client::{Client, ClientError};
use tessera_shared::crypto::Signer;
use tessera_tests::hub::{READINESS_PROBE, TestHub, answers_readiness_probe, generate_signer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answers_again_after_the_broker_restarts() -> Result<()> {
    let mut hub = TestHub::builder().start().await?;
    let key = hub.dir().add_app("rc-app", "controller")?;
    let mut client = hub.client("rc-app", &key).await?;
    let first = client
        .request(READINESS_PROBE, Duration::from_secs(10))
        .await;
    assert!(answers_readiness_probe(&first), "{first:?}");

    hub.broker_mut().restart()?;
    // Bounded: each try waits a few seconds for its answer; a request sent while the
    // client was still away may go unanswered, a later one must not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let answer = client
            .request(READINESS_PROBE, Duration::from_secs(3))
            .await;
        if answers_readiness_probe(&answer) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no answer within 40 s of the broker restart: {answer:?}\n{}",
                hub.log()
            );
        }
    }
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_trust_anchor_is_named_when_the_hub_answers() -> Result<()> {
    let hub = TestHub::builder().start().await?;
    let key = hub.dir().add_app("ta-app", "controller")?;
    let other_hub = generate_signer().public_key();
    let mut client = Client::connect(
        &hub.mqtt("ta-app"),
        "ta-app",
        key.signer()?,
        other_hub,
        Duration::from_secs(10),
    )
    .await?;
    let answer = client
        .request(READINESS_PROBE, Duration::from_secs(3))
        .await;
    client.close().await;
    match answer {
        Err(e @ ClientError::Untrusted { untrusted: 1, .. }) => {
            assert!(e.to_string().contains("trust anchor"), "{e}");
            Ok(())
        }
        other => bail!("the hub's answer, signed by a key not trusted: {other:?}"),
    }
}
