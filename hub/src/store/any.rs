//! [`AnyStore`]: the backend the configuration's `database` names, chosen at run time — a
//! `postgres://` (or `postgresql://`) URL for [`Postgres`], anything else a path to an
//! SQLite file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{
    AuditEvent, AuditFilter, ClientKind, ClientRecord, Committed, GrantState, Horizons,
    IssuedToken, KeyRecord, LiveTokens, Postgres, Pruned, Refused, RequestCommit, Sqlite, Store,
    StoreResult, StreamRead, StreamState, Unmatched, WriteStats,
};
use crate::revocation::{Change, Outcome, PendingControl, Target};

/// The PostgreSQL URL `database` holds, if it is one (`postgres://…`, `postgresql://…`).
pub fn postgres_url(database: &Path) -> Option<&str> {
    let s = database.to_str()?;
    (s.starts_with("postgres://") || s.starts_with("postgresql://")).then_some(s)
}

/// `database` for messages: a PostgreSQL URL without its password, or the file's path.
pub fn shown_database(database: &Path) -> String {
    match postgres_url(database) {
        Some(url) => super::postgres::hide_password(url),
        None => database.display().to_string(),
    }
}

/// Either backend, as the configuration's `database` names it; a [`Store`] by delegation.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// An SQLite database file (the embedded default).
    Sqlite(Sqlite),
    /// A PostgreSQL database (several replicas).
    Postgres(Postgres),
}

impl AnyStore {
    /// Opens the hub's existing database, never creating one: [`StoreError::NoDatabase`]
    /// for an SQLite file that is missing; for PostgreSQL, the first operation says so
    /// (opening does not connect: see [`Postgres::open_existing`]). This blocks for
    /// SQLite; call it at startup, or on a blocking thread.
    pub fn open_existing(database: &Path) -> StoreResult<Self> {
        match postgres_url(database) {
            Some(url) => Postgres::open_existing(url).map(Self::Postgres),
            None => Sqlite::open_existing(database).map(Self::Sqlite),
        }
    }

    /// Creates a new database (`tessera-hub init`): an SQLite file, or the schema in an
    /// existing, empty PostgreSQL database. [`StoreError::DatabaseExists`] if there is one.
    pub async fn create(database: &Path) -> StoreResult<Self> {
        match postgres_url(database) {
            Some(url) => Postgres::create(url).await.map(Self::Postgres),
            None => Sqlite::create(database).map(Self::Sqlite),
        }
    }

    /// The database for messages (a URL without its password, or the file's path).
    pub fn shown(&self, database: &Path) -> String {
        shown_database(database)
    }

    /// Fails unless the database takes a durable write (`serve` checks this first).
    pub async fn check_writable(&self) -> StoreResult<()> {
        match self {
            Self::Sqlite(s) => s.check_writable().await,
            Self::Postgres(p) => p.check_writable().await,
        }
    }

    /// Which of `ids` are registered clients, in one query.
    pub async fn registered_among(&self, ids: Vec<String>) -> StoreResult<HashSet<String>> {
        match self {
            Self::Sqlite(s) => s.registered_among(ids).await,
            Self::Postgres(p) => p.registered_among(ids).await,
        }
    }

    /// Which of `keys` (SEC1) belonged to devices revoked whole, each with that device.
    pub async fn retired_among(&self, keys: Vec<Vec<u8>>) -> StoreResult<HashMap<Vec<u8>, String>> {
        match self {
            Self::Sqlite(s) => s.retired_among(keys).await,
            Self::Postgres(p) => p.retired_among(keys).await,
        }
    }
}

/// `self.$method(args…)` on whichever backend this is.
macro_rules! delegate {
    ($self:ident, $method:ident ( $($arg:expr),* )) => {
        match $self {
            AnyStore::Sqlite(s) => s.$method($($arg),*).await,
            AnyStore::Postgres(p) => p.$method($($arg),*).await,
        }
    };
}

