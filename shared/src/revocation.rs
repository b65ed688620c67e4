//! The revocation list: its entries, the payloads that carry it (snapshot, delta,
//! heartbeat) and the bounded list a verifier keeps.
//!
//! The ideas are RFC 9770's, carried over MQTT. An entry names either one token (by the
//! SHA-256 of its bytes as issued) or a subject (everything issued to it before a time).
//! Each entry carries `expires_at`, the moment every token it covers has expired anyway;
//! after that (plus the verifier's clock-skew leeway) the entry is useless and drops out, so
//! the list is bounded by token lifetime rather than growing forever.
//!
//! The hub numbers its changes. Sequence number 0 is the empty list before any revocation;
//! each delta adds entries and carries the next number (1, 2, …); a snapshot carries the whole
//! list as of the last delta it includes. A list that sees a gap in the numbers fetches the
//! snapshot. Heartbeats name the latest number with a fresh `issued_at`, so a verifier knows
//! how current its knowledge is: a broker that suppresses deltas cannot also forge fresh
//! heartbeats, and the verifier sees its knowledge age.
//!
//! This module handles the *unsigned payload bytes*; wrapping them in COSE_Sign1 and checking
//! the hub's signature happens elsewhere, before anything here is applied.

use core::borrow::Borrow;

use crate::MAX_ID_LEN;
use crate::cbor::{self, Reader, SeenKeys, Writer};
use crate::error::{CapacityError, DecodeError, EncodeError, Error};
use crate::message::{KEY_MESSAGE_TYPE, MessageType};

/// Length of a [`TokenHash`] in bytes.
pub const TOKEN_HASH_LEN: usize = 32;

/// SHA-256 of a token's bytes exactly as issued (the whole COSE_Sign1 encoding).
///
/// Hashing the issued bytes, rather than a claim such as `cti`, means a verifier needs nothing
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

/// Entries a verifier keeps by default: enough for the revocations of one token lifetime on
/// a small fleet, at about 100 bytes each, so the whole list stays near 6.5 KiB of RAM.
pub const MAX_REVOKED: usize = 64;

/// Most entries one snapshot or delta may carry: as many of the longest entries as fit in
/// a signed message ([`MAX_SIGN1_LEN`](crate::cose::MAX_SIGN1_LEN)) inside a response,
/// so the hub's encoder refuses exactly what no verifier would accept. Entries live only
/// as long as the tokens they cover, so reaching it means several hundred revocations
/// within one token lifetime.
pub const MAX_ENTRIES_PER_MESSAGE: usize =
    (crate::cose::MAX_SIGN1_LEN - 2 * crate::cose::OVERHEAD - 256) / MAX_ENTRY_LEN;

/// Longest encoding of one entry: a subject entry with a [`MAX_ID_LEN`]-byte subject and two
/// 9-byte integers: array head, kind, text head (2 bytes for 24..=255), text, two integers.
pub const MAX_ENTRY_LEN: usize = 1 + 1 + 2 + MAX_ID_LEN + 9 + 9;

/// Default clock-skew leeway, in seconds, a [`RevocationList`] keeps entries past their
/// `expires_at` when it prunes to make room; the same default as token verification.
pub const DEFAULT_LEEWAY: u64 = 30;

/// Map key of the sequence number in every revocation payload.
pub const KEY_SEQ: i64 = 1;
/// Map key of the hub's issue time (Unix seconds) in every revocation payload.
pub const KEY_ISSUED_AT: i64 = 2;
/// Map key of the entry array in snapshots and deltas.
pub const KEY_ENTRIES: i64 = 3;

/// First element of a token entry, `[0, h'hash', expires_at]`.
pub const ENTRY_KIND_TOKEN: u64 = 0;
/// First element of a subject entry, `[1, "subject", issued_before, expires_at]`.
pub const ENTRY_KIND_SUBJECT: u64 = 1;

/// Upper bound of the encoded length of a snapshot or delta with `entries` entries, for
/// sizing the output buffer of [`encode_snapshot`] and [`encode_delta`].
pub const fn max_payload_len(entries: usize) -> usize {
    // Map head; key 0 and a one-byte type; keys 1 and 2 with 9-byte integers; key 3 and the
    // longest array head.
    let fixed = 1 + 2 + (1 + 9) + (1 + 9) + (1 + 9);
    fixed + entries.saturating_mul(MAX_ENTRY_LEN)
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// One token, named by its [`TokenHash`].
    Token {
        /// SHA-256 of the token's bytes as issued.
        hash: TokenHash,
        /// When the token expires (Unix seconds); the entry is useless afterwards.
        expires_at: u64,
    },
    /// Every token of `subject` issued (`iat`) strictly before `issued_before`.
    Subject {
        /// The device or app whose tokens are revoked.
        subject: heapless::String<MAX_ID_LEN>,
        /// Tokens with `iat < issued_before` are revoked (Unix seconds).
        issued_before: u64,
        /// When the last token this entry covers expires (Unix seconds): `issued_before`
        /// plus the longest lifetime the hub issues to this subject.
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
    fn is_spent(&self, now: u64, leeway: u64) -> bool {
        now > self.expires_at().saturating_add(leeway)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        match self {
            Entry::Token { hash, expires_at } => {
                w.array(3)?
                    .u64(ENTRY_KIND_TOKEN)?
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
                w.array(4)?
                    .u64(ENTRY_KIND_SUBJECT)?
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
            ENTRY_KIND_TOKEN => 3,
            ENTRY_KIND_SUBJECT => 4,
            _ => return Err(DecodeError::InvalidValue("revocation entry kind")),
        };
        if len != expected_len {
            return Err(DecodeError::InvalidValue("array length"));
        }
        if kind == ENTRY_KIND_TOKEN {
            let hash = r.bytes_exact::<TOKEN_HASH_LEN>("token hash")?;
            let expires_at = r.uint()?;
            return Ok(Entry::Token { hash, expires_at });
        }
        let subject = r.str(MAX_ID_LEN)?;
        if subject.is_empty() {
            return Err(DecodeError::InvalidValue("subject"));
        }
        let subject = heapless::String::try_from(subject).map_err(|_| DecodeError::TooLarge)?;
        let issued_before = r.uint()?;
        let expires_at = r.uint()?;
        Ok(Entry::Subject {
            subject,
            issued_before,
            expires_at,
        })
    }
}

/// The entries of a decoded snapshot or delta, still in their wire form.
///
/// Every entry was decoded once when the payload was, so iterating cannot fail; the
/// iterator still yields `Result` because it re-decodes from bytes rather than holding up to
/// [`MAX_ENTRIES_PER_MESSAGE`] decoded entries in memory.
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
        let len = r.array(MAX_ENTRIES_PER_MESSAGE)?;
        let start = r.position();
        for _ in 0..len {
            Entry::decode(r)?;
        }
        let items = input
            .get(start..r.position())
            .ok_or(DecodeError::Malformed)?;
        Ok(Self { items, len })
    }
}

