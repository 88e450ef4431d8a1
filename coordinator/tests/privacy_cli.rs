//! `starling-coordinator privacy epsilon|noise` as an operator runs them: numbers that match Google's
//! dp_accounting (values from shared/privacy/fixtures/dp_accounting.json), JSON output, clear refusals.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_starling-coordinator"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run starling-coordinator")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn epsilon_matches_dp_accounting_with_both_accountants() {
    let base = [
        "privacy",
        "epsilon",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.1",
        "--steps",
        "1000",
    ];
    let pld = json(&[&base[..], &["--delta", "1e-5", "--json"]].concat());
    let eps = pld["epsilon"].as_f64().unwrap();
    assert!((eps / 1.5153702482034066 - 1.0).abs() < 0.01, "{eps}");
    let rdp = json(
        &[
            &base[..],
            &["--delta", "1e-5", "--accountant", "rdp", "--json"],
        ]
        .concat(),
    );
    let eps = rdp["epsilon"].as_f64().unwrap();
    assert!((eps / 1.7117701662429012 - 1.0).abs() < 0.005, "{eps}");
    let human = run(&base);
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("ε = 1.51"));
}

#[test]
fn noise_calibration_matches_dp_accounting() {
    let v = json(&[
        "privacy",
        "noise",
        "--epsilon",
        "1",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.01",
        "--steps",
        "1000",
        "--json",
    ]);
    let sigma = v["noise_multiplier"].as_f64().unwrap();
    assert!((sigma / 1.4146408198368052 - 1.0).abs() < 0.005, "{sigma}");
}

#[test]
fn bad_parameters_are_refused_with_a_message() {
    for args in [
        &[
            "privacy",
            "epsilon",
            "--sampling-rate",
            "2",
            "--noise-multiplier",
            "1",
            "--steps",
            "3",
        ][..],
        &[
            "privacy",
            "epsilon",
            "--sampling-rate",
            "0.1",
            "--noise-multiplier",
            "1",
            "--steps",
            "3",
            "--delta",
            "0",
        ],
        &[
            "privacy",
            "noise",
            "--epsilon=-1",
            "--sampling-rate",
            "0.1",
            "--steps",
            "3",
        ],
    ] {
        let out = run(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid privacy parameter"), "{err}");
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn ddg_epsilon_matches_the_reference_and_costs_more_than_the_continuous_gaussian() {
    // The first case of shared/privacy/fixtures/ddg.json: 100 devices, shares of σ = 2000 grid steps,
    // clip 20,480 steps, 41,000 values, one round (z = 2000·√100 / 20480).
    let v = json(&[
        "privacy",
        "ddg-epsilon",
        "--clients",
        "100",
        "--clip",
        "20480",
        "--noise-multiplier",
        "0.9765625",
        "--scale",
        "1",
        "--dim",
        "41000",
        "--steps",
        "1",
        "--json",
    ]);
    let eps = v["epsilon"].as_f64().unwrap();
    assert!((eps / 4.926260636051993 - 1.0).abs() < 1e-9, "{v}");
    assert!((v["local_sigma_grid"].as_f64().unwrap() - 2000.0).abs() < 1e-9);
    assert!(v["gaussian_epsilon"].as_f64().unwrap() < eps, "{v}");
    let bad = run(&[
        "privacy",
        "ddg-epsilon",
        "--clients",
        "0",
        "--clip",
        "1",
        "--noise-multiplier",
        "1",
        "--scale",
        "1",
        "--dim",
        "1",
        "--steps",
        "1",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("clients"));
}
