//! The coordinator's QUIC endpoints: the protocol endpoint (ALPN `starling/1`, enrolled keys only) and the
//! enrolment endpoint (ALPN `starling-enrol/1`, any unrevoked key, one `Enrol` exchange per connection,
//! rate-limited per address and globally before the handshake starts).
//!
//! Each request is one bidirectional stream: one frame (plus its bulk payload for uploads), answered by one
//! frame (plus a blob for fetches). The transport negotiates the version (`Hello` first), enforces frame and
//! payload caps, verifies upload digests and hands complete, verified requests to the [`Handler`]. Any
//! protocol violation is answered with a typed error when possible and closes that connection only; the
//! endpoint keeps serving everyone else.
//! What must never live here: round logic, storage, or decisions about what a request means.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use starling_protocol::bulk::BulkHeader;
use starling_protocol::message::{
    negotiate, Decline, Enrol, EnrolFor, Enrolled, ErrorCode, ErrorReply, Forward, ManifestRequest,
    ModelFetch, RosterRequest, SecAggRequest, TaskRequest, Upload, Welcome,
};
use starling_protocol::{Fingerprint, Message, ModelVersion, ProtocolError, SigningIdentity};
use tokio::task::JoinHandle;

use crate::framed::{expect_end, read_bulk, read_message, write_bulk, write_message};
use crate::ratelimit::EnrolmentLimiter;
use crate::tls::{
    self, certificate_fingerprint, Access, Authorizer, ClientPolicy, EnrolledClientVerifier,
};
use crate::{Limits, TransportError};

/// QUIC application close code: normal end of session.
pub const CLOSE_OK: u32 = 0;
/// QUIC application close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: u32 = 1;
/// QUIC application close code: an exchange took too long.
pub const CLOSE_TIMEOUT: u32 = 2;
/// QUIC application close code: the client's key was revoked while connected.
pub const CLOSE_REVOKED: u32 = 3;
/// QUIC application close code: the coordinator is stopping; the reason says when to come back
/// (`retry_after_ms=N`, see [`retry_after_reason`]).
pub const CLOSE_RESTART: u32 = 4;

/// The close reason of [`CLOSE_RESTART`]: when devices should come back.
pub fn retry_after_reason(after: Duration) -> String {
    format!("retry_after_ms={}", after.as_millis())
}

/// The delay a [`CLOSE_RESTART`] reason names, if it names one.
pub fn parse_retry_after(reason: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(reason).ok()?;
    let ms: u64 = text.strip_prefix("retry_after_ms=")?.parse().ok()?;
    Some(Duration::from_millis(ms.min(3_600_000)))
}

