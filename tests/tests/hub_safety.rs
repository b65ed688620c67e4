//! Operator mistakes that must not destroy a hub (issue 9): a wrong key-encryption secret
//! is refused before any key is written, and a next key sealed under one is left out; a
//! second `serve` on a hub directory refuses to start; a lost database is reported, never
//! silently replaced; the config file holding the broker password is private; a restart
//! does not renumber the key set; no client may be registered under an id the hub's tokens
//! use as audience or issuer.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tessera_hub::keys::{self, Kek};
use tessera_hub::store::Sqlite;
use tessera_shared::keyset::{KeySet, KeySetOutcome};
use tessera_shared::topic;
use tessera_tests::hub::{HubDir, STARTUP_TIMEOUT, TestHub, unix_now};
use tessera_tests::{ChildGuard, MqttProbe, QoS, cargo_bin};

const WAIT: Duration = Duration::from_secs(5);

fn mode(path: &std::path::Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Signing keys as `keys list` prints them, one line each.
fn key_lines(dir: &HubDir) -> Result<Vec<String>> {
    Ok(dir
        .run(&["keys", "list"])?
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn keys_rotate_with_a_wrong_secret_is_refused_and_writes_nothing() -> Result<()> {
    let dir = HubDir::init("hub-safety")?;
    let kek_path = dir.path().join("hub.kek");
    let right = std::fs::read(&kek_path)?;
    let before = key_lines(&dir)?;
    std::fs::write(&kek_path, [0x5a; 32])?;

    let stderr = dir.run_failing(&["keys", "rotate"])?;
    assert!(
        stderr.contains("does not open signing key") && stderr.contains("Nothing was written"),
        "{stderr}"
    );
    assert_eq!(key_lines(&dir)?, before, "no key written, none retired");

    // With the right secret back, the hub's keys all open and it rotates.
    std::fs::write(&kek_path, &right)?;
    let printed = dir.run(&["trust-anchor"])?;
    assert!(printed.contains(dir.trust_anchor_cose_hex()), "{printed}");
    dir.run(&["keys", "rotate"])?;
    assert_eq!(key_lines(&dir)?.len(), 2);
    Ok(())
}

/// The way out for a hub that a wrong secret damaged before rotation checked it: the next
/// key sealed under that secret is left out with a warning, and the hub serves and signs
/// with the key its devices trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_key_sealed_under_a_wrong_secret_is_left_out_and_the_hub_serves() -> Result<()> {
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    let dir = hub.dir();
    {
        // What `keys rotate` wrote with a wrong secret before the fix.
        let store = Sqlite::open_existing(&dir.database_path())?;
        let wrong = Kek::from_bytes(vec![0x5a; 32])?;
        let now = unix_now();
        keys::create_key(&store, &wrong, dir.hub_id(), now, now + 300, None).await?;
    }
    let output = dir.command()?.arg("trust-anchor").output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(output.status.success(), "trust-anchor failed: {stderr}");
    assert!(stdout.contains(dir.trust_anchor_cose_hex()), "{stdout}");
    assert!(
        stderr.contains("never published and cannot be opened"),
        "{stderr}"
    );

    hub.restart().await?;
    let mut keys = subscribed(&hub, "safety-keys-1", topic::KEYS).await?;
    let mut held = KeySet::from_anchor(hub.trust_anchor());
    held.update(&keys.expect_message(topic::KEYS, WAIT).await?.payload)
        .map_err(|e| anyhow::anyhow!("key set: {e}"))?;
    assert_eq!(held.keys(), [hub.trust_anchor()], "only the good key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_hub_directory_refuses_to_start() -> Result<()> {
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    let dir = hub.dir();
    let mut second = ChildGuard::spawn(dir.command()?.arg("serve"))?;
    let status = second.wait_timeout(STARTUP_TIMEOUT)?;
    let output = second.output();
    let status = status.with_context(|| format!("a second serve runs:\n{output}"))?;
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("holds the lock") && output.contains(&hub.pid().unwrap().to_string()),
        "{output}"
    );
    // `init` on it refuses too.
    let init = std::process::Command::new(cargo_bin("tessera-hub")?)
        .arg("init")
        .arg("--dir")
        .arg(dir.path())
        .output()?;
    assert!(!init.status.success());

    // The first hub serves on; commands that change the database work beside it.
    hub.wait_until_serving().await?;
    dir.add_device("safety-lock-door", "sensor", &["building-a"])?;
    dir.run(&["keys", "rotate"])?;
    // A crashed hub leaves no stale lock.
    hub.restart().await?;
    Ok(())
}

/// A second hub on the same database under another client id: refused unless both split
/// the requests with a shared subscription, since otherwise both would answer each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_would_answer_every_request_twice_refuses_to_start() -> Result<()> {
    for shared in [false, true] {
        let setting = format!("shared_subscription = {shared}");
        let hub = TestHub::builder()
            .config("heartbeat_s = 30", "heartbeat_s = 3600")
            .config("shared_subscription = false", &setting)
            .start()
            .await?;
        let dir = hub.dir();
        let text = std::fs::read_to_string(dir.config_path())?;
        let replica_config = dir.path().join("replica.toml");
        std::fs::write(
            &replica_config,
            text.replace(
                "client_id = \"tessera-hub\"",
                "client_id = \"tessera-hub-2\"",
            ),
        )?;
        let mut replica = ChildGuard::spawn(
            std::process::Command::new(cargo_bin("tessera-hub")?)
                .arg("--config")
                .arg(&replica_config)
                .arg("serve")
                .arg("--mqtt-port")
                .arg(hub.broker().port().to_string()),
        )?;
        if shared {
            replica.wait_for_output("connected to broker", STARTUP_TIMEOUT)?;
            assert!(replica.try_wait()?.is_none(), "{}", replica.output());
        } else {
            let status = replica
                .wait_timeout(STARTUP_TIMEOUT)?
                .with_context(|| format!("the replica serves:\n{}", replica.output()))?;
            let output = replica.output();
            assert!(!status.success(), "{output}");
            assert!(
                output.contains("another tessera-hub serves this database")
                    && output.contains("shared_subscription = true"),
                "{output}"
            );
        }
        hub.wait_until_serving().await?;
    }
    Ok(())
}

#[test]
fn a_lost_database_is_reported_and_never_replaced_by_an_empty_one() -> Result<()> {
    let dir = HubDir::init("hub-safety")?;
    let db = dir.database_path();
    for suffix in ["", "-wal", "-shm"] {
        let path = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    for command in [
        &["client", "list"][..],
        &["keys", "list"],
        &["trust-anchor"],
        &["serve"],
    ] {
        let stderr = dir.run_failing(command)?;
        assert!(
            stderr.contains(&db.display().to_string())
                && stderr.contains("does not exist")
                && stderr.contains("backup"),
            "`{}`: {stderr}",
            command.join(" ")
        );
        assert!(!db.exists(), "`{}` created the database", command.join(" "));
    }
    let init = std::process::Command::new(cargo_bin("tessera-hub")?)
        .arg("init")
        .arg("--dir")
        .arg(dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert!(!init.status.success());
    assert!(
        stderr.contains("database") && stderr.contains("is missing") && stderr.contains("backup"),
        "{stderr}"
    );
    assert!(!db.exists(), "init created a database");
    Ok(())
}

#[test]
fn init_writes_the_config_and_the_secrets_readable_by_the_owner_only() -> Result<()> {
    let dir = HubDir::init("hub-safety")?;
    assert_eq!(mode(&dir.config_path())?, 0o600, "tessera-hub.toml");
    assert_eq!(mode(&dir.path().join("hub.kek"))?, 0o600, "hub.kek");
    assert_eq!(mode(&dir.database_path())?, 0o600, "tessera-hub.db");
    Ok(())
}

async fn subscribed(hub: &TestHub, id: &str, filter: &str) -> Result<MqttProbe> {
    let probe = hub.broker().probe(id).await?;
    probe.subscribe_granted(filter, QoS::AtLeastOnce).await?;
    Ok(probe)
}

/// The version of a signed key set, as a device provisioned with `anchor` reads it.
fn version_of(payload: &[u8], anchor: tessera_shared::crypto::PublicKey) -> Result<u64> {
    let mut set = KeySet::from_anchor(anchor);
    set.update(payload)
        .map_err(|e| anyhow::anyhow!("key set: {e}"))?;
    Ok(set.version())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_does_not_renumber_the_key_set() -> Result<()> {
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    let anchor = hub.trust_anchor();
    let mut keys = subscribed(&hub, "safety-keys-2", topic::KEYS).await?;
    let mut held = KeySet::from_anchor(anchor);
    let first = keys.expect_message(topic::KEYS, WAIT).await?;
    held.update(&first.payload)
        .map_err(|e| anyhow::anyhow!("key set: {e}"))?;
    let version = held.version();
    for restart in 1..=2 {
        hub.restart().await?;
        // Every start publishes the key set; the same keys keep the same version, so a
        // device keeps the set it holds and rewrites nothing.
        let again = keys.expect_message(topic::KEYS, WAIT).await?;
        assert_eq!(
            version_of(&again.payload, anchor)?,
            version,
            "restart {restart} renumbered the key set"
        );
        let outcome = held
            .update(&again.payload)
            .map_err(|e| anyhow::anyhow!("key set: {e}"))?;
        assert_eq!(outcome, KeySetOutcome::NotNewer);
    }
    Ok(())
}

#[test]
fn no_client_is_registered_under_the_device_audience_or_the_hub_id() -> Result<()> {
    let dir = HubDir::init("hub-safety")?;
    let key = dir.keygen("reserved")?;
    let public = key.public_path().to_string_lossy().into_owned();
    for (kind, id, role) in [
        ("device", "tessera", "sensor"),
        ("app", "tessera", "controller"),
        ("operator", "tessera", "ops"),
        ("device", "hub-safety", "sensor"),
    ] {
        let stderr = dir.run_failing(&[kind, "add", id, "--role", role, "--key", &public])?;
        assert!(
            stderr.contains(&format!("`{id}` is the")),
            "{kind} {id}: {stderr}"
        );
    }
    let csv = dir.path().join("fleet.csv");
    std::fs::write(
        &csv,
        "id,role,group,key\nsafety-ok,sensor,building-a,\ntessera,sensor,building-a,\n",
    )?;
    let codes = dir.path().join("codes.csv");
    let stderr = dir.run_failing(&[
        "device",
        "import",
        &csv.to_string_lossy(),
        "--codes",
        &codes.to_string_lossy(),
    ])?;
    assert!(
        stderr.contains("line 3 (tessera)") && stderr.contains("device_audience"),
        "{stderr}"
    );
    let listed = dir.run(&["client", "list"])?;
    assert!(
        !listed.contains("tessera ") && !listed.contains("safety-ok"),
        "{listed}"
    );

    // A policy naming a registered client as the device audience is refused.
    dir.add_device("safety-door", "sensor", &["building-a"])?;
    dir.replace_in_policy(
        "device_audience = \"tessera\"",
        "device_audience = \"safety-door\"",
    )?;
    let stderr = dir.run_failing(&["policy", "check"])?;
    assert!(
        stderr.contains("device_audience `safety-door`") && stderr.contains("registered device"),
        "{stderr}"
    );
    let stderr = dir.run_failing(&["serve"])?;
    assert!(stderr.contains("device_audience `safety-door`"), "{stderr}");
    Ok(())
}
