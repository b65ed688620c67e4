//! What a revocation becomes: the entries to publish, on which streams, in which changes,
//! and the control messages to send.
//!
//! An operator names targets (a token, a subject, a device, a group, a role, a list of
//! devices). Inside one store transaction the backend resolves them against the registry
//! and the tokens the hub actually issued ([`Resolved`]), and [`plan`] turns that into
//! entries, each addressed to the one audience whose tokens it can affect, grouped into
//! changes that each fit one page ([`Plan`]). Everything here is a pure function of plain
//! values, so every store backend plans the same way and tests need no store.
//!
//! The rules (PROTOCOL.md §11.1):
//! - a token is revoked by its hash, addressed to its audience, until its own `exp` plus
//!   leeway;
//! - a subject is revoked per audience it holds live tokens for: one subject entry cutting
//!   off everything issued before the revocation second, lasting until the latest `exp` of
//!   those tokens plus leeway, and a hash entry for each token issued within that very
//!   second (a subject entry cannot tell them from tokens issued just after);
//! - a subject with no live token needs no entry at all: a device that never enrolled costs
//!   nothing on the wire;
//! - a whole device is also told `revoked` on its control topic if it ever enrolled; a
//!   device whose tokens alone are revoked is told `refresh_now`.

use std::collections::{BTreeMap, HashSet};

use tessera_shared::message::{Command, RevokeTarget};
use tessera_shared::revocation::{
    Addressed, Entry, MAX_ENTRIES_PER_PAGE, MAX_PAGE_PAYLOAD_LEN, Stream, page_overhead,
};

use crate::store::{ClientKind, ClientRecord, IssuedToken, TokenKind};

/// What an operator asked to revoke, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One token by its hash.
    TokenHash([u8; 32]),
    /// One token by its `cti`.
    TokenId(Vec<u8>),
    /// Every token of a device or app issued before now, and its grants.
    Subject(String),
    /// A whole device.
    Device(String),
    /// Every device in a group, each whole.
    Group(String),
    /// Every client with a role: devices whole, others as subjects.
    Role(String),
    /// Devices named one by one, each whole.
    Devices(Vec<String>),
}

impl Target {
    /// The kind of target, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TokenHash(_) => "token_hash",
            Self::TokenId(_) => "token_id",
            Self::Subject(_) => "subject",
            Self::Device(_) => "device",
            Self::Group(_) => "group",
            Self::Role(_) => "role",
            Self::Devices(_) => "devices",
        }
    }

    /// The owned form of a request's target.
    pub fn from_wire(target: &RevokeTarget<'_>) -> Self {
        match target {
            RevokeTarget::TokenHash(h) => Self::TokenHash(*h),
            RevokeTarget::TokenId(cti) => Self::TokenId(cti.to_vec()),
            RevokeTarget::Subject(s) => Self::Subject((*s).to_owned()),
            RevokeTarget::Device(d) => Self::Device((*d).to_owned()),
            RevokeTarget::Group(g) => Self::Group((*g).to_owned()),
            RevokeTarget::Role(r) => Self::Role((*r).to_owned()),
            RevokeTarget::Devices(list) => Self::Devices(list.iter().map(str::to_owned).collect()),
        }
    }

    /// How the audit log and the CLI name it.
    pub fn describe(&self) -> String {
        match self {
            Self::TokenHash(h) => format!("token {}", hex::encode(h)),
            Self::TokenId(cti) => format!("token id {}", hex::encode(cti)),
            Self::Subject(s) => format!("subject {s}"),
            Self::Device(d) => format!("device {d}"),
            Self::Group(g) => format!("group {g}"),
            Self::Role(r) => format!("role {r}"),
            Self::Devices(list) => match list.as_slice() {
                [one] => format!("device {one}"),
                [first, ..] => format!("{} devices ({first}, …)", list.len()),
                [] => "no devices".to_owned(),
            },
        }
    }
}

/// A subject the targets resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSubject {
    /// Its id.
    pub id: String,
    /// Its registry record, if it is registered.
    pub client: Option<ClientRecord>,
    /// Whether the whole client is revoked (devices: tokens, grants and enrollment), not
    /// only its tokens.
    pub whole: bool,
    /// Its tokens still live at the revocation (`exp + leeway ≥ now`).
    pub live_tokens: Vec<IssuedToken>,
}

/// What the store found for the targets, inside the revoking transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Tokens named by hash or id, with their holder's record if registered.
    pub tokens: Vec<(IssuedToken, Option<ClientRecord>)>,
    /// Subjects, each once (whole wins over tokens-only).
    pub subjects: Vec<ResolvedSubject>,
}

