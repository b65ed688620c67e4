//! Storage that cannot be written stops the hub, loudly (issue 9, item 4): `serve` on a
//! read-only database fails at once naming it, and a hub whose database stops taking
//! writes answers the request that met it `internal`, then exits non-zero saying why,
//! rather than answer every later request `internal`.
//!
//! The database is made unwritable for real: read-only by its mode for a user other than
//! root, and for root (whom modes do not stop) immutable (`chattr +i`, which needs
//! CAP_LINUX_IMMUTABLE and a file system that has the flag). A test that cannot make it so
//! here fails saying why: it never passes without checking.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::ClientError;
use tessera_shared::message::{ErrorCode, RequestBody};
use tessera_shared::scope::Scopes;
use tessera_tests::ChildGuard;
use tessera_tests::hub::{HubDir, TestHub};

/// How long a hub may take to stop after its store failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Files made unwritable, made writable again on drop (so the temp dir can go).
struct Unwritable {
    files: Vec<PathBuf>,
    immutable: bool,
}

impl Unwritable {
    /// Makes every existing file of `files` unwritable; fails, saying why, when this
    /// machine cannot.
    fn make(files: &[PathBuf], running_handles: bool) -> Result<Self> {
        let files: Vec<PathBuf> = files.iter().filter(|f| f.exists()).cloned().collect();
        if !is_root() {
            if running_handles {
                // A mode does not stop a handle opened before: only `chattr` would.
                bail!("this test needs root (chattr +i) to stop writes through open files");
            }
            for f in &files {
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o444))?;
            }
            return Ok(Self {
                files,
                immutable: false,
            });
        }
        let mut guard = Self {
            files: Vec::new(),
            immutable: true,
        };
        for f in &files {
            let out = Command::new("chattr").arg("+i").arg(f).output();
            match out {
                Ok(o) if o.status.success() => guard.files.push(f.clone()),
                Ok(o) => bail!(
                    "this test needs `chattr +i` (root with CAP_LINUX_IMMUTABLE, a file system \
                     with the flag): chattr +i {} failed: {}",
                    f.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => bail!("this test needs `chattr` (e2fsprogs): cannot run it: {e}"),
            }
        }
        Ok(guard)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        for f in &self.files {
            if self.immutable {
                let _ = Command::new("chattr").arg("-i").arg(f).status();
            } else {
                let _ = std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

#[test]
fn serve_on_a_read_only_database_fails_at_once_naming_it() -> Result<()> {
    let dir = HubDir::init("hub-storage")?;
    let database = dir.database_path();
    let _unwritable = Unwritable::make(std::slice::from_ref(&database), false)?;
    let mut serve = dir.command()?;
    serve.arg("serve").env("RUST_LOG", "info");
    let mut hub = ChildGuard::spawn(&mut serve)?;
    let Some(status) = hub.wait_timeout(STOP_TIMEOUT)? else {
        bail!(
            "serve kept running on a read-only database:\n{}",
            hub.output()
        );
    };
    let output = hub.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains(&format!(
            "the database {} cannot be written",
            database.display()
        )) && output.contains("readonly"),
        "the error names the database and SQLite's reason:\n{output}"
    );
    assert!(
        !output.contains("hub serving"),
        "it failed before serving:\n{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_database_stops_taking_writes_answers_internal_then_exits_non_zero()
-> Result<()> {
    let hub = TestHub::builder()
        .config("heartbeat_s = 30", "heartbeat_s = 3600")
        .start()
        .await?;
    let dir = hub.dir();
    dir.add_device("st-door", "sensor", &["building-a"])?;
    let key = dir.add_app("st-app", "controller")?;
    let mut app = hub.client("st-app", &key).await?;
    let ask = RequestBody::AccessToken {
        device: "st-door",
        scope: Scopes::parse("door:open").unwrap(),
    };
    app.request(ask, Duration::from_secs(5))
        .await
        .context("served while the database is writable")?;

    let database = dir.database_path();
    let files = [
        database.clone(),
        with_suffix(&database, "-wal"),
        with_suffix(&database, "-journal"),
    ];
    let _unwritable = Unwritable::make(&files, true)?;
    let answer = app.request(ask, Duration::from_secs(5)).await;
    assert!(
        matches!(
            &answer,
            Err(ClientError::Refused {
                code: ErrorCode::Internal,
                ..
            })
        ),
        "the request that met the failure is answered `internal`: {answer:?}"
    );
    app.close().await;

    let Some(status) = hub.wait_for_exit(STOP_TIMEOUT)? else {
        bail!(
            "the hub kept serving on a database it cannot write:\n{}",
            hub.log()
        );
    };
    let log = hub.log();
    assert!(!status.success(), "it exits non-zero:\n{log}");
    assert!(
        log.contains("the hub's database cannot be written")
            && log.contains("disk I/O error")
            && log.contains("the hub stopped"),
        "it says why:\n{log}"
    );
    Ok(())
}
