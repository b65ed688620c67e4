//! The hub's signed response and the wire error codes.
//!
//! A response is a COSE_Sign1 by the hub's current key over
//! `{0: 2, 1: op, 2: client, 3: request_id, 4: hub_time, 5: nonce, 6: body}` on success or
//! `{..., 7: {1: code, 2: reason}}` on failure. Echoing the client, request id and nonce
//! lets the client check that the response answers its own request; `hub_time` is how a
//! device without a trustworthy clock learns the time (it is bound to the device's fresh
//! nonce, so it cannot be replayed from an older exchange).

use super::request::{MAX_GRANT_LEN, NONCE_LEN, Operation};
use super::{MessageType, read_id, read_type};
use crate::cbor::{Reader, SeenKeys, Writer};
use crate::cose::{self, Sign1};
use crate::crypto::{KeyLookup, Signer};
use crate::error::{DecodeError, Error};
use crate::revocation::MAX_PAGE_LEN;
use crate::token::MAX_TOKEN_LEN;

/// Longest error reason carried on the wire, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// Why the hub refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No client with this id is registered (or it was removed).
    UnknownClient = 1,
    /// The request's signature does not verify with the client's registered key.
    BadSignature = 2,
    /// The nonce was already used within the freshness window.
    Replay = 3,
    /// `issued_at` is outside the freshness window of the hub's clock.
    Stale = 4,
    /// Policy does not allow this client this operation or scope.
    Denied = 5,
    /// The client, its device, its token or its grant is revoked.
    Revoked = 6,
    /// The client sent more requests than its rate allows.
    RateLimited = 7,
    /// The request is not a well-formed Tessera request (CBOR, COSE, size, fields).
    Malformed = 8,
    /// The hub failed; the request may be retried.
    Internal = 9,
    /// The operation is not supported by this hub.
    Unsupported = 10,
    /// The hub has more work queued than it can take: nothing was done; retry after a
    /// backoff.
    Overloaded = 11,
    /// The client is quarantined after an anomaly alert: nothing was done. An operator
    /// lifts the quarantine, or it ends by itself after the time the hub set.
    Quarantined = 12,
}

impl ErrorCode {
    /// The code's number on the wire.
    pub const fn as_u64(self) -> u64 {
        self as u64
    }

    /// The code with this wire number, if any.
    pub const fn from_u64(n: u64) -> Option<Self> {
        Some(match n {
            1 => Self::UnknownClient,
            2 => Self::BadSignature,
            3 => Self::Replay,
            4 => Self::Stale,
            5 => Self::Denied,
            6 => Self::Revoked,
            7 => Self::RateLimited,
            8 => Self::Malformed,
            9 => Self::Internal,
            10 => Self::Unsupported,
            11 => Self::Overloaded,
            12 => Self::Quarantined,
            _ => return None,
        })
    }

    /// The code's name in logs, metrics and docs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownClient => "unknown_client",
            Self::BadSignature => "bad_signature",
            Self::Replay => "replay",
            Self::Stale => "stale",
            Self::Denied => "denied",
            Self::Revoked => "revoked",
            Self::RateLimited => "rate_limited",
            Self::Malformed => "malformed",
            Self::Internal => "internal",
            Self::Unsupported => "unsupported",
            Self::Overloaded => "overloaded",
            Self::Quarantined => "quarantined",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::Internal | Self::Stale | Self::Overloaded
        )
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed refusal with a human-readable reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireError<'a> {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// Why, for people.
    pub reason: &'a str,
}

/// What the hub answers on success, by operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody<'a> {
    /// Enroll: `{}`. The device's key is registered. Also the body of `lift_quarantine`
    /// (`{}`: the quarantine is lifted) and of `report_presentation` (`{}`: the report is
    /// taken), the other operations with nothing to return.
    Enrolled,
    /// DeviceToken, AccessToken, Refresh: `{1: token, ?2: grant, ?3: grant_expires_at}`.
    Token {
        /// The issued token (a COSE_Sign1 CWT).
        token: &'a [u8],
        /// The new refresh grant and when it expires (Unix seconds). A grant is single-use:
        /// the next refresh must present this one.
        grant: Option<(&'a [u8], u64)>,
    },
    /// Revoke: `{1: revoked, 2: entries, 3: notified}`. Sent only once the revocation is
    /// durable.
    Revoked {
        /// Tokens or clients the request revoked (already revoked ones not counted).
        revoked: u64,
        /// Revocation entries it added to the streams.
        entries: u64,
        /// Control messages it sends to devices (`revoked` or `refresh_now`).
        notified: u64,
    },
    /// FetchRevocations: `{1: page}`, a signed page of the asked stream.
    Revocations {
        /// A signed revocation page (COSE_Sign1).
        page: &'a [u8],
    },
}

