//! Why an access decision came out as it did, rule by rule, for
//! `tessera-hub policy explain`.

use std::fmt;

use tessera_shared::scope::Scopes;

use super::decision::{a_kind, groups_phrase};
use super::{AccessGrant, Denial, Policy, Rights};
use crate::store::{ClientKind, ClientRecord};

/// A decision spelled out: what the policy knows about the app and the device, each
/// `[[access]]` rule and whether it applied, and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// What was considered, one statement a line, in order.
    pub lines: Vec<String>,
    /// The decision: exactly what [`Policy::access_token`] returns for the same question.
    pub verdict: Result<AccessGrant, Denial>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        match &self.verdict {
            Ok(grant) => write!(
                f,
                "verdict: allowed: scope \"{}\", access token for {} s, refresh grant for {} s",
                grant.scope, grant.lifetime_s, grant.grant_lifetime_s
            ),
            Err(denial) => write!(f, "verdict: denied ({}): {}", denial.code, denial.reason),
        }
    }
}

impl Policy {
    /// Explains [`Policy::access_token`] for the same arguments.
    pub fn explain_access(
        &self,
        app: &ClientRecord,
        device: &ClientRecord,
        requested: &Scopes<'_>,
    ) -> Explanation {
        let mut lines = Vec::new();
        lines.push(self.describe_client(app));
        lines.push(self.describe_client(device));
        lines.push(format!("requested: {}", requested.as_str()));

        for rule in &self.rules {
            let head = format!(
                "[[access]] #{} (app_roles {}; device_groups {}; scopes {})",
                rule.number(),
                rule.app_roles().join(", "),
                rule.device_groups().join(", "),
                rule.scopes().join(" ")
            );
            if !rule.names_role(&app.role) {
                lines.push(format!(
                    "{head}: does not apply: role {:?} is not listed",
                    app.role
                ));
                continue;
            }
            let Some(group) = rule.matching_group(&device.groups) else {
                lines.push(format!(
                    "{head}: does not apply: device {:?} is in none of its groups",
                    device.id
                ));
                continue;
            };
            let mut covered = Vec::new();
            let mut uncovered = Vec::new();
            for required in requested.iter() {
                match rule.covering(required) {
                    Some(granted) if granted == required => covered.push(required.to_owned()),
                    Some(granted) => covered.push(format!("{required} (by {granted})")),
                    None => uncovered.push(required),
                }
            }
            let mut line = format!("{head}: applies (role {:?}, group {group:?})", app.role);
            if !covered.is_empty() {
                line.push_str(&format!("; covers {}", covered.join(", ")));
            }
            if !uncovered.is_empty() {
                line.push_str(&format!("; does not cover {}", uncovered.join(", ")));
            }
            lines.push(line);
        }
        if self.rules.is_empty() {
            lines.push("the policy has no [[access]] rules".to_owned());
        }

        let verdict = self.access_token(app, device, requested);
        Explanation { lines, verdict }
    }

