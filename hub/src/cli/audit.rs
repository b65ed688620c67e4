//! `audit`: the audit log, filtered in the store, most recent entries last.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::store::{AuditEvent, AuditFilter, Store};

use super::open_store;
use super::when;

/// Which audit entries to print, and how.
#[derive(Args)]
pub(super) struct AuditArgs {
    /// Only decisions asked by this client (the actor; `hub` for the hub's own, such as a
    /// policy reload).
    #[arg(long)]
    client: Option<String>,
    /// Only decisions about this device (the target).
    #[arg(long)]
    device: Option<String>,
    /// Only this action (`access_token`, `device_token`, `revoke`, `enroll`, …).
    #[arg(long)]
    action: Option<String>,
    /// Only entries at or after this time: RFC 3339 (`2026-11-30T18:00:00Z`), Unix
    /// seconds, or a duration before now (`90s`, `15m`, `1h`, `2d`).
    #[arg(long)]
    since: Option<String>,
    /// Only entries before this time (as --since).
    #[arg(long)]
    until: Option<String>,
    /// At most this many: the most recent of those that match.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// One JSON array on stdout, one object per entry.
    #[arg(long)]
    json: bool,
}

/// One audit entry as `audit --json` prints it (`at_ms` also as RFC 3339).
#[derive(Serialize)]
struct AuditJson<'a> {
    at_ms: u64,
    at_rfc3339: String,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    reason: &'a str,
    count: u64,
}

impl<'a> AuditJson<'a> {
    fn new(e: &'a AuditEvent) -> Self {
        Self {
            at_ms: e.at_ms,
            at_rfc3339: when::rfc3339_ms(e.at_ms),
            actor: &e.actor,
            action: &e.action,
            target: &e.target,
            outcome: &e.outcome,
            reason: &e.reason,
            count: e.count,
        }
    }
}

pub(super) async fn print(config: &HubConfig, args: AuditArgs) -> Result<()> {
    let now_ms = SystemClock.now_ms();
    let filter = AuditFilter {
        actor: args.client,
        target: args.device,
        action: args.action,
        since_ms: args
            .since
            .map(|t| when::parse_instant_ms(&t, now_ms))
            .transpose()
            .map_err(|e| e.context("--since"))?,
        until_ms: args
            .until
            .map(|t| when::parse_instant_ms(&t, now_ms))
            .transpose()
            .map_err(|e| e.context("--until"))?,
        limit: args.limit,
    };
    let store = open_store(config)?;
    let events = store.audit_query(&filter).await?;
    if args.json {
        let rows: Vec<AuditJson<'_>> = events.iter().map(AuditJson::new).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for e in &events {
        // An aggregated row (a flood of one client's identical refusals) says how
        // many decisions it stands for.
        let times = if e.count > 1 {
            format!(" (x{})", e.count)
        } else {
            String::new()
        };
        println!(
            "{}  {:<12} {:<18} {:<16} {:<14} {}{times}",
            when::human_ms(e.at_ms),
            e.actor,
            e.action,
            e.target,
            e.outcome,
            e.reason
        );
    }
    Ok(())
}
