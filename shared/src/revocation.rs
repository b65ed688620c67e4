//! The revocation list: its entries, the streams that carry them to the verifiers they
//! concern, the two payloads on those streams (page and heartbeat), and the list a verifier
//! keeps.
//!
//! The ideas are RFC 9770's, carried over MQTT. An entry names either one token (by the
//! SHA-256 of its canonical encoding) or a subject (everything issued to it before a time),
//! and is **addressed** to the one audience whose tokens it can affect: a device, for the
//! access tokens presented to it, or a service, for the device tokens it accepts. Each entry
//! carries `expires_at`, the moment every token it covers has expired anyway; after that
//! (plus the verifier's clock-skew leeway) it is useless and drops out, so a list is bounded
//! by the revocations *concerning its verifier* within one token lifetime.
//!
//! # Streams
//!
//! Entries travel on **streams**, so a verifier receives only a small part of the fleet's
//! revocations and stores only its own:
//!
//! - `devices/{pp}`: one of [`PARTITIONS`] partitions of the device audiences, chosen by
//!   [`partition`] (the first byte of SHA-256 of the device id, in two lowercase hex
//!   digits). A device follows its partition and keeps the entries addressed to itself.
//! - `service/{name}`: one stream per service audience (what device tokens name). A service
//!   follows its own stream; a device never sees the revocation of another device.
//!
//! Every stream numbers its changes 1, 2, 3… with no gaps; 0 is the empty stream.
//!
//! # Pages and heartbeats
//!
//! A [`Page`] carries the entries of the consecutive changes `from..=to` of one stream that
//! are still in force, and the stream's latest change number `seq` when it was built. A
//! delta (one change, published as it happens) is the page `from = to = seq`; a snapshot is
//! the set of pages covering `1..=seq`, as large as it needs to be. A page is a true
//! statement about its range whenever it was built, because changes are never altered once
//! numbered: a verifier may combine pages in any order, from any build, from the retained
//! topics or from `fetch_revocations`. A [`Heartbeat`] names the stream's latest number
//! with a fresh `issued_at`, so a verifier knows how current it is: a broker that
//! suppresses changes cannot also forge fresh heartbeats, and the verifier sees its
//! knowledge age.
//!
//! # The list
//!
//! [`RevocationList`] keeps the entries addressed to its verifier in an [`EntryStore`]
//! ([`Bounded`] for devices, [`Indexed`] for services with `std`), the prefix `1..=n` of
//! changes it has fully applied, and how fresh that is. It fails closed: a change whose
//! entries do not fit is not counted as applied, and its knowledge stops being fresh.
//!
//! This module handles the *unsigned payload bytes*; wrapping them in COSE_Sign1 and checking
//! the hub's signature happens elsewhere, before anything here is applied.

use core::borrow::Borrow;
use core::fmt::Write;

use crate::MAX_ID_LEN;
use crate::cbor::{self, Reader, SeenKeys, Writer};
use crate::error::{CapacityError, DecodeError, EncodeError, Error};
use crate::message::{KEY_MESSAGE_TYPE, MessageType, validate_id};

/// Length of a [`TokenHash`] in bytes.
pub const TOKEN_HASH_LEN: usize = 32;

/// SHA-256 of a token's canonical encoding (see [`token_hash`]).
///
/// Hashing the token, rather than a claim such as `cti`, means a verifier needs nothing
/// but the token it was shown to look it up, and the hub can revoke a token it only knows by
/// its bytes.
pub type TokenHash = [u8; TOKEN_HASH_LEN];

/// The [`TokenHash`] of `token`: SHA-256 of the token as the hub issues it (RFC 9770's
/// token hash). For anything that decodes as a COSE_Sign1 this is computed over the
/// canonical encoding ([`Sign1::canonical_hash`](crate::cose::Sign1::canonical_hash)), so
/// a token re-encoded by its holder (tag dropped or added, high-`s` signature) still has
/// the hash it was revoked under; other bytes are hashed as they are.
pub fn token_hash(token: &[u8]) -> TokenHash {
    match crate::cose::Sign1::decode(token) {
        Ok(envelope) => envelope.canonical_hash(),
        Err(_) => crate::crypto::sha256(&[token]),
    }
}

/// Checks a signed message from a revocation stream or a `fetch_revocations` answer
/// (at most [`MAX_PAGE_LEN`] bytes, §2.4) and returns its payload once its signature
/// verifies with a key of `keys`; decode it with [`StreamMessage::decode`] or
/// [`Page::decode`].
pub fn verify<'a>(
    signed: &'a [u8],
    keys: &dyn crate::crypto::KeyLookup,
) -> Result<&'a [u8], Error> {
    crate::cose::Sign1::decode_within(signed, MAX_PAGE_LEN)?.verify(keys)
}

/// Entries a device keeps by default: the revocations addressed to it within one access
/// token lifetime, at about 100 bytes each, so the whole list stays near 6.5 KiB of RAM.
pub const MAX_REVOKED: usize = 64;

/// Number of device partitions ([`partition`]).
pub const PARTITIONS: usize = 256;

/// Longest signed page or heartbeat (the whole COSE_Sign1), in bytes: small enough that
/// a page also fits, with the response around it, within the protocol's 16 384-byte
/// message limit ([`cose::MAX_SIGN1_LEN`](crate::cose::MAX_SIGN1_LEN)).
pub const MAX_PAGE_LEN: usize = 16_000;

/// Most entries one page may carry. The size limit binds first for every real page; this
/// bounds what a decoder walks.
pub const MAX_ENTRIES_PER_PAGE: usize = 2048;

/// Default number of separate ranges of changes a verifier can hold as applied beyond its
/// contiguous prefix (pages that arrived out of order, or after a gap) before it must
/// fetch them again: plenty for a device, whose snapshot is a page or two. A service that
/// takes a snapshot of hundreds of retained pages, delivered in whatever order the broker
/// keeps them, uses a larger `P` ([`RevocationList`]).
pub const MAX_PENDING_RANGES: usize = 4;

/// Default clock-skew leeway, in seconds, a [`RevocationList`] keeps entries past their
/// `expires_at`; the same default as token verification.
pub const DEFAULT_LEEWAY: u64 = 30;

/// The largest clock-skew leeway a verifier may use, in seconds (and the largest the hub's
/// policy allows). The hub serves an entry until `expires_at + MAX_LEEWAY`, so a verifier
/// with any leeway up to this one finds every entry it still needs when it fetches.
pub const MAX_LEEWAY: u64 = 300;

