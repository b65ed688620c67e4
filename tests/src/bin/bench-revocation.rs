//! Revocation at fleet scale, end to end (`scripts/bench-revocation`; docs/BENCHMARKS.md,
//! "Revocation fan-out").
//!
//! A real `tessera-hub` (release) and its own Mosquitto on 127.0.0.1. The hub registers a
//! group of `--registered` devices with one `device import`; `--devices` of them run here as
//! simulated devices, each the core's agent state machine (`tessera_shared::agent`, exactly
//! what `tessera-agent` and firmware run) over its own MQTT connection: they enroll with
//! their one-time code, get a device token and follow their revocation stream. Then an
//! operator runs `tessera-hub revoke --group` once, and the benchmark measures:
//!
//! - the command: from its start to its exit (it prints once the revocation is durable);
//! - the fan-out: from the command's start to each simulated device wiping itself on its
//!   signed `revoked` control message (p50, p99, last);
//! - the limit, in the same run: Mosquitto delivering one unsigned message of the same
//!   size (a control message) to the same connections, published once and fanned out to
//!   all of them (p50, p99, last), as the median of a few rounds.
//!
//! The hub sends one control message per device (each signed for that device, on its own
//! topic), so its fan-out cannot beat the broker's one-to-all delivery; the ratio says what
//! the hub adds. Nothing fails on a slow result; it fails when something does not work (a
//! device that never holds a token, or never wipes).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;
use tessera_hub::client::{Client, ClientError};
use tessera_hub::keyfile;
use tessera_hub::mqtt::MqttClient;
use tessera_hub::mqtt::{self, MqttConfig, Notice, QoS};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Report};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer as _};
use tessera_shared::message::{EnrollmentCode, RequestBody};
use tessera_shared::revocation::Stream;
use tessera_tests::{Broker, ChildGuard};
use tokio::sync::{mpsc, watch};

const HUB_ID: &str = "bench-hub";
const GROUP: &str = "fleet";
const FANOUT_TOPIC: &str = "bench/fanout";
/// Rounds of the broker's own fan-out; the median round is reported.
const FANOUT_ROUNDS: usize = 5;
/// How long every phase may take before the benchmark gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

fn say(message: &str) {
    eprintln!("bench-revocation: {message}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap_or_else(|e| panic!("OS random number generator: {e}"));
    b
}

fn generate_signer() -> P256Signer {
    loop {
        if let Ok(s) = P256Signer::from_scalar(&random32()) {
            return s;
        }
    }
}

struct Options {
    hub_bin: PathBuf,
    devices: usize,
    registered: usize,
    heartbeat_s: u64,
    json: bool,
}

impl Options {
    fn parse() -> Result<Self> {
        let mut o = Options {
            hub_bin: std::env::current_exe()?
                .parent()
                .context("the bench's directory")?
                .join("tessera-hub"),
            devices: 1000,
            registered: 10_000,
            heartbeat_s: 5,
            json: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = || args.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--hub-bin" => o.hub_bin = PathBuf::from(value()?),
                "--devices" => o.devices = value()?.parse().context("--devices")?,
                "--registered" => o.registered = value()?.parse().context("--registered")?,
                "--heartbeat-s" => o.heartbeat_s = value()?.parse().context("--heartbeat-s")?,
                "--json" => o.json = true,
                "--help" | "-h" => {
                    println!(
                        "bench-revocation [--devices N (1000)] [--registered M (10000)] \
                         [--heartbeat-s S (5)] [--json] [--hub-bin PATH]"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown option {other} (see --help)"),
            }
        }
        ensure!(
            o.devices >= 1 && o.devices <= o.registered,
            "need 1 <= --devices <= --registered"
        );
        Ok(o)
    }
}

fn run_checked(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn replace_once(path: &Path, from: &str, to: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    ensure!(
        text.matches(from).count() == 1,
        "{from:?} not once in {}",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1))?;
    Ok(())
}

/// The hub's directory, made with its own CLI.
struct Hub {
    bin: PathBuf,
    _temp: TempDir,
    dir: PathBuf,
    anchor: PublicKey,
    process: Option<ChildGuard>,
}

impl Hub {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(self.dir.join("tessera-hub.toml"));
        c
    }

    fn create(bin: &Path, port: u16, heartbeat_s: u64) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("tessera-bench-revocation-")
            .tempdir()?;
        let dir = temp.path().join("hub");
        run_checked(
            Command::new(bin)
                .arg("init")
                .arg("--dir")
                .arg(&dir)
                .args(["--hub-id", HUB_ID]),
        )?;
        let anchor = keyfile::read_public(&dir.join("trust-anchor.pem"))?;
        let config = dir.join("tessera-hub.toml");
        replace_once(&config, "port = 1883", &format!("port = {port}"))?;
        replace_once(
            &config,
            "heartbeat_s = 30",
            &format!("heartbeat_s = {heartbeat_s}"),
        )?;
        replace_once(
            &dir.join("policy.toml"),
            "building-a = \"Doors and sensors in building A\"",
            "building-a = \"Doors and sensors in building A\"\nfleet = \"The benchmark's fleet\"",
        )?;
        Ok(Self {
            bin: bin.to_owned(),
            _temp: temp,
            dir,
            anchor,
            process: None,
        })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = self.command();
        command.arg("serve").env_remove("RUST_LOG");
        self.process = Some(ChildGuard::spawn_logged(
            &mut command,
            &self.dir.join("hub.log"),
        )?);
        Ok(())
    }
}

