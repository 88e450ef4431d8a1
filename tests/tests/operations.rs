//! Operating a running coordinator with real processes: a device enrolled while rounds run joins the next
//! round; devices revoked mid-round are cut off at once and the rounds complete without them; rounds
//! paused and resumed, round settings changed live; a backup taken while serving, restored, finishes the
//! next round; SIGTERM drains and exits 0.

use starling_tests::{coordinator_json, eventually, split_hamlet, Coord, Device, Serving};

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = 2
selection = { fraction = 1.0 }
min_updates = 2
round_timeout_ms = 120000
rounds = 3
retry_after_ms = 200
[task]
local_steps = 3
batch_size = 4
seq_len = 32
learning_rate = 0.004
[adapter]
rank = 2
alpha = 4.0
targets = ["q", "v"]
"#;

/// `starling-coordinator COMMAND --dir DIR ARGS --json` (through the running serve's admin socket when
/// one runs).
fn admin(coord: &Coord, args: &[&str]) -> serde_json::Value {
    let mut all = vec![args[0], "--dir", coord.arg()];
    all.extend_from_slice(&args[1..]);
    all.push("--json");
    coordinator_json(&all)
}

fn rounds_completed(coord: &Coord) -> u64 {
    coord.status()["rounds_completed"].as_u64().unwrap_or(0)
}

#[test]
fn devices_are_enrolled_and_revoked_while_serve_runs_and_rounds_complete_without_the_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = split_hamlet(tmp.path());
    let coord = Coord::init(&tmp.path().join("coord"), CONFIG);
    let (ea, eb) = (coord.enrol("device-a"), coord.enrol("device-b"));
    let serving = Serving::start(&coord);
    let a = Device::enrol(&tmp.path().join("a"), &serving, &ea);
    let b = Device::enrol(&tmp.path().join("b"), &serving, &eb);
    // Device a holds round 1 open: it stops right after persisting its update, before uploading it.
    let pa = a.run(&data[0], Some("update-persisted"));
    let pb = b.run(&data[1], None);

    // While round 1 runs: pause (round 1 finishes, no round 2 starts), enrol a third device through the
    // running serve, start it, and resume once the coordinator has seen it.
    pa.wait_for("failpoint update-persisted", 120);
    let paused = admin(&coord, &["pause"]);
    assert_eq!(paused["paused"], true, "{paused}");
    assert_eq!(paused["round_open"], 1, "{paused}");
    pa.kill();
    let pa = a.run(&data[0], None);
    eventually(120, "round 1 to be published", || {
        rounds_completed(&coord) == 1
    });
    let ec = coord.enrol("device-c");
    let c = Device::enrol(&tmp.path().join("c"), &serving, &ec);
    let pc = c.run(&data[2], None);
    eventually(60, "the new device to be seen", || {
        let v = admin(&coord, &["clients"]);
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "device-c" && d["last_seen_unix_ms"].as_u64().unwrap_or(0) > 0)
    });
    assert_eq!(
        coord.status()["current_round"],
        serde_json::Value::Null,
        "paused: no round 2 yet"
    );
    // Device b stops right after persisting its round-2 update, before uploading it.
    pb.kill();
    let pb = b.run(&data[1], Some("update-persisted"));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    admin(&coord, &["resume"]);

    // Round 2 selects all three; b is revoked once its update is persisted, mid-round.
    pb.wait_for("failpoint update-persisted", 180);
    let status = coord.status();
    assert_eq!(status["current_round"]["id"], 2, "{status}");
    assert_eq!(
        status["current_round"]["selected"], 3,
        "the new device joined: {status}"
    );
    // Paused while round 2 waits for b: once b is revoked round 2 completes, and no round 3 starts
    // until the settings below are in.
    admin(&coord, &["pause"]);
    let revoked = admin(&coord, &["revoke", "device-b"]);
    assert_eq!(revoked["left_the_open_round"], true, "{revoked}");
    pb.kill();
    // Restarted, b is refused at its handshake and stops with an error; its update never counts.
    let pb = b.run(&data[1], None);
    let exit = pb.wait_exit(60);
    assert!(!exit.success(), "a revoked device stops with an error");
    let b_status = b.status();
    assert!(
        b_status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{b_status}"
    );
    eventually(180, "round 2 to be published", || {
        rounds_completed(&coord) == 2
    });

    // Round 3 needs one device and one update; c is revoked while connected — its connection closes at
    // once and the device stops — and a finishes the round alone.
    let set = admin(
        &coord,
        &["set-rounds", "--min-updates", "1", "--min-clients", "1"],
    );
    assert_eq!(set["rounds"]["min_updates"], 1, "{set}");
    let revoked = admin(&coord, &["revoke", "device-c"]);
    assert!(
        revoked["connections_closed"].as_u64().unwrap_or(0) >= 1,
        "c was connected: {revoked}"
    );
    assert!(!pc.wait_exit(30).success(), "the revoked device stops");
    admin(&coord, &["resume"]);
    assert!(serving.proc.wait_exit(300).success());
    pa.terminate();
    assert!(pa.wait_exit(30).success());

    let status = coord.status();
    let rounds = status["rounds"].as_array().unwrap();
    let updates: Vec<u64> = rounds
        .iter()
        .map(|r| r["updates"].as_u64().unwrap())
        .collect();
    assert_eq!(updates, vec![2, 2, 1], "{status}");
    assert_eq!(status["clients"]["revoked"], 2);
    // c joined round 2 only (acknowledged); b's round-2 update never counted.
    let c_status = c.status();
    assert_eq!(
        (&c_status["rounds_joined"], &c_status["last_round"]),
        (&serde_json::json!(1), &serde_json::json!(2)),
        "{c_status}"
    );
    let b_status = b.status();
    assert_eq!(b_status["rounds_joined"], 1, "round 1 only: {b_status}");
}

