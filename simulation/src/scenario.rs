//! The standard two-node scenario: a laptop runs commands in a workspace over a lossy,
//! partitioned network. Safety: every command's output arrives whole and in order, or the
//! command is reported failed. Liveness: after the partition heals, a command succeeds before
//! the deadline.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use cs_agent::serve::{accept_loop, Served, Trust};
use cs_agent::state::EnrollError;
use cs_exec::{ClientEvent, ExecActor, ExecClient};
use cs_protocol::exec::{ExecOutput, ExecStart, ExitStatus};
use cs_protocol::hello::{ClientHello, HelloReply};
use cs_protocol::{StreamOpen, PROTOCOL_VERSION};
use cs_transport::endpoint::{agent_endpoint_config, endpoint_on_socket, SERVER_NAME};
use cs_transport::{read_frame, write_frame, Fingerprint, Identity, TransportLimits, TrustPolicy};
use rand::{Rng, SeedableRng};

use crate::net::SimSocket;
use crate::script::pattern;
use crate::trace::Trace;

/// Commands the laptop runs in the safety phase.
const COMMANDS: usize = 12;
/// Virtual time by which the liveness command must have succeeded.
const LIVENESS_DEADLINE_MS: u64 = 90_000;
/// Handshake plus hello budget, as the daemon uses.
const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// One command's budget before the laptop gives up on it.
const COMMAND_TIMEOUT_MS: u64 = 20_000;
/// Wall-clock budget of one seed: an always-ready task would freeze virtual time.
const WALL_LIMIT_MS: u64 = 60_000;

/// The faults one seed draws (swarm testing: each seed its own mix).
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Probability that a datagram is dropped, duplicated, corrupted.
    pub loss: f64,
    pub duplicate: f64,
    pub corrupt: f64,
    pub latency_max_ms: u64,
    /// Partition between the nodes: start and length, in virtual ms.
    pub partition: Option<(u64, u64)>,
    /// Bytes each command prints.
    pub output_bytes: Vec<u64>,
}

impl Faults {
    pub fn draw(seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
        let loss = if rng.gen_bool(0.2) {
            0.0
        } else {
            rng.gen_range(0.0..0.30)
        };
        let duplicate = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.0..0.05)
        };
        let corrupt = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.0..0.02)
        };
        let partition = rng
            .gen_bool(0.6)
            .then(|| (rng.gen_range(50..3_000), rng.gen_range(100..8_000)));
        let output_bytes = (0..COMMANDS + 1)
            .map(|_| rng.gen_range(0..200_000))
            .collect();
        Self {
            loss,
            duplicate,
            corrupt,
            latency_max_ms: rng.gen_range(1..60),
            partition,
            output_bytes,
        }
    }

    fn datagrams(&self) -> crate::net::DatagramFaults {
        crate::net::DatagramFaults {
            loss: self.loss,
            duplicate: self.duplicate,
            corrupt: self.corrupt,
        }
    }
}

/// What one seed did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub faults: Faults,
    pub hash: u64,
    pub events: u64,
    pub commands_ok: usize,
    pub commands_failed: usize,
    pub virtual_ms: u64,
}

/// Trusts exactly one laptop key, in memory.
#[derive(Debug)]
struct MemTrust(Fingerprint);

impl TrustPolicy for MemTrust {
    fn admits(&self, client: &Fingerprint, _now_unix: u64) -> bool {
        client.ct_eq(&self.0)
    }
}

impl Trust for MemTrust {
    fn is_trusted(&self, fp: &Fingerprint) -> bool {
        fp.ct_eq(&self.0)
    }
    fn enroll(
        &self,
        _: Fingerprint,
        id: &str,
        _: &[u8],
        _: &[u8],
        _: u64,
    ) -> anyhow::Result<Result<(), EnrollError>> {
        Ok(Err(EnrollError::UnknownToken(id.to_string())))
    }
}

fn quinn_seed(seed: u64, node: u8) -> [u8; 32] {
    let mut out = [node; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out
}

static PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Tasks and actors swallow panics; this hook records them so that the seed fails.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(info.to_string());
            default(info);
        }));
    });
}