/// What a simulated device reports.
#[derive(Debug)]
enum Happened {
    Holding(usize),
    Wiped(usize, u64),
    FanOut(usize, u64),
}

/// One simulated device: the core agent over its own MQTT connection. It keeps its
/// connection after wiping itself, for the broker's fan-out rounds.
async fn device(
    index: usize,
    id: String,
    code: String,
    anchor: PublicKey,
    mut mqtt: MqttConfig,
    out: mpsc::UnboundedSender<Happened>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut config = AgentConfig::new(&id, "tessera").map_err(|e| anyhow::anyhow!("{e}"))?;
    config.enrollment_code_key = Some(EnrollmentCode::derive_key(&code));
    config.trust_local_clock = true;
    let mut agent = Agent::<P256Signer>::new(config, generate_signer(), anchor)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    mqtt.client_id = id.clone();
    let (client, mut notices) = mqtt::connect(&mqtt, 64, stop)?;
    let mut wake: Option<u64> = None;
    let mut wiped = false;
    let mut event: Option<Owned> = Some(Owned::Boot);
    loop {
        if let Some(e) = event.take()
            && !wiped
        {
            let actions = {
                let ev = match &e {
                    Owned::Boot => Event::Boot { stored: None },
                    Owned::Connected => Event::Connected,
                    Owned::Disconnected => Event::Disconnected,
                    Owned::Timer => Event::Timer,
                    Owned::Message(t, p) => Event::Message {
                        topic: t,
                        payload: p,
                    },
                };
                let acts = agent
                    .handle(ev, now_ms(), &random32())
                    .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
                acts.iter().map(OwnedAction::from).collect::<Vec<_>>()
            };
            for a in actions {
                match a {
                    OwnedAction::Subscribe(t) => client.subscribe(t, QoS::AtLeastOnce).await?,
                    OwnedAction::Publish(t, p) => {
                        client.publish(t, QoS::AtLeastOnce, false, p).await?;
                    }
                    OwnedAction::Wake(t) => wake = Some(t),
                    OwnedAction::Holding => {
                        let _ = out.send(Happened::Holding(index));
                    }
                    OwnedAction::Wipe => {
                        wiped = true;
                        let _ = out.send(Happened::Wiped(index, now_ms()));
                        client.subscribe(FANOUT_TOPIC, QoS::AtLeastOnce).await?;
                    }
                    OwnedAction::Nothing => {}
                }
            }
        }
        let sleep = wake
            .filter(|_| !wiped)
            .map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis(t.saturating_sub(now_ms()))
            });
        tokio::select! {
            notice = notices.recv() => match notice {
                None => return Ok(()),
                Some(Notice::Connected) => {
                    event = Some(Owned::Connected);
                    if wiped {
                        client.subscribe(FANOUT_TOPIC, QoS::AtLeastOnce).await?;
                    }
                }
                Some(Notice::Disconnected(_)) => event = Some(Owned::Disconnected),
                Some(Notice::Message(m)) if m.topic == FANOUT_TOPIC => {
                    let sent = m.payload.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    let _ = out.send(Happened::FanOut(index, now_ms().saturating_sub(sent)));
                }
                Some(Notice::Message(m)) => event = Some(Owned::Message(m.topic, m.payload)),
            },
            () = tokio::time::sleep(sleep) => {
                wake = None;
                event = Some(Owned::Timer);
            }
        }
    }
}