impl<'a> IntoIterator for Entries<'a> {
    type Item = Result<Entry, Error>;
    type IntoIter = EntryIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for &Entries<'a> {
    type Item = Result<Entry, Error>;
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
    type Item = Result<Entry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let mut r = Reader::new(self.rest);
        match Entry::decode(&mut r) {
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

/// A decoded revocation snapshot payload: the whole list as of sequence number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot<'a> {
    seq: u64,
    issued_at: u64,
    entries: Entries<'a>,
}

impl<'a> Snapshot<'a> {
    /// Decodes `{0: 20, 1: seq, 2: issued_at, 3: [entries]}`, checking every entry. Each key
    /// must appear exactly once; other keys, indefinite lengths and trailing bytes are
    /// refused.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let fields = decode_payload(payload, MessageType::RevocationSnapshot)?;
        Ok(Self {
            seq: fields.seq,
            issued_at: fields.issued_at,
            entries: fields.entries.ok_or(DecodeError::MissingField("entries"))?,
        })
    }

    /// Sequence number of the last delta this snapshot includes.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the hub issued it (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The whole list.
    pub fn entries(&self) -> Entries<'a> {
        self.entries
    }
}

/// A decoded revocation delta payload: entries added by change number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta<'a> {
    seq: u64,
    issued_at: u64,
    entries: Entries<'a>,
}

impl<'a> Delta<'a> {
    /// Decodes `{0: 21, 1: seq, 2: issued_at, 3: [entries]}` under the same rules as
    /// [`Snapshot::decode`].
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let fields = decode_payload(payload, MessageType::RevocationDelta)?;
        Ok(Self {
            seq: fields.seq,
            issued_at: fields.issued_at,
            entries: fields.entries.ok_or(DecodeError::MissingField("entries"))?,
        })
    }

    /// This change's sequence number: one more than the previous delta's.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the hub issued it (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The entries this change adds.
    pub fn entries(&self) -> Entries<'a> {
        self.entries
    }
}

/// A decoded revocation heartbeat payload: the latest sequence number as of `issued_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    seq: u64,
    issued_at: u64,
}

impl Heartbeat {
    /// Decodes `{0: 22, 1: seq, 2: issued_at}` under the same rules as
    /// [`Snapshot::decode`]; an entry array (key 3) is refused.
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let fields = decode_payload(payload, MessageType::RevocationHeartbeat)?;
        Ok(Self {
            seq: fields.seq,
            issued_at: fields.issued_at,
        })
    }

    /// The latest sequence number when the hub issued this heartbeat.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the hub issued it (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }
}

/// Fields common to the three payloads.
struct Fields<'a> {
    seq: u64,
    issued_at: u64,
    entries: Option<Entries<'a>>,
}

fn decode_payload(payload: &[u8], kind: MessageType) -> Result<Fields<'_>, Error> {
    let has_entries = kind != MessageType::RevocationHeartbeat;
    let mut r = Reader::new(payload);
    let n = r.map(cbor::MAX_MAP_ENTRIES)?;
    let mut seen = SeenKeys::default();
    let (mut seq, mut issued_at, mut entries) = (None, None, None);
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
            KEY_ENTRIES if has_entries => entries = Some(Entries::decode(&mut r, payload)?),
            // Unknown keys are refused rather than skipped: a verifier that ignored a field
            // the hub meant to restrict something would fail open.
            _ => return Err(DecodeError::InvalidValue("revocation payload key").into()),
        }
    }
    if !seen.contains(KEY_MESSAGE_TYPE) {
        return Err(DecodeError::MissingField("message type").into());
    }
    let seq = seq.ok_or(DecodeError::MissingField("seq"))?;
    let issued_at = issued_at.ok_or(DecodeError::MissingField("issued_at"))?;
    if has_entries && entries.is_none() {
        return Err(DecodeError::MissingField("entries").into());
    }
    r.finish()?;
    Ok(Fields {
        seq,
        issued_at,
        entries,
    })
}

/// Writes a snapshot payload `{0: 20, 1: seq, 2: issued_at, 3: [entries]}` into `out` and
/// returns its length.
///
/// `entries` is walked twice (to count, then to write), hence `Clone`; slices, `Vec`s and
/// maps over them all qualify. More than [`MAX_ENTRIES_PER_MESSAGE`] entries, an empty
/// subject, or a too-small `out` ([`max_payload_len`] is always enough) is an error.
pub fn encode_snapshot<I>(
    seq: u64,
    issued_at: u64,
    entries: I,
    out: &mut [u8],
) -> Result<usize, Error>
where
    I: IntoIterator,
    I::Item: Borrow<Entry>,
    I::IntoIter: Clone,
{
    encode_payload(
        MessageType::RevocationSnapshot,
        seq,
        issued_at,
        Some(entries),
        out,
    )
}

/// Writes a delta payload `{0: 21, 1: seq, 2: issued_at, 3: [entries]}` into `out` and
/// returns its length; the rules of [`encode_snapshot`] apply.
pub fn encode_delta<I>(seq: u64, issued_at: u64, entries: I, out: &mut [u8]) -> Result<usize, Error>
where
    I: IntoIterator,
    I::Item: Borrow<Entry>,
    I::IntoIter: Clone,
{
    encode_payload(
        MessageType::RevocationDelta,
        seq,
        issued_at,
        Some(entries),
        out,
    )
}

/// Writes a heartbeat payload `{0: 22, 1: seq, 2: issued_at}` into `out` and returns its
/// length.
pub fn encode_heartbeat(seq: u64, issued_at: u64, out: &mut [u8]) -> Result<usize, Error> {
    encode_payload::<[&Entry; 0]>(MessageType::RevocationHeartbeat, seq, issued_at, None, out)
}

