//! The distributed discrete Gaussian accountant against a transcription of Google's reference
//! (google-research/federated `distributed_dp/accounting_utils.py`: `ddgauss_epsilon` at β = 0, Zhu–Wang
//! subsampling, dp_accounting's RDP conversion), fixtures by scripts/make_ddg_fixtures.py: sensitivities,
//! τ, RDP at several orders and ε within 1e-9 relative.

use serde_json::Value;
use starling_privacy::ddg::{epsilon, orders, DdgEvent};

fn close(ours: f64, theirs: f64, what: &str) {
    let rel = (ours - theirs).abs() / theirs.abs().max(1e-300);
    assert!(
        rel < 1e-9 || (ours - theirs).abs() < 1e-12,
        "{what}: ours {ours} vs reference {theirs}"
    );
}

#[test]
fn ddg_epsilon_matches_the_reference() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ddg.json"))
        .expect("fixture file");
    let v: Value = serde_json::from_str(&text).expect("fixture json");
    let cases = v["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6);
    let f = |c: &Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
    for c in cases {
        let e = DdgEvent::new(
            f(c, "clients") as u64,
            f(c, "local_sigma"),
            f(c, "clip"),
            f(c, "dim") as u64,
            f(c, "q"),
            f(c, "steps") as u64,
        )
        .unwrap();
        let what = format!("{c}");
        close(e.l2_sensitivity, f(c, "l2_sensitivity"), &what);
        close(e.l1_sensitivity, f(c, "l1_sensitivity"), &what);
        close(e.tau(), f(c, "tau"), &what);
        let ord = orders();
        let rdp = e.rdp(&ord);
        for (order, want) in c["rdp_at"].as_object().expect("rdp_at") {
            let o: u64 = order.parse().expect("an integer order");
            let i = ord.iter().position(|&x| x == o).expect("a reference order");
            close(
                rdp[i],
                want.as_f64().unwrap_or(f64::NAN),
                &format!("RDP at {o}, {what}"),
            );
        }
        let (eps, order) = epsilon(&[e], f(c, "delta")).unwrap();
        close(eps, f(c, "epsilon"), &what);
        assert_eq!(order, f(c, "order"), "{what}");
    }
}
