//! Job schedules in crontab(5)'s five-field syntax: `minute hour day-of-month month
//! day-of-week`.
//!
//! Each field is `*` or a comma-separated list of values and ranges (`a`, `a-b`), each
//! optionally stepped (`*/15`, `1-30/7`). Months and weekdays also take their first three
//! letters, in any case (`jan`, `Mon-Fri`). Weekdays are 0-7 with both 0 and 7 meaning Sunday.
//! When both the day-of-month and the day-of-week fields are restricted (do not start with
//! `*`), a day matches when **either** does, as in Vixie cron (`*/2` starts with `*`, so it
//! does not count as restricted). The aliases `@yearly` (`@annually`), `@monthly`, `@weekly`,
//! `@daily` (`@midnight`) and `@hourly` stand for their usual five fields.
//!
//! The cron crate was not used: its syntax has a seconds field and numbers Sunday as 1, and
//! translating between the two loses the day-of-month/day-of-week rule.

use std::fmt;

/// A calendar minute in the workspace's local time: what a schedule is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Minute {
    pub year: i32,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
}

impl Minute {
    /// `None` unless every field is in range and the day exists in that month.
    pub fn new(year: i32, month: u8, day: u8, hour: u8, minute: u8) -> Option<Self> {
        let ok = (1..=12).contains(&month)
            && day >= 1
            && day <= days_in_month(year, month)
            && hour < 24
            && minute < 60;
        ok.then_some(Self {
            year,
            month,
            day,
            hour,
            minute,
        })
    }

    /// 0 = Sunday ... 6 = Saturday.
    pub fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday (4).
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8
    }

    /// The first minute of the next day.
    fn next_day(&self) -> Self {
        let (mut y, mut m, mut d) = (self.year, self.month, self.day + 1);
        if d > days_in_month(y, m) {
            d = 1;
            m += 1;
            if m > 12 {
                m = 1;
                y += 1;
            }
        }
        Self {
            year: y,
            month: m,
            day: d,
            hour: 0,
            minute: 0,
        }
    }
}

impl fmt::Display for Minute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute
        )
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u8) -> u8 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A schedule that does not parse, with what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "schedule '{0}' has {1} fields; expected 5 (minute hour day-of-month month day-of-week)"
    )]
    FieldCount(String, usize),
    #[error("schedule '{schedule}': {field} field '{text}': {why}")]
    Field {
        schedule: String,
        field: &'static str,
        text: String,
        why: String,
    },
    #[error("schedule '{0}' is not a known alias (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)")]
    Alias(String),
    #[error("schedule '{0}' never fires (no such day in any year)")]
    Never(String),
}

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    /// Bit n set: minute n matches.
    minutes: u64,
    hours: u32,
    /// Bits 1-31.
    days: u32,
    /// Bits 1-12.
    months: u16,
    /// Bits 0-6 (Sunday is 0; a 7 in the text sets bit 0).
    weekdays: u8,
    /// The day-of-month field starts with `*`.
    days_star: bool,
    /// The day-of-week field starts with `*`.
    weekdays_star: bool,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    },
];

