//! Three `tessera-hub serve` replicas on one PostgreSQL database behind one Mosquitto,
//! splitting the requests with an MQTT shared subscription (`[serve] shared_subscription =
//! true`, each replica its own `mqtt.client_id`), keep their promises through two crashes
//! (issue 12, item 3).
//!
//! Apps ask for access tokens and refresh them; operators revoke some of those tokens by
//! hash. Meanwhile the replica holding the housekeeping lease is killed with `kill -9`,
//! restarted, and later the new lease holder is killed too. Each client gives every
//! operation a retry budget: a timed-out attempt is sent again as a new request with a new
//! nonce (PROTOCOL.md §14.4). Afterwards:
//!
//! - no operation ran out of its budget, and nothing was refused except a refresh whose
//!   grant an earlier, timed-out attempt had already spent (the hub then revokes the grant
//!   family, §8.5.4, and the app asks afresh);
//! - after each kill, another replica takes the lease and heartbeats continue, and exactly
//!   one running replica holds the lease (`tessera_hub_lease_held`); the restarted replica
//!   serves requests again;
//! - in the database: every revocation an operator got an answer for is there, once, on
//!   its device's stream, and nothing else is (and the survivors serve each device's stream
//!   with those tokens); change numbers are gapless per stream; every change is seen
//!   published; every refresh grant that was spent has exactly one successor
//!   (no grant issued two tokens); every token an app received is recorded, and the tokens
//!   it never saw are no more than its timed-out attempts.
//!
//! Needs `mosquitto` and a PostgreSQL server at `TESSERA_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, trust auth, plain on loopback); the test
//! creates a database of its own and drops it afterwards, also when it fails.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tessera_hub::client::{Answer, Client, ClientError};
use tessera_hub::store::{Postgres, Store as _};
use tessera_shared::cose;
use tessera_shared::message::{ErrorCode, RequestBody, RevokeTarget};
use tessera_shared::revocation::{Entry, Heartbeat, MAX_LEEWAY, Stream, TokenHash, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::topic;
use tessera_tests::hub::{fetch_stream, unix_now};
use tessera_tests::replicas::{HubReplicas, metric_sum};
use tessera_tests::{MqttProbe, QoS, wait_until};

/// Seconds between heartbeats: short, so a lease changes hands quickly.
const HEARTBEAT_S: u64 = 2;
const DEVICES: usize = 4;
const APPS: usize = 6;
const OPERATORS: usize = 2;
/// Attempts per operation, the first included.
const ATTEMPTS: u32 = 4;
/// How long a client waits for the answer to one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Between two operations of one client (the rate limits are raised to allow it).
const PACE: Duration = Duration::from_millis(100);
/// Every this many tokens an app receives, one goes to the operators to revoke.
const REVOKE_EVERY: u64 = 2;
/// Operations answered between two steps of the test (a kill, a restart).
const OPERATIONS_PER_STEP: u64 = 150;
/// How long a step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

fn device_id(i: usize) -> String {
    format!("replicas-door-{i}")
}

fn app_id(i: usize) -> String {
    format!("replicas-app-{i}")
}

fn ops_id(i: usize) -> String {
    format!("replicas-ops-{i}")
}

/// What the clients share: a stop flag, a count of operations answered, and the tokens
/// handed to the operators to revoke.
#[derive(Debug, Default)]
struct Load {
    stop: AtomicBool,
    answered: AtomicU64,
    to_revoke: Mutex<VecDeque<(TokenHash, String)>>,
}

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    fn hand_over(&self, hash: TokenHash, device: &str) {
        self.to_revoke
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back((hash, device.to_owned()));
    }

    fn take(&self) -> Option<(TokenHash, String)> {
        self.to_revoke
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }
}

/// How one client's operations went.
#[derive(Debug, Default)]
struct Tally {
    operations: u64,
    attempts: u64,
    /// Attempts that got no answer in time.
    timeouts: u64,
    /// Operations that needed more than one attempt.
    retried: u64,
    /// Operations that ran out of attempts.
    exhausted: Vec<String>,
    /// Answers the test does not allow.
    unexpected: Vec<String>,
}