enum Owned {
    Boot,
    Connected,
    Disconnected,
    Timer,
    Message(String, Vec<u8>),
}

enum OwnedAction {
    Subscribe(String),
    Publish(String, Vec<u8>),
    Wake(u64),
    Holding,
    Wipe,
    Nothing,
}

impl From<&Action<'_>> for OwnedAction {
    fn from(a: &Action<'_>) -> Self {
        match a {
            Action::Subscribe(t) => Self::Subscribe((*t).to_owned()),
            Action::Publish { topic, payload } => {
                Self::Publish((*topic).to_owned(), payload.to_vec())
            }
            Action::WakeAt(t) => Self::Wake(*t),
            Action::Wipe => Self::Wipe,
            Action::Report(Report::TokenRenewed { .. }) => Self::Holding,
            _ => Self::Nothing,
        }
    }
}

fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * pct).div_ceil(100)]
}

struct Spread {
    first: u64,
    p50: u64,
    p99: u64,
    last: u64,
}

fn spread(mut ms: Vec<u64>) -> Spread {
    ms.sort_unstable();
    Spread {
        first: ms.first().copied().unwrap_or(0),
        p50: percentile(&ms, 50),
        p99: percentile(&ms, 99),
        last: ms.last().copied().unwrap_or(0),
    }
}

