//! A device's side of the wire: a QUIC endpoint presenting the device's certificate and pinning the
//! coordinator's key, sessions that run the protocol's exchanges, and reconnection with backoff and jitter.
//!
//! Connections migrate: quinn keeps a connection alive across a change of the client's address (a phone
//! moving from Wi-Fi to mobile data; [`Client::rebind`] simulates it), and a connection that is lost anyway
//! is re-established by [`Client::connect_with_retry`].
//! What must never live here: training, model storage or manifest policy (the client crate owns those).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use quinn::{Connection, Endpoint, VarInt};
use starling_protocol::message::{
    Ack, BlobKind, Decline, Enrol, EnrolFor, Forward, Goodbye, Hello, ManifestRequest, ModelFetch,
    NoTask, Roster, RosterRequest, SecAggReply, SecAggRequest, Task, TaskRequest, Upload, Welcome,
    SUPPORTED_VERSIONS,
};
use starling_protocol::{
    EnrolmentToken, Fingerprint, Message, ModelVersion, ProtocolError, SignedManifest,
    SigningIdentity,
};

use crate::framed::{read_bulk, read_message, write_bulk, write_message};
use crate::server::CLOSE_OK;
use crate::tls::{self, SERVER_NAME};
use crate::{Limits, TransportError};
use starling_protocol::backoff::Backoff;
use starling_protocol::message::ErrorCode;

/// A device's endpoint towards one coordinator.
pub struct Client {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    enrol_config: quinn::ClientConfig,
    server: SocketAddr,
    enrol_server: Option<SocketAddr>,
    limits: Limits,
    software: String,
}

/// quinn's client configuration from a rustls one, with our limits.
pub fn quic_client_config(
    tls: rustls::ClientConfig,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(limits.transport_config()?));
    Ok(cfg)
}

