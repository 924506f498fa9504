//! Lines: what a process wrote, cut at newlines, numbered and stamped.
//!
//! On disk each record is one line: `SEQ MILLIS TEXT`, the sequence number and the Unix time in
//! milliseconds in decimal, then the text as written (invalid UTF-8 replaced). A follow resumes
//! after the last sequence number it printed. A line longer than [`LINE_BYTES_MAX`] is cut
//! into several records, so a process that never writes a newline cannot grow memory.

/// Longest text of one record, in bytes; longer lines are cut.
pub const LINE_BYTES_MAX: usize = 16 * 1024;

/// One numbered line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Unix time in milliseconds when the line was read from the pipe.
    pub unix_ms: u64,
    pub text: String,
}

impl Record {
    /// The record as stored: one line, newline included.
    pub fn to_line(&self) -> String {
        format!("{} {} {}\n", self.seq, self.unix_ms, self.text)
    }

    /// A stored line back (without or with its newline); `None` if it is not one.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (seq, rest) = line.split_once(' ')?;
        let (ms, text) = rest.split_once(' ')?;
        Some(Self {
            seq: seq.parse().ok()?,
            unix_ms: ms.parse().ok()?,
            text: text.to_string(),
        })
    }
}

/// Cuts a byte stream into records, numbering them from a starting sequence number.
#[derive(Debug, Clone)]
pub struct Splitter {
    next_seq: u64,
    partial: Vec<u8>,
}

impl Splitter {
    /// `next_seq` is the number of the first record (one past the last in the log).
    pub fn new(next_seq: u64) -> Self {
        Self {
            next_seq,
            partial: Vec::new(),
        }
    }

    /// The number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn record(&mut self, bytes: &[u8], unix_ms: u64) -> Record {
        let text = String::from_utf8_lossy(bytes)
            .trim_end_matches('\r')
            .replace('\n', " ");
        let r = Record {
            seq: self.next_seq,
            unix_ms,
            text,
        };
        self.next_seq += 1;
        r
    }

    /// The records completed by `data`, read at `unix_ms`.
    pub fn push(&mut self, data: &[u8], unix_ms: u64) -> Vec<Record> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                out.push(self.record(&line, unix_ms));
            } else {
                self.partial.push(b);
                if self.partial.len() >= LINE_BYTES_MAX {
                    // Cut at a character boundary, so the text stays valid.
                    let cut = utf8_boundary(&self.partial);
                    let rest = self.partial.split_off(cut);
                    let line = std::mem::replace(&mut self.partial, rest);
                    out.push(self.record(&line, unix_ms));
                }
            }
        }
        out
    }

    /// The pipe closed: what is left without a newline becomes the last record.
    pub fn finish(&mut self, unix_ms: u64) -> Option<Record> {
        if self.partial.is_empty() {
            return None;
        }
        let line = std::mem::take(&mut self.partial);
        Some(self.record(&line, unix_ms))
    }
}

/// The longest prefix of `b` that does not end inside a UTF-8 character (all of it if the
/// tail is not UTF-8 at all).
fn utf8_boundary(b: &[u8]) -> usize {
    for back in 0..4.min(b.len()) {
        let i = b.len() - back;
        if std::str::from_utf8(&b[..i]).is_ok() || back == 3 {
            return if i == 0 { b.len() } else { i };
        }
    }
    b.len()
}

