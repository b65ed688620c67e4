//! What `tessera-agent status` and the socket's `STATUS` report: one snapshot of the agent,
//! as JSON for programs and as text for people.
//!
//! Token and revocation times are the hub's Unix seconds; `*_ms` fields are the device's
//! local clock in milliseconds.

use serde::{Deserialize, Serialize};
use tessera_shared::agent::{Agent, LastError, State};
use tessera_shared::cose::Sign1;
use tessera_shared::crypto::{KeyLookup, Signer};
use tessera_shared::keyset::KeySet;
use tessera_shared::token;

/// A snapshot of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether it came from the running agent (`true`) or from reading the store.
    pub running: bool,
    /// The device id.
    pub device_id: String,
    /// What the agent waits for, see [`state_name`]; or `stopped`, `not_enrolled`.
    pub state: String,
    /// Whether the agent is connected to the broker (running agent only).
    pub connected: Option<bool>,
    /// When the snapshot was taken, local ms.
    pub now_ms: u64,
    /// The hub's time of the enrollment, Unix seconds.
    pub enrolled_at: Option<u64>,
    /// The held token's `iat`, Unix seconds.
    pub token_issued_at: Option<u64>,
    /// The held token's `exp`, Unix seconds.
    pub token_expires_at: Option<u64>,
    /// Whether the held token is valid now (by the agent's idea of the hub's time).
    pub token_valid: bool,
    /// When the agent refreshes next (in `holding`), local ms.
    pub next_refresh_at_ms: Option<u64>,
    /// When the agent acts next (refresh, retry, timeout, expiry), local ms.
    pub next_wake_at_ms: Option<u64>,
    /// When the refresh grant expires, Unix seconds.
    pub grant_expires_at: Option<u64>,
    /// The device's revocation stream (`devices/{pp}`), whose changes it follows.
    pub revocation_stream: String,
    /// The last change of its stream the list holds (running agent only).
    pub revocation_seq: Option<u64>,
    /// The latest change of its stream it has heard of (running agent only).
    pub revocation_latest: Option<u64>,
    /// Revocation entries addressed to this device that it holds (running agent only).
    pub revocation_entries: Option<usize>,
    /// The hub time the revocation list is known complete as of (running agent only).
    pub revocation_fresh_as_of: Option<u64>,
    /// The maximum age of that knowledge: `revocation_max_age_s` if configured, else what
    /// the hub announces (running agent only).
    pub revocation_max_age_s: Option<u64>,
    /// Whether the knowledge is complete and within that age (running agent only).
    pub revocation_fresh: Option<bool>,
    /// The version of the trusted hub key set (0: only the trust anchor).
    pub key_set_version: u64,
    /// Whether the local clock is trusted (`trust_local_clock`).
    pub trust_local_clock: bool,
    /// The hub's clock minus the local one, ms, as learned from responses.
    pub clock_offset_ms: i64,
    /// The latest thing that went wrong.
    pub last_error: Option<String>,
    /// Device tokens received since the agent started.
    pub renewals: u64,
    /// Requests for a device token (a refresh, or one with the device key) the hub refused
    /// or did not answer in time, since the agent started.
    #[serde(default)]
    pub refresh_failures: u64,
    /// The store's record counter.
    pub store_counter: u64,
    /// Since when (local ms) the token and grant in force are not saved because the store
    /// cannot be written; `None` when everything held is saved (running agent only).
    #[serde(default)]
    pub store_unsaved_since_ms: Option<u64>,
    /// Presentations are refused before this local time, ms: one presentation window after
    /// the agent started (running agent only).
    pub presentations_accepted_from_ms: Option<u64>,
}

/// The snake-case name of a state, as `status` shows it.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::AwaitingEnrollment => "awaiting_enrollment",
        State::AwaitingToken => "awaiting_token",
        State::Holding => "holding",
        State::Refreshing => "refreshing",
        State::Revoked => "revoked",
    }
}

/// A person's description of [`LastError`]; `hub_reason` is the hub's reason text for the
/// latest refusal, if one was seen.
pub fn describe_last_error(error: LastError, hub_reason: Option<&str>) -> String {
    match error {
        LastError::Refused(code) => match hub_reason {
            Some(reason) => format!("hub refused: {code}: {reason}"),
            None => format!("hub refused: {code}"),
        },
        LastError::TimedOut(op) => format!("no answer from the hub to {}", op.name()),
        LastError::Rejected(e) => format!("rejected: {e}"),
    }
}

/// The `(iat, exp)` of a token the agent holds, if it verifies with `keys` (expiry is not
/// checked: this only reads the times back).
pub fn token_times(token: &[u8], keys: &KeySet) -> Option<(u64, u64)> {
    let verifier = keys.verifier(Sign1::decode(token).ok()?.kid())?;
    let claims = token::dangerous_verify_signature_only(token, verifier).ok()?;
    Some((claims.iat, claims.exp))
}