impl ResponseBody<'_> {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        match self {
            Self::Enrolled => {
                w.map(0)?;
            }
            Self::Token { token, grant } => {
                w.map(if grant.is_some() { 3 } else { 1 })?
                    .u8(1)?
                    .bytes(token)?;
                if let Some((g, exp)) = grant {
                    w.u8(2)?.bytes(g)?.u8(3)?.u64(*exp)?;
                }
            }
            Self::Revoked {
                revoked,
                entries,
                notified,
            } => {
                w.map(3)?
                    .u8(1)?
                    .u64(*revoked)?
                    .u8(2)?
                    .u64(*entries)?
                    .u8(3)?
                    .u64(*notified)?;
            }
            Self::Revocations { page } => {
                w.map(1)?.u8(1)?.bytes(page)?;
            }
        }
        Ok(())
    }

    fn decode<'b>(op: Operation, r: &mut Reader<'b>) -> Result<ResponseBody<'b>, Error> {
        let n = r.map(3)?;
        let mut seen = SeenKeys::default();
        let (mut bytes, mut grant, mut number) = (None, None, None);
        let mut counts = [None; 3];
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match (op, k) {
                (Operation::DeviceToken | Operation::AccessToken | Operation::Refresh, 1) => {
                    bytes = Some(r.bytes(MAX_TOKEN_LEN)?)
                }
                (Operation::DeviceToken | Operation::AccessToken | Operation::Refresh, 2) => {
                    grant = Some(r.bytes(MAX_GRANT_LEN)?)
                }
                (Operation::DeviceToken | Operation::AccessToken | Operation::Refresh, 3) => {
                    number = Some(r.uint()?)
                }
                (Operation::Revoke, 1..=3) => {
                    counts[usize::try_from(k - 1).unwrap_or(0)] = Some(r.uint()?)
                }
                (Operation::FetchRevocations, 1) => bytes = Some(r.bytes(MAX_PAGE_LEN)?),
                _ => return Err(DecodeError::InvalidValue("body key").into()),
            }
        }
        Ok(match op {
            Operation::Enroll | Operation::LiftQuarantine | Operation::ReportPresentation => {
                ResponseBody::Enrolled
            }
            Operation::DeviceToken | Operation::AccessToken | Operation::Refresh => {
                let grant = match (grant, number) {
                    (Some(g), Some(exp)) => Some((g, exp)),
                    (None, None) => None,
                    _ => return Err(DecodeError::MissingField("grant_expires_at").into()),
                };
                ResponseBody::Token {
                    token: bytes.ok_or(DecodeError::MissingField("token"))?,
                    grant,
                }
            }
            Operation::Revoke => ResponseBody::Revoked {
                revoked: counts[0].ok_or(DecodeError::MissingField("revoked"))?,
                entries: counts[1].ok_or(DecodeError::MissingField("entries"))?,
                notified: counts[2].ok_or(DecodeError::MissingField("notified"))?,
            },
            Operation::FetchRevocations => ResponseBody::Revocations {
                page: bytes.ok_or(DecodeError::MissingField("page"))?,
            },
        })
    }
}

/// The result a response carries.
pub type Outcome<'a> = Result<ResponseBody<'a>, WireError<'a>>;

/// The hub's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// The operation answered; `None` when the request was too malformed to tell (`0`).
    pub op: Option<Operation>,
    /// The client the response is for.
    pub client: &'a str,
    /// The request id being answered (`0` if the request could not be decoded).
    pub request_id: u64,
    /// The hub's clock when answering, Unix seconds.
    pub hub_time: u64,
    /// The request's nonce (all zero if the request could not be decoded).
    pub nonce: [u8; NONCE_LEN],
    /// The result.
    pub outcome: Outcome<'a>,
}