/// The records of `lines` (a log's stored lines, oldest first) after sequence number `after`,
/// for a follow that resumes; the last `n` of them when `after` is `None` (a fresh
/// `cs logs -n N`). Lines that are not records are skipped.
pub fn since<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    after: Option<u64>,
    n: usize,
) -> Vec<Record> {
    let records = lines.into_iter().filter_map(Record::parse);
    match after {
        Some(a) => records.filter(|r| r.seq > a).collect(),
        None => {
            let mut tail = std::collections::VecDeque::with_capacity(n.min(4096));
            for r in records {
                if n == 0 {
                    break;
                }
                if tail.len() == n {
                    tail.pop_front();
                }
                tail.push_back(r);
            }
            tail.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_are_numbered_stamped_and_stored_one_per_line() {
        let mut s = Splitter::new(7);
        let r = s.push(b"hello\nwor", 100);
        assert_eq!(
            r,
            [Record {
                seq: 7,
                unix_ms: 100,
                text: "hello".into()
            }]
        );
        let r = s.push(b"ld\r\n\n", 200);
        assert_eq!(r[0].text, "world");
        assert_eq!(r[1].text, "");
        assert_eq!(r[1].seq, 9);
        assert_eq!(s.push(b"no newline", 300), []);
        let last = s.finish(400).unwrap();
        assert_eq!((last.seq, last.text.as_str()), (10, "no newline"));
        assert_eq!(s.finish(500), None);
        assert_eq!(last.to_line(), "10 400 no newline\n");
        assert_eq!(Record::parse(&last.to_line()), Some(last));
        assert_eq!(Record::parse("garbage"), None);
        assert_eq!(Record::parse("1 x y"), None);
        // Invalid UTF-8 is replaced, not dropped.
        let r = Splitter::new(0).push(b"a\xffb\n", 1);
        assert_eq!(r[0].text, "a\u{fffd}b");
    }

    #[test]
    fn an_endless_line_is_cut_at_the_limit_on_a_character_boundary() {
        let mut s = Splitter::new(0);
        let long = "é".repeat(LINE_BYTES_MAX); // 2 bytes each
        let r = s.push(long.as_bytes(), 1);
        assert!(!r.is_empty());
        for rec in &r {
            assert!(rec.text.len() <= LINE_BYTES_MAX);
            assert!(!rec.text.contains('\u{fffd}'), "a character was split");
        }
        let rest = s.finish(2);
        let all: String = r
            .iter()
            .chain(rest.as_ref())
            .map(|r| r.text.as_str())
            .collect();
        assert_eq!(all, long);
        // A 3-byte character where the cut falls.
        let mut s = Splitter::new(0);
        let odd = format!("x{}", "€".repeat(LINE_BYTES_MAX));
        let mut r = s.push(odd.as_bytes(), 1);
        r.extend(s.finish(1));
        assert!(r.len() >= 3);
        assert!(r.iter().all(|r| !r.text.contains('\u{fffd}')));
        assert_eq!(r.iter().map(|r| r.text.as_str()).collect::<String>(), odd);
    }

    #[test]
    fn a_follow_resumes_after_its_last_line_or_starts_with_the_tail() {
        let stored: Vec<String> = (1..=10)
            .map(|i| {
                Record {
                    seq: i,
                    unix_ms: i * 10,
                    text: format!("l{i}"),
                }
                .to_line()
            })
            .collect();
        let lines = || stored.iter().map(String::as_str);
        let seqs = |v: Vec<Record>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(since(lines(), Some(7), 0)), [8, 9, 10]);
        assert_eq!(seqs(since(lines(), Some(10), 0)), Vec::<u64>::new());
        assert_eq!(seqs(since(lines(), None, 3)), [8, 9, 10]);
        assert_eq!(seqs(since(lines(), None, 0)), Vec::<u64>::new());
        assert_eq!(seqs(since(lines(), None, 50)).len(), 10);
    }

    proptest! {
        /// However the bytes are chunked, the records are the same: numbered without gaps,
        /// and their texts joined with newlines give back the input.
        #[test]
        fn chunking_does_not_change_the_records(text in "[a-z \n]{0,300}", cuts in proptest::collection::vec(0..300usize, 0..8)) {
            let bytes = text.as_bytes();
            let mut whole = Splitter::new(1);
            let mut want = whole.push(bytes, 5);
            want.extend(whole.finish(5));
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= bytes.len()).collect();
            cuts.sort_unstable();
            let mut s = Splitter::new(1);
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(s.push(&bytes[at..c], 5));
                at = c;
            }
            got.extend(s.finish(5));
            prop_assert_eq!(&got, &want);
            for (i, r) in got.iter().enumerate() {
                prop_assert_eq!(r.seq, i as u64 + 1);
            }
            let joined: Vec<&str> = got.iter().map(|r| r.text.as_str()).collect();
            let expect = text.strip_suffix('\n').unwrap_or(&text);
            prop_assert_eq!(joined.join("\n"), expect);
        }
    }
}
