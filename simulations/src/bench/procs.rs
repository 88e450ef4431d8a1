//! The real processes the device benchmark runs: `starling-coordinator` (init, enrol, serve) and
//! `starling-client` (enrol, run), found beside the running `starling-bench`, each failure a typed error
//! with what the process printed. What must never live here: product code (the binaries are the product)
//! or test assertions (the test harness, `starling-tests`, is for tests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// What went wrong running a benchmark's process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The binary is not built beside `starling-bench`.
    #[error("{name} is not built in {dir}: `cargo build --release -p starling-client -p starling-coordinator` first")]
    NotBuilt {
        /// The binary.
        name: String,
        /// Where it was looked for.
        dir: String,
    },
    /// The process could not be started or waited for.
    #[error("{what}: {source}")]
    Spawn {
        /// The command.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command failed.
    #[error("{what} failed: {stderr}")]
    Failed {
        /// The command.
        what: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The command's output is not what it documents.
    #[error("{what} printed {printed:?}: {detail}")]
    Output {
        /// The command.
        what: String,
        /// What it printed.
        printed: String,
        /// Why it does not parse.
        detail: String,
    },
    /// A configuration file could not be read or written.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
}

/// The folder `starling-bench` runs from (`target/release`), where the other binaries are built.
fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// The path of workspace binary `name` beside `starling-bench`.
pub fn binary(name: &str) -> Result<PathBuf, ProcError> {
    let dir = bin_dir();
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ProcError::NotBuilt {
            name: name.into(),
            dir: dir.display().to_string(),
        })
    }
}

fn command(name: &str) -> Result<Command, ProcError> {
    let mut c = Command::new(binary(name)?);
    c.env_remove("STARLING_FAILPOINT").env("RUST_LOG", "info");
    Ok(c)
}

/// Runs `name args` to completion; its stdout, or an error with its stderr.
fn output(name: &str, args: &[&str]) -> Result<String, ProcError> {
    let what = format!("{name} {}", args.first().copied().unwrap_or_default());
    let out = command(name)?
        .args(args)
        .output()
        .map_err(|source| ProcError::Spawn {
            what: what.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProcError::Failed {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `name args`, which prints one JSON value.
fn json(name: &str, args: &[&str]) -> Result<serde_json::Value, ProcError> {
    let printed = output(name, args)?;
    serde_json::from_str(&printed).map_err(|e| ProcError::Output {
        what: format!("{name} {}", args.first().copied().unwrap_or_default()),
        printed,
        detail: e.to_string(),
    })
}

/// Replaces `from` with `to` in the text file `path` (`from` must occur).
pub fn edit(path: &Path, from: &str, to: &str) -> Result<(), ProcError> {
    let file = |detail: String| ProcError::File {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    if !text.contains(from) {
        return Err(file(format!("holds no {from:?}")));
    }
    std::fs::write(path, text.replace(from, to)).map_err(|e| file(e.to_string()))
}

/// What `enrol --json` hands an operator for one device.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// The device's name.
    pub name: String,
    /// The one-time token.
    pub token: String,
    /// The coordinator's TLS key fingerprint.
    pub pin: String,
    /// The model-signing public key.
    pub signing_key: String,
}

/// A coordinator directory made by `init`.
#[derive(Debug)]
pub struct Coordinator {
    dir: PathBuf,
}

impl Coordinator {
    /// `init` of `dir` with the base model in `base` and the configuration text `config`.
    pub fn init(dir: &Path, config: &str, base: &Path) -> Result<Self, ProcError> {
        let cfg = dir.with_extension("toml");
        std::fs::write(&cfg, config).map_err(|e| ProcError::File {
            path: cfg.display().to_string(),
            detail: e.to_string(),
        })?;
        let arg = |p: &Path| p.display().to_string();
        json(
            "starling-coordinator",
            &[
                "init",
                "--dir",
                &arg(dir),
                "--base-model",
                &arg(base),
                "--config",
                &arg(&cfg),
            ],
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// `enrol --json` of a device named `name`.
    pub fn enrol(&self, name: &str) -> Result<Enrolment, ProcError> {
        let dir = self.dir.display().to_string();
        let v = json(
            "starling-coordinator",
            &["enrol", "--dir", &dir, "--name", name, "--json"],
        )?;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Ok(Enrolment {
            name: name.into(),
            token: s("token"),
            pin: s("fingerprint"),
            signing_key: s("signing_key"),
        })
    }

    /// Starts `serve`; returns once it printed where it listens.
    pub fn serve(&self) -> Result<Serving, ProcError> {
        let mut cmd = command("starling-coordinator")?;
        cmd.args(["serve", "--dir", &self.dir.display().to_string()]);
        let (proc, first) = Proc::spawn(cmd, "serve", true)?;
        let printed = first.unwrap_or_default();
        let bound: serde_json::Value =
            serde_json::from_str(&printed).map_err(|e| ProcError::Output {
                what: "starling-coordinator serve".into(),
                printed: printed.clone(),
                detail: e.to_string(),
            })?;
        let s = |k: &str| bound[k].as_str().unwrap_or_default().to_string();
        Ok(Serving {
            proc,
            addr: s("listening"),
            enrol: s("enrol"),
        })
    }
}

/// A running `starling-coordinator serve`.
#[derive(Debug)]
pub struct Serving {
    /// The process.
    pub proc: Proc,
    /// Its QUIC endpoint.
    pub addr: String,
    /// Its enrolment endpoint.
    pub enrol: String,
}

/// A device's state directory, enrolled.
#[derive(Debug)]
pub struct Device {
    dir: PathBuf,
    name: String,
}

impl Device {
    /// `starling-client enrol` of `dir` against `serving` with `e`.
    pub fn enrol(dir: &Path, serving: &Serving, e: &Enrolment) -> Result<Self, ProcError> {
        output(
            "starling-client",
            &[
                "enrol",
                "--dir",
                &dir.display().to_string(),
                "--coordinator",
                &serving.addr,
                "--enrol-address",
                &serving.enrol,
                "--token",
                &e.token,
                "--pin",
                &e.pin,
                "--signing-key",
                &e.signing_key,
                "--name",
                &e.name,
            ],
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: e.name.clone(),
        })
    }

    /// Rewrites one line of this device's `client.toml`.
    pub fn edit_config(&self, from: &str, to: &str) -> Result<(), ProcError> {
        edit(&self.dir.join("client.toml"), from, to)
    }

    /// Starts `starling-client run` on the text in `data`.
    pub fn run(&self, data: &Path) -> Result<Proc, ProcError> {
        let mut cmd = command("starling-client")?;
        cmd.args([
            "run",
            "--dir",
            &self.dir.display().to_string(),
            "--data",
            &data.display().to_string(),
            "--retry-ms",
            "300",
        ]);
        Ok(Proc::spawn(cmd, &self.name, false)?.0)
    }
}

/// A running process whose stderr lines are kept (and echoed, tagged); killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd`; with `first_line`, waits for the first line it prints on stdout and returns it.
    fn spawn(
        mut cmd: Command,
        tag: &str,
        first_line: bool,
    ) -> Result<(Self, Option<String>), ProcError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| ProcError::Spawn {
            what: tag.into(),
            source,
        })?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let (seen, tag) = (seen.clone(), tag.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{tag}] {line}");
                    if let Ok(mut s) = seen.lock() {
                        s.push(line);
                    }
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
        Ok((Self { child, seen }, first))
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

    /// Sends SIGTERM (a clean shutdown), then waits up to `secs` for the exit; SIGKILL after that.
    pub fn stop(mut self, secs: u64) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
