//! The harness itself: a per-test Mosquitto with ACL, passwords and TLS, the MQTT probe,
//! broker restarts and child-process guards.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tessera_tests::pki::rustls_client_config;
use tessera_tests::{
    Broker, CertKeyFiles, ChildGuard, MqttProbe, ProbeOptions, PubAckReason, QoS, Signal,
    SubscribeReasonCode, TestPki,
};

const WAIT: Duration = Duration::from_secs(3);
/// How long a test waits to conclude that a message is NOT delivered.
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_plain_broker_on_a_free_port_round_trips_a_qos1_message() -> Result<()> {
    let broker = Broker::start()?;
    assert_ne!(broker.port(), 1883, "must never be the shared broker");
    assert_eq!(broker.host(), "127.0.0.1");
    assert!(broker.config_path().exists());

    let mut watcher = broker.probe("watcher").await?;
    watcher
        .subscribe_granted("tessera/v1/test/#", QoS::AtLeastOnce)
        .await?;
    let sender = broker.probe("sender").await?;
    let reason = sender
        .publish_acked("tessera/v1/test/ping", QoS::AtLeastOnce, false, "ping")
        .await?;
    assert_eq!(reason, PubAckReason::Success);

    let message = watcher.expect_message("tessera/v1/test/+", WAIT).await?;
    assert_eq!(message.topic, "tessera/v1/test/ping");
    assert_eq!(message.payload, b"ping");
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert!(broker.log().contains("watcher"), "the log names clients");
    Ok(())
}

/// Each client may write only its own request topic and read only its own response topic;
/// the hub (a password user) may do both for everyone.
const CLIENT_ACL: &str = "\
pattern write tessera/v1/client/%c/req
pattern read tessera/v1/client/%c/resp

user hub
topic readwrite tessera/v1/client/#
";

#[tokio::test]
async fn the_acl_keeps_each_client_to_its_own_topics() -> Result<()> {
    let broker = Broker::builder()
        .acl(CLIENT_ACL)
        .user("hub", "hub-secret")
        .start()?;
    let mut hub =
        MqttProbe::connect(broker.probe_options("hub").credentials("hub", "hub-secret")).await?;
    let mut alice = broker.probe("alice").await?;
    let mut bob = broker.probe("bob").await?;

    // Mosquitto 2.0 grants a subscription the ACL forbids and then filters at delivery.
    let snooping = alice
        .subscribe("tessera/v1/client/bob/resp", QoS::AtLeastOnce)
        .await?;
    alice
        .subscribe_granted("tessera/v1/client/alice/resp", QoS::AtLeastOnce)
        .await?;
    bob.subscribe_granted("tessera/v1/client/bob/resp", QoS::AtLeastOnce)
        .await?;

    // The hub answers bob: bob gets it, alice does not, whatever her SUBACK said.
    hub.publish_acked(
        "tessera/v1/client/bob/resp",
        QoS::AtLeastOnce,
        false,
        "for bob",
    )
    .await?;
    let message = bob
        .expect_message("tessera/v1/client/bob/resp", WAIT)
        .await?;
    assert_eq!(message.payload, b"for bob");
    alice
        .expect_no_message("tessera/v1/client/bob/resp", QUIET)
        .await?;
    assert!(
        matches!(
            snooping,
            SubscribeReasonCode::Success(_) | SubscribeReasonCode::NotAuthorized
        ),
        "{snooping:?}"
    );

    // Alice cannot forge a response to bob; MQTT v5 tells her so.
    let forged = alice
        .publish_acked(
            "tessera/v1/client/bob/resp",
            QoS::AtLeastOnce,
            false,
            "forged",
        )
        .await?;
    assert_eq!(forged, PubAckReason::NotAuthorized);
    bob.expect_no_message("tessera/v1/client/bob/resp", QUIET)
        .await?;

    // Alice may send her own request, not one in bob's name.
    hub.subscribe_granted("tessera/v1/client/+/req", QoS::AtLeastOnce)
        .await?;
    alice
        .publish_acked(
            "tessera/v1/client/bob/req",
            QoS::AtLeastOnce,
            false,
            "as bob",
        )
        .await?;
    alice
        .publish_acked(
            "tessera/v1/client/alice/req",
            QoS::AtLeastOnce,
            false,
            "as alice",
        )
        .await?;
    let request = hub.expect_message("tessera/v1/client/+/req", WAIT).await?;
    assert_eq!(request.topic, "tessera/v1/client/alice/req");
    assert_eq!(request.payload, b"as alice");
    hub.expect_no_message("tessera/v1/client/bob/req", QUIET)
        .await?;

    // A wrong password is refused.
    let impostor =
        MqttProbe::connect(broker.probe_options("hub2").credentials("hub", "wrong")).await;
    assert!(impostor.is_err(), "wrong password accepted");
    Ok(())
}

