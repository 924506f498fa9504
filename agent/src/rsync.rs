//! The workspace side of `cs rsync`: one stream per transfer, one root in the home. It lists
//! the root, receives ops and content (a push) or sends content (a pull). The filesystem
//! work runs on a thread of its own, fed through bounded channels, so a large tree never
//! blocks the agent's runtime.

use std::path::{Path, PathBuf};

use cs_protocol::rsync::{
    pack_listing, Packing, RsyncOpen, RsyncReply, RsyncRequest, DELTA_CHUNK_OPS,
};
use cs_protocol::DATA_CHUNK_BYTES_MAX;
use cs_sync::delta::{self, Delta, DeltaOp};
use cs_sync::rsync::{FileAttrs, Op};
use cs_sync::rsync_fs::{self, NewFile, Receiver, DELTA_FILE_BYTES_MAX};
use cs_transport::{write_frame, FrameReader};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Batches of requests and of replies queued between the stream and the filesystem thread
/// (each about [`BATCH_BYTES`], and one frame more at most: 4 MiB and 16 frames each way).
const QUEUE_MAX: usize = 16;
/// Payload bytes at which a batch of requests or replies goes: the thread and the stream's
/// task wake each other once per batch, not once per frame.
const BATCH_BYTES: usize = 256 * 1024;
/// rsync transfers served at once.
pub const RSYNC_STREAMS_MAX: usize = 16;

/// The root a stream names, inside `home`: relative, `~/...`, or absolute under the home.
pub fn resolve(home: &Path, root: &str) -> Result<PathBuf, String> {
    let outside = || format!("'{root}' is outside the workspace home {}", home.display());
    if let Some(abs) = root.strip_prefix('/') {
        let rel = Path::new("/").join(abs);
        let rest = rel.strip_prefix(home).map_err(|_| outside())?;
        let rest = rest.to_str().ok_or_else(outside)?;
        return crate::sync::resolve_root(home, rest).map_err(|_| outside());
    }
    crate::sync::resolve_root(home, root).map_err(|_| outside())
}

/// How an rsync stream's content goes on this connection: zstd on a distant link (as sync's,
/// [`crate::sync::packs`]), LZ4 on a near one.
pub(crate) fn packing(probe: &cs_transport::TailProbe) -> Packing {
    if crate::sync::packs(probe) {
        Packing::Zstd
    } else {
        Packing::Lz4
    }
}