/// The endpoint configuration of a coordinator, derived from its TLS key (HMACs of the key under fixed
/// labels) so that a restarted coordinator can reset the connections its previous run left open —
/// devices then notice at their next packet and reconnect, instead of waiting out the idle timeout:
/// - the stateless-reset key, so the reset tokens match those the previous run handed out;
/// - the connection-id generator's key: quinn's generator tags each id with a keyed hash and ignores
///   packets whose id it did not make, so with a random key per run the old ids would be dropped
///   silently and no reset sent.
///
/// The keys never leave the process; the labels keep them apart from every other use of the key.
fn endpoint_config(identity: &SigningIdentity, label: &str) -> quinn::EndpointConfig {
    use ring::hmac;
    let master = hmac::Key::new(hmac::HMAC_SHA256, &identity.pkcs8_der());
    let derive = |what: &str| hmac::sign(&master, format!("{label} {what}").as_bytes());
    let reset = derive("stateless reset");
    let mut cfg =
        quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive("connection ids").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// A handle on a running server's connections: closes a revoked client's live connections, counts the
/// exchanges in flight (a draining coordinator waits for them), and refuses new work while draining.
#[derive(Clone, Default)]
pub struct ServerControl {
    inner: Arc<ControlInner>,
}

#[derive(Default)]
struct ControlInner {
    connections: Mutex<std::collections::HashMap<Fingerprint, Vec<(u64, Connection)>>>,
    next_id: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ServerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerControl")
            .field("connected", &self.connected())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl ServerControl {
    /// Closes every open connection of `client` (its key was revoked); returns how many were open.
    pub fn disconnect(&self, client: &Fingerprint) -> usize {
        let conns = self
            .inner
            .connections
            .lock()
            .map(|mut m| m.remove(client).unwrap_or_default())
            .unwrap_or_default();
        for (_, c) in &conns {
            c.close(VarInt::from_u32(CLOSE_REVOKED), b"key revoked");
        }
        conns.len()
    }

    /// Clients with at least one open connection.
    pub fn connected(&self) -> usize {
        self.inner.connections.lock().map_or(0, |m| m.len())
    }

    /// Exchanges being answered right now.
    pub fn in_flight(&self) -> usize {
        self.inner
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the server is draining (no new exchanges are started).
    pub fn draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn register(&self, client: Fingerprint, conn: &Connection) -> u64 {
        let id = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut m) = self.inner.connections.lock() {
            m.entry(client).or_default().push((id, conn.clone()));
        }
        id
    }

    fn unregister(&self, client: &Fingerprint, id: u64) {
        if let Ok(mut m) = self.inner.connections.lock() {
            if let Some(v) = m.get_mut(client) {
                v.retain(|(i, _)| *i != id);
                if v.is_empty() {
                    m.remove(client);
                }
            }
        }
    }

    fn close_all(&self, code: u32, reason: &[u8]) {
        let all: Vec<Connection> = self
            .inner
            .connections
            .lock()
            .map(|m| m.values().flatten().map(|(_, c)| c.clone()).collect())
            .unwrap_or_default();
        for c in all {
            c.close(VarInt::from_u32(code), reason);
        }
    }
}

/// Counts one exchange in flight for as long as it lives.
struct InFlight(ServerControl);

impl InFlight {
    fn start(control: &ServerControl) -> Self {
        control
            .inner
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(control.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .inner
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A complete, verified request from an enrolled client.
#[derive(Debug)]
pub enum Request {
    /// The client asks for work.
    Task(TaskRequest),
    /// The client asks for a signed manifest.
    Manifest(ManifestRequest),
    /// The client asks for a blob.
    Fetch(ModelFetch),
    /// The client declines a round's task (answered with `NoTask`).
    Decline(Decline),
    /// A secure-aggregation step (answered with `SecAggReply`).
    SecAgg(Box<SecAggRequest>),
    /// The client uploads an update (digest and size already verified).
    Upload {
        /// The announced header.
        header: Box<Upload>,
        /// The encoded update.
        body: Vec<u8>,
    },
    /// An edge aggregator forwards a partial sum (digest and size already verified).
    Forward {
        /// The announced header.
        header: Box<Forward>,
        /// The sum's f32 values, little-endian.
        body: Vec<u8>,
    },
    /// An edge aggregator enrols a device (answered with `Enrolled` or an error).
    EnrolFor(EnrolFor),
    /// An edge aggregator asks for the active devices (answered with `Roster`).
    Roster(RosterRequest),
}

/// The handler's answer.
#[derive(Debug)]
pub enum Response {
    /// A single message (`Task`, `NoTask`, `Manifest`, `Ack`, `Error`).
    Message(Message),
    /// A blob, sent as a `Blob` header followed by the bytes.
    Blob(Arc<[u8]>),
}

impl Response {
    /// A typed error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Message(Message::Error(ErrorReply {
            code,
            message: message.into(),
        }))
    }
}

/// The application behind the endpoints (the coordinator; tests use small real ones).
pub trait Handler: Send + Sync + 'static {
    /// The newest published model version, announced in `Welcome`.
    fn latest_model(&self) -> ModelVersion;
    /// The largest encoded update accepted (checked before any byte of it is read).
    fn max_upload_bytes(&self) -> u64;
    /// Answers one request of an enrolled client. Uploads must be durable before an `Ack` is returned.
    fn handle(
        &self,
        client: Fingerprint,
        request: Request,
    ) -> impl Future<Output = Response> + Send;
    /// Registers `client`'s key if the token is valid and unused.
    fn enrol(
        &self,
        client: Fingerprint,
        request: Enrol,
    ) -> impl Future<Output = Result<(), ErrorReply>> + Send;
}

