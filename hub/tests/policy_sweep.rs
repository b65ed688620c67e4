//! The sweep after a policy reload or a role change, racing the store's pruning: a token
//! the sweep found live may be pruned before the sweep revokes it, and must not fail the
//! revocation of the others.

use tessera_hub::policy::Policy;
use tessera_hub::policy_change;
use tessera_hub::revocation::{Outcome, PendingControl, Target};
use tessera_hub::store::conformance::Primitives as _;
use tessera_hub::store::{
    AuditEvent, ClientKind, ClientRecord, Committed, GrantState, Horizons, IssuedToken, KeyRecord,
    Pruned, Refused, RequestCommit, Sqlite, Store, StoreResult, StreamRead, StreamState, TokenKind,
    Unmatched,
};

const T0: u64 = 1_767_225_600;

const POLICY: &str = r#"
[defaults]
leeway_s = 30
device_token_lifetime_s = 900
access_token_lifetime_s = 300
grant_lifetime_s = 86400
device_audience = "tessera"

[roles.lock]
kind = "device"
scopes = ["telemetry:write", "events:publish"]

[roles.ops]
kind = "operator"
operations = ["revoke"]
"#;

/// A store that prunes (issued tokens expired before `tokens_before`) just before every
/// revocation: the interleaving where a sweep's read and its revocation straddle the
/// heartbeat's prune.
struct PrunesFirst {
    inner: Sqlite,
    tokens_before: u64,
}

impl Store for PrunesFirst {
    async fn add_client(&self, client: ClientRecord) -> StoreResult<()> {
        self.inner.add_client(client).await
    }
    async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        self.inner.client(id).await
    }
    async fn clients(&self, kind: Option<ClientKind>) -> StoreResult<Vec<ClientRecord>> {
        self.inner.clients(kind).await
    }
    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        self.inner.remove_client(id).await
    }
    async fn set_role(
        &self,
        id: &str,
        role: &str,
        disallowed: Vec<Target>,
        now: u64,
        leeway: u64,
    ) -> StoreResult<Outcome> {
        self.prune_first().await?;
        self.inner.set_role(id, role, disallowed, now, leeway).await
    }
    async fn add_clients(&self, clients: Vec<ClientRecord>) -> StoreResult<()> {
        self.inner.add_clients(clients).await
    }
    async fn reprovision_device(
        &self,
        id: &str,
        public_key: Option<Vec<u8>>,
        code_key: Option<[u8; 32]>,
    ) -> StoreResult<()> {
        self.inner
            .reprovision_device(id, public_key, code_key)
            .await
    }
    async fn nonce_seen(&self, client: &str, nonce: &[u8; 16], now: u64) -> StoreResult<bool> {
        self.inner.nonce_seen(client, nonce, now).await
    }
    async fn grant(&self, hash: &[u8; 32]) -> StoreResult<Option<GrantState>> {
        self.inner.grant(hash).await
    }
    async fn commit(&self, request: RequestCommit) -> StoreResult<Result<Committed, Refused>> {
        self.inner.commit(request).await
    }
    async fn issued(&self, cti: &[u8]) -> StoreResult<Option<IssuedToken>> {
        self.inner.issued(cti).await
    }
    async fn issued_to(&self, subject: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        self.inner.issued_to(subject, now).await
    }
    async fn issued_for(&self, audience: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        self.inner.issued_for(audience, now).await
    }
    async fn revoke(
        &self,
        targets: Vec<Target>,
        now: u64,
        leeway: u64,
        unmatched: Unmatched,
    ) -> StoreResult<Outcome> {
        self.prune_first().await?;
        self.inner.revoke(targets, now, leeway, unmatched).await
    }
    async fn streams(&self) -> StoreResult<Vec<StreamState>> {
        self.inner.streams().await
    }
    async fn stream_entries(
        &self,
        stream: &str,
        from: u64,
        now: u64,
        leeway: u64,
        max_entries: usize,
    ) -> StoreResult<StreamRead> {
        self.inner
            .stream_entries(stream, from, now, leeway, max_entries)
            .await
    }
    async fn set_snapshot_published(&self, stream: &str, seq: u64, pages: u64) -> StoreResult<()> {
        self.inner.set_snapshot_published(stream, seq, pages).await
    }
    async fn unpublished_changes(
        &self,
        created_before: u64,
    ) -> StoreResult<Vec<tessera_hub::revocation::Change>> {
        self.inner.unpublished_changes(created_before).await
    }
    async fn mark_published(&self, ranges: Vec<(String, u64, u64)>) -> StoreResult<()> {
        self.inner.mark_published(ranges).await
    }
    async fn unsent_controls(
        &self,
        created_before: u64,
        limit: usize,
    ) -> StoreResult<Vec<PendingControl>> {
        self.inner.unsent_controls(created_before, limit).await
    }
    async fn mark_controls_sent(&self, controls: Vec<PendingControl>) -> StoreResult<()> {
        self.inner.mark_controls_sent(controls).await
    }
    async fn add_key(&self, key: KeyRecord) -> StoreResult<()> {
        self.inner.add_key(key).await
    }
    async fn keys(&self) -> StoreResult<Vec<KeyRecord>> {
        self.inner.keys().await
    }
    async fn mark_key_published(
        &self,
        kid: &[u8; 8],
        at: u64,
        active_from: u64,
    ) -> StoreResult<KeyRecord> {
        self.inner.mark_key_published(kid, at, active_from).await
    }
    async fn retire_key(&self, kid: &[u8; 8], retire_after: u64) -> StoreResult<()> {
        self.inner.retire_key(kid, retire_after).await
    }
    async fn prune(&self, horizons: Horizons) -> StoreResult<Pruned> {
        self.inner.prune(horizons).await
    }
    async fn audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        self.inner.audit(events).await
    }
    async fn audit_tail(&self, limit: usize) -> StoreResult<Vec<AuditEvent>> {
        self.inner.audit_tail(limit).await
    }
}

