//! Rotation by size: `NAME.log` is the current file, `NAME.log.1` the one before, up to
//! `NAME.log.K`. The agent owns the pipes, so it rotates by renaming between two writes (no
//! copytruncate, no line lost or cut in half); the oldest file is deleted.

/// A log's rotation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The current file is rotated before a write would take it past this size.
    pub file_bytes_max: u64,
    /// Old files kept (`NAME.log.1` ... `NAME.log.K`).
    pub keep: u32,
}

impl Policy {
    /// 10 MiB per file, 5 old files: at most 60 MiB per log.
    pub const DEFAULT: Self = Self {
        file_bytes_max: 10 * 1024 * 1024,
        keep: 5,
    };

    /// Whether the current file, at `size` bytes, must rotate before `write` more. An empty
    /// file never rotates (a single line longer than the limit still gets written).
    pub fn must_rotate(&self, size: u64, write: u64) -> bool {
        size > 0 && size.saturating_add(write) > self.file_bytes_max
    }

    /// The renames of one rotation, in the order to do them, as (from, to) file names;
    /// `to = None` deletes `from`. Missing files are the caller's to skip.
    pub fn plan(&self, name: &str) -> Vec<(String, Option<String>)> {
        let file = |i: u32| {
            if i == 0 {
                format!("{name}.log")
            } else {
                format!("{name}.log.{i}")
            }
        };
        if self.keep == 0 {
            return vec![(file(0), None)];
        }
        let mut out = vec![(file(self.keep), None)];
        for i in (0..self.keep).rev() {
            out.push((file(i), Some(file(i + 1))));
        }
        out
    }

    /// The files of a log, oldest first (for reading it whole).
    pub fn files(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = (1..=self.keep)
            .rev()
            .map(|i| format!("{name}.log.{i}"))
            .collect();
        v.push(format!("{name}.log"));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Applies plans to an in-memory directory of file name to content.
    fn rotate(dir: &mut BTreeMap<String, String>, p: &Policy, name: &str) {
        for (from, to) in p.plan(name) {
            if let Some(c) = dir.remove(&from) {
                if let Some(to) = to {
                    dir.insert(to, c);
                }
            }
        }
    }

    #[test]
    fn rotation_keeps_k_old_files_in_order_and_bounds_the_total() {
        let p = Policy {
            file_bytes_max: 10,
            keep: 2,
        };
        let mut dir = BTreeMap::new();
        for i in 0..7u32 {
            let line = format!("line{i}\n"); // 6 bytes
            let size = dir.get("d.log").map_or(0, |c: &String| c.len() as u64);
            if p.must_rotate(size, line.len() as u64) {
                rotate(&mut dir, &p, "d");
            }
            dir.entry("d.log".to_string()).or_default().push_str(&line);
            assert!(dir.len() <= 3);
            assert!(dir.values().all(|c| c.len() as u64 <= p.file_bytes_max));
        }
        // One line per file (two would be 12 bytes), the newest three kept, oldest first.
        let whole: String = p
            .files("d")
            .iter()
            .filter_map(|f| dir.get(f).cloned())
            .collect();
        assert_eq!(whole, "line4\nline5\nline6\n");
        assert!(!p.must_rotate(0, 100), "an empty file takes a long line");
        assert_eq!(
            Policy {
                file_bytes_max: 1,
                keep: 0
            }
            .plan("x"),
            [("x.log".to_string(), None)]
        );
    }
}