/// An operation's answer and how many attempts it took.
struct Answered {
    answer: Result<Answer, ClientError>,
    attempts: u32,
}

/// Sends `body` until an attempt is answered, at most [`ATTEMPTS`] times, each a new
/// request (new nonce and request id) waiting [`ATTEMPT_TIMEOUT`]. `None`: the budget ran
/// out.
async fn operate(
    client: &mut Client,
    body: RequestBody<'_>,
    tally: &mut Tally,
    load: &Load,
    what: &str,
) -> Option<Answered> {
    tally.operations += 1;
    for attempt in 1..=ATTEMPTS {
        tally.attempts += 1;
        match client.request(body, ATTEMPT_TIMEOUT).await {
            Err(ClientError::Timeout(_)) => {
                tally.timeouts += 1;
                if attempt == 1 {
                    tally.retried += 1;
                }
            }
            answer => {
                load.answered.fetch_add(1, Ordering::SeqCst);
                return Some(Answered {
                    answer,
                    attempts: attempt,
                });
            }
        }
    }
    tally.exhausted.push(format!(
        "{what}: no answer to {ATTEMPTS} attempts of {ATTEMPT_TIMEOUT:?}"
    ));
    None
}

/// What an app did.
#[derive(Debug, Default)]
struct AppReport {
    id: String,
    tally: Tally,
    /// The hashes of the tokens it received.
    received: HashSet<TokenHash>,
    /// Refreshes answered `revoked` because an earlier attempt had spent the grant.
    families_lost: u64,
}

/// An app: an access token for its device, then refreshes with the grant each answer
/// brings, until told to stop; every [`REVOKE_EVERY`]th token goes to the operators.
async fn run_app(mut client: Client, id: String, device: String, load: Arc<Load>) -> AppReport {
    let scope = Scopes::parse("door:open").unwrap_or_else(|e| panic!("scope: {e}"));
    let mut report = AppReport {
        id,
        ..AppReport::default()
    };
    let mut grant: Option<Vec<u8>> = None;
    // Whether an attempt with the current grant family timed out: its answer may have
    // been lost after the grant was spent.
    let mut family_timed_out = false;
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !load.stopped() {
        pace.tick().await;
        let (what, body) = match &grant {
            None => (
                "access_token",
                RequestBody::AccessToken {
                    device: &device,
                    scope,
                },
            ),
            Some(g) => ("refresh", RequestBody::Refresh { grant: g }),
        };
        let what = format!("{} {what} #{}", report.id, report.tally.operations + 1);
        let refreshing = grant.is_some();
        let Some(answered) = operate(&mut client, body, &mut report.tally, &load, &what).await
        else {
            // The grant's state is unknown now: start afresh.
            grant = None;
            continue;
        };
        match answered.answer {
            Ok(Answer::Token {
                token,
                grant: Some((next, _)),
            }) => {
                let hash = token_hash(&token);
                report.received.insert(hash);
                if u64::try_from(report.received.len()).unwrap_or(0) % REVOKE_EVERY == 0 {
                    load.hand_over(hash, &device);
                }
                // A new family starts clean: an access token's lost answers spent nothing.
                family_timed_out = refreshing && (family_timed_out || answered.attempts > 1);
                grant = Some(next);
            }
            Err(ClientError::Refused {
                code: ErrorCode::Revoked,
                ..
            }) if refreshing && (family_timed_out || answered.attempts > 1) => {
                report.families_lost += 1;
                grant = None;
            }
            other => {
                report
                    .tally
                    .unexpected
                    .push(format!("{what} (attempt {}): {other:?}", answered.attempts));
                grant = None;
            }
        }
    }
    client.close().await;
    report
}

/// What an operator did.
#[derive(Debug, Default)]
struct OpsReport {
    id: String,
    tally: Tally,
    /// The tokens it revoked, with an answer, and their devices.
    revoked: Vec<(TokenHash, String)>,
}

