//! Registering clients: `device add`, `device import`, `app add`, `operator add`, and the
//! `client` commands (list, remove, set-role).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::policy::Policy;
use tessera_hub::policy_change;
use tessera_hub::store::{AnyStore, ClientKind, ClientRecord, Store};
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

/// `device reprovision`: a device revoked whole (or one that never enrolled) gets a new
/// key or one-time enrollment code and enrolls again; its old key is never accepted again.
pub(super) async fn reprovision_device(
    config: &HubConfig,
    id: &str,
    key: Option<PathBuf>,
    enrollment_code: bool,
) -> Result<()> {
    let store = open_store(config)?;
    let (public_key, code) = match (key, enrollment_code) {
        (Some(k), false) => (Some(keyfile::read_public(&k)?.to_sec1().to_vec()), None),
        (None, true) => (None, Some(new_enrollment_code()?)),
        _ => bail!("give the device's new public key (--key) or ask for --enrollment-code"),
    };
    store
        .reprovision_device(
            id,
            public_key,
            code.as_deref().map(EnrollmentCode::derive_key),
        )
        .await
        .with_context(|| format!("cannot provision device {id} again"))?;
    println!(
        "device {id} is provisioned again: it enrolls with {}; tokens revoked before stay \
         revoked",
        if code.is_some() {
            "the code below (the agent makes a new key)"
        } else {
            "the new key"
        }
    );
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
    store: &AnyStore,
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
    store: &AnyStore,
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

/// Where a client is in its life, as `client list` shows it.
fn client_state(c: &ClientRecord) -> &'static str {
    match (c.revoked_at, c.enrolled_at, &c.public_key) {
        (Some(_), _, _) => "revoked",
        (None, Some(_), _) => "enrolled",
        (None, None, Some(_)) => "key registered",
        (None, None, None) => "awaiting enrollment",
    }
}

/// One client as `client list --json` prints it: times as Unix seconds, and as RFC 3339 in
/// the same name with `_rfc3339`; the key by its id (never an enrollment code's hash).
fn client_json(c: &ClientRecord) -> serde_json::Value {
    let kid = c
        .public_key
        .as_deref()
        .and_then(|k| tessera_shared::crypto::PublicKey::from_sec1(k).ok())
        .map(|k| hex::encode(k.kid()));
    serde_json::json!({
        "id": c.id,
        "kind": c.kind.as_str(),
        "role": c.role,
        "groups": c.groups,
        "state": client_state(c),
        "kid": kid,
        "created_at": c.created_at,
        "created_at_rfc3339": super::when::rfc3339_s(c.created_at),
        "enrolled_at": c.enrolled_at,
        "enrolled_at_rfc3339": c.enrolled_at.map(super::when::rfc3339_s),
        "revoked_at": c.revoked_at,
        "revoked_at_rfc3339": c.revoked_at.map(super::when::rfc3339_s),
    })
}

pub(super) async fn client_cmd(config: &HubConfig, cmd: ClientCmd) -> Result<()> {
    let store = open_store(config)?;
    match cmd {
        ClientCmd::List { kind, json } => {
            let kind = kind
                .map(|k| ClientKind::parse(&k).with_context(|| format!("unknown kind `{k}`")))
                .transpose()?;
            let clients = store.clients(kind).await?;
            if json {
                let rows: Vec<serde_json::Value> = clients.iter().map(client_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            for c in clients {
                let state = client_state(&c);
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
                    "role of {id} is now {role}; {} it no longer allows {} revoked \
                     ({}, {} told to refresh; published by the running hub)",
                    super::text::counted(
                        usize::try_from(out.revoked).unwrap_or(usize::MAX),
                        "token",
                        "tokens"
                    ),
                    if out.revoked == 1 { "is" } else { "are" },
                    super::text::counted(
                        usize::try_from(out.entry_count()).unwrap_or(usize::MAX),
                        "entry",
                        "entries"
                    ),
                    super::text::counted(out.controls.len(), "device", "devices")
                ),
                None => println!("role of {id} is now {role}; no live token had to be revoked"),
            }
        }
    }
    Ok(())
}
