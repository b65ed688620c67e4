//! `bench-issuance`: the hub's access-token issuance through a real Mosquitto, reported as
//! ratios to limits measured in the same run (docs/BENCHMARKS.md, "Hub issuance").
//!
//! Run it through `scripts/bench-issuance`, which builds it and `tessera-hub` in release.
//! In one run it:
//!
//! 1. measures the bare crypto the hub does per access token with the same library
//!    (aws-lc-rs, through `tessera_hub::crypto` as the hub calls it): one
//!    request verification and one token signature, plus the response signature, in a
//!    single thread, CPU time per op (at the start and again at the end);
//! 2. starts its own Mosquitto on a free loopback port (TCP_NODELAY, no ACL), makes a hub
//!    directory with the CLI (`init`, `app add` ×C, `device add`), raises the per-client rate
//!    limit so it cannot cap the result, starts `tessera-hub serve` and enrolls the device;
//! 3. measures durable writes in the hub directory (4 KiB append + `fdatasync`, and a
//!    one-row SQLite commit with the hub's settings: WAL, `synchronous = FULL`), at the
//!    start and again at the end: the floor under each of the hub's commits;
//! 4. for each client count C: the broker's echo ceiling (C clients in closed loop,
//!    QoS 1, a no-op responder task answering each request with a payload of the hub's
//!    response size), then C app clients in closed loop asking the hub for an `AccessToken`
//!    for the device. Each window stops at its count or time bound, whichever comes first.
//!    Requests are signed before the window (so the clients' signing does not compete with
//!    the hub for the machine's cores) and every answer is checked after it: the
//!    response's signature, that it answers its request, that it carries a token (refusals
//!    and lost answers are counted separately), and a sample of the tokens verified with
//!    the trust anchor. The hub's CPU time (utime + stime from /proc/<pid>/stat, all
//!    threads) over the window gives hub CPU per issued token.
//! 5. with `--replicas 1,2,3`: for each N, N `tessera-hub serve` replicas of one hub on one
//!    PostgreSQL database made for it and dropped after (`tessera_tests::replicas::
//!    HubReplicas` with the same release binary, shared subscription, a client id each,
//!    the limits raised), behind a Mosquitto of their own: that broker's echo ceiling and
//!    an issuance window at `--replica-clients` C, reported next to the SQLite hub's window
//!    at the same C, with the CPU of the database's backends and its commits, rollbacks
//!    and rows per token (`pg_stat_database`).
//!
//! The hub directory is made here with the CLI rather than with `tessera_tests::hub::HubDir`:
//! its `cargo_bin` finds binaries from a test executable in `deps/`, and this is a binary;
//! it finds `tessera-hub` next to itself (or `--hub-bin`).
//!
//! It prints Markdown tables on stdout and progress on stderr. Nothing fails on a slow
//! result; it fails only when something does not work (a refused token is counted, not
//! fatal).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rustix::process::{Pid, Signal, kill_process};
use rustix::time::{ClockId, clock_gettime};
use tempfile::TempDir;
use tessera_hub::crypto::{AwsLcSigner, request_verifier};
use tessera_hub::keyfile;
use tessera_hub::mqtt::MqttClient;
use tessera_hub::mqtt::{self, MqttConfig, Notice, Notices, QoS};
use tessera_shared::claims::{CTI_LEN, Claims};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer as _};
use tessera_shared::message::{
    NONCE_LEN, Operation, Request, RequestBody, Response, ResponseBody, SignedRequest,
    SignedResponse,
};
use tessera_shared::scope::Scopes;
use tessera_shared::{token, topic};
use tessera_tests::flood::{
    RawPublisher, SUSTAINED_MALFORMED_PER_SECOND, SUSTAINED_NOISY_CLIENTS,
    SUSTAINED_SIGNED_PER_SECOND, SUSTAINED_SIGNING_CLIENTS, garbage, signed_request, sustain,
};
use tessera_tests::hub::{generate_signer, random_bytes, replace_once, run_checked, unix_now};
use tessera_tests::replicas::{HubReplicas, postgres_server_url};
use tessera_tests::{Broker, ChildGuard};
use tokio::sync::watch;

const HUB_ID: &str = "bench-hub";
const DEVICE: &str = "bench-door";
const SCOPE: &str = "door:open";
/// Roles and group of the default policy `tessera-hub init` writes.
const APP_ROLE: &str = "controller";
const DEVICE_ROLE: &str = "sensor";
const DEVICE_GROUP: &str = "building-a";
/// How long one request may wait for its answer before it counts as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens per window whose own signature and claims are checked after the window.
const TOKEN_SAMPLE: usize = 256;

const USAGE: &str = "\
usage: bench-issuance [options]
  --clients LIST       client counts, comma-separated (default 1,8,32,64)
  --seconds S          time bound of each issuance window (default 8)
  --max-tokens N       count bound of each issuance window (default 20000)
  --echo-seconds S     time bound of each echo window (default 4)
  --max-echo N         count bound of each echo window (default 200000)
  --crypto-ops N       iterations of each bare crypto loop (default 2000)
  --durable-ops N      durable writes timed, of each kind (default 200, at most 3 s)
  --flood-seconds S    each half of the flood comparison (default 30; 0 skips it)
  --replicas LIST      also, after the windows above: issuance with N replicas of one hub
                       on one PostgreSQL database, for each N, comma-separated (e.g. 1,2,3;
                       default none). Each N gets a database of its own, made and dropped
                       here, its own Mosquitto, and a window as above
  --replica-clients C  client count of the replica windows (default 32; added to --clients
                       if missing, so the SQLite hub is measured at it too)
  --postgres URL       PostgreSQL server for --replicas (default: $TESSERA_TEST_POSTGRES,
                       else postgres://postgres@127.0.0.1:5432/postgres)
  --hub-bin PATH       tessera-hub binary (default: next to this binary)
Environment: MOSQUITTO (default /usr/sbin/mosquitto), TESSERA_TEST_POSTGRES.";

#[derive(Debug, Clone)]
struct Options {
    clients: Vec<usize>,
    seconds: f64,
    max_tokens: usize,
    echo_seconds: f64,
    max_echo: usize,
    crypto_ops: u32,
    durable_ops: u32,
    flood_seconds: f64,
    replicas: Vec<usize>,
    replica_clients: usize,
    postgres: String,
    hub_bin: PathBuf,
}

impl Options {
    fn parse() -> Result<Self> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut o = Options {
            clients: vec![1, 8, 32, 64],
            seconds: 8.0,
            max_tokens: 20_000,
            echo_seconds: 4.0,
            max_echo: 200_000,
            crypto_ops: 2000,
            durable_ops: 200,
            flood_seconds: 30.0,
            replicas: Vec::new(),
            replica_clients: 32,
            postgres: postgres_server_url(),
            hub_bin: exe
                .parent()
                .context("this binary has no directory")?
                .join("tessera-hub"),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = args
                .next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))?;
            let bad = || format!("bad value {value:?} for {arg}");
            match arg.as_str() {
                "--clients" => {
                    o.clients = value
                        .split(',')
                        .map(|c| c.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .with_context(bad)?;
                }
                "--seconds" => o.seconds = value.parse().with_context(bad)?,
                "--max-tokens" => o.max_tokens = value.parse().with_context(bad)?,
                "--echo-seconds" => o.echo_seconds = value.parse().with_context(bad)?,
                "--max-echo" => o.max_echo = value.parse().with_context(bad)?,
                "--crypto-ops" => o.crypto_ops = value.parse().with_context(bad)?,
                "--durable-ops" => o.durable_ops = value.parse().with_context(bad)?,
                "--flood-seconds" => o.flood_seconds = value.parse().with_context(bad)?,
                "--replicas" => {
                    o.replicas = value
                        .split(',')
                        .map(|c| c.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .with_context(bad)?;
                }
                "--replica-clients" => o.replica_clients = value.parse().with_context(bad)?,
                "--postgres" => o.postgres = value,
                "--hub-bin" => o.hub_bin = PathBuf::from(value),
                _ => bail!("unknown option {arg}\n{USAGE}"),
            }
        }
        ensure!(
            !o.clients.is_empty() && o.clients.iter().all(|&c| (1..=1000).contains(&c)),
            "--clients: each count must be 1..=1000"
        );
        ensure!(
            o.replicas.iter().all(|&n| (1..=8).contains(&n)),
            "--replicas: each count must be 1..=8"
        );
        ensure!(
            (1..=1000).contains(&o.replica_clients),
            "--replica-clients must be 1..=1000"
        );
        ensure!(
            o.replicas.is_empty() || on_loopback(&o.postgres),
            "--postgres: the bench connects to loopback only (127.0.0.1, ::1, localhost), not \
             {}",
            o.postgres
        );
        if !o.replicas.is_empty() && !o.clients.contains(&o.replica_clients) {
            o.clients.push(o.replica_clients);
        }
        ensure!(
            o.seconds > 0.0
                && o.seconds <= 120.0
                && o.echo_seconds > 0.0
                && o.echo_seconds <= 120.0,
            "window lengths must be in (0, 120] seconds"
        );
        ensure!(
            (0.0..=120.0).contains(&o.flood_seconds),
            "--flood-seconds must be in [0, 120]"
        );
        ensure!(
            o.max_tokens >= 1 && o.max_echo >= 1 && o.crypto_ops >= 1 && o.durable_ops >= 1,
            "counts must be positive"
        );
        ensure!(
            o.hub_bin.is_file(),
            "{} does not exist: build it first (scripts/bench-issuance does)",
            o.hub_bin.display()
        );
        Ok(o)
    }
}

/// Whether the `postgres://` URL `url` names a server on this machine's loopback.
fn on_loopback(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    matches!(host, "127.0.0.1" | "::1" | "localhost")
}

fn say(message: &str) {
    eprintln!("bench-issuance: {message}");
}

// ---------------------------------------------------------------------------------------
// CPU time

fn seconds(t: rustix::time::Timespec) -> f64 {
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// This thread's CPU time, seconds.
fn thread_cpu() -> f64 {
    seconds(clock_gettime(ClockId::ThreadCPUTime))
}

/// This process's CPU time (all threads), seconds.
fn process_cpu() -> f64 {
    seconds(clock_gettime(ClockId::ProcessCPUTime))
}

/// User and system CPU time (utime, stime) of process `pid`, all its threads, live and
/// exited, in seconds.
fn proc_cpu(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `fields[0]` is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    let hz = match rustix::param::clock_ticks_per_second() {
        0 => 100,
        hz => hz,
    };
    Ok((ticks(11)? as f64 / hz as f64, ticks(12)? as f64 / hz as f64))
}

/// Bytes process `pid` caused to be written to storage (`write_bytes` of /proc/<pid>/io).
fn proc_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// The filesystem type holding `path` (longest mount point that prefixes it).
fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "?".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map_or_else(|| "?".into(), |(_, kind)| kind)
}

// ---------------------------------------------------------------------------------------
// Limits measured in the same run

/// Bare crypto per op, single thread, CPU time in microseconds.
#[derive(Debug, Clone, Copy)]
struct Crypto {
    /// Decode and verify an AccessToken request (`SignedRequest::decode` + `verify`).
    verify_us: f64,
    /// Sign an access token (`token::issue`: encode claims + COSE_Sign1 + ECDSA).
    issue_us: f64,
    /// Sign the response that carries it (`Response::sign`).
    respond_us: f64,
}

