//! Length-prefixed frames: a 4-byte little-endian length, then that many bytes of payload.
//!
//! The length is checked against the receiver's cap the moment its 4 bytes are known, before any buffer for
//! the payload exists. [`FrameDecoder`] is the sans-IO decoder (push bytes, pull frames); transports that
//! read a stream directly use [`check_len`] on the 4-byte header and then read exactly that many bytes.
//! What must never live here: message semantics (see [`crate::message`]) or I/O.

use crate::ProtocolError;

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Default cap on one control frame: control messages are small; bulk data never travels in frames.
pub const MAX_FRAME_DEFAULT: u32 = 1 << 20;
/// The largest cap any receiver may set (16 MiB): also the decode limit inside message bodies.
pub const MAX_FRAME_HARD: u32 = 16 << 20;

/// The payload length a 4-byte header declares, if it is within `max` (and within [`MAX_FRAME_HARD`]).
pub fn check_len(header: [u8; LEN_BYTES], max: u32) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(header);
    let cap = max.min(MAX_FRAME_HARD);
    if len > cap {
        return Err(ProtocolError::FrameTooLarge {
            len: u64::from(len),
            max: u64::from(cap),
        });
    }
    Ok(len as usize)
}

/// `payload` with its length prefix; errors if the payload exceeds `max`.
pub fn encode_frame(payload: &[u8], max: u32) -> Result<Vec<u8>, ProtocolError> {
    let cap = max.min(MAX_FRAME_HARD);
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= cap)
        .ok_or(ProtocolError::FrameTooLarge {
            len: payload.len() as u64,
            max: u64::from(cap),
        })?;
    let mut out = Vec::with_capacity(LEN_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Incremental frame decoder: push whatever bytes arrive, pull complete frames.
#[derive(Debug)]
pub struct FrameDecoder {
    max: u32,
    buf: Vec<u8>,
    /// The checked length of the frame being assembled, once its header is complete.
    want: Option<usize>,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes (capped at [`MAX_FRAME_HARD`]).
    pub fn new(max: u32) -> Self {
        Self {
            max: max.min(MAX_FRAME_HARD),
            buf: Vec::new(),
            want: None,
            failed: false,
        }
    }

    /// Appends bytes from the peer. After an error the decoder stays failed: a byte stream that lost
    /// framing cannot be trusted again.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.failed {
            return Err(ProtocolError::Malformed {
                what: "frame stream",
                detail: "decoder already failed".into(),
            });
        }
        // The buffer holds what was pushed and not yet pulled; the caller bounds each read it pushes.
        self.buf.extend_from_slice(bytes);
        self.check_header()
    }

    fn check_header(&mut self) -> Result<(), ProtocolError> {
        if self.want.is_none() && self.buf.len() >= LEN_BYTES {
            let mut h = [0u8; LEN_BYTES];
            h.copy_from_slice(&self.buf[..LEN_BYTES]);
            match check_len(h, self.max) {
                Ok(n) => self.want = Some(n),
                Err(e) => {
                    self.failed = true;
                    self.buf = Vec::new();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The next complete frame's payload, if one has fully arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        self.check_header()?;
        match self.want {
            Some(n) if self.buf.len() >= LEN_BYTES + n => {
                let rest = self.buf.split_off(LEN_BYTES + n);
                let mut frame = std::mem::replace(&mut self.buf, rest);
                frame.drain(..LEN_BYTES);
                self.want = None;
                self.check_header()?;
                Ok(Some(frame))
            }
            _ => Ok(None),
        }
    }

    /// Call at end of stream: an error if a frame was left incomplete.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let expected = self.want.map_or(LEN_BYTES, |n| LEN_BYTES + n) as u64;
        Err(ProtocolError::Truncated {
            expected,
            got: self.buf.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_reassemble() {
        let a = encode_frame(b"hello", 100).unwrap();
        let b = encode_frame(b"", 100).unwrap();
        let c = encode_frame(&[7u8; 50], 100).unwrap();
        let stream: Vec<u8> = [a, b, c].concat();
        for cut in 0..stream.len() {
            let mut d = FrameDecoder::new(100);
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                d.push(part).unwrap();
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            d.finish().unwrap();
            assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![7u8; 50]]);
        }
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut d = FrameDecoder::new(1000);
        let err = d.push(&u32::MAX.to_le_bytes()).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                len: u64::from(u32::MAX),
                max: 1000
            }
        );
        assert!(d.push(b"x").is_err(), "a failed decoder stays failed");
        assert!(encode_frame(&[0; 11], 10).is_err());
    }

    #[test]
    fn truncation_is_reported() {
        let f = encode_frame(b"abcdef", 100).unwrap();
        let mut d = FrameDecoder::new(100);
        d.push(&f[..7]).unwrap();
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(
            d.finish().unwrap_err(),
            ProtocolError::Truncated {
                expected: 10,
                got: 7
            }
        );
        let mut d = FrameDecoder::new(100);
        d.push(&f[..2]).unwrap();
        assert!(d.finish().is_err());
    }
}
