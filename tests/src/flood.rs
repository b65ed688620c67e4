//! Floods for the hub's overload tests (`tests/hub_flood.rs`): publishers that hand the
//! broker many messages as fast as it takes them, requests signed fast enough to flood
//! with (aws-lc-rs, as the hub signs), and what to measure of a hub process and its
//! database (RSS, rows, audit rows).
//!
//! Nothing here measures time: a flood is bounded by a count or a duration, and the tests
//! assert what the hub does under it, not how fast.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tessera_hub::crypto::AwsLcSigner;
use tessera_shared::crypto::Signer;
use tessera_shared::message::{NONCE_LEN, Request, RequestBody};
use tessera_shared::topic;

use crate::broker::Broker;
use crate::hub::{random_bytes, unix_now};
use crate::probe::{MqttProbe, QoS};

/// A client that publishes on its own request topic without waiting for answers (it does
/// not subscribe to them) or for PUBACKs, as an attacker with one client's broker
/// credentials can.
#[derive(Debug)]
pub struct Flooder {
    id: String,
    topic: String,
    probe: MqttProbe,
}

impl Flooder {
    /// Connects as `id` (its MQTT client id, which the broker ACL ties to its topics).
    pub async fn connect(broker: &Broker, id: &str) -> Result<Self> {
        let probe = broker.probe(id).await?;
        Ok(Self {
            id: id.to_owned(),
            topic: topic::request(id)
                .map_err(|e| anyhow::anyhow!("topic for {id:?}: {e}"))?
                .to_string(),
            probe,
        })
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Hands each payload to the client at QoS 1, in order, waiting only for room in its
    /// request queue (the broker's flow control), not for acknowledgements. Returns how
    /// many were handed over.
    pub async fn publish_all(&self, payloads: impl IntoIterator<Item = Vec<u8>>) -> Result<u64> {
        let mut sent = 0;
        for payload in payloads {
            self.probe
                .publish(&self.topic, QoS::AtLeastOnce, false, payload)
                .await
                .with_context(|| format!("flooding as {} after {sent} messages", self.id))?;
            sent += 1;
        }
        Ok(sent)
    }

    /// The probe underneath (to subscribe to the answers, say).
    pub fn probe(&mut self) -> &mut MqttProbe {
        &mut self.probe
    }

    /// Whether the connection is up now (it reconnects by itself after a broker restart).
    pub fn is_connected(&self) -> bool {
        self.probe.is_connected()
    }

    /// Waits until the connection is up again.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        self.probe.wait_connected(timeout).await
    }
}

/// A bare MQTT 3.1.1 connection that writes many QoS 1 PUBLISH packets in one go, as a
/// client that ignores flow control can: "at once" means as fast as the broker reads its
/// socket, not one message per round trip. It never subscribes; the broker's PUBACKs are
/// read and discarded. Plain TCP only; cheap enough to flood from a debug build.
#[derive(Debug)]
pub struct RawPublisher {
    addr: std::net::SocketAddr,
    id: String,
    /// Logs in with `id` as user name (a broker that binds client ids to user names).
    login: bool,
    topic: String,
    writer: tokio::net::tcp::OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
    next_packet_id: u16,
}

impl RawPublisher {
    /// Connects to `broker` as `id` (anonymous, or with `id` as user name when the broker
    /// binds client ids to user names; clean session, no keep-alive) and waits for the
    /// broker to accept.
    pub async fn connect(broker: &Broker, id: &str) -> Result<Self> {
        ensure_plain(broker)?;
        let login = broker.client_ids_are_user_names();
        let (writer, reader) = raw_connect(broker.addr(), id, login).await?;
        Ok(Self {
            addr: broker.addr(),
            id: id.to_owned(),
            login,
            topic: topic::request(id)
                .map_err(|e| anyhow::anyhow!("topic for {id:?}: {e}"))?
                .to_string(),
            writer,
            reader,
            next_packet_id: 1,
        })
    }

