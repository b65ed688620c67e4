//! The Python module `tessera`: the client library (`tessera-client`) and the protocol
//! core (`tessera-shared`) for Python apps, operators and services, so the protocol has one
//! implementation. Each call blocks its Python thread (the GIL released) while a small
//! tokio runtime of the client's own does the MQTT work. Type hints: `tessera.pyi`.
//!
//! ```python
//! import tessera
//! app = tessera.Client("127.0.0.1", 1883, "app-7", open("app-7.pem").read(), anchor)
//! token = app.access_token("door-1", "door:open")
//! presentation = app.present(token)  # bytes for the device's agent
//! ```

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tessera_client::{ClientError, MqttConfig, keyfile};
use tessera_shared::crypto::{P256Signer, PublicKey};
use tessera_shared::message::RevokeTarget;
use tessera_shared::token::{self, Validation};

create_exception!(
    tessera,
    TesseraError,
    PyException,
    "Base of every Tessera error."
);
create_exception!(
    tessera,
    RefusedError,
    TesseraError,
    "The hub refused the request: args are (code, reason), code the wire error code's name \
     (`denied`, `revoked`, `rate_limited`, ...)."
);
create_exception!(
    tessera,
    HubTimeoutError,
    TesseraError,
    "No answer from the hub within the timeout (or none that verifies with the trust anchor)."
);
create_exception!(
    tessera,
    InvalidTokenError,
    TesseraError,
    "A token or presentation that does not verify, or does not fit the check asked for."
);
create_exception!(
    tessera,
    InvalidKeyError,
    TesseraError,
    "A key or trust anchor that cannot be read."
);

fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::Refused { code, reason } => RefusedError::new_err((code.to_string(), reason)),
        e @ (ClientError::Timeout(_) | ClientError::Untrusted { .. }) => {
            HubTimeoutError::new_err(e.to_string())
        }
        ClientError::Core(e) => InvalidTokenError::new_err(e.to_string()),
        e => TesseraError::new_err(e.to_string()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A P-256 private key from PKCS#8 PEM (as `tessera-hub keygen` writes it).
fn signer(private_key_pem: &str) -> PyResult<P256Signer> {
    keyfile::private_from_pem(private_key_pem)
        .map_err(|e| InvalidKeyError::new_err(format!("private key: {e}")))
}

/// The hub's trust anchor: an SPKI PEM (`trust-anchor.pem`) or the COSE_Key hex `init`
/// prints.
fn anchor(trust_anchor: &str) -> PyResult<PublicKey> {
    keyfile::anchor_from_text(trust_anchor)
        .map_err(|e| InvalidKeyError::new_err(format!("trust anchor: {e}")))
}

/// An access token the hub issued to this app (`Client.access_token`).
#[pyclass(module = "tessera", frozen)]
#[derive(Debug)]
struct AccessToken {
    inner: tessera_client::AccessToken,
}

#[pymethods]
impl AccessToken {
    /// The token's bytes (a CWT).
    #[getter]
    fn token<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.bytes())
    }

    /// The device it is for.
    #[getter]
    fn device(&self) -> &str {
        self.inner.device()
    }

    /// The scopes asked for.
    #[getter]
    fn scope(&self) -> &str {
        self.inner.scope()
    }

    /// When it expires, Unix seconds.
    #[getter]
    fn expires_at(&self) -> u64 {
        self.inner.expires_at()
    }

    /// The token hash an operator revokes it by (32 bytes).
    #[getter]
    fn hash<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.hash())
    }

    fn __repr__(&self) -> String {
        format!(
            "AccessToken(device={:?}, scope={:?}, expires_at={})",
            self.inner.device(),
            self.inner.scope(),
            self.inner.expires_at()
        )
    }
}