/// A control message the hub owes a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingControl {
    /// The device.
    pub device: String,
    /// What to tell it.
    pub command: Command,
    /// The hub time it is issued at (Unix seconds).
    pub issued_at: u64,
}

/// A numbered change of one stream: what one delta carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The stream's name (`devices/3f`, `service/tessera`).
    pub stream: String,
    /// Its change number on that stream.
    pub seq: u64,
    /// When it was recorded (Unix seconds).
    pub created_at: u64,
    /// The entries it adds.
    pub entries: Vec<Addressed>,
}

/// What [`plan`] decided, before the store numbers the changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per stream name, its new changes in order, each fitting one page.
    pub changes: BTreeMap<String, Vec<Vec<Addressed>>>,
    /// Control messages to send.
    pub controls: Vec<PendingControl>,
    /// Clients or tokens newly revoked.
    pub revoked: u64,
}

impl Plan {
    /// Number of entries in all changes.
    pub fn entry_count(&self) -> u64 {
        let n: usize = self.changes.values().flatten().map(Vec::len).sum();
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// What a revocation did once durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The numbered changes, in stream and change order.
    pub changes: Vec<Change>,
    /// Each touched stream's latest change number after the revocation.
    pub latest: BTreeMap<String, u64>,
    /// Control messages to send.
    pub controls: Vec<PendingControl>,
    /// Clients or tokens newly revoked.
    pub revoked: u64,
}

impl Outcome {
    /// Adds what a later revocation did to this one.
    pub fn absorb(&mut self, later: Outcome) {
        self.changes.extend(later.changes);
        for (stream, seq) in later.latest {
            let latest = self.latest.entry(stream).or_default();
            *latest = (*latest).max(seq);
        }
        self.controls.extend(later.controls);
        self.revoked += later.revoked;
    }