/// Runs one seed. `Err` is a violated invariant, a panic or a missed deadline.
pub fn run_seed(seed: u64, trace: Trace) -> Result<Outcome, String> {
    install_panic_hook();
    PANICS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let outcome = run_seed_inner(seed, trace);
    let panics = std::mem::take(&mut *PANICS.lock().unwrap_or_else(|p| p.into_inner()));
    match (outcome, panics.first()) {
        (_, Some(p)) => Err(format!("seed {seed}: panic: {p}")),
        (o, None) => o,
    }
}

fn run_seed_inner(seed: u64, trace: Trace) -> Result<Outcome, String> {
    let faults = Faults::draw(seed);
    let agent_id = Identity::generate("sim agent").map_err(|e| e.to_string())?;
    let laptop_id = Identity::generate("sim laptop").map_err(|e| e.to_string())?;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(LIVENESS_DEADLINE_MS + 30_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(faults.latency_max_ms))
        .build();

    {
        let (id, laptop_fp, trace, dg) = (
            agent_id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            faults.datagrams(),
        );
        sim.host("agent", move || {
            let (id, trace) = (id.clone(), trace.clone());
            async move {
                let trust = Arc::new(MemTrust(laptop_fp));
                let server =
                    cs_transport::server_config(&id, trust.clone(), &TransportLimits::default())?;
                let mut cfg = agent_endpoint_config(&id);
                cfg.rng_seed(Some(quinn_seed(seed, 1)));
                let sock =
                    SimSocket::bind("0.0.0.0:4433".parse()?, "agent", trace, dg, seed ^ 0xa6e7)
                        .await?;
                let ep =
                    endpoint_on_socket(cfg, Some(server), sock, Arc::new(quinn::TokioRuntime))?;
                let exec = ExecActor::new(Rc::new(crate::script::ScriptSpawner)).start();
                accept_loop(
                    ep,
                    Served {
                        workspace: "dev".into(),
                        trust,
                        exec,
                    },
                )
                .await;
                Ok(())
            }
        });
    }

    let result: Rc<std::cell::RefCell<(usize, usize)>> = Rc::default();
    {
        let (faults, trace, result) = (faults.clone(), trace.clone(), result.clone());
        let agent_fp = agent_id.fingerprint();
        sim.client("laptop", async move {
            let sock = SimSocket::bind(
                "0.0.0.0:0".parse()?,
                "laptop",
                trace.clone(),
                faults.datagrams(),
                seed ^ 0x1a97,
            )
            .await?;
            let mut cfg = quinn::EndpointConfig::default();
            cfg.rng_seed(Some(quinn_seed(seed, 2)));
            let ep = endpoint_on_socket(cfg, None, sock, Arc::new(quinn::TokioRuntime))?;
            let agent: SocketAddr = (turmoil::lookup("agent"), 4433).into();
            let client_cfg =
                cs_transport::client_config(&laptop_id, agent_fp, &TransportLimits::default())?;
            let mut conn: Option<quinn::Connection> = None;
            let start = tokio::time::Instant::now();
            for (i, &bytes) in faults.output_bytes.iter().enumerate() {
                let liveness = i == COMMANDS;
                loop {
                    if start.elapsed() > Duration::from_millis(LIVENESS_DEADLINE_MS) {
                        return Err(format!(
                            "liveness: command {i} did not succeed by {LIVENESS_DEADLINE_MS} ms"
                        )
                        .into());
                    }
                    let c = match conn.as_ref().filter(|c| c.close_reason().is_none()) {
                        Some(c) => c.clone(),
                        None => match connect(&ep, client_cfg.clone(), agent, &trace).await {
                            Ok(c) => {
                                conn = Some(c.clone());
                                c
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        },
                    };
                    match run_command(&c, bytes, &trace).await? {
                        true => {
                            result.borrow_mut().0 += 1;
                            break;
                        }
                        false => {
                            result.borrow_mut().1 += 1;
                            // Safety-phase commands may fail; the liveness command must not
                            // fail forever: it is retried until the deadline.
                            if !liveness {
                                break;
                            }
                        }
                    }
                }
            }
            trace.event("laptop", "done", 0);
            Ok(())
        });
    }

    let wall = std::time::Instant::now();
    let mut partitioned = false;
    loop {
        if wall.elapsed() > Duration::from_millis(WALL_LIMIT_MS) {
            return Err(format!("seed {seed}: wall-clock watchdog fired after {WALL_LIMIT_MS} ms (frozen virtual time?)"));
        }
        let now_ms = sim.elapsed().as_millis() as u64;
        if let Some((at, len)) = faults.partition {
            let inside = now_ms >= at && now_ms < at + len;
            if inside && !partitioned {
                trace.event("net", "partition", len);
                sim.partition("laptop", "agent");
                partitioned = true;
            } else if !inside && partitioned {
                trace.event("net", "repair", 0);
                sim.repair("laptop", "agent");
                partitioned = false;
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("seed {seed}: {e}")),
        }
    }
    let (ok, failed) = *result.borrow();
    Ok(Outcome {
        seed,
        faults,
        hash: trace.hash(),
        events: trace.events(),
        commands_ok: ok,
        commands_failed: failed,
        virtual_ms: sim.elapsed().as_millis() as u64,
    })
}

async fn connect(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    agent: SocketAddr,
    trace: &Trace,
) -> Result<quinn::Connection, String> {
    let fut = async {
        let conn = ep
            .connect_with(cfg, agent, SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = ClientHello {
            protocol_version: PROTOCOL_VERSION,
            software_version: "sim".into(),
            enroll: None,
        };
        write_frame(&mut s, &hello)
            .await
            .map_err(|e| e.to_string())?;
        match read_frame::<_, HelloReply>(&mut r)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(HelloReply::Accepted { .. }) => Ok(conn),
            other => Err(format!("hello refused: {other:?}")),
        }
    };
    // A handshake that does not finish in time is abandoned (the lost-Finished stall).
    let r = match tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), fut).await {
        Ok(r) => r,
        Err(_) => Err("handshake timeout".into()),
    };
    trace.event(
        "laptop",
        if r.is_ok() {
            "connected"
        } else {
            "connect.failed"
        },
        0,
    );
    r
}

