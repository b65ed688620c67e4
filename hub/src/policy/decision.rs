//! The decisions: what a client may obtain or call, and whether an issued token would still
//! be granted after the policy or a client's role changed.

use std::fmt;

use tessera_shared::message::Operation;
use tessera_shared::scope::Scopes;

use super::{OperatorOperation, Policy, Rights, Role};
use crate::store::{ClientKind, ClientRecord, IssuedToken, TokenKind};

/// What a device token is issued with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGrant {
    /// The token's `scope`: the device role's scopes, space-separated.
    pub scope: String,
    /// Token lifetime, seconds.
    pub lifetime_s: u64,
    /// Lifetime of the refresh grant issued with it, seconds.
    pub grant_lifetime_s: u64,
    /// The token's `aud`.
    pub audience: String,
}

/// What an access token is issued with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    /// The token's `scope`: exactly the scopes requested.
    pub scope: String,
    /// Token lifetime, seconds.
    pub lifetime_s: u64,
    /// Lifetime of the refresh grant issued with it, seconds.
    pub grant_lifetime_s: u64,
}

/// A refusal by policy, with the reason in words (sent to the client and audited).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    /// The category.
    pub code: DenialCode,
    /// Why, naming the client, role, scope or operation concerned.
    pub reason: String,
}

impl Denial {
    fn new(code: DenialCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Why policy refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialCode {
    /// The client's role does not allow it: a scope no rule grants, or an operation its
    /// kind or role may not call.
    NotAllowed,
    /// The client's role is not defined in the policy.
    UnknownRole,
    /// A client of the wrong kind: an app asking for a device token, a device asking for
    /// an access token, an access token for something that is not a device, or a client
    /// whose role is for another kind.
    WrongKind,
    /// The client (or the device asked about) is revoked.
    Revoked,
}

impl DenialCode {
    /// The code's name in logs and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::UnknownRole => "unknown_role",
            Self::WrongKind => "wrong_kind",
            Self::Revoked => "revoked",
        }
    }
}

impl fmt::Display for DenialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "a device", "an app", "an operator".
pub(super) fn a_kind(kind: ClientKind) -> &'static str {
    match kind {
        ClientKind::Device => "a device",
        ClientKind::App => "an app",
        ClientKind::Operator => "an operator",
    }
}

/// Wire operations each kind may call, apart from operator roles' own list.
const DEVICE_OPERATIONS: &[Operation] = &[
    Operation::Enroll,
    Operation::DeviceToken,
    Operation::Refresh,
    Operation::FetchRevocations,
    Operation::ReportPresentation,
];
const APP_OPERATIONS: &[Operation] = &[
    Operation::AccessToken,
    Operation::Refresh,
    Operation::FetchRevocations,
];

fn names(ops: &[Operation]) -> String {
    let names: Vec<&str> = ops.iter().map(|o| o.name()).collect();
    names.join(", ")
}

impl Policy {
    /// The client's role, checked against the client: not revoked, the role defined and
    /// for the client's kind. A reload refuses a policy under which a registered client
    /// has none ([`crate::policy_change::review`]).
    pub fn role_of(&self, client: &ClientRecord) -> Result<&Role, Denial> {
        if client.revoked_at.is_some() {
            return Err(Denial::new(
                DenialCode::Revoked,
                format!("client {:?} is revoked", client.id),
            ));
        }
        let Some(role) = self.role(&client.role) else {
            return Err(Denial::new(
                DenialCode::UnknownRole,
                format!(
                    "client {:?} has role {:?}, which the policy does not define",
                    client.id, client.role
                ),
            ));
        };
        if role.kind() != client.kind {
            return Err(Denial::new(
                DenialCode::WrongKind,
                format!(
                    "client {:?} is {} but its role {:?} is {} role",
                    client.id,
                    a_kind(client.kind),
                    role.name(),
                    a_kind(role.kind())
                ),
            ));
        }
        Ok(role)
    }

