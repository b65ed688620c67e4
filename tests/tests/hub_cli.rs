//! Operator tooling of the `tessera-hub` binary (issue 9, "Operator tooling people
//! expect"): `--json` on the commands that list or print, `audit` filters read in the
//! database with human times, `token inspect` and `revocations`.
//!
//! Most tests need no broker: the hub's own keys sign tokens in the test process (as the
//! hub would) and its store records and revokes them, then the binary reads the same
//! database. One test goes through a real hub and Mosquitto end to end.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Output;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tessera_hub::config::HubConfig;
use tessera_hub::keys::{Kek, KeyRing};
use tessera_hub::revocation::Target;
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{AuditEvent, IssuedToken, Sqlite, Store, TokenKind, Unmatched};
use tessera_shared::claims::Claims;
use tessera_shared::crypto::{PublicKey, Signer};
use tessera_shared::revocation::token_hash;
use tessera_shared::scope::Scopes;
use tessera_shared::token;
use tessera_tests::hub::{HubDir, TestHub, generate_signer, random_bytes, unix_now};

/// Runs a CLI command against `dir`, whatever its exit status.
fn run_any(dir: &HubDir, args: &[&str]) -> Result<Output> {
    dir.command()?
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running tessera-hub {}", args.join(" ")))
}

/// Runs a CLI command that must succeed and print one JSON document.
fn run_json(dir: &HubDir, args: &[&str]) -> Result<Value> {
    let stdout = dir.run(args)?;
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "`tessera-hub {}` printed no JSON:\n{stdout}",
            args.join(" ")
        )
    })
}

/// The JSON document a command printed, whether it succeeded or not.
fn json_of(output: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "no JSON on stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn array(v: &Value) -> &Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {v}"))
}

/// A token as the hub issues it, signed in the test process with the hub's active key,
/// recorded in its store as the hub records what it issues.
struct Minted {
    bytes: Vec<u8>,
    cti: [u8; 16],
}

