//! QUIC transport between `cs` and `cs-agent`.
//!
//! - [`identity`]: Ed25519 key pairs in self-signed certificates, and their fingerprints.
//! - [`pin`]: rustls verifiers that pin the peer's key fingerprint *and* still verify the
//!   handshake signature, so holding a public certificate is not enough to get in.
//! - [`pairing`]: the one-line pairing string and single-use, expiring enrollment tokens.
//! - [`endpoint`]: quinn endpoints and their configuration; the UDP socket is pluggable so the
//!   simulation can substitute its own.
//! - [`gso`]: the UDP socket wrapper that keeps segmentation-offload batches within one IP
//!   packet, so datagrams can grow past Ethernet size.
//! - [`window`]: the congestion window capped well within a receiving socket's buffer on a
//!   path that holds almost nothing itself (loopback, large datagrams).
//! - [`framed`]: typed, length-prefixed messages over any async byte stream.
//!
//! One crypto provider (ring) is used everywhere; nothing here reads a global default.

pub mod chunks;
pub mod endpoint;
pub mod framed;
pub mod gso;
pub mod identity;
pub mod pairing;
pub mod pin;
pub mod probe;
pub mod state;
pub mod window;

pub use endpoint::{client_config, server_config, EndpointError, TransportLimits};
pub use framed::{read_frame, write_frame, FrameError, FrameReader};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use pairing::{Pairing, PairingError, Token};
pub use pin::TrustPolicy;
pub use probe::TailProbe;

/// The crypto provider of the whole workspace.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