/// Enrolment rate limits.
#[derive(Debug, Clone, Copy)]
pub struct EnrolmentLimits {
    /// Attempts a single address may make at once.
    pub host_burst: u32,
    /// Refill per second per address.
    pub host_rate: f64,
    /// Attempts all addresses together may make at once.
    pub global_burst: u32,
    /// Global refill per second.
    pub global_rate: f64,
}

impl Default for EnrolmentLimits {
    fn default() -> Self {
        Self {
            host_burst: 5,
            host_rate: 1.0 / 60.0,
            global_burst: 100,
            global_rate: 10.0,
        }
    }
}

/// Running endpoints; dropping it stops accepting (use [`Server::shutdown`] to close cleanly).
pub struct Server {
    endpoint: Endpoint,
    enrol_endpoint: Endpoint,
    fingerprint: Fingerprint,
    control: ServerControl,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds the protocol endpoint on `addr` and the enrolment endpoint on `enrol_addr` (port 0: any) and
    /// starts serving `handler`. Must be called inside a tokio runtime.
    pub fn bind<H: Handler>(
        addr: SocketAddr,
        enrol_addr: SocketAddr,
        identity: &SigningIdentity,
        authorizer: Arc<dyn Authorizer>,
        handler: Arc<H>,
        limits: Limits,
        enrol_limits: EnrolmentLimits,
    ) -> Result<Self, TransportError> {
        let transport = Arc::new(limits.transport_config()?);
        let make = |policy, alpn| -> Result<quinn::ServerConfig, TransportError> {
            let verifier = Arc::new(EnrolledClientVerifier::new(authorizer.clone(), policy));
            let tls = tls::server_tls(identity, verifier, alpn)?;
            let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
                .map_err(|e| TransportError::Config(e.to_string()))?;
            let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
            cfg.transport_config(transport.clone());
            Ok(cfg)
        };
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let endpoint = Endpoint::new(
            endpoint_config(identity, "starling/1"),
            Some(make(ClientPolicy::EnrolledOnly, tls::ALPN)?),
            std::net::UdpSocket::bind(addr)?,
            runtime.clone(),
        )?;
        let enrol_endpoint = Endpoint::new(
            endpoint_config(identity, "starling-enrol/1"),
            Some(make(ClientPolicy::Enrolment, tls::ALPN_ENROL)?),
            std::net::UdpSocket::bind(enrol_addr)?,
            runtime,
        )?;
        let limits = Arc::new(limits);
        let control = ServerControl::default();
        let tasks = vec![
            tokio::spawn(accept_loop(
                endpoint.clone(),
                handler.clone(),
                authorizer,
                limits.clone(),
                control.clone(),
            )),
            tokio::spawn(enrol_loop(
                enrol_endpoint.clone(),
                handler,
                limits,
                enrol_limits,
            )),
        ];
        Ok(Self {
            endpoint,
            enrol_endpoint,
            fingerprint: identity.fingerprint(),
            control,
            tasks,
        })
    }

    /// The protocol endpoint's address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The enrolment endpoint's address.
    pub fn enrol_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.enrol_endpoint.local_addr()?)
    }

    /// The fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The handle on its connections (revocation, drain state).
    pub fn control(&self) -> ServerControl {
        self.control.clone()
    }

    /// Drains: accepts no new connections or exchanges, waits up to `wait` for the exchanges in flight
    /// to be answered (an upload being stored gets its ack), then closes every connection with
    /// [`CLOSE_RESTART`] telling devices to come back after `retry_after`. Returns the exchanges that were
    /// still in flight when the wait ran out (0 on a clean drain).
    pub async fn drain(self, retry_after: Duration, wait: Duration) -> usize {
        self.control
            .inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.endpoint.set_server_config(None);
        self.enrol_endpoint.set_server_config(None);
        let until = Instant::now() + wait;
        while self.control.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.control.in_flight();
        let reason = retry_after_reason(retry_after);
        self.control.close_all(CLOSE_RESTART, reason.as_bytes());
        self.close(CLOSE_RESTART, reason.as_bytes()).await;
        left
    }

    /// Closes every connection and waits until peers were told.
    pub async fn shutdown(self) {
        self.close(CLOSE_OK, b"coordinator shutting down").await;
    }

    /// Closes both endpoints with `code` and `reason`, stops accepting, and waits (up to 2 s) until
    /// peers were told.
    async fn close(self, code: u32, reason: &[u8]) {
        for ep in [&self.endpoint, &self.enrol_endpoint] {
            ep.close(VarInt::from_u32(code), reason);
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.endpoint.wait_idle().await;
            self.enrol_endpoint.wait_idle().await;
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The fingerprint of the key the peer authenticated with during the handshake.
pub fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certificate_fingerprint(certs.first()?).ok()
}

async fn accept_loop<H: Handler>(
    endpoint: Endpoint,
    handler: Arc<H>,
    authorizer: Arc<dyn Authorizer>,
    limits: Arc<Limits>,
    control: ServerControl,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (handler, authorizer, limits, control) = (
            handler.clone(),
            authorizer.clone(),
            limits.clone(),
            control.clone(),
        );
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, handler, authorizer, limits, control).await,
                Err(e) => tracing::debug!(%remote, "handshake refused: {e}"),
            }
        });
    }
}