#[test]
fn a_backup_taken_while_serving_restores_and_finishes_the_next_round_and_sigterm_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = split_hamlet(tmp.path());
    let coord = Coord::init(
        &tmp.path().join("coord"),
        &CONFIG.replace("rounds = 3", "rounds = 1"),
    );
    let (ea, eb) = (coord.enrol("device-a"), coord.enrol("device-b"));
    let serving = Serving::start(&coord);
    let a = Device::enrol(&tmp.path().join("a"), &serving, &ea);
    let b = Device::enrol(&tmp.path().join("b"), &serving, &eb);
    let pa = a.run(&data[0], None);
    let pb = b.run(&data[1], None);
    coord.keep_address(&serving);
    assert!(
        serving.proc.wait_exit(300).success(),
        "one round, then exit"
    );

    // Paused while stopped (the store keeps it), served again; a backup is taken while it serves, then
    // SIGTERM drains it.
    coord.edit_config("rounds = 1", "rounds = 2");
    let paused = admin(&coord, &["pause"]);
    assert_eq!(paused["paused"], true, "{paused}");
    let serving = Serving::start(&coord);
    assert_eq!(coord.status()["paused"], true);
    let backup = tmp.path().join("coord.backup");
    let v = admin(&coord, &["backup", "--out", backup.to_str().unwrap()]);
    assert!(v["bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(backup.is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a backup holds private keys: owner-only");
    }
    // SIGTERM drains: connected devices are told when to come back, and serve exits 0 by itself.
    let restarted = coord.status()["now_unix_ms"].as_u64().unwrap();
    eventually(60, "both devices to reconnect", || {
        let v = admin(&coord, &["clients"]);
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["last_seen_unix_ms"].as_u64().unwrap_or(0) > restarted)
    });
    serving.proc.terminate();
    assert!(
        serving.proc.wait_exit(60).success(),
        "SIGTERM drains and exits 0"
    );
    pa.wait_for("the coordinator is restarting; reconnecting in", 30);

    // The directory is lost; the backup brings it back, and the restored coordinator finishes round 2
    // with the same devices (same keys, same address).
    std::fs::remove_dir_all(&coord.dir).unwrap();
    let out = coordinator_json(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--dir",
        coord.arg(),
        "--json",
    ]);
    assert_eq!(out["latest_version"], 1, "{out}");
    assert_eq!(out["clients"], 2, "{out}");
    admin(&coord, &["resume"]);
    let serving = Serving::start(&coord);
    assert!(serving.proc.wait_exit(300).success(), "round 2 is finished");
    let status = coord.status();
    assert_eq!(status["latest_version"], 2, "{status}");
    assert_eq!(status["rounds"][1]["updates"], 2, "{status}");
    for p in [pa, pb] {
        p.terminate();
        assert!(p.wait_exit(30).success());
    }
}
