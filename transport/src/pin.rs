//! Pinned mutual TLS.
//!
//! Both verifiers compare the peer key's fingerprint (not the certificate) against what they
//! were told to trust, and both delegate the TLS 1.3 handshake signature to rustls, which
//! proves the peer holds the private key. TLS 1.2 signatures are always refused.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::Fingerprint;

/// Decides which client keys may complete a handshake with the agent.
pub trait TrustPolicy: Send + Sync + std::fmt::Debug {
    /// Whether a client presenting this key may connect. An untrusted key may still be let in
    /// while an enrollment token is open; it must then enroll in its hello or be dropped.
    /// `now_unix` is the handshake time in seconds since the Unix epoch, from rustls.
    fn admits(&self, client: &Fingerprint, now_unix: u64) -> bool;
}

fn bad_cert(reason: &str) -> Error {
    Error::General(reason.to_string())
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The laptop's view of the agent: exactly one key is acceptable.
#[derive(Debug)]
pub struct PinnedServer {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedServer {
    pub fn new(expected: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        Self { expected, provider }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = Fingerprint::of_certificate(end_entity).map_err(|e| bad_cert(&e))?;
        if got.ct_eq(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(bad_cert(&format!(
                "agent key {} does not match the pinned {}",
                got, self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(bad_cert("TLS 1.2 is not accepted"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The agent's view of clients: whatever its [`TrustPolicy`] admits.
#[derive(Debug)]
pub struct PinnedClients {
    policy: Arc<dyn TrustPolicy>,
    provider: Arc<CryptoProvider>,
}

impl PinnedClients {
    pub fn new(policy: Arc<dyn TrustPolicy>, provider: Arc<CryptoProvider>) -> Self {
        Self { policy, provider }
    }
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let got = Fingerprint::of_certificate(end_entity).map_err(|e| bad_cert(&e))?;
        if self.policy.admits(&got, now.as_secs()) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(client = %got, "refused a client whose key is not trusted");
            Err(bad_cert(&format!("client key {got} is not trusted")))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(bad_cert("TLS 1.2 is not accepted"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
