//! The `cs sync` and `cs mutagen` commands: validate what the user asked for, then hand it to
//! the daemon, which owns the sessions.

use std::path::Path;

use anyhow::{bail, Context as _};
use cs_protocol::sync::IgnoreSpec;

use super::{mode_name, parse_mode, SyncSpec, SyncStatus};
use crate::home::{check_name, CsHome};
use crate::wire::{build_id, Reply, Request, SyncAnswer, SyncCommand};

/// How often `cs sync monitor` and `cs sync flush` look at a session.
const POLL_MS: u64 = 250;

/// What `cs sync create` and `cs mutagen` were given, before validation.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub local: String,
    pub target: String,
    pub name: Option<String>,
    pub mode: Option<String>,
    pub ignore: Vec<String>,
    pub ignore_vcs: bool,
    pub ignore_gitignored: bool,
    /// As given (`--max-entry-count`, `--max-file-size`), parsed in `into_spec`.
    pub max_entry_count: Option<String>,
    pub max_file_size: Option<String>,
}

impl CreateArgs {
    /// Adds Mutagen-style flags (what follows `--` in `cs mutagen`). An unknown flag is refused
    /// by name.
    pub fn add_flags(&mut self, flags: &[String]) -> anyhow::Result<()> {
        let mut it = flags.iter();
        while let Some(f) = it.next() {
            let (key, inline) = match f.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (f.as_str(), None),
            };
            let mut value = || -> anyhow::Result<String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it
                        .next()
                        .cloned()
                        .with_context(|| format!("flag '{key}' needs a value")),
                }
            };
            match key {
                "--name" | "-n" => self.name = Some(value()?),
                "--mode" | "--sync-mode" | "-m" => self.mode = Some(value()?),
                "--ignore" | "-i" => self.ignore.push(value()?),
                "--ignore-vcs" => self.ignore_vcs = true,
                "--no-ignore-vcs" => self.ignore_vcs = false,
                "--ignore-gitignored" => self.ignore_gitignored = true,
                "--max-entry-count" => self.max_entry_count = Some(value()?),
                "--max-file-size" | "--max-staging-file-size" => {
                    self.max_file_size = Some(value()?)
                }
                other => bail!(
                    "unsupported sync flag '{other}': cs accepts --name, --sync-mode, --ignore, --ignore-vcs, --no-ignore-vcs, --ignore-gitignored, --max-entry-count and --max-file-size"
                ),
            }
        }
        Ok(())
    }

    /// Checks everything and returns the spec the daemon will run.
    pub fn into_spec(self, home: &CsHome) -> anyhow::Result<SyncSpec> {
        let local = Path::new(&self.local);
        let meta = std::fs::metadata(local)
            .with_context(|| format!("local path '{}' cannot be synced", self.local))?;
        if !meta.is_dir() {
            bail!(
                "local path '{}' is not a directory: sync roots are directories",
                self.local
            );
        }
        let local = local
            .canonicalize()
            .with_context(|| format!("cannot resolve local path '{}'", self.local))?;
        let Some((ws, remote)) = self.target.split_once(':') else {
            bail!(
                "invalid target '{}': expected SANDBOX/WORKSPACE:PATH",
                self.target
            );
        };
        let reg = home.registry()?;
        let (wsref, _) = reg.resolve(Some(ws))?;
        check_remote_path(remote)?;
        let mode = match &self.mode {
            Some(m) => parse_mode(m).map_err(anyhow::Error::msg)?,
            None => cs_sync::Mode::default(),
        };
        let name = match self.name {
            Some(n) => {
                check_name("sync session", &n)?;
                n
            }
            None => default_name(&local),
        };
        let max_entry_count = match &self.max_entry_count {
            Some(v) => {
                parse_count(v).with_context(|| format!("invalid --max-entry-count '{v}'"))?
            }
            None => super::ENTRY_COUNT_MAX_DEFAULT,
        };
        let max_file_size = match &self.max_file_size {
            Some(v) => parse_size(v).with_context(|| format!("invalid --max-file-size '{v}'"))?,
            None => super::FILE_SIZE_MAX_DEFAULT,
        };
        let ignore = IgnoreSpec {
            patterns: self.ignore,
            vcs: self.ignore_vcs,
            gitignored: self.ignore_gitignored,
            max_file_size: Some(max_file_size),
        };
        // Patterns are checked now, so a typo is an error here and not a dead session.
        ignore.ignorer().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(SyncSpec {
            name,
            local,
            workspace: wsref.to_string(),
            remote: remote.to_string(),
            mode,
            ignore,
            max_entry_count,
            paused: false,
        })
    }
}

