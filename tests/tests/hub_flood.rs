//! Floods and bursts against a real `tessera-hub serve` and its own Mosquitto (with the
//! ACL `tessera-hub broker-acl` prints, as docs/OPERATING.md sets a hub up), with the
//! default configuration (one test shrinks the work queue, to see it overflow). In each a
//! well-behaved app (the bystander) keeps asking for access tokens in a closed loop, each
//! request with a deadline, and the test asserts:
//!
//! - the hub never stops answering the bystander past its deadline;
//! - its RSS stays within a generous bound of what it was before the flood;
//! - it stops on SIGTERM within its drain time, with exit status 0;
//! - neither the database nor the audit log grows per flooded request: the flooders'
//!   audit rows are O(aggregation windows) (one row per client, action and outcome per
//!   window, with a count), and the database grows by what the admission limit lets
//!   through, not by what was sent.
//!
//! The sustained flood also restarts the broker under the hub once: the hub must reconnect.
//! No test asserts a time or a throughput: deadlines only bound "never stops answering".
//!
//! The sustained flood runs `TESSERA_FLOOD_SECS` seconds (default 10, for CI); the full
//! size of issue 8 is
//! `TESSERA_FLOOD_SECS=30 cargo test -p tessera-tests --test hub_flood sustained -- --nocapture`.
//!
//! The tests of this file run one at a time (a flood on a 2-core machine is not the place
//! to run another one next to it).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tessera_hub::client::{Answer, Client, ClientError};
use tessera_shared::crypto::Signer;
use tessera_shared::message::{EnrollmentCode, ErrorCode, NONCE_LEN, RequestBody};
use tessera_shared::scope::Scopes;
use tessera_shared::topic;
use tessera_tests::flood::{
    DbCounts, Flooder, RawPublisher, SUSTAINED_MALFORMED_PER_SECOND, SUSTAINED_NOISY_CLIENTS,
    SUSTAINED_SIGNED_PER_SECOND, SUSTAINED_SIGNING_CLIENTS, audited, db_counts, fast_signer,
    garbage, signed_request, signed_request_at, sustain, vm_rss_kib,
};
use tessera_tests::hub::{HubResponse, TestHub, random_bytes, unix_now};
use tessera_tests::{QoS, wait_until};

/// How long the bystander waits for each answer: the "never stops answering" bound.
const DEADLINE: Duration = Duration::from_secs(5);
/// The bystander's pace: well under the default per-client limits (5/s in the store,
/// 10/s in memory).
const PACE: Duration = Duration::from_millis(250);
/// How long the bystander backs off after a retryable refusal (`rate_limited`,
/// `overloaded`), as PROTOCOL.md §9.5 asks of clients.
const BACKOFF: Duration = Duration::from_millis(500);
/// The default `serve.drain_s`.
const DRAIN: Duration = Duration::from_secs(5);
/// The default admission limit (`requests.admission_burst` / `admission_per_second`).
const ADMISSION_BURST: f64 = 40.0;
const ADMISSION_PER_SECOND: f64 = 10.0;
/// How long the hub aggregates identical refusals of one client into one audit row.
const AUDIT_WINDOW_S: f64 = 10.0;
/// How much the hub's RSS may grow over a flood: generous, far below what keeping every
/// flooded message would take.
const RSS_GROWTH_LIMIT_KIB: u64 = 128 * 1024;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> Result<TestHub> {
    TestHub::builder().with_acl().start().await
}

fn access<'a>(device: &'a str, scope: &'static str) -> RequestBody<'a> {
    RequestBody::AccessToken {
        device,
        scope: Scopes::parse(scope).unwrap(),
    }
}

/// A registered app asking for access tokens to its own device, one request at a time.
struct Bystander {
    id: String,
    key: tessera_tests::hub::TestKey,
    device: String,
    client: Option<Client>,
    tokens: u64,
    retried: u64,
    slowest: Duration,
}

