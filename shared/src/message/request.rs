//! The signed request envelope and the body of every operation.
//!
//! A request is a COSE_Sign1 by the client's own key over
//! `{0: 1, 1: op, 2: client, 3: request_id, 4: issued_at, 5: nonce, 6: body}`. The hub
//! checks the signature with the key it has registered for `client` (for enrollment, with
//! the key in the body), then freshness of `issued_at` and uniqueness of `nonce`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::presentation::MAX_PRESENTATION_LEN;
use super::{MessageType, read_id, read_type};
use crate::cbor::{Reader, SeenKeys, Writer};
use crate::cose::{self, Sign1};
use crate::crypto::{Kid, PublicKey, Signer, Verifier};
use crate::error::{DecodeError, Error};
use crate::revocation::{MAX_STREAM_NAME_LEN, Stream, TokenHash};
use crate::scope::{MAX_SCOPE_LEN, Scopes};

/// Length of a request nonce.
pub const NONCE_LEN: usize = 16;

/// Longest refresh grant accepted, in bytes.
pub const MAX_GRANT_LEN: usize = 64;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// Register the sender's key as a device's key.
    Enroll = 1,
    /// Issue a device token (and a refresh grant) to the sending device.
    DeviceToken = 2,
    /// Issue an access token for one device to the sending app.
    AccessToken = 3,
    /// Exchange a refresh grant for a new token and a new grant.
    Refresh = 4,
    /// Revoke a token, a subject or a device (operators only).
    Revoke = 5,
    /// Return the current signed revocation snapshot.
    FetchRevocations = 6,
    /// Lift a client's quarantine (operators who may revoke).
    LiftQuarantine = 7,
    /// Report a presentation the device refused because its token is revoked (devices).
    ReportPresentation = 8,
}

impl Operation {
    /// The operation's number on the wire.
    pub const fn as_u64(self) -> u64 {
        self as u64
    }

    /// The operation with this wire number, if any.
    pub const fn from_u64(n: u64) -> Option<Self> {
        Some(match n {
            1 => Self::Enroll,
            2 => Self::DeviceToken,
            3 => Self::AccessToken,
            4 => Self::Refresh,
            5 => Self::Revoke,
            6 => Self::FetchRevocations,
            7 => Self::LiftQuarantine,
            8 => Self::ReportPresentation,
            _ => return None,
        })
    }

    /// The operation's name in logs and docs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Enroll => "enroll",
            Self::DeviceToken => "device_token",
            Self::AccessToken => "access_token",
            Self::Refresh => "refresh",
            Self::Revoke => "revoke",
            Self::FetchRevocations => "fetch_revocations",
            Self::LiftQuarantine => "lift_quarantine",
            Self::ReportPresentation => "report_presentation",
        }
    }
}

/// Most devices one `revoke` request may name ([`RevokeTarget::Devices`]).
pub const MAX_REVOKE_LIST: usize = 16_384;

