//! `tessera-hub present`, the control app's half of the app → device path with the shipped
//! binaries: an app gets an access token from a real hub (`access-token`), `present` signs
//! it for one device, and the protocol core's verifier, as a device runs it
//! (`SignedPresentation::verify`, PROTOCOL.md §13), accepts it, or refuses it when it was
//! signed with a key other than the token's. The last test takes the whole path: a real
//! `tessera-agent` enrolled with a one-time code checks the presentation on its socket.
//!
//! The tests share one hub and broker (see `SharedHub`); each uses its own client ids.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tessera_shared::Error;
use tessera_shared::error::ClaimsError;
use tessera_shared::message::SignedPresentation;
use tessera_shared::token::Validation;
use tessera_tests::agent::Agent;
use tessera_tests::hub::{SharedHub, TestHub, TestKey, run_checked, unix_now};
use tessera_tests::wait_until_blocking;

/// The presentation window devices use by default (`presentation_window_s`).
const WINDOW_S: u64 = 60;

static HUB: SharedHub = SharedHub::new();

async fn hub() -> Result<Arc<TestHub>> {
    HUB.get(|| {
        TestHub::builder()
            // An agent's revocation knowledge is fresh (and it checks presentations) only
            // once a heartbeat has come.
            .config("heartbeat_s = 30", "heartbeat_s = 1")
            .start()
    })
    .await
}

/// `tessera-hub access-token` as `app` for `device` and `scope`: the token's hex.
fn access_token(
    hub: &TestHub,
    app: &str,
    key: &TestKey,
    device: &str,
    scope: &str,
) -> Result<String> {
    let mut args = vec!["access-token".to_owned()];
    args.extend(hub.dir().identity_args(app, key));
    args.extend(["--device", device, "--scope", scope].map(String::from));
    let printed = hub
        .dir()
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(printed.trim().to_owned())
}

/// `tessera-hub present --key <key> --token <hex> --device <device>`: the presentation.
fn present(hub: &TestHub, key: &TestKey, token_hex: &str, device: &str) -> Result<Vec<u8>> {
    let key = key.private_path().to_string_lossy().into_owned();
    let printed = hub.dir().run(&[
        "present", "--key", &key, "--token", token_hex, "--device", device,
    ])?;
    hex::decode(printed.trim()).context("present prints hex")
}

/// What a device with id `device` decides about `presentation` for `scope` now.
fn device_checks<'a>(
    hub: &TestHub,
    presentation: &'a [u8],
    device: &str,
    scope: &str,
) -> Result<SignedPresentation<'a>, Error> {
    let validation = Validation::new(unix_now(), device)
        .with_scope(scope)
        .with_issuer(hub.dir().hub_id());
    SignedPresentation::verify(presentation, &hub.trust_anchor(), &validation, WINDOW_S)
}

#[tokio::test]
async fn a_presentation_built_by_the_cli_is_accepted_by_its_device_for_the_tokens_scope()
-> Result<()> {
    let hub = hub().await?;
    let (device, app) = ("pr-door-1", "pr-app-1");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app, "controller")?;
    let token = access_token(&hub, app, &app_key, device, "door:open")?;

    let before = unix_now();
    let presentation = present(&hub, &app_key, &token, device)?;
    let accepted = device_checks(&hub, &presentation, device, "door:open")
        .map_err(|e| anyhow::anyhow!("the device refused the CLI's presentation: {e}"))?;
    assert_eq!(accepted.token.claims().sub, app, "presented by the app");
    assert_eq!(accepted.token.as_bytes(), hex::decode(&token)?.as_slice());
    assert!(
        (before..=unix_now()).contains(&accepted.issued_at),
        "issued_at is now: {} not in {before}..",
        accepted.issued_at
    );

    // Each presentation has a fresh nonce, so a device's replay cache takes both.
    let again = present(&hub, &app_key, &token, device)?;
    let second = device_checks(&hub, &again, device, "door:open").map_err(anyhow::Error::msg)?;
    assert_ne!(accepted.nonce, second.nonce, "a fresh nonce each time");

    // Another device, or a scope the token does not grant, still refuses it.
    assert_eq!(
        device_checks(&hub, &presentation, "pr-door-other", "door:open").map(|_| ()),
        Err(ClaimsError::WrongAudience.into())
    );
    assert_eq!(
        device_checks(&hub, &presentation, device, "door:unlock").map(|_| ()),
        Err(ClaimsError::MissingScope.into())
    );
    Ok(())
}

