//! The encrypted record format of the device store: how the agent keeps tokens and grants
//! at rest so that no plaintext token touches disk.
//!
//! # Layout
//!
//! One record, all integers big-endian:
//!
//! ```text
//! offset  len  field
//!      0    4  magic "TSR1"
//!      4    1  version = 1
//!      5    8  counter (u64)
//!     13   12  nonce
//!     25    n  ciphertext (n = plaintext length, at most MAX_PLAINTEXT_LEN)
//!   25+n   16  Poly1305 tag
//! ```
//!
//! The AEAD is ChaCha20-Poly1305. Its key is HKDF-SHA256 with the device secret as input key
//! material, salt `"tessera-record-v1"` and info `"tessera/record/key" ‖ device id`. The
//! associated data is the 25-byte header followed by the device id, so a record copied to
//! another device, or with any header byte changed (the counter in particular), fails
//! authentication.
//!
//! # Why the nonce comes from the caller's RNG
//!
//! Deriving the nonce from the counter looks tidy, but the agent writes the record and then
//! records the new counter as two separate steps. A crash between them makes the agent reuse
//! the counter on the next write, with different plaintext: the same (key, nonce) twice,
//! which breaks ChaCha20-Poly1305 outright (keystream reuse and forgeable tags). A random
//! 96-bit nonce per write keeps nonces distinct whatever happens to the counter; the agent
//! writes few records, far below the birthday bound.
//!
//! # Rollback detection
//!
//! Authentication alone cannot tell a current record from an older one the same device
//! sealed: an attacker with the disk can put the old file back. So the agent keeps the
//! highest counter it has written somewhere the attacker cannot roll back together with the
//! record file: a separate file on other storage, a hardware monotonic counter, a secure
//! element. It seals each new record with a higher counter and passes the remembered value
//! to [`open`] as `min_counter`; the core authenticates the record first and only then
//! compares its counter, reporting [`RecordError::RolledBack`] when it is lower.
//!
//! The core does no I/O and reads no RNG: callers pass the nonce, the counter and the buffer.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::MAX_ID_LEN;
use crate::error::{EncodeError, Error, RecordError};

/// The four bytes every record starts with.
pub const MAGIC: [u8; 4] = *b"TSR1";

/// The record format version this module writes and reads.
pub const VERSION: u8 = 1;

/// Length of the AEAD nonce in bytes.
pub const NONCE_LEN: usize = 12;

/// Length of the header: magic, version, counter and nonce.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 8 + NONCE_LEN;

/// Length of the Poly1305 tag that ends every record.
pub const TAG_LEN: usize = 16;

/// Bytes a record adds to its plaintext: header and tag.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Longest plaintext a record holds. A bound keeps the agent's buffers fixed-size and lets
/// [`open`] refuse an oversized file before doing any cryptography on it.
pub const MAX_PLAINTEXT_LEN: usize = 4096;

/// Longest record: [`MAX_PLAINTEXT_LEN`] plus [`OVERHEAD`].
pub const MAX_RECORD_LEN: usize = MAX_PLAINTEXT_LEN + OVERHEAD;

/// Shortest device secret [`RecordKey::derive`] accepts: 256 bits, the AEAD key size, so
/// the derived key is never weaker than the secret it comes from.
pub const MIN_DEVICE_SECRET_LEN: usize = 32;

const VERSION_AT: usize = MAGIC.len();
const COUNTER_AT: usize = VERSION_AT + 1;
const NONCE_AT: usize = COUNTER_AT + 8;

// Domain separation: a key derived from the same device secret for another purpose (or a
// later record version) can never equal this one.
const KEY_SALT: &[u8] = b"tessera-record-v1";
const KEY_INFO: &[u8] = b"tessera/record/key";

/// Room for the associated data: header plus the longest device id.
const AAD_CAPACITY: usize = HEADER_LEN + MAX_ID_LEN;

/// The AEAD key of one device's records, derived from its device secret.
///
/// Its `Debug` output shows no key material, so the key can sit in structs that are logged.
pub struct RecordKey {
    cipher: ChaCha20Poly1305,
}

