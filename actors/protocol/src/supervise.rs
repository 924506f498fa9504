//! Messages of the workspace automation streams: asking the supervisor (`cs ps`, `cs status`,
//! `cs start|stop|restart`, `cs build`, `cs sandbox job enable|disable`) and following a log
//! (`cs logs`).
//!
//! A supervise stream carries one [`SuperviseRequest`] in the [`crate::StreamOpen`] and one
//! [`SuperviseReply`] back. A logs stream carries [`LogsOpen`] and then [`LogsMsg`] frames
//! until the log is read (or, for a follow, until the laptop goes away).

/// What `cs` asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SuperviseRequest {
    /// Every daemon and job.
    Ps,
    /// The start sequence's state and what blocks it.
    Status,
    /// Start a stopped daemon, or run a job now.
    Start(String),
    /// Stop a daemon (and keep it stopped until started), or stop a job's run.
    Stop(String),
    /// Stop then start a daemon.
    Restart(String),
    /// Restart every daemon (`cs restart` with no name).
    RestartAll,
    /// Run the build hooks again (`cs build`); answered when they have finished.
    Build,
    /// Let a job fire on its schedule again (`true`), or not (`false`).
    JobEnabled(String, bool),
    /// Retry the step blocking the sequence now.
    Retry,
    /// Auto Mode on (`true`: follow the checkouts' remote branches) or off.
    Mode(bool),
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SuperviseReply {
    Ps(Vec<ProcView>),
    Status(Box<StatusView>),
    /// Done; a line for the user.
    Done(String),
    /// Refused or failed; a line for the user naming the bad value.
    Error(String),
}

/// What a supervised program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProcKind {
    /// A daemon of a checkout's manifest.
    Daemon,
    /// A global daemon (the definition's `system.daemons`, or `/etc/sandbox.d/daemons`).
    GlobalDaemon,
    Job,
}

/// One daemon or job, as `cs ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcView {
    pub name: String,
    pub kind: ProcKind,
    /// running, starting, backoff, crashing, stopped, disabled, idle (a job between runs).
    pub state: String,
    pub pid: Option<u32>,
    /// Times it was started again after stopping on its own.
    pub restarts: u32,
    /// How its last run ended: `exit 0`, `exit 3`, `signal 9 (SIGKILL)`.
    pub last_exit: Option<String>,
    /// For a job: the next run, Unix seconds.
    pub next_run_unix: Option<u64>,
    /// The checkout whose manifest defines it (empty for a global daemon).
    pub checkout: String,
}

/// The workspace's state, as `cs status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusView {
    /// `Progressing`, `Ready` or `Problematic`.
    pub state: String,
    /// The step running or blocking, by its log name (`setup`, `build:src/app`).
    pub step: Option<String>,
    /// How long that step has run, or how long its failed run took, in milliseconds.
    pub step_ms: Option<u64>,
    /// Why it is Problematic: the failed step's exit code or signal, or the crashing daemons.
    pub why: Option<String>,
    /// Failures in a row of the blocking step.
    pub failures: u32,
    /// When the next automatic retry is due, in milliseconds from now.
    pub retry_in_ms: Option<u64>,
    /// The last lines of the failed step's log.
    pub log_tail: Vec<String>,
    /// Daemons that keep crashing.
    pub crashing: Vec<String>,
    /// Steps of this start that finished, in order, with how they ended.
    pub steps_done: Vec<String>,
    /// `AUTO` or `MANUAL`.
    pub mode: String,
    /// The step running now, even while another one's failure makes the state Problematic,
    /// and for how long, in milliseconds.
    pub running: Option<(String, u64)>,
}

/// Opens a logs stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogsOpen {
    /// A daemon, job or step name.
    pub name: String,
    /// Keep the stream open and send new lines as they are written.
    pub follow: bool,
    /// Start after this sequence number (a follow resuming); otherwise the last `last` lines.
    pub after_seq: Option<u64>,
    pub last: u32,
}

/// Agent to laptop on a logs stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogsMsg {
    /// Records in order, each `(seq, unix_ms, text)`.
    Lines(Vec<(u64, u64, String)>),
    /// Without follow: everything asked for was sent.
    End,
    /// Refused: no such log, or it could not be read.
    Error(String),
}
