//! LoRA training: only A/B change, gradients are right (finite differences), the optimizer and
//! schedule behave as PyTorch's, and training reduces the loss on real text.

mod common;

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use starling_model::train::next_token_loss;
use starling_model::{
    Backend, Llama, LoraAdapter, LoraConfig, Optimizer, Target, TrainConfig, Trainer,
};

fn model() -> Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gqa_untied_f32");
    Llama::load(&dir, None, &Backend::default().device()).unwrap()
}

fn base_weights(m: &Llama) -> Vec<f32> {
    let mut all = m.embed.to_f32();
    for b in &m.blocks {
        for p in &b.proj {
            all.extend(p.0.to_f32());
        }
        all.extend(&b.attn_norm);
        all.extend(&b.mlp_norm);
    }
    all.extend(m.lm_head.0.to_f32());
    all
}

fn ids(vocab: usize, n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + seed * 17 + i * i) % vocab) as u32)
        .collect()
}

/// A tensor's values, in order.
fn values(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().try_into_vec::<f32>().unwrap()
}

fn adapter(m: &Llama, targets: &[Target]) -> LoraAdapter {
    common::patterned_adapter(m, targets, 0.0, 0.01)
}

#[test]
fn only_adapter_changes_and_base_is_untouched() {
    let m = model();
    let before = base_weights(&m);
    let a = adapter(&m, &Target::ALL);
    let start: Vec<Vec<f32>> = a.tensors().iter().map(|t| values(t)).collect();
    let cfg = TrainConfig {
        steps: 3,
        batch_size: 2,
        seq_len: 8,
        lr: 1e-2,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut tr = Trainer::new(a, cfg).unwrap();
    for s in 0..3 {
        tr.step(&m, &[ids(m.config.vocab_size, 16, s)]).unwrap();
    }
    assert_eq!(base_weights(&m), before, "base weights changed");
    let end: Vec<Vec<f32>> = tr.adapter.tensors().iter().map(|t| values(t)).collect();
    assert!(
        start.iter().zip(&end).all(|(a, b)| a != b),
        "every A and B must move"
    );
    // The trained tensors are plain (not autodiff-tracked) tensors again.
    assert!(tr.adapter.tensors().iter().all(|t| !t.is_autodiff()));
}

#[test]
fn gradients_match_finite_differences() {
    let m = model();
    let a = adapter(&m, &[Target::Q, Target::V, Target::Down]);
    let x = ids(m.config.vocab_size, 2 * 6, 5);
    let cfg = TrainConfig {
        batch_size: 2,
        seq_len: 6,
        ..Default::default()
    };
    let mut tr = Trainer::new(a.clone(), cfg).unwrap();
    let (grads, _) = tr.gradients(&m, std::slice::from_ref(&x)).unwrap();
    let loss_with = |ad: &LoraAdapter| -> f64 {
        let logits = m.forward(&x, 2, Some(ad), None, None).unwrap();
        next_token_loss(logits, &x, 2).into_scalar::<f32>() as f64
    };
    let eps = 1e-2f32;
    let mut checked = 0;
    for (ti, g) in grads.iter().enumerate() {
        let gv = values(g);
        for &j in &[0usize, 5, 11] {
            if j >= gv.len() {
                continue;
            }
            let perturb = |delta: f32| {
                let mut ad = a.clone();
                let t = &mut ad.tensors_mut()[ti];
                let dims = t.dims();
                let mut v = values(t);
                v[j] += delta;
                **t = Tensor::from_data(TensorData::new(v, dims), &m.device);
                loss_with(&ad)
            };
            let fd = (perturb(eps) - perturb(-eps)) / (2.0 * eps as f64);
            let err = (fd - gv[j] as f64).abs();
            assert!(
                err < 2e-3 + 2e-2 * fd.abs(),
                "tensor {ti} elem {j}: autodiff {} vs fd {fd}",
                gv[j]
            );
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn adamw_and_schedule_follow_pytorch() {
    // Schedule: linear warm-up then cosine to min_lr_ratio.
    let c = TrainConfig {
        steps: 110,
        lr: 1.0,
        warmup_steps: 10,
        min_lr_ratio: 0.0,
        ..Default::default()
    };
    assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(60) - 0.5).abs() < 1e-12);
    assert!(c.lr_at(110).abs() < 1e-12);
    // One AdamW step from zero moments moves each parameter by lr·sign(g) (bias-corrected
    // m̂/√v̂ = g/|g|) after decoupled decay p·(1 − lr·wd), exactly as torch.optim.AdamW.
    let m = model();
    let a = adapter(&m, &[Target::Q]);
    let cfg = TrainConfig {
        steps: 1,
        batch_size: 1,
        seq_len: 8,
        lr: 1e-3,
        warmup_steps: 0,
        weight_decay: 0.1,
        eps: 1e-12,
        max_grad_norm: None,
        ..Default::default()
    };
    let mut tr = Trainer::new(a.clone(), cfg).unwrap();
    let x = ids(m.config.vocab_size, 8, 9);
    let (g, _) = tr.clone_gradients(&m, &x);
    tr.step(&m, &[x]).unwrap();
    for ((p0, p1), g) in a.tensors().iter().zip(tr.adapter.tensors()).zip(g) {
        let (p0, p1, g) = (values(p0), values(p1), values(&g));
        for ((a, b), g) in p0.iter().zip(&p1).zip(&g) {
            let want = a * (1.0 - 1e-3 * 0.1) - if *g == 0.0 { 0.0 } else { 1e-3 * g.signum() };
            assert!((b - want).abs() < 1e-6, "{b} vs {want}");
        }
    }
}

#[test]
fn sgd_steps_by_the_learning_rate_times_the_clipped_gradient() {
    // Two SGD steps: each is p·(1 − lr·wd) − lr·g, with g scaled to the global norm bound first —
    // torch.optim.SGD (no momentum) after clip_grad_norm_, plus the same decoupled decay as AdamW.
    let m = model();
    let a = adapter(&m, &[Target::Q, Target::Down]);
    let cfg = TrainConfig {
        steps: 2,
        batch_size: 1,
        seq_len: 8,
        lr: 0.5,
        warmup_steps: 0,
        // A constant rate (no cosine decay), as devices train.
        min_lr_ratio: 1.0,
        weight_decay: 0.01,
        optimizer: Optimizer::Sgd,
        max_grad_norm: Some(0.05),
        ..Default::default()
    };
    let mut tr = Trainer::new(a, cfg).unwrap();
    for s in 0..2 {
        let before: Vec<Vec<f32>> = tr.adapter.tensors().iter().map(|t| values(t)).collect();
        let x = ids(m.config.vocab_size, 8, 20 + s);
        let (g, _) = tr.clone_gradients(&m, &x);
        let g: Vec<Vec<f32>> = g.iter().map(values).collect();
        let norm = g
            .iter()
            .flatten()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            norm > 0.05,
            "the test needs a gradient the bound clips ({norm})"
        );
        let coef = (0.05 / (norm + 1e-6)) as f32;
        tr.step(&m, &[x]).unwrap();
        let mut moved = 0.0f64;
        for ((p0, p1), g) in before.iter().zip(tr.adapter.tensors()).zip(&g) {
            let p1 = values(p1);
            for ((a, b), g) in p0.iter().zip(&p1).zip(g) {
                let want = a * (1.0 - 0.5 * 0.01) - 0.5 * coef * g;
                assert!((b - want).abs() < 1e-6, "step {s}: {b} vs {want}");
                moved += f64::from(b - a * (1.0 - 0.5 * 0.01)).powi(2);
            }
        }
        // The step's norm is lr × the clipped gradient's norm.
        assert!((moved.sqrt() - 0.5 * 0.05).abs() < 1e-4, "{}", moved.sqrt());
    }
}

/// Gradients without advancing the trainer (helper for the AdamW check).
trait CloneGrads {
    fn clone_gradients(&mut self, m: &Llama, x: &[u32]) -> (Vec<Tensor<2>>, f64);
}

impl CloneGrads for Trainer {
    fn clone_gradients(&mut self, m: &Llama, x: &[u32]) -> (Vec<Tensor<2>>, f64) {
        self.gradients(m, &[x.to_vec()]).unwrap()
    }
}

#[test]
fn gradient_accumulation_equals_the_big_batch() {
    let m = model();
    let a = adapter(&m, &[Target::K, Target::Up]);
    let x1 = ids(m.config.vocab_size, 8, 1);
    let x2 = ids(m.config.vocab_size, 8, 2);
    let cfg = TrainConfig {
        batch_size: 1,
        seq_len: 8,
        grad_accum: 2,
        ..Default::default()
    };
    let mut t1 = Trainer::new(a.clone(), cfg.clone()).unwrap();
    let (acc, _) = t1.gradients(&m, &[x1.clone(), x2.clone()]).unwrap();
    let mut t2 = Trainer::new(
        a,
        TrainConfig {
            batch_size: 2,
            grad_accum: 1,
            ..cfg
        },
    )
    .unwrap();
    let both: Vec<u32> = x1.into_iter().chain(x2).collect();
    let (big, _) = t2.gradients(&m, &[both]).unwrap();
    for (a, b) in acc.iter().zip(&big) {
        let (a, b) = (values(a), values(b));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{d}");
    }
}

#[test]
fn training_lowers_the_loss_on_shakespeare() {
    let m = model();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/shakespeare/sonnets.txt"),
    )
    .unwrap();
    // The fixture's vocabulary is 97 ids: map bytes into it.
    let toks: Vec<u32> = text
        .bytes()
        .take(20_000)
        .map(|b| b as u32 % m.config.vocab_size as u32)
        .collect();
    let a = LoraAdapter::new(
        &m.config,
        LoraConfig::new(8, 16.0, 0.0, &Target::ALL).unwrap(),
        &m.device,
        0,
    );
    let cfg = TrainConfig {
        steps: 30,
        batch_size: 4,
        seq_len: 32,
        lr: 1e-2,
        warmup_steps: 3,
        ..Default::default()
    };
    let before = starling_model::eval_loss(&m, Some(&a), &toks[15_000..], 32, 8, 8).unwrap();
    let mut tr = Trainer::new(a, cfg).unwrap();
    let mut b = starling_model::data::Batcher::new(32, 4, 0);
    for _ in 0..30 {
        let x = b.sample(&toks[..15_000]).unwrap();
        tr.step(&m, &[x]).unwrap();
    }
    let after =
        starling_model::eval_loss(&m, Some(&tr.adapter), &toks[15_000..], 32, 8, 8).unwrap();
    println!("held-out loss {before:.3} -> {after:.3}");
    assert!(after < before - 0.3, "{before} -> {after}");
}
