//! The operator's channel into a running coordinator: a Unix socket in the coordinator directory
//! (`admin.sock`), owner-only (mode 0600) and checked again per connection against the peer's user id
//! (only the user `serve` runs as, or root, is answered). One request per connection, one line of JSON
//! each way, at most [`MAX_REQUEST`] bytes in.
//!
//! `enrol`, `revoke`, `clients`, `status`, `pause`, `resume`, `set-rounds` and `backup` reach the running
//! `serve` through it; on a stopped coordinator the same commands open the store themselves
//! ([`crate::ops`]). The status page never changes anything: this socket is the only way to.
//!
//! What must never live here: what a request does (that is the coordinator's, [`crate::service`]), or
//! anything reachable from the network.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::service::Coordinator;

/// Largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 << 10;
/// Largest reply read by the command-line side (a status document of a large fleet).
const MAX_REPLY: usize = 64 << 20;
/// Time a peer has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Round settings an operator changes on a running coordinator (unset fields keep their value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSettings {
    /// Eligible clients needed before a round starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_clients: Option<usize>,
    /// Clients a round selects: a count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_count: Option<usize>,
    /// Clients a round selects: a fraction of the eligible ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_fraction: Option<f64>,
    /// Updates needed to aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_updates: Option<usize>,
    /// Time from selection to the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_timeout_ms: Option<u64>,
    /// What unselected clients are told to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Rounds to run in all (0: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
}

impl RoundSettings {
    /// `cfg` with these changes.
    pub fn apply(&self, cfg: &crate::engine::EngineConfig) -> crate::engine::EngineConfig {
        use crate::engine::Selection;
        let mut c = cfg.clone();
        if let Some(v) = self.min_clients {
            c.min_clients = v;
        }
        if let Some(v) = self.select_count {
            c.selection = Selection::Count(v);
        }
        if let Some(v) = self.select_fraction {
            c.selection = Selection::Fraction(v);
        }
        if let Some(v) = self.min_updates {
            c.min_updates = v;
        }
        if let Some(v) = self.round_timeout_ms {
            c.round_timeout_ms = v;
        }
        if let Some(v) = self.retry_after_ms {
            c.retry_after_ms = v;
        }
        if let Some(v) = self.rounds {
            c.rounds = (v > 0).then_some(v);
        }
        c
    }

    /// Whether nothing is changed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A request on the admin socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Issue a one-time enrolment token.
    Enrol {
        /// The device's name.
        name: String,
        /// What the key will be (a device unless given).
        #[serde(default)]
        role: crate::store::ClientRole,
    },
    /// Revoke a device (name or fingerprint): its connections close at once.
    Revoke {
        /// Name or 64-hex fingerprint.
        client: String,
    },
    /// The enrolled devices.
    Clients,
    /// The status document.
    Status,
    /// Let the open round finish and start no new one.
    Pause,
    /// Start rounds again.
    Resume,
    /// Change round settings from the next round on.
    SetRounds {
        /// The changes.
        settings: RoundSettings,
    },
    /// Write a consistent backup to a file (a path on the coordinator's machine).
    Backup {
        /// Where.
        out: PathBuf,
    },
}

impl AdminRequest {
    /// The request's name, as on the wire (`enrol`, `revoke`, ...), for logs.
    pub fn op(&self) -> &'static str {
        match self {
            AdminRequest::Enrol { .. } => "enrol",
            AdminRequest::Revoke { .. } => "revoke",
            AdminRequest::Clients => "clients",
            AdminRequest::Status => "status",
            AdminRequest::Pause => "pause",
            AdminRequest::Resume => "resume",
            AdminRequest::SetRounds { .. } => "set-rounds",
            AdminRequest::Backup { .. } => "backup",
        }
    }
}

/// The answer to an [`AdminRequest`]: a JSON result, or an error for a person to read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminReply {
    /// What the request produced (null on error).
    #[serde(default)]
    pub result: serde_json::Value,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminReply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            result,
            error: None,
        }
    }

    /// A failure, worded for a person.
    pub fn failed(error: impl std::fmt::Display) -> Self {
        Self {
            result: serde_json::Value::Null,
            error: Some(error.to_string()),
        }
    }
}

