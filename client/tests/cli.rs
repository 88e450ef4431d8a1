//! The device binary's edge: bad input gives one clear error line and a failure exit, never a panic, and
//! touches nothing it should not. (Real federations are tested across processes in the workspace's
//! `tests/`.)

use std::process::Command;

use starling_client::state::StateDir;

fn client(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_starling-client"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.success(), err)
}

const CONFIG: &str = r#"
[coordinator]
address = "127.0.0.1:7870"
enrol_address = "127.0.0.1:7871"
pin = "abababababababababababababababababababababababababababababababab"
signing_key = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
name = "pi"
"#;

#[test]
fn bad_state_configuration_and_data_are_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "some local text ".repeat(100)).unwrap();
    let (d, t) = (dir.to_str().unwrap(), text.to_str().unwrap());

    // Not enrolled.
    let (ok, err) = client(&["run", "--dir", d, "--data", t]);
    assert!(!ok && err.contains("no enrolled device"), "{err}");
    let (ok, err) = client(&["status", "--dir", d]);
    assert!(!ok && err.contains("no enrolled device"), "{err}");

    // A typo in client.toml names the key and the file.
    StateDir::new(&dir).create_key().unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!("{CONFIG}[device]\nthread = 2\n"),
    )
    .unwrap();
    let (ok, err) = client(&["run", "--dir", d, "--data", t]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("thread") && err.contains("client.toml"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // A value out of range.
    std::fs::write(
        dir.join("client.toml"),
        format!("{CONFIG}[device]\ntrain_between = \"7-9\"\n"),
    )
    .unwrap();
    let (ok, err) = client(&["run", "--dir", d, "--data", t]);
    assert!(!ok && err.contains("train_between"), "{err}");

    // Unreadable data.
    std::fs::write(dir.join("client.toml"), CONFIG).unwrap();
    let (ok, err) = client(&["run", "--dir", d, "--data", "/no/such/notes"]);
    assert!(!ok && err.contains("/no/such/notes"), "{err}");

    // A damaged progress file is reported, not overwritten.
    std::fs::write(dir.join("progress.json"), b"{\"held\": 3").unwrap();
    let (ok, err) = client(&["status", "--dir", d]);
    assert!(!ok && err.contains("progress.json"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("progress.json")).unwrap(),
        b"{\"held\": 3"
    );

    // Enrolling an enrolled directory is refused before anything is touched; a malformed token too.
    let (ok, err) = client(&[
        "enrol",
        "--dir",
        d,
        "--coordinator",
        "127.0.0.1:7870",
        "--token",
        "x",
        "--pin",
        &"ab".repeat(32),
        "--signing-key",
        &"cd".repeat(32),
    ]);
    assert!(!ok && err.contains("already enrolled"), "{err}");
    let fresh = tmp.path().join("fresh");
    let (ok, err) = client(&[
        "enrol",
        "--dir",
        fresh.to_str().unwrap(),
        "--coordinator",
        "127.0.0.1:7870",
        "--token",
        "x",
        "--pin",
        "abc",
        "--signing-key",
        &"cd".repeat(32),
    ]);
    assert!(!ok && err.contains("pin"), "{err}");
    assert!(!fresh.exists(), "nothing is created for bad arguments");
}