#[tokio::test]
async fn a_presentation_signed_with_a_key_other_than_the_tokens_is_refused_as_no_proof_of_possession()
-> Result<()> {
    let hub = hub().await?;
    let (device, app) = ("pr-door-2", "pr-app-2");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app, "controller")?;
    let token = access_token(&hub, app, &app_key, device, "door:open")?;

    // Someone who copied the token but holds another key (here a registered app's own).
    let thief_key = hub.dir().add_app("pr-thief-2", "controller")?;
    let stolen = present(&hub, &thief_key, &token, device)?;
    assert_eq!(
        device_checks(&hub, &stolen, device, "door:open").map(|_| ()),
        Err(ClaimsError::ProofOfPossession.into())
    );

    // The app's own key on the same token passes: the key made the difference.
    let genuine = present(&hub, &app_key, &token, device)?;
    device_checks(&hub, &genuine, device, "door:open").map_err(anyhow::Error::msg)?;
    Ok(())
}

#[tokio::test]
async fn present_refuses_a_token_that_is_not_hex_and_a_device_id_that_is_not_an_id() -> Result<()> {
    let hub = hub().await?;
    let key = hub.dir().keygen("pr-app-3")?;
    let key = key.private_path().to_string_lossy().into_owned();
    let not_hex = hub.dir().run_failing(&[
        "present",
        "--key",
        &key,
        "--token",
        "xyz",
        "--device",
        "pr-door-3",
    ])?;
    assert!(not_hex.contains("--token is not hex"), "{not_hex}");
    let bad_id = hub.dir().run_failing(&[
        "present", "--key", &key, "--token", "d284", "--device", "door 3",
    ])?;
    assert!(bad_id.contains("invalid device id"), "{bad_id}");
    Ok(())
}

#[tokio::test]
async fn a_running_agent_accepts_the_clis_presentation_and_refuses_it_signed_with_another_key()
-> Result<()> {
    let hub = hub().await?;
    let (device, app) = ("pr-door-4", "pr-app-4");
    let code = hub
        .dir()
        .add_device_with_code(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app, "controller")?;
    let thief_key = hub.dir().keygen("pr-thief-4")?;
    let agent = Agent::enroll(&hub, device, &code)?;
    let mut run = agent.run_until_checking()?;

    let token = access_token(&hub, app, &app_key, device, "door:open")?;
    let presentation = present(&hub, &app_key, &token, device)?;
    let (accepted, printed) = agent.verify("door:open", &presentation)?;
    assert!(
        accepted,
        "the agent refused the app's presentation: {printed}"
    );
    assert_eq!(printed.trim(), format!("accepted: presented by {app}"));

    let stolen = present(&hub, &thief_key, &token, device)?;
    let (accepted, printed) = agent.verify("door:open", &stolen)?;
    assert!(
        !accepted,
        "the agent accepted a presentation signed with another key"
    );
    assert!(printed.contains("did not prove possession"), "{printed}");

    let status = run.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "the agent stopped with {status}");
    Ok(())
}