#[tokio::test]
async fn tls_clients_must_trust_the_broker_ca() -> Result<()> {
    let pki = TestPki::new()?;
    let broker = Broker::builder().tls(&pki).start()?;
    assert!(broker.url().starts_with("mqtts://127.0.0.1:"));

    let mut inside = MqttProbe::connect(
        broker
            .probe_options("tls-ok")
            .tls(pki.client_config_without_cert()?),
    )
    .await?;
    inside
        .subscribe_granted("tessera/v1/tls", QoS::AtLeastOnce)
        .await?;
    inside
        .publish("tessera/v1/tls", QoS::AtLeastOnce, false, "over tls")
        .await?;
    assert_eq!(
        inside.expect_message("tessera/v1/tls", WAIT).await?.payload,
        b"over tls"
    );

    let stranger = TestPki::new()?;
    let refused = MqttProbe::connect(
        broker
            .probe_options("tls-stranger")
            .tls(stranger.client_config_without_cert()?),
    )
    .await;
    let error = format!("{:#}", refused.expect_err("a foreign CA must not verify"));
    assert!(error.contains("certificate"), "{error}");

    let plain = MqttProbe::connect(broker.probe_options("plain").without_tls()).await;
    assert!(plain.is_err(), "plain TCP to a TLS listener");
    Ok(())
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() -> Result<()> {
    let pki = TestPki::new()?;
    let broker = Broker::builder()
        .tls(&pki)
        .require_certificate(true)
        .start()?;

    // The broker's own probe options present the PKI's client certificate.
    let mut with_cert = broker.probe("with-cert").await?;
    with_cert
        .subscribe_granted("tessera/v1/mtls", QoS::AtLeastOnce)
        .await?;
    with_cert
        .publish("tessera/v1/mtls", QoS::AtLeastOnce, false, "mutual")
        .await?;
    with_cert.expect_message("tessera/v1/mtls", WAIT).await?;

    let without_cert = MqttProbe::connect(
        broker
            .probe_options("without-cert")
            .tls(pki.client_config_without_cert()?),
    )
    .await;
    assert!(
        without_cert.is_err(),
        "connected without a client certificate"
    );

    let stranger = TestPki::new()?;
    let foreign_cert = MqttProbe::connect(broker.probe_options("foreign-cert").tls(
        rustls_client_config(pki.ca_file(), Some(stranger.client()))?,
    ))
    .await;
    assert!(
        foreign_cert.is_err(),
        "connected with another CA's certificate"
    );
    Ok(())
}

#[tokio::test]
async fn certificate_names_become_usernames_for_the_acl() -> Result<()> {
    let pki = TestPki::new()?;
    let device = pki.issue_client("device-7")?;
    let broker = Broker::builder()
        .tls(&pki)
        .use_identity_as_username(true)
        .acl("user device-7\ntopic readwrite tessera/v1/device/7/#\n")
        .start()?;
    let options = |id: &str, files: &CertKeyFiles| {
        let tls = rustls_client_config(pki.ca_file(), Some(files)).unwrap();
        ProbeOptions::new(id, broker.host(), broker.port()).tls(tls)
    };

    let mut seven = MqttProbe::connect(options("d7", &device)).await?;
    seven
        .subscribe_granted("tessera/v1/device/7/#", QoS::AtLeastOnce)
        .await?;
    seven
        .publish("tessera/v1/device/7/ctl", QoS::AtLeastOnce, false, "hi")
        .await?;
    seven
        .expect_message("tessera/v1/device/7/ctl", WAIT)
        .await?;

    // The default client certificate's name has no ACL entry: it sees nothing.
    let mut other = MqttProbe::connect(options("other", pki.client())).await?;
    other
        .subscribe("tessera/v1/device/7/#", QoS::AtLeastOnce)
        .await?;
    seven
        .publish("tessera/v1/device/7/ctl", QoS::AtLeastOnce, false, "again")
        .await?;
    other.expect_no_message("tessera/v1/#", QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn a_probe_reconnects_after_the_broker_restarts_on_the_same_port() -> Result<()> {
    let mut broker = Broker::start()?;
    let port = broker.port();
    let mut probe = broker.probe("survivor").await?;
    probe
        .subscribe_granted("tessera/v1/restart", QoS::AtLeastOnce)
        .await?;

    broker.stop()?;
    assert!(!broker.is_running());
    probe.wait_disconnected(WAIT).await?;

    broker.restart()?;
    assert_eq!(broker.port(), port);
    probe.wait_connected(WAIT).await?;
    assert_eq!(probe.connect_count(), 2);

    // The broker keeps no sessions: subscribe again.
    probe
        .subscribe_granted("tessera/v1/restart", QoS::AtLeastOnce)
        .await?;
    probe
        .publish("tessera/v1/restart", QoS::AtLeastOnce, false, "back")
        .await?;
    assert_eq!(
        probe
            .expect_message("tessera/v1/restart", WAIT)
            .await?
            .payload,
        b"back"
    );
    assert_eq!(
        broker.log().matches(" running").count(),
        2,
        "{}",
        broker.log()
    );
    Ok(())
}

#[tokio::test]
async fn a_suspended_broker_delivers_once_resumed() -> Result<()> {
    let mut broker = Broker::start()?;
    let mut probe = broker.probe("patient").await?;
    probe
        .subscribe_granted("tessera/v1/pause", QoS::AtLeastOnce)
        .await?;
    broker.suspend()?;
    probe
        .publish("tessera/v1/pause", QoS::AtLeastOnce, false, "later")
        .await?;
    probe.expect_no_message("tessera/v1/pause", QUIET).await?;
    broker.resume()?;
    probe.expect_message("tessera/v1/pause", WAIT).await?;
    Ok(())
}

#[test]
fn a_broken_config_fails_fast_with_mosquittos_complaint() {
    let error = Broker::builder()
        .global_option("no_such_option 1")
        .start()
        .expect_err("mosquitto accepted an unknown option");
    let text = format!("{error:#}");
    assert!(text.contains("no_such_option"), "{text}");
}

#[test]
fn a_child_guard_reports_output_exit_and_kills_on_drop() -> Result<()> {
    let mut child =
        ChildGuard::spawn(Command::new("sh").args(["-c", "echo ready; exec sleep 30"]))?;
    child.wait_for_output("ready", WAIT)?;
    let status = child.terminate(WAIT)?;
    assert!(!status.success());

    let mut crashed = ChildGuard::spawn(Command::new("sleep").arg("30"))?;
    crashed.signal(Signal::STOP)?;
    let status = crashed.kill_9()?;
    assert!(!status.success());

    let dropped = ChildGuard::spawn(Command::new("sleep").arg("30"))?;
    let pid = dropped.id();
    drop(dropped);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the child outlived its guard"
    );

    let mut quitter = ChildGuard::spawn(Command::new("sh").args(["-c", "echo bye; exit 3"]))?;
    let error = quitter.wait_for_output("never", WAIT).unwrap_err();
    assert!(format!("{error}").contains("bye"), "{error}");
    Ok(())
}
