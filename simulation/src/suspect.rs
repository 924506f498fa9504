//! The known suspect, isolated: the laptop's handshake Finished is lost, then a one-way
//! partition (laptop to agent) drops everything the laptop sends for a while. Does quinn
//! finish the handshake by itself once the partition heals, and does our connect code recover?
//!
//! The experiment fixes the latency at [`LATENCY_MS`] each way, so the laptop's Initial
//! reaches the agent at 10 ms, the agent's flight reaches the laptop at 20 ms, and the laptop's
//! Finished (sent at about 20 ms) falls into a partition that starts at 15 ms. Two clients are
//! measured:
//! - `raw`: quinn's `connect` and then our hello, with no timeout of ours: what quinn does.
//! - `ours`: the daemon's `connect_on` (handshake plus hello abandoned after
//!   `HANDSHAKE_TIMEOUT_MS`) retried until it succeeds: what `cs` does.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use cs_agent::serve::{accept_loop, Served};
use cs_exec::ExecActor;
use cs_protocol::hello::{ClientHello, HelloReply};
use cs_protocol::PROTOCOL_VERSION;
use cs_transport::endpoint::{agent_endpoint_config, endpoint_on_socket, SERVER_NAME};
use cs_transport::{read_frame, write_frame, Identity, TransportLimits};

use crate::net::{DatagramFaults, SimSocket};
use crate::trace::Trace;

/// One-way latency of the experiment.
pub const LATENCY_MS: u64 = 10;
/// When the laptop-to-agent partition starts: after the Initial arrived, before the Finished.
const PARTITION_START_MS: u64 = 15;
/// How long a client may take in all.
const CLIENT_LIMIT_MS: u64 = 60_000;
const AGENT_PORT: u16 = 4433;

/// Which client the laptop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Raw,
    Ours,
}

/// What happened to one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspectOutcome {
    /// Virtual ms at which the hello was accepted, if it was within [`CLIENT_LIMIT_MS`].
    pub hello_ms: Option<u64>,
    /// The first error the client saw, if any.
    pub first_error: Option<String>,
    /// Connection attempts made.
    pub attempts: u32,
}

