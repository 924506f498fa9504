//! Talking to the laptop daemon: connect to its socket, starting it on demand, and replacing a
//! daemon left from another build of cs.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cs_transport::{read_frame, write_frame};
use tokio::net::UnixStream;

use crate::home::CsHome;
use crate::wire::{build_id, Reply, Request};

/// How long `cs` waits for a daemon it started to listen.
const DAEMON_START_WAIT_MS: u64 = 5_000;

/// Connects to the daemon if it is running.
pub async fn connect_existing(home: &CsHome) -> Option<UnixStream> {
    UnixStream::connect(home.socket()).await.ok()
}

/// Connects to the daemon, starting it if needed.
pub async fn connect_or_start(home: &CsHome) -> anyhow::Result<UnixStream> {
    if let Some(s) = connect_existing(home).await {
        return Ok(s);
    }
    start_daemon(home)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DAEMON_START_WAIT_MS);
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(s) = connect_existing(home).await {
            return Ok(s);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the cs daemon did not start within {} ms; see {}",
                DAEMON_START_WAIT_MS,
                home.daemon_log().display()
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

fn start_daemon(home: &CsHome) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the cs executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.daemon_log())
        .with_context(|| format!("cannot open {}", home.daemon_log().display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["daemon", "run"])
        .env("CS_HOME", &home.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the terminal so that
    // Ctrl-C in the shell that started it does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("cannot start the cs daemon")?;
    Ok(())
}

/// Sends one request and reads the reply, replacing a daemon of another build once.
pub async fn request(home: &CsHome, req: &Request) -> anyhow::Result<(UnixStream, Reply)> {
    for attempt in 0..2 {
        let mut s = connect_or_start(home).await?;
        write_frame(&mut s, req)
            .await
            .context("cannot talk to the cs daemon")?;
        let reply = match read_frame::<_, Reply>(&mut s).await {
            Ok(Some(r)) => r,
            // A daemon of an older build closes on a request it cannot read (a variant added
            // since): ask it for its build, which every daemon reads, and replace it.
            Ok(None) | Err(_) if attempt == 0 && other_build(home).await => {
                tracing::info!(
                    "replacing a daemon of another build that could not read the request"
                );
                stop(home).await?;
                continue;
            }
            Ok(None) => bail!("the cs daemon closed the connection"),
            Err(e) => return Err(anyhow::Error::new(e).context("cannot talk to the cs daemon")),
        };
        match reply {
            Reply::WrongBuild { daemon_build } if attempt == 0 => {
                tracing::info!(%daemon_build, "replacing a daemon of another build");
                stop(home).await?;
            }
            reply => return Ok((s, reply)),
        }
    }
    bail!("the cs daemon keeps reporting another build; stop it with `cs daemon stop`")
}

/// Whether the running daemon is of another build than this `cs`.
async fn other_build(home: &CsHome) -> bool {
    let Some(mut s) = connect_existing(home).await else {
        return false;
    };
    let req = Request::Status { build: build_id() };
    if write_frame(&mut s, &req).await.is_err() {
        return false;
    }
    matches!(
        read_frame::<_, Reply>(&mut s).await,
        Ok(Some(Reply::WrongBuild { .. }))
    )
}

/// Stops a running daemon and waits until its socket is gone. Returns whether one ran.
pub async fn stop(home: &CsHome) -> anyhow::Result<bool> {
    let Some(mut s) = connect_existing(home).await else {
        return Ok(false);
    };
    write_frame(&mut s, &Request::Stop).await?;
    let _ = read_frame::<_, Reply>(&mut s).await;
    for _ in 0..250 {
        // Gone when its socket no longer answers and its lock is free (the process exited).
        if connect_existing(home).await.is_none() && lock_is_free(home) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "the cs daemon did not stop; see {}",
        home.daemon_log().display()
    )
}

/// Whether no process holds the daemon's lock.
fn lock_is_free(home: &CsHome) -> bool {
    let Ok(f) = std::fs::File::open(home.daemon_lock()) else {
        return true;
    };
    // Dropping the lock at once releases it again.
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
}