    /// Connects again (after a broker restart).
    pub async fn reconnect(&mut self) -> Result<()> {
        let (writer, reader) = raw_connect(self.addr, &self.id, self.login).await?;
        self.reader.abort();
        self.writer = writer;
        self.reader = reader;
        Ok(())
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Writes one QoS 1 PUBLISH per payload on the client's request topic, all in one
    /// write. Returns how many.
    pub async fn burst(&mut self, payloads: impl IntoIterator<Item = Vec<u8>>) -> Result<u64> {
        use tokio::io::AsyncWriteExt as _;
        let mut out = Vec::new();
        let mut n = 0;
        for payload in payloads {
            let mut variable = Vec::with_capacity(self.topic.len() + 4 + payload.len());
            put_str(&mut variable, &self.topic);
            variable.extend_from_slice(&self.next_packet_id.to_be_bytes());
            variable.extend_from_slice(&payload);
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            out.push(0x32);
            put_remaining_length(&mut out, variable.len());
            out.extend_from_slice(&variable);
            n += 1;
        }
        self.writer
            .write_all(&out)
            .await
            .with_context(|| format!("writing {n} messages as {}", self.id))?;
        Ok(n)
    }
}

impl Drop for RawPublisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// CONNECT (with `id` as user name if `login`), CONNACK, and a task that reads and
/// discards whatever the broker sends.
async fn raw_connect(
    addr: std::net::SocketAddr,
    id: &str,
    login: bool,
) -> Result<(tokio::net::tcp::OwnedWriteHalf, tokio::task::JoinHandle<()>)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let mut variable = Vec::new();
    put_str(&mut variable, "MQTT");
    // Level 4 (3.1.1), clean session (with user name and password flags), keep-alive 0
    // (off).
    let flags = if login { 0x02 | 0x80 | 0x40 } else { 0x02 };
    variable.extend_from_slice(&[4, flags, 0, 0]);
    put_str(&mut variable, id);
    if login {
        put_str(&mut variable, id);
        put_str(&mut variable, "unchecked");
    }
    let mut connect = vec![0x10];
    put_remaining_length(&mut connect, variable.len());
    connect.extend_from_slice(&variable);
    writer.write_all(&connect).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut connack))
        .await
        .context("no CONNACK within 5 s")??;
    if connack != [0x20, 2, 0, 0] {
        bail!("the broker refused {id}: CONNACK {connack:02x?}");
    }
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    Ok((writer, reader))
}

fn ensure_plain(broker: &Broker) -> Result<()> {
    if broker.is_tls() {
        bail!("RawPublisher speaks plain MQTT only");
    }
    Ok(())
}

