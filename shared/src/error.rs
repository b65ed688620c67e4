//! The one error type of the core, grouped by category.
//!
//! Every variant carries enough to print a reason a person can act on, and nothing that
//! needs an allocator. Mapping an error to a wire [`ErrorCode`](crate::message::ErrorCode)
//! is a separate conversion, so the core's reasons never leak protocol decisions.

use core::fmt;

/// Everything that can go wrong in the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not the CBOR/COSE structure they should be.
    Decode(DecodeError),
    /// An output buffer was too small or a value could not be encoded.
    Encode(EncodeError),
    /// The signature, key or algorithm is not acceptable.
    Signature(SignatureError),
    /// The token decoded and verified, but its claims do not allow this use.
    Claims(ClaimsError),
    /// A fixed-capacity collection is full.
    Capacity(CapacityError),
    /// An encrypted record could not be opened or sealed.
    Record(RecordError),
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is not well-formed CBOR, or ends early.
    Malformed,
    /// A data item has a different major type than the layout requires.
    UnexpectedType,
    /// Bytes remain after the top-level item.
    TrailingBytes,
    /// A map repeats a key.
    DuplicateKey(i64),
    /// An indefinite-length item was used where the layout requires a definite one.
    IndefiniteLength,
    /// The input or one of its items is longer than the core accepts.
    TooLarge,
    /// Nesting is deeper than the core accepts.
    TooDeep,
    /// A required field is missing (named by its protocol name).
    MissingField(&'static str),
    /// A field has a value outside its allowed range or set (named by its protocol name).
    InvalidValue(&'static str),
    /// A COSE tag other than the expected one was present.
    UnexpectedTag(u64),
    /// The protected header lists a critical header the core does not understand.
    UnknownCriticalHeader,
    /// The unprotected header is not empty.
    UnprotectedHeaderNotEmpty,
}

/// Why an encoding failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is too small for the encoded item.
    BufferTooSmall,
    /// A value cannot be represented (for example a string longer than the layout allows).
    InvalidValue(&'static str),
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The protected header names an algorithm other than ES256.
    UnsupportedAlgorithm,
    /// No trusted key has the `kid` in the protected header.
    UnknownKey,
    /// The signature does not verify under the key.
    Invalid,
    /// A public key is not a valid P-256 point.
    InvalidKey,
    /// The signing backend failed.
    SigningFailed,
}

/// Why a verified token's claims do not allow this use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimsError {
    /// `exp` (plus leeway) is in the past.
    Expired,
    /// `nbf` (minus leeway) is in the future.
    NotYetValid,
    /// `iat` (minus leeway) is in the future.
    IssuedInFuture,
    /// `aud` is not the expected audience.
    WrongAudience,
    /// `iss` is not the expected issuer.
    WrongIssuer,
    /// The token does not grant the required scope.
    MissingScope,
    /// The token is on the revocation list.
    Revoked,
    /// The presenter did not prove possession of the `cnf` key.
    ProofOfPossession,
    /// `sub` is not the expected subject.
    WrongSubject,
    /// The verifier's revocation knowledge is too old (or incomplete) to vouch that the
    /// token is not revoked: it refuses rather than risk accepting a revoked token.
    RevocationsStale,
    /// A presentation's `issued_at` is outside the verifier's presentation window.
    PresentationOutsideWindow,
    /// The presentation's nonce was already accepted within its window: a replayed
    /// presentation proves nothing about who holds the key now.
    PresentationReplayed,
}

/// Which fixed-capacity collection is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CapacityError {
    /// More scopes than [`MAX_SCOPES`](crate::scope::MAX_SCOPES).
    Scopes,
    /// More keys than a key set holds.
    Keys,
    /// More revocation entries than the list holds.
    Revocations,
    /// More pending actions than the state machine can return at once.
    Actions,
}

/// Why an encrypted record could not be opened or sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// The record is not in the record format (bad magic, version or length).
    Malformed,
    /// Authentication failed: the record was altered, belongs to another device, or the
    /// key is wrong.
    Tampered,
    /// The record counter is lower than the last one seen: an old record was put back.
    RolledBack {
        /// The counter found in the record.
        found: u64,
        /// The lowest counter that is acceptable.
        expected_at_least: u64,
    },
    /// The plaintext is larger than the record format allows.
    TooLarge,
}

