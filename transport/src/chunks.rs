//! Bridges between async streams of byte chunks and the blocking `std::io` world of the
//! filesystem shells: [`ChunkReader`] is a `Read` over chunks arriving on a channel (for
//! applying a file while it is still arriving), [`read_chunks`] reads a file on a blocking
//! thread into a channel of chunks (for sending one). Both channels are bounded, so a slow
//! side slows the other instead of buffering.

use std::io::{self, Read};

use tokio::sync::mpsc;

/// Chunks in flight between the two sides of a bridge.
pub const CHUNKS_IN_FLIGHT_MAX: usize = 8;

/// A blocking `Read` over chunks sent on a channel; the end of the channel is the end of the
/// data. Use it only on a blocking thread (`spawn_blocking`).
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    /// A reader and the sender that feeds it.
    pub fn channel() -> (mpsc::Sender<Vec<u8>>, Self) {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT_MAX);
        (
            tx,
            Self {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
        )
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads what `open` opens on a blocking thread, in chunks of `chunk_bytes` (the last one
/// shorter); an error ends the stream with that error.
pub fn read_chunks<F>(open: F, chunk_bytes: usize) -> mpsc::Receiver<io::Result<Vec<u8>>>
where
    F: FnOnce() -> io::Result<Box<dyn Read + Send>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT_MAX);
    tokio::task::spawn_blocking(move || {
        let mut file = match open() {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            // Filled up to `chunk_bytes` unless the file ends first; `read_to_end` reads into
            // the spare capacity without zeroing it first (a zeroed 64 KiB per chunk cost more
            // than reading the few KB most source files hold).
            let mut buf = Vec::with_capacity(chunk_bytes);
            match file.by_ref().take(chunk_bytes as u64).read_to_end(&mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    if tx.blocking_send(Ok(buf)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// Runs `f` on a blocking thread when `blocking` (a real filesystem), else right here (an
/// in-memory one, in the simulation, where another thread would freeze virtual time).
pub async fn off_thread<T, F>(blocking: bool, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if blocking {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("blocking task failed: {e}"))
    } else {
        Ok(f())
    }
}

/// Reads a whole regular file of at most `max` bytes, never through a final symlink (for
/// deltas, which need the whole basis and target in memory).
pub fn read_file_max(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut data = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() as u64 > max {
        return Err(format!("{}: larger than {max} bytes", path.display()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_goes_through_both_bridges_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let open = move || std::fs::File::open(path).map(|f| Box::new(f) as Box<dyn Read + Send>);
        let mut chunks = read_chunks(open, 7_000);
        let (tx, mut reader) = ChunkReader::channel();
        let sink = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        });
        while let Some(c) = chunks.recv().await {
            tx.send(c.unwrap()).await.unwrap();
        }
        drop(tx);
        assert_eq!(sink.await.unwrap().unwrap(), data);
    }

    /// Gives out its bytes a few at a time, then fails if told to.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        fail_at_end: bool,
    }
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return if self.fail_at_end {
                    Err(io::Error::other("disk on fire"))
                } else {
                    Ok(0)
                };
            }
            let n = buf.len().min(3).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_are_full_however_the_source_trickles_and_an_error_ends_them() {
        let data: Vec<u8> = (0..2_500u32).map(|i| (i % 253) as u8).collect();
        for fail_at_end in [false, true] {
            let d = data.clone();
            let open = move || {
                Ok(Box::new(Trickle {
                    data: d,
                    at: 0,
                    fail_at_end,
                }) as Box<dyn Read + Send>)
            };
            let mut chunks = read_chunks(open, 1_000);
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            let mut failed = false;
            while let Some(c) = chunks.recv().await {
                match c {
                    Ok(c) => {
                        sizes.push(c.len());
                        got.extend_from_slice(&c);
                    }
                    Err(e) => {
                        assert_eq!(e.to_string(), "disk on fire");
                        failed = true;
                    }
                }
            }
            assert_eq!(failed, fail_at_end);
            if fail_at_end {
                // The last 500 bytes were read but their chunk ended in the error.
                assert_eq!(sizes, [1_000, 1_000]);
                assert_eq!(got, data[..2_000]);
            } else {
                assert_eq!(sizes, [1_000, 1_000, 500]);
                assert_eq!(got, data);
            }
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_an_error_not_an_empty_file() {
        let open = || {
            std::fs::File::open("/nonexistent/cs-test").map(|f| Box::new(f) as Box<dyn Read + Send>)
        };
        let mut chunks = read_chunks(open, 10);
        assert!(chunks.recv().await.unwrap().is_err());
    }
}