/// What an operator revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeTarget<'a> {
    /// Kind 0: one token, by its [`token_hash`](crate::revocation::token_hash).
    TokenHash(TokenHash),
    /// Kind 1: one token, by its `cti`.
    TokenId(&'a [u8]),
    /// Kind 2: every token issued to a device or app before now, and its grants.
    Subject(&'a str),
    /// Kind 3: a whole device: its tokens, its grants and its enrollment.
    Device(&'a str),
    /// Kind 4: every device in a group, each as [`Device`](Self::Device).
    Group(&'a str),
    /// Kind 5: every client with a role: devices as [`Device`](Self::Device), apps and
    /// operators as [`Subject`](Self::Subject).
    Role(&'a str),
    /// Kind 6: a list of 1 to [`MAX_REVOKE_LIST`] devices, each as
    /// [`Device`](Self::Device).
    Devices(IdList<'a>),
}

impl RevokeTarget<'_> {
    /// The kind number on the wire.
    pub fn kind(&self) -> u64 {
        match self {
            Self::TokenHash(_) => 0,
            Self::TokenId(_) => 1,
            Self::Subject(_) => 2,
            Self::Device(_) => 3,
            Self::Group(_) => 4,
            Self::Role(_) => 5,
            Self::Devices(_) => 6,
        }
    }
}

/// A list of identifiers: either given by the sender, or as decoded (already validated).
#[derive(Debug, Clone, Copy)]
pub struct IdList<'a>(IdListRepr<'a>);

#[derive(Debug, Clone, Copy)]
enum IdListRepr<'a> {
    Given(&'a [&'a str]),
    /// The items of a decoded CBOR array of validated ids, without its head.
    Wire {
        items: &'a [u8],
        len: usize,
    },
}

impl<'a> IdList<'a> {
    /// A list to send; every id must be valid and there must be 1 to [`MAX_REVOKE_LIST`]
    /// (checked when the request is encoded).
    pub const fn new(ids: &'a [&'a str]) -> Self {
        Self(IdListRepr::Given(ids))
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        match self.0 {
            IdListRepr::Given(ids) => ids.len(),
            IdListRepr::Wire { len, .. } => len,
        }
    }

    /// Whether the list is empty (never, once decoded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let (given, wire) = match self.0 {
            IdListRepr::Given(ids) => (Some(ids.iter().copied()), None),
            IdListRepr::Wire { items, len } => (None, Some((Reader::new(items), len))),
        };
        given.into_iter().flatten().chain(
            wire.into_iter()
                // Every item was read and validated when the list was decoded.
                .flat_map(|(mut r, len)| {
                    (0..len).map_while(move |_| r.str(crate::MAX_ID_LEN).ok())
                }),
        )
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        if self.is_empty() || self.len() > MAX_REVOKE_LIST {
            return Err(crate::error::EncodeError::InvalidValue("device list").into());
        }
        w.array(self.len() as u64)?;
        for id in self.iter() {
            crate::message::validate_id(id)
                .map_err(|_| crate::error::EncodeError::InvalidValue("id"))?;
            w.str(id)?;
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'a>) -> Result<Self, Error> {
        let len = r.array(MAX_REVOKE_LIST)?;
        if len == 0 {
            return Err(DecodeError::InvalidValue("device list").into());
        }
        let start = r.position();
        for _ in 0..len {
            read_id(r)?;
        }
        let items = r
            .input()
            .get(start..r.position())
            .ok_or(DecodeError::Malformed)?;
        Ok(Self(IdListRepr::Wire { items, len }))
    }
}

impl PartialEq for IdList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for IdList<'_> {}

/// The operation-specific part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody<'a> {
    /// `{1: COSE_Key, ?2: code_proof}`: the key to register, and for devices without a
    /// pre-registered key, the proof of a one-time enrollment code.
    Enroll {
        /// The device's new public key; the request must be signed with it.
        key: PublicKey,
        /// See [`EnrollmentCode::proof`].
        code_proof: Option<[u8; 32]>,
    },
    /// `{}`.
    DeviceToken,
    /// `{1: device, 2: scope}`.
    AccessToken {
        /// The device the token will be for (its `aud`).
        device: &'a str,
        /// The scopes asked for.
        scope: Scopes<'a>,
    },
    /// `{1: grant}`.
    Refresh {
        /// The current refresh grant.
        grant: &'a [u8],
    },
    /// `{1: kind, 2: value}`; see [`RevokeTarget`] for the kinds.
    Revoke(RevokeTarget<'a>),
    /// `{1: stream, 2: from}`: a page of a revocation stream starting at change `from`.
    FetchRevocations {
        /// The stream.
        stream: Stream<'a>,
        /// The first change wanted (at least 1).
        from: u64,
    },
    /// `{1: client}`: the client whose quarantine to lift.
    LiftQuarantine {
        /// The quarantined client's id.
        client: &'a str,
    },
    /// `{1: presentation}`: a signed presentation, byte for byte as the device received
    /// it, that the device refused because the revocation list covers its token.
    ReportPresentation {
        /// The signed presentation (at most [`MAX_PRESENTATION_LEN`] bytes).
        presentation: &'a [u8],
    },
}

