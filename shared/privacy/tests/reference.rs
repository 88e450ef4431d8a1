//! The accountants against Google's dp_accounting 0.6 (fixtures by scripts/make_dp_fixtures.py):
//! RDP within 0.5 %, PLD within 1 % and never more than 0.5 % below the reference.

use serde_json::Value;
use starling_privacy::{accountant, calibrate_noise_multiplier, rdp, AccountantKind, DpEvent};

fn fixtures() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/dp_accounting.json"
    ))
    .expect("fixture file")
    .replace("Infinity", "null"); // dp_accounting writes an excluded order as Infinity
    serde_json::from_str(&text).expect("fixture json")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::INFINITY)
}

fn check_rdp(ours: f64, theirs: f64, what: &str) {
    let rel = (ours - theirs).abs() / theirs;
    assert!(
        rel < 0.005,
        "RDP {what}: ours {ours} vs dp_accounting {theirs} ({:.3} %)",
        rel * 100.0
    );
}

fn check_pld(ours: f64, theirs: f64, what: &str) {
    let rel = (ours - theirs) / theirs;
    assert!(
        rel.abs() < 0.01 && rel > -0.005,
        "PLD {what}: ours {ours} vs dp_accounting {theirs} ({:.3} %)",
        rel * 100.0
    );
}

#[test]
fn rdp_epsilon_matches_dp_accounting_on_the_grid() {
    let mut worst = 0.0f64;
    let grid = fixtures()["grid"].as_array().unwrap().clone();
    for g in &grid {
        let e = DpEvent::new(f(g, "q"), f(g, "sigma"), g["steps"].as_u64().unwrap()).unwrap();
        let ours = accountant::epsilon(&[e], f(g, "delta"), AccountantKind::Rdp)
            .unwrap()
            .epsilon;
        let theirs = f(g, "rdp_epsilon");
        check_rdp(ours, theirs, &format!("{g}"));
        worst = worst.max(((ours - theirs) / theirs).abs());
    }
    eprintln!(
        "worst RDP relative difference over {} grid points: {:.2e}",
        grid.len(),
        worst
    );
}

#[test]
fn pld_epsilon_matches_dp_accounting_on_the_grid() {
    let mut worst = 0.0f64;
    for g in fixtures()["grid"].as_array().unwrap() {
        let e = DpEvent::new(f(g, "q"), f(g, "sigma"), g["steps"].as_u64().unwrap()).unwrap();
        let ours = accountant::epsilon(&[e], f(g, "delta"), AccountantKind::Pld)
            .unwrap()
            .epsilon;
        let theirs = f(g, "pld_epsilon");
        check_pld(ours, theirs, &format!("{g}"));
        worst = worst.max(((ours - theirs) / theirs).abs());
    }
    eprintln!("worst PLD relative difference: {:.2e}", worst);
}

#[test]
fn raw_rdp_values_match_at_integer_and_fractional_orders() {
    for c in fixtures()["raw_rdp"].as_array().unwrap() {
        let orders: Vec<f64> = c["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_f64().unwrap())
            .collect();
        let ours = rdp::subsampled_gaussian_rdp(f(c, "q"), f(c, "sigma"), &orders).unwrap();
        for ((o, &mine), theirs) in orders.iter().zip(&ours).zip(c["rdp"].as_array().unwrap()) {
            let theirs = theirs.as_f64().unwrap_or(f64::INFINITY);
            if theirs.is_infinite() {
                assert!(
                    mine.is_infinite(),
                    "order {o}: {mine} should be excluded like dp_accounting's"
                );
            } else {
                assert!(
                    (mine - theirs).abs() <= 1e-9 * theirs.abs().max(1e-12),
                    "order {o}: {mine} vs {theirs}"
                );
            }
        }
    }
}

#[test]
fn delta_for_epsilon_matches() {
    for c in fixtures()["deltas"].as_array().unwrap() {
        let e = DpEvent::new(f(c, "q"), f(c, "sigma"), c["steps"].as_u64().unwrap()).unwrap();
        let r = accountant::delta(&[e], f(c, "epsilon"), AccountantKind::Rdp).unwrap();
        check_rdp(r, f(c, "rdp_delta"), "delta");
        let p = accountant::delta(&[e], f(c, "epsilon"), AccountantKind::Pld).unwrap();
        check_pld(p, f(c, "pld_delta"), "delta");
    }
}

#[test]
fn heterogeneous_composition_matches() {
    let h = &fixtures()["heterogeneous"];
    let events: Vec<DpEvent> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            DpEvent::new(
                e[0].as_f64().unwrap(),
                e[1].as_f64().unwrap(),
                e[2].as_u64().unwrap(),
            )
            .unwrap()
        })
        .collect();
    let d = f(h, "delta");
    check_rdp(
        accountant::epsilon(&events, d, AccountantKind::Rdp)
            .unwrap()
            .epsilon,
        f(h, "rdp_epsilon"),
        "hetero",
    );
    check_pld(
        accountant::epsilon(&events, d, AccountantKind::Pld)
            .unwrap()
            .epsilon,
        f(h, "pld_epsilon"),
        "hetero",
    );
}

#[test]
fn calibration_matches_dp_accountings_calibrate_dp_mechanism() {
    for c in fixtures()["calibration"].as_array().unwrap() {
        let kind = if c["accountant"] == "rdp" {
            AccountantKind::Rdp
        } else {
            AccountantKind::Pld
        };
        let ours = calibrate_noise_multiplier(
            f(c, "epsilon"),
            f(c, "delta"),
            f(c, "q"),
            c["steps"].as_u64().unwrap(),
            kind,
        )
        .unwrap();
        let theirs = f(c, "sigma");
        assert!(
            (ours - theirs).abs() / theirs < 0.005,
            "{c}: ours {ours} vs {theirs}"
        );
    }
}