impl Crypto {
    fn mean(a: Crypto, b: Crypto) -> Crypto {
        Crypto {
            verify_us: (a.verify_us + b.verify_us) / 2.0,
            issue_us: (a.issue_us + b.issue_us) / 2.0,
            respond_us: (a.respond_us + b.respond_us) / 2.0,
        }
    }

    /// What the design counts: verify the request + sign the token.
    fn verify_sign_us(&self) -> f64 {
        self.verify_us + self.issue_us
    }

    /// All the signature work the protocol asks of the hub per token.
    fn all_us(&self) -> f64 {
        self.verify_us + self.issue_us + self.respond_us
    }
}

/// Times `f` over `ops` iterations in this thread; CPU microseconds per iteration.
fn time_ops(ops: u32, mut f: impl FnMut(u32) -> Result<()>) -> Result<f64> {
    let start = thread_cpu();
    for i in 0..ops {
        f(i)?;
    }
    Ok((thread_cpu() - start) * 1e6 / f64::from(ops))
}

fn bare_crypto(ops: u32) -> Result<Crypto> {
    let hub = AwsLcSigner::generate().map_err(|e| anyhow::anyhow!("rng: {e}"))?;
    let app = generate_signer();
    let app_id = app_id(0);
    let request = Request {
        client: &app_id,
        request_id: 1,
        issued_at: unix_now(),
        nonce: random_bytes::<NONCE_LEN>(),
        body: RequestBody::AccessToken {
            device: DEVICE,
            scope: Scopes::parse(SCOPE).map_err(|e| anyhow::anyhow!("scope: {e}"))?,
        },
    };
    let signed = sign_request(&request, &app)?;
    let app_key = app.public_key();
    let registered = app_key.to_sec1();
    let verify_us = time_ops(ops, |_| {
        // As the pipeline does: the registered SEC1 key into a verifier, then verify.
        let r = request_verifier(std::hint::black_box(&registered))
            .and_then(|v| SignedRequest::decode(std::hint::black_box(&signed))?.verify(&v))
            .map_err(|e| anyhow::anyhow!("bare verify: {e}"))?;
        std::hint::black_box(r);
        Ok(())
    })?;

    let now = unix_now();
    let scope = Scopes::parse(SCOPE).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
    let mut cti = random_bytes::<CTI_LEN>();
    let mut buf = vec![0u8; token::MAX_TOKEN_LEN];
    let mut token_len = 0;
    let issue_us = time_ops(ops, |i| {
        cti[..4].copy_from_slice(&i.to_be_bytes());
        let claims = Claims {
            iss: HUB_ID,
            sub: &app_id,
            aud: DEVICE,
            exp: now + 120,
            nbf: None,
            iat: now,
            cti: &cti,
            cnf: app_key,
            scope,
        };
        token_len = token::issue(&claims, &hub, std::hint::black_box(&mut buf))
            .map_err(|e| anyhow::anyhow!("bare issue: {e}"))?;
        Ok(())
    })?;
    let token = buf[..token_len].to_vec();

    let grant = random_bytes::<32>();
    let mut out = vec![0u8; 32 * 1024];
    let respond_us = time_ops(ops, |i| {
        let response = Response {
            op: Some(Operation::AccessToken),
            client: &app_id,
            request_id: u64::from(i),
            hub_time: now,
            nonce: request.nonce,
            outcome: Ok(ResponseBody::Token {
                token: &token,
                grant: Some((&grant, now + 86_400)),
            }),
        };
        let n = response
            .sign(&hub, std::hint::black_box(&mut out))
            .map_err(|e| anyhow::anyhow!("bare response sign: {e}"))?;
        std::hint::black_box(n);
        Ok(())
    })?;
    Ok(Crypto {
        verify_us,
        issue_us,
        respond_us,
    })
}

/// Latency of one kind of durable write, wall time in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    ops: usize,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `write` up to `ops` times (at most 3 s); its wall-time latency.
fn time_writes(ops: u32, mut write: impl FnMut(u32) -> Result<()>) -> Result<Latency> {
    let until = Instant::now() + Duration::from_secs(3);
    let mut us = Vec::new();
    for i in 0..ops {
        let t = Instant::now();
        write(i)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if Instant::now() >= until {
            break;
        }
    }
    us.sort_by(f64::total_cmp);
    Ok(Latency {
        ops: us.len(),
        p50_us: percentile(&us, 50),
        p99_us: percentile(&us, 99),
    })
}

/// Durable writes on the hub directory's filesystem: the floor under the hub's commits.
#[derive(Debug, Clone, Copy)]
struct Durable {
    /// Append 4 KiB and `fdatasync`.
    fsync: Latency,
    /// Insert one row (a 16-byte key, like a nonce) and commit, in a SQLite database with
    /// the hub's settings: WAL, `synchronous = FULL`, `BEGIN IMMEDIATE`.
    commit: Latency,
}

fn durable_limit(dir: &Path, ops: u32) -> Result<Durable> {
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let block = [0x5au8; 4096];
    let fsync = time_writes(ops, |_| {
        file.write_all(&block)?;
        file.sync_data()?;
        Ok(())
    })?;
    drop(file);
    std::fs::remove_file(&path).ok();

    let db = dir.join("commit-probe.db");
    let mut conn = rusqlite::Connection::open(&db).context("opening the commit probe")?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
    ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "commit probe: journal_mode {mode}"
    );
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE probe (key BLOB PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID",
    )?;
    let commit = time_writes(ops, |i| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO probe (key, expires_at) VALUES (?1, ?2)",
            rusqlite::params![&random_bytes::<16>()[..], i64::from(i)],
        )?;
        tx.commit()?;
        Ok(())
    })?;
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", db.display())).ok();
    }
    Ok(Durable { fsync, commit })
}

// ---------------------------------------------------------------------------------------
// fsyncs

/// The system calls that make a write durable, as `perf` names their tracepoints. SQLite
/// uses `fdatasync` where the system has it, `fsync` for directories.
const FSYNC_EVENTS: &str = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync";
/// `perf stat -I` interval, ms: how finely a window's `fsync` count is cut at each end.
const FSYNC_INTERVAL_MS: u32 = 100;

/// Whether `perf stat` can count system calls of a process it starts here; why not, if not.
fn perf_works() -> Result<(), String> {
    let output = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            FSYNC_EVENTS,
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .output();
    match output {
        Err(e) => Err(format!("perf: {e}")),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .next()
            .unwrap_or("perf stat failed")
            .to_owned()),
    }
}

/// The `perf stat -I` record of a hub run: its `fsync` + `fdatasync` calls (all threads)
/// per interval, stamped with the time since perf started.
struct FsyncTrace {
    path: PathBuf,
    /// When perf was started (its time 0, to within its start-up).
    started: Instant,
}

impl FsyncTrace {
    /// The calls in the intervals whose middle falls within `[from, from + wall)`; read
    /// after perf has exited (it writes its record as it goes, buffered).
    fn count(&self, from: Instant, wall: f64) -> Result<u64> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let start = from.saturating_duration_since(self.started).as_secs_f64();
        let half = f64::from(FSYNC_INTERVAL_MS) / 2000.0;
        let mut calls = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            // "time,count,unit,event,..."
            let mut fields = line.split(',');
            let (Some(time), Some(count)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(time) = time.trim().parse::<f64>() else {
                continue;
            };
            let middle = time - half;
            if middle >= start && middle < start + wall {
                // "<not counted>" in an interval without the event: none.
                calls += count.trim().parse::<u64>().unwrap_or(0);
            }
        }
        Ok(calls)
    }
}

// ---------------------------------------------------------------------------------------
// The hub

fn app_id(i: usize) -> String {
    format!("bench-app-{i:03}")
}

fn sign_request(request: &Request<'_>, signer: &P256Signer) -> Result<Vec<u8>> {
    let mut out = vec![0u8; 4096];
    let n = request
        .sign(signer, &mut out)
        .map_err(|e| anyhow::anyhow!("signing a request: {e}"))?;
    out.truncate(n);
    Ok(out)
}

/// Whether the per-client limits of the hub's config stay as `init` writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limits {
    /// As the default config says (the flood comparison: the hub as operators run it).
    Default,
    /// Out of the way (the issuance windows: one client asks as fast as the hub answers,
    /// far beyond any real rate limit).
    Raised,
}

/// The per-client rate limit (store) and admission limit (in memory, in front of it) of
/// the default config, raised to 10⁹ so that neither caps a closed-loop client.
const RAISED_LIMITS: [(&str, &str); 4] = [
    ("rate_burst = 20", "rate_burst = 1000000000"),
    ("rate_per_second = 5.0", "rate_per_second = 1000000000.0"),
    ("admission_burst = 40", "admission_burst = 1000000000"),
    (
        "admission_per_second = 10.0",
        "admission_per_second = 1000000000.0",
    ),
];

/// Raises the limits of the config at `config` ([`RAISED_LIMITS`]).
fn raise_limits(config: &Path) -> Result<()> {
    for (from, to) in RAISED_LIMITS {
        replace_once(config, from, to)?;
    }
    Ok(())
}

/// A hub directory made with the CLI, its registered clients, and the serving hub.
struct Hub {
    bin: PathBuf,
    // Keeps the directory alive; `dir` is inside it.
    _temp: TempDir,
    dir: PathBuf,
    anchor: PublicKey,
    apps: Vec<Arc<P256Signer>>,
    device: P256Signer,
    process: Option<ChildGuard>,
    /// The hub's own pid (under `perf stat`, `process` is perf's).
    pid: Option<u32>,
    /// The `fsync` trace, when the hub runs under `perf stat`.
    fsyncs: Option<FsyncTrace>,
}

