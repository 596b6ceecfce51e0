//! Where a policy's callers may present DPoP proofs: `dpop_targets`, URL prefixes of APIs.

use std::net::IpAddr;

use url::Url;

/// Longest URL accepted for a proof.
pub const MAX_URL: usize = 2048;

/// A URL prefix a policy allows proofs for (`dpop_targets`): a scheme, host and port, and a path prefix that
/// matches whole segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    url: Url,
}

impl Target {
    /// Parses a configured prefix: https (plain http for loopback hosts only), no user info, query or
    /// fragment.
    ///
    /// # Errors
    /// Why the prefix is not usable.
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = checked(s)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{s:?}: a target is a prefix: no ?query or #fragment"
            ));
        }
        Ok(Self { url })
    }

    /// The prefix, normalized.
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// Whether `url` (normalized) falls under this prefix: the same scheme, host and port, and a path that is
    /// the prefix's or continues it at a segment boundary.
    pub fn covers(&self, url: &Url) -> bool {
        if url.scheme() != self.url.scheme()
            || url.host() != self.url.host()
            || url.port_or_known_default() != self.url.port_or_known_default()
        {
            return false;
        }
        let (prefix, path) = (self.url.path(), url.path());
        path == prefix
            || (path.starts_with(prefix)
                && (prefix.ends_with('/') || path.as_bytes().get(prefix.len()) == Some(&b'/')))
    }
}

/// Parses the URL of a request a caller wants a proof for, under the same rules as a target: the `htu` of
/// the proof is this URL without its query and fragment.
///
/// # Errors
/// Why the URL is not usable.
pub fn request_url(s: &str) -> Result<Url, String> {
    if s.len() > MAX_URL {
        return Err(format!("the URL is longer than {MAX_URL} bytes"));
    }
    checked(s)
}

/// The `htu` claim for `url`: without query and fragment.
pub fn htu(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

fn checked(s: &str) -> Result<Url, String> {
    let shown = crate::text::clip_escaped(s);
    let url = Url::parse(s).map_err(|e| format!("\"{shown}\" is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("\"{shown}\": no user info in a DPoP target"));
    }
    // Encoded dots, slashes and backslashes could reach another path once the server decodes them.
    let lower = url.path().to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Err(format!(
            "\"{shown}\": the path holds an encoded '.', '/' or '\\'"
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(format!(
            "\"{shown}\": plain http is for loopback targets only; use https"
        )),
        other => Err(format!(
            "\"{shown}\": unsupported scheme {other:?}; use https"
        )),
    }
}

/// Whether `url`'s host is this machine: `localhost` or a loopback address.
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_their_scheme_host_port_and_whole_path_segments() {
        let t = Target::parse("https://API.example.com:443/v1").unwrap();
        assert_eq!(t.as_str(), "https://api.example.com/v1");
        let covers = |u: &str| t.covers(&request_url(u).unwrap());
        assert!(covers("https://api.example.com/v1"));
        assert!(covers("https://api.example.com/v1/users?x=1#f"));
        assert!(
            covers("https://api.example.com/v2/../v1/users"),
            "dot segments are resolved first"
        );
        assert!(!covers("https://api.example.com/v10"));
        assert!(!covers("https://api.example.com/"));
        assert!(!covers("https://api.example.com:8443/v1"));
        assert!(!covers("http://127.0.0.1/v1"));
        assert!(!covers("https://api.example.com.evil/v1"));
        let slash = Target::parse("https://api.example.com/v1/").unwrap();
        assert!(slash.covers(&request_url("https://api.example.com/v1/x").unwrap()));
        assert!(!slash.covers(&request_url("https://api.example.com/v1").unwrap()));
        for bad in [
            "http://api.example.com/",
            "https://user:pw@api.example.com/",
            "https://api.example.com/?q",
            "ftp://api.example.com/",
            "https://api.example.com/v1%2Fadmin",
            "not a url",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert!(Target::parse("http://127.0.0.1:8080/").is_ok());
        assert!(Target::parse("http://localhost/").is_ok());
        assert!(request_url("https://api.example.com/a%2Fb").is_err());
        // Encoded dot segments are dot segments to the URL parser too: resolved before the prefix check.
        assert!(!t.covers(&request_url("https://api.example.com/v1/%2e%2e/admin").unwrap()));
    }
}
