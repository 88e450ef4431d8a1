//! Crash recovery with a real process: `serve` is killed with SIGKILL at each step of a round — an upload's
//! body received but not stored, an update stored but not acknowledged, right after an ack, mid-aggregation
//! and right after the publishing transaction — and restarted each time. Afterwards no acknowledged update
//! is lost or counted twice, and every published adapter is bit-for-bit the one an uninterrupted run on the
//! same updates publishes (FedAdam, so the server optimizer's state must survive the crashes too).

mod common;

use common::{client, connect_both, delta, next_task, upload_for, Coord, Serving};
use starling_protocol::ManifestVerifier;
use starling_transport::client::Session;

const ROUNDS: u64 = 3;

/// Both devices take part in every remaining round until `serve` is done; device `i` uploads
/// `delta(i, round)`.
async fn run_rounds(sessions: Vec<Session>, coord: &Coord, from_round: u64) {
    let mut handles = Vec::new();
    for (i, session) in sessions.into_iter().enumerate() {
        let (params, key) = (coord.params, coord.signing_key);
        handles.push(tokio::spawn(async move {
            let mut verifier = ManifestVerifier::new(vec![key]);
            for round in from_round..=ROUNDS {
                let (task, m) = next_task(&session, &mut verifier).await;
                assert_eq!(task.round.0, round);
                assert_eq!(
                    m.version.0,
                    round - 1,
                    "round {round} trains the previous version"
                );
                let (upload, body) = upload_for(i, &task, &m, &delta(i, round, params));
                assert!(!session.upload(upload, &body).await.unwrap().duplicate);
            }
            session
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// The upload in flight when the server was killed gets no ack (it fails, or is still waiting for the
/// dead peer when we stop looking: the QUIC idle timeout would end it much later).
async fn assert_no_ack(
    pending: tokio::task::JoinHandle<
        Result<starling_protocol::message::Ack, starling_transport::TransportError>,
    >,
) {
    match tokio::time::timeout(std::time::Duration::from_secs(3), pending).await {
        Ok(joined) => assert!(joined.unwrap().is_err(), "no ack from a killed server"),
        Err(_still_waiting) => {}
    }
}

#[test]
fn sigkill_at_every_step_loses_nothing_and_counts_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let template = Coord::init(
        &tmp.path().join("template"),
        &common::config(
            ROUNDS,
            "[strategy]\nkind = \"fed-adam\"\nserver_lr = 0.05\n",
        ),
    );
    let tokens = [template.enrol("alpha"), template.enrol("beta")];
    let calm = template.copy_to(&tmp.path().join("uninterrupted"));
    let crashy = template.copy_to(&tmp.path().join("crashed"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The reference: the same updates, no crash.
    let serving = Serving::start(&calm, None);
    rt.block_on(async {
        let sessions = connect_both(&serving, Some(&tokens)).await;
        run_rounds(sessions, &calm, 1).await;
    });
    assert!(serving.wait_exit());

    // 1. Killed with an upload's body received but not stored: the upload fails, nothing is kept.
    let serving = Serving::start(&crashy, Some("upload-received"));
    let (task, manifest) = rt.block_on(async {
        let sessions = connect_both(&serving, Some(&tokens)).await;
        let key = crashy.signing_key;
        // Both ask at once: the round starts when both are present.
        let (mut v0, mut v1) = (
            ManifestVerifier::new(vec![key]),
            ManifestVerifier::new(vec![key]),
        );
        let ((task, m), _) = tokio::join!(
            next_task(&sessions[0], &mut v0),
            next_task(&sessions[1], &mut v1)
        );
        let (upload, body) = upload_for(0, &task, &m, &delta(0, 1, crashy.params));
        let s0 = sessions.into_iter().next().unwrap();
        let pending = tokio::spawn(async move { s0.upload(upload, &body).await });
        tokio::task::spawn_blocking(move || {
            serving.wait_for("failpoint upload-received");
            serving.kill();
        })
        .await
        .unwrap();
        assert_no_ack(pending).await;
        (task, m)
    });
    let (upload0, body0) = upload_for(0, &task, &manifest, &delta(0, 1, crashy.params));

    // 2. Killed with the retried update stored and flushed but not acknowledged.
    let serving = Serving::start(&crashy, Some("upload-stored"));
    rt.block_on(async {
        let s0 = client(0, &serving).connect().await.unwrap();
        let (u, b) = (upload0.clone(), body0.clone());
        let pending = tokio::spawn(async move { s0.upload(u, &b).await });
        tokio::task::spawn_blocking(move || {
            serving.wait_for("failpoint upload-stored");
            serving.kill();
        })
        .await
        .unwrap();
        assert_no_ack(pending).await;
    });

    // 3. The device retries again: the update survived, so this is a re-acknowledgement; killed right after.
    let serving = Serving::start(&crashy, None);
    rt.block_on(async {
        let s0 = client(0, &serving).connect().await.unwrap();
        let ack = s0.upload(upload0.clone(), &body0).await.unwrap();
        assert!(
            ack.duplicate,
            "the update stored before the crash is counted already"
        );
    });
    serving.kill();

    // 4. The second device reports (a new update), completing the round; killed mid-aggregation.
    let serving = Serving::start(&crashy, Some("aggregated"));
    rt.block_on(async {
        let s1 = client(1, &serving).connect().await.unwrap();
        let (upload, body) = upload_for(1, &task, &manifest, &delta(1, 1, crashy.params));
        assert!(!s1.upload(upload, &body).await.unwrap().duplicate);
    });
    serving.wait_for("failpoint aggregated");
    serving.kill();

    // 5. On restart the round is re-aggregated from the stored updates; killed right after publishing.
    let serving = Serving::start(&crashy, Some("published"));
    serving.wait_for("failpoint published");
    serving.kill();

    // 6. A clean run to the end: version 1 is there, a late retry of round 1 is re-acknowledged, not
    // counted; rounds 2 and 3 run normally.
    let serving = Serving::start(&crashy, None);
    rt.block_on(async {
        let sessions = connect_both(&serving, None).await;
        let ack = sessions[0].upload(upload0.clone(), &body0).await.unwrap();
        assert!(ack.duplicate);
        run_rounds(sessions, &crashy, 2).await;
    });
    assert!(serving.wait_exit());

    let st = crashy.status();
    assert_eq!(st["latest_version"], ROUNDS);
    assert_eq!(st["rounds_completed"], ROUNDS);
    let rounds = st["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), ROUNDS as usize);
    for r in rounds {
        assert_eq!(
            r["updates"], 2,
            "round {}: each device counted once",
            r["round"]
        );
    }
    for v in 1..=ROUNDS {
        let (a, b) = (calm.adapter(v), crashy.adapter(v));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "version {v} differs from the uninterrupted run"
        );
    }
    assert_ne!(
        calm.adapter(0),
        calm.adapter(ROUNDS),
        "training moved the adapter"
    );
}