/// An operator: revokes the tokens handed over, by hash, until told to stop.
async fn run_operator(mut client: Client, id: String, load: Arc<Load>) -> OpsReport {
    let mut report = OpsReport {
        id,
        ..OpsReport::default()
    };
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !load.stopped() {
        pace.tick().await;
        let Some((hash, device)) = load.take() else {
            continue;
        };
        let what = format!("{} revoke #{}", report.id, report.tally.operations + 1);
        let body = RequestBody::Revoke(RevokeTarget::TokenHash(hash));
        let Some(answered) = operate(&mut client, body, &mut report.tally, &load, &what).await
        else {
            continue;
        };
        match answered.answer {
            // A first attempt revokes the token. A later one may find it revoked by an
            // attempt whose answer was lost: that succeeds and counts nothing.
            Ok(Answer::Revoked {
                revoked, entries, ..
            }) if (revoked, entries) == (1, 1)
                || (answered.attempts > 1 && (revoked, entries) == (0, 0)) =>
            {
                report.revoked.push((hash, device));
            }
            other => report
                .tally
                .unexpected
                .push(format!("{what} (attempt {}): {other:?}", answered.attempts)),
        }
    }
    client.close().await;
    report
}

/// Waits until `n` more operations than `from` were answered.
async fn wait_for_operations(load: &Load, from: u64, n: u64, what: &str) -> Result<u64> {
    wait_until(
        &format!("{n} operations answered {what}"),
        STEP_TIMEOUT,
        async || {
            let now = load.answered();
            Ok((now >= from + n).then_some(now))
        },
    )
    .await
}