impl Bystander {
    /// Registers device `{prefix}-door` and app `{prefix}-app` and connects the app.
    async fn new(hub: &TestHub, prefix: &str) -> Result<Self> {
        let device = format!("{prefix}-door");
        let id = format!("{prefix}-app");
        hub.dir().add_device(&device, "sensor", &["building-a"])?;
        let key = hub.dir().add_app(&id, "controller")?;
        let client = hub.client(&id, &key).await?;
        let mut bystander = Self {
            id,
            key,
            device,
            client: Some(client),
            tokens: 0,
            retried: 0,
            slowest: Duration::ZERO,
        };
        bystander.serve_for(Duration::from_millis(600), hub).await?;
        Ok(bystander)
    }

    /// Connects again (after a broker restart: the old connection's subscriptions are gone).
    /// The old connection is closed first: two with one client id would take over from
    /// each other.
    async fn reconnect(&mut self, hub: &TestHub) -> Result<()> {
        if let Some(old) = self.client.take() {
            old.close().await;
        }
        self.client = Some(hub.client(&self.id, &self.key).await?);
        Ok(())
    }

    /// One request: a token, or a retryable refusal (then a backoff), within [`DEADLINE`].
    async fn one(&mut self, hub: &TestHub) -> Result<()> {
        let asked = Instant::now();
        let client = self
            .client
            .as_mut()
            .context("the bystander is not connected")?;
        let answer = client
            .request(access(&self.device, "door:open"), DEADLINE)
            .await;
        self.slowest = self.slowest.max(asked.elapsed());
        match answer {
            Ok(Answer::Token { .. }) => {
                self.tokens += 1;
                tokio::time::sleep(PACE).await;
            }
            Err(ClientError::Refused {
                code: ErrorCode::RateLimited | ErrorCode::Overloaded,
                ..
            }) => {
                self.retried += 1;
                tokio::time::sleep(BACKOFF).await;
            }
            Err(ClientError::Timeout(_)) => bail!(
                "the hub did not answer the bystander {} within {DEADLINE:?} ({} tokens \
                 before); hub log:\n{}\nbroker log:\n{}",
                self.id,
                self.tokens,
                tail(&hub.log(), 30),
                tail(&hub.broker().log(), 10)
            ),
            other => bail!("the bystander {} got {other:?}", self.id),
        }
        Ok(())
    }

    /// Asks in a closed loop for `duration`; at least one token must come.
    async fn serve_for(&mut self, duration: Duration, hub: &TestHub) -> Result<()> {
        let until = Instant::now() + duration;
        let before = self.tokens;
        while Instant::now() < until {
            self.one(hub).await?;
        }
        ensure!(
            self.tokens > before,
            "the bystander {} got no token in {duration:?}",
            self.id
        );
        Ok(())
    }

    /// Asks in a closed loop until `done` is set (and at least once); at least one token
    /// must come.
    async fn serve_while_flooding(&mut self, done: &AtomicBool, hub: &TestHub) -> Result<()> {
        let before = self.tokens;
        loop {
            self.one(hub).await?;
            if done.load(Ordering::Relaxed) && self.tokens > before {
                return Ok(());
            }
        }
    }

