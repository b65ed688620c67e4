//! `dashboard-password`: gives an operator a password for the dashboard (or takes it
//! away). The hub keeps only its SHA-256 ([`tessera_hub::dashboard`]).

use anyhow::{Context, Result, bail};
use tessera_hub::config::HubConfig;
use tessera_hub::dashboard;
use tessera_hub::policy::Policy;
use tessera_hub::store::{ClientKind, Store};

use super::open_store;

/// Makes a new password for `operator`, prints it once, and keeps its hash in the
/// configured passwords file; with `remove`, takes the operator's password away. Either
/// way the operator's open sessions end at their next request.
pub(super) async fn password(config: &HubConfig, operator: &str, remove: bool) -> Result<()> {
    let Some(settings) = config.http.as_ref().and_then(|h| h.dashboard.as_ref()) else {
        bail!(
            "the dashboard is not configured: add an [http] section with a [http.dashboard] \
             section to the configuration (`tessera-hub default config` shows them)"
        );
    };
    let file = &settings.passwords;
    if remove {
        let had = dashboard::set_password(file, operator, None)?;
        if had {
            println!("removed the dashboard password of {operator}");
        } else {
            println!("{operator} had no dashboard password");
        }
        return Ok(());
    }
    let store = open_store(config)?;
    let Some(client) = store.client(operator).await? else {
        bail!("no client {operator:?} is registered (`tessera-hub operator add` registers one)");
    };
    if client.kind != ClientKind::Operator {
        bail!(
            "client {operator:?} is {}, not an operator: only operators use the dashboard",
            client.kind.as_str()
        );
    }
    if client.revoked_at.is_some() {
        bail!("operator {operator:?} is revoked");
    }
    let policy = Policy::load(&config.policy)
        .with_context(|| format!("cannot load the policy {}", config.policy.display()))?;
    if let Err(denial) = policy.watch(&client) {
        bail!(
            "{}: the dashboard lets in only operators whose role lists `watch`",
            denial.reason
        );
    }
    let password = dashboard::new_password(&tessera_hub::rng::OsRng)?;
    let replaced = dashboard::set_password(file, operator, Some(&password))?;
    println!(
        "dashboard password for {operator}{} (shown once; only its hash is kept in {}):",
        if replaced {
            ", replacing the old one"
        } else {
            ""
        },
        file.display()
    );
    println!("{password}");
    Ok(())
}
