//! The local interface for device programs: a Unix socket (mode 0660) with a line protocol,
//! served by `tessera-agent run` and used by the `token`, `verify` and `status` commands.
//!
//! One request per line, one reply line per request, any number per connection:
//!
//! ```text
//! TOKEN                     → OK <device token, hex>        | ERR <reason>
//! VERIFY <scope> <hex>      → OK <subject of the token>     | ERR <reason>
//! STATUS                    → OK <status as one JSON object> | ERR <reason>
//! ```
//!
//! Lines end with `\n` (a `\r` before it is ignored) and are at most [`MAX_LINE`] bytes.
//! Anyone who can connect gets the device token: the socket's mode (0660) and its group
//! decide who that is.
//!
//! Among those, no client can lock the others out ([`Limits`]): a connection that has not
//! sent a complete request is closed after [`REQUEST_TIMEOUT`], an answered one after
//! [`IDLE_TIMEOUT`] idle, one that does not read its reply after [`WRITE_TIMEOUT`], and at
//! [`MAX_CONNECTIONS`] a new connection closes the one that has waited longest for a
//! request.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;

/// Longest request line: a `VERIFY` with a presentation of the largest size a signed
/// message may have (16 KiB, so 32 KiB of hex) and a scope.
pub const MAX_LINE: usize = 40 * 1024;

/// Connections open at the same time. At the limit, a new connection closes the one that
/// has waited longest for a request (see [`Limits`]).
pub const MAX_CONNECTIONS: usize = 32;

/// A new connection must send a complete request line within this, and any request line
/// must be complete this long after its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that has been answered and sends nothing more for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply the client does not read within this closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The current device token.
    Token,
    /// The agent's status.
    Status,
    /// Check an app's presentation for a scope.
    Verify {
        /// The scope token the action needs, for example `door:open`.
        scope: String,
        /// The signed presentation (COSE_Sign1).
        presentation: Vec<u8>,
    },
}

impl Command {
    /// Parses one request line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut words = line.split(' ');
        let verb = words.next().unwrap_or_default();
        let command = match verb {
            "TOKEN" => Command::Token,
            "STATUS" => Command::Status,
            "VERIFY" => {
                let (Some(scope), Some(hex_text)) = (words.next(), words.next()) else {
                    return Err("usage: VERIFY <scope> <presentation hex>".into());
                };
                if scope.is_empty() {
                    return Err("empty scope".into());
                }
                let presentation =
                    hex::decode(hex_text).map_err(|e| format!("presentation is not hex: {e}"))?;
                Command::Verify {
                    scope: scope.to_string(),
                    presentation,
                }
            }
            "" => return Err("empty request".into()),
            other => return Err(format!("unknown request `{}`", printable(other))),
        };
        if words.next().is_some() {
            return Err(format!("too many words after {verb}"));
        }
        Ok(command)
    }

    /// The request line, without its newline.
    pub fn to_line(&self) -> String {
        match self {
            Command::Token => "TOKEN".into(),
            Command::Status => "STATUS".into(),
            Command::Verify {
                scope,
                presentation,
            } => format!("VERIFY {scope} {}", hex::encode(presentation)),
        }
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Success, with the answer.
    Ok(String),
    /// Failure, with a reason for people.
    Err(String),
}

impl Reply {
    /// The reply line, without its newline; newlines inside become spaces.
    pub fn to_line(&self) -> String {
        let (word, text) = match self {
            Reply::Ok(t) => ("OK", t),
            Reply::Err(t) => ("ERR", t),
        };
        let text = text.replace(['\n', '\r'], " ");
        if text.is_empty() {
            word.to_string()
        } else {
            format!("{word} {text}")
        }
    }

    /// Parses a reply line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "OK" => Ok(Reply::Ok(rest.to_string())),
            "ERR" => Ok(Reply::Err(rest.to_string())),
            _ => Err(format!("not a reply: `{}`", printable(line))),
        }
    }
}

