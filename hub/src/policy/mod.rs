//! The hub's access policy: the roles and what each may obtain, the device groups, the
//! `[[access]]` rules that let app roles act on device groups, and token lifetimes.
//!
//! The policy file (TOML; [`Policy::DEFAULT_TOML`] documents every option) is parsed and
//! validated once into a [`Policy`]: nothing after loading sees the raw file, so every
//! decision works on names that are known to exist and scopes known to be well formed.
//! Each decision returns a grant or a [`Denial`] that says why in words, and
//! [`Policy::explain_access`] walks through an access decision rule by rule for
//! `tessera-hub policy explain`. [`SharedPolicy`] swaps in an edited file without a
//! restart and keeps the old policy when the new file is invalid.
//!
//! Scope matching is [`tessera_shared::scope::covers`], the same function verifiers run, so
//! the hub never grants a scope that a device would read differently.

mod decision;
mod explain;
mod file;
mod reload;

use std::collections::BTreeMap;

pub use decision::{AccessGrant, Denial, DenialCode, DeviceGrant};
pub use explain::Explanation;
pub use file::{PolicyError, Problem};
pub use reload::{
    Candidate, Force, SharedPolicy, force_marker, read_force, remove_force, write_force_marker,
};

use crate::store::ClientKind;
use tessera_shared::scope::covers;

/// Longest lifetime of a device or access token, in seconds (one day): tokens are meant
/// to be short-lived, and the revocation list is bounded by the longest one.
pub const MAX_TOKEN_LIFETIME_S: u64 = 86_400;

/// Longest lifetime of a refresh grant, in seconds (365 days).
pub const MAX_GRANT_LIFETIME_S: u64 = 365 * 86_400;

/// Largest clock-skew leeway, in seconds: more would let expired tokens live on noticeably.
/// The same bound as every verifier's (revocation entries are served that long past their
/// `expires_at`).
pub const MAX_LEEWAY_S: u64 = tessera_shared::revocation::MAX_LEEWAY;

/// `[defaults] leeway_s` when the file leaves it out.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// `[defaults] device_token_lifetime_s` when the file leaves it out (15 min).
pub const DEFAULT_DEVICE_TOKEN_LIFETIME_S: u64 = 900;
/// `[defaults] access_token_lifetime_s` when the file leaves it out (5 min).
pub const DEFAULT_ACCESS_TOKEN_LIFETIME_S: u64 = 300;
/// `[defaults] grant_lifetime_s` when the file leaves it out (one day).
pub const DEFAULT_GRANT_LIFETIME_S: u64 = 86_400;
/// `[defaults] device_audience` when the file leaves it out.
pub const DEFAULT_DEVICE_AUDIENCE: &str = "tessera";

/// A validated policy. Built only by [`Policy::from_toml`] or [`Policy::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    leeway_s: u64,
    device_audience: String,
    groups: BTreeMap<String, String>,
    roles: BTreeMap<String, Role>,
    rules: Vec<AccessRule>,
}

impl Policy {
    /// The fully commented default policy, as `tessera-hub` prints it.
    pub const DEFAULT_TOML: &'static str = include_str!("default.toml");

    /// The clock-skew leeway verifiers apply to `exp` and `nbf`, in seconds.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    /// The `aud` of device tokens: the services devices call.
    pub fn device_audience(&self) -> &str {
        &self.device_audience
    }

    /// The role with this name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// Every role, ordered by name.
    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// The description of a declared device group.
    pub fn group(&self, name: &str) -> Option<&str> {
        self.groups.get(name).map(String::as_str)
    }

    /// Every declared device group and its description, ordered by name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &str)> {
        self.groups.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The `[[access]]` rules, in file order.
    pub fn rules(&self) -> &[AccessRule] {
        &self.rules
    }

    /// The longest lifetime of any token this policy issues, in seconds: how long a
    /// revocation entry or a retired signing key must be kept (plus leeway).
    pub fn longest_token_lifetime_s(&self) -> u64 {
        self.roles
            .values()
            .filter_map(|r| r.token_lifetime_s())
            .max()
            .unwrap_or(0)
    }

    /// The shortest lifetime of the tokens issued to roles of `kind` (device roles: device
    /// tokens; app roles: access tokens), if any role of that kind issues tokens.
    pub fn shortest_token_lifetime_s(&self, kind: ClientKind) -> Option<u64> {
        self.roles
            .values()
            .filter(|r| r.kind() == kind)
            .filter_map(|r| r.token_lifetime_s())
            .min()
    }
}

/// A role: a name, and what clients holding it may obtain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    name: String,
    rights: Rights,
}

impl Role {
    /// The role's name, as clients' records name it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind of client the role is for.
    pub fn kind(&self) -> ClientKind {
        match self.rights {
            Rights::Device { .. } => ClientKind::Device,
            Rights::App { .. } => ClientKind::App,
            Rights::Operator { .. } => ClientKind::Operator,
        }
    }

    /// What the role may obtain.
    pub fn rights(&self) -> &Rights {
        &self.rights
    }