impl Hub {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(self.dir.join("tessera-hub.toml"));
        c
    }

    /// `init`, config for `port`, `app add` ×`apps`, `device add` with a key. With `limits
    /// == Limits::Raised`, the per-client rate and admission limits are out of the way.
    fn create(bin: &Path, port: u16, apps: usize, limits: Limits) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("tessera-bench-issuance-")
            .tempdir()
            .context("creating the hub's temp dir")?;
        let dir = temp.path().join("hub");
        run_checked(
            Command::new(bin)
                .arg("init")
                .arg("--dir")
                .arg(&dir)
                .args(["--hub-id", HUB_ID]),
        )?;
        let anchor = keyfile::read_public(&dir.join("trust-anchor.pem"))
            .context("reading the trust anchor")?;
        let config = dir.join("tessera-hub.toml");
        replace_once(&config, "port = 1883", &format!("port = {port}"))?;
        if limits == Limits::Raised {
            raise_limits(&config)?;
        }
        std::fs::create_dir_all(dir.join("keys"))?;
        let mut hub = Hub {
            bin: bin.to_owned(),
            _temp: temp,
            dir,
            anchor,
            apps: Vec::new(),
            device: generate_signer(),
            process: None,
            pid: None,
            fsyncs: None,
        };
        for i in 0..apps {
            let signer = generate_signer();
            let public = hub.write_public(&app_id(i), &signer.public_key())?;
            run_checked(
                hub.command()
                    .args(["app", "add", &app_id(i), "--role", APP_ROLE])
                    .arg("--key")
                    .arg(public),
            )?;
            hub.apps.push(Arc::new(signer));
        }
        let public = hub.write_public(DEVICE, &hub.device.public_key())?;
        run_checked(
            hub.command()
                .args(["device", "add", DEVICE, "--role", DEVICE_ROLE])
                .args(["--group", DEVICE_GROUP, "--key"])
                .arg(public),
        )?;
        Ok(hub)
    }

    fn write_public(&self, id: &str, key: &PublicKey) -> Result<PathBuf> {
        let path = self.dir.join("keys").join(format!("{id}.pub.pem"));
        std::fs::write(&path, keyfile::public_to_pem(key))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts `tessera-hub serve`, under `perf stat` counting its `fsync`s when
    /// `trace_fsyncs`; returns the hub's pid.
    fn spawn(&mut self, trace_fsyncs: bool) -> Result<u32> {
        let config = self.dir.join("tessera-hub.toml");
        let mut command = if trace_fsyncs {
            let path = self.dir.join("fsyncs.csv");
            let mut c = Command::new("perf");
            c.args(["stat", "-x,", "-I", &FSYNC_INTERVAL_MS.to_string()])
                .args(["-e", FSYNC_EVENTS, "-o"])
                .arg(&path)
                .arg("--")
                .arg(&self.bin);
            self.fsyncs = Some(FsyncTrace {
                path,
                started: Instant::now(),
            });
            c
        } else {
            self.fsyncs = None;
            Command::new(&self.bin)
        };
        // The operator's default log level (info: nothing per request).
        command
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("RUST_LOG");
        let child = ChildGuard::spawn_logged(&mut command, &self.dir.join("hub.log"))?;
        let outer = child.id();
        self.process = Some(child);
        let pid = if trace_fsyncs {
            self.child_of_perf(outer)?
        } else {
            outer
        };
        self.pid = Some(pid);
        Ok(pid)
    }

    /// The pid of the process `perf stat` (pid `perf`) runs.
    fn child_of_perf(&mut self, perf: u32) -> Result<u32> {
        let path = format!("/proc/{perf}/task/{perf}/children");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            self.check_alive()?;
            let children = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().with_context(|| format!("{path}: {children:?}"));
            }
            ensure!(Instant::now() < until, "perf started no hub within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the hub with SIGTERM (sent to the hub itself, also under perf, which then
    /// exits with the hub's status) and checks that it exited cleanly.
    fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.process.take() {
            let timeout = Duration::from_secs(10);
            let status = match self.pid {
                Some(pid) if pid != child.id() => {
                    let pid = i32::try_from(pid)
                        .ok()
                        .and_then(Pid::from_raw)
                        .context("hub pid")?;
                    kill_process(pid, Signal::TERM).context("signalling the hub")?;
                    child
                        .wait_timeout(timeout)?
                        .with_context(|| format!("the hub did not stop within {timeout:?}"))?
                }
                _ => child.terminate(timeout)?,
            };
            ensure!(status.success(), "the hub exited with {status} on SIGTERM");
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = &mut self.process
            && let Some(status) = child.try_wait()?
        {
            bail!("the hub exited ({status}); its log:\n{}", self.log_tail());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// MQTT clients

/// One MQTT connection (the same transport the hub and its client use: rumqttc v5,
/// TCP_NODELAY), subscribed to its response topic.
struct Conn {
    id: String,
    client: MqttClient,
    notices: Notices,
    stop: watch::Sender<bool>,
    request_topic: String,
    response_topic: String,
}

impl Conn {
    async fn open(
        port: u16,
        id: &str,
        request_topic: String,
        response_topic: String,
    ) -> Result<Self> {
        let config = MqttConfig::plain("127.0.0.1", port, id);
        let (stop, stop_rx) = watch::channel(false);
        let (client, mut notices) = mqtt::connect(&config, 64, stop_rx)?;
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(n) = notices.recv().await {
                if matches!(n, Notice::Connected) {
                    return true;
                }
            }
            false
        })
        .await;
        if !matches!(connected, Ok(true)) {
            let _ = stop.send(true);
            bail!("{id} could not connect to the broker");
        }
        // Mosquitto handles one connection's packets in order: the subscription is in
        // place before any request this client publishes next.
        client
            .subscribe(response_topic.as_str(), QoS::AtLeastOnce)
            .await
            .context("subscribing")?;
        Ok(Self {
            id: id.to_owned(),
            client,
            notices,
            stop,
            request_topic,
            response_topic,
        })
    }

    async fn open_app(port: u16, id: &str) -> Result<Self> {
        let request = topic::request(id).map_err(|e| anyhow::anyhow!("topic: {e}"))?;
        let response = topic::response(id).map_err(|e| anyhow::anyhow!("topic: {e}"))?;
        Self::open(port, id, request.to_string(), response.to_string()).await
    }

    async fn open_echo(port: u16, id: &str) -> Result<Self> {
        Self::open(
            port,
            id,
            format!("bench/echo/{id}/req"),
            format!("bench/echo/{id}/resp"),
        )
        .await
    }

    /// Publishes `payload` on the request topic (QoS 1) and waits for the next message on
    /// the response topic; `None` when none came within `timeout`.
    async fn round_trip(&mut self, payload: Vec<u8>, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.client
            .publish(
                self.request_topic.as_str(),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .with_context(|| format!("{} publishing", self.id))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.notices.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("{}: the MQTT task ended", self.id),
                Ok(Some(Notice::Message(m))) if m.topic == self.response_topic => {
                    return Ok(Some(m.payload));
                }
                Ok(Some(Notice::Disconnected(reason))) => {
                    bail!("{} lost its broker connection: {reason}", self.id)
                }
                Ok(Some(_)) => {}
            }
        }
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = self.stop.send(true);
    }
}

/// The no-op responder: answers every `bench/echo/{id}/req` on `bench/echo/{id}/resp` with
/// `reply`, from one task (rumqttc's event loop is polled by another).
async fn echo_responder(
    port: u16,
    reply: Vec<u8>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    const READY: &str = "bench/echo/ready/req";
    // It subscribes to every echo client's request topic.
    let mut conn = Conn::open(port, "bench-echo", READY.into(), "bench/echo/+/req".into()).await?;
    // Its own message coming back proves the subscription is in place.
    conn.client
        .publish(READY, QoS::AtLeastOnce, false, Vec::new())
        .await
        .context("echo responder publishing")?;
    tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(n) = conn.notices.recv().await {
            if matches!(&n, Notice::Message(m) if m.topic == READY) {
                return Ok(());
            }
        }
        bail!("the echo responder's MQTT task ended")
    })
    .await
    .context("the echo responder did not see its own message")??;
    let _ = ready.send(());
    let mut stop = stop;
    loop {
        let notice = tokio::select! {
            _ = stop.changed() => break,
            n = conn.notices.recv() => n,
        };
        match notice {
            None => bail!("the echo responder's MQTT task ended"),
            Some(Notice::Message(m)) => {
                let Some(id) = m
                    .topic
                    .strip_prefix("bench/echo/")
                    .and_then(|t| t.strip_suffix("/req"))
                    .filter(|id| *id != "ready")
                else {
                    continue;
                };
                conn.client
                    .publish(
                        format!("bench/echo/{id}/resp"),
                        QoS::AtLeastOnce,
                        false,
                        reply.clone(),
                    )
                    .await
                    .context("echo publish")?;
            }
            Some(Notice::Disconnected(reason)) => bail!("echo responder disconnected: {reason}"),
            Some(Notice::Connected) => {}
        }
    }
    conn.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Windows

/// A request signed before the window.
struct Presigned {
    client: usize,
    request_id: u64,
    nonce: [u8; NONCE_LEN],
    bytes: Vec<u8>,
}

fn presign(
    client: usize,
    signer: &P256Signer,
    count: usize,
    first_id: u64,
) -> Result<Vec<Presigned>> {
    let id = app_id(client);
    let scope = Scopes::parse(SCOPE).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
    (0..count)
        .map(|k| {
            let request_id = first_id + k as u64;
            let nonce = random_bytes::<NONCE_LEN>();
            let bytes = sign_request(
                &Request {
                    client: &id,
                    request_id,
                    issued_at: unix_now(),
                    nonce,
                    body: RequestBody::AccessToken {
                        device: DEVICE,
                        scope,
                    },
                },
                signer,
            )?;
            Ok(Presigned {
                client,
                request_id,
                nonce,
                bytes,
            })
        })
        .collect()
}

/// What one closed-loop client did in a window.
#[derive(Default)]
struct ClientRun {
    latencies_us: Vec<u32>,
    /// Each answered request and the raw answer.
    answers: Vec<(Presigned, Vec<u8>)>,
    lost: usize,
}

/// Resource use of the processes over a window.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// When the window started.
    started: Instant,
    wall: f64,
    hub_user: f64,
    hub_sys: f64,
    broker_cpu: f64,
    bench_cpu: f64,
    hub_write_bytes: Option<u64>,
    /// CPU time of the PostgreSQL backends serving the hub's database (its connections;
    /// not the server's background writers), when the store is PostgreSQL and their
    /// processes can be read here.
    store_cpu: Option<f64>,
}

impl Usage {
    fn hub_cpu(&self) -> f64 {
        self.hub_user + self.hub_sys
    }
}

/// The hub's processes (one, or one per replica), the broker's, and the PostgreSQL
/// database whose backends to meter, if any.
#[derive(Debug, Clone)]
struct Pids {
    hubs: Vec<u32>,
    broker: u32,
    store_db: Option<String>,
}

/// User and system CPU time of `pids` together, seconds.
fn procs_cpu(pids: &[u32]) -> Result<(f64, f64)> {
    pids.iter().try_fold((0.0, 0.0), |(u, s), &pid| {
        let (du, ds) = proc_cpu(pid)?;
        Ok((u + du, s + ds))
    })
}

/// The processes of the PostgreSQL backends connected to database `db` on this machine,
/// by their process title (`postgres: … <user> <db> <host>(<port>) <state>`), with their
/// CPU time (utime + stime), seconds. Empty where the titles cannot be read.
fn pg_backends(db: &str) -> BTreeMap<u32, f64> {
    let needle = format!(" {db} ");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let title = String::from_utf8_lossy(&c).replace('\0', " ");
                title.starts_with("postgres: ") && title.contains(&needle)
            })
        })
        .filter_map(|pid| proc_cpu(pid).ok().map(|(u, s)| (pid, u + s)))
        .collect()
}

struct Meter {
    pids: Pids,
    t0: Instant,
    hub0: (f64, f64),
    broker0: (f64, f64),
    bench0: f64,
    writes0: Option<u64>,
    store0: Option<BTreeMap<u32, f64>>,
}

fn write_bytes(pids: &[u32]) -> Option<u64> {
    pids.iter()
        .try_fold(0, |sum, &pid| Some(sum + proc_write_bytes(pid)?))
}