/// What the shell adds to the agent's own accessors.
#[derive(Debug, Clone, Default)]
pub struct ShellFacts {
    /// Running (true) or read from the store (false).
    pub running: bool,
    /// Device tokens received since start.
    pub renewals: u64,
    /// Device-token requests refused or unanswered since start.
    pub refresh_failures: u64,
    /// The store's counter.
    pub store_counter: u64,
    /// The hub's reason for its latest refusal.
    pub hub_reason: Option<String>,
    /// A failure of the shell itself (a store write), newer than the agent's last error.
    pub shell_error: Option<String>,
    /// Since when (local ms) the token and grant in force are not saved: the store could
    /// not be written (the write is retried).
    pub unsaved_since_ms: Option<u64>,
    /// When presentations start being accepted, local ms.
    pub presentations_from_ms: Option<u64>,
}

impl Status {
    /// A snapshot of `agent` at local time `now_ms`.
    pub fn of<S: Signer, const R: usize>(
        agent: &Agent<S, R>,
        now_ms: u64,
        facts: &ShellFacts,
    ) -> Self {
        let offset = agent.clock_offset_ms();
        let hub_now_ms = now_ms.saturating_add_signed(offset);
        let config = agent.config();
        let token_times = agent.token().and_then(|t| token_times(t, agent.key_set()));
        let token_valid = agent
            .token_expires_at()
            .is_some_and(|exp| exp.saturating_mul(1000) > hub_now_ms);
        let state = if facts.running {
            state_name(agent.state())
        } else {
            "stopped"
        };
        let revocations = agent.revocations();
        Status {
            running: facts.running,
            device_id: config.device_id().to_string(),
            state: state.to_string(),
            connected: facts.running.then(|| agent.is_connected()),
            now_ms,
            enrolled_at: agent.enrolled_at(),
            token_issued_at: token_times.map(|t| t.0),
            token_expires_at: agent.token_expires_at(),
            token_valid,
            next_refresh_at_ms: (facts.running && agent.state() == State::Holding)
                .then(|| agent.next_wake())
                .flatten(),
            next_wake_at_ms: agent.next_wake().filter(|_| facts.running),
            grant_expires_at: agent.grant_expires_at(),
            revocation_stream: revocations.stream().name().to_string(),
            revocation_seq: facts.running.then(|| revocations.seq()),
            revocation_latest: facts.running.then(|| revocations.latest()),
            revocation_entries: facts.running.then(|| revocations.len()),
            revocation_fresh_as_of: agent.revocation_fresh_as_of().filter(|_| facts.running),
            revocation_max_age_s: facts.running.then(|| agent.revocation_max_age()),
            revocation_fresh: facts
                .running
                .then(|| revocations.is_fresh(hub_now_ms / 1000, agent.revocation_max_age())),
            key_set_version: agent.key_set().version(),
            trust_local_clock: config.trust_local_clock,
            clock_offset_ms: offset,
            last_error: facts.shell_error.clone().or_else(|| {
                agent
                    .last_error()
                    .map(|e| describe_last_error(e, facts.hub_reason.as_deref()))
            }),
            renewals: facts.renewals,
            refresh_failures: facts.refresh_failures,
            store_counter: facts.store_counter,
            store_unsaved_since_ms: facts.unsaved_since_ms.filter(|_| facts.running),
            presentations_accepted_from_ms: facts.presentations_from_ms.filter(|_| facts.running),
        }
    }

    /// The status of a device that is not enrolled, or revoked (`state`), read from disk.
    pub fn without_store(
        device_id: &str,
        state: &str,
        note: Option<String>,
        now_ms: u64,
        trust_local_clock: bool,
    ) -> Self {
        Status {
            running: false,
            device_id: device_id.to_string(),
            state: state.to_string(),
            connected: None,
            now_ms,
            enrolled_at: None,
            token_issued_at: None,
            token_expires_at: None,
            token_valid: false,
            next_refresh_at_ms: None,
            next_wake_at_ms: None,
            grant_expires_at: None,
            revocation_stream: tessera_shared::revocation::Stream::of_device(device_id)
                .name()
                .to_string(),
            revocation_seq: None,
            revocation_latest: None,
            revocation_entries: None,
            revocation_fresh_as_of: None,
            revocation_max_age_s: None,
            revocation_fresh: None,
            key_set_version: 0,
            trust_local_clock,
            clock_offset_ms: 0,
            last_error: note,
            renewals: 0,
            refresh_failures: 0,
            store_counter: 0,
            store_unsaved_since_ms: None,
            presentations_accepted_from_ms: None,
        }
    }

