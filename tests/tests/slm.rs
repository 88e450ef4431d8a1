//! The path a real small language model takes through a federation, on a small random model of SmolLM2's
//! architecture so that it stays fast: a Q4_1 base (the storage of the real SmolLM2 file, run natively),
//! a byte-level BPE vocabulary (`tokenizer.json`) and a ChatML chat template (`tokenizer_config.json`).
//! `starling-coordinator init` bundles all of it; two real `starling-client run` processes fetch and verify
//! the bundle over QUIC, train on chat conversations (JSONL, the loss on the assistant turns only, rendered
//! with the template that travelled in the bundle), and the round publishes version 1, which fits the
//! devices' held-out assistant turns better than version 0.

use std::path::Path;

use starling_model::chat::ChatTemplate;
use starling_model::data::chat_ids;
use starling_model::{
    eval_loss, Backend, Llama, LlamaConfig, LoraAdapter, LoraConfig, QuantType, Target, Tokenizer,
};
use starling_tests::{eventually, root, Coord, Device, Serving};

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http = false
[rounds]
min_clients = 2
selection = { count = 2 }
min_updates = 2
round_timeout_ms = 600000
rounds = 1
retry_after_ms = 200
[task]
local_steps = 12
batch_size = 4
seq_len = 48
learning_rate = 0.01
[adapter]
rank = 4
alpha = 8.0
targets = ["q", "k", "v", "o"]
"#;

/// SmolLM2-Instruct's template (ChatML with a default system turn).
const TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Conversations about a play, one per line of JSONL.
fn conversations(seed: usize, n: usize) -> String {
    let names = [
        "Hamlet", "Ophelia", "Horatio", "Polonius", "Laertes", "Gertrude",
    ];
    (0..n)
        .map(|i| {
            let a = names[(i * 7 + seed) % names.len()];
            let b = names[(i * 3 + seed + 1) % names.len()];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Who speaks after {a}?")},
                {"role": "assistant", "content": format!("After {a} speaks {b}, and then {a} again.")},
            ]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_q4_1_bpe_chat_model_is_served_and_fine_tuned_on_chat_data() {
    let tmp = tempfile::tempdir().unwrap();
    // The base: SmolLM2's architecture at a small size, tied embeddings, stored as Q4_1.
    let base = tmp.path().join("base");
    let tokenizer = root().join("shared/model/fixtures/tokenizer/tokenizer.json");
    let tok = Tokenizer::from_file(&tokenizer).unwrap();
    let config = LlamaConfig {
        vocab_size: 416,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 2048,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        qkv_bias: false,
    };
    let device = Backend::Flex.device();
    let model = Llama::random(config, QuantType::Q4_1, &device, 3).unwrap();
    model.save(&base).unwrap();
    std::fs::copy(&tokenizer, base.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::new(TEMPLATE, "<s>", "</s>").unwrap();
    std::fs::write(
        base.join(starling_model::chat::CONFIG_FILE),
        template.config_json(),
    )
    .unwrap();

    let coord = Coord::init_with_base(&tmp.path().join("coord"), CONFIG, &base);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(coord.dir.join("base").join(f).is_file(), "{f} is bundled");
    }
    let enrolments: Vec<_> = (0..2).map(|i| coord.enrol(&format!("phone-{i}"))).collect();
    let serving = Serving::start(&coord);
    let devices: Vec<Device> = enrolments
        .iter()
        .enumerate()
        .map(|(i, e)| Device::enrol(&tmp.path().join(format!("dev{i}")), &serving, e))
        .collect();
    let procs: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let data = tmp.path().join(format!("chat{i}.jsonl"));
            std::fs::write(&data, conversations(i, 40)).unwrap();
            d.run(&data, None)
        })
        .collect();
    assert!(serving.proc.wait_exit(600).success());
    eventually(60, "both devices to record the round", || {
        devices.iter().all(|d| d.status()["rounds_joined"] == 1)
    });
    for p in procs {
        p.terminate();
        assert!(p.wait_exit(30).success());
    }
    let status = coord.status();
    assert_eq!(status["latest_version"], 1, "{status}");
    assert_eq!(status["rounds"][0]["updates"], 2, "{status}");
    // Each device holds the bundle's chat template beside the Q4_1 weights it trained on.
    let unpacked = std::fs::read_dir(devices[0].dir.join("models"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("tokenizer_config.json").is_file());
    let unpacked = unpacked.expect("the device unpacked the bundle with its chat template");
    assert_eq!(
        starling_model::checkpoint::stored_quant(&unpacked).unwrap(),
        Some(QuantType::Q4_1)
    );

    // Version 1 predicts held-out assistant turns better than version 0 (loss on those turns only).
    let held_out = chat_ids(
        &conversations(5, 24),
        Path::new("held-out.jsonl"),
        &template,
        &tok,
    )
    .unwrap();
    let served = Llama::load(&coord.dir.join("base"), None, &device).unwrap();
    let cfg = LoraConfig::new(4, 8.0, 0.0, &Target::ALL[..4]).unwrap();
    let loss = |version: u64| {
        let mut ad = LoraAdapter::new(&served.config, cfg.clone(), &device, 0);
        ad.set_flat(&coord.adapter(version)).unwrap();
        eval_loss(&served, Some(&ad), &held_out, 48, 32, 4).unwrap()
    };
    let (before, after) = (loss(0), loss(1));
    eprintln!("held-out assistant-turn loss: version 0 {before:.4}, version 1 {after:.4}");
    assert!(
        after < before,
        "version 1 ({after}) is not better than version 0 ({before})"
    );
}
