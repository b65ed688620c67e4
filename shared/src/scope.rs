//! Scopes (RFC 9200 §5.8.1: a space-separated list of scope tokens) and how they match.
//!
//! A scope token is `resource:action` by convention (`door:open`, `telemetry:read`), made of
//! the RFC 6749 scope characters. A granted token ending in `:*` covers every action on its
//! resource (`door:*` covers `door:open`); no other wildcard exists, so a grant never
//! covers more than its resource.

use crate::error::{CapacityError, DecodeError, Error};

/// Most scope tokens in one scope claim.
pub const MAX_SCOPES: usize = 16;

/// Longest single scope token, in bytes.
pub const MAX_SCOPE_TOKEN_LEN: usize = 64;

/// Longest scope claim (all tokens and separators), in bytes.
pub const MAX_SCOPE_LEN: usize = MAX_SCOPES * (MAX_SCOPE_TOKEN_LEN + 1);

/// A validated scope claim: 1 to [`MAX_SCOPES`] tokens separated by single spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes<'a>(&'a str);

impl<'a> Scopes<'a> {
    /// Validates a scope string: no empty tokens (so no leading, trailing or doubled
    /// spaces), only RFC 6749 scope characters, bounded counts and lengths.
    pub fn parse(s: &'a str) -> Result<Self, Error> {
        if s.len() > MAX_SCOPE_LEN {
            return Err(DecodeError::TooLarge.into());
        }
        let mut count = 0;
        for token in s.split(' ') {
            validate_token(token)?;
            count += 1;
            if count > MAX_SCOPES {
                return Err(CapacityError::Scopes.into());
            }
        }
        Ok(Self(s))
    }

    /// The scope string as it appears in the token.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// The individual scope tokens.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.0.split(' ')
    }

    /// Whether any granted token covers `required`.
    pub fn grants(&self, required: &str) -> bool {
        self.iter().any(|granted| covers(granted, required))
    }

    /// Whether every token of `other` is covered by this scope (no escalation).
    pub fn grants_all(&self, other: &Scopes<'_>) -> bool {
        other.iter().all(|required| self.grants(required))
    }
}

/// Checks one scope token: 1..=[`MAX_SCOPE_TOKEN_LEN`] bytes of `%x21 / %x23-5B / %x5D-7E`.
pub fn validate_token(token: &str) -> Result<(), Error> {
    let ok_char = |b: u8| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e);
    if token.is_empty() || token.len() > MAX_SCOPE_TOKEN_LEN || !token.bytes().all(ok_char) {
        return Err(DecodeError::InvalidValue("scope").into());
    }
    Ok(())
}

/// Whether the granted scope token covers the required one: equal, or `resource:*`
/// against any `resource:action`.
pub fn covers(granted: &str, required: &str) -> bool {
    if granted == required {
        return true;
    }
    match granted.strip_suffix('*') {
        Some(prefix) if prefix.ends_with(':') => {
            required.len() > prefix.len() && required.starts_with(prefix)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_resource_wildcard_grants() {
        let s = Scopes::parse("door:* telemetry:read").expect("valid");
        assert!(s.grants("door:open"));
        assert!(s.grants("telemetry:read"));
        assert!(!s.grants("telemetry:write"));
        assert!(!s.grants("door:"));
        assert!(!s.grants("doorbell:ring"));
    }

    #[test]
    fn a_bare_star_is_not_a_wildcard() {
        assert!(!covers("*", "door:open"));
        assert!(covers("*", "*"));
    }

    #[test]
    fn malformed_scope_strings_are_refused() {
        for bad in ["", " a", "a ", "a  b", "a\"b", "a\\b", "é"] {
            assert!(Scopes::parse(bad).is_err(), "{bad:?}");
        }
        let long = "a ".repeat(MAX_SCOPES) + "a";
        assert_eq!(
            Scopes::parse(&long),
            Err(Error::Capacity(CapacityError::Scopes))
        );
    }

    #[test]
    fn grants_all_detects_escalation() {
        let role = Scopes::parse("door:open telemetry:read").expect("valid");
        assert!(role.grants_all(&Scopes::parse("door:open").expect("valid")));
        assert!(!role.grants_all(&Scopes::parse("door:open door:unlock").expect("valid")));
    }
}