impl Meter {
    fn start(pids: &Pids) -> Result<Self> {
        Ok(Self {
            hub0: procs_cpu(&pids.hubs)?,
            broker0: proc_cpu(pids.broker)?,
            bench0: process_cpu(),
            writes0: write_bytes(&pids.hubs),
            store0: pids
                .store_db
                .as_deref()
                .map(pg_backends)
                .filter(|b| !b.is_empty()),
            pids: pids.clone(),
            t0: Instant::now(),
        })
    }

    fn stop(&self) -> Result<Usage> {
        let wall = self.t0.elapsed().as_secs_f64();
        let hub = procs_cpu(&self.pids.hubs)?;
        let broker = proc_cpu(self.pids.broker)?;
        // A backend that started during the window counts from zero; one that ended in it
        // is missed (the hub's pool keeps its connections).
        let store_cpu = self.store0.as_ref().map(|before| {
            pg_backends(self.pids.store_db.as_deref().unwrap_or_default())
                .iter()
                .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
                .sum()
        });
        Ok(Usage {
            started: self.t0,
            wall,
            hub_user: hub.0 - self.hub0.0,
            hub_sys: hub.1 - self.hub0.1,
            broker_cpu: (broker.0 + broker.1) - (self.broker0.0 + self.broker0.1),
            bench_cpu: process_cpu() - self.bench0,
            hub_write_bytes: write_bytes(&self.pids.hubs)
                .zip(self.writes0)
                .map(|(b, a)| b.saturating_sub(a)),
            store_cpu,
        })
    }
}

#[derive(Debug)]
struct HubWindow {
    clients: usize,
    tokens: usize,
    refused: BTreeMap<String, usize>,
    lost: usize,
    invalid: usize,
    tokens_checked: usize,
    p50_ms: f64,
    p99_ms: f64,
    usage: Usage,
    /// `fsync` + `fdatasync` calls of the hub in the window (filled in once perf is done).
    fsyncs: Option<u64>,
}

impl HubWindow {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.usage.wall
    }
    fn per_token_us(&self, cpu: f64) -> f64 {
        cpu * 1e6 / self.tokens.max(1) as f64
    }
}

#[derive(Debug)]
struct EchoWindow {
    round_trips: usize,
    lost: usize,
    p50_ms: f64,
    p99_ms: f64,
    usage: Usage,
}

impl EchoWindow {
    fn per_s(&self) -> f64 {
        self.round_trips as f64 / self.usage.wall
    }
}

/// The nearest-rank `pct`th percentile of sorted values.
fn percentile(sorted: &[f64], pct: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (pct * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency_ms(mut us: Vec<u32>) -> (f64, f64) {
    us.sort_unstable();
    let v: Vec<f64> = us.into_iter().map(|u| f64::from(u) / 1000.0).collect();
    (percentile(&v, 50), percentile(&v, 99))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Shared by the clients of one window: when it ends and whether to stop early.
#[derive(Clone)]
struct Window {
    go: watch::Receiver<Option<tokio::time::Instant>>,
    stop: Arc<AtomicBool>,
}

impl Window {
    async fn deadline(&mut self) -> Result<tokio::time::Instant> {
        let d = *self
            .go
            .wait_for(Option::is_some)
            .await
            .context("the window was abandoned")?;
        d.context("no deadline")
    }
}

async fn hub_client(
    mut conn: Conn,
    requests: Vec<Presigned>,
    mut window: Window,
) -> Result<(Conn, ClientRun)> {
    let deadline = window.deadline().await?;
    let mut run = ClientRun::default();
    let total = requests.len();
    for (k, request) in requests.into_iter().enumerate() {
        if window.stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= deadline {
            break;
        }
        let t = Instant::now();
        match conn
            .round_trip(request.bytes.clone(), ANSWER_TIMEOUT)
            .await?
        {
            Some(answer) => {
                run.latencies_us.push(micros(t.elapsed()));
                run.answers.push((request, answer));
            }
            None => run.lost += 1,
        }
        if k + 1 == total {
            // Out of pre-signed requests: the window has reached its count bound.
            window.stop.store(true, Ordering::Relaxed);
        }
    }
    Ok((conn, run))
}

async fn echo_client(
    mut conn: Conn,
    payload: Vec<u8>,
    budget: Arc<AtomicUsize>,
    mut window: Window,
) -> Result<(Conn, ClientRun)> {
    let deadline = window.deadline().await?;
    let mut run = ClientRun::default();
    while tokio::time::Instant::now() < deadline {
        if budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        let t = Instant::now();
        match conn.round_trip(payload.clone(), ANSWER_TIMEOUT).await? {
            Some(_) => run.latencies_us.push(micros(t.elapsed())),
            None => run.lost += 1,
        }
    }
    Ok((conn, run))
}

/// Runs the window: releases the clients, waits for all, returns their runs and the
/// resources used.
async fn run_window(
    tasks: Vec<tokio::task::JoinHandle<Result<(Conn, ClientRun)>>>,
    go: watch::Sender<Option<tokio::time::Instant>>,
    length: Duration,
    pids: &Pids,
) -> Result<(Vec<ClientRun>, Usage)> {
    let meter = Meter::start(pids)?;
    go.send(Some(tokio::time::Instant::now() + length))
        .ok()
        .context("the clients are gone")?;
    let mut conns = Vec::new();
    let mut runs = Vec::new();
    let joined = tokio::time::timeout(length + ANSWER_TIMEOUT + Duration::from_secs(10), async {
        for t in tasks {
            let (conn, run) = t.await.context("client task panicked")??;
            conns.push(conn);
            runs.push(run);
        }
        anyhow::Ok(())
    })
    .await;
    let usage = meter.stop()?;
    joined.context("the clients did not finish in time")??;
    for c in conns {
        c.close().await;
    }
    Ok((runs, usage))
}

fn new_window() -> (watch::Sender<Option<tokio::time::Instant>>, Window) {
    let (tx, rx) = watch::channel(None);
    (
        tx,
        Window {
            go: rx,
            stop: Arc::new(AtomicBool::new(false)),
        },
    )
}

async fn connect_all(port: u16, ids: Vec<String>, echo: bool) -> Result<Vec<Conn>> {
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            tokio::spawn(async move {
                if echo {
                    Conn::open_echo(port, &id).await
                } else {
                    Conn::open_app(port, &id).await
                }
            })
        })
        .collect();
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.context("connect task panicked")??);
    }
    Ok(conns)
}

async fn echo_window(ctx: &Ctx, clients: usize, payload: &[u8]) -> Result<EchoWindow> {
    let ids = (0..clients).map(|i| format!("bench-echo-{i:03}")).collect();
    let mut conns = connect_all(ctx.port, ids, true).await?;
    for conn in &mut conns {
        // The responder answers: the path works before the clock starts.
        conn.round_trip(payload.to_vec(), ANSWER_TIMEOUT)
            .await?
            .with_context(|| format!("{}: no echo", conn.id))?;
    }
    let (go, window) = new_window();
    let budget = Arc::new(AtomicUsize::new(ctx.options.max_echo));
    let tasks = conns
        .into_iter()
        .map(|conn| {
            tokio::spawn(echo_client(
                conn,
                payload.to_vec(),
                budget.clone(),
                window.clone(),
            ))
        })
        .collect();
    let length = Duration::from_secs_f64(ctx.options.echo_seconds);
    let (runs, usage) = run_window(tasks, go, length, &ctx.pids).await?;
    let lost = runs.iter().map(|r| r.lost).sum();
    let latencies: Vec<u32> = runs.into_iter().flat_map(|r| r.latencies_us).collect();
    let round_trips = latencies.len();
    let (p50_ms, p99_ms) = latency_ms(latencies);
    Ok(EchoWindow {
        round_trips,
        lost,
        p50_ms,
        p99_ms,
        usage,
    })
}

/// The verdict on one answer, checked after the window.
enum Verdict {
    Token(Vec<u8>),
    Refused(String),
    Invalid(String),
}

fn check_answer(anchor: &PublicKey, request: &Presigned, answer: &[u8]) -> Verdict {
    let response = match SignedResponse::decode(answer).and_then(|s| s.verify(anchor)) {
        Ok(r) => r,
        Err(e) => return Verdict::Invalid(format!("response does not verify: {e}")),
    };
    if !response.answers(&app_id(request.client), request.request_id, &request.nonce) {
        return Verdict::Invalid("response answers another request".into());
    }
    match response.outcome {
        Ok(ResponseBody::Token { token, .. }) => Verdict::Token(token.to_vec()),
        Ok(other) => Verdict::Invalid(format!("not a token: {other:?}")),
        Err(e) => Verdict::Refused(e.code.name().to_owned()),
    }
}

fn check_token(anchor: &PublicKey, client: usize, token: &[u8]) -> Result<()> {
    let verified = token::verify(
        token,
        anchor,
        &token::Validation::new(unix_now(), DEVICE)
            .with_scope(SCOPE)
            .with_issuer(HUB_ID),
    )
    .map_err(|e| anyhow::anyhow!("token does not verify: {e}"))?;
    ensure!(
        verified.claims().sub == app_id(client),
        "token issued to {}, not {}",
        verified.claims().sub,
        app_id(client)
    );
    Ok(())
}

/// What the answers of a window turned out to be.
#[derive(Debug, Default)]
struct Tally {
    tokens: usize,
    refused: BTreeMap<String, usize>,
    invalid: usize,
    /// Tokens whose own signature and claims were checked too.
    tokens_checked: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.tokens += other.tokens;
        for (code, n) in other.refused {
            *self.refused.entry(code).or_insert(0) += n;
        }
        self.invalid += other.invalid;
        self.tokens_checked += other.tokens_checked;
    }
}

/// Checks every answer, on all cores.
fn check_answers(anchor: PublicKey, answers: Vec<(Presigned, Vec<u8>)>) -> Result<Tally> {
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let every = (answers.len() / TOKEN_SAMPLE).max(1);
    let chunk = answers.len().div_ceil(threads).max(1);
    let results: Vec<Result<Tally>> = std::thread::scope(|s| {
        let handles: Vec<_> = answers
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    let mut tally = Tally::default();
                    for (k, (request, answer)) in part.iter().enumerate() {
                        match check_answer(&anchor, request, answer) {
                            Verdict::Token(t) => {
                                tally.tokens += 1;
                                if (c * chunk + k).is_multiple_of(every) {
                                    check_token(&anchor, request.client, &t)?;
                                    tally.tokens_checked += 1;
                                }
                            }
                            Verdict::Refused(code) => {
                                *tally.refused.entry(code).or_insert(0) += 1;
                            }
                            Verdict::Invalid(why) => {
                                if tally.invalid == 0 {
                                    say(&format!("invalid answer: {why}"));
                                }
                                tally.invalid += 1;
                            }
                        }
                    }
                    Ok(tally)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("checker panicked")))
            })
            .collect()
    });
    let mut total = Tally::default();
    for r in results {
        total.add(r?);
    }
    Ok(total)
}