impl RecordKey {
    /// Derives the record key from the device secret, bound to `device_id`.
    ///
    /// Errors with [`EncodeError::InvalidValue`] if `device_secret` is shorter than
    /// [`MIN_DEVICE_SECRET_LEN`] or `device_id` is longer than [`MAX_ID_LEN`].
    pub fn derive(device_secret: &[u8], device_id: &str) -> Result<RecordKey, Error> {
        if device_secret.len() < MIN_DEVICE_SECRET_LEN {
            return Err(EncodeError::InvalidValue("device secret").into());
        }
        check_device_id(device_id)?;
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(KEY_SALT), device_secret)
            .expand_multi_info(&[KEY_INFO, device_id.as_bytes()], &mut okm)
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit; this cannot fail.
            .map_err(|_| EncodeError::InvalidValue("record key length"))?;
        // Without `zeroize` (not a dependency) copies of the key bytes on the stack cannot be
        // wiped reliably: a plain overwrite of a dead local is optimised away.
        Ok(RecordKey {
            cipher: ChaCha20Poly1305::new(&Key::from(okm)),
        })
    }
}

impl core::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

/// An authenticated, decrypted record.
///
/// `Debug` shows the counter and the plaintext length, never the plaintext: it holds tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Opened<'b> {
    /// The record's counter, authenticated and at least the caller's `min_counter`.
    pub counter: u64,
    /// The plaintext, decrypted in place inside the caller's buffer.
    pub plaintext: &'b [u8],
}

impl core::fmt::Debug for Opened<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Opened")
            .field("counter", &self.counter)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

/// Length of the record that [`seal`] makes from `plaintext_len` bytes of plaintext.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// Where the caller writes the plaintext before [`seal`]: `buf[HEADER_LEN..]`, up to the
/// room left for the tag and at most [`MAX_PLAINTEXT_LEN`] bytes. Empty when `buf` is
/// shorter than [`OVERHEAD`].
pub fn plaintext_mut(buf: &mut [u8]) -> &mut [u8] {
    let end = buf
        .len()
        .saturating_sub(TAG_LEN)
        .min(HEADER_LEN + MAX_PLAINTEXT_LEN);
    if end < HEADER_LEN {
        return &mut [];
    }
    &mut buf[HEADER_LEN..end]
}

/// Seals the plaintext at `buf[HEADER_LEN..HEADER_LEN + plaintext_len]` into a record, in
/// place, and returns the record's length; the record is `buf[..len]`.
///
/// Writes the header in front of the plaintext, encrypts the plaintext where it lies and
/// appends the tag. `nonce` must be fresh random bytes for every call (see the module
/// documentation for why it is not derived from `counter`). [`plaintext_mut`] gives the
/// region to write the plaintext into.
///
/// Errors, all before `buf` is changed:
/// - [`RecordError::TooLarge`] if `plaintext_len` exceeds [`MAX_PLAINTEXT_LEN`];
/// - [`EncodeError::BufferTooSmall`] if `buf` is shorter than [`sealed_len`]`(plaintext_len)`;
/// - [`EncodeError::InvalidValue`] if `device_id` is longer than [`MAX_ID_LEN`].
///
/// On an error the plaintext is still in `buf`; the caller should clear it.
pub fn seal(
    key: &RecordKey,
    device_id: &str,
    counter: u64,
    nonce: [u8; NONCE_LEN],
    buf: &mut [u8],
    plaintext_len: usize,
) -> Result<usize, Error> {
    if plaintext_len > MAX_PLAINTEXT_LEN {
        return Err(RecordError::TooLarge.into());
    }
    let total = sealed_len(plaintext_len);
    if buf.len() < total {
        return Err(EncodeError::BufferTooSmall.into());
    }
    check_device_id(device_id)?;

    let (header, rest) = buf[..total].split_at_mut(HEADER_LEN);
    header[..VERSION_AT].copy_from_slice(&MAGIC);
    header[VERSION_AT] = VERSION;
    header[COUNTER_AT..NONCE_AT].copy_from_slice(&counter.to_be_bytes());
    header[NONCE_AT..].copy_from_slice(&nonce);

    let mut aad = [0u8; AAD_CAPACITY];
    let aad = associated_data(header, device_id, &mut aad);
    let (body, tag_out) = rest.split_at_mut(plaintext_len);
    let tag = key
        .cipher
        .encrypt_inout_detached(&Nonce::from(nonce), aad, body.into())
        // Only a message of 256 GiB or more fails; MAX_PLAINTEXT_LEN rules that out.
        .map_err(|_| RecordError::TooLarge)?;
    tag_out.copy_from_slice(&tag);
    Ok(total)
}

