//! The policy file: its TOML shape, and the one validation that turns it into a [`Policy`].
//!
//! The raw structs mirror the file exactly (unknown keys are errors) and never leave this
//! module. Validation collects every problem instead of stopping at the first, so an
//! operator fixes a file in one pass; each problem names the section it is in.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use tessera_shared::message::validate_id;
use tessera_shared::scope::{MAX_SCOPES, validate_token};

use super::{
    AccessRule, DEFAULT_ACCESS_TOKEN_LIFETIME_S, DEFAULT_DEVICE_AUDIENCE,
    DEFAULT_DEVICE_TOKEN_LIFETIME_S, DEFAULT_GRANT_LIFETIME_S, DEFAULT_LEEWAY_S,
    MAX_GRANT_LIFETIME_S, MAX_LEEWAY_S, MAX_TOKEN_LIFETIME_S, OperatorOperation, Policy, Rights,
    Role,
};

/// Why a policy file was not loaded. Every message starts with the file's name.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{file}: cannot read the policy file: {source}")]
    Read {
        /// The file, as given.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of the policy's shape (syntax, unknown key, wrong type, missing
    /// key); the message shows the line and column.
    #[error("{file}: {source}")]
    Syntax {
        /// The file, as given.
        file: String,
        /// The parser's error, with its position.
        #[source]
        source: toml::de::Error,
    },
    /// The file parsed but breaks a rule of the policy; every problem found is listed.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        /// The file, as given.
        file: String,
        /// What is wrong: `[defaults]`, `[groups]`, roles by name, then rules in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("{file}: {p}")).collect();
    lines.join("\n")
}

/// One thing wrong in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `[defaults]`, `[groups]`, `[roles.sensor]`, `[[access]] #2`.
    pub at: String,
    /// What, in words.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.what)
    }
}

impl Policy {
    /// Parses and validates a policy. `file` names the source in error messages.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, PolicyError> {
        let raw: PolicyFile = toml::from_str(text).map_err(|source| PolicyError::Syntax {
            file: file.to_owned(),
            source,
        })?;
        raw.validate().map_err(|problems| PolicyError::Invalid {
            file: file.to_owned(),
            problems,
        })
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, &file),
            Err(source) => Err(PolicyError::Read { file, source }),
        }
    }

    /// The policy [`Policy::DEFAULT_TOML`] describes.
    pub fn default_policy() -> Self {
        match Self::from_toml(Self::DEFAULT_TOML, "default policy") {
            Ok(p) => p,
            // A unit test loads the default, so this cannot ship broken.
            Err(e) => unreachable!("the built-in default policy is invalid: {e}"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    defaults: DefaultsFile,
    #[serde(default)]
    groups: BTreeMap<String, String>,
    #[serde(default)]
    roles: BTreeMap<String, RoleFile>,
    #[serde(default)]
    access: Vec<AccessFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DefaultsFile {
    leeway_s: u64,
    device_token_lifetime_s: u64,
    access_token_lifetime_s: u64,
    grant_lifetime_s: u64,
    device_audience: String,
}

impl Default for DefaultsFile {
    fn default() -> Self {
        Self {
            leeway_s: DEFAULT_LEEWAY_S,
            device_token_lifetime_s: DEFAULT_DEVICE_TOKEN_LIFETIME_S,
            access_token_lifetime_s: DEFAULT_ACCESS_TOKEN_LIFETIME_S,
            grant_lifetime_s: DEFAULT_GRANT_LIFETIME_S,
            device_audience: DEFAULT_DEVICE_AUDIENCE.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoleKindFile {
    Device,
    App,
    Operator,
}

impl RoleKindFile {
    fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::App => "app",
            Self::Operator => "operator",
        }
    }

    /// The name after its indefinite article: "a device", "an operator".
    fn with_article(self) -> &'static str {
        match self {
            Self::Device => "a device",
            Self::App => "an app",
            Self::Operator => "an operator",
        }
    }
}

/// Every role has the same keys in the file; which ones a kind may use is checked in
/// validation, so the message can say why a key does not belong.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    kind: RoleKindFile,
    scopes: Option<Vec<String>>,
    operations: Option<Vec<OperatorOperation>>,
    token_lifetime_s: Option<u64>,
    grant_lifetime_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    app_roles: Vec<String>,
    device_groups: Vec<String>,
    scopes: Vec<String>,
}

/// The problems found so far.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, at: &str, what: impl Into<String>) {
        self.0.push(Problem {
            at: at.to_owned(),
            what: what.into(),
        });
    }

    /// Checks a token lifetime's range; returns whether it is in range.
    fn token_lifetime(&mut self, at: &str, key: &str, value: u64) -> bool {
        self.range(at, key, value, 1, MAX_TOKEN_LIFETIME_S)
    }

    fn grant_lifetime(&mut self, at: &str, key: &str, value: u64) -> bool {
        self.range(at, key, value, 1, MAX_GRANT_LIFETIME_S)
    }

    fn range(&mut self, at: &str, key: &str, value: u64, min: u64, max: u64) -> bool {
        let ok = (min..=max).contains(&value);
        if !ok {
            self.push(
                at,
                format!("{key} = {value} is out of range ({min}..={max})"),
            );
        }
        ok
    }

    /// A refresh grant must outlive the token it refreshes, or refreshing cannot work.
    fn grant_outlives(&mut self, at: &str, grant: u64, token_key: &str, token: u64) {
        if grant < token {
            self.push(
                at,
                format!(
                    "grant_lifetime_s ({grant}) is shorter than {token_key} ({token}): \
                     a refresh grant must outlive the token it refreshes"
                ),
            );
        }
    }

    /// Checks a list of scope tokens as granted by a role or a rule.
    fn scopes(&mut self, at: &str, scopes: &[String]) {
        for scope in scopes {
            if validate_token(scope).is_err() {
                self.push(
                    at,
                    format!(
                        "scope {scope:?} is not a valid scope token (1 to 64 printable ASCII \
                         characters other than space, '\"' and '\\')"
                    ),
                );
            } else if scope.contains('*') && !is_resource_wildcard(scope) {
                self.push(
                    at,
                    format!(
                        "scope {scope:?}: '*' is a wildcard only as the whole action of \
                         \"resource:*\" (like \"door:*\"); anywhere else it would match \
                         nothing but itself"
                    ),
                );
            }
        }
        self.duplicates(at, "scope", scopes);
    }

    fn duplicates(&mut self, at: &str, what: &str, list: &[String]) {
        for (i, item) in list.iter().enumerate() {
            if list[..i].contains(item) {
                self.push(at, format!("{what} {item:?} is listed twice"));
            }
        }
    }
}