    /// The lifetime of the tokens holders obtain (`None` for operators, who obtain none).
    pub fn token_lifetime_s(&self) -> Option<u64> {
        match self.rights {
            Rights::Device {
                token_lifetime_s, ..
            }
            | Rights::App {
                token_lifetime_s, ..
            } => Some(token_lifetime_s),
            Rights::Operator { .. } => None,
        }
    }
}

/// What a role may obtain, by kind. Lifetimes are resolved: the role's override, or the
/// `[defaults]` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rights {
    /// A device role.
    Device {
        /// The scope of the device token, space-separated (a valid scope claim).
        scope: String,
        /// Device token lifetime, seconds.
        token_lifetime_s: u64,
        /// Refresh grant lifetime, seconds.
        grant_lifetime_s: u64,
    },
    /// An app role; its scopes come from the `[[access]]` rules that name it.
    App {
        /// Access token lifetime, seconds.
        token_lifetime_s: u64,
        /// Refresh grant lifetime, seconds.
        grant_lifetime_s: u64,
    },
    /// An operator role.
    Operator {
        /// The operator operations it may call (`fetch_revocations` is always allowed).
        operations: Vec<OperatorOperation>,
    },
}

/// An operation an operator role can be given in `operations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorOperation {
    /// Revoke a token, a subject or a device.
    Revoke,
    /// Fetch the revocation snapshot (every client may; listing it changes nothing).
    FetchRevocations,
    /// Watch the live event stream.
    Watch,
}

impl OperatorOperation {
    /// The name used in the policy file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Revoke => "revoke",
            Self::FetchRevocations => "fetch_revocations",
            Self::Watch => "watch",
        }
    }
}

/// One `[[access]]` rule: app roles listed may obtain the scopes listed for devices in any
/// of the groups listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    number: usize,
    app_roles: Vec<String>,
    device_groups: Vec<String>,
    scopes: Vec<String>,
}

impl AccessRule {
    /// The rule's position in the file, from 1 (as `[[access]] #n` in messages).
    pub fn number(&self) -> usize {
        self.number
    }

    /// The app roles the rule applies to.
    pub fn app_roles(&self) -> &[String] {
        &self.app_roles
    }

    /// The device groups the rule applies to.
    pub fn device_groups(&self) -> &[String] {
        &self.device_groups
    }

    /// The scope tokens it grants (each may be a `resource:*` wildcard).
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Whether the rule names this app role.
    pub fn names_role(&self, role: &str) -> bool {
        self.app_roles.iter().any(|r| r == role)
    }

    /// The first of a device's groups that the rule names.
    pub fn matching_group<'g>(&self, device_groups: &'g [String]) -> Option<&'g str> {
        device_groups
            .iter()
            .find(|g| self.device_groups.contains(g))
            .map(String::as_str)
    }

    /// The first granted scope token that covers `required`.
    pub fn covering(&self, required: &str) -> Option<&str> {
        self.scopes
            .iter()
            .map(String::as_str)
            .find(|granted| covers(granted, required))
    }

    /// Whether the rule applies to this app role on a device in these groups.
    fn applies(&self, role: &str, device_groups: &[String]) -> bool {
        self.names_role(role) && self.matching_group(device_groups).is_some()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Clients and policies for tests.

    use super::Policy;
    use crate::store::{ClientKind, ClientRecord};

    /// A registered, unrevoked client.
    pub(crate) fn client(id: &str, kind: ClientKind, role: &str, groups: &[&str]) -> ClientRecord {
        ClientRecord {
            id: id.to_owned(),
            kind,
            public_key: Some(vec![4; 65]),
            role: role.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            enrollment_code_key: None,
            enrolled_at: Some(1_700_000_000),
            revoked_at: None,
            created_at: 1_700_000_000,
        }
    }

    /// A policy from text that must be valid.
    pub(crate) fn policy(text: &str) -> Policy {
        match Policy::from_toml(text, "test.toml") {
            Ok(p) => p,
            Err(e) => panic!("policy should be valid:\n{e}"),
        }
    }

    /// A small fleet policy: sensors and locks in two buildings, a controller app for
    /// building A, a dashboard app that reads telemetry anywhere, and two operator roles.
    pub(crate) const FLEET: &str = r#"
[defaults]
leeway_s = 30
device_token_lifetime_s = 900
access_token_lifetime_s = 300
grant_lifetime_s = 86400
device_audience = "tessera"

[groups]
building-a = "Doors and sensors in building A"
building-b = "Doors and sensors in building B"

[roles.sensor]
kind = "device"
scopes = ["telemetry:write"]

[roles.lock]
kind = "device"
scopes = ["telemetry:write", "events:publish"]
token_lifetime_s = 600
grant_lifetime_s = 3600

[roles.controller]
kind = "app"
token_lifetime_s = 120

[roles.dashboard]
kind = "app"

[roles.ops]
kind = "operator"
operations = ["revoke", "watch"]

[roles.viewer]
kind = "operator"
operations = ["watch"]

[[access]]
app_roles = ["controller"]
device_groups = ["building-a"]
scopes = ["door:open", "light:*", "telemetry:read"]

[[access]]
app_roles = ["dashboard", "controller"]
device_groups = ["building-a", "building-b"]
scopes = ["telemetry:read"]
"#;
}
