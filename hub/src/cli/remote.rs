//! Commands that act over MQTT as a registered client: `revoke` and `lift-quarantine` (as
//! an operator), `access-token` (as an app), `watch` (the operators' event stream).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::client::Client;
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::mqtt::MqttConfig;
use tessera_shared::message::{IdList, MAX_REVOKE_LIST, RevokeTarget, validate_id};
use tessera_shared::scope::Scopes;

use super::Identity;

/// What `revoke` revokes: exactly one target.
#[derive(Args)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    who: Identity,
    /// A token id (cti, hex).
    #[arg(long, group = "target")]
    token_id: Option<String>,
    /// A token hash (hex; SHA-256 of the token's canonical encoding, PROTOCOL.md §6.6).
    #[arg(long, group = "target")]
    token_hash: Option<String>,
    /// Every token issued to this device or app before now, and its refresh grants.
    #[arg(long, group = "target")]
    subject: Option<String>,
    /// A whole device: its tokens, grants and enrollment; it is told to wipe itself.
    #[arg(long, group = "target")]
    device: Option<String>,
    /// Every device in this group, each as --device.
    #[arg(long, group = "target")]
    group: Option<String>,
    /// Every client with this role: devices as --device, apps and operators as --subject.
    #[arg(long, group = "target")]
    role: Option<String>,
    /// Devices listed in a file, one id a line (blank lines and `#` comments skipped),
    /// each as --device. Up to 16384 ids go in one request.
    #[arg(long, group = "target")]
    devices_from: Option<PathBuf>,
}

pub(super) async fn revoke(config: &HubConfig, args: RevokeArgs) -> Result<()> {
    let RevokeArgs {
        who,
        token_id,
        token_hash,
        subject,
        device,
        group,
        role,
        devices_from,
    } = args;
    let cti = token_id
        .map(|h| hex::decode(h).context("--token-id is not hex"))
        .transpose()?;
    let hash = token_hash
        .map(|h| -> Result<[u8; 32]> {
            hex::decode(h)
                .context("--token-hash is not hex")?
                .try_into()
                .map_err(|_| anyhow::anyhow!("--token-hash must be 32 bytes"))
        })
        .transpose()?;
    let listed = devices_from.as_deref().map(read_device_list).transpose()?;
    let lists: Vec<Vec<&str>> = listed
        .iter()
        .flat_map(|ids| revoke_batches(ids, config.requests.max_revoke_request_bytes))
        .collect();
    let mut targets = Vec::new();
    match (&cti, hash, &subject, &device, &group, &role) {
        (Some(c), None, None, None, None, None) => {
            targets.push(RevokeTarget::TokenId(c));
        }
        (None, Some(h), None, None, None, None) => targets.push(RevokeTarget::TokenHash(h)),
        (None, None, Some(s), None, None, None) => targets.push(RevokeTarget::Subject(s)),
        (None, None, None, Some(d), None, None) => targets.push(RevokeTarget::Device(d)),
        (None, None, None, None, Some(g), None) => targets.push(RevokeTarget::Group(g)),
        (None, None, None, None, None, Some(r)) => targets.push(RevokeTarget::Role(r)),
        (None, None, None, None, None, None) if !lists.is_empty() => {
            targets.extend(lists.iter().map(|l| RevokeTarget::Devices(IdList::new(l))));
        }
        _ => bail!(
            "give exactly one of --token-id, --token-hash, --subject, --device, --group, \
             --role, --devices-from"
        ),
    }
    let mut client = connect_as(config, &who).await?;
    let (mut revoked, mut entries, mut notified) = (0, 0, 0);
    let mut failure = None;
    for (i, target) in targets.iter().enumerate() {
        match client.revoke(*target).await {
            Ok(done) => {
                (revoked, entries, notified) = (
                    revoked + done.revoked,
                    entries + done.entries,
                    notified + done.notified,
                );
            }
            Err(e) if targets.len() > 1 => {
                failure = Some(anyhow::anyhow!(
                    "request {} of {} failed ({revoked} revoked before it): {e}",
                    i + 1,
                    targets.len()
                ));
                break;
            }
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        }
    }
    client.close().await;
    if let Some(e) = failure {
        return Err(e);
    }
    println!(
        "revoked {revoked} (durable): {} published, {} told on their control topic",
        super::text::counted(
            usize::try_from(entries).unwrap_or(usize::MAX),
            "revocation entry",
            "revocation entries"
        ),
        super::text::counted(
            usize::try_from(notified).unwrap_or(usize::MAX),
            "device",
            "devices"
        )
    );
    Ok(())
}