/// `resource:*` with a non-empty resource free of `*`: the one wildcard `covers` knows.
fn is_resource_wildcard(scope: &str) -> bool {
    scope
        .strip_suffix(":*")
        .is_some_and(|resource| !resource.is_empty() && !resource.contains('*'))
}

/// How a role's section is written in the file.
fn role_section(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if bare {
        format!("[roles.{name}]")
    } else {
        format!("[roles.{name:?}]")
    }
}

const ID_RULE: &str = "1 to 64 of A-Z a-z 0-9 . _ -";

impl PolicyFile {
    fn validate(self) -> Result<Policy, Vec<Problem>> {
        let mut p = Problems::default();
        let d = &self.defaults;

        let at = "[defaults]";
        p.range(at, "leeway_s", d.leeway_s, 0, MAX_LEEWAY_S);
        let device_ok = p.token_lifetime(at, "device_token_lifetime_s", d.device_token_lifetime_s);
        let access_ok = p.token_lifetime(at, "access_token_lifetime_s", d.access_token_lifetime_s);
        if p.grant_lifetime(at, "grant_lifetime_s", d.grant_lifetime_s) {
            if device_ok {
                let token = d.device_token_lifetime_s;
                p.grant_outlives(at, d.grant_lifetime_s, "device_token_lifetime_s", token);
            }
            if access_ok {
                let token = d.access_token_lifetime_s;
                p.grant_outlives(at, d.grant_lifetime_s, "access_token_lifetime_s", token);
            }
        }
        let aud = &d.device_audience;
        // It names the service's revocation stream (`service/{aud}`, one topic level).
        if validate_id(aud).is_err() {
            p.push(
                at,
                format!("device_audience {aud:?} is not a valid audience ({ID_RULE})"),
            );
        }

        for name in self.groups.keys() {
            if name == "*" {
                p.push(
                    "[groups]",
                    "\"*\" cannot be a group name: rules list their groups explicitly",
                );
            } else if validate_id(name).is_err() {
                p.push(
                    "[groups]",
                    format!("{name:?} is not a valid group name ({ID_RULE})"),
                );
            }
        }

        let roles = self
            .roles
            .iter()
            .map(|(name, raw)| (name.clone(), raw.validate(name, d, &mut p)))
            .collect();

        let rules = self
            .access
            .iter()
            .enumerate()
            .map(|(i, raw)| raw.validate(i + 1, &self.roles, &self.groups, &mut p))
            .collect();

        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Policy {
            leeway_s: d.leeway_s,
            device_audience: d.device_audience.clone(),
            groups: self.groups,
            roles,
            rules,
        })
    }
}

