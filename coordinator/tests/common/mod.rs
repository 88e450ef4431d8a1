//! Helpers the coordinator's end-to-end tests share: the real binary, coordinator directories, a running
//! `serve` process (its bound addresses, its stderr as lines) and protocol clients that train nothing but
//! upload deterministic deltas.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use starling_protocol::bulk::BulkHeader;
use starling_protocol::message::{Task, UpdateMetrics, Upload};
use starling_protocol::update::encode_update;
use starling_protocol::{
    Fingerprint, Manifest, ManifestVerifier, ModelVersion, SigningIdentity, UpdateId,
};
use starling_transport::client::{Session, TaskReply};
use starling_transport::{Client, Limits};

/// The coordinator binary with a quiet log (STARLING_TEST_LOG=info shows more).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_starling-coordinator"));
    c.env_remove("RUST_BACKTRACE")
        .env_remove(starling_coordinator::failpoint::VAR)
        .env(
            "RUST_LOG",
            std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    c
}

/// Runs a command that prints one JSON value; fails the test on an error exit.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The embedded tiny base model.
pub fn base_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/starling-tiny")
}

/// The f32 values of little-endian adapter bytes.
pub fn values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A coordinator directory made by `init`, with its trust anchors.
pub struct Coord {
    /// The directory.
    pub dir: PathBuf,
    /// The model-signing public key.
    pub signing_key: [u8; 32],
    /// Trainable adapter values.
    pub params: usize,
}

