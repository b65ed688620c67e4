//! `token inspect`: what a token says, and whether the hub's verifiers would accept it.
//!
//! The token goes through the core's own path (decode the COSE_Sign1 → verify the
//! signature with the key its `kid` names → decode and check the claims); nothing here
//! reads CBOR. Its claims are shown even when the signature does not verify, marked so,
//! because "why is this token refused" is the question an operator brings.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::{ConfigError, HubConfig};
use tessera_hub::keyfile;
use tessera_hub::policy::Policy;
use tessera_hub::store::{AnyStore, Store};
use tessera_shared::claims::Claims;
use tessera_shared::cose::Sign1;
use tessera_shared::crypto::{PublicKey, Signature, Verifier};
use tessera_shared::error::{ClaimsError, Error as CoreError};
use tessera_shared::revocation::{Addressed, MAX_LEEWAY, Stream, token_hash};
use tessera_shared::token::{self, DEFAULT_LEEWAY, MAX_TOKEN_LEN, Validation};

use super::{open_store, revocations, when};

/// What `token inspect` reads and checks against.
#[derive(Args)]
pub(super) struct InspectArgs {
    /// The token: hex on the command line, or a file holding it as hex or raw CBOR.
    token: String,
    /// Check the signature with this trust anchor (SPKI PEM, as `init` wrote it) instead
    /// of the hub's keys. Needs no hub configuration, and says nothing of revocation.
    #[arg(long)]
    trust_anchor: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// The keys a token may be checked with, each described for people.
type TrustedKeys = Vec<(PublicKey, String)>;

/// What the signature check found.
enum SignatureCheck {
    /// It verifies with a key the hub holds (or the trust anchor given), described.
    Valid { key: String },
    /// A key with its `kid` is known, and the signature does not verify with it.
    Invalid { key: String, reason: String },
    /// No known key has its `kid`.
    UnknownKey { known: Vec<String> },
}

impl SignatureCheck {
    fn name(&self) -> &'static str {
        match self {
            Self::Valid { .. } => "valid",
            Self::Invalid { .. } => "invalid",
            Self::UnknownKey { .. } => "unknown_key",
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Valid { key } => format!("valid ({key})"),
            Self::Invalid { key, reason } => {
                format!("INVALID: {reason} (checked with {key})")
            }
            Self::UnknownKey { known } if known.is_empty() => {
                "UNKNOWN KEY: no key to check it with".to_owned()
            }
            Self::UnknownKey { known } => format!(
                "UNKNOWN KEY: signed with a key that is not among the trusted keys ({})",
                known.join(", ")
            ),
        }
    }
}

/// The token's times against now, by the core's rule ([`Validation`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    Valid,
    Expired,
    NotYetValid,
}

impl Lifetime {
    fn name(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
        }
    }
}

/// What the hub's database says of the token (`None` fields: nothing known).
#[derive(Default)]
struct Revocation {
    /// The live entries that cover it: stream, change, entry.
    entries: Vec<(String, u64, Addressed)>,
    /// When its subject was revoked whole.
    subject_revoked_at: Option<u64>,
    /// The hub's record of issuing it: `device` or `access`, or `None` when there is none
    /// (never issued by this hub, or pruned after it expired).
    issued_kind: Option<&'static str>,
}

impl Revocation {
    fn revoked(&self) -> bool {
        !self.entries.is_empty() || self.subject_revoked_at.is_some()
    }
}

/// Everything `token inspect` found out about one token.
struct Report<'a> {
    bytes: &'a [u8],
    kid: &'a [u8],
    claims: Claims<'a>,
    signature: SignatureCheck,
    lifetime: Lifetime,
    leeway: u64,
    /// `None` without the hub's database (checked with a trust anchor).
    revocation: Option<Revocation>,
    now: u64,
}