impl RoleFile {
    fn validate(&self, name: &str, d: &DefaultsFile, p: &mut Problems) -> Role {
        let at = &role_section(name);
        if validate_id(name).is_err() {
            p.push(at, format!("{name:?} is not a valid role name ({ID_RULE})"));
        }
        let kind = self.kind.name();
        let not_for = |p: &mut Problems, key: &str, why: &str| {
            p.push(at, format!("{key} is not for {kind} roles: {why}"));
        };
        if self.kind != RoleKindFile::Device && self.scopes.is_some() {
            not_for(
                p,
                "scopes",
                "only device roles have a fixed scope (app roles get theirs from [[access]] \
                 rules)",
            );
        }
        if self.kind != RoleKindFile::Operator && self.operations.is_some() {
            not_for(p, "operations", "only operator roles list operations");
        }
        if self.kind == RoleKindFile::Operator {
            let why = "operators obtain no tokens";
            if self.token_lifetime_s.is_some() {
                not_for(p, "token_lifetime_s", why);
            }
            if self.grant_lifetime_s.is_some() {
                not_for(p, "grant_lifetime_s", why);
            }
        }

        let rights = match self.kind {
            RoleKindFile::Device => {
                let scopes = self.scopes.as_deref().unwrap_or_default();
                if scopes.is_empty() {
                    p.push(
                        at,
                        "a device role needs at least one scope in `scopes` (the scope of \
                         its device token)",
                    );
                }
                if scopes.len() > MAX_SCOPES {
                    p.push(
                        at,
                        format!(
                            "{} scopes is too many for one token (at most {MAX_SCOPES})",
                            scopes.len()
                        ),
                    );
                }
                p.scopes(at, scopes);
                let (token_lifetime_s, grant_lifetime_s) =
                    self.lifetimes(at, d.device_token_lifetime_s, d, p);
                Rights::Device {
                    scope: scopes.join(" "),
                    token_lifetime_s,
                    grant_lifetime_s,
                }
            }
            RoleKindFile::App => {
                let (token_lifetime_s, grant_lifetime_s) =
                    self.lifetimes(at, d.access_token_lifetime_s, d, p);
                Rights::App {
                    token_lifetime_s,
                    grant_lifetime_s,
                }
            }
            RoleKindFile::Operator => {
                let mut operations = self.operations.clone().unwrap_or_default();
                let names: Vec<String> = operations.iter().map(|o| o.name().to_owned()).collect();
                p.duplicates(at, "operation", &names);
                operations.sort_unstable();
                operations.dedup();
                Rights::Operator { operations }
            }
        };
        Role {
            name: name.to_owned(),
            rights,
        }
    }

    /// The role's token and grant lifetimes: its overrides, else the defaults. Checks the
    /// pair only when the role overrides one, so a bad default is reported once.
    fn lifetimes(
        &self,
        at: &str,
        default_token: u64,
        d: &DefaultsFile,
        p: &mut Problems,
    ) -> (u64, u64) {
        let token = self.token_lifetime_s.unwrap_or(default_token);
        let grant = self.grant_lifetime_s.unwrap_or(d.grant_lifetime_s);
        let token_ok = match self.token_lifetime_s {
            Some(t) => p.token_lifetime(at, "token_lifetime_s", t),
            None => true,
        };
        let grant_ok = match self.grant_lifetime_s {
            Some(g) => p.grant_lifetime(at, "grant_lifetime_s", g),
            None => true,
        };
        let overrides = self.token_lifetime_s.is_some() || self.grant_lifetime_s.is_some();
        if overrides && token_ok && grant_ok {
            p.grant_outlives(at, grant, "the token lifetime", token);
        }
        (token, grant)
    }
}

