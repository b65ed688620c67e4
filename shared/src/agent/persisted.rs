//! What the agent keeps across a reboot: the plaintext of its persisted state, which the shell
//! seals into a [`record`](crate::record) and hands back, opened, with
//! [`Event::Boot`](super::Event::Boot).
//!
//! # Layout (version 1)
//!
//! One CBOR map with integer keys in ascending order, definite lengths only, nothing after it:
//!
//! ```text
//! {
//!    0: 1,              ; layout version
//!    1: tstr,           ; device id; a state of another device is refused
//!    2: uint,           ; enrolled_at: hub time of the enrollment response, Unix seconds
//!   ?3: bstr,           ; the device token (COSE_Sign1 CWT) ─┐ all three
//!   ?4: uint,           ; its iat, Unix seconds               │ or none
//!   ?5: uint,           ; its exp, Unix seconds              ─┘
//!   ?6: bstr,           ; the refresh grant                  ─┐ both
//!   ?7: uint,           ; when the grant expires, Unix seconds ─┘ or none
//!    8: {0: 10, 1: version, 2: issued_at, 3: [COSE_Key, ...]}  ; the trusted key set
//! }
//! ```
//!
//! The key set is kept as its unsigned payload map, exactly as [`KeySet::encode_to`] writes
//! it: the record's AEAD already authenticates it, and re-checking its signature after a
//! reboot would fail once the key that signed it has been retired. Without it a device that
//! slept through two key rotations could no longer verify anything the hub sends.
//!
//! The clock offset learned from the hub is not kept: a device without a real-time clock
//! counts from zero again after a reboot, so an old offset would be wrong, not just old.

use crate::MAX_ID_LEN;
use crate::cbor::{Reader, SeenKeys};
use crate::crypto::COSE_KEY_LEN;
use crate::error::{DecodeError, Error};
use crate::keyset::{KeySet, MAX_KEYS};
use crate::message::{MAX_GRANT_LEN, read_id};
use crate::token::MAX_TOKEN_LEN;

/// Version of the layout this module writes and reads.
pub const STATE_VERSION: u64 = 1;

/// Longest key set payload: map head, the four fields with the longest integers, the key
/// array head and [`MAX_KEYS`] COSE_Keys.
const MAX_KEY_SET_LEN: usize = 1 + 2 + (1 + 9) + (1 + 9) + 1 + 1 + MAX_KEYS * COSE_KEY_LEN;

/// Longest persisted state: map head, each field with its key and longest head, the key set.
pub const MAX_STATE_LEN: usize = 1
    + (1 + 1)
    + (1 + 2 + MAX_ID_LEN)
    + (1 + 9)
    + (1 + 3 + MAX_TOKEN_LEN)
    + 2 * (1 + 9)
    + (1 + 2 + MAX_GRANT_LEN)
    + (1 + 9)
    + 1
    + MAX_KEY_SET_LEN;

// The shell seals the state into one record.
const _: () = assert!(MAX_STATE_LEN <= crate::record::MAX_PLAINTEXT_LEN);

const KEY_VERSION: i64 = 0;
const KEY_DEVICE: i64 = 1;
const KEY_ENROLLED_AT: i64 = 2;
const KEY_TOKEN: i64 = 3;
const KEY_TOKEN_IAT: i64 = 4;
const KEY_TOKEN_EXP: i64 = 5;
const KEY_GRANT: i64 = 6;
const KEY_GRANT_EXPIRES_AT: i64 = 7;
const KEY_KEY_SET: i64 = 8;

/// The device token as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SavedToken<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) iat: u64,
    pub(super) exp: u64,
}

/// The refresh grant as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SavedGrant<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) expires_at: u64,
}

/// The persisted state, borrowing from the agent (to encode) or the plaintext (decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Saved<'a, K> {
    pub(super) device: &'a str,
    pub(super) enrolled_at: u64,
    pub(super) token: Option<SavedToken<'a>>,
    pub(super) grant: Option<SavedGrant<'a>>,
    /// `&KeySet` to encode, `KeySet` when decoded.
    pub(super) keys: K,
}

