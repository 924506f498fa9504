//! The laptop-side exec core: checks what the agent sends and turns it into events.
//!
//! Output must arrive with contiguous offsets and match the totals in the exit message. Any
//! gap, duplicate or mismatch, or a stream that ends before the exit, becomes a `Failed` event:
//! output is never silently truncated.

use cs_protocol::exec::{ExecOutput, ExitStatus};

/// What the user of an exec stream sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Started {
        pid: u32,
    },
    /// A line for the user from the agent (not the command's output).
    Notice(String),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended and all its output was delivered.
    Exited(ExitStatus),
    /// The command failed to run, or its output could not be delivered whole.
    Failed(String),
}

/// The client core for one exec stream.
#[derive(Debug, Default)]
pub struct ExecClient {
    stdout_bytes: u64,
    stderr_bytes: u64,
    done: bool,
}

impl ExecClient {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once `Exited` or `Failed` was produced; later messages are ignored.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds one message from the agent.
    pub fn handle_output(&mut self, msg: ExecOutput) -> Option<ClientEvent> {
        if self.done {
            return None;
        }
        let ev = match msg {
            ExecOutput::Started { pid } => ClientEvent::Started { pid },
            ExecOutput::Notice(text) => ClientEvent::Notice(text),
            ExecOutput::Stdout { offset, data } => {
                match Self::advance(&mut self.stdout_bytes, offset, data.len(), "stdout") {
                    Ok(()) => ClientEvent::Stdout(data),
                    Err(e) => ClientEvent::Failed(e),
                }
            }
            ExecOutput::Stderr { offset, data } => {
                match Self::advance(&mut self.stderr_bytes, offset, data.len(), "stderr") {
                    Ok(()) => ClientEvent::Stderr(data),
                    Err(e) => ClientEvent::Failed(e),
                }
            }
            ExecOutput::Exited {
                status,
                stdout_bytes,
                stderr_bytes,
            } => {
                if (stdout_bytes, stderr_bytes) == (self.stdout_bytes, self.stderr_bytes) {
                    ClientEvent::Exited(status)
                } else {
                    ClientEvent::Failed(format!(
                        "output incomplete: agent sent {stdout_bytes}/{stderr_bytes} bytes of stdout/stderr, received {}/{}",
                        self.stdout_bytes, self.stderr_bytes
                    ))
                }
            }
            ExecOutput::Failed { reason } => ClientEvent::Failed(reason),
        };
        if matches!(ev, ClientEvent::Exited(_) | ClientEvent::Failed(_)) {
            self.done = true;
        }
        Some(ev)
    }

    /// The stream ended (cleanly or not). Before an exit, that is a failure.
    pub fn handle_stream_end(&mut self, why: &str) -> Option<ClientEvent> {
        if self.done {
            return None;
        }
        self.done = true;
        if cs_protocol::canary::active(cs_protocol::Canary::StreamEndTrusted) {
            return Some(ClientEvent::Exited(ExitStatus::Code(0)));
        }
        Some(ClientEvent::Failed(format!(
            "connection to the workspace lost before the command finished: {why}"
        )))
    }

    fn advance(counter: &mut u64, offset: u64, len: usize, name: &str) -> Result<(), String> {
        if offset != *counter {
            return Err(format!(
                "{name} out of order: expected byte {}, got byte {offset}",
                *counter
            ));
        }
        *counter += len as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(msgs: Vec<ExecOutput>) -> Vec<ClientEvent> {
        let mut c = ExecClient::new();
        msgs.into_iter()
            .filter_map(|m| c.handle_output(m))
            .collect()
    }

    #[test]
    fn complete_output_then_exit() {
        let evs = feed(vec![
            ExecOutput::Stdout {
                offset: 0,
                data: b"ab".to_vec(),
            },
            ExecOutput::Stderr {
                offset: 0,
                data: b"e".to_vec(),
            },
            ExecOutput::Stdout {
                offset: 2,
                data: b"c".to_vec(),
            },
            ExecOutput::Exited {
                status: ExitStatus::Code(0),
                stdout_bytes: 3,
                stderr_bytes: 1,
            },
        ]);
        assert_eq!(evs.last(), Some(&ClientEvent::Exited(ExitStatus::Code(0))));
    }

    #[test]
    fn duplicate_gap_and_short_totals_fail() {
        let dup = feed(vec![
            ExecOutput::Stdout {
                offset: 0,
                data: b"ab".to_vec(),
            },
            ExecOutput::Stdout {
                offset: 0,
                data: b"ab".to_vec(),
            },
        ]);
        assert!(
            matches!(dup.last(), Some(ClientEvent::Failed(m)) if m.contains("expected byte 2, got byte 0"))
        );
        let gap = feed(vec![ExecOutput::Stderr {
            offset: 5,
            data: b"x".to_vec(),
        }]);
        assert!(matches!(gap.last(), Some(ClientEvent::Failed(_))));
        let short = feed(vec![ExecOutput::Exited {
            status: ExitStatus::Code(0),
            stdout_bytes: 1,
            stderr_bytes: 0,
        }]);
        assert!(matches!(short.last(), Some(ClientEvent::Failed(m)) if m.contains("incomplete")));
    }

    #[test]
    fn stream_end_before_exit_is_a_failure_once() {
        let mut c = ExecClient::new();
        assert!(matches!(
            c.handle_stream_end("reset"),
            Some(ClientEvent::Failed(_))
        ));
        assert_eq!(c.handle_stream_end("again"), None);
        let mut ok = ExecClient::new();
        ok.handle_output(ExecOutput::Exited {
            status: ExitStatus::Code(1),
            stdout_bytes: 0,
            stderr_bytes: 0,
        });
        assert_eq!(ok.handle_stream_end("closed"), None);
    }
}