impl RequestBody<'_> {
    /// The operation this body belongs to.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Enroll { .. } => Operation::Enroll,
            Self::DeviceToken => Operation::DeviceToken,
            Self::AccessToken { .. } => Operation::AccessToken,
            Self::Refresh { .. } => Operation::Refresh,
            Self::Revoke(_) => Operation::Revoke,
            Self::FetchRevocations { .. } => Operation::FetchRevocations,
            Self::LiftQuarantine { .. } => Operation::LiftQuarantine,
            Self::ReportPresentation { .. } => Operation::ReportPresentation,
        }
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        match self {
            Self::Enroll { key, code_proof } => {
                w.map(1 + u64::from(code_proof.is_some()))?.u8(1)?;
                key.encode(w)?;
                if let Some(p) = code_proof {
                    w.u8(2)?.bytes(p)?;
                }
            }
            Self::DeviceToken => {
                w.map(0)?;
            }
            Self::FetchRevocations { stream, from } => {
                if *from == 0 {
                    return Err(crate::error::EncodeError::InvalidValue("from").into());
                }
                w.map(2)?.u8(1)?.str(&stream.name())?.u8(2)?.u64(*from)?;
            }
            Self::AccessToken { device, scope } => {
                w.map(2)?.u8(1)?.str(device)?.u8(2)?.str(scope.as_str())?;
            }
            Self::Refresh { grant } => {
                w.map(1)?.u8(1)?.bytes(grant)?;
            }
            Self::LiftQuarantine { client } => {
                w.map(1)?.u8(1)?.str(client)?;
            }
            Self::ReportPresentation { presentation } => {
                w.map(1)?.u8(1)?.bytes(presentation)?;
            }
            Self::Revoke(target) => {
                w.map(2)?.u8(1)?;
                w.u64(target.kind())?.u8(2)?;
                match target {
                    RevokeTarget::TokenHash(h) => w.bytes(h)?,
                    RevokeTarget::TokenId(cti) => w.bytes(cti)?,
                    RevokeTarget::Subject(id)
                    | RevokeTarget::Device(id)
                    | RevokeTarget::Group(id)
                    | RevokeTarget::Role(id) => w.str(id)?,
                    RevokeTarget::Devices(list) => {
                        list.encode(w)?;
                        w
                    }
                };
            }
        }
        Ok(())
    }

    fn decode<'b>(op: Operation, r: &mut Reader<'b>) -> Result<RequestBody<'b>, Error> {
        let n = r.map(4)?;
        let mut seen = SeenKeys::default();
        let mut body = Fields::default();
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match (op, k) {
                (Operation::Enroll, 1) => body.key = Some(PublicKey::decode(r)?),
                (Operation::Enroll, 2) => body.proof = Some(r.bytes_exact::<32>("code_proof")?),
                (Operation::AccessToken | Operation::LiftQuarantine, 1) => {
                    body.text = Some(read_id(r)?)
                }
                (Operation::AccessToken, 2) => {
                    body.scope = Some(Scopes::parse(r.str(MAX_SCOPE_LEN)?)?)
                }
                (Operation::Refresh, 1) => {
                    let grant = r.bytes(MAX_GRANT_LEN)?;
                    if grant.is_empty() {
                        return Err(DecodeError::InvalidValue("grant").into());
                    }
                    body.bytes = Some(grant);
                }
                (Operation::ReportPresentation, 1) => {
                    let presentation = r.bytes(MAX_PRESENTATION_LEN)?;
                    if presentation.is_empty() {
                        return Err(DecodeError::InvalidValue("presentation").into());
                    }
                    body.bytes = Some(presentation);
                }
                (Operation::Revoke, 1) => body.kind = Some(r.uint()?),
                (Operation::Revoke, 2) => body.value = Some(r.position()),
                (Operation::FetchRevocations, 1) => {
                    body.stream = Some(Stream::parse(r.str(MAX_STREAM_NAME_LEN)?)?)
                }
                (Operation::FetchRevocations, 2) => {
                    let from = r.uint()?;
                    if from == 0 {
                        return Err(DecodeError::InvalidValue("from").into());
                    }
                    body.from = Some(from);
                }
                _ => return Err(DecodeError::InvalidValue("body key").into()),
            }
            if (op, k) == (Operation::Revoke, 2) {
                r.skip()?;
            }
        }
        Ok(match op {
            Operation::Enroll => RequestBody::Enroll {
                key: body.key.ok_or(DecodeError::MissingField("key"))?,
                code_proof: body.proof,
            },
            Operation::DeviceToken => RequestBody::DeviceToken,
            Operation::FetchRevocations => RequestBody::FetchRevocations {
                stream: body.stream.ok_or(DecodeError::MissingField("stream"))?,
                from: body.from.ok_or(DecodeError::MissingField("from"))?,
            },
            Operation::AccessToken => RequestBody::AccessToken {
                device: body.text.ok_or(DecodeError::MissingField("device"))?,
                scope: body.scope.ok_or(DecodeError::MissingField("scope"))?,
            },
            Operation::Refresh => RequestBody::Refresh {
                grant: body.bytes.ok_or(DecodeError::MissingField("grant"))?,
            },
            Operation::LiftQuarantine => RequestBody::LiftQuarantine {
                client: body.text.ok_or(DecodeError::MissingField("client"))?,
            },
            Operation::ReportPresentation => RequestBody::ReportPresentation {
                presentation: body
                    .bytes
                    .ok_or(DecodeError::MissingField("presentation"))?,
            },
            Operation::Revoke => {
                let kind = body.kind.ok_or(DecodeError::MissingField("kind"))?;
                let at = body.value.ok_or(DecodeError::MissingField("value"))?;
                RequestBody::Revoke(decode_target(r, kind, at)?)
            }
        })
    }
}

