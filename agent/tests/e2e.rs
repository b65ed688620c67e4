//! `tessera-agent` end to end: the real binary against a real `tessera-hub` and a real
//! Mosquitto that each test starts on a free port.
//!
//! Agents here use `request_timeout_ms = 1000` and `backoff_cap_ms = 3000`: on loopback an
//! answer takes milliseconds, and the tokens live seconds.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::{
    APP_ROLE, DEVICE_ROLE, Device, GROUP, Hub, HubOptions, NO_ACCESS_ROLE, SHORT_APP_ROLE, Sample,
    Sampler, issued_in, now_ms, present, unix_now,
};
use tessera_shared::revocation::{Stream, token_hash};
use tessera_tests::{QoS, wait_until_blocking};

/// Runs blocking test code (processes, files, sockets) without starving the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn code_of(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the hub serves `device`'s stream with an entry addressed to it that revokes
/// `token` (an access token of `app`), and returns the stream's latest change: once the
/// agent holds that many changes, it knows the revocation.
async fn revocation_served(hub: &Hub, device: &str, app: &str, token: &[u8]) -> Result<u64> {
    let (iat, _) = common::token_times(token, &hub.dir.trust_anchor())?;
    let page = hub.device_stream(device).await?;
    ensure!(
        page.covers(device, &token_hash(token), app, iat),
        "no entry for {device} revokes {app}'s token: {page:?}"
    );
    Ok(page.seq)
}

