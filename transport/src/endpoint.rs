//! quinn endpoints for both sides, with the transport settings and limits in one place.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::identity::{Fingerprint, Identity};
use crate::pin::{PinnedClients, PinnedServer, TrustPolicy};
use crate::{crypto_provider, pairing};

/// The server name both sides use; identity comes from the pinned key, not from a name.
pub const SERVER_NAME: &str = "cs-agent";

/// Building an endpoint or its configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Connection-level limits and timers.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// A connection with no traffic for this long is dead (keep-alives prevent it while up).
    pub idle_timeout_ms: u64,
    /// Interval of keep-alive pings on an otherwise idle connection.
    pub keep_alive_ms: u64,
    /// Concurrent bidirectional streams the peer may open (forwarded connections are one
    /// each; an open beyond it waits for one to end).
    pub streams_bidi_max: u32,
    /// Flow-control window of one stream.
    pub stream_window_bytes: u32,
    /// Flow-control window of the whole connection, both ways (what the peer may send
    /// before we read it, and what we buffer before the peer acknowledges it): the bound on a
    /// session's memory in QUIC's buffers. It must hold [`BUSY_STREAMS_FAIR`] full stream
    /// windows: quinn wakes the streams blocked on a full connection window last-blocked
    /// first, so when it binds, the same few streams take every byte freed and the others
    /// starve (a forwarded download went 13 s without a byte while 15 others moved).
    pub connection_window_bytes: u32,
    /// Largest UDP payload path MTU discovery may try. The peer's own bound (what its
    /// endpoint accepts, [`DATAGRAM_BYTES_MAX`] on a real socket) caps it too, and binds first.
    pub udp_payload_bytes_max: u16,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            streams_bidi_max: 1024,
            stream_window_bytes: STREAM_WINDOW_BYTES,
            connection_window_bytes: BUSY_STREAMS_FAIR * STREAM_WINDOW_BYTES,
            udp_payload_bytes_max: LARGE_DATAGRAM_BYTES,
        }
    }
}

/// A stream's flow-control window: 8 MiB in flight keeps one stream at 80 MB/s over a
/// 100 ms round trip.
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Streams that can each have a full window in flight at once before the connection window
/// binds (and quinn's wake order starts to favour some of them, see
/// [`TransportLimits::connection_window_bytes`]).
pub const BUSY_STREAMS_FAIR: u32 = 32;

/// The longest an endpoint is asked to wait before acknowledging.
const ACK_DELAY_MS_MAX: u64 = 5;

fn transport_config(
    limits: &TransportLimits,
) -> Result<Arc<quinn::TransportConfig>, EndpointError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(limits.idle_timeout_ms))
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_millis(limits.keep_alive_ms)))
        .max_concurrent_bidi_streams(limits.streams_bidi_max.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(limits.stream_window_bytes.into())
        .receive_window(limits.connection_window_bytes.into())
        .send_window(u64::from(limits.connection_window_bytes))
        .initial_rtt(Duration::from_millis(100));
    // Ask the peer to acknowledge within 5 ms instead of QUIC's default 25 ms: a lost packet
    // at the end of a small message (an edit, its answer) is only found by the probe
    // timeout, which waits for the peer's ack delay on top of the round trip. A few more
    // ACKs on a busy link are cheap; an edit stuck 20 ms longer on a lossy one is not.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.max_ack_delay(Some(Duration::from_millis(ACK_DELAY_MS_MAX)));
    t.ack_frequency_config(Some(acks));
    // Datagrams carry only tail-loss probes (`probe`), which nobody reads: a small buffer.
    t.datagram_receive_buffer_size(Some(crate::probe::PROBE_BUFFER_BYTES))
        .datagram_send_buffer_size(crate::probe::PROBE_BUFFER_BYTES);
    // BBR paces at the measured bandwidth instead of halving its window at every loss: on a
    // link that drops a few percent of datagrams at random, a loss-based window stays a few
    // packets wide and a 20 KB save takes several round trips.
    // Its window is capped on a path that holds almost nothing itself (`crate::window`).
    t.congestion_controller_factory(Arc::new(crate::window::CappedFactory::new(
        quinn::congestion::BbrConfig::default(),
    )));
    // Path MTU discovery may probe past Ethernet sizes, up to what the peer accepts
    // (`DATAGRAM_BYTES_MAX` on real sockets: see there).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(limits.udp_payload_bytes_max);
    t.mtu_discovery_config(Some(mtu));
    Ok(Arc::new(t))
}

