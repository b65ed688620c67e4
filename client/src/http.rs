//! HTTP APIs that devices call with their device token (feature `axum`): an axum
//! middleware that admits a request only with a presentation the service's
//! [`ServiceVerifier`] accepts for the route's scope, and refuses the rest with 401, 403 or
//! 503 and the reason in a JSON body.
//!
//! The device sends its signed presentation (PROTOCOL.md §13, `audience` the service's
//! name) in the `Authorization` header, base64url without padding, under the scheme
//! `Tessera`:
//!
//! ```text
//! Authorization: Tessera 0oRNogEmBEiZmSKmzCti36BZAR2l...
//! ```
//!
//! A handler reads who called with `Extension<Verified>`:
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Extension, Router, routing::post};
//! use tessera_client::http::{Gate, require};
//! use tessera_client::verifier::{ServiceVerifier, Verified};
//!
//! async fn ingest(Extension(caller): Extension<Verified>) -> String {
//!     format!("stored for {}", caller.device)
//! }
//!
//! fn routes(verifier: Arc<ServiceVerifier>) -> Router {
//!     Router::new()
//!         .route("/telemetry", post(ingest))
//!         .route_layer(axum::middleware::from_fn_with_state(
//!             Gate::new(verifier, "telemetry:write"),
//!             require,
//!         ))
//! }
//! ```

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::verifier::{Refusal, ServiceVerifier};

/// The `Authorization` scheme of a Tessera presentation.
pub const SCHEME: &str = "Tessera";

/// Longest `Authorization` value taken: a presentation's largest size in base64 and the
/// scheme, with room to spare. Anything longer is refused before decoding.
const MAX_HEADER_LEN: usize = 4096;

/// What a route requires: the service's verifier and the scope its calls need.
#[derive(Debug, Clone)]
pub struct Gate {
    verifier: Arc<ServiceVerifier>,
    scope: String,
}

impl Gate {
    /// Requires presentations `verifier` accepts for `scope`.
    pub fn new(verifier: Arc<ServiceVerifier>, scope: &str) -> Self {
        Self {
            verifier,
            scope: scope.to_owned(),
        }
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(gate, require)`): checks the
/// request's presentation; on success passes the request on with the
/// [`Verified`](crate::verifier::Verified) caller in its extensions, else answers the
/// refusal.
pub async fn require(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let presentation = match presentation_of(&request) {
        Ok(p) => p,
        Err(reason) => return refused(StatusCode::UNAUTHORIZED, "invalid_request", &reason),
    };
    match gate.verifier.check(&presentation, &gate.scope) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            let status =
                StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            refused(status, code(&refusal), &refusal.to_string())
        }
    }
}

/// The presentation in the request's `Authorization` header.
fn presentation_of(request: &Request) -> Result<Vec<u8>, String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| format!("no Authorization header (expected `{SCHEME} <presentation>`)"))?;
    if value.len() > MAX_HEADER_LEN {
        return Err(format!(
            "the Authorization header is over {MAX_HEADER_LEN} bytes"
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII".to_owned())?;
    let encoded = value
        .strip_prefix(SCHEME)
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or_else(|| format!("the Authorization scheme is not `{SCHEME}`"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim())
        .map_err(|e| format!("the presentation is not base64url: {e}"))
}

/// A refusal's code in the JSON body.
fn code(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Invalid(_) => "invalid_token",
        Refusal::Forbidden(_) => "insufficient_scope",
        Refusal::Revoked => "revoked",
        Refusal::Replayed => "replayed",
        Refusal::Stale => "revocations_stale",
    }
}

/// `{"error": code, "reason": …}` with `status`; a 401 names the scheme to use.
fn refused(status: StatusCode, code: &str, reason: &str) -> Response {
    let body = serde_json::json!({ "error": code, "reason": reason }).to_string();
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(SCHEME));
    }
    response
}

/// Encodes a signed presentation for the `Authorization` header: `Tessera <base64url>`.
pub fn authorization(presentation: &[u8]) -> String {
    format!(
        "{SCHEME} {}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(presentation)
    )
}
