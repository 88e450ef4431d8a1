//! starling-tests: end-to-end tests that span crates and processes (in `tests/`); this library holds what
//! they share — the real `starling-coordinator` and `starling-client` binaries, coordinator directories, a
//! running `serve`, running devices, and reading published versions. What must never live here: product
//! code or fakes of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starling_protocol::ModelVersion;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A workspace binary built beside the running program: next to it (a benchmark in `target/release`) or one
/// folder up (a test in `target/debug/deps`; `cargo test --workspace` builds both binaries, since their
/// packages have integration tests). `STARLING_BIN_DIR` names the folder instead.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let candidates: Vec<PathBuf> = match std::env::var_os("STARLING_BIN_DIR") {
        Some(d) => vec![PathBuf::from(d)],
        None => exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(Path::to_path_buf)
            .collect(),
    };
    let path = candidates
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built beside {}: run `cargo build -p starling-client -p \
                 starling-coordinator` (with --release for benchmarks) first",
                exe.display()
            )
        });
    // `cargo test -p starling-tests` alone does not rebuild other packages' binaries: refuse a stale one
    // rather than test old code.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if let (Some(built), Some((newest, file))) = (built, newest_source(name)) {
        assert!(
            built >= newest,
            "{} is older than {}: rebuild it (`cargo build -p starling-client -p starling-coordinator`, \
             or run the whole `cargo test --workspace`)",
            path.display(),
            file.display()
        );
    }
    path
}

/// The most recently modified Rust source of the crates binary `name` is built from.
fn newest_source(name: &str) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, best);
            } else if p.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        *best = Some((t, p));
                    }
                }
            }
        }
    }
    let own = if name == "starling-client" {
        "client"
    } else {
        "coordinator"
    };
    let mut best = None;
    for krate in [
        own,
        "shared/model",
        "shared/privacy",
        "shared/protocol",
        "shared/transport",
        "shared/cli",
    ] {
        walk(&root().join(krate).join("src"), &mut best);
    }
    best
}

fn command(name: &str) -> Command {
    let mut c = Command::new(binary(name));
    c.env_remove("RUST_BACKTRACE")
        .env_remove("STARLING_FAILPOINT")
        .env(
            "RUST_LOG",
            std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
    c
}

/// `starling-coordinator ARGS`, which must succeed and print one JSON value.
pub fn coordinator_json(args: &[&str]) -> serde_json::Value {
    let out = command("starling-coordinator")
        .args(args)
        .output()
        .expect("running starling-coordinator");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value")
}

/// `starling-client ARGS`: (exit status, stdout, stderr).
pub fn client_cmd(args: &[&str]) -> (ExitStatus, String, String) {
    let out = command("starling-client")
        .args(args)
        .output()
        .expect("running starling-client");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A coordinator directory made by `init`.
pub struct Coord {
    /// The directory.
    pub dir: PathBuf,
}

impl Coord {
    /// `init` with the shipped base model and `config`.
    pub fn init(dir: &Path, config: &str) -> Self {
        Self::init_with_base(dir, config, &root().join("assets/models/starling-tiny"))
    }

    /// `init` with the base model in `base` and `config`.
    pub fn init_with_base(dir: &Path, config: &str, base: &Path) -> Self {
        let cfg = dir.with_extension("toml");
        std::fs::write(&cfg, config).expect("writing the configuration");
        coordinator_json(&[
            "init",
            "--dir",
            dir.to_str().unwrap_or_default(),
            "--base-model",
            base.to_str().unwrap_or_default(),
            "--config",
            cfg.to_str().unwrap_or_default(),
        ]);
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory as an argument.
    pub fn arg(&self) -> &str {
        self.dir.to_str().unwrap_or_default()
    }

    /// `enrol --json` (through the running `serve`'s admin socket, or in the store of a stopped one): token,
    /// pin and signing key.
    pub fn enrol(&self, name: &str) -> Enrolment {
        self.enrol_as(name, "device")
    }

    /// `enrol --role aggregator --json`: a one-time token for an edge aggregator.
    pub fn enrol_aggregator(&self, name: &str) -> Enrolment {
        self.enrol_as(name, "aggregator")
    }

    fn enrol_as(&self, name: &str, role: &str) -> Enrolment {
        let v = coordinator_json(&[
            "enrol",
            "--dir",
            self.arg(),
            "--name",
            name,
            "--role",
            role,
            "--json",
        ]);
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Enrolment {
            name: name.into(),
            token: s("token"),
            pin: s("fingerprint"),
            signing_key: s("signing_key"),
        }
    }

    /// `status --json` (from the store, or live from the running `serve`).
    pub fn status(&self) -> serde_json::Value {
        coordinator_json(&["status", "--dir", self.arg(), "--json"])
    }

    /// Makes the next `serve` listen where `serving` did (devices keep the address they enrolled with).
    pub fn keep_address(&self, serving: &Serving) {
        self.edit_config(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{}\"", serving.addr),
        );
    }

    /// Rewrites one line of `coordinator.toml` (`from` must occur).
    pub fn edit_config(&self, from: &str, to: &str) {
        edit(&self.dir.join("coordinator.toml"), from, to);
    }

    /// The published adapter of `version` as f32 values (the coordinator must be stopped).
    pub fn adapter(&self, version: u64) -> Vec<f32> {
        let store = starling_coordinator::store::Store::open(&self.dir.join("store"))
            .expect("opening the store");
        let model = store
            .model(ModelVersion(version))
            .expect("reading the store")
            .unwrap_or_else(|| panic!("no version {version}"));
        starling_protocol::update::adapter_values(&model.adapter)
            .expect("the stored adapter decodes")
    }
}

/// Replaces `from` with `to` in a text file; `from` must occur.
pub fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("reading a file to edit");
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).expect("writing an edited file");
}