fn encode_payload<I>(
    kind: MessageType,
    seq: u64,
    issued_at: u64,
    entries: Option<I>,
    out: &mut [u8],
) -> Result<usize, Error>
where
    I: IntoIterator,
    I::Item: Borrow<Entry>,
    I::IntoIter: Clone,
{
    let mut w = cbor::writer(out);
    w.map(if entries.is_some() { 4 } else { 3 })?
        .i64(KEY_MESSAGE_TYPE)?
        .u64(kind.as_u64())?
        .i64(KEY_SEQ)?
        .u64(seq)?
        .i64(KEY_ISSUED_AT)?
        .u64(issued_at)?;
    if let Some(entries) = entries {
        let iter = entries.into_iter();
        let len = iter.clone().count();
        if len > MAX_ENTRIES_PER_MESSAGE {
            return Err(EncodeError::InvalidValue("entries").into());
        }
        w.i64(KEY_ENTRIES)?.array(len as u64)?;
        let mut written = 0usize;
        for entry in iter {
            entry.borrow().encode(&mut w)?;
            written += 1;
        }
        // A clone that yields a different number of items than the original would leave
        // the array head lying about its length: refuse rather than emit malformed CBOR.
        if written != len {
            return Err(EncodeError::InvalidValue("entries").into());
        }
    }
    Ok(cbor::written(&w))
}

/// What [`RevocationList::apply_delta`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum DeltaOutcome {
    /// The delta was the next one and is now part of the list.
    Applied,
    /// The list already includes this delta (a duplicate or replayed message): nothing
    /// changed.
    AlreadyApplied,
    /// One or more deltas between ours and this one were missed: nothing changed, and the
    /// caller must fetch the snapshot.
    Gap {
        /// The list's sequence number.
        have: u64,
        /// The delta's sequence number, more than one past `have`.
        got: u64,
    },
}

/// What [`RevocationList::apply_heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum HeartbeatOutcome {
    /// The list is complete and at the heartbeat's sequence number; its freshness now
    /// dates from the heartbeat's `issued_at` (if that is newer).
    InSync,
    /// The heartbeat names a later sequence number than the list's, or the list is
    /// incomplete after an overflow: the caller must fetch the snapshot.
    Behind,
    /// The heartbeat names an earlier sequence number than the list's (a replay, or a hub
    /// replica that lags): ignored.
    Outdated,
}

/// A verifier's copy of the revocation list, holding at most `N` entries.
///
/// It tracks the sequence number it is at and how fresh its knowledge is. It fails closed:
/// when an entry does not fit even after forgetting spent entries, the list keeps as much
/// as fits but marks itself *incomplete*: it stops being fresh ([`is_fresh`](Self::is_fresh)
/// is false, [`fresh_as_of`](Self::fresh_as_of) is `None`) until a snapshot applies
/// completely, because a verifier that dropped a revocation must not claim to know them all.
#[derive(Debug, Clone)]
pub struct RevocationList<const N: usize = MAX_REVOKED> {
    entries: heapless::Vec<Entry, N>,
    seq: u64,
    fresh_as_of: Option<u64>,
    complete: bool,
    leeway: u64,
}

impl<const N: usize> Default for RevocationList<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RevocationList<N> {
    /// An empty list at sequence number 0 (the hub's list before any revocation), not
    /// fresh, pruning with [`DEFAULT_LEEWAY`].
    pub const fn new() -> Self {
        Self::with_leeway(DEFAULT_LEEWAY)
    }

    /// Like [`new`](Self::new), but keeping entries `leeway` seconds past their
    /// `expires_at` when the list prunes itself to make room. Use the leeway the verifier
    /// applies to token expiry: an entry pruned earlier would let a token through that the
    /// verifier still accepts.
    pub const fn with_leeway(leeway: u64) -> Self {
        Self {
            entries: heapless::Vec::new(),
            seq: 0,
            fresh_as_of: None,
            complete: true,
            leeway,
        }
    }

