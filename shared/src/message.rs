//! Protocol messages other than tokens: the signed request and response envelopes, the
//! operation bodies, the key set, the device control message and the wire error codes.
//!
//! Every signed payload is a CBOR map whose key `0` is its [`MessageType`], so a payload
//! signed for one purpose can never be accepted as another (a delta as a snapshot, a
//! response as a request).

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
    /// The retained signed revocation snapshot.
    RevocationSnapshot = 20,
    /// A sequence-numbered signed revocation delta.
    RevocationDelta = 21,
    /// A signed heartbeat naming the latest revocation sequence number.
    RevocationHeartbeat = 22,
    /// A signed message to one device on its control topic.
    Control = 30,
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
            20 => Self::RevocationSnapshot,
            21 => Self::RevocationDelta,
            22 => Self::RevocationHeartbeat,
            30 => Self::Control,
            _ => return None,
        })
    }
}

/// Map key of the message type in every signed payload.
pub const KEY_MESSAGE_TYPE: i64 = 0;
