//! The agent's persistent state: where things live under its system root, which laptop keys
//! it trusts, and the enrollment tokens it has handed out.
//!
//! Every function that needs the time takes it as a value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use cs_transport::{Fingerprint, Token, TrustPolicy};
use serde::{Deserialize, Serialize};

/// Outstanding enrollment tokens an agent keeps; the oldest are dropped beyond this.
pub const TOKENS_MAX: usize = 16;
/// Trusted laptop keys an agent keeps.
pub const TRUSTED_KEYS_MAX: usize = 1024;

/// Directories of one agent, all under its (relocatable) system root.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// `ROOT/var/lib/cs-agent`: identity, trusted keys, tokens.
    pub state: PathBuf,
    /// `ROOT/etc/sandbox.d`: system-level automation scripts (the seed's path).
    pub etc: PathBuf,
    /// `ROOT/var/log/sandbox`: logs of automation (the seed's path).
    pub log: PathBuf,
}

impl AgentPaths {
    pub fn new(root: &Path) -> Self {
        Self {
            state: root.join("var/lib/cs-agent"),
            etc: root.join("etc/sandbox.d"),
            log: root.join("var/log/sandbox"),
        }
    }

    /// Creates the directories, owner-only for the state.
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for dir in [&self.state, &self.etc, &self.log] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::set_permissions(&self.state, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", self.state.display()))?;
        Ok(())
    }
}

/// One trusted laptop key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustedKey {
    pub fingerprint: Fingerprint,
    /// When it was enrolled, seconds since the Unix epoch.
    pub added_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingToken {
    id: String,
    secret: String,
    expires_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    trusted: BTreeMap<String, TrustedKey>,
    tokens: Vec<PendingToken>,
}

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("enrollment token {0} is unknown, already used, or expired")]
    UnknownToken(String),
    #[error("enrollment proof for token {0} is wrong")]
    BadProof(String),
}

/// The trust store: trusted keys and outstanding tokens, persisted in one JSON file that is
/// re-read when another process (`cs-agent trust revoke`) changed it.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    inner: Mutex<(Option<std::time::SystemTime>, Persisted)>,
}

impl TrustStore {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let store = Self {
            path: state_dir.join("trust.json"),
            inner: Mutex::new((None, Persisted::default())),
        };
        store.with(|_| Ok(false))?;
        Ok(store)
    }

    /// Runs `f` on fresh state; saves when it returns `true`.
    fn with<T>(&self, f: impl FnOnce(&mut Persisted) -> anyhow::Result<T>) -> anyhow::Result<T>
    where
        T: SaveHint,
    {
        // A poisoned lock means a panic while holding it; the data is plain and still valid.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if mtime.is_none() || mtime != guard.0 {
            guard.1 = match std::fs::read(&self.path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: invalid trust store", self.path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
                }
            };
            guard.0 = mtime;
        }
        let out = f(&mut guard.1)?;
        if out.should_save() {
            let bytes = serde_json::to_vec_pretty(&guard.1)?;
            cs_transport::identity::write_private(&self.path, &bytes)
                .with_context(|| format!("cannot write {}", self.path.display()))?;
            guard.0 = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
        }
        Ok(out)
    }

    /// Adds a token valid until `expires_unix`.
    pub fn add_token(&self, token: &Token, expires_unix: u64, now_unix: u64) -> anyhow::Result<()> {
        self.with(|p| {
            p.tokens.retain(|t| t.expires_unix > now_unix);
            p.tokens.push(PendingToken {
                id: token.id.clone(),
                secret: token.secret.clone(),
                expires_unix,
            });
            let excess = p.tokens.len().saturating_sub(TOKENS_MAX);
            p.tokens.drain(..excess);
            Ok(true)
        })
        .map(|_saved| ())
    }

    /// Whether `fp` is trusted now.
    pub fn is_trusted(&self, fp: &Fingerprint) -> bool {
        self.with(|p| Ok(p.trusted.contains_key(&fp.to_string())))
            .unwrap_or(false)
    }

    /// Whether an unexpired token is outstanding.
    pub fn enrollment_open(&self, now_unix: u64) -> bool {
        self.with(|p| Ok(p.tokens.iter().any(|t| t.expires_unix > now_unix)))
            .unwrap_or(false)
    }

    /// Consumes the token `id` if `mac` proves it for `exporter`, and trusts `fp` from now on.
    pub fn enroll(
        &self,
        fp: Fingerprint,
        id: &str,
        mac: &[u8],
        exporter: &[u8],
        now_unix: u64,
    ) -> anyhow::Result<Result<(), EnrollError>> {
        self.with(|p| {
            let Some(i) = p
                .tokens
                .iter()
                .position(|t| t.id == id && t.expires_unix > now_unix)
            else {
                return Ok(Err(EnrollError::UnknownToken(id.to_string())));
            };
            let token = Token {
                id: p.tokens[i].id.clone(),
                secret: p.tokens[i].secret.clone(),
            };
            if !token.verify(exporter, mac) {
                return Ok(Err(EnrollError::BadProof(id.to_string())));
            }
            p.tokens.remove(i);
            if p.trusted.len() >= TRUSTED_KEYS_MAX {
                anyhow::bail!(
                    "the agent already trusts {TRUSTED_KEYS_MAX} keys; revoke some first"
                );
            }
            p.trusted.insert(
                fp.to_string(),
                TrustedKey {
                    fingerprint: fp,
                    added_unix: now_unix,
                },
            );
            Ok(Ok(()))
        })
    }

    /// All trusted keys.
    pub fn trusted(&self) -> anyhow::Result<Vec<TrustedKey>> {
        self.with(|p| Ok(p.trusted.values().cloned().collect::<Vec<_>>()))
    }

    /// Stops trusting `fp`. Returns whether it was trusted.
    pub fn revoke(&self, fp: &Fingerprint) -> anyhow::Result<bool> {
        self.with(|p| Ok(p.trusted.remove(&fp.to_string()).is_some()))
    }
}

