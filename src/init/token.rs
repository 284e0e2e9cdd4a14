//! The access token (contract §2.1): unset at boot, set or cleared by `/init`,
//! compared in constant time.

use std::sync::RwLock;

/// The current access token, if any.
#[derive(Debug, Default)]
pub struct AccessToken {
    token: RwLock<Option<String>>,
}

impl AccessToken {
    pub fn get(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_set(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn set(&self, t: String) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    pub fn clear(&self) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// True when no token is set, or `presented` equals it (constant time).
    pub fn admits(&self, presented: Option<&[u8]>) -> bool {
        match self
            .token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
        {
            None => true,
            Some(t) => presented.is_some_and(|p| ct_eq(p, t.as_bytes())),
        }
    }
}

/// Constant-time equality: the time depends only on the lengths, never on where the
/// inputs first differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"", b"a"));
        // a length difference that is a multiple of 256 must still differ
        assert!(!ct_eq(&[0u8; 256], b""));
    }

    #[test]
    fn admits_everything_until_set() {
        let t = AccessToken::default();
        assert!(t.admits(None));
        t.set("secret".into());
        assert!(!t.admits(None));
        assert!(!t.admits(Some(b"wrong")));
        assert!(t.admits(Some(b"secret")));
        t.clear();
        assert!(t.admits(None));
    }
}