impl Store for AnyStore {
    async fn add_client(&self, client: ClientRecord) -> StoreResult<()> {
        delegate!(self, add_client(client))
    }
    async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        delegate!(self, client(id))
    }
    async fn clients(&self, kind: Option<ClientKind>) -> StoreResult<Vec<ClientRecord>> {
        delegate!(self, clients(kind))
    }
    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        delegate!(self, remove_client(id))
    }
    async fn set_role(
        &self,
        id: &str,
        role: &str,
        disallowed: Vec<Target>,
        now: u64,
        leeway: u64,
    ) -> StoreResult<Outcome> {
        delegate!(self, set_role(id, role, disallowed, now, leeway))
    }
    async fn reprovision_device(
        &self,
        id: &str,
        public_key: Option<Vec<u8>>,
        code_key: Option<[u8; 32]>,
    ) -> StoreResult<()> {
        delegate!(self, reprovision_device(id, public_key, code_key))
    }
    async fn add_clients(&self, clients: Vec<ClientRecord>) -> StoreResult<()> {
        delegate!(self, add_clients(clients))
    }
    async fn nonce_seen(&self, client: &str, nonce: &[u8; 16], now: u64) -> StoreResult<bool> {
        delegate!(self, nonce_seen(client, nonce, now))
    }
    async fn grant(&self, hash: &[u8; 32]) -> StoreResult<Option<GrantState>> {
        delegate!(self, grant(hash))
    }
    async fn commit(&self, request: RequestCommit) -> StoreResult<Result<Committed, Refused>> {
        delegate!(self, commit(request))
    }
    async fn issued(&self, cti: &[u8]) -> StoreResult<Option<IssuedToken>> {
        delegate!(self, issued(cti))
    }
    async fn issued_to(&self, subject: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        delegate!(self, issued_to(subject, now))
    }
    async fn issued_for(&self, audience: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        delegate!(self, issued_for(audience, now))
    }
    async fn revoke(
        &self,
        targets: Vec<Target>,
        now: u64,
        leeway: u64,
        unmatched: Unmatched,
    ) -> StoreResult<Outcome> {
        delegate!(self, revoke(targets, now, leeway, unmatched))
    }
    async fn streams(&self) -> StoreResult<Vec<StreamState>> {
        delegate!(self, streams())
    }
    async fn stream_entries(
        &self,
        stream: &str,
        from: u64,
        now: u64,
        leeway: u64,
        max_entries: usize,
    ) -> StoreResult<StreamRead> {
        delegate!(self, stream_entries(stream, from, now, leeway, max_entries))
    }
    async fn set_snapshot_published(&self, stream: &str, seq: u64, pages: u64) -> StoreResult<()> {
        delegate!(self, set_snapshot_published(stream, seq, pages))
    }
    async fn unpublished_changes(&self, created_before: u64) -> StoreResult<Vec<Change>> {
        delegate!(self, unpublished_changes(created_before))
    }
    async fn mark_published(&self, ranges: Vec<(String, u64, u64)>) -> StoreResult<()> {
        delegate!(self, mark_published(ranges))
    }
    async fn unsent_controls(
        &self,
        created_before: u64,
        limit: usize,
    ) -> StoreResult<Vec<PendingControl>> {
        delegate!(self, unsent_controls(created_before, limit))
    }
    async fn mark_controls_sent(&self, controls: Vec<PendingControl>) -> StoreResult<()> {
        delegate!(self, mark_controls_sent(controls))
    }
    async fn add_key(&self, key: KeyRecord) -> StoreResult<()> {
        delegate!(self, add_key(key))
    }
    async fn keys(&self) -> StoreResult<Vec<KeyRecord>> {
        delegate!(self, keys())
    }
    async fn mark_key_published(
        &self,
        kid: &[u8; 8],
        at: u64,
        active_from: u64,
    ) -> StoreResult<KeyRecord> {
        delegate!(self, mark_key_published(kid, at, active_from))
    }
    async fn retire_key(&self, kid: &[u8; 8], retire_after: u64) -> StoreResult<()> {
        delegate!(self, retire_key(kid, retire_after))
    }
    async fn prune(&self, horizons: Horizons) -> StoreResult<Pruned> {
        delegate!(self, prune(horizons))
    }
    async fn audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        delegate!(self, audit(events))
    }
    async fn hold_lease(&self) -> StoreResult<bool> {
        delegate!(self, hold_lease())
    }

    fn write_stats(&self) -> WriteStats {
        match self {
            Self::Sqlite(s) => s.write_stats(),
            Self::Postgres(p) => p.write_stats(),
        }
    }
    async fn revocation_entries(&self, now: u64, leeway: u64) -> StoreResult<u64> {
        delegate!(self, revocation_entries(now, leeway))
    }
    async fn live_tokens(&self, now: u64) -> StoreResult<LiveTokens> {
        delegate!(self, live_tokens(now))
    }
    async fn audit_tail(&self, limit: usize) -> StoreResult<Vec<AuditEvent>> {
        delegate!(self, audit_tail(limit))
    }
    async fn audit_query(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEvent>> {
        delegate!(self, audit_query(filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn urls_pick_postgres_and_paths_sqlite() {
        assert!(postgres_url(Path::new("postgres://u@127.0.0.1/db")).is_some());
        assert!(postgres_url(Path::new("postgresql://u@h/db?sslmode=require")).is_some());
        assert!(postgres_url(Path::new("tessera-hub.db")).is_none());
        assert!(postgres_url(Path::new("/var/lib/tessera/postgres.db")).is_none());
    }

    #[test]
    fn opening_a_postgres_url_does_not_connect() {
        // Port 1 on loopback: nothing listens, and nothing is tried before the first use.
        let store = AnyStore::open_existing(Path::new("postgres://u@127.0.0.1:1/db"))
            .expect("a handle without connecting");
        assert!(matches!(store, AnyStore::Postgres(_)));
    }

    #[tokio::test]
    async fn an_unreachable_postgres_server_is_a_database_error() {
        let store =
            AnyStore::open_existing(Path::new("postgres://u@127.0.0.1:1/db")).expect("handle");
        let err = store.keys().await.expect_err("nothing listens on port 1");
        assert!(
            matches!(
                err,
                StoreError::Database {
                    persistent: false,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}