/// Runs `emit BYTES 3`. Ok(true): exit delivered with exactly the expected output. Ok(false):
/// reported failed. Err: an invariant broke (output delivered wrong but called a success).
async fn run_command(conn: &quinn::Connection, bytes: u64, trace: &Trace) -> Result<bool, String> {
    let fut = async {
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let open = StreamOpen::Exec(ExecStart {
            command: Some(format!("emit {bytes} 3")),
            pty: None,
        });
        write_frame(&mut s, &open)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = ExecClient::new();
        let mut out: Vec<u8> = Vec::new();
        loop {
            let ev = match read_frame::<_, ExecOutput>(&mut r).await {
                Ok(Some(m)) => client.handle_output(m),
                Ok(None) => client.handle_stream_end("ended"),
                Err(e) => client.handle_stream_end(&e.to_string()),
            };
            match ev {
                Some(ClientEvent::Stdout(d)) => out.extend_from_slice(&d),
                Some(ClientEvent::Exited(st)) => return Ok::<_, String>(Some((st, out))),
                Some(ClientEvent::Failed(_)) => return Ok(None),
                _ => {}
            }
        }
    };
    let res = match tokio::time::timeout(Duration::from_millis(COMMAND_TIMEOUT_MS), fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => None,
    };
    match res {
        Some((status, out)) => {
            trace.event("laptop", "exec.exited", out.len() as u64);
            // Always: a delivered exit comes with the whole output, in order, exactly once.
            if status != ExitStatus::Code(3) {
                return Err(format!(
                    "invariant: exit status {status:?}, expected Code(3)"
                ));
            }
            if out.len() as u64 != bytes
                || out.iter().enumerate().any(|(i, b)| *b != pattern(i as u64))
            {
                return Err(format!(
                    "invariant: output of {} bytes differs from the {bytes} expected",
                    out.len()
                ));
            }
            Ok(true)
        }
        None => {
            trace.event("laptop", "exec.failed", 0);
            Ok(false)
        }
    }
}
