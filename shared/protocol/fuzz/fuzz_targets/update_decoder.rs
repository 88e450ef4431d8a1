//! The update decoder against a fixed adapter schema: arbitrary bytes give a typed error or a delta of the
//! schema's length with only finite values.
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling_protocol::update::{decode_update, peek_header};
use starling_protocol::{AdapterSchema, TensorSpec, UpdateLimits};

fuzz_target!(|data: &[u8]| {
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
    .expect("a valid schema");
    // Let the fuzzer reach the payload: splice the real schema hash over bytes 12..44 when long enough.
    let mut bytes = data.to_vec();
    if bytes.len() >= 52 && bytes[0] & 1 == 1 {
        bytes[12..44].copy_from_slice(&schema.hash().0);
    }
    let _ = peek_header(&bytes);
    if let Ok(d) = decode_update(&bytes, &schema, &UpdateLimits::default()) {
        assert_eq!(d.len(), schema.num_params());
        assert!(d.iter().all(|x| x.is_finite()));
    }
});