/// Fields seen while decoding a body, before the operation decides which are required.
#[derive(Default)]
struct Fields<'b> {
    key: Option<PublicKey>,
    proof: Option<[u8; 32]>,
    text: Option<&'b str>,
    scope: Option<Scopes<'b>>,
    bytes: Option<&'b [u8]>,
    kind: Option<u64>,
    value: Option<usize>,
    stream: Option<Stream<'b>>,
    from: Option<u64>,
}

/// The revoke value can only be typed once its kind is known, which may come after it.
fn decode_target<'b>(r: &Reader<'b>, kind: u64, at: usize) -> Result<RevokeTarget<'b>, Error> {
    let mut v = r.at(at);
    Ok(match kind {
        0 => RevokeTarget::TokenHash(v.bytes_exact::<32>("token hash")?),
        1 => {
            let cti = v.bytes(crate::claims::MAX_CTI_LEN)?;
            if cti.is_empty() {
                return Err(DecodeError::InvalidValue("token id").into());
            }
            RevokeTarget::TokenId(cti)
        }
        2 => RevokeTarget::Subject(read_id(&mut v)?),
        3 => RevokeTarget::Device(read_id(&mut v)?),
        4 => RevokeTarget::Group(read_id(&mut v)?),
        5 => RevokeTarget::Role(read_id(&mut v)?),
        6 => RevokeTarget::Devices(IdList::decode(&mut v)?),
        _ => return Err(DecodeError::InvalidValue("revoke kind").into()),
    })
}

/// A client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The sender's id; must be the client whose key signed the request.
    pub client: &'a str,
    /// Chosen by the client to match the response to this request.
    pub request_id: u64,
    /// The client's time when sending, Unix seconds.
    pub issued_at: u64,
    /// Fresh random bytes; the hub refuses a nonce it has seen in the freshness window.
    pub nonce: [u8; NONCE_LEN],
    /// What is asked for.
    pub body: RequestBody<'a>,
}

impl<'a> Request<'a> {
    /// The operation asked for.
    pub fn operation(&self) -> Operation {
        self.body.operation()
    }

    /// Writes the payload map into `out`; returns its length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        w.map(7)?
            .u8(0)?
            .u64(MessageType::Request.as_u64())?
            .u8(1)?
            .u64(self.operation().as_u64())?
            .u8(2)?
            .str(self.client)?
            .u8(3)?
            .u64(self.request_id)?
            .u8(4)?
            .u64(self.issued_at)?
            .u8(5)?
            .bytes(&self.nonce)?
            .u8(6)?;
        self.body.encode(&mut w)?;
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a payload map strictly.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::Request, 6)?;
        let mut seen = SeenKeys::default();
        let mut op = None;
        let (mut client, mut request_id, mut issued_at, mut nonce) = (None, None, None, None);
        let mut body_at = None;
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                1 => {
                    op = Some(
                        Operation::from_u64(r.uint()?).ok_or(DecodeError::InvalidValue("op"))?,
                    )
                }
                2 => client = Some(read_id(&mut r)?),
                3 => request_id = Some(r.uint()?),
                4 => issued_at = Some(r.uint()?),
                5 => nonce = Some(r.bytes_exact::<NONCE_LEN>("nonce")?),
                6 => {
                    body_at = Some(r.position());
                    r.skip()?;
                }
                _ => return Err(DecodeError::InvalidValue("request key").into()),
            }
        }
        r.finish()?;
        let op = op.ok_or(DecodeError::MissingField("op"))?;
        let body_at = body_at.ok_or(DecodeError::MissingField("body"))?;
        let mut body_reader = Reader::new(payload).at(body_at);
        let body = RequestBody::decode(op, &mut body_reader)?;
        Ok(Self {
            client: client.ok_or(DecodeError::MissingField("client"))?,
            request_id: request_id.ok_or(DecodeError::MissingField("request_id"))?,
            issued_at: issued_at.ok_or(DecodeError::MissingField("issued_at"))?,
            nonce: nonce.ok_or(DecodeError::MissingField("nonce"))?,
            body,
        })
    }

    /// Signs the request with the client's key into `out`; returns the length.
    pub fn sign(&self, signer: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
        cose::sign_with(signer, out, |buf| self.encode_to(buf))
    }
}

