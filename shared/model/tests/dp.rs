//! DP-SGD and user-level DP in training: one example's influence on the summed gradient is bounded by C,
//! ε is advanced per step and equals the accountant's, a ledger refuses a
//! run beyond its budget, and a user-level delta is clipped to C.

mod common;

use std::path::Path;

use starling_model::dp::{user_level_delta, DpSgd, DpSgdConfig};
use starling_model::{Backend, Llama, LoraAdapter, Target, TrainConfig, Trainer};
use starling_privacy::{
    accountant, AccountantKind, Budget, DpEvent, Ledger, LedgerScope, NoisePlacement, PrivacyError,
};

fn model() -> Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gqa_untied_f32");
    Llama::load(&dir, None, &Backend::default().device()).unwrap()
}

fn adapter(m: &Llama) -> LoraAdapter {
    common::patterned_adapter(m, &[Target::Q, Target::V], 0.0, 0.01)
}

fn examples(vocab: usize, n: usize, seq: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|e| {
            (0..seq)
                .map(|i| ((i * 31 + e * 17 + i * i) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn config(q: f64) -> DpSgdConfig {
    DpSgdConfig {
        clip: 0.05,
        noise_multiplier: 1.0,
        sampling_rate: q,
        delta: 1e-5,
        accountant: AccountantKind::Rdp,
    }
}

fn trainer(m: &Llama) -> Trainer {
    let cfg = TrainConfig {
        steps: 10,
        batch_size: 1,
        seq_len: 8,
        lr: 1e-2,
        warmup_steps: 0,
        ..Default::default()
    };
    Trainer::new(adapter(m), cfg).unwrap()
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn one_examples_influence_on_the_clipped_sum_is_bounded_by_c() {
    let m = model();
    let mut tr = trainer(&m);
    let vocab = m.config.vocab_size;
    let mut data = examples(vocab, 6, 8);
    // An outlier example: its raw gradient is far above C.
    data.push((0..8).map(|i| ((i * 97 + 5) % vocab) as u32).collect());
    let n = tr.adapter.num_parameters();
    let dp = DpSgd::new(config(0.5), data.clone(), n, Some(1)).unwrap();
    let (g_out, _) = DpSgd::example_gradient(&mut tr, &m, &data[6]).unwrap();
    let raw: f64 = g_out
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        raw > 0.05 * 3.0,
        "the outlier's gradient norm {raw} should exceed C"
    );
    let without: Vec<usize> = (0..6).collect();
    let with: Vec<usize> = (0..7).collect();
    let (s0, _, _) = dp.clipped_sum(&mut tr, &m, &without).unwrap();
    let (s1, _, clipped) = dp.clipped_sum(&mut tr, &m, &with).unwrap();
    let d = dist(&s0, &s1);
    assert!(d <= 0.05 * (1.0 + 1e-5), "influence {d} exceeds C = 0.05");
    assert!(
        d > 0.04,
        "the outlier should use most of its budget, moved {d}"
    );
    assert!(clipped >= 1);
}

#[test]
fn every_step_moves_the_adapter_and_epsilon_follows_the_accountant() {
    let m = model();
    let mut tr = trainer(&m);
    let data = examples(m.config.vocab_size, 20, 8);
    let n = tr.adapter.num_parameters();
    let cfg = config(0.25);
    let mut dp = DpSgd::new(cfg, data, n, Some(7)).unwrap();
    let mut last_eps = 0.0;
    for s in 1..=3u64 {
        let before = tr.adapter.to_flat();
        let stats = dp.step(&mut tr, &m).unwrap();
        assert!(tr.adapter.to_flat() != before);
        let eps = dp.epsilon().unwrap();
        assert!(eps > last_eps);
        last_eps = eps;
        let want = accountant::epsilon(
            &[DpEvent::new(0.25, 1.0, s).unwrap()],
            1e-5,
            AccountantKind::Rdp,
        )
        .unwrap()
        .epsilon;
        // The effective multiplier is a hair below 1.0 (opendp's rounding allowance), so ε is a hair above.
        assert!(
            eps >= want && eps < want * 1.001,
            "step {s}: {eps} vs {want}"
        );
        assert!(stats.batch <= 20);
    }
}

#[test]
fn a_ledger_refuses_a_run_beyond_its_budget() {
    let m = model();
    let tr = trainer(&m);
    let dp = DpSgd::new(
        config(0.5),
        examples(m.config.vocab_size, 10, 8),
        tr.adapter.num_parameters(),
        Some(2),
    )
    .unwrap();
    let mut ledger = Ledger::new(
        LedgerScope::Client("dev-7".into()),
        Budget {
            epsilon: 10.0,
            delta: 1e-5,
        },
        AccountantKind::Rdp,
    )
    .unwrap();
    dp.charge_plan(&mut ledger, "run 1", 5).unwrap();
    let spent = ledger.spent();
    let err = dp.charge_plan(&mut ledger, "run 2", 10_000).unwrap_err();
    assert!(
        matches!(
            err,
            starling_model::ModelError::Privacy(PrivacyError::BudgetExceeded { .. })
        ),
        "{err}"
    );
    assert_eq!(ledger.spent(), spent, "a refused run must not be recorded");
}

#[test]
fn user_level_delta_is_clipped_and_distributed_noise_is_added() {
    let m = model();
    let a = adapter(&m);
    let mut b = a.clone();
    let flat: Vec<f32> = b.to_flat().iter().map(|x| x + 0.3).collect();
    b.set_flat(&flat).unwrap();
    let (d, norm) = user_level_delta(&a, &b, 1.0, 1.0, NoisePlacement::Central).unwrap();
    assert!(norm > 1.0);
    let n2: f64 = d.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    assert!(n2 <= 1.0 && n2 > 0.999);
    let (noisy, _) =
        user_level_delta(&a, &b, 1.0, 2.0, NoisePlacement::Distributed { clients: 4 }).unwrap();
    // Share per client: σC/√n = 1.0 per coordinate.
    let var = noisy
        .iter()
        .zip(&d)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / d.len() as f64;
    assert!((var - 1.0).abs() < 0.2, "{var}");
    assert!(b.set_flat(&[0.0; 3]).is_err());
}

#[test]
fn bad_dp_settings_are_errors() {
    let n = 10;
    let ex = vec![vec![1u32; 8]];
    for bad in [
        DpSgdConfig {
            clip: 0.0,
            ..config(0.1)
        },
        DpSgdConfig {
            noise_multiplier: -1.0,
            ..config(0.1)
        },
        DpSgdConfig {
            sampling_rate: 1.5,
            ..config(0.1)
        },
        DpSgdConfig {
            delta: 0.0,
            ..config(0.1)
        },
    ] {
        assert!(DpSgd::new(bad, ex.clone(), n, Some(0)).is_err());
    }
    assert!(DpSgd::new(config(0.1), Vec::new(), n, Some(0)).is_err());
}