    /// May this device obtain a device token, and with what scope and lifetimes?
    pub fn device_token(&self, device: &ClientRecord) -> Result<DeviceGrant, Denial> {
        if device.kind != ClientKind::Device {
            return Err(Denial::new(
                DenialCode::WrongKind,
                format!(
                    "client {:?} is {}; only devices obtain device tokens",
                    device.id,
                    a_kind(device.kind)
                ),
            ));
        }
        match self.role_of(device)?.rights() {
            Rights::Device {
                scope,
                token_lifetime_s,
                grant_lifetime_s,
            } => Ok(DeviceGrant {
                scope: scope.clone(),
                lifetime_s: *token_lifetime_s,
                grant_lifetime_s: *grant_lifetime_s,
                audience: self.device_audience.clone(),
            }),
            // `role_of` checked that the role's kind is the client's.
            Rights::App { .. } | Rights::Operator { .. } => {
                unreachable!("a device's role is a device role")
            }
        }
    }

    /// May this app obtain an access token for this device with exactly these scopes?
    ///
    /// Every requested scope token must be covered by a rule that names the app's role and
    /// one of the device's groups; the first one that is not is named in the denial. A
    /// requested wildcard (`door:*`) needs a rule granting that wildcard itself.
    pub fn access_token(
        &self,
        app: &ClientRecord,
        device: &ClientRecord,
        requested: &Scopes<'_>,
    ) -> Result<AccessGrant, Denial> {
        if app.kind != ClientKind::App {
            return Err(Denial::new(
                DenialCode::WrongKind,
                format!(
                    "client {:?} is {}; only apps obtain access tokens",
                    app.id,
                    a_kind(app.kind)
                ),
            ));
        }
        let role = self.role_of(app)?;
        let Rights::App {
            token_lifetime_s,
            grant_lifetime_s,
        } = *role.rights()
        else {
            unreachable!("an app's role is an app role")
        };
        if device.kind != ClientKind::Device {
            return Err(Denial::new(
                DenialCode::WrongKind,
                format!(
                    "access tokens are for devices, and {:?} is {}",
                    device.id,
                    a_kind(device.kind)
                ),
            ));
        }
        if device.revoked_at.is_some() {
            return Err(Denial::new(
                DenialCode::Revoked,
                format!("device {:?} is revoked", device.id),
            ));
        }
        if let Some(scope) = self.first_uncovered(role.name(), &device.groups, requested) {
            return Err(Denial::new(
                DenialCode::NotAllowed,
                format!(
                    "scope {scope:?} is not allowed: no [[access]] rule grants it to app role \
                     {:?} on device {:?} ({})",
                    role.name(),
                    device.id,
                    groups_phrase(&device.groups)
                ),
            ));
        }
        Ok(AccessGrant {
            scope: requested.as_str().to_owned(),
            lifetime_s: token_lifetime_s,
            grant_lifetime_s,
        })
    }