/// Signs an access token for `app` (holding `holder`) on `device` with the hub's active
/// key, issued at `iat` and valid for `lifetime_s`, and records it unless told not to.
async fn mint(
    dir: &HubDir,
    app: &str,
    holder: &PublicKey,
    device: &str,
    iat: u64,
    lifetime_s: u64,
    signer: Option<&dyn Signer>,
) -> Result<Minted> {
    let config = HubConfig::load(&dir.config_path())?;
    let store = Sqlite::open_existing(&config.database)?;
    let kek = Kek::load(config.kek_file.as_deref())?;
    let ring = KeyRing::load(&store, &kek, dir.hub_id(), unix_now()).await?;
    let cti: [u8; 16] = random_bytes();
    let claims = Claims {
        iss: dir.hub_id(),
        sub: app,
        aud: device,
        exp: iat + lifetime_s,
        nbf: None,
        iat,
        cti: &cti,
        cnf: *holder,
        scope: Scopes::parse("door:open").map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let mut out = vec![0u8; 1024];
    let signer: &dyn Signer = match signer {
        Some(s) => s,
        None => ring.active(unix_now()),
    };
    let n = token::issue(&claims, signer, &mut out).map_err(|e| anyhow::anyhow!("{e}"))?;
    out.truncate(n);
    store
        .record_issued(
            IssuedToken {
                cti,
                hash: token_hash(&out),
                kind: TokenKind::Access,
                subject: app.to_owned(),
                audience: device.to_owned(),
                scope: "door:open".to_owned(),
                issued_at: iat,
                expires_at: iat + lifetime_s,
            },
            None,
        )
        .await?;
    Ok(Minted { bytes: out, cti })
}

/// A hub directory with a device `dev-1` and an app `app-1`; returns the app's public key.
fn hub_with_clients() -> Result<(HubDir, PublicKey)> {
    let dir = HubDir::init("hub-cli")?;
    dir.add_device("dev-1", "sensor", &["building-a"])?;
    let app = dir.add_app("app-1", "controller")?;
    Ok((dir, app.public_key()?))
}

#[test]
fn client_list_keys_list_and_policy_explain_print_json_with_stable_fields() -> Result<()> {
    let (dir, app_key) = hub_with_clients()?;

    let clients = run_json(&dir, &["client", "list", "--json"])?;
    let find = |id: &str| {
        array(&clients)
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {clients}"))
    };
    let device = find("dev-1");
    assert_eq!(device["kind"], "device");
    assert_eq!(device["role"], "sensor");
    assert_eq!(device["groups"], serde_json::json!(["building-a"]));
    assert_eq!(device["state"], "key registered");
    assert!(device["created_at"].is_u64(), "{device}");
    assert!(device["enrolled_at"].is_null(), "{device}");
    let app = find("app-1");
    assert_eq!(app["kind"], "app");
    assert_eq!(app["kid"], hex::encode(app_key.kid()));
    let apps = run_json(&dir, &["client", "list", "--kind", "app", "--json"])?;
    assert_eq!(array(&apps).len(), 1, "{apps}");
    // Without --json, people's text, as before.
    let text = dir.run(&["client", "list"])?;
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    assert!(
        text.contains("dev-1") && text.contains("role=sensor"),
        "{text}"
    );

    let keys = run_json(&dir, &["keys", "list", "--json"])?;
    let [key] = array(&keys).as_slice() else {
        panic!("one signing key after init: {keys}");
    };
    assert_eq!(key["kid"], hex::encode(dir.trust_anchor().kid()));
    assert_eq!(key["state"], "active");
    let created = key["created_at"].as_u64().context("created_at")?;
    assert!(created.abs_diff(unix_now()) < 600, "{key}");
    let rfc3339 = key["created_at_rfc3339"].as_str().context("rfc3339")?;
    assert!(rfc3339.ends_with('Z') && rfc3339.contains('T'), "{rfc3339}");
    assert!(key["retire_after"].is_null(), "{key}");
    let text = dir.run(&["keys", "list"])?;
    assert!(
        text.contains(&hex::encode(dir.trust_anchor().kid())),
        "{text}"
    );
    assert!(!text.contains(&created.to_string()), "human times: {text}");

    let allowed = run_json(
        &dir,
        &[
            "policy",
            "explain",
            "--app",
            "app-1",
            "--device",
            "dev-1",
            "--scope",
            "door:open",
            "--json",
        ],
    )?;
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["grant"]["scope"], "door:open");
    assert!(
        allowed["grant"]["lifetime_s"]
            .as_u64()
            .is_some_and(|s| s > 0)
    );
    assert!(allowed["denial"].is_null());
    assert!(!array(&allowed["lines"]).is_empty());
    let denied = run_any(
        &dir,
        &[
            "policy",
            "explain",
            "--app",
            "app-1",
            "--device",
            "dev-1",
            "--scope",
            "vault:open",
            "--json",
        ],
    )?;
    assert!(!denied.status.success(), "a denial still fails, like grep");
    let denied = json_of(&denied)?;
    assert_eq!(denied["allowed"], false);
    assert_eq!(denied["denial"]["code"], "not_allowed");
    assert!(denied["grant"].is_null());
    Ok(())
}

/// 2025-06-15 15:06:40 UTC, in milliseconds: long before anything the CLI audits itself.
const T_MS: u64 = 1_750_000_000_000;

fn event(offset_s: u64, actor: &str, action: &str, target: &str) -> AuditEvent {
    AuditEvent {
        at_ms: T_MS + offset_s * 1000,
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        outcome: "ok".to_owned(),
        reason: format!("event at +{offset_s}s"),
        count: 1,
    }
}

