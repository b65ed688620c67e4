//! The live event stream on `tessera/v1/hub/events`: one JSON object per decision.
//!
//! ```json
//! {"at_ms": 1700000000123, "actor": "app-7", "action": "access_token",
//!  "target": "device-42", "outcome": "denied", "reason": "scope door:unlock is not allowed"}
//! ```
//! `outcome` is `ok` or a wire error code name (`unknown_client`, `bad_signature`,
//! `replay`, `stale`, `denied`, `revoked`, `rate_limited`, `malformed`, `internal`,
//! `unsupported`). Events are published at QoS 0 and may be lost; the audit log in the
//! store is the durable record.

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
    }))
    .unwrap_or_default()
}