/// Default maximum age of revocation knowledge, in seconds, until a heartbeat announces the
/// hub's own ([`Heartbeat::max_age`]): three heartbeats of the reference hub.
pub const DEFAULT_MAX_AGE: u64 = 90;

/// Map key of the stream's latest change number in pages and heartbeats.
pub const KEY_SEQ: i64 = 1;
/// Map key of the hub's issue time (Unix seconds).
pub const KEY_ISSUED_AT: i64 = 2;
/// Map key of a page's entry array.
pub const KEY_ENTRIES: i64 = 3;
/// Map key of the stream name.
pub const KEY_STREAM: i64 = 4;
/// Map key of a page's first change number.
pub const KEY_FROM: i64 = 5;
/// Map key of a page's last change number.
pub const KEY_TO: i64 = 6;
/// Map key of a heartbeat's announced maximum age of knowledge.
pub const KEY_MAX_AGE: i64 = 7;

/// First element of a token entry, `[0, audience, h'hash', expires_at]`.
pub const ENTRY_KIND_TOKEN: u64 = 0;
/// First element of a subject entry, `[1, audience, "subject", issued_before, expires_at]`.
pub const ENTRY_KIND_SUBJECT: u64 = 1;

/// The device partition of `device`: the first byte of SHA-256 of its id.
pub fn partition(device: &str) -> u8 {
    crate::crypto::sha256(&[device.as_bytes()])[0]
}

/// Longest stream name: `service/` and an identifier.
pub const MAX_STREAM_NAME_LEN: usize = "service/".len() + MAX_ID_LEN;

/// A stream name, built without an allocator.
pub type StreamName = heapless::String<MAX_STREAM_NAME_LEN>;

/// Which verifiers a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream<'a> {
    /// The devices of one partition: `devices/{pp}`.
    Devices(u8),
    /// One service audience: `service/{name}`.
    Service(&'a str),
}

impl<'a> Stream<'a> {
    /// The stream a device follows.
    pub fn of_device(device: &str) -> Stream<'static> {
        Stream::Devices(partition(device))
    }

    /// The stream a service follows; its name must be an identifier.
    pub fn of_service(service: &'a str) -> Result<Self, Error> {
        validate_id(service)?;
        Ok(Stream::Service(service))
    }

    /// `devices/{pp}` or `service/{name}`: the stream's topic levels and its name in
    /// payloads.
    pub fn name(&self) -> StreamName {
        let mut s = StreamName::new();
        // Both forms fit MAX_STREAM_NAME_LEN by construction.
        let _ = match self {
            Stream::Devices(p) => write!(s, "devices/{p:02x}"),
            Stream::Service(name) => write!(s, "service/{name}"),
        };
        s
    }

    /// Parses a stream name.
    pub fn parse(name: &'a str) -> Result<Self, Error> {
        if let Some(hex) = name.strip_prefix("devices/") {
            let valid =
                hex.len() == 2 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            return match u8::from_str_radix(hex, 16) {
                Ok(p) if valid => Ok(Stream::Devices(p)),
                _ => Err(DecodeError::InvalidValue("stream").into()),
            };
        }
        if let Some(service) = name.strip_prefix("service/") {
            return Self::of_service(service)
                .map_err(|_| DecodeError::InvalidValue("stream").into());
        }
        Err(DecodeError::InvalidValue("stream").into())
    }

    /// Whether an entry addressed to `audience` travels on this stream.
    pub fn carries(&self, audience: &str) -> bool {
        match self {
            Stream::Devices(p) => partition(audience) == *p,
            Stream::Service(name) => *name == audience,
        }
    }
}

/// One revocation, as a verifier stores it (the audience is its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// One token, named by its [`TokenHash`].
    Token {
        /// SHA-256 of the token's canonical encoding.
        hash: TokenHash,
        /// When the token expires, plus the hub's leeway (Unix seconds); the entry is
        /// useless afterwards.
        expires_at: u64,
    },
    /// Every token of `subject` issued (`iat`) strictly before `issued_before`.
    Subject {
        /// The device or app whose tokens are revoked.
        subject: heapless::String<MAX_ID_LEN>,
        /// Tokens with `iat < issued_before` are revoked (Unix seconds).
        issued_before: u64,
        /// When the last token this entry covers expires, plus the hub's leeway (Unix
        /// seconds).
        expires_at: u64,
    },
}

impl Entry {
    /// A subject entry; fails if `subject` is empty or longer than [`MAX_ID_LEN`] bytes,
    /// which no client identifier is.
    pub fn for_subject(subject: &str, issued_before: u64, expires_at: u64) -> Result<Self, Error> {
        if subject.is_empty() {
            return Err(EncodeError::InvalidValue("subject").into());
        }
        let subject = heapless::String::try_from(subject)
            .map_err(|_| EncodeError::InvalidValue("subject"))?;
        Ok(Entry::Subject {
            subject,
            issued_before,
            expires_at,
        })
    }

    /// When every token this entry covers has expired (Unix seconds).
    pub fn expires_at(&self) -> u64 {
        match self {
            Entry::Token { expires_at, .. } | Entry::Subject { expires_at, .. } => *expires_at,
        }
    }

    /// Whether this entry revokes the token with `hash`, issued to `subject` at `issued_at`.
    pub fn covers(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
        match self {
            Entry::Token { hash: h, .. } => h == hash,
            Entry::Subject {
                subject: s,
                issued_before,
                ..
            } => s.as_str() == subject && issued_at < *issued_before,
        }
    }

    /// Whether the entry can be forgotten at `now`: every token it covers is past its expiry
    /// even allowing `leeway` for clock skew, so a verifier refuses them anyway.
    pub fn is_spent(&self, now: u64, leeway: u64) -> bool {
        now > self.expires_at().saturating_add(leeway)
    }

    /// Folds `other` into `self` if both name the same token or subject; returns whether
    /// it did. The later cut-off covers every token the earlier one did, and those tokens
    /// live until the later expiry at most.
    pub fn merge(&mut self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::Token {
                    hash: h,
                    expires_at: e,
                },
                Entry::Token { hash, expires_at },
            ) if h == hash => {
                *e = (*e).max(*expires_at);
                true
            }
            (
                Entry::Subject {
                    subject: s,
                    issued_before: b,
                    expires_at: e,
                },
                Entry::Subject {
                    subject,
                    issued_before,
                    expires_at,
                },
            ) if s == subject => {
                *b = (*b).max(*issued_before);
                *e = (*e).max(*expires_at);
                true
            }
            _ => false,
        }
    }
}

