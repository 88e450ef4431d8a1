//! The manifest verifier on arbitrary signed manifests: a typed error unless the bytes carry a valid
//! signature of the trusted key — which the fuzzer cannot forge. Bodies are also signed here with the
//! trusted key, so the body decoder and the semantic checks behind the signature are fuzzed too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling_protocol::{Digest, ManifestVerifier, ModelVersion, SignedManifest, SigningIdentity};

fuzz_target!(|data: &[u8]| {
    let key = SigningIdentity::from_seed([1; 32]);
    let verifier =
        ManifestVerifier::new(vec![key.public_key()]).holding(ModelVersion(3), Digest::of(b"held"));
    // 1. Arbitrary signature bytes over an arbitrary body: must never verify.
    let (sig, body) = data.split_at(data.len().min(64));
    let forged = SignedManifest {
        body: body.to_vec(),
        signer: key.fingerprint(),
        signature: sig.to_vec(),
    };
    assert!(verifier.verify(&forged).is_err());
    // 2. A genuinely signed arbitrary body: decoding and validation must hold up on their own.
    let mut msg = b"starling-manifest/1\0".to_vec();
    msg.extend_from_slice(data);
    let signed = SignedManifest {
        body: data.to_vec(),
        signer: key.fingerprint(),
        signature: key.sign(&msg).to_vec(),
    };
    if let Ok(m) = verifier.verify(&signed) {
        assert!(m.version > ModelVersion(3));
    }
});