/// A client of the hub over MQTT: an app or an operator, signing with its own key.
#[pyclass(module = "tessera")]
struct Client {
    runtime: tokio::runtime::Runtime,
    inner: Mutex<Option<tessera_client::Client>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Runs `call` on the connected client with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        call: impl AsyncFnOnce(&mut tessera_client::Client) -> Result<T, ClientError> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let client = guard
                .as_mut()
                .ok_or_else(|| TesseraError::new_err("the client is closed"))?;
            self.runtime.block_on(call(client)).map_err(to_py)
        })
    }
}

#[pymethods]
impl Client {
    /// Connects to the broker at `host:port` as `client_id`, signing with the PKCS#8 PEM
    /// `private_key_pem`, trusting the hub's `trust_anchor` (PEM or COSE_Key hex);
    /// `timeout_s` bounds the connection and each answer. With `tls_ca_file` (the PEM CA
    /// of the broker's certificate) the connection is TLS, and with `tls_cert_file` and
    /// `tls_key_file` mutual TLS; `username` and `password` log in to the broker.
    #[new]
    #[pyo3(signature = (
        host, port, client_id, private_key_pem, trust_anchor, timeout_s = 10.0,
        tls_ca_file = None, tls_cert_file = None, tls_key_file = None,
        username = None, password = None,
    ))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        client_id: &str,
        private_key_pem: &str,
        trust_anchor: &str,
        timeout_s: f64,
        tls_ca_file: Option<std::path::PathBuf>,
        tls_cert_file: Option<std::path::PathBuf>,
        tls_key_file: Option<std::path::PathBuf>,
        username: Option<String>,
        password: Option<String>,
    ) -> PyResult<Self> {
        let signer = signer(private_key_pem)?;
        let anchor = anchor(trust_anchor)?;
        let timeout = Duration::try_from_secs_f64(timeout_s)
            .map_err(|_| TesseraError::new_err("timeout_s must be a positive number"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| TesseraError::new_err(format!("cannot start a runtime: {e}")))?;
        let mut config = MqttConfig::plain(host, port, client_id);
        if tls_ca_file.is_none() && (tls_cert_file.is_some() || tls_key_file.is_some()) {
            return Err(TesseraError::new_err(
                "a client certificate needs tls_ca_file (TLS) too",
            ));
        }
        config.tls = tls_ca_file.map(|ca_file| tessera_client::mqtt::TlsConfig {
            ca_file,
            client_cert_file: tls_cert_file,
            client_key_file: tls_key_file,
        });
        config.username = username;
        config.password = password;
        let client = py.detach(|| {
            runtime
                .block_on(tessera_client::Client::connect(
                    &config, client_id, signer, anchor, timeout,
                ))
                .map_err(to_py)
        })?;
        Ok(Self {
            runtime,
            inner: Mutex::new(Some(client)),
        })
    }

    /// An access token for `device` with `scope` (space-separated): the one held until it
    /// is due, then renewed through its refresh grant, else asked for afresh.
    fn access_token(&self, py: Python<'_>, device: &str, scope: &str) -> PyResult<AccessToken> {
        let inner = self.with(py, async |c| c.access_token(device, scope).await)?;
        Ok(AccessToken { inner })
    }

    /// Renews the access token for `device` and `scope` now.
    fn renew(&self, py: Python<'_>, device: &str, scope: &str) -> PyResult<AccessToken> {
        let inner = self.with(py, async |c| c.renew(device, scope).await)?;
        Ok(AccessToken { inner })
    }

    /// A presentation of `token` to its device, signed with this client's key: the bytes
    /// the app sends the device with its command.
    fn present<'py>(&self, py: Python<'py>, token: &AccessToken) -> PyResult<Bound<'py, PyBytes>> {
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let client = guard
            .as_ref()
            .ok_or_else(|| TesseraError::new_err("the client is closed"))?;
        let bytes = client.present(&token.inner).map_err(to_py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Revokes, as an operator: `kind` is `device`, `subject`, `group`, `role`,
    /// `token_id` (hex) or `token_hash` (hex). Returns (revoked, entries, notified) once
    /// the revocation is durable.
    fn revoke(&self, py: Python<'_>, kind: &str, value: &str) -> PyResult<(u64, u64, u64)> {
        let bytes = match kind {
            "token_id" | "token_hash" => hex::decode(value)
                .map_err(|_| TesseraError::new_err(format!("{kind} must be hex")))?,
            _ => Vec::new(),
        };
        let target = match kind {
            "device" => RevokeTarget::Device(value),
            "subject" => RevokeTarget::Subject(value),
            "group" => RevokeTarget::Group(value),
            "role" => RevokeTarget::Role(value),
            "token_id" => RevokeTarget::TokenId(&bytes),
            "token_hash" => RevokeTarget::TokenHash(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| TesseraError::new_err("token_hash must be 32 bytes"))?,
            ),
            other => {
                return Err(TesseraError::new_err(format!(
                    "unknown revocation kind `{other}` (device, subject, group, role, \
                     token_id, token_hash)"
                )));
            }
        };
        let done = self.with(py, async |c| c.revoke(target).await)?;
        Ok((done.revoked, done.entries, done.notified))
    }

    /// Disconnects; the client cannot be used afterwards.
    fn close(&self, py: Python<'_>) {
        let client = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(client) = client {
            py.detach(|| self.runtime.block_on(client.close()));
        }
    }
}