pub(super) async fn token(config_path: &Path, args: InspectArgs) -> Result<()> {
    let bytes = read_token(&args.token)?;
    let now = SystemClock.now();
    let envelope = Sign1::decode(&bytes)
        .map_err(|e| anyhow::anyhow!("not a token (a COSE_Sign1 the core accepts): {e}"))?;

    let (keys, hub) = match &args.trust_anchor {
        Some(path) => (anchor_key(path)?, None),
        None => {
            let config = load_config(config_path)?;
            let store = open_store(&config)?;
            (hub_keys(&store, now).await?, Some((config, store)))
        }
    };
    let leeway = match &hub {
        Some((config, _)) => policy_leeway(config),
        None => DEFAULT_LEEWAY,
    };

    let key = keys.iter().find(|(k, _)| k.kid() == envelope.kid());
    let (signature, verified_claims) = check_signature(&bytes, key, &keys);
    let claims = match verified_claims {
        Some(c) => c,
        None => dangerous_unverified_claims(&envelope).map_err(|e| {
            anyhow::anyhow!(
                "the signature is {}, and the payload is not a claims set: {e}",
                signature.name()
            )
        })?,
    };
    let lifetime = match key {
        Some((k, _)) if matches!(signature, SignatureCheck::Valid { .. }) => {
            checked_lifetime(&bytes, k, &claims, now, leeway)?
        }
        // The core checks times only behind a valid signature: the same rule, to inform.
        _ if now >= claims.exp.saturating_add(leeway) => Lifetime::Expired,
        _ if claims.nbf.unwrap_or(claims.iat) > now.saturating_add(leeway) => Lifetime::NotYetValid,
        _ => Lifetime::Valid,
    };
    let revocation = match &hub {
        Some((_, store)) => Some(revocation(store, &claims, &token_hash(&bytes), now).await?),
        None => None,
    };

    let report = Report {
        bytes: &bytes,
        kid: envelope.kid(),
        claims,
        signature,
        lifetime,
        leeway,
        revocation,
        now,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.print();
    }
    let refusals = report.refusals();
    if !refusals.is_empty() {
        bail!("the token would be refused: {}", refusals.join(", "));
    }
    Ok(())
}

/// The trust anchor in `path`, described.
fn anchor_key(path: &Path) -> Result<TrustedKeys> {
    let key = keyfile::read_public(path)?;
    let described = format!(
        "trust anchor {}, kid {}",
        path.display(),
        hex::encode(key.kid())
    );
    Ok(vec![(key, described)])
}

/// Every signing key in the hub's database, retired ones too (a token they signed is
/// then reported as signed by the hub, and expired), described with its state.
async fn hub_keys(store: &AnyStore, now: u64) -> Result<TrustedKeys> {
    Ok(store
        .keys()
        .await?
        .iter()
        .filter_map(|r| {
            let key = PublicKey::from_sec1(&r.public_key).ok()?;
            let state = super::keys::key_state(r, now);
            Some((
                key,
                format!("hub signing key {}, {state}", hex::encode(r.kid)),
            ))
        })
        .collect())
}

/// The policy's leeway, or the default one (with a warning) when the policy does not load:
/// inspecting a token must not depend on the policy being right.
fn policy_leeway(config: &HubConfig) -> u64 {
    match Policy::load(&config.policy) {
        Ok(policy) => policy.leeway_s(),
        Err(e) => {
            eprintln!(
                "warning: cannot load the policy ({e}); checking times with the default \
                 leeway of {DEFAULT_LEEWAY} s"
            );
            DEFAULT_LEEWAY
        }
    }
}

/// Checks the signature with `key` (the trusted key with the token's `kid`, if any) and
/// returns the claims it authenticates.
fn check_signature<'a>(
    bytes: &'a [u8],
    key: Option<&(PublicKey, String)>,
    keys: &TrustedKeys,
) -> (SignatureCheck, Option<Claims<'a>>) {
    let Some((key, described)) = key else {
        let known = keys.iter().map(|(k, _)| hex::encode(k.kid())).collect();
        return (SignatureCheck::UnknownKey { known }, None);
    };
    match token::dangerous_verify_signature_only(bytes, key) {
        Ok(claims) => (
            SignatureCheck::Valid {
                key: described.clone(),
            },
            Some(claims),
        ),
        Err(e) => {
            // The signature error alone: "signature does not verify".
            let reason = match e {
                CoreError::Signature(e) => e.to_string(),
                e => e.to_string(),
            };
            let key = described.clone();
            (SignatureCheck::Invalid { key, reason }, None)
        }
    }
}

/// The core's verdict on the times of a token whose signature verifies, for a verifier
/// that is its audience.
fn checked_lifetime(
    bytes: &[u8],
    key: &PublicKey,
    claims: &Claims<'_>,
    now: u64,
    leeway: u64,
) -> Result<Lifetime> {
    let validation = Validation {
        now,
        audience: claims.aud,
        leeway,
        issuer: None,
        required_scope: None,
    };
    Ok(match token::verify(bytes, key, &validation) {
        Ok(_) => Lifetime::Valid,
        Err(CoreError::Claims(ClaimsError::Expired)) => Lifetime::Expired,
        Err(CoreError::Claims(ClaimsError::NotYetValid | ClaimsError::IssuedInFuture)) => {
            Lifetime::NotYetValid
        }
        Err(e) => bail!("the core refuses a token whose signature verifies: {e}"),
    })
}