    /// The first requested scope token no applicable rule covers.
    pub(super) fn first_uncovered<'s>(
        &self,
        role: &str,
        device_groups: &[String],
        requested: &Scopes<'s>,
    ) -> Option<&'s str> {
        requested.iter().find(|required| {
            !self
                .rules
                .iter()
                .any(|rule| rule.applies(role, device_groups) && rule.covering(required).is_some())
        })
    }

    /// May this client call this operation at all? Devices may enroll, obtain device
    /// tokens, refresh and fetch revocations; apps may obtain access tokens, refresh and
    /// fetch revocations; operators may fetch revocations and call what their role lists.
    pub fn operation(&self, client: &ClientRecord, op: Operation) -> Result<(), Denial> {
        let role = self.role_of(client)?;
        let allowed = match role.rights() {
            Rights::Device { .. } => DEVICE_OPERATIONS.contains(&op),
            Rights::App { .. } => APP_OPERATIONS.contains(&op),
            Rights::Operator { operations } => match op {
                Operation::FetchRevocations => true,
                Operation::Revoke => operations.contains(&OperatorOperation::Revoke),
                _ => false,
            },
        };
        if allowed {
            return Ok(());
        }
        let reason = match role.rights() {
            Rights::Device { .. } => format!(
                "client {:?} is a device; devices may call {}, not {}",
                client.id,
                names(DEVICE_OPERATIONS),
                op.name()
            ),
            Rights::App { .. } => format!(
                "client {:?} is an app; apps may call {}, not {}",
                client.id,
                names(APP_OPERATIONS),
                op.name()
            ),
            Rights::Operator { .. } if op == Operation::Revoke => format!(
                "operator role {:?} of client {:?} does not list revoke in its operations",
                role.name(),
                client.id
            ),
            Rights::Operator { .. } => format!(
                "client {:?} is an operator; operators may call revoke (if their role lists \
                 it) and fetch_revocations, not {}",
                client.id,
                op.name()
            ),
        };
        Err(Denial::new(DenialCode::NotAllowed, reason))
    }

    /// May this client watch the live event stream? Only operators whose role lists
    /// `watch`.
    pub fn watch(&self, client: &ClientRecord) -> Result<(), Denial> {
        let role = self.role_of(client)?;
        match role.rights() {
            Rights::Operator { operations } if operations.contains(&OperatorOperation::Watch) => {
                Ok(())
            }
            Rights::Operator { .. } => Err(Denial::new(
                DenialCode::NotAllowed,
                format!(
                    "operator role {:?} of client {:?} does not list watch in its operations",
                    role.name(),
                    client.id
                ),
            )),
            Rights::Device { .. } | Rights::App { .. } => Err(Denial::new(
                DenialCode::NotAllowed,
                format!(
                    "client {:?} is {}; only operators watch events",
                    client.id,
                    a_kind(client.kind)
                ),
            )),
        }
    }

    /// Would this issued token still be granted now, after a policy reload or a role
    /// change? `subject` is the token's subject as registered now, `audience_device` the
    /// device an access token is for (ignored for device tokens). A missing or revoked
    /// subject or device, or a token naming other clients than those given, is `false`.
    ///
    /// Only the scope is compared: a token stays allowed while every scope token in it is
    /// still granted, even if the lifetime or device audience has changed since.
    pub fn still_allows(
        &self,
        token: &IssuedToken,
        subject: Option<&ClientRecord>,
        audience_device: Option<&ClientRecord>,
    ) -> bool {
        let Some(subject) = subject.filter(|s| s.id == token.subject) else {
            return false;
        };
        let Ok(scope) = Scopes::parse(&token.scope) else {
            return false;
        };
        match token.kind {
            TokenKind::Device => self.device_token(subject).is_ok_and(|grant| {
                Scopes::parse(&grant.scope).is_ok_and(|now| now.grants_all(&scope))
            }),
            TokenKind::Access => audience_device
                .filter(|d| d.id == token.audience)
                .is_some_and(|device| self.access_token(subject, device, &scope).is_ok()),
        }
    }
}