async fn serve_connection<H: Handler>(
    conn: Connection,
    handler: Arc<H>,
    authorizer: Arc<dyn Authorizer>,
    limits: Arc<Limits>,
    control: ServerControl,
) {
    let Some(client) = peer_fingerprint(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no client certificate");
        return;
    };
    let registration = control.register(client, &conn);
    // A revocation that landed between the handshake and the registration: closed here.
    if authorizer.access(&client) != Access::Allowed {
        conn.close(VarInt::from_u32(CLOSE_REVOKED), b"key revoked");
    }
    let version = Arc::new(OnceLock::new());
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        // Revocation takes effect on live connections too, at their next request.
        if authorizer.access(&client) != Access::Allowed {
            conn.close(VarInt::from_u32(CLOSE_REVOKED), b"key revoked");
            break;
        }
        if control.draining() {
            // The drain closes this connection with the time to come back; start nothing new.
            continue;
        }
        let in_flight = InFlight::start(&control);
        let (conn, handler, limits, version) = (
            conn.clone(),
            handler.clone(),
            limits.clone(),
            version.clone(),
        );
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let ctx = Ctx {
                client,
                handler: &*handler,
                limits: &limits,
                version: &version,
            };
            let outcome =
                tokio::time::timeout(limits.exchange_timeout, ctx.exchange(&mut send, &mut recv))
                    .await;
            match outcome {
                Ok(Ok(Flow::Continue)) => {}
                Ok(Ok(Flow::Close)) => conn.close(VarInt::from_u32(CLOSE_OK), b"goodbye"),
                Ok(Err(e)) => refuse(&conn, &mut send, &e).await,
                Err(_) => {
                    let e = TransportError::Timeout(limits.exchange_timeout);
                    tracing::info!(%client, "exchange timed out");
                    conn.close(VarInt::from_u32(CLOSE_TIMEOUT), e.to_string().as_bytes());
                }
            }
        });
    }
    control.unregister(&client, registration);
}

/// Answers a protocol violation with a typed error (best effort), then closes the connection.
async fn refuse(conn: &Connection, send: &mut SendStream, e: &TransportError) {
    tracing::info!(remote = %conn.remote_address(), "closing connection: {e}");
    let code = match e {
        TransportError::Protocol(
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::PayloadTooLarge { .. }
            | ProtocolError::Overrun { .. },
        ) => ErrorCode::TooLarge,
        TransportError::Protocol(
            ProtocolError::DigestMismatch { .. } | ProtocolError::BulkDigestMismatch { .. },
        ) => ErrorCode::DigestMismatch,
        _ => ErrorCode::BadRequest,
    };
    let reply = Message::Error(ErrorReply {
        code,
        message: e.to_string(),
    });
    if write_message(send, &reply).await.is_ok() && send.finish().is_ok() {
        // Give the reply a moment to be delivered before the close discards it.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    let mut reason = e.to_string();
    reason.truncate(200);
    conn.close(VarInt::from_u32(CLOSE_PROTOCOL), reason.as_bytes());
}

enum Flow {
    Continue,
    Close,
}

struct Ctx<'a, H> {
    client: Fingerprint,
    handler: &'a H,
    limits: &'a Limits,
    version: &'a OnceLock<u16>,
}