/// A positive count, with an optional k/M suffix (powers of 1000): `500000`, `2M`.
pub fn parse_count(v: &str) -> anyhow::Result<u64> {
    let (digits, mult) = match v.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1_000),
        None => match v.strip_suffix('M') {
            Some(d) => (d, 1_000_000),
            None => (v, 1),
        },
    };
    scaled(digits, mult, "a number such as 500000 or 2M")
}

/// A positive size in bytes, with an optional suffix: K/M/G/T (powers of 1024, also as KiB
/// ...) or KB/MB/GB/TB (powers of 1000): `100MiB`, `4G`, `500MB`.
pub fn parse_size(v: &str) -> anyhow::Result<u64> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => bail!(
            "unknown unit '{unit}': use B, KiB, MiB, GiB, TiB (or K, M, G, T) or KB, MB, GB, TB"
        ),
    };
    scaled(digits, mult, "a size such as 100MiB or 4G")
}

/// `digits` times `mult`, positive and without overflow; errors say what was `expected`.
fn scaled(digits: &str, mult: u64, expected: &str) -> anyhow::Result<u64> {
    let n: u64 = digits
        .parse()
        .with_context(|| format!("expected {expected}"))?;
    match n.checked_mul(mult) {
        Some(n) if n > 0 => Ok(n),
        _ => bail!("expected a positive value, {expected}"),
    }
}

/// A workspace path must stay in the workspace home: relative, or `~/...`, no `..`.
pub fn check_remote_path(p: &str) -> anyhow::Result<()> {
    let rel = p
        .strip_prefix("~/")
        .unwrap_or(if p == "~" { "" } else { p });
    if rel.starts_with('/') {
        bail!("invalid workspace path '{p}': give it relative to the workspace home, or as ~/PATH");
    }
    if rel.split('/').any(|c| c == "..") {
        bail!("invalid workspace path '{p}': '..' would leave the workspace home");
    }
    if p.contains('\0') {
        bail!("invalid workspace path '{p}': it contains a NUL byte");
    }
    Ok(())
}

/// A session name from the local directory's name: lowercase, with other characters as '-'.
fn default_name(local: &Path) -> String {
    let base = local
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').chars().take(50).collect();
    if name.is_empty() {
        name = "sync".into();
    }
    name
}