impl PrunesFirst {
    async fn prune_first(&self) -> StoreResult<Pruned> {
        self.inner
            .prune(Horizons {
                tokens_before: self.tokens_before,
                ..Horizons::default()
            })
            .await
    }
}

fn lock(id: &str) -> ClientRecord {
    let mut key = vec![0x04; 65];
    key[1] = u8::try_from(id.len()).expect("a short id");
    ClientRecord {
        id: id.to_owned(),
        kind: ClientKind::Device,
        public_key: Some(key),
        role: "lock".to_owned(),
        groups: Vec::new(),
        enrollment_code_key: None,
        enrolled_at: Some(T0 - 1000),
        revoked_at: None,
        created_at: T0 - 1000,
    }
}

fn device_token(n: u8, device: &str, issued_at: u64, expires_at: u64) -> IssuedToken {
    IssuedToken {
        cti: [n; 16],
        hash: [n; 32],
        kind: TokenKind::Device,
        subject: device.to_owned(),
        audience: "tessera".to_owned(),
        scope: "telemetry:write events:publish".to_owned(),
        issued_at,
        expires_at,
    }
}

/// Two locks, each with a device token the reloaded policy no longer allows; lock-1's is
/// still live (with leeway) when the sweep reads it at `T0`, and the store prunes it before
/// the sweep's revocation.
async fn racing_store() -> PrunesFirst {
    let inner = Sqlite::open_in_memory().expect("store");
    inner
        .add_clients(vec![lock("lock-1"), lock("lock-2")])
        .await
        .expect("add_clients");
    for t in [
        device_token(1, "lock-1", T0 - 899, T0 - 29),
        device_token(2, "lock-2", T0 - 10, T0 + 890),
    ] {
        inner.record_issued(t, None).await.expect("record");
    }
    PrunesFirst {
        inner,
        tokens_before: T0 - 28,
    }
}

fn reloaded() -> Policy {
    Policy::from_toml(&POLICY.replace(r#", "events:publish""#, ""), "policy.toml").expect("policy")
}

#[tokio::test]
async fn a_policy_reload_sweep_revokes_the_rest_when_a_token_it_found_is_pruned_meanwhile() {
    let store = racing_store().await;
    let out = policy_change::revoke_disallowed_everywhere(&store, &reloaded(), T0)
        .await
        .expect("the sweep does not fail")
        .expect("lock-2's token is revoked");
    assert_eq!(out.revoked, 1);
    assert_eq!(out.entry_count(), 1);
    assert_eq!(
        out.controls
            .iter()
            .map(|c| c.device.as_str())
            .collect::<Vec<_>>(),
        ["lock-2"]
    );
}

#[tokio::test]
async fn a_role_change_sweep_revokes_the_rest_when_a_token_it_found_is_pruned_meanwhile() {
    let store = racing_store().await;
    let policy = Policy::from_toml(
        &format!("{POLICY}\n[roles.sensor]\nkind = \"device\"\nscopes = [\"telemetry:write\"]\n"),
        "policy.toml",
    )
    .expect("policy");
    // lock-2 becomes a sensor: its token is found live, disallowed, and revoked with the
    // role change.
    let lock_2 = store.client("lock-2").await.expect("client").expect("kept");
    let out = policy_change::change_role(&store, &policy, &lock_2, "sensor", T0)
        .await
        .expect("the role change does not fail")
        .expect("its token is revoked");
    assert_eq!(out.revoked, 1);
    assert_eq!(
        store
            .client("lock-2")
            .await
            .expect("client")
            .expect("kept")
            .role,
        "sensor"
    );
    // lock-1 too: its token is found live and disallowed, but pruned before the role
    // change commits; it is skipped, and the role still changes.
    let lock_1 = store.client("lock-1").await.expect("client").expect("kept");
    assert_eq!(
        policy_change::change_role(&store, &policy, &lock_1, "sensor", T0)
            .await
            .expect("the role change does not fail"),
        None
    );
    assert_eq!(
        store
            .client("lock-1")
            .await
            .expect("client")
            .expect("kept")
            .role,
        "sensor"
    );
}