/// The one running replica that holds the housekeeping lease, once exactly one does.
async fn single_lease_holder(hub: &mut HubReplicas) -> Result<usize> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let holders = hub.lease_holders().await?;
        if let [one] = holders[..] {
            return Ok(one);
        }
        if Instant::now() >= deadline {
            bail!(
                "not exactly one replica holds the lease within {STEP_TIMEOUT:?}: {holders:?}\n{}",
                hub.logs(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next heartbeat of `stream` on `watcher` (subscribed to its heartbeat topic) issued
/// after `after` (Unix seconds), verified with `anchor`.
async fn heartbeat_after(
    watcher: &mut MqttProbe,
    anchor: &tessera_shared::crypto::PublicKey,
    stream: &Stream<'_>,
    after: u64,
) -> Result<u64> {
    let topic = topic::revocation_heartbeat(stream).to_string();
    // Up to three intervals: the lease is taken at the next heartbeat of a survivor.
    let timeout = Duration::from_secs(3 * HEARTBEAT_S + 5);
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = watcher
            .expect_message(&topic, left)
            .await
            .with_context(|| format!("no heartbeat issued after {after} within {timeout:?}"))?;
        let payload = cose::Sign1::decode(&message.payload)
            .and_then(|s| s.verify(anchor))
            .map_err(|e| anyhow::anyhow!("heartbeat does not verify: {e}"))?;
        let beat = Heartbeat::decode(payload).map_err(|e| anyhow::anyhow!("heartbeat: {e}"))?;
        ensure!(
            beat.stream().name().as_str() == stream.name().as_str(),
            "a heartbeat of {} on {topic}",
            beat.stream().name()
        );
        if beat.issued_at() > after {
            return Ok(beat.issued_at());
        }
    }
}

/// Kills replica `victim`, which holds the lease, with SIGKILL; then waits until another
/// replica holds it alone, heartbeats go on, and the survivors answer more operations.
async fn kill_lease_holder(
    hub: &mut HubReplicas,
    victim: usize,
    watcher: &mut MqttProbe,
    load: &Load,
) -> Result<usize> {
    let name = hub.replica(victim)?.name().to_owned();
    let killed_at = unix_now();
    hub.kill_9(victim)?;
    let stream = Stream::of_service("tessera").map_err(|e| anyhow::anyhow!("stream: {e}"))?;
    heartbeat_after(watcher, &hub.trust_anchor(), &stream, killed_at)
        .await
        .with_context(|| format!("after killing replica {name}:\n{}", hub.logs(20)))?;
    let holder = single_lease_holder(hub).await?;
    ensure!(
        holder != victim,
        "the killed replica {name} holds the lease"
    );
    wait_for_operations(
        load,
        load.answered(),
        OPERATIONS_PER_STEP,
        &format!("by the survivors of replica {name}"),
    )
    .await?;
    Ok(holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_postgres_database_keep_every_promise_through_two_kill_9s()
-> Result<()> {
    let started = Instant::now();
    let mut hub = HubReplicas::builder()
        .hub_id("hub-replicas")
        .replicas(3)
        .config("heartbeat_s = 30", &format!("heartbeat_s = {HEARTBEAT_S}"))
        // The clients' pace and resends, not the limits, are under test.
        .config("rate_burst = 20", "rate_burst = 100")
        .config("rate_per_second = 5.0", "rate_per_second = 50.0")
        .config("admission_burst = 40", "admission_burst = 200")
        .config(
            "admission_per_second = 10.0",
            "admission_per_second = 100.0",
        )
        .start()
        .await?;
    for i in 0..DEVICES {
        hub.add_device(&device_id(i), "sensor", &["building-a"])?;
    }
    let mut apps = Vec::new();
    for i in 0..APPS {
        let signer = hub.add_app(&app_id(i), "controller")?;
        apps.push(hub.client(&app_id(i), signer).await?);
    }
    let mut operators = Vec::new();
    for i in 0..OPERATORS {
        let signer = hub.add_operator(&ops_id(i), "ops")?;
        operators.push(hub.client(&ops_id(i), signer).await?);
    }
    let heartbeats = Stream::of_service("tessera").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut watcher = hub.broker().probe("replicas-watcher").await?;
    watcher
        .subscribe_granted(
            topic::revocation_heartbeat(&heartbeats).as_str(),
            QoS::AtMostOnce,
        )
        .await?;
    let setup = started.elapsed();

    let load = Arc::new(Load::default());
    let mut apps_running = Vec::new();
    for (i, client) in apps.into_iter().enumerate() {
        apps_running.push(tokio::spawn(run_app(
            client,
            app_id(i),
            device_id(i % DEVICES),
            load.clone(),
        )));
    }
    let mut operators_running = Vec::new();
    for (i, client) in operators.into_iter().enumerate() {
        operators_running.push(tokio::spawn(run_operator(client, ops_id(i), load.clone())));
    }

    // The steps; whatever happens, the clients are stopped and their reports read.
    let steps = async {
        wait_for_operations(&load, 0, OPERATIONS_PER_STEP, "at first").await?;
        let first = single_lease_holder(&mut hub).await?;
        let second = kill_lease_holder(&mut hub, first, &mut watcher, &load).await?;
        hub.restart(first).await?;
        // The restarted replica takes its share of the requests again.
        wait_until(
            "the restarted replica to answer requests",
            STEP_TIMEOUT,
            async || {
                let text = hub.metrics(first).await?;
                Ok((metric_sum(&text, "tessera_hub_requests_total") > 0.0).then_some(()))
            },
        )
        .await
        .with_context(|| hub.logs(20))?;
        ensure!(
            single_lease_holder(&mut hub).await? == second,
            "the lease moved without a crash"
        );
        let last = kill_lease_holder(&mut hub, second, &mut watcher, &load).await?;
        anyhow::Ok((first, second, last))
    }
    .await;
    load.stop.store(true, Ordering::SeqCst);
    // Each client ends the operation under way: at most its whole budget.
    let budget = ATTEMPT_TIMEOUT * ATTEMPTS + Duration::from_secs(5);
    let mut app_reports = Vec::new();
    for task in apps_running {
        app_reports.push(tokio::time::timeout(budget, task).await??);
    }
    let mut ops_reports = Vec::new();
    for task in operators_running {
        ops_reports.push(tokio::time::timeout(budget, task).await??);
    }
    let (first, second, last) = steps?;
    let load_time = started.elapsed() - setup;

    // --- every operation answered within its budget, as allowed ---
    let tallies: Vec<(&str, &Tally)> = app_reports
        .iter()
        .map(|r| (r.id.as_str(), &r.tally))
        .chain(ops_reports.iter().map(|r| (r.id.as_str(), &r.tally)))
        .collect();
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(|(_, t)| f(t)).sum::<u64>();
    let (operations, attempts, timeouts, retried) = (
        sum(|t| t.operations),
        sum(|t| t.attempts),
        sum(|t| t.timeouts),
        sum(|t| t.retried),
    );
    let families_lost: u64 = app_reports.iter().map(|r| r.families_lost).sum();
    let revoked: Vec<(TokenHash, String)> = ops_reports
        .iter()
        .flat_map(|r| r.revoked.iter().cloned())
        .collect();
    eprintln!(
        "setup {setup:?}, load {load_time:?}: {operations} operations in {attempts} attempts \
         ({timeouts} timed out, {retried} operations retried), {} revocations, {families_lost} \
         grant families lost to a resend; killed replicas {} and {}, lease then with {}",
        revoked.len(),
        hub.replica(first)?.name(),
        hub.replica(second)?.name(),
        hub.replica(last)?.name(),
    );
    for (id, tally) in &tallies {
        ensure!(
            tally.exhausted.is_empty() && tally.unexpected.is_empty(),
            "{id}: out of budget {:?}, unexpected answers {:?}\n{}",
            tally.exhausted,
            tally.unexpected,
            hub.logs(30)
        );
    }
    ensure!(
        revoked.len() >= 20,
        "only {} revocations under load",
        revoked.len()
    );

    // --- the database: revocations, change numbers, grants, tokens ---
    let db = hub.database().connect().await?;
    let store = Postgres::open_existing(hub.database().url())?;
    let now = unix_now();

    // Change numbers: 1..=seq on every stream, and the stream's row agrees.
    let mut changes = 0u64;
    let streams = store.streams().await?;
    for stream in &streams {
        let numbers: Vec<i64> = db
            .query(
                "SELECT seq FROM revocation_changes WHERE stream = $1 ORDER BY seq",
                &[&stream.name],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let expected: Vec<i64> = (1..=i64::try_from(stream.seq)?).collect();
        ensure!(
            numbers == expected,
            "stream {} at change {} holds changes {numbers:?}",
            stream.name,
            stream.seq
        );
        changes += stream.seq;
    }

    // Every token revoked with an answer is listed once, by hash, on its device's stream,
    // addressed to the device; and no other token is listed.
    let mut listed: BTreeMap<TokenHash, Vec<(String, String, u64)>> = BTreeMap::new();
    for stream in &streams {
        let read = store
            .stream_entries(&stream.name, 1, now, MAX_LEEWAY, usize::MAX)
            .await?;
        ensure!(read.complete && read.latest == stream.seq, "{read:?}");
        let numbers: Vec<u64> = read.changes.iter().map(|(seq, _)| *seq).collect();
        ensure!(
            numbers == (1..=stream.seq).collect::<Vec<_>>(),
            "stream {} serves changes {numbers:?}",
            stream.name
        );
        for (seq, entries) in &read.changes {
            for addressed in entries {
                match &addressed.entry {
                    Entry::Token { hash, .. } => listed.entry(*hash).or_default().push((
                        stream.name.clone(),
                        addressed.audience.as_str().to_owned(),
                        *seq,
                    )),
                    other => bail!("stream {} lists {other:?}", stream.name),
                }
            }
        }
    }
    for (hash, device) in &revoked {
        let stream = Stream::of_device(device).name().to_string();
        let places = listed.get(hash).map(Vec::as_slice).unwrap_or_default();
        ensure!(
            matches!(places, [(s, audience, _)] if *s == stream && audience == device),
            "token {} of {device}, revoked with an answer, is listed at {places:?}",
            hex::encode(hash)
        );
    }
    let asked: HashSet<TokenHash> = revoked.iter().map(|(h, _)| *h).collect();
    ensure!(
        asked.len() == revoked.len(),
        "a token was revoked twice with answers"
    );
    let extra: Vec<String> = listed
        .keys()
        .filter(|h| !asked.contains(*h))
        .map(hex::encode)
        .collect();
    ensure!(extra.is_empty(), "listed, never revoked: {extra:?}");
    ensure!(
        changes == u64::try_from(revoked.len())?,
        "{changes} changes for {} revocations of one token each",
        revoked.len()
    );

    // The surviving replicas serve the same: each device's stream, fetched from change 1,
    // lists the tokens of that device revoked with an answer.
    let mut reader = hub.client(&ops_id(0), hub.key(&ops_id(0))?).await?;
    for i in 0..DEVICES {
        let device = device_id(i);
        let served = fetch_stream(
            &mut reader,
            &hub.trust_anchor(),
            &Stream::of_device(&device),
        )
        .await?
        .with_context(|| format!("no revocation served for {device}"))?;
        for (hash, _) in revoked.iter().filter(|(_, d)| *d == device) {
            ensure!(
                served.lists_token(&device, hash),
                "the stream served for {device} lacks token {}",
                hex::encode(hash)
            );
        }
    }
    reader.close().await;

    // Every change is seen published: the survivors publish again what a killed replica
    // recorded but could not publish.
    wait_until(
        "every revocation change to be confirmed published",
        STEP_TIMEOUT,
        async || {
            let row = db
                .query_one(
                    "SELECT COUNT(*) FROM revocation_changes WHERE NOT published",
                    &[],
                )
                .await?;
            Ok((row.get::<_, i64>(0) == 0).then_some(()))
        },
    )
    .await
    .with_context(|| hub.logs(20))?;

    // Grants: within a family each grant spent has exactly one successor, so a family holds
    // one more grant than it has spent ones; a family is revoked only after a resend.
    let families = db
        .query(
            "SELECT client, encode(family, 'hex'), COUNT(*), COUNT(*) FILTER (WHERE used), \
             bool_or(family_revoked) FROM grants GROUP BY client, family",
            &[],
        )
        .await?;
    let mut revoked_families: BTreeMap<String, u64> = BTreeMap::new();
    let mut spent = 0;
    for row in &families {
        let (client, family, grants, used, family_revoked): (String, String, i64, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        ensure!(
            grants == used + 1,
            "grant family {family} of {client}: {grants} grants, {used} spent: a spent grant \
             issued more than one token"
        );
        spent += used;
        if family_revoked {
            *revoked_families.entry(client).or_default() += 1;
        }
    }
    ensure!(spent > 0, "no refresh grant was spent");

    for app in &app_reports {
        let issued: HashSet<TokenHash> = db
            .query(
                "SELECT hash FROM issued_tokens WHERE subject = $1",
                &[&app.id],
            )
            .await?
            .iter()
            .map(|row| {
                let hash: Vec<u8> = row.get(0);
                TokenHash::try_from(hash.as_slice()).context("a token hash of 32 bytes")
            })
            .collect::<Result<_>>()?;
        let grants: i64 = db
            .query_one("SELECT COUNT(*) FROM grants WHERE client = $1", &[&app.id])
            .await?
            .get(0);
        ensure!(
            i64::try_from(issued.len())? == grants,
            "{}: {} tokens recorded but {grants} grants",
            app.id,
            issued.len()
        );
        let unrecorded = app.received.difference(&issued).count();
        ensure!(
            unrecorded == 0,
            "{}: {unrecorded} tokens received were never recorded",
            app.id
        );
        let unseen = u64::try_from(issued.difference(&app.received).count())?;
        ensure!(
            unseen <= app.tally.timeouts,
            "{}: {unseen} tokens issued that it never received, but only {} attempts timed out",
            app.id,
            app.tally.timeouts
        );
        let lost = revoked_families.get(&app.id).copied().unwrap_or(0);
        ensure!(
            lost <= app.tally.timeouts,
            "{}: {lost} grant families revoked, but only {} attempts timed out",
            app.id,
            app.tally.timeouts
        );
    }
    db.query_one("SELECT 1", &[]).await?;
    eprintln!("total {:?}", started.elapsed());
    Ok(())
}