/// Authenticates and decrypts the record that is exactly `buf`, in place.
///
/// Checks, in this order:
/// 1. magic, version and length ([`OVERHEAD`] to [`MAX_RECORD_LEN`] bytes), else
///    [`RecordError::Malformed`];
/// 2. the tag over header, device id and ciphertext, else [`RecordError::Tampered`]: wrong
///    key, another device's record, or any altered byte. The buffer is left as it was, so
///    no plaintext of a forged record is ever exposed;
/// 3. only now that the counter is authentic, `counter >= min_counter`, else
///    [`RecordError::RolledBack`]. The decrypted plaintext is cleared from `buf` first.
///
/// `device_id` longer than [`MAX_ID_LEN`] is [`EncodeError::InvalidValue`], as in [`seal`].
/// Trailing bytes after the record are not allowed: they would be read as ciphertext and
/// fail authentication.
pub fn open<'b>(
    key: &RecordKey,
    device_id: &str,
    min_counter: u64,
    buf: &'b mut [u8],
) -> Result<Opened<'b>, Error> {
    let counter = peek_counter(buf)?;
    check_device_id(device_id)?;

    let (header, rest) = buf.split_at_mut(HEADER_LEN);
    let mut aad = [0u8; AAD_CAPACITY];
    let aad = associated_data(header, device_id, &mut aad);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&header[NONCE_AT..]);
    let (body, tag_in) = rest.split_at_mut(rest.len() - TAG_LEN);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(tag_in);

    // The detached API checks the tag before applying the keystream, so on failure `body`
    // still holds the ciphertext.
    key.cipher
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            aad,
            (&mut *body).into(),
            &Tag::from(tag),
        )
        .map_err(|_| RecordError::Tampered)?;

    if counter < min_counter {
        // The caller gets no access to a rolled-back record's contents, so leaving them
        // decrypted in its buffer would only risk them being written out later.
        body.fill(0);
        return Err(RecordError::RolledBack {
            found: counter,
            expected_at_least: min_counter,
        }
        .into());
    }
    Ok(Opened {
        counter,
        plaintext: body,
    })
}

/// Reads a record's counter WITHOUT authenticating it.
///
/// Anyone who can write the file controls this value: use it only for decisions that do
/// not need to be trusted, such as choosing which of two files to try first, never for
/// rollback detection (that is [`open`]'s job). Checks the same magic, version and length
/// as [`open`] and errors with [`RecordError::Malformed`].
pub fn peek_counter(record: &[u8]) -> Result<u64, Error> {
    if record.len() < OVERHEAD
        || record.len() > MAX_RECORD_LEN
        || record[..VERSION_AT] != MAGIC
        || record[VERSION_AT] != VERSION
    {
        return Err(RecordError::Malformed.into());
    }
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&record[COUNTER_AT..NONCE_AT]);
    Ok(u64::from_be_bytes(counter))
}

/// Refuses device ids that do not fit the associated-data buffer; no valid id is longer.
fn check_device_id(device_id: &str) -> Result<(), Error> {
    if device_id.len() > MAX_ID_LEN {
        return Err(EncodeError::InvalidValue("device id").into());
    }
    Ok(())
}