/// An entry addressed to one audience, as it travels in a page.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addressed {
    /// The device or service whose verifier the entry concerns: the `aud` of the tokens it
    /// covers.
    pub audience: heapless::String<MAX_ID_LEN>,
    /// What is revoked.
    pub entry: Entry,
}

impl Addressed {
    /// `entry` addressed to `audience`, which must be an identifier.
    pub fn new(audience: &str, entry: Entry) -> Result<Self, Error> {
        validate_id(audience).map_err(|_| EncodeError::InvalidValue("audience"))?;
        Ok(Self {
            audience: heapless::String::try_from(audience)
                .map_err(|_| EncodeError::InvalidValue("audience"))?,
            entry,
        })
    }

    /// Bytes this entry takes in a page.
    pub fn encoded_len(&self) -> usize {
        let mut buf = [0u8; MAX_ENTRY_LEN];
        let mut w = cbor::writer(&mut buf);
        // MAX_ENTRY_LEN holds the longest entry, so this cannot fail.
        match self.encode(&mut w) {
            Ok(()) => cbor::written(&w),
            Err(_) => MAX_ENTRY_LEN,
        }
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        if self.audience.is_empty() {
            return Err(EncodeError::InvalidValue("audience").into());
        }
        match &self.entry {
            Entry::Token { hash, expires_at } => {
                w.array(4)?
                    .u64(ENTRY_KIND_TOKEN)?
                    .str(&self.audience)?
                    .bytes(hash)?
                    .u64(*expires_at)?;
            }
            Entry::Subject {
                subject,
                issued_before,
                expires_at,
            } => {
                // Decoding refuses an empty subject, so never emit one.
                if subject.is_empty() {
                    return Err(EncodeError::InvalidValue("subject").into());
                }
                w.array(5)?
                    .u64(ENTRY_KIND_SUBJECT)?
                    .str(&self.audience)?
                    .str(subject)?
                    .u64(*issued_before)?
                    .u64(*expires_at)?;
            }
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        // The length is checked against the kind below, so any cap works here; a wrong
        // length is reported as such rather than as "too large".
        let len = r.array(usize::MAX)?;
        if len == 0 {
            return Err(DecodeError::InvalidValue("array length"));
        }
        let kind = r.uint()?;
        let expected_len = match kind {
            ENTRY_KIND_TOKEN => 4,
            ENTRY_KIND_SUBJECT => 5,
            _ => return Err(DecodeError::InvalidValue("revocation entry kind")),
        };
        if len != expected_len {
            return Err(DecodeError::InvalidValue("array length"));
        }
        let audience = r.str(MAX_ID_LEN)?;
        if validate_id(audience).is_err() {
            return Err(DecodeError::InvalidValue("audience"));
        }
        let audience = heapless::String::try_from(audience).map_err(|_| DecodeError::TooLarge)?;
        if kind == ENTRY_KIND_TOKEN {
            let hash = r.bytes_exact::<TOKEN_HASH_LEN>("token hash")?;
            let expires_at = r.uint()?;
            return Ok(Self {
                audience,
                entry: Entry::Token { hash, expires_at },
            });
        }
        let subject = r.str(MAX_ID_LEN)?;
        if validate_id(subject).is_err() {
            return Err(DecodeError::InvalidValue("subject"));
        }
        let subject = heapless::String::try_from(subject).map_err(|_| DecodeError::TooLarge)?;
        let issued_before = r.uint()?;
        let expires_at = r.uint()?;
        Ok(Self {
            audience,
            entry: Entry::Subject {
                subject,
                issued_before,
                expires_at,
            },
        })
    }
}

/// Longest encoding of one entry: a subject entry with two [`MAX_ID_LEN`]-byte texts and two
/// 9-byte integers: array head, kind, two text heads (2 bytes each for 24..=255), the texts,
/// two integers.
pub const MAX_ENTRY_LEN: usize = 1 + 1 + 2 * (2 + MAX_ID_LEN) + 9 + 9;

/// The entries of a decoded page, still in their wire form.
///
/// Every entry was decoded once when the payload was, so iterating cannot fail; the
/// iterator still yields `Result` because it re-decodes from bytes rather than holding up to
/// [`MAX_ENTRIES_PER_PAGE`] decoded entries in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entries<'a> {
    /// The array's items, without the array head.
    items: &'a [u8],
    len: usize,
}

impl<'a> Entries<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries in wire order.
    pub fn iter(&self) -> EntryIter<'a> {
        EntryIter {
            rest: self.items,
            remaining: self.len,
        }
    }

    /// Reads an entry array, checking every entry, and keeps the items' bytes.
    fn decode(r: &mut Reader<'a>, input: &'a [u8]) -> Result<Self, DecodeError> {
        let len = r.array(MAX_ENTRIES_PER_PAGE)?;
        let start = r.position();
        for _ in 0..len {
            Addressed::decode(r)?;
        }
        let items = input
            .get(start..r.position())
            .ok_or(DecodeError::Malformed)?;
        Ok(Self { items, len })
    }
}

impl<'a> IntoIterator for Entries<'a> {
    type Item = Result<Addressed, Error>;
    type IntoIter = EntryIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for &Entries<'a> {
    type Item = Result<Addressed, Error>;
    type IntoIter = EntryIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over [`Entries`]; see there why it yields `Result`.
#[derive(Debug, Clone)]
pub struct EntryIter<'a> {
    rest: &'a [u8],
    remaining: usize,
}

