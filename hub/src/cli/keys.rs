//! `trust-anchor`, `keys list`, `keys rotate`.

use anyhow::Result;
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::policy::Policy;
use tessera_hub::store::{KeyRecord, Store};
use tessera_shared::crypto::{COSE_KEY_LEN, PublicKey, Signer};

use super::{open_store, when};

/// Prints the active signing key in every format.
pub(super) async fn trust_anchor(config: &HubConfig) -> Result<()> {
    let clock = SystemClock;
    let store = open_store(config)?;
    let kek = Kek::load(config.kek_file.as_deref())?;
    let ring = KeyRing::load(&store, &kek, &config.hub_id, clock.now()).await?;
    print_trust_anchor(&ring.active(clock.now()).public_key());
    Ok(())
}

/// `keys list`: every signing key, oldest first, with the times that decide its use.
pub(super) async fn list(config: &HubConfig, json: bool) -> Result<()> {
    let store = open_store(config)?;
    let now = SystemClock.now();
    let keys = store.keys().await?;
    if json {
        let rows: Vec<serde_json::Value> = keys.iter().map(|k| key_json(k, now)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for k in &keys {
        println!(
            "{}  {:<8} created {}  published {}  active from {}  retire after {}",
            hex::encode(k.kid),
            key_state(k, now),
            when::human_s(k.created_at),
            k.published_at.map_or("not yet".to_string(), when::human_s),
            when::human_s(k.active_from),
            k.retire_after.map_or("-".to_string(), when::human_s)
        );
    }
    Ok(())
}

/// Where a key is in its life at `now`: `retired`, `pending` (not yet published, or
/// published and waiting out its announce period) or `active` (it may sign; the newest
/// active key does).
pub(super) fn key_state(k: &KeyRecord, now: u64) -> &'static str {
    if k.retire_after.is_some_and(|t| t <= now) {
        "retired"
    } else if k.published_at.is_none() || k.active_from > now {
        "pending"
    } else {
        "active"
    }
}

/// One key as `keys list --json` prints it: each time as Unix seconds, and as RFC 3339 in
/// the same name with `_rfc3339`.
fn key_json(k: &KeyRecord, now: u64) -> serde_json::Value {
    serde_json::json!({
        "kid": hex::encode(k.kid),
        "state": key_state(k, now),
        "public_key": hex::encode(&k.public_key),
        "created_at": k.created_at,
        "created_at_rfc3339": when::rfc3339_s(k.created_at),
        "published_at": k.published_at,
        "published_at_rfc3339": k.published_at.map(when::rfc3339_s),
        "active_from": k.active_from,
        "active_from_rfc3339": when::rfc3339_s(k.active_from),
        "retire_after": k.retire_after,
        "retire_after_rfc3339": k.retire_after.map(when::rfc3339_s),
    })
}

pub(super) async fn rotate(config: &HubConfig) -> Result<()> {
    let clock = SystemClock;
    let store = open_store(config)?;
    let policy = Policy::load(&config.policy)?;
    let kek = Kek::load(config.kek_file.as_deref())?;
    let next = keys::rotate(
        &store,
        &kek,
        &config.hub_id,
        clock.now(),
        config.keys.rotation_announce_s,
        policy.longest_token_lifetime_s(),
        policy.leeway_s(),
    )
    .await?;
    println!(
        "next signing key {}: the running hub publishes it in its key set at its next \
         heartbeat and signs with it {} s after that",
        hex::encode(next.kid()),
        config.keys.rotation_announce_s
    );
    Ok(())
}

pub(super) fn print_trust_anchor(key: &PublicKey) {
    let mut cose = [0u8; COSE_KEY_LEN];
    let n = key.to_cose_key(&mut cose).unwrap_or(0);
    println!("trust anchor (the hub's token-signing key)");
    println!("  kid:          {}", hex::encode(key.kid()));
    println!("  COSE_Key hex: {}", hex::encode(&cose[..n]));
    print!("{}", keyfile::public_to_pem(key));
}
