//! Typed messages over any async byte stream (a QUIC stream, a Unix socket).

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use cs_protocol::codec::{frame_len, FRAME_HEADER_BYTES};
use cs_protocol::{decode, encode_frame, DecodeError, EncodeError};

/// Sending or receiving a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Writes one message as a frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
    T: Serialize,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one message. `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < FRAME_HEADER_BYTES {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = frame_len(header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    Ok(Some(decode(&payload)?))
}

/// Reads frames in batches: [`FrameReader::next_batch`] waits for one whole frame, then also
/// takes every further frame already received, so a consumer on another thread is woken once
/// per batch instead of once per frame (at a frame per small file, a wake per frame cost an
/// rsync push a fifth of the agent's CPU in context switches), and a byte stream over a
/// socket is read in large reads instead of two per frame.
///
/// Memory: the buffer holds at most one read ([`FrameReader::READ_BYTES`]) plus one frame
/// ([`cs_protocol::FRAME_BYTES_MAX`]). Cancel-safe: what was read stays buffered.
pub struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
    /// `buf[start..end]` is received and not yet returned.
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Bytes asked of the stream per read.
    pub const READ_BYTES: usize = 256 * 1024;

    pub fn new(r: R) -> Self {
        Self {
            r,
            buf: vec![0; Self::READ_BYTES],
            start: 0,
            end: 0,
        }
    }

    /// The next frames: at least one, and those already received until their payloads reach
    /// `max_bytes`. `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next_batch<T: DeserializeOwned>(
        &mut self,
        max_bytes: usize,
    ) -> Result<Option<Vec<T>>, FrameError> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        loop {
            while bytes < max_bytes {
                let Some(len) = self.whole_frame()? else {
                    break;
                };
                let payload = &self.buf[self.start + FRAME_HEADER_BYTES..][..len];
                batch.push(decode(payload)?);
                self.start += FRAME_HEADER_BYTES + len;
                bytes += len;
            }
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            self.make_room()?;
            let n = self.r.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.end += n;
        }
    }

    /// The payload length of the whole frame at `start`, if it is all buffered.
    fn whole_frame(&self) -> Result<Option<usize>, FrameError> {
        let have = &self.buf[self.start..self.end];
        let Some(header) = have.first_chunk::<FRAME_HEADER_BYTES>() else {
            return Ok(None);
        };
        let len = frame_len(*header)?;
        Ok((have.len() >= FRAME_HEADER_BYTES + len).then_some(len))
    }

    /// Moves what is buffered to the front and makes the buffer large enough for the frame
    /// it starts (a length over the limit is refused here) and one read.
    fn make_room(&mut self) -> Result<(), FrameError> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let need = match self.buf[..self.end].first_chunk::<FRAME_HEADER_BYTES>() {
            Some(h) => (FRAME_HEADER_BYTES + frame_len(*h)?).max(self.end + Self::READ_BYTES),
            None => Self::READ_BYTES,
        };
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        } else if self.buf.len() > need.max(2 * Self::READ_BYTES) {
            // Back to its usual size after a large frame.
            self.buf.truncate(need);
            self.buf.shrink_to_fit();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(msgs: &[Vec<u8>]) -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| encode_frame(&serde_bytes::ByteBuf::from(m.clone())).unwrap())
            .collect()
    }

    async fn batch(r: &mut FrameReader<&[u8]>, max: usize) -> Option<Vec<Vec<u8>>> {
        let b: Option<Vec<serde_bytes::ByteBuf>> = r.next_batch(max).await.unwrap();
        b.map(|b| b.into_iter().map(|x| x.into_vec()).collect())
    }

    #[tokio::test]
    async fn frames_come_in_batches_of_what_arrived_up_to_the_byte_limit() {
        let msgs: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 1000]).collect();
        let wire = frames(&msgs);
        let mut r = FrameReader::new(wire.as_slice());
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(b) = batch(&mut r, 10_000).await {
            sizes.push(b.len());
            got.extend(b);
        }
        assert_eq!(got, msgs);
        // Each batch stops at the first frame that takes its payloads to 10,000 bytes.
        assert!(sizes.iter().all(|&n| n <= 10), "{sizes:?}");
        assert_eq!(sizes.len(), 10, "{sizes:?}");
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_and_a_frame_larger_than_a_read_come_whole() {
        let big = vec![7u8; cs_protocol::FRAME_BYTES_MAX - 64];
        let msgs = vec![b"first".to_vec(), big, b"last".to_vec()];
        let wire = frames(&msgs);
        let (mut w, rd) = tokio::io::duplex(1000);
        let feeder = tokio::spawn(async move {
            for piece in wire.chunks(997) {
                w.write_all(piece).await.unwrap();
            }
        });
        let mut r = FrameReader::new(rd);
        let mut got = Vec::new();
        while let Some(b) = r
            .next_batch::<serde_bytes::ByteBuf>(usize::MAX)
            .await
            .unwrap()
        {
            got.extend(b.into_iter().map(|x| x.into_vec()));
        }
        feeder.await.unwrap();
        assert_eq!(got, msgs);
        assert!(
            r.buf.len() <= 2 * FrameReader::<&[u8]>::READ_BYTES,
            "{}",
            r.buf.len()
        );
    }

    #[tokio::test]
    async fn a_truncated_stream_and_an_oversized_length_are_errors() {
        let mut wire = frames(&[b"whole".to_vec(), b"cut short".to_vec()]);
        wire.truncate(wire.len() - 3);
        let mut r = FrameReader::new(wire.as_slice());
        assert_eq!(
            batch(&mut r, usize::MAX).await.unwrap(),
            vec![b"whole".to_vec()]
        );
        let e = r.next_batch::<serde_bytes::ByteBuf>(usize::MAX).await;
        assert!(matches!(e, Err(FrameError::Truncated)), "{e:?}");

        let huge = ((cs_protocol::FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        let mut r = FrameReader::new(huge.as_slice());
        let e = r.next_batch::<serde_bytes::ByteBuf>(usize::MAX).await;
        assert!(matches!(e, Err(FrameError::Decode(_))), "{e:?}");

        let mut r = FrameReader::new(&[][..]);
        assert!(batch(&mut r, 1).await.is_none());
    }
}