impl Report<'_> {
    /// Why a verifier would refuse the token; empty when it would accept it.
    fn refusals(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        match &self.signature {
            SignatureCheck::Valid { .. } => {}
            SignatureCheck::Invalid { .. } => why.push("its signature does not verify"),
            SignatureCheck::UnknownKey { .. } => why.push("it is signed with an unknown key"),
        }
        match self.lifetime {
            Lifetime::Valid => {}
            Lifetime::Expired => why.push("it has expired"),
            Lifetime::NotYetValid => why.push("it is not valid yet"),
        }
        if self.revocation.as_ref().is_some_and(Revocation::revoked) {
            why.push("it is revoked");
        }
        why
    }

    fn verified(&self) -> bool {
        matches!(self.signature, SignatureCheck::Valid { .. })
    }

    fn to_json(&self) -> serde_json::Value {
        let revocation = self.revocation.as_ref().map(|r| {
            let entries: Vec<serde_json::Value> = r
                .entries
                .iter()
                .map(|(stream, seq, a)| revocations::entry_json(stream, *seq, a))
                .collect();
            serde_json::json!({
                "entries": entries,
                "subject_revoked_at": r.subject_revoked_at,
                "subject_revoked_at_rfc3339": r.subject_revoked_at.map(when::rfc3339_s),
                "issued_record": r.issued_kind,
            })
        });
        serde_json::json!({
            "valid": self.refusals().is_empty(),
            "refused_because": self.refusals(),
            "signature": self.signature.name(),
            "signature_detail": self.signature.describe(),
            "claims_verified": self.verified(),
            "lifetime": self.lifetime.name(),
            "expired": self.lifetime == Lifetime::Expired,
            "leeway_s": self.leeway,
            "revoked": self.revocation.as_ref().map(Revocation::revoked),
            "revocation": revocation,
            "kid": hex::encode(self.kid),
            "token_hash": hex::encode(token_hash(self.bytes)),
            "length": self.bytes.len(),
            "claims": claims_json(&self.claims),
            "now": self.now,
            "now_rfc3339": when::rfc3339_s(self.now),
        })
    }

    fn print(&self) {
        let (claims, now, leeway) = (&self.claims, self.now, self.leeway);
        println!(
            "token: {} bytes, hash {}",
            self.bytes.len(),
            hex::encode(token_hash(self.bytes))
        );
        if self.verified() {
            println!("claims:");
        } else {
            println!("claims (NOT VERIFIED: the signature did not check):");
        }
        let at = |t: u64| format!("{} ({})", when::human_s(t), when::relative(t, now));
        println!("  iss    {}", claims.iss);
        println!("  sub    {}", claims.sub);
        println!("  aud    {}", claims.aud);
        println!("  scope  {}", claims.scope.as_str());
        println!("  iat    {}", at(claims.iat));
        if let Some(nbf) = claims.nbf {
            println!("  nbf    {}", at(nbf));
        }
        println!("  exp    {}", at(claims.exp));
        println!("  cti    {}", hex::encode(claims.cti));
        println!(
            "  cnf    key thumbprint {} (kid {})",
            hex::encode(claims.cnf.thumbprint()),
            hex::encode(claims.cnf.kid())
        );
        println!("signature: {}", self.signature.describe());
        match self.lifetime {
            Lifetime::Valid => println!(
                "lifetime:  not expired (until {}, leeway {leeway} s)",
                when::human_s(claims.exp)
            ),
            Lifetime::Expired => println!(
                "lifetime:  EXPIRED {} (leeway {leeway} s)",
                when::relative(claims.exp, now)
            ),
            Lifetime::NotYetValid => println!(
                "lifetime:  NOT YET VALID (from {}, leeway {leeway} s)",
                when::human_s(claims.nbf.unwrap_or(claims.iat))
            ),
        }
        match &self.revocation {
            None => {
                println!("revoked:   unknown (no hub database: checked with a trust anchor only)");
            }
            Some(r) => {
                let record = match r.issued_kind {
                    Some(kind) => format!("the hub recorded issuing this {kind} token"),
                    None => "the hub has no record of issuing it (not its token, or pruned \
                             after it expired)"
                        .to_owned(),
                };
                if r.revoked() {
                    println!("revoked:   YES; {record}");
                    if let Some(t) = r.subject_revoked_at {
                        println!("  {} was revoked whole at {}", claims.sub, when::human_s(t));
                    }
                    for (stream, seq, a) in &r.entries {
                        println!("  {stream} #{seq}: {}", revocations::describe(a, now));
                    }
                } else {
                    println!("revoked:   no (no live revocation entry covers it); {record}");
                }
            }
        }
        let refusals = self.refusals();
        if refusals.is_empty() {
            println!("verdict:   valid");
        } else {
            println!("verdict:   REFUSED: {}", refusals.join(", "));
        }
    }
}

