//! Messages and bulk payloads on QUIC streams: a frame's 4-byte length is checked against the receiver's cap
//! before its buffer exists; bulk bytes are counted against the declared size and hashed as they arrive.

use quinn::{RecvStream, SendStream};
use starling_protocol::bulk::{BulkHeader, BulkReceiver, CHUNK_BYTES};
use starling_protocol::frame::{check_len, encode_frame, LEN_BYTES, MAX_FRAME_HARD};
use starling_protocol::{Message, ProtocolError};

use crate::TransportError;

/// Writes one message as one frame.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), TransportError> {
    let frame = encode_frame(&message.encode(), MAX_FRAME_HARD)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes and decodes it. The stream ending before a frame starts is
/// reported as [`ProtocolError::Truncated`] with `got: 0`.
pub async fn read_message(recv: &mut RecvStream, max: u32) -> Result<Message, TransportError> {
    let mut header = [0u8; LEN_BYTES];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| truncated(e, LEN_BYTES))?;
    let len = check_len(header, max)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| truncated(e, len))?;
    Ok(Message::decode(&payload)?)
}

fn truncated(e: quinn::ReadExactError, expected: usize) -> TransportError {
    match e {
        quinn::ReadExactError::FinishedEarly(got) => {
            TransportError::Protocol(ProtocolError::Truncated {
                expected: expected as u64,
                got: got as u64,
            })
        }
        quinn::ReadExactError::ReadError(e) => e.into(),
    }
}

/// Writes a bulk payload in bounded chunks (its header frame must already have been sent).
pub async fn write_bulk(send: &mut SendStream, payload: &[u8]) -> Result<(), TransportError> {
    for chunk in payload.chunks(CHUNK_BYTES) {
        send.write_all(chunk).await?;
    }
    Ok(())
}

/// Reads exactly the payload `header` declares, refusing sizes above `max` before reading and checking the
/// digest at the end. Takes every chunk quinn holds per wake-up (one lock of the connection for up to 32
/// packets' data, not one per packet); a byte past the declared size is refused as bytes after the end of
/// the exchange (a bulk payload always ends its stream).
pub async fn read_bulk(
    recv: &mut RecvStream,
    header: BulkHeader,
    max: u64,
) -> Result<Vec<u8>, TransportError> {
    let mut rx = BulkReceiver::new(header, max)?;
    let mut chunks: [bytes::Bytes; 32] = Default::default();
    while rx.remaining() > 0 {
        let Some(n) = recv.read_chunks(&mut chunks).await? else {
            break; // finish() reports the truncation
        };
        for c in &chunks[..n] {
            let take = usize::try_from(rx.remaining()).map_or(c.len(), |r| r.min(c.len()));
            rx.push(&c[..take])?;
            if take < c.len() {
                return Err(after_the_end());
            }
        }
    }
    Ok(rx.finish()?)
}

/// A peer sent more on a stream than its exchange holds.
fn after_the_end() -> TransportError {
    ProtocolError::Malformed {
        what: "stream",
        detail: "bytes after the end of the exchange".into(),
    }
    .into()
}

/// Requires that the peer sent nothing more on this stream (a request is one frame plus its payload).
pub async fn expect_end(recv: &mut RecvStream) -> Result<(), TransportError> {
    match recv.read_chunk(1, true).await? {
        None => Ok(()),
        Some(_) => Err(after_the_end()),
    }
}