    async fn close(self) {
        if let Some(client) = self.client {
            client.close().await;
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the test measures before a flood.
struct Before {
    rss_kib: u64,
    db: Vec<DbCounts>,
    started: Instant,
}

fn measure(hub: &TestHub, flooders: &[&str]) -> Result<Before> {
    let pid = hub.pid().context("the hub is not running")?;
    Ok(Before {
        rss_kib: vm_rss_kib(pid)?,
        db: flooders
            .iter()
            .map(|f| db_counts(&hub.dir().database_path(), f))
            .collect::<Result<_>>()?,
        started: Instant::now(),
    })
}

/// After a flood: RSS bounded, SIGTERM honoured within the drain time with status 0, and
/// the database and audit log grown by O(admitted + windows), not by what was sent.
/// `bystander_requests` is how many requests the bystander made (each may add a few rows).
fn check_after(
    hub: &TestHub,
    before: &Before,
    flooders: &[&str],
    sent: u64,
    bystander_requests: u64,
) -> Result<()> {
    let pid = hub.pid().context("the hub is not running")?;
    let rss_kib = vm_rss_kib(pid)?;
    eprintln!(
        "hub RSS {} KiB before the flood, {rss_kib} KiB after",
        before.rss_kib
    );
    ensure!(
        rss_kib <= before.rss_kib + RSS_GROWTH_LIMIT_KIB,
        "the hub's RSS grew from {} KiB to {rss_kib} KiB over the flood",
        before.rss_kib
    );
    let elapsed = before.started.elapsed().as_secs_f64();
    let status = hub
        .terminate(DRAIN + Duration::from_secs(5))
        .context("SIGTERM after the flood")?;
    ensure!(
        status.success(),
        "the hub exited with {status} on SIGTERM; log:\n{}",
        tail(&hub.log(), 30)
    );

    // Each flooder: at most the admission burst, then its rate, reaches the pipeline.
    let admitted = flooders.len() as f64 * (ADMISSION_BURST + ADMISSION_PER_SECOND * elapsed);
    let windows = (elapsed / AUDIT_WINDOW_S).ceil() + 2.0;
    let path = hub.dir().database_path();
    let rows_before = before.db.first().map_or(0, |c| c.rows);
    let mut rows_after = rows_before;
    for (flooder, before) in flooders.iter().zip(&before.db) {
        let after = db_counts(&path, flooder)?;
        rows_after = after.rows;
        let rows = after.audit_rows - before.audit_rows;
        let refusals = after.refusal_rows - before.refusal_rows;
        let kinds = after.refusal_kinds.max(1);
        eprintln!(
            "{flooder}: {rows} audit rows ({refusals} of refusals, {kinds} kinds) for {} \
             decisions",
            after.audit_decisions - before.audit_decisions
        );
        // Successes are a row each, but only what the limits let through succeeds.
        ensure!(
            (rows - refusals) as f64 <= ADMISSION_BURST + ADMISSION_PER_SECOND * elapsed,
            "{flooder}: {} successes audited in {elapsed:.1} s",
            rows - refusals
        );
        ensure!(
            refusals as f64 <= kinds as f64 * windows,
            "{flooder}: {refusals} audit rows of refusals for a flood of {elapsed:.1} s \
             ({kinds} kinds of refusal, {windows} aggregation windows)"
        );
    }
    // A request admitted may leave a nonce, an issued token and an audit row; so may each
    // of the bystander's.
    let bound = 3.0 * (admitted + bystander_requests as f64) + 100.0;
    let grown = rows_after.saturating_sub(rows_before);
    eprintln!("database: {grown} rows more after {sent} flooded messages (bound {bound:.0})");
    ensure!(
        (grown as f64) <= bound,
        "the database grew by {grown} rows over {sent} flooded messages in {elapsed:.1} s"
    );
    let log = hub.log();
    for line in log
        .lines()
        .filter(|l| l.contains("dropped or refused") || l.contains("shut") || l.contains("stopped"))
    {
        eprintln!("hub: {line}");
    }
    ensure!(
        log.contains("dropped or refused"),
        "the hub never logged a summary of what it dropped or refused; log:\n{}",
        tail(&log, 30)
    );
    Ok(())
}

/// Registers `id` as an app with a fast key.
fn flooding_app(hub: &TestHub, id: &str) -> Result<tessera_hub::crypto::AwsLcSigner> {
    let signer = fast_signer()?;
    hub.dir()
        .add_app_with_key(id, "controller", &signer.public_key())?;
    Ok(signer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_signed_request_published_2000_times_at_once_never_stops_the_hub_serving_others()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let hub = start().await?;
    let mut bystander = Bystander::new(&hub, "a-good").await?;
    hub.dir().add_device("a-door", "sensor", &["building-a"])?;
    let signer = flooding_app(&hub, "a-evil")?;
    let request = signed_request(&signer, "a-evil", 1, access("a-door", "door:open"))?;
    let mut flooder = RawPublisher::connect(hub.broker(), "a-evil").await?;
    let before = measure(&hub, &["a-evil"])?;

    let done = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let sent = flooder.burst(std::iter::repeat_n(request, 2000)).await;
            done.store(true, Ordering::Relaxed);
            sent.map(|n| (n, flooder))
        }
    });
    bystander.serve_while_flooding(&done, &hub).await?;
    let (sent, _flooder) = flood.await??;
    bystander.serve_for(Duration::from_secs(3), &hub).await?;
    eprintln!(
        "bystander: {} tokens, {} retries, slowest answer {:?}",
        bystander.tokens, bystander.retried, bystander.slowest
    );
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    check_after(&hub, &before, &["a-evil"], sent, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_thousand_malformed_messages_at_once_never_stop_the_hub_serving_others() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let hub = start().await?;
    let mut bystander = Bystander::new(&hub, "b-good").await?;
    let mut flooder = RawPublisher::connect(hub.broker(), "b-noise").await?;
    let before = measure(&hub, &["b-noise"])?;

    let done = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let sent = flooder.burst(garbage(50_000)).await;
            done.store(true, Ordering::Relaxed);
            sent.map(|n| (n, flooder))
        }
    });
    bystander.serve_while_flooding(&done, &hub).await?;
    let (sent, _flooder) = flood.await??;
    bystander.serve_for(Duration::from_secs(3), &hub).await?;
    eprintln!(
        "bystander: {} tokens, {} retries, slowest answer {:?}",
        bystander.tokens, bystander.retried, bystander.slowest
    );
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    check_after(&hub, &before, &["b-noise"], sent, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_clients_bursting_600_fresh_signed_requests_each_never_stop_the_hub_serving_others()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let hub = start().await?;
    let mut bystander = Bystander::new(&hub, "c-good").await?;
    hub.dir().add_device("c-door", "sensor", &["building-a"])?;
    let ids: Vec<String> = (1..=4).map(|i| format!("c-burst-{i}")).collect();
    let mut bursts = Vec::new();
    for id in &ids {
        let signer = flooding_app(&hub, id)?;
        let requests = (1..=600)
            .map(|n| signed_request(&signer, id, n, access("c-door", "door:open")))
            .collect::<Result<Vec<_>>>()?;
        bursts.push((RawPublisher::connect(hub.broker(), id).await?, requests));
    }
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let before = measure(&hub, &names)?;

    let done = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let mut floods = tokio::task::JoinSet::new();
            for (mut flooder, requests) in bursts {
                floods.spawn(async move { flooder.burst(requests).await.map(|n| (n, flooder)) });
            }
            let (mut sent, mut flooders) = (0, Vec::new());
            while let Some(flood) = floods.join_next().await {
                let (n, flooder) = flood??;
                sent += n;
                flooders.push(flooder);
            }
            done.store(true, Ordering::Relaxed);
            anyhow::Ok((sent, flooders))
        }
    });
    bystander.serve_while_flooding(&done, &hub).await?;
    let (sent, _flooder) = flood.await??;
    bystander.serve_for(Duration::from_secs(3), &hub).await?;
    eprintln!(
        "bystander: {} tokens, {} retries, slowest answer {:?}",
        bystander.tokens, bystander.retried, bystander.slowest
    );
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    check_after(&hub, &before, &names, sent, asked)
}

