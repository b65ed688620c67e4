//! The MQTT topic layout (version 1).
//!
//! ```text
//! tessera/v1/client/{id}/req         client → hub: signed requests
//! tessera/v1/client/{id}/resp        hub → client: signed responses
//! tessera/v1/client/{id}/control     hub → device: signed control messages
//! tessera/v1/hub/keys                retained signed key set
//! tessera/v1/hub/revocation/snapshot retained signed revocation snapshot
//! tessera/v1/hub/revocation/delta    signed revocation deltas
//! tessera/v1/hub/revocation/heartbeat signed heartbeats
//! tessera/v1/hub/events              monitoring events
//! ```
//!
//! Client ids are single topic levels ([`validate_id`](crate::message::validate_id)), and
//! clients live under `client/` while the hub's topics live under `hub/`, so no id can
//! collide with a hub topic and broker ACLs can be written with one pattern per topic.

use core::fmt::Write;

use crate::error::{EncodeError, Error};
use crate::message::validate_id;

/// Common prefix of every topic.
pub const PREFIX: &str = "tessera/v1";

/// Longest topic this module builds.
pub const MAX_TOPIC_LEN: usize = PREFIX.len() + "/client/".len() + crate::MAX_ID_LEN + 8;

/// A topic name, built without an allocator.
pub type Topic = heapless::String<MAX_TOPIC_LEN>;

/// The retained signed key set.
pub const KEYS: &str = "tessera/v1/hub/keys";
/// The retained signed revocation snapshot.
pub const REVOCATION_SNAPSHOT: &str = "tessera/v1/hub/revocation/snapshot";
/// Signed revocation deltas.
pub const REVOCATION_DELTA: &str = "tessera/v1/hub/revocation/delta";
/// Signed revocation heartbeats.
pub const REVOCATION_HEARTBEAT: &str = "tessera/v1/hub/revocation/heartbeat";
/// Monitoring events.
pub const EVENTS: &str = "tessera/v1/hub/events";
/// What the hub subscribes to for requests.
pub const ALL_REQUESTS: &str = "tessera/v1/client/+/req";
/// The same through an MQTT 5 shared subscription, for several hub replicas.
pub const ALL_REQUESTS_SHARED: &str = "$share/tessera-hub/tessera/v1/client/+/req";

fn client_topic(id: &str, leaf: &str) -> Result<Topic, Error> {
    validate_id(id)?;
    let mut t = Topic::new();
    write!(t, "{PREFIX}/client/{id}/{leaf}").map_err(|_| EncodeError::BufferTooSmall)?;
    Ok(t)
}

/// `tessera/v1/client/{id}/req`.
pub fn request(client: &str) -> Result<Topic, Error> {
    client_topic(client, "req")
}

/// `tessera/v1/client/{id}/resp`.
pub fn response(client: &str) -> Result<Topic, Error> {
    client_topic(client, "resp")
}

/// `tessera/v1/client/{id}/control`.
pub fn control(device: &str) -> Result<Topic, Error> {
    client_topic(device, "control")
}

/// The client id in a request topic, if `topic` is one.
pub fn requesting_client(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/client/")?
        .strip_suffix("/req")?;
    validate_id(id).ok().map(|_| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_topics_are_built_and_parsed_back() {
        let t = request("device-42").expect("valid id");
        assert_eq!(t.as_str(), "tessera/v1/client/device-42/req");
        assert_eq!(requesting_client(&t), Some("device-42"));
        assert_eq!(
            response("device-42").expect("valid").as_str(),
            "tessera/v1/client/device-42/resp"
        );
        assert_eq!(requesting_client("tessera/v1/client/a/b/req"), None);
        assert_eq!(requesting_client(KEYS), None);
    }

    #[test]
    fn ids_that_are_not_one_topic_level_are_refused() {
        assert!(request("a/b").is_err());
        assert!(request("+").is_err());
        assert!(control(&"x".repeat(crate::MAX_ID_LEN)).is_ok());
    }
}
