//! The hello: the first exchange on every connection, on the first bidirectional stream.
//!
//! The client names its protocol version and, when it is enrolling, proves it holds the
//! pairing token. The agent accepts or refuses with a reason a person can read.

/// Sent by the laptop on the first stream of a connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientHello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub protocol_version: u32,
    /// The client's software version, for messages.
    pub software_version: String,
    /// Present when the client is not yet trusted and is enrolling with a pairing token.
    pub enroll: Option<EnrollProof>,
}

/// Proof of a pairing token, bound to this TLS session so it cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnrollProof {
    /// Public identifier of the token (its first half), so the agent can find it.
    pub token_id: String,
    /// keyed-hash(secret of the token, TLS exporter of this session).
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}

/// The agent's answer to a [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HelloReply {
    /// The connection may be used.
    Accepted {
        protocol_version: u32,
        software_version: String,
        /// Name of the workspace this agent serves.
        workspace: String,
    },
    /// The connection is refused; the agent closes it after this message.
    Refused { reason: String },
}