async fn ask(home: &CsHome, cmd: SyncCommand) -> anyhow::Result<SyncAnswer> {
    let (_, reply) = crate::client::request(
        home,
        &Request::Sync {
            build: build_id(),
            cmd,
        },
    )
    .await?;
    match reply {
        Reply::Sync(a) => Ok(a),
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

/// `cs sync create` / `cs mutagen`: prints the session's name.
pub async fn create(home: &CsHome, args: CreateArgs) -> anyhow::Result<()> {
    let spec = args.into_spec(home)?;
    match ask(home, SyncCommand::Create(spec)).await? {
        SyncAnswer::Created(name) => {
            println!("{name}");
            Ok(())
        }
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

async fn list_sessions(home: &CsHome) -> anyhow::Result<Vec<SyncStatus>> {
    match ask(home, SyncCommand::List).await? {
        SyncAnswer::List(l) => Ok(l),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

fn status_line(s: &SyncStatus) -> String {
    let mut extra = String::new();
    if let Some(h) = &s.halted {
        extra.push_str(&format!(" HALTED: {h}"));
    }
    if let Some(e) = &s.last_error {
        extra.push_str(&format!(" (last error: {e})"));
    }
    format!(
        "{:<16} {:<11} {} <-> {} [{}] conflicts {} problems {} cycles {}{extra}",
        s.name, s.state, s.alpha, s.beta, s.mode, s.conflicts, s.problems, s.cycles
    )
}

/// `cs sync list [--json]`.
pub async fn list(home: &CsHome, json: bool) -> anyhow::Result<()> {
    let l = list_sessions(home).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else if l.is_empty() {
        println!("no sync sessions; create one with `cs sync create LOCAL SANDBOX/WORKSPACE:PATH`");
    } else {
        for s in &l {
            println!("{}", status_line(s));
        }
    }
    Ok(())
}

/// `cs sync pause|resume|reset|terminate NAME`.
pub async fn control(home: &CsHome, cmd: SyncCommand) -> anyhow::Result<()> {
    match ask(home, cmd).await? {
        SyncAnswer::Done => Ok(()),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

/// `cs sync flush NAME`: returns once a full cycle found both sides in agreement.
pub async fn flush(home: &CsHome, name: &str) -> anyhow::Result<()> {
    match ask(home, SyncCommand::Flush(name.to_string())).await? {
        SyncAnswer::Done => Ok(()),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

/// `cs sync conflicts NAME [--json]`.
pub async fn conflicts(home: &CsHome, name: &str, json: bool) -> anyhow::Result<()> {
    let list = match ask(home, SyncCommand::Conflicts(name.to_string())).await? {
        SyncAnswer::Conflicts(c) => c,
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no conflicts in {name}");
    } else {
        for c in &list {
            println!("{} ({})", c.path, c.reason);
            println!("  ancestor: {}", c.ancestor);
            println!("  alpha:    {}", c.alpha);
            println!("  beta:     {}", c.beta);
        }
    }
    Ok(())
}

/// `cs sync monitor NAME`: the session's live status until Ctrl-C.
pub async fn monitor(home: &CsHome, name: &str) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    let mut last = String::new();
    // The transfer rate over the last few polls: (when, bytes done).
    let mut recent: std::collections::VecDeque<(tokio::time::Instant, u64)> = Default::default();
    loop {
        let l = list_sessions(home).await?;
        let Some(s) = l.iter().find(|s| s.name == name) else {
            bail!(
                "unknown sync session '{name}'; known: {}",
                l.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if let Some(p) = &s.progress {
            let now = tokio::time::Instant::now();
            if recent.back().is_some_and(|(_, b)| *b > p.bytes_done) {
                recent.clear();
            }
            recent.push_back((now, p.bytes_done));
            if recent.len() > RATE_POLLS {
                recent.pop_front();
            }
            let rate = match (recent.front(), recent.back()) {
                (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                    (b1 - b0) as f64 / (*t1 - *t0).as_secs_f64()
                }
                _ => 0.0,
            };
            let line = progress_line(&s.name, p, rate);
            if line != last {
                println!("{line}");
                last = line;
            }
            tokio::time::sleep(std::time::Duration::from_millis(POLL_MS)).await;
            continue;
        }
        recent.clear();
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "{} | to beta {} files {} | to alpha {} files {} | {:.1} MB/s",
            status_line(s),
            s.files_to_beta,
            human_bytes(s.bytes_to_beta),
            s.files_to_alpha,
            human_bytes(s.bytes_to_alpha),
            (s.bytes_to_alpha + s.bytes_to_beta) as f64 / 1e6 / secs
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        tokio::time::sleep(std::time::Duration::from_millis(POLL_MS)).await;
    }
}

/// Polls the transfer rate is averaged over.
const RATE_POLLS: usize = 8;

/// `NAME [#########-----------] 45% 36000/80000 files 512.0 MiB/1.07 GiB 45.2 MB/s ETA 12 s`
fn progress_line(name: &str, p: &super::Progress, rate: f64) -> String {
    const WIDTH: u64 = 24;
    let frac = if p.bytes_total > 0 {
        p.bytes_done as f64 / p.bytes_total as f64
    } else if p.files_total > 0 {
        p.files_done as f64 / p.files_total as f64
    } else {
        1.0
    };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    let eta = if rate > 0.0 {
        format!(
            " ETA {:.0} s",
            p.bytes_total.saturating_sub(p.bytes_done) as f64 / rate
        )
    } else {
        String::new()
    };
    format!(
        "{name} [{bar}] {:>3.0}% {}/{} files {}/{} {:.1} MB/s{eta}",
        frac * 100.0,
        p.files_done,
        p.files_total,
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total),
        rate / 1e6
    )
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// For messages: the mode a spec runs in.
pub fn describe(spec: &SyncSpec) -> String {
    format!(
        "{} {} <-> {}",
        mode_name(spec.mode),
        spec.local.display(),
        spec.beta()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_stay_in_the_home() {
        for ok in ["src", "~/src", "a/b", "~", "."] {
            check_remote_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["/etc", "../x", "~/../x", "a/../../b"] {
            let e = check_remote_path(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn progress_line_shows_files_bytes_rate_and_eta() {
        let p = crate::sync::Progress {
            files_total: 80_000,
            files_done: 36_000,
            bytes_total: 1 << 30,
            bytes_done: 1 << 29,
        };
        let line = progress_line("k", &p, 50e6);
        assert!(line.starts_with("k [############------------]  50% 36000/80000 files 512.0 MiB/1.00 GiB 50.0 MB/s ETA 11 s"), "{line}");
    }

    #[test]
    fn limits_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_count("500000").unwrap(), 500_000);
        assert_eq!(parse_count("2M").unwrap(), 2_000_000);
        assert_eq!(parse_count("10k").unwrap(), 10_000);
        for bad in ["", "0", "-1", "12XB", "1.5G", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for bad in ["", "0", "x", "1.5M", "99999999999999999M"] {
            assert!(parse_count(bad).is_err(), "{bad}");
        }
        let mut a = CreateArgs::default();
        a.add_flags(&[
            "--max-entry-count=2M".into(),
            "--max-staging-file-size".into(),
            "1G".into(),
        ])
        .unwrap();
        assert_eq!(a.max_entry_count.as_deref(), Some("2M"));
        assert_eq!(a.max_file_size.as_deref(), Some("1G"));
    }

    #[test]
    fn mutagen_flags_parse_and_unknown_ones_are_refused_by_name() {
        let mut a = CreateArgs::default();
        a.add_flags(&[
            "--ignore-vcs".into(),
            "--ignore=*.tmp".into(),
            "--ignore".into(),
            "build/".into(),
            "--sync-mode=one-way-replica".into(),
        ])
        .unwrap();
        assert!(a.ignore_vcs);
        assert_eq!(a.ignore, vec!["*.tmp", "build/"]);
        assert_eq!(a.mode.as_deref(), Some("one-way-replica"));
        let e = a
            .add_flags(&["--symlink-mode=posix-raw".into()])
            .unwrap_err();
        assert!(e.to_string().contains("--symlink-mode"), "{e}");
        let e = a.add_flags(&["--ignore".into()]).unwrap_err();
        assert!(e.to_string().contains("--ignore"), "{e}");
    }

    #[test]
    fn default_names_are_valid_session_names() {
        for (dir, want) in [
            ("/home/jack/Backend", "backend"),
            ("/x/my_app.v2", "my-app-v2"),
            ("/", "sync"),
        ] {
            let n = default_name(Path::new(dir));
            assert_eq!(n, want);
            check_name("sync session", &n).unwrap();
        }
    }
}
