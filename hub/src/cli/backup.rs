//! `backup` and `restore`: a copy of the hub's database taken while it serves, checked, and
//! put back in place of a lost or damaged one while no hub runs.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keys::{self, Kek};
use tessera_hub::store::{Sqlite, postgres_url, shown_database};

use super::setup::{HubLock, other_serving_hubs};

/// `backup FILE`: an online backup of the database into a new file, checked.
pub(super) fn backup(config: &HubConfig, dest: &Path) -> Result<()> {
    refuse_postgres(config, "backup")?;
    let started = Instant::now();
    let summary = Sqlite::backup(&config.database, dest).with_context(|| {
        format!(
            "cannot back up {} into {}",
            config.database.display(),
            dest.display()
        )
    })?;
    println!(
        "backed up {} into {} ({} bytes, mode 0600, {:.1} s)",
        config.database.display(),
        dest.display(),
        summary.bytes,
        started.elapsed().as_secs_f64()
    );
    println!("{}", checked(summary.schema_version, summary));
    println!(
        "The signing keys in it are sealed under the hub's key-encryption secret (kek_file or \
         TESSERA_HUB_KEK): keep a copy of that secret too, stored apart from the backup."
    );
    Ok(())
}

/// `restore FILE`: checks a backup and puts it in place of the database, while no hub
/// serves it.
pub(super) async fn restore(config: &HubConfig, backup: &Path) -> Result<()> {
    refuse_postgres(config, "restore")?;
    // Held until the end, so no `serve` starts on a half-restored hub either.
    let _lock = HubLock::acquire(&config.lock_file(), "restore").context("nothing was changed")?;
    let others = other_serving_hubs(config);
    if !others.is_empty() {
        let held: Vec<String> = others
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        anyhow::bail!(
            "cannot restore: another tessera-hub serves this database ({}): stop every hub \
             that serves it first; nothing was changed",
            held.join(", ")
        );
    }
    let (staged, summary) = Sqlite::stage_restore(backup, &config.database)
        .with_context(|| format!("cannot restore {}; nothing was changed", backup.display()))?;
    {
        // Opening it migrates an older backup (in one transaction), as `serve` would.
        let store = Sqlite::open_existing(staged.path())
            .with_context(|| format!("cannot open {}; nothing was changed", backup.display()))?;
        let kek = Kek::load(config.kek_file.as_deref())?;
        keys::check_kek(&store, &kek, &config.hub_id)
            .await
            .with_context(|| {
                format!(
                    "the signing keys in {} do not open with this hub's key-encryption secret: \
                     is it a backup of another hub, or was the secret changed? Nothing was \
                     changed",
                    backup.display()
                )
            })?;
    }
    let aside = staged.commit(SystemClock.now()).with_context(|| {
        format!(
            "cannot put {} in place of {}",
            backup.display(),
            config.database.display()
        )
    })?;
    println!(
        "restored {} from {}",
        config.database.display(),
        backup.display()
    );
    println!("{}", checked(summary.schema_version, summary));
    for path in aside {
        println!(
            "set aside: {} (remove it once the hub serves)",
            path.display()
        );
    }
    println!("start the hub again (`tessera-hub serve`)");
    Ok(())
}

/// The lines that say a backup was checked and what it holds.
fn checked(schema_version: u32, holds: impl std::fmt::Display) -> String {
    let version = if schema_version == Sqlite::SCHEMA_VERSION {
        format!("schema version {schema_version} (current)")
    } else {
        format!(
            "schema version {schema_version} (older than this hub's {}: migrated when the hub \
             opens it, in one transaction)",
            Sqlite::SCHEMA_VERSION
        )
    };
    format!("checked: integrity ok, {version}\nholds: {holds}")
}

/// `backup` and `restore` copy an SQLite file: a database on PostgreSQL is backed up with
/// the server's own tools, which also see every replica's writes.
fn refuse_postgres(config: &HubConfig, what: &str) -> Result<()> {
    if postgres_url(&config.database).is_some() {
        anyhow::bail!(
            "`{what}` copies an SQLite database file, and this hub's database is on PostgreSQL \
             ({}): back it up and restore it with PostgreSQL's tools (pg_dump and pg_restore, \
             or the server's continuous archiving), and keep the hub's key-encryption secret \
             apart from the backup; nothing was changed",
            shown_database(&config.database)
        );
    }
    Ok(())
}