impl Iterator for EntryIter<'_> {
    type Item = Result<Addressed, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let mut r = Reader::new(self.rest);
        match Addressed::decode(&mut r) {
            Ok(entry) => {
                self.rest = self.rest.get(r.position()..).unwrap_or_default();
                self.remaining -= 1;
                Some(Ok(entry))
            }
            Err(e) => {
                // Stop after the first error: the position of the next entry is unknown.
                self.remaining = 0;
                Some(Err(e.into()))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for EntryIter<'_> {}

impl core::iter::FusedIterator for EntryIter<'_> {}

/// A decoded page: the entries still in force of the changes `from..=to` of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<'a> {
    seq: u64,
    issued_at: u64,
    stream: Stream<'a>,
    from: u64,
    to: u64,
    entries: Entries<'a>,
}

impl<'a> Page<'a> {
    /// Decodes `{0: 20, 1: seq, 2: issued_at, 3: [entries], 4: stream, 5: from, 6: to}`,
    /// checking every entry, that each is addressed to an audience of the page's stream,
    /// and that `1 ≤ from ≤ to ≤ seq`. Each key must appear exactly once; other keys,
    /// indefinite lengths and trailing bytes are refused.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let f = decode_payload(payload, MessageType::RevocationPage)?;
        let from = f.from.ok_or(DecodeError::MissingField("from"))?;
        let to = f.to.ok_or(DecodeError::MissingField("to"))?;
        if from == 0 || from > to || to > f.seq {
            return Err(DecodeError::InvalidValue("page range").into());
        }
        let entries = f.entries.ok_or(DecodeError::MissingField("entries"))?;
        // The hub never puts an entry on another stream; a page that does is not one of its
        // pages, and applying part of it would leave the verifier unsure what it holds.
        for entry in entries {
            if !f.stream.carries(&entry?.audience) {
                return Err(
                    DecodeError::InvalidValue("entry audience not on the page's stream").into(),
                );
            }
        }
        Ok(Self {
            seq: f.seq,
            issued_at: f.issued_at,
            stream: f.stream,
            from,
            to,
            entries,
        })
    }

    /// The stream's latest change number when the page was built.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the hub built it (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The stream it belongs to.
    pub fn stream(&self) -> Stream<'a> {
        self.stream
    }

    /// First change number covered.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// Last change number covered.
    pub fn to(&self) -> u64 {
        self.to
    }

    /// The entries of changes `from..=to` still in force when the page was built.
    pub fn entries(&self) -> Entries<'a> {
        self.entries
    }
}

/// A decoded heartbeat: a stream's latest change number as of `issued_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat<'a> {
    seq: u64,
    issued_at: u64,
    stream: Stream<'a>,
    max_age: u64,
}

impl<'a> Heartbeat<'a> {
    /// Decodes `{0: 22, 1: seq, 2: issued_at, 4: stream, 7: max_age}` under the same rules
    /// as [`Page::decode`].
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let f = decode_payload(payload, MessageType::RevocationHeartbeat)?;
        Ok(Self {
            seq: f.seq,
            issued_at: f.issued_at,
            stream: f.stream,
            max_age: f.max_age.ok_or(DecodeError::MissingField("max_age"))?,
        })
    }

    /// The stream's latest change number when the hub issued this heartbeat.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the hub issued it (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The stream it belongs to.
    pub fn stream(&self) -> Stream<'a> {
        self.stream
    }

    /// The hub's recommended maximum age of revocation knowledge on this stream, seconds:
    /// what a verifier uses unless configured otherwise (see PROTOCOL.md §11.6).
    pub fn max_age(&self) -> u64 {
        self.max_age
    }
}

/// A decoded message from a stream's topics: either kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMessage<'a> {
    /// A page (a delta or part of a snapshot).
    Page(Page<'a>),
    /// A heartbeat.
    Heartbeat(Heartbeat<'a>),
}

impl<'a> StreamMessage<'a> {
    /// Decodes a page or a heartbeat, telling them apart by their message type (key 0,
    /// wherever it is in the map).
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        // A payload without a readable type is decoded as a page, which reports what is
        // wrong with it.
        if message_type(payload) == Some(MessageType::RevocationHeartbeat) {
            Heartbeat::decode(payload).map(StreamMessage::Heartbeat)
        } else {
            Page::decode(payload).map(StreamMessage::Page)
        }
    }
}

/// The value of key 0 of a payload map, if it can be read.
fn message_type(payload: &[u8]) -> Option<MessageType> {
    let mut r = Reader::new(payload);
    let n = r.map(cbor::MAX_MAP_ENTRIES).ok()?;
    for _ in 0..n {
        if r.key().ok()? == KEY_MESSAGE_TYPE {
            return MessageType::from_u64(r.uint().ok()?);
        }
        r.skip().ok()?;
    }
    None
}

/// Fields common to the two payloads.
struct Fields<'a> {
    seq: u64,
    issued_at: u64,
    stream: Stream<'a>,
    entries: Option<Entries<'a>>,
    from: Option<u64>,
    to: Option<u64>,
    max_age: Option<u64>,
}

fn decode_payload(payload: &[u8], kind: MessageType) -> Result<Fields<'_>, Error> {
    let is_page = kind == MessageType::RevocationPage;
    let mut r = Reader::new(payload);
    let n = r.map(cbor::MAX_MAP_ENTRIES)?;
    let mut seen = SeenKeys::default();
    let (mut seq, mut issued_at, mut stream) = (None, None, None);
    let (mut entries, mut from, mut to, mut max_age) = (None, None, None, None);
    for _ in 0..n {
        let key = r.key()?;
        seen.insert(key)?;
        match key {
            KEY_MESSAGE_TYPE => {
                // A payload signed as another message type must never be taken for this one.
                if r.uint()? != kind.as_u64() {
                    return Err(DecodeError::InvalidValue("message type").into());
                }
            }
            KEY_SEQ => seq = Some(r.uint()?),
            KEY_ISSUED_AT => issued_at = Some(r.uint()?),
            KEY_STREAM => stream = Some(Stream::parse(r.str(MAX_STREAM_NAME_LEN)?)?),
            KEY_ENTRIES if is_page => entries = Some(Entries::decode(&mut r, payload)?),
            KEY_FROM if is_page => from = Some(r.uint()?),
            KEY_TO if is_page => to = Some(r.uint()?),
            KEY_MAX_AGE if !is_page => max_age = Some(r.uint()?),
            // Unknown keys are refused rather than skipped: a verifier that ignored a field
            // the hub meant to restrict something would fail open.
            _ => return Err(DecodeError::InvalidValue("revocation payload key").into()),
        }
    }
    if !seen.contains(KEY_MESSAGE_TYPE) {
        return Err(DecodeError::MissingField("message type").into());
    }
    r.finish()?;
    Ok(Fields {
        seq: seq.ok_or(DecodeError::MissingField("seq"))?,
        issued_at: issued_at.ok_or(DecodeError::MissingField("issued_at"))?,
        stream: stream.ok_or(DecodeError::MissingField("stream"))?,
        entries,
        from,
        to,
        max_age,
    })
}