impl AccessFile {
    fn validate(
        &self,
        number: usize,
        roles: &BTreeMap<String, RoleFile>,
        groups: &BTreeMap<String, String>,
        p: &mut Problems,
    ) -> AccessRule {
        let at = &format!("[[access]] #{number}");
        if self.app_roles.is_empty() {
            p.push(at, "app_roles is empty: the rule would apply to no one");
        }
        for role in &self.app_roles {
            match roles.get(role) {
                _ if role == "*" => p.push(
                    at,
                    "\"*\" is not an app role: list the app roles this rule applies to",
                ),
                None => p.push(at, format!("app role {role:?} is not defined")),
                Some(r) if r.kind != RoleKindFile::App => p.push(
                    at,
                    format!(
                        "role {role:?} is {} role, not an app role (only apps obtain \
                         access tokens)",
                        r.kind.with_article()
                    ),
                ),
                Some(_) => {}
            }
        }
        p.duplicates(at, "app role", &self.app_roles);

        if self.device_groups.is_empty() {
            p.push(
                at,
                "device_groups is empty: the rule would apply to no device",
            );
        }
        for group in &self.device_groups {
            if group == "*" {
                p.push(
                    at,
                    "\"*\" is not a device group: list the groups this rule applies to, so a \
                     new group grants nothing until a rule names it",
                );
            } else if !groups.contains_key(group) {
                p.push(
                    at,
                    format!("device group {group:?} is not declared in [groups]"),
                );
            }
        }
        p.duplicates(at, "device group", &self.device_groups);

        if self.scopes.is_empty() {
            p.push(at, "scopes is empty: the rule would grant nothing");
        }
        p.scopes(at, &self.scopes);

        AccessRule {
            number,
            app_roles: self.app_roles.clone(),
            device_groups: self.device_groups.clone(),
            scopes: self.scopes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{FLEET, policy};
    use crate::store::ClientKind;

    /// The full error message of an invalid policy.
    fn error(text: &str) -> String {
        match Policy::from_toml(text, "policy.toml") {
            Ok(_) => panic!("policy should be invalid:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_error(text: &str, expected: &str) {
        let message = error(text);
        assert!(
            message.contains(expected),
            "expected {expected:?} in:\n{message}"
        );
    }

    const ROLES: &str = r#"
[groups]
building-a = "A"

[roles.sensor]
kind = "device"
scopes = ["telemetry:write"]

[roles.controller]
kind = "app"
"#;

    #[test]
    fn the_default_policy_parses_and_validates() {
        let p = Policy::default_policy();
        assert_eq!(p.leeway_s(), DEFAULT_LEEWAY_S);
        assert_eq!(p.device_audience(), DEFAULT_DEVICE_AUDIENCE);
        assert!(p.role("sensor").is_some());
        assert!(!p.rules().is_empty());
    }

    #[test]
    fn the_default_policy_documents_every_key() {
        for key in [
            "[defaults]",
            "leeway_s",
            "device_token_lifetime_s",
            "access_token_lifetime_s",
            "grant_lifetime_s",
            "device_audience",
            "[groups]",
            "kind",
            "scopes",
            "token_lifetime_s",
            "operations",
            "[[access]]",
            "app_roles",
            "device_groups",
        ] {
            assert!(
                Policy::DEFAULT_TOML.contains(key),
                "{key} is not documented"
            );
        }
    }

    #[test]
    fn an_empty_file_takes_the_documented_defaults() {
        let p = policy("");
        assert_eq!(p.leeway_s(), 30);
        assert_eq!(p.device_audience(), "tessera");
        assert_eq!(p.roles().count(), 0);
        let d = Policy::default_policy();
        assert_eq!(d.leeway_s(), p.leeway_s());
    }

    #[test]
    fn role_lifetimes_fall_back_to_the_defaults() {
        let p = policy(FLEET);
        let Some(Rights::Device {
            token_lifetime_s,
            grant_lifetime_s,
            ..
        }) = p.role("sensor").map(Role::rights)
        else {
            panic!("sensor is a device role")
        };
        assert_eq!((*token_lifetime_s, *grant_lifetime_s), (900, 86_400));
        assert_eq!(p.role("controller").map(Role::kind), Some(ClientKind::App));
        assert_eq!(p.longest_token_lifetime_s(), 900);
    }

    #[test]
    fn an_unknown_key_is_an_error_with_its_line_and_column() {
        let message = error("[defaults]\nleeway_s = 30\nleway = 5\n");
        assert!(message.starts_with("policy.toml: "), "{message}");
        assert!(message.contains("line 3, column 1"), "{message}");
        assert!(message.contains("unknown field `leway`"), "{message}");

        let message = error(&format!("{ROLES}colour = \"red\"\n"));
        assert!(message.contains("unknown field `colour`"), "{message}");
    }

    #[test]
    fn a_toml_syntax_error_names_the_line() {
        let message = error("[roles.sensor\nkind = \"device\"\n");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn an_unknown_role_kind_or_operation_is_a_syntax_error() {
        assert_error("[roles.x]\nkind = \"robot\"\n", "unknown variant `robot`");
        assert_error(
            "[roles.x]\nkind = \"operator\"\noperations = [\"reboot\"]\n",
            "unknown variant `reboot`",
        );
    }

    #[test]
    fn an_access_rule_naming_an_undefined_role_is_refused() {
        let text = format!(
            "{ROLES}
[[access]]
app_roles = [\"controller\"]
device_groups = [\"building-a\"]
scopes = [\"door:open\"]

[[access]]
app_roles = [\"ctrl\"]
device_groups = [\"building-a\"]
scopes = [\"door:open\"]
"
        );
        assert_eq!(
            error(&text),
            "policy.toml: [[access]] #2: app role \"ctrl\" is not defined"
        );
    }

    #[test]
    fn an_access_rule_naming_a_device_role_is_refused() {
        let text = format!(
            "{ROLES}
[[access]]
app_roles = [\"sensor\"]
device_groups = [\"building-a\"]
scopes = [\"door:open\"]
"
        );
        assert_error(
            &text,
            "policy.toml: [[access]] #1: role \"sensor\" is a device role, not an app role",
        );
    }

    #[test]
    fn an_access_rule_naming_an_operator_role_says_an_operator_role() {
        let text = format!(
            "{ROLES}
[roles.ops]
kind = \"operator\"
operations = [\"revoke\"]

[[access]]
app_roles = [\"ops\"]
device_groups = [\"building-a\"]
scopes = [\"door:open\"]
"
        );
        assert_error(
            &text,
            "policy.toml: [[access]] #1: role \"ops\" is an operator role, not an app role",
        );
    }

    #[test]
    fn an_access_rule_naming_an_undeclared_group_is_refused() {
        let text = format!(
            "{ROLES}
[[access]]
app_roles = [\"controller\"]
device_groups = [\"building-b\"]
scopes = [\"door:open\"]
"
        );
        assert_eq!(
            error(&text),
            "policy.toml: [[access]] #1: device group \"building-b\" is not declared in [groups]"
        );
    }

    #[test]
    fn a_star_is_not_a_group_or_a_role() {
        let text = format!(
            "{ROLES}
[[access]]
app_roles = [\"*\"]
device_groups = [\"*\"]
scopes = [\"door:open\"]
"
        );
        let message = error(&text);
        assert!(message.contains("\"*\" is not an app role"), "{message}");
        assert!(message.contains("\"*\" is not a device group"), "{message}");
    }

    #[test]
    fn scopes_with_characters_outside_the_scope_grammar_are_refused() {
        assert_error(
            "[roles.sensor]\nkind = \"device\"\nscopes = [\"telemetry write\"]\n",
            "policy.toml: [roles.sensor]: scope \"telemetry write\" is not a valid scope token",
        );
        let text = format!(
            "{ROLES}
[[access]]
app_roles = [\"controller\"]
device_groups = [\"building-a\"]
scopes = [\"door:open\", \"door\\\"x\", \"\"]
"
        );
        let message = error(&text);
        assert!(
            message.contains("[[access]] #1: scope \"door\\\"x\" is not a valid scope token"),
            "{message}"
        );
        assert!(
            message.contains("[[access]] #1: scope \"\" is not a valid scope token"),
            "{message}"
        );
    }

    #[test]
    fn a_star_is_a_wildcard_only_as_a_whole_action() {
        for bad in ["*", "door*", "*:open", ":*", "do*r:*"] {
            let text = format!("[roles.s]\nkind = \"device\"\nscopes = [\"{bad}\"]\n");
            assert_error(&text, "is a wildcard only as the whole action");
        }
        policy("[roles.s]\nkind = \"device\"\nscopes = [\"door:*\"]\n");
    }

    #[test]
    fn a_device_role_without_scopes_is_refused() {
        assert_error(
            "[roles.sensor]\nkind = \"device\"\n",
            "policy.toml: [roles.sensor]: a device role needs at least one scope",
        );
        assert_error(
            "[roles.sensor]\nkind = \"device\"\nscopes = []\n",
            "a device role needs at least one scope",
        );
    }

    #[test]
    fn a_device_role_with_more_scopes_than_a_token_holds_is_refused() {
        let scopes: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("\"r{i}:x\"")).collect();
        let text = format!(
            "[roles.s]\nkind = \"device\"\nscopes = [{}]\n",
            scopes.join(", ")
        );
        assert_error(&text, "17 scopes is too many for one token (at most 16)");
    }

    #[test]
    fn keys_of_another_role_kind_are_refused() {
        assert_error(
            "[roles.controller]\nkind = \"app\"\nscopes = [\"door:open\"]\n",
            "policy.toml: [roles.controller]: scopes is not for app roles",
        );
        assert_error(
            "[roles.controller]\nkind = \"app\"\noperations = [\"revoke\"]\n",
            "[roles.controller]: operations is not for app roles",
        );
        assert_error(
            "[roles.s]\nkind = \"device\"\nscopes = [\"a:b\"]\noperations = [\"revoke\"]\n",
            "[roles.s]: operations is not for device roles",
        );
        assert_error(
            "[roles.ops]\nkind = \"operator\"\nscopes = [\"a:b\"]\n",
            "[roles.ops]: scopes is not for operator roles",
        );
        assert_error(
            "[roles.ops]\nkind = \"operator\"\ntoken_lifetime_s = 60\n",
            "[roles.ops]: token_lifetime_s is not for operator roles: operators obtain no tokens",
        );
    }

    #[test]
    fn lifetimes_out_of_range_are_refused() {
        assert_error(
            "[defaults]\nleeway_s = 301\n",
            "policy.toml: [defaults]: leeway_s = 301 is out of range (0..=300)",
        );
        assert_error(
            "[defaults]\ndevice_token_lifetime_s = 0\n",
            "[defaults]: device_token_lifetime_s = 0 is out of range (1..=86400)",
        );
        assert_error(
            "[defaults]\naccess_token_lifetime_s = 86401\n",
            "[defaults]: access_token_lifetime_s = 86401 is out of range (1..=86400)",
        );
        assert_error(
            "[roles.s]\nkind = \"device\"\nscopes = [\"a:b\"]\ntoken_lifetime_s = 0\n",
            "[roles.s]: token_lifetime_s = 0 is out of range (1..=86400)",
        );
        assert_error(
            "[roles.c]\nkind = \"app\"\ngrant_lifetime_s = 0\n",
            "[roles.c]: grant_lifetime_s = 0 is out of range (1..=31536000)",
        );
        assert_error("[defaults]\nleeway_s = -1\n", "line 2");
    }

    #[test]
    fn a_grant_shorter_than_its_token_is_refused() {
        assert_error(
            "[defaults]\ngrant_lifetime_s = 600\n",
            "[defaults]: grant_lifetime_s (600) is shorter than device_token_lifetime_s (900)",
        );
        assert_error(
            "[roles.c]\nkind = \"app\"\ntoken_lifetime_s = 600\ngrant_lifetime_s = 300\n",
            "[roles.c]: grant_lifetime_s (300) is shorter than the token lifetime (600)",
        );
    }

    #[test]
    fn names_must_be_protocol_ids() {
        assert_error(
            "[groups]\n\"hall a\" = \"x\"\n",
            "policy.toml: [groups]: \"hall a\" is not a valid group name",
        );
        assert_error(
            "[roles.\"door/opener\"]\nkind = \"app\"\n",
            "[roles.\"door/opener\"]: \"door/opener\" is not a valid role name",
        );
    }

    #[test]
    fn a_bad_device_audience_is_refused() {
        assert_error(
            "[defaults]\ndevice_audience = \"\"\n",
            "[defaults]: device_audience \"\" is not a valid audience",
        );
        assert_error(
            "[defaults]\ndevice_audience = \"svc/telemetry\"\n",
            "[defaults]: device_audience \"svc/telemetry\" is not a valid audience",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_one_per_line() {
        let message = error(
            "[defaults]\nleeway_s = 999\n[roles.s]\nkind = \"device\"\n[roles.c]\nkind = \"app\"\nscopes = [\"a:b\"]\n",
        );
        assert_eq!(message.lines().count(), 3, "{message}");
        assert!(message.lines().all(|l| l.starts_with("policy.toml: ")));
    }

    #[test]
    fn an_unreadable_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.toml");
        let message = Policy::load(&path).expect_err("missing").to_string();
        assert!(message.contains("missing.toml: cannot read"), "{message}");
    }
}
