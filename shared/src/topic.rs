//! The MQTT topic layout (version 1).
//!
//! ```text
//! tessera/v1/client/{id}/req         client → hub: signed requests
//! tessera/v1/client/{id}/resp        hub → client: signed responses
//! tessera/v1/client/{id}/control     hub → device: signed control messages
//! tessera/v1/hub/keys                retained signed key set
//! tessera/v1/hub/revocation/{stream}/delta       signed pages, one per change
//! tessera/v1/hub/revocation/{stream}/heartbeat   signed heartbeats
//! tessera/v1/hub/revocation/{stream}/snapshot/{n} retained signed pages covering 1..=seq
//! tessera/v1/hub/events              monitoring events
//! tessera/v1/hub/alerts              anomaly alerts, quarantines and their lifting
//! ```
//!
//! `{stream}` is two levels, `devices/{pp}` or `service/{name}`
//! ([`Stream`](crate::revocation::Stream)).
//!
//! Client ids are single topic levels ([`validate_id`](crate::message::validate_id)), and
//! clients live under `client/` while the hub's topics live under `hub/`, so no id can
//! collide with a hub topic and broker ACLs can be written with one pattern per topic.

use core::fmt::Write;

use crate::error::{EncodeError, Error};
use crate::message::validate_id;
use crate::revocation::Stream;

/// Common prefix of every topic.
pub const PREFIX: &str = "tessera/v1";

/// Longest topic this module builds: a snapshot page of a service stream.
pub const MAX_TOPIC_LEN: usize =
    REVOCATION_PREFIX.len() + 1 + crate::revocation::MAX_STREAM_NAME_LEN + "/snapshot/".len() + 20;

/// A topic name, built without an allocator.
pub type Topic = heapless::String<MAX_TOPIC_LEN>;

/// The retained signed key set.
pub const KEYS: &str = "tessera/v1/hub/keys";
/// Common prefix of every revocation stream's topics.
pub const REVOCATION_PREFIX: &str = "tessera/v1/hub/revocation";
/// What the hub subscribes to, to see its own deltas come back (and so know the broker
/// took them).
pub const ALL_REVOCATION_DELTAS: &str = "tessera/v1/hub/revocation/+/+/delta";
/// What the hub subscribes to, to see its own control messages come back.
pub const ALL_CONTROLS: &str = "tessera/v1/client/+/control";
/// Monitoring events.
pub const EVENTS: &str = "tessera/v1/hub/events";
/// Anomaly alerts, quarantines and their lifting (JSON, like the events).
pub const ALERTS: &str = "tessera/v1/hub/alerts";
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

fn stream_topic(stream: &Stream<'_>, leaf: &str) -> Topic {
    let mut t = Topic::new();
    // Stream names and the leaves used here fit MAX_TOPIC_LEN by construction.
    let _ = write!(t, "{REVOCATION_PREFIX}/{}/{leaf}", stream.name());
    t
}

/// `tessera/v1/hub/revocation/{stream}/delta`: each change as it happens.
pub fn revocation_delta(stream: &Stream<'_>) -> Topic {
    stream_topic(stream, "delta")
}

/// `tessera/v1/hub/revocation/{stream}/heartbeat`.
pub fn revocation_heartbeat(stream: &Stream<'_>) -> Topic {
    stream_topic(stream, "heartbeat")
}

/// `tessera/v1/hub/revocation/{stream}/snapshot/{page}`: retained page `page` (from 0) of
/// the snapshot.
pub fn revocation_snapshot_page(stream: &Stream<'_>, page: u64) -> Topic {
    let mut t = stream_topic(stream, "snapshot/");
    let _ = write!(t, "{page}");
    t
}

/// `tessera/v1/hub/revocation/{stream}/#`: everything a verifier of `stream` subscribes to.
pub fn revocation_filter(stream: &Stream<'_>) -> Topic {
    stream_topic(stream, "#")
}

/// Whether `topic` is one of `stream`'s topics.
pub fn is_revocation_topic(stream: &Stream<'_>, topic: &str) -> bool {
    topic
        .strip_prefix(REVOCATION_PREFIX)
        .and_then(|t| t.strip_prefix('/'))
        .and_then(|t| t.strip_prefix(stream.name().as_str()))
        .is_some_and(|t| t.starts_with('/'))
}

/// The stream of a revocation delta topic, if `topic` is one.
pub fn delta_stream(topic: &str) -> Option<Stream<'_>> {
    let name = topic
        .strip_prefix(REVOCATION_PREFIX)?
        .strip_prefix('/')?
        .strip_suffix("/delta")?;
    Stream::parse(name).ok()
}

/// The device id in a control topic, if `topic` is one.
pub fn controlled_device(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/client/")?
        .strip_suffix("/control")?;
    validate_id(id).ok().map(|_| id)
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
    use std::string::ToString;

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
    fn revocation_topics_name_their_stream() {
        let s = Stream::Devices(0x0a);
        assert_eq!(
            revocation_delta(&s).as_str(),
            "tessera/v1/hub/revocation/devices/0a/delta"
        );
        assert_eq!(delta_stream(&revocation_delta(&s)), Some(s));
        let longest = "s".repeat(crate::MAX_ID_LEN);
        let svc = Stream::of_service(&longest).expect("id");
        let page = revocation_snapshot_page(&svc, u64::MAX);
        assert!(page.ends_with(&u64::MAX.to_string()), "{page}");
        assert!(is_revocation_topic(&svc, &page));
        assert!(is_revocation_topic(&s, &revocation_heartbeat(&s)));
        assert!(!is_revocation_topic(
            &Stream::Devices(0x0b),
            &revocation_heartbeat(&s)
        ));
        assert_eq!(
            revocation_filter(&s).as_str(),
            "tessera/v1/hub/revocation/devices/0a/#"
        );
        assert_eq!(
            delta_stream("tessera/v1/hub/revocation/devices/0a/heartbeat"),
            None
        );
        assert_eq!(
            controlled_device("tessera/v1/client/d-1/control"),
            Some("d-1")
        );
    }

    #[test]
    fn ids_that_are_not_one_topic_level_are_refused() {
        assert!(request("a/b").is_err());
        assert!(request("+").is_err());
        assert!(control(&"x".repeat(crate::MAX_ID_LEN)).is_ok());
    }
}