/// Bytes of a page besides its entries: the map with every field at its longest, and the
/// longest array head.
pub fn page_overhead(stream: &Stream<'_>) -> usize {
    let name = stream.name().len();
    // Map head; type; seq, issued_at, from, to (key + 9 bytes each); entries key and array
    // head (3 bytes up to 65 535 items); stream key, text head and text.
    1 + 2 + 4 * 10 + 1 + 3 + 1 + 2 + name
}

/// How many bytes the payload of a signed page may take: [`MAX_PAGE_LEN`] less the
/// COSE_Sign1 envelope.
pub const MAX_PAGE_PAYLOAD_LEN: usize = MAX_PAGE_LEN - crate::cose::OVERHEAD;

/// Upper bound of the encoded length of a page on `stream` whose entries take
/// `entries_len` bytes, for sizing the output buffer of [`encode_page`].
pub fn max_page_len(stream: &Stream<'_>, entries_len: usize) -> usize {
    page_overhead(stream) + entries_len
}

/// Writes a page payload `{0: 20, 1: seq, 2: issued_at, 3: [entries], 4: stream, 5: from,
/// 6: to}` into `out` and returns its length.
///
/// `entries` is walked twice (to count, then to write), hence `Clone`; slices, `Vec`s and
/// maps over them all qualify. A range that is not `1 ≤ from ≤ to ≤ seq`, an entry not
/// carried by `stream`, more than [`MAX_ENTRIES_PER_PAGE`] entries, or a too-small `out`
/// ([`max_page_len`] is always enough) is an error. Whether the signed page stays within
/// [`MAX_PAGE_LEN`] is the caller's to keep (the hub packs entries by
/// [`Addressed::encoded_len`] against [`MAX_PAGE_PAYLOAD_LEN`]).
#[allow(clippy::too_many_arguments)] // each is a distinct field of the payload
pub fn encode_page<I>(
    seq: u64,
    issued_at: u64,
    stream: &Stream<'_>,
    from: u64,
    to: u64,
    entries: I,
    out: &mut [u8],
) -> Result<usize, Error>
where
    I: IntoIterator,
    I::Item: Borrow<Addressed>,
    I::IntoIter: Clone,
{
    if from == 0 || from > to || to > seq {
        return Err(EncodeError::InvalidValue("page range").into());
    }
    let iter = entries.into_iter();
    let len = iter.clone().count();
    if len > MAX_ENTRIES_PER_PAGE {
        return Err(EncodeError::InvalidValue("entries").into());
    }
    let mut w = cbor::writer(out);
    w.map(7)?
        .i64(KEY_MESSAGE_TYPE)?
        .u64(MessageType::RevocationPage.as_u64())?
        .i64(KEY_SEQ)?
        .u64(seq)?
        .i64(KEY_ISSUED_AT)?
        .u64(issued_at)?
        .i64(KEY_ENTRIES)?
        .array(len as u64)?;
    let mut written = 0usize;
    for entry in iter {
        let entry = entry.borrow();
        if !stream.carries(&entry.audience) {
            return Err(EncodeError::InvalidValue("entry audience is not on this stream").into());
        }
        entry.encode(&mut w)?;
        written += 1;
    }
    // A clone that yields a different number of items than the original would leave the
    // array head lying about its length: refuse rather than emit malformed CBOR.
    if written != len {
        return Err(EncodeError::InvalidValue("entries").into());
    }
    w.i64(KEY_STREAM)?
        .str(&stream.name())?
        .i64(KEY_FROM)?
        .u64(from)?
        .i64(KEY_TO)?
        .u64(to)?;
    Ok(cbor::written(&w))
}

/// Longest heartbeat payload.
pub const MAX_HEARTBEAT_LEN: usize = 1 + 2 + 3 * 10 + 1 + 2 + MAX_STREAM_NAME_LEN;

/// Writes a heartbeat payload `{0: 22, 1: seq, 2: issued_at, 4: stream, 7: max_age}` into
/// `out` ([`MAX_HEARTBEAT_LEN`] is enough) and returns its length.
pub fn encode_heartbeat(
    seq: u64,
    issued_at: u64,
    stream: &Stream<'_>,
    max_age: u64,
    out: &mut [u8],
) -> Result<usize, Error> {
    let mut w = cbor::writer(out);
    w.map(5)?
        .i64(KEY_MESSAGE_TYPE)?
        .u64(MessageType::RevocationHeartbeat.as_u64())?
        .i64(KEY_SEQ)?
        .u64(seq)?
        .i64(KEY_ISSUED_AT)?
        .u64(issued_at)?
        .i64(KEY_STREAM)?
        .str(&stream.name())?
        .i64(KEY_MAX_AGE)?
        .u64(max_age)?;
    Ok(cbor::written(&w))
}

/// The maximum age of revocation knowledge a hub announces on a stream, from its heartbeat
/// interval `h` and the shortest lifetime of the tokens verified on that stream: at least
/// two heartbeats (one may be in flight), at most three, and within that no more than half
/// that lifetime, so a suppressed change cannot keep a revoked token accepted for most of
/// its life.
pub fn recommended_max_age(heartbeat_s: u64, shortest_lifetime_s: u64) -> u64 {
    let two = heartbeat_s.saturating_mul(2);
    let three = heartbeat_s.saturating_mul(3);
    (shortest_lifetime_s / 2).clamp(two, three.max(two))
}

