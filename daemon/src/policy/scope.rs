//! OAuth scopes: RFC 6749 §3.3 `scope-token` validation, the canonical (sorted, de-duplicated) scope set that
//! keys the cache, and the policy patterns that allow them.

use std::fmt;
use std::sync::Arc;

/// Most scopes one request may name.
pub const MAX_SCOPES: usize = 64;
/// Longest scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 256;

/// Whether `s` is an RFC 6749 `scope-token`: `1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// Why a requested scope list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    /// No scope at all.
    #[error("at least one scope is required")]
    Empty,
    /// More than [`MAX_SCOPES`] distinct scopes.
    #[error("too many scopes: {0} (at most {MAX_SCOPES})")]
    TooMany(usize),
    /// A scope longer than [`MAX_SCOPE_LEN`].
    #[error("scope is too long: {len} bytes (at most {MAX_SCOPE_LEN})")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A scope that is not a `scope-token` (spaces, quotes, backslashes, control or non-ASCII characters).
    #[error(
        "{0:?} is not a valid OAuth scope (RFC 6749 §3.3: printable ASCII without space, '\"' or '\\')"
    )]
    Invalid(String),
}

/// A validated, sorted, de-duplicated set of scopes. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeSet(Arc<[String]>);

impl Default for ScopeSet {
    /// The empty set: no request carries it (`parse` refuses an empty list); `credbroker explain` without
    /// scopes does.
    fn default() -> Self {
        Self(Arc::from(Vec::new()))
    }
}

impl ScopeSet {
    /// Validates and canonicalises a requested scope list: order and duplicates do not matter.
    ///
    /// # Errors
    /// [`ScopeError`] for an empty list, too many or too long scopes, or an invalid scope-token.
    pub fn parse<S: AsRef<str>>(scopes: &[S]) -> Result<Self, ScopeError> {
        let mut set = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let scope = scope.as_ref();
            if scope.len() > MAX_SCOPE_LEN {
                return Err(ScopeError::TooLong { len: scope.len() });
            }
            if !is_scope_token(scope) {
                // Show at most the first bytes of a hostile value.
                let shown: String = scope.chars().take(64).collect();
                return Err(ScopeError::Invalid(shown));
            }
            set.push(scope.to_owned());
        }
        set.sort_unstable();
        set.dedup();
        match set.len() {
            0 => Err(ScopeError::Empty),
            n if n > MAX_SCOPES => Err(ScopeError::TooMany(n)),
            _ => Ok(Self(set.into())),
        }
    }

    /// Parses the space-delimited `scope` of a token response; `None` when it holds no valid scope list.
    pub fn parse_delimited(scope: &str) -> Option<Self> {
        let parts: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
        if parts.len() > 4 * MAX_SCOPES {
            return None;
        }
        let mut set: Vec<String> = Vec::with_capacity(parts.len());
        for p in parts {
            if !is_scope_token(p) {
                return None;
            }
            set.push(p.to_owned());
        }
        set.sort_unstable();
        set.dedup();
        Some(Self(set.into()))
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// The scopes as an owned list, for the wire.
    pub fn to_vec(&self) -> Vec<String> {
        self.0.to_vec()
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty (only possible for a parsed response).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.binary_search_by(|s| s.as_str().cmp(scope)).is_ok()
    }

    /// The members of `self` that `other` lacks.
    pub fn difference<'a>(&'a self, other: &'a ScopeSet) -> impl Iterator<Item = &'a str> {
        self.iter().filter(|s| !other.contains(s))
    }

    /// The space-delimited form of RFC 6749 §3.3.
    pub fn joined(&self) -> String {
        self.0.join(" ")
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl ScopeSet {
    /// Whether both share one allocation (a clone of the other).
    pub fn same_allocation(&self, other: &ScopeSet) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Display for ScopeSet {
    /// For logs: the scopes space-separated, cut after [`crate::text::SHOWN`] characters with counts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::text::ClipList(&self.0).fmt(f)
    }
}

/// A scope a policy allows: exact, or a prefix written with a trailing `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopePattern {
    /// This scope only.
    Exact(String),
    /// Every scope starting with this prefix (`internal_user_mgt_*`; a lone `*` allows every scope).
    Prefix(String),
}

impl ScopePattern {
    /// Parses a policy scope: a scope-token, optionally ending in one `*` that makes it a prefix.
    pub fn parse(s: &str) -> Option<Self> {
        match s.strip_suffix('*') {
            Some(prefix)
                if !prefix.contains('*') && (prefix.is_empty() || is_scope_token(prefix)) =>
            {
                Some(Self::Prefix(prefix.to_owned()))
            }
            Some(_) => None,
            None if is_scope_token(s) && !s.contains('*') => Some(Self::Exact(s.to_owned())),
            None => None,
        }
    }

    /// Whether this pattern allows `scope`.
    pub fn allows(&self, scope: &str) -> bool {
        match self {
            Self::Exact(s) => s == scope,
            Self::Prefix(p) => scope.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for ScopePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(s) => f.write_str(s),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_tokens_follow_rfc6749() {
        for ok in [
            "openid",
            "scim:read",
            "internal_user_mgt_view",
            "api://app/.default",
            "a!#[]~",
        ] {
            assert!(is_scope_token(ok), "{ok}");
        }
        for bad in ["", "a b", "a\"b", "a\\b", "a\tb", "é", "a\u{7f}"] {
            assert!(!is_scope_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn sets_are_sorted_and_deduplicated() {
        let s = ScopeSet::parse(&["b", "a", "b"]).unwrap();
        assert_eq!(s.to_vec(), ["a", "b"]);
        assert_eq!(s, ScopeSet::parse(&["a", "b"]).unwrap());
        assert_eq!(s.joined(), "a b");
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(ScopeSet::parse::<&str>(&[]), Err(ScopeError::Empty));
        assert_eq!(
            ScopeSet::parse(&["a b"]),
            Err(ScopeError::Invalid("a b".into()))
        );
        let long = "x".repeat(MAX_SCOPE_LEN + 1);
        assert!(matches!(
            ScopeSet::parse(&[long]),
            Err(ScopeError::TooLong { .. })
        ));
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert_eq!(
            ScopeSet::parse(&many),
            Err(ScopeError::TooMany(MAX_SCOPES + 1))
        );
    }

    #[test]
    fn patterns_are_exact_or_prefix() {
        let p = ScopePattern::parse("internal_user_mgt_*").unwrap();
        assert!(p.allows("internal_user_mgt_view"));
        assert!(!p.allows("internal_group_mgt_view"));
        assert!(ScopePattern::parse("*").unwrap().allows("anything"));
        let e = ScopePattern::parse("scim:read").unwrap();
        assert!(e.allows("scim:read") && !e.allows("scim:readwrite"));
        assert_eq!(ScopePattern::parse("a*b"), None);
        assert_eq!(ScopePattern::parse("a**"), None);
        assert_eq!(ScopePattern::parse("a b"), None);
    }
}
