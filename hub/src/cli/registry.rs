//! Registering clients: `device add`, `device import`, `app add`, `operator add`, and the
//! `client` commands (list, remove, set-role).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::policy::Policy;
use tessera_hub::policy_change;
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store};
use tessera_shared::message::{EnrollmentCode, validate_id};

use super::ClientCmd;
use super::open_store;
use super::text::a_kind;

/// `device add`: one device, with its public key or a one-time enrollment code.
pub(super) async fn add_device(
    config: &HubConfig,
    id: &str,
    role: &str,
    groups: Vec<String>,
    key: Option<PathBuf>,
    enrollment_code: bool,
) -> Result<()> {
    let store = open_store(config)?;
    let policy = Policy::load(&config.policy)?;
    check_id_is_free(config, &policy, id)?;
    check_role(&policy, role, ClientKind::Device)?;
    for g in &groups {
        if policy.group(g).is_none() {
            bail!("device group `{g}` is not declared in the policy's [groups]");
        }
    }
    let (public_key, code) = match (key, enrollment_code) {
        (Some(k), false) => (Some(keyfile::read_public(&k)?.to_sec1().to_vec()), None),
        (None, true) => (None, Some(new_enrollment_code()?)),
        _ => bail!("give the device's public key (--key) or ask for --enrollment-code"),
    };
    register(
        &store,
        id,
        ClientKind::Device,
        role,
        groups,
        public_key,
        code.as_deref(),
    )
    .await?;
    println!("registered device {id}");
    if let Some(code) = code {
        println!("one-time enrollment code: {code}");
    }
    Ok(())
}

/// Refuses a client id the hub's tokens or connection already use: the policy's
/// `device_audience` (a client with that id would find itself the audience of every
/// device token of the fleet, and accept them all as its own), the hub's id (the issuer of
/// every token) and the hub's MQTT client id (a client connecting with it would knock the
/// hub off the broker).
pub(super) fn check_id_is_free(config: &HubConfig, policy: &Policy, id: &str) -> Result<()> {
    if id == policy.device_audience() {
        bail!(
            "`{id}` is the policy's device_audience ({}): every device token is issued for \
             it, so a client with this id would accept every device token of the fleet as \
             its own; register it under another id",
            config.policy.display()
        );
    }
    if id == config.hub_id {
        bail!("`{id}` is the hub's own id (hub_id in the configuration); use another id");
    }
    if id == config.mqtt.client_id {
        bail!(
            "`{id}` is the hub's MQTT client id (mqtt.client_id in the configuration): a client \
             connecting with it would knock the hub off the broker; use another id"
        );
    }
    Ok(())
}

/// Refuses a policy whose `device_audience` is the id of a registered client: that client
/// would accept every device token of the fleet as its own.
pub(super) async fn check_audience_is_free(
    store: &Sqlite,
    policy: &Policy,
    file: &Path,
) -> Result<()> {
    let audience = policy.device_audience();
    if let Some(client) = store.client(audience).await? {
        bail!(
            "{}: device_audience `{audience}` is the id of the registered {} `{audience}`, \
             which would accept every device token of the fleet as its own: choose another \
             device_audience, or remove that client (`tessera-hub client remove {audience}`) \
             and register it under another id",
            file.display(),
            client.kind.as_str()
        );
    }
    Ok(())
}

pub(super) fn check_role(policy: &Policy, role: &str, kind: ClientKind) -> Result<()> {
    match policy.role(role) {
        None => bail!("role `{role}` is not defined in the policy"),
        Some(r) if r.kind() != kind => {
            bail!(
                "role `{role}` is {} role, not {} role",
                a_kind(r.kind()),
                a_kind(kind)
            )
        }
        Some(_) => Ok(()),
    }
}

pub(super) fn new_enrollment_code() -> Result<String> {
    // 20 base32 characters: 100 bits, enough that the code cannot be guessed from the
    // HMAC proof that crosses the broker.
    const ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let chars: Vec<u8> = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)])
        .collect();
    let s = String::from_utf8(chars).unwrap_or_default();
    Ok(format!(
        "{}-{}-{}-{}",
        &s[0..5],
        &s[5..10],
        &s[10..15],
        &s[15..20]
    ))
}

async fn register(
    store: &Sqlite,
    id: &str,
    kind: ClientKind,
    role: &str,
    groups: Vec<String>,
    public_key: Option<Vec<u8>>,
    code: Option<&str>,
) -> Result<()> {
    validate_id(id)
        .map_err(|_| anyhow::anyhow!("`{id}` is not a valid id (A-Z a-z 0-9 . _ -, 1..=64)"))?;
    store
        .add_client(ClientRecord {
            id: id.to_string(),
            kind,
            public_key,
            role: role.to_string(),
            groups,
            enrollment_code_key: code.map(EnrollmentCode::derive_key),
            enrolled_at: None,
            revoked_at: None,
            created_at: SystemClock.now(),
        })
        .await?;
    Ok(())
}

pub(super) async fn add_keyed(
    config: &HubConfig,
    id: &str,
    kind: ClientKind,
    role: &str,
    key: &Path,
) -> Result<()> {
    let store = open_store(config)?;
    let policy = Policy::load(&config.policy)?;
    check_id_is_free(config, &policy, id)?;
    check_role(&policy, role, kind)?;
    let key = keyfile::read_public(key)?;
    register(
        &store,
        id,
        kind,
        role,
        Vec::new(),
        Some(key.to_sec1().to_vec()),
        None,
    )
    .await?;
    println!(
        "registered {} {id} (key {})",
        kind.as_str(),
        hex::encode(key.kid())
    );
    Ok(())
}

pub(super) async fn client_cmd(config: &HubConfig, cmd: ClientCmd) -> Result<()> {
    let store = open_store(config)?;
    match cmd {
        ClientCmd::List { kind } => {
            let kind = kind
                .map(|k| ClientKind::parse(&k).with_context(|| format!("unknown kind `{k}`")))
                .transpose()?;
            for c in store.clients(kind).await? {
                let state = match (c.revoked_at, c.enrolled_at, &c.public_key) {
                    (Some(_), _, _) => "revoked",
                    (None, Some(_), _) => "enrolled",
                    (None, None, Some(_)) => "key registered",
                    (None, None, None) => "awaiting enrollment",
                };
                println!(
                    "{:<24} {:<8} role={:<14} groups={:<20} {state}",
                    c.id,
                    c.kind.as_str(),
                    c.role,
                    c.groups.join(",")
                );
            }
        }
        ClientCmd::Remove { id } => {
            if !store.remove_client(&id).await? {
                bail!("no client `{id}`");
            }
            println!("removed {id}");
        }
        ClientCmd::SetRole { id, role } => {
            let policy = Policy::load(&config.policy)?;
            let client = store
                .client(&id)
                .await?
                .with_context(|| format!("no client `{id}`"))?;
            check_role(&policy, &role, client.kind)?;
            match policy_change::change_role(&store, &policy, &client, &role, SystemClock.now())
                .await?
            {
                Some(out) => println!(
                    "role of {id} is now {role}; {} tokens it no longer allows are revoked \
                     ({} entries, {} devices told to refresh; published by the running hub)",
                    out.revoked,
                    out.entry_count(),
                    out.controls.len()
                ),
                None => println!("role of {id} is now {role}; no live token had to be revoked"),
            }
        }
    }
    Ok(())
}