/// The `replaced_at_fraction` of every renewal the agent logged, in order.
fn renewal_fractions(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("device token renewed"))
        .filter_map(|l| {
            let rest = l.split("replaced_at_fraction=\"").nth(1)?;
            rest.split('"').next()?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_a_valid_token_through_sixteen_renewals_of_four_second_tokens() -> Result<()> {
    let hub = Hub::start(HubOptions {
        device_token_lifetime_s: 4,
        ..HubOptions::default()
    })
    .await?;
    let code = blocking(|| hub.dir.add_device_with_code("rot-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "rot-1", "")?;
    // Everything the hub answers the device, to look for its tokens and grants on disk.
    let mut spy = hub.broker.probe("spy-rot-1").await?;
    spy.subscribe_granted("tessera/v1/client/rot-1/resp", QoS::AtLeastOnce)
        .await?;
    blocking(|| device.enroll(Some(&code)))?;
    let mut agent = blocking(|| device.spawn())?;

    let sampler = Sampler::start(
        device.socket.clone(),
        hub.dir.trust_anchor(),
        Duration::from_millis(200),
    );
    // Until the agent has renewed on schedule sixteen times (its first renewal is the
    // immediate refresh of the stored token at start) and has been sampled 200 times: some
    // 45 s of four-second tokens, however fast or slow the machine.
    blocking(|| {
        wait_until_blocking(
            "sixteen scheduled renewals and 200 samples",
            Duration::from_secs(120),
            || {
                Ok(
                    (renewal_fractions(&device.log()).len() >= 17 && sampler.len() >= 200)
                        .then_some(()),
                )
            },
        )
    })
    .with_context(|| device.log())?;
    let samples = sampler.finish();
    let status = blocking(|| device.status())?;
    let exit = blocking(|| agent.terminate(Duration::from_secs(10)))?;
    ensure!(exit.success(), "the agent did not stop cleanly: {exit}");

    let lapses: Vec<_> = samples
        .iter()
        .filter(|(_, s)| !matches!(s, Sample::Valid(_)))
        .collect();
    let distinct_tokens = {
        let mut exps: Vec<u64> = samples
            .iter()
            .filter_map(|(_, s)| match s {
                Sample::Valid(exp) => Some(*exp),
                _ => None,
            })
            .collect();
        exps.dedup();
        exps.len()
    };
    let log = device.log();
    let fractions = renewal_fractions(&log);
    println!(
        "rotation: {} samples, {} lapses, {} distinct tokens seen, {} renewals; replaced at \
         fractions of the lifetime {:?}",
        samples.len(),
        lapses.len(),
        distinct_tokens,
        fractions.len(),
        fractions
    );
    ensure!(samples.len() >= 200, "too few samples: {}", samples.len());
    ensure!(
        lapses.is_empty(),
        "the agent held no valid token at: {lapses:?}\n{log}"
    );
    ensure!(
        distinct_tokens >= 15,
        "only {distinct_tokens} tokens in {} samples",
        samples.len()
    );
    ensure!(
        status["trust_local_clock"] == false && status["state"] != "revoked",
        "{status}"
    );
    // The first renewal after start is the immediate refresh of a stored token whose
    // validity a device without a trusted clock cannot know; the rest follow the schedule.
    let scheduled = fractions.get(1..).unwrap_or_default();
    ensure!(scheduled.len() >= 15, "{fractions:?}");
    // 50-75 % by the schedule; the round trip (slower on a loaded machine) comes on top.
    ensure!(
        scheduled.iter().all(|f| (0.45..=0.95).contains(f)),
        "a refresh outside 50-75 % of the lifetime: {scheduled:?}"
    );
    let mut sorted = scheduled.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    ensure!(
        (0.5..=0.8).contains(&median),
        "median refresh point {median}: {scheduled:?}"
    );
    let (min, max) = scheduled
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), f| (lo.min(*f), hi.max(*f)));
    ensure!(
        max - min >= 0.05,
        "refreshes are not spread (jitter): {scheduled:?}"
    );

    // No plaintext token or grant on disk (nor in the log): neither raw nor in hex.
    let (tokens, grants) = issued_in(&spy.take_messages(), &hub.dir.trust_anchor());
    ensure!(
        tokens.len() >= 15 && grants.len() >= 15,
        "spy saw {} tokens",
        tokens.len()
    );
    let files = blocking(|| device.files())?;
    ensure!(
        files.iter().any(|(p, _)| p.ends_with("store.tsr")),
        "no store"
    );
    for (path, contents) in &files {
        let text = String::from_utf8_lossy(contents).to_lowercase();
        for secret in tokens.iter().chain(&grants) {
            let needle = &secret[secret.len() / 2..];
            ensure!(
                !contents.windows(needle.len()).any(|w| w == needle),
                "{} holds token or grant bytes",
                path.display()
            );
            ensure!(
                !text.contains(&hex::encode(needle)),
                "{} holds a token or grant in hex",
                path.display()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_broker_hub_and_agent_restarts_without_lapse_or_missed_revocation() -> Result<()> {
    let mut hub = Hub::start(HubOptions {
        device_token_lifetime_s: 6,
        ..HubOptions::default()
    })
    .await?;
    let code = blocking(|| hub.dir.add_device_with_code("rs-1", DEVICE_ROLE, &[GROUP]))?;
    let op = blocking(|| hub.operator("op-rs"))?;
    // One app per outage, each with a live access token that gets revoked while something
    // is down; and one that stays allowed.
    let mut apps = Vec::new();
    for id in ["app-broker", "app-hub", "app-agent", "app-kept"] {
        let key = blocking(|| hub.dir.add_app(id, APP_ROLE))?;
        let token = blocking(|| hub.access_token((id, &key), "rs-1", "door:open"))?;
        apps.push((id, key, token));
    }
    let device = Device::new(&hub, "rs-1", "presentation_window_s = 3")?;
    blocking(|| device.enroll(Some(&code)))?;
    // Read from the store, with the agent not running.
    let offline: serde_json::Value =
        serde_json::from_str(&blocking(|| device.run_ok(&["status", "--json"]))?)?;
    let enrolled_at = offline["enrolled_at"].clone();
    ensure!(
        enrolled_at.is_u64() && offline["running"] == false,
        "{offline}"
    );
    let mut agent = blocking(|| device.spawn())?;
    let sampler = Sampler::start(
        device.socket.clone(),
        hub.dir.trust_anchor(),
        Duration::from_millis(200),
    );
    let mut outages = Vec::new();
    let set_role = |hub: &Hub, app: &str| -> Result<()> {
        let out = hub.dir.run(&["client", "set-role", app, NO_ACCESS_ROLE])?;
        ensure!(
            out.contains("; 1 token it no longer allows is revoked (1 entry"),
            "set-role did not revoke the app's one token: {out}"
        );
        Ok(())
    };
    let token_of = |app: &str| {
        apps.iter()
            .find(|(id, _, _)| *id == app)
            .map(|(_, _, token)| token.clone())
            .with_context(|| format!("no app {app}"))
    };
    let wait_seq = |seq: u64| {
        blocking(|| {
            device.wait_status(
                &format!("change {seq} of its revocation stream"),
                Duration::from_secs(20),
                |s| s["revocation_seq"].as_u64().is_some_and(|v| v >= seq),
            )
        })
    };
    // What each step waits for, instead of a fixed time.
    let renewed = |what: &str, renewals: u64| {
        blocking(|| {
            device.wait_status(what, Duration::from_secs(30), |s| {
                s["state"] == "holding" && s["renewals"].as_u64().is_some_and(|n| n >= renewals)
            })
        })
    };
    let needs_the_hub = |what: &str, broker_down: bool| {
        blocking(|| {
            device.wait_status(what, Duration::from_secs(30), |s| {
                s["state"] != "holding" && (!broker_down || s["connected"] == false)
            })
        })
    };
    let renewals = |s: &serde_json::Value| s["renewals"].as_u64().unwrap_or_default();
    // Running on schedule before the first outage: a renewal after the one at start.
    renewed("a scheduled renewal", 2)?;

    // 1. The broker crashes; meanwhile a role change revokes app-broker's token. It comes
    // back once the agent has noticed and needs a new token.
    let start = now_ms();
    hub.broker.stop()?;
    blocking(|| set_role(&hub, "app-broker"))?;
    needs_the_hub("needing a token with the broker down", true)?;
    blocking(|| hub.broker.restart())?;
    outages.push(("broker", start, now_ms()));
    let before = renewals(&blocking(|| device.status())?);
    wait_seq(revocation_served(&hub, "rs-1", "app-broker", &token_of("app-broker")?).await?)?;
    // Back on schedule: the renewal the outage held up and a scheduled one.
    renewed("two renewals after the broker outage", before + 2)?;

    // 2. The hub crashes; meanwhile a role change revokes app-hub's token. It comes back
    // once the agent needs a new token.
    let start = now_ms();
    hub.kill_9()?;
    blocking(|| set_role(&hub, "app-hub"))?;
    needs_the_hub("needing a token with the hub down", false)?;
    hub.restart().await?;
    outages.push(("hub", start, now_ms()));
    let before = renewals(&blocking(|| device.status())?);
    wait_seq(revocation_served(&hub, "rs-1", "app-hub", &token_of("app-hub")?).await?)?;
    renewed("two renewals after the hub outage", before + 2)?;

    // 3. The agent crashes; meanwhile an operator revokes app-agent over MQTT. It comes
    // back once the hub serves that revocation, so it can only learn it after the fact.
    let start = now_ms();
    blocking(|| agent.kill_9())?;
    let counts = blocking(|| hub.revoke(("op-rs", &op), "subject", "app-agent"))?;
    ensure!(
        (counts.revoked, counts.entries, counts.notified) == (1, 1, 0),
        "one app with tokens for one device: {counts:?}"
    );
    let seq = revocation_served(&hub, "rs-1", "app-agent", &token_of("app-agent")?).await?;
    agent = blocking(|| device.spawn())?;
    outages.push(("agent", start, now_ms()));
    wait_seq(seq)?;
    // Renewals count from the agent's start: the one at start and a scheduled one.
    renewed("a scheduled renewal after the agent's restart", 2)?;

    let samples = sampler.finish();
    // A lapse may only happen while something is down, or while the hub and the agent are
    // reconnecting right after: the MQTT transport's reconnect backoff (capped at 10 s,
    // full jitter: mqtt/src/lib.rs), for the hub and the agent alike, then the request's
    // retry backoff, up to the test config's `backoff_cap_ms` (3 s), plus the agent's boot
    // and one round trip. (8 s was too little: under CI load a run lapsed 8 s after the
    // broker came back, the hub's reconnect having waited about 5 s.)
    let grace_ms = 10_000 + 3_000 + 2_000;
    let mut during = Vec::new();
    let mut outside = Vec::new();
    for (at, s) in &samples {
        let excused = |what: &str| {
            outages
                .iter()
                .any(|(w, from, to)| *w == what && (*from..=to + grace_ms).contains(at))
        };
        let excused_by = match s {
            Sample::Valid(_) => continue,
            // Only the agent's own outage may make it stop answering.
            Sample::Down => ["agent"].into_iter().find(|w| excused(w)),
            Sample::Lapse(_) => ["broker", "hub", "agent"].into_iter().find(|w| excused(w)),
        };
        match excused_by {
            Some(what) => during.push((what, *at, s.clone())),
            None => outside.push((*at, s.clone())),
        }
    }
    // Per outage: samples without a valid token, and how long after the outage ended the
    // last of them was.
    let summary: Vec<String> = outages
        .iter()
        .map(|(what, from, to)| {
            let mine: Vec<u64> = during
                .iter()
                .filter(|(w, _, s)| w == what && matches!(s, Sample::Lapse(_)))
                .map(|(_, at, _)| *at)
                .collect();
            let after = mine.iter().max().map_or(0, |at| at.saturating_sub(*to));
            format!(
                "{what}: down {} ms, {} samples without a valid token, the last {} ms after it was back",
                to - from,
                mine.len(),
                after
            )
        })
        .collect();
    println!("restarts: {} samples; {summary:?}", samples.len());
    ensure!(
        outside.is_empty(),
        "no valid token, or no answer, outside the outages: {outside:?}\n{}",
        device.log()
    );
    // Nothing missed: the three revoked tokens are refused, the kept one accepted, once the
    // restarted agent accepts presentations again (it refuses them for one window after
    // a start, PROTOCOL.md).
    blocking(|| {
        device.wait_status("accepting presentations", Duration::from_secs(20), |s| {
            s["presentations_accepted_from_ms"]
                .as_u64()
                .is_some_and(|t| t <= now_ms())
        })
    })?;
    for (id, key, token) in &apps {
        let signer = key.signer()?;
        let presentation = present(token, "rs-1", &signer, 0)?;
        let reply =
            blocking(|| device.ask(&format!("VERIFY door:open {}", hex::encode(&presentation))))?;
        if *id == "app-kept" {
            ensure!(reply == format!("OK {id}"), "{id}: {reply}");
        } else {
            ensure!(
                reply.contains("revoked"),
                "{id} was not refused as revoked: {reply}"
            );
        }
    }
    // No re-enrollment: the same enrollment throughout, and the agent never enrolled.
    let status = blocking(|| device.status())?;
    ensure!(
        status["enrolled_at"] == enrolled_at,
        "{status} vs {enrolled_at}"
    );
    ensure!(status["token_valid"] == true, "{status}");
    ensure!(
        !device.log().contains(" enrolled "),
        "the agent enrolled again"
    );
    // It follows its own partition, and holds the three entries addressed to it.
    ensure!(
        status["revocation_stream"] == Stream::of_device("rs-1").name().as_str()
            && status["revocation_entries"] == 3
            && status["revocation_latest"] == status["revocation_seq"],
        "{status}"
    );
    blocking(|| agent.terminate(Duration::from_secs(10)))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_by_an_operator_wipes_its_store_and_exits_with_code_5() -> Result<()> {
    // Over TLS, with a key the operator registered beforehand.
    let hub = Hub::start(HubOptions {
        tls: true,
        ..HubOptions::default()
    })
    .await?;
    let device = Device::new(&hub, "rv-1", "")?;
    let public = blocking(|| device.run_ok(&["keygen"]))?;
    ensure!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    let pub_file = device.path().join("rv-1.pub");
    std::fs::write(&pub_file, &public)?;
    let pub_path = pub_file.to_string_lossy().into_owned();
    blocking(|| {
        hub.dir.run(&[
            "device",
            "add",
            "rv-1",
            "--role",
            DEVICE_ROLE,
            "--group",
            GROUP,
            "--key",
            &pub_path,
        ])
    })?;
    let enrolled = blocking(|| device.enroll(None))?;
    ensure!(
        enrolled.contains("(existing)"),
        "enroll made a new key: {enrolled}"
    );
    let mut agent = blocking(|| device.spawn())?;
    blocking(|| device.token())?;
    let op = blocking(|| hub.operator("op-rv"))?;

    let counts = blocking(|| hub.revoke(("op-rv", &op), "device", "rv-1"))?;
    ensure!(
        (counts.revoked, counts.notified) == (1, 1),
        "an enrolled device is told: {counts:?}"
    );
    let exit = blocking(|| agent.wait_timeout(Duration::from_secs(15)))?
        .with_context(|| format!("the revoked agent kept running:\n{}", device.log()))?;
    ensure!(exit.code() == Some(5), "exit {exit}:\n{}", device.log());
    let log = device.log();
    ensure!(log.contains("this device is revoked"), "{log}");
    let state = device.state_dir();
    ensure!(!state.join("store.tsr").exists(), "the store was not wiped");
    ensure!(state.join("revoked").exists(), "no revoked marker");

    for args in [&["token"][..], &["status"], &["run"]] {
        let out = blocking(|| device.output(args))?;
        ensure!(
            code_of(&out) == Some(5),
            "{args:?}: {:?} {}",
            out.status,
            stderr(&out)
        );
    }
    let out = blocking(|| device.output(&["token"]))?;
    ensure!(stderr(&out).contains("revoked"), "{}", stderr(&out));

    // Back in service: the revoked key is retired on the device and refused by the hub.
    let key_file = state.join("device-key.pem");
    ensure!(
        !key_file.exists() && state.join("device-key.pem.revoked").exists(),
        "the revoked device key was not retired"
    );
    let refused = blocking(|| {
        hub.dir
            .run_failing(&["device", "reprovision", "rv-1", "--key", &pub_path])
    })?;
    ensure!(
        refused.contains("never accepted again"),
        "the revoked key was accepted again: {refused}"
    );
    // A new one-time code, typed as a person would: lower case, spaces for dashes.
    let out = blocking(|| {
        hub.dir
            .run(&["device", "reprovision", "rv-1", "--enrollment-code"])
    })?;
    let code = out
        .lines()
        .find_map(|l| l.strip_prefix("one-time enrollment code:"))
        .with_context(|| format!("no code: {out}"))?
        .trim()
        .to_lowercase()
        .replace('-', " ");
    let enrolled = blocking(|| device.enroll(Some(&code)))?;
    ensure!(
        enrolled.contains("(created)"),
        "enroll did not make a new key: {enrolled}"
    );
    let _agent = blocking(|| device.spawn())?;
    let token = blocking(|| device.token())?;
    ensure!(!token.is_empty(), "no token after provisioning again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_rolled_back_or_wrongly_keyed_store_is_refused_with_a_clear_error() -> Result<()>
{
    let hub = Hub::start(HubOptions::default()).await?;
    let code = blocking(|| hub.dir.add_device_with_code("st-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "st-1", "")?;
    blocking(|| device.enroll(Some(&code)))?;
    let state = device.state_dir();
    let (record, counter, secret) = (
        state.join("store.tsr"),
        state.join("store.counter"),
        state.join("device-secret"),
    );
    let old_record = std::fs::read(&record)?;
    // Read before the agent starts: it may store its new token before we look.
    let before: u64 = std::fs::read_to_string(&counter)?.trim().parse()?;
    let mut agent = blocking(|| device.spawn())?;
    // Without a trusted clock the agent refreshes at start, and stores the new token.
    blocking(|| {
        device.wait_status("a newer record", Duration::from_secs(10), |s| {
            s["store_counter"].as_u64().is_some_and(|c| c > before)
        })
    })?;
    blocking(|| agent.terminate(Duration::from_secs(10)))?;
    let (good_record, good_counter, good_secret) = (
        std::fs::read(&record)?,
        std::fs::read(&counter)?,
        std::fs::read(&secret)?,
    );
    let offline = blocking(|| device.run_ok(&["token"]))?;
    ensure!(hex::decode(offline.trim()).is_ok(), "{offline}");

    let restore = || -> Result<()> {
        std::fs::write(&record, &good_record)?;
        std::fs::write(&counter, &good_counter)?;
        std::fs::write(&secret, &good_secret)?;
        Ok(())
    };
    let mut tampered = good_record.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    type Damage<'a> = Box<dyn Fn() -> Result<()> + 'a>;
    let cases: Vec<(&str, Damage<'_>, &str)> = vec![
        (
            "tampered",
            Box::new(|| Ok(std::fs::write(&record, &tampered)?)),
            "authentication failed",
        ),
        (
            "rolled back",
            Box::new(|| Ok(std::fs::write(&record, &old_record)?)),
            "rolled back",
        ),
        (
            "wrong key",
            Box::new(|| Ok(std::fs::write(&secret, [0x5a; 32])?)),
            "wrong store key",
        ),
        (
            "counter deleted",
            Box::new(|| Ok(std::fs::remove_file(&counter)?)),
            "without it an older record",
        ),
    ];
    for (name, damage, needle) in &cases {
        damage()?;
        for args in [&["run"][..], &["token"], &["status"], &["enroll"]] {
            let out = blocking(|| device.output(args))?;
            ensure!(
                code_of(&out) == Some(4) && stderr(&out).contains(needle),
                "{name}, {args:?}: {:?}\n{}",
                out.status,
                stderr(&out)
            );
        }
        restore()?;
    }
    // Put right, the store opens again, and nothing was re-enrolled or overwritten.
    ensure!(
        std::fs::read(&record)? == good_record,
        "the store was rewritten"
    );
    let again = blocking(|| device.run_ok(&["token"]))?;
    ensure!(again == offline, "another token after restoring the store");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_a_good_presentation_and_refuses_bad_ones() -> Result<()> {
    let hub = Hub::start(HubOptions::default()).await?;
    let code = blocking(|| hub.dir.add_device_with_code("vf-1", DEVICE_ROLE, &[GROUP]))?;
    blocking(|| {
        hub.dir
            .add_device_with_code("vf-other", DEVICE_ROLE, &[GROUP])
    })?;
    let app = blocking(|| hub.dir.add_app("app-v", APP_ROLE))?;
    let short = blocking(|| hub.dir.add_app("app-short", SHORT_APP_ROLE))?;
    let doomed = blocking(|| hub.dir.add_app("app-doomed", APP_ROLE))?;
    let op = blocking(|| hub.operator("op-vf"))?;
    let device = Device::new(&hub, "vf-1", "leeway_s = 1\npresentation_window_s = 3")?;
    blocking(|| device.enroll(Some(&code)))?;
    let mut agent = blocking(|| device.spawn())?;
    let app_signer = app.signer()?;
    let verify = |presentation: &[u8], scope: &str| {
        blocking(|| device.ask(&format!("VERIFY {scope} {}", hex::encode(presentation))))
    };
    let token = blocking(|| hub.access_token(("app-v", &app), "vf-1", "door:open"))?;
    let good = present(&token, "vf-1", &app_signer, 0)?;

    // Right after a (re)start the agent has no record of the nonces it accepted before:
    // it refuses presentations for one window.
    let early = verify(&good, "door:open")?;
    ensure!(early.starts_with("ERR not yet"), "just started: {early}");
    blocking(|| {
        device.wait_status("accepting presentations", Duration::from_secs(10), |s| {
            s["revocation_fresh"] == true
                && s["presentations_accepted_from_ms"]
                    .as_u64()
                    .is_some_and(|t| t <= now_ms())
        })
    })?;
    ensure!(verify(&good, "door:open")? == "OK app-v");
    // The same presentation again proves nothing about who holds the key now.
    let replayed = verify(&good, "door:open")?;
    ensure!(replayed.contains("replay"), "replay: {replayed}");
    // Through the command line, in hex and from a file.
    let fresh = present(&token, "vf-1", &app_signer, 0)?;
    let out =
        blocking(|| device.output(&["verify", "--scope", "door:open", &hex::encode(&fresh)]))?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("app-v"),
        "{:?} {}",
        out,
        stderr(&out)
    );
    let file = device.path().join("presentation.cbor");
    std::fs::write(&file, present(&token, "vf-1", &app_signer, 0)?)?;
    let file_arg = file.to_string_lossy().into_owned();
    let out = blocking(|| device.output(&["verify", "--scope", "door:open", "--file", &file_arg]))?;
    ensure!(out.status.success(), "--file: {out:?}");

    let refusals: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "missing scope",
            present(&token, "vf-1", &app_signer, 0)?,
            "door:close",
            "does not grant the required scope",
        ),
        (
            "token for another device",
            present(
                &blocking(|| hub.access_token(("app-v", &app), "vf-other", "door:open"))?,
                "vf-1",
                &app_signer,
                0,
            )?,
            "door:open",
            "another audience",
        ),
        (
            "presented to another device",
            present(&token, "vf-other", &app_signer, 0)?,
            "door:open",
            "another audience",
        ),
        (
            "wrong holder key",
            present(&token, "vf-1", &tessera_tests::hub::generate_signer(), 0)?,
            "door:open",
            "possession",
        ),
        (
            "presentation signature broken",
            {
                let mut p = present(&token, "vf-1", &app_signer, 0)?;
                let last = p.len() - 1;
                p[last] ^= 0x01;
                p
            },
            "door:open",
            "possession",
        ),
        (
            "token signature broken",
            {
                let mut t = token.clone();
                let last = t.len() - 1;
                t[last] ^= 0x01;
                present(&t, "vf-1", &app_signer, 0)?
            },
            "door:open",
            "signature does not verify",
        ),
        (
            "stale presentation",
            present(&token, "vf-1", &app_signer, 120)?,
            "door:open",
            "outside the freshness window",
        ),
    ];
    for (name, presentation, scope, needle) in &refusals {
        let reply = verify(presentation, scope)?;
        ensure!(
            reply.starts_with("ERR") && reply.contains(needle),
            "{name}: {reply}"
        );
    }
    let out = blocking(|| {
        device.output(&[
            "verify",
            "--scope",
            "door:close",
            &hex::encode(&refusals[0].1),
        ])
    })?;
    ensure!(code_of(&out) == Some(1), "a refusal exits 1: {out:?}");

    // Expired: a 2 s token, presented after its expiry plus the agent's 1 s leeway.
    let short_token = blocking(|| hub.access_token(("app-short", &short), "vf-1", "door:open"))?;
    let (_, exp) = device.times(&short_token)?;
    let short_signer = short.signer()?;
    ensure!(
        verify(
            &present(&short_token, "vf-1", &short_signer, 0)?,
            "door:open"
        )? == "OK app-short"
    );
    // Accepted until its expiry plus the agent's 1 s leeway, then refused as expired.
    let reply = blocking(|| {
        wait_until_blocking(
            "the agent refusing the short token",
            Duration::from_secs((exp + 10).saturating_sub(unix_now())),
            || {
                let presentation = present(&short_token, "vf-1", &short_signer, 0)?;
                let reply =
                    device.ask(&format!("VERIFY door:open {}", hex::encode(presentation)))?;
                Ok((reply != "OK app-short").then_some(reply))
            },
        )
    })?;
    ensure!(
        reply.contains("expired"),
        "expired: {reply} (now {}, exp {exp})",
        unix_now()
    );

    // Revoked: accepted until the operator revokes the app, refused once the delta arrives.
    let doomed_token = blocking(|| hub.access_token(("app-doomed", &doomed), "vf-1", "door:open"))?;
    let doomed_signer = doomed.signer()?;
    ensure!(
        verify(
            &present(&doomed_token, "vf-1", &doomed_signer, 0)?,
            "door:open"
        )? == "OK app-doomed"
    );
    let counts = blocking(|| hub.revoke(("op-vf", &op), "subject", "app-doomed"))?;
    ensure!(
        (counts.revoked, counts.entries, counts.notified) == (1, 1, 0),
        "one app with tokens for one device: {counts:?}"
    );
    let seq = revocation_served(&hub, "vf-1", "app-doomed", &doomed_token).await?;
    blocking(|| {
        device.wait_status("the revocation", Duration::from_secs(10), |s| {
            s["revocation_seq"].as_u64().is_some_and(|v| v >= seq)
        })
    })?;
    let reply = verify(
        &present(&doomed_token, "vf-1", &doomed_signer, 0)?,
        "door:open",
    )?;
    ensure!(reply.contains("revoked"), "revoked: {reply}");
    // The others are unaffected.
    ensure!(verify(&present(&token, "vf-1", &app_signer, 0)?, "door:open")? == "OK app-v");

    blocking(|| agent.terminate(Duration::from_secs(10)))?;
    // Without the running agent there is no revocation knowledge to verify against.
    let out = blocking(|| device.output(&["verify", "--scope", "door:open", &hex::encode(&good)]))?;
    ensure!(
        code_of(&out) == Some(1) && stderr(&out).contains("not running"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