/// Serves one rsync stream.
/// `pack`: how content goes both ways (see `RsyncReply::Opened`).
pub async fn serve<W, R>(
    open: RsyncOpen,
    home: Option<PathBuf>,
    pack: Packing,
    mut send: W,
    recv: R,
) where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let root = match home
        .ok_or_else(|| "this agent serves no rsync".to_string())
        .and_then(|h| resolve(&h, &open.root))
    {
        Ok(r) => r,
        Err(reason) => {
            let _ = write_frame(&mut send, &RsyncReply::Error(reason)).await;
            return;
        }
    };
    if write_frame(&mut send, &RsyncReply::Opened { pack })
        .await
        .is_err()
    {
        return;
    }
    let (req_tx, req_rx) = mpsc::channel::<Vec<RsyncRequest>>(QUEUE_MAX);
    let (rep_tx, mut rep_rx) = mpsc::channel::<Vec<RsyncReply>>(QUEUE_MAX);
    let worker = std::thread::Builder::new()
        .name("cs-rsync".into())
        .spawn(move || work(root, pack, req_rx, rep_tx));
    if let Err(e) = worker {
        let _ = write_frame(&mut send, &RsyncReply::Error(format!("cannot start: {e}"))).await;
        return;
    }
    let reader = async move {
        let mut frames = FrameReader::new(recv);
        loop {
            match frames.next_batch::<RsyncRequest>(BATCH_BYTES).await {
                Ok(Some(batch)) => {
                    if req_tx.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "rsync stream broke");
                    return;
                }
            }
        }
    };
    let writer = async move {
        let mut out = Vec::new();
        while let Some(batch) = rep_rx.recv().await {
            // One write per batch: its frames end to end.
            out.clear();
            let mut last = false;
            for reply in &batch {
                last |= matches!(reply, RsyncReply::Finished { .. } | RsyncReply::Error(_));
                match cs_protocol::encode_frame(reply) {
                    Ok(f) => out.extend_from_slice(&f),
                    Err(e) => {
                        tracing::warn!(error = %e, "rsync reply not encoded");
                        return;
                    }
                }
            }
            if tokio::io::AsyncWriteExt::write_all(&mut send, &out)
                .await
                .is_err()
            {
                return;
            }
            if last {
                break;
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
    };
    // The writer ends the stream; the reader ends when the laptop finishes its side.
    tokio::join!(reader, writer);
}

/// What is being received now.
enum Incoming {
    Whole(Box<Result<NewFile, String>>, String),
    Delta(String, u64, [u8; 32], Vec<DeltaOp>, u64),
}

/// Replies on their way to the stream, in batches: a batch goes when its payloads reach
/// [`BATCH_BYTES`], when it ends the stream (`Finished`, `Error`), and before the thread waits
/// for requests (the laptop may be waiting for these replies).
struct Replies {
    tx: mpsc::Sender<Vec<RsyncReply>>,
    batch: std::cell::RefCell<Vec<RsyncReply>>,
    bytes: std::cell::Cell<usize>,
}

impl Replies {
    /// Queues a reply; false when the stream is gone.
    fn send(&self, r: RsyncReply) -> bool {
        let ends = matches!(r, RsyncReply::Finished { .. } | RsyncReply::Error(_));
        // About its encoded size: a file's delta parts or a large file's signature count at
        // their size, so a batch never holds much more than BATCH_BYTES.
        let n = 64
            + match &r {
                RsyncReply::Data(b)
                | RsyncReply::Packed(b)
                | RsyncReply::Lz4(b)
                | RsyncReply::Listing(b) => b.len(),
                RsyncReply::DeltaPart(ops) => ops
                    .iter()
                    .map(|o| match o {
                        DeltaOp::Literal(b) => b.len(),
                        DeltaOp::Copy { .. } => 16,
                    })
                    .sum(),
                RsyncReply::Sig(s) => std::mem::size_of_val(s.blocks()),
                _ => 0,
            };
        self.batch.borrow_mut().push(r);
        self.bytes.set(self.bytes.get() + n);
        if ends || self.bytes.get() >= BATCH_BYTES {
            self.flush()
        } else {
            true
        }
    }

    /// Sends the batch so far; false when the stream is gone.
    fn flush(&self) -> bool {
        let batch = std::mem::take(&mut *self.batch.borrow_mut());
        self.bytes.set(0);
        batch.is_empty() || self.tx.blocking_send(batch).is_ok()
    }
}

fn work(
    root: PathBuf,
    pack: Packing,
    mut rx: mpsc::Receiver<Vec<RsyncRequest>>,
    tx: mpsc::Sender<Vec<RsyncReply>>,
) {
    let replies = Replies {
        tx,
        batch: Default::default(),
        bytes: Default::default(),
    };
    let send = |r: RsyncReply| replies.send(r);
    let mut receiver = Receiver::new(root.clone());
    let mut failed = 0u64;
    let mut incoming: Option<Incoming> = None;
    let mut fail = |path: &str, reason: String| {
        failed += 1;
        send(RsyncReply::Failed {
            path: path.to_string(),
            reason,
        })
    };
    let mut queued = Vec::new().into_iter();
    loop {
        let Some(req) = queued.next() else {
            let next = match rx.try_recv() {
                Ok(batch) => Some(batch),
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !replies.flush() {
                        return;
                    }
                    rx.blocking_recv()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            match next {
                Some(batch) => {
                    queued = batch.into_iter();
                    continue;
                }
                None => return,
            }
        };
        let req = match req.unpacked() {
            Ok(r) => r,
            Err(e) => {
                let _ = send(RsyncReply::Error(e));
                return;
            }
        };
        let ok = match req {
            RsyncRequest::List { recursive, hash } => {
                match rsync_fs::list(&root, recursive, hash).and_then(|e| pack_listing(&e)) {
                    Ok(chunks) => {
                        let mut ok = true;
                        for c in chunks {
                            ok &= send(RsyncReply::Listing(c));
                        }
                        ok && send(RsyncReply::ListingEnd)
                    }
                    Err(e) => send(RsyncReply::Error(e)),
                }
            }
            RsyncRequest::Signature { path } => match read_small(&mut receiver, &path) {
                Ok(bytes) => send(RsyncReply::Sig(delta::signature(&bytes))),
                Err(e) => fail(&path, e),
            },
            RsyncRequest::Apply(op) => {
                let (path, r) = match &op {
                    Op::Delete { path, .. } => (path, receiver.delete(path)),
                    Op::Mkdir { path } => (path, receiver.mkdir(path)),
                    Op::Symlink { path, target } => (path, receiver.symlink(path, target)),
                    Op::Attrs {
                        path,
                        mode,
                        mtime,
                        uid,
                        gid,
                    } => (path, receiver.attrs(path, *mode, *mtime, *uid, *gid)),
                    Op::Send { path, .. } => {
                        (path, Err("a Send op comes as Put or PutDelta".to_string()))
                    }
                };
                match r {
                    Ok(()) => true,
                    Err(e) => fail(path, e),
                }
            }
            RsyncRequest::Put { path, partial } => {
                let f = Box::new(receiver.begin_file(&path).map(|mut f| {
                    if partial {
                        f.keep_partial();
                    }
                    f
                }));
                incoming = Some(Incoming::Whole(f, path));
                true
            }
            RsyncRequest::Data(bytes) => match incoming.take() {
                Some(Incoming::Whole(f, path)) => {
                    let f = Box::new((*f).and_then(|mut f| f.write(&bytes).map(|()| f)));
                    incoming = Some(Incoming::Whole(f, path));
                    true
                }
                other => {
                    incoming = other;
                    send(RsyncReply::Error("content without a Put".into()))
                }
            },
            RsyncRequest::PutEnd { size, hash, attrs } => match incoming.take() {
                Some(Incoming::Whole(f, path)) => match (*f)
                    .and_then(|f| f.finish_with(size, &hash, attrs.as_ref(), receiver.can_chown))
                {
                    Ok(()) => true,
                    Err(e) => fail(&path, e),
                },
                _ => send(RsyncReply::Error("a content end without a Put".into())),
            },
            RsyncRequest::PutDelta { path, size, hash } => {
                incoming = Some(Incoming::Delta(path, size, hash, Vec::new(), 0));
                true
            }
            RsyncRequest::DeltaPart(mut ops) => match incoming.as_mut() {
                Some(Incoming::Delta(_, size, _, all, literal)) => {
                    *literal += ops
                        .iter()
                        .map(|o| match o {
                            DeltaOp::Literal(b) => b.len() as u64,
                            DeltaOp::Copy { .. } => 0,
                        })
                        .sum::<u64>();
                    if *literal > *size || all.len() > 16 * 1024 * 1024 {
                        send(RsyncReply::Error("a delta larger than its file".into()))
                    } else {
                        all.append(&mut ops);
                        true
                    }
                }
                _ => send(RsyncReply::Error("a delta part without a PutDelta".into())),
            },
            RsyncRequest::DeltaEnd(attrs) => match incoming.take() {
                Some(Incoming::Delta(path, size, hash, ops, _)) => {
                    match patch_into(
                        &mut receiver,
                        &path,
                        Delta {
                            ops,
                            target_bytes: size,
                            target_hash: hash,
                        },
                        attrs.as_ref(),
                    ) {
                        Ok(()) => true,
                        Err(e) => fail(&path, e),
                    }
                }
                _ => send(RsyncReply::Error("a delta end without a PutDelta".into())),
            },
            RsyncRequest::Get { path } => send_file(&mut receiver, &path, pack, &send),
            RsyncRequest::GetDelta { path, sig } => match read_small(&mut receiver, &path) {
                Ok(bytes) => {
                    let d = delta::delta(&sig, &bytes);
                    let mut ok = true;
                    for c in d.ops.chunks(DELTA_CHUNK_OPS) {
                        ok &= send(RsyncReply::DeltaPart(c.to_vec()));
                    }
                    ok && send(RsyncReply::DeltaEnd(Ok((d.target_bytes, d.target_hash))))
                }
                Err(e) => send(RsyncReply::DeltaEnd(Err(e))),
            },
            RsyncRequest::Finish => {
                let _ = send(RsyncReply::Finished { failed });
                return;
            }
            // Unpacked into `Data` above.
            RsyncRequest::Packed(_) | RsyncRequest::Lz4(_) => {
                send(RsyncReply::Error("a packed chunk left packed".into()))
            }
        };
        if !ok {
            return;
        }
    }
}

/// A file's whole content, if it is at most [`DELTA_FILE_BYTES_MAX`].
fn read_small(receiver: &mut Receiver, path: &str) -> Result<Vec<u8>, String> {
    let p = receiver.path(path)?;
    let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{path}: {e}"))?;
    if !m.is_file() || m.len() > DELTA_FILE_BYTES_MAX {
        return Err(format!(
            "{path}: not a regular file of at most {DELTA_FILE_BYTES_MAX} bytes"
        ));
    }
    std::fs::read(&p).map_err(|e| format!("{path}: {e}"))
}

fn patch_into(
    receiver: &mut Receiver,
    path: &str,
    d: Delta,
    attrs: Option<&FileAttrs>,
) -> Result<(), String> {
    let basis = read_small(receiver, path)?;
    let out = delta::patch(&basis, &d, d.target_bytes).map_err(|e| format!("{path}: {e}"))?;
    let mut f = receiver.begin_file(path)?;
    f.write(&out)?;
    f.finish_with(d.target_bytes, &d.target_hash, attrs, receiver.can_chown)
}

fn send_file(
    receiver: &mut Receiver,
    path: &str,
    pack: Packing,
    send: &dyn Fn(RsyncReply) -> bool,
) -> bool {
    use std::io::Read;
    let opened = receiver
        .path(path)
        .and_then(|p| std::fs::File::open(&p).map_err(|e| format!("{path}: {e}")));
    let mut f = match opened {
        Ok(f) => f,
        Err(e) => return send(RsyncReply::Data(Vec::new())) && send(RsyncReply::DataEnd(Err(e))),
    };
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; DATA_CHUNK_BYTES_MAX];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                size += n as u64;
                if !send(RsyncReply::data(buf[..n].to_vec(), pack)) {
                    return false;
                }
            }
            Err(e) => {
                return send(RsyncReply::Data(Vec::new()))
                    && send(RsyncReply::DataEnd(Err(format!("{path}: {e}"))))
            }
        }
    }
    send(RsyncReply::Data(Vec::new()))
        && send(RsyncReply::DataEnd(Ok((size, *h.finalize().as_bytes()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn content_goes_packed_with_zstd_both_ways_on_a_distant_link() {
        content_goes_packed_both_ways(Packing::Zstd).await;
    }

    #[tokio::test]
    async fn content_goes_packed_with_lz4_both_ways_on_a_near_link() {
        content_goes_packed_both_ways(Packing::Lz4).await;
    }

    /// A pulled file's content comes as chunks packed as `pack` says, and a pushed file's
    /// packed chunks land unpacked, both checked by their whole-file hash.
    async fn content_goes_packed_both_ways(pack: Packing) {
        let is_packed = |r: &RsyncReply| match pack {
            Packing::Zstd => matches!(r, RsyncReply::Packed(_)),
            Packing::Lz4 => matches!(r, RsyncReply::Lz4(_)),
            Packing::Raw => false,
        };
        let home = tempfile::tempdir().unwrap();
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("static int line_{i}(void) {{ return {i}; }}\n").into_bytes())
            .collect();
        std::fs::write(home.path().join("a.c"), &text).unwrap();
        let (client, server) = tokio::io::duplex(1 << 20);
        let (srd, swr) = tokio::io::split(server);
        let agent = tokio::spawn(serve(
            RsyncOpen { root: ".".into() },
            Some(home.path().to_path_buf()),
            pack,
            swr,
            srd,
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        assert_eq!(next(&mut rd).await, RsyncReply::Opened { pack });

        write_frame(&mut wr, &RsyncRequest::Get { path: "a.c".into() })
            .await
            .unwrap();
        let (mut got, mut packed) = (Vec::new(), 0);
        loop {
            let r = next(&mut rd).await;
            if is_packed(&r) {
                packed += 1;
            }
            match r.unpacked().unwrap() {
                RsyncReply::Data(d) if d.is_empty() => break,
                RsyncReply::Data(d) => got.extend(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(packed > 0, "no chunk was packed");
        assert_eq!(got, text);
        let hash = *blake3::hash(&text).as_bytes();
        assert_eq!(
            next(&mut rd).await,
            RsyncReply::DataEnd(Ok((text.len() as u64, hash)))
        );

        let put = RsyncRequest::Put {
            path: "b.c".into(),
            partial: false,
        };
        write_frame(&mut wr, &put).await.unwrap();
        for c in text.chunks(DATA_CHUNK_BYTES_MAX) {
            let r = RsyncRequest::data(c.to_vec(), pack);
            assert!(matches!(
                (&r, pack),
                (RsyncRequest::Packed(_), Packing::Zstd) | (RsyncRequest::Lz4(_), Packing::Lz4)
            ));
            write_frame(&mut wr, &r).await.unwrap();
        }
        let attrs = FileAttrs {
            mode: Some(0o640),
            mtime: Some((1_600_000_000, 7)),
            ..FileAttrs::default()
        };
        let end = RsyncRequest::PutEnd {
            size: text.len() as u64,
            hash,
            attrs: Some(attrs),
        };
        write_frame(&mut wr, &end).await.unwrap();
        write_frame(&mut wr, &RsyncRequest::Finish).await.unwrap();
        assert_eq!(next(&mut rd).await, RsyncReply::Finished { failed: 0 });
        assert_eq!(std::fs::read(home.path().join("b.c")).unwrap(), text);
        let m = std::fs::metadata(home.path().join("b.c")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (m.mode() & 0o7777, m.mtime(), m.mtime_nsec()),
            (0o640, 1_600_000_000, 7)
        );
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), agent)
            .await
            .unwrap()
            .unwrap();
    }

    async fn next<R: AsyncRead + Unpin>(rd: &mut R) -> RsyncReply {
        cs_transport::read_frame::<_, RsyncReply>(rd)
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn roots_stay_in_the_home() {
        let home = Path::new("/home/u");
        assert_eq!(resolve(home, "src").unwrap(), Path::new("/home/u/src"));
        assert_eq!(resolve(home, "~/src/").unwrap(), Path::new("/home/u/src"));
        assert_eq!(
            resolve(home, "/home/u/src").unwrap(),
            Path::new("/home/u/src")
        );
        for bad in ["/etc", "../x", "/home/u/../v", "/home/uv"] {
            let e = resolve(home, bad).unwrap_err();
            assert!(e.contains("outside the workspace home"), "{bad}: {e}");
        }
    }
}
