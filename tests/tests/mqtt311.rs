//! The protocol over MQTT 3.1.1 (`[mqtt] version = "3.1.1"`, PROTOCOL.md §7.3), and through
//! a broker that is not Mosquitto: a hub, its clients and a service verifier, all speaking
//! 3.1.1, go through enrollment, device and access tokens, refreshes with grants, and a
//! revocation that reaches the service over its revocation stream. Once with Mosquitto
//! (which logs each connection's protocol: `p2` is 3.1.1, `p5` MQTT 5), with a real agent
//! over 3.1.1 too, once with NATS's
//! MQTT gateway (`nats-server` with JetStream, which speaks only 3.1.1 and has no shared
//! subscriptions).
//!
//! Needs Mosquitto and `nats-server` (`$NATS_SERVER` or on `PATH`); `tessera-hub` is built
//! if needed.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::{Answer, Client};
use tessera_hub::mqtt::{MqttConfig, MqttVersion};
use tessera_shared::crypto::PublicKey;
use tessera_shared::message::{RequestBody, RevokeTarget};
use tessera_tests::agent::Agent;
use tessera_tests::hub::{HubDir, TestHub, await_serving, unix_now};
use tessera_tests::{ChildGuard, free_port, wait_for_port, wait_until};

const WAIT: Duration = Duration::from_secs(10);