/// The laptop's configuration for connecting to an agent whose key is `agent`.
pub fn client_config(
    me: &Identity,
    agent: Fingerprint,
    limits: &TransportLimits,
) -> Result<quinn::ClientConfig, EndpointError> {
    let provider = crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer::new(agent, provider)))
        .with_client_auth_cert(vec![me.certificate()], me.private_key())?;
    tls.alpn_protocols = vec![cs_protocol::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(limits)?);
    Ok(cfg)
}

/// The agent's configuration: its own identity, and whom to admit.
pub fn server_config(
    me: &Identity,
    policy: Arc<dyn TrustPolicy>,
    limits: &TransportLimits,
) -> Result<quinn::ServerConfig, EndpointError> {
    let provider = crypto_provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PinnedClients::new(policy, provider)))
        .with_single_cert(vec![me.certificate()], me.private_key())?;
    tls.alpn_protocols = vec![cs_protocol::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    // The address-validation token key derives from the agent's identity, like its reset key:
    // tokens it issued stay valid across its restarts, and a simulation seeded with a fixed
    // identity gets a fixed key.
    let token_secret = me.derive_secret("cs address token key v1");
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&token_secret);
    let mut cfg = quinn::ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
    cfg.transport_config(transport_config(limits)?);
    Ok(cfg)
}

/// The agent's endpoint configuration. Its stateless-reset key is derived from the agent's
/// identity, so an agent that restarted answers packets of connections it lost with a reset the
/// laptop accepts, and the laptop learns at once that its connection is gone instead of after
/// the idle timeout.
pub fn agent_endpoint_config(me: &Identity) -> quinn::EndpointConfig {
    let secret = me.derive_secret("cs stateless reset key v1");
    quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &secret,
    )))
}

/// QUIC's largest UDP payload (a datagram of up to 64 KiB, as loopback carries).
pub const LARGE_DATAGRAM_BYTES: u16 = 65_527;

/// The largest UDP payload a real endpoint accepts, and says it accepts in its transport
/// parameters, which is also the most the peer ever sends whatever path MTU discovery finds.
///
/// Large: on loopback datagrams grow to 65,495 bytes (`loopback_datagrams_grow_past_ethernet_size`),
/// which more than doubles what a forward moves and halves its CPU per byte. This needs two
/// things beside it: [`crate::gso::GsoBounded`] on every real socket (an offload batch over
/// 64 KiB is refused by the kernel), and [`crate::window::Capped`] (without it BBR's window
/// outgrew the receiver's socket buffer, datagrams were dropped, and
/// `an_echo_is_answered_while_downloads_fill_the_link` failed in 2 of 13 runs).
pub const DATAGRAM_BYTES_MAX: u16 = LARGE_DATAGRAM_BYTES;

/// An endpoint configuration that accepts datagrams up to `bytes`.
fn datagrams_up_to(mut config: quinn::EndpointConfig, bytes: u16) -> quinn::EndpointConfig {
    config
        .max_udp_payload_size(bytes)
        .expect("a UDP payload between 1,200 and 65,527 bytes, within quinn's bounds");
    config
}

/// The agent's endpoint on a real UDP socket.
pub fn agent_endpoint(
    me: &Identity,
    server: quinn::ServerConfig,
    listen: std::net::SocketAddr,
) -> Result<quinn::Endpoint, EndpointError> {
    agent_endpoint_with(me, server, listen, DATAGRAM_BYTES_MAX)
}

