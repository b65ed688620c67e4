//! Protocol messages other than tokens: the signed request and response envelopes with
//! every operation's body, the device control message, the proof-of-possession
//! presentation, and the wire error codes. The key set lives in [`keyset`](crate::keyset)
//! and the revocation messages in [`revocation`](crate::revocation); topics in
//! [`topic`](crate::topic).
//!
//! Every signed payload is a CBOR map whose key `0` is its [`MessageType`], so a payload
//! signed for one purpose can never be accepted as another (a heartbeat as a page, a
//! response as a request, a presentation as a request).

mod control;
mod presentation;
mod request;
mod response;

pub use control::{Command, Control};
pub use presentation::{MAX_PRESENTATION_LEN, Presentation, SignedPresentation};
pub use request::{
    EnrollmentCode, IdList, MAX_GRANT_LEN, MAX_REVOKE_LIST, NONCE_LEN, Operation, Request,
    RequestBody, RequestHead, RevokeTarget, SignedRequest,
};
pub use response::{
    ErrorCode, MAX_REASON_LEN, Outcome, Response, ResponseBody, SignedResponse, WireError,
};

use crate::cbor::Reader;
use crate::error::{DecodeError, Error};

/// What a signed payload is; the value of key `0` of every signed payload map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageType {
    /// A client's signed request (`tessera/v1/{client}/req`).
    Request = 1,
    /// The hub's signed response (`tessera/v1/{client}/resp`).
    Response = 2,
    /// The hub's signed, retained key set.
    KeySet = 10,
    /// A signed page of a revocation stream: a delta, or part of a snapshot. (21, the
    /// delta of the first drafts, is retired and never reused.)
    RevocationPage = 20,
    /// A signed heartbeat naming a revocation stream's latest change number.
    RevocationHeartbeat = 22,
    /// A signed message to one device on its control topic.
    Control = 30,
    /// A token holder's proof of possession, presented to a device with the token.
    Presentation = 40,
}

impl MessageType {
    /// The type's number on the wire.
    pub const fn as_u64(self) -> u64 {
        self as u64
    }

    /// The type with this wire number, if any.
    pub const fn from_u64(n: u64) -> Option<Self> {
        Some(match n {
            1 => Self::Request,
            2 => Self::Response,
            10 => Self::KeySet,
            20 => Self::RevocationPage,
            22 => Self::RevocationHeartbeat,
            30 => Self::Control,
            40 => Self::Presentation,
            _ => return None,
        })
    }
}

/// Map key of the message type in every signed payload.
pub const KEY_MESSAGE_TYPE: i64 = 0;

/// Reads the head of a signed payload map: checks that key `0` comes first and names
/// `expected`, and returns how many entries follow it.
pub(crate) fn read_type(
    r: &mut Reader<'_>,
    expected: MessageType,
    max_entries: usize,
) -> Result<usize, Error> {
    let n = r.map(max_entries + 1)?;
    if n == 0 || r.key()? != KEY_MESSAGE_TYPE {
        return Err(DecodeError::MissingField("message type").into());
    }
    if r.uint()? != expected.as_u64() {
        return Err(DecodeError::InvalidValue("message type").into());
    }
    Ok(n - 1)
}

/// Checks a client, device, app, operator or hub id: 1 to
/// [`MAX_ID_LEN`](crate::MAX_ID_LEN) bytes of `A-Z a-z 0-9 . _ -`, so it is always one
/// safe MQTT topic level (never `/`, `+`, `#` or a control character).
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if id.is_empty() || id.len() > crate::MAX_ID_LEN || !id.bytes().all(ok) {
        return Err(DecodeError::InvalidValue("id").into());
    }
    Ok(())
}

/// Reads an id and validates it.
pub(crate) fn read_id<'b>(r: &mut Reader<'b>) -> Result<&'b str, Error> {
    let id = r.str(crate::MAX_ID_LEN)?;
    validate_id(id)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_topic_levels() {
        assert!(validate_id("device-42.eu_1").is_ok());
        for bad in ["", "a/b", "a+", "#", "a b", "é", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn message_type_numbers_round_trip() {
        for t in [
            MessageType::Request,
            MessageType::Response,
            MessageType::KeySet,
            MessageType::RevocationPage,
            MessageType::RevocationHeartbeat,
            MessageType::Control,
            MessageType::Presentation,
        ] {
            assert_eq!(MessageType::from_u64(t.as_u64()), Some(t));
        }
        assert_eq!(MessageType::from_u64(3), None);
        assert_eq!(MessageType::from_u64(21), None, "retired");
    }
}
