//! bincode 2 with one fixed configuration for everything this crate encodes: little-endian, fixed-width
//! integers (so encodings are canonical and sizes predictable), and a decode limit so a length field inside a
//! body can never make the decoder allocate more than the body could hold.

use bincode::config::{Configuration, Fixint, LittleEndian, NoLimit};
use serde::{de::DeserializeOwned, Serialize};

use crate::ProtocolError;

/// The one encoding configuration (no limit on encoding: we only encode our own values).
const CONFIG: Configuration<LittleEndian, Fixint, NoLimit> = bincode::config::standard()
    .with_little_endian()
    .with_fixed_int_encoding();

/// Canonical bytes of `value`.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding our own in-memory values into a Vec cannot fail: no writer errors, no limit.
    bincode::serde::encode_to_vec(value, CONFIG).expect("bincode encoding into a Vec is infallible")
}

/// Decodes exactly `bytes` as a `T`: trailing bytes are an error; no allocation exceeds `bytes.len()`.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    // bincode checks every claimed container length against the configured limit before reserving; the
    // body's own length bounds what it can legitimately hold.
    let config = CONFIG.with_limit::<{ crate::frame::MAX_FRAME_HARD as usize }>();
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| ProtocolError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed {
            what,
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}
