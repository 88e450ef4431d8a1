//! Property tests: every decoder survives arbitrary bytes with a typed error (no panic, no huge allocation),
//! and encodings round-trip. The cargo-fuzz targets in `fuzz/` drive the same entry points much longer.

use proptest::prelude::*;
use rand::SeedableRng;
use starling_protocol::frame::{encode_frame, FrameDecoder};
use starling_protocol::update::{decode_update, encode_update};
use starling_protocol::{
    AdapterSchema, Encoding, ManifestVerifier, Message, SignedManifest, SigningIdentity,
    TensorSpec, UpdateLimits,
};

fn schema() -> AdapterSchema {
    AdapterSchema::new(vec![
        TensorSpec {
            name: "a".into(),
            shape: vec![3, 5],
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![7],
        },
    ])
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn message_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn message_decoder_survives_valid_headers_with_random_bodies(
        kind in 0u8..20, body in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut bytes = vec![1, 0, kind];
        bytes.extend_from_slice(&body);
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn frame_decoder_never_panics_and_never_exceeds_its_cap(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024), cut in 0usize..1024
    ) {
        let mut d = FrameDecoder::new(64);
        let cut = cut.min(bytes.len());
        for part in [&bytes[..cut], &bytes[cut..]] {
            if d.push(part).is_err() { return Ok(()); }
            while let Ok(Some(f)) = d.next_frame() {
                prop_assert!(f.len() <= 64);
            }
        }
    }

    #[test]
    fn frames_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..8)) {
        let stream: Vec<u8> = payloads.iter().flat_map(|p| encode_frame(p, 100).unwrap()).collect();
        let mut d = FrameDecoder::new(100);
        d.push(&stream).unwrap();
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() { got.push(f); }
        d.finish().unwrap();
        prop_assert_eq!(got, payloads);
    }

    #[test]
    fn update_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_update(&bytes, &schema(), &UpdateLimits::default());
    }

    #[test]
    fn update_decoder_survives_corrupted_valid_updates(
        seed in any::<u64>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), int8 in any::<bool>()
    ) {
        let s = schema();
        let delta: Vec<f32> = (0..s.num_params()).map(|i| (i as f32 - 11.0) * 0.01).collect();
        let enc = if int8 { Encoding::Int8 { block: 4 } } else { Encoding::F32 };
        let mut bytes = encode_update(&s, &delta, enc, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap();
        for (i, v) in flips {
            let n = bytes.len();
            bytes[i % n] ^= v;
        }
        if let Ok(d) = decode_update(&bytes, &s, &UpdateLimits::default()) {
            prop_assert_eq!(d.len(), s.num_params());
            prop_assert!(d.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn f32_updates_round_trip(values in proptest::collection::vec(-1e30f32..1e30, 22)) {
        let s = schema();
        let bytes = encode_update(&s, &values, Encoding::F32, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)).unwrap();
        prop_assert_eq!(decode_update(&bytes, &s, &UpdateLimits::default()).unwrap(), values);
    }

    #[test]
    fn manifest_verifier_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512), sig in proptest::collection::vec(any::<u8>(), 0..80)) {
        let key = SigningIdentity::from_seed([5; 32]);
        let v = ManifestVerifier::new(vec![key.public_key()]);
        let signed = SignedManifest { body: body.clone(), signer: key.fingerprint(), signature: sig };
        prop_assert!(v.verify(&signed).is_err());
        // Even a correctly signed garbage body is refused, not trusted.
        let sm = SignedManifest { body, signer: key.fingerprint(), signature: vec![] };
        prop_assert!(v.verify(&sm).is_err());
    }
}
