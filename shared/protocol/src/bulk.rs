//! Bulk payloads (model blobs, update deltas): the sender declares the size and SHA-256 up front in a
//! [`BulkHeader`] frame, then streams the raw bytes in chunks; the receiver refuses a declared size above its
//! own cap before reading anything, refuses any byte past the declared size, and checks the digest at the end.
//! What must never live here: I/O; the transport moves the chunks.

use sha2::Digest as _;

use crate::{Digest, ProtocolError};

/// Size of the chunks senders write (and the most a receiver buffers before hashing).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// What a bulk payload declares before its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BulkHeader {
    /// Exact payload length in bytes.
    pub size: u64,
    /// SHA-256 of the whole payload.
    pub digest: Digest,
}

impl BulkHeader {
    /// The header describing `payload`.
    pub fn describe(payload: &[u8]) -> Self {
        Self {
            size: payload.len() as u64,
            digest: Digest::of(payload),
        }
    }
}

/// Receives one bulk payload chunk by chunk, against the declared header and the receiver's cap.
#[derive(Debug)]
pub struct BulkReceiver {
    header: BulkHeader,
    buf: Vec<u8>,
    hasher: sha2::Sha256,
}

impl BulkReceiver {
    /// Starts receiving; refuses a declared size above `max` before any byte is read or buffer reserved.
    pub fn new(header: BulkHeader, max: u64) -> Result<Self, ProtocolError> {
        if header.size > max {
            return Err(ProtocolError::PayloadTooLarge {
                len: header.size,
                max,
            });
        }
        // Reserve at most one chunk up front; the rest grows with what actually arrives.
        let reserve = usize::try_from(header.size).map_or(CHUNK_BYTES, |s| s.min(CHUNK_BYTES));
        Ok(Self {
            header,
            buf: Vec::with_capacity(reserve),
            hasher: sha2::Sha256::new(),
        })
    }

    /// Bytes still due.
    pub fn remaining(&self) -> u64 {
        self.header.size - self.buf.len() as u64
    }

    /// Accepts the next chunk; an error if it runs past the declared size.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ProtocolError> {
        if chunk.len() as u64 > self.remaining() {
            return Err(ProtocolError::Overrun {
                declared: self.header.size,
            });
        }
        self.hasher.update(chunk);
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// Ends the payload: an error if bytes are missing or the digest differs; the payload otherwise.
    pub fn finish(self) -> Result<Vec<u8>, ProtocolError> {
        if self.remaining() > 0 {
            return Err(ProtocolError::Truncated {
                expected: self.header.size,
                got: self.buf.len() as u64,
            });
        }
        let actual = Digest(self.hasher.finalize().into());
        if actual != self.header.digest {
            return Err(ProtocolError::DigestMismatch {
                declared: self.header.digest,
                actual,
            });
        }
        Ok(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_in_any_chunking_arrives_verified() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let h = BulkHeader::describe(&data);
        for chunk in [1, 7, 4096, 10_000] {
            let mut r = BulkReceiver::new(h, 10_000).unwrap();
            for c in data.chunks(chunk) {
                r.push(c).unwrap();
            }
            assert_eq!(r.finish().unwrap(), data);
        }
    }

    #[test]
    fn size_cap_overrun_truncation_and_digest_are_typed_errors() {
        let data = vec![1u8; 100];
        let h = BulkHeader::describe(&data);
        assert_eq!(
            BulkReceiver::new(h, 99).unwrap_err(),
            ProtocolError::PayloadTooLarge { len: 100, max: 99 }
        );
        let mut r = BulkReceiver::new(h, 100).unwrap();
        r.push(&data).unwrap();
        assert_eq!(
            r.push(b"x").unwrap_err(),
            ProtocolError::Overrun { declared: 100 }
        );
        let mut r = BulkReceiver::new(h, 100).unwrap();
        r.push(&data[..50]).unwrap();
        assert_eq!(
            r.finish().unwrap_err(),
            ProtocolError::Truncated {
                expected: 100,
                got: 50
            }
        );
        let mut r = BulkReceiver::new(h, 100).unwrap();
        r.push(&[2u8; 100]).unwrap();
        assert!(matches!(
            r.finish(),
            Err(ProtocolError::DigestMismatch { .. })
        ));
        // A hostile header claiming 2^64-1 bytes costs nothing.
        let huge = BulkHeader {
            size: u64::MAX,
            digest: h.digest,
        };
        assert!(BulkReceiver::new(huge, 1 << 30).is_err());
    }
}
