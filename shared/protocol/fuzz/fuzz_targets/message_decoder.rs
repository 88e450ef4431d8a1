//! Every message decoder (the kind byte selects it): arbitrary payloads give a typed error or a message
//! that re-encodes to exactly the same bytes (the encoding is canonical).
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling_protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(m.encode(), data, "decoded messages re-encode canonically");
    }
});
