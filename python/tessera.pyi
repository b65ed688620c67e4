"""Type hints of the `tessera` module (the Rust client library and protocol core, via PyO3)."""

from typing import Optional, Tuple, TypedDict

class TesseraError(Exception):
    """Base of every Tessera error."""

class RefusedError(TesseraError):
    """The hub refused the request: ``args == (code, reason)``, ``code`` the wire error
    code's name (``denied``, ``revoked``, ``rate_limited``, ...)."""

class HubTimeoutError(TesseraError):
    """No answer from the hub within the timeout (or none that verifies with the trust
    anchor)."""

class InvalidTokenError(TesseraError):
    """A token or presentation that does not verify, or does not fit the check asked for."""

class InvalidKeyError(TesseraError):
    """A key or trust anchor that cannot be read."""

class Claims(TypedDict):
    iss: str
    sub: str
    aud: str
    exp: int
    nbf: Optional[int]
    iat: int
    cti: bytes
    scope: str

class AccessToken:
    """An access token the hub issued to this app."""

    @property
    def token(self) -> bytes: ...
    @property
    def device(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def expires_at(self) -> int: ...
    @property
    def hash(self) -> bytes: ...

class Client:
    """A client of the hub over MQTT (an app or an operator), signing with its own key."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        private_key_pem: str,
        trust_anchor: str,
        timeout_s: float = 10.0,
        tls_ca_file: Optional[str] = None,
        tls_cert_file: Optional[str] = None,
        tls_key_file: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
    ) -> None:
        """Connects as ``client_id``; TLS with ``tls_ca_file``, mutual TLS with the client
        certificate and key too; ``username``/``password`` log in to the broker."""
    def access_token(self, device: str, scope: str) -> AccessToken:
        """The token held for (device, scope) until it is due, then renewed through its
        refresh grant, else asked for afresh."""
    def renew(self, device: str, scope: str) -> AccessToken: ...
    def present(self, token: AccessToken) -> bytes:
        """A presentation of ``token`` to its device, signed with this client's key."""
    def revoke(self, kind: str, value: str) -> Tuple[int, int, int]:
        """As an operator: ``kind`` is device, subject, group, role, token_id (hex) or
        token_hash (hex). Returns (revoked, entries, notified) once durable."""
    def close(self) -> None: ...

def present(
    private_key_pem: str, token: bytes, audience: str, issued_at: Optional[int] = None
) -> bytes:
    """A presentation of ``token`` to ``audience`` signed with the holder's key."""

def verify_token(
    token: bytes,
    trust_anchor: str,
    audience: str,
    scope: Optional[str] = None,
    now: Optional[int] = None,
) -> Claims:
    """Checks a token's signature, audience, times and scope; raises InvalidTokenError."""
