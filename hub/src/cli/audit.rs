//! `audit`: the audit log, most recent entries last.

use anyhow::Result;
use tessera_hub::config::HubConfig;
use tessera_hub::store::Store;

use super::open_store;

pub(super) async fn print(config: &HubConfig, limit: usize) -> Result<()> {
    let store = open_store(config)?;
    for e in store.audit_tail(limit).await? {
        // An aggregated row (a flood of one client's identical refusals) says how
        // many decisions it stands for.
        let times = if e.count > 1 {
            format!(" (x{})", e.count)
        } else {
            String::new()
        };
        println!(
            "{}  {:<12} {:<18} {:<16} {:<14} {}{times}",
            e.at_ms, e.actor, e.action, e.target, e.outcome, e.reason
        );
    }
    Ok(())
}
