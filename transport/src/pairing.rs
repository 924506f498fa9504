//! Pairing: how a laptop learns an agent's address and key, and proves it may enroll.
//!
//! The agent prints one line, `cs-pair/1/ADDR/FINGERPRINT/TOKEN`. The token is single-use and
//! expires; its secret never crosses the wire: the laptop sends an HMAC of the connection's
//! TLS exporter keyed by the secret, which binds the proof to that one pinned session.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use rand::RngCore;

use crate::identity::Fingerprint;

const PREFIX: &str = "cs-pair/1/";

/// Label of the TLS exporter used to bind an enrollment proof to its session.
pub const EXPORTER_LABEL: &[u8] = b"cs enroll v1";

/// Parsing a pairing line failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PairingError {
    /// The text is not of the form the agent prints.
    #[error(
        "invalid pairing '{text}': expected cs-pair/1/ADDRESS/SHA256:FINGERPRINT/TOKEN ({reason})"
    )]
    Malformed { text: String, reason: String },
}

/// A single-use enrollment token: a public id and a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.…)", self.id)
    }
}

impl Token {
    /// A fresh random token (64-bit id, 128-bit secret).
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// The proof sent in the hello: HMAC-SHA256(secret, exporter material).
    pub fn proof(&self, exporter: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        ring::hmac::sign(&key, exporter).as_ref().to_vec()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, exporter: &[u8], mac: &[u8]) -> bool {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        ring::hmac::verify(&key, exporter, mac).is_ok()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl FromStr for Token {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, secret) = s.split_once('.').ok_or("token must be ID.SECRET")?;
        let ok = |p: &str, n| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok(id, 16) || !ok(secret, 32) {
            return Err("token must be 16 and 32 hex digits joined by '.'".into());
        }
        Ok(Self {
            id: id.into(),
            secret: secret.into(),
        })
    }
}

/// Everything a laptop needs to reach and enroll with one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairing {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub token: Token,
}

impl fmt::Display for Pairing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}/{}/{}",
            self.addr, self.fingerprint, self.token
        )
    }
}

impl FromStr for Pairing {
    type Err = PairingError;
    fn from_str(text: &str) -> Result<Self, PairingError> {
        let bad = |reason: String| PairingError::Malformed {
            text: text.to_string(),
            reason,
        };
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("wrong prefix".into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [addr, fp, token] = parts.as_slice() else {
            return Err(bad(format!(
                "{} fields after the prefix, expected 3",
                parts.len()
            )));
        };
        Ok(Self {
            addr: addr
                .parse()
                .map_err(|_| bad(format!("bad address '{addr}'")))?,
            fingerprint: fp.parse().map_err(bad)?,
            token: token.parse().map_err(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_roundtrip() {
        let mut rng = rand::thread_rng();
        let p = Pairing {
            addr: "[::1]:4433".parse().unwrap(),
            fingerprint: Fingerprint::of_spki(b"k"),
            token: Token::generate(&mut rng),
        };
        assert_eq!(p.to_string().parse::<Pairing>().unwrap(), p);
    }

    #[test]
    fn bad_pairings_name_the_text() {
        for text in [
            "",
            "cs-pair/1/x/y",
            "cs-pair/1/127.0.0.1:1/SHA256:00/abc.def",
            "nope",
        ] {
            let err = text.parse::<Pairing>().unwrap_err().to_string();
            assert!(err.contains(&format!("'{text}'")), "{err}");
        }
    }

    #[test]
    fn proof_binds_secret_and_session() {
        let mut rng = rand::thread_rng();
        let t = Token::generate(&mut rng);
        let other = Token::generate(&mut rng);
        let mac = t.proof(b"session-a");
        assert!(t.verify(b"session-a", &mac));
        assert!(!t.verify(b"session-b", &mac));
        assert!(!other.verify(b"session-a", &mac));
    }
}
