//! Bearer tokens: `Authorization: Bearer <token>` on every request once a
//! token is configured. Both sides are hashed (SHA-256) and the digests
//! compared in constant time (`subtle`), so neither the comparison nor
//! the lengths tell an attacker how much of a guess was right.

use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured token, kept as its digest.
#[derive(Clone)]
pub(crate) struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Token {
    pub(crate) fn new(token: &str) -> Token {
        Token {
            digest: digest(token.as_bytes()),
        }
    }

    /// Whether the `Authorization` header carries this token.
    pub(crate) fn admits(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header else {
            return false;
        };
        let value = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110 11.1).
        let Some(given) = value
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &value[7..])
        else {
            return false;
        };
        digest(given.trim_ascii()).ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_bearer_token_is_admitted() {
        let t = Token::new("s3cret");
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(t.admits(Some(&h("Bearer s3cret"))));
        assert!(t.admits(Some(&h("bearer s3cret"))));
        assert!(!t.admits(Some(&h("Bearer s3cre"))));
        assert!(!t.admits(Some(&h("Bearer s3crett"))));
        assert!(!t.admits(Some(&h("Basic s3cret"))));
        assert!(!t.admits(Some(&h("Bearer"))));
        assert!(!t.admits(None));
    }
}
