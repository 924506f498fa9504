//! The workspace side of `cs rsync`: one stream per transfer, one root in the home. It lists
//! the root, receives ops and content (a push) or sends content (a pull). The filesystem
//! work runs on a thread of its own, fed through bounded channels, so a large tree never
//! blocks the agent's runtime.

use std::path::{Path, PathBuf};

use cs_protocol::rsync::{pack_listing, RsyncOpen, RsyncReply, RsyncRequest, DELTA_CHUNK_OPS};
use cs_protocol::DATA_CHUNK_BYTES_MAX;
use cs_sync::delta::{self, Delta, DeltaOp};
use cs_sync::rsync::{FileAttrs, Op};
use cs_sync::rsync_fs::{self, NewFile, Receiver, DELTA_FILE_BYTES_MAX};
use cs_transport::{read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Requests and replies queued between the stream and the filesystem thread.
const QUEUE_MAX: usize = 64;
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

/// Serves one rsync stream.
/// `pack`: content goes packed both ways (a distant link, see `RsyncReply::Opened`).
pub async fn serve<W, R>(
    open: RsyncOpen,
    home: Option<PathBuf>,
    pack: bool,
    mut send: W,
    mut recv: R,
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
    let (req_tx, req_rx) = mpsc::channel::<RsyncRequest>(QUEUE_MAX);
    let (rep_tx, mut rep_rx) = mpsc::channel::<RsyncReply>(QUEUE_MAX);
    let worker = std::thread::Builder::new()
        .name("cs-rsync".into())
        .spawn(move || work(root, pack, req_rx, rep_tx));
    if let Err(e) = worker {
        let _ = write_frame(&mut send, &RsyncReply::Error(format!("cannot start: {e}"))).await;
        return;
    }
    let reader = async move {
        loop {
            match read_frame::<_, RsyncRequest>(&mut recv).await {
                Ok(Some(r)) => {
                    if req_tx.send(r).await.is_err() {
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
        while let Some(reply) = rep_rx.recv().await {
            let last = matches!(reply, RsyncReply::Finished { .. } | RsyncReply::Error(_));
            if write_frame(&mut send, &reply).await.is_err() {
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

fn work(
    root: PathBuf,
    pack: bool,
    mut rx: mpsc::Receiver<RsyncRequest>,
    tx: mpsc::Sender<RsyncReply>,
) {
    let send = |r: RsyncReply| tx.blocking_send(r).is_ok();
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
    while let Some(req) = rx.blocking_recv() {
        let req = match req {
            RsyncRequest::Packed(p) => match cs_protocol::sync::unpack(&p) {
                Ok(data) => RsyncRequest::Data(data),
                Err(e) => {
                    let _ = send(RsyncReply::Error(e));
                    return;
                }
            },
            other => other,
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
            RsyncRequest::Packed(_) => send(RsyncReply::Error("a packed chunk left packed".into())),
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
    pack: bool,
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

    /// With `pack` (a distant link), a pulled file's content comes as packed chunks and a
    /// pushed file's packed chunks land unpacked, both checked by their whole-file hash.
    #[tokio::test]
    async fn content_goes_packed_both_ways_when_asked() {
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
            true,
            swr,
            srd,
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        assert_eq!(next(&mut rd).await, RsyncReply::Opened { pack: true });

        write_frame(&mut wr, &RsyncRequest::Get { path: "a.c".into() })
            .await
            .unwrap();
        let (mut got, mut packed) = (Vec::new(), 0);
        loop {
            match next(&mut rd).await {
                RsyncReply::Packed(p) => {
                    packed += 1;
                    got.extend(cs_protocol::sync::unpack(&p).unwrap());
                }
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
            let r = RsyncRequest::data(c.to_vec(), true);
            assert!(matches!(r, RsyncRequest::Packed(_)));
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
        read_frame::<_, RsyncReply>(rd).await.unwrap().unwrap()
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
