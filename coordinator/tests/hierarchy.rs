//! A root in hierarchical mode, spoken to with real protocol clients over QUIC: it takes partial sums only
//! from keys enrolled as aggregators, checks their clip record and length, counts a resend once, enrols
//! devices only with device tokens when an aggregator asks, serves aggregators the active-device roster,
//! lists a device revoked while it serves as revoked in its aggregator's roster, sends devices that come
//! to it directly to an aggregator — and publishes version 0 plus the forwarded
//! sum over its weight (FedAvg on a partial sum), computed here independently.

mod common;

use common::{client, identity, next_task, run_json, values, Coord, Serving};
use starling_protocol::bulk::BulkHeader;
use starling_protocol::message::{BlobKind, Enrol, EnrolFor, ErrorCode, Forward, RosterDevices};
use starling_protocol::{EnrolmentToken, Fingerprint, ManifestVerifier, RoundId, UpdateId};
use starling_transport::client::TaskReply;
use starling_transport::TransportError;

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http = false
[rounds]
min_clients = 1
selection = { count = 1 }
min_updates = 1
round_timeout_ms = 600000
rounds = 1
retry_after_ms = 50
[adapter]
rank = 4
targets = ["q", "v"]
[hierarchy]
enabled = true
"#;

fn refused(r: Result<impl std::fmt::Debug, TransportError>, code: ErrorCode, word: &str) {
    match r {
        Err(TransportError::Remote { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(word), "{message:?} lacks {word:?}");
        }
        other => panic!("expected a {code:?} refusal, got {other:?}"),
    }
}

fn aggregator_token(coord: &Coord, name: &str) -> String {
    run_json(&[
        "enrol",
        "--dir",
        coord.arg(),
        "--name",
        name,
        "--role",
        "aggregator",
        "--json",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_root_takes_partial_sums_from_its_aggregators_only_and_publishes_their_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::init(&tmp.path().join("root"), CONFIG);
    let edge_token = aggregator_token(&coord, "edge");
    let spare_edge_token = aggregator_token(&coord, "edge-2");
    let device_token = coord.enrol("device");
    let serving = Serving::start(&coord, None);
    let (params, signing) = (coord.params, coord.signing_key);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (v0, sum, weight) = rt.block_on(async {
        let edge = client(0, &serving);
        edge.enrol(&EnrolmentToken::parse(&edge_token).unwrap(), "edge")
            .await
            .unwrap();
        let a = edge.connect().await.unwrap();
        // An aggregator cannot spend an aggregator token on a key of its choosing...
        refused(
            a.enrol_for(EnrolFor {
                client: identity(2).fingerprint(),
                enrol: Enrol {
                    token: spare_edge_token.clone(),
                    name: "sneaky".into(),
                },
            })
            .await,
            ErrorCode::BadToken,
            "device enrolment token",
        );
        // ...but enrols a device with the device's token.
        let device_fp = identity(1).fingerprint();
        let enrolled = a
            .enrol_for(EnrolFor {
                client: device_fp,
                enrol: Enrol {
                    token: device_token.clone(),
                    name: "device".into(),
                },
            })
            .await
            .unwrap();
        assert_eq!(enrolled, device_fp);
        // The roster lists the device, not the aggregator; unchanged, it is not sent again.
        let roster = a.roster(0).await.unwrap();
        let listed = |active: Vec<Fingerprint>, revoked: Vec<Fingerprint>| {
            Some(RosterDevices { active, revoked })
        };
        assert_eq!(roster.devices, listed(vec![device_fp], vec![]));
        assert_eq!(a.roster(roster.generation).await.unwrap().devices, None);
        // The aggregator token was left unused by the refused attempt: it still enrols an aggregator.
        client(3, &serving)
            .enrol(&EnrolmentToken::parse(&spare_edge_token).unwrap(), "edge-2")
            .await
            .unwrap();
        // Each aggregator's roster holds the devices that enrolled through it: not edge-2's.
        let b = client(3, &serving).connect().await.unwrap();
        assert_eq!(b.roster(0).await.unwrap().devices, listed(vec![], vec![]));

        // A device that comes to the root directly is sent to an aggregator and may not act as one.
        let d = client(1, &serving).connect().await.unwrap();
        match d.request_task(None).await.unwrap() {
            TaskReply::NoTask(n) => assert!(n.reason.contains("edge aggregators"), "{}", n.reason),
            TaskReply::Task(_) => panic!("a device got a task from a hierarchical root"),
        }
        refused(d.roster(0).await, ErrorCode::BadRequest, "aggregator");

        // The aggregator gets the round's task (the round counts aggregators).
        let mut verifier = ManifestVerifier::new(vec![signing]);
        let (task, m) = next_task(&a, &mut verifier).await;
        let adapter = a
            .fetch(m.version, BlobKind::Adapter, 64 << 20)
            .await
            .unwrap();
        let v0 = values(&adapter);
        let sum: Vec<f32> = (0..params).map(|j| ((j % 7) as f32 - 3.0) * 1e-3).collect();
        let body: Vec<u8> = sum.iter().flat_map(|v| v.to_le_bytes()).collect();
        let forward = |clip: Option<f64>, body: &[u8]| Forward {
            update_id: UpdateId([7; 16]),
            round: task.round,
            model_version: m.version,
            schema: m.adapter_schema.hash(),
            count: 3,
            weight: 5.0,
            loss: 6.0,
            clip,
            body: BulkHeader::describe(body),
        };
        // A device may not forward a partial sum.
        refused(
            d.forward(forward(None, &body), &body).await,
            ErrorCode::BadRequest,
            "aggregator",
        );
        // Revoked at the root while it serves, the device moves to its aggregator's revoked list (the
        // aggregator refuses it as revoked, not as a stranger); edge-2's roster does not change.
        run_json(&["revoke", "--dir", coord.arg(), "device", "--json"]);
        let after = a.roster(roster.generation).await.unwrap();
        assert!(after.generation > roster.generation);
        assert_eq!(after.devices, listed(vec![], vec![device_fp]));
        assert_eq!(b.roster(0).await.unwrap().devices, listed(vec![], vec![]));
        refused(
            a.forward(forward(Some(1.0), &body), &body).await,
            ErrorCode::BadRequest,
            "clipped",
        );
        refused(
            a.forward(forward(None, &body[4..]), &body[4..]).await,
            ErrorCode::BadRequest,
            "f32 values",
        );
        let late = Forward {
            round: RoundId(task.round.0 + 5),
            ..forward(None, &body)
        };
        refused(a.forward(late, &body).await, ErrorCode::LateUpdate, "");
        let ack = a.forward(forward(None, &body), &body).await.unwrap();
        assert!(!ack.duplicate);
        // A resend after a lost ack (an aggregator restarted) is counted once.
        assert!(
            a.forward(forward(None, &body), &body)
                .await
                .unwrap()
                .duplicate
        );
        (v0, sum, 5.0f32)
    });
    assert!(serving.wait_exit(), "the root finishes its one round");
    let v1 = coord.adapter(1);
    for j in 0..params {
        let expected = v0[j] + sum[j] / weight;
        assert!(
            (v1[j] - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
            "value {j}: {} vs {expected}",
            v1[j]
        );
    }
    let status = coord.status();
    assert_eq!(
        status["rounds"][0]["updates"], 3,
        "the round counts devices"
    );
}
