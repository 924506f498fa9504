//! When cron jobs fire: at most once per scheduled minute, never while the last run goes on.
//!
//! The shell calls [`JobClock::due`] once per wall-clock minute (and after a wake-up) with the
//! local time as a [`Minute`] and each job's state. A minute at or before the last one handled
//! (the clock was set back, or a daylight-saving hour repeats) fires nothing again. Minutes
//! skipped (the machine slept) are not caught up, as in cron. A run still going when its next
//! minute comes is skipped, and the skip is reported so it can be logged.

use std::collections::BTreeMap;

use crate::cron::{Minute, Schedule};

/// A job as the clock sees it.
#[derive(Debug, Clone)]
pub struct JobView<'a> {
    pub name: &'a str,
    pub schedule: &'a Schedule,
    pub enabled: bool,
    /// Its last run is still going.
    pub running: bool,
}

/// What the clock decided for a job in a minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Run(String),
    /// Due, but the last run is still going: skipped (log it).
    Skipped(String),
}

/// The minute last handled.
#[derive(Debug, Clone, Default)]
pub struct JobClock {
    last: Option<Minute>,
}

impl JobClock {
    /// The jobs due in minute `now`, in the order given.
    pub fn due(&mut self, jobs: &[JobView<'_>], now: Minute) -> Vec<Due> {
        if self.last.is_some_and(|l| now <= l) {
            return Vec::new();
        }
        self.last = Some(now);
        jobs.iter()
            .filter(|j| j.enabled && j.schedule.matches(&now))
            .map(|j| {
                if j.running {
                    Due::Skipped(j.name.to_string())
                } else {
                    Due::Run(j.name.to_string())
                }
            })
            .collect()
    }

    /// The next minute any enabled job is due after `now` (for `cs ps`), by job.
    pub fn next_runs<'a>(jobs: &[JobView<'a>], now: Minute) -> BTreeMap<&'a str, Minute> {
        jobs.iter()
            .filter(|j| j.enabled)
            .filter_map(|j| j.schedule.next_after(now).map(|m| (j.name, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(h: u8, mi: u8) -> Minute {
        Minute::new(2026, 12, 1, h, mi).unwrap()
    }

    #[test]
    fn once_per_minute_never_twice_and_skipped_while_running() {
        let every = Schedule::parse("* * * * *").unwrap();
        let hourly = Schedule::parse("@hourly").unwrap();
        let jobs = |running: bool| {
            vec![
                JobView {
                    name: "a",
                    schedule: &every,
                    enabled: true,
                    running,
                },
                JobView {
                    name: "h",
                    schedule: &hourly,
                    enabled: true,
                    running: false,
                },
                JobView {
                    name: "off",
                    schedule: &every,
                    enabled: false,
                    running: false,
                },
            ]
        };
        let mut c = JobClock::default();
        assert_eq!(
            c.due(&jobs(false), m(10, 0)),
            [Due::Run("a".into()), Due::Run("h".into())]
        );
        // The same minute again (a second wake-up), or an earlier one (clock set back, or a
        // repeated daylight-saving hour): nothing.
        assert!(c.due(&jobs(false), m(10, 0)).is_empty());
        assert!(c.due(&jobs(false), m(9, 59)).is_empty());
        assert_eq!(c.due(&jobs(true), m(10, 1)), [Due::Skipped("a".into())]);
        // Minutes slept through are not caught up.
        assert_eq!(c.due(&jobs(false), m(10, 30)), [Due::Run("a".into())]);
        let next = JobClock::next_runs(&jobs(false), m(10, 30));
        assert_eq!(next["a"], m(10, 31));
        assert_eq!(next["h"], m(11, 0));
        assert!(!next.contains_key("off"));
    }
}
