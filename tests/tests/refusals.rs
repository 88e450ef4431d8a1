//! What a device refuses, and what refuses a device, with real processes: a coordinator whose key is not
//! the pinned one, a revoked key, an adapter tampered with in the coordinator's store, and a DP-SGD task past
//! the device's own ε budget (declined, and recorded by the coordinator while another device trains it).

use starling_tests::{client_cmd, eventually, Coord, Device, Serving};

/// A coordinator.toml for one-update rounds on loopback, plus `extra` lines in `[task]`.
fn config(rounds: u64, clients: usize, timeout_ms: u64, task_extra: &str) -> String {
    format!(
        r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = {clients}
selection = {{ count = {clients} }}
min_updates = 1
round_timeout_ms = {timeout_ms}
rounds = {rounds}
retry_after_ms = 200
[task]
local_steps = 4
batch_size = 4
seq_len = 64
learning_rate = 0.003
{task_extra}
[adapter]
rank = 4
targets = ["q", "v"]
"#
    )
}

fn text() -> std::path::PathBuf {
    starling_tests::root().join("assets/shakespeare/sonnets.txt")
}

#[test]
fn a_wrong_pin_refuses_the_coordinator_and_a_revoked_device_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::init(&tmp.path().join("coord"), &config(1, 1, 600_000, ""));
    let (good, other) = (coord.enrol("good"), coord.enrol("other"));
    let serving = Serving::start(&coord);

    // Enrolment against a coordinator whose key is not the pinned one fails and creates no configuration.
    let dir = tmp.path().join("wrong-pin");
    let wrong = "ab".repeat(32);
    let (status, _, err) = client_cmd(&[
        "enrol",
        "--dir",
        dir.to_str().unwrap(),
        "--coordinator",
        &serving.addr,
        "--enrol-address",
        &serving.enrol,
        "--token",
        &other.token,
        "--pin",
        &wrong,
        "--signing-key",
        &other.signing_key,
        "--name",
        "other",
    ]);
    assert!(!status.success());
    assert!(
        err.contains("not the coordinator whose fingerprint was pinned"),
        "{err}"
    );
    assert!(!dir.join("client.toml").exists());

    let device = Device::enrol(&tmp.path().join("good"), &serving, &good);
    coord.keep_address(&serving);
    let run = device.run(&text(), None);
    run.wait_for("update acknowledged round=1", 300);
    assert!(serving.proc.wait_exit(120).success());

    // Revoked while the device keeps reconnecting: at its next handshake it stops with a clear error.
    coord.edit_config("rounds = 1", "rounds = 2");
    let revoked = starling_tests::coordinator_json(&["status", "--dir", coord.arg(), "--json"]);
    assert_eq!(revoked["latest_version"], 1);
    let out = std::process::Command::new(starling_tests::binary("starling-coordinator"))
        .args(["revoke", "--dir", coord.arg(), "good"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serving = Serving::start(&coord);
    run.wait_for("revoked", 60);
    assert_eq!(
        run.wait_exit(30).code(),
        Some(3),
        "a revoked device stops with an error"
    );
    let s = device.status();
    assert!(s["last_error"].as_str().unwrap().contains("revoked"), "{s}");
    assert_eq!(s["rounds_joined"], 1);

    // A device whose pinned fingerprint is not the coordinator's refuses it at the handshake and stops.
    let pin = device.status()["pinned_fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    device.edit_config(&pin, &wrong);
    let run = device.run(&text(), None);
    assert_eq!(run.wait_exit(60).code(), Some(3));
    let s = device.status();
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("not the pinned one"),
        "{s}"
    );
    serving.proc.kill();
}

#[test]
fn a_tampered_adapter_is_refused_and_the_device_keeps_its_model() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::init(&tmp.path().join("coord"), &config(1, 1, 600_000, ""));
    let e = coord.enrol("pi");
    let serving = Serving::start(&coord);
    let device = Device::enrol(&tmp.path().join("pi"), &serving, &e);
    coord.keep_address(&serving);
    let run = device.run(&text(), None);
    run.wait_for("update acknowledged round=1", 300);
    assert!(serving.proc.wait_exit(120).success());
    assert_eq!(device.status()["model_version"], 0);

    // Someone with write access to the coordinator's disk changes version 1's adapter (not its manifest).
    {
        let db = sled::open(coord.dir.join("store")).unwrap();
        let models = db.open_tree("models").unwrap();
        let key = 1u64.to_be_bytes();
        let raw = models.get(key).unwrap().unwrap();
        let (mut m, _): (starling_coordinator::store::PublishedModel, usize) =
            bincode::serde::decode_from_slice(&raw, bincode::config::standard()).unwrap();
        m.adapter[0] ^= 0x40;
        let bytes = bincode::serde::encode_to_vec(&m, bincode::config::standard()).unwrap();
        models.insert(key, bytes).unwrap();
        db.flush().unwrap();
    }
    coord.edit_config("rounds = 1", "rounds = 2");
    let serving = Serving::start(&coord);
    run.wait_for("refusing model version 1", 120);
    // The refusal is persisted right after it is logged.
    eventually(10, "the refusal in the device's status", || {
        device.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("digest") && e.contains("keeping version 0"))
    });
    let s = device.status();
    assert_eq!(s["model_version"], 0, "the previous model is kept: {s}");
    run.kill();
    serving.proc.kill();
}

#[test]
fn a_dp_task_past_the_device_budget_is_declined_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    // DP-SGD on devices; two devices per round, one update suffices once the deadline passes.
    let coord = Coord::init(
        &tmp.path().join("coord"),
        &config(
            1,
            2,
            8_000,
            "dp_sgd_noise_multiplier = 1.0\ndp_sgd_clip = 1.0",
        ),
    );
    let (tight, free) = (coord.enrol("tight"), coord.enrol("free"));
    let serving = Serving::start(&coord);
    let tight = Device::enrol(&tmp.path().join("tight"), &serving, &tight);
    let free = Device::enrol(&tmp.path().join("free"), &serving, &free);
    // One round here costs about ε = 0.06 (4 steps at q = 4 / 1,494 sequences): past a budget of 0.01.
    tight.edit_config("max_epsilon = 0.0", "max_epsilon = 0.01");
    let (t, f) = (tight.run(&text(), None), free.run(&text(), None));
    t.wait_for("declining round 1", 300);
    f.wait_for("update acknowledged round=1", 300);

    // The coordinator recorded the typed refusal (read live from the running serve's status page).
    eventually(30, "the decline in the coordinator's status", || {
        let s = coord.status();
        s["clients"]["list"].as_array().unwrap().iter().any(|c| {
            c["name"] == "tight"
                && c["declines"].as_u64() >= Some(1)
                && c["last_decline"]["code"] == "BudgetExhausted"
        })
    });
    assert!(
        serving.proc.wait_exit(120).success(),
        "the round closes with one update"
    );
    let s = tight.status();
    assert_eq!(s["epsilon_spent"], 0.0, "{s}");
    assert!(s["declined"].as_u64() >= Some(1));
    assert!(
        s["last_error"].as_str().unwrap().contains("max_epsilon"),
        "{s}"
    );
    let s = free.status();
    let eps = s["epsilon_spent"].as_f64().unwrap();
    assert!(
        eps > 0.01 && eps < 1.0,
        "the DP-SGD round is charged to the device: {s}"
    );
    assert_eq!(s["rounds_joined"], 1);
    t.kill();
    f.kill();
}
