//! Opening the QUIC connection to one agent and running the hello (and, once, enrollment).

use std::net::SocketAddr;
use std::time::Duration;

use cs_protocol::hello::{ClientHello, EnrollProof, HelloReply};
use cs_protocol::{PROTOCOL_VERSION, SOFTWARE_VERSION};
use cs_transport::endpoint::{client_endpoint, enroll_exporter, SERVER_NAME};
use cs_transport::{read_frame, write_frame, Fingerprint, Identity, Token, TransportLimits};

/// A handshake plus hello that takes longer than this is abandoned and retried. This also
/// recovers a handshake stuck after a lost Finished (see ARCHITECTURE.md).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Connecting to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answered in time: the agent is down or the network is.
    #[error("agent at {addr} did not answer within {HANDSHAKE_TIMEOUT_MS} ms")]
    Timeout { addr: SocketAddr },
    /// The agent presented another key than the one recorded at pairing.
    #[error("agent at {addr} presented a different key than the pinned {pinned}; if it was reinstalled, pair again")]
    WrongKey {
        addr: SocketAddr,
        pinned: Fingerprint,
    },
    /// The agent refused this laptop's key at the TLS level.
    #[error(
        "agent at {addr} does not trust this laptop's key {me}; pair again with `cs sandbox add`"
    )]
    Untrusted { addr: SocketAddr, me: Fingerprint },
    /// The agent refused the hello, with its reason.
    #[error("agent at {addr} refused the connection: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("agent at {addr}: {detail}")]
    Other { addr: SocketAddr, detail: String },
}

/// The result of a successful hello.
#[derive(Debug)]
pub struct Connected {
    pub conn: quinn::Connection,
    /// The endpoint must live as long as the connection.
    pub endpoint: quinn::Endpoint,
    pub workspace: String,
}

/// Connects to the agent at `addr` whose key is `pinned`, and says hello (enrolling with
/// `enroll` if given).
pub async fn connect(
    me: &Identity,
    addr: SocketAddr,
    pinned: Fingerprint,
    enroll: Option<&Token>,
) -> Result<Connected, ConnectError> {
    let endpoint = client_endpoint(addr).map_err(|e| ConnectError::Other {
        addr,
        detail: e.to_string(),
    })?;
    connect_on(endpoint, me, addr, pinned, enroll).await
}

/// [`connect`] on an existing endpoint (the simulation's, on its simulated network).
pub async fn connect_on(
    endpoint: quinn::Endpoint,
    me: &Identity,
    addr: SocketAddr,
    pinned: Fingerprint,
    enroll: Option<&Token>,
) -> Result<Connected, ConnectError> {
    let other = |detail: String| ConnectError::Other { addr, detail };
    let fut = async {
        let cfg = cs_transport::client_config(me, pinned, &TransportLimits::default())
            .map_err(|e| other(e.to_string()))?;
        let conn = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| other(e.to_string()))?
            .await
            .map_err(|e| classify(e, addr, pinned, me))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| classify(e, addr, pinned, me))?;
        let enroll = match enroll {
            Some(token) => {
                let exporter = enroll_exporter(&conn).map_err(|e| other(e.to_string()))?;
                Some(EnrollProof {
                    token_id: token.id.clone(),
                    mac: token.proof(&exporter),
                })
            }
            None => None,
        };
        let hello = ClientHello {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.into(),
            enroll,
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| io_err(e, &conn, addr, pinned, me))?;
        let _ = send.finish();
        let reply = read_frame::<_, HelloReply>(&mut recv)
            .await
            .map_err(|e| io_err(e, &conn, addr, pinned, me))?;
        match reply {
            Some(HelloReply::Accepted { workspace, .. }) => Ok(Connected {
                conn,
                endpoint,
                workspace,
            }),
            Some(HelloReply::Refused { reason }) => Err(ConnectError::Refused { addr, reason }),
            None => Err(match conn.close_reason() {
                Some(e) => classify(e, addr, pinned, me),
                None => other("the agent closed the hello without an answer".into()),
            }),
        }
    };
    let result = match tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), fut).await
    {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout { addr }),
    };
    match (result, enroll) {
        // With no enrollment open, the agent admits no new key at all: say why in terms of
        // the token the user holds.
        (Err(ConnectError::Untrusted { addr, .. }), Some(token)) => Err(ConnectError::Refused {
            addr,
            reason: format!(
                "enrollment token {} is unknown, already used, or expired",
                token.id
            ),
        }),
        (r, _) => r,
    }
}

fn io_err(
    e: cs_transport::FrameError,
    conn: &quinn::Connection,
    addr: SocketAddr,
    pinned: Fingerprint,
    me: &Identity,
) -> ConnectError {
    match conn.close_reason() {
        Some(reason) => classify(reason, addr, pinned, me),
        None => ConnectError::Other {
            addr,
            detail: e.to_string(),
        },
    }
}

fn classify(
    e: impl Into<quinn::ConnectionError>,
    addr: SocketAddr,
    pinned: Fingerprint,
    me: &Identity,
) -> ConnectError {
    let e: quinn::ConnectionError = e.into();
    let text = e.to_string();
    if text.contains("does not match the pinned") {
        return ConnectError::WrongKey { addr, pinned };
    }
    match &e {
        quinn::ConnectionError::TimedOut => ConnectError::Timeout { addr },
        // A TLS alert from the agent during our certificate check: our key was refused.
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code.to_string().contains("crypto") =>
        {
            ConnectError::Untrusted {
                addr,
                me: me.fingerprint(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(c) => ConnectError::Refused {
            addr,
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        _ => ConnectError::Other { addr, detail: text },
    }
}
