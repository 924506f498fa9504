//! The agent's QUIC server: admits connections, runs the hello (and enrollment), and hands
//! each new stream to the actor it names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use cs_exec::{ExecActor, OpenSession};
use cs_protocol::hello::{ClientHello, HelloReply};
use cs_protocol::{StreamOpen, PROTOCOL_VERSION, SOFTWARE_VERSION};
use cs_transport::endpoint::{enroll_exporter, peer_fingerprint};
use cs_transport::{read_frame, write_frame, FrameError};

use crate::state::{EnrollError, TrustStore};

/// What the server asks of the trust store. The agent uses [`TrustStore`] (a file); the
/// simulation plugs in one held in memory.
pub trait Trust: cs_transport::TrustPolicy {
    /// Whether `fp` is trusted now.
    fn is_trusted(&self, fp: &cs_transport::Fingerprint) -> bool;
    /// Consumes token `id` if `mac` proves it for `exporter`, and trusts `fp` from now on.
    fn enroll(
        &self,
        fp: cs_transport::Fingerprint,
        id: &str,
        mac: &[u8],
        exporter: &[u8],
        now_unix: u64,
    ) -> anyhow::Result<Result<(), EnrollError>>;
}

impl Trust for TrustStore {
    fn is_trusted(&self, fp: &cs_transport::Fingerprint) -> bool {
        TrustStore::is_trusted(self, fp)
    }
    fn enroll(
        &self,
        fp: cs_transport::Fingerprint,
        id: &str,
        mac: &[u8],
        exporter: &[u8],
        now_unix: u64,
    ) -> anyhow::Result<Result<(), EnrollError>> {
        TrustStore::enroll(self, fp, id, mac, exporter, now_unix)
    }
}

/// Connections served at once; more are refused until one ends.
pub const CONNECTIONS_MAX: usize = 256;
/// Time a client has to send its hello, or the first frame of a stream.
pub const FIRST_FRAME_TIMEOUT_MS: u64 = 10_000;

/// QUIC application close codes the agent uses.
pub mod close {
    /// The hello was refused (version, trust); the reason was sent in the hello reply.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol (oversized or malformed frame).
    pub const PROTOCOL: u32 = 2;
    /// The agent is shutting down.
    pub const SHUTDOWN: u32 = 3;
}

/// What the server needs from the rest of the agent.
#[derive(Clone)]
pub struct Served {
    pub workspace: String,
    pub trust: Arc<dyn Trust>,
    pub exec: Addr<ExecActor>,
    /// Where sync roots live (the workspace home).
    pub roots: Arc<dyn crate::sync::Roots>,
    /// Sync streams served at once ([`crate::sync::SYNC_STREAMS_MAX`]).
    pub sync_permits: Arc<tokio::sync::Semaphore>,
    /// The workspace's supervisor and logs (the simulation runs without).
    pub supervisor: Option<Addr<crate::supervise::Supervisor>>,
    pub logs: Option<crate::logs::LogHub>,
    /// Log streams served at once ([`LOG_STREAMS_MAX`]).
    pub log_permits: Arc<tokio::sync::Semaphore>,
    /// Accepted reverse-forward connections waiting to be claimed.
    pub reverse: crate::forward::PendingMap,
    /// The workspace home, for `cs rsync` (the simulation serves none).
    pub rsync_home: Option<std::path::PathBuf>,
    /// rsync streams served at once ([`crate::rsync::RSYNC_STREAMS_MAX`]).
    pub rsync_permits: Arc<tokio::sync::Semaphore>,
    /// How forwarded connections reach their targets.
    pub dial: crate::forward::Dialer,
    /// Forward streams served at once ([`crate::forward::FORWARD_STREAMS_MAX`]).
    pub forward_permits: Arc<tokio::sync::Semaphore>,
    /// The workspace is in Auto Mode: every exec stream starts with the page's warning.
    pub auto_mode: Arc<std::sync::atomic::AtomicBool>,
}

/// What `cs ssh` shows first in a workspace in Auto Mode.
pub const AUTO_MODE_NOTICE: &str = "this workspace is in Auto Mode: each new commit on its \
     checkouts' branches discards local changes in them";

/// `cs logs` streams served at once.
pub const LOG_STREAMS_MAX: usize = 64;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Accepts connections until the endpoint is closed.
pub async fn accept_loop(endpoint: quinn::Endpoint, served: Served) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: {CONNECTIONS_MAX} already open");
            incoming.refuse();
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, served).await,
                Err(e) => tracing::warn!(%remote, error = %e, "handshake failed"),
            }
            drop(permit);
        });
    }
}

