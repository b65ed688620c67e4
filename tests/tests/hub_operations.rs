//! Every operation of the hub on its happy path, through the real `tessera-hub` binary and
//! `tessera_hub::client::Client`, against a Mosquitto that enforces the ACL
//! `tessera-hub broker-acl` prints (the hub authenticates as `tessera-hub`; clients connect
//! with their Tessera id as MQTT client id).
//!
//! The tests share one hub and broker (see `SharedHub`); each uses its own client ids.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tessera_hub::client::{Answer, Client, ClientError};
use tessera_shared::message::{Command as ControlCommand, Control, EnrollmentCode, ErrorCode};
use tessera_shared::message::{RequestBody, RevokeTarget};
use tessera_shared::revocation::token_hash;
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation, VerifiedToken};
use tessera_shared::topic;
use tessera_tests::hub::{
    ANSWER_TIMEOUT, Grant, RevocationMessage, SentRequest, SharedHub, TestHub, expect_delta,
    generate_signer, random_bytes, unix_now,
};
use tessera_tests::{ChildGuard, MqttProbe, QoS};

const WAIT: Duration = ANSWER_TIMEOUT;
const DEVICE_AUDIENCE: &str = "tessera";
const GROUP_A: &str = "building-a = \"Doors and sensors in building A\"";

/// The default policy plus a group no rule names and an app role that may only read
/// telemetry.
const VIEWER_ROLE: &str = r#"
[roles.viewer]
kind = "app"

[[access]]
app_roles = ["viewer"]
device_groups = ["building-a"]
scopes = ["telemetry:read"]
"#;

static HUB: SharedHub = SharedHub::new();

async fn hub() -> Result<Arc<TestHub>> {
    HUB.get(|| {
        TestHub::builder()
            .with_acl()
            // Revocations recorded by the CLI go out with the next heartbeat.
            .config("heartbeat_s = 30", "heartbeat_s = 1")
            .policy(
                GROUP_A,
                &format!("{GROUP_A}\nbuilding-b = \"No access rule names this group\""),
            )
            .policy_append(VIEWER_ROLE)
            .start()
    })
    .await
}

fn verify<'a>(hub: &TestHub, token: &'a [u8], audience: &str) -> Result<VerifiedToken<'a>> {
    let validation = Validation::new(unix_now(), audience).with_issuer(hub.dir().hub_id());
    token::verify(token, &hub.trust_anchor(), &validation)
        .map_err(|e| anyhow::anyhow!("token does not verify: {e}"))
}

async fn token(client: &mut Client, body: RequestBody<'_>) -> Result<(Vec<u8>, Option<Grant>)> {
    match client.request(body, WAIT).await? {
        Answer::Token { token, grant } => Ok((token, grant)),
        other => bail!("expected a token, got {other:?}"),
    }
}