/// [`agent_endpoint`], accepting datagrams up to `datagram_bytes`.
fn agent_endpoint_with(
    me: &Identity,
    server: quinn::ServerConfig,
    listen: std::net::SocketAddr,
    datagram_bytes: u16,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = std::net::UdpSocket::bind(listen)?;
    big_buffers(&socket);
    real_endpoint(
        datagrams_up_to(agent_endpoint_config(me), datagram_bytes),
        Some(server),
        socket,
    )
}

/// Kernel buffer of each UDP socket, each way. The default (208 KiB) overflows under a bulk
/// transfer: a port-forward benchmark saw 565,761 datagrams dropped on the agent's socket in
/// one run, and QUIC's retransmissions tripled the CPU per GB.
pub const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Asks for [`UDP_BUFFER_BYTES`] both ways: past `net.core.rmem_max` when privileged (the
/// FORCE options), else up to it. Best effort: a smaller buffer still works, only slower.
fn big_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let size = UDP_BUFFER_BYTES as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: `fd` is an open socket and `size` a c_int, as setsockopt wants.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// An endpoint on any UDP socket implementation: the real one above, or a simulated network's.
/// `config` carries the stateless-reset key and, in a simulation, a fixed RNG seed.
pub fn endpoint_on_socket(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint, EndpointError> {
    Ok(quinn::Endpoint::new_with_abstract_socket(
        config, server, socket, runtime,
    )?)
}

/// The TLS exporter value that binds an enrollment proof to this connection.
pub fn enroll_exporter(conn: &quinn::Connection) -> Result<[u8; 32], EndpointError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, pairing::EXPORTER_LABEL, b"")
        .map_err(|_| EndpointError::Quic("TLS exporter unavailable".into()))?;
    Ok(out)
}

/// The fingerprint of the key the peer presented on `conn`.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_certificate(certs.first()?).ok()
}

/// A client endpoint on a real UDP socket bound to an ephemeral port of the right family.
pub fn client_endpoint(for_addr: std::net::SocketAddr) -> Result<quinn::Endpoint, EndpointError> {
    client_endpoint_with(for_addr, DATAGRAM_BYTES_MAX)
}

/// [`client_endpoint`], accepting datagrams up to `datagram_bytes`.
fn client_endpoint_with(
    for_addr: std::net::SocketAddr,
    datagram_bytes: u16,
) -> Result<quinn::Endpoint, EndpointError> {
    let bind: std::net::SocketAddr = if for_addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    big_buffers(&socket);
    real_endpoint(
        datagrams_up_to(quinn::EndpointConfig::default(), datagram_bytes),
        None,
        socket,
    )
}