async fn serve_connection(conn: quinn::Connection, served: Served) {
    let remote = conn.remote_address();
    let Some(fp) = peer_fingerprint(&conn) else {
        conn.close(close::REFUSED.into(), b"no client certificate");
        return;
    };
    match hello(&conn, &served, fp).await {
        Ok(()) => tracing::info!(%remote, client = %fp, "client connected"),
        Err(reason) => {
            tracing::warn!(%remote, client = %fp, %reason, "client refused");
            return;
        }
    }
    // The connection's queue of bulk forwarded streams, shared by its pumps.
    let turns = cs_forward::Turns::of(&conn);
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%remote, reason = %e, "connection closed");
                return;
            }
        };
        if !served.trust.is_trusted(&fp) {
            tracing::warn!(%remote, client = %fp, "key was revoked; closing its connection");
            conn.close(close::REFUSED.into(), b"client key revoked");
            return;
        }
        let first = tokio::time::timeout(
            Duration::from_millis(FIRST_FRAME_TIMEOUT_MS),
            read_frame::<_, StreamOpen>(&mut recv),
        )
        .await;
        match first {
            Ok(Ok(Some(StreamOpen::Exec(start)))) => {
                let mut send = send;
                if served.auto_mode.load(std::sync::atomic::Ordering::Relaxed) {
                    let notice = cs_protocol::exec::ExecOutput::Notice(AUTO_MODE_NOTICE.into());
                    let _ = write_frame(&mut send, &notice).await;
                }
                served.exec.do_send(OpenSession {
                    start,
                    send: Box::new(send),
                    recv: Box::new(recv),
                });
            }
            Ok(Ok(Some(StreamOpen::Sync(open)))) => {
                match served.sync_permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let roots = served.roots.clone();
                        let probe = cs_transport::TailProbe::new(conn.clone());
                        tokio::spawn(async move {
                            crate::sync::serve(open, roots, send, recv, probe).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let mut send = send;
                        let reason = format!(
                            "the workspace serves {} sync sessions, the most it allows",
                            crate::sync::SYNC_STREAMS_MAX
                        );
                        let _ = write_frame(
                            &mut send,
                            &cs_protocol::sync::SyncReply::Refused { reason },
                        )
                        .await;
                    }
                }
            }
            Ok(Ok(Some(StreamOpen::Supervise(req)))) => {
                let supervisor = served.supervisor.clone();
                tokio::spawn(async move {
                    use cs_protocol::supervise::SuperviseReply;
                    let reply = match supervisor {
                        Some(s) => s
                            .send(crate::supervise::Ask(req))
                            .await
                            .unwrap_or_else(|_| {
                                SuperviseReply::Error("the supervisor stopped".into())
                            }),
                        None => SuperviseReply::Error("this agent runs no supervisor".into()),
                    };
                    let mut send = send;
                    let _ = write_frame(&mut send, &reply).await;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
                    drop(recv);
                });
            }
            Ok(Ok(Some(StreamOpen::Logs(open)))) => {
                let mut send = send;
                match (
                    served.logs.clone(),
                    served.log_permits.clone().try_acquire_owned(),
                ) {
                    (Some(hub), Ok(permit)) => {
                        tokio::spawn(async move {
                            // The laptop finishing or resetting its side ends a follow.
                            let mut recv = recv;
                            let mut buf = [0u8; 64];
                            tokio::select! {
                                _ = crate::logs::serve(hub, open, &mut send) => {}
                                _ = async { while let Ok(Some(_)) = recv.read(&mut buf).await {} } => {}
                            }
                            let _ = send.finish();
                            drop(permit);
                        });
                    }
                    (None, _) => {
                        let msg = cs_protocol::supervise::LogsMsg::Error(
                            "this agent keeps no logs".into(),
                        );
                        let _ = write_frame(&mut send, &msg).await;
                    }
                    (Some(_), Err(_)) => {
                        let msg = cs_protocol::supervise::LogsMsg::Error(format!(
                            "the workspace serves {LOG_STREAMS_MAX} log streams, the most it allows"
                        ));
                        let _ = write_frame(&mut send, &msg).await;
                    }
                }
            }
            Ok(Ok(Some(StreamOpen::Forward(open)))) => {
                match served.forward_permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let dial = served.dial.clone();
                        let turns = turns.clone();
                        tokio::spawn(async move {
                            crate::forward::serve_forward(open, dial, send, recv, turns).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(crate::forward::refuse_busy(send));
                    }
                }
            }
            Ok(Ok(Some(StreamOpen::ForwardWatch(_)))) => {
                let supervisor = served.supervisor.clone();
                tokio::spawn(crate::forward::serve_watch(supervisor, send, recv));
            }
            Ok(Ok(Some(StreamOpen::ReverseListen(open)))) => {
                let pending = served.reverse.clone();
                tokio::spawn(crate::forward::serve_reverse(open, pending, send, recv));
            }
            Ok(Ok(Some(StreamOpen::ReverseAccept(claim)))) => {
                match served.forward_permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let pending = served.reverse.clone();
                        let turns = turns.clone();
                        tokio::spawn(async move {
                            crate::forward::serve_reverse_accept(claim, pending, send, recv, turns)
                                .await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(crate::forward::refuse_busy(send));
                    }
                }
            }
            Ok(Ok(Some(StreamOpen::Rsync(open)))) => {
                let home = served.rsync_home.clone();
                let pack = crate::rsync::packing(&cs_transport::TailProbe::new(conn.clone()));
                match served.rsync_permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(async move {
                            crate::rsync::serve(open, home, pack, send, recv).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let mut send = send;
                        let msg = cs_protocol::rsync::RsyncReply::Error(format!(
                            "the workspace serves {} rsync transfers, the most it allows",
                            crate::rsync::RSYNC_STREAMS_MAX
                        ));
                        let _ = write_frame(&mut send, &msg).await;
                    }
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                protocol_violation(&conn, remote, &e);
                return;
            }
            Err(_) => tracing::info!(%remote, "stream sent nothing in time; dropped"),
        }
    }
}

