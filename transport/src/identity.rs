//! Ed25519 identities and their fingerprints.
//!
//! A fingerprint is the SHA-256 of the certificate's SubjectPublicKeyInfo, so it names the key,
//! not the certificate: a re-issued certificate for the same key keeps its fingerprint.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A key pair and the self-signed certificate that carries its public half.
#[derive(Clone)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Creating, loading or saving an identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Key generation or certificate signing failed.
    #[error("cannot generate key: {0}")]
    Generate(#[from] rcgen::Error),
    /// The key files could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The stored key or certificate is not valid.
    #[error("{path}: invalid identity file: {reason}")]
    Invalid { path: String, reason: String },
}

impl Identity {
    /// A fresh Ed25519 identity. `name` goes into the certificate's subject, for debugging.
    pub fn generate(name: &str) -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Self::from_key(name, key)
    }

    /// The Ed25519 identity whose private key is `seed`: the same seed gives the same key and
    /// certificate, byte for byte. For the simulation, where one seed decides everything; a
    /// real identity comes from [`Identity::generate`].
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, IdentityError> {
        // PKCS#8 v1 for Ed25519 (RFC 8410): a fixed prefix, then the 32-byte private key.
        const PKCS8_ED25519_PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = rcgen::KeyPair::try_from(der.as_slice())?;
        Self::from_key(name, key)
    }

    fn from_key(name: &str, key: rcgen::KeyPair) -> Result<Self, IdentityError> {
        let mut params = rcgen::CertificateParams::new(vec!["cs-peer".to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        // A serial of exactly 20 bytes whatever the key: rcgen's default drops a leading zero
        // byte, so certificate (and handshake) sizes would vary with the random key, which
        // breaks the simulation's byte-size traces. Identity is the pinned key, not the serial.
        let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
        let mut serial = digest.as_ref()[..20].to_vec();
        serial[0] = (serial[0] & 0x3f) | 0x40;
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.der().to_vec(), key.serialize_der()).map_err(|reason| {
            IdentityError::Invalid {
                path: "<generated>".into(),
                reason,
            }
        })
    }

    fn from_parts(cert_der: Vec<u8>, key_pkcs8: Vec<u8>) -> Result<Self, String> {
        let cert = CertificateDer::from(cert_der);
        let fingerprint = Fingerprint::of_certificate(&cert)?;
        Ok(Self {
            cert,
            key_pkcs8,
            fingerprint,
        })
    }

    /// Loads the identity stored in `dir` (files `cert.der`, `key.der`), creating it on first
    /// use. The key file is written owner-only, to a temporary name, then renamed into place.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, IdentityError> {
        let cert_path = dir.join("cert.der");
        let key_path = dir.join("key.der");
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
            let key = std::fs::read(&key_path).map_err(io(&key_path))?;
            return Self::from_parts(cert, key).map_err(|reason| IdentityError::Invalid {
                path: cert_path.display().to_string(),
                reason,
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let id = Self::generate(name)?;
        write_private(&key_path, &id.key_pkcs8).map_err(io(&key_path))?;
        write_private(&cert_path, &id.cert).map_err(io(&cert_path))?;
        Ok(id)
    }

    /// The certificate presented in the handshake.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The fingerprint peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A secret derived from the private key for one purpose (`label`): stable across restarts,
    /// unrelated to the key for anyone without it.
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key_pkcs8);
        let tag = ring::hmac::sign(&key, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// SHA-256 of a SubjectPublicKeyInfo: what both sides pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of the key in a DER certificate.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| e.to_string())?;
        let spki = parsed.subject_public_key_info();
        Ok(Self::of_spki(spki.as_ref()))
    }

    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares in constant time, so a timing side channel reveals nothing about a pin.
    pub fn ct_eq(&self, other: &Fingerprint) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// A short form for humans: the first 16 hex digits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hexpart = s.strip_prefix("SHA256:").unwrap_or(s);
        let bytes = hex::decode(hexpart).map_err(|_| {
            format!("invalid fingerprint '{s}': expected SHA256: and 64 hex digits")
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("invalid fingerprint '{s}': expected SHA256: and 64 hex digits")
        })?;
        Ok(Self(arr))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_the_spki_hash_of_our_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let from_cert = Fingerprint::of_certificate(cert.der()).unwrap();
        assert_eq!(from_cert, Fingerprint::of_spki(&key.public_key_der()));
    }

    #[test]
    fn certificates_have_one_size_whatever_the_key() {
        let sizes: std::collections::BTreeSet<usize> = (0..300)
            .map(|_| Identity::generate("t").unwrap().certificate().len())
            .collect();
        assert_eq!(sizes.len(), 1, "{sizes:?}");
    }

    #[test]
    fn fingerprint_text_roundtrip_and_errors() {
        let id = Identity::generate("t").unwrap();
        let fp = id.fingerprint();
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        let err = "SHA256:zz".parse::<Fingerprint>().unwrap_err();
        assert!(err.contains("SHA256:zz"), "{err}");
        assert!(fp.ct_eq(&fp));
        assert!(!fp.ct_eq(&Identity::generate("u").unwrap().fingerprint()));
    }

    #[test]
    fn identity_persists_and_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "a").unwrap();
        let b = Identity::load_or_create(dir.path(), "a").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mode = std::fs::metadata(dir.path().join("key.der"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_seeded_identity_is_the_same_bytes_every_time() {
        let a = Identity::from_seed("s", [7; 32]).unwrap();
        let b = Identity::from_seed("s", [7; 32]).unwrap();
        assert_eq!(a.certificate(), b.certificate());
        assert_eq!(a.derive_secret("x"), b.derive_secret("x"));
        let c = Identity::from_seed("s", [8; 32]).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.certificate().len(), c.certificate().len());
    }
}
