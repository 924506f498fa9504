//! End-to-end tests of the agent against misbehaving clients: a frame over the size limit and
//! a peer speaking another protocol version. The clients are built from the real transport
//! with the laptop's own (trusted) key, so only the misbehaviour differs.

use cs_protocol::hello::{ClientHello, HelloReply};
use cs_protocol::PROTOCOL_VERSION;
use cs_tests::{text, Laptop};
use cs_transport::endpoint::{client_endpoint, SERVER_NAME};
use cs_transport::{read_frame, write_frame, Fingerprint, Identity, TransportLimits};

fn target(l: &Laptop) -> (std::net::SocketAddr, Fingerprint, Identity) {
    let v = l.show("demo");
    let addr = v[0]["address"].as_str().unwrap().parse().unwrap();
    let fp = v[0]["fingerprint"].as_str().unwrap().parse().unwrap();
    let me = Identity::load_or_create(&l.home().join("identity"), "unused").unwrap();
    (addr, fp, me)
}

async fn connect(
    addr: std::net::SocketAddr,
    fp: Fingerprint,
    me: &Identity,
    version: u32,
) -> (quinn::Connection, Option<HelloReply>) {
    let ep = client_endpoint(addr).unwrap();
    let cfg = cs_transport::client_config(me, fp, &TransportLimits::default()).unwrap();
    let conn = ep
        .connect_with(cfg, addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let hello = ClientHello {
        protocol_version: version,
        software_version: "9.9.9".into(),
        enroll: None,
    };
    write_frame(&mut s, &hello).await.unwrap();
    let reply = read_frame::<_, HelloReply>(&mut r).await.ok().flatten();
    (conn, reply)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn oversized_frame_closes_that_connection_and_the_agent_keeps_serving() {
    let l = Laptop::new();
    l.sandbox("demo");
    let (addr, fp, me) = target(&l);
    let closed = rt().block_on(async {
        let (conn, reply) = connect(addr, fp, &me, PROTOCOL_VERSION).await;
        assert!(
            matches!(reply, Some(HelloReply::Accepted { .. })),
            "{reply:?}"
        );
        let (mut s, _r) = conn.open_bi().await.unwrap();
        // Announce a 64 MiB frame: the agent must refuse it from the header alone.
        s.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed())
            .await
            .expect("agent did not close")
    });
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(u64::from(c.error_code), 2);
            assert!(
                String::from_utf8_lossy(&c.reason).contains("exceeds the limit"),
                "{c:?}"
            );
        }
        other => panic!("unexpected close: {other}"),
    }
    let out = l.run(&["ssh", "--", "echo still-serving"]);
    assert_eq!(
        text(&out.stdout),
        "still-serving\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn another_protocol_version_is_refused_naming_both() {
    let l = Laptop::new();
    l.sandbox("demo");
    let (addr, fp, me) = target(&l);
    let reply = rt().block_on(async { connect(addr, fp, &me, PROTOCOL_VERSION + 41).await.1 });
    match reply {
        Some(HelloReply::Refused { reason }) => {
            assert!(
                reason.contains(&format!("version {}", PROTOCOL_VERSION + 41)),
                "{reason}"
            );
            assert!(
                reason.contains(&format!("version {PROTOCOL_VERSION}")),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