/// Registers a device, an app and an operator in `dir` and takes them through the
/// protocol over the connections `mqtt` makes (one per client id).
async fn exercise(
    dir: &HubDir,
    anchor: PublicKey,
    mqtt: impl Fn(&str) -> MqttConfig,
) -> Result<()> {
    let device_id = "v4-sensor";
    let device_key = dir.add_device(device_id, "sensor", &["building-a"])?;
    let app_key = dir.add_app("v4-app", "controller")?;
    let ops_key = dir.add_operator("v4-ops", "ops")?;
    let connect = async |id: &str, key: &tessera_tests::hub::TestKey| -> Result<Client> {
        Ok(Client::connect(&mqtt(id), id, key.signer()?, anchor, WAIT).await?)
    };

    // A device: enrollment, a device token, a refresh with its grant.
    let mut device = connect(device_id, &device_key).await?;
    let enrolled = device
        .request(
            RequestBody::Enroll {
                key: device_key.public_key()?,
                code_proof: None,
            },
            WAIT,
        )
        .await?;
    assert_eq!(enrolled, Answer::Enrolled);
    let Answer::Token {
        token,
        grant: Some((grant, _)),
    } = device.request(RequestBody::DeviceToken, WAIT).await?
    else {
        bail!("no device token with a grant");
    };
    let Answer::Token {
        token: refreshed, ..
    } = device
        .request(RequestBody::Refresh { grant: &grant }, WAIT)
        .await?
    else {
        bail!("no refreshed device token");
    };
    assert_ne!(refreshed, token);

    // An app: an access token, renewed through its grant.
    let mut app = connect("v4-app", &app_key).await?;
    let first = app.access_token(device_id, "door:open").await?;
    let renewed = app.renew(device_id, "door:open").await?;
    assert_ne!(first.bytes(), renewed.bytes());
    app.close().await;

    // A service following its revocation stream takes the device's presentation, and
    // refuses it once an operator revoked the device.
    let verifier = tessera_client::verifier::ServiceVerifier::start(
        &mqtt("v4-service"),
        tessera_client::verifier::VerifierConfig::new("tessera", anchor),
        WAIT,
    )
    .await?;
    let signer = device_key.signer()?;
    let present = || tessera_client::present(&signer, &refreshed, "tessera", unix_now());
    wait_until(
        "the service to hold current knowledge",
        WAIT * 3,
        async || Ok(verifier.status().fresh.then_some(())),
    )
    .await?;
    let accepted = verifier.check(&present()?, "telemetry:write")?;
    assert_eq!(accepted.device, device_id);
    let mut ops = connect("v4-ops", &ops_key).await?;
    let revoked = ops.revoke(RevokeTarget::Device(device_id)).await?;
    assert_eq!(revoked.revoked, 1);
    ops.close().await;
    wait_until(
        "the service to refuse the revoked device",
        WAIT * 3,
        async || {
            Ok(match verifier.check(&present()?, "telemetry:write") {
                Err(tessera_client::verifier::Refusal::Revoked) => Some(()),
                _ => None,
            })
        },
    )
    .await?;
    device.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_refresh_and_revocation_work_over_mqtt_3_1_1() -> Result<()> {
    let hub = TestHub::builder()
        .config("version = \"5\"", "version = \"3.1.1\"")
        .config("heartbeat_s = 30", "heartbeat_s = 1")
        .start()
        .await?;
    exercise(hub.dir(), hub.trust_anchor(), |id| {
        let mut config = hub.mqtt(id);
        config.version = MqttVersion::V311;
        config
    })
    .await?;

    // A real agent over 3.1.1: it enrolls with a one-time code, holds a device token and
    // accepts an app's presentation.
    let code = hub
        .dir()
        .add_device_with_code("v4-door", "sensor", &["building-a"])?;
    let agent = Agent::enroll_with(&hub, "v4-door", &code, "version = \"3.1.1\"")?;
    let mut run = agent.run_until_checking()?;
    let app_key = hub.dir().add_app("v4-app-2", "controller")?;
    let mut config = hub.mqtt("v4-app-2");
    config.version = MqttVersion::V311;
    let mut app = Client::connect(
        &config,
        "v4-app-2",
        app_key.signer()?,
        hub.trust_anchor(),
        WAIT,
    )
    .await?;
    let token = app.access_token("v4-door", "door:open").await?;
    let (accepted, said) = agent.verify("door:open", &app.present(&token)?)?;
    assert!(accepted, "the 3.1.1 agent refused the presentation: {said}");
    app.close().await;
    assert!(
        agent.status()?["token_valid"] == true,
        "{}",
        agent.status()?
    );
    run.terminate(Duration::from_secs(10))?;

    // Everyone spoke 3.1.1: Mosquitto logs `p2` (its MQTT 3.1.1) for each connection.
    let log = hub.broker().log();
    for id in [
        "tessera-hub",
        "v4-sensor",
        "v4-app",
        "v4-service",
        "v4-ops",
        "v4-door",
    ] {
        assert!(
            log.contains(&format!(" as {id} (p2,")),
            "{id} did not connect with MQTT 3.1.1:\n{log}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_refresh_and_revocation_work_through_nats() -> Result<()> {
    // NATS with JetStream (which its MQTT gateway needs for sessions and retained
    // messages), its MQTT listener on a free loopback port.
    let nats = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    let work = tempfile::tempdir()?;
    let (client_port, mqtt_port) = (free_port()?, free_port()?);
    let conf = work.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{client_port}\nserver_name: tessera-test\n\
             jetstream {{ store_dir: {:?} }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\n",
            work.path().join("jetstream")
        ),
    )?;
    let mut broker = ChildGuard::spawn(Command::new(&nats).arg("-c").arg(&conf))
        .with_context(|| format!("starting {nats} (install nats-server, or set $NATS_SERVER)"))?;
    wait_for_port(([127, 0, 0, 1], mqtt_port).into(), WAIT)
        .with_context(|| format!("NATS's MQTT listener:\n{}", broker.output()))?;

    let dir = HubDir::init("hub-nats")?;
    dir.replace_in_config("port = 1883", &format!("port = {mqtt_port}"))?;
    dir.replace_in_config("version = \"5\"", "version = \"3.1.1\"")?;
    dir.replace_in_config("heartbeat_s = 30", "heartbeat_s = 1")?;
    let mut command = dir.command()?;
    command.arg("serve").env("RUST_LOG", "info");
    let mut hub = ChildGuard::spawn_logged(&mut command, &dir.log_path())?;
    let mqtt = |id: &str| {
        let mut config = MqttConfig::plain("127.0.0.1", mqtt_port, id);
        config.version = MqttVersion::V311;
        config
    };

    // Serving once it answers the readiness probe (the first request may go out before the
    // hub subscribed: asked again until the deadline).
    let ready_key = dir.add_operator("nats-ready", "ops")?;
    let mut probe = Client::connect(
        &mqtt("nats-ready"),
        "nats-ready",
        ready_key.signer()?,
        dir.trust_anchor(),
        WAIT,
    )
    .await?;
    await_serving(&mut probe, Duration::from_secs(30), || {
        match hub.try_wait()? {
            Some(status) => bail!("the hub exited ({status})"),
            None => Ok(()),
        }
    })
    .await
    .with_context(|| {
        format!(
            "the hub did not serve through NATS:\n{}\n{}",
            hub.output(),
            broker.output()
        )
    })?;
    probe.close().await;

    exercise(&dir, dir.trust_anchor(), mqtt)
        .await
        .with_context(|| format!("hub log:\n{}", hub.output()))?;
    hub.terminate(Duration::from_secs(10))?;
    broker.terminate(Duration::from_secs(10))?;
    Ok(())
}
