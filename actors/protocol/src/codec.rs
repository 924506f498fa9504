//! Frames: a 4-byte big-endian length, then a bincode 2 (serde) payload.
//!
//! The codec is the only place that knows about bincode, so it can be swapped without touching
//! any message. The length is checked against [`FRAME_BYTES_MAX`] before any buffer is grown,
//! and bincode itself is configured with the same limit.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame payload accepted or produced, in bytes. A peer announcing a larger frame is
/// misbehaving: the connection that carried it is closed.
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Bytes in the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encoding a message failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The message is larger than a frame may be; the sender must chunk it.
    #[error("message of {bytes} bytes exceeds the frame limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { bytes: usize },
    /// bincode refused the value (a bug in a message type).
    #[error("cannot encode message: {0}")]
    Bincode(String),
}

/// Decoding a frame failed. Every variant means the peer sent something invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix announced more than [`FRAME_BYTES_MAX`]; nothing was allocated.
    #[error("frame of {announced} bytes exceeds the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { announced: usize },
    /// The payload is not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The payload decoded, but left bytes over.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `msg` as one frame: length prefix plus payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; FRAME_HEADER_BYTES];
    // The bincode limit applies to decoding only; the size check below covers encoding.
    bincode::serde::encode_into_std_write(msg, &mut out, bincode::config::standard())
        .map_err(|e| EncodeError::Bincode(e.to_string()))?;
    let len = out.len() - FRAME_HEADER_BYTES;
    if len > FRAME_BYTES_MAX {
        return Err(EncodeError::TooLarge { bytes: len });
    }
    out[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame payload (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            announced: payload.len(),
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::Trailing(payload.len() - used));
    }
    Ok(msg)
}

/// Encodes a local state file (an ancestor, a cache) the way frames are encoded, without the
/// frame limit: such files are this machine's own, written and read by the same build.
pub fn encode_state<T: Serialize>(v: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .map_err(|e| EncodeError::Bincode(e.to_string()))
}

/// Decodes what [`encode_state`] wrote; the whole input must be one value.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (v, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(v)
}

/// Parses a length prefix, refusing lengths over the limit.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, DecodeError> {
    let announced = u32::from_be_bytes(header) as usize;
    if announced > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge { announced });
    }
    Ok(announced)
}

/// A sans-IO frame splitter: feed it bytes as they arrive, take whole payloads out.
///
/// Its buffer never holds more than one frame plus one read's worth of bytes, because a length
/// over the limit is refused as soon as its four bytes are seen.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole frame payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(&self.buf[..FRAME_HEADER_BYTES]);
        let len = frame_len(header)?;
        if self.buf.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let payload = self.buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len].to_vec();
        self.buf.drain(..FRAME_HEADER_BYTES + len);
        Ok(Some(payload))
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{ExecInput, ExecOutput, ExitStatus};
    use proptest::prelude::*;

    fn roundtrip(msg: ExecOutput) {
        let frame = encode_frame(&msg).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        let payload = dec.next_payload().unwrap().unwrap();
        assert_eq!(decode::<ExecOutput>(&payload).unwrap(), msg);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn messages_roundtrip() {
        roundtrip(ExecOutput::Stdout {
            offset: 7,
            data: b"hello".to_vec(),
        });
        roundtrip(ExecOutput::Exited {
            status: ExitStatus::Signal(9),
            stdout_bytes: 1,
            stderr_bytes: 2,
        });
        roundtrip(ExecOutput::Failed {
            reason: "no shell".into(),
        });
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            dec.next_payload(),
            Err(DecodeError::TooLarge {
                announced: u32::MAX as usize
            })
        );
        assert_eq!(
            frame_len(((FRAME_BYTES_MAX + 1) as u32).to_be_bytes()),
            Err(DecodeError::TooLarge {
                announced: FRAME_BYTES_MAX + 1
            })
        );
        assert_eq!(
            frame_len((FRAME_BYTES_MAX as u32).to_be_bytes()),
            Ok(FRAME_BYTES_MAX)
        );
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let big = ExecInput::Stdin(vec![0u8; FRAME_BYTES_MAX + 1]);
        assert!(matches!(
            encode_frame(&big),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode_frame(&ExecInput::StdinEof).unwrap();
        frame.push(0);
        assert_eq!(
            decode::<ExecInput>(&frame[4..]),
            Err(DecodeError::Trailing(1))
        );
    }

    #[test]
    fn data_is_compact() {
        // A 64 KiB chunk costs a handful of header bytes, not one byte of overhead per byte.
        let frame = encode_frame(&ExecInput::Stdin(vec![7u8; 65536])).unwrap();
        assert!(frame.len() < 65536 + 16, "frame is {} bytes", frame.len());
    }

    proptest! {
        #[test]
        fn decoder_splits_any_chunking(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            cut in 1usize..50,
        ) {
            let msgs: Vec<ExecInput> = chunks.into_iter().map(ExecInput::Stdin).collect();
            let wire: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                dec.push(piece);
                while let Some(p) = dec.next_payload().unwrap() {
                    got.push(decode::<ExecInput>(&p).unwrap());
                }
            }
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode::<ExecOutput>(&bytes);
            let _ = decode::<crate::hello::ClientHello>(&bytes);
        }
    }
}
