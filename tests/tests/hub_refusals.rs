//! Every refusal of the hub, each with its typed error code, against a Mosquitto that
//! enforces the ACL `tessera-hub broker-acl` prints — and in each test a well-behaved
//! device (the bystander) keeps getting tokens around the bad traffic, because bad input
//! must never stop the hub serving others.
//!
//! The tests share one hub and broker (see `SharedHub`); each uses its own client ids.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tessera_hub::client::{Answer, Client, ClientError};
use tessera_shared::message::{ErrorCode, IdList, NONCE_LEN, Operation, RequestBody, RevokeTarget};
use tessera_shared::revocation::Stream;
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;
use tessera_tests::hub::{
    ANSWER_TIMEOUT, HubResponse, SharedHub, TestHub, generate_signer, random_bytes, unix_now,
};
use tessera_tests::{PubAckReason, wait_until_every};

const WAIT: Duration = ANSWER_TIMEOUT;
/// How long a test waits to conclude that no response comes.
const QUIET: Duration = Duration::from_millis(700);
const GROUP_A: &str = "building-a = \"Doors and sensors in building A\"";

/// The prefix of the clients [`hub`] registers to give a stream a change.
const SEED: &str = "rf-seed";

static HUB: SharedHub = SharedHub::new();

/// The shared hub. Ordinary requests may be 1 KiB (a request with the longest scope is
/// larger); revoke requests 64 KiB, so it takes MQTT packets up to 68 KiB: less than the
/// broker's 128 KiB. One stream has a change, for [`fetch`].
async fn hub() -> Result<Arc<TestHub>> {
    HUB.get(|| async {
        let hub = TestHub::builder()
            .with_acl()
            .policy(
                GROUP_A,
                &format!("{GROUP_A}\nbuilding-b = \"No access rule names this group\""),
            )
            .config("max_request_bytes = 4096", "max_request_bytes = 1024")
            .config(
                "max_revoke_request_bytes = 1048576",
                "max_revoke_request_bytes = 65536",
            )
            .start()
            .await?;
        hub.seed_revocation(SEED).await?;
        Ok(hub)
    })
    .await
}

/// A request any client may make and the hub serves with a page: the first change of the
/// stream [`hub`] gave one.
fn fetch() -> RequestBody<'static> {
    RequestBody::FetchRevocations {
        stream: Stream::of_device(&format!("{SEED}-door")),
        from: 1,
    }
}

/// A registered, enrolled device that asks for device tokens.
struct Bystander {
    client: Client,
    hub: Arc<TestHub>,
    id: String,
}

impl Bystander {
    async fn new(hub: &Arc<TestHub>, id: &str) -> Result<Self> {
        let key = hub.dir().add_device(id, "sensor", &["building-a"])?;
        let mut client = hub.client(id, &key).await?;
        let enrolled = client
            .request(
                RequestBody::Enroll {
                    key: key.public_key()?,
                    code_proof: None,
                },
                WAIT,
            )
            .await?;
        assert_eq!(enrolled, Answer::Enrolled);
        let mut bystander = Self {
            client,
            hub: Arc::clone(hub),
            id: id.to_owned(),
        };
        bystander.is_served().await?;
        Ok(bystander)
    }

    /// Gets a device token and checks it.
    async fn is_served(&mut self) -> Result<()> {
        let answer = self
            .client
            .request(RequestBody::DeviceToken, WAIT)
            .await
            .with_context(|| format!("the bystander {} was not served", self.id))?;
        let Answer::Token { token, .. } = answer else {
            bail!("expected a token, got {answer:?}")
        };
        let validation =
            Validation::new(unix_now(), "tessera").with_issuer(self.hub.dir().hub_id());
        let verified = token::verify(&token, &self.hub.trust_anchor(), &validation)
            .map_err(|e| anyhow::anyhow!("bystander's token: {e}"))?;
        assert_eq!(verified.claims().sub, self.id);
        Ok(())
    }

    async fn close(self) {
        self.client.close().await;
    }
}

fn access(device: &'static str, scope: &'static str) -> RequestBody<'static> {
    RequestBody::AccessToken {
        device,
        scope: Scopes::parse(scope).unwrap(),
    }
}

