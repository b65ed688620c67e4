//! `device import`: a fleet registered from a CSV file, in one transaction.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::policy::Policy;
use tessera_hub::store::{ClientKind, ClientRecord, Store};
use tessera_shared::message::{EnrollmentCode, validate_id};

use super::open_store;
use super::registry::{check_id_is_free, check_role, new_enrollment_code};
use super::text::counted;

/// `device import`: registers every device of a CSV file in one transaction.
pub(super) async fn import_devices(config: &HubConfig, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let policy = Policy::load(&config.policy)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let now = SystemClock.now();
    let mut records = Vec::new();
    let mut codes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", file.display(), n + 1);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [id, role, groups, key] = fields[..] else {
            bail!(
                "{}: expected `id,role,groups,key` (4 fields), found {}",
                at(),
                fields.len()
            );
        };
        validate_id(id).map_err(|_| anyhow::anyhow!("{}: `{id}` is not a valid id", at()))?;
        check_id_is_free(config, &policy, id).with_context(at)?;
        check_role(&policy, role, ClientKind::Device).with_context(at)?;
        let groups: Vec<String> = groups
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        for g in &groups {
            if policy.group(g).is_none() {
                bail!("{}: device group `{g}` is not declared in the policy", at());
            }
        }
        let (public_key, code_key) = if key.is_empty() {
            let code = new_enrollment_code()?;
            let derived = EnrollmentCode::derive_key(&code);
            codes.push((id.to_owned(), code));
            (None, Some(derived))
        } else {
            let path = base.join(key);
            (
                Some(
                    keyfile::read_public(&path)
                        .with_context(at)?
                        .to_sec1()
                        .to_vec(),
                ),
                None,
            )
        };
        records.push(ClientRecord {
            id: id.to_owned(),
            kind: ClientKind::Device,
            public_key,
            role: role.to_owned(),
            groups,
            enrollment_code_key: code_key,
            enrolled_at: None,
            revoked_at: None,
            created_at: now,
        });
    }
    let count = records.len();
    open_store(config)?.add_clients(records).await?;
    eprintln!(
        "registered {} from {}",
        counted(count, "device", "devices"),
        file.display()
    );
    for (id, code) in codes {
        println!("{id},{code}");
    }
    Ok(())
}