async fn refusal(client: &mut Client, body: RequestBody<'_>) -> Result<ErrorCode> {
    match client.request(body, WAIT).await {
        Err(ClientError::Refused { code, .. }) => Ok(code),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

async fn snapshot(client: &mut Client, hub: &TestHub) -> Result<RevocationMessage> {
    match client.request(RequestBody::FetchRevocations, WAIT).await? {
        Answer::Revocations { snapshot } => {
            RevocationMessage::snapshot(&snapshot, &hub.trust_anchor())
        }
        other => bail!("expected the revocation snapshot, got {other:?}"),
    }
}

fn access(device: &str, scope: &'static str) -> RequestBody<'static> {
    // Leaked so the body can borrow it for the test's lifetime; a handful of bytes.
    let device: &'static str = Box::leak(device.to_owned().into_boxed_str());
    RequestBody::AccessToken {
        device,
        scope: Scopes::parse(scope).unwrap(),
    }
}

fn client_line(listing: &str, id: &str) -> String {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_default()
        .to_owned()
}

async fn delta_watcher(hub: &TestHub, id: &str) -> Result<MqttProbe> {
    let probe = hub.broker().probe(id).await?;
    probe
        .subscribe_granted(topic::REVOCATION_DELTA, QoS::AtLeastOnce)
        .await?;
    Ok(probe)
}

#[tokio::test]
async fn a_device_with_a_preregistered_key_enrolls_and_gets_a_token_bound_to_that_key() -> Result<()>
{
    let hub = hub().await?;
    let id = "ops-sensor-pre";
    let key = hub.dir().add_device(id, "sensor", &["building-a"])?;
    let listing = hub.dir().run(&["client", "list", "--kind", "device"])?;
    assert!(
        client_line(&listing, id).ends_with("key registered"),
        "{listing}"
    );

    let mut device = hub.client(id, &key).await?;
    let public = key.public_key()?;
    let enrolled = device
        .request(
            RequestBody::Enroll {
                key: public,
                code_proof: None,
            },
            WAIT,
        )
        .await?;
    assert_eq!(enrolled, Answer::Enrolled);

    let (token, grant) = token(&mut device, RequestBody::DeviceToken).await?;
    let verified = verify(&hub, &token, DEVICE_AUDIENCE)?;
    let claims = verified.claims();
    assert_eq!(claims.iss, "hub-e2e");
    assert_eq!(claims.sub, id);
    assert_eq!(
        claims.aud, DEVICE_AUDIENCE,
        "aud is the policy's device_audience"
    );
    assert_eq!(claims.cnf, public, "cnf is the device's own key");
    assert_eq!(claims.scope.as_str(), "telemetry:write");
    assert_eq!(claims.exp - claims.iat, 600, "the sensor role's lifetime");
    let (grant, grant_expires_at) = grant.context("a device token comes with a grant")?;
    assert!((16..=64).contains(&grant.len()), "{} bytes", grant.len());
    assert_eq!(grant_expires_at - claims.iat, 86_400);
    device.close().await;

    let listing = hub.dir().run(&["client", "list"])?;
    assert!(client_line(&listing, id).ends_with("enrolled"), "{listing}");
    Ok(())
}

#[tokio::test]
async fn a_device_enrolls_a_key_it_made_itself_with_a_one_time_code_that_never_crosses_the_broker()
-> Result<()> {
    let hub = hub().await?;
    let id = "ops-sensor-code";
    let code = hub
        .dir()
        .add_device_with_code(id, "sensor", &["building-a"])?;
    assert_eq!(code.len(), 23, "four groups of five: {code}");
    let listing = hub.dir().run(&["client", "list"])?;
    assert!(
        client_line(&listing, id).ends_with("awaiting enrollment"),
        "{listing}"
    );

    let signer = generate_signer();
    let public = tessera_shared::crypto::Signer::public_key(&signer);
    let mut device = hub.raw(id, signer).await?;
    let enroll = |device: &tessera_tests::hub::RawClient, request_id, code: &str| {
        let nonce = random_bytes();
        let proof =
            EnrollmentCode::proof(&EnrollmentCode::derive_key(code), id, &public.kid(), &nonce);
        let body = RequestBody::Enroll {
            key: public,
            code_proof: Some(proof),
        };
        device
            .sign_as(id, request_id, unix_now(), nonce, body)
            .map(|bytes| SentRequest {
                bytes,
                request_id,
                nonce,
            })
    };

    // A proof made from another code is refused, and the real one still works after it.
    let wrong = enroll(&device, 1, "AAAAA-BBBBB-CCCCC-DDDDD")?;
    device
        .send(&wrong)
        .await?
        .expect_refusal(ErrorCode::Denied)?;
    let right = enroll(&device, 2, &code)?;
    let response = device.send(&right).await?;
    assert_eq!(response.outcome, Ok(Answer::Enrolled), "{response:?}");
    assert!(
        response.hub_time.abs_diff(unix_now()) <= 2,
        "enrolled_at is the hub's time"
    );

    let (token, _) = device.ask(RequestBody::DeviceToken).await?.expect_token()?;
    let verified = verify(&hub, &token, DEVICE_AUDIENCE)?;
    assert_eq!(verified.claims().cnf, public);
    assert_eq!(verified.claims().sub, id);

    // The code was single-use: another key cannot enroll with it.
    let intruder = generate_signer();
    let intruder_key = tessera_shared::crypto::Signer::public_key(&intruder);
    device.set_signer(intruder);
    let nonce = random_bytes();
    let proof = EnrollmentCode::proof(
        &EnrollmentCode::derive_key(&code),
        id,
        &intruder_key.kid(),
        &nonce,
    );
    let again = device.sign_as(
        id,
        3,
        unix_now(),
        nonce,
        RequestBody::Enroll {
            key: intruder_key,
            code_proof: Some(proof),
        },
    )?;
    let response = device
        .send(&SentRequest {
            bytes: again,
            request_id: 3,
            nonce,
        })
        .await?;
    assert!(
        matches!(
            response.error_code(),
            Some(ErrorCode::BadSignature | ErrorCode::Denied)
        ),
        "a second enrollment with the spent code: {response:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_app_gets_an_access_token_for_one_device_within_its_rule() -> Result<()> {
    let hub = hub().await?;
    let (device, app_id) = ("ops-door-3", "ops-app-3");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app_id, "controller")?;

    let mut app = hub.client(app_id, &app_key).await?;
    let (token, grant) = token(&mut app, access(device, "door:open light:on")).await?;
    app.close().await;
    let verified = verify(&hub, &token, device)?;
    let claims = verified.claims();
    assert_eq!(claims.sub, app_id);
    assert_eq!(claims.aud, device, "aud is exactly the device");
    assert_eq!(claims.cnf, app_key.public_key()?);
    assert_eq!(claims.scope.as_str(), "door:open light:on");
    assert!(
        claims.scope.grants("light:on"),
        "light:* in the rule covers it"
    );
    assert_eq!(
        claims.exp - claims.iat,
        120,
        "the controller role's lifetime"
    );
    assert!(
        grant.is_some(),
        "the default policy gives apps refresh grants"
    );
    assert!(
        verify(&hub, &token, "ops-door-other").is_err(),
        "another device refuses it"
    );

    // The CLI does the same and prints the token in hex.
    let mut args = vec!["access-token".to_owned()];
    args.extend(hub.dir().identity_args(app_id, &app_key));
    args.extend(["--device", device, "--scope", "door:close"].map(String::from));
    let printed = hub
        .dir()
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let cli_token = hex::decode(printed.trim()).context("access-token prints hex")?;
    let verified = verify(&hub, &cli_token, device)?;
    assert_eq!(verified.claims().scope.as_str(), "door:close");
    assert_eq!(verified.claims().sub, app_id);
    Ok(())
}

#[tokio::test]
async fn refresh_rotates_the_grant_and_the_spent_grant_is_then_refused_as_reused() -> Result<()> {
    let hub = hub().await?;
    let id = "ops-sensor-refresh";
    let key = hub.dir().add_device(id, "sensor", &["building-a"])?;
    let mut device = hub.client(id, &key).await?;
    device
        .request(
            RequestBody::Enroll {
                key: key.public_key()?,
                code_proof: None,
            },
            WAIT,
        )
        .await?;
    let (first, grant) = token(&mut device, RequestBody::DeviceToken).await?;
    let (g1, g1_expires) = grant.context("grant")?;

    let (second, grant) = token(&mut device, RequestBody::Refresh { grant: &g1 }).await?;
    let (g2, g2_expires) = grant.context("refresh returns a new grant")?;
    assert_ne!(g2, g1, "the grant rotates");
    assert!(
        g2_expires <= g1_expires,
        "a new grant never outlives its family's first"
    );
    let (a, b) = (
        verify(&hub, &first, DEVICE_AUDIENCE)?,
        verify(&hub, &second, DEVICE_AUDIENCE)?,
    );
    assert_ne!(a.claims().cti, b.claims().cti, "a new token");
    assert_eq!(
        (b.claims().sub, b.claims().scope.as_str()),
        (id, "telemetry:write")
    );

    assert_eq!(
        refusal(&mut device, RequestBody::Refresh { grant: &g1 }).await?,
        ErrorCode::Revoked,
        "the spent grant is refused as reused"
    );
    device.close().await;
    Ok(())
}

#[tokio::test]
async fn an_operator_revokes_a_token_by_id_and_the_delta_and_both_snapshots_list_it() -> Result<()>
{
    let hub = hub().await?;
    let (device, app_id, ops_id) = ("ops-door-5", "ops-app-5", "ops-ops-5");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app_id, "controller")?;
    let ops_key = hub.dir().add_operator(ops_id, "ops")?;
    let mut deltas = delta_watcher(&hub, "ops-delta-5").await?;

    let mut app = hub.client(app_id, &app_key).await?;
    let (token, _) = token(&mut app, access(device, "door:open")).await?;
    let cti = verify(&hub, &token, device)?.claims().cti.to_vec();
    let hash = token_hash(&token);

    let mut ops = hub.client(ops_id, &ops_key).await?;
    let Answer::Revoked { seq } = ops
        .request(RequestBody::Revoke(RevokeTarget::TokenId(&cti)), WAIT)
        .await?
    else {
        bail!("expected Revoked")
    };
    assert!(seq >= 1);

    let fetched = snapshot(&mut ops, &hub).await?;
    assert!(fetched.seq >= seq, "{fetched:?}");
    assert!(fetched.lists_token(&hash), "{fetched:?}");

    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), seq, WAIT).await?;
    assert!(delta.lists_token(&hash), "{delta:?}");

    // The retained snapshot catches up (it is republished after each delta).
    let mut reader = hub.broker().probe("ops-snapshot-5").await?;
    reader
        .subscribe_granted(topic::REVOCATION_SNAPSHOT, QoS::AtLeastOnce)
        .await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let message = reader
            .expect_message(
                topic::REVOCATION_SNAPSHOT,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await?;
        let retained = RevocationMessage::snapshot(&message.payload, &hub.trust_anchor())?;
        if retained.seq >= seq {
            assert!(retained.lists_token(&hash), "{retained:?}");
            break;
        }
    }

    // Only operators revoke.
    assert_eq!(
        refusal(
            &mut app,
            RequestBody::Revoke(RevokeTarget::Subject("ops-app-5"))
        )
        .await?,
        ErrorCode::Denied
    );
    app.close().await;
    ops.close().await;
    Ok(())
}