/// `header ‖ device_id`, in `out`. The caller has checked the device id length.
fn associated_data<'a>(
    header: &[u8],
    device_id: &str,
    out: &'a mut [u8; AAD_CAPACITY],
) -> &'a [u8] {
    let len = HEADER_LEN + device_id.len();
    out[..HEADER_LEN].copy_from_slice(header);
    out[HEADER_LEN..len].copy_from_slice(device_id.as_bytes());
    &out[..len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    const SECRET: [u8; 32] = [0x5e; 32];
    const DEVICE: &str = "thermostat-42";
    const NONCE: [u8; NONCE_LEN] = [0x0a; NONCE_LEN];
    const TOKEN: &[u8] = b"{\"token\":\"eyJhbGciOiJFUzI1NiJ9.secret-token-bytes\"}";

    fn key() -> RecordKey {
        RecordKey::derive(&SECRET, DEVICE).expect("derive")
    }

    /// A record of `plaintext` sealed for [`DEVICE`] with `counter`.
    fn sealed(plaintext: &[u8], counter: u64) -> Vec<u8> {
        let mut buf = std::vec![0u8; sealed_len(plaintext.len())];
        plaintext_mut(&mut buf)[..plaintext.len()].copy_from_slice(plaintext);
        let len = seal(&key(), DEVICE, counter, NONCE, &mut buf, plaintext.len()).expect("seal");
        assert_eq!(len, buf.len());
        buf
    }

    fn record_error(r: Result<Opened<'_>, Error>) -> RecordError {
        match r {
            Err(Error::Record(e)) => e,
            other => panic!("expected a record error, got {other:?}"),
        }
    }

    #[test]
    fn sealed_record_opens_to_the_same_plaintext_and_counter() {
        let mut record = sealed(TOKEN, 7);
        let opened = open(&key(), DEVICE, 7, &mut record).expect("open");
        assert_eq!(opened.counter, 7);
        assert_eq!(opened.plaintext, TOKEN);
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let mut record = sealed(b"", 1);
        assert_eq!(record.len(), OVERHEAD);
        let opened = open(&key(), DEVICE, 0, &mut record).expect("open");
        assert_eq!(opened.plaintext, b"");
    }

    #[test]
    fn header_holds_magic_version_counter_and_nonce_in_that_order() {
        let record = sealed(TOKEN, 0x0102_0304_0506_0708);
        assert_eq!(&record[..4], b"TSR1");
        assert_eq!(record[4], 1);
        assert_eq!(&record[5..13], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&record[13..25], &NONCE);
        assert_eq!(record.len(), 25 + TOKEN.len() + 16);
    }

    /// Pins the format byte for byte: computed independently with Python's `cryptography`
    /// (HKDF-SHA256 and ChaCha20Poly1305 over the documented salt, info and associated data).
    #[test]
    fn known_answer_record_matches_an_independent_implementation() {
        let secret: Vec<u8> = (0u8..32).collect();
        let key = RecordKey::derive(&secret, "dev-1").expect("derive");
        let nonce = [0x11; NONCE_LEN];
        let mut buf = [0u8; 64];
        plaintext_mut(&mut buf)[..5].copy_from_slice(b"hello");
        let len = seal(&key, "dev-1", 42, nonce, &mut buf, 5).expect("seal");
        let expected = hex::decode(KNOWN_ANSWER).expect("hex");
        assert_eq!(hex::encode(&buf[..len]), hex::encode(&expected));
    }

    const KNOWN_ANSWER: &str = "5453523101000000000000002a111111111111111111111111e87685e7b8da742a91abdb8ee30c24f2fd7bd1a22b";

    #[test]
    fn flipping_any_single_bit_is_detected() {
        let record = sealed(TOKEN, 9);
        for byte in 0..record.len() {
            for bit in 0..8 {
                let mut altered = record.clone();
                altered[byte] ^= 1 << bit;
                let e = record_error(open(&key(), DEVICE, 0, &mut altered));
                assert!(
                    matches!(e, RecordError::Tampered | RecordError::Malformed),
                    "byte {byte} bit {bit}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn altered_counter_fails_authentication_rather_than_passing_the_rollback_check() {
        let mut record = sealed(TOKEN, 3);
        record[COUNTER_AT..NONCE_AT].copy_from_slice(&100u64.to_be_bytes());
        assert_eq!(
            record_error(open(&key(), DEVICE, 50, &mut record)),
            RecordError::Tampered
        );
    }

    #[test]
    fn failed_authentication_leaves_the_buffer_unchanged() {
        let mut record = sealed(TOKEN, 1);
        let last = record.len() - 1;
        record[last] ^= 0x80;
        let before = record.clone();
        assert!(open(&key(), DEVICE, 0, &mut record).is_err());
        assert_eq!(record, before);
    }

    #[test]
    fn record_of_another_device_id_is_tampered() {
        let mut record = sealed(TOKEN, 1);
        assert_eq!(
            record_error(open(&key(), "thermostat-43", 0, &mut record)),
            RecordError::Tampered
        );
    }

    #[test]
    fn record_moved_to_another_device_is_tampered() {
        // Even if both devices had the same secret, the device id changes the derived key
        // and the associated data; the test above isolates the associated data.
        let other = RecordKey::derive(&SECRET, "thermostat-43").expect("derive");
        let mut record = sealed(TOKEN, 1);
        assert_eq!(
            record_error(open(&other, "thermostat-43", 0, &mut record)),
            RecordError::Tampered
        );
    }

    #[test]
    fn record_under_another_device_secret_is_tampered() {
        let mut other_secret = SECRET;
        other_secret[31] ^= 1;
        let other = RecordKey::derive(&other_secret, DEVICE).expect("derive");
        let mut record = sealed(TOKEN, 1);
        assert_eq!(
            record_error(open(&other, DEVICE, 0, &mut record)),
            RecordError::Tampered
        );
    }

    #[test]
    fn record_older_than_the_minimum_counter_is_rolled_back() {
        let mut record = sealed(TOKEN, 4);
        assert_eq!(
            record_error(open(&key(), DEVICE, 5, &mut record)),
            RecordError::RolledBack {
                found: 4,
                expected_at_least: 5
            }
        );
    }

    #[test]
    fn record_at_exactly_the_minimum_counter_opens() {
        let mut record = sealed(TOKEN, u64::MAX);
        assert!(open(&key(), DEVICE, u64::MAX, &mut record).is_ok());
    }

    #[test]
    fn rolled_back_record_leaves_no_plaintext_in_the_buffer() {
        let mut record = sealed(TOKEN, 4);
        assert!(open(&key(), DEVICE, 5, &mut record).is_err());
        assert!(!contains(&record, TOKEN));
        assert!(!contains(&record, b"secret-token"));
    }

    #[test]
    fn record_shorter_than_header_and_tag_is_malformed() {
        let record = sealed(TOKEN, 1);
        for len in 0..OVERHEAD {
            let mut cut = record[..len].to_vec();
            assert_eq!(
                record_error(open(&key(), DEVICE, 0, &mut cut)),
                RecordError::Malformed,
                "length {len}"
            );
        }
    }

    #[test]
    fn record_truncated_past_the_header_fails_authentication() {
        // The format has no length field: a cut inside the ciphertext or tag is well-formed
        // but the tag no longer matches.
        let record = sealed(TOKEN, 1);
        for len in OVERHEAD..record.len() {
            let mut cut = record[..len].to_vec();
            assert_eq!(
                record_error(open(&key(), DEVICE, 0, &mut cut)),
                RecordError::Tampered,
                "length {len}"
            );
        }
    }

    #[test]
    fn wrong_magic_or_version_is_malformed() {
        let mut bad_magic = sealed(TOKEN, 1);
        bad_magic[0] = b'X';
        assert_eq!(
            record_error(open(&key(), DEVICE, 0, &mut bad_magic)),
            RecordError::Malformed
        );
        let mut bad_version = sealed(TOKEN, 1);
        bad_version[VERSION_AT] = 2;
        assert_eq!(
            record_error(open(&key(), DEVICE, 0, &mut bad_version)),
            RecordError::Malformed
        );
    }

    #[test]
    fn record_longer_than_the_maximum_is_malformed() {
        let mut record = sealed(&[0u8; MAX_PLAINTEXT_LEN], 1);
        record.push(0);
        assert_eq!(
            record_error(open(&key(), DEVICE, 0, &mut record)),
            RecordError::Malformed
        );
    }

    #[test]
    fn plaintext_larger_than_the_maximum_is_too_large() {
        let mut buf = std::vec![0u8; MAX_RECORD_LEN + 1];
        assert_eq!(
            seal(&key(), DEVICE, 1, NONCE, &mut buf, MAX_PLAINTEXT_LEN + 1),
            Err(RecordError::TooLarge.into())
        );
    }

    #[test]
    fn plaintext_of_exactly_the_maximum_round_trips() {
        let plaintext = [0x42u8; MAX_PLAINTEXT_LEN];
        let mut record = sealed(&plaintext, 1);
        assert_eq!(record.len(), MAX_RECORD_LEN);
        let opened = open(&key(), DEVICE, 0, &mut record).expect("open");
        assert_eq!(opened.plaintext, &plaintext[..]);
    }

    #[test]
    fn buffer_without_room_for_the_tag_is_refused_and_untouched() {
        let mut buf = std::vec![0u8; sealed_len(TOKEN.len()) - 1];
        buf[HEADER_LEN..HEADER_LEN + TOKEN.len()].copy_from_slice(TOKEN);
        let before = buf.clone();
        assert_eq!(
            seal(&key(), DEVICE, 1, NONCE, &mut buf, TOKEN.len()),
            Err(EncodeError::BufferTooSmall.into())
        );
        assert_eq!(buf, before);
    }

    #[test]
    fn plaintext_region_leaves_room_for_header_and_tag() {
        let mut buf = [0u8; 100];
        assert_eq!(plaintext_mut(&mut buf).len(), 100 - OVERHEAD);
        let mut small = [0u8; OVERHEAD - 1];
        assert!(plaintext_mut(&mut small).is_empty());
        let mut big = std::vec![0u8; MAX_RECORD_LEN + 100];
        assert_eq!(plaintext_mut(&mut big).len(), MAX_PLAINTEXT_LEN);
    }

    #[test]
    fn device_secret_shorter_than_256_bits_is_refused() {
        assert_eq!(
            RecordKey::derive(&SECRET[..31], DEVICE).map(|_| ()),
            Err(EncodeError::InvalidValue("device secret").into())
        );
        assert!(RecordKey::derive(&[7u8; 64], DEVICE).is_ok());
    }

    #[test]
    fn device_id_longer_than_the_id_limit_is_refused() {
        let long = "d".repeat(MAX_ID_LEN + 1);
        let err = Err(EncodeError::InvalidValue("device id").into());
        assert_eq!(RecordKey::derive(&SECRET, &long).map(|_| ()), err);
        let mut buf = [0u8; 64];
        assert_eq!(seal(&key(), &long, 1, NONCE, &mut buf, 0).map(|_| ()), err);
        let mut record = sealed(TOKEN, 1);
        assert_eq!(open(&key(), &long, 0, &mut record).map(|_| ()), err);
    }

    #[test]
    fn sealed_bytes_do_not_contain_the_plaintext() {
        let record = sealed(TOKEN, 1);
        assert!(!contains(&record, TOKEN));
        // Nor any recognisable piece of it.
        for piece in TOKEN.windows(6) {
            assert!(
                !contains(&record, piece),
                "{:?}",
                std::str::from_utf8(piece)
            );
        }
    }

    #[test]
    fn same_plaintext_under_another_nonce_seals_to_other_ciphertext() {
        let a = sealed(TOKEN, 1);
        let mut b = std::vec![0u8; a.len()];
        plaintext_mut(&mut b)[..TOKEN.len()].copy_from_slice(TOKEN);
        seal(&key(), DEVICE, 1, [0x0b; NONCE_LEN], &mut b, TOKEN.len()).expect("seal");
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }

    #[test]
    fn peek_counter_reads_the_counter_without_the_key() {
        let record = sealed(TOKEN, 1234);
        assert_eq!(peek_counter(&record), Ok(1234));
        assert_eq!(
            peek_counter(&record[..OVERHEAD - 1]),
            Err(RecordError::Malformed.into())
        );
    }

    #[test]
    fn debug_output_shows_no_key_or_plaintext() {
        let shown = std::format!("{:?}", key());
        assert_eq!(shown, "RecordKey(..)");
        let mut record = sealed(TOKEN, 1);
        let opened = open(&key(), DEVICE, 0, &mut record).expect("open");
        let shown = std::format!("{opened:?}");
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("plaintext_len"), "{shown}");
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    proptest! {
        #[test]
        fn any_plaintext_round_trips(
            plaintext in proptest::collection::vec(any::<u8>(), 0..=MAX_PLAINTEXT_LEN),
            counter in any::<u64>(),
            nonce in any::<[u8; NONCE_LEN]>(),
            device_id in "[a-z0-9-]{0,64}",
        ) {
            let key = RecordKey::derive(&SECRET, &device_id).expect("derive");
            let mut buf = std::vec![0u8; MAX_RECORD_LEN];
            plaintext_mut(&mut buf)[..plaintext.len()].copy_from_slice(&plaintext);
            let len = seal(&key, &device_id, counter, nonce, &mut buf, plaintext.len())
                .expect("seal");
            prop_assert_eq!(len, sealed_len(plaintext.len()));
            prop_assert_eq!(peek_counter(&buf[..len]), Ok(counter));
            let opened = open(&key, &device_id, counter, &mut buf[..len]).expect("open");
            prop_assert_eq!(opened.counter, counter);
            prop_assert_eq!(opened.plaintext, &plaintext[..]);
        }
    }
}