impl<'a> Response<'a> {
    /// Writes the payload map into `out`; returns its length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        w.map(7)?
            .u8(0)?
            .u64(MessageType::Response.as_u64())?
            .u8(1)?
            .u64(self.op.map_or(0, Operation::as_u64))?
            .u8(2)?
            .str(self.client)?
            .u8(3)?
            .u64(self.request_id)?
            .u8(4)?
            .u64(self.hub_time)?
            .u8(5)?
            .bytes(&self.nonce)?;
        match &self.outcome {
            Ok(body) => {
                // A success must name the operation it answers, with that operation's body.
                if !body_matches(self.op, body) {
                    return Err(crate::error::EncodeError::InvalidValue("body").into());
                }
                w.u8(6)?;
                body.encode(&mut w)?;
            }
            Err(e) => {
                let reason = truncate(e.reason, MAX_REASON_LEN);
                w.u8(7)?
                    .map(2)?
                    .u8(1)?
                    .u64(e.code.as_u64())?
                    .u8(2)?
                    .str(reason)?;
            }
        }
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a payload map strictly.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::Response, 6)?;
        let mut seen = SeenKeys::default();
        let (mut op, mut client, mut request_id, mut hub_time, mut nonce) =
            (None, None, None, None, None);
        let (mut body_at, mut error) = (None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                1 => {
                    op = Some(match r.uint()? {
                        0 => None,
                        n => Some(Operation::from_u64(n).ok_or(DecodeError::InvalidValue("op"))?),
                    })
                }
                2 => client = Some(read_id(&mut r)?),
                3 => request_id = Some(r.uint()?),
                4 => hub_time = Some(r.uint()?),
                5 => nonce = Some(r.bytes_exact::<NONCE_LEN>("nonce")?),
                6 => {
                    body_at = Some(r.position());
                    r.skip()?;
                }
                7 => error = Some(decode_error(&mut r)?),
                _ => return Err(DecodeError::InvalidValue("response key").into()),
            }
        }
        r.finish()?;
        let op = op.ok_or(DecodeError::MissingField("op"))?;
        let outcome = match (body_at, error, op) {
            (Some(at), None, Some(op)) => Ok(ResponseBody::decode(op, &mut r_at(payload, at))?),
            (None, Some(e), _) => Err(e),
            (Some(_), None, None) => return Err(DecodeError::InvalidValue("op").into()),
            (Some(_), Some(_), _) => return Err(DecodeError::InvalidValue("body").into()),
            (None, None, _) => return Err(DecodeError::MissingField("body").into()),
        };
        Ok(Self {
            op,
            client: client.ok_or(DecodeError::MissingField("client"))?,
            request_id: request_id.ok_or(DecodeError::MissingField("request_id"))?,
            hub_time: hub_time.ok_or(DecodeError::MissingField("hub_time"))?,
            nonce: nonce.ok_or(DecodeError::MissingField("nonce"))?,
            outcome,
        })
    }

    /// Signs the response with the hub's key into `out`; returns the length.
    pub fn sign(&self, signer: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
        cose::sign_with(signer, out, |buf| self.encode_to(buf))
    }

    /// Whether this response answers the request identified by these values.
    pub fn answers(&self, client: &str, request_id: u64, nonce: &[u8; NONCE_LEN]) -> bool {
        self.client == client && self.request_id == request_id && &self.nonce == nonce
    }
}

fn r_at(payload: &[u8], at: usize) -> Reader<'_> {
    Reader::new(payload).at(at)
}

fn body_matches(op: Option<Operation>, body: &ResponseBody<'_>) -> bool {
    matches!(
        (op, body),
        (
            Some(Operation::Enroll | Operation::LiftQuarantine | Operation::ReportPresentation),
            ResponseBody::Enrolled
        ) | (
            Some(Operation::DeviceToken | Operation::AccessToken | Operation::Refresh),
            ResponseBody::Token { .. }
        ) | (Some(Operation::Revoke), ResponseBody::Revoked { .. })
            | (
                Some(Operation::FetchRevocations),
                ResponseBody::Revocations { .. }
            )
    )
}

fn decode_error<'b>(r: &mut Reader<'b>) -> Result<WireError<'b>, Error> {
    let n = r.map(2)?;
    let mut seen = SeenKeys::default();
    let (mut code, mut reason) = (None, None);
    for _ in 0..n {
        let k = r.key()?;
        seen.insert(k)?;
        match k {
            1 => {
                code =
                    Some(ErrorCode::from_u64(r.uint()?).ok_or(DecodeError::InvalidValue("code"))?)
            }
            2 => reason = Some(r.str(MAX_REASON_LEN)?),
            _ => return Err(DecodeError::InvalidValue("error key").into()),
        }
    }
    Ok(WireError {
        code: code.ok_or(DecodeError::MissingField("code"))?,
        reason: reason.ok_or(DecodeError::MissingField("reason"))?,
    })
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded response whose signature has not been checked yet.
#[derive(Debug, Clone, Copy)]
pub struct SignedResponse<'a> {
    envelope: Sign1<'a>,
}