/// Where a verifier keeps its entries: [`Bounded`] on devices, [`Indexed`] (with `std`)
/// for services with large lists.
pub trait EntryStore {
    /// Adds `entry`, folding it into an entry for the same token or subject if there is one
    /// ([`Entry::merge`]); when full, forgets entries spent at `now` (with `leeway`) to make
    /// room, and hands `entry` back if there is still none.
    fn insert(&mut self, entry: Entry, now: u64, leeway: u64) -> Result<(), Entry>;
    /// Whether an entry revokes the token with `hash` issued to `subject` at `issued_at`.
    fn covers(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool;
    /// Forgets every entry spent at `now` with `leeway`.
    fn prune(&mut self, now: u64, leeway: u64);
    /// Number of entries held.
    fn len(&self) -> usize;
    /// Whether no entries are held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The entries held, in no particular order.
    fn entries(&self) -> impl Iterator<Item = Entry> + '_;
}

/// At most `N` entries in place, searched linearly: what a device can afford.
#[derive(Debug, Clone, Default)]
pub struct Bounded<const N: usize> {
    entries: heapless::Vec<Entry, N>,
}

impl<const N: usize> Bounded<N> {
    /// An empty store.
    pub const fn new() -> Self {
        Self {
            entries: heapless::Vec::new(),
        }
    }
}

impl<const N: usize> EntryStore for Bounded<N> {
    fn insert(&mut self, entry: Entry, now: u64, leeway: u64) -> Result<(), Entry> {
        if self.entries.iter_mut().any(|held| held.merge(&entry)) {
            return Ok(());
        }
        match self.entries.push(entry) {
            Ok(()) => Ok(()),
            Err(entry) => {
                self.prune(now, leeway);
                self.entries.push(entry)
            }
        }
    }

    fn covers(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.covers(hash, subject, issued_at))
    }

    fn prune(&mut self, now: u64, leeway: u64) {
        self.entries.retain(|e| !e.is_spent(now, leeway));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.entries.iter().cloned()
    }
}

#[cfg(feature = "std")]
pub use indexed::Indexed;

#[cfg(feature = "std")]
mod indexed {
    use std::collections::HashMap;
    use std::string::String;

    use super::{Entry, EntryStore, TokenHash};

    /// Entries in hash maps, up to a capacity chosen at run time: for services, which may
    /// hold the revocations of a whole fleet (100 000 entries and more), looked up in
    /// constant time.
    #[derive(Debug, Clone, Default)]
    pub struct Indexed {
        tokens: HashMap<TokenHash, u64>,
        /// subject → (issued_before, expires_at)
        subjects: HashMap<String, (u64, u64)>,
        capacity: usize,
    }

    impl Indexed {
        /// An empty store that holds at most `capacity` entries.
        pub fn with_capacity(capacity: usize) -> Self {
            Self {
                tokens: HashMap::new(),
                subjects: HashMap::new(),
                capacity,
            }
        }

        fn full(&self) -> bool {
            self.len() >= self.capacity
        }
    }

    impl EntryStore for Indexed {
        fn insert(&mut self, entry: Entry, now: u64, leeway: u64) -> Result<(), Entry> {
            match &entry {
                Entry::Token { hash, expires_at } => {
                    if let Some(held) = self.tokens.get_mut(hash) {
                        *held = (*held).max(*expires_at);
                        return Ok(());
                    }
                }
                Entry::Subject {
                    subject,
                    issued_before,
                    expires_at,
                } => {
                    if let Some((b, e)) = self.subjects.get_mut(subject.as_str()) {
                        *b = (*b).max(*issued_before);
                        *e = (*e).max(*expires_at);
                        return Ok(());
                    }
                }
            }
            if self.full() {
                self.prune(now, leeway);
                if self.full() {
                    return Err(entry);
                }
            }
            match entry {
                Entry::Token { hash, expires_at } => {
                    self.tokens.insert(hash, expires_at);
                }
                Entry::Subject {
                    subject,
                    issued_before,
                    expires_at,
                } => {
                    self.subjects
                        .insert(String::from(subject.as_str()), (issued_before, expires_at));
                }
            }
            Ok(())
        }

        fn covers(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
            self.tokens.contains_key(hash)
                || self
                    .subjects
                    .get(subject)
                    .is_some_and(|(before, _)| issued_at < *before)
        }

        fn prune(&mut self, now: u64, leeway: u64) {
            let live = |expires_at: u64| now <= expires_at.saturating_add(leeway);
            self.tokens.retain(|_, e| live(*e));
            self.subjects.retain(|_, (_, e)| live(*e));
        }

        fn len(&self) -> usize {
            self.tokens.len() + self.subjects.len()
        }

        fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
            let tokens = self.tokens.iter().map(|(hash, expires_at)| Entry::Token {
                hash: *hash,
                expires_at: *expires_at,
            });
            let subjects = self
                .subjects
                .iter()
                .filter_map(|(s, (before, expires_at))| {
                    Entry::for_subject(s, *before, *expires_at).ok()
                });
            tokens.chain(subjects)
        }
    }
}

/// What [`RevocationList::apply_page`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum PageOutcome {
    /// The page is part of the list now, and the list holds every change it knows of.
    Applied,
    /// The list already held every change of the page: nothing changed (a duplicate or
    /// a replayed message), though freshness may have moved forward.
    AlreadyApplied,
    /// The page's entries were kept, but changes before it are missing: the caller fetches
    /// from [`RevocationList::wanted_from`].
    Gap {
        /// The last change of the contiguous prefix the list holds.
        have: u64,
        /// The latest change the list knows of.
        latest: u64,
    },
}

/// What [`RevocationList::apply_heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum HeartbeatOutcome {
    /// The list holds every change the heartbeat names; its freshness now dates from the
    /// heartbeat's `issued_at` (if that is newer).
    InSync,
    /// The heartbeat names changes the list lacks: the caller fetches from
    /// [`RevocationList::wanted_from`].
    Behind,
    /// The heartbeat names an earlier change than one the list has seen (a replay, or a
    /// hub replica that lags): ignored.
    Outdated,
}

/// A verifier's copy of the revocations addressed to it, from one stream.
///
/// It tracks the prefix `1..=n` of the stream's changes it has applied, the latest change
/// it has heard of, and how fresh its knowledge is. It fails closed: when an entry does not
/// fit even after forgetting spent entries, the list keeps as much as fits but does not
/// count that change as applied, and stops being fresh ([`is_fresh`](Self::is_fresh) is
/// false, [`fresh_as_of`](Self::fresh_as_of) is `None`) until it holds every change it
/// knows of again, because a verifier that dropped a revocation must not claim to know them
/// all. For the same reason a verifier whose clock went back after it skipped entries as
/// spent fetches its stream again ([`must_refetch`](Self::must_refetch)), and one that
/// does not know the time yet applies pages with `now = 0`, skipping nothing.
#[derive(Debug, Clone)]
pub struct RevocationList<S: EntryStore = Bounded<MAX_REVOKED>, const P: usize = MAX_PENDING_RANGES>
{
    store: S,
    audience: heapless::String<MAX_ID_LEN>,
    stream_is_service: bool,
    /// Every change `1..=prefix` is applied.
    prefix: u64,
    /// The latest change heard of (≥ prefix).
    latest: u64,
    /// Changes applied beyond the prefix, as disjoint, non-adjacent ranges.
    pending: heapless::Vec<(u64, u64), P>,
    fresh_as_of: Option<u64>,
    /// The newest heartbeat's announced maximum age, with its `issued_at`.
    announced_max_age: Option<(u64, u64)>,
    /// The latest `now` the list judged entries spent at (applying a page, pruning) since
    /// the last [`refetch`](Self::refetch): if the verifier's clock later reads much
    /// earlier, entries skipped then may still be needed
    /// ([`must_refetch`](Self::must_refetch)).
    judged_spent_at: u64,
    leeway: u64,
}