#[tokio::test]
async fn an_operator_revokes_every_token_of_a_subject_and_its_grants_with_the_cli() -> Result<()> {
    let hub = hub().await?;
    let (device, app_id, ops_id) = ("ops-door-6", "ops-app-6", "ops-ops-6");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app_id, "controller")?;
    let ops_key = hub.dir().add_operator(ops_id, "ops")?;
    let mut app = hub.client(app_id, &app_key).await?;
    let (token, grant) = token(&mut app, access(device, "telemetry:read")).await?;
    let iat = verify(&hub, &token, device)?.claims().iat;
    let (grant, _) = grant.context("grant")?;

    let mut args = vec!["revoke".to_owned()];
    args.extend(hub.dir().identity_args(ops_id, &ops_key));
    args.extend(["--subject".to_owned(), app_id.to_owned()]);
    let printed = hub
        .dir()
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let seq: u64 = printed
        .trim()
        .strip_prefix("revoked (durable, revocation sequence ")
        .and_then(|s| s.strip_suffix(')'))
        .with_context(|| format!("revoke printed {printed:?}"))?
        .parse()?;

    let fetched = snapshot(&mut app, &hub).await?;
    assert!(fetched.seq >= seq);
    let covered = fetched.entries.iter().any(|e| match e {
        tessera_shared::revocation::Entry::Subject {
            subject,
            issued_before,
            ..
        } => subject.as_str() == app_id && *issued_before > iat,
        _ => false,
    });
    assert!(covered, "a subject entry covers the token: {fetched:?}");
    assert_eq!(
        refusal(&mut app, RequestBody::Refresh { grant: &grant }).await?,
        ErrorCode::Revoked,
        "the subject's grants are revoked with it"
    );
    app.close().await;
    Ok(())
}