/// What a device needs to enrol.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// Device name.
    pub name: String,
    /// One-time token.
    pub token: String,
    /// Coordinator fingerprint to pin.
    pub pin: String,
    /// Model-signing key to trust.
    pub signing_key: String,
}

/// A child process whose stderr is echoed (prefixed) and kept as lines to wait on. Killed when dropped.
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd`; with `first_line`, waits for the first line it prints on stdout and returns it.
    fn spawn(mut cmd: Command, tag: String, first_line: bool) -> (Self, Option<String>) {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning a process");
        let (tx, lines) = std::sync::mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let seen = seen.clone();
            let tag = tag.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{tag}] {line}");
                    if let Ok(mut s) = seen.lock() {
                        s.push(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        let mut first = None;
        if let Some(out) = child.stdout.take() {
            let mut reader = BufReader::new(out);
            if first_line {
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() && !line.is_empty() {
                    first = Some(line);
                }
            }
            std::thread::spawn(move || for _ in reader.lines() {});
        }
        (Self { child, lines, seen }, first)
    }

    /// Waits (up to `secs`) for a stderr line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, secs: u64) -> String {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            match self
                .lines
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no line with {needle:?} in {secs} s"),
                Err(RecvTimeoutError::Disconnected) => panic!("exited before printing {needle:?}"),
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether any stderr line so far contains `needle`.
    pub fn printed(&self, needle: &str) -> bool {
        self.seen
            .lock()
            .map(|s| s.iter().any(|l| l.contains(needle)))
            .unwrap_or(false)
    }

    /// Whether the process has exited by itself.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL, then reap, keeping the handle (its lines stay readable).
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a device's clean shutdown).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits (up to `secs`) for the process to exit by itself.
    pub fn wait_exit(mut self, secs: u64) -> ExitStatus {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < until, "still running after {secs} s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `serve`.
pub struct Serving {
    /// The process.
    pub proc: Proc,
    /// Its QUIC endpoint.
    pub addr: String,
    /// Its enrolment endpoint.
    pub enrol: String,
}

impl Serving {
    /// Starts `serve --dir`.
    pub fn start(coord: &Coord) -> Self {
        Self::start_with(coord, None)
    }

    /// Starts `serve --dir` with `failpoint` armed if given.
    pub fn start_with(coord: &Coord, failpoint: Option<&str>) -> Self {
        let mut cmd = command("starling-coordinator");
        cmd.args(["serve", "--dir", coord.arg()]);
        if let Some(p) = failpoint {
            cmd.env("STARLING_FAILPOINT", p);
        }
        let (proc, first) = Proc::spawn(cmd, "serve".into(), true);
        let line = first.unwrap_or_default();
        let bound: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve printed {line:?}: {e}"));
        let s = |k: &str| bound[k].as_str().unwrap_or_default().to_string();
        Self {
            proc,
            addr: s("listening"),
            enrol: s("enrol"),
        }
    }
}

/// An edge aggregator's directory (made by `aggregator init`).
pub struct Edge {
    /// The directory.
    pub dir: PathBuf,
    /// Its name.
    pub name: String,
}

/// A running `aggregator serve`.
pub struct EdgeServing {
    /// The process.
    pub proc: Proc,
    /// The endpoint where its devices connect, enrol, and the fingerprint they pin.
    pub at: Endpoint,
    /// Its HTTP endpoint (probes, metrics, status), if it serves one.
    pub http: Option<String>,
}

/// `GET path` on a local HTTP endpoint: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the HTTP endpoint");
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending a request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reading the reply");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// Where devices reach a coordinator or an aggregator, and the key they pin there.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// QUIC endpoint.
    pub addr: String,
    /// Enrolment endpoint.
    pub enrol: String,
    /// TLS fingerprint (hex).
    pub fingerprint: String,
}

impl Edge {
    /// `aggregator init` in `dir` against the running root `serving` with the aggregator token `e`,
    /// listening on loopback ports the system picks.
    pub fn init(dir: &Path, serving: &Serving, e: &Enrolment) -> Self {
        coordinator_json(&[
            "aggregator",
            "init",
            "--dir",
            dir.to_str().unwrap_or_default(),
            "--root",
            &serving.addr,
            "--root-enrol",
            &serving.enrol,
            "--pin",
            &e.pin,
            "--signing-key",
            &e.signing_key,
            "--token",
            &e.token,
            "--name",
            &e.name,
            "--listen",
            "127.0.0.1:0",
            "--enrol-listen",
            "127.0.0.1:0",
        ]);
        let edge = Self {
            dir: dir.to_path_buf(),
            name: e.name.clone(),
        };
        edge.edit_config(
            "http_listen = \"0.0.0.0:7502\"",
            "http_listen = \"127.0.0.1:0\"",
        );
        edge
    }

    /// Rewrites one line of `aggregator.toml` (`from` must occur).
    pub fn edit_config(&self, from: &str, to: &str) {
        edit(&self.dir.join("aggregator.toml"), from, to);
    }

    /// Makes the next `aggregator serve` listen where `serving` did (devices keep their address).
    pub fn keep_address(&self, serving: &EdgeServing) {
        self.edit_config(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{}\"", serving.at.addr),
        );
        self.edit_config(
            "enrol_listen = \"127.0.0.1:0\"",
            &format!("enrol_listen = \"{}\"", serving.at.enrol),
        );
    }

    /// Starts `aggregator serve --dir`.
    pub fn start(&self) -> EdgeServing {
        self.start_with(None)
    }

    /// Starts `aggregator serve --dir` with `failpoint` armed if given.
    pub fn start_with(&self, failpoint: Option<&str>) -> EdgeServing {
        let mut cmd = command("starling-coordinator");
        cmd.args([
            "aggregator",
            "serve",
            "--dir",
            self.dir.to_str().unwrap_or_default(),
        ]);
        if let Some(p) = failpoint {
            cmd.env("STARLING_FAILPOINT", p);
        }
        let (proc, first) = Proc::spawn(cmd, self.name.clone(), true);
        let line = first.unwrap_or_default();
        let bound: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("aggregator serve printed {line:?}: {e}"));
        let s = |k: &str| bound[k].as_str().unwrap_or_default().to_string();
        EdgeServing {
            proc,
            http: bound["http"].as_str().map(str::to_string),
            at: Endpoint {
                addr: s("listening"),
                enrol: s("enrol"),
                fingerprint: s("fingerprint"),
            },
        }
    }
}

/// A device's state directory.
pub struct Device {
    /// The directory.
    pub dir: PathBuf,
    /// Its name.
    pub name: String,
}

impl Device {
    /// `starling-client enrol` against `serving` with `e`; panics on failure.
    pub fn enrol(dir: &Path, serving: &Serving, e: &Enrolment) -> Self {
        let at = Endpoint {
            addr: serving.addr.clone(),
            enrol: serving.enrol.clone(),
            fingerprint: e.pin.clone(),
        };
        Self::enrol_at(dir, &at, e)
    }

    /// `starling-client enrol` at `at` (a coordinator or an edge aggregator, pinning its key) with the
    /// token and signing key of `e`; panics on failure.
    pub fn enrol_at(dir: &Path, at: &Endpoint, e: &Enrolment) -> Self {
        let (status, out, err) = client_cmd(&[
            "enrol",
            "--dir",
            dir.to_str().unwrap_or_default(),
            "--coordinator",
            &at.addr,
            "--enrol-address",
            &at.enrol,
            "--token",
            &e.token,
            "--pin",
            &at.fingerprint,
            "--signing-key",
            &e.signing_key,
            "--name",
            &e.name,
        ]);
        assert!(status.success(), "enrol {}: {out}{err}", e.name);
        let d = Self {
            dir: dir.to_path_buf(),
            name: e.name.clone(),
        };
        // Tests reconnect quickly after a coordinator restart.
        d.edit_config("backoff_max_ms = 60000", "backoff_max_ms = 1000");
        d.edit_config("connect_timeout_s = 10", "connect_timeout_s = 2");
        d
    }

    /// Rewrites one line of this device's `client.toml`.
    pub fn edit_config(&self, from: &str, to: &str) {
        edit(&self.dir.join("client.toml"), from, to);
    }

    /// Starts `starling-client run` on `data`, with `failpoint` armed if given.
    pub fn run(&self, data: &Path, failpoint: Option<&str>) -> Proc {
        self.run_with(data, failpoint, &[])
    }

    /// [`Device::run`] with more arguments (`--training-seed N`).
    pub fn run_with(&self, data: &Path, failpoint: Option<&str>, extra: &[&str]) -> Proc {
        let mut cmd = command("starling-client");
        cmd.args([
            "run",
            "--dir",
            self.dir.to_str().unwrap_or_default(),
            "--data",
            data.to_str().unwrap_or_default(),
            "--retry-ms",
            "300",
        ]);
        cmd.args(extra);
        if let Some(p) = failpoint {
            cmd.env("STARLING_FAILPOINT", p);
        }
        Proc::spawn(cmd, self.name.clone(), false).0
    }

    /// `starling-client status --json`.
    pub fn status(&self) -> serde_json::Value {
        let (status, out, err) = client_cmd(&[
            "status",
            "--dir",
            self.dir.to_str().unwrap_or_default(),
            "--json",
        ]);
        assert!(status.success(), "status: {err}");
        serde_json::from_str(&out).expect("status JSON")
    }
}

/// Hamlet in `n` consecutive parts, one folder each (a device's text).
pub fn split_play(dir: &Path, n: usize) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(root().join("assets/shakespeare/hamlet.txt"))
        .expect("the shipped Hamlet text");
    let lines: Vec<&str> = text.lines().collect();
    let part = lines.len() / n;
    (0..n)
        .map(|i| {
            let d = dir.join(format!("data{i}"));
            std::fs::create_dir_all(&d).expect("creating a data folder");
            std::fs::write(
                d.join("text.txt"),
                lines[i * part..(i + 1) * part].join("\n"),
            )
            .expect("writing device text");
            d
        })
        .collect()
}

/// Hamlet (a play the shipped base model never saw) split in three consecutive parts; each part's first
/// 80 % is a device's text (a folder with one file), the rest goes to the returned held-out text.
pub fn split_hamlet(dir: &Path) -> (Vec<PathBuf>, String) {
    let text = std::fs::read_to_string(root().join("assets/shakespeare/hamlet.txt"))
        .expect("the shipped Hamlet text");
    let lines: Vec<&str> = text.lines().collect();
    let part = lines.len() / 3;
    let mut files = Vec::new();
    let mut held_out = String::new();
    for i in 0..3 {
        let chunk = &lines[i * part..(i + 1) * part];
        let cut = chunk.len() * 4 / 5;
        let d = dir.join(format!("data{i}"));
        std::fs::create_dir_all(&d).expect("creating a data folder");
        std::fs::write(d.join("text.txt"), chunk[..cut].join("\n")).expect("writing device text");
        held_out.push_str(&chunk[cut..].join("\n"));
        held_out.push('\n');
        files.push(d);
    }
    (files, held_out)
}

/// Polls `f` every 100 ms for up to `secs` seconds until it returns true.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < until,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