impl<const N: usize> RevocationList<Bounded<N>> {
    /// The list device `device` keeps of the access-token revocations addressed to it, on
    /// its partition's stream, pruning with `leeway` (use the leeway applied to token
    /// expiry).
    pub fn for_device(device: &str, leeway: u64) -> Result<Self, Error> {
        Self::with_store(Bounded::new(), device, false, leeway)
    }

    /// [`for_device`](Self::for_device) for an id already validated, without a `Result`:
    /// the agent builds its list in place this way, rather than in a temporary as large as
    /// the list on a device's stack.
    pub(crate) fn for_valid_device(device: heapless::String<MAX_ID_LEN>, leeway: u64) -> Self {
        Self {
            store: Bounded::new(),
            audience: device,
            stream_is_service: false,
            prefix: 0,
            latest: 0,
            pending: heapless::Vec::new(),
            fresh_as_of: None,
            announced_max_age: None,
            judged_spent_at: 0,
            leeway,
        }
    }
}

impl<S: EntryStore> RevocationList<S> {
    /// The list device `device` keeps, in `store`.
    pub fn for_device_in(store: S, device: &str, leeway: u64) -> Result<Self, Error> {
        Self::with_store(store, device, false, leeway)
    }

    /// The list service `service` keeps of the device-token revocations addressed to it,
    /// in `store`.
    pub fn for_service(store: S, service: &str, leeway: u64) -> Result<Self, Error> {
        Self::with_store(store, service, true, leeway)
    }

    /// The same list with room for `Q` separate ranges of changes beyond its prefix
    /// instead of [`MAX_PENDING_RANGES`] (a service taking large snapshots in any order).
    /// Ranges already held beyond `Q` are dropped (fetched again).
    pub fn with_pending_ranges<const Q: usize>(self) -> RevocationList<S, Q> {
        RevocationList {
            store: self.store,
            audience: self.audience,
            stream_is_service: self.stream_is_service,
            prefix: self.prefix,
            latest: self.latest,
            pending: self.pending.into_iter().take(Q).collect(),
            fresh_as_of: self.fresh_as_of,
            announced_max_age: self.announced_max_age,
            judged_spent_at: self.judged_spent_at,
            leeway: self.leeway,
        }
    }
}

impl<S: EntryStore, const P: usize> RevocationList<S, P> {
    fn with_store(store: S, audience: &str, service: bool, leeway: u64) -> Result<Self, Error> {
        validate_id(audience)?;
        Ok(Self {
            store,
            audience: heapless::String::try_from(audience)
                .map_err(|_| DecodeError::InvalidValue("id"))?,
            stream_is_service: service,
            prefix: 0,
            latest: 0,
            pending: heapless::Vec::new(),
            fresh_as_of: None,
            announced_max_age: None,
            judged_spent_at: 0,
            leeway,
        })
    }