async fn hub_window(ctx: &Ctx, clients: usize) -> Result<HubWindow> {
    // One warm-up request per client, then its share of the count bound.
    let per_client = ctx.options.max_tokens.div_ceil(clients) + 1;
    let first_id = ctx.next_request_id.fetch_add(per_client, Ordering::Relaxed) as u64;
    let signing: Vec<_> = (0..clients)
        .map(|i| {
            let signer = Arc::clone(&ctx.apps[i]);
            tokio::task::spawn_blocking(move || presign(i, &signer, per_client, first_id))
        })
        .collect();
    let mut pools = Vec::new();
    for s in signing {
        pools.push(s.await.context("signing task panicked")??);
    }
    let mut conns = connect_all(ctx.port, (0..clients).map(app_id).collect(), false).await?;
    let mut warmups = Vec::new();
    for (conn, pool) in conns.iter_mut().zip(&mut pools) {
        let request = pool.remove(0);
        let answer = conn
            .round_trip(request.bytes.clone(), ANSWER_TIMEOUT)
            .await?
            .with_context(|| format!("{}: no answer from the hub", conn.id))?;
        warmups.push((request, answer));
    }
    let warm = tokio::task::spawn_blocking({
        let anchor = ctx.anchor;
        move || check_answers(anchor, warmups)
    })
    .await??;
    ensure!(
        warm.tokens == clients,
        "warm-up: {} tokens of {clients}; refused {:?}, invalid {}",
        warm.tokens,
        warm.refused,
        warm.invalid
    );

    let (go, window) = new_window();
    let tasks = conns
        .into_iter()
        .zip(pools)
        .map(|(conn, pool)| tokio::spawn(hub_client(conn, pool, window.clone())))
        .collect();
    let length = Duration::from_secs_f64(ctx.options.seconds);
    let (runs, usage) = run_window(tasks, go, length, &ctx.pids).await?;
    let lost = runs.iter().map(|r| r.lost).sum();
    let mut latencies = Vec::new();
    let mut answers = Vec::new();
    for r in runs {
        latencies.extend(r.latencies_us);
        answers.extend(r.answers);
    }
    let (p50_ms, p99_ms) = latency_ms(latencies);
    let anchor = ctx.anchor;
    let Tally {
        tokens,
        refused,
        invalid,
        tokens_checked,
    } = tokio::task::spawn_blocking(move || check_answers(anchor, answers)).await??;
    Ok(HubWindow {
        clients,
        tokens,
        refused,
        lost,
        invalid,
        tokens_checked,
        p50_ms,
        p99_ms,
        usage,
        fsyncs: None,
    })
}

/// What one open-loop client did: when each request was due, and each answer's arrival.
#[derive(Default)]
struct OpenRun {
    /// Request id → (the request, when it was due to be sent).
    due: BTreeMap<u64, (Presigned, Instant)>,
    arrivals: Vec<(Instant, Vec<u8>)>,
}

/// One open-loop client: sends its `requests` at `start + offset + k × period` whatever
/// happened to the earlier ones (a slow answer does not delay the next request, so the
/// latency measured from when a request was due includes any queueing), and collects the
/// answers until all have come or [`ANSWER_TIMEOUT`] after the window.
async fn open_client(
    mut conn: Conn,
    requests: Vec<Presigned>,
    offset: Duration,
    period: Duration,
    length: Duration,
    mut window: Window,
) -> Result<(Conn, OpenRun)> {
    let deadline = window.deadline().await?;
    let start = deadline - length;
    let mut run = OpenRun::default();
    let mut pending = requests.into_iter();
    let mut next = pending.next();
    let mut k = 0u32;
    let give_up = deadline + ANSWER_TIMEOUT;
    loop {
        let due = start + offset + period * k;
        let sending = next.is_some() && due < deadline;
        if !sending && run.arrivals.len() >= run.due.len() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due), if sending => {
                let request = next.take().context("no request")?;
                conn.client
                    .publish(conn.request_topic.as_str(), QoS::AtLeastOnce, false, request.bytes.clone())
                    .await
                    .with_context(|| format!("{} publishing", conn.id))?;
                run.due.insert(request.request_id, (request, due.into_std()));
                next = pending.next();
                k += 1;
            }
            notice = tokio::time::timeout_at(give_up, conn.notices.recv()) => match notice {
                Err(_) => break,
                Ok(None) => bail!("{}: the MQTT task ended", conn.id),
                Ok(Some(Notice::Message(m))) if m.topic == conn.response_topic => {
                    run.arrivals.push((Instant::now(), m.payload));
                }
                Ok(Some(Notice::Disconnected(reason))) => {
                    bail!("{} lost its broker connection: {reason}", conn.id)
                }
                Ok(Some(_)) => {}
            },
        }
    }
    Ok((conn, run))
}

/// An open-loop window: `clients` apps together asking for `rate` tokens a second, evenly
/// spread, for the length of an issuance window.
#[derive(Debug)]
struct OpenWindow {
    clients: usize,
    rate: f64,
    sent: usize,
    tokens: usize,
    refused: BTreeMap<String, usize>,
    lost: usize,
    invalid: usize,
    p50_ms: f64,
    p99_ms: f64,
    usage: Usage,
    fsyncs: Option<u64>,
}

async fn open_window(ctx: &Ctx, clients: usize, rate: f64) -> Result<OpenWindow> {
    let length = Duration::from_secs_f64(ctx.options.seconds);
    // Each client sends every `period`; client i starts i/clients of a period in.
    let period = Duration::from_secs_f64(clients as f64 / rate);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive count of requests, far below usize::MAX"
    )]
    let per_client = (length.as_secs_f64() / period.as_secs_f64()).ceil() as usize + 1;
    let first_id = ctx.next_request_id.fetch_add(per_client, Ordering::Relaxed) as u64;
    let signing: Vec<_> = (0..clients)
        .map(|i| {
            let signer = Arc::clone(&ctx.apps[i]);
            tokio::task::spawn_blocking(move || presign(i, &signer, per_client, first_id))
        })
        .collect();
    let mut pools = Vec::new();
    for s in signing {
        pools.push(s.await.context("signing task panicked")??);
    }
    let conns = connect_all(ctx.port, (0..clients).map(app_id).collect(), false).await?;
    let (go, window) = new_window();
    let meter = Meter::start(&ctx.pids)?;
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(pools)
        .enumerate()
        .map(|(i, (conn, pool))| {
            let offset = period.mul_f64(i as f64 / clients as f64);
            tokio::spawn(open_client(
                conn,
                pool,
                offset,
                period,
                length,
                window.clone(),
            ))
        })
        .collect();
    go.send(Some(tokio::time::Instant::now() + length))
        .ok()
        .context("the clients are gone")?;
    let mut runs = Vec::new();
    let mut conns = Vec::new();
    for t in tasks {
        let (conn, run) = t.await.context("client task panicked")??;
        conns.push(conn);
        runs.push(run);
    }
    // The window is the sending time: the last answers may come after it.
    let mut usage = meter.stop()?;
    usage.wall = usage.wall.min(length.as_secs_f64()).max(1e-3);
    for c in conns {
        c.close().await;
    }
    let anchor = ctx.anchor;
    let sent = runs.iter().map(|r| r.due.len()).sum();
    let (latencies, answers, lost) = tokio::task::spawn_blocking(move || {
        let mut latencies = Vec::new();
        let mut answers = Vec::new();
        let mut lost = 0;
        for mut run in runs {
            for (arrived, answer) in run.arrivals {
                // Which request it answers; a response that does not verify is counted
                // invalid below, against any request of this client.
                let id = SignedResponse::decode(&answer)
                    .and_then(|s| s.verify(&anchor))
                    .map(|r| r.request_id)
                    .ok();
                let entry = match id.and_then(|id| run.due.remove(&id)) {
                    Some(entry) => entry,
                    None => match run.due.pop_first() {
                        Some((_, entry)) => entry,
                        None => continue,
                    },
                };
                let (request, due) = entry;
                latencies.push(micros(arrived.saturating_duration_since(due)));
                answers.push((request, answer));
            }
            lost += run.due.len();
        }
        (latencies, answers, lost)
    })
    .await?;
    let (p50_ms, p99_ms) = latency_ms(latencies);
    let tally = tokio::task::spawn_blocking(move || check_answers(anchor, answers)).await??;
    Ok(OpenWindow {
        clients,
        rate,
        sent,
        tokens: tally.tokens,
        refused: tally.refused,
        lost,
        invalid: tally.invalid,
        p50_ms,
        p99_ms,
        usage,
        fsyncs: None,
    })
}

// ---------------------------------------------------------------------------------------
// Flood comparison

/// Well-behaved apps of the flood comparison, as `tests/hub_flood.rs`'s bystander: each
/// asks for an access token, waits [`BYSTANDER_PACE`] after a token and
/// [`BYSTANDER_BACKOFF`] after a retryable refusal, and asks again.
const BYSTANDERS: usize = 4;
/// Within the default per-client rate limit (5 a second).
const BYSTANDER_PACE: Duration = Duration::from_millis(250);
const BYSTANDER_BACKOFF: Duration = Duration::from_millis(500);
/// The bystander's deadline in `tests/hub_flood.rs`: an answer later than this is lost.
const BYSTANDER_DEADLINE: Duration = Duration::from_secs(5);

/// What the bystanders saw in one phase.
#[derive(Debug, Default)]
struct Bystanding {
    latencies_us: Vec<u32>,
    retried: usize,
    refused: BTreeMap<String, usize>,
    lost: usize,
}

impl Bystanding {
    fn add(&mut self, other: Bystanding) {
        self.latencies_us.extend(other.latencies_us);
        self.retried += other.retried;
        for (code, n) in other.refused {
            *self.refused.entry(code).or_insert(0) += n;
        }
        self.lost += other.lost;
    }
}

/// App `index` as a bystander until `until`: latency of each token it gets.
async fn bystander(
    port: u16,
    anchor: PublicKey,
    index: usize,
    signer: Arc<P256Signer>,
    first_id: u64,
    until: Instant,
) -> Result<Bystanding> {
    let mut conn = Conn::open_app(port, &app_id(index)).await?;
    let mut seen = Bystanding::default();
    let mut id = first_id;
    while Instant::now() < until {
        // Signed as it asks (p256 in release: about 0.1 ms), so it is fresh.
        let request = presign(index, &signer, 1, id)?.remove(0);
        id += 1;
        let asked = Instant::now();
        let Some(answer) = conn
            .round_trip(request.bytes.clone(), BYSTANDER_DEADLINE)
            .await?
        else {
            seen.lost += 1;
            continue;
        };
        let took = asked.elapsed();
        match check_answer(&anchor, &request, &answer) {
            Verdict::Token(_) => {
                seen.latencies_us.push(micros(took));
                tokio::time::sleep(BYSTANDER_PACE).await;
            }
            Verdict::Refused(code) if code == "rate_limited" || code == "overloaded" => {
                seen.retried += 1;
                tokio::time::sleep(BYSTANDER_BACKOFF).await;
            }
            Verdict::Refused(code) => {
                *seen.refused.entry(code).or_insert(0) += 1;
                tokio::time::sleep(BYSTANDER_PACE).await;
            }
            Verdict::Invalid(why) => bail!("bystander {}: {why}", app_id(index)),
        }
    }
    conn.close().await;
    Ok(seen)
}