async fn refusal(client: &mut Client, body: RequestBody<'_>) -> Result<ErrorCode> {
    match client.request(body, WAIT).await {
        Err(ClientError::Refused { code, .. }) => Ok(code),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

/// The answer to a request that could not be decoded: it names no request.
fn assert_answers_no_request(response: &HubResponse, client: &str) {
    assert_eq!(response.op, None, "{response:?}");
    assert_eq!(response.request_id, 0);
    assert_eq!(response.nonce, [0u8; NONCE_LEN]);
    assert_eq!(response.client, client, "on the topic the bytes came from");
}

#[tokio::test]
async fn a_client_the_hub_does_not_know_is_refused_as_unknown_client() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-unknown").await?;

    let mut ghost = hub.raw("rf-ghost", generate_signer()).await?;
    ghost
        .ask(fetch())
        .await?
        .expect_refusal(ErrorCode::UnknownClient)?;
    bystander.is_served().await?;
    ghost
        .ask(RequestBody::DeviceToken)
        .await?
        .expect_refusal(ErrorCode::UnknownClient)?;

    // A removed client is unknown too.
    let key = hub.dir().add_app("rf-removed", "controller")?;
    let mut removed = hub.raw("rf-removed", key.signer()?).await?;
    let before = removed.ask(fetch()).await?;
    assert!(before.outcome.is_ok(), "{before:?}");
    hub.dir().run(&["client", "remove", "rf-removed"])?;
    removed
        .ask(fetch())
        .await?
        .expect_refusal(ErrorCode::UnknownClient)?;
    bystander.is_served().await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_request_signed_with_another_key_than_the_registered_one_is_refused_as_bad_signature()
-> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-key").await?;

    hub.dir().add_app("rf-app-key", "controller")?;
    let mut impostor = hub.raw("rf-app-key", generate_signer()).await?;
    impostor
        .ask(fetch())
        .await?
        .expect_refusal(ErrorCode::BadSignature)?;
    bystander.is_served().await?;

    // Enrolling a device whose key was registered, with another key, is denied (the
    // request is signed by the key it names, which is just not the registered one), and
    // does not spoil the real enrollment.
    let key = hub
        .dir()
        .add_device("rf-dev-key", "sensor", &["building-a"])?;
    let other = generate_signer();
    let other_public = tessera_shared::crypto::Signer::public_key(&other);
    let mut device = hub.raw("rf-dev-key", other).await?;
    device
        .ask(RequestBody::Enroll {
            key: other_public,
            code_proof: None,
        })
        .await?
        .expect_refusal(ErrorCode::Denied)?;
    device.set_signer(key.signer()?);
    let enrolled = device
        .ask(RequestBody::Enroll {
            key: key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled), "{enrolled:?}");
    // Enrolled, the same key may enroll again (a device that lost the answer retries);
    // another key still may not.
    let again = device
        .ask(RequestBody::Enroll {
            key: key.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(again.outcome, Ok(Answer::Enrolled), "{again:?}");
    let thief = generate_signer();
    let thief_public = tessera_shared::crypto::Signer::public_key(&thief);
    device.set_signer(thief);
    device
        .ask(RequestBody::Enroll {
            key: thief_public,
            code_proof: None,
        })
        .await?
        .expect_refusal(ErrorCode::Denied)?;
    bystander.is_served().await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn the_same_request_bytes_published_twice_are_executed_once_and_refused_as_replay()
-> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-replay").await?;
    hub.dir()
        .add_device("rf-door-replay", "sensor", &["building-a"])?;
    let key = hub.dir().add_app("rf-app-replay", "controller")?;
    let mut app = hub.raw("rf-app-replay", key.signer()?).await?;

    let request = app.request(access("rf-door-replay", "door:open"))?;
    app.publish(&request.bytes).await?;
    app.publish(&request.bytes).await?;
    let mut responses = vec![
        app.next_response(WAIT).await?,
        app.next_response(WAIT).await?,
    ];
    bystander.is_served().await?;
    // Handled concurrently: either may be answered first.
    responses.sort_by_key(|r| r.error_code().is_some());
    for r in &responses {
        assert_eq!(
            (r.request_id, r.nonce),
            (request.request_id, request.nonce),
            "both answer the request"
        );
    }
    responses[0].expect_token()?;
    responses[1].expect_refusal(ErrorCode::Replay)?;
    app.expect_no_response(QUIET).await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_request_ten_minutes_off_is_refused_as_stale_and_hub_time_lets_the_client_correct()
-> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-stale").await?;
    let key = hub.dir().add_app("rf-app-stale", "controller")?;
    let mut app = hub.raw("rf-app-stale", key.signer()?).await?;

    for skew in [-600i64, 600] {
        let issued_at = unix_now().saturating_add_signed(skew);
        let stale = app.request_at(fetch(), issued_at)?;
        let response = app.send(&stale).await?;
        response.expect_refusal(ErrorCode::Stale)?;
        assert_eq!(
            response.op,
            Some(Operation::FetchRevocations),
            "a stale refusal still answers the request, so its time can be trusted"
        );
        let now = unix_now();
        assert!(
            response.hub_time.abs_diff(now) <= 2,
            "hub_time {} is the hub's clock, not the request's ({issued_at}); now {now}",
            response.hub_time
        );
        bystander.is_served().await?;

        // A client with no clock takes hub_time and succeeds with a new nonce.
        let corrected = app.request_at(fetch(), response.hub_time)?;
        let response = app.send(&corrected).await?;
        assert!(
            matches!(response.outcome, Ok(Answer::Revocations { .. })),
            "{response:?}"
        );
    }
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn an_app_asking_for_more_than_its_rule_grants_is_denied_not_narrowed() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-scope").await?;
    hub.dir()
        .add_device("rf-door-scope", "sensor", &["building-a"])?;
    let key = hub.dir().add_app("rf-app-scope", "controller")?;
    let mut app = hub.client("rf-app-scope", &key).await?;

    for scope in ["door:open door:unlock", "door:*", "admin:all"] {
        assert_eq!(
            refusal(&mut app, access("rf-door-scope", scope)).await?,
            ErrorCode::Denied,
            "{scope}"
        );
        bystander.is_served().await?;
    }
    let Answer::Token { token, .. } = app
        .request(access("rf-door-scope", "door:open"), WAIT)
        .await?
    else {
        bail!("expected a token")
    };
    let claims = token::dangerous_verify_signature_only(&token, &hub.trust_anchor())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(claims.scope.as_str(), "door:open");
    app.close().await;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn policy_denies_what_no_rule_or_role_allows() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-policy").await?;
    hub.dir()
        .add_device("rf-door-b", "sensor", &["building-b"])?;
    let device_key = hub
        .dir()
        .add_device("rf-door-a", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("rf-app-policy", "controller")?;
    let ops_key = hub.dir().add_operator("rf-ops-policy", "ops")?;
    let mut app = hub.client("rf-app-policy", &app_key).await?;
    let mut device = hub.client("rf-door-a", &device_key).await?;
    let mut ops = hub.client("rf-ops-policy", &ops_key).await?;

    let cases = [
        (
            "app",
            access("rf-door-b", "door:open"),
            "no rule names building-b",
        ),
        ("app", access("rf-nobody", "door:open"), "no such device"),
        ("app", RequestBody::DeviceToken, "apps get no device tokens"),
        (
            "device",
            access("rf-door-a", "door:open"),
            "devices get no access tokens",
        ),
        (
            "ops",
            access("rf-door-a", "door:open"),
            "operators get no tokens",
        ),
        (
            "device",
            RequestBody::Revoke(RevokeTarget::Device("rf-door-b")),
            "devices do not revoke",
        ),
    ];
    for (who, body, why) in cases {
        let client = match who {
            "app" => &mut app,
            "device" => &mut device,
            _ => &mut ops,
        };
        assert_eq!(refusal(client, body).await?, ErrorCode::Denied, "{why}");
        bystander.is_served().await?;
    }
    for client in [app, device, ops] {
        client.close().await;
    }
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_device_cannot_ask_in_another_devices_name() -> Result<()> {
    let hub = hub().await?;
    let key_a = hub
        .dir()
        .add_device("rf-dev-a", "sensor", &["building-a"])?;
    let key_b = hub
        .dir()
        .add_device("rf-dev-b", "sensor", &["building-a"])?;
    let mut attacker = hub.raw("rf-dev-a", key_a.signer()?).await?;
    // The victim is the bystander here: it listens on its own response topic throughout.
    let mut victim = hub.raw("rf-dev-b", key_b.signer()?).await?;
    let enrolled = victim
        .ask(RequestBody::Enroll {
            key: key_b.public_key()?,
            code_proof: None,
        })
        .await?;
    assert_eq!(enrolled.outcome, Ok(Answer::Enrolled), "{enrolled:?}");

    // On its own topic, a request naming another client is malformed.
    let nonce = random_bytes();
    let as_b = attacker.sign_as("rf-dev-b", 7, unix_now(), nonce, RequestBody::DeviceToken)?;
    attacker.publish(&as_b).await?;
    let response = attacker.next_response(WAIT).await?;
    response.expect_refusal(ErrorCode::Malformed)?;
    assert_eq!(
        response.client, "rf-dev-a",
        "answered on the sender's topic"
    );
    assert_eq!((response.request_id, response.nonce), (7, nonce));

    // On the other client's topic, the broker drops it: the ACL allows only one's own.
    let nonce = random_bytes();
    let as_b = attacker.sign_as("rf-dev-b", 8, unix_now(), nonce, RequestBody::DeviceToken)?;
    let topic_b = topic::request("rf-dev-b").unwrap().to_string();
    assert_eq!(
        attacker.publish_on(&topic_b, &as_b).await?,
        PubAckReason::NotAuthorized
    );
    attacker.expect_no_response(QUIET).await?;
    victim.expect_no_response(QUIET).await?;

    let token = victim.ask(RequestBody::DeviceToken).await?.expect_token()?;
    assert!(token.1.is_some(), "the victim is served");
    // A pre-registered key is not enough: a device that never enrolled gets no token.
    let mut unenrolled = hub.raw("rf-dev-a", key_a.signer()?).await?;
    unenrolled
        .ask(RequestBody::DeviceToken)
        .await?
        .expect_refusal(ErrorCode::Denied)?;
    Ok(())
}

#[tokio::test]
async fn a_revoked_device_refreshing_is_refused_as_revoked() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-revoked").await?;
    let (mut device, _) = hub
        .enrolled_device("rf-dev-revoked", "sensor", &["building-a"])
        .await?;
    let ops_key = hub.dir().add_operator("rf-ops-revoked", "ops")?;
    let Answer::Token {
        grant: Some((grant, _)),
        ..
    } = device.request(RequestBody::DeviceToken, WAIT).await?
    else {
        bail!("expected a token and a grant")
    };

    let mut ops = hub.client("rf-ops-revoked", &ops_key).await?;
    ops.request(
        RequestBody::Revoke(RevokeTarget::Device("rf-dev-revoked")),
        WAIT,
    )
    .await?;
    assert_eq!(
        refusal(&mut device, RequestBody::Refresh { grant: &grant }).await?,
        ErrorCode::Revoked
    );
    bystander.is_served().await?;
    assert_eq!(
        refusal(&mut device, RequestBody::DeviceToken).await?,
        ErrorCode::Revoked
    );
    device.close().await;
    ops.close().await;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_reused_refresh_grant_is_refused_as_revoked_and_so_is_its_newer_grant() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-reuse").await?;
    let key = hub
        .dir()
        .add_device("rf-dev-reuse", "sensor", &["building-a"])?;
    let mut device = hub.client("rf-dev-reuse", &key).await?;
    device
        .request(
            RequestBody::Enroll {
                key: key.public_key()?,
                code_proof: None,
            },
            WAIT,
        )
        .await?;
    let grant = |answer: Answer| match answer {
        Answer::Token {
            grant: Some((g, _)),
            ..
        } => Ok(g),
        other => bail!("expected a token and a grant, got {other:?}"),
    };
    let g1 = grant(device.request(RequestBody::DeviceToken, WAIT).await?)?;
    let g2 = grant(
        device
            .request(RequestBody::Refresh { grant: &g1 }, WAIT)
            .await?,
    )?;

    // A copy of g1 used again (say, by a thief): the whole family dies.
    assert_eq!(
        refusal(&mut device, RequestBody::Refresh { grant: &g1 }).await?,
        ErrorCode::Revoked
    );
    bystander.is_served().await?;
    assert_eq!(
        refusal(&mut device, RequestBody::Refresh { grant: &g2 }).await?,
        ErrorCode::Revoked,
        "the family's newer grant is refused too"
    );
    // The device itself is not revoked: it starts a new family.
    let g3 = grant(device.request(RequestBody::DeviceToken, WAIT).await?)?;
    grant(
        device
            .request(RequestBody::Refresh { grant: &g3 }, WAIT)
            .await?,
    )?;
    device.close().await;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn bytes_that_are_not_a_request_get_a_malformed_answer_on_the_senders_topic() -> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-noise").await?;
    let key = hub.dir().add_app("rf-app-noise", "controller")?;
    let mut app = hub.raw("rf-app-noise", key.signer()?).await?;

    let valid = app.request(fetch())?.bytes;
    let mut trailing = valid.clone();
    trailing.push(0);
    let inputs: [(&str, Vec<u8>); 4] = [
        ("random bytes", random_bytes::<200>().to_vec()),
        ("nothing", Vec::new()),
        ("a truncated request", valid[..valid.len() - 10].to_vec()),
        ("a request with a trailing byte", trailing),
    ];
    for (what, bytes) in inputs {
        let (published, served) = tokio::join!(app.publish(&bytes), bystander.is_served());
        published?;
        served?;
        let response = app.next_response(WAIT).await.context(what)?;
        response
            .expect_refusal(ErrorCode::Malformed)
            .context(what)?;
        assert_answers_no_request(&response, "rf-app-noise");
    }
    // Anyone can make noise on their own topic: registered or not, the hub answers.
    let mut stranger = hub.raw("rf-stranger-noise", generate_signer()).await?;
    stranger.publish(&random_bytes::<64>()).await?;
    let response = stranger.next_response(WAIT).await?;
    response.expect_refusal(ErrorCode::Malformed)?;
    assert_answers_no_request(&response, "rf-stranger-noise");
    bystander.is_served().await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_request_over_max_request_bytes_is_refused_as_malformed_and_only_a_revoke_may_be_larger()
-> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-big").await?;
    let key = hub.dir().add_app("rf-app-big", "controller")?;
    let mut app = hub.raw("rf-app-big", key.signer()?).await?;
    let ops_key = hub.dir().add_operator("rf-ops-big", "ops")?;
    let mut ops = hub.raw("rf-ops-big", ops_key.signer()?).await?;

    // max_request_bytes is 1024 here: an access token request with the longest scope
    // (16 tokens of 64 bytes) is well formed and larger.
    let tokens: Vec<String> = (0..16).map(|i| format!("door:{i:0>59}")).collect();
    let scope: &'static str = Box::leak(tokens.join(" ").into_boxed_str());
    let big = app.request(access("rf-door-big", scope))?;
    assert!(big.bytes.len() > 1024, "{} bytes", big.bytes.len());
    let (published, served) = tokio::join!(app.publish(&big.bytes), bystander.is_served());
    published?;
    served?;
    let response = app.next_response(WAIT).await?;
    let reason = response.expect_refusal(ErrorCode::Malformed)?;
    assert!(
        reason.contains("1024"),
        "the reason names the limit: {reason}"
    );
    assert_eq!(
        (response.op, response.request_id, response.nonce),
        (Some(Operation::AccessToken), big.request_id, big.nonce),
        "it decoded, so the refusal answers the request"
    );

    // Bytes over the limit that are no request at all are malformed too.
    let mut padded = app.request(fetch())?.bytes;
    padded.resize(1025, 0);
    app.publish(&padded).await?;
    let response = app.next_response(WAIT).await?;
    response.expect_refusal(ErrorCode::Malformed)?;
    assert_answers_no_request(&response, "rf-app-big");

    // A revoke naming a list of devices may be larger, up to max_revoke_request_bytes
    // (64 KiB here): this one is judged on what it names (none is a registered device).
    let ids: Vec<String> = (0..200).map(|i| format!("rf-nobody-{i:0>40}")).collect();
    let list: Vec<&str> = ids.iter().map(String::as_str).collect();
    let revoke = ops.request(RequestBody::Revoke(RevokeTarget::Devices(IdList::new(
        &list,
    ))))?;
    assert!(
        (1024..=65_536).contains(&revoke.bytes.len()),
        "{} bytes",
        revoke.bytes.len()
    );
    let reason = ops
        .send(&revoke)
        .await?
        .expect_refusal(ErrorCode::Denied)?
        .to_owned();
    assert!(
        reason.contains("200 of the 200 ids are not registered devices"),
        "{reason}"
    );
    // And one over that is refused, naming its limit.
    let ids: Vec<String> = (0..1100).map(|i| format!("rf-nobody-{i:0>50}")).collect();
    let list: Vec<&str> = ids.iter().map(String::as_str).collect();
    let revoke = ops.request(RequestBody::Revoke(RevokeTarget::Devices(IdList::new(
        &list,
    ))))?;
    assert!(
        (65_537..=68 * 1024).contains(&revoke.bytes.len()),
        "{} bytes: over the limit, within the hub's MQTT packet size",
        revoke.bytes.len()
    );
    ops.publish(&revoke.bytes).await?;
    let response = ops.next_response(WAIT).await?;
    let reason = response.expect_refusal(ErrorCode::Malformed)?;
    assert!(
        reason.contains("65536"),
        "the reason names the limit: {reason}"
    );
    // Refused before it is decoded (no client may make the hub parse more).
    assert_answers_no_request(&response, "rf-ops-big");

    let response = app.ask(fetch()).await?;
    assert!(response.outcome.is_ok(), "{response:?}");
    bystander.is_served().await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_client_over_its_rate_limit_is_refused_as_rate_limited_and_others_are_not() -> Result<()>
{
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-rate").await?;
    let key = hub.dir().add_app("rf-app-rate", "controller")?;
    let mut app = hub.raw("rf-app-rate", key.signer()?).await?;

    // The default limit: a burst of 20, then 5 per second.
    const SENT: usize = 40;
    let started = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..SENT {
        requests.push(app.request(fetch())?);
    }
    for request in &requests {
        app.publish(&request.bytes).await?;
    }
    bystander.is_served().await?;
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..SENT {
        let response = app.next_response(WAIT).await?;
        assert!(
            requests
                .iter()
                .any(|r| (r.request_id, r.nonce) == (response.request_id, response.nonce)),
            "every answer answers one of the requests"
        );
        match response.error_code() {
            None => ok += 1,
            Some(ErrorCode::RateLimited) => limited += 1,
            Some(other) => bail!("unexpected refusal {other}: {response:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(limited >= 1, "{ok} served, none limited");
    // The bucket starts full (20) and refills at 5 per second.
    let allowed = 20.0 + 5.0 * elapsed + 1.0;
    assert!(
        ok >= 20 && f64::from(ok) <= allowed,
        "{ok} served in {elapsed:.2} s"
    );
    bystander.is_served().await?;

    // The limit is a rate, not a ban: the app is served again once its bucket refills (one
    // request per 200 ms), and refused only as rate limited until then. Asked no faster than
    // the sustained rate, so the asking cannot keep the bucket empty.
    wait_until_every(
        "the app served again after its burst",
        Duration::from_secs(5),
        Duration::from_millis(250),
        async || {
            let response = app.ask(fetch()).await?;
            match response.error_code() {
                None => Ok(Some(())),
                Some(ErrorCode::RateLimited) => Ok(None),
                Some(other) => bail!("unexpected refusal {other}: {response:?}"),
            }
        },
    )
    .await?;
    bystander.close().await;
    Ok(())
}

#[tokio::test]
async fn a_request_over_the_hubs_mqtt_packet_limit_is_dropped_by_the_broker_and_stalls_nobody()
-> Result<()> {
    let hub = hub().await?;
    let mut bystander = Bystander::new(&hub, "rf-by-huge").await?;
    let key = hub.dir().add_app("rf-app-huge", "controller")?;
    let mut app = hub.raw("rf-app-huge", key.signer()?).await?;

    // The hub's MQTT 5 connection announces a maximum packet size of its largest request
    // (a revoke, 64 KiB here) plus 4 KiB; the broker (which takes up to 128 KiB here)
    // accepts the publish but must not forward it to the hub. So this is the one input the
    // hub cannot answer: it never sees it.
    let huge = vec![0xa5u8; 100_000];
    assert_eq!(app.publish(&huge).await?, PubAckReason::Success);
    bystander.is_served().await?;
    app.expect_no_response(QUIET).await?;
    assert!(
        hub.broker().log().contains("too large"),
        "{}",
        hub.broker().log()
    );
    assert!(
        !hub.log().contains("disconnected from broker"),
        "the hub kept its connection: {}",
        hub.log()
    );
    let response = app.ask(fetch()).await?;
    assert!(response.outcome.is_ok(), "{response:?}");
    bystander.is_served().await?;
    bystander.close().await;
    Ok(())
}