/// The burst of four clients above against a hub with one worker and a queue of two (the
/// only settings changed): what the queue cannot take is answered `overloaded` at once,
/// and the bystander, backing off on it, is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_work_queue_are_answered_overloaded_and_others_still_served()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let hub = TestHub::builder()
        .with_acl()
        .config("concurrency = 64", "concurrency = 1")
        .config("queue = 256", "queue = 2")
        .start()
        .await?;
    let mut bystander = Bystander::new(&hub, "f-good").await?;
    hub.dir().add_device("f-door", "sensor", &["building-a"])?;
    let ids: Vec<String> = (1..=4).map(|i| format!("f-burst-{i}")).collect();
    let mut bursts = Vec::new();
    for id in &ids {
        let signer = flooding_app(&hub, id)?;
        let requests = (1..=600)
            .map(|n| signed_request(&signer, id, n, access("f-door", "door:open")))
            .collect::<Result<Vec<_>>>()?;
        bursts.push((RawPublisher::connect(hub.broker(), id).await?, requests));
    }
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let before = measure(&hub, &names)?;

    let mut floods = tokio::task::JoinSet::new();
    for (mut flooder, requests) in bursts {
        floods.spawn(async move { flooder.burst(requests).await.map(|n| (n, flooder)) });
    }
    bystander.serve_for(Duration::from_secs(4), &hub).await?;
    let (mut sent, mut flooders) = (0, Vec::new());
    while let Some(flood) = floods.join_next().await {
        let (n, flooder) = flood??;
        sent += n;
        flooders.push(flooder);
    }
    eprintln!(
        "bystander: {} tokens, {} retries, slowest answer {:?}",
        bystander.tokens, bystander.retried, bystander.slowest
    );
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    let path = hub.dir().database_path();
    let overloaded = names
        .iter()
        .map(|n| audited(&path, n, "overloaded"))
        .sum::<Result<u64>>()?;
    eprintln!("{overloaded} requests refused as overloaded (audited so far)");
    ensure!(overloaded > 0, "no request was refused as overloaded");
    check_after(&hub, &before, &names, sent, asked)
}