/// The client library (`tessera-client`) as a control app uses it: a token asked for twice
/// is asked of the hub once (cached), renewed through its refresh grant when asked to, and
/// presented; a running agent accepts the presentation, and refuses that token once an
/// operator revokes it through the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_caches_renews_and_presents_a_token_a_running_agent_accepts()
-> Result<()> {
    let hub = hub().await?;
    let (device, app, ops) = ("pr-door-5", "pr-app-5", "pr-ops-5");
    let code = hub
        .dir()
        .add_device_with_code(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app, "controller")?;
    let ops_key = hub.dir().add_operator(ops, "ops")?;
    let agent = Agent::enroll(&hub, device, &code)?;
    let mut run = agent.run_until_checking()?;

    let mut client = hub.client(app, &app_key).await?;
    let first = client.access_token(device, "door:open").await?;
    assert_eq!(first.device(), device);
    assert!(first.expires_at() > unix_now(), "{first:?}");
    let cached = client.access_token(device, "door:open").await?;
    // A second request would have brought a token with another id.
    assert_eq!(cached, first, "the token held is reused before it is due");
    let renewed = client.renew(device, "door:open").await?;
    assert_ne!(renewed.bytes(), first.bytes(), "a new token");
    assert_eq!(client.access_token(device, "door:open").await?, renewed);
    let refreshes = hub
        .dir()
        .run(&["audit", "--client", app, "--action", "refresh", "--json"])?;
    let refreshes: Vec<serde_json::Value> =
        serde_json::from_str(&refreshes).with_context(|| format!("audit --json: {refreshes}"))?;
    assert_eq!(
        refreshes.len(),
        1,
        "renewed through the grant: {refreshes:?}"
    );
    assert_eq!(refreshes[0]["outcome"], "ok", "{refreshes:?}");

    let presentation = client.present(&renewed)?;
    let (accepted, printed) = agent.verify("door:open", &presentation)?;
    assert!(
        accepted,
        "the agent refused the library's presentation: {printed}"
    );
    assert_eq!(printed.trim(), format!("accepted: presented by {app}"));

    let mut operator = hub.client(ops, &ops_key).await?;
    let revoked = operator
        .revoke(tessera_shared::message::RevokeTarget::TokenHash(
            renewed.hash(),
        ))
        .await?;
    assert_eq!(revoked.revoked, 1, "{revoked:?}");
    operator.close().await;
    // The revocation reaches the agent over its stream; each try is a fresh presentation.
    let refused = wait_until_blocking(
        "the agent to refuse the revoked token",
        Duration::from_secs(30),
        || {
            let (accepted, printed) = agent.verify("door:open", &client.present(&renewed)?)?;
            Ok((!accepted).then_some(printed))
        },
    )?;
    assert!(refused.contains("revoked"), "{refused}");

    client.close().await;
    let status = run.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "the agent stopped with {status}");
    Ok(())
}

/// The two example apps, as their docs run them: the Rust one of the client library
/// (`client/examples/app.rs`) and the Python one (`python/examples/app.py`, after `pip
/// install ./python`). Each gets an access token from the hub and prints a presentation;
/// a running agent accepts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_and_python_example_apps_get_tokens_a_running_agent_accepts() -> Result<()> {
    let hub = hub().await?;
    let (device, app) = ("pr-door-6", "pr-app-6");
    let code = hub
        .dir()
        .add_device_with_code(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app, "controller")?;
    let agent = Agent::enroll(&hub, device, &code)?;
    let mut run = agent.run_until_checking()?;
    let broker = format!("127.0.0.1:{}", hub.broker().port());
    let anchor = hub.dir().trust_anchor_path();

    let rust = tessera_tests::cargo_example("tessera-client", "app", "")?;
    let printed = run_checked(
        Command::new(rust)
            .args([&broker, app])
            .arg(app_key.private_path())
            .arg(&anchor)
            .arg(device),
    )?;
    let (accepted, said) = agent.verify("door:open", &hex::decode(printed.trim())?)?;
    assert!(
        accepted,
        "the agent refused the Rust example's presentation: {said}"
    );

    let python = tessera_tests::python::sdk_python()?;
    let (host, port) = broker.split_once(':').context("host:port")?;
    let printed = run_checked(
        Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/examples/app.py"))
            .args([host, port, app])
            .arg(app_key.private_path())
            .arg(&anchor)
            .arg(device),
    )?;
    let (accepted, said) = agent.verify("door:open", &hex::decode(printed.trim())?)?;
    assert!(
        accepted,
        "the agent refused the Python example's presentation: {said}"
    );
    assert_eq!(said.trim(), format!("accepted: presented by {app}"));

    let status = run.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "the agent stopped with {status}");
    Ok(())
}
