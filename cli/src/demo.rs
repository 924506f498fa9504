//! `cs demo`: the embedded default. Creates (once) the local sandbox `demo` from a definition
//! with one checkout (a git repository made on this machine) whose manifest has a build hook,
//! a daemon and a cron job; waits for the workspace to be Ready; shows them working; then runs
//! commands in the workspace on the warm connection.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cs_protocol::supervise::{SuperviseReply, SuperviseRequest};

use crate::automation;
use crate::home::CsHome;
use crate::{sandbox, ssh};

/// How long the demo waits for its workspace to be Ready.
const READY_WAIT_MS: u64 = 60_000;

const MANIFEST: &str = r#"env:
- GREETING=hello from the demo
hooks:
  post-checkout:
    cmd: echo "checked out $(git rev-parse --short HEAD)"
  build:
    cmd: echo "built at $(date +%T) from $(git rev-parse --short HEAD)" > build-info; cat build-info
daemons:
  web:
    run:
      cmd: 'while :; do echo "$GREETING: serving, $(cat build-info)"; sleep 2; done'
jobs:
  heartbeat:
    run:
      cmd: echo "tick at $(date +%T)"
    schedule: '* * * * *'
"#;

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(["-c", "user.name=cs demo", "-c", "user.email=demo@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run git: the demo's checkout needs it (apt-get install -y git)")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The demo's repository (a bare one to clone from) and definition, under `$CS_HOME/demo`.
fn prepare(home: &CsHome) -> anyhow::Result<std::path::PathBuf> {
    let dir = home.dir.join("demo");
    let work = dir.join("app");
    let bare = dir.join("app.git");
    if !bare.exists() {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join(".sandbox"))
            .with_context(|| format!("cannot create {}", work.display()))?;
        std::fs::write(work.join(".sandbox/manifest.yaml"), MANIFEST)?;
        std::fs::write(work.join("README"), "The cs demo's application.\n")?;
        git(&work, &["init", "-q", "-b", "main"])?;
        git(&work, &["add", "-A"])?;
        git(&work, &["commit", "-q", "-m", "The demo application"])?;
        git(
            &dir,
            &[
                "clone",
                "-q",
                "--bare",
                "app",
                bare.to_str().context("path")?,
            ],
        )?;
    }
    let def = dir.join("sandbox.yaml");
    std::fs::write(
        &def,
        format!(
            "workspaces:\n- name: dev\n  checkouts:\n  - path: app\n    repo:\n      git: {}\n    version_spec: main\n",
            bare.display()
        ),
    )?;
    Ok(def)
}

pub async fn run(home: &CsHome) -> anyhow::Result<i32> {
    if home.registry()?.sandboxes.contains_key("demo") {
        println!(
            "using the existing local sandbox 'demo' (state in {})",
            home.dir.display()
        );
    } else {
        let def = prepare(home)?;
        println!(
            "creating the local sandbox 'demo' from {} (state in {})",
            def.display(),
            home.dir.display()
        );
        sandbox::create(home, "demo", Some(&def), false).await?;
    }
    let ws = "demo/dev";
    // The start sequence: checkout, hooks, daemons and jobs.
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let s = match automation::ask(home, ws, SuperviseRequest::Status).await? {
            SuperviseReply::Status(s) => s,
            other => return automation::done(other).map(|_| 1),
        };
        let line = format!("{} {}", s.state, s.step.clone().unwrap_or_default());
        if line != last {
            println!("$ cs status -W {ws}");
            automation::print_status(&s, false)?;
            last = line;
        }
        match s.state.as_str() {
            "Ready" => break,
            "Problematic" => return Ok(1),
            _ if start.elapsed() > Duration::from_millis(READY_WAIT_MS) => {
                bail!("{ws} is not Ready after {} s", READY_WAIT_MS / 1000)
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    println!("$ cs ps -W {ws}");
    match automation::ask(home, ws, SuperviseRequest::Ps).await? {
        SuperviseReply::Ps(p) => automation::print_ps(&p, false)?,
        other => automation::done(other)?,
    }
    for (log, n) in [("build:app", 3), ("web", 3)] {
        println!("$ cs logs -W {ws} {log} -n {n}");
        automation::logs(home, ws, log, false, n, false).await?;
    }

    let script =
        "echo \"hello from workspace $CS_WORKSPACE as $USER\"; echo \"home: $PWD\"; uname -sr";
    println!("$ cs ssh -W {ws} -- '{script}'");
    let code = ssh::run(home, ws, Some(script.into()), ssh::PtyMode::Never, false).await?;
    if code != 0 {
        return Ok(code);
    }
    let runs = 20;
    let start = Instant::now();
    for _ in 0..runs {
        let code = ssh::run(home, ws, Some("true".into()), ssh::PtyMode::Never, false).await?;
        anyhow::ensure!(
            code == 0,
            "`true` failed in the workspace with exit code {code}"
        );
    }
    let per = start.elapsed() / runs;
    println!(
        "{runs} more commands on the warm connection: {:.2} ms each",
        per.as_secs_f64() * 1e3
    );
    println!("next: `cs logs -W {ws} web -f`, `cs logs -W {ws} heartbeat` after a minute, `cs build -W {ws} && cs restart -W {ws}`, `cs ssh -W {ws}` for a shell, `cs sandbox delete demo`");
    Ok(0)
}