    /// One line about a client: kind, role, and for devices its groups.
    fn describe_client(&self, client: &ClientRecord) -> String {
        let mut line = format!(
            "{:?} is {}{}",
            client.id,
            a_kind(client.kind),
            if client.revoked_at.is_some() {
                " (revoked)"
            } else {
                ""
            }
        );
        match self.role(&client.role) {
            None => line.push_str(&format!(
                ", role {:?} (not defined in the policy)",
                client.role
            )),
            Some(role) if role.kind() != client.kind => line.push_str(&format!(
                ", role {:?} ({} role: does not fit the client's kind)",
                role.name(),
                role.kind().as_str()
            )),
            Some(role) => {
                line.push_str(&format!(", role {:?}", role.name()));
                if let Rights::App {
                    token_lifetime_s,
                    grant_lifetime_s,
                } = role.rights()
                {
                    line.push_str(&format!(
                        " (access tokens for {token_lifetime_s} s, grants for {grant_lifetime_s} s)"
                    ));
                }
            }
        }
        if client.kind == ClientKind::Device {
            line.push_str(&format!(", {}", groups_phrase(&client.groups)));
            let undeclared: Vec<&str> = client
                .groups
                .iter()
                .filter(|g| self.group(g).is_none())
                .map(String::as_str)
                .collect();
            if !undeclared.is_empty() {
                line.push_str(&format!(
                    " (not declared in the policy, so no rule can name them: {})",
                    undeclared.join(", ")
                ));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DenialCode;
    use crate::policy::testing::{FLEET, client, policy};

    fn scopes(s: &str) -> Scopes<'_> {
        Scopes::parse(s).expect("valid scopes")
    }

    #[test]
    fn explain_names_the_matching_rule_and_the_missing_scope() {
        let p = policy(FLEET);
        let app = client("ctl-1", ClientKind::App, "controller", &[]);
        let device = client("door-a1", ClientKind::Device, "lock", &["building-a"]);
        let e = p.explain_access(&app, &device, &scopes("door:open light:on door:unlock"));
        let text = e.to_string();

        assert!(
            text.contains("\"ctl-1\" is an app, role \"controller\""),
            "{text}"
        );
        assert!(
            text.contains("\"door-a1\" is a device, role \"lock\", groups building-a"),
            "{text}"
        );
        assert!(
            text.contains(
                "[[access]] #1 (app_roles controller; device_groups building-a; scopes \
                 door:open light:* telemetry:read): applies (role \"controller\", group \
                 \"building-a\"); covers door:open, light:on (by light:*); does not cover \
                 door:unlock"
            ),
            "{text}"
        );
        assert!(
            text.contains("[[access]] #2 (app_roles dashboard, controller;"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "verdict: denied (not_allowed): scope \"door:unlock\" is not allowed: no \
                 [[access]] rule grants it to app role \"controller\" on device \"door-a1\" \
                 (groups building-a)"
            ),
            "{text}"
        );
        assert_eq!(e.verdict.expect_err("denied").code, DenialCode::NotAllowed);
    }

    #[test]
    fn explain_says_why_a_rule_does_not_apply() {
        let p = policy(FLEET);
        let dashboard = client("dash", ClientKind::App, "dashboard", &[]);
        let device = client("door-x", ClientKind::Device, "lock", &["lobby"]);
        let text = p
            .explain_access(&dashboard, &device, &scopes("telemetry:read"))
            .to_string();
        assert!(
            text.contains("#1 (app_roles controller; device_groups building-a; scopes door:open light:* telemetry:read): does not apply: role \"dashboard\" is not listed"),
            "{text}"
        );
        assert!(
            text.contains("does not apply: device \"door-x\" is in none of its groups"),
            "{text}"
        );
        assert!(
            text.contains("not declared in the policy, so no rule can name them: lobby"),
            "{text}"
        );
        assert!(text.contains("verdict: denied (not_allowed)"), "{text}");
    }

    #[test]
    fn explain_of_an_allowed_request_ends_with_the_grant() {
        let p = policy(FLEET);
        let app = client("ctl-1", ClientKind::App, "controller", &[]);
        let device = client("door-a1", ClientKind::Device, "lock", &["building-a"]);
        let e = p.explain_access(&app, &device, &scopes("telemetry:read"));
        assert_eq!(
            e.verdict,
            p.access_token(&app, &device, &scopes("telemetry:read"))
        );
        assert!(
            e.to_string().ends_with(
                "verdict: allowed: scope \"telemetry:read\", access token for 120 s, \
                 refresh grant for 86400 s"
            ),
            "{e}"
        );
    }

    #[test]
    fn explain_shows_a_role_that_does_not_fit_the_client() {
        let p = policy(FLEET);
        let device_as_app = client("sensor-1", ClientKind::Device, "sensor", &["building-a"]);
        let device = client("door-a1", ClientKind::Device, "lock", &["building-a"]);
        let e = p.explain_access(&device_as_app, &device, &scopes("door:open"));
        assert_eq!(
            e.verdict.clone().expect_err("denied").code,
            DenialCode::WrongKind
        );
        let ghost = client("g", ClientKind::App, "ghost", &[]);
        let text = p
            .explain_access(&ghost, &device, &scopes("door:open"))
            .to_string();
        assert!(
            text.contains("role \"ghost\" (not defined in the policy)"),
            "{text}"
        );
        assert!(text.contains("verdict: denied (unknown_role)"), "{text}");
    }
}