/// "groups building-a, lobby" or "in no group".
pub(super) fn groups_phrase(groups: &[String]) -> String {
    if groups.is_empty() {
        "in no group".to_owned()
    } else {
        format!("groups {}", groups.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{FLEET, client, policy};

    fn scopes(s: &str) -> Scopes<'_> {
        Scopes::parse(s).expect("valid scopes")
    }

    fn fleet() -> Policy {
        policy(FLEET)
    }

    fn sensor() -> ClientRecord {
        client("sensor-1", ClientKind::Device, "sensor", &["building-a"])
    }

    fn door_a() -> ClientRecord {
        client("door-a1", ClientKind::Device, "lock", &["building-a"])
    }

    fn door_b() -> ClientRecord {
        client("door-b1", ClientKind::Device, "lock", &["building-b"])
    }

    fn controller() -> ClientRecord {
        client("ctl-1", ClientKind::App, "controller", &[])
    }

    fn denial<T: fmt::Debug>(result: Result<T, Denial>) -> Denial {
        result.expect_err("should be denied")
    }

    #[test]
    fn a_device_token_has_the_scope_and_default_lifetimes_of_the_device_role() {
        let grant = fleet().device_token(&sensor()).expect("granted");
        assert_eq!(
            grant,
            DeviceGrant {
                scope: "telemetry:write".into(),
                lifetime_s: 900,
                grant_lifetime_s: 86_400,
                audience: "tessera".into(),
            }
        );
    }

    #[test]
    fn a_device_role_override_sets_the_device_token_lifetimes() {
        let grant = fleet().device_token(&door_a()).expect("granted");
        assert_eq!(grant.scope, "telemetry:write events:publish");
        assert_eq!((grant.lifetime_s, grant.grant_lifetime_s), (600, 3600));
    }

    #[test]
    fn an_app_asking_for_a_device_token_is_denied_as_the_wrong_kind() {
        let d = denial(fleet().device_token(&controller()));
        assert_eq!(d.code, DenialCode::WrongKind);
        assert_eq!(
            d.reason,
            "client \"ctl-1\" is an app; only devices obtain device tokens"
        );
    }

    #[test]
    fn a_device_whose_role_is_undefined_or_for_apps_gets_no_device_token() {
        let p = fleet();
        let ghost = client("d", ClientKind::Device, "ghost", &[]);
        assert_eq!(denial(p.device_token(&ghost)).code, DenialCode::UnknownRole);
        let confused = client("d", ClientKind::Device, "controller", &[]);
        let d = denial(p.device_token(&confused));
        assert_eq!(d.code, DenialCode::WrongKind);
        assert!(d.reason.contains("its role \"controller\" is an app role"));
    }

    #[test]
    fn a_revoked_device_gets_no_device_token() {
        let mut device = sensor();
        device.revoked_at = Some(1);
        assert_eq!(
            denial(fleet().device_token(&device)).code,
            DenialCode::Revoked
        );
    }

    #[test]
    fn an_access_token_within_a_rule_is_granted_with_exactly_the_requested_scope() {
        let grant = fleet()
            .access_token(
                &controller(),
                &door_a(),
                &scopes("door:open telemetry:read"),
            )
            .expect("granted");
        assert_eq!(
            grant,
            AccessGrant {
                scope: "door:open telemetry:read".into(),
                lifetime_s: 120,
                grant_lifetime_s: 86_400,
            }
        );
    }

    #[test]
    fn an_app_role_without_override_gets_the_default_access_lifetime() {
        let dashboard = client("dash", ClientKind::App, "dashboard", &[]);
        let grant = fleet()
            .access_token(&dashboard, &door_b(), &scopes("telemetry:read"))
            .expect("granted");
        assert_eq!(grant.lifetime_s, 300);
    }

    #[test]
    fn asking_for_one_scope_more_than_the_rules_grant_is_denied_naming_it() {
        let d = denial(fleet().access_token(
            &controller(),
            &door_a(),
            &scopes("door:open door:unlock telemetry:read"),
        ));
        assert_eq!(d.code, DenialCode::NotAllowed);
        assert_eq!(
            d.reason,
            "scope \"door:unlock\" is not allowed: no [[access]] rule grants it to app role \
             \"controller\" on device \"door-a1\" (groups building-a)"
        );
    }

    #[test]
    fn a_wildcard_rule_covers_a_specific_scope() {
        let p = fleet();
        for s in ["light:on", "light:dim", "light:on light:off"] {
            assert!(
                p.access_token(&controller(), &door_a(), &scopes(s)).is_ok(),
                "{s}"
            );
        }
        assert!(
            p.access_token(&controller(), &door_a(), &scopes("light:*"))
                .is_ok(),
            "a rule granting light:* grants a request for light:*"
        );
    }

    #[test]
    fn a_specific_rule_does_not_grant_a_wildcard_request() {
        let d = denial(fleet().access_token(&controller(), &door_a(), &scopes("door:*")));
        assert_eq!(d.code, DenialCode::NotAllowed);
        assert!(
            d.reason.starts_with("scope \"door:*\" is not allowed"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_device_in_a_group_no_rule_covers_for_the_role_is_denied() {
        let d = denial(fleet().access_token(&controller(), &door_b(), &scopes("door:open")));
        assert_eq!(d.code, DenialCode::NotAllowed);
        assert!(d.reason.contains("(groups building-b)"), "{}", d.reason);
        let loner = client("loner", ClientKind::Device, "sensor", &[]);
        let d = denial(fleet().access_token(&controller(), &loner, &scopes("telemetry:read")));
        assert!(d.reason.contains("(in no group)"), "{}", d.reason);
    }

    #[test]
    fn a_device_asking_for_an_access_token_is_denied_as_the_wrong_kind() {
        let d = denial(fleet().access_token(&sensor(), &door_a(), &scopes("door:open")));
        assert_eq!(d.code, DenialCode::WrongKind);
        assert_eq!(
            d.reason,
            "client \"sensor-1\" is a device; only apps obtain access tokens"
        );
    }

    #[test]
    fn an_access_token_for_a_client_that_is_not_a_device_is_denied() {
        let other_app = client("ctl-2", ClientKind::App, "controller", &["building-a"]);
        let d = denial(fleet().access_token(&controller(), &other_app, &scopes("door:open")));
        assert_eq!(d.code, DenialCode::WrongKind);
        assert!(d.reason.contains("\"ctl-2\" is an app"), "{}", d.reason);
    }

    #[test]
    fn an_access_token_for_a_revoked_device_or_by_a_revoked_app_is_denied() {
        let p = fleet();
        let mut device = door_a();
        device.revoked_at = Some(5);
        let d = denial(p.access_token(&controller(), &device, &scopes("door:open")));
        assert_eq!(d.code, DenialCode::Revoked);
        let mut app = controller();
        app.revoked_at = Some(5);
        let d = denial(p.access_token(&app, &door_a(), &scopes("door:open")));
        assert_eq!(d.code, DenialCode::Revoked);
    }

    #[test]
    fn devices_and_apps_call_only_the_operations_of_their_kind() {
        let p = fleet();
        for op in DEVICE_OPERATIONS {
            assert!(p.operation(&sensor(), *op).is_ok(), "{op:?}");
        }
        for op in APP_OPERATIONS {
            assert!(p.operation(&controller(), *op).is_ok(), "{op:?}");
        }
        for (c, op) in [
            (sensor(), Operation::AccessToken),
            (sensor(), Operation::Revoke),
            (controller(), Operation::DeviceToken),
            (controller(), Operation::Enroll),
            (controller(), Operation::Revoke),
        ] {
            let d = denial(p.operation(&c, op));
            assert_eq!(d.code, DenialCode::NotAllowed, "{op:?}");
            assert!(
                d.reason.ends_with(&format!("not {}", op.name())),
                "{}",
                d.reason
            );
        }
    }

    #[test]
    fn operators_call_what_their_role_lists_and_always_fetch_revocations() {
        let p = fleet();
        let ops = client("op-1", ClientKind::Operator, "ops", &[]);
        let viewer = client("op-2", ClientKind::Operator, "viewer", &[]);
        assert!(p.operation(&ops, Operation::Revoke).is_ok());
        assert!(p.operation(&ops, Operation::FetchRevocations).is_ok());
        assert!(p.operation(&viewer, Operation::FetchRevocations).is_ok());
        assert!(p.watch(&ops).is_ok());
        assert!(p.watch(&viewer).is_ok());

        let d = denial(p.operation(&viewer, Operation::Revoke));
        assert_eq!(d.code, DenialCode::NotAllowed);
        assert_eq!(
            d.reason,
            "operator role \"viewer\" of client \"op-2\" does not list revoke in its operations"
        );
        for op in [
            Operation::DeviceToken,
            Operation::AccessToken,
            Operation::Refresh,
        ] {
            assert_eq!(denial(p.operation(&ops, op)).code, DenialCode::NotAllowed);
        }
        assert!(p.watch(&sensor()).is_err());
        assert!(p.watch(&controller()).is_err());
    }

    #[test]
    fn a_revoked_or_role_less_client_may_call_nothing() {
        let p = fleet();
        let mut revoked = sensor();
        revoked.revoked_at = Some(1);
        assert_eq!(
            denial(p.operation(&revoked, Operation::FetchRevocations)).code,
            DenialCode::Revoked
        );
        let ghost = client("g", ClientKind::Operator, "root", &[]);
        assert_eq!(
            denial(p.operation(&ghost, Operation::Revoke)).code,
            DenialCode::UnknownRole
        );
    }

    fn issued(kind: TokenKind, subject: &str, audience: &str, scope: &str) -> IssuedToken {
        IssuedToken {
            cti: [1; 16],
            hash: [2; 32],
            kind,
            subject: subject.into(),
            audience: audience.into(),
            scope: scope.into(),
            issued_at: 1_700_000_000,
            expires_at: 1_700_000_300,
        }
    }

    #[test]
    fn an_access_token_is_no_longer_allowed_after_the_app_changes_role() {
        let p = fleet();
        let token = issued(TokenKind::Access, "ctl-1", "door-a1", "door:open");
        let app = controller();
        assert!(p.still_allows(&token, Some(&app), Some(&door_a())));
        let demoted = ClientRecord {
            role: "dashboard".into(),
            ..app
        };
        assert!(!p.still_allows(&token, Some(&demoted), Some(&door_a())));
        let telemetry = issued(TokenKind::Access, "ctl-1", "door-a1", "telemetry:read");
        assert!(p.still_allows(&telemetry, Some(&demoted), Some(&door_a())));
    }

    #[test]
    fn an_access_token_is_no_longer_allowed_after_its_rule_is_removed() {
        let token = issued(TokenKind::Access, "ctl-1", "door-a1", "light:on");
        assert!(fleet().still_allows(&token, Some(&controller()), Some(&door_a())));
        let without_lights = FLEET.replace(r#""light:*", "#, "");
        let p = policy(&without_lights);
        assert!(!p.still_allows(&token, Some(&controller()), Some(&door_a())));
    }

    #[test]
    fn a_device_token_is_no_longer_allowed_when_its_role_loses_a_scope() {
        let p = fleet();
        let token = issued(
            TokenKind::Device,
            "door-a1",
            "tessera",
            "telemetry:write events:publish",
        );
        assert!(p.still_allows(&token, Some(&door_a()), None));
        let as_sensor = ClientRecord {
            role: "sensor".into(),
            ..door_a()
        };
        assert!(!p.still_allows(&token, Some(&as_sensor), None));
        let narrower = issued(TokenKind::Device, "door-a1", "tessera", "telemetry:write");
        assert!(p.still_allows(&narrower, Some(&as_sensor), None));
    }

    #[test]
    fn a_missing_revoked_or_mismatched_subject_allows_nothing() {
        let p = fleet();
        let token = issued(TokenKind::Access, "ctl-1", "door-a1", "door:open");
        assert!(!p.still_allows(&token, None, Some(&door_a())));
        assert!(!p.still_allows(&token, Some(&controller()), None));
        assert!(!p.still_allows(&token, Some(&controller()), Some(&door_b())));
        let other = client("ctl-9", ClientKind::App, "controller", &[]);
        assert!(!p.still_allows(&token, Some(&other), Some(&door_a())));
        let mut revoked = controller();
        revoked.revoked_at = Some(1);
        assert!(!p.still_allows(&token, Some(&revoked), Some(&door_a())));
        let garbled = issued(TokenKind::Access, "ctl-1", "door-a1", "door:open  x");
        assert!(!p.still_allows(&garbled, Some(&controller()), Some(&door_a())));
    }
}