    /// The text `tessera-agent status` prints.
    pub fn render(&self) -> String {
        let hub_now_ms = self.now_ms.saturating_add_signed(self.clock_offset_ms);
        let from_hub_s = |t: u64| relative(t.saturating_mul(1000), hub_now_ms);
        let from_local_ms = |t: u64| relative(t, self.now_ms);
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
        line("device", self.device_id.clone());
        line(
            "state",
            format!(
                "{}{}",
                self.state,
                if self.running {
                    ""
                } else {
                    " (agent not running; read from the store)"
                }
            ),
        );
        if let Some(c) = self.connected {
            line(
                "broker",
                if c { "connected" } else { "disconnected" }.into(),
            );
        }
        if let Some(t) = self.enrolled_at {
            line("enrolled", format!("at {t}"));
        }
        match (self.token_issued_at, self.token_expires_at) {
            (_, Some(exp)) => line(
                "token",
                format!(
                    "{}, expires at {exp} ({})",
                    if self.token_valid { "valid" } else { "EXPIRED" },
                    from_hub_s(exp)
                ),
            ),
            _ => line("token", "none".into()),
        }
        if let (Some(iat), Some(exp)) = (self.token_issued_at, self.token_expires_at) {
            line(
                "token lifetime",
                format!("{} s (issued at {iat})", exp.saturating_sub(iat)),
            );
        }
        if let Some(t) = self.next_refresh_at_ms {
            line("next refresh", from_local_ms(t));
        } else if let Some(t) = self.next_wake_at_ms {
            line("next attempt", from_local_ms(t));
        }
        if let Some(t) = self.grant_expires_at {
            line(
                "refresh grant",
                format!("expires at {t} ({})", from_hub_s(t)),
            );
        }
        if let Some(seq) = self.revocation_seq {
            let freshness = match (self.revocation_fresh_as_of, self.revocation_fresh) {
                (Some(t), Some(true)) => format!("fresh as of {t} ({})", from_hub_s(t)),
                (Some(t), _) => format!("STALE: last confirmed at {t} ({})", from_hub_s(t)),
                (None, _) => "not yet confirmed by the hub".into(),
            };
            let behind = match self.revocation_latest {
                Some(latest) if latest > seq => format!(", catching up to {latest}"),
                _ => String::new(),
            };
            let max_age = self
                .revocation_max_age_s
                .map_or(String::new(), |m| format!(", max age {m} s"));
            line(
                "revocations",
                format!(
                    "stream {} at change {seq}{behind}, {} entries for this device, \
                     {freshness}{max_age}",
                    self.revocation_stream,
                    self.revocation_entries.unwrap_or(0)
                ),
            );
        }
        line("key set", format!("version {}", self.key_set_version));
        line(
            "clock",
            if self.trust_local_clock {
                "local clock trusted".into()
            } else {
                format!(
                    "hub time, offset {} ms from the local clock",
                    self.clock_offset_ms
                )
            },
        );
        if self.running {
            line("renewals", format!("{} since start", self.renewals));
        }
        if let Some(t) = self.store_unsaved_since_ms {
            line(
                "store",
                format!(
                    "NOT SAVED for {}: the token and grant in force are held in memory only \
                     (retrying the write)",
                    duration(self.now_ms.saturating_sub(t))
                ),
            );
        }
        if let Some(t) = self
            .presentations_accepted_from_ms
            .filter(|t| *t > self.now_ms)
        {
            line(
                "presentations",
                format!(
                    "refused for {} more (the agent just started)",
                    duration(t - self.now_ms)
                ),
            );
        }
        line(
            "last error",
            self.last_error.clone().unwrap_or_else(|| "none".into()),
        );
        out
    }
}

/// "in 2.5 s" / "3.0 s ago".
fn relative(at_ms: u64, now_ms: u64) -> String {
    if at_ms >= now_ms {
        format!("in {}", duration(at_ms - now_ms))
    } else {
        format!("{} ago", duration(now_ms - at_ms))
    }
}

/// "2.5 s", "4 min 10 s", "23 h 59 min".
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..120 => format!("{s}.{} s", (ms % 1000) / 100),
        120..7200 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(12_340, 10_000), "in 2.3 s");
        assert_eq!(relative(10_000, 13_000), "3.0 s ago");
        assert_eq!(relative(250_000, 0), "in 4 min 10 s");
        assert_eq!(relative(86_340_000, 0), "in 23 h 59 min");
    }

    #[test]
    fn a_status_without_store_renders_and_round_trips_as_json() {
        let s = Status::without_store("dev-1", "revoked", Some("revoked at 5".into()), 1000, false);
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<Status>(&json).expect("parse"), s);
        let text = s.render();
        assert!(
            text.contains("revoked") && text.contains("token                 none"),
            "{text}"
        );
    }
}
