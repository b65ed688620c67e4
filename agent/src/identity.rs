//! What the device is provisioned with: its P-256 key (PKCS#8 PEM), the hub's trust anchor
//! (SPKI PEM), and the device secret the store key is derived from.
//!
//! Private files are created with mode 0600 and never overwritten. A file that others can
//! read is used, with a warning: refusing would turn a permissions slip into an outage.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use tessera_shared::crypto::{P256Signer, PublicKey};
use tessera_shared::record::MIN_DEVICE_SECRET_LEN;
use zeroize::Zeroizing;

use crate::error::Error;

/// Length of the device secret `enroll` creates.
pub const DEVICE_SECRET_LEN: usize = 32;

fn key_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| key_error(path, e.to_string()))?;
    let bytes = Zeroizing::new(bytes);
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "secret file is readable by others than its owner; chmod 600 it"
        );
    }
    Ok(bytes)
}

/// Reads the device's private key (PKCS#8 PEM, P-256).
pub fn read_device_key(path: &Path) -> Result<P256Signer, Error> {
    let pem = read_private_file(path)?;
    let text = std::str::from_utf8(&pem).map_err(|_| key_error(path, "not a PEM file"))?;
    let secret = p256::SecretKey::from_pkcs8_pem(text)
        .map_err(|e| key_error(path, format!("not a P-256 private key in PKCS#8 PEM: {e}")))?;
    let scalar = Zeroizing::new(<[u8; 32]>::from(secret.to_bytes()));
    P256Signer::from_scalar(&scalar).map_err(|e| key_error(path, e.to_string()))
}

/// Generates a new P-256 key from the OS RNG.
pub fn generate_device_key() -> Result<P256Signer, Error> {
    // A random 32-byte string is a valid scalar except with probability ~2^-32: draw again.
    for _ in 0..16 {
        let mut scalar = Zeroizing::new([0u8; 32]);
        getrandom::fill(scalar.as_mut()).map_err(|e| Error::Random(e.to_string()))?;
        if let Ok(signer) = P256Signer::from_scalar(&scalar) {
            return Ok(signer);
        }
    }
    Err(Error::Random("no valid P-256 scalar in 16 draws".into()))
}

/// Writes `signer` as PKCS#8 PEM to a new file with mode 0600 (never overwrites).
pub fn write_device_key(path: &Path, signer: &P256Signer) -> Result<(), Error> {
    let scalar = Zeroizing::new(signer.to_scalar());
    let secret =
        p256::SecretKey::from_slice(scalar.as_ref()).map_err(|e| key_error(path, e.to_string()))?;
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| key_error(path, e.to_string()))?;
    create_private(path, pem.as_bytes())
}

/// The device key at `path`, created first if there is none; `true` if it was created.
pub fn device_key_or_create(path: &Path) -> Result<(P256Signer, bool), Error> {
    if path.exists() {
        return Ok((read_device_key(path)?, false));
    }
    let signer = generate_device_key()?;
    write_device_key(path, &signer)?;
    Ok((signer, true))
}

/// Retires the key of a device the hub revoked: moves it to `<path>.revoked` (replacing an
/// older one there), so that enrolling again makes a new key, as the hub requires (it never
/// accepts a revoked device's key again). Returns where the key went, or `None` if there
/// was none.
pub fn retire_device_key(path: &Path) -> Result<Option<std::path::PathBuf>, Error> {
    let mut retired = path.as_os_str().to_owned();
    retired.push(".revoked");
    let retired = std::path::PathBuf::from(retired);
    match std::fs::rename(path, &retired) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(key_error(
                path,
                format!("cannot retire the revoked key: {e}"),
            ));
        }
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        // Best effort: the rename is what matters, and it is already visible.
        let _ = d.sync_all();
    }
    Ok(Some(retired))
}

/// Reads the hub's trust anchor (SPKI PEM, P-256).
pub fn read_trust_anchor(path: &Path) -> Result<PublicKey, Error> {
    let pem = std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
    public_from_pem(&pem).map_err(|reason| key_error(path, reason))
}

/// Parses an SPKI PEM P-256 public key.
pub fn public_from_pem(pem: &str) -> Result<PublicKey, String> {
    let key = p256::PublicKey::from_public_key_pem(pem)
        .map_err(|e| format!("not a P-256 public key in SPKI PEM: {e}"))?;
    PublicKey::from_sec1(&key.to_sec1_bytes()).map_err(|e| e.to_string())
}

/// A public key as SPKI PEM, as the hub's `device add --key` reads it.
pub fn public_to_pem(key: &PublicKey) -> Result<String, Error> {
    // A `PublicKey` is always a valid point, so neither step fails in practice.
    let invalid = |_| Error::Core(tessera_shared::error::SignatureError::InvalidKey.into());
    p256::PublicKey::from_sec1_bytes(&key.to_sec1())
        .map_err(invalid)?
        .to_public_key_pem(LineEnding::LF)
        .map_err(|_| Error::Core(tessera_shared::error::SignatureError::InvalidKey.into()))
}

/// Reads the device secret (at least [`MIN_DEVICE_SECRET_LEN`] bytes).
pub fn read_device_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let secret = read_private_file(path)?;
    if secret.len() < MIN_DEVICE_SECRET_LEN {
        return Err(key_error(
            path,
            format!(
                "device secret is {} bytes; it needs at least {MIN_DEVICE_SECRET_LEN}",
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

/// The device secret at `path`, created from the OS RNG first if there is none.
pub fn device_secret_or_create(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    if !path.exists() {
        let mut secret = Zeroizing::new(vec![0u8; DEVICE_SECRET_LEN]);
        getrandom::fill(&mut secret).map_err(|e| Error::Random(e.to_string()))?;
        create_private(path, &secret)?;
    }
    read_device_secret(path)
}

/// Creates `path` with mode 0600 and `bytes`, synced to disk; fails if it exists.
fn create_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_error(path, format!("cannot create: {e}")))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| key_error(path, format!("cannot write: {e}")))?;
    if let Some(dir) = path.parent() {
        // The new directory entry must survive a power cut too.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_shared::crypto::Signer;

    #[test]
    fn a_generated_key_round_trips_through_pkcs8_pem_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let (signer, created) = device_key_or_create(&path).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        let (again, created) = device_key_or_create(&path).expect("read back");
        assert!(!created, "an existing key is used, never replaced");
        assert_eq!(again.public_key(), signer.public_key());
        assert!(
            write_device_key(&path, &signer).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn public_keys_round_trip_through_spki_pem() {
        let signer = generate_device_key().expect("rng");
        let pem = public_to_pem(&signer.public_key()).expect("encode");
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(public_from_pem(&pem), Ok(signer.public_key()));
        assert!(public_from_pem("garbage").is_err());
    }

    #[test]
    fn a_short_device_secret_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, [7u8; 16]).expect("write");
        let err = read_device_secret(&path).expect_err("too short");
        assert!(err.to_string().contains("at least 32"), "{err}");
        let fresh = dir.path().join("fresh");
        let secret = device_secret_or_create(&fresh).expect("create");
        assert_eq!(secret.len(), DEVICE_SECRET_LEN);
        assert_eq!(*device_secret_or_create(&fresh).expect("same"), *secret);
    }
}