impl<'a> SignedResponse<'a> {
    /// Decodes the envelope strictly.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        Ok(Self {
            envelope: Sign1::decode(bytes)?,
        })
    }

    /// Checks the hub's signature with the trusted key set and decodes the response.
    pub fn verify(&self, keys: &dyn KeyLookup) -> Result<Response<'a>, Error> {
        Response::decode(self.envelope.verify(keys)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testing::signer;

    fn response(op: Option<Operation>, outcome: Outcome<'static>) -> Response<'static> {
        Response {
            op,
            client: "device-42",
            request_id: 7,
            hub_time: 1_700_000_000,
            nonce: [3; NONCE_LEN],
            outcome,
        }
    }

    #[test]
    fn every_outcome_round_trips_through_a_signed_envelope() {
        let cases = [
            response(Some(Operation::Enroll), Ok(ResponseBody::Enrolled)),
            response(
                Some(Operation::DeviceToken),
                Ok(ResponseBody::Token {
                    token: &[1, 2, 3],
                    grant: Some((&[4; 32], 1_800_000_000)),
                }),
            ),
            response(
                Some(Operation::AccessToken),
                Ok(ResponseBody::Token {
                    token: &[1, 2, 3],
                    grant: None,
                }),
            ),
            response(
                Some(Operation::Revoke),
                Ok(ResponseBody::Revoked {
                    revoked: 1000,
                    entries: 12,
                    notified: 990,
                }),
            ),
            response(
                Some(Operation::FetchRevocations),
                Ok(ResponseBody::Revocations { page: &[9; 40] }),
            ),
            response(
                None,
                Err(WireError {
                    code: ErrorCode::Malformed,
                    reason: "not CBOR",
                }),
            ),
        ];
        for resp in cases {
            let mut out = [0u8; 512];
            let n = resp.sign(&signer(1), &mut out).expect("sign");
            let signed = SignedResponse::decode(&out[..n]).expect("decode");
            assert_eq!(signed.verify(&signer(1).public_key()), Ok(resp));
        }
    }

    #[test]
    fn a_body_for_another_operation_cannot_be_encoded() {
        let resp = response(Some(Operation::Revoke), Ok(ResponseBody::Enrolled));
        assert!(resp.encode_to(&mut [0u8; 128]).is_err());
        let without_op = response(None, Ok(ResponseBody::Enrolled));
        assert!(without_op.encode_to(&mut [0u8; 128]).is_err());
    }

    #[test]
    fn answers_checks_client_request_id_and_nonce() {
        let r = response(Some(Operation::Enroll), Ok(ResponseBody::Enrolled));
        assert!(r.answers("device-42", 7, &[3; 16]));
        assert!(!r.answers("device-43", 7, &[3; 16]));
        assert!(!r.answers("device-42", 8, &[3; 16]));
        assert!(!r.answers("device-42", 7, &[4; 16]));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        assert_eq!(truncate(&long, 255).len(), 254);
        let resp = Response {
            outcome: Err(WireError {
                code: ErrorCode::Internal,
                reason: &long,
            }),
            ..response(None, Ok(ResponseBody::Enrolled))
        };
        let mut out = [0u8; 1024];
        let n = resp.encode_to(&mut out).expect("encode");
        let back = Response::decode(&out[..n]).expect("decode");
        assert_eq!(
            back.outcome.map(|_| ()).map_err(|e| e.reason.len()),
            Err(256)
        );
    }

    #[test]
    fn every_error_code_round_trips_and_has_a_name() {
        for n in 1..=12 {
            let c = ErrorCode::from_u64(n).expect("code");
            assert_eq!(c.as_u64(), n);
            assert!(!c.name().is_empty());
        }
        assert_eq!(ErrorCode::from_u64(13), None);
        assert!(ErrorCode::Overloaded.is_retryable());
        // Sending again changes nothing until an operator lifts it or it expires.
        assert!(!ErrorCode::Quarantined.is_retryable());
        assert_eq!(ErrorCode::Quarantined.name(), "quarantined");
    }
}
