//! A lost broker connection is logged once, by the hub (`disconnected from broker`), not a
//! second time by the MQTT layer underneath (issue 9, item 7).

use std::time::Duration;

use anyhow::Result;
use tessera_tests::hub::TestHub;
use tessera_tests::wait_until;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_connection_is_logged_by_the_hub_alone() -> Result<()> {
    let mut hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    hub.broker_mut().stop()?;
    wait_until("the hub to see the broker gone", WAIT, async || {
        Ok(hub.log().contains("disconnected from broker").then_some(()))
    })
    .await?;
    hub.broker_mut().restart()?;
    wait_until("the hub to reconnect", WAIT, async || {
        // Once at the start, once again now.
        Ok((hub.log().matches("connected to broker").count() >= 2).then_some(()))
    })
    .await?;
    let log = hub.log();
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnected from broker") || l.contains("connection lost"))
        .collect();
    assert!(
        lost.iter().all(|l| l.contains("disconnected from broker")),
        "each failure is logged by the hub alone: {lost:#?}"
    );
    Ok(())
}
