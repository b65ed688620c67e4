//! The live event stream on `tessera/v1/hub/events`: one JSON object per decision, or per
//! window of identical refusals.
//!
//! ```json
//! {"at_ms": 1700000000123, "actor": "app-7", "action": "access_token",
//!  "target": "device-42", "outcome": "denied", "reason": "scope door:unlock is not allowed",
//!  "count": 1}
//! ```
//! `outcome` is `ok` or a wire error code name (`unknown_client`, `bad_signature`,
//! `replay`, `stale`, `denied`, `revoked`, `rate_limited`, `malformed`, `internal`,
//! `unsupported`, `overloaded`, `quarantined`). `count` is how many decisions the event stands for: a
//! success is always one event, but the refusals of one client with the same action and
//! outcome are reported once when the first comes, then as one event per window with the
//! count of the others (`at_ms` is then the first of them). `actor` is `*` for refusals
//! aggregated over many clients (a flood from more client ids than the hub keeps apart).
//! Events are published at QoS 0 and may be lost, or dropped when the hub is overloaded;
//! the audit log in the store is the durable record, with the same rows.
//!
//! The audit log also holds the hub's own decisions, which are not requests and are not on
//! the stream: a policy reload is one row with `actor` `hub`, `action` `policy_reload`,
//! `target` the policy file, and `outcome` `ok` (the reason says what it revoked, and what
//! a force marker overrode), `denied` (refused: it would leave registered clients without a
//! role, or revoke too large a share of the live tokens), `malformed` (an invalid file) or
//! `internal` (the store failed); see [`crate::policy_change::reload`]. Anomaly alerts are
//! on their own topic, `tessera/v1/hub/alerts` ([`crate::anomaly::Alert::to_json`]), and in
//! the audit log as rows with `actor` `hub`, `target` the client and `action` `alert`
//! (`outcome` the alert's kind), `quarantine` or `quarantine_expiry` (`outcome` `ok`).

use crate::store::AuditEvent;

/// The event as a JSON object.
pub fn to_json(ev: &AuditEvent) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "at_ms": ev.at_ms,
        "actor": ev.actor,
        "action": ev.action,
        "target": ev.target,
        "outcome": ev.outcome,
        "reason": ev.reason,
        "count": ev.count,
    }))
    .unwrap_or_default()
}
