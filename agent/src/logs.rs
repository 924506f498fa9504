//! The log actor's shell: each supervised program's output into its own rotated file under
//! `ROOT/var/log/sandbox`, and `cs logs` served from those files and from a live feed.
//!
//! The agent owns the pipes, so it cuts the bytes into numbered records (`cs_log::line`) and
//! rotates between two records by renaming (`cs_log::rotate`): no line is cut or lost by a
//! rotation, and numbering carries on across rotations and agent restarts. A follow reads the
//! files up to where the feed starts and then the feed; a follower that falls behind the feed
//! reads the files again from its last sequence number, so it never skips or repeats a line.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cs_log::line::{since, Record, Splitter};
use cs_log::rotate::Policy;
use tokio::sync::broadcast;

/// Records a live follower may fall behind by before it goes back to the files.
const FEED_RECORDS: usize = 1024;
/// Lines `cs logs` shows by default, and the most `-n` may ask for.
pub const LAST_DEFAULT: u32 = 100;
pub const LAST_MAX: u32 = 100_000;
/// Logs open at once (each is a file handle and a feed).
pub const LOGS_MAX: usize = 1024;

fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where records' times come from: the system clock, or the simulation's virtual one.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A log name as a file name: `/` and `%` are escaped, so names of steps on nested checkout
/// paths (`build:src/app`) stay one file, and two names never share one.
pub fn file_stem(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

struct Log {
    file: Option<File>,
    size: u64,
    splitter: Splitter,
    feed: broadcast::Sender<Record>,
}

/// Every log of the workspace.
#[derive(Clone)]
pub struct LogHub {
    dir: PathBuf,
    policy: Policy,
    clock: Clock,
    logs: Arc<Mutex<BTreeMap<String, Log>>>,
}

impl std::fmt::Debug for LogHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHub").field("dir", &self.dir).finish()
    }
}

impl LogHub {
    pub fn new(dir: PathBuf, policy: Policy) -> Self {
        Self::with_clock(dir, policy, Arc::new(system_ms))
    }

    pub fn with_clock(dir: PathBuf, policy: Policy, clock: Clock) -> Self {
        Self {
            dir,
            policy,
            clock,
            logs: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The stored lines of a log, oldest first, across its rotated files.
    fn stored(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for f in self.policy.files(&file_stem(name)) {
            if let Ok(file) = File::open(self.path(&f)) {
                out.extend(BufReader::new(file).lines().map_while(Result::ok));
            }
        }
        out
    }

    /// The sequence number after the last stored record.
    fn next_seq(&self, name: &str) -> u64 {
        for f in self.policy.files(&file_stem(name)).iter().rev() {
            let Ok(file) = File::open(self.path(f)) else {
                continue;
            };
            let last = BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| Record::parse(&l))
                .last();
            if let Some(r) = last {
                return r.seq + 1;
            }
        }
        1
    }

    fn with_log<T>(&self, name: &str, f: impl FnOnce(&mut Log) -> T) -> T {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if !logs.contains_key(name) && logs.len() >= LOGS_MAX {
            // Drop a log nobody follows; its file stays.
            let idle = logs
                .iter()
                .find(|(_, l)| l.feed.receiver_count() == 0)
                .map(|(k, _)| k.clone());
            if let Some(k) = idle {
                logs.remove(&k);
            }
        }
        let log = logs.entry(name.to_string()).or_insert_with(|| Log {
            file: None,
            size: 0,
            splitter: Splitter::new(self.next_seq(name)),
            feed: broadcast::channel(FEED_RECORDS).0,
        });
        f(log)
    }

    /// Appends what a program wrote.
    pub fn write(&self, name: &str, data: &[u8]) {
        let now = (self.clock)();
        self.with_log(name, |log| {
            let records = log.splitter.push(data, now);
            self.store(name, log, records);
        });
    }

    /// Ends a program's output: a last line without a newline is stored.
    pub fn finish(&self, name: &str) {
        let now = (self.clock)();
        self.with_log(name, |log| {
            let records = log.splitter.finish(now).into_iter().collect();
            self.store(name, log, records);
        });
    }

    /// A line of the agent's own about a program (started, exited, restarting).
    pub fn note(&self, name: &str, text: &str) {
        let now = (self.clock)();
        self.with_log(name, |log| {
            let mut records = log.splitter.finish(now).into_iter().collect::<Vec<_>>();
            records.extend(
                log.splitter
                    .push(format!("[cs-agent] {text}\n").as_bytes(), now),
            );
            self.store(name, log, records);
        });
    }

    fn store(&self, name: &str, log: &mut Log, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let stem = file_stem(name);
        let text: String = records.iter().map(Record::to_line).collect();
        let bytes = text.len() as u64;
        if log.file.is_none() {
            log.size = std::fs::metadata(self.path(&format!("{stem}.log")))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        if self.policy.must_rotate(log.size, bytes) {
            log.file = None;
            for (from, to) in self.policy.plan(&stem) {
                let from = self.path(&from);
                let _ = match to {
                    Some(to) => std::fs::rename(&from, self.path(&to)),
                    None => std::fs::remove_file(&from),
                };
            }
            log.size = 0;
        }
        if log.file.is_none() {
            log.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(&format!("{stem}.log")))
                .map_err(|e| tracing::warn!(log = %name, error = %e, "cannot open log file"))
                .ok();
        }
        if let Some(f) = &mut log.file {
            if let Err(e) = f.write_all(text.as_bytes()) {
                tracing::warn!(log = %name, error = %e, "cannot write log file");
            }
        }
        log.size += bytes;
        for r in records {
            let _ = log.feed.send(r);
        }
    }

    /// Whether a log exists (has a file or was written since the agent started).
    pub fn exists(&self, name: &str) -> bool {
        let stem = file_stem(name);
        self.policy
            .files(&stem)
            .iter()
            .any(|f| self.path(f).exists())
            || self
                .logs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(name)
    }

    /// Every log's name, for an error that lists them.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".log").map(str::to_string))
            .map(|s| s.replace("%2F", "/").replace("%25", "%"))
            .collect();
        names.sort();
        names
    }

