//! No broker user takes over another client's MQTT session, with Mosquitto set up as
//! `tessera-hub broker-acl` and `broker-acl --mosquitto-conf` say: a password file, the
//! generated ACL (`%u` patterns) and `use_username_as_clientid true` on the listener.
//!
//! The attack (issue 9, item 8): `mosquitto_sub -i dev-b -u dev-a -P <dev-a's password>
//! -t tessera/v1/client/dev-b/resp`, a client logging in as itself but presenting another's
//! client id, to disconnect it and read its responses (tokens, refresh grants).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tessera_shared::message::ErrorCode;
use tessera_tests::hub::{HUB_USER, HubDir, READINESS_PROBE, RawClient};
use tessera_tests::{Broker, BrokerBuilder, ChildGuard, MqttProbe, QoS};

const HUB_PASSWORD: &str = "takeover-hub-password";
const DEV_A_PASSWORD: &str = "dev-a-password";
const DEV_B_PASSWORD: &str = "dev-b-password";
const RESP_B: &str = "tessera/v1/client/dev-b/resp";
const CONTROL_B: &str = "tessera/v1/client/dev-b/control";
/// How long a message the attacker must not see is waited for.
const QUIET: Duration = Duration::from_millis(700);
const WAIT: Duration = Duration::from_secs(5);

/// The listener lines `broker-acl --mosquitto-conf` prints: every uncommented line after
/// its `listener` line.
fn printed_listener_lines(dir: &HubDir) -> Result<Vec<String>> {
    let conf = dir.run(&["broker-acl", "--mosquitto-conf"])?;
    let settings: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    ensure!(
        settings.contains(&"allow_anonymous false"),
        "--mosquitto-conf refuses anonymous clients:\n{conf}"
    );
    let listener = settings
        .iter()
        .position(|l| l.starts_with("listener "))
        .with_context(|| format!("--mosquitto-conf names a listener:\n{conf}"))?;
    Ok(settings[listener + 1..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect())
}

/// A broker with the generated ACL and passwords for the hub, dev-a and dev-b.
fn broker(dir: &HubDir, listener_lines: &[String]) -> Result<Broker> {
    let acl = dir.run(&["broker-acl", "--hub-user", HUB_USER])?;
    let mut builder: BrokerBuilder = Broker::builder()
        .acl(acl)
        .allow_anonymous(false)
        .user(HUB_USER, HUB_PASSWORD)
        .user("dev-a", DEV_A_PASSWORD)
        .user("dev-b", DEV_B_PASSWORD);
    for line in listener_lines {
        builder = builder.listener_option(line.clone());
    }
    builder.start()
}

async fn login(broker: &Broker, client_id: &str, user: &str, password: &str) -> Result<MqttProbe> {
    MqttProbe::connect(broker.probe_options(client_id).credentials(user, password)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_presenting_another_clients_id_neither_disconnects_it_nor_reads_its_responses()
-> Result<()> {
    let dir = HubDir::init("hub-takeover")?;
    let key_b = dir.add_device("dev-b", "sensor", &["building-a"])?;
    dir.add_device("dev-a", "sensor", &["building-a"])?;
    let lines = printed_listener_lines(&dir)?;
    assert!(
        lines.iter().any(|l| l == "use_username_as_clientid true"),
        "the printed listener lines bind client ids to user names: {lines:?}"
    );
    let broker = broker(&dir, &lines)?;

    dir.replace_in_config("port = 1883", &format!("port = {}", broker.port()))?;
    dir.replace_in_config(
        "# username = \"tessera-hub\"",
        &format!("username = \"{HUB_USER}\""),
    )?;
    dir.replace_in_config(
        "# password = \"...\"",
        &format!("password = \"{HUB_PASSWORD}\""),
    )?;
    let mut serve = dir.command()?;
    serve.arg("serve").env("RUST_LOG", "info");
    let _hub = ChildGuard::spawn_logged(&mut serve, &dir.log_path())?;

    // The real dev-b, with its own password, waits for its responses.
    let probe_b = login(&broker, "dev-b", "dev-b", DEV_B_PASSWORD).await?;
    let mut dev_b =
        RawClient::over_probe(probe_b, "dev-b", key_b.signer()?, dir.trust_anchor()).await?;
    dev_b
        .probe()
        .subscribe_granted(CONTROL_B, QoS::AtLeastOnce)
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let request = dev_b.request(READINESS_PROBE)?;
        match tokio::time::timeout(Duration::from_millis(500), dev_b.send(&request)).await {
            Ok(Ok(_)) => break,
            // The hub has not subscribed yet: the request was lost.
            _ if std::time::Instant::now() < deadline => {}
            other => anyhow::bail!(
                "the hub did not answer dev-b: {other:?}; its log:\n{}",
                std::fs::read_to_string(dir.log_path()).unwrap_or_default()
            ),
        }
    }

    // The attack: dev-a's credentials, dev-b's client id.
    let mut attacker = login(&broker, "dev-b", "dev-a", DEV_A_PASSWORD).await?;
    attacker.subscribe(RESP_B, QoS::AtLeastOnce).await?;
    attacker.subscribe(CONTROL_B, QoS::AtLeastOnce).await?;

    // dev-b keeps its one connection, and still gets its answers.
    let request = dev_b.request(READINESS_PROBE)?;
    let answer = dev_b.send(&request).await?;
    assert_eq!(answer.client, "dev-b");
    // A page, or `denied` for a stream with no change yet: either way, served.
    assert!(
        matches!(answer.error_code(), None | Some(ErrorCode::Denied)),
        "dev-b is served: {answer:?}"
    );
    assert!(dev_b.probe().is_connected(), "dev-b was disconnected");
    assert_eq!(dev_b.probe().connect_count(), 1, "dev-b had to reconnect");
    // The attacker read none of it.
    attacker.expect_no_message(RESP_B, QUIET).await?;
    attacker
        .expect_no_message(CONTROL_B, Duration::ZERO)
        .await?;
    assert!(attacker.is_connected() && attacker.connect_count() == 1);
    let log = broker.log();
    assert!(
        !log.contains("already connected, closing old connection"),
        "the broker closed a session for a duplicate client id:\n{log}"
    );
    // The broker knows the attacker by its own name only.
    assert!(
        log.contains("as dev-a (") && log.contains("u'dev-a'"),
        "the attacker's client id became its user name:\n{log}"
    );
    Ok(())
}

/// Why `use_username_as_clientid` is required, not optional: without it the same login
/// disconnects dev-b, whatever the ACL says.
#[tokio::test]
async fn without_use_username_as_clientid_a_borrowed_client_id_disconnects_its_owner() -> Result<()>
{
    let dir = HubDir::init("hub-takeover-control")?;
    let broker = broker(&dir, &[])?;
    let dev_b = login(&broker, "dev-b", "dev-b", DEV_B_PASSWORD).await?;
    let _attacker = login(&broker, "dev-b", "dev-a", DEV_A_PASSWORD).await?;
    tessera_tests::wait_until("the broker to close dev-b's session", WAIT, async || {
        Ok(broker
            .log()
            .contains("Client dev-b already connected, closing old connection")
            .then_some(()))
    })
    .await?;
    assert!(dev_b.connect_count() >= 1);
    Ok(())
}