fn reasons(rows: &Value) -> Vec<String> {
    array(rows)
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn audit_filters_return_only_the_matching_entries_with_human_times() -> Result<()> {
    let dir = HubDir::init("hub-cli")?;
    {
        let store = Sqlite::open_existing(&dir.database_path())?;
        store
            .audit(vec![
                event(0, "app-a", "access_token", "dev-a"),
                event(10, "app-b", "access_token", "dev-a"),
                event(20, "app-a", "access_token", "dev-b"),
                event(30, "op-1", "revoke", "dev-a"),
                event(40, "app-a", "access_token", "dev-a"),
            ])
            .await?;
    }

    let by_client = run_json(&dir, &["audit", "--client", "app-a", "--json"])?;
    assert_eq!(
        reasons(&by_client),
        ["event at +0s", "event at +20s", "event at +40s"]
    );
    let first = &array(&by_client)[0];
    assert_eq!(first["at_ms"], T_MS);
    assert_eq!(first["at_rfc3339"], "2025-06-15T15:06:40Z");
    for key in ["actor", "action", "target", "outcome", "reason", "count"] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(
        reasons(&run_json(&dir, &["audit", "--device", "dev-b", "--json"])?),
        ["event at +20s"]
    );
    assert_eq!(
        reasons(&run_json(&dir, &["audit", "--action", "revoke", "--json"])?),
        ["event at +30s"]
    );
    // RFC 3339 and Unix seconds; from inclusive, until exclusive.
    assert_eq!(
        reasons(&run_json(
            &dir,
            &[
                "audit",
                "--since",
                "2025-06-15T15:06:50Z",
                "--until",
                "1750000030",
                "--json",
            ],
        )?),
        ["event at +10s", "event at +20s"]
    );
    assert_eq!(
        reasons(&run_json(
            &dir,
            &[
                "audit", "--client", "app-a", "--device", "dev-a", "--limit", "1", "--json"
            ],
        )?),
        ["event at +40s"],
        "the most recent match"
    );
    // Relative: the test's events are long past, so the last hour holds none of them.
    let recent = run_json(
        &dir,
        &["audit", "--since", "1h", "--client", "app-a", "--json"],
    )?;
    assert!(array(&recent).is_empty(), "{recent}");
    let stderr = dir.run_failing(&["audit", "--since", "yesterday"])?;
    assert!(
        stderr.contains("--since") && stderr.contains("RFC 3339"),
        "{stderr}"
    );

    let text = dir.run(&["audit", "--client", "app-a"])?;
    assert!(text.contains("2025-06-15 15:06:40Z"), "{text}");
    assert!(
        !text.contains(&T_MS.to_string()),
        "no raw milliseconds: {text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
    Ok(())
}

#[tokio::test]
async fn token_inspect_shows_a_valid_token_valid_and_a_tampered_one_invalid() -> Result<()> {
    let (dir, app_key) = hub_with_clients()?;
    let now = unix_now();
    let minted = mint(&dir, "app-1", &app_key, "dev-1", now, 300, None).await?;
    let token_hex = hex::encode(&minted.bytes);

    let output = run_any(&dir, &["token", "inspect", &token_hex, "--json"])?;
    ensure!(
        output.status.success(),
        "a valid token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json_of(&output)?;
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["signature"], "valid");
    assert_eq!(report["lifetime"], "valid");
    assert_eq!(report["expired"], false);
    assert_eq!(report["revoked"], false);
    assert_eq!(report["revocation"]["issued_record"], "access");
    assert_eq!(report["kid"], hex::encode(dir.trust_anchor().kid()));
    assert_eq!(report["token_hash"], hex::encode(token_hash(&minted.bytes)));
    let claims = &report["claims"];
    assert_eq!(claims["iss"], "hub-cli");
    assert_eq!(claims["sub"], "app-1");
    assert_eq!(claims["aud"], "dev-1");
    assert_eq!(claims["scope"], "door:open");
    assert_eq!(claims["iat"], now);
    assert_eq!(claims["exp"], now + 300);
    assert!(
        claims["exp_rfc3339"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(claims["cti"], hex::encode(minted.cti));
    assert_eq!(claims["cnf_kid"], hex::encode(app_key.kid()));
    assert_eq!(claims["cnf_thumbprint"], hex::encode(app_key.thumbprint()));

    let text = dir.run(&["token", "inspect", &token_hex])?;
    for expected in [
        "signature: valid",
        "revoked:   no",
        "verdict:   valid",
        "app-1",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }

    // One bit of the signature flipped: the claims still show, marked, and it is refused.
    let mut tampered = minted.bytes.clone();
    *tampered.last_mut().unwrap() ^= 0x01;
    let output = run_any(
        &dir,
        &["token", "inspect", &hex::encode(&tampered), "--json"],
    )?;
    assert!(
        !output.status.success(),
        "a tampered token fails the command"
    );
    let report = json_of(&output)?;
    assert_eq!(report["valid"], false);
    assert_eq!(report["signature"], "invalid");
    assert_eq!(report["claims_verified"], false);
    assert_eq!(
        report["refused_because"],
        serde_json::json!(["its signature does not verify"])
    );
    assert_eq!(report["claims"]["sub"], "app-1");
    let output = run_any(&dir, &["token", "inspect", &hex::encode(&tampered)])?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("INVALID") && text.contains("NOT VERIFIED"),
        "{text}"
    );

    // Signed by a key the hub does not hold.
    let stranger = generate_signer();
    let forged = mint(
        &dir,
        "app-1",
        &app_key,
        "dev-1",
        now,
        300,
        Some(&stranger as &dyn Signer),
    )
    .await?;
    let report = json_of(&run_any(
        &dir,
        &["token", "inspect", &hex::encode(&forged.bytes), "--json"],
    )?)?;
    assert_eq!(report["signature"], "unknown_key");
    assert_eq!(report["valid"], false);

    // Expired, however well signed.
    let old = mint(&dir, "app-1", &app_key, "dev-1", now - 3600, 300, None).await?;
    let output = run_any(
        &dir,
        &["token", "inspect", &hex::encode(&old.bytes), "--json"],
    )?;
    assert!(!output.status.success());
    let report = json_of(&output)?;
    assert_eq!(report["signature"], "valid");
    assert_eq!(report["lifetime"], "expired");
    assert_eq!(report["expired"], true);
    assert_eq!(report["valid"], false);
    Ok(())
}

#[tokio::test]
async fn token_inspect_reads_files_and_checks_with_a_trust_anchor_without_a_hub() -> Result<()> {
    let (dir, app_key) = hub_with_clients()?;
    let minted = mint(&dir, "app-1", &app_key, "dev-1", unix_now(), 300, None).await?;
    let hex_file = dir.path().join("token.hex");
    std::fs::write(&hex_file, format!("{}\n", hex::encode(&minted.bytes)))?;
    let raw_file = dir.path().join("token.cbor");
    std::fs::write(&raw_file, &minted.bytes)?;
    let anchor = dir.trust_anchor_path().to_string_lossy().into_owned();

    for file in [&hex_file, &raw_file] {
        // No hub configuration at all: only the anchor.
        let output = tessera_tests::hub::run_checked(
            std::process::Command::new(tessera_tests::cargo_bin("tessera-hub")?)
                .args([
                    "--config",
                    "/nonexistent/tessera-hub.toml",
                    "token",
                    "inspect",
                ])
                .arg(file)
                .args(["--trust-anchor", &anchor, "--json"]),
        )?;
        let report: Value = serde_json::from_str(&output)?;
        assert_eq!(report["signature"], "valid", "{}", file.display());
        assert_eq!(report["valid"], true);
        assert!(
            report["revoked"].is_null(),
            "unknown without the hub: {report}"
        );
    }
    // Another anchor does not know the key.
    let other = dir.keygen("other")?;
    let other = other.public_path().to_string_lossy().into_owned();
    let output = run_any(
        &dir,
        &[
            "token",
            "inspect",
            &hex::encode(&minted.bytes),
            "--trust-anchor",
            &other,
            "--json",
        ],
    )?;
    assert_eq!(json_of(&output)?["signature"], "unknown_key");
    let stderr = dir.run_failing(&["token", "inspect", "not-a-token"])?;
    assert!(
        stderr.contains("neither a file nor a token in hex"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn revocations_list_an_entry_after_a_revoke_and_inspect_says_revoked() -> Result<()> {
    let (dir, app_key) = hub_with_clients()?;
    let now = unix_now();
    let minted = mint(&dir, "app-1", &app_key, "dev-1", now, 300, None).await?;
    let hash = token_hash(&minted.bytes);

    let before = run_json(&dir, &["revocations", "--json"])?;
    assert!(
        array(&before)
            .iter()
            .all(|s| array(&s["entries"]).is_empty()),
        "{before}"
    );
    {
        let store = Sqlite::open_existing(&dir.database_path())?;
        store
            .revoke(vec![Target::TokenHash(hash)], now, 30, Unmatched::Refuse)
            .await?;
    }

    let streams = run_json(&dir, &["revocations", "--json"])?;
    let entries: Vec<&Value> = array(&streams)
        .iter()
        .flat_map(|s| array(&s["entries"]))
        .collect();
    let [entry] = entries.as_slice() else {
        panic!("one entry after one revocation: {streams}");
    };
    assert_eq!(entry["kind"], "token");
    assert_eq!(entry["token_hash"], hex::encode(hash));
    assert_eq!(entry["audience"], "dev-1");
    assert!(entry["seq"].as_u64().is_some_and(|s| s >= 1), "{entry}");
    assert!(entry["expires_at"].as_u64().is_some_and(|t| t >= now + 300));
    assert!(
        entry["stream"]
            .as_str()
            .is_some_and(|s| s.starts_with("devices/"))
    );
    let text = dir.run(&["revocations"])?;
    assert!(text.contains(&hex::encode(hash)), "{text}");
    assert!(text.contains("1 entry in force on 1 stream"), "{text}");

    let output = run_any(
        &dir,
        &["token", "inspect", &hex::encode(&minted.bytes), "--json"],
    )?;
    assert!(
        !output.status.success(),
        "a revoked token fails the command"
    );
    let report = json_of(&output)?;
    assert_eq!(report["signature"], "valid");
    assert_eq!(report["revoked"], true);
    assert_eq!(report["valid"], false);
    assert_eq!(
        array(&report["revocation"]["entries"])[0]["token_hash"],
        hex::encode(hash)
    );
    let output = run_any(&dir, &["token", "inspect", &hex::encode(&minted.bytes)])?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("revoked:   YES"), "{text}");
    assert!(text.contains("verdict:   REFUSED: it is revoked"), "{text}");
    Ok(())
}

/// Through a real hub: `access-token --json` prints the token and its claims, `token
/// inspect` accepts it, and once an operator revokes it over MQTT, `revocations` and
/// `token inspect` say so.
#[tokio::test]
async fn an_access_token_from_a_real_hub_inspects_valid_until_revoked() -> Result<()> {
    let hub = TestHub::builder().start().await?;
    let dir = hub.dir();
    dir.add_device("e2e-door", "sensor", &["building-a"])?;
    let app_key = dir.add_app("e2e-app", "controller")?;
    let op_key = dir.add_operator("e2e-op", "ops")?;

    let mut args = vec!["access-token".to_owned()];
    args.extend(dir.identity_args("e2e-app", &app_key));
    args.extend(["--device", "e2e-door", "--scope", "door:open", "--json"].map(String::from));
    let printed = run_json(dir, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let token_hex = printed["token"].as_str().context("token")?.to_owned();
    assert_eq!(printed["claims"]["sub"], "e2e-app");
    assert_eq!(printed["claims"]["aud"], "e2e-door");
    assert_eq!(printed["claims"]["scope"], "door:open");
    assert!(printed.get("grant").is_none(), "no refresh grant printed");
    let cti = printed["claims"]["cti"].as_str().context("cti")?.to_owned();

    let report = run_json(dir, &["token", "inspect", &token_hex, "--json"])?;
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["revocation"]["issued_record"], "access");

    let mut args = vec!["revoke".to_owned()];
    args.extend(dir.identity_args("e2e-op", &op_key));
    args.extend(["--token-id".to_owned(), cti]);
    dir.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;

    let streams = run_json(dir, &["revocations", "--json"])?;
    assert!(
        array(&streams)
            .iter()
            .flat_map(|s| array(&s["entries"]))
            .any(|e| e["audience"] == "e2e-door"),
        "{streams}"
    );
    let output = run_any(dir, &["token", "inspect", &token_hex, "--json"])?;
    assert!(!output.status.success());
    assert_eq!(json_of(&output)?["revoked"], true);
    let audited = run_json(
        dir,
        &[
            "audit", "--client", "e2e-op", "--action", "revoke", "--json",
        ],
    )?;
    assert_eq!(array(&audited).len(), 1, "{audited}");
    Ok(())
}