    /// Number of entries in all changes.
    pub fn entry_count(&self) -> u64 {
        let n: usize = self.changes.iter().map(|c| c.entries.len()).sum();
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// Why a revocation cannot be planned: stored data the protocol cannot name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot address a revocation: {0}")]
pub struct PlanError(pub String);

/// The stream that carries the revocation of `token`: its audience's device partition
/// for an access token, its service's stream for a device token.
pub fn stream_of(token: &IssuedToken) -> Result<Stream<'_>, PlanError> {
    match token.kind {
        TokenKind::Access => Ok(Stream::of_device(&token.audience)),
        TokenKind::Device => Stream::of_service(&token.audience).map_err(|_| {
            PlanError(format!(
                "device token audience {:?} is not an identifier",
                token.audience
            ))
        }),
    }
}

/// Turns resolved targets into entries, changes and control messages; see the module
/// documentation for the rules.
pub fn plan(resolved: &Resolved, now: u64, leeway: u64) -> Result<Plan, PlanError> {
    let mut per_stream: BTreeMap<String, Vec<Addressed>> = BTreeMap::new();
    let mut seen: HashSet<Addressed> = HashSet::new();
    let mut controls: Vec<PendingControl> = Vec::new();
    let mut add = |token: &IssuedToken, entry: Entry| -> Result<(), PlanError> {
        let stream = stream_of(token)?.name().to_string();
        let addressed = Addressed::new(&token.audience, entry).map_err(|_| {
            PlanError(format!(
                "token audience {:?} is not an identifier",
                token.audience
            ))
        })?;
        if seen.insert(addressed.clone()) {
            per_stream.entry(stream).or_default().push(addressed);
        }
        Ok(())
    };
    let enrolled_device = |c: &Option<ClientRecord>| {
        c.as_ref()
            .is_some_and(|c| c.kind == ClientKind::Device && c.enrolled_at.is_some())
    };
    let mut revoked = 0u64;
    for (token, holder) in &resolved.tokens {
        add(
            token,
            Entry::Token {
                hash: token.hash,
                expires_at: token.expires_at.saturating_add(leeway),
            },
        )?;
        revoked += 1;
        if token.kind == TokenKind::Device && enrolled_device(holder) {
            controls.push(PendingControl {
                device: token.subject.clone(),
                command: Command::RefreshNow,
                issued_at: now,
            });
        }
    }
    for subject in &resolved.subjects {
        let already_revoked = subject
            .client
            .as_ref()
            .is_some_and(|c| c.revoked_at.is_some());
        if subject.whole && already_revoked {
            // Its tokens were covered when it was revoked, and it has had none since.
            continue;
        }
        // Per audience (and so per stream): the latest expiry among the tokens issued
        // before this second, and the tokens issued within it.
        let mut before: BTreeMap<(TokenKind, &str), (&IssuedToken, u64)> = BTreeMap::new();
        for token in &subject.live_tokens {
            if token.issued_at < now {
                let slot = before
                    .entry((token.kind, token.audience.as_str()))
                    .or_insert((token, token.expires_at));
                slot.1 = slot.1.max(token.expires_at);
            } else {
                add(
                    token,
                    Entry::Token {
                        hash: token.hash,
                        expires_at: token.expires_at.saturating_add(leeway),
                    },
                )?;
            }
        }
        for (token, latest_exp) in before.into_values() {
            let entry = Entry::for_subject(&subject.id, now, latest_exp.saturating_add(leeway))
                .map_err(|_| PlanError(format!("subject {:?} is not an identifier", subject.id)))?;
            add(token, entry)?;
        }
        revoked += 1;
        if enrolled_device(&subject.client) {
            controls.push(PendingControl {
                device: subject.id.clone(),
                command: if subject.whole {
                    Command::Revoked
                } else {
                    Command::RefreshNow
                },
                issued_at: now,
            });
        }
    }
    let mut changes = BTreeMap::new();
    for (name, entries) in per_stream {
        let stream =
            Stream::parse(&name).map_err(|_| PlanError(format!("stream name {name:?}")))?;
        changes.insert(name.clone(), chunk(&stream, entries));
    }
    Ok(Plan {
        changes,
        controls,
        revoked,
    })
}

/// Splits `entries` into changes that each fit one signed page on `stream`.
pub fn chunk(stream: &Stream<'_>, entries: Vec<Addressed>) -> Vec<Vec<Addressed>> {
    let budget = MAX_PAGE_PAYLOAD_LEN - page_overhead(stream);
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for entry in entries {
        let len = entry.encoded_len();
        if !current.is_empty() && (used + len > budget || current.len() == MAX_ENTRIES_PER_PAGE) {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += len;
        current.push(entry);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One page to build: changes `from..=to` of a stream, with the entries they still carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePlan {
    /// First change covered.
    pub from: u64,
    /// Last change covered.
    pub to: u64,
    /// The entries, in change order.
    pub entries: Vec<Addressed>,
}

/// Packs the changes of a stream read from `from` on (each with the entries still in
/// force, in change order) into consecutive pages that each fit the page budget, the last
/// one reaching `latest`. `complete` says whether `changes` reaches the end of what is
/// stored; if not, the last change read may be partial and is left for a later page, and a
/// read that holds nothing but that change gives no page at all: a page claims every change
/// of its range whole, so one must never be built from a change that may have been cut.
/// With `max_pages = Some(1)` this is the one page a `fetch_revocations` answers with.
pub fn pack(
    stream: &Stream<'_>,
    from: u64,
    latest: u64,
    changes: &[(u64, Vec<Addressed>)],
    complete: bool,
    max_pages: Option<usize>,
) -> Vec<PagePlan> {
    let budget = MAX_PAGE_PAYLOAD_LEN - page_overhead(stream);
    // A read that stopped early may have cut its last change: leave that one out (the
    // reader asks for more entries than one change can hold, so another is left).
    let (usable, reaches_end) = match (complete, changes.split_last()) {
        (true, _) => (changes, true),
        (false, Some((_, rest))) if !rest.is_empty() => (rest, false),
        // Nothing read is known whole (a reader asking for too few entries).
        (false, _) => return Vec::new(),
    };
    let mut pages = Vec::new();
    let mut page = PagePlan {
        from,
        to: from.saturating_sub(1),
        entries: Vec::new(),
    };
    let mut used = 0;
    for (seq, entries) in usable {
        let len: usize = entries.iter().map(Addressed::encoded_len).sum();
        let full = used + len > budget || page.entries.len() + entries.len() > MAX_ENTRIES_PER_PAGE;
        if full && !page.entries.is_empty() {
            if max_pages.is_some_and(|m| pages.len() + 1 >= m) {
                pages.push(page);
                return pages;
            }
            let next_from = page.to + 1;
            pages.push(page);
            page = PagePlan {
                from: next_from,
                to: next_from - 1,
                entries: Vec::new(),
            };
            used = 0;
        }
        // Every change was cut to fit a page when it was made, and entries only leave it.
        used += len;
        page.entries.extend(entries.iter().cloned());
        page.to = *seq;
    }
    if reaches_end {
        page.to = latest;
    }
    if page.to >= page.from {
        pages.push(page);
    }
    pages
}

#[cfg(test)]
mod tests;