impl<H: Handler> Ctx<'_, H> {
    async fn exchange(
        &self,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Result<Flow, TransportError> {
        let request = read_message(recv, self.limits.max_frame).await?;
        if let Message::Hello(h) = &request {
            let version = negotiate(&h.versions)?;
            expect_end(recv).await?;
            let _ = self.version.set(version);
            let welcome = Welcome {
                version,
                client_id: self.client,
                latest_model: self.handler.latest_model(),
            };
            write_message(send, &Message::Welcome(welcome)).await?;
            send.finish()?;
            return Ok(Flow::Continue);
        }
        if self.version.get().is_none() {
            return Err(ProtocolError::Unexpected {
                expected: "Hello",
                got: request.kind_name(),
            }
            .into());
        }
        let request = match request {
            Message::TaskRequest(r) => Request::Task(r),
            Message::ManifestRequest(r) => Request::Manifest(r),
            Message::ModelFetch(r) => Request::Fetch(r),
            Message::Decline(r) => Request::Decline(r),
            Message::SecAgg(r) => Request::SecAgg(r),
            Message::Upload(header) => {
                let body = read_bulk(recv, header.body, self.handler.max_upload_bytes()).await?;
                Request::Upload { header, body }
            }
            Message::Forward(header) => {
                let body = read_bulk(recv, header.body, self.handler.max_upload_bytes()).await?;
                Request::Forward { header, body }
            }
            Message::EnrolFor(r) => Request::EnrolFor(r),
            Message::RosterRequest(r) => Request::Roster(r),
            Message::Goodbye(g) => {
                tracing::debug!(client = %self.client, "goodbye: {}", g.reason);
                return Ok(Flow::Close);
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    expected: "a request",
                    got: other.kind_name(),
                }
                .into());
            }
        };
        expect_end(recv).await?;
        match self.handler.handle(self.client, request).await {
            Response::Message(m) => write_message(send, &m).await?,
            Response::Blob(bytes) => {
                write_message(send, &Message::Blob(BulkHeader::describe(&bytes))).await?;
                write_bulk(send, &bytes).await?;
            }
        }
        send.finish()?;
        Ok(Flow::Continue)
    }
}

async fn enrol_loop<H: Handler>(
    endpoint: Endpoint,
    handler: Arc<H>,
    limits: Arc<Limits>,
    enrol: EnrolmentLimits,
) {
    let limiter = Mutex::new(EnrolmentLimiter::new(
        enrol.host_burst,
        enrol.host_rate,
        enrol.global_burst,
        enrol.global_rate,
        Instant::now(),
    ));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let allowed = limiter
            .lock()
            .map(|mut l| l.allow(remote.ip(), Instant::now()))
            .unwrap_or(false);
        if !allowed {
            tracing::info!(%remote, "enrolment rate limit: refused");
            incoming.refuse();
            continue;
        }
        let (handler, limits) = (handler.clone(), limits.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Some(client) = peer_fingerprint(&conn) else {
                return;
            };
            let work = async {
                let (mut send, mut recv) = conn.accept_bi().await?;
                let result = enrol_exchange(&*handler, client, &limits, &mut send, &mut recv).await;
                Ok::<_, TransportError>((send, result))
            };
            match tokio::time::timeout(limits.exchange_timeout, work).await {
                Ok(Ok((_, Ok(())))) => {
                    // Let the reply arrive, then close: an enrolment connection serves one exchange.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    conn.close(VarInt::from_u32(CLOSE_OK), b"enrolled");
                }
                Ok(Ok((mut send, Err(e)))) => refuse(&conn, &mut send, &e).await,
                _ => conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"enrolment failed"),
            }
        });
    }
}

async fn enrol_exchange<H: Handler>(
    handler: &H,
    client: Fingerprint,
    limits: &Limits,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), TransportError> {
    let Message::Enrol(request) = read_message(recv, limits.max_frame).await? else {
        return Err(ProtocolError::Unexpected {
            expected: "Enrol",
            got: "another message",
        }
        .into());
    };
    expect_end(recv).await?;
    let reply = match handler.enrol(client, request).await {
        Ok(()) => Message::Enrolled(Enrolled { client_id: client }),
        Err(e) => Message::Error(e),
    };
    write_message(send, &reply).await?;
    send.finish()?;
    Ok(())
}