impl Field {
    fn value(&self, s: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            // Months are named from 1, weekdays from 0: each from its field's minimum.
            return Ok(i as u32 + self.min);
        }
        let v: u32 = s.parse().map_err(|_| {
            if self.names.is_empty() {
                format!("'{s}' is not a number")
            } else {
                format!(
                    "'{s}' is not a number or a name ({})",
                    self.names.join(", ")
                )
            }
        })?;
        if v < self.min || v > self.max {
            return Err(format!("{v} is out of range {}-{}", self.min, self.max));
        }
        Ok(v)
    }

    /// The bits a field's text sets.
    fn parse(&self, text: &str) -> Result<u64, String> {
        let mut bits = 0u64;
        for item in text.split(',') {
            if item.is_empty() {
                return Err("an empty list item".into());
            }
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s
                        .parse()
                        .map_err(|_| format!("step '{s}' is not a number"))?;
                    if step == 0 {
                        return Err("a step of 0".into());
                    }
                    (r, step)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" {
                // Weekdays run 0-6 under `*`: 7 is only another name for 0.
                (
                    self.min,
                    if self.name == "day-of-week" {
                        6
                    } else {
                        self.max
                    },
                )
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("range {a}-{b} runs backwards"));
                }
                (a, b)
            } else {
                let v = self.value(range)?;
                // `5/10` means 5-max/10, as in cronie; Vixie rejects it. Accept the former.
                (v, if item.contains('/') { self.max } else { v })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v = match v.checked_add(step) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        Ok(bits)
    }
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, CronError> {
        let trimmed = text.trim();
        let expanded = match trimmed {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            a if a.starts_with('@') => return Err(CronError::Alias(a.to_string())),
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError::FieldCount(trimmed.to_string(), parts.len()));
        }
        let mut bits = [0u64; 5];
        for (i, (f, p)) in FIELDS.iter().zip(&parts).enumerate() {
            bits[i] = f.parse(p).map_err(|why| CronError::Field {
                schedule: trimmed.to_string(),
                field: f.name,
                text: p.to_string(),
                why,
            })?;
        }
        // Sunday as 7 is Sunday as 0.
        let weekdays = ((bits[4] | (bits[4] >> 7)) & 0x7f) as u8;
        let s = Self {
            text: trimmed.to_string(),
            minutes: bits[0],
            hours: bits[1] as u32,
            days: bits[2] as u32,
            months: bits[3] as u16,
            weekdays,
            days_star: parts[2].starts_with('*'),
            weekdays_star: parts[4].starts_with('*'),
        };
        // A schedule with no possible day (`0 0 31 4 *`, `0 0 30 2 *`) would sit silent forever.
        let leap_start = Minute::new(2000, 1, 1, 0, 0).expect("a valid date");
        if s.next_after(leap_start).is_none() {
            return Err(CronError::Never(trimmed.to_string()));
        }
        Ok(s)
    }

    /// The schedule as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, t: &Minute) -> bool {
        if self.months & (1 << t.month) == 0 {
            return false;
        }
        let dom = self.days & (1 << t.day) != 0;
        let dow = self.weekdays & (1 << t.weekday()) != 0;
        match (self.days_star, self.weekdays_star) {
            // Both restricted: either one.
            (false, false) => dom || dow,
            _ => dom && dow,
        }
    }

    /// Whether the job is due in minute `t`.
    pub fn matches(&self, t: &Minute) -> bool {
        self.minutes & (1 << t.minute) != 0
            && self.hours & (1 << t.hour) != 0
            && self.day_matches(t)
    }

    /// The first minute strictly after `t` that matches; `None` if none does within nine
    /// years (only a schedule for a day that never comes).
    pub fn next_after(&self, t: Minute) -> Option<Minute> {
        // Within t's day, from the next minute on.
        let mut day = t;
        let (mut hour, mut minute) = (u32::from(t.hour), u32::from(t.minute) + 1);
        // Nine years cover 29 February across a skipped leap year (2100).
        for _ in 0..(9 * 366) {
            if self.day_matches(&day) {
                while hour < 24 {
                    if self.hours & (1 << hour) != 0 {
                        let from = if minute > 59 { 64 } else { minute };
                        let rest = if from >= 64 {
                            0
                        } else {
                            self.minutes & (u64::MAX << from)
                        };
                        if rest != 0 {
                            return Some(Minute {
                                hour: hour as u8,
                                minute: rest.trailing_zeros() as u8,
                                ..day
                            });
                        }
                    }
                    hour += 1;
                    minute = 0;
                }
            }
            day = day.next_day();
            (hour, minute) = (0, 0);
        }
        None
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(y: i32, mo: u8, d: u8, h: u8, mi: u8) -> Minute {
        Minute::new(y, mo, d, h, mi).unwrap()
    }

    fn next(s: &str, t: Minute) -> Minute {
        Schedule::parse(s).unwrap().next_after(t).unwrap()
    }

    #[test]
    fn weekdays_come_from_the_calendar() {
        assert_eq!(m(1970, 1, 1, 0, 0).weekday(), 4); // Thursday
        assert_eq!(m(2000, 2, 29, 0, 0).weekday(), 2); // Tuesday
        assert_eq!(m(2026, 12, 1, 0, 0).weekday(), 2); // Tuesday
        assert_eq!(m(2026, 12, 6, 0, 0).weekday(), 0); // Sunday
        assert_eq!(m(1969, 12, 31, 0, 0).weekday(), 3);
        assert!(Minute::new(2026, 2, 29, 0, 0).is_none());
        assert!(Minute::new(2028, 2, 29, 0, 0).is_some());
        assert!(Minute::new(2100, 2, 29, 0, 0).is_none());
    }

    #[test]
    fn known_crontab_cases() {
        let t = m(2026, 12, 1, 10, 30); // a Tuesday
        assert_eq!(next("* * * * *", t), m(2026, 12, 1, 10, 31));
        assert_eq!(next("*/15 * * * *", t), m(2026, 12, 1, 10, 45));
        assert_eq!(next("0 * * * *", t), m(2026, 12, 1, 11, 0));
        assert_eq!(next("30 10 * * *", t), m(2026, 12, 2, 10, 30));
        assert_eq!(next("0 0 1 1 *", t), m(2027, 1, 1, 0, 0));
        assert_eq!(next("@yearly", t), m(2027, 1, 1, 0, 0));
        assert_eq!(next("@hourly", t), m(2026, 12, 1, 11, 0));
        assert_eq!(next("@weekly", t), m(2026, 12, 6, 0, 0));
        assert_eq!(next("5 4 * * sun", t), m(2026, 12, 6, 4, 5));
        assert_eq!(next("0 22 * * 1-5", t), m(2026, 12, 1, 22, 0));
        assert_eq!(
            next("0 9 * * Mon-Fri", m(2026, 12, 4, 9, 0)),
            m(2026, 12, 7, 9, 0)
        );
        assert_eq!(next("23 0-20/2 * * *", t), m(2026, 12, 1, 12, 23));
        assert_eq!(next("0 0 * jan,jul *", t), m(2027, 1, 1, 0, 0));
        assert_eq!(next("0 12 * JUN-aug *", t), m(2027, 6, 1, 12, 0));
        assert_eq!(next("1,2,58 * * * *", t), m(2026, 12, 1, 10, 58));
        assert_eq!(next("59 23 31 12 *", t), m(2026, 12, 31, 23, 59));
        // 29 February: the next leap year, and 2100 is not one.
        assert_eq!(next("0 0 29 2 *", t), m(2028, 2, 29, 0, 0));
        assert_eq!(
            next("0 0 29 2 *", m(2096, 3, 1, 0, 0)),
            m(2104, 2, 29, 0, 0)
        );
        // 31st: months that have one.
        assert_eq!(
            next("0 0 31 * *", m(2027, 1, 31, 0, 0)),
            m(2027, 3, 31, 0, 0)
        );
        // Across a year end.
        assert_eq!(
            next("0 0 * * *", m(2026, 12, 31, 0, 0)),
            m(2027, 1, 1, 0, 0)
        );
    }

    #[test]
    fn sunday_is_0_and_7() {
        let t = m(2026, 12, 1, 0, 0);
        let sunday = m(2026, 12, 6, 0, 0);
        assert_eq!(next("0 0 * * 0", t), sunday);
        assert_eq!(next("0 0 * * 7", t), sunday);
        assert_eq!(next("0 0 * * SUN", t), sunday);
        // Friday through Sunday, written with 7.
        let s = Schedule::parse("0 0 * * 5-7").unwrap();
        assert_eq!(
            s,
            Schedule::parse("0 0 * * 0,5,6")
                .unwrap()
                .with_text("0 0 * * 5-7")
        );
        assert!(s.matches(&sunday));
        assert!(!s.matches(&m(2026, 12, 7, 0, 0)));
    }

    #[test]
    fn restricted_day_of_month_and_week_match_either() {
        // crontab(5): "30 4 1,15 * 5" runs at 4:30 on the 1st and 15th of each month, plus
        // every Friday.
        let s = Schedule::parse("30 4 1,15 * 5").unwrap();
        assert!(s.matches(&m(2026, 12, 1, 4, 30))); // the 1st, a Tuesday
        assert!(s.matches(&m(2026, 12, 4, 4, 30))); // a Friday, the 4th
        assert!(s.matches(&m(2026, 12, 15, 4, 30)));
        assert!(!s.matches(&m(2026, 12, 2, 4, 30)));
        assert_eq!(
            s.next_after(m(2026, 12, 1, 4, 30)),
            Some(m(2026, 12, 4, 4, 30))
        );
        // A `*` in either makes it an AND: "every day of the month, but only Fridays".
        let and = Schedule::parse("30 4 * * 5").unwrap();
        assert!(!and.matches(&m(2026, 12, 1, 4, 30)));
        // `*/2` starts with `*`, so (as in Vixie cron) it does not count as restricted: odd
        // days that are also Fridays.
        let stepped = Schedule::parse("0 0 */2 * 5").unwrap();
        assert!(!stepped.matches(&m(2026, 12, 1, 0, 0))); // odd day, Tuesday
        assert!(!stepped.matches(&m(2026, 12, 4, 0, 0))); // Friday, even day
        assert!(stepped.matches(&m(2026, 12, 11, 0, 0))); // Friday the 11th
    }

    #[test]
    fn bad_schedules_name_the_bad_part() {
        let err = |s: &str| Schedule::parse(s).unwrap_err().to_string();
        assert!(
            err("* * * *").contains("has 4 fields"),
            "{}",
            err("* * * *")
        );
        assert!(err("* * * * * *").contains("has 6 fields"));
        let e = err("60 * * * *");
        assert!(
            e.contains("minute field '60'") && e.contains("out of range 0-59"),
            "{e}"
        );
        let e = err("0 0 * * 8");
        assert!(e.contains("day-of-week field '8'"), "{e}");
        let e = err("0 0 0 * *");
        assert!(e.contains("day-of-month field '0'"), "{e}");
        let e = err("0 0 * foo *");
        assert!(e.contains("'foo' is not a number or a name"), "{e}");
        assert!(err("*/0 * * * *").contains("a step of 0"));
        assert!(err("5-1 * * * *").contains("range 5-1 runs backwards"));
        assert!(err("1,,2 * * * *").contains("an empty list item"));
        assert!(err("@reboot").contains("not a known alias"));
        assert!(err("0 0 31 4 *").contains("never fires"));
        assert!(err("0 0 30 2 *").contains("never fires"));
        assert!(err("").contains("has 0 fields"));
        // 31 April is impossible, but Fridays in April are not: either matches.
        assert!(Schedule::parse("0 0 31 4 fri").is_ok());
    }

    /// The next minute by brute force: step a minute at a time.
    fn slow_next(s: &Schedule, t: Minute) -> Option<Minute> {
        let mut c = t;
        for _ in 0..(3 * 366 * 24 * 60) {
            c = if c.minute < 59 {
                Minute {
                    minute: c.minute + 1,
                    ..c
                }
            } else if c.hour < 23 {
                Minute {
                    hour: c.hour + 1,
                    minute: 0,
                    ..c
                }
            } else {
                c.next_day()
            };
            if s.matches(&c) {
                return Some(c);
            }
        }
        None
    }

    fn field(max: u32, min: u32) -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            (1..=max).prop_map(|s| format!("*/{s}")),
            (min..=max).prop_map(|v| v.to_string()),
            (min..=max, min..=max, 1..4u32).prop_map(|(a, b, s)| format!(
                "{}-{}/{s}",
                a.min(b),
                a.max(b)
            )),
            (min..=max, min..=max).prop_map(|(a, b)| format!("{a},{b}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// `next_after` finds the same minute as stepping minute by minute, and nothing in
        /// between matches.
        #[test]
        fn next_after_equals_stepping(
            mi in field(59, 0), h in field(23, 0), d in field(31, 1), mo in field(12, 1),
            w in field(7, 0), y in 2020..2030i32, month in 1..=12u8, day in 1..=28u8,
            hour in 0..24u8, minute in 0..60u8,
        ) {
            let text = format!("{mi} {h} {d} {mo} {w}");
            let Ok(s) = Schedule::parse(&text) else { return Ok(()) };
            let t = m(y, month, day, hour, minute);
            let fast = s.next_after(t);
            let slow = slow_next(&s, t);
            // Brute force looks three years ahead; past that only the fast one answers.
            if let Some(slow) = slow {
                prop_assert_eq!(fast, Some(slow), "{}", text);
            } else {
                prop_assert!(fast.is_none_or(|f| f.year >= y + 3), "{}: {:?}", text, fast);
            }
        }
    }

    impl Schedule {
        fn with_text(mut self, t: &str) -> Self {
            self.text = t.to_string();
            self
        }
    }
}