/// An MQTT UTF-8 string: two bytes of length, then the bytes.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// An MQTT remaining length: seven bits a byte, low first.
fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let byte = u8::try_from(len % 128).unwrap_or(0);
        len /= 128;
        if len == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Malformed messages a second in the sustained flood of issue 8 (`tests/hub_flood.rs`,
/// `a_sustained_flood_…`): from [`SUSTAINED_NOISY_CLIENTS`] clients, evenly.
pub const SUSTAINED_MALFORMED_PER_SECOND: u64 = 10_000;
/// Clients sending the malformed messages of the sustained flood.
pub const SUSTAINED_NOISY_CLIENTS: u64 = 2;
/// Validly signed requests a second in the sustained flood, from
/// [`SUSTAINED_SIGNING_CLIENTS`] registered apps, evenly.
pub const SUSTAINED_SIGNED_PER_SECOND: u64 = 1_000;
/// Registered apps sending the signed requests of the sustained flood.
pub const SUSTAINED_SIGNING_CLIENTS: u64 = 4;

/// Publishes `per_second` messages a second from `flooder`, in ticks of 10 ms, each from
/// `make` (called with a running number), until `stop` is set or `limit` has passed,
/// whichever comes first; connects again when the broker goes away (that tick's batch is
/// lost). Returns how many messages were handed to the broker.
///
/// The sustained flood of `tests/hub_flood.rs` and of `scripts/bench-issuance`'s flood
/// comparison; `limit` bounds it even when its caller fails before setting `stop`.
pub async fn sustain(
    mut flooder: RawPublisher,
    per_second: u64,
    stop: Arc<AtomicBool>,
    limit: Duration,
    mut make: impl FnMut(u64) -> Result<Vec<u8>> + Send,
) -> Result<u64> {
    let until = Instant::now() + limit;
    let per_tick = per_second / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, mut made) = (0, 0);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        tick.tick().await;
        let batch = (0..per_tick)
            .map(|i| make(made + i))
            .collect::<Result<Vec<_>>>()?;
        made += per_tick;
        match flooder.burst(batch).await {
            Ok(n) => sent += n,
            Err(_) => {
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < until
                    && flooder.reconnect().await.is_err()
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    Ok(sent)
}

/// A P-256 key signing with aws-lc-rs: about 15× faster than the core's `p256` in a debug
/// build, so a test can sign a flood of fresh requests.
pub fn fast_signer() -> Result<AwsLcSigner> {
    AwsLcSigner::generate().map_err(|e| anyhow::anyhow!("OS random number generator: {e}"))
}

/// A request from `client`, signed by `signer`, issued now with a fresh nonce.
pub fn signed_request(
    signer: &dyn Signer,
    client: &str,
    request_id: u64,
    body: RequestBody<'_>,
) -> Result<Vec<u8>> {
    signed_request_at(
        signer,
        client,
        request_id,
        unix_now(),
        random_bytes::<NONCE_LEN>(),
        body,
    )
}

/// A request with every field given, signed by `signer` (a request other than a device
/// list fits in 4 KiB).
pub fn signed_request_at(
    signer: &dyn Signer,
    client: &str,
    request_id: u64,
    issued_at: u64,
    nonce: [u8; NONCE_LEN],
    body: RequestBody<'_>,
) -> Result<Vec<u8>> {
    let request = Request {
        client,
        request_id,
        issued_at,
        nonce,
        body,
    };
    let mut out = vec![0u8; 4096];
    let n = request
        .sign(signer, &mut out)
        .map_err(|e| anyhow::anyhow!("signing a request: {e}"))?;
    out.truncate(n);
    Ok(out)
}

/// `n` payloads that are no Tessera request: random bytes of 16 to 200 bytes.
pub fn garbage(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let bytes = random_bytes::<200>();
            bytes[..16 + i % 185].to_vec()
        })
        .collect()
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .with_context(|| format!("{path} has no VmRSS line"))?;
    let kib = line
        .trim()
        .strip_suffix("kB")
        .map(str::trim)
        .and_then(|n| n.parse().ok());
    match kib {
        Some(kib) => Ok(kib),
        None => bail!("{path}: cannot read VmRSS from {line:?}"),
    }
}

/// What the hub's database holds: rows in all tables, and the audit log of one actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DbCounts {
    /// Rows over every table of the database.
    pub rows: u64,
    /// Audit rows whose actor is the one asked about.
    pub audit_rows: u64,
    /// The decisions those rows stand for (the sum of their `count`).
    pub audit_decisions: u64,
    /// Those of the rows that record a refusal (the hub aggregates identical ones).
    pub refusal_rows: u64,
    /// How many different (action, outcome) pairs of refusals those rows have.
    pub refusal_kinds: u64,
}

/// Counts rows of the hub's SQLite database at `path` (read-only; the hub may be running:
/// the database is in WAL mode), and the audit rows of `actor`.
pub fn db_counts(path: &Path, actor: &str) -> Result<DbCounts> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut rows = 0u64;
    for table in tables {
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |r| {
            r.get(0)
        })?;
        rows += u64::try_from(n).unwrap_or(0);
    }
    let (audit_rows, audit_decisions, refusal_rows, refusal_kinds): (i64, i64, i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(count), 0),
                    COUNT(*) FILTER (WHERE outcome <> 'ok'),
                    COUNT(DISTINCT CASE WHEN outcome <> 'ok' THEN action || '/' || outcome END)
             FROM audit_log WHERE actor = ?1",
            [actor],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(DbCounts {
        rows,
        audit_rows: count(audit_rows),
        audit_decisions: count(audit_decisions),
        refusal_rows: count(refusal_rows),
        refusal_kinds: count(refusal_kinds),
    })
}

/// How many decisions with `outcome` the audit log of the database at `path` holds for
/// `actor` (the sum of the rows' `count`).
pub fn audited(path: &Path, actor: &str, outcome: &str) -> Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let n: i64 = conn.query_row(
        "SELECT COALESCE(SUM(count), 0) FROM audit_log WHERE actor = ?1 AND outcome = ?2",
        [actor, outcome],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}