/// An endpoint on a real UDP socket, its offload batches kept within one IP packet
/// ([`crate::gso`]).
fn real_endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, EndpointError> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(crate::gso::GsoBounded::new(
        runtime.wrap_udp_socket(socket)?,
    ));
    endpoint_on_socket(config, server, socket, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[derive(Debug)]
    struct Only(Fingerprint);
    impl TrustPolicy for Only {
        fn admits(&self, c: &Fingerprint, _now_unix: u64) -> bool {
            c.ct_eq(&self.0)
        }
    }

    async fn server(agent: &Identity, trusted: Fingerprint) -> (quinn::Endpoint, SocketAddr) {
        server_with(agent, trusted, &TransportLimits::default()).await
    }

    async fn server_with(
        agent: &Identity,
        trusted: Fingerprint,
        limits: &TransportLimits,
    ) -> (quinn::Endpoint, SocketAddr) {
        let cfg = server_config(agent, Arc::new(Only(trusted)), limits).unwrap();
        let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        (ep, addr)
    }

    async fn try_connect(
        me: &Identity,
        pin: Fingerprint,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, String> {
        try_connect_with(me, pin, addr, &TransportLimits::default()).await
    }

    async fn try_connect_with(
        me: &Identity,
        pin: Fingerprint,
        addr: SocketAddr,
        limits: &TransportLimits,
    ) -> Result<quinn::Connection, String> {
        let ep = client_endpoint(addr).unwrap();
        let cfg = client_config(me, pin, limits).unwrap();
        let conn = ep
            .connect_with(cfg, addr, SERVER_NAME)
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        // The server's verdict on our certificate arrives after our side completes; a stream
        // round trip proves the server accepted us.
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(b"x").await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        r.read_to_end(10).await.map_err(|e| e.to_string())?;
        Ok(conn)
    }

    async fn echo_one(ep: quinn::Endpoint) {
        while let Some(inc) = ep.accept().await {
            if let Ok(conn) = inc.await {
                if let Ok((mut s, mut r)) = conn.accept_bi().await {
                    let data = r.read_to_end(10).await.unwrap_or_default();
                    let _ = s.write_all(&data).await;
                    let _ = s.finish();
                    let _ = s.stopped().await;
                }
            }
        }
    }

    /// The default windows' ratio, scaled down to 256 KiB streams so that the test moves
    /// tens of MiB rather than gigabytes: 16 streams (fewer than [`BUSY_STREAMS_FAIR`]) each
    /// send 4 MiB at once; when the first has arrived whole, every other has arrived at least
    /// three quarters (97-99% in runs of this test). With a connection window of 4 stream
    /// windows instead (the old 32 MiB for 8 MiB streams), quinn's last-blocked-first wake
    /// order left the slowest stream with 8-33% at that point in 7 of 8 runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_streams_share_the_connection_fairly() {
        const STREAMS: usize = 16;
        const EACH: usize = 4 << 20;
        let d = TransportLimits::default();
        assert!(d.connection_window_bytes >= BUSY_STREAMS_FAIR * d.stream_window_bytes);
        let stream_window = 256 * 1024;
        let limits = TransportLimits {
            stream_window_bytes: stream_window,
            connection_window_bytes: d.connection_window_bytes / d.stream_window_bytes
                * stream_window,
            ..d
        };
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let (ep, addr) = server_with(&agent, laptop.fingerprint(), &limits).await;
        let got: Arc<Vec<std::sync::atomic::AtomicUsize>> =
            Arc::new((0..STREAMS).map(|_| Default::default()).collect());
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Vec<usize>>();
        let first_tx = Arc::new(std::sync::Mutex::new(Some(first_tx)));
        let server = {
            let got = got.clone();
            tokio::spawn(async move {
                let conn = ep.accept().await.unwrap().await.unwrap();
                // The handshake's test stream.
                let (mut s, mut r) = conn.accept_bi().await.unwrap();
                let x = r.read_to_end(10).await.unwrap();
                s.write_all(&x).await.unwrap();
                s.finish().unwrap();
                let mut readers = Vec::new();
                for _ in 0..STREAMS {
                    let (_s, mut r) = conn.accept_bi().await.unwrap();
                    let (got, first_tx) = (got.clone(), first_tx.clone());
                    readers.push(tokio::spawn(async move {
                        let mut head = [0u8; 1];
                        r.read_exact(&mut head).await.unwrap();
                        let i = usize::from(head[0]);
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Some(n) = r.read(&mut buf).await.unwrap() {
                            got[i].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        let snapshot = got
                            .iter()
                            .map(|g| g.load(std::sync::atomic::Ordering::Relaxed))
                            .collect();
                        if let Some(tx) = first_tx.lock().unwrap().take() {
                            let _ = tx.send(snapshot);
                        }
                    }));
                }
                for r in readers {
                    r.await.unwrap();
                }
                conn
            })
        };
        let conn = try_connect_with(&laptop, agent.fingerprint(), addr, &limits)
            .await
            .unwrap();
        let mut writers = Vec::new();
        for i in 0..STREAMS {
            let (mut s, _r) = conn.open_bi().await.unwrap();
            writers.push(tokio::spawn(async move {
                s.write_all(&[i as u8]).await.unwrap();
                let chunk = vec![i as u8; 64 * 1024];
                for _ in 0..EACH / chunk.len() {
                    s.write_all(&chunk).await.unwrap();
                }
                s.finish().unwrap();
                s.stopped().await.ok();
            }));
        }
        let limit = std::time::Duration::from_secs(120);
        let first = tokio::time::timeout(limit, first_rx)
            .await
            .unwrap()
            .unwrap();
        let slowest = *first.iter().min().unwrap();
        assert!(
            slowest >= EACH / 4 * 3,
            "when the first stream had all {EACH} bytes, one had only {slowest}: {first:?}"
        );
        for w in writers {
            tokio::time::timeout(limit, w).await.unwrap().unwrap();
        }
        let _conn = tokio::time::timeout(limit, server).await.unwrap().unwrap();
        assert!(got
            .iter()
            .all(|g| g.load(std::sync::atomic::Ordering::Relaxed) == EACH));
    }

    #[tokio::test]
    async fn pinned_peers_connect_and_see_each_other() {
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let (ep, addr) = server(&agent, laptop.fingerprint()).await;
        tokio::spawn(echo_one(ep));
        let conn = try_connect(&laptop, agent.fingerprint(), addr)
            .await
            .unwrap();
        assert_eq!(peer_fingerprint(&conn), Some(agent.fingerprint()));
    }

    /// Pokes in a burst send one probe, a later burst another; the peer takes them as 1-byte
    /// datagrams and the stream traffic is untouched.
    #[tokio::test]
    async fn a_burst_of_pokes_sends_one_probe_datagram() {
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let (ep, addr) = server(&agent, laptop.fingerprint()).await;
        let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut s, mut r) = conn.accept_bi().await.unwrap();
            let data = r.read_to_end(10).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.finish().unwrap();
            while let Ok(d) = conn.read_datagram().await {
                if tx.send(d.to_vec()).is_err() {
                    break;
                }
            }
        });
        let conn = try_connect(&laptop, agent.fingerprint(), addr)
            .await
            .unwrap();
        let probe = crate::TailProbe::new(conn.clone());
        let limit = std::time::Duration::from_secs(5);
        for _ in 0..10 {
            probe.clone().poke();
        }
        assert_eq!(
            tokio::time::timeout(limit, got.recv()).await.unwrap(),
            Some(vec![0])
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            got.try_recv().is_err(),
            "ten pokes in a burst sent more than one probe"
        );
        probe.poke();
        assert_eq!(
            tokio::time::timeout(limit, got.recv()).await.unwrap(),
            Some(vec![0])
        );
        assert_eq!(conn.stats().frame_tx.datagram, 2);
        // A probe without a connection sends nothing, anywhere.
        crate::TailProbe::none().poke();
    }

    #[tokio::test]
    async fn wrong_agent_key_is_refused_by_the_laptop() {
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let impostor_pin = Identity::generate("other").unwrap().fingerprint();
        let (ep, addr) = server(&agent, laptop.fingerprint()).await;
        tokio::spawn(echo_one(ep));
        let err = try_connect(&laptop, impostor_pin, addr).await.unwrap_err();
        assert!(err.contains("does not match the pinned"), "{err}");
    }

    #[tokio::test]
    async fn untrusted_client_is_refused_by_the_agent() {
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let stranger = Identity::generate("stranger").unwrap();
        let (ep, addr) = server(&agent, laptop.fingerprint()).await;
        tokio::spawn(echo_one(ep));
        assert!(try_connect(&stranger, agent.fingerprint(), addr)
            .await
            .is_err());
    }

    /// A client that presents the trusted certificate but signs with another key must fail:
    /// the handshake signature is verified, not just the fingerprint compared.
    #[tokio::test]
    async fn stolen_certificate_without_key_is_refused() {
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let thief_key = Identity::generate("thief").unwrap().private_key();
        let (ep, addr) = server(&agent, laptop.fingerprint()).await;
        tokio::spawn(echo_one(ep));

        let provider = crypto_provider();
        // rustls checks that the key matches the certificate when given both, so hand it a
        // resolver that skips that check, as an attacker's own client would.
        #[derive(Debug)]
        struct Mismatched(Arc<rustls::sign::CertifiedKey>);
        impl rustls::client::ResolvesClientCert for Mismatched {
            fn resolve(
                &self,
                _: &[&[u8]],
                _: &[rustls::SignatureScheme],
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                Some(self.0.clone())
            }
            fn has_certs(&self) -> bool {
                true
            }
        }
        let signing = provider.key_provider.load_private_key(thief_key).unwrap();
        let ck = Arc::new(rustls::sign::CertifiedKey::new(
            vec![laptop.certificate()],
            signing,
        ));
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer::new(
                agent.fingerprint(),
                provider,
            )))
            .with_client_cert_resolver(Arc::new(Mismatched(ck)));
        tls.alpn_protocols = vec![cs_protocol::ALPN.to_vec()];
        let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        cfg.transport_config(transport_config(&TransportLimits::default()).unwrap());
        let ep = client_endpoint(addr).unwrap();
        let result = async {
            let conn = ep
                .connect_with(cfg, addr, SERVER_NAME)
                .unwrap()
                .await
                .map_err(|e| e.to_string())?;
            let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.finish().map_err(|e| e.to_string())?;
            r.read_to_end(10).await.map_err(|e| e.to_string())
        }
        .await;
        assert!(result.is_err(), "a client without the private key got in");
    }

    /// Real endpoints that accept large datagrams: on loopback (MTU 64 KiB) path MTU discovery
    /// takes the connection well past 1,472 bytes, and nothing is lost on the way. Without
    /// `GsoBounded`, quinn's 10-datagram offload batches of 64 KiB datagrams were refused by
    /// the kernel, quinn saw a burst of losses, declared a black hole and went to 1,200 bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_datagrams_grow_past_ethernet_size() {
        const BYTES: usize = 64 << 20;
        let agent = Identity::generate("agent").unwrap();
        let laptop = Identity::generate("laptop").unwrap();
        let limits = TransportLimits::default();
        let cfg = server_config(&agent, Arc::new(Only(laptop.fingerprint())), &limits).unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let ep = agent_endpoint_with(&agent, cfg, listen, LARGE_DATAGRAM_BYTES).unwrap();
        let addr = ep.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut s, mut r) = conn.accept_bi().await.unwrap();
            let x = r.read_to_end(10).await.unwrap();
            s.write_all(&x).await.unwrap();
            s.finish().unwrap();
            let (_s, mut r) = conn.accept_bi().await.unwrap();
            let mut n = 0;
            let mut buf = vec![0u8; 256 * 1024];
            while let Some(k) = r.read(&mut buf).await.unwrap() {
                n += k;
            }
            (n, conn.stats())
        });
        let cep = client_endpoint_with(addr, LARGE_DATAGRAM_BYTES).unwrap();
        let cfg = client_config(&laptop, agent.fingerprint(), &limits).unwrap();
        let conn = cep
            .connect_with(cfg, addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(b"x").await.unwrap();
        s.finish().unwrap();
        r.read_to_end(10).await.unwrap();
        let (mut s, _r) = conn.open_bi().await.unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..BYTES / chunk.len() {
            s.write_all(&chunk).await.unwrap();
        }
        s.finish().unwrap();
        let (n, server_stats) = server.await.unwrap();
        assert_eq!(n, BYTES);
        let st = conn.stats();
        assert!(
            st.path.current_mtu > 1472,
            "path MTU stayed at {} bytes on loopback; laptop {:?}, agent {:?}",
            st.path.current_mtu,
            st.path,
            server_stats.path
        );
        // Nothing was lost on loopback: a loss here is a batch the kernel refused.
        assert_eq!(st.path.black_holes_detected, 0, "{:?}", st.path);
        assert_eq!(st.path.lost_packets, 0, "{:?}", st.path);
    }
}