    /// The stream this list follows.
    pub fn stream(&self) -> Stream<'_> {
        if self.stream_is_service {
            Stream::Service(&self.audience)
        } else {
            Stream::of_device(&self.audience)
        }
    }

    /// The audience whose entries the list keeps.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    fn check_stream(&self, stream: &Stream<'_>) -> Result<(), Error> {
        if *stream != self.stream() {
            // Signed for another stream: accepting it would let a broker pass one stream's
            // heartbeat off as another's.
            return Err(DecodeError::InvalidValue("stream").into());
        }
        Ok(())
    }

    /// Applies a page of this list's stream: keeps its entries addressed to this list's
    /// audience (skipping those spent at `now`) and counts its changes as applied.
    ///
    /// `now` is the verifier's time, Unix seconds; a verifier that does not know the time
    /// yet (a device before the hub's first answer) passes 0, so that no entry counts as
    /// spent: skipping one by a wrong clock would lose it for good, as its change counts as
    /// applied all the same.
    ///
    /// A page of another stream is refused (`DecodeError::InvalidValue("stream")`). If an
    /// entry does not fit, the list still adds or folds every other entry of the page that
    /// fits, does not count the page's changes as applied, is no longer fresh, and returns
    /// [`CapacityError::Revocations`].
    pub fn apply_page(&mut self, page: &Page<'_>, now: u64) -> Result<PageOutcome, Error> {
        self.check_stream(&page.stream)?;
        self.latest = self.latest.max(page.seq);
        self.judged_spent_at = self.judged_spent_at.max(now);
        let already = page.to <= self.prefix;
        let mut overflowed = false;
        for entry in page.entries {
            let entry = entry?;
            if entry.audience != self.audience || entry.entry.is_spent(now, self.leeway) {
                continue;
            }
            if self.store.insert(entry.entry, now, self.leeway).is_err() {
                overflowed = true;
            }
        }
        if overflowed {
            self.fresh_as_of = None;
            return Err(CapacityError::Revocations.into());
        }
        self.cover(page.from, page.to);
        // Complete as of the page's build only if it was built at the latest change known.
        if page.seq == self.latest {
            self.mark_in_sync(page.issued_at);
        }
        Ok(if already {
            PageOutcome::AlreadyApplied
        } else if self.is_complete() {
            PageOutcome::Applied
        } else {
            PageOutcome::Gap {
                have: self.prefix,
                latest: self.latest,
            }
        })
    }

    /// Compares the list with a heartbeat of its stream (another stream's is refused); if
    /// the list holds every change it names, its freshness dates from the heartbeat's
    /// `issued_at` (never moving backwards). The `max_age` of the newest heartbeat seen
    /// (by `issued_at`) becomes the announced one, in sync or not.
    pub fn apply_heartbeat(
        &mut self,
        heartbeat: &Heartbeat<'_>,
    ) -> Result<HeartbeatOutcome, Error> {
        self.check_stream(&heartbeat.stream)?;
        // The hub's configuration, not the list's state: taken from the newest heartbeat
        // whatever the list holds, and a replayed older one never overrides it.
        if self
            .announced_max_age
            .is_none_or(|(at, _)| heartbeat.issued_at >= at)
        {
            self.announced_max_age = Some((heartbeat.issued_at, heartbeat.max_age));
        }
        if heartbeat.seq > self.prefix {
            self.latest = self.latest.max(heartbeat.seq);
            return Ok(HeartbeatOutcome::Behind);
        }
        if heartbeat.seq < self.latest {
            return Ok(HeartbeatOutcome::Outdated);
        }
        self.mark_in_sync(heartbeat.issued_at);
        Ok(HeartbeatOutcome::InSync)
    }

    /// Whether the list revokes the token with `hash` (see [`token_hash`]), issued to
    /// `subject` at `issued_at` (its `iat`, Unix seconds).
    ///
    /// This says nothing about how current the list is: check [`is_fresh`](Self::is_fresh)
    /// too before accepting a sensitive scope.
    pub fn is_revoked(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
        self.store.covers(hash, subject, issued_at)
    }

    /// Forgets every entry whose tokens have all expired by `now` even allowing the list's
    /// leeway. A verifier that does not know the time does not prune.
    pub fn prune(&mut self, now: u64) {
        self.judged_spent_at = self.judged_spent_at.max(now);
        self.store.prune(now, self.leeway);
    }

    /// Whether the verifier's clock, reading `now`, has gone back by more than the list's
    /// leeway since the list last judged entries spent (applying a page, pruning): an
    /// entry skipped or forgotten then may still be needed now, so the changes counted as
    /// applied may miss it. The list is not fresh meanwhile; the verifier calls
    /// [`refetch`](Self::refetch).
    ///
    /// A clock that was ahead by at most the leeway when it judged is what the leeway in
    /// [`Entry::is_spent`] is there to absorb (and `expires_at` carries the hub's leeway
    /// on top), so only a larger step back counts; it also keeps the sub-second corrections
    /// of a clock learned from the hub from causing fetches.
    pub fn must_refetch(&self, now: u64) -> bool {
        now.saturating_add(self.leeway) < self.judged_spent_at && self.latest > 0
    }

    /// Forgets which changes the list applied, and how fresh it was, so that it fetches
    /// its stream again from change 1; the entries it holds stay (each is still a true
    /// revocation, and the pages fetched again fold into them) and so does the latest
    /// change heard of. For a clock set back ([`must_refetch`](Self::must_refetch)).
    pub fn refetch(&mut self) {
        self.prefix = 0;
        self.pending.clear();
        self.fresh_as_of = None;
        self.judged_spent_at = 0;
    }

    /// Where the list must fetch from to hold every change it knows of: `Some(n)` when
    /// change `n` (and maybe more) is missing.
    pub fn wanted_from(&self) -> Option<u64> {
        (!self.is_complete()).then_some(self.prefix.saturating_add(1))
    }

    /// `issued_at` of the newest page or heartbeat that showed the list complete and
    /// current; `None` before the first, and after an overflow until the list is complete
    /// again.
    pub fn fresh_as_of(&self) -> Option<u64> {
        self.fresh_as_of
    }

    /// Whether the list was complete and current at most `max_age` seconds before `now`.
    ///
    /// A hub clock slightly ahead of ours counts as age 0 rather than as stale; a clock
    /// gone back since entries were judged spent ([`must_refetch`](Self::must_refetch))
    /// is not fresh.
    pub fn is_fresh(&self, now: u64, max_age: u64) -> bool {
        self.is_complete()
            && !self.must_refetch(now)
            && self
                .fresh_as_of
                .is_some_and(|as_of| now.saturating_sub(as_of) <= max_age)
    }

    /// The maximum age to hold knowledge to: what the newest heartbeat announced (else
    /// [`DEFAULT_MAX_AGE`]), or `configured` if that is smaller. A configured value only
    /// tightens the hub's: an old configuration that wrote a larger one must not weaken
    /// the freshness the hub asks for.
    pub fn max_age(&self, configured: Option<u64>) -> u64 {
        let announced = self
            .announced_max_age
            .map_or(DEFAULT_MAX_AGE, |(_, max_age)| max_age);
        configured.map_or(announced, |c| c.min(announced))
    }

    /// `issued_at` of the newest heartbeat of the stream applied (`None` before the first).
    pub fn last_heartbeat_at(&self) -> Option<u64> {
        self.announced_max_age.map(|(issued_at, _)| issued_at)
    }

    /// Whether the list holds every change it has heard of.
    pub fn is_complete(&self) -> bool {
        self.prefix >= self.latest
    }

    /// The last change of the contiguous prefix the list holds (0 before any).
    pub fn seq(&self) -> u64 {
        self.prefix
    }

    /// The latest change the list has heard of.
    pub fn latest(&self) -> u64 {
        self.latest
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The entries held, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.store.entries()
    }

    fn mark_in_sync(&mut self, issued_at: u64) {
        if self.is_complete() {
            // Out-of-order delivery must not make the list look older than it is known to
            // be, nor should a replay make it look newer.
            self.fresh_as_of = Some(self.fresh_as_of.map_or(issued_at, |t| t.max(issued_at)));
        }
    }

    /// Records changes `from..=to` as applied.
    fn cover(&mut self, from: u64, to: u64) {
        if from <= self.prefix.saturating_add(1) {
            self.prefix = self.prefix.max(to);
        } else {
            // Beyond a gap: fold it with every range it overlaps or touches, and remember
            // the result if there is room; otherwise it is fetched again.
            let (mut from, mut to) = (from, to);
            let mut i = 0;
            while let Some(&(f, t)) = self.pending.get(i) {
                if f <= to.saturating_add(1) && from <= t.saturating_add(1) {
                    (from, to) = (from.min(f), to.max(t));
                    self.pending.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            let _ = self.pending.push((from, to));
        }
        // Fold in every pending range the prefix now reaches, and drop those it passed.
        loop {
            let before = self.prefix;
            let mut i = 0;
            while let Some(&(f, t)) = self.pending.get(i) {
                if f <= self.prefix.saturating_add(1) {
                    self.prefix = self.prefix.max(t);
                    self.pending.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if self.prefix == before {
                break;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
