//! Numerical parity with HuggingFace transformers and PEFT on the committed fixtures
//! (made by scripts/make_fixtures.py and, for Qwen2, scripts/make_qwen2_fixtures.py): logits within 1e-4 max absolute difference in f32.

use std::path::{Path, PathBuf};

use starling_model::io::TensorFile;
use starling_model::{Backend, Llama, LoraAdapter, QuantType};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Returns (input ids as [batch, seq], expected logits flat) of a fixture.
fn expected(dir: &Path) -> (usize, Vec<u32>, Vec<f32>, Vec<usize>) {
    let f = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let (shape, ids) = f.i64("input_ids").unwrap();
    let lshape = f.shape("logits").unwrap().to_vec();
    let logits = f.f32("logits", &lshape).unwrap();
    (
        shape[0],
        ids.into_iter().map(|x| x as u32).collect(),
        logits,
        lshape,
    )
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(model: &Llama, adapter: Option<&LoraAdapter>, ids: &[u32], batch: usize) -> Vec<f32> {
    model
        .forward(ids, batch, adapter, None, None)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn logits_match_transformers_for_every_config_and_backend() {
    for name in [
        "gqa_untied_f32",
        "mha_tied_f16",
        "mqa_headdim_bf16",
        "gqa3_tied_f32",
    ] {
        let dir = fixture(name);
        let (batch, ids, want, shape) = expected(&dir);
        for backend in [Backend::Flex, Backend::Ndarray] {
            let model = Llama::load(&dir, None, &backend.device()).unwrap();
            assert_eq!(model.config.vocab_size, shape[2]);
            let got = logits(&model, None, &ids, batch);
            let d = max_diff(&got, &want);
            println!("{name} {}: max |Δlogit| = {d:.2e}", backend.name());
            assert!(d <= 1e-4, "{name} on {}: max |Δ| = {d}", backend.name());
        }
    }
}

/// Qwen2 (q/k/v biases, rope θ 1e6, tied and untied heads; `scripts/make_qwen2_fixtures.py`): the
/// burn model on both backends and the native inference path equal transformers within 1e-4 (f32);
/// a Starling container and a GGUF export (architecture `qwen2`) keep every weight and bias.
#[test]
fn qwen2_matches_transformers_and_survives_containers_and_gguf() {
    for name in ["qwen2_tied_f32", "qwen2_untied_bf16"] {
        let dir = fixture(name);
        let (batch, ids, want, shape) = expected(&dir);
        let seq = shape[1];
        for backend in [Backend::Flex, Backend::Ndarray] {
            let model = Llama::load(&dir, None, &backend.device()).unwrap();
            assert!(model.config.qkv_bias);
            let got = logits(&model, None, &ids, batch);
            let d = max_diff(&got, &want);
            println!("{name} {}: max |Δlogit| = {d:.2e}", backend.name());
            assert!(d <= 1e-4, "{name} on {}: max |Δ| = {d}", backend.name());
        }
        let model = std::sync::Arc::new(Llama::load(&dir, None, &Backend::Flex.device()).unwrap());
        // The native path (f32 weights: f32 dots, no activation quantization), one sequence at a
        // time: the prompt at once, then the rest of a sequence token by token with the cache.
        let runner = starling_model::infer::Runner::new(model.clone(), None).unwrap();
        for b in 0..batch {
            let s = &ids[b * seq..(b + 1) * seq];
            let mut session = runner.session();
            let mut got = session.forward(&s[..5], true).unwrap();
            for &t in &s[5..] {
                got.extend(session.next_logits(&[t]).unwrap());
            }
            let w = &want[b * seq * shape[2]..(b + 1) * seq * shape[2]];
            let d = max_diff(&got, w);
            println!("{name} native, sequence {b}: max |Δlogit| = {d:.2e}");
            assert!(d <= 1e-4, "{name} native: max |Δ| = {d}");
        }
        // Without the biases the logits are far off: they matter in this fixture.
        let mut plain = (*model).clone();
        plain.blocks.iter_mut().for_each(|b| b.qkv_bias = None);
        assert!(max_diff(&logits(&plain, None, &ids, batch), &want) > 1e-2);
        // Container: config.json says qwen2, every bias is kept.
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let text = std::fs::read_to_string(out.path().join("config.json")).unwrap();
        assert!(text.contains("\"qwen2\""), "{text}");
        let back = Llama::load(out.path(), None, &Backend::Flex.device()).unwrap();
        assert_eq!(
            logits(&back, None, &ids, batch),
            logits(&model, None, &ids, batch)
        );
        // GGUF: architecture qwen2 with attn_{q,k,v}.bias tensors, read back to the same logits.
        let g = starling_model::gguf::export(&model, &starling_model::Tokenizer::Byte).unwrap();
        let bytes = g.to_bytes();
        let g = starling_model::gguf::Gguf::parse(&bytes, Path::new("q.gguf")).unwrap();
        assert_eq!(
            g.get("general.architecture"),
            Some(&starling_model::gguf::Value::Str("qwen2".into()))
        );
        assert!(g.tensor("blk.0.attn_k.bias").is_some());
        assert!(g.tensor("blk.0.attn_output.bias").is_none());
        let back =
            starling_model::gguf::import(&g, Path::new("q.gguf"), None, &Backend::Flex.device())
                .unwrap();
        assert_eq!(back.config, model.config);
        let d = max_diff(&logits(&back, None, &ids, batch), &want);
        assert!(d <= 1e-4, "{name} through GGUF: max |Δ| = {d}");
    }
}

#[test]
fn peft_adapter_logits_match_peft() {
    let base = fixture("gqa_untied_f32");
    let dir = fixture("peft_gqa");
    let (batch, ids, want, _) = expected(&dir);
    let device = Backend::default().device();
    let model = Llama::load(&base, None, &device).unwrap();
    let adapter = LoraAdapter::load_peft(&dir, &model.config, &device).unwrap();
    assert_eq!(adapter.config.rank, 4);
    assert_eq!(adapter.config.targets.len(), 7);
    let got = logits(&model, Some(&adapter), &ids, batch);
    let d = max_diff(&got, &want);
    println!("peft adapter: max |Δlogit| = {d:.2e}");
    assert!(d <= 1e-4, "max |Δ| = {d}");
    // And the adapter really matters: without it the logits differ a lot.
    let plain = logits(&model, None, &ids, batch);
    assert!(max_diff(&plain, &want) > 1e-2);
}

#[test]
fn adapter_we_write_has_peft_layout_and_round_trips() {
    let base = fixture("gqa_untied_f32");
    let peft_dir = fixture("peft_gqa");
    let device = Backend::default().device();
    let model = Llama::load(&base, None, &device).unwrap();
    let adapter = LoraAdapter::load_peft(&peft_dir, &model.config, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter.save_peft(out.path()).unwrap();
    // Same tensor names, shapes and dtype as the file PEFT wrote.
    let ours = TensorFile::open(&out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = TensorFile::open(&peft_dir.join("adapter_model.safetensors")).unwrap();
    let mut a: Vec<_> = ours
        .names()
        .map(|n| (n.to_string(), ours.shape(n).unwrap().to_vec()))
        .collect();
    let mut b: Vec<_> = theirs
        .names()
        .map(|n| (n.to_string(), theirs.shape(n).unwrap().to_vec()))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // The config carries the keys PEFT's LoraConfig needs.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    // Reloading gives identical logits.
    let back = LoraAdapter::load_peft(out.path(), &model.config, &device).unwrap();
    let (batch, ids, _, _) = expected(&peft_dir);
    assert_eq!(
        logits(&model, Some(&adapter), &ids, batch),
        logits(&model, Some(&back), &ids, batch)
    );
}

#[test]
fn quantized_container_round_trips_and_stays_close() {
    let dir = fixture("gqa3_tied_f32"); // every matrix has a row length that is a multiple of 32
    let (batch, ids, want, _) = expected(&dir);
    let device = Backend::default().device();
    // Relative RMS error of the logits (random weights are a harsh case for quantization; the
    // perplexity of the trained default model is checked in tests/quality.rs).
    let rel = |got: &[f32]| {
        let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
        (num / want.iter().map(|b| b * b).sum::<f32>()).sqrt()
    };
    for (q, tol) in [
        (QuantType::Q8_0, 0.03),
        (QuantType::Q4_0, 0.4),
        (QuantType::Q4_1, 0.4),
    ] {
        let model = Llama::load(&dir, Some(q), &device).unwrap();
        let got = logits(&model, None, &ids, batch);
        let r = rel(&got);
        println!("{q}: relative RMS logit error vs f32 transformers = {r:.4}");
        assert!(r < tol, "{q}: {r}");
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let back = Llama::load(out.path(), None, &device).unwrap();
        assert_eq!(back.quant, q);
        assert_eq!(logits(&back, None, &ids, batch), got);
        // Asking for another format than the one stored is a clear error.
        let other = if q == QuantType::Q8_0 {
            QuantType::Q4_0
        } else {
            QuantType::Q8_0
        };
        assert!(Llama::load(out.path(), Some(other), &device).is_err());
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let dir = fixture("mqa_headdim_bf16");
    let (_, ids, _, _) = expected(&dir);
    let ids = &ids[..11];
    let device = Backend::default().device();
    let model = Llama::load(&dir, None, &device).unwrap();
    let full = logits(&model, None, ids, 1);
    let vocab = model.config.vocab_size;
    let mut cache = starling_model::KvCache::new();
    let mut inc = logits_cached(&model, &ids[..5], &mut cache);
    for &t in &ids[5..] {
        inc.extend(logits_cached(&model, &[t], &mut cache));
    }
    assert_eq!(cache.len(), 11);
    let d = max_diff(&inc, &full);
    assert!(d < 1e-4, "{d}");
    assert_eq!(inc.len(), 11 * vocab);
}

fn logits_cached(model: &Llama, ids: &[u32], cache: &mut starling_model::KvCache) -> Vec<f32> {
    model
        .forward(ids, 1, None, Some(cache), None)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}
