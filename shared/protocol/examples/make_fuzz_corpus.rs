//! Writes the fuzz targets' seed corpus (`shared/protocol/fuzz/corpus/<target>/`): one valid input per
//! message kind, framed streams, encoded updates, a signed manifest and bulk inputs, so the fuzzers start
//! from inputs that reach deep into each decoder.
//!
//! `cargo run -p starling-protocol --example make_fuzz_corpus`

use std::path::Path;

use starling_protocol::frame::encode_frame;
use starling_protocol::message::examples;
use starling_protocol::update::encode_update;
use starling_protocol::{AdapterSchema, Encoding, Message, TensorSpec};

struct Counter(u64);

impl rand_core::RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        dst.iter_mut().for_each(|b| *b = self.next_u32() as u8);
    }
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let all = examples();
    for m in &all {
        write(&dir, "message_decoder", m.kind_name(), &m.encode())?;
    }
    let mut stream = vec![10u8];
    for m in all.iter().take(4) {
        stream.extend(encode_frame(&m.encode(), 256).unwrap_or_default());
    }
    write(&dir, "frame_decoder", "four_frames", &stream)?;
    let schema = AdapterSchema::new(vec![
        TensorSpec {
            name: "a".into(),
            shape: vec![3, 5],
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![7],
        },
    ])
    .expect("valid schema");
    let delta: Vec<f32> = (0..22).map(|i| i as f32 * 0.1 - 1.0).collect();
    for (name, enc) in [
        ("f32", Encoding::F32),
        ("int8", Encoding::Int8 { block: 4 }),
    ] {
        let bytes = encode_update(&schema, &delta, enc, &mut Counter(1)).expect("valid update");
        write(&dir, "update_decoder", name, &bytes)?;
    }
    if let Some(Message::Manifest(m)) = all.iter().find(|m| matches!(m, Message::Manifest(_))) {
        let mut sig_then_body = m.signature.clone();
        sig_then_body.extend_from_slice(&m.body);
        write(&dir, "manifest_verifier", "signed", &sig_then_body)?;
        write(&dir, "manifest_verifier", "body", &m.body)?;
    }
    let payload = b"a bulk payload of some length";
    let mut bulk = (payload.len() as u16).to_le_bytes().to_vec();
    bulk.extend_from_slice(&[1, 7, 0, 0, 0, 0, 0]);
    bulk.extend_from_slice(payload);
    write(&dir, "bulk_receiver", "honest", &bulk)?;
    println!("seed corpus written to {}", dir.display());
    Ok(())
}