/// Closes a connection whose peer broke the protocol. Other connections are unaffected.
pub fn protocol_violation(conn: &quinn::Connection, remote: SocketAddr, e: &FrameError) {
    tracing::warn!(%remote, error = %e, "protocol violation; closing the connection");
    let reason = e.to_string();
    conn.close(
        close::PROTOCOL.into(),
        &reason.as_bytes()[..reason.len().min(200)],
    );
}

async fn hello(
    conn: &quinn::Connection,
    served: &Served,
    fp: cs_transport::Fingerprint,
) -> Result<(), String> {
    let accepted = tokio::time::timeout(
        Duration::from_millis(FIRST_FRAME_TIMEOUT_MS),
        conn.accept_bi(),
    )
    .await;
    let (mut send, mut recv) = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connection lost before hello: {e}")),
        Err(_) => {
            conn.close(close::REFUSED.into(), b"no hello");
            return Err("no hello in time".into());
        }
    };
    let hello = match tokio::time::timeout(
        Duration::from_millis(FIRST_FRAME_TIMEOUT_MS),
        read_frame::<_, ClientHello>(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Err("stream closed before hello".into()),
        Ok(Err(e)) => {
            protocol_violation(conn, conn.remote_address(), &e);
            return Err(e.to_string());
        }
        Err(_) => {
            conn.close(close::REFUSED.into(), b"no hello");
            return Err("no hello in time".into());
        }
    };
    let verdict = judge(&hello, conn, served, fp);
    let reply = match &verdict {
        Ok(()) => HelloReply::Accepted {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            workspace: served.workspace.clone(),
        },
        Err(reason) => HelloReply::Refused {
            reason: reason.clone(),
        },
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
    if verdict.is_err() {
        // Give the reply a moment to leave before the close discards it.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        conn.close(close::REFUSED.into(), b"refused");
    }
    verdict
}

fn judge(
    hello: &ClientHello,
    conn: &quinn::Connection,
    served: &Served,
    fp: cs_transport::Fingerprint,
) -> Result<(), String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: the laptop speaks version {} (cs {}), this agent speaks version {} (cs-agent {}); install matching versions",
            hello.protocol_version, hello.software_version, PROTOCOL_VERSION, SOFTWARE_VERSION
        ));
    }
    if let Some(proof) = &hello.enroll {
        let exporter = enroll_exporter(conn).map_err(|e| e.to_string())?;
        return match served
            .trust
            .enroll(fp, &proof.token_id, &proof.mac, &exporter, unix_now())
        {
            Ok(Ok(())) => {
                tracing::info!(client = %fp, token = %proof.token_id, "enrolled a new laptop key");
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("enrollment failed: {e:#}")),
        };
    }
    if served.trust.is_trusted(&fp) {
        Ok(())
    } else {
        Err(format!(
            "key {fp} is not trusted by this agent; pair with a fresh token"
        ))
    }
}
