//! A federation of real processes: `starling-coordinator init | enrol | serve` and three
//! `starling-client run` devices over QUIC on loopback, each with its own part of Hamlet (a play the shipped
//! base model never saw), run two rounds of real LoRA training on the shipped model. One device is
//! SIGKILLed mid-training and one right after persisting its update, and both are restarted: every round
//! still counts exactly three updates, the persisted update is re-sent rather than retrained, and the
//! published version's loss on the devices' held-out text is lower than version 0's.

use starling_model::{
    eval_loss, Backend, Llama, LoraAdapter, LoraConfig, QuantType, Target, Tokenizer,
};
use starling_tests::{eventually, split_hamlet, Coord, Device, Serving};

const CONFIG: &str = r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = 3
selection = { count = 3 }
min_updates = 3
round_timeout_ms = 600000
rounds = 2
retry_after_ms = 200
[task]
local_steps = 16
batch_size = 8
seq_len = 64
learning_rate = 0.004
[adapter]
rank = 4
alpha = 8.0
targets = ["q", "v"]
"#;

#[test]
fn three_devices_train_two_rounds_through_crashes_and_the_model_improves() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, held_out) = split_hamlet(tmp.path());
    let coord = Coord::init(&tmp.path().join("coord"), CONFIG);
    let enrolments: Vec<_> = (0..3)
        .map(|i| coord.enrol(&format!("device-{i}")))
        .collect();
    let serving = Serving::start(&coord);
    let devices: Vec<Device> = enrolments
        .iter()
        .enumerate()
        .map(|(i, e)| Device::enrol(&tmp.path().join(format!("dev{i}")), &serving, e))
        .collect();

    // Device 0 is killed as soon as it starts training round 1 (nothing of it was persisted, nothing left
    // the device); device 1 stops (and is killed) right after persisting its round-1 update, before
    // uploading it.
    let d1 = devices[1].run(&data[1], Some("update-persisted"));
    let d2 = devices[2].run(&data[2], None);
    let d0 = devices[0].run(&data[0], None);
    d0.wait_for("training round=1", 300);
    d0.kill();
    let killed = devices[0].status();
    assert_eq!(
        killed["pending_update_round"],
        serde_json::Value::Null,
        "{killed}"
    );
    assert_eq!(killed["rounds_joined"], 0);
    d1.wait_for("failpoint update-persisted", 300);
    d1.kill();
    let persisted = devices[1].status();
    assert_eq!(persisted["pending_update_round"], 1, "{persisted}");

    // Restarted, device 1 re-sends the persisted update (same id) without training round 1 again.
    let d1 = devices[1].run(&data[1], None);
    d1.wait_for("update acknowledged round=1", 300);
    assert!(
        !d1.printed("training round=1"),
        "the restarted device trained round 1 a second time"
    );
    let d0 = devices[0].run(&data[0], None);

    // Both rounds complete; serve exits by itself when the configured rounds are done.
    assert!(serving.proc.wait_exit(900).success());
    eventually(60, "every device to record two rounds", || {
        devices.iter().all(|d| d.status()["rounds_joined"] == 2)
    });
    for p in [d0, d1, d2] {
        p.terminate();
        assert!(
            p.wait_exit(30).success(),
            "a device exits cleanly on SIGTERM"
        );
    }

    let status = coord.status();
    assert_eq!(status["latest_version"], 2, "{status}");
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert_eq!(r["updates"], 3, "each round counts every device once: {r}");
    }
    for d in &devices {
        let s = d.status();
        assert_eq!(s["model_version"], 1, "{s}");
        assert_eq!(s["pending_update_round"], serde_json::Value::Null);
    }

    // The federated adapter fits the devices' held-out text better than version 0 does.
    let base = coord.dir.join("base");
    let device = Backend::Flex.device();
    let model = Llama::load(&base, Some(QuantType::Q8_0), &device).unwrap();
    let tok = Tokenizer::for_model_dir(&base, model.config.vocab_size).unwrap();
    let tokens = tok.encode(&held_out).unwrap();
    let cfg = LoraConfig::new(4, 8.0, 0.0, &[Target::Q, Target::V]).unwrap();
    let loss = |version: u64| {
        let mut ad = LoraAdapter::new(&model.config, cfg.clone(), &device, 0);
        ad.set_flat(&coord.adapter(version)).unwrap();
        eval_loss(&model, Some(&ad), &tokens, 64, 48, 8).unwrap()
    };
    let (before, after) = (loss(0), loss(2));
    eprintln!("held-out loss: version 0 {before:.4}, version 2 {after:.4}");
    assert!(
        after < before,
        "version 2 ({after}) is not better than version 0 ({before})"
    );
}
