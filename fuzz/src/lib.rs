//! Fixed keys, times and fakes shared by the fuzz targets in `fuzz_targets/`.
//!
//! The keys are the committed token vectors' (`shared/tests/vectors/keys.rs`), so the seed
//! corpus, built from those vectors and signed with those keys, passes signature checks
//! and the fuzzer starts deep inside the decoders rather than at the first byte.

use std::sync::LazyLock;

use tessera_shared::Error;
use tessera_shared::crypto::{KeyLookup, P256Signer, PublicKey, Signature, Signer, Verifier};
use tessera_shared::record::RecordKey;
use tessera_shared::token::Validation;

#[allow(dead_code)] // not every target needs every key
mod keys {
    include!("../../shared/tests/vectors/keys.rs");
}

/// The `now` the fuzz targets verify at: one minute after the vectors' `iat`.
pub const NOW: u64 = 1_700_000_060;

/// The audience the fuzz targets verify for: the vectors' audience.
pub const AUDIENCE: &str = "device-42";

/// The device id and secret of the record target, as `fuzz_seeds` seals its seeds.
pub const RECORD_DEVICE: &str = "device-42";
/// See [`RECORD_DEVICE`].
pub const RECORD_SECRET: [u8; 32] = [0x5e; 32];

static ISSUER: LazyLock<P256Signer> =
    LazyLock::new(|| P256Signer::from_scalar(&keys::ISSUER_SCALAR).expect("valid scalar"));
static ISSUER_KEY: LazyLock<PublicKey> = LazyLock::new(|| ISSUER.public_key());
static RECORD_KEY: LazyLock<RecordKey> = LazyLock::new(|| {
    RecordKey::derive(&RECORD_SECRET, RECORD_DEVICE).expect("valid secret and id")
});

/// The vectors' issuer (the hub key).
pub fn issuer() -> &'static P256Signer {
    &ISSUER
}

/// The vectors' issuer public key: a single trusted key.
pub fn issuer_key() -> &'static PublicKey {
    &ISSUER_KEY
}

/// The record key of [`RECORD_DEVICE`].
pub fn record_key() -> &'static RecordKey {
    &RECORD_KEY
}

/// Checks at [`NOW`] for [`AUDIENCE`] with the default leeway.
pub fn validation() -> Validation<'static> {
    Validation::new(NOW, AUDIENCE)
}

/// Accepts every signature under every `kid`.
///
/// Fuzz-only: random bytes almost never carry a valid signature, so without this the
/// fuzzer would never reach what lies behind the signature check (claims decoding, claim
/// checks, payload decoders). Never use it outside a fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct DangerousAcceptAnySignature;

impl Verifier for DangerousAcceptAnySignature {
    fn verify(&self, _message: &[&[u8]], _signature: &Signature) -> Result<(), Error> {
        Ok(())
    }
}

impl KeyLookup for DangerousAcceptAnySignature {
    fn verifier(&self, _kid: &[u8]) -> Option<&dyn Verifier> {
        Some(self)
    }
}

/// Room enough to re-encode anything a decoder accepted from `input`: decoders never
/// grow a value except by adding a COSE_Key's optional `kid` and `alg` (a few bytes per
/// key), so twice the input plus a margin is always enough.
pub fn encode_buffer(input: &[u8]) -> Vec<u8> {
    vec![0u8; 2 * input.len() + 256]
}