/// Whether a result of a [`TrustStore`] operation changed the state.
trait SaveHint {
    fn should_save(&self) -> bool;
}
impl SaveHint for bool {
    fn should_save(&self) -> bool {
        *self
    }
}
impl SaveHint for () {
    fn should_save(&self) -> bool {
        true
    }
}
impl SaveHint for Result<(), EnrollError> {
    fn should_save(&self) -> bool {
        self.is_ok()
    }
}
impl SaveHint for Vec<TrustedKey> {
    fn should_save(&self) -> bool {
        false
    }
}

impl TrustPolicy for TrustStore {
    fn admits(&self, client: &Fingerprint, now_unix: u64) -> bool {
        self.is_trusted(client) || self.enrollment_open(now_unix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_single_use_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::open(dir.path()).unwrap();
        let token = Token::generate(&mut rand::thread_rng());
        let fp = Fingerprint::of_spki(b"laptop");
        store.add_token(&token, 100, 0).unwrap();
        assert!(store.admits(&fp, 50));
        assert!(!store.admits(&fp, 100), "expired token still admits");
        let mac = token.proof(b"ex");
        assert_eq!(
            store.enroll(fp, &token.id, &mac, b"other", 50).unwrap(),
            Err(EnrollError::BadProof(token.id.clone()))
        );
        assert_eq!(
            store.enroll(fp, &token.id, &mac, b"ex", 100).unwrap(),
            Err(EnrollError::UnknownToken(token.id.clone()))
        );
        assert_eq!(
            store.enroll(fp, &token.id, &mac, b"ex", 50).unwrap(),
            Ok(())
        );
        assert_eq!(
            store.enroll(fp, &token.id, &mac, b"ex", 50).unwrap(),
            Err(EnrollError::UnknownToken(token.id.clone()))
        );
        assert!(store.is_trusted(&fp));
        assert!(!store.enrollment_open(50));
    }

    #[test]
    fn revocation_by_another_process_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = TrustStore::open(dir.path()).unwrap();
        let token = Token::generate(&mut rand::thread_rng());
        let fp = Fingerprint::of_spki(b"laptop");
        a.add_token(&token, 100, 0).unwrap();
        a.enroll(fp, &token.id, &token.proof(b"x"), b"x", 1)
            .unwrap()
            .unwrap();
        let b = TrustStore::open(dir.path()).unwrap();
        assert_eq!(b.trusted().unwrap().len(), 1);
        // Make sure the modification time differs on coarse-grained filesystems.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(b.revoke(&fp).unwrap());
        assert!(!a.is_trusted(&fp));
    }
}
