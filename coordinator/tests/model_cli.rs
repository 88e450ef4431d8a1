//! The operator's model commands as a user runs them: a real `starling-coordinator` process.

use std::path::Path;
use std::process::Command;

use starling_model::io::TensorFile;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_starling-coordinator"))
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/model/fixtures")
        .join(name)
}

#[test]
fn import_inspect_and_logits_match_transformers() {
    let out = tempfile::tempdir().unwrap();
    let q8 = out.path().join("q8");
    let st = bin()
        .args(["model", "import"])
        .arg(fixture("gqa3_tied_f32"))
        .arg("--out")
        .arg(&q8)
        .args(["--quant", "q8_0"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let inspect = bin()
        .args(["model", "inspect"])
        .arg(&q8)
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["storage"], "q8_0");
    assert_eq!(v["config"]["num_key_value_heads"], 2);

    // f32 logits of the HF checkpoint printed by the CLI equal transformers' within 1e-4.
    let exp = TensorFile::open(&fixture("gqa3_tied_f32").join("expected.safetensors")).unwrap();
    let (_, ids) = exp.i64("input_ids").unwrap();
    let shape = exp.shape("logits").unwrap().to_vec();
    let want = exp.f32("logits", &shape).unwrap();
    let seq = shape[1];
    let ids_arg = ids[..seq]
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let o = bin()
        .args(["model", "logits"])
        .arg(fixture("gqa3_tied_f32"))
        .args(["--ids", &ids_arg, "--all", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<f32> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let d = got
        .iter()
        .zip(&want[..got.len()])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gqa_untied_f32").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let full = std::fs::read(fixture("gqa_untied_f32").join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &full[..full.len() / 3],
    )
    .unwrap();
    let o = bin()
        .args(["model", "inspect"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("model.safetensors") && !err.contains("panicked"),
        "{err}"
    );
    // Out-of-vocabulary ids, also one that carries the training data's NO_LOSS bit (2^31 + 1).
    for ids in ["1,99999", "1,2147483649"] {
        let o = bin()
            .args(["model", "logits"])
            .arg(fixture("gqa_untied_f32"))
            .args(["--ids", ids])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && err.contains("outside the vocabulary")
                && !err.contains("panicked"),
            "{ids}: {err}"
        );
    }
}

fn logits(model: &Path, ids: &str) -> Vec<f64> {
    let o = bin()
        .args(["model", "logits"])
        .arg(model)
        .args(["--ids", ids, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| match r.as_array() {
            Some(row) => row.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>(),
            None => vec![r.as_f64().unwrap()],
        })
        .collect()
}

#[test]
fn gguf_export_then_import_keeps_the_blocks_and_the_logits() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/starling-tiny");
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("q8");
    let run = |args: &[&std::ffi::OsStr]| {
        let o = bin().args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let os = |s: &str| std::ffi::OsStr::new(s).to_owned();
    run(&[
        &os("model"),
        &os("import"),
        tiny.as_os_str(),
        &os("--out"),
        q8.as_os_str(),
        &os("--quant"),
        &os("q8_0"),
    ]);
    let gguf = dir.path().join("tiny-q8.gguf");
    run(&[
        &os("model"),
        &os("export"),
        q8.as_os_str(),
        &os("--gguf"),
        gguf.as_os_str(),
    ]);
    let back = dir.path().join("back");
    run(&[
        &os("model"),
        &os("import"),
        gguf.as_os_str(),
        &os("--out"),
        back.as_os_str(),
        &os("--quant"),
        &os("q8_0"),
    ]);
    // The Q8_0 blocks crossed GGUF untouched: the containers are the same bytes, the logits equal.
    assert_eq!(
        std::fs::read(q8.join("model.safetensors")).unwrap(),
        std::fs::read(back.join("model.safetensors")).unwrap()
    );
    assert_eq!(
        logits(&q8, "72,101,108,108,111"),
        logits(&back, "72,101,108,108,111")
    );
    // A truncated GGUF is one clear error.
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = bin()
        .args(["model", "import"])
        .arg(&cut)
        .arg("--out")
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("invalid GGUF") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dir.path().join("never").exists());
}