#[tokio::test]
async fn a_revoked_device_is_told_on_its_control_topic_and_refused_from_then_on() -> Result<()> {
    let hub = hub().await?;
    let (id, app_id, ops_id) = ("ops-dev-7", "ops-app-7", "ops-ops-7");
    let key = hub.dir().add_device(id, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app_id, "controller")?;
    let ops_key = hub.dir().add_operator(ops_id, "ops")?;

    let mut device = hub.raw(id, key.signer()?).await?;
    let control = topic::control(id).unwrap().to_string();
    device
        .probe()
        .subscribe_granted(&control, QoS::AtLeastOnce)
        .await?;
    let enrolled = device
        .ask(RequestBody::Enroll {
            key: key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled));
    let (_, grant) = device.ask(RequestBody::DeviceToken).await?.expect_token()?;
    let (grant, _) = grant.context("grant")?;
    let mut app = hub.client(app_id, &app_key).await?;
    token(&mut app, access(id, "door:open")).await?;

    let mut ops = hub.client(ops_id, &ops_key).await?;
    let Answer::Revoked { seq } = ops
        .request(RequestBody::Revoke(RevokeTarget::Device(id)), WAIT)
        .await?
    else {
        bail!("expected Revoked")
    };

    let message = device.probe().expect_message(&control, WAIT).await?;
    let told = Control::verify(&message.payload, &hub.trust_anchor())
        .map_err(|e| anyhow::anyhow!("control message: {e}"))?;
    assert_eq!((told.device, told.command), (id, ControlCommand::Revoked));
    assert!(
        told.issued_at >= enrolled.hub_time,
        "acted on: issued after enrolling"
    );

    device
        .ask(RequestBody::DeviceToken)
        .await?
        .expect_refusal(ErrorCode::Revoked)?;
    device
        .ask(RequestBody::Refresh { grant: &grant })
        .await?
        .expect_refusal(ErrorCode::Revoked)?;
    assert_eq!(
        refusal(&mut app, access(id, "door:open")).await?,
        ErrorCode::Revoked,
        "no access tokens for a revoked device"
    );
    let fetched = snapshot(&mut ops, &hub).await?;
    assert!(
        fetched.seq >= seq && fetched.lists_subject(id),
        "{fetched:?}"
    );
    let listing = hub.dir().run(&["client", "list"])?;
    assert!(client_line(&listing, id).ends_with("revoked"), "{listing}");
    app.close().await;
    ops.close().await;
    Ok(())
}