fn printable(s: &str) -> String {
    s.chars().take(40).filter(|c| !c.is_control()).collect()
}

/// One request on its way to the agent, with where to send the reply.
#[derive(Debug)]
pub struct Request {
    /// What is asked.
    pub command: Command,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Reply>,
}

fn socket_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Socket {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Binds the socket at `path` with mode 0660, creating its directory if needed. A socket
/// file nobody answers on (left by a crash) is replaced; one that answers means another
/// agent runs, and is an error.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(socket_error(
                path,
                "another tessera-agent is running (its socket answers)",
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| socket_error(path, format!("cannot remove a stale socket: {e}")))?;
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| socket_error(path, format!("cannot create {}: {e}", dir.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| socket_error(path, e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| socket_error(path, format!("cannot chmod 660: {e}")))?;
    Ok(listener)
}

/// How the socket shares itself among clients; [`Limits::default`] is what `run` serves.
///
/// No client can keep others out: a connection must send a complete request line soon after
/// it opens (or after it starts one), one that has been served may then idle longer, a reply
/// it does not read is given up on, and when [`max_connections`](Self::max_connections) are
/// open a new connection closes the one that has waited longest for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its first complete request line, and how
    /// long any request line may take once its first byte arrived.
    pub request_timeout: Duration,
    /// How long a connection that has been answered may wait for its next request.
    pub idle_timeout: Duration,
    /// How long writing one reply may take.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

/// Accepts connections forever with the default [`Limits`], passing each request line to
/// `requests`. Stops when the receiver of `requests` is gone.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    serve_with(listener, requests, Limits::default()).await;
}

/// [`serve`] with other limits. Connections are tasks of this future: dropping it (or
/// aborting its task) closes them all.
pub async fn serve_with(listener: UnixListener, requests: mpsc::Sender<Request>, limits: Limits) {
    let open = Open::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        if requests.is_closed() {
            return;
        }
        // At the limit, make room: close the connection that has waited longest for a
        // request (an idle or slow one), or, if every one is being answered, wait for one
        // to finish or start waiting. Either takes no longer than answering one request.
        loop {
            let changed = open.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if open.len() < limits.max_connections.max(1) {
                break;
            }
            open.evict_oldest_waiting();
            tokio::select! {
                () = &mut changed => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let slot = open.add();
        let requests = requests.clone();
        tasks.spawn(async move {
            if let Err(e) = connection(stream, requests, limits, slot).await {
                tracing::debug!(error = %e, "local socket: connection ended");
            }
        });
    }
}

/// The open connections, and which of them wait for a request.
#[derive(Debug, Default, Clone)]
struct Open {
    table: Arc<Mutex<Table>>,
    /// Signalled when a connection closes or starts waiting for a request.
    changed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// When it started waiting for its next request line; `None` while one is answered.
    waiting_since: Option<Instant>,
    /// Told to close.
    evict: Arc<Notify>,
    evicted: bool,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break half-way.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn add(&self) -> Slot {
        let evict = Arc::new(Notify::new());
        let mut table = self.lock();
        let id = table.next_id;
        table.next_id += 1;
        table.entries.insert(
            id,
            Entry {
                waiting_since: None,
                evict: evict.clone(),
                evicted: false,
            },
        );
        Slot {
            id,
            open: self.clone(),
            evict,
        }
    }

    /// Tells the connection that has waited longest for a request to close, unless one was
    /// told already and has not closed yet.
    fn evict_oldest_waiting(&self) {
        let mut table = self.lock();
        if table.entries.values().any(|e| e.evicted) {
            return;
        }
        let oldest = table
            .entries
            .values_mut()
            .filter(|e| e.waiting_since.is_some())
            .min_by_key(|e| e.waiting_since);
        if let Some(entry) = oldest {
            entry.evicted = true;
            entry.evict.notify_one();
        }
    }
}

/// One connection's place in [`Open`]; leaving it frees the place.
#[derive(Debug)]
struct Slot {
    id: u64,
    open: Open,
    evict: Arc<Notify>,
}

impl Slot {
    fn waiting(&self) {
        if let Some(e) = self.open.lock().entries.get_mut(&self.id) {
            e.waiting_since = Some(Instant::now());
        }
        self.open.changed.notify_waiters();
    }

    fn busy(&self) {
        if let Some(e) = self.open.lock().entries.get_mut(&self.id) {
            e.waiting_since = None;
        }
    }

    async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.lock().entries.remove(&self.id);
        self.open.changed.notify_waiters();
    }
}

