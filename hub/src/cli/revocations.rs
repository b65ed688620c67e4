//! `revocations`: the live revocation list as the hub serves it, stream by stream.

use anyhow::Result;
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::store::Store;
use tessera_shared::revocation::{Addressed, Entry, MAX_LEEWAY};

use super::text::counted;
use super::{open_store, when};

/// Prints every stream and the entries still in force on it: those the hub serves to a
/// verifier now (until their tokens' expiry plus the largest leeway a verifier may use).
pub(super) async fn list(config: &HubConfig, json: bool) -> Result<()> {
    let store = open_store(config)?;
    let now = SystemClock.now();
    let mut streams = Vec::new();
    for state in store.streams().await? {
        let read = store
            .stream_entries(&state.name, 1, now, MAX_LEEWAY, usize::MAX)
            .await?;
        streams.push((state, read));
    }
    if json {
        let rows: Vec<serde_json::Value> = streams
            .iter()
            .map(|(state, read)| {
                let entries: Vec<serde_json::Value> = read
                    .changes
                    .iter()
                    .flat_map(|(seq, entries)| {
                        entries.iter().map(|a| entry_json(&state.name, *seq, a))
                    })
                    .collect();
                serde_json::json!({
                    "stream": state.name,
                    "latest_seq": state.seq,
                    "snapshot_seq": state.snapshot_seq,
                    "snapshot_pages": state.snapshot_pages,
                    "entries": entries,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut total = 0;
    let mut live_streams = 0;
    for (state, read) in &streams {
        let n: usize = read.changes.iter().map(|(_, e)| e.len()).sum();
        if n == 0 {
            continue;
        }
        total += n;
        live_streams += 1;
        println!(
            "{}: {}, latest change {} (snapshot published to {})",
            state.name,
            counted(n, "entry", "entries"),
            state.seq,
            state.snapshot_seq
        );
        for (seq, entries) in &read.changes {
            for a in entries {
                println!("  #{seq:<5} {}", describe(a, now));
            }
        }
    }
    println!(
        "{} in force on {} ({} in all)",
        counted(total, "entry", "entries"),
        counted(live_streams, "stream", "streams"),
        counted(streams.len(), "stream", "streams")
    );
    Ok(())
}

/// One entry for people: what it revokes, for whom, and until when it matters.
pub(super) fn describe(a: &Addressed, now: u64) -> String {
    let expires = a.entry.expires_at();
    let until = format!(
        "until {} ({})",
        when::human_s(expires),
        when::relative(expires, now)
    );
    match &a.entry {
        Entry::Token { hash, .. } => {
            format!("token {} (for {}) {until}", hex::encode(hash), a.audience)
        }
        Entry::Subject {
            subject,
            issued_before,
            ..
        } => format!(
            "every token of {subject} issued before {} (for {}) {until}",
            when::human_s(*issued_before),
            a.audience
        ),
    }
}

/// One entry as JSON: its stream and change, its audience, what it revokes, and times as
/// Unix seconds and RFC 3339 (`_rfc3339`). A subject entry's `issued_before` is when the
/// subject was revoked.
pub(super) fn entry_json(stream: &str, seq: u64, a: &Addressed) -> serde_json::Value {
    let expires = a.entry.expires_at();
    let mut entry = serde_json::json!({
        "stream": stream,
        "seq": seq,
        "audience": a.audience.as_str(),
        "expires_at": expires,
        "expires_at_rfc3339": when::rfc3339_s(expires),
    });
    let fields = match &a.entry {
        Entry::Token { hash, .. } => serde_json::json!({
            "kind": "token",
            "token_hash": hex::encode(hash),
        }),
        Entry::Subject {
            subject,
            issued_before,
            ..
        } => serde_json::json!({
            "kind": "subject",
            "subject": subject.as_str(),
            "issued_before": issued_before,
            "issued_before_rfc3339": when::rfc3339_s(*issued_before),
        }),
    };
    if let (Some(entry), serde_json::Value::Object(fields)) = (entry.as_object_mut(), fields) {
        entry.extend(fields);
    }
    entry
}