/// A decoded request whose signature has not been checked yet.
///
/// The hub reads [`client`](Self::client) to find the registered key (or, for enrollment,
/// [`enrollment_key`](Self::enrollment_key)), then [`verify`](Self::verify) hands out the
/// request. Nothing else of an unverified request is reachable.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    envelope: Sign1<'a>,
    request: Request<'a>,
}

/// What a request says about itself before anything else of it is read: enough for the
/// hub to refuse an oversized request cheaply, and to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The operation it claims.
    pub op: Operation,
    /// The client it claims to come from.
    pub client: &'a str,
    /// Its request id.
    pub request_id: u64,
    /// Its nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl<'a> RequestHead<'a> {
    /// Reads the head of a signed request (at most [`MAX_REQUEST_LEN`](cose::MAX_REQUEST_LEN)
    /// bytes) without decoding its body, and without checking anything: a sender writes the
    /// body last, so for a well-formed request the body is never walked.
    pub fn peek(bytes: &'a [u8]) -> Result<Self, Error> {
        let envelope = Sign1::decode_within(bytes, cose::MAX_REQUEST_LEN)?;
        let payload = envelope.unverified_payload();
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::Request, 6)?;
        let (mut op, mut client, mut request_id, mut nonce) = (None, None, None, None);
        for _ in 0..n {
            if op.is_some() && client.is_some() && request_id.is_some() && nonce.is_some() {
                break;
            }
            match r.key()? {
                1 => {
                    op = Some(
                        Operation::from_u64(r.uint()?).ok_or(DecodeError::InvalidValue("op"))?,
                    )
                }
                2 => client = Some(read_id(&mut r)?),
                3 => request_id = Some(r.uint()?),
                5 => nonce = Some(r.bytes_exact::<NONCE_LEN>("nonce")?),
                _ => r.skip()?,
            }
        }
        Ok(Self {
            op: op.ok_or(DecodeError::MissingField("op"))?,
            client: client.ok_or(DecodeError::MissingField("client"))?,
            request_id: request_id.ok_or(DecodeError::MissingField("request_id"))?,
            nonce: nonce.ok_or(DecodeError::MissingField("nonce"))?,
        })
    }
}

