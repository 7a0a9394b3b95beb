//! Authz: whether a peer's identity is allowed, by the identity patterns of a listener's or
//! route's `authz` (and a cluster's `tls.identity`). The patterns are plain data in
//! [`crate::config::tls::IdentityPattern`], validated with the config; matching them against
//! a verified certificate's identities is here, on the data path.
//!
//! In: the patterns and the peer's identities (SPIFFE IDs from URI SANs, DNS names from DNS
//! SANs; see [`super::PeerIdentity`]). Out: yes or no; the proxy answers no with 403
//! (HTTP) or closes the connection (`tcp`).

use crate::config::tls::IdentityPattern;

impl IdentityPattern {
    /// Whether `identity` matches: a SPIFFE ID (anything with `://`) only URI identities,
    /// exactly or under a path ending in `/*`; a DNS name only DNS identities, exactly (any
    /// case) or every subdomain with `*.`.
    pub fn matches(&self, identity: &str) -> bool {
        let p = self.0.as_str();
        let uri_pattern = p.contains("://");
        if uri_pattern != identity.contains("://") {
            return false;
        }
        if uri_pattern {
            match p.strip_suffix('*') {
                // Validated to end in "/*": the prefix keeps its '/' boundary.
                Some(prefix) => identity.starts_with(prefix),
                None => p == identity,
            }
        } else {
            let identity = identity.to_ascii_lowercase();
            match p.strip_prefix("*.") {
                Some(suffix) => identity
                    .strip_suffix(&suffix.to_ascii_lowercase())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => p.eq_ignore_ascii_case(&identity),
            }
        }
    }
}

/// Whether any of `identities` is allowed by `patterns`.
pub fn allowed(patterns: &[IdentityPattern], identities: &[String]) -> bool {
    identities
        .iter()
        .any(|i| patterns.iter().any(|p| p.matches(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns() {
        let p = |s: &str| IdentityPattern(s.to_string());
        assert!(p("spiffe://td/ns/shop/*").matches("spiffe://td/ns/shop/sa/web"));
        assert!(!p("spiffe://td/ns/shop/*").matches("spiffe://td/ns/shopping/sa/web"));
        assert!(p("spiffe://td/ns/shop/sa/web").matches("spiffe://td/ns/shop/sa/web"));
        assert!(!p("spiffe://td/ns/shop/sa/web").matches("spiffe://td/ns/shop/sa/web2"));
        // URI patterns never match DNS names and the other way round.
        assert!(!p("spiffe://td/ns/shop/*").matches("shop.example.org"));
        assert!(!p("api.example.org").matches("spiffe://api.example.org"));
        assert!(p("api.example.org").matches("API.example.org"));
        assert!(p("*.example.org").matches("a.b.example.org"));
        assert!(!p("*.example.org").matches("example.org"));
        assert!(!p("*.example.org").matches("evilexample.org"));
    }

    #[test]
    fn any_identity_in_any_pattern() {
        let patterns = [
            IdentityPattern("spiffe://td/ns/shop/*".into()),
            IdentityPattern("*.example.org".into()),
        ];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(allowed(&patterns, &ids(&["x.example.org"])));
        assert!(allowed(
            &patterns,
            &ids(&["spiffe://td/ns/other/sa/a", "spiffe://td/ns/shop/sa/a"])
        ));
        assert!(!allowed(&patterns, &ids(&["spiffe://td/ns/other/sa/a"])));
        assert!(!allowed(&patterns, &[]), "no identity, not allowed");
        assert!(!allowed(&[], &ids(&["x.example.org"])));
    }
}