    /// The last `n` records, or those after `after`.
    pub fn read(&self, name: &str, after: Option<u64>, n: u32) -> Vec<Record> {
        let stored = self.stored(name);
        since(stored.iter().map(String::as_str), after, n as usize)
    }

    /// The last `n` lines' texts (for `cs status` showing a failed step).
    pub fn tail(&self, name: &str, n: u32) -> Vec<String> {
        self.read(name, None, n)
            .into_iter()
            .map(|r| r.text)
            .collect()
    }

    /// A live feed of a log's new records.
    pub fn subscribe(&self, name: &str) -> broadcast::Receiver<Record> {
        self.with_log(name, |log| log.feed.subscribe())
    }
}

/// Serves one `cs logs` stream.
pub async fn serve<W: tokio::io::AsyncWrite + Unpin>(
    hub: LogHub,
    open: cs_protocol::supervise::LogsOpen,
    mut send: W,
) {
    use cs_protocol::supervise::LogsMsg;
    use cs_transport::write_frame;
    if !hub.exists(&open.name) {
        let names = hub.names();
        let msg = format!(
            "no log named '{}' (logs: {})",
            open.name,
            if names.is_empty() {
                "none yet".to_string()
            } else {
                names.join(", ")
            }
        );
        let _ = write_frame(&mut send, &LogsMsg::Error(msg)).await;
        return;
    }
    let last = open.last.min(LAST_MAX);
    let mut open = open;
    if cs_protocol::canary::active(cs_protocol::Canary::LogResumeIgnored)
        && open.after_seq.is_some()
    {
        open.after_seq = Some(0);
    }
    // Subscribe before reading the files, so nothing written in between is missed.
    let mut feed = open.follow.then(|| hub.subscribe(&open.name));
    let mut sent = open.after_seq;
    let backlog = hub.read(&open.name, open.after_seq, last);
    // The stream's first frame goes out at once, even with nothing to show: it is the
    // acknowledgement the laptop waits for.
    let first = if backlog.is_empty() {
        cs_transport::write_frame(&mut send, &LogsMsg::Lines(Vec::new())).await
    } else {
        send_records(&mut send, &backlog, &mut sent).await
    };
    if first.is_err() {
        return;
    }
    let Some(feed) = feed.as_mut() else {
        let _ = write_frame(&mut send, &LogsMsg::End).await;
        return;
    };
    loop {
        match feed.recv().await {
            Ok(r) => {
                let mut batch = vec![r];
                while batch.len() < 256 {
                    match feed.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                if send_records(&mut send, &batch, &mut sent).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind the feed: the files have everything, read on from there.
                let missed = hub.read(&open.name, sent, LAST_MAX);
                if send_records(&mut send, &missed, &mut sent).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends the records after `sent` (skipping any already sent) and moves `sent` on.
async fn send_records<W: tokio::io::AsyncWrite + Unpin>(
    send: &mut W,
    records: &[Record],
    sent: &mut Option<u64>,
) -> Result<(), cs_transport::FrameError> {
    let fresh: Vec<(u64, u64, String)> = records
        .iter()
        .filter(|r| sent.is_none_or(|s| r.seq > s))
        .map(|r| (r.seq, r.unix_ms, r.text.clone()))
        .collect();
    // Frames stay well under the frame limit: records are at most 16 KiB of text each.
    for chunk in fresh.chunks(32) {
        if let Some(last) = chunk.last() {
            *sent = Some(last.0);
        }
        cs_transport::write_frame(
            send,
            &cs_protocol::supervise::LogsMsg::Lines(chunk.to_vec()),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(dir: &Path, bytes: u64) -> LogHub {
        LogHub::new(
            dir.to_path_buf(),
            Policy {
                file_bytes_max: bytes,
                keep: 2,
            },
        )
    }

    #[test]
    fn records_are_numbered_across_rotations_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let h = hub(dir.path(), 200);
        for i in 0..20 {
            h.write("web", format!("line {i}\n").as_bytes());
        }
        assert!(dir.path().join("web.log.1").exists());
        // A new hub (the agent restarted) numbers on from the last record.
        let h2 = hub(dir.path(), 200);
        h2.write("web", b"after restart\n");
        let all = h2.read("web", Some(0), 1000);
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.last(), Some(&21));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // Only `keep` old files: the oldest lines are gone, the newest all there.
        assert!(!dir.path().join("web.log.3").exists());
        assert_eq!(h2.tail("web", 1), vec!["after restart".to_string()]);
    }

    #[test]
    fn names_with_slashes_are_one_file_and_listed_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = hub(dir.path(), 1 << 20);
        h.write("build:src/app", b"ok\n");
        h.note("build:src/app", "exit 0");
        assert!(dir.path().join("build:src%2Fapp.log").exists());
        assert_eq!(h.names(), vec!["build:src/app".to_string()]);
        assert_eq!(
            h.tail("build:src/app", 5),
            vec!["ok".to_string(), "[cs-agent] exit 0".to_string()]
        );
    }

    #[test]
    fn a_note_ends_a_partial_line_first() {
        let dir = tempfile::tempdir().unwrap();
        let h = hub(dir.path(), 1 << 20);
        h.write("j", b"no newline");
        h.note("j", "exited");
        assert_eq!(h.tail("j", 5), vec!["no newline", "[cs-agent] exited"]);
    }
}