/// How reading one request line ended.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (without its newline) is in the buffer.
    Line,
    /// The client closed the connection between requests.
    Closed,
    /// The client closed the connection in the middle of a line.
    Unterminated,
    /// More than [`MAX_LINE`] bytes without a newline.
    TooLong,
    /// Nothing complete by the deadline.
    TimedOut,
}

/// Reads one line into `line` by `deadline`, or by `request_timeout` after its first byte
/// if that is sooner.
async fn read_line(
    reader: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut Vec<u8>,
    mut deadline: Instant,
    request_timeout: Duration,
) -> std::io::Result<LineRead> {
    line.clear();
    loop {
        let Ok(filled) = tokio::time::timeout_at(deadline, reader.fill_buf()).await else {
            return Ok(LineRead::TimedOut);
        };
        let buf = filled?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Closed
            } else {
                LineRead::Unterminated
            });
        }
        if line.is_empty() {
            deadline = deadline.min(Instant::now() + request_timeout);
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let wanted = newline.map_or(buf.len(), |i| i + 1);
        let room = (MAX_LINE + 1).saturating_sub(line.len());
        let take = wanted.min(room);
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if newline.is_some() && take == wanted {
            line.pop();
            return Ok(LineRead::Line);
        }
        if line.len() > MAX_LINE {
            return Ok(LineRead::TooLong);
        }
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
    timeout: Duration,
) -> std::io::Result<()> {
    let bytes = format!("{}\n", reply.to_line());
    tokio::time::timeout(timeout, write.write_all(bytes.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "reply not read in time"))?
}

async fn connection(
    stream: UnixStream,
    requests: mpsc::Sender<Request>,
    limits: Limits,
    slot: Slot,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::with_capacity(256);
    let mut answered = false;
    loop {
        slot.waiting();
        let wait = if answered {
            limits.idle_timeout
        } else {
            limits.request_timeout
        };
        let deadline = Instant::now() + wait;
        let read = tokio::select! {
            read = read_line(&mut reader, &mut line, deadline, limits.request_timeout) => read?,
            () = slot.evicted() => {
                tracing::debug!("local socket: closed a waiting connection to serve a new one");
                return Ok(());
            }
        };
        slot.busy();
        let reason = match read {
            LineRead::Line => None,
            LineRead::Closed | LineRead::TimedOut => return Ok(()),
            LineRead::Unterminated => Some("request line not terminated"),
            LineRead::TooLong => Some("request line too long"),
        };
        if let Some(reason) = reason {
            return write_line(&mut write, &Reply::Err(reason.into()), limits.write_timeout).await;
        }
        let reply = match std::str::from_utf8(&line)
            .map_err(|_| "request is not UTF-8".to_string())
            .and_then(Command::parse)
        {
            Err(reason) => Reply::Err(reason),
            Ok(command) => {
                let (tx, rx) = oneshot::channel();
                if requests.send(Request { command, reply: tx }).await.is_err() {
                    Reply::Err("the agent is shutting down".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| Reply::Err("the agent is shutting down".into()))
                }
            }
        };
        write_line(&mut write, &reply, limits.write_timeout).await?;
        answered = true;
    }
}

/// What asking the running agent gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// The agent answered.
    Answer(Reply),
    /// No agent listens on the socket (no socket file, or nobody accepts on it).
    NotRunning,
}

