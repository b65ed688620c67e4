//! Every operation of the hub on its happy path, through the real `tessera-hub` binary and
//! `tessera_hub::client::Client`, against a Mosquitto that enforces the ACL
//! `tessera-hub broker-acl` prints (the hub logs in as `tessera-hub`; clients log in with
//! their Tessera id as MQTT user name, which the broker makes their client id).
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
use tessera_shared::revocation::{Stream, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation, VerifiedToken};
use tessera_shared::topic;
use tessera_tests::hub::{
    ANSWER_TIMEOUT, Grant, RevocationPage, RevokeCounts, SentRequest, SharedHub, TestHub,
    expect_delta_where, fetch_stream, generate_signer, random_bytes, read_snapshot, unix_now,
};
use tessera_tests::{ChildGuard, MqttProbe, QoS};

const WAIT: Duration = ANSWER_TIMEOUT;
/// How long a test waits to conclude that no message comes.
const QUIET: Duration = Duration::from_millis(500);
/// How long a revocation recorded by the CLI may take to come out as a delta: the running
/// hub publishes unconfirmed changes with a heartbeat once they are a few seconds old
/// (5 s, so as not to re-send what a request is still publishing), and heartbeats come
/// every second here.
const CLI_DELTA_WAIT: Duration = Duration::from_secs(15);
const DEVICE_AUDIENCE: &str = "tessera";
/// The policy's default leeway, which revocation entries outlive their tokens by.
const LEEWAY_S: u64 = 30;
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

/// A device role only [`operators_revoke_a_group_a_role_and_a_list_and_only_enrolled_devices_are_told`]
/// registers devices with, so revoking it touches no other test's devices.
const METER_ROLE: &str = r#"
[roles.meter]
kind = "device"
scopes = ["meter:write"]
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
            .policy_append(METER_ROLE)
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