/// A token's claims as JSON: times as Unix seconds and RFC 3339 (`_rfc3339`), binary
/// values in hex, the holder's key by its RFC 9679 thumbprint and kid.
pub(super) fn claims_json(c: &Claims<'_>) -> serde_json::Value {
    serde_json::json!({
        "iss": c.iss,
        "sub": c.sub,
        "aud": c.aud,
        "scope": c.scope.as_str(),
        "iat": c.iat,
        "iat_rfc3339": when::rfc3339_s(c.iat),
        "nbf": c.nbf,
        "nbf_rfc3339": c.nbf.map(when::rfc3339_s),
        "exp": c.exp,
        "exp_rfc3339": when::rfc3339_s(c.exp),
        "cti": hex::encode(c.cti),
        "cnf_thumbprint": hex::encode(c.cnf.thumbprint()),
        "cnf_kid": hex::encode(c.cnf.kid()),
    })
}

/// What the hub's database says of the token: the live entries that cover it (on the
/// streams that carry entries for its audience), whether its subject was revoked whole,
/// and whether the hub recorded issuing it.
async fn revocation(
    store: &AnyStore,
    claims: &Claims<'_>,
    hash: &[u8; 32],
    now: u64,
) -> Result<Revocation> {
    let mut found = Revocation::default();
    let mut streams = vec![Stream::of_device(claims.aud).name().to_string()];
    if let Ok(service) = Stream::of_service(claims.aud) {
        streams.push(service.name().to_string());
    }
    for stream in streams {
        let read = store
            .stream_entries(&stream, 1, now, MAX_LEEWAY, usize::MAX)
            .await?;
        for (seq, entries) in read.changes {
            for a in entries {
                if a.audience.as_str() == claims.aud && a.entry.covers(hash, claims.sub, claims.iat)
                {
                    found.entries.push((stream.clone(), seq, a));
                }
            }
        }
    }
    if let Some(client) = store.client(claims.sub).await? {
        found.subject_revoked_at = client.revoked_at;
    }
    found.issued_kind = store
        .issued(claims.cti)
        .await?
        .filter(|t| t.hash == *hash)
        .map(|t| t.kind.as_str());
    Ok(found)
}

/// The token's bytes: the argument as hex, or the file it names holding hex or raw bytes.
fn read_token(arg: &str) -> Result<Vec<u8>> {
    let path = Path::new(arg);
    if path.is_file() {
        let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        if raw.len() > 4 * MAX_TOKEN_LEN {
            bail!(
                "{}: {} bytes is too large for a token",
                path.display(),
                raw.len()
            );
        }
        // A file of hex text, or the token's own bytes (a COSE_Sign1 never starts with a
        // hex digit: its first byte is a tag or an array head, 0xc0 and up or 0x84).
        return match std::str::from_utf8(&raw) {
            Ok(text) if is_hex(text) => Ok(hex::decode(strip(text))?),
            _ => Ok(raw),
        };
    }
    if is_hex(arg) {
        return Ok(hex::decode(strip(arg))?);
    }
    bail!("`{arg}` is neither a file nor a token in hex")
}

fn strip(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_whitespace()).collect()
}

fn is_hex(text: &str) -> bool {
    let digits = strip(text);
    !digits.is_empty()
        && digits.len().is_multiple_of(2)
        && digits.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The hub's configuration, for its database and policy; says what to do without one.
fn load_config(path: &Path) -> Result<HubConfig> {
    HubConfig::load(path).map_err(|e| {
        let missing = matches!(&e, ConfigError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(e);
        if missing {
            e.context(
                "cannot load the hub configuration to check the token with the hub's keys \
                 (use --config, or --trust-anchor FILE to check it without a hub)",
            )
        } else {
            e.context("cannot load the hub configuration")
        }
    })
}

/// Decodes the claims of a token whose signature did NOT verify, only to show them: a
/// verifier that accepts every signature, so nothing may act on what it returns.
fn dangerous_unverified_claims<'a>(envelope: &Sign1<'a>) -> Result<Claims<'a>, CoreError> {
    struct DangerousAcceptAnySignature;
    impl Verifier for DangerousAcceptAnySignature {
        fn verify(&self, _: &[&[u8]], _: &Signature) -> Result<(), CoreError> {
            Ok(())
        }
    }
    Claims::decode(envelope.verify_with(&DangerousAcceptAnySignature)?)
}

/// The claims of a token the hub just issued in a response the client verified (it came
/// from the hub, bound to the request): decoded to print, not to act on.
pub(super) fn dangerous_claims_of_issued(token: &[u8]) -> Result<serde_json::Value> {
    let envelope = Sign1::decode(token).map_err(|e| anyhow::anyhow!("token: {e}"))?;
    let claims =
        dangerous_unverified_claims(&envelope).map_err(|e| anyhow::anyhow!("token: {e}"))?;
    Ok(claims_json(&claims))
}