#[tokio::test]
async fn watch_prints_each_decision_of_the_hub_as_a_json_event() -> Result<()> {
    let hub = hub().await?;
    let (ops_id, app_id) = ("ops-watcher-8", "ops-app-8");
    let ops_key = hub.dir().add_operator(ops_id, "ops")?;
    let app_key = hub.dir().add_app(app_id, "controller")?;

    let mut command: Command = hub.dir().command()?;
    command
        .arg("watch")
        .args(hub.dir().identity_args(ops_id, &ops_key));
    if let Some((user, password)) = hub.watcher_credentials() {
        command
            .args(["--mqtt-username", user])
            .env("TESSERA_MQTT_PASSWORD", password);
    }
    let mut watch = ChildGuard::spawn(&mut command)?;

    // The watcher subscribes at some point after it starts: keep the hub busy until an
    // event of this app shows.
    let mut app = hub.client(app_id, &app_key).await?;
    let needle = format!("\"actor\":\"{app_id}\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watch.output().contains(&needle) {
        ensure!(
            Instant::now() < deadline,
            "watch printed no event of {app_id} within 10 s:\n{}",
            watch.output()
        );
        ensure!(
            watch.try_wait()?.is_none(),
            "watch exited:\n{}",
            watch.output()
        );
        let _ = app.request(RequestBody::FetchRevocations, WAIT).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    app.close().await;
    let output = watch.output();
    let line = output
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"action\":\"fetch_revocations\""), "{line}");
    assert!(line.contains("\"outcome\":\"ok\""), "{line}");
    watch.terminate(WAIT)?;
    Ok(())
}