/// The admin socket of coordinator directory `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// A bound admin socket; the file is removed when it is dropped.
pub struct AdminSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    /// Binds the admin socket of `dir`, owner-only. A socket file left by a killed `serve` is replaced;
    /// one that a running `serve` answers on is an error (two coordinators on one directory).
    pub async fn bind(dir: &Path) -> std::io::Result<Self> {
        let path = socket_path(dir);
        // sun_path holds 108 bytes with its terminating NUL.
        let len = path.as_os_str().len();
        if len > 107 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is {len} bytes long, over the 107 a Unix socket path may have: \
                     use a shorter coordinator directory path",
                    path.display()
                ),
            ));
        }
        if path.exists() {
            if tokio::net::UnixStream::connect(&path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another serve answers on {}", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Self { listener, path })
    }

    /// Answers requests with `coordinator` until the task is dropped.
    pub async fn serve(self, coordinator: Arc<Coordinator>) {
        use std::os::unix::fs::MetadataExt;
        // The socket file is created by this process: its owner is the user allowed to administer.
        let owner = std::fs::metadata(&self.path).map(|m| m.uid()).ok();
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            let peer = stream.peer_cred().ok().map(|c| c.uid());
            if peer.is_none() || !(peer == owner || peer == Some(0)) {
                tracing::warn!(uid = ?peer, "admin socket: refused a connection from another user");
                continue;
            }
            let c = coordinator.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, c).await {
                    tracing::info!("admin socket: {e}");
                }
            });
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: tokio::net::UnixStream, c: Arc<Coordinator>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    let reply = if line.len() > MAX_REQUEST {
        AdminReply::failed(format!("request over {MAX_REQUEST} bytes"))
    } else {
        match serde_json::from_slice::<AdminRequest>(&line) {
            Ok(request) => {
                tracing::info!(op = request.op(), "admin request");
                tokio::task::spawn_blocking(move || c.admin(request))
                    .await
                    .unwrap_or_else(|e| AdminReply::failed(format!("the request failed: {e}")))
            }
            Err(e) => AdminReply::failed(format!("malformed request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends `request` to the `serve` running on `dir`; `Ok(None)` when none answers there (no socket, or a
/// stale one a killed `serve` left).
pub fn call(dir: &Path, request: &AdminRequest) -> anyhow::Result<Option<AdminReply>> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let path = socket_path(dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(anyhow::anyhow!("connecting to {}: {e}", path.display())),
    };
    // Backups of a large store take a while; nothing else does.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = Vec::new();
    std::io::BufReader::new(stream)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut reply)?;
    if reply.is_empty() {
        anyhow::bail!(
            "the running serve closed {} without answering (is it running as another user?)",
            path.display()
        );
    }
    Ok(Some(serde_json::from_slice(&reply).map_err(|e| {
        anyhow::anyhow!("the running serve's answer is malformed: {e}")
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_documented_json() {
        let r: AdminRequest = serde_json::from_str(r#"{"op":"enrol","name":"pi-7"}"#).unwrap();
        assert_eq!(
            r,
            AdminRequest::Enrol {
                name: "pi-7".into(),
                role: crate::store::ClientRole::Device,
            }
        );
        let r: AdminRequest =
            serde_json::from_str(r#"{"op":"set-rounds","settings":{"min_updates":3}}"#).unwrap();
        assert!(
            matches!(r, AdminRequest::SetRounds { settings } if settings.min_updates == Some(3))
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"op":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<AdminRequest>(
            r#"{"op":"set-rounds","settings":{"min_update":3}}"#
        )
        .is_err());
    }

    #[test]
    fn round_settings_change_only_what_they_name() {
        let base = crate::engine::EngineConfig::default();
        let s = RoundSettings {
            select_count: Some(4),
            rounds: Some(0),
            ..Default::default()
        };
        let c = s.apply(&base);
        assert_eq!(c.selection, crate::engine::Selection::Count(4));
        assert_eq!(c.rounds, None);
        assert_eq!(c.min_updates, base.min_updates);
        assert!(RoundSettings::default().is_empty());
    }
}