/// Runs the experiment once: a partition of `partition_ms` with the agent's idle timeout at
/// `idle_timeout_ms`.
pub fn lost_finished(
    client: Client,
    partition_ms: u64,
    idle_timeout_ms: u64,
) -> Result<SuspectOutcome, String> {
    let limits = TransportLimits {
        idle_timeout_ms,
        ..TransportLimits::default()
    };
    let agent_id = Identity::generate("sim agent").map_err(|e| e.to_string())?;
    let laptop_id = Identity::generate("sim laptop").map_err(|e| e.to_string())?;
    let mut sim = turmoil::Builder::new()
        .rng_seed(partition_ms)
        .simulation_duration(Duration::from_millis(CLIENT_LIMIT_MS + 10_000))
        .min_message_latency(Duration::from_millis(LATENCY_MS))
        .max_message_latency(Duration::from_millis(LATENCY_MS))
        .build();
    let trace = Trace::default();
    {
        let (id, fp, trace, limits) = (
            agent_id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            limits.clone(),
        );
        sim.host("agent", move || {
            let (id, trace, limits) = (id.clone(), trace.clone(), limits.clone());
            async move {
                let trust = Arc::new(crate::scenario::MemTrust(fp));
                let server = cs_transport::server_config(&id, trust.clone(), &limits)?;
                let sock = SimSocket::bind(
                    ([0, 0, 0, 0], AGENT_PORT).into(),
                    "agent0",
                    trace,
                    DatagramFaults::default(),
                    1,
                    None,
                )
                .await?;
                let ep = endpoint_on_socket(
                    agent_endpoint_config(&id),
                    Some(server),
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )?;
                let exec = ExecActor::new(Rc::new(crate::script::ScriptSpawner)).start();
                accept_loop(
                    ep,
                    Served {
                        workspace: "dev".into(),
                        trust,
                        exec,
                        roots: Arc::new(cs_agent::sync::HomeRoots {
                            home: std::path::PathBuf::from("/nonexistent/sim-home"),
                            caches: None,
                        }),
                        sync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        supervisor: None,
                        logs: None,
                        log_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        reverse: Default::default(),
                        rsync_home: None,
                        rsync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        dial: cs_agent::forward::os_dialer(),
                        forward_permits: Arc::new(tokio::sync::Semaphore::new(64)),
                        auto_mode: Default::default(),
                    },
                )
                .await;
                Ok(())
            }
        });
    }
    let out = Rc::new(std::cell::RefCell::new(SuspectOutcome {
        hello_ms: None,
        first_error: None,
        attempts: 0,
    }));
    {
        let (out, trace) = (out.clone(), trace.clone());
        let agent_fp = agent_id.fingerprint();
        sim.client("laptop", async move {
            let sock = SimSocket::bind(
                ([0, 0, 0, 0], 0).into(),
                "laptop",
                trace,
                DatagramFaults::default(),
                2,
                None,
            )
            .await?;
            let ep = endpoint_on_socket(
                quinn::EndpointConfig::default(),
                None,
                sock,
                Arc::new(quinn::TokioRuntime),
            )?;
            let agent: SocketAddr = (turmoil::lookup("agent"), AGENT_PORT).into();
            let start = tokio::time::Instant::now();
            let limit = Duration::from_millis(CLIENT_LIMIT_MS);
            let note = |e: String| {
                let mut o = out.borrow_mut();
                o.first_error.get_or_insert(e);
            };
            while start.elapsed() < limit {
                out.borrow_mut().attempts += 1;
                let ok = match client {
                    Client::Raw => {
                        let cfg = cs_transport::client_config(
                            &laptop_id,
                            agent_fp,
                            &TransportLimits::default(),
                        )?;
                        let r = tokio::time::timeout(
                            limit.saturating_sub(start.elapsed()),
                            raw_hello(&ep, cfg, agent),
                        )
                        .await;
                        match r {
                            Ok(Ok(())) => true,
                            Ok(Err(e)) => {
                                note(e);
                                false
                            }
                            Err(_) => {
                                note(format!("no answer within {CLIENT_LIMIT_MS} ms"));
                                false
                            }
                        }
                    }
                    Client::Ours => {
                        match cs_cli::connect::connect_on(
                            ep.clone(),
                            &laptop_id,
                            agent,
                            agent_fp,
                            None,
                        )
                        .await
                        {
                            Ok(_) => true,
                            Err(e) => {
                                note(e.to_string());
                                false
                            }
                        }
                    }
                };
                if ok {
                    out.borrow_mut().hello_ms = Some(start.elapsed().as_millis() as u64);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        });
    }
    let mut partitioned = false;
    let mut healed = false;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        if !partitioned && now >= PARTITION_START_MS {
            sim.partition_oneway("laptop", "agent");
            partitioned = true;
        }
        if partitioned && !healed && now >= PARTITION_START_MS + partition_ms {
            sim.repair("laptop", "agent");
            healed = true;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let o = out.borrow().clone();
    Ok(o)
}

/// quinn's handshake, then the hello, with no timeout of ours.
async fn raw_hello(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    agent: SocketAddr,
) -> Result<(), String> {
    let conn = ep
        .connect_with(cfg, agent, SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = ClientHello {
        protocol_version: PROTOCOL_VERSION,
        software_version: "sim".into(),
        enroll: None,
    };
    write_frame(&mut s, &hello)
        .await
        .map_err(|e| format!("hello: {e}"))?;
    match read_frame::<_, HelloReply>(&mut r).await {
        Ok(Some(HelloReply::Accepted { .. })) => Ok(()),
        Ok(other) => Err(format!("hello: {other:?}")),
        Err(e) => Err(format!("hello: {e}")),
    }
}
