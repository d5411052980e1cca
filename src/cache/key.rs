//! Tenants and request digests: what goes into a cache key. Never the API key itself.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::normalize;

/// Who a cached answer belongs to: a salted hash, so neither an API key nor a tenant id
/// appears in a Redis key, a log or a `Debug` output. Answers are served only to the tenant
/// that stored them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tenant({})", self.0)
    }
}

impl Tenant {
    /// The tenant of a caller identified by its API key: SHA-256 over a domain tag, the
    /// namespace (length-prefixed, so it salts the hash per deployment) and the key; the
    /// first 128 bits, hex.
    pub fn from_api_key(namespace: &str, api_key: &str) -> Tenant {
        Tenant(salted(namespace, b'k', api_key))
    }

    /// The tenant of a configured or caller-given tenant id (hashed the same way, in a
    /// separate domain from API keys).
    pub fn from_id(namespace: &str, id: &str) -> Tenant {
        Tenant(salted(namespace, b'i', id))
    }

    /// The one tenant of a feature whose callers all share its cache.
    pub fn shared(namespace: &str) -> Tenant {
        Tenant(salted(namespace, b's', ""))
    }

    /// The hex digest used in keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn salted(namespace: &str, domain: u8, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"fusebox-cache-tenant-v1\0");
    h.update((namespace.len() as u64).to_be_bytes());
    h.update(namespace.as_bytes());
    h.update([domain]);
    h.update(secret.as_bytes());
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Digests of one request: `exact` (its canonical exact form) and the one it is looked up and
/// stored under (`lookup`: the similar form's when "similar" is on and applies, else
/// `exact`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// SHA-256 (hex) of the canonical exact form.
    pub exact: String,
    /// SHA-256 (hex) of the form the entry is stored under.
    pub lookup: String,
}

impl RequestKey {
    /// The digests of `request`, or `None` when it is not a cacheable Messages request (not
    /// an object with a `messages` array).
    pub fn of(request: &Value, similar: bool) -> Option<RequestKey> {
        let exact = normalize::exact(request)?;
        let exact_digest = digest(b'e', &normalize::canonical(&exact));
        let lookup = match similar.then(|| normalize::similar(&exact)).flatten() {
            Some(s) => digest(b's', &normalize::canonical(&s)),
            None => exact_digest.clone(),
        };
        Some(RequestKey {
            exact: exact_digest,
            lookup,
        })
    }
}

fn digest(domain: u8, text: &str) -> String {
    let mut h = Sha256::new();
    h.update([domain]);
    h.update(text.as_bytes());
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_salted_hashes_of_distinct_domains() {
        let a = Tenant::from_api_key("app", "sk-ant-secret");
        assert!(!a.as_str().contains("secret"));
        assert!(!format!("{a:?}").contains("sk-ant"));
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, Tenant::from_api_key("other", "sk-ant-secret"));
        assert_ne!(a, Tenant::from_id("app", "sk-ant-secret"));
        assert_ne!(a, Tenant::from_api_key("app", "sk-ant-secreu"));
        assert_eq!(a, Tenant::from_api_key("app", "sk-ant-secret"));
        // Length-prefixed namespace: ("ab", "c...") and ("a", "bc...") differ.
        assert_ne!(Tenant::from_id("ab", "c"), Tenant::from_id("a", "bc"));
    }
}