/// All bystanders for `length`, with the hub's and broker's resource use.
async fn bystanders(
    hub: &Hub,
    port: u16,
    pids: (u32, u32),
    first_id: u64,
    length: Duration,
) -> Result<(Bystanding, Usage)> {
    let meter = Meter::start(&Pids {
        hubs: vec![pids.0],
        broker: pids.1,
        store_db: None,
    })?;
    let until = Instant::now() + length;
    let tasks: Vec<_> = (0..BYSTANDERS)
        .map(|i| {
            tokio::spawn(bystander(
                port,
                hub.anchor,
                i,
                Arc::clone(&hub.apps[i]),
                first_id + (i as u64) * 1_000_000,
                until,
            ))
        })
        .collect();
    let mut seen = Bystanding::default();
    for t in tasks {
        seen.add(t.await.context("bystander panicked")??);
    }
    Ok((seen, meter.stop()?))
}

/// The flood comparison's outcome.
struct FloodComparison {
    length: Duration,
    quiet: (Bystanding, Usage),
    flooded: (Bystanding, Usage),
    /// Messages handed to the broker by the flooders.
    sent: u64,
}

/// A second hub, with the default config (limits included), serving [`BYSTANDERS`] apps
/// for `length` without a flood, then for `length` under `tests/hub_flood.rs`'s sustained
/// flood: 10,000 malformed messages a second from 2 clients and 1,000 validly signed
/// requests a second from 4 registered apps.
async fn flood_comparison(
    options: &Options,
    broker: &Broker,
    broker_pid: u32,
    length: Duration,
) -> Result<FloodComparison> {
    let port = broker.port();
    let signing = usize::try_from(SUSTAINED_SIGNING_CLIENTS)?;
    let mut hub = Hub::create(
        &options.hub_bin,
        port,
        BYSTANDERS + signing,
        Limits::Default,
    )?;
    let hub_pid = hub.spawn(false)?;
    wait_until_serving(&mut hub, port).await?;
    enroll_device(&hub, port).await?;
    say(&format!(
        "flood comparison: {BYSTANDERS} bystanders for {length:?} without a flood"
    ));
    let quiet = bystanders(&hub, port, (hub_pid, broker_pid), 1, length).await?;
    hub.check_alive()?;

    say(&format!(
        "flood comparison: {BYSTANDERS} bystanders for {length:?} under the flood"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = length + Duration::from_secs(30);
    let mut floods = tokio::task::JoinSet::new();
    let noise = Arc::new(garbage(1000));
    for i in 0..SUSTAINED_NOISY_CLIENTS {
        let flooder = RawPublisher::connect(broker, &format!("bench-noise-{i}")).await?;
        let noise = Arc::clone(&noise);
        floods.spawn(sustain(
            flooder,
            SUSTAINED_MALFORMED_PER_SECOND / SUSTAINED_NOISY_CLIENTS,
            Arc::clone(&stop),
            limit,
            move |n| Ok(noise[(n % 1000) as usize].clone()),
        ));
    }
    for k in 0..signing {
        let index = BYSTANDERS + k;
        let id = app_id(index);
        let flooder = RawPublisher::connect(broker, &id).await?;
        let signer = Arc::clone(&hub.apps[index]);
        let scope = Scopes::parse(SCOPE).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
        floods.spawn(sustain(
            flooder,
            SUSTAINED_SIGNED_PER_SECOND / SUSTAINED_SIGNING_CLIENTS,
            Arc::clone(&stop),
            limit,
            move |n| {
                signed_request(
                    &*signer,
                    &id,
                    n + 1,
                    RequestBody::AccessToken {
                        device: DEVICE,
                        scope,
                    },
                )
            },
        ));
    }
    let flooded = bystanders(&hub, port, (hub_pid, broker_pid), 100_000_000, length).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    while let Some(flood) = floods.join_next().await {
        sent += flood.context("flooder panicked")??;
    }
    let flooded = flooded?;
    hub.check_alive()?;
    hub.stop()?;
    Ok(FloodComparison {
        length,
        quiet,
        flooded,
        sent,
    })
}

// ---------------------------------------------------------------------------------------
// Replicas on PostgreSQL

/// The no-op responder on the broker at `port`, answering with `reply_len` bytes, once its
/// subscription is in place; send `true` to stop it.
async fn start_echo(
    port: u16,
    reply_len: usize,
) -> Result<(watch::Sender<bool>, tokio::task::JoinHandle<Result<()>>)> {
    let (stop, stop_rx) = watch::channel(false);
    let (ready, echo_ready) = tokio::sync::oneshot::channel();
    let mut responder = tokio::spawn(echo_responder(port, vec![0xa5; reply_len], ready, stop_rx));
    if echo_ready.await.is_err() {
        responder.abort();
        bail!("the echo responder failed: {:?}", (&mut responder).await);
    }
    Ok((stop, responder))
}

/// One replica count's windows.
struct ReplicaRun {
    replicas: usize,
    issued: HubWindow,
    echo: EchoWindow,
    /// The database's work per token over the issuance window and its warm-up, from
    /// `pg_stat_database`; `None` where the statistics could not be read.
    store_per_token: Option<StoreStats>,
}

/// Counters of `pg_stat_database` (totals, or per token).
#[derive(Debug, Clone, Copy)]
struct StoreStats {
    /// `xact_commit`.
    commits: f64,
    /// `xact_rollback` (a serialization failure the hub retries is one).
    rollbacks: f64,
    /// `tup_inserted + tup_updated + tup_deleted`.
    rows: f64,
}

/// The current database's counters.
async fn database_stats(db: &tokio_postgres::Client) -> Option<StoreStats> {
    let row = db
        .query_one(
            "SELECT xact_commit, xact_rollback, tup_inserted + tup_updated + tup_deleted \
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .ok()?;
    let get = |i: usize| row.try_get::<_, i64>(i).ok().map(|v| v as f64);
    Some(StoreStats {
        commits: get(0)?,
        rollbacks: get(1)?,
        rows: get(2)?,
    })
}

/// `n` replicas of one hub serving one PostgreSQL database of their own (made here, dropped
/// after), behind a Mosquitto of their own, through `tessera_tests::replicas::HubReplicas`
/// (`[serve] shared_subscription = true`, a client id each) with the release binary and the
/// limits raised as for the SQLite hub; with `options.replica_clients` apps: that broker's
/// echo ceiling, then an issuance window, as for the SQLite hub.
async fn replica_run(
    options: &Options,
    n: usize,
    request_bytes: &[u8],
    response_len: usize,
) -> Result<ReplicaRun> {
    let clients = options.replica_clients;
    let mut builder = HubReplicas::builder()
        .hub_id(HUB_ID)
        .replicas(n)
        .hub_bin(&options.hub_bin)
        .postgres(&options.postgres);
    for (from, to) in RAISED_LIMITS {
        builder = builder.config(from, to);
    }
    let mut hub = builder
        .start()
        .await
        .with_context(|| format!("starting {n} replicas on PostgreSQL"))?;
    let anchor = hub.trust_anchor();
    let mut apps = Vec::with_capacity(clients);
    for i in 0..clients {
        apps.push(Arc::new(hub.add_app(&app_id(i), APP_ROLE)?));
    }
    let device = hub.add_device(DEVICE, DEVICE_ROLE, &[DEVICE_GROUP])?;
    let port = hub.broker().port();
    enroll(&device, &anchor, port).await?;
    let hubs = (0..n)
        .map(|i| hub.replica(i)?.pid().context("a replica is not running"))
        .collect::<Result<Vec<u32>>>()?;
    let ctx = Ctx {
        options: options.clone(),
        port,
        pids: Pids {
            hubs,
            broker: hub
                .broker()
                .pid()
                .context("the replicas' mosquitto is not running")?,
            store_db: Some(hub.database().name().to_owned()),
        },
        anchor,
        apps,
        next_request_id: AtomicUsize::new(1),
    };
    say(&format!(
        "{n} replica(s) on PostgreSQL serving (database {}, broker on port {port}), C = \
         {clients}: echo window",
        hub.database().name()
    ));
    let (echo_stop, responder) = start_echo(port, response_len).await?;
    let echo = echo_window(&ctx, clients, request_bytes).await;
    let _ = echo_stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), responder).await;
    let echo = echo?;
    say(&format!(
        "{n} replica(s) on PostgreSQL, C = {clients}: issuance window"
    ));
    let stats = hub.database().connect().await?;
    let stats_before = database_stats(&stats).await;
    let issued = hub_window(&ctx, clients).await;
    // Backends report their statistics at most once a second, when idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats_after = database_stats(&stats).await;
    for i in 0..n {
        ensure!(
            hub.is_running(i)?,
            "replica {} exited during the window; the logs:\n{}",
            hub.replica(i)?.name(),
            hub.logs(30)
        );
    }
    let issued = issued.with_context(|| format!("the replicas' logs:\n{}", hub.logs(20)))?;
    say(&format!(
        "{n} replica(s) on PostgreSQL, C = {clients}: {:.0} tokens/s ({} tokens, refused {:?}, \
         lost {}), echo {:.0}/s",
        issued.tokens_per_s(),
        issued.tokens,
        issued.refused,
        issued.lost,
        echo.per_s()
    ));
    // The window's tokens and one warm-up token per client; this connection's own
    // statistics query is one transaction.
    let answered = (issued.tokens + clients) as f64;
    let store_per_token = stats_before.zip(stats_after).map(|(a, b)| StoreStats {
        commits: (b.commits - a.commits - 1.0) / answered,
        rollbacks: (b.rollbacks - a.rollbacks) / answered,
        rows: (b.rows - a.rows) / answered,
    });
    drop(stats);
    // Kills the replicas and the broker, drops the database.
    drop(hub);
    Ok(ReplicaRun {
        replicas: n,
        issued,
        echo,
        store_per_token,
    })
}

struct Ctx {
    options: Options,
    port: u16,
    pids: Pids,
    anchor: PublicKey,
    apps: Vec<Arc<P256Signer>>,
    next_request_id: AtomicUsize,
}

// ---------------------------------------------------------------------------------------
// Report

fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.round());
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

struct Setup {
    mosquitto: String,
    filesystem: String,
    request_bytes: usize,
    response_bytes: usize,
    durable_start: Durable,
    durable_end: Durable,
    /// Why `fsync`s were not counted, if they were not.
    fsyncs: Option<String>,
    /// The store's own count over the whole run, from the hub's log at its stop:
    /// (transactions, writes) and the `fsync`s perf counted over the same run.
    store_log: Option<(u64, u64)>,
}

/// `store_transactions` and `store_writes` of the "hub stopped" line of a hub log.
fn store_counts(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("hub stopped"))?;
    // Drop terminal colour codes (ESC [ … m) before reading the fields.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let field = |name: &str| -> Option<u64> {
        let at = plain.find(&format!("{name}="))? + name.len() + 1;
        let digits: String = plain[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((field("store_transactions")?, field("store_writes")?))
}