/// Everything `fetch_revocations` serves of `stream`, which must have a change.
async fn fetched(
    client: &mut Client,
    hub: &TestHub,
    stream: &Stream<'_>,
) -> Result<RevocationPage> {
    fetch_stream(client, &hub.trust_anchor(), stream)
        .await?
        .with_context(|| format!("{} has no change", stream.name()))
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

async fn delta_watcher(hub: &TestHub, id: &str, stream: &Stream<'_>) -> Result<MqttProbe> {
    let probe = hub.broker().probe(id).await?;
    probe
        .subscribe_granted(&topic::revocation_delta(stream), QoS::AtLeastOnce)
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
    response
        .expect_refusal(ErrorCode::Denied)
        .context("a second enrollment, with another key and the spent code")?;
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
    args.extend(hub.identity_args(app_id, &app_key));
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
    let (mut device, _) = hub.enrolled_device(id, "sensor", &["building-a"]).await?;
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
    // An access token's revocation travels on its device's partition, addressed to it.
    let stream = Stream::of_device(device);
    let mut deltas = delta_watcher(&hub, "ops-delta-5", &stream).await?;

    let mut app = hub.client(app_id, &app_key).await?;
    let (token, _) = token(&mut app, access(device, "door:open")).await?;
    let cti = verify(&hub, &token, device)?.claims().cti.to_vec();
    let hash = token_hash(&token);

    let mut ops = hub.client(ops_id, &ops_key).await?;
    let answer = ops
        .request(RequestBody::Revoke(RevokeTarget::TokenId(&cti)), WAIT)
        .await?;
    let counts = RevokeCounts::from_answer(&answer)?;
    assert_eq!(
        (counts.revoked, counts.entries, counts.notified),
        (1, 1, 0),
        "one token, one entry, and no device to tell (the holder is an app)"
    );

    let fetched = fetched(&mut ops, &hub, &stream).await?;
    assert!(fetched.lists_token(device, &hash), "{fetched:?}");

    let delta = expect_delta_where(
        &mut deltas,
        &hub.trust_anchor(),
        &stream,
        "the token",
        |d| d.lists_token_anywhere(&hash),
        WAIT,
    )
    .await?;
    assert!(
        delta.lists_token(device, &hash),
        "addressed to the device: {delta:?}"
    );
    assert!(fetched.seq >= delta.from, "{fetched:?} {delta:?}");

    // The retained snapshot catches up (republished at the heartbeat after a change).
    let mut reader = hub.broker().probe("ops-snapshot-5").await?;
    let (retained, _) =
        read_snapshot(&mut reader, &hub.trust_anchor(), &stream, delta.from, WAIT).await?;
    assert!(retained.lists_token(device, &hash), "{retained:?}");

    // Revoking it again revokes nothing new and publishes nothing.
    let again = ops
        .request(RequestBody::Revoke(RevokeTarget::TokenId(&cti)), WAIT)
        .await?;
    assert_eq!(
        RevokeCounts::from_answer(&again)?,
        RevokeCounts {
            revoked: 0,
            entries: 0,
            notified: 0
        },
        "a token revoked before"
    );

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

    let exp = verify(&hub, &token, device)?.claims().exp;

    let mut args = vec!["revoke".to_owned()];
    args.extend(hub.identity_args(ops_id, &ops_key));
    args.extend(["--subject".to_owned(), app_id.to_owned()]);
    // The revocation's second is no earlier than this.
    let before = unix_now();
    let printed = hub
        .dir()
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let counts = RevokeCounts::from_cli(&printed)?;
    assert_eq!(
        (counts.revoked, counts.entries, counts.notified),
        (1, 1, 0),
        "one subject with tokens to one audience: {printed}"
    );

    // The entry is addressed to the device the app holds a token for, on its partition.
    let fetched = fetched(&mut app, &hub, &Stream::of_device(device)).await?;
    assert!(
        fetched.covers(device, &token_hash(&token), app_id, iat),
        "an entry addressed to {device} covers the token: {fetched:?}"
    );
    if iat < before {
        // Issued in an earlier second: a subject entry cuts it off, and lasts as long as
        // the token could still be accepted.
        let (issued_before, expires_at) = fetched
            .subject_entry(device, app_id)
            .with_context(|| format!("no subject entry for {app_id}: {fetched:?}"))?;
        assert!(issued_before > iat, "{issued_before} vs iat {iat}");
        assert_eq!(expires_at, exp + LEEWAY_S, "the token's exp plus leeway");
    } else {
        // Issued within the revocation's second, which a subject entry cannot tell from
        // the second's later tokens: listed by hash.
        assert!(
            fetched.lists_token(device, &token_hash(&token)),
            "{fetched:?}"
        );
    }
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
    let (device_token, grant) = device.ask(RequestBody::DeviceToken).await?.expect_token()?;
    let (grant, _) = grant.context("grant")?;
    let iat = verify(&hub, &device_token, DEVICE_AUDIENCE)?.claims().iat;
    let mut app = hub.client(app_id, &app_key).await?;
    token(&mut app, access(id, "door:open")).await?;

    let mut ops = hub.client(ops_id, &ops_key).await?;
    let answer = ops
        .request(RequestBody::Revoke(RevokeTarget::Device(id)), WAIT)
        .await?;
    let counts = RevokeCounts::from_answer(&answer)?;
    assert_eq!(
        (counts.revoked, counts.entries, counts.notified),
        (1, 1, 1),
        "one device, one entry for its device token, and the device told"
    );

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
    // Its device token's revocation is for the services that accept device tokens: on
    // the service stream, addressed to the policy's device audience.
    let service = Stream::Service(DEVICE_AUDIENCE);
    let fetched = fetched(&mut ops, &hub, &service).await?;
    assert!(
        fetched.covers(DEVICE_AUDIENCE, &token_hash(&device_token), id, iat),
        "{fetched:?}"
    );
    // Revoking it again revokes no one new and tells the device nothing more.
    let again = RevokeCounts::from_answer(
        &ops.request(RequestBody::Revoke(RevokeTarget::Device(id)), WAIT)
            .await?,
    )?;
    assert_eq!((again.revoked, again.notified), (0, 0), "{again:?}");
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

    // A stream with a change, so that fetching it succeeds.
    let stream = hub.seed_revocation("ops-seed-8").await?;
    let fetch = RequestBody::FetchRevocations { stream, from: 1 };

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
        let answer = app.request(fetch, WAIT).await?;
        ensure!(
            matches!(answer, Answer::Revocations { .. }),
            "expected a page: {answer:?}"
        );
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

    // A denial exits 1 (tests/hub_messages.rs); the explanation is on stdout all the same.
    let denied = hub
        .dir()
        .command()?
        .args([
            "policy",
            "explain",
            "--app",
            app_id,
            "--device",
            device,
            "--scope",
            "door:open door:unlock",
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    let denied = String::from_utf8_lossy(&denied.stdout);
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
    let stream = Stream::of_device(device);
    let mut deltas = delta_watcher(&hub, "ops-delta-10", &stream).await?;
    let mut app = hub.client(app_id, &app_key).await?;
    let (door, _) = token(&mut app, access(device, "door:open")).await?;
    let (telemetry, _) = token(&mut app, access(device, "telemetry:read")).await?;

    let printed = hub.dir().run(&["client", "set-role", app_id, "viewer"])?;
    assert!(
        printed.contains("; 1 token it no longer allows is revoked (1 entry, 0 devices"),
        "exactly the door token, by hash: {printed}"
    );

    let fetched = fetched(&mut app, &hub, &stream).await?;
    assert!(
        fetched.lists_token(device, &token_hash(&door)),
        "{fetched:?}"
    );
    assert!(
        !fetched.lists_token_anywhere(&token_hash(&telemetry)),
        "the viewer role still allows telemetry:read: {fetched:?}"
    );
    assert!(
        fetched.subject_entry(device, app_id).is_none(),
        "a role change revokes tokens, not the subject: {fetched:?}"
    );
    // Recorded by the CLI, broadcast by the running hub (with a heartbeat).
    let delta = expect_delta_where(
        &mut deltas,
        &hub.trust_anchor(),
        &stream,
        "the door token",
        |d| d.lists_token_anywhere(&token_hash(&door)),
        CLI_DELTA_WAIT,
    )
    .await
    .with_context(|| format!("hub log:\n{}", hub.log()))?;
    assert!(delta.lists_token(device, &token_hash(&door)), "{delta:?}");

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

/// Enrolls `device` (its key registered), subscribed to its control topic, and gets a
/// device token; returns the client and the token.
async fn enrolled_with_token(
    hub: &TestHub,
    id: &str,
    key: &tessera_tests::hub::TestKey,
) -> Result<(tessera_tests::hub::RawClient, Vec<u8>)> {
    let mut device = hub.raw(id, key.signer()?).await?;
    device
        .probe()
        .subscribe_granted(&topic::control(id).unwrap(), QoS::AtLeastOnce)
        .await?;
    let enrolled = device
        .ask(RequestBody::Enroll {
            key: key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled), "{id}: {enrolled:?}");
    let (token, _) = device.ask(RequestBody::DeviceToken).await?.expect_token()?;
    Ok((device, token))
}

/// A device that never enrolled, listening on its control topic.
async fn never_enrolled(hub: &TestHub, id: &str) -> Result<MqttProbe> {
    let probe = hub.broker().probe(id).await?;
    probe
        .subscribe_granted(&topic::control(id).unwrap(), QoS::AtLeastOnce)
        .await?;
    Ok(probe)
}

#[tokio::test]
async fn operators_revoke_a_group_a_role_and_a_list_and_only_enrolled_devices_are_told()
-> Result<()> {
    let hub = hub().await?;
    let ops_id = "ops-ops-11";
    let ops_key = hub.dir().add_operator(ops_id, "ops")?;
    // Five devices imported from one CSV file: two with their keys, three with codes.
    // building-b and the meter role are this test's alone.
    let key_1 = hub.dir().keygen("ops-imp-1")?;
    let key_3 = hub.dir().keygen("ops-imp-3")?;
    let csv = hub.dir().path().join("keys").join("ops-import.csv");
    std::fs::write(
        &csv,
        "id,role,group,key\n\
         # key: relative to this file\n\
         ops-imp-1,sensor,building-b,ops-imp-1.pem.pub\n\
         ops-imp-2,sensor,building-b;building-a,\n\
         \n\
         ops-imp-3,meter,building-a,ops-imp-3.pem.pub\n\
         ops-imp-4,meter,,\n\
         ops-imp-5,sensor,building-a,\n",
    )?;
    let codes = hub.dir().path().join("keys").join("ops-import.codes");
    hub.dir().run(&[
        "device",
        "import",
        &csv.to_string_lossy(),
        "--codes",
        &codes.to_string_lossy(),
    ])?;
    let printed = std::fs::read_to_string(&codes)?;
    let coded: Vec<&str> = printed
        .lines()
        .filter_map(|l| {
            let (id, code) = l.split_once(',')?;
            (code.len() == 23).then_some(id)
        })
        .collect();
    assert_eq!(
        coded,
        ["ops-imp-2", "ops-imp-4", "ops-imp-5"],
        "one `id,code` line per device without a key: {printed}"
    );
    let listing = hub.dir().run(&["client", "list", "--kind", "device"])?;
    assert!(
        client_line(&listing, "ops-imp-1").ends_with("key registered")
            && client_line(&listing, "ops-imp-2").contains("groups=building-b,building-a")
            && client_line(&listing, "ops-imp-4").ends_with("awaiting enrollment"),
        "{listing}"
    );

    let (mut dev_1, token_1) = enrolled_with_token(&hub, "ops-imp-1", &key_1).await?;
    let (mut dev_3, token_3) = enrolled_with_token(&hub, "ops-imp-3", &key_3).await?;
    let mut dev_2 = never_enrolled(&hub, "ops-imp-2").await?;
    let mut dev_4 = never_enrolled(&hub, "ops-imp-4").await?;
    let revoke = |target: &[&str]| {
        let mut args = vec!["revoke".to_owned()];
        args.extend(hub.identity_args(ops_id, &ops_key));
        args.extend(target.iter().map(|a| (*a).to_owned()));
        hub.dir()
            .run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Told `revoked` on its control topic, its device token on the service stream.
    let service = Stream::Service(DEVICE_AUDIENCE);
    // Not as `ops_id`, whose MQTT client id each `revoke` command takes over.
    let reader_key = hub.dir().add_operator("ops-reader-11", "ops")?;
    let mut reader = hub.client("ops-reader-11", &reader_key).await?;
    let mut told = async |device: &mut tessera_tests::hub::RawClient, token: &[u8]| {
        let id = device.id().to_owned();
        let control = topic::control(&id).unwrap().to_string();
        let message = device.probe().expect_message(&control, WAIT).await?;
        let told = Control::verify(&message.payload, &hub.trust_anchor())
            .map_err(|e| anyhow::anyhow!("control message: {e}"))?;
        ensure!(
            (told.device, told.command) == (id.as_str(), ControlCommand::Revoked),
            "{told:?}"
        );
        let iat = verify(&hub, token, DEVICE_AUDIENCE)?.claims().iat;
        let listed = fetched(&mut reader, &hub, &service).await?;
        ensure!(
            listed.covers(DEVICE_AUDIENCE, &token_hash(token), &id, iat),
            "{id}'s device token: {listed:?}"
        );
        Ok::<_, anyhow::Error>(())
    };

    // A group: both devices revoked, one entry (the enrolled one's token), one told.
    let counts = RevokeCounts::from_cli(&revoke(&["--group", "building-b"])?)?;
    assert_eq!(
        (counts.revoked, counts.entries, counts.notified),
        (2, 1, 1),
        "{counts:?}"
    );
    told(&mut dev_1, &token_1).await?;
    // The one that never enrolled costs nothing on the wire.
    dev_2
        .expect_no_message(&topic::control("ops-imp-2").unwrap(), QUIET)
        .await?;

    // A role: the same for its devices.
    let counts = RevokeCounts::from_cli(&revoke(&["--role", "meter"])?)?;
    assert_eq!(
        (counts.revoked, counts.entries, counts.notified),
        (2, 1, 1),
        "{counts:?}"
    );
    told(&mut dev_3, &token_3).await?;
    dev_4
        .expect_no_message(&topic::control("ops-imp-4").unwrap(), QUIET)
        .await?;

    // A list from a file: comments, blank lines and repeats are skipped.
    let list = hub.dir().path().join("keys").join("ops-revoke.txt");
    std::fs::write(&list, "# to revoke\nops-imp-5\n\nops-imp-5\n")?;
    let counts = RevokeCounts::from_cli(&revoke(&["--devices-from", &list.to_string_lossy()])?)?;
    assert_eq!(
        counts,
        RevokeCounts {
            revoked: 1,
            entries: 0,
            notified: 0
        }
    );
    // A list naming a device the hub does not know revokes nothing at all.
    std::fs::write(&list, "ops-imp-ghost\nops-imp-5\n")?;
    let mut args = vec!["revoke".to_owned()];
    args.extend(hub.identity_args(ops_id, &ops_key));
    args.extend([
        "--devices-from".to_owned(),
        list.to_string_lossy().into_owned(),
    ]);
    let refused = hub
        .dir()
        .run_failing(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(
        refused.contains("denied") && refused.contains("ops-imp-ghost"),
        "{refused}"
    );

    let listing = hub.dir().run(&["client", "list", "--kind", "device"])?;
    for id in [
        "ops-imp-1",
        "ops-imp-2",
        "ops-imp-3",
        "ops-imp-4",
        "ops-imp-5",
    ] {
        assert!(client_line(&listing, id).ends_with("revoked"), "{listing}");
    }
    dev_1
        .ask(RequestBody::DeviceToken)
        .await?
        .expect_refusal(ErrorCode::Revoked)?;
    reader.close().await;
    Ok(())
}