pub(super) async fn access_token(
    config: &HubConfig,
    who: &Identity,
    device: &str,
    scope: &str,
    json: bool,
) -> Result<()> {
    validate_id(device).map_err(|_| anyhow::anyhow!("invalid device id `{device}`"))?;
    Scopes::parse(scope).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
    let mut client = connect_as(config, who).await?;
    let answer = client.access_token(device, scope).await;
    client.close().await;
    // The refresh grant stays out of the output: a token needs its holder's key, a grant
    // is closer to a secret.
    let token = answer?;
    if json {
        let document = serde_json::json!({
            "token": hex::encode(token.bytes()),
            "token_hash": hex::encode(token.hash()),
            "claims": super::inspect::dangerous_claims_of_issued(token.bytes())?,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!("{}", hex::encode(token.bytes()));
    }
    Ok(())
}

pub(super) async fn lift_quarantine(config: &HubConfig, who: &Identity, id: &str) -> Result<()> {
    validate_id(id).map_err(|_| anyhow::anyhow!("invalid client id `{id}`"))?;
    let mut client = connect_as(config, who).await?;
    let answer = client.lift_quarantine(id).await;
    client.close().await;
    answer?;
    println!("quarantine of {id} lifted");
    Ok(())
}

/// Prints each message on `topic` (the events or the alerts: JSON, one a line) until
/// `count` have come, or forever.
pub(super) async fn watch(
    config: &HubConfig,
    who: &Identity,
    topic: &str,
    count: Option<usize>,
) -> Result<()> {
    let mut client = connect_as(config, who).await?;
    client.subscribe(topic).await?;
    let mut seen = 0;
    while let Some(msg) = client.next_message().await {
        if msg.topic == topic {
            println!("{}", String::from_utf8_lossy(&msg.payload));
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                break;
            }
        }
    }
    client.close().await;
    Ok(())
}

/// Reads a device list: one id a line; blank lines and `#` comments are skipped and
/// repeated ids kept once. An invalid id is an error naming its line.
fn read_device_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the device list {}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        validate_id(id).map_err(|_| {
            anyhow::anyhow!(
                "{}:{}: `{id}` is not a valid device id (A-Z a-z 0-9 . _ -, 1..=64)",
                path.display(),
                n + 1
            )
        })?;
        if seen.insert(id.to_owned()) {
            ids.push(id.to_owned());
        }
    }
    if ids.is_empty() {
        bail!("{} lists no device", path.display());
    }
    Ok(ids)
}

/// Splits a device list into as few revoke requests as the protocol's limits allow: at
/// most [`MAX_REVOKE_LIST`] ids and about `max_request_bytes` each.
fn revoke_batches(ids: &[String], max_request_bytes: usize) -> Vec<Vec<&str>> {
    // The envelope, the other request fields and the signature take well under 1 KiB.
    let budget = max_request_bytes.saturating_sub(1024);
    let mut batches: Vec<Vec<&str>> = Vec::new();
    let mut used = 0;
    for id in ids {
        // A CBOR text: the id and a head of one or two bytes.
        let len = id.len() + 2;
        match batches.last_mut() {
            Some(batch) if batch.len() < MAX_REVOKE_LIST && used + len <= budget => {
                batch.push(id);
                used += len;
            }
            _ => {
                batches.push(vec![id]);
                used = len;
            }
        }
    }
    batches
}

/// Connects as the client `who` names; its `--timeout-s` bounds the connection and each
/// answer.
pub(super) async fn connect_as(config: &HubConfig, who: &Identity) -> Result<Client> {
    let signer = keyfile::read_private(&who.key)?;
    let anchor = keyfile::read_public(&who.trust_anchor)?;
    let mut mqtt: MqttConfig = config.mqtt.clone();
    mqtt.client_id = who.id.clone();
    // The config's credentials are the hub's own; a client brings its own, if any.
    mqtt.username = who.mqtt_username.clone();
    mqtt.password = who.mqtt_password.clone();
    if let Some(h) = &who.mqtt_host {
        mqtt.host = h.clone();
    }
    if let Some(p) = who.mqtt_port {
        mqtt.port = p;
    }
    let timeout = Duration::from_secs(who.timeout_s);
    Client::connect(&mqtt, &who.id, signer, anchor, timeout)
        .await
        .with_context(|| format!("cannot reach the broker at {}:{}", mqtt.host, mqtt.port))
}
