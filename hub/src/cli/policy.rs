//! `policy check`, `policy force`, `policy explain`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::policy::Policy;
use tessera_hub::policy_change;
use tessera_hub::store::Store;
use tessera_shared::scope::Scopes;

use super::open_store;
use super::registry::check_audience_is_free;
use super::text::counted;

/// Validates a policy file (default: the configured one), and checks it against the
/// registry and live tokens as a running hub would on SIGHUP.
/// Without a hub configuration (`config` is `None`), the file is checked alone.
pub(super) async fn check(config: Option<&HubConfig>, file: Option<PathBuf>) -> Result<()> {
    let Some(file) = file.or_else(|| config.map(|c| c.policy.clone())) else {
        bail!("no hub configuration to take the policy file from: name the file");
    };
    let policy = Policy::load(&file)?;
    // Against the registry too, when there is one to check against: what would
    // make the running hub refuse this file on SIGHUP.
    if let Some(config) = config.filter(|c| c.database.exists()) {
        let store = open_store(config)?;
        check_audience_is_free(&store, &policy, &file).await?;
        let objections =
            policy_change::check(&store, &policy, &config.reload_limits(), SystemClock.now())
                .await?;
        if !objections.is_empty() {
            for o in &objections {
                eprintln!("{}: {o}", file.display());
            }
            bail!(
                "{}: a running hub would refuse this policy; to apply it anyway, \
                 `tessera-hub policy force {}` (or `sha256sum {} > {}`), then SIGHUP",
                file.display(),
                file.display(),
                file.display(),
                tessera_hub::policy::force_marker(&file).display()
            );
        }
    }
    println!(
        "{}: ok ({}, {}, {})",
        file.display(),
        counted(policy.roles().count(), "role", "roles"),
        counted(policy.groups().count(), "group", "groups"),
        counted(policy.rules().len(), "access rule", "access rules")
    );
    if config.is_none() {
        println!("(no hub configuration: checked the file alone, not against a registry)");
    }
    Ok(())
}

/// Writes the marker that forces the next reload of a policy file.
pub(super) fn force(config: &HubConfig, file: Option<PathBuf>) -> Result<()> {
    let file = file.unwrap_or_else(|| config.policy.clone());
    let candidate = tessera_hub::policy::write_force_marker(&file)?;
    println!(
        "{}: the next reload applies this file (sha256 {}) whatever it revokes; \
         send the hub SIGHUP",
        tessera_hub::policy::force_marker(&file).display(),
        hex::encode(candidate.digest)
    );
    Ok(())
}

/// Explains whether an app would get scopes on a device; fails on a denial, like `grep`
/// (after printing the explanation, as JSON too).
pub(super) async fn explain(
    config: &HubConfig,
    app: &str,
    device: &str,
    scope: &str,
    json: bool,
) -> Result<()> {
    let store = open_store(config)?;
    let policy = Policy::load(&config.policy)?;
    let app = store
        .client(app)
        .await?
        .with_context(|| format!("no client `{app}`"))?;
    let device = store
        .client(device)
        .await?
        .with_context(|| format!("no client `{device}`"))?;
    let scopes = Scopes::parse(scope).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
    let explanation = policy.explain_access(&app, &device, &scopes);
    if json {
        let (grant, denial) = match &explanation.verdict {
            Ok(g) => (
                serde_json::json!({
                    "scope": g.scope,
                    "lifetime_s": g.lifetime_s,
                    "grant_lifetime_s": g.grant_lifetime_s,
                }),
                serde_json::Value::Null,
            ),
            Err(d) => (
                serde_json::Value::Null,
                serde_json::json!({ "code": d.code.as_str(), "reason": d.reason }),
            ),
        };
        let document = serde_json::json!({
            "app": app.id,
            "device": device.id,
            "requested": scopes.as_str(),
            "allowed": explanation.verdict.is_ok(),
            "grant": grant,
            "denial": denial,
            "lines": explanation.lines,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!("{explanation}");
    }
    // Like `grep`, the exit status answers the question, for scripts.
    if let Err(denial) = &explanation.verdict {
        bail!(
            "denied ({}): {} would not get \"{scope}\" on {}",
            denial.code,
            app.id,
            device.id
        );
    }
    Ok(())
}