#[tokio::test]
async fn policy_explain_names_the_rule_that_allows_and_the_scope_no_rule_covers() -> Result<()> {
    let hub = hub().await?;
    let (device, app_id) = ("ops-door-9", "ops-app-9");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    hub.dir().add_app(app_id, "controller")?;
    let explain = |scope: &str| {
        hub.dir().run(&[
            "policy", "explain", "--app", app_id, "--device", device, "--scope", scope,
        ])
    };

    let allowed = explain("door:open light:dim")?;
    assert!(
        allowed.contains("[[access]] #1") && allowed.contains(": applies"),
        "{allowed}"
    );
    assert!(allowed.contains("light:dim (by light:*)"), "{allowed}");
    assert!(
        allowed.contains("[[access]] #2") && allowed.contains("role \"controller\" is not listed"),
        "the viewer rule does not apply: {allowed}"
    );
    assert!(allowed.contains("verdict: allowed"), "{allowed}");

    let denied = explain("door:open door:unlock")?;
    assert!(denied.contains("does not cover door:unlock"), "{denied}");
    assert!(denied.contains("verdict: denied"), "{denied}");
    Ok(())
}

#[tokio::test]
async fn changing_an_apps_role_revokes_the_tokens_its_new_role_no_longer_allows() -> Result<()> {
    let hub = hub().await?;
    let (device, app_id) = ("ops-door-10", "ops-app-10");
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app(app_id, "controller")?;
    let mut deltas = delta_watcher(&hub, "ops-delta-10").await?;
    let mut app = hub.client(app_id, &app_key).await?;
    let (door, _) = token(&mut app, access(device, "door:open")).await?;
    let (telemetry, _) = token(&mut app, access(device, "telemetry:read")).await?;

    let printed = hub.dir().run(&["client", "set-role", app_id, "viewer"])?;
    let seq: u64 = printed
        .split("(sequence ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("set-role revoked nothing: {printed}"))?
        .parse()?;

    let fetched = snapshot(&mut app, &hub).await?;
    assert!(fetched.lists_token(&token_hash(&door)), "{fetched:?}");
    assert!(
        !fetched.lists_token(&token_hash(&telemetry)),
        "the viewer role still allows telemetry:read: {fetched:?}"
    );
    // Recorded by the CLI, broadcast by the running hub (with its next heartbeat).
    let delta = expect_delta(&mut deltas, &hub.trust_anchor(), seq, WAIT).await?;
    assert!(delta.lists_token(&token_hash(&door)), "{delta:?}");

    assert_eq!(
        refusal(&mut app, access(device, "door:open")).await?,
        ErrorCode::Denied
    );
    token(&mut app, access(device, "telemetry:read")).await?;
    app.close().await;
    let listing = hub.dir().run(&["client", "list", "--kind", "app"])?;
    assert!(
        client_line(&listing, app_id).contains("role=viewer"),
        "{listing}"
    );
    Ok(())
}
