//! A throwaway PKI for TLS tests: a CA, a server certificate for `localhost` and `127.0.0.1`,
//! and client certificates, generated with rcgen and written as PEM files in a temp dir.
//!
//! Every key is a fresh ECDSA P-256 key; nothing is reused between runs. Validity uses rcgen's
//! defaults (1975 to 4096), so no test depends on the clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// Common name of the client certificate every [`TestPki`] issues up front.
pub const DEFAULT_CLIENT_NAME: &str = "tessera-test-client";

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A CA with one server certificate and one client certificate, as PEM files in a temp dir
/// that is deleted on drop. Two `TestPki`s never trust each other.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
    server: CertKeyFiles,
    client: CertKeyFiles,
    issued: AtomicUsize,
}

impl TestPki {
    /// Generates the CA, a server certificate (SANs `localhost` and IP `127.0.0.1`) and a
    /// client certificate (common name [`DEFAULT_CLIENT_NAME`]).
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tessera-pki-")
            .tempdir()
            .context("creating the PKI temp dir")?;

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: with one shared name, a verifier that trusts another test CA
        // finds a "matching" issuer and reports a bad signature instead of an unknown one.
        let id: String = ca_key.public_key_raw()[1..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("Tessera test CA {id}"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_file = dir.path().join("ca.pem");
        write(&ca_file, ca_cert.pem().as_bytes())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server = issue(
            dir.path(),
            "server",
            &issuer,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = issue(
            dir.path(),
            "client",
            &issuer,
            DEFAULT_CLIENT_NAME,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        Ok(Self {
            dir,
            issuer,
            ca_file,
            server,
            client,
            issued: AtomicUsize::new(0),
        })
    }

    /// The directory holding every PEM file of this PKI.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The server certificate (PEM), valid for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> &Path {
        &self.server.cert
    }

    /// The server's private key (PEM).
    pub fn server_key(&self) -> &Path {
        &self.server.key
    }

    /// The default client certificate (PEM), common name [`DEFAULT_CLIENT_NAME`].
    pub fn client_cert(&self) -> &Path {
        &self.client.cert
    }

    /// The default client's private key (PEM).
    pub fn client_key(&self) -> &Path {
        &self.client.key
    }

    /// The default client certificate and key.
    pub fn client(&self) -> &CertKeyFiles {
        &self.client
    }

    /// Issues another client certificate with this common name (which Mosquitto's
    /// `use_identity_as_username` turns into the username).
    pub fn issue_client(&self, common_name: &str) -> Result<CertKeyFiles> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let safe: String = common_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        issue(
            self.dir.path(),
            &format!("client-{n}-{safe}"),
            &self.issuer,
            common_name,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A rustls client config that trusts this CA and presents the default client
    /// certificate (harmless when the server does not ask for one).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        rustls_client_config(&self.ca_file, Some(&self.client))
    }

    /// A rustls client config that trusts this CA and presents no client certificate.
    pub fn client_config_without_cert(&self) -> Result<Arc<rustls::ClientConfig>> {
        rustls_client_config(&self.ca_file, None)
    }
}

/// Builds a rustls client config (aws-lc-rs provider, safe default protocol versions) that
/// trusts the CA certificates in `ca_file` and, when given, presents `identity`.
pub fn rustls_client_config(
    ca_file: &Path,
    identity: Option<&CertKeyFiles>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading CA certificates from {}", ca_file.display()))?;
    for cert in certs {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = CertificateDer::pem_file_iter(&files.cert)
                .with_context(|| format!("reading {}", files.cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&files.key)
                .with_context(|| format!("reading {}", files.key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

fn issue(
    dir: &Path,
    file_stem: &str,
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    alt_names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertKeyFiles> {
    let alt_names: Vec<String> = alt_names.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(alt_names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let files = CertKeyFiles {
        cert: dir.join(format!("{file_stem}.pem")),
        key: dir.join(format!("{file_stem}-key.pem")),
    };
    write(&files.cert, cert.pem().as_bytes())?;
    write(&files.key, key.serialize_pem().as_bytes())?;
    Ok(files)
}

fn write(path: &Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