impl Coord {
    /// `init` into `dir` with the configuration text `config`.
    pub fn init(dir: &Path, config: &str) -> Self {
        let cfg = dir.with_extension("toml");
        std::fs::write(&cfg, config).unwrap();
        let init = run_json(&[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--base-model",
            base_model().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
        let mut signing_key = [0u8; 32];
        signing_key.copy_from_slice(
            &starling_protocol::from_hex(init["signing_key"].as_str().unwrap()).unwrap(),
        );
        Self {
            dir: dir.to_path_buf(),
            signing_key,
            params: init["adapter_params"].as_u64().unwrap() as usize,
        }
    }

    /// The directory as a string argument.
    pub fn arg(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// A one-time enrolment token for a new device `name`.
    pub fn enrol(&self, name: &str) -> String {
        run_json(&["enrol", "--dir", self.arg(), "--name", name, "--json"])["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A copy of this (stopped) coordinator directory at `to`: same keys, store and version 0.
    pub fn copy_to(&self, to: &Path) -> Self {
        copy_dir(&self.dir, to);
        Self {
            dir: to.to_path_buf(),
            signing_key: self.signing_key,
            params: self.params,
        }
    }

    /// The published adapter of `version`, read from the (stopped) coordinator's store.
    pub fn adapter(&self, version: u64) -> Vec<f32> {
        let store = starling_coordinator::store::Store::open(&self.dir.join("store")).unwrap();
        values(&store.model(ModelVersion(version)).unwrap().unwrap().adapter)
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        run_json(&["status", "--dir", self.arg(), "--json"])
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A running `serve`: its addresses, and its stderr as a stream of lines. Killed (SIGKILL) when dropped.
pub struct Serving {
    child: Child,
    /// The QUIC endpoint for enrolled clients.
    pub addr: SocketAddr,
    /// The enrolment endpoint.
    pub enrol: SocketAddr,
    /// The server certificate's fingerprint.
    pub pin: Fingerprint,
    /// The status page's address.
    pub http: Option<SocketAddr>,
    stderr: Receiver<String>,
}

impl Serving {
    /// Starts `serve --dir` on `coord`, stopping at `failpoint` if one is named.
    pub fn start(coord: &Coord, failpoint: Option<&str>) -> Self {
        let mut cmd = bin();
        cmd.args(["serve", "--dir", coord.arg()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = failpoint {
            cmd.env(starling_coordinator::failpoint::VAR, p);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, stderr) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[serve] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let bound: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve printed {line:?}: {e}"));
        Self {
            child,
            addr: bound["listening"].as_str().unwrap().parse().unwrap(),
            enrol: bound["enrol"].as_str().unwrap().parse().unwrap(),
            pin: Fingerprint::from_hex(bound["fingerprint"].as_str().unwrap()).unwrap(),
            http: bound["http"].as_str().and_then(|a| a.parse().ok()),
            stderr,
        }
    }

    /// Waits (up to 60 s) for a stderr line containing `needle`.
    pub fn wait_for(&self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match self
                .stderr
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("serve never printed {needle:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("serve exited before {needle:?}"),
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for `serve` to exit by itself; true if it exited successfully.
    pub fn wait_exit(mut self) -> bool {
        self.child.wait().unwrap().success()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Device `i`'s identity (fixed, so it survives coordinator restarts).
pub fn identity(i: usize) -> SigningIdentity {
    SigningIdentity::from_seed([i as u8 + 1; 32])
}

/// A protocol client for device `i` talking to `serving`.
pub fn client(i: usize, serving: &Serving) -> Client {
    Client::new(&identity(i), serving.pin, serving.addr, Limits::default())
        .unwrap()
        .with_enrolment(serving.enrol)
}

/// Asks for a task until one is offered; returns it with its verified manifest.
pub async fn next_task(session: &Session, verifier: &mut ManifestVerifier) -> (Task, Manifest) {
    loop {
        match session
            .request_task(verifier.held().map(|h| h.0))
            .await
            .unwrap()
        {
            TaskReply::NoTask(n) => {
                tokio::time::sleep(Duration::from_millis(n.retry_after_ms)).await
            }
            TaskReply::Task(task) => {
                let m = verifier.verify(&task.manifest).unwrap();
                return (*task, m);
            }
        }
    }
}

/// Device `i`'s delta for `round`: deterministic, so runs can be compared.
pub fn delta(i: usize, round: u64, params: usize) -> Vec<f32> {
    (0..params)
        .map(|j| ((j % 13) as f32 - 6.0) * 1e-3 * (i as f32 + 1.0) * round as f32)
        .collect()
}

/// Examples device `i` claims per update (the FedAvg weights): 10, 30, 50, ...
pub fn examples(i: usize) -> u64 {
    10 + 20 * i as u64
}

/// Device `i`'s upload of `delta` for `task` (id fixed by device and round), with its encoded body.
pub fn upload_for(i: usize, task: &Task, manifest: &Manifest, delta: &[f32]) -> (Upload, Vec<u8>) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64 * 1000 + task.round.0);
    let body = encode_update(&manifest.adapter_schema, delta, task.encoding, &mut rng).unwrap();
    let upload = Upload {
        update_id: UpdateId([i as u8 * 16 + task.round.0 as u8; 16]),
        round: task.round,
        model_version: manifest.version,
        schema: manifest.adapter_schema.hash(),
        num_examples: examples(i),
        metrics: UpdateMetrics {
            train_loss: 2.0 + i as f32 + task.round.0 as f32 / 10.0,
            steps: 1,
            epsilon_spent: 0.0,
        },
        body: BulkHeader::describe(&body),
    };
    (upload, body)
}

/// Both devices, connected to `serving`, enrolling first if `tokens` are given.
pub async fn connect_both(serving: &Serving, tokens: Option<&[String; 2]>) -> Vec<Session> {
    let mut sessions = Vec::new();
    for i in 0..2 {
        let c = client(i, serving);
        if let Some(t) = tokens {
            let token = starling_protocol::EnrolmentToken::parse(&t[i]).unwrap();
            c.enrol(&token, &format!("device-{i}")).await.unwrap();
        }
        sessions.push(c.connect().await.unwrap());
    }
    sessions
}

/// `GET path` from the status server at `addr`: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// A coordinator.toml for two devices on loopback (every endpoint on port 0): rounds of both devices,
/// `rounds` of them, plus `extra` sections (a strategy, say).
pub fn config(rounds: u64, extra: &str) -> String {
    format!(
        r#"
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = 2
selection = {{ count = 2 }}
min_updates = 2
round_timeout_ms = 600000
rounds = {rounds}
retry_after_ms = 50
[adapter]
rank = 4
targets = ["q", "v"]
{extra}"#
    )
}
