//! Revocation at fleet scale, end to end: a real hub and real agents through a real
//! Mosquitto, thousands of registered devices revoked with one command each, and a
//! revocation list larger than one MQTT message.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::{APP_ROLE, DEVICE_ROLE, Device, GROUP, Hub, HubOptions, present, unix_now};
use tessera_hub::mqtt::QoS;
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{IssuedToken, Sqlite, TokenKind};
use tessera_shared::cose::Sign1;
use tessera_shared::revocation::{
    Indexed, MAX_PAGE_LEN, PageOutcome, RevocationList, Stream, StreamMessage, token_hash,
};
use tessera_shared::topic;
use tessera_tests::{MqttProbe, ProbeOptions};

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Registers `ids` with `device import`, all in `group`, without keys (each gets a
/// one-time code nobody uses).
fn import(hub: &Hub, ids: &[String], group: &str) -> Result<()> {
    let csv = hub.dir.path().join(format!("import-{group}.csv"));
    let text: String = std::iter::once("id,role,group,key\n".to_owned())
        .chain(
            ids.iter()
                .map(|id| format!("{id},{DEVICE_ROLE},{group},\n")),
        )
        .collect();
    std::fs::write(&csv, text)?;
    let codes = hub.dir.path().join(format!("import-{group}.codes"));
    hub.dir.run(&[
        "device",
        "import",
        &csv.to_string_lossy(),
        "--codes",
        &codes.to_string_lossy(),
    ])?;
    // The codes file: the header, then one `id,code` line per device.
    let out = std::fs::read_to_string(&codes)?;
    ensure!(
        out.lines().count() == ids.len() + 1,
        "import printed {} codes for {} devices",
        out.lines().count(),
        ids.len()
    );
    Ok(())
}

fn scale_options(heartbeat_s: u64) -> HubOptions {
    HubOptions {
        heartbeat_s,
        groups: vec![
            ("building-b".into(), "Revoked from a list".into()),
            ("building-c".into(), "Never revoked".into()),
        ],
        extra_policy: "\n[[access]]\napp_roles = [\"controller\"]\n\
                       device_groups = [\"building-c\"]\nscopes = [\"door:open\"]\n"
            .into(),
        ..HubOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_revoked_as_a_group_and_a_thousand_from_a_list_leave_another_group_fresh()
-> Result<()> {
    let heartbeat_s = 2;
    let hub = Hub::start(scale_options(heartbeat_s)).await?;
    // Two real agents: one in the group revoked below, one in a group never revoked.
    let victim_code = blocking(|| {
        hub.dir
            .add_device_with_code("victim", DEVICE_ROLE, &[GROUP])
    })?;
    let keeper_code = blocking(|| {
        hub.dir
            .add_device_with_code("keeper", DEVICE_ROLE, &["building-c"])
    })?;
    // 999 more devices in the victim's group, 1000 in another group, registered at once.
    let group_a: Vec<String> = (1..1000).map(|i| format!("a-{i:04}")).collect();
    let group_b: Vec<String> = (0..1000).map(|i| format!("b-{i:04}")).collect();
    blocking(|| import(&hub, &group_a, GROUP))?;
    blocking(|| import(&hub, &group_b, "building-b"))?;
    let app = blocking(|| hub.dir.add_app("scale-app", APP_ROLE))?;
    let op = blocking(|| hub.operator("scale-op"))?;

    let victim = Device::new(&hub, "victim", "")?;
    let keeper = Device::new(&hub, "keeper", "presentation_window_s = 3")?;
    blocking(|| victim.enroll(Some(&victim_code)))?;
    blocking(|| keeper.enroll(Some(&keeper_code)))?;
    let mut victim_agent = blocking(|| victim.spawn())?;
    let _keeper_agent = blocking(|| keeper.spawn())?;
    for d in [&victim, &keeper] {
        blocking(|| {
            d.wait_status(
                "a token and fresh revocations",
                Duration::from_secs(20),
                |s| s["token_valid"] == true && s["revocation_fresh"] == true,
            )
        })?;
    }
    let token = blocking(|| hub.access_token(("scale-app", &app), "keeper", "door:open"))?;
    // A second token for the keeper, revoked in the middle of the mass revocations: the
    // keeper's own stream changes too, so staying fresh means following that change.
    let doomed = blocking(|| hub.access_token(("scale-app", &app), "keeper", "door:open"))?;
    let app_key = app.signer()?;

    // The keeper is sampled throughout: its knowledge must never go stale.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, socket) = (stop.clone(), keeper.socket.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::os::unix::net::UnixStream::connect(&socket).and_then(|s| {
                    use std::io::{BufRead, Write};
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    (&s).write_all(b"STATUS\n")?;
                    let mut line = String::new();
                    std::io::BufReader::new(&s).read_line(&mut line)?;
                    Ok(line)
                });
                if let Ok(line) = status
                    && let Some(json) = line.trim().strip_prefix("OK ")
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(json)
                {
                    samples.push(v["revocation_fresh"] == true);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    // One command for the group: the victim is told, the 999 others never enrolled. A token
    // issued within the revocation's own second would be named by hash besides (PROTOCOL.md
    // §11.1): revoke in a later second than the victim's token, for one entry.
    let (victim_iat, _) = victim.times(&blocking(|| victim.token())?)?;
    while unix_now() <= victim_iat {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let group = blocking(|| hub.revoke(("scale-op", &op), "group", GROUP))?;
    let group_took = started.elapsed();
    ensure!(
        (group.revoked, group.entries, group.notified) == (1000, 1, 1),
        "{group:?}"
    );
    let exit = blocking(|| victim_agent.wait_timeout(Duration::from_secs(15)))?
        .with_context(|| format!("the revoked agent kept running:\n{}", victim.log()))?;
    ensure!(exit.code() == Some(5), "exit {exit}:\n{}", victim.log());
    ensure!(
        !victim.state_dir().join("store.tsr").exists(),
        "the victim's store was not wiped"
    );

    // One change on the keeper's own stream, between the two mass revocations.
    let one = blocking(|| {
        hub.revoke(
            ("scale-op", &op),
            "token-hash",
            &hex::encode(token_hash(&doomed)),
        )
    })?;
    ensure!(
        (one.revoked, one.entries, one.notified) == (1, 1, 0),
        "{one:?}"
    );

    // One command for a list of 1000: none ever enrolled, so nothing goes on the wire.
    let list = hub.dir.path().join("list.txt");
    std::fs::write(&list, group_b.join("\n"))?;
    let started = Instant::now();
    let listed =
        blocking(|| hub.revoke(("scale-op", &op), "devices-from", &list.to_string_lossy()))?;
    let list_took = started.elapsed();
    ensure!(
        (listed.revoked, listed.entries, listed.notified) == (1000, 0, 0),
        "{listed:?}"
    );
    ensure!(
        group_took < Duration::from_secs(10) && list_took < Duration::from_secs(10),
        "took {group_took:?} and {list_took:?}"
    );

    // The keeper's knowledge is confirmed after the revocations within two heartbeats; of
    // them all it holds the one entry addressed to it, refuses that token and still
    // accepts the other.
    let after = unix_now();
    let status = blocking(|| {
        keeper.wait_status(
            "fresh knowledge confirmed after the revocations",
            Duration::from_secs(2 * heartbeat_s + 1),
            |s| {
                s["revocation_fresh"] == true
                    && s["revocation_fresh_as_of"]
                        .as_u64()
                        .is_some_and(|t| t >= after)
            },
        )
    })?;
    ensure!(status["revocation_entries"] == 1, "{status}");
    ensure!(
        status["revocation_seq"].as_u64() >= Some(1)
            && status["revocation_latest"] == status["revocation_seq"],
        "{status}"
    );
    blocking(|| {
        keeper.wait_status("accepting presentations", Duration::from_secs(10), |s| {
            s["presentations_accepted_from_ms"]
                .as_u64()
                .is_some_and(|t| t <= common::now_ms())
        })
    })?;
    let presentation = present(&token, "keeper", &app_key, 0)?;
    let verdict =
        blocking(|| keeper.ask(&format!("VERIFY door:open {}", hex::encode(&presentation))))?;
    ensure!(verdict == "OK scale-app", "{verdict}");
    let presentation = present(&doomed, "keeper", &app_key, 0)?;
    let verdict =
        blocking(|| keeper.ask(&format!("VERIFY door:open {}", hex::encode(&presentation))))?;
    ensure!(verdict.contains("revoked"), "{verdict}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    ensure!(samples.len() > 10, "only {} samples", samples.len());
    ensure!(
        samples.iter().all(|fresh| *fresh),
        "the keeper's knowledge went stale during the mass revocation: {samples:?}"
    );
    let log = std::fs::read_to_string(hub.dir.log_path())?;
    // Never a failed heartbeat, snapshot or publication: nothing above INFO at all.
    ensure!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "the hub warned or failed:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_one_message_keeps_heartbeats_flowing_and_reaches_a_new_verifier_whole()
-> Result<()> {
    const DEVICES: usize = 3000;
    let hub = Hub::start(scale_options(1)).await?;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("big-{i:04}")).collect();
    blocking(|| import(&hub, &ids, GROUP))?;
    // Each device holds a live device token. Recorded in the hub's store directly (3000
    // enrollments would only slow the test down; what matters here is what the hub
    // publishes for them).
    let store = Sqlite::open(&hub.dir.path().join("tessera-hub.db"))?;
    let now = unix_now();
    for (i, id) in ids.iter().enumerate() {
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&u32::try_from(i)?.to_be_bytes());
        store
            .record_issued(
                IssuedToken {
                    cti: hash[..16].try_into()?,
                    hash,
                    kind: TokenKind::Device,
                    subject: id.clone(),
                    audience: "tessera".into(),
                    scope: "telemetry:write".into(),
                    issued_at: now - 5,
                    expires_at: now + 600,
                },
                None,
            )
            .await?;
    }
    let op = blocking(|| hub.operator("big-op"))?;
    let counts = blocking(|| hub.revoke(("big-op", &op), "group", GROUP))?;
    ensure!(
        (counts.revoked, counts.entries) == (DEVICES as u64, DEVICES as u64),
        "{counts:?}"
    );

    // A verifier that starts now, for the service: only the retained snapshot pages and
    // the stream's messages, nothing fetched.
    let anchor = hub.dir.trust_anchor();
    let stream = Stream::Service("tessera");
    let mut probe = MqttProbe::connect(ProbeOptions::new(
        "big-verifier",
        "127.0.0.1",
        hub.broker.port(),
    ))
    .await?;
    let filter = topic::revocation_filter(&stream).to_string();
    probe.subscribe_granted(&filter, QoS::AtLeastOnce).await?;
    let mut list = RevocationList::for_service(Indexed::with_capacity(100_000), "tessera", 30)?
        .with_pending_ranges::<1024>();
    let (mut pages, mut heartbeats_in_sync) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeats_in_sync < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = probe.expect_message(&filter, left).await.with_context(|| {
            format!(
                "{} entries, seq {} of {}, {pages} pages, {heartbeats_in_sync} heartbeats",
                list.len(),
                list.seq(),
                list.latest()
            )
        })?;
        if message.payload.is_empty() {
            continue;
        }
        ensure!(
            message.payload.len() <= MAX_PAGE_LEN,
            "{} bytes",
            message.payload.len()
        );
        let payload = Sign1::decode(&message.payload)
            .and_then(|m| m.verify(&anchor))
            .map_err(|e| anyhow::anyhow!("{}: {e}", message.topic))?;
        match StreamMessage::decode(payload).map_err(|e| anyhow::anyhow!("{e}"))? {
            StreamMessage::Page(page) => {
                pages += 1;
                let _: PageOutcome = list
                    .apply_page(&page, unix_now())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            StreamMessage::Heartbeat(hb) => {
                let _ = list
                    .apply_heartbeat(&hb)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if list.is_complete() && hb.seq() == list.seq() {
                    heartbeats_in_sync += 1;
                }
            }
        }
    }
    ensure!(pages > 2, "{DEVICES} entries took {pages} pages");
    ensure!(
        list.len() == DEVICES,
        "the verifier holds {} entries",
        list.len()
    );
    ensure!(
        list.is_fresh(unix_now(), 3),
        "fresh as of {:?}",
        list.fresh_as_of()
    );
    for i in [0, 1234, DEVICES - 1] {
        ensure!(
            list.is_revoked(&[0xee; 32], &ids[i], now - 5),
            "{} is not revoked",
            ids[i]
        );
    }

    // The hub takes more: a revocation is never refused because the list is large.
    blocking(|| import(&hub, &["more-0".to_owned()], "building-b"))?;
    store
        .record_issued(
            IssuedToken {
                cti: [0xaa; 16],
                hash: [0xaa; 32],
                kind: TokenKind::Device,
                subject: "more-0".into(),
                audience: "tessera".into(),
                scope: "telemetry:write".into(),
                issued_at: now - 5,
                expires_at: now + 600,
            },
            None,
        )
        .await?;
    let counts = blocking(|| hub.revoke(("big-op", &op), "device", "more-0"))?;
    ensure!((counts.revoked, counts.entries) == (1, 1), "{counts:?}");
    let log = std::fs::read_to_string(hub.dir.log_path())?;
    // Never a failed heartbeat, snapshot or publication: nothing above INFO at all.
    ensure!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "the hub warned or failed:\n{log}"
    );
    Ok(())
}
