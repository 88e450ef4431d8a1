//! The operator's path end to end with real processes: `init`, `enrol`, `serve` (QUIC on 127.0.0.1:0), real
//! protocol clients that enrol with their tokens, verify signed manifests, fetch adapters and upload deltas
//! for two rounds, then `status` and `export`. The published adapter must equal version 0 plus the
//! example-weighted means of each round's deltas, computed here independently.

mod common;

use common::{client, delta, examples, next_task, upload_for, values, Coord, Serving};
use starling_protocol::message::BlobKind;
use starling_protocol::{EnrolmentToken, ManifestVerifier, ModelVersion};

#[test]
fn init_enrol_serve_two_rounds_status_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::init(&tmp.path().join("coord"), &common::config(2, ""));
    // A second init into the same directory is refused.
    assert!(!common::bin()
        .args([
            "init",
            "--dir",
            coord.arg(),
            "--base-model",
            common::base_model().to_str().unwrap()
        ])
        .output()
        .unwrap()
        .status
        .success());
    let tokens = [coord.enrol("alpha"), coord.enrol("beta")];
    let serving = Serving::start(&coord, None);
    let (params, signing) = (coord.params, coord.signing_key);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let v0 = rt.block_on(async {
        let mut handles = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            let token = EnrolmentToken::parse(token).unwrap();
            let client = client(i, &serving);
            handles.push(tokio::spawn(async move {
                client.enrol(&token, &format!("device-{i}")).await.unwrap();
                let session = client.connect().await.unwrap();
                let mut verifier = ManifestVerifier::new(vec![signing]);
                let mut v0 = None;
                for _ in 0..2 {
                    let (task, m) = next_task(&session, &mut verifier).await;
                    let adapter = session
                        .fetch(m.version, BlobKind::Adapter, 64 << 20)
                        .await
                        .unwrap();
                    let m = verifier.accept(&task.manifest, &adapter).unwrap();
                    if m.version == ModelVersion(0) {
                        v0 = Some(values(&adapter));
                    }
                    let (upload, body) = upload_for(i, &task, &m, &delta(i, task.round.0, params));
                    let ack = session.upload(upload.clone(), &body).await.unwrap();
                    assert!(!ack.duplicate);
                    // A retry of the same update is acknowledged again, counted once.
                    assert!(session.upload(upload, &body).await.unwrap().duplicate);
                }
                (v0, session)
            }));
        }
        let mut v0 = None;
        for h in handles {
            let (v, _session) = h.await.unwrap();
            v0 = v0.or(v);
        }
        v0.unwrap()
    });
    // serve exits by itself once the configured two rounds are done.
    assert!(serving.wait_exit());

    // Expected: v2 = v0 + Σ_rounds (10·d_client0 + 30·d_client1) / 40.
    let mut expected = v0.clone();
    for round in [1u64, 2] {
        let (a, b) = (delta(0, round, params), delta(1, round, params));
        let (wa, wb) = (examples(0) as f32, examples(1) as f32);
        for j in 0..params {
            expected[j] += (wa * a[j] + wb * b[j]) / (wa + wb);
        }
    }
    let out = tmp.path().join("v2");
    let st = coord.status();
    assert_eq!(st["latest_version"], 2);
    assert_eq!(st["rounds_completed"], 2);
    assert_eq!(st["clients"]["active"], 2);
    assert!(st["current_round"].is_null());
    let exported = common::bin()
        .args([
            "export",
            "--dir",
            coord.arg(),
            "--version",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert!(
        out.join("adapter_model.safetensors").exists() && out.join("adapter_config.json").exists()
    );
    // The published adapter as stored (export wrote it through the model crate's tested PEFT writer).
    let v2 = coord.adapter(2);
    let worst = v2
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "published adapter deviates by {worst}");
}
