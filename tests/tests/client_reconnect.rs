//! The client (`tessera_hub::client`, behind the operator and app commands and the SDK
//! tests) keeps working across a broker restart: the broker starts every session clean, so
//! the client subscribes again when it reconnects, or it would never see another answer.

use std::time::Duration;

use anyhow::{Result, bail};
use tessera_tests::hub::{READINESS_PROBE, TestHub, answers_readiness_probe};

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