/// Sends one request to the agent listening on `path` and waits up to `timeout` for the
/// reply. A socket that exists but cannot be opened for lack of permission is an error,
/// not "not running".
pub fn ask(path: &Path, command: &Command, timeout: Duration) -> Result<Asked, Error> {
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Asked::NotRunning);
        }
        Err(e) => return Err(socket_error(path, format!("cannot connect: {e}"))),
    };
    let io = |e: std::io::Error| socket_error(path, e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut writer = &stream;
    writer
        .write_all(format!("{}\n", command.to_line()).as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    std::io::Read::take(
        BufReader::new(&stream),
        u64::try_from(MAX_LINE).unwrap_or(u64::MAX),
    )
    .read_line(&mut line)
    .map_err(io)?;
    if line.is_empty() {
        return Err(socket_error(
            path,
            "the agent closed the connection without a reply",
        ));
    }
    Reply::parse(&line)
        .map(Asked::Answer)
        .map_err(|e| socket_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_say_why() {
        for c in [
            Command::Token,
            Command::Status,
            Command::Verify {
                scope: "door:open".into(),
                presentation: vec![0xd2, 0x84, 0x00],
            },
        ] {
            assert_eq!(Command::parse(&c.to_line()), Ok(c.clone()));
            assert_eq!(Command::parse(&format!("{}\r", c.to_line())), Ok(c));
        }
        assert!(Command::parse("VERIFY door:open").is_err());
        assert!(
            Command::parse("VERIFY door:open zz")
                .expect_err("hex")
                .contains("hex")
        );
        assert!(Command::parse("TOKEN extra").is_err());
        assert!(
            Command::parse("token")
                .expect_err("case")
                .contains("unknown request")
        );
        assert!(Command::parse("").is_err());
    }

    #[test]
    fn replies_are_one_line() {
        let r = Reply::Err("two\nlines".into());
        assert_eq!(r.to_line(), "ERR two lines");
        assert_eq!(Reply::parse("OK abc\n"), Ok(Reply::Ok("abc".into())));
        assert_eq!(Reply::parse("ERR"), Ok(Reply::Err(String::new())));
        assert!(Reply::parse("MAYBE").is_err());
    }

    /// Serves `listener` with `limits` and answers every request `OK <n>`, counting.
    fn serve_counting(listener: UnixListener, limits: Limits) {
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        tokio::spawn(serve_with(listener, tx, limits));
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Some(r) = rx.recv().await {
                n += 1;
                let _ = r.reply.send(Reply::Ok(n.to_string()));
            }
        });
    }

    /// Opens `n` connections that send nothing, once the server holds each of them.
    fn idle_connections(path: &Path, n: usize) -> Vec<std::os::unix::net::UnixStream> {
        (0..n)
            .map(|_| std::os::unix::net::UnixStream::connect(path).expect("connect"))
            .collect()
    }

    /// Whether the server closed `stream` (EOF); waits up to `bound` for it.
    fn closed_by_server(stream: &std::os::unix::net::UnixStream, bound: Duration) -> bool {
        stream.set_read_timeout(Some(bound)).expect("timeout");
        let mut byte = [0u8; 1];
        matches!(std::io::Read::read(&mut &*stream, &mut byte), Ok(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_house_of_idle_connections_does_not_keep_a_new_client_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        // Idle and request timeouts far beyond the test: only eviction can serve the client.
        let hour = Duration::from_secs(3600);
        let limits = Limits {
            max_connections: MAX_CONNECTIONS,
            request_timeout: hour,
            idle_timeout: hour,
            write_timeout: hour,
        };
        serve_counting(bind(&path).expect("bind"), limits);
        let p = path.clone();
        let (idle, answer, first_closed, others_open) = tokio::task::spawn_blocking(move || {
            // A local group member holds every connection. The first is answered before
            // the others open, so it is the one that has waited longest for a request; a
            // half-sent line is among the rest.
            let first = std::os::unix::net::UnixStream::connect(&p).expect("connect");
            (&first).write_all(b"TOKEN\n").expect("write");
            let mut reply = String::new();
            BufReader::new(&first).read_line(&mut reply).expect("read");
            assert_eq!(reply, "OK 1\n");
            let mut idle = vec![first];
            idle.extend(idle_connections(&p, MAX_CONNECTIONS - 1));
            idle[1].write_all(b"STAT").expect("partial line");
            // The client's own bound is a guard against hanging, not a measurement: the
            // idle connections would hold their places for an hour.
            let answer = ask(&p, &Command::Status, Duration::from_secs(60));
            // The connection that had waited longest (the first) made room; the rest
            // stay open.
            let first_closed = closed_by_server(&idle[0], Duration::from_secs(60));
            let others_open = !closed_by_server(&idle[2], Duration::from_millis(50));
            (idle, answer, first_closed, others_open)
        })
        .await
        .expect("join");
        assert_eq!(
            answer.expect("asked"),
            Asked::Answer(Reply::Ok("2".into())),
            "the new client is answered while {} connections idle",
            idle.len()
        );
        assert!(first_closed, "the longest-waiting connection was closed");
        assert!(others_open, "only one connection was closed to make room");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_without_a_complete_request_is_closed_after_the_request_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let limits = Limits {
            max_connections: 4,
            request_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(3600),
        };
        serve_counting(bind(&path).expect("bind"), limits);
        let p = path.clone();
        let (silent, partial, answered_still_open) = tokio::task::spawn_blocking(move || {
            let bound = Duration::from_secs(60);
            let silent = std::os::unix::net::UnixStream::connect(&p).expect("connect");
            let mut partial = std::os::unix::net::UnixStream::connect(&p).expect("connect");
            partial.write_all(b"TOK").expect("partial");
            let answered = std::os::unix::net::UnixStream::connect(&p).expect("connect");
            (&answered).write_all(b"TOKEN\n").expect("write");
            let mut reply = String::new();
            BufReader::new(&answered)
                .read_line(&mut reply)
                .expect("read");
            (
                closed_by_server(&silent, bound),
                closed_by_server(&partial, bound),
                // Answered once, it may idle for the (hour-long) idle timeout.
                !closed_by_server(&answered, Duration::from_millis(600)),
            )
        })
        .await
        .expect("join");
        assert!(silent, "a connection that never sends is closed");
        assert!(
            partial,
            "a connection that never finishes its line is closed"
        );
        assert!(
            answered_still_open,
            "an answered connection may idle longer"
        );
    }

    #[tokio::test]
    async fn the_socket_serves_requests_and_refuses_long_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("agent.sock");
        let listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        assert!(bind(&path).is_err(), "a second agent is refused");
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let _ = r.reply.send(match r.command {
                    Command::Token => Reply::Ok("abcd".into()),
                    _ => Reply::Err("nope".into()),
                });
            }
        });
        let p = path.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let token = ask(&p, &Command::Token, Duration::from_secs(5));
            let status = ask(&p, &Command::Status, Duration::from_secs(5));
            let mut s = std::os::unix::net::UnixStream::connect(&p).expect("connect");
            s.write_all(&vec![b'A'; MAX_LINE + 10]).expect("write");
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).expect("read");
            (token, status, line)
        })
        .await
        .expect("join");
        assert_eq!(
            answers.0.expect("asked"),
            Asked::Answer(Reply::Ok("abcd".into()))
        );
        assert_eq!(
            answers.1.expect("asked"),
            Asked::Answer(Reply::Err("nope".into()))
        );
        assert_eq!(answers.2, "ERR request line too long\n");
        let gone = dir.path().join("nothing.sock");
        assert_eq!(
            ask(&gone, &Command::Token, Duration::from_secs(1)).expect("ok"),
            Asked::NotRunning
        );
    }
}
