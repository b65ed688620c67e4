//! Bounded waits on observable conditions, for tests that run in real time.
//!
//! A fixed sleep hopes that something has happened by the time it ends: too short on a
//! loaded machine, needlessly long everywhere else. These poll the thing itself every
//! [`POLL_EVERY`], return as soon as it holds, and fail naming what was awaited once the
//! timeout has passed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often the waits poll their condition.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Calls `check` every [`POLL_EVERY`] until it returns `Ok(Some(value))`, and returns that
/// value; fails once `timeout` has passed without it (naming `what`), or as soon as `check`
/// fails.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    wait_until_every(what, timeout, POLL_EVERY, check).await
}

/// [`wait_until`], polling every `every`: for a check that costs the system under test
/// something (a request under a rate limit, say).
pub async fn wait_until_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_until`] for a blocking `check` (processes, files, sockets), on this thread.
pub fn wait_until_blocking<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(POLL_EVERY);
    }
}
