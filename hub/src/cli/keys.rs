//! `trust-anchor`, `keys list`, `keys rotate`.

use anyhow::Result;
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::policy::Policy;
use tessera_hub::store::Store;
use tessera_shared::crypto::{COSE_KEY_LEN, PublicKey, Signer};

use super::open_store;

/// Prints the active signing key in every format.
pub(super) async fn trust_anchor(config: &HubConfig) -> Result<()> {
    let clock = SystemClock;
    let store = open_store(config)?;
    let kek = Kek::load(config.kek_file.as_deref())?;
    let ring = KeyRing::load(&store, &kek, &config.hub_id, clock.now()).await?;
    print_trust_anchor(&ring.active(clock.now()).public_key());
    Ok(())
}

pub(super) async fn list(config: &HubConfig) -> Result<()> {
    let store = open_store(config)?;
    for k in store.keys().await? {
        println!(
            "{}  created {}  published {}  active from {}  retire after {}",
            hex::encode(k.kid),
            k.created_at,
            k.published_at
                .map_or("not yet".to_string(), |t| t.to_string()),
            k.active_from,
            k.retire_after.map_or("-".to_string(), |t| t.to_string())
        );
    }
    Ok(())
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
