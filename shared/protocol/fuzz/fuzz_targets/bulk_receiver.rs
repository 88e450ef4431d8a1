//! Bulk receiving with an arbitrary declared header and arbitrary chunks: typed errors, never more bytes
//! buffered than declared, and success only when size and digest match.
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling_protocol::{BulkDigest, BulkHeader, BulkReceiver};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let size = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let honest = data[2] & 1 == 1;
    let payload = &data[9..];
    let digest = if honest {
        BulkDigest::of(payload)
    } else {
        BulkDigest::of(&data[3..9])
    };
    let Ok(mut rx) = BulkReceiver::new(BulkHeader { size, digest }, 4096) else {
        return;
    };
    let step = usize::from(data[3]).max(1);
    for chunk in payload.chunks(step) {
        if rx.push(chunk).is_err() {
            return;
        }
    }
    if let Ok(out) = rx.finish() {
        assert_eq!(out.len() as u64, size);
        assert_eq!(BulkDigest::of(&out), digest);
    }
});
