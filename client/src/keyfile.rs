//! Key files in standard formats: PKCS#8 PEM for private keys (written with mode 0600),
//! SubjectPublicKeyInfo PEM for public keys — what `openssl` reads and writes.

use std::io::Write;
use std::path::Path;

use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use tessera_shared::crypto::{P256Signer, PublicKey};
use zeroize::Zeroizing;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a P-256 key in the expected PEM format.
    #[error("{path}: not a P-256 {what} in PEM: {reason}")]
    Format {
        /// The file.
        path: String,
        /// "private key (PKCS#8)" or "public key (SPKI)".
        what: &'static str,
        /// The parser's reason.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a PKCS#8 PEM P-256 private key.
pub fn read_private(path: &Path) -> Result<P256Signer, KeyFileError> {
    let pem = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    private_from_pem(&pem).map_err(|reason| KeyFileError::Format {
        path: path.display().to_string(),
        what: "private key (PKCS#8)",
        reason,
    })
}

/// Parses a PKCS#8 PEM P-256 private key.
pub fn private_from_pem(pem: &str) -> Result<P256Signer, String> {
    let secret = p256::SecretKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())?;
    let scalar = Zeroizing::new(<[u8; 32]>::from(secret.to_bytes()));
    P256Signer::from_scalar(&scalar).map_err(|e| e.to_string())
}

/// A trust anchor given as text: an SPKI PEM public key (`trust-anchor.pem`) or the
/// COSE_Key hex `tessera-hub init` prints.
pub fn anchor_from_text(text: &str) -> Result<PublicKey, String> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        return public_from_pem(text);
    }
    let bytes =
        hex::decode(text).map_err(|_| "neither a PEM public key nor COSE_Key hex".to_owned())?;
    PublicKey::from_cose_key(&bytes).map_err(|e| e.to_string())
}

/// Writes a private key as PKCS#8 PEM, creating the file with mode 0600 (refusing to
/// overwrite an existing file).
pub fn write_private(path: &Path, signer: &P256Signer) -> Result<(), KeyFileError> {
    let scalar = Zeroizing::new(signer.to_scalar());
    let secret =
        p256::SecretKey::from_slice(scalar.as_ref()).map_err(|e| KeyFileError::Format {
            path: path.display().to_string(),
            what: "private key (PKCS#8)",
            reason: e.to_string(),
        })?;
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyFileError::Format {
            path: path.display().to_string(),
            what: "private key (PKCS#8)",
            reason: e.to_string(),
        })?;
    write_new(path, pem.as_bytes(), 0o600)
}

/// Creates `path` with `mode`, failing if it exists.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Reads an SPKI PEM P-256 public key.
pub fn read_public(path: &Path) -> Result<PublicKey, KeyFileError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    public_from_pem(&pem).map_err(|reason| KeyFileError::Format {
        path: path.display().to_string(),
        what: "public key (SPKI)",
        reason,
    })
}

/// Parses an SPKI PEM P-256 public key.
pub fn public_from_pem(pem: &str) -> Result<PublicKey, String> {
    let key = p256::PublicKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
    PublicKey::from_sec1(&key.to_sec1_bytes()).map_err(|e| e.to_string())
}

/// A public key as SPKI PEM.
pub fn public_to_pem(key: &PublicKey) -> String {
    p256::PublicKey::from_sec1_bytes(&key.to_sec1())
        .ok()
        .and_then(|k| k.to_public_key_pem(LineEnding::LF).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_shared::crypto::Signer;

    /// A fixed test key (the tests need a valid one, not a random one).
    fn key(n: u8) -> P256Signer {
        P256Signer::from_scalar(&[n; 32]).expect("scalar")
    }

    #[test]
    fn private_key_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        let signer = key(5);
        write_private(&path, &signer).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = read_private(&path).expect("read");
        assert_eq!(back.public_key(), signer.public_key());
        assert!(
            write_private(&path, &signer).is_err(),
            "never overwrites a key"
        );
    }

    #[test]
    fn public_key_pem_round_trips_and_garbage_is_a_clear_error() {
        let signer = key(6);
        let pem = public_to_pem(&signer.public_key());
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(public_from_pem(&pem), Ok(signer.public_key()));
        assert!(
            public_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
    }

    #[test]
    fn a_trust_anchor_is_read_from_pem_or_cose_key_hex_and_garbage_is_refused() {
        let anchor = key(7).public_key();
        assert_eq!(anchor_from_text(&public_to_pem(&anchor)), Ok(anchor));
        let mut cose = [0u8; 128];
        let n = anchor.to_cose_key(&mut cose).expect("cose");
        assert_eq!(anchor_from_text(&hex::encode(&cose[..n])), Ok(anchor));
        assert!(anchor_from_text("zz").is_err());
        assert!(anchor_from_text("a0").is_err(), "an empty map is not a key");
        let pem = p256::SecretKey::from_slice(&[8; 32])
            .expect("scalar")
            .to_pkcs8_pem(LineEnding::LF)
            .expect("pem");
        assert_eq!(
            private_from_pem(&pem).map(|s| s.public_key()),
            Ok(key(8).public_key())
        );
        assert!(private_from_pem("not a key").is_err());
    }
}
