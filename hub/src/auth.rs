//! Secrets: generating keys and tokens, hashing them for storage, reading
//! them from request metadata, and comparing them in constant time.
//!
//! Keys and tokens are 256 random bits, so a plain SHA-256 is a sound storage
//! hash (no password stretching needed) and lets a key be found by its hash.
//! A key a spoke proposes for itself at enrollment is held to the same: the
//! contract asks for at least 128 random bits, and the hub checks its form.

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

/// Whether two storage hashes are equal, compared in constant time.
pub fn hashes_match(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The key a spoke proposed for itself (`RegisterRequest.proposed_key`),
/// checked, with its storage hash. Its `Debug` shows neither.
pub struct ProposedKey {
    key: String,
    hash: String,
}

impl ProposedKey {
    /// Checks the field: empty is no proposal; anything else must have the
    /// contract's form, or INVALID_ARGUMENT names `proposed_key`.
    pub fn parse(key: String) -> Result<Option<Self>> {
        if key.is_empty() {
            return Ok(None);
        }
        if !hub_proto::rules::is_spoke_key(&key) {
            return Err(Error::invalid(
                "proposed_key",
                format!(
                    "must be {} to {} characters of A-Z, a-z, 0-9, '-', '_', '.', '~'",
                    hub_proto::rules::MIN_SPOKE_KEY_CHARS,
                    hub_proto::rules::MAX_SPOKE_KEY_CHARS
                ),
            ));
        }
        let hash = hash_secret(&key);
        Ok(Some(Self { key, hash }))
    }

    /// The key itself, for the reply.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its storage hash.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

impl std::fmt::Debug for ProposedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProposedKey(..)")
    }
}

/// A configured token (admin or enrollment), kept only as its hash.
#[derive(Clone)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes `token` for later comparison.
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// A key for `purpose` derived from the token (HMAC-SHA256 of the
    /// purpose under the token's hash): the same for as long as the token
    /// is, and no use for finding it.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&key, purpose.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
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
    fn a_proposed_key_is_checked_and_hidden() {
        assert!(ProposedKey::parse(String::new()).unwrap().is_none());
        let key = generate_secret();
        let proposed = ProposedKey::parse(key.clone()).unwrap().unwrap();
        assert_eq!(
            (proposed.key(), proposed.hash()),
            (&*key, &*hash_secret(&key))
        );
        assert!(!format!("{proposed:?}").contains(&key));
        assert!(hashes_match(proposed.hash(), &hash_secret(&key)));
        assert!(!hashes_match(
            proposed.hash(),
            &hash_secret(&generate_secret())
        ));
        for bad in ["short", &"k".repeat(129), &format!("{}\n", "k".repeat(40))] {
            let e = ProposedKey::parse(bad.to_owned()).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument { field, .. } if field == "proposed_key"),
                "{e:?}"
            );
        }
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