impl Saved<'_, &KeySet> {
    /// Writes the layout into `out`; returns its length.
    pub(super) fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let entries = 4 + 3 * u64::from(self.token.is_some()) + 2 * u64::from(self.grant.is_some());
        let mut w = crate::cbor::writer(out);
        w.map(entries)?
            .i64(KEY_VERSION)?
            .u64(STATE_VERSION)?
            .i64(KEY_DEVICE)?
            .str(self.device)?
            .i64(KEY_ENROLLED_AT)?
            .u64(self.enrolled_at)?;
        if let Some(t) = &self.token {
            w.i64(KEY_TOKEN)?
                .bytes(t.bytes)?
                .i64(KEY_TOKEN_IAT)?
                .u64(t.iat)?
                .i64(KEY_TOKEN_EXP)?
                .u64(t.exp)?;
        }
        if let Some(g) = &self.grant {
            w.i64(KEY_GRANT)?
                .bytes(g.bytes)?
                .i64(KEY_GRANT_EXPIRES_AT)?
                .u64(g.expires_at)?;
        }
        w.i64(KEY_KEY_SET)?;
        // The key set is the last entry, so its own encoder can finish the map in place.
        let at = crate::cbor::written(&w);
        let rest = out
            .get_mut(at..)
            .ok_or(crate::error::EncodeError::BufferTooSmall)?;
        Ok(at + self.keys.encode_to(rest)?)
    }
}

