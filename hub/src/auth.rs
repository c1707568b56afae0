//! Secrets: generating keys and tokens, hashing them for storage, reading
//! them from request metadata, and comparing them in constant time.
//!
//! Keys and tokens are 256 random bits, so a plain SHA-256 is a sound storage
//! hash (no password stretching needed) and lets a key be found by its hash.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// A new random secret: 64 lowercase hex characters.
pub fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    to_hex(&bytes)
}

/// The storage hash of a secret, as 64 lowercase hex characters.
pub fn hash_secret(secret: &str) -> String {
    to_hex(&Sha256::digest(secret.as_bytes()))
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A configured token (admin or enrollment), kept only as its hash.
#[derive(Clone)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes `token` for later comparison.
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&presented).into()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// The secret of an `authorization: Bearer <secret>` header.
pub fn bearer(metadata: &MetadataMap) -> Result<&str> {
    let value = metadata.get("authorization").ok_or(Error::Unauthenticated(
        "missing authorization metadata (expected \"Bearer <key>\")",
    ))?;
    let value = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("authorization metadata is not ASCII"))?;
    let secret = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(Error::Unauthenticated(
            "authorization metadata must be \"Bearer <key>\"",
        ))?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_matches_only_the_token() {
        let token = generate_secret();
        let hash = TokenHash::new(&token);
        assert!(hash.matches(&token));
        assert!(!hash.matches(&generate_secret()));
        assert!(!hash.matches(""));
    }

    #[test]
    fn secrets_are_distinct_hex() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
    }

    #[test]
    fn bearer_requires_the_scheme() {
        let mut md = MetadataMap::new();
        assert!(bearer(&md).is_err());
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer(&md).is_err());
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&md).unwrap(), "abc");
    }
}
