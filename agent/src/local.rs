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

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::Error;

/// Longest request line: a `VERIFY` with a presentation of the largest size a signed
/// message may have (16 KiB, so 32 KiB of hex) and a scope.
pub const MAX_LINE: usize = 40 * 1024;

/// Connections served at the same time; more wait.
pub const MAX_CONNECTIONS: usize = 32;

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Accepts connections forever, passing each request line to `requests`. Stops when the
/// receiver of `requests` is gone.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "local socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if requests.is_closed() {
            return;
        }
        let requests = requests.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, requests).await {
                tracing::debug!(error = %e, "local socket: connection ended");
            }
        });
    }
}

async fn connection(stream: UnixStream, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let read = tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader).take(limit).read_until(b'\n', &mut line),
        )
        .await;
        let n = match read {
            Ok(result) => result?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let reason = if line.len() > MAX_LINE {
                "request line too long"
            } else {
                "request line not terminated"
            };
            write
                .write_all(format!("{}\n", Reply::Err(reason.into()).to_line()).as_bytes())
                .await?;
            return Ok(());
        }
        line.pop();
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
        write
            .write_all(format!("{}\n", reply.to_line()).as_bytes())
            .await?;
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
