//! Backup and restore (issue 9): `tessera-hub backup` copies the database of a serving hub
//! into a new private file and checks it; after the database is lost, `tessera-hub restore`
//! puts the backup back (refusing while a hub serves), and the restored hub serves with the
//! same trust anchor, its registered clients and its revocations.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use tessera_hub::client::Answer;
use tessera_shared::message::{ErrorCode, RequestBody, RevokeTarget};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_tests::hub::{RevokeCounts, TestHub, unix_now};

const WAIT: Duration = Duration::from_secs(5);

fn client_line(listing: &str, id: &str) -> String {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// An access token for `device` as `app`, checked against the hub's trust anchor.
async fn door_token(hub: &TestHub, app: &str, key: &tessera_tests::hub::TestKey) -> Result<()> {
    let mut client = hub.client(app, key).await?;
    let answer = client
        .request(
            RequestBody::AccessToken {
                device: "bk-door",
                scope: Scopes::parse("door:open").unwrap(),
            },
            WAIT,
        )
        .await;
    client.close().await;
    let Answer::Token { token, .. } = answer? else {
        bail!("expected an access token")
    };
    let validation = Validation::new(unix_now(), "bk-door").with_issuer(hub.dir().hub_id());
    token::verify(&token, &hub.trust_anchor(), &validation)
        .map_err(|e| anyhow::anyhow!("token does not verify with the trust anchor: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_serving_hub_restores_a_lost_database_and_the_hub_serves_as_before()
-> Result<()> {
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    let dir = hub.dir();
    dir.add_device("bk-door", "sensor", &["building-a"])?;
    dir.add_device_with_code("bk-coded", "sensor", &["building-a"])?;
    let revoked_key = dir.add_device("bk-revoked", "sensor", &["building-a"])?;
    let app_key = dir.add_app("bk-app", "controller")?;
    let ops_key = dir.add_operator("bk-ops", "ops")?;
    door_token(&hub, "bk-app", &app_key).await?;

    // An enrolled device revoked whole, over MQTT, by an operator.
    let mut device = hub.raw("bk-revoked", revoked_key.signer()?).await?;
    let enrolled = device
        .ask(RequestBody::Enroll {
            key: revoked_key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled));
    let mut ops = hub.client("bk-ops", &ops_key).await?;
    let answer = ops
        .request(
            RequestBody::Revoke(RevokeTarget::Device("bk-revoked")),
            WAIT,
        )
        .await?;
    ops.close().await;
    assert_eq!(RevokeCounts::from_answer(&answer)?.revoked, 1);

    // The backup, taken while the hub serves.
    let backup: PathBuf = dir.path().join("backups").join("hub-1.db");
    std::fs::create_dir_all(backup.parent().unwrap())?;
    let backup_arg = backup.to_string_lossy().into_owned();
    let printed = dir.run(&["backup", &backup_arg])?;
    assert!(
        printed.contains("checked: integrity ok, schema version")
            && printed.contains("(current)")
            && printed.contains("3 devices, 1 app, 2 operators; 1 revoked")
            && printed.contains("1 signing key"),
        "{printed}"
    );
    assert_eq!(
        std::fs::metadata(&backup)?.permissions().mode() & 0o777,
        0o600
    );
    let stderr = dir.run_failing(&["backup", &backup_arg])?;
    assert!(stderr.contains("already exists"), "{stderr}");
    // After the backup: not in it.
    dir.add_device("bk-after", "sensor", &["building-a"])?;

    // No restore under a serving hub.
    let stderr = dir.run_failing(&["restore", &backup_arg])?;
    assert!(
        stderr.contains("holds the lock") && stderr.contains("nothing was changed"),
        "{stderr}"
    );

    // The database is lost: the hub crashes and its file is garbage; its -wal stays.
    hub.kill_9()?;
    let db = dir.database_path();
    std::fs::write(&db, vec![0x5a; 16_384])?;
    let stderr = dir.run_failing(&["client", "list"])?;
    assert!(
        stderr.contains("malformed") || stderr.contains("not a database"),
        "{stderr}"
    );

    let printed = dir.run(&["restore", &backup_arg])?;
    assert!(
        printed.contains("restored") && printed.contains("set aside"),
        "{printed}"
    );
    let aside: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tessera-hub.db.before-restore-"))
        .collect();
    assert!(!aside.is_empty(), "the damaged database is kept aside");
    assert_eq!(std::fs::metadata(&db)?.permissions().mode() & 0o777, 0o600);

    // The restored hub serves with the same trust anchor, ...
    hub.restart().await?;
    let printed = dir.run(&["trust-anchor"])?;
    assert!(printed.contains(dir.trust_anchor_cose_hex()), "{printed}");
    door_token(&hub, "bk-app", &app_key).await?;
    // ... the clients of the backup (not those registered after it), ...
    let listing = dir.run(&["client", "list"])?;
    assert!(
        client_line(&listing, "bk-door").ends_with("key registered")
            && client_line(&listing, "bk-coded").ends_with("awaiting enrollment")
            && client_line(&listing, "bk-revoked").ends_with("revoked")
            && client_line(&listing, "bk-after").is_empty(),
        "{listing}"
    );
    // ... and the revoked device still revoked.
    drop(device);
    let mut device = hub.raw("bk-revoked", revoked_key.signer()?).await?;
    device
        .ask(RequestBody::DeviceToken)
        .await?
        .expect_refusal(ErrorCode::Revoked)?;
    Ok(())
}

#[test]
fn restore_refuses_a_file_that_is_not_a_backup_and_changes_nothing() -> Result<()> {
    let dir = tessera_tests::hub::HubDir::init("hub-backup")?;
    let before = dir.run(&["client", "list"])?;
    let bogus = dir.path().join("bogus.db");
    std::fs::write(&bogus, b"not a database at all, just text")?;
    let stderr = dir.run_failing(&["restore", &bogus.to_string_lossy()])?;
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(dir.run(&["client", "list"])?, before);
    Ok(())
}
