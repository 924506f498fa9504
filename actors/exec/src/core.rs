//! The agent-side exec session core: child events in, protocol messages out.
//!
//! Invariants it keeps:
//! - output chunks carry contiguous offsets from 0, each at most one data chunk;
//! - `Exited` is the last message and comes after all output, unless the output did not close
//!   within [`EXIT_LINGER_MS`] of the exit (a background process holding the pipe), in which
//!   case the exit is sent anyway with the totals actually sent;
//! - exactly one terminal message (`Exited` or `Failed`) is ever produced.

use std::collections::VecDeque;

use cs_protocol::exec::{ExecOutput, ExitStatus};
use cs_protocol::DATA_CHUNK_BYTES_MAX;

use crate::spawn::ChildEvent;

/// How long output may stay open after the child exited before the exit is reported anyway.
pub const EXIT_LINGER_MS: u64 = 1_000;

/// The session core. Time is a monotonic count of milliseconds supplied by the caller.
#[derive(Debug, Default)]
pub struct ExecSession {
    stdout_bytes: u64,
    stderr_bytes: u64,
    stdout_open: bool,
    stderr_open: bool,
    exit: Option<ExitStatus>,
    linger_deadline_ms: Option<u64>,
    finished: bool,
    out: VecDeque<ExecOutput>,
}

impl ExecSession {
    /// A session whose child has started with `pid`.
    pub fn started(pid: u32) -> Self {
        let mut s = Self {
            stdout_open: true,
            stderr_open: true,
            ..Self::default()
        };
        s.out.push_back(ExecOutput::Started { pid });
        s
    }

    /// A session whose child could not be started.
    pub fn failed_to_start(reason: String) -> Self {
        let mut s = Self {
            finished: true,
            ..Self::default()
        };
        s.out.push_back(ExecOutput::Failed { reason });
        s
    }

    /// Feeds one child event.
    pub fn handle_child(&mut self, ev: ChildEvent, now_ms: u64) {
        if self.finished {
            return;
        }
        match ev {
            ChildEvent::Stdout(data) => self.push_data(data, true),
            ChildEvent::Stderr(data) => self.push_data(data, false),
            ChildEvent::StdoutEof => self.stdout_open = false,
            ChildEvent::StderrEof => self.stderr_open = false,
            ChildEvent::Exited(status) => {
                self.exit = Some(status);
                self.linger_deadline_ms = Some(now_ms + EXIT_LINGER_MS);
            }
        }
        self.maybe_finish(now_ms);
    }

    /// The stream to the laptop broke: nothing more will be sent.
    pub fn handle_stream_lost(&mut self) {
        self.finished = true;
        self.out.clear();
    }

    /// Lets timers fire.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.maybe_finish(now_ms);
    }

    /// When [`Self::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.finished {
            None
        } else {
            self.linger_deadline_ms
        }
    }

    /// The next message to send.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<ExecOutput> {
        self.out.pop_front()
    }

    /// True once the terminal message has been queued (and the queue may still hold it).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn push_data(&mut self, data: Vec<u8>, stdout: bool) {
        for chunk in data.chunks(DATA_CHUNK_BYTES_MAX) {
            let counter = if stdout {
                &mut self.stdout_bytes
            } else {
                &mut self.stderr_bytes
            };
            let offset = *counter;
            *counter += chunk.len() as u64;
            let data = chunk.to_vec();
            self.out.push_back(if stdout {
                ExecOutput::Stdout { offset, data }
            } else {
                ExecOutput::Stderr { offset, data }
            });
        }
    }

    fn maybe_finish(&mut self, now_ms: u64) {
        let Some(status) = self.exit else { return };
        let drained = !self.stdout_open && !self.stderr_open;
        let expired = self.linger_deadline_ms.is_some_and(|d| now_ms >= d);
        if drained || expired {
            self.finished = true;
            self.out.push_back(ExecOutput::Exited {
                status,
                stdout_bytes: self.stdout_bytes,
                stderr_bytes: self.stderr_bytes,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChildEvent::*;

    fn run(events: &[(u64, ChildEvent)], end_ms: u64) -> Vec<ExecOutput> {
        let mut s = ExecSession::started(42);
        let mut out = Vec::new();
        for (t, ev) in events {
            s.handle_child(ev.clone(), *t);
            out.extend(std::iter::from_fn(|| s.poll_output()));
        }
        if let Some(d) = s.poll_timeout() {
            if d <= end_ms {
                s.handle_timeout(d);
            }
        }
        out.extend(std::iter::from_fn(|| s.poll_output()));
        out
    }

    #[test]
    fn exit_waits_for_output_to_close() {
        let out = run(
            &[
                (0, Stdout(b"a".to_vec())),
                (1, Exited(ExitStatus::Code(3))),
                (2, Stdout(b"b".to_vec())),
                (3, StdoutEof),
                (4, StderrEof),
            ],
            4,
        );
        assert_eq!(
            out,
            vec![
                ExecOutput::Started { pid: 42 },
                ExecOutput::Stdout {
                    offset: 0,
                    data: b"a".to_vec()
                },
                ExecOutput::Stdout {
                    offset: 1,
                    data: b"b".to_vec()
                },
                ExecOutput::Exited {
                    status: ExitStatus::Code(3),
                    stdout_bytes: 2,
                    stderr_bytes: 0
                },
            ]
        );
    }

    #[test]
    fn exit_is_reported_after_linger_when_output_stays_open() {
        let out = run(&[(10, Exited(ExitStatus::Signal(9)))], 10 + EXIT_LINGER_MS);
        assert_eq!(
            out.last(),
            Some(&ExecOutput::Exited {
                status: ExitStatus::Signal(9),
                stdout_bytes: 0,
                stderr_bytes: 0
            })
        );
        let early = run(
            &[(10, Exited(ExitStatus::Code(0)))],
            10 + EXIT_LINGER_MS - 1,
        );
        assert_eq!(early, vec![ExecOutput::Started { pid: 42 }]);
    }

    #[test]
    fn large_output_is_chunked_with_contiguous_offsets() {
        let big = vec![1u8; DATA_CHUNK_BYTES_MAX * 2 + 5];
        let out = run(
            &[
                (0, Stderr(big)),
                (0, StdoutEof),
                (0, StderrEof),
                (0, Exited(ExitStatus::Code(0))),
            ],
            0,
        );
        let offsets: Vec<(u64, usize)> = out
            .iter()
            .filter_map(|m| match m {
                ExecOutput::Stderr { offset, data } => Some((*offset, data.len())),
                _ => None,
            })
            .collect();
        let k = DATA_CHUNK_BYTES_MAX as u64;
        assert_eq!(
            offsets,
            vec![
                (0, DATA_CHUNK_BYTES_MAX),
                (k, DATA_CHUNK_BYTES_MAX),
                (2 * k, 5)
            ]
        );
    }

    #[test]
    fn nothing_after_the_terminal_message() {
        let out = run(
            &[
                (0, StdoutEof),
                (0, StderrEof),
                (0, Exited(ExitStatus::Code(0))),
                (1, Stdout(b"late".to_vec())),
                (2, Exited(ExitStatus::Code(1))),
            ],
            5000,
        );
        assert_eq!(out.len(), 2);
        let failed = {
            let mut s = ExecSession::failed_to_start("no shell".into());
            s.handle_child(Stdout(b"x".to_vec()), 0);
            std::iter::from_fn(|| s.poll_output()).collect::<Vec<_>>()
        };
        assert_eq!(
            failed,
            vec![ExecOutput::Failed {
                reason: "no shell".into()
            }]
        );
    }
}