async fn wait_until_serving(
    hub: &mut Hub,
    mqtt: &MqttConfig,
    op: &(String, PathBuf),
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let signer = keyfile::read_private(&op.1)?;
    let mut config = mqtt.clone();
    config.client_id = op.0.clone();
    let mut client =
        Client::connect(&config, &op.0, signer, hub.anchor, Duration::from_secs(5)).await?;
    let result = loop {
        if let Some(p) = &mut hub.process
            && let Some(status) = p.try_wait()?
        {
            break Err(anyhow::anyhow!(
                "the hub exited ({status}):\n{}",
                hub.log_tail()
            ));
        }
        let body = RequestBody::FetchRevocations {
            stream: Stream::Devices(0),
            from: 1,
        };
        match client.request(body, Duration::from_millis(300)).await {
            Ok(_) | Err(ClientError::Refused { .. }) => break Ok(()),
            Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
            Err(e) => break Err(e.into()),
        }
    };
    client.close().await;
    result
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse()?;
    let broker = Broker::builder()
        .max_queued_messages(10_000)
        .start()
        .context("starting mosquitto")?;
    let port = broker.port();
    let mut hub = Hub::create(&o.hub_bin, port, o.heartbeat_s)?;
    let mqtt = MqttConfig::plain("127.0.0.1", port, "unused");

    // Register the group in one command.
    let csv = hub.dir.join("fleet.csv");
    let mut lines = String::from("id,role,group,key\n");
    for i in 0..o.registered {
        lines.push_str(&format!("fleet-{i:05},sensor,{GROUP},\n"));
    }
    std::fs::write(&csv, lines)?;
    say(&format!(
        "registering {} devices with `device import`",
        o.registered
    ));
    let started = Instant::now();
    let codes_file = hub.dir.join("fleet.codes");
    run_checked(
        hub.command()
            .args(["device", "import"])
            .arg(&csv)
            .arg("--codes")
            .arg(&codes_file),
    )?;
    let import_s = started.elapsed().as_secs_f64();
    let codes = std::fs::read_to_string(&codes_file)?;
    let codes: Vec<(String, String)> = codes
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(id, code)| (id.to_owned(), code.to_owned()))
        .take(o.devices)
        .collect();
    ensure!(
        codes.len() == o.devices,
        "device import printed {} codes",
        codes.len()
    );

    let op_key = hub.dir.join("ops-1.pem");
    let signer = generate_signer();
    keyfile::write_private(&op_key, &signer)?;
    let op_pub = hub.dir.join("ops-1.pub.pem");
    std::fs::write(&op_pub, keyfile::public_to_pem(&signer.public_key()))?;
    run_checked(
        hub.command()
            .args(["operator", "add", "ops-1", "--role", "ops", "--key"])
            .arg(&op_pub),
    )?;
    hub.spawn()?;
    wait_until_serving(&mut hub, &mqtt, &("ops-1".to_owned(), op_key.clone())).await?;

    say(&format!("starting {} simulated devices", o.devices));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (i, (id, code)) in codes.into_iter().enumerate() {
        tasks.spawn(device(
            i,
            id,
            code,
            hub.anchor,
            mqtt.clone(),
            tx.clone(),
            stop_rx.clone(),
        ));
        if i % 50 == 49 {
            // Let the broker accept connections in batches rather than all at once.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut holding = vec![false; o.devices];
    let mut held = 0;
    while held < o.devices {
        let event = tokio::time::timeout(PHASE_TIMEOUT, rx.recv())
            .await
            .with_context(|| {
                format!(
                    "only {held} devices hold a token; hub log:\n{}",
                    hub.log_tail()
                )
            })?
            .context("the devices stopped")?;
        if let Happened::Holding(i) = event
            && !holding[i]
        {
            holding[i] = true;
            held += 1;
        }
    }
    let enrolled_s = started.elapsed().as_secs_f64();
    say(&format!(
        "{held} devices hold a device token after {enrolled_s:.1} s"
    ));

    // What the command costs by itself (start, key, connect, one refused round trip), to
    // tell it from the hub's work below.
    let mut baseline = hub.command();
    baseline
        .args(["revoke", "--as", "ops-1", "--key"])
        .arg(&op_key)
        .arg("--trust-anchor")
        .arg(hub.dir.join("trust-anchor.pem"))
        .args(["--token-hash", &"00".repeat(32)]);
    let mut baseline_ms = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let out = baseline.output()?;
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("denied"),
            "the baseline request was not refused: {out:?}"
        );
        baseline_ms.push(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    }
    baseline_ms.sort_unstable();
    let cli_ms = baseline_ms[1];

    // The operator's one command.
    say(&format!(
        "revoke --group {GROUP} ({} registered devices)",
        o.registered
    ));
    let t0 = now_ms();
    let started = Instant::now();
    let mut command = hub.command();
    command
        .args(["revoke", "--as", "ops-1", "--key"])
        .arg(&op_key)
        .arg("--trust-anchor")
        .arg(hub.dir.join("trust-anchor.pem"))
        .args(["--group", GROUP, "--timeout-s", "60"]);
    let revoke_out = tokio::task::spawn_blocking(move || run_checked(&mut command)).await??;
    let ack_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    say(revoke_out.trim());
    let mut wiped = vec![None; o.devices];
    let mut count = 0;
    while count < o.devices {
        let event = tokio::time::timeout(PHASE_TIMEOUT, rx.recv())
            .await
            .with_context(|| format!("only {count} devices wiped; hub log:\n{}", hub.log_tail()))?
            .context("the devices stopped")?;
        if let Happened::Wiped(i, at) = event
            && wiped[i].is_none()
        {
            wiped[i] = Some(at.saturating_sub(t0));
            count += 1;
        }
    }
    let fanout = spread(wiped.into_iter().flatten().collect());

    // The broker's own fan-out of one message of a control message's size to the same
    // connections (each subscribed when it wiped).
    say("the broker's own fan-out, same connections");
    let (pub_tx, pub_stop) = watch::channel(false);
    let mut publisher_config = mqtt.clone();
    publisher_config.client_id = "bench-publisher".into();
    let (publisher, mut pub_notices): (MqttClient, _) =
        mqtt::connect(&publisher_config, 64, pub_stop)?;
    while !matches!(pub_notices.recv().await, Some(Notice::Connected) | None) {}
    let mut rounds = Vec::new();
    for _ in 0..FANOUT_ROUNDS {
        let mut payload = vec![0u8; 107];
        payload[..8].copy_from_slice(&now_ms().to_be_bytes());
        publisher
            .publish(FANOUT_TOPIC, QoS::AtLeastOnce, false, payload)
            .await?;
        let mut got = vec![None; o.devices];
        let mut n = 0;
        while n < o.devices {
            let event = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .with_context(|| format!("the broker delivered to {n} of {}", o.devices))?
                .context("the devices stopped")?;
            if let Happened::FanOut(i, ms) = event
                && got[i].is_none()
            {
                got[i] = Some(ms);
                n += 1;
            }
        }
        rounds.push(spread(got.into_iter().flatten().collect()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rounds.sort_by_key(|r| r.last);
    let broker_fanout = &rounds[rounds.len() / 2];
    let _ = pub_tx.send(true);
    let _ = stop_tx.send(true);
    tasks.abort_all();
    if let Some(mut p) = hub.process.take() {
        let _ = p.terminate(Duration::from_secs(10));
    }

    let ratio = |a: u64, b: u64| a as f64 / (b.max(1)) as f64;
    println!("| measure | first | p50 | p99 | last |");
    println!("|---|---|---|---|---|");
    println!(
        "| hub: `revoke --group` of {} devices, command start → each of {} connected devices wiped | {} ms | {} ms | {} ms | {} ms |",
        o.registered, o.devices, fanout.first, fanout.p50, fanout.p99, fanout.last
    );
    println!(
        "| broker: one {}-byte message → the same {} connections (median of {FANOUT_ROUNDS} rounds) | {} ms | {} ms | {} ms | {} ms |",
        107,
        o.devices,
        broker_fanout.first,
        broker_fanout.p50,
        broker_fanout.p99,
        broker_fanout.last
    );
    println!(
        "| ratio hub / broker | | {:.1} | {:.1} | {:.1} |",
        ratio(fanout.p50, broker_fanout.p50),
        ratio(fanout.p99, broker_fanout.p99),
        ratio(fanout.last, broker_fanout.last)
    );
    println!(
        "| hub, after its answer: first wipe − answer; last wipe − first wipe | {} ms | | | {} ms |",
        fanout.first.saturating_sub(ack_ms),
        fanout.last.saturating_sub(fanout.first)
    );
    println!();
    println!(
        "`revoke --group` of {} registered devices ({} enrolled): answered durable {ack_ms} ms \
         after the command started; the same command refused at once takes {cli_ms} ms \
         (process start, key, MQTT connection, one round trip), so the hub's work for the \
         revocation is about {} ms. `device import` of {} devices: {import_s:.1} s; {} \
         devices enrolled and held a token in {enrolled_s:.1} s.",
        o.registered,
        o.devices,
        ack_ms.saturating_sub(cli_ms),
        o.registered,
        o.devices
    );
    if o.json {
        println!(
            "{{\"registered\":{},\"devices\":{},\"revoke_ack_ms\":{ack_ms},\"cli_ms\":{cli_ms},\
             \"wipe_ms\":{{\"p50\":{},\"p99\":{},\"last\":{}}},\
             \"broker_fanout_ms\":{{\"p50\":{},\"p99\":{},\"last\":{}}},\
             \"import_s\":{import_s:.2},\"enroll_s\":{enrolled_s:.2}}}",
            o.registered,
            o.devices,
            fanout.p50,
            fanout.p99,
            fanout.last,
            broker_fanout.p50,
            broker_fanout.p99,
            broker_fanout.last
        );
    }
    drop(broker);
    Ok(())
}
