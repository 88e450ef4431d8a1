//! Secure aggregation with real processes: `starling-coordinator serve` with `[secure_aggregation]` and
//! three `starling-client run` devices over QUIC on loopback run a SecAgg+ round on the shipped model.
//! The coordinator is SIGKILLed right after the first masked input went into its stored masked sum: the
//! store then holds no device's update (no update body, a masked sum indistinguishable from uniform
//! words), and the restarted coordinator finishes the round from its stored protocol state with all
//! three devices in the published sum.

use starling_coordinator::store::Store;
use starling_protocol::ModelVersion;
use starling_tests::{eventually, split_hamlet, Coord, Device, Serving};

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = 3
selection = { count = 3 }
min_updates = 3
round_timeout_ms = 600000
rounds = 1
retry_after_ms = 200
[task]
local_steps = 4
batch_size = 8
seq_len = 64
learning_rate = 0.004
[adapter]
rank = 4
alpha = 8.0
targets = ["q", "v"]
[secure_aggregation]
enabled = true
clip = 0.05
value_bits = 10
phase_timeout_ms = 600000
"#;

#[test]
fn a_secure_round_survives_a_coordinator_sigkill_and_the_store_never_holds_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = split_hamlet(tmp.path());
    let coord = Coord::init(&tmp.path().join("coord"), CONFIG);
    let enrolments: Vec<_> = (0..3)
        .map(|i| coord.enrol(&format!("device-{i}")))
        .collect();
    let serving = Serving::start_with(&coord, Some("masked-input-stored"));
    coord.keep_address(&serving);
    let devices: Vec<Device> = enrolments
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let d = Device::enrol(&tmp.path().join(format!("dev{i}")), &serving, e);
            // A killed coordinator closes nothing: devices notice by the idle timeout.
            d.edit_config("idle_timeout_s = 60", "idle_timeout_s = 3");
            d
        })
        .collect();
    let procs: Vec<_> = devices
        .iter()
        .zip(&data)
        .map(|(d, text)| d.run(text, None))
        .collect();
    serving.proc.wait_for("failpoint masked-input-stored", 600);
    serving.proc.kill();

    // What a SIGKILL leaves on disk: the round, its protocol state, and no update.
    {
        let store = Store::open(&coord.dir.join("store")).unwrap();
        let round = store.current_round().unwrap().expect("the round is open");
        assert!(
            store.updates(round.id).unwrap().is_empty(),
            "a secure round stores no update"
        );
        let state = store
            .secagg(round.id)
            .unwrap()
            .expect("the round's protocol state is stored");
        let (_, reported) = state.server.unmask_request();
        assert_eq!(reported.len(), 1, "one masked input is in the sum");
        // The only thing derived from an input is the masked sum: its words are spread over the whole
        // modulus (an encoded delta's words lie within a few hundred steps of 0), half of them in
        // the half of the ring nearest 0.
        let bits = state.params().bits;
        let quarter = 1u32 << (bits - 2);
        let sum = state.server.masked_sum();
        let near = sum
            .iter()
            .filter(|&&w| w < quarter || w >= (1u32 << bits) - quarter)
            .count() as f64
            / sum.len() as f64;
        assert!(sum.len() > 1000, "{} words", sum.len());
        assert!((0.47..0.53).contains(&near), "{near} of the words near 0");
    }

    // The operator's view of the interrupted round.
    let status = coord.status();
    let sa = &status["current_round"]["secure_aggregation"];
    assert_eq!(sa["phase"], "masked", "{status}");
    assert_eq!(
        (sa["advertised"].as_u64(), sa["shared"].as_u64()),
        (Some(3), Some(3)),
        "{status}"
    );
    assert_eq!(sa["masked_inputs"], 1, "{status}");
    assert_eq!(status["current_round"]["updates"], 1, "{status}");

    // Restarted, the coordinator resumes the protocol where it stood and publishes the round.
    let serving = Serving::start(&coord);
    assert!(serving.proc.wait_exit(600).success());
    let status = coord.status();
    assert_eq!(status["latest_version"], 1, "{status}");
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(
        rounds[0]["updates"], 3,
        "every device is in the sum: {status}"
    );
    let (v0, v1) = (coord.adapter(0), coord.adapter(1));
    assert_eq!(v0.len(), v1.len());
    assert!(v1.iter().all(|x| x.is_finite()));
    assert_ne!(v0, v1, "the round moved the adapter");
    eventually(60, "every device to finish the round", || {
        devices.iter().all(|d| d.status()["rounds_joined"] == 1)
    });
    for p in procs {
        p.terminate();
        assert!(p.wait_exit(30).success());
    }
    let store = Store::open(&coord.dir.join("store")).unwrap();
    assert!(store.model(ModelVersion(1)).unwrap().is_some());
}
