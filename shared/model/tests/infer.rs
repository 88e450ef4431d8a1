//! The native inference path against the burn model: logits of a prefill and of token-by-token
//! decoding with the KV cache, for f32, Q8_0 and Q4_0 bases, grouped-query and multi-head
//! attention, tied and untied heads, with and without a LoRA adapter (at run time and merged),
//! every instruction set this CPU has and uneven thread splits; the shipped model generates the same
//! greedy text on both paths; bad input is a typed error.

mod common;

use common::rel_diff as rel;

use std::sync::Arc;

use starling_model::infer::Runner;
use starling_model::kernels::Isa;
use starling_model::pool::Pool;
use starling_model::{Backend, Llama, LlamaConfig, ModelError, QuantType, SamplingConfig, Target};

fn config(heads: usize, kv: usize, tied: bool) -> LlamaConfig {
    common::small_config(heads, kv, tied)
}

fn ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + i * i * 5 + 3) % vocab) as u32)
        .collect()
}

/// The burn model's logits for `ids` (one sequence), row-major `seq × vocab`.
fn reference(m: &Llama, a: Option<&starling_model::LoraAdapter>, ids: &[u32]) -> Vec<f32> {
    m.forward(ids, 1, a, None, None)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn prefill_and_decoding_match_the_burn_model() {
    let device = Backend::Flex.device();
    // Decoding quantizes activations to 8 bits (as llama.cpp does): Q8_0/Q4_0 logits differ from
    // the f32-activation reference by that rounding; f32 weights use f32 dots throughout.
    let tolerance = |q: QuantType| match q {
        QuantType::F32 => 1e-4,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 => 2e-2,
    };
    // A prefill of all 72 positions takes the GEMM path; 20 positions the integer path for
    // interleaved Q4_0 and the GEMM path otherwise; one position at a time the integer path.
    let n = 72;
    // The third shape is Qwen2's: biases on q, k and v.
    for (heads, kv, tied, qkv_bias) in [
        (4, 2, true, false),
        (4, 4, false, false),
        (4, 2, false, true),
    ] {
        // Every format on the Llama shapes; the biases of the Qwen2 shape are format-independent.
        let quants: &[QuantType] = if qkv_bias {
            &[QuantType::F32, QuantType::Q4_1]
        } else {
            &[
                QuantType::F32,
                QuantType::Q8_0,
                QuantType::Q4_0,
                QuantType::Q4_1,
            ]
        };
        for &quant in quants {
            let cfg = LlamaConfig {
                qkv_bias,
                ..config(heads, kv, tied)
            };
            let model = Llama::random(cfg, quant, &device, 7).unwrap();
            let adapter = common::patterned_adapter(&model, &Target::ALL, 0.0, 0.05);
            let model = Arc::new(model);
            let seq = ids(61, n);
            for lora in [None, Some(&adapter)] {
                let want = reference(&model, lora, &seq);
                for isa in Isa::available() {
                    for threads in [1, 3] {
                        let r =
                            Runner::with(model.clone(), lora, Arc::new(Pool::new(threads)), isa)
                                .unwrap();
                        let what = format!(
                            "{heads}/{kv} tied={tied} {quant} lora={} {isa:?} t={threads}",
                            lora.is_some()
                        );
                        // Prefill of all positions at once.
                        let all = r.logits_all(&seq).unwrap();
                        let e = rel(&all, &want);
                        // The GEMM path multiplies f32 activations with the expanded weights, as
                        // the burn model does (in another summation order).
                        assert!(e < 1e-3, "prefill {what}: {e}");
                        // A shorter prefill, then one token at a time.
                        let mut s = r.session();
                        let mut got = s.forward(&seq[..20], true).unwrap();
                        for &t in &seq[20..] {
                            got.extend(s.next_logits(&[t]).unwrap());
                        }
                        assert_eq!(s.len(), n);
                        let e = rel(&got, &want);
                        if quant == QuantType::F32 {
                            assert!(e < 1e-4, "decode {what}: {e}");
                        } else {
                            // 8-bit activations move every logit a little and, in a random network
                            // (small logits, near-ties in attention), a few positions by more:
                            // 90% must be within the tolerance, none far off. (The shipped,
                            // trained model is held to the tolerance at every position below.)
                            let rows: Vec<f32> = got
                                .chunks(61)
                                .zip(want.chunks(61))
                                .map(|(g, w)| rel(g, w))
                                .collect();
                            let close = rows.iter().filter(|&&e| e < tolerance(quant)).count();
                            let worst = rows.iter().fold(0.0f32, |m, &e| m.max(e));
                            assert!(
                                close * 10 >= rows.len() * 9 && worst < 1.5,
                                "decode {what}: {close}/{} positions close, worst {worst}",
                                rows.len()
                            );
                        }
                    }
                }
            }
            // A merged adapter: in f32 the logits are the run-time adapter's; quantized, every
            // adapted matrix holds W + s·B·A quantized once more, block for block. (A random
            // model's logits swing with any requantization, so they are compared on the shipped
            // model below.)
            let merged = adapter.merge_into(&model).unwrap();
            if quant == QuantType::F32 {
                let want = reference(&model, Some(&adapter), &seq);
                let got = Runner::new(Arc::new(merged), None)
                    .unwrap()
                    .logits_all(&seq)
                    .unwrap();
                let e = rel(&got, &want);
                assert!(e < 1e-4, "merged {heads}/{kv}: {e}");
            } else {
                let f32_base =
                    Llama::random(config(heads, kv, tied), QuantType::F32, &device, 7).unwrap();
                let f32_merged = adapter.merge_into(&f32_base).unwrap();
                for (li, b) in merged.blocks.iter().enumerate() {
                    for t in Target::ALL {
                        let (got, w) =
                            (&b.proj[t as usize].0, &model.blocks[li].proj[t as usize].0);
                        // W as stored (quantized) plus the same delta the f32 merge added, within half a
                        // step (and the rounding of the f16 block scale).
                        let delta: Vec<f32> = f32_merged.blocks[li].proj[t as usize]
                            .0
                            .to_f32()
                            .iter()
                            .zip(f32_base.blocks[li].proj[t as usize].0.to_f32())
                            .map(|(m, w)| m - w)
                            .collect();
                        let want: Vec<f32> =
                            w.to_f32().iter().zip(&delta).map(|(a, d)| a + d).collect();
                        let got = got.to_f32();
                        let max = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        // Q8_0 rounds to half a step; Q4_0 clamps the side opposite its largest
                        // value at +7 steps, a full step from +8.
                        let (step, bound) = match quant {
                            QuantType::Q8_0 => (max / 127.0, 0.6),
                            _ => (max / 8.0, 1.01),
                        };
                        let err = got
                            .iter()
                            .zip(&want)
                            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(
                            err <= bound * step,
                            "layer {li} {t:?}: {err} vs a step of {step}"
                        );
                        // …and the delta is there: the merged weights are nearer W + ΔW than W.
                        let moved: f32 = delta.iter().map(|d| d * d).sum();
                        let off: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
                        let unmerged: f32 = w
                            .to_f32()
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum();
                        assert!(moved > 0.0 && off < unmerged, "layer {li} {t:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_shipped_model_generates_the_same_greedy_text_on_both_paths() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("assets/models/starling-tiny");
    let device = Backend::Flex.device();
    let model = Llama::load(&dir, Some(QuantType::F32), &device).unwrap();
    let prompt: Vec<u32> = "HAMLET.\nTo be, or not to be"
        .bytes()
        .map(u32::from)
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 40,
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    let fast = starling_model::generate(&model, None, &prompt, &cfg).unwrap();
    let slow = starling_model::generate::generate_reference(&model, None, &prompt, &cfg).unwrap();
    assert_eq!(fast, slow);
    assert_eq!(fast.len(), 40);
    // Q8_0 on the integer path stays on the same greedy text for this prompt's first tokens.
    let q8 = Llama::load(&dir, Some(QuantType::Q8_0), &device).unwrap();
    let fast8 = starling_model::generate(&q8, None, &prompt, &cfg).unwrap();
    assert_eq!(fast8[..8], fast[..8]);
    // Every position of a prompt and of decoding after it, Q8_0 and Q4_0 (interleaved rows, the
    // eight-row kernel), with a run-time adapter: within the 8-bit activations' tolerance.
    let text: Vec<u32> = "HAMLET.\nTo be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
        .bytes()
        .map(u32::from)
        .collect();
    for quant in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
        let m = Arc::new(Llama::load(&dir, Some(quant), &device).unwrap());
        let adapter = common::patterned_adapter(&m, &Target::ALL, 0.0, 0.01);
        let want = reference(&m, Some(&adapter), &text);
        let r = Runner::new(m.clone(), Some(&adapter)).unwrap();
        let mut s = r.session();
        let mut got = s.forward(&text[..24], true).unwrap();
        for &t in &text[24..] {
            got.extend(s.next_logits(&[t]).unwrap());
        }
        let vocab = m.config.vocab_size;
        for (i, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel(g, w);
            assert!(e < 3e-2, "shipped model {quant}, position {i}: {e}");
        }
    }
    // A merged adapter on the shipped Q8_0 model: within the requantization of a trained model.
    let adapter = common::patterned_adapter(&q8, &Target::ALL, 0.0, 0.01);
    let ids = &prompt;
    let want = reference(&q8, Some(&adapter), ids);
    let merged = Arc::new(adapter.merge_into(&q8).unwrap());
    let got = Runner::new(merged, None).unwrap().logits_all(ids).unwrap();
    let e = rel(&got, &want);
    assert!(e < 2e-2, "merged q8_0 on the shipped model: {e}");
}

#[test]
fn bad_input_is_a_typed_error() {
    let device = Backend::Flex.device();
    let model = Arc::new(Llama::random(config(4, 2, true), QuantType::Q8_0, &device, 1).unwrap());
    let r = Runner::new(model.clone(), None).unwrap();
    assert!(matches!(
        r.logits_all(&[1, 2, 61]),
        Err(ModelError::TokenOutOfRange { id: 61, .. })
    ));
    assert!(matches!(
        r.logits_all(&[]),
        Err(ModelError::InvalidArgument(_))
    ));
    let mut s = r.session();
    s.forward(&ids(61, 252), false).unwrap();
    assert!(matches!(
        s.next_logits(&[1, 2, 3, 4, 5]),
        Err(ModelError::InvalidArgument(_))
    ));
    // The failed call left the cache as it was.
    assert_eq!(s.len(), 252);
    s.next_logits(&[1, 2, 3, 4]).unwrap();
    // An adapter for another shape is refused.
    let other = Llama::random(config(4, 4, false), QuantType::F32, &device, 2).unwrap();
    let mut c = other.config.clone();
    c.num_hidden_layers = 3;
    let wrong = Llama::random(c, QuantType::F32, &device, 3).unwrap();
    let a = common::patterned_adapter(&wrong, &[Target::Q], 0.0, 0.01);
    assert!(Runner::new(model, Some(&a)).is_err());
}
