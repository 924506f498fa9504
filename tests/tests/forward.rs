//! Port forwarding end to end: the real `cs` (its daemon holds the forwards) and a local
//! sandbox's real `cs-agent`, with real servers started by the test on loopback. A local
//! sandbox's workspace is this machine, so "a server in the workspace" is a listener here,
//! and the laptop's end of an auto-discovered forward cannot have the same port (the
//! workspace's server holds it): the forward moves to a free port and says so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cs_tests::{text, wait_until, Laptop};

const WAIT: Duration = Duration::from_secs(30);
/// Held by the tests that fill the link, so that they do not run at the same time.
static HEAVY: Mutex<()> = Mutex::new(());

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The deterministic content of byte `i` of a stream seeded `seed`.
fn content(seed: u64, from: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = from + k as u64;
        let x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        *b = (x >> 56) as u8;
    }
}

/// A tiny HTTP/1.0 server on a thread: `GET /bytes/N` answers N bytes of `content(7, ..)`;
/// `POST /hash` answers the blake3 of the body (read to the client's half-close when it has
/// no length); `GET /echo` echoes every byte until EOF. Each connection on its own thread.
struct Server {
    port: u16,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Stops listening: the port closes (connections already accepted go on).
    fn close(&self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept(2) the server's thread is blocked in; the socket stops listening.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

fn serve_http(listener: TcpListener) -> Server {
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = Arc::new(listener);
    let (l, st) = (listener.clone(), stop.clone());
    std::thread::spawn(move || loop {
        match l.accept() {
            Ok((conn, _)) => {
                std::thread::spawn(move || {
                    let _ = handle(conn);
                });
            }
            Err(_) if st.load(Ordering::SeqCst) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    });
    Server {
        port,
        listener,
        stop,
    }
}

fn handle(conn: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut len: Option<u64> = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path) {
        ("GET", p) if p.starts_with("/bytes/") => {
            let n: u64 = p["/bytes/".len()..].parse().unwrap_or(0);
            write!(w, "HTTP/1.0 200 OK\r\nContent-Length: {n}\r\n\r\n")?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut sent = 0;
            while sent < n {
                let k = buf.len().min((n - sent) as usize);
                content(7, sent, &mut buf[..k]);
                w.write_all(&buf[..k])?;
                sent += k as u64;
            }
        }
        ("POST", "/hash") => {
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let want = match len {
                    Some(l) if got >= l => break,
                    Some(l) => buf.len().min((l - got) as usize),
                    None => buf.len(),
                };
                let k = r.read(&mut buf[..want])?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                got += k as u64;
            }
            let body = format!("{} {got}", h.finalize().to_hex());
            write!(
                w,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
        ("GET", "/echo") => {
            write!(w, "HTTP/1.0 200 OK\r\n\r\n")?;
            let mut buf = [0u8; 16 * 1024];
            loop {
                let k = r.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                w.write_all(&buf[..k])?;
            }
        }
        _ => write!(w, "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")?,
    }
    w.flush()?;
    let _ = w.shutdown(Shutdown::Write);
    Ok(())
}

/// Connects to a forward's local port, retrying while the listener is not up yet.
fn connect(port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(WAIT)).unwrap();
                return s;
            }
            Err(e) if start.elapsed() < WAIT => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to 127.0.0.1:{port}: {e}"),
        }
    }
}

/// Reads an HTTP/1.0 response to EOF: (status line, body).
fn response(mut s: TcpStream) -> (String, Vec<u8>) {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read response");
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&all[..at]).to_string();
    (
        head.lines().next().unwrap_or("").to_string(),
        all[at + 4..].to_vec(),
    )
}