impl<'a> SignedRequest<'a> {
    /// Decodes the envelope (at most [`MAX_REQUEST_LEN`](cose::MAX_REQUEST_LEN) bytes)
    /// and the payload strictly, without checking the signature.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        let envelope = Sign1::decode_within(bytes, cose::MAX_REQUEST_LEN)?;
        let request = Request::decode(envelope.unverified_payload())?;
        Ok(Self { envelope, request })
    }

    /// The client the request claims to come from (unverified).
    pub fn client(&self) -> &'a str {
        self.request.client
    }

    /// The request id and nonce, so even a refused request's response can echo them.
    pub fn correlation(&self) -> (u64, [u8; NONCE_LEN]) {
        (self.request.request_id, self.request.nonce)
    }

    /// The operation the request claims to ask for (unverified).
    pub fn operation(&self) -> Operation {
        self.request.operation()
    }

    /// The `kid` of the key that claims to have signed it.
    pub fn kid(&self) -> &'a [u8] {
        self.envelope.kid()
    }

    /// For an enrollment request, the key in its body, which must also have signed it.
    pub fn enrollment_key(&self) -> Option<PublicKey> {
        match self.request.body {
            RequestBody::Enroll { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Checks the signature with the sender's key and returns the request.
    pub fn verify(self, key: &dyn Verifier) -> Result<Request<'a>, Error> {
        self.envelope.verify_with(key)?;
        Ok(self.request)
    }
}

/// One-time enrollment codes, proved without sending them.
///
/// A code printed for a device that generates its key on first boot must not cross the
/// broker in the clear, or anyone reading the broker could enroll their own key with it.
/// The device sends `HMAC-SHA256(code_key, client ‖ 0x00 ‖ kid ‖ nonce)` instead, where
/// `code_key = SHA-256("tessera-enroll-v1" ‖ canonical code)`: bound to its key and this
/// request. The hub stores only `code_key`.
///
/// Codes are typed by people, so the key is derived from the code's canonical form
/// ([`EnrollmentCode::canonical_chars`]): case, spaces and the placement of dashes do not
/// matter. The hub prints codes in that form (`K7QFM-2XD9W-PLR4T-HN6JA`).
#[derive(Debug, Clone, Copy)]
pub struct EnrollmentCode;

impl EnrollmentCode {
    /// Characters of a canonical code between two dashes.
    pub const GROUP: usize = 5;

    /// The key derived from a code, as typed; what the hub stores.
    pub fn derive_key(code: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"tessera-enroll-v1");
        let mut utf8 = [0u8; 4];
        for c in Self::canonical_chars(code) {
            h.update(c.encode_utf8(&mut utf8).as_bytes());
        }
        h.finalize().into()
    }

    /// The canonical form of a code as typed (PROTOCOL.md §8.5.1): ASCII letters in upper
    /// case, white space and `-` left out, then a `-` after every [`Self::GROUP`]
    /// characters but the last. `k7qfm 2xd9w-plr4thn6ja` reads as `K7QFM-2XD9W-PLR4T-HN6JA`.
    pub fn canonical_chars(code: &str) -> impl Iterator<Item = char> + '_ {
        code.chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .enumerate()
            .flat_map(|(i, c)| {
                let dash = (i > 0 && i % Self::GROUP == 0).then_some('-');
                dash.into_iter().chain(core::iter::once(c))
            })
    }

    /// The proof a device puts in its enrollment request.
    pub fn proof(
        code_key: &[u8; 32],
        client: &str,
        kid: &Kid,
        nonce: &[u8; NONCE_LEN],
    ) -> [u8; 32] {
        Self::mac(code_key, client, kid, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a proof in constant time.
    pub fn check(
        code_key: &[u8; 32],
        client: &str,
        kid: &Kid,
        nonce: &[u8; NONCE_LEN],
        proof: &[u8; 32],
    ) -> bool {
        Self::mac(code_key, client, kid, nonce)
            .verify_slice(proof)
            .is_ok()
    }

    fn mac(code_key: &[u8; 32], client: &str, kid: &Kid, nonce: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(code_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(client.as_bytes());
        mac.update(&[0]);
        mac.update(kid);
        mac.update(nonce);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testing::signer;

    fn request(body: RequestBody<'static>) -> Request<'static> {
        Request {
            client: "device-42",
            request_id: 7,
            issued_at: 1_700_000_000,
            nonce: [3; NONCE_LEN],
            body,
        }
    }

    const LIST: &[&str] = &["device-1", "device-2", "device-3"];

    fn every_body() -> [RequestBody<'static>; 15] {
        [
            RequestBody::Enroll {
                key: signer(2).public_key(),
                code_proof: None,
            },
            RequestBody::Enroll {
                key: signer(2).public_key(),
                code_proof: Some([9; 32]),
            },
            RequestBody::DeviceToken,
            RequestBody::AccessToken {
                device: "device-1",
                scope: Scopes::parse("door:open").expect("valid"),
            },
            RequestBody::Refresh { grant: &[1; 32] },
            RequestBody::Revoke(RevokeTarget::TokenHash([4; 32])),
            RequestBody::Revoke(RevokeTarget::TokenId(&[5; 16])),
            RequestBody::Revoke(RevokeTarget::Subject("app-1")),
            RequestBody::Revoke(RevokeTarget::Device("device-9")),
            RequestBody::Revoke(RevokeTarget::Group("building-a")),
            RequestBody::Revoke(RevokeTarget::Role("sensor")),
            RequestBody::Revoke(RevokeTarget::Devices(IdList::new(LIST))),
            RequestBody::FetchRevocations {
                stream: Stream::Devices(0x3f),
                from: 17,
            },
            RequestBody::LiftQuarantine { client: "app-7" },
            RequestBody::ReportPresentation {
                presentation: &[0x84, 0x40, 0xa0, 0x40, 0x40],
            },
        ]
    }

    #[test]
    fn a_lift_quarantine_body_is_exactly_one_valid_client_id() {
        let encode = |body: &[u8]| {
            // {0: 1, 1: 7, 2: "device-42", 3: 7, 4: issued_at, 5: nonce, 6: body}
            let mut out = [0u8; 256];
            let mut w = crate::cbor::writer(&mut out);
            w.map(7).expect("map");
            w.u8(0).and_then(|w| w.u64(1)).expect("type");
            w.u8(1).and_then(|w| w.u64(7)).expect("op");
            w.u8(2).and_then(|w| w.str("device-42")).expect("client");
            w.u8(3).and_then(|w| w.u64(7)).expect("id");
            w.u8(4).and_then(|w| w.u64(1_700_000_000)).expect("iat");
            w.u8(5)
                .and_then(|w| w.bytes(&[3; NONCE_LEN]))
                .expect("nonce");
            w.u8(6).expect("body");
            let n = crate::cbor::written(&w);
            out[n..n + body.len()].copy_from_slice(body);
            out[..n + body.len()].to_vec()
        };
        // {1: "app-7"}
        let ok = encode(&[0xa1, 0x01, 0x65, b'a', b'p', b'p', b'-', b'7']);
        let back = Request::decode(&ok).expect("decode");
        assert_eq!(back.body, RequestBody::LiftQuarantine { client: "app-7" });
        for bad in [
            &[0xa0][..],                                 // {}: no client
            &[0xa1, 0x02, 0x61, b'a'],                   // {2: "a"}: unknown key
            &[0xa1, 0x01, 0x63, b'a', b'/', b'b'],       // {1: "a/b"}: not an id
            &[0xa2, 0x01, 0x61, b'a', 0x01, 0x61, b'b'], // duplicate key
            &[0xa1, 0x01, 0x41, b'a'],                   // {1: h'61'}: not text
        ] {
            assert!(Request::decode(&encode(bad)).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn every_operation_round_trips_through_a_signed_envelope() {
        for body in every_body() {
            let req = request(body);
            let mut out = [0u8; 512];
            let n = req.sign(&signer(1), &mut out).expect("sign");
            let signed = SignedRequest::decode(&out[..n]).expect("decode");
            assert_eq!(signed.client(), "device-42");
            assert_eq!(signed.verify(&signer(1).public_key()), Ok(req));
        }
    }

    #[test]
    fn the_head_of_a_request_is_read_without_its_body() {
        for body in every_body() {
            let req = request(body);
            let mut out = [0u8; 512];
            let n = req.sign(&signer(1), &mut out).expect("sign");
            let head = RequestHead::peek(&out[..n]).expect("peek");
            assert_eq!(
                (head.op, head.client, head.request_id, head.nonce),
                (req.operation(), "device-42", 7, [3; NONCE_LEN])
            );
        }
        // A body that does not decode: the head is still read (the body is never walked),
        // while the request as a whole is refused.
        let req = request(RequestBody::Revoke(RevokeTarget::Devices(IdList::new(
            LIST,
        ))));
        let mut payload = [0u8; 512];
        let n = req.encode_to(&mut payload).expect("encode");
        let at = payload[..n]
            .windows(8)
            .position(|w| w == b"device-3")
            .expect("the last id");
        payload[at] = b'/';
        let mut out = [0u8; 640];
        let m = cose::sign(&signer(1), &payload[..n], &mut out).expect("sign");
        assert!(SignedRequest::decode(&out[..m]).is_err());
        assert_eq!(
            RequestHead::peek(&out[..m]).map(|h| h.op),
            Ok(Operation::Revoke)
        );
    }

    #[test]
    fn a_decoded_device_list_reads_back_its_ids() {
        let req = request(RequestBody::Revoke(RevokeTarget::Devices(IdList::new(
            LIST,
        ))));
        let mut out = [0u8; 512];
        let n = req.encode_to(&mut out).expect("encode");
        let back = Request::decode(&out[..n]).expect("decode");
        let RequestBody::Revoke(RevokeTarget::Devices(list)) = back.body else {
            panic!("not a device list: {back:?}");
        };
        assert_eq!(list.len(), 3);
        assert!(list.iter().eq(LIST.iter().copied()));
    }

    #[test]
    fn device_lists_must_hold_valid_ids_and_not_be_empty() {
        let mut out = [0u8; 512];
        for bad in [&[][..], &["ok", "not/an/id"][..]] {
            let req = request(RequestBody::Revoke(RevokeTarget::Devices(IdList::new(bad))));
            assert!(req.encode_to(&mut out).is_err(), "{bad:?}");
        }
        // An empty array on the wire: {1: 6, 2: []}.
        let n = request(RequestBody::Revoke(RevokeTarget::Group("g")))
            .encode_to(&mut out)
            .expect("encode");
        let at = out[..n]
            .windows(3)
            .position(|w| w == [0x02, 0x61, b'g'])
            .expect("value");
        let mut bytes = out[..n].to_vec();
        bytes[at - 1] = 6; // kind
        bytes[at + 1] = 0x80; // []
        bytes.remove(at + 2);
        assert_eq!(
            Request::decode(&bytes),
            Err(DecodeError::InvalidValue("device list").into())
        );
    }

    #[test]
    fn a_request_signed_by_another_key_is_refused() {
        let mut out = [0u8; 512];
        let n = request(RequestBody::DeviceToken)
            .sign(&signer(1), &mut out)
            .expect("sign");
        let signed = SignedRequest::decode(&out[..n]).expect("decode");
        assert!(signed.verify(&signer(2).public_key()).is_err());
    }

    #[test]
    fn body_keys_of_another_operation_are_refused() {
        // A device-token request carrying an access-token body field.
        let mut buf = [0u8; 256];
        let n = request(RequestBody::AccessToken {
            device: "d",
            scope: Scopes::parse("a:b").expect("valid"),
        })
        .encode_to(&mut buf)
        .expect("encode");
        // op is the 4th byte: a7 00 01 01 <op>
        assert_eq!(buf[4], 3);
        buf[4] = 2;
        assert_eq!(
            Request::decode(&buf[..n]),
            Err(DecodeError::InvalidValue("body key").into())
        );
    }

    #[test]
    fn a_response_payload_is_not_a_request() {
        let mut buf = [0u8; 256];
        let n = request(RequestBody::DeviceToken)
            .encode_to(&mut buf)
            .expect("encode");
        buf[2] = 2; // message type: response
        assert_eq!(
            Request::decode(&buf[..n]),
            Err(DecodeError::InvalidValue("message type").into())
        );
    }

    #[test]
    fn enrollment_codes_are_read_as_typed_by_people() {
        let printed = "K7QFM-2XD9W-PLR4T-HN6JA";
        let canonical: heapless::String<32> =
            EnrollmentCode::canonical_chars(" k7qfm 2xd9w-PLR4THN6ja\n").collect();
        assert_eq!(canonical.as_str(), printed);
        let key = EnrollmentCode::derive_key(printed);
        // A printed code is its own canonical form: the key of a code issued before codes
        // were canonicalized is unchanged.
        assert_eq!(
            key,
            crate::crypto::sha256(&[b"tessera-enroll-v1", printed.as_bytes()])
        );
        for typed in [
            "k7qfm-2xd9w-plr4t-hn6ja",
            "K7QFM2XD9WPLR4THN6JA",
            "K7QF M2XD 9WPL R4TH N6JA",
            "  K7QFM-2XD9W--PLR4T-HN6JA\t",
        ] {
            assert_eq!(EnrollmentCode::derive_key(typed), key, "{typed:?}");
        }
        // Other characters still count.
        assert_ne!(EnrollmentCode::derive_key("K7QFM-2XD9W-PLR4T-HN6JB"), key);
        assert_ne!(EnrollmentCode::derive_key("K7QFM-2XD9W-PLR4T-HN6J"), key);
    }

    #[test]
    fn enrollment_code_proof_is_bound_to_key_client_and_nonce() {
        let k = EnrollmentCode::derive_key("ABCD-EFGH-IJKL");
        let kid = signer(2).kid();
        let p = EnrollmentCode::proof(&k, "device-42", &kid, &[1; 16]);
        assert!(EnrollmentCode::check(&k, "device-42", &kid, &[1; 16], &p));
        assert!(!EnrollmentCode::check(&k, "device-43", &kid, &[1; 16], &p));
        assert!(!EnrollmentCode::check(
            &k,
            "device-42",
            &signer(3).kid(),
            &[1; 16],
            &p
        ));
        assert!(!EnrollmentCode::check(&k, "device-42", &kid, &[2; 16], &p));
        let other = EnrollmentCode::derive_key("ABCD-EFGH-IJKM");
        assert!(!EnrollmentCode::check(
            &other,
            "device-42",
            &kid,
            &[1; 16],
            &p
        ));
    }
}