macro_rules! from_category {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(e)
            }
        }
    )*};
}

from_category!(
    Decode(DecodeError),
    Encode(EncodeError),
    Signature(SignatureError),
    Claims(ClaimsError),
    Capacity(CapacityError),
    Record(RecordError),
);

impl From<minicbor::decode::Error> for DecodeError {
    fn from(_: minicbor::decode::Error) -> Self {
        // minicbor's own messages need an allocator to be useful; the category is what
        // callers act on.
        DecodeError::Malformed
    }
}

impl From<minicbor::decode::Error> for Error {
    fn from(e: minicbor::decode::Error) -> Self {
        Error::Decode(e.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Decode(e) => write!(f, "decode: {e}"),
            Error::Encode(e) => write!(f, "encode: {e}"),
            Error::Signature(e) => write!(f, "signature: {e}"),
            Error::Claims(e) => write!(f, "claims: {e}"),
            Error::Capacity(e) => write!(f, "capacity: {e}"),
            Error::Record(e) => write!(f, "record: {e}"),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Malformed => f.write_str("not well-formed CBOR or truncated"),
            DecodeError::UnexpectedType => f.write_str("a data item has the wrong CBOR type"),
            DecodeError::TrailingBytes => f.write_str("bytes follow the top-level item"),
            DecodeError::DuplicateKey(k) => write!(f, "map key {k} appears twice"),
            DecodeError::IndefiniteLength => f.write_str("indefinite-length item not allowed"),
            DecodeError::TooLarge => f.write_str("input or item longer than allowed"),
            DecodeError::TooDeep => f.write_str("nesting deeper than allowed"),
            DecodeError::MissingField(n) => write!(f, "required field `{n}` is missing"),
            DecodeError::InvalidValue(n) => write!(f, "field `{n}` has an invalid value"),
            DecodeError::UnexpectedTag(t) => write!(f, "unexpected CBOR tag {t}"),
            DecodeError::UnknownCriticalHeader => {
                f.write_str("protected header lists a critical header that is not understood")
            }
            DecodeError::UnprotectedHeaderNotEmpty => {
                f.write_str("unprotected header must be empty")
            }
        }
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall => f.write_str("output buffer too small"),
            EncodeError::InvalidValue(n) => write!(f, "field `{n}` cannot be encoded"),
        }
    }
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureError::UnsupportedAlgorithm => "algorithm is not ES256 (-7)",
            SignatureError::UnknownKey => "no trusted key with this kid",
            SignatureError::Invalid => "signature does not verify",
            SignatureError::InvalidKey => "public key is not a valid P-256 point",
            SignatureError::SigningFailed => "signing backend failed",
        })
    }
}

impl fmt::Display for ClaimsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClaimsError::Expired => "token has expired",
            ClaimsError::NotYetValid => "token is not yet valid",
            ClaimsError::IssuedInFuture => "token is issued in the future",
            ClaimsError::WrongAudience => "token is for another audience",
            ClaimsError::WrongIssuer => "token is from another issuer",
            ClaimsError::MissingScope => "token does not grant the required scope",
            ClaimsError::Revoked => "token is revoked",
            ClaimsError::ProofOfPossession => "presenter did not prove possession of the token key",
            ClaimsError::WrongSubject => "token is for another subject",
            ClaimsError::RevocationsStale => {
                "revocation knowledge is stale or incomplete: cannot vouch the token is not revoked"
            }
            ClaimsError::PresentationOutsideWindow => {
                "presentation is outside the freshness window (check both clocks)"
            }
            ClaimsError::PresentationReplayed => {
                "presentation was already accepted once (a replay): present again with a new nonce"
            }
        })
    }
}

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapacityError::Scopes => "too many scopes",
            CapacityError::Keys => "key set is full",
            CapacityError::Revocations => "revocation list is full",
            CapacityError::Actions => "too many pending actions",
        })
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Malformed => f.write_str("not a Tessera record"),
            RecordError::Tampered => {
                f.write_str("authentication failed: altered, another device's, or wrong key")
            }
            RecordError::RolledBack {
                found,
                expected_at_least,
            } => write!(
                f,
                "rolled back: record counter {found}, expected at least {expected_at_least}"
            ),
            RecordError::TooLarge => f.write_str("plaintext larger than a record holds"),
        }
    }
}

impl core::error::Error for Error {}