/// A foreground `cs portforward`, its printed lines collected.
struct Pf {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Pf {
    fn start(l: &Laptop, args: &[&str]) -> Pf {
        let mut all = vec!["portforward"];
        all.extend_from_slice(args);
        let mut child = l
            .cmd(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cs portforward");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Pf { child, lines }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a printed line containing every one of `words`; returns it.
    fn wait_line(&self, words: &[&str]) -> String {
        let mut found = None;
        let ok = wait_until(WAIT, || {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .cloned();
            found.is_some()
        });
        assert!(ok, "no line with {words:?}; printed:\n{}", self.text());
        found.unwrap()
    }
}

impl Drop for Pf {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sessions, as `cs portforward list --json` gives them.
fn list(l: &Laptop) -> serde_json::Value {
    serde_json::from_str(&l.ok(&["portforward", "list", "--json"])).expect("list --json")
}

/// The forward of the first session whose local end is `local`, if any.
fn find_forward(l: &Laptop, local: &str) -> Option<serde_json::Value> {
    let all = list(l);
    for s in all.as_array().unwrap() {
        for f in s["forwards"].as_array().unwrap() {
            if f["local"] == local {
                return Some(f.clone());
            }
        }
    }
    None
}

fn forward(l: &Laptop, local: &str) -> serde_json::Value {
    find_forward(l, local)
        .unwrap_or_else(|| panic!("no forward listening on {local}: {:#}", list(l)))
}

#[test]
fn a_gigabyte_each_way_through_one_forward_arrives_intact() {
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let _pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    const N: u64 = 1 << 30;

    // Down: the server's bytes, hashed here and compared with the same bytes hashed locally.
    let mut s = connect(local);
    write!(s, "GET /bytes/{N} HTTP/1.0\r\n\r\n").unwrap();
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut head = String::new();
    while r.read_line(&mut head).unwrap() > 2 && !head.ends_with("\r\n\r\n") {}
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let (mut got, mut want) = (blake3::Hasher::new(), blake3::Hasher::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut exp = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        got.update(&buf[..k]);
        content(7, n, &mut exp[..k]);
        want.update(&exp[..k]);
        n += k as u64;
    }
    assert_eq!(n, N, "bytes received");
    assert_eq!(got.finalize(), want.finalize(), "content hash");

    // Up: 1 GiB posted with no length, ended by the half-close; the server answers its hash
    // after the half-close, on the same connection.
    let mut s = connect(local);
    write!(s, "POST /hash HTTP/1.0\r\n\r\n").unwrap();
    let mut h = blake3::Hasher::new();
    let mut sent = 0u64;
    while sent < N {
        content(11, sent, &mut buf);
        s.write_all(&buf).unwrap();
        h.update(&buf);
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let (status, body) = response(s);
    assert!(status.contains("200"), "{status}");
    assert_eq!(text(&body), format!("{} {N}", h.finalize().to_hex()));

    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert!(f["bytes_in"].as_u64().unwrap() > N, "{f}");
    assert!(f["bytes_out"].as_u64().unwrap() > N, "{f}");
    assert_eq!(f["total"], 2, "{f}");
}

#[test]
fn two_hundred_concurrent_connections_each_get_their_own_bytes() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let _pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    connect(local);
    // All 200 open at once (a barrier), each echoing its own 64 KiB, half-closing, and
    // checking it got back exactly what it sent.
    let barrier = Arc::new(std::sync::Barrier::new(200));
    let threads: Vec<_> = (0..200u64)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut s = connect(local);
                write!(s, "GET /echo HTTP/1.0\r\n\r\n").unwrap();
                barrier.wait();
                let mut mine = vec![0u8; 64 * 1024];
                content(1000 + i, 0, &mut mine);
                let mut w = s.try_clone().unwrap();
                let sent = mine.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let (status, body) = response(s);
                writer.join().unwrap();
                assert!(status.contains("200"), "{i}: {status}");
                assert!(
                    body == mine,
                    "connection {i}: got {} bytes, not its own",
                    body.len()
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a connection failed");
    }
    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert_eq!(f["total"], 201, "{f}");
    assert!(wait_until(WAIT, || forward(
        &l,
        &format!("127.0.0.1:{local}")
    )["open"]
        == 0));
}

/// Bulk connections must not hold up an interactive one on the same QUIC connection: while
/// eight downloads keep the link full, each 64-byte echo comes back after the downloads have
/// moved only a little more. The median over 20 echoes must stay under 16 MiB (two stream
/// windows). quinn's round robin gave medians of 3-5 MiB (alone, and with this file's other
/// tests running) and 11.6 MiB on a machine also running another test binary; quinn with
/// `send_fairness(false)`, which sends a busy stream until it has nothing left, gave 38, 59
/// and 70 MiB. Bulk streams taking 1 MiB turns below every other stream (`cs_forward::turns`)
/// gave medians of 2.3-9.8 MiB in 8 runs, against 2.6-12.4 MiB for round robin in 5 runs of
/// the same session: what the echo waits behind is mostly datagrams already queued. Run
/// apart from the gigabyte test, whose load would stretch every echo.
#[test]
fn an_echo_is_answered_while_downloads_fill_the_link() {
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let _pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    connect(local);
    let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let downloads: Vec<_> = (0..8)
        .map(|_| {
            let (moved, stop) = (moved.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut s = connect(local);
                write!(s, "GET /bytes/{} HTTP/1.0\r\n\r\n", 256u64 << 20).unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => moved.fetch_add(k as u64, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    assert!(
        wait_until(WAIT, || moved.load(Ordering::Relaxed) > 32 << 20),
        "the downloads did not start"
    );
    let mut echo = connect(local);
    write!(echo, "GET /echo HTTP/1.0\r\n\r\n").unwrap();
    let mut head = [0u8; 19];
    echo.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.0 200 OK\r\n\r\n");
    let mut during = Vec::new();
    for i in 0..20u8 {
        let before = moved.load(Ordering::Relaxed);
        echo.write_all(&[i; 64]).unwrap();
        let mut back = [0u8; 64];
        echo.read_exact(&mut back).unwrap();
        assert_eq!(back, [i; 64]);
        during.push(moved.load(Ordering::Relaxed) - before);
    }
    let total = moved.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    drop(echo);
    for d in downloads {
        d.join().unwrap();
    }
    during.sort_unstable();
    eprintln!("download bytes moved during each echo, sorted: {during:?}");
    assert!(
        total < 8 * (256 << 20),
        "the downloads ended before the echoes did: nothing was measured"
    );
    assert!(
        during[10] < 16 << 20,
        "download bytes moved during each echo, sorted: {during:?}"
    );
}

#[test]
fn ports_opened_later_are_forwarded_and_removed_when_closed() {
    let l = Laptop::new();
    l.sandbox("pf");
    let pf = Pf::start(&l, &["-W", "pf"]);
    pf.wait_line(&["Ctrl-C"]);
    // A server that starts after the forward: found, forwarded on a free local port (its
    // own is held by the server itself, this being one machine), and reachable there.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve_http(listener);
    let moved = pf.wait_line(&[&format!("workspace port {port}:"), "instead"]);
    assert!(
        moved.contains(&format!("local port {port} is already in use")),
        "{moved}"
    );
    let line = pf.wait_line(&[
        "forwarding 127.0.0.1:",
        &format!("-> workspace port {port}"),
    ]);
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the local port");
    assert_ne!(local, port);
    let mut s = connect(local);
    write!(s, "GET /bytes/1000 HTTP/1.0\r\n\r\n").unwrap();
    let (status, body) = response(s);
    assert!(status.contains("200") && body.len() == 1000, "{status}");
    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert_eq!(f["kind"], "auto");
    assert!(
        f["process"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("pid {}", std::process::id())),
        "the owning process is named: {f}"
    );
    // The server goes: so does the forward, and its local port.
    server.close();
    pf.wait_line(&[&format!("workspace port {port} closed")]);
    assert!(
        wait_until(WAIT, || TcpStream::connect(("127.0.0.1", local)).is_err()),
        "the local end closes with it"
    );
}

#[test]
fn a_reader_that_does_not_read_holds_the_server_back() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let _pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    let mut s = connect(local);
    // The server would send 4 GiB; the client reads a little, then stops reading.
    write!(s, "GET /bytes/{} HTTP/1.0\r\n\r\n", 4u64 << 30).unwrap();
    let mut b = [0u8; 4096];
    s.read_exact(&mut b).unwrap();
    let key = format!("127.0.0.1:{local}");
    // Let every buffer on the way fill: the stream's window (8 MiB) and the sockets' buffers.
    let mut last = 0;
    assert!(
        wait_until(WAIT, || {
            std::thread::sleep(Duration::from_millis(500));
            let now = forward(&l, &key)["bytes_in"].as_u64().unwrap();
            let still = now == last;
            last = now;
            still
        }),
        "the forward stops moving bytes the client does not read"
    );
    assert!(
        last < 64 << 20,
        "held back after {last} bytes, not buffered without bound"
    );
    // And reading again moves it on.
    let mut more = vec![0u8; 32 << 20];
    s.read_exact(&mut more).unwrap();
}

#[test]
fn a_supervised_daemons_port_is_forwarded_under_its_name() {
    let l = Laptop::new();
    let port = free_port();
    let def = format!(
        "workspaces:\n- name: dev\n  system:\n    daemons:\n    - name: api\n      run:\n        cmd: exec {} {port}\n",
        env!("CARGO_BIN_EXE_listen")
    );
    let file = l.dir.path().join("def.yaml");
    std::fs::write(&file, def).unwrap();
    l.ok(&[
        "sandbox",
        "create",
        "pf",
        "--local",
        "-f",
        file.to_str().unwrap(),
    ]);
    let pf = Pf::start(&l, &["-W", "pf"]);
    let line = pf.wait_line(&[&format!("-> workspace port {port} (daemon api)")]);
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the local port");
    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert_eq!(f["daemon"], "api", "{f}");
    let mut s = connect(local);
    s.write_all(b"hello api").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello api");
    // Stopped by the supervisor: the port closes and its forward goes.
    l.ok(&["stop", "-W", "pf", "api"]);
    pf.wait_line(&[&format!("workspace port {port} closed")]);
}

#[test]
fn dash_pf_forwards_only_the_rules() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    pf.wait_line(&[&format!("forwarding 127.0.0.1:{local}")]);
    let later = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    // Without -PF a new port is forwarded within a poll (0.5 s); give it ten.
    std::thread::sleep(Duration::from_secs(5));
    let all = list(&l);
    let forwards = all[0]["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), 1, "{all:#}");
    assert_eq!(all[0]["auto"], false);
    assert!(!pf
        .text()
        .contains(&format!("workspace port {}", later.port)));
    let mut s = connect(local);
    write!(s, "GET /bytes/10 HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(response(s).1.len(), 10);
}

#[test]
fn an_idle_connection_outlives_the_transport_idle_timeout() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let _pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    let mut s = connect(local);
    write!(s, "GET /echo HTTP/1.0\r\n\r\n").unwrap();
    let mut head = [0u8; 19];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.0 200 OK\r\n\r\n");
    s.write_all(b"before").unwrap();
    let mut b = [0u8; 6];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"before");
    // A debugger sits silent for longer than QUIC's idle timeout (10 s): keep-alives hold
    // the connection, so nothing is lost or re-made.
    std::thread::sleep(Duration::from_secs(13));
    s.write_all(b"after!").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after!");
    let status = l.ok(&["daemon", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        v["links"][0]["connects"], 1,
        "one connection all along: {v:#}"
    );
}

#[test]
fn dash_r_reaches_a_laptop_server_from_the_workspace() {
    let l = Laptop::new();
    l.sandbox("pf");
    let laptop_server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let remote = free_port();
    let pf = Pf::start(
        &l,
        &[
            "-W",
            "pf",
            "-PF",
            "-R",
            &format!("{remote}:{}", laptop_server.port),
        ],
    );
    pf.wait_line(&[&format!("127.0.0.1:{remote} in the workspace")]);
    // From inside the workspace (its shell, through cs ssh) to the laptop's server.
    let out = l.run(&[
        "ssh",
        "-W",
        "pf",
        "bash",
        "-c",
        &format!(
            "'exec 3<>/dev/tcp/127.0.0.1/{remote}; printf \"GET /bytes/5 HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'"
        ),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = out.stdout;
    assert!(out.starts_with(b"HTTP/1.0 200"), "{out:?}");
    let mut want = [0u8; 5];
    content(7, 0, &mut want);
    assert!(out.ends_with(&want), "{out:?}");
    // And a plain client of the workspace's port.
    let mut s = connect(remote);
    write!(s, "GET /bytes/100000 HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(response(s).1.len(), 100_000);
}

#[test]
fn a_refused_remote_port_resets_the_client_and_is_noted_once() {
    let l = Laptop::new();
    l.sandbox("pf");
    let (local, dead) = (free_port(), free_port());
    let pf = Pf::start(&l, &["-W", "pf", "-PF", "-L", &format!("{local}:{dead}")]);
    pf.wait_line(&[&format!("forwarding 127.0.0.1:{local}")]);
    for _ in 0..3 {
        let mut s = connect(local);
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the client sees a reset: {r:?}"
        );
    }
    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert_eq!(f["refused"], 3, "{f}");
    let why = f["last_error"].as_str().unwrap().to_string();
    assert!(
        why.contains(&format!("nothing listens on 127.0.0.1:{dead}")),
        "{why}"
    );
    let noted = pf.text().matches("nothing listens on").count();
    assert_eq!(noted, 1, "noted once, not per connection:\n{}", pf.text());
}

#[test]
fn unix_sockets_on_both_ends() {
    let l = Laptop::new();
    l.sandbox("pf");
    let dir = l.dir.path();
    let remote = dir.join("remote.sock");
    let local = dir.join("local.sock");
    let listener = std::os::unix::net::UnixListener::bind(&remote).unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    let rule = format!("{}:{}", local.display(), remote.display());
    let pf = Pf::start(&l, &["-W", "pf", "-PF", "-L", &rule]);
    pf.wait_line(&["forwarding", local.to_str().unwrap()]);
    let mut s = std::os::unix::net::UnixStream::connect(&local).unwrap();
    s.write_all(b"over unix sockets").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "over unix sockets");
    // TCP on the laptop to a Unix socket in the workspace (-L 5432:/run/...).
    let port = free_port();
    let _pf2 = Pf::start(
        &l,
        &[
            "-W",
            "pf",
            "-PF",
            "-L",
            &format!("{port}:{}", remote.display()),
        ],
    );
    let mut s = connect(port);
    s.write_all(b"tcp to unix").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "tcp to unix");
    drop(pf);
    assert!(
        wait_until(WAIT, || !local.exists()),
        "the local socket is removed when the session stops"
    );
}

#[test]
fn forwards_outlive_a_reconnect() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let pf = Pf::start(
        &l,
        &["-W", "pf", "-PF", "-L", &format!("{local}:{}", server.port)],
    );
    let mut open = connect(local);
    write!(open, "GET /echo HTTP/1.0\r\n\r\n").unwrap();
    let mut head = [0u8; 19];
    open.read_exact(&mut head).unwrap();
    // The agent dies (the machine rebooted, say): the open connection is closed, cleanly,
    // and counted; the daemon restarts the local agent and the listener never closed.
    let pid = l.agent_pid("pf", "dev");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut rest = Vec::new();
    let r = open.read_to_end(&mut rest);
    assert!(r.is_ok(), "closed with a FIN, not a reset: {r:?}");
    let mut s = connect(local);
    write!(s, "GET /bytes/4096 HTTP/1.0\r\n\r\n").unwrap();
    let (status, body) = response(s);
    assert!(status.contains("200") && body.len() == 4096, "{status}");
    let f = forward(&l, &format!("127.0.0.1:{local}"));
    assert_eq!(f["lost"], 1, "{f}");
    pf.wait_line(&["connection to the workspace lost"]);
}

#[test]
fn detached_sessions_are_listed_and_stopped() {
    let l = Laptop::new();
    l.sandbox("pf");
    let server = serve_http(TcpListener::bind("127.0.0.1:0").unwrap());
    let local = free_port();
    let out = l.ok(&[
        "portforward",
        "-W",
        "pf",
        "-PF",
        "--detach",
        "--name",
        "web",
        "-L",
        &format!("{local}:{}", server.port),
    ]);
    assert!(out.contains("cs portforward stop web"), "{out}");
    let mut s = connect(local);
    write!(s, "GET /bytes/123 HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(response(s).1.len(), 123);
    let human = l.ok(&["portforward", "list"]);
    assert!(human.contains("web on pf/dev (detached)"), "{human}");
    assert!(
        human.contains(&format!("127.0.0.1:{local} -> 127.0.0.1:{}", server.port)),
        "{human}"
    );
    // It outlives the daemon: the next one starts it again.
    l.ok(&["daemon", "stop"]);
    assert!(wait_until(WAIT, || find_forward(
        &l,
        &format!("127.0.0.1:{local}")
    )
    .is_some()));
    let mut s = connect(local);
    write!(s, "GET /bytes/7 HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(response(s).1.len(), 7);
    let dup = l.run(&[
        "portforward",
        "-W",
        "pf",
        "-PF",
        "--detach",
        "--name",
        "web",
        "-L",
        "1:2",
    ]);
    assert!(!dup.status.success());
    l.ok(&["portforward", "stop", "web"]);
    assert!(list(&l).as_array().unwrap().is_empty());
    assert!(TcpStream::connect(("127.0.0.1", local)).is_err());
    let gone = l.run(&["portforward", "stop", "web"]);
    assert!(text(&gone.stderr).contains("no port-forward session named 'web'"));
}

#[test]
fn bad_input_gets_one_line_naming_it() {
    let l = Laptop::new();
    l.sandbox("pf");
    let check = |args: &[&str], says: &str| {
        let mut all = vec!["portforward"];
        all.extend_from_slice(args);
        let out = l.run(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    };
    check(&["-W", "pf", "-L", "8080"], "bad forwarding rule '8080'");
    check(
        &["-W", "pf", "-L", "x:80"],
        "expected -L [BIND:]LOCAL:[HOST:]REMOTE",
    );
    check(&["-W", "pf", "-R", "1:2:3:4:5"], "expected -R");
    check(&["-W", "nosuch", "-L", "1:2"], "nosuch");
    check(&["-W", "pf", "-PF"], "nothing to forward");
    check(
        &["-W", "pf", "--name", "a b", "-L", "1:2"],
        "bad session name 'a b'",
    );
    // A local port in use: named, with who holds it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    check(
        &["-W", "pf", "-PF", "-L", &format!("{port}:80")],
        &format!(
            "local port {port} is already in use (by pid {}",
            std::process::id()
        ),
    );
    // Nothing was left listening by the failed sessions.
    assert!(list(&l).as_array().unwrap().is_empty());
}