/// A local address of the same family as `server` (loopback for a loopback server).
fn local_for(server: SocketAddr) -> SocketAddr {
    match (server.ip().is_loopback(), server) {
        (true, SocketAddr::V4(_)) => (Ipv4Addr::LOCALHOST, 0).into(),
        (true, SocketAddr::V6(_)) => (Ipv6Addr::LOCALHOST, 0).into(),
        (false, SocketAddr::V4(_)) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (false, SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

impl Client {
    /// An endpoint for `identity` that trusts only the coordinator key `pin` at `server`.
    pub fn new(
        identity: &SigningIdentity,
        pin: Fingerprint,
        server: SocketAddr,
        limits: Limits,
    ) -> Result<Self, TransportError> {
        let config = quic_client_config(tls::client_tls(identity, pin, tls::ALPN)?, &limits)?;
        let enrol_config =
            quic_client_config(tls::client_tls(identity, pin, tls::ALPN_ENROL)?, &limits)?;
        let endpoint = Endpoint::client(local_for(server))?;
        Ok(Self {
            endpoint,
            config,
            enrol_config,
            server,
            enrol_server: None,
            limits,
            software: format!("starling-transport {}", env!("CARGO_PKG_VERSION")),
        })
    }

    /// Names the software in `Hello` (the operator's logs show it).
    pub fn with_software(mut self, software: impl Into<String>) -> Self {
        self.software = software.into();
        self
    }

    /// Where the coordinator's enrolment endpoint listens.
    pub fn with_enrolment(mut self, addr: SocketAddr) -> Self {
        self.enrol_server = Some(addr);
        self
    }

    /// Replaces the QUIC client configuration (tests use it to present no certificate or a wrong ALPN).
    pub fn with_config(mut self, config: quinn::ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// Moves the endpoint to a fresh local socket, as a network change would; live connections migrate.
    pub fn rebind(&self) -> Result<(), TransportError> {
        let socket = std::net::UdpSocket::bind(local_for(self.server))?;
        self.endpoint.rebind(socket)?;
        Ok(())
    }

    /// Registers this device's key with a one-time token; returns the client id the coordinator assigned.
    pub async fn enrol(
        &self,
        token: &EnrolmentToken,
        name: &str,
    ) -> Result<Fingerprint, TransportError> {
        let addr = self
            .enrol_server
            .ok_or_else(|| TransportError::Config("no enrolment address configured".into()))?;
        let conn = self
            .endpoint
            .connect_with(self.enrol_config.clone(), addr, SERVER_NAME)?
            .await?;
        let request = Message::Enrol(Enrol {
            token: token.as_str().to_string(),
            name: name.to_string(),
        });
        let reply = exchange(&conn, &self.limits, &request, None).await;
        conn.close(VarInt::from_u32(CLOSE_OK), b"enrolled");
        match reply?.0 {
            Message::Enrolled(e) => Ok(e.client_id),
            other => Err(unexpected("Enrolled", &other)),
        }
    }

    /// Connects and completes the mutual-TLS handshake only, without opening a session (for tools and tests
    /// that speak the protocol on raw streams).
    pub async fn handshake(&self) -> Result<Connection, TransportError> {
        Ok(self
            .endpoint
            .connect_with(self.config.clone(), self.server, SERVER_NAME)?
            .await?)
    }

    /// Connects, completes the mutual-TLS handshake and negotiates the protocol version.
    pub async fn connect(&self) -> Result<Session, TransportError> {
        let conn = self.handshake().await?;
        let hello = Message::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            software: self.software.clone(),
        });
        match exchange(&conn, &self.limits, &hello, None).await?.0 {
            Message::Welcome(welcome) => Ok(Session {
                conn,
                welcome,
                limits: self.limits.clone(),
            }),
            other => Err(unexpected("Welcome", &other)),
        }
    }

    /// [`Client::connect`], retried after `backoff`'s delays up to `max_attempts` times in all.
    /// Refusals that retrying cannot fix (a bad certificate, a refused key) end the retries at once.
    pub async fn connect_with_retry(
        &self,
        backoff: &mut Backoff,
        max_attempts: u32,
    ) -> Result<Session, TransportError> {
        loop {
            match self.connect().await {
                Ok(s) => {
                    backoff.reset();
                    return Ok(s);
                }
                Err(e) if is_permanent(&e) || backoff.attempts() + 1 >= max_attempts => {
                    return Err(e)
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::info!("connection failed ({e}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Waits until every connection of this endpoint is closed.
    pub async fn close(&self) {
        self.endpoint.close(VarInt::from_u32(CLOSE_OK), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// Whether an error is a refusal that retrying cannot fix: a TLS failure on either side (QUIC reports TLS
/// alerts as crypto errors 0x100–0x1ff), no common version, or a local configuration problem. Timeouts,
/// resets and a coordinator going away are transient.
pub fn is_permanent(e: &TransportError) -> bool {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        TransportError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
            crypto(u64::from(c.error_code))
        }
        TransportError::Connection(quinn::ConnectionError::TransportError(t)) => {
            crypto(u64::from(t.code))
        }
        TransportError::Protocol(ProtocolError::NoCommonVersion { .. })
        | TransportError::Tls(_)
        | TransportError::Certificate(_)
        | TransportError::Config(_)
        | TransportError::Connect(_) => true,
        _ => false,
    }
}

/// Whether `e` is the enrolment endpoint refusing a connection before its handshake — what it does when
/// this address (or everyone) made too many attempts: worth retrying later, not a refusal of the token.
pub fn is_rate_limited(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Connection(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    )
}

/// How long a draining coordinator asked this device to wait before reconnecting, if `e` is its close
/// ([`crate::server::CLOSE_RESTART`]).
pub fn come_back_after(e: &TransportError) -> Option<std::time::Duration> {
    match e {
        TransportError::Connection(quinn::ConnectionError::ApplicationClosed(a))
            if u64::from(a.error_code) == u64::from(crate::server::CLOSE_RESTART) =>
        {
            crate::server::parse_retry_after(&a.reason)
        }
        _ => None,
    }
}

pub use starling_protocol::Refusal;

/// QUIC carries TLS alerts as crypto errors 0x100 + alert code (RFC 9001 §4.8).
const ALERT_CERTIFICATE_REVOKED: u64 = 0x100 + 44;
const ALERT_ACCESS_DENIED: u64 = 0x100 + 49;

/// Which permanent refusal `e` is, if any: the coordinator's TLS alerts (revoked, access denied), its
/// close of a live connection whose key was revoked, its typed errors, or this side's refusal of the
/// coordinator's certificate.
pub fn refusal(e: &TransportError) -> Option<Refusal> {
    use quinn::ConnectionError as C;
    match e {
        TransportError::Connection(C::ConnectionClosed(c)) => match u64::from(c.error_code) {
            ALERT_CERTIFICATE_REVOKED => Some(Refusal::Revoked),
            ALERT_ACCESS_DENIED => Some(Refusal::NotEnrolled),
            0x100..=0x1ff => Some(Refusal::UntrustedCoordinator),
            _ => None,
        },
        TransportError::Connection(C::ApplicationClosed(a))
            if u64::from(a.error_code) == u64::from(crate::server::CLOSE_REVOKED) =>
        {
            Some(Refusal::Revoked)
        }
        // A crypto error raised on this side: our verifier refused the coordinator's certificate.
        TransportError::Connection(C::TransportError(t))
            if (0x100..0x200).contains(&u64::from(t.code)) =>
        {
            Some(Refusal::UntrustedCoordinator)
        }
        TransportError::Remote { code, .. } => match code {
            ErrorCode::Revoked => Some(Refusal::Revoked),
            ErrorCode::NotEnrolled => Some(Refusal::NotEnrolled),
            _ => None,
        },
        _ => None,
    }
}

fn unexpected(expected: &'static str, got: &Message) -> TransportError {
    if let Message::Error(e) = got {
        return TransportError::Remote {
            code: e.code,
            message: e.message.clone(),
        };
    }
    ProtocolError::Unexpected {
        expected,
        got: got.kind_name(),
    }
    .into()
}

/// One exchange on a fresh stream: request (and payload), reply; the receive stream is returned so a blob
/// that follows the reply can be read.
async fn exchange(
    conn: &Connection,
    limits: &Limits,
    request: &Message,
    payload: Option<&[u8]>,
) -> Result<(Message, quinn::RecvStream), TransportError> {
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, request).await?;
        if let Some(p) = payload {
            write_bulk(&mut send, p).await?;
        }
        send.finish()?;
        let reply = read_message(&mut recv, limits.max_frame).await?;
        Ok::<_, TransportError>((reply, recv))
    };
    tokio::time::timeout(limits.exchange_timeout, work)
        .await
        .map_err(|_| TransportError::Timeout(limits.exchange_timeout))?
}

/// What a task request returns.
#[derive(Debug)]
pub enum TaskReply {
    /// Work for a round.
    Task(Box<Task>),
    /// No work now.
    NoTask(NoTask),
}

/// An authenticated connection with a negotiated protocol version.
#[derive(Debug)]
pub struct Session {
    conn: Connection,
    welcome: Welcome,
    limits: Limits,
}

impl Session {
    /// What the coordinator said when the session opened.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The underlying QUIC connection (for its statistics and address).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Asks for work.
    pub async fn request_task(
        &self,
        held_model: Option<ModelVersion>,
    ) -> Result<TaskReply, TransportError> {
        reply::task(
            exchange(
                &self.conn,
                &self.limits,
                &Message::TaskRequest(TaskRequest { held_model }),
                None,
            )
            .await?
            .0,
        )
    }

    /// Fetches a signed manifest (`None`: the newest). Verification is the caller's (it holds the keys).
    pub async fn manifest(
        &self,
        version: Option<ModelVersion>,
    ) -> Result<SignedManifest, TransportError> {
        reply::manifest(
            exchange(
                &self.conn,
                &self.limits,
                &Message::ManifestRequest(ManifestRequest { version }),
                None,
            )
            .await?
            .0,
        )
    }

    /// Fetches a blob of at most `max` bytes; its size and digest are verified against the declared ones.
    pub async fn fetch(
        &self,
        version: ModelVersion,
        kind: BlobKind,
        max: u64,
    ) -> Result<Vec<u8>, TransportError> {
        let (answer, mut recv) = exchange(
            &self.conn,
            &self.limits,
            &Message::ModelFetch(ModelFetch { version, kind }),
            None,
        )
        .await?;
        match answer {
            Message::Blob(header) => read_bulk(&mut recv, header, max).await,
            other => Err(reply::not_a_blob(&other)),
        }
    }

    /// Uploads an encoded update; `upload.body` must describe `body`. Returns the coordinator's ack, which
    /// means the update is durable. Safe to repeat with the same update id.
    pub async fn upload(&self, upload: Upload, body: &[u8]) -> Result<Ack, TransportError> {
        reply::ack(
            exchange(
                &self.conn,
                &self.limits,
                &Message::Upload(Box::new(upload)),
                Some(body),
            )
            .await?
            .0,
        )
    }

    /// Declines a round's task (the device's policy forbids it); returns the coordinator's `NoTask`.
    pub async fn decline(&self, decline: Decline) -> Result<NoTask, TransportError> {
        reply::no_task(
            exchange(&self.conn, &self.limits, &Message::Decline(decline), None)
                .await?
                .0,
        )
    }

    /// Sends one secure-aggregation step of a round; returns the coordinator's answer.
    pub async fn secagg(&self, request: SecAggRequest) -> Result<SecAggReply, TransportError> {
        reply::secagg(
            exchange(
                &self.conn,
                &self.limits,
                &Message::SecAgg(Box::new(request)),
                None,
            )
            .await?
            .0,
        )
    }

    /// Forwards an edge aggregator's partial sum (`forward.body` must describe `body`); the ack means the
    /// root stored it. Safe to repeat with the same id.
    pub async fn forward(&self, forward: Forward, body: &[u8]) -> Result<Ack, TransportError> {
        reply::ack(
            exchange(
                &self.conn,
                &self.limits,
                &Message::Forward(Box::new(forward)),
                Some(body),
            )
            .await?
            .0,
        )
    }

    /// Enrols a device's key at the root on the device's behalf (an edge aggregator's request).
    pub async fn enrol_for(&self, request: EnrolFor) -> Result<Fingerprint, TransportError> {
        reply::enrolled(
            exchange(&self.conn, &self.limits, &Message::EnrolFor(request), None)
                .await?
                .0,
        )
    }

    /// The active devices, unless they are unchanged since `generation` (an edge aggregator's request).
    pub async fn roster(&self, generation: u64) -> Result<Roster, TransportError> {
        reply::roster(
            exchange(
                &self.conn,
                &self.limits,
                &Message::RosterRequest(RosterRequest { generation }),
                None,
            )
            .await?
            .0,
        )
    }

    /// Ends the session politely.
    pub async fn goodbye(self, reason: &str) -> Result<(), TransportError> {
        let (mut send, _recv) = self.conn.open_bi().await?;
        write_message(
            &mut send,
            &Message::Goodbye(Goodbye {
                reason: reason.to_string(),
            }),
        )
        .await?;
        send.finish()?;
        let _ = tokio::time::timeout(self.limits.exchange_timeout, self.conn.closed()).await;
        Ok(())
    }
}

/// Typed readings of a coordinator's reply message (an error reply becomes
/// [`TransportError::Remote`]), shared by a QUIC [`Session`] and by callers that get the reply another way
/// (an edge aggregator calling a root in its own process).
pub mod reply {
    use super::{unexpected, TaskReply, TransportError};
    use starling_protocol::message::{Ack, NoTask, Roster, SecAggReply};
    use starling_protocol::{Fingerprint, Message, SignedManifest};

    /// A task request's answer.
    pub fn task(m: Message) -> Result<TaskReply, TransportError> {
        match m {
            Message::Task(t) => Ok(TaskReply::Task(t)),
            Message::NoTask(n) => Ok(TaskReply::NoTask(n)),
            other => Err(unexpected("Task or NoTask", &other)),
        }
    }

    /// A manifest request's answer.
    pub fn manifest(m: Message) -> Result<SignedManifest, TransportError> {
        match m {
            Message::Manifest(m) => Ok(m),
            other => Err(unexpected("Manifest", &other)),
        }
    }

    /// An upload's or a partial sum's acknowledgement.
    pub fn ack(m: Message) -> Result<Ack, TransportError> {
        match m {
            Message::Ack(a) => Ok(a),
            other => Err(unexpected("Ack", &other)),
        }
    }

    /// A decline's answer.
    pub fn no_task(m: Message) -> Result<NoTask, TransportError> {
        match m {
            Message::NoTask(n) => Ok(n),
            other => Err(unexpected("NoTask", &other)),
        }
    }

    /// A secure-aggregation step's answer.
    pub fn secagg(m: Message) -> Result<SecAggReply, TransportError> {
        match m {
            Message::SecAggReply(r) => Ok(*r),
            other => Err(unexpected("SecAggReply", &other)),
        }
    }

    /// An enrolment's answer: the enrolled key.
    pub fn enrolled(m: Message) -> Result<Fingerprint, TransportError> {
        match m {
            Message::Enrolled(e) => Ok(e.client_id),
            other => Err(unexpected("Enrolled", &other)),
        }
    }

    /// What a fetch got instead of a blob (an error reply's error, or "unexpected").
    pub fn not_a_blob(m: &Message) -> TransportError {
        unexpected("Blob", m)
    }

    /// A roster request's answer.
    pub fn roster(m: Message) -> Result<Roster, TransportError> {
        match m {
            Message::Roster(r) => Ok(r),
            other => Err(unexpected("Roster", &other)),
        }
    }
}