    /// Replaces the contents with `snapshot` and moves to its sequence number.
    ///
    /// A snapshot older than the list (a lower sequence number: a replay of an old retained
    /// message) is ignored, so a broker cannot roll revocations back; compare
    /// [`seq`](Self::seq) to tell. Entries already spent at `now` are skipped. If the
    /// snapshot does not fit, the list keeps what fits, moves to the snapshot's sequence
    /// number, becomes incomplete (see the type's documentation) and returns
    /// [`CapacityError::Revocations`].
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot<'_>, now: u64) -> Result<(), Error> {
        if snapshot.seq < self.seq {
            return Ok(());
        }
        self.entries.clear();
        self.seq = snapshot.seq;
        self.complete = true;
        self.add_all(snapshot.entries, now)?;
        self.mark_in_sync(snapshot.issued_at);
        Ok(())
    }

    /// Adds the entries of `delta` if it is the next change after the list's.
    ///
    /// A delta the list already includes changes nothing; one that skips ahead changes
    /// nothing and reports a [`DeltaOutcome::Gap`], after which the caller fetches the
    /// snapshot. Entries already spent at `now` are skipped. If an entry does not fit, the
    /// list keeps what fits, still moves to the delta's sequence number (so later deltas
    /// keep applying), becomes incomplete and returns [`CapacityError::Revocations`].
    pub fn apply_delta(&mut self, delta: &Delta<'_>, now: u64) -> Result<DeltaOutcome, Error> {
        if delta.seq <= self.seq {
            if delta.seq == self.seq {
                // A duplicate of our latest delta still says we were current at its
                // issue time.
                self.mark_in_sync(delta.issued_at);
            }
            return Ok(DeltaOutcome::AlreadyApplied);
        }
        if self.seq.checked_add(1) != Some(delta.seq) {
            return Ok(DeltaOutcome::Gap {
                have: self.seq,
                got: delta.seq,
            });
        }
        self.seq = delta.seq;
        self.add_all(delta.entries, now)?;
        self.mark_in_sync(delta.issued_at);
        Ok(DeltaOutcome::Applied)
    }

    /// Compares the list with a heartbeat; if the list is complete and current, its
    /// freshness dates from the heartbeat's `issued_at` (never moving backwards).
    pub fn apply_heartbeat(&mut self, heartbeat: &Heartbeat) -> HeartbeatOutcome {
        match heartbeat.seq.cmp(&self.seq) {
            core::cmp::Ordering::Greater => HeartbeatOutcome::Behind,
            core::cmp::Ordering::Less => HeartbeatOutcome::Outdated,
            // An incomplete list is never in sync; asking for the snapshot is how it
            // recovers once enough entries have expired to make room.
            core::cmp::Ordering::Equal if !self.complete => HeartbeatOutcome::Behind,
            core::cmp::Ordering::Equal => {
                self.mark_in_sync(heartbeat.issued_at);
                HeartbeatOutcome::InSync
            }
        }
    }

    /// Whether the list revokes the token with `hash` (see [`token_hash`]), issued to
    /// `subject` at `issued_at` (its `iat`, Unix seconds).
    ///
    /// This says nothing about how current the list is: check [`is_fresh`](Self::is_fresh)
    /// too before accepting a sensitive scope.
    pub fn is_revoked(&self, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.covers(hash, subject, issued_at))
    }

    /// Forgets every entry whose tokens have all expired by `now` even allowing `leeway`
    /// seconds of clock skew. Callers use the leeway they apply to token expiry.
    pub fn prune(&mut self, now: u64, leeway: u64) {
        self.entries.retain(|e| !e.is_spent(now, leeway));
    }

    /// `issued_at` of the newest snapshot, delta or heartbeat that left the list complete
    /// and current; `None` before the first, and after an overflow until a snapshot fits.
    pub fn fresh_as_of(&self) -> Option<u64> {
        self.fresh_as_of
    }

    /// Whether the list was complete and current at most `max_age` seconds before `now`.
    ///
    /// A hub clock slightly ahead of ours counts as age 0 rather than as stale.
    pub fn is_fresh(&self, now: u64, max_age: u64) -> bool {
        self.fresh_as_of
            .is_some_and(|as_of| now.saturating_sub(as_of) <= max_age)
    }

    /// Whether every entry the hub sent since the last snapshot fitted.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The sequence number of the last change the list includes (0 before any).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries held, in no particular order.
    pub fn iter(&self) -> core::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    fn mark_in_sync(&mut self, issued_at: u64) {
        if self.complete {
            // Out-of-order delivery must not make the list look older than it is known to
            // be, nor should a replay make it look newer.
            self.fresh_as_of = Some(self.fresh_as_of.map_or(issued_at, |t| t.max(issued_at)));
        }
    }

    fn mark_incomplete(&mut self) {
        self.complete = false;
        self.fresh_as_of = None;
    }

    /// Adds every entry, continuing past an overflow so that merges into entries already
    /// held (which need no room) still apply.
    fn add_all(&mut self, entries: Entries<'_>, now: u64) -> Result<(), Error> {
        let mut overflowed = false;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    // Cannot happen after a successful decode; if it did, the rest of the
                    // change is unknown, so fail closed.
                    self.mark_incomplete();
                    return Err(e);
                }
            };
            if self.add(entry, now).is_err() {
                overflowed = true;
            }
        }
        if overflowed {
            self.mark_incomplete();
            return Err(CapacityError::Revocations.into());
        }
        Ok(())
    }

    fn add(&mut self, entry: Entry, now: u64) -> Result<(), Entry> {
        if entry.is_spent(now, self.leeway) {
            return Ok(());
        }
        if self.merge(&entry) {
            return Ok(());
        }
        match self.entries.push(entry) {
            Ok(()) => Ok(()),
            Err(entry) => {
                self.prune(now, self.leeway);
                self.entries.push(entry)
            }
        }
    }

    /// Folds `entry` into an entry for the same token or subject, if there is one.
    fn merge(&mut self, entry: &Entry) -> bool {
        for held in self.entries.iter_mut() {
            match (held, entry) {
                (
                    Entry::Token {
                        hash: h,
                        expires_at: e,
                    },
                    Entry::Token { hash, expires_at },
                ) if h == hash => {
                    *e = (*e).max(*expires_at);
                    return true;
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
                    // The later cut-off covers every token the earlier one did, and those
                    // tokens live until the later expiry at most.
                    *b = (*b).max(*issued_before);
                    *e = (*e).max(*expires_at);
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    const NOW: u64 = 1_700_000_000;

    fn token(n: u8, expires_at: u64) -> Entry {
        Entry::Token {
            hash: [n; TOKEN_HASH_LEN],
            expires_at,
        }
    }

    fn subject(name: &str, issued_before: u64, expires_at: u64) -> Entry {
        Entry::for_subject(name, issued_before, expires_at).unwrap()
    }

    fn snapshot_bytes(seq: u64, issued_at: u64, entries: &[Entry]) -> Vec<u8> {
        let mut out = std::vec![0u8; max_payload_len(entries.len())];
        let n = encode_snapshot(seq, issued_at, entries, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn delta_bytes(seq: u64, issued_at: u64, entries: &[Entry]) -> Vec<u8> {
        let mut out = std::vec![0u8; max_payload_len(entries.len())];
        let n = encode_delta(seq, issued_at, entries, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn heartbeat_bytes(seq: u64, issued_at: u64) -> Vec<u8> {
        let mut out = [0u8; 64];
        let n = encode_heartbeat(seq, issued_at, &mut out).unwrap();
        out[..n].to_vec()
    }

    fn entries_of(e: Entries<'_>) -> Vec<Entry> {
        e.iter().collect::<Result<Vec<_>, _>>().unwrap()
    }

    fn apply_snapshot<const N: usize>(
        list: &mut RevocationList<N>,
        seq: u64,
        issued_at: u64,
        entries: &[Entry],
    ) -> Result<(), Error> {
        let bytes = snapshot_bytes(seq, issued_at, entries);
        list.apply_snapshot(&Snapshot::decode(&bytes).unwrap(), issued_at)
    }

    fn apply_delta<const N: usize>(
        list: &mut RevocationList<N>,
        seq: u64,
        issued_at: u64,
        entries: &[Entry],
    ) -> Result<DeltaOutcome, Error> {
        let bytes = delta_bytes(seq, issued_at, entries);
        list.apply_delta(&Delta::decode(&bytes).unwrap(), issued_at)
    }

    fn heartbeat<const N: usize>(
        list: &mut RevocationList<N>,
        seq: u64,
        issued_at: u64,
    ) -> HeartbeatOutcome {
        let bytes = heartbeat_bytes(seq, issued_at);
        list.apply_heartbeat(&Heartbeat::decode(&bytes).unwrap())
    }

    // --- wire form ---

    #[test]
    fn token_hash_is_sha256_of_the_issued_bytes() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        let expect =
            hex::decode("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                .unwrap();
        assert_eq!(token_hash(b"abc").as_slice(), expect.as_slice());
    }

    #[test]
    fn entries_have_the_documented_wire_form() {
        let mut out = [0u8; MAX_ENTRY_LEN];
        let mut w = cbor::writer(&mut out);
        token(0xab, 1000).encode(&mut w).unwrap();
        let n = cbor::written(&w);
        let mut expect = std::vec![0x83, 0x00, 0x58, 0x20];
        expect.extend_from_slice(&[0xab; 32]);
        expect.extend_from_slice(&[0x19, 0x03, 0xe8]);
        assert_eq!(&out[..n], expect.as_slice());

        let mut w = cbor::writer(&mut out);
        subject("dev", 5, 6).encode(&mut w).unwrap();
        let n = cbor::written(&w);
        assert_eq!(&out[..n], &[0x84, 0x01, 0x63, b'd', b'e', b'v', 0x05, 0x06]);
    }

    #[test]
    fn longest_entry_fits_max_entry_len() {
        let long = "x".repeat(MAX_ID_LEN);
        let e = subject(&long, u64::MAX, u64::MAX);
        let mut out = [0u8; MAX_ENTRY_LEN];
        let mut w = cbor::writer(&mut out);
        e.encode(&mut w).unwrap();
        assert_eq!(cbor::written(&w), MAX_ENTRY_LEN);
    }

    #[test]
    fn snapshot_round_trips() {
        let entries = [token(1, NOW + 60), subject("device-7", NOW, NOW + 900)];
        let bytes = snapshot_bytes(42, NOW, &entries);
        assert!(bytes.len() <= max_payload_len(entries.len()));
        let s = Snapshot::decode(&bytes).unwrap();
        assert_eq!((s.seq(), s.issued_at()), (42, NOW));
        assert_eq!(s.entries().len(), 2);
        assert_eq!(entries_of(s.entries()), entries);
    }

    #[test]
    fn delta_round_trips() {
        let entries = [subject("app-1", NOW - 5, NOW + 300)];
        let bytes = delta_bytes(7, NOW, &entries);
        let d = Delta::decode(&bytes).unwrap();
        assert_eq!((d.seq(), d.issued_at()), (7, NOW));
        assert_eq!(entries_of(d.entries()), entries);
    }

    #[test]
    fn heartbeat_round_trips_and_has_the_documented_wire_form() {
        let bytes = heartbeat_bytes(3, 10);
        assert_eq!(bytes, [0xa3, 0x00, 0x16, 0x01, 0x03, 0x02, 0x0a]);
        let h = Heartbeat::decode(&bytes).unwrap();
        assert_eq!((h.seq(), h.issued_at()), (3, 10));
    }

    #[test]
    fn empty_snapshot_has_the_documented_wire_form() {
        let bytes = snapshot_bytes(0, 1, &[]);
        assert_eq!(
            bytes,
            [0xa4, 0x00, 0x14, 0x01, 0x00, 0x02, 0x01, 0x03, 0x80]
        );
        assert!(Snapshot::decode(&bytes).unwrap().entries().is_empty());
    }

    #[test]
    fn keys_may_come_in_any_order() {
        // {3: [], 2: 1, 1: 0, 0: 21}
        let bytes = [0xa4, 0x03, 0x80, 0x02, 0x01, 0x01, 0x00, 0x00, 0x15];
        assert_eq!(Delta::decode(&bytes).unwrap().seq(), 0);
    }

    #[test]
    fn payloads_refuse_trailing_bytes() {
        let mut bytes = snapshot_bytes(1, 2, &[token(1, 3)]);
        bytes.push(0x00);
        assert_eq!(
            Snapshot::decode(&bytes),
            Err(Error::Decode(DecodeError::TrailingBytes))
        );
        let mut bytes = heartbeat_bytes(1, 2);
        bytes.push(0x00);
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::TrailingBytes))
        );
    }

    #[test]
    fn payloads_refuse_duplicate_keys() {
        // {0: 22, 1: 1, 1: 2, 2: 0}
        let bytes = [0xa4, 0x00, 0x16, 0x01, 0x01, 0x01, 0x02, 0x02, 0x00];
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::DuplicateKey(1)))
        );
        // {0: 22, 0: 22, 1: 1, 2: 0}
        let bytes = [0xa4, 0x00, 0x16, 0x00, 0x16, 0x01, 0x01, 0x02, 0x00];
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::DuplicateKey(0)))
        );
    }

    #[test]
    fn payloads_refuse_another_message_type() {
        let delta = delta_bytes(1, 2, &[]);
        assert_eq!(
            Snapshot::decode(&delta),
            Err(Error::Decode(DecodeError::InvalidValue("message type")))
        );
        let snapshot = snapshot_bytes(1, 2, &[]);
        assert_eq!(
            Delta::decode(&snapshot),
            Err(Error::Decode(DecodeError::InvalidValue("message type")))
        );
        // {0: 21, 1: 1, 2: 2}: a delta without entries is not a heartbeat either.
        let bytes = [0xa3, 0x00, 0x15, 0x01, 0x01, 0x02, 0x02];
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::InvalidValue("message type")))
        );
    }

    #[test]
    fn payloads_refuse_unknown_and_missing_keys() {
        // {0: 22, 1: 1, 2: 2, 4: 0}
        let bytes = [0xa4, 0x00, 0x16, 0x01, 0x01, 0x02, 0x02, 0x04, 0x00];
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::InvalidValue(
                "revocation payload key"
            )))
        );
        // A heartbeat carries no entries: {0: 22, 1: 1, 2: 2, 3: []}
        let bytes = [0xa4, 0x00, 0x16, 0x01, 0x01, 0x02, 0x02, 0x03, 0x80];
        assert!(Heartbeat::decode(&bytes).is_err());
        // {1: 1, 2: 2}
        assert_eq!(
            Heartbeat::decode(&[0xa2, 0x01, 0x01, 0x02, 0x02]),
            Err(Error::Decode(DecodeError::MissingField("message type")))
        );
        // {0: 20, 1: 1, 2: 2}
        assert_eq!(
            Snapshot::decode(&[0xa3, 0x00, 0x14, 0x01, 0x01, 0x02, 0x02]),
            Err(Error::Decode(DecodeError::MissingField("entries")))
        );
        // {0: 22, 2: 2}
        assert_eq!(
            Heartbeat::decode(&[0xa2, 0x00, 0x16, 0x02, 0x02]),
            Err(Error::Decode(DecodeError::MissingField("seq")))
        );
    }

    #[test]
    fn payloads_refuse_indefinite_lengths() {
        // {0: 21, 1: 1, 2: 2, 3: [_ ]}
        let bytes = [0xa4, 0x00, 0x15, 0x01, 0x01, 0x02, 0x02, 0x03, 0x9f, 0xff];
        assert_eq!(
            Delta::decode(&bytes),
            Err(Error::Decode(DecodeError::IndefiniteLength))
        );
        // {_ 0: 22, 1: 1, 2: 2}
        let bytes = [0xbf, 0x00, 0x16, 0x01, 0x01, 0x02, 0x02, 0xff];
        assert_eq!(
            Heartbeat::decode(&bytes),
            Err(Error::Decode(DecodeError::IndefiniteLength))
        );
        // An indefinite entry array inside: {0: 21, 1: 1, 2: 2, 3: [[_ 0, h'..', 1]]}
        let mut bytes = std::vec![0xa4, 0x00, 0x15, 0x01, 0x01, 0x02, 0x02, 0x03, 0x81, 0x9f];
        bytes.extend_from_slice(&[0x00, 0x58, 0x20]);
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&[0x01, 0xff]);
        assert_eq!(
            Delta::decode(&bytes),
            Err(Error::Decode(DecodeError::IndefiniteLength))
        );
    }

    #[test]
    fn entries_refuse_wrong_kinds_lengths_and_sizes() {
        fn delta_with_entry(entry: &[u8]) -> Result<(), Error> {
            let mut bytes = std::vec![0xa4, 0x00, 0x15, 0x01, 0x01, 0x02, 0x02, 0x03, 0x81];
            bytes.extend_from_slice(entry);
            Delta::decode(&bytes).map(|_| ())
        }
        let invalid = |what| Err(Error::Decode(DecodeError::InvalidValue(what)));
        // Unknown kind 2.
        assert_eq!(
            delta_with_entry(&[0x83, 0x02, 0x40, 0x00]),
            invalid("revocation entry kind")
        );
        // A token entry with a fourth element.
        let mut e = std::vec![0x84, 0x00, 0x58, 0x20];
        e.extend_from_slice(&[0; 32]);
        e.extend_from_slice(&[0x00, 0x00]);
        assert_eq!(delta_with_entry(&e), invalid("array length"));
        // A 31-byte hash.
        let mut e = std::vec![0x83, 0x00, 0x58, 0x1f];
        e.extend_from_slice(&[0; 31]);
        e.push(0x00);
        assert_eq!(delta_with_entry(&e), invalid("token hash"));
        // An empty array.
        assert_eq!(delta_with_entry(&[0x80]), invalid("array length"));
        // An empty subject.
        assert_eq!(
            delta_with_entry(&[0x84, 0x01, 0x60, 0x00, 0x00]),
            invalid("subject")
        );
        // A subject one byte longer than MAX_ID_LEN.
        let mut e = std::vec![0x84, 0x01, 0x78, u8::try_from(MAX_ID_LEN + 1).unwrap()];
        e.extend_from_slice(&[b'x'; MAX_ID_LEN + 1]);
        e.extend_from_slice(&[0x00, 0x00]);
        assert_eq!(
            delta_with_entry(&e),
            Err(Error::Decode(DecodeError::TooLarge))
        );
        // A hash as text rather than bytes.
        assert_eq!(
            delta_with_entry(&[0x83, 0x00, 0x60, 0x00]),
            Err(Error::Decode(DecodeError::UnexpectedType))
        );
    }

    #[test]
    fn too_many_entries_are_refused_both_ways() {
        let many = std::vec![token(1, 2); MAX_ENTRIES_PER_MESSAGE + 1];
        let mut out = std::vec![0u8; max_payload_len(many.len())];
        assert_eq!(
            encode_delta(1, 2, &many, &mut out),
            Err(Error::Encode(EncodeError::InvalidValue("entries")))
        );
        // Hand-build the head of an oversized array; the decoder refuses before reading on.
        let mut bytes = std::vec![0xa4, 0x00, 0x15, 0x01, 0x01, 0x02, 0x02, 0x03, 0x99];
        bytes.extend_from_slice(
            &u16::try_from(MAX_ENTRIES_PER_MESSAGE + 1)
                .unwrap()
                .to_be_bytes(),
        );
        assert_eq!(
            Delta::decode(&bytes),
            Err(Error::Decode(DecodeError::TooLarge))
        );
    }

    #[test]
    fn encoding_into_a_small_buffer_fails_cleanly() {
        let mut out = [0u8; 20];
        assert_eq!(
            encode_snapshot(1, 2, &[token(1, 2)], &mut out),
            Err(Error::Encode(EncodeError::BufferTooSmall))
        );
    }

    #[test]
    fn entries_may_be_passed_by_value_or_by_reference() {
        let mut out = [0u8; 256];
        let by_ref = encode_delta(1, 2, [token(1, 2)].iter(), &mut out).unwrap();
        let mut out2 = [0u8; 256];
        let by_value = encode_delta(1, 2, (1..2).map(|n| token(n, 2)), &mut out2).unwrap();
        assert_eq!(out[..by_ref], out2[..by_value]);
    }

    #[test]
    fn subjects_must_be_client_identifiers() {
        assert!(Entry::for_subject("", 1, 2).is_err());
        assert!(Entry::for_subject(&"x".repeat(MAX_ID_LEN + 1), 1, 2).is_err());
        assert!(Entry::for_subject(&"x".repeat(MAX_ID_LEN), 1, 2).is_ok());
    }

    // --- the list ---

    #[test]
    fn a_new_list_is_at_sequence_zero_and_not_fresh() {
        let list: RevocationList = RevocationList::new();
        assert_eq!(list.seq(), 0);
        assert!(list.is_empty());
        assert_eq!(list.fresh_as_of(), None);
        assert!(!list.is_fresh(NOW, u64::MAX));
    }

    #[test]
    fn revoked_tokens_and_subjects_are_recognised() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(
            &mut list,
            5,
            NOW,
            &[token(1, NOW + 60), subject("dev-a", NOW - 10, NOW + 900)],
        )
        .unwrap();
        assert!(list.is_revoked(&[1; 32], "anyone", NOW));
        assert!(!list.is_revoked(&[2; 32], "anyone", NOW));
        // Issued before the cut-off: revoked; at or after: not.
        assert!(list.is_revoked(&[2; 32], "dev-a", NOW - 11));
        assert!(!list.is_revoked(&[2; 32], "dev-a", NOW - 10));
        assert!(!list.is_revoked(&[2; 32], "dev-b", NOW - 11));
    }

    #[test]
    fn snapshot_replaces_the_list_and_makes_it_fresh() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[token(1, NOW + 60)]).unwrap();
        apply_snapshot(&mut list, 4, NOW + 5, &[token(2, NOW + 60)]).unwrap();
        assert_eq!(list.seq(), 4);
        assert_eq!(list.len(), 1);
        assert!(!list.is_revoked(&[1; 32], "s", 0));
        assert!(list.is_revoked(&[2; 32], "s", 0));
        assert_eq!(list.fresh_as_of(), Some(NOW + 5));
        assert!(list.is_fresh(NOW + 65, 60));
        assert!(!list.is_fresh(NOW + 66, 60));
    }

    #[test]
    fn a_replayed_older_snapshot_cannot_roll_revocations_back() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 9, NOW, &[token(1, NOW + 60)]).unwrap();
        apply_snapshot(&mut list, 8, NOW + 1, &[]).unwrap();
        assert_eq!(list.seq(), 9);
        assert!(list.is_revoked(&[1; 32], "s", 0));
        assert_eq!(list.fresh_as_of(), Some(NOW));
    }

    #[test]
    fn delta_in_sequence_adds_its_entries() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[token(1, NOW + 60)]).unwrap();
        assert_eq!(
            apply_delta(&mut list, 4, NOW + 2, &[token(2, NOW + 60)]),
            Ok(DeltaOutcome::Applied)
        );
        assert_eq!(list.seq(), 4);
        assert!(list.is_revoked(&[1; 32], "s", 0));
        assert!(list.is_revoked(&[2; 32], "s", 0));
        assert_eq!(list.fresh_as_of(), Some(NOW + 2));
    }

    #[test]
    fn a_new_list_takes_the_first_delta_without_a_snapshot() {
        // Sequence 0 is the hub's empty list, so delta 1 follows it directly.
        let mut list: RevocationList = RevocationList::new();
        assert_eq!(
            apply_delta(&mut list, 1, NOW, &[token(1, NOW + 60)]),
            Ok(DeltaOutcome::Applied)
        );
        assert!(list.is_fresh(NOW, 0));
    }

    #[test]
    fn delta_after_a_gap_asks_for_the_snapshot() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert_eq!(
            apply_delta(&mut list, 5, NOW + 2, &[token(2, NOW + 60)]),
            Ok(DeltaOutcome::Gap { have: 3, got: 5 })
        );
        assert_eq!(list.seq(), 3);
        assert!(list.is_empty());
        assert_eq!(list.fresh_as_of(), Some(NOW));
    }

    #[test]
    fn delta_already_included_changes_nothing() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert_eq!(
            apply_delta(&mut list, 2, NOW + 2, &[token(2, NOW + 60)]),
            Ok(DeltaOutcome::AlreadyApplied)
        );
        assert_eq!(
            apply_delta(&mut list, 3, NOW + 3, &[token(2, NOW + 60)]),
            Ok(DeltaOutcome::AlreadyApplied)
        );
        assert!(list.is_empty());
        assert_eq!(list.seq(), 3);
    }

    #[test]
    fn heartbeat_in_sync_refreshes_freshness() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert_eq!(heartbeat(&mut list, 3, NOW + 30), HeartbeatOutcome::InSync);
        assert_eq!(list.fresh_as_of(), Some(NOW + 30));
        // A replayed older heartbeat does not move freshness backwards.
        assert_eq!(heartbeat(&mut list, 3, NOW + 10), HeartbeatOutcome::InSync);
        assert_eq!(list.fresh_as_of(), Some(NOW + 30));
    }

    #[test]
    fn heartbeat_ahead_of_the_list_asks_for_the_snapshot() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert_eq!(heartbeat(&mut list, 4, NOW + 30), HeartbeatOutcome::Behind);
        assert_eq!(list.fresh_as_of(), Some(NOW));
    }

    #[test]
    fn heartbeat_behind_the_list_is_ignored() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert_eq!(
            heartbeat(&mut list, 2, NOW + 30),
            HeartbeatOutcome::Outdated
        );
        assert_eq!(list.fresh_as_of(), Some(NOW));
    }

    #[test]
    fn knowledge_goes_stale_when_heartbeats_stop() {
        // What a broker that suppresses revocation traffic looks like to a verifier.
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 3, NOW, &[]).unwrap();
        assert!(list.is_fresh(NOW + 120, 120));
        assert!(!list.is_fresh(NOW + 121, 120));
        // A hub clock slightly ahead of ours is not staleness.
        assert!(list.is_fresh(NOW - 5, 0));
    }

    #[test]
    fn entries_drop_out_after_the_tokens_they_cover_expire() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(
            &mut list,
            1,
            NOW,
            &[token(1, NOW + 60), subject("dev", NOW, NOW + 900)],
        )
        .unwrap();
        list.prune(NOW + 60 + 30, 30);
        assert_eq!(list.len(), 2, "kept through the leeway");
        list.prune(NOW + 91, 30);
        assert_eq!(list.len(), 1);
        assert!(!list.is_revoked(&[1; 32], "x", 0));
        list.prune(NOW + 931, 30);
        assert!(list.is_empty());
    }

    #[test]
    fn spent_entries_are_not_even_added() {
        let mut list: RevocationList = RevocationList::with_leeway(30);
        let bytes = snapshot_bytes(1, NOW, &[token(1, NOW - 31), token(2, NOW - 30)]);
        list.apply_snapshot(&Snapshot::decode(&bytes).unwrap(), NOW)
            .unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.is_revoked(&[2; 32], "x", 0));
    }

    #[test]
    fn duplicate_token_hashes_are_stored_once_with_the_later_expiry() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 1, NOW, &[token(1, NOW + 60), token(1, NOW + 90)]).unwrap();
        assert_eq!(
            apply_delta(&mut list, 2, NOW, &[token(1, NOW + 30)]),
            Ok(DeltaOutcome::Applied)
        );
        assert_eq!(list.iter().collect::<Vec<_>>(), [&token(1, NOW + 90)]);
    }

    #[test]
    fn a_subject_revoked_again_keeps_the_later_cut_off_and_expiry() {
        let mut list: RevocationList = RevocationList::new();
        apply_snapshot(&mut list, 1, NOW, &[subject("dev", NOW - 100, NOW + 800)]).unwrap();
        let _ = apply_delta(&mut list, 2, NOW, &[subject("dev", NOW, NOW + 900)]).unwrap();
        let _ = apply_delta(&mut list, 3, NOW, &[subject("dev", NOW - 50, NOW + 850)]).unwrap();
        assert_eq!(
            list.iter().collect::<Vec<_>>(),
            [&subject("dev", NOW, NOW + 900)]
        );
    }

    #[test]
    fn a_full_list_makes_room_by_pruning_spent_entries() {
        let mut list: RevocationList<2> = RevocationList::with_leeway(0);
        apply_snapshot(
            &mut list,
            1,
            NOW,
            &[token(1, NOW + 10), token(2, NOW + 100)],
        )
        .unwrap();
        let bytes = delta_bytes(2, NOW + 20, &[token(3, NOW + 100)]);
        assert_eq!(
            list.apply_delta(&Delta::decode(&bytes).unwrap(), NOW + 20),
            Ok(DeltaOutcome::Applied)
        );
        assert!(list.is_revoked(&[3; 32], "x", 0));
        assert!(list.is_complete());
        assert!(list.is_fresh(NOW + 20, 0));
    }

    #[test]
    fn full_list_refuses_and_is_no_longer_fresh() {
        let mut list: RevocationList<2> = RevocationList::new();
        apply_snapshot(&mut list, 1, NOW, &[token(1, NOW + 60), token(2, NOW + 60)]).unwrap();
        assert!(list.is_fresh(NOW, 60));
        assert_eq!(
            apply_delta(&mut list, 2, NOW + 1, &[token(3, NOW + 60)]),
            Err(Error::Capacity(CapacityError::Revocations))
        );
        assert!(!list.is_complete());
        assert_eq!(list.fresh_as_of(), None);
        assert!(!list.is_fresh(NOW + 1, u64::MAX));
        // What fitted is still enforced, and later deltas keep applying.
        assert!(list.is_revoked(&[1; 32], "x", 0));
        assert_eq!(list.seq(), 2);
        assert_eq!(
            apply_delta(&mut list, 3, NOW + 2, &[token(1, NOW + 60)]),
            Ok(DeltaOutcome::Applied)
        );
        // Neither deltas nor heartbeats restore freshness; the heartbeat asks for the
        // snapshot instead.
        assert_eq!(list.fresh_as_of(), None);
        assert_eq!(heartbeat(&mut list, 3, NOW + 3), HeartbeatOutcome::Behind);
        assert_eq!(list.fresh_as_of(), None);
    }

    #[test]
    fn an_overflowing_snapshot_keeps_what_fits_and_is_not_fresh() {
        let mut list: RevocationList<2> = RevocationList::new();
        assert_eq!(
            apply_snapshot(
                &mut list,
                4,
                NOW,
                &[token(1, NOW + 60), token(2, NOW + 60), token(3, NOW + 60)]
            ),
            Err(Error::Capacity(CapacityError::Revocations))
        );
        assert_eq!(list.len(), 2);
        assert_eq!(list.seq(), 4);
        assert!(!list.is_fresh(NOW, u64::MAX));
    }

    #[test]
    fn a_snapshot_that_fits_again_restores_freshness() {
        let mut list: RevocationList<2> = RevocationList::new();
        let three = [token(1, NOW + 60), token(2, NOW + 60), token(3, NOW + 120)];
        assert!(apply_snapshot(&mut list, 4, NOW, &three).is_err());
        // Later, two of the three have expired and the hub's snapshot fits.
        let later = NOW + 60 + DEFAULT_LEEWAY + 1;
        apply_snapshot(&mut list, 4, later, &three).unwrap();
        assert!(list.is_complete());
        assert_eq!(list.len(), 1);
        assert_eq!(list.fresh_as_of(), Some(later));
        assert_eq!(
            heartbeat(&mut list, 4, later + 30),
            HeartbeatOutcome::InSync
        );
    }

    // --- properties ---

    fn any_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            (any::<[u8; 32]>(), any::<u64>())
                .prop_map(|(hash, expires_at)| Entry::Token { hash, expires_at }),
            (
                "\\PC{1,64}".prop_filter("fits MAX_ID_LEN", |s| s.len() <= MAX_ID_LEN),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(s, issued_before, expires_at)| {
                    Entry::for_subject(&s, issued_before, expires_at).unwrap()
                }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_returns_the_same_entries(
            entries in proptest::collection::vec(any_entry(), 0..40),
            seq in any::<u64>(),
            issued_at in any::<u64>(),
        ) {
            let bytes = snapshot_bytes(seq, issued_at, &entries);
            prop_assert!(bytes.len() <= max_payload_len(entries.len()));
            let s = Snapshot::decode(&bytes).unwrap();
            prop_assert_eq!((s.seq(), s.issued_at()), (seq, issued_at));
            prop_assert_eq!(entries_of(s.entries()), entries.clone());

            let bytes = delta_bytes(seq, issued_at, &entries);
            let d = Delta::decode(&bytes).unwrap();
            prop_assert_eq!(entries_of(d.entries()), entries);

            let bytes = heartbeat_bytes(seq, issued_at);
            let h = Heartbeat::decode(&bytes).unwrap();
            prop_assert_eq!((h.seq(), h.issued_at()), (seq, issued_at));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = Snapshot::decode(&bytes);
            let _ = Delta::decode(&bytes);
            let _ = Heartbeat::decode(&bytes);
        }

        #[test]
        fn a_decoded_payload_iterates_without_error(
            entries in proptest::collection::vec(any_entry(), 0..10),
            cut in any::<prop::sample::Index>(),
        ) {
            // Truncating a valid payload anywhere either fails to decode or, if it
            // decodes, iterates cleanly.
            let bytes = delta_bytes(1, 2, &entries);
            let cut = cut.index(bytes.len() + 1);
            if let Ok(d) = Delta::decode(&bytes[..cut]) {
                prop_assert!(d.entries().iter().all(|e| e.is_ok()));
            }
        }
    }
}