/// A presentation of `token` to `audience` (a device, or a service for a device token)
/// signed with the holder's PKCS#8 PEM key, at `issued_at` (default: now).
#[pyfunction]
#[pyo3(signature = (private_key_pem, token, audience, issued_at = None))]
fn present<'py>(
    py: Python<'py>,
    private_key_pem: &str,
    token: &[u8],
    audience: &str,
    issued_at: Option<u64>,
) -> PyResult<Bound<'py, PyBytes>> {
    let signer = signer(private_key_pem)?;
    let bytes =
        tessera_client::present(&signer, token, audience, issued_at.unwrap_or_else(unix_now))
            .map_err(to_py)?;
    Ok(PyBytes::new(py, &bytes))
}

/// Verifies a token as a verifier does, given the hub's `trust_anchor` only (PEM or
/// COSE_Key hex): its signature, `audience`, times at `now` (default: now) and, if given,
/// `scope`. Returns its claims as a dict; raises InvalidTokenError. Revocation is not
/// checked here (a verifier follows its revocation stream for that).
#[pyfunction]
#[pyo3(signature = (token, trust_anchor, audience, scope = None, now = None))]
fn verify_token<'py>(
    py: Python<'py>,
    token: &[u8],
    trust_anchor: &str,
    audience: &str,
    scope: Option<&str>,
    now: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let key = anchor(trust_anchor)?;
    let mut validation = Validation::new(now.unwrap_or_else(unix_now), audience);
    if let Some(scope) = scope {
        validation = validation.with_scope(scope);
    }
    let verified = token::verify(token, &key, &validation)
        .map_err(|e| InvalidTokenError::new_err(e.to_string()))?;
    let claims = verified.claims();
    let dict = PyDict::new(py);
    dict.set_item("iss", claims.iss)?;
    dict.set_item("sub", claims.sub)?;
    dict.set_item("aud", claims.aud)?;
    dict.set_item("exp", claims.exp)?;
    dict.set_item("nbf", claims.nbf)?;
    dict.set_item("iat", claims.iat)?;
    dict.set_item("cti", PyBytes::new(py, claims.cti))?;
    dict.set_item("scope", claims.scope.as_str())?;
    Ok(dict)
}

#[pymodule]
fn tessera(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<AccessToken>()?;
    m.add_function(wrap_pyfunction!(present, m)?)?;
    m.add_function(wrap_pyfunction!(verify_token, m)?)?;
    m.add("TesseraError", py.get_type::<TesseraError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("HubTimeoutError", py.get_type::<HubTimeoutError>())?;
    m.add("InvalidTokenError", py.get_type::<InvalidTokenError>())?;
    m.add("InvalidKeyError", py.get_type::<InvalidKeyError>())?;
    Ok(())
}