fn report(
    o: &Options,
    setup: &Setup,
    crypto: (Crypto, Crypto),
    load: (&str, &str),
    rows: &[(HubWindow, EchoWindow)],
    open: &OpenWindow,
) {
    let c = Crypto::mean(crypto.0, crypto.1);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let drift = |a: f64, b: f64| (b / a - 1.0) * 100.0;
    let (d0, d1) = (&setup.durable_start, &setup.durable_end);
    let commit_us = (d0.commit.p50_us + d1.commit.p50_us) / 2.0;
    println!(
        "Machine: {cores} cores (nproc), shared with other work (load average {} at the \
         start, {} at the end). {}, tessera-hub serve (release, default config but the rate \
         limit), everything on 127.0.0.1; hub directory on {}.",
        load.0, load.1, setup.mosquitto, setup.filesystem
    );
    println!();
    println!(
        "Windows: for each C, the echo ceiling for up to {} s / {} round trips, then issuance \
         for up to {} s / {} tokens, whichever bound comes first. Requests {} bytes, \
         responses {} bytes (the echo answers with as many).",
        o.echo_seconds,
        fmt_count(o.max_echo as f64),
        o.seconds,
        fmt_count(o.max_tokens as f64),
        setup.request_bytes,
        setup.response_bytes
    );
    println!();
    println!(
        "Bare crypto, same library as the hub (aws-lc-rs, tessera_hub::crypto), \
         one thread, CPU time per op, {} ops each, mean of the start and the end of the run: \
         request decode + verify {} µs, token issue (encode + sign) {} µs, response sign {} µs \
         (drift start → end: {:+.0}%, {:+.0}%, {:+.0}%).",
        o.crypto_ops,
        fmt_us(c.verify_us),
        fmt_us(c.issue_us),
        fmt_us(c.respond_us),
        drift(crypto.0.verify_us, crypto.1.verify_us),
        drift(crypto.0.issue_us, crypto.1.issue_us),
        drift(crypto.0.respond_us, crypto.1.respond_us),
    );
    println!();
    println!(
        "Durable writes in the hub's directory, wall time, median (p99), start / end of the \
         run, up to {} of each: 4 KiB append + fdatasync {} ({}) / {} ({}) µs; SQLite one-row \
         insert + commit with the hub's settings (WAL, synchronous = FULL, BEGIN IMMEDIATE) \
         {} ({}) / {} ({}) µs.",
        d0.fsync.ops.max(d0.commit.ops),
        fmt_us(d0.fsync.p50_us),
        fmt_us(d0.fsync.p99_us),
        fmt_us(d1.fsync.p50_us),
        fmt_us(d1.fsync.p99_us),
        fmt_us(d0.commit.p50_us),
        fmt_us(d0.commit.p99_us),
        fmt_us(d1.commit.p50_us),
        fmt_us(d1.commit.p99_us),
    );
    println!();
    println!(
        "| C | tokens/s | p50 | p99 | hub CPU µs/token | bare verify + sign µs | ratio | \
         echo round trips/s | tokens/s ÷ echo |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (h, e) in rows {
        let hub_us = h.per_token_us(h.usage.hub_cpu());
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.3} |",
            h.clients,
            fmt_count(h.tokens_per_s()),
            fmt_ms(h.p50_ms),
            fmt_ms(h.p99_ms),
            fmt_us(hub_us),
            fmt_us(c.verify_sign_us()),
            hub_us / c.verify_sign_us(),
            fmt_count(e.per_s()),
            h.tokens_per_s() / e.per_s(),
        );
    }
    println!();
    let fsyncs_how = match &setup.fsyncs {
        None => format!(
            "`fsync` + `fdatasync` calls of the hub (all threads) in the window ÷ tokens, \
             counted by `perf stat -I {FSYNC_INTERVAL_MS}` on the syscall tracepoints (the \
             window cut to {FSYNC_INTERVAL_MS} ms at each end)"
        ),
        Some(why) => format!("not counted ({why})"),
    };
    println!(
        "Where the time goes, same windows. \"÷ all crypto\": hub CPU per token ÷ (verify + \
         token sign + response sign = {} µs). \"hub cores\": hub CPU ÷ wall time. \
         \"fsyncs/token\": {fsyncs_how}. \"commit share\": tokens/s × fsyncs/token × the \
         median SQLite commit above ({} µs), the share of the wall time the store's writer \
         spends committing.",
        fmt_us(c.all_us()),
        fmt_us(commit_us)
    );
    println!();
    println!(
        "| C | tokens | hub user µs/token | hub sys µs/token | ÷ all crypto | hub cores | \
         fsyncs/token | commit share | hub disk KiB/token | broker CPU µs/token | bench CPU µs/token | \
         echo p50 | echo p99 | refused, lost |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut checked = 0;
    for (h, e) in rows {
        checked += h.tokens_checked;
        let mut problems: Vec<String> = h
            .refused
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        if h.invalid > 0 {
            problems.push(format!("invalid {}", h.invalid));
        }
        if h.lost + e.lost > 0 {
            problems.push(format!("lost {}", h.lost + e.lost));
        }
        let disk = h.usage.hub_write_bytes.map_or_else(
            || "?".to_owned(),
            |b| format!("{:.1}", b as f64 / 1024.0 / h.tokens.max(1) as f64),
        );
        let per_token = h.fsyncs.map(|f| f as f64 / h.tokens.max(1) as f64);
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            h.clients,
            fmt_count(h.tokens as f64),
            fmt_us(h.per_token_us(h.usage.hub_user)),
            fmt_us(h.per_token_us(h.usage.hub_sys)),
            h.per_token_us(h.usage.hub_cpu()) / c.all_us(),
            h.usage.hub_cpu() / h.usage.wall,
            per_token.map_or_else(|| "?".to_owned(), |f| format!("{f:.3}")),
            per_token.map_or_else(
                || "?".to_owned(),
                |f| format!("{:.2}", h.tokens_per_s() * f * commit_us / 1e6)
            ),
            disk,
            fmt_us(h.per_token_us(h.usage.broker_cpu)),
            fmt_us(h.per_token_us(h.usage.bench_cpu)),
            fmt_ms(e.p50_ms),
            fmt_ms(e.p99_ms),
            if problems.is_empty() {
                "0".to_owned()
            } else {
                problems.join(", ")
            },
        );
    }
    println!();
    println!(
        "Every answer's signature was verified and matched to its request; {checked} of the \
         tokens were also verified on their own (signature, issuer, audience, scope, subject)."
    );
    if let Some((transactions, writes)) = setup.store_log {
        println!();
        println!(
            "The store's own count over the whole run (every window, warm-up and probe), from \
             the hub's log at its stop: {} transactions carrying {} writes ({:.1} writes per \
             transaction).",
            fmt_count(transactions as f64),
            fmt_count(writes as f64),
            writes as f64 / transactions.max(1) as f64
        );
    }
    report_open(open);
}

fn problems(refused: &BTreeMap<String, usize>, invalid: usize, lost: usize) -> String {
    let mut problems: Vec<String> = refused
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    if invalid > 0 {
        problems.push(format!("invalid {invalid}"));
    }
    if lost > 0 {
        problems.push(format!("lost {lost}"));
    }
    if problems.is_empty() {
        "0".to_owned()
    } else {
        problems.join(", ")
    }
}

fn report_replicas(o: &Options, c: &Crypto, rows: &[(HubWindow, EchoWindow)], runs: &[ReplicaRun]) {
    let clients = o.replica_clients;
    let Some((sqlite, sqlite_echo)) = rows.iter().find(|(h, _)| h.clients == clients) else {
        return;
    };
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!(
        "Replicas on PostgreSQL, C = {clients}, next to the SQLite hub's window at the same C \
         above: N replicas of one hub (release binary, `[serve] shared_subscription = true`, a \
         client id each, limits raised as above) on one PostgreSQL database made for each N and \
         dropped after ({}), behind a Mosquitto of their own with the same settings, whose echo \
         ceiling is measured just before. \"hub CPU\": all replicas together. \"PostgreSQL \
         CPU\": the database's backends (the replicas' connections, by process title), not the \
         server's background writers. \"PG commits\", \"PG rollbacks\", \"PG rows\": the \
         database's committed and rolled-back transactions (a serialization failure the hub \
         retries is a rollback) and rows inserted + updated + deleted (pg_stat_database) over \
         the window and its warm-up, per token. \"ratio\": hub CPU per token ÷ bare verify + sign ({} µs). \
         On {cores} cores the replicas, PostgreSQL, Mosquitto and the bench's clients all share \
         the same cores: this shows what the shared store costs, not a speed-up from more \
         replicas.",
        postgres_server_version(&o.postgres),
        fmt_us(c.verify_sign_us()),
    );
    println!();
    println!(
        "| hub | tokens/s | ÷ SQLite | p50 | p99 | hub CPU µs/token | ratio | PostgreSQL CPU \
         µs/token | PG commits/token | PG rollbacks/token | PG rows/token | hub cores | PostgreSQL cores | echo round trips/s | tokens/s ÷ echo | \
         refused, lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let row = |name: String, h: &HubWindow, e: &EchoWindow, per_token: Option<StoreStats>| {
        let (tx, rollbacks, writes) = per_token.map_or_else(
            || ("–".to_owned(), "–".to_owned(), "–".to_owned()),
            |s| {
                (
                    format!("{:.2}", s.commits),
                    format!("{:.3}", s.rollbacks),
                    format!("{:.2}", s.rows),
                )
            },
        );
        let hub_us = h.per_token_us(h.usage.hub_cpu());
        let (store_us, store_cores) = h.usage.store_cpu.map_or_else(
            || ("–".to_owned(), "–".to_owned()),
            |s| {
                (
                    fmt_us(h.per_token_us(s)),
                    format!("{:.2}", s / h.usage.wall),
                )
            },
        );
        println!(
            "| {name} | {} | {:.2} | {} | {} | {} | {:.2} | {store_us} | {tx} | {rollbacks} | {writes} | {:.2} | \
             {store_cores} | \
             {} | {:.3} | {} |",
            fmt_count(h.tokens_per_s()),
            h.tokens_per_s() / sqlite.tokens_per_s(),
            fmt_ms(h.p50_ms),
            fmt_ms(h.p99_ms),
            fmt_us(hub_us),
            hub_us / c.verify_sign_us(),
            h.usage.hub_cpu() / h.usage.wall,
            fmt_count(e.per_s()),
            h.tokens_per_s() / e.per_s(),
            problems(&h.refused, h.invalid, h.lost + e.lost),
        );
    };
    row("1 hub, SQLite".to_owned(), sqlite, sqlite_echo, None);
    for r in runs {
        let name = if r.replicas == 1 {
            "1 replica, PostgreSQL".to_owned()
        } else {
            format!("{} replicas, PostgreSQL", r.replicas)
        };
        row(name, &r.issued, &r.echo, r.store_per_token);
    }
    if runs.iter().any(|r| r.issued.usage.store_cpu.is_none()) {
        println!();
        println!(
            "\"–\" under PostgreSQL: its backends' processes could not be read here (another \
             machine or container, or hidden /proc)."
        );
    }
}

/// `server_version` of the PostgreSQL server, for the report.
fn postgres_server_version(url: &str) -> String {
    let url = url.to_owned();
    std::thread::spawn(move || -> Option<String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async move {
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .ok()?
            .ok()?;
            tokio::spawn(connection);
            let row = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_one("SHOW server_version", &[]),
            )
            .await
            .ok()?
            .ok()?;
            row.try_get::<_, String>(0).ok()
        })
    })
    .join()
    .ok()
    .flatten()
    .map_or_else(|| "PostgreSQL".to_owned(), |v| format!("PostgreSQL {v}"))
}