impl<'a> Saved<'a, KeySet> {
    /// Decodes the layout strictly: known keys only, each at most once, the token and grant
    /// fields complete or absent, nothing after the map.
    pub(super) fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let n = r.map(9)?;
        let mut seen = SeenKeys::default();
        let (mut device, mut enrolled_at, mut keys) = (None, None, None);
        let (mut token, mut iat, mut exp) = (None, None, None);
        let (mut grant, mut grant_expires_at) = (None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                KEY_VERSION => {
                    if r.uint()? != STATE_VERSION {
                        return Err(DecodeError::InvalidValue("state version").into());
                    }
                }
                KEY_DEVICE => device = Some(read_id(&mut r)?),
                KEY_ENROLLED_AT => enrolled_at = Some(r.uint()?),
                KEY_TOKEN => token = Some(r.bytes(MAX_TOKEN_LEN)?),
                KEY_TOKEN_IAT => iat = Some(r.uint()?),
                KEY_TOKEN_EXP => exp = Some(r.uint()?),
                KEY_GRANT => grant = Some(r.bytes(MAX_GRANT_LEN)?),
                KEY_GRANT_EXPIRES_AT => grant_expires_at = Some(r.uint()?),
                KEY_KEY_SET => {
                    let start = r.position();
                    r.skip()?;
                    let item = bytes
                        .get(start..r.position())
                        .ok_or(DecodeError::Malformed)?;
                    keys = Some(KeySet::decode(item)?);
                }
                _ => return Err(DecodeError::InvalidValue("state key").into()),
            }
        }
        r.finish()?;
        if !seen.contains(KEY_VERSION) {
            return Err(DecodeError::MissingField("state version").into());
        }
        let token = match (token, iat, exp) {
            (Some(bytes), Some(iat), Some(exp)) => Some(SavedToken { bytes, iat, exp }),
            (None, None, None) => None,
            _ => return Err(DecodeError::MissingField("token, iat and exp").into()),
        };
        let grant = match (grant, grant_expires_at) {
            (Some(bytes), Some(expires_at)) => Some(SavedGrant { bytes, expires_at }),
            (None, None) => None,
            _ => return Err(DecodeError::MissingField("grant and grant_expires_at").into()),
        };
        Ok(Self {
            device: device.ok_or(DecodeError::MissingField("device"))?,
            enrolled_at: enrolled_at.ok_or(DecodeError::MissingField("enrolled_at"))?,
            token,
            grant,
            keys: keys.ok_or(DecodeError::MissingField("key set"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Signer;
    use crate::crypto::testing::signer;

    fn full_key_set() -> KeySet {
        let keys: [_; MAX_KEYS] =
            core::array::from_fn(|i| signer(u8::try_from(i + 1).expect("small")).public_key());
        KeySet::new(u64::MAX, u64::MAX, &keys).expect("fits")
    }

    #[test]
    fn state_round_trips_with_and_without_token_and_grant() {
        let keys = full_key_set();
        let token = [0xaa; 300];
        let grant = [0x55; 32];
        let mut out = [0u8; MAX_STATE_LEN];
        for (t, g) in [(false, false), (true, false), (false, true), (true, true)] {
            let saved = Saved {
                device: "device-42",
                enrolled_at: 1_700_000_000,
                token: t.then_some(SavedToken {
                    bytes: &token,
                    iat: 1_700_000_100,
                    exp: 1_700_000_700,
                }),
                grant: g.then_some(SavedGrant {
                    bytes: &grant,
                    expires_at: 1_700_086_400,
                }),
                keys: &keys,
            };
            let n = saved.encode_to(&mut out).expect("fits");
            let back = Saved::decode(&out[..n]).expect("decodes");
            assert_eq!(back.device, saved.device);
            assert_eq!(back.enrolled_at, saved.enrolled_at);
            assert_eq!(back.token, saved.token);
            assert_eq!(back.grant, saved.grant);
            assert_eq!(&back.keys, saved.keys);
        }
    }

    #[test]
    fn the_largest_state_fits_its_bound() {
        let keys = full_key_set();
        let id = "d".repeat(MAX_ID_LEN);
        let saved = Saved {
            device: &id,
            enrolled_at: u64::MAX,
            token: Some(SavedToken {
                bytes: &[0xff; MAX_TOKEN_LEN],
                iat: u64::MAX,
                exp: u64::MAX,
            }),
            grant: Some(SavedGrant {
                bytes: &[0xff; MAX_GRANT_LEN],
                expires_at: u64::MAX,
            }),
            keys: &keys,
        };
        let mut out = [0u8; MAX_STATE_LEN];
        assert!(saved.encode_to(&mut out).is_ok());
    }

    #[test]
    fn a_token_without_its_times_is_refused() {
        let keys = KeySet::from_anchor(signer(1).public_key());
        let saved = Saved {
            device: "device-42",
            enrolled_at: 1,
            token: Some(SavedToken {
                bytes: &[1, 2, 3],
                iat: 2,
                exp: 3,
            }),
            grant: None,
            keys: &keys,
        };
        let mut out = [0u8; MAX_STATE_LEN];
        let n = saved.encode_to(&mut out).expect("fits");
        // Rename key 5 (exp) to key 9, which is unknown.
        let at = out[..n]
            .windows(2)
            .position(|w| w == [0x05, 0x03])
            .expect("exp entry");
        out[at] = 0x09;
        assert_eq!(
            Saved::decode(&out[..n]).map(|_| ()),
            Err(DecodeError::InvalidValue("state key").into())
        );
    }

    #[test]
    fn another_layout_version_is_refused() {
        let keys = KeySet::from_anchor(signer(1).public_key());
        let saved = Saved {
            device: "device-42",
            enrolled_at: 1,
            token: None,
            grant: None,
            keys: &keys,
        };
        let mut out = [0u8; MAX_STATE_LEN];
        let n = saved.encode_to(&mut out).expect("fits");
        assert_eq!(&out[1..3], &[0x00, 0x01]);
        out[2] = 0x02;
        assert_eq!(
            Saved::decode(&out[..n]).map(|_| ()),
            Err(DecodeError::InvalidValue("state version").into())
        );
    }
}