/// How long the sustained flood runs: `TESSERA_FLOOD_SECS`, default 10 (issue 8 asks for
/// 30; see the module docs).
fn sustained_secs() -> u64 {
    std::env::var("TESSERA_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| *s >= 4)
        .unwrap_or(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sustained_flood_of_garbage_and_signed_requests_with_a_broker_restart_never_stops_the_hub()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let secs = sustained_secs();
    let mut hub = start().await?;
    let mut bystander = Bystander::new(&hub, "d-good").await?;
    hub.dir().add_device("d-door", "sensor", &["building-a"])?;
    // 10,000 malformed messages a second from two clients, 1,000 signed requests a
    // second from four (the same flood as `scripts/bench-issuance`'s flood comparison).
    let noisy = ["d-noise-1", "d-noise-2"];
    let signing = ["d-app-1", "d-app-2", "d-app-3", "d-app-4"];
    assert_eq!(noisy.len() as u64, SUSTAINED_NOISY_CLIENTS);
    assert_eq!(signing.len() as u64, SUSTAINED_SIGNING_CLIENTS);
    let per_noisy = SUSTAINED_MALFORMED_PER_SECOND / SUSTAINED_NOISY_CLIENTS;
    let per_signing = SUSTAINED_SIGNED_PER_SECOND / SUSTAINED_SIGNING_CLIENTS;
    // A bound of its own, in case the test fails before it sets `stop`.
    let limit = Duration::from_secs(4 * secs + 60);
    let mut flooders = Vec::new();
    for id in noisy {
        flooders.push((RawPublisher::connect(hub.broker(), id).await?, None));
    }
    for id in signing {
        let signer = flooding_app(&hub, id)?;
        flooders.push((RawPublisher::connect(hub.broker(), id).await?, Some(signer)));
    }
    let names: Vec<&str> = noisy.iter().chain(&signing).copied().collect();
    let before = measure(&hub, &names)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = tokio::task::JoinSet::new();
    for (flooder, signer) in flooders {
        let stop = Arc::clone(&stop);
        match signer {
            None => {
                let noise = garbage(1000);
                floods.spawn(sustain(flooder, per_noisy, stop, limit, move |n| {
                    Ok(noise[usize::try_from(n % 1000).unwrap()].clone())
                }));
            }
            Some(signer) => {
                let id = flooder.id().to_owned();
                floods.spawn(sustain(flooder, per_signing, stop, limit, move |n| {
                    signed_request(&signer, &id, n + 1, access("d-door", "door:open"))
                }));
            }
        }
    }
    let half = Duration::from_secs(secs / 2);
    bystander.serve_for(half, &hub).await?;

    // The broker goes away under the flood and comes back: the hub reconnects.
    let connections = hub.log().matches("connected to broker").count();
    hub.broker_mut().restart()?;
    wait_until(
        "the hub connected again after the broker's restart",
        Duration::from_secs(30),
        async || Ok((hub.log().matches("connected to broker").count() > connections).then_some(())),
    )
    .await
    .with_context(|| format!("hub log:\n{}", tail(&hub.log(), 30)))?;
    // Connected is not yet subscribed: a request sent before the hub's subscription is in
    // place is lost (every session starts clean). Serving is what the probe shows.
    hub.wait_until_serving().await?;
    bystander.reconnect(&hub).await?;
    bystander.serve_for(half, &hub).await?;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    while let Some(flood) = floods.join_next().await {
        sent += flood??;
    }
    bystander.serve_for(Duration::from_secs(2), &hub).await?;
    eprintln!(
        "{sent} messages flooded in {:.1} s; bystander: {} tokens, {} retries, slowest \
         answer {:?}",
        before.started.elapsed().as_secs_f64(),
        bystander.tokens,
        bystander.retried,
        bystander.slowest
    );
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    check_after(&hub, &before, &names, sent, asked)
}

/// An `enroll` request for `device` with the key of `signer` and a proof made from `code`.
fn enroll_guess(
    signer: &dyn Signer,
    device: &str,
    request_id: u64,
    issued_at: u64,
    code: &str,
) -> Result<Vec<u8>> {
    let nonce = random_bytes::<NONCE_LEN>();
    let public = signer.public_key();
    let proof = EnrollmentCode::proof(
        &EnrollmentCode::derive_key(code),
        device,
        &public.kid(),
        &nonce,
    );
    signed_request_at(
        signer,
        device,
        request_id,
        issued_at,
        nonce,
        RequestBody::Enroll {
            key: public,
            code_proof: Some(proof),
        },
    )
}

/// Collects the answers on `flooder`'s response topic until none comes for `quiet`.
async fn answers(
    flooder: &mut Flooder,
    hub: &TestHub,
    quiet: Duration,
) -> Result<Vec<HubResponse>> {
    let topic = topic::response(flooder.id())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string();
    let mut answers = Vec::new();
    while let Ok(message) = flooder.probe().expect_message(&topic, quiet).await {
        answers.push(HubResponse::verify(&message.payload, &hub.trust_anchor())?);
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_code_guesses_are_rate_limited_before_the_proof_is_checked() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let hub = start().await?;
    let mut bystander = Bystander::new(&hub, "e-good").await?;
    let device = "e-sensor";
    let code = hub
        .dir()
        .add_device_with_code(device, "sensor", &["building-a"])?;
    // The attacker publishes as the device (its broker credentials, or no ACL).
    let signer = fast_signer()?;
    let mut flooder = Flooder::connect(hub.broker(), device).await?;
    let response_topic = topic::response(device).unwrap().to_string();
    flooder
        .probe()
        .subscribe_granted(&response_topic, QoS::AtLeastOnce)
        .await?;
    let before = measure(&hub, &[device])?;

    const GUESSES: u64 = 1000;
    let guesses = (1..=GUESSES)
        .map(|n| enroll_guess(&signer, device, n, unix_now(), "AAAAA-BBBBB-CCCCC-DDDDD"))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let sent = flooder.publish_all(guesses).await?;
    bystander.serve_for(Duration::from_secs(2), &hub).await?;
    let answered = answers(&mut flooder, &hub, Duration::from_millis(1500)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let checked = answered
        .iter()
        .filter(|a| a.error_code() == Some(ErrorCode::Denied))
        .count();
    let limited = answered
        .iter()
        .filter(|a| a.error_code() == Some(ErrorCode::RateLimited))
        .count();
    eprintln!(
        "{sent} guesses in {elapsed:.1} s: {checked} checked and denied, {limited} answered \
         rate_limited, {} not answered",
        sent - answered.len() as u64
    );
    for a in &answered {
        ensure!(
            matches!(
                a.error_code(),
                Some(ErrorCode::Denied | ErrorCode::RateLimited)
            ),
            "a wrong guess was answered {a:?}"
        );
    }
    // Only what the admission limit lets through reaches the proof check, and a limited
    // client gets one `rate_limited` answer a second, not one per guess.
    let admitted = ADMISSION_BURST + ADMISSION_PER_SECOND * elapsed;
    ensure!(
        checked as f64 <= admitted,
        "{checked} of {sent} guesses were checked in {elapsed:.1} s"
    );
    ensure!(
        limited as f64 <= elapsed.ceil() + 1.0,
        "{limited} rate_limited answers in {elapsed:.1} s"
    );

    // The device itself enrolls with the right code once the limit lets it.
    let device_signer = fast_signer()?;
    let mut enrolled = false;
    for attempt in 1..=10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let right = enroll_guess(&device_signer, device, 10_000 + attempt, unix_now(), &code)?;
        flooder.publish_all([right]).await?;
        let got = answers(&mut flooder, &hub, Duration::from_secs(2)).await?;
        if got.iter().any(|a| a.outcome == Ok(Answer::Enrolled)) {
            enrolled = true;
            break;
        }
    }
    ensure!(
        enrolled,
        "the device never enrolled with its code after the guessing"
    );
    bystander.serve_for(Duration::from_secs(1), &hub).await?;
    let asked = bystander.tokens + bystander.retried;
    bystander.close().await;
    check_after(&hub, &before, &[device], sent, asked)
}

/// A guess sent with an `issued_at` far off is refused whether or not the code is right:
/// otherwise `stale` (the proof was right, then the time was checked) versus `denied`
/// tells an attacker the code without spending it.
///
/// Depends on the pipeline checking freshness (and replay) before the enrollment proof
/// (hub/src/pipeline.rs): with the proof checked first, the wrong guess is `denied` and
/// the right one `stale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_enrollment_guess_gets_the_same_answer_whether_the_code_is_right_or_wrong()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let hub = start().await?;
    let device = "e-stale-sensor";
    let code = hub
        .dir()
        .add_device_with_code(device, "sensor", &["building-a"])?;
    let signer = fast_signer()?;
    let mut flooder = Flooder::connect(hub.broker(), device).await?;
    let response_topic = topic::response(device).unwrap().to_string();
    flooder
        .probe()
        .subscribe_granted(&response_topic, QoS::AtLeastOnce)
        .await?;
    let stale = unix_now() - 600;
    let mut codes = Vec::new();
    for (n, guess) in [(1, "AAAAA-BBBBB-CCCCC-DDDDD"), (2, code.as_str())] {
        flooder
            .publish_all([enroll_guess(&signer, device, n, stale, guess)?])
            .await?;
        let got = answers(&mut flooder, &hub, Duration::from_secs(2)).await?;
        ensure!(got.len() == 1, "one answer expected: {got:?}");
        codes.push(got[0].error_code());
    }
    ensure!(
        codes[0] == codes[1],
        "a stale wrong guess was answered {:?} and a stale right one {:?}: the answer tells \
         whether the code is right (depends on the pipeline checking freshness before the \
         enrollment proof)",
        codes[0],
        codes[1]
    );
    let status = hub.terminate(DRAIN + Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    Ok(())
}