fn report_open(o: &OpenWindow) {
    println!();
    println!(
        "Open loop at half the highest rate above: {} clients together asking for {} tokens/s, \
         each request sent when due whatever happened to the earlier ones, latency from when it \
         was due to its answer (so queueing counts).",
        o.clients,
        fmt_count(o.rate)
    );
    println!();
    println!(
        "| clients | asked tokens/s | sent | tokens | tokens/s | p50 | p99 | hub cores | \
         fsyncs/token | refused, lost |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
        o.clients,
        fmt_count(o.rate),
        fmt_count(o.sent as f64),
        fmt_count(o.tokens as f64),
        fmt_count(o.tokens as f64 / o.usage.wall),
        fmt_ms(o.p50_ms),
        fmt_ms(o.p99_ms),
        o.usage.hub_cpu() / o.usage.wall,
        o.fsyncs.map_or_else(
            || "?".to_owned(),
            |f| format!("{:.3}", f as f64 / o.tokens.max(1) as f64)
        ),
        problems(&o.refused, o.invalid, o.lost),
    );
}

fn report_flood(f: &FloodComparison) {
    println!();
    println!(
        "Flood comparison: a second hub with the default config (its rate and admission limits \
         included), {BYSTANDERS} well-behaved apps each asking for an access token and waiting \
         {} ms after a token ({} ms after a retryable refusal), for {} s without a flood, then \
         {} s under tests/hub_flood.rs's sustained flood: {} malformed messages/s from {} \
         clients and {} validly signed token requests/s from {} registered apps ({} messages \
         handed to the broker).",
        BYSTANDER_PACE.as_millis(),
        BYSTANDER_BACKOFF.as_millis(),
        f.length.as_secs_f64(),
        f.length.as_secs_f64(),
        fmt_count(SUSTAINED_MALFORMED_PER_SECOND as f64),
        SUSTAINED_NOISY_CLIENTS,
        fmt_count(SUSTAINED_SIGNED_PER_SECOND as f64),
        SUSTAINED_SIGNING_CLIENTS,
        fmt_count(f.sent as f64),
    );
    println!();
    println!(
        "| well-behaved apps | tokens | p50 | p99 | slowest | retries | other refusals, lost | hub cores | broker cores |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|");
    let mut p99 = [0.0; 2];
    for (k, (name, (seen, usage))) in [
        ("without the flood", &f.quiet),
        ("under the flood", &f.flooded),
    ]
    .into_iter()
    .enumerate()
    {
        let slowest = seen.latencies_us.iter().copied().max().unwrap_or(0);
        let (p50_ms, p99_ms) = latency_ms(seen.latencies_us.clone());
        p99[k] = p99_ms;
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
            fmt_count(seen.latencies_us.len() as f64),
            fmt_ms(p50_ms),
            fmt_ms(p99_ms),
            fmt_ms(f64::from(slowest) / 1000.0),
            seen.retried,
            problems(&seen.refused, 0, seen.lost),
            usage.hub_cpu() / usage.wall,
            usage.broker_cpu / usage.wall,
        );
    }
    println!();
    println!(
        "Well-behaved p99 under the flood ÷ without it: {:.2}.",
        p99[1] / p99[0]
    );
}

// ---------------------------------------------------------------------------------------

fn mosquitto_version() -> String {
    let bin =
        std::env::var_os("MOSQUITTO").unwrap_or_else(|| tessera_tests::broker::MOSQUITTO.into());
    Command::new(bin)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().replace("mosquitto version", "Mosquitto"))
        })
        .unwrap_or_else(|| "Mosquitto".into())
}

async fn enroll_device(hub: &Hub, port: u16) -> Result<()> {
    enroll(&hub.device, &hub.anchor, port).await
}

/// Enrolls [`DEVICE`] with the key `device` it was registered with.
async fn enroll(device: &P256Signer, anchor: &PublicKey, port: u16) -> Result<()> {
    let mut conn = Conn::open_app(port, DEVICE).await?;
    let key = device.public_key();
    let request = Request {
        client: DEVICE,
        request_id: 1,
        issued_at: unix_now(),
        nonce: random_bytes::<NONCE_LEN>(),
        body: RequestBody::Enroll {
            key,
            code_proof: None,
        },
    };
    let answer = conn
        .round_trip(sign_request(&request, device)?, ANSWER_TIMEOUT)
        .await?
        .context("no answer to the device's enrollment")?;
    let response = SignedResponse::decode(&answer)
        .and_then(|s| s.verify(anchor))
        .map_err(|e| anyhow::anyhow!("enrollment response: {e}"))?;
    ensure!(
        matches!(response.outcome, Ok(ResponseBody::Enrolled)),
        "enrollment: {:?}",
        response.outcome
    );
    conn.close().await;
    Ok(())
}

/// Polls with an app's token request until the hub answers anything (it subscribes after
/// it starts).
async fn wait_until_serving(hub: &mut Hub, port: u16) -> Result<()> {
    let mut conn = Conn::open_app(port, &app_id(0)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = 1_000_000_000u64;
    let result = loop {
        hub.check_alive()?;
        id += 1;
        let request = presign(0, &hub.apps[0], 1, id)?.remove(0);
        if conn
            .round_trip(request.bytes, Duration::from_millis(300))
            .await?
            .is_some()
        {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "the hub did not answer within 20 s; its log:\n{}",
                hub.log_tail()
            ));
        }
    };
    conn.close().await;
    result
}

/// One access token for the enrolled device, checked; returns the request and the answer
/// (their sizes go into the echo windows).
async fn probe_token(hub: &Hub, port: u16) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut conn = Conn::open_app(port, &app_id(0)).await?;
    let request = presign(0, &hub.apps[0], 1, 2_000_000_000)?.remove(0);
    let answer = conn
        .round_trip(request.bytes.clone(), ANSWER_TIMEOUT)
        .await?
        .context("no answer to the first token request")?;
    conn.close().await;
    match check_answer(&hub.anchor, &request, &answer) {
        Verdict::Token(t) => check_token(&hub.anchor, 0, &t)?,
        Verdict::Refused(code) => bail!("the first token request was refused: {code}"),
        Verdict::Invalid(why) => bail!("the first token request: {why}"),
    }
    Ok((request.bytes, answer))
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = Options::parse()?;
    let load_start = loadavg();
    say("bare crypto (start)");
    let crypto_start = bare_crypto(options.crypto_ops)?;

    // As OPERATING.md configures Mosquitto: room for 10,000 messages queued for a client.
    let broker = Broker::builder()
        .max_queued_messages(10_000)
        .start()
        .context("starting mosquitto")?;
    let port = broker.port();
    let broker_pid = broker.pid().context("mosquitto is not running")?;
    let max_clients = options.clients.iter().copied().max().unwrap_or(1);
    say(&format!(
        "hub directory with {max_clients} apps and one device"
    ));
    let mut hub = Hub::create(&options.hub_bin, port, max_clients, Limits::Raised)?;
    let filesystem = filesystem_of(&hub.dir);
    let durable_start = durable_limit(&hub.dir, options.durable_ops)?;
    let perf = perf_works();
    if let Err(why) = &perf {
        say(&format!("fsyncs will not be counted: {why}"));
    }
    let hub_pid = hub.spawn(perf.is_ok())?;
    wait_until_serving(&mut hub, port).await?;
    enroll_device(&hub, port).await?;
    let (request_bytes, probe_answer) = probe_token(&hub, port).await?;
    say(&format!(
        "hub serving (pid {hub_pid}), device enrolled; broker on port {port}"
    ));

    let (echo_stop, responder) = start_echo(port, probe_answer.len()).await?;

    let ctx = Ctx {
        port,
        pids: Pids {
            hubs: vec![hub_pid],
            broker: broker_pid,
            store_db: None,
        },
        anchor: hub.anchor,
        apps: hub.apps.clone(),
        next_request_id: AtomicUsize::new(1),
        options: options.clone(),
    };
    let mut rows = Vec::new();
    for &c in &options.clients {
        say(&format!("C = {c}: echo window"));
        let echo = echo_window(&ctx, c, &request_bytes).await?;
        hub.check_alive()?;
        say(&format!("C = {c}: issuance window"));
        let issued = hub_window(&ctx, c).await?;
        hub.check_alive()?;
        say(&format!(
            "C = {c}: {:.0} tokens/s ({} tokens, refused {:?}, lost {}), echo {:.0}/s",
            issued.tokens_per_s(),
            issued.tokens,
            issued.refused,
            issued.lost,
            echo.per_s()
        ));
        rows.push((issued, echo));
    }
    let _ = echo_stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), responder).await;

    let best = rows
        .iter()
        .map(|(h, _)| h.tokens_per_s())
        .fold(0.0, f64::max);
    say(&format!(
        "open loop: {max_clients} clients asking for {:.0} tokens/s (half the best rate)",
        best / 2.0
    ));
    let mut open = open_window(&ctx, max_clients, best / 2.0).await?;
    hub.check_alive()?;
    say(&format!(
        "open loop: {} tokens, p50 {:.1} ms, p99 {:.1} ms",
        open.tokens, open.p50_ms, open.p99_ms
    ));

    // A clean stop (SIGTERM, exit status checked), so a hub that broke during the run shows.
    hub.stop()?;
    if let Some(trace) = &hub.fsyncs {
        for (h, _) in &mut rows {
            h.fsyncs = Some(trace.count(h.usage.started, h.usage.wall)?);
        }
        open.fsyncs = Some(trace.count(open.usage.started, open.usage.wall)?);
    }
    let store_log =
        store_counts(&std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default());
    let durable_end = durable_limit(&hub.dir, options.durable_ops)?;
    let mut replica_runs = Vec::new();
    for &n in &options.replicas {
        say(&format!(
            "{n} replica(s) on one PostgreSQL database ({})",
            options.postgres
        ));
        replica_runs.push(replica_run(&options, n, &request_bytes, probe_answer.len()).await?);
    }
    let flood = if options.flood_seconds > 0.0 {
        Some(
            flood_comparison(
                &options,
                &broker,
                broker_pid,
                Duration::from_secs_f64(options.flood_seconds),
            )
            .await?,
        )
    } else {
        None
    };
    say("bare crypto (end)");
    let crypto_end = bare_crypto(options.crypto_ops)?;
    let load_end = loadavg();
    drop(broker);

    let setup = Setup {
        mosquitto: mosquitto_version(),
        filesystem,
        request_bytes: request_bytes.len(),
        response_bytes: probe_answer.len(),
        durable_start,
        durable_end,
        fsyncs: perf.err(),
        store_log,
    };
    report(
        &options,
        &setup,
        (crypto_start, crypto_end),
        (&load_start, &load_end),
        &rows,
        &open,
    );
    if !replica_runs.is_empty() {
        report_replicas(
            &options,
            &Crypto::mean(crypto_start, crypto_end),
            &rows,
            &replica_runs,
        );
    }
    if let Some(flood) = &flood {
        report_flood(flood);
    }
    Ok(())
}
