//! starling-transport: Starling's protocol over QUIC (quinn) with mutual TLS 1.3 (rustls, ring).
//!
//! - [`tls`]: certificates from our Ed25519 identities, the enrolled-key and pinned-key verifiers;
//! - [`framed`]: one [`Message`](starling_protocol::Message) per frame and bulk payloads on QUIC streams;
//! - [`server`]: the coordinator's endpoints (protocol and enrolment) driving an application [`server::Handler`];
//! - [`client`]: a device's connection, session exchanges and reconnection with backoff and jitter;
//! - [`ratelimit`]: the sans-IO enrolment rate limit with an explicit `now` ([`backoff`], the retry
//!   policy, is the protocol crate's).
//!
//! What must never live here: round logic, storage or training. The transport moves verified messages and
//! bytes between a peer and a handler; the coordinator and client crates decide what they mean.

/// The reconnection policy (it lives in the protocol crate, which the device session also uses).
pub use starling_protocol::backoff;
pub mod client;
pub mod framed;
pub mod ratelimit;
pub mod server;
pub mod tls;

use std::time::Duration;

pub use client::{Client, Session};
pub use server::{Handler, Request, Response, Server};
pub use tls::{Access, Authorizer};

use starling_protocol::message::ErrorCode;
use starling_protocol::ProtocolError;

/// Everything that can fail while moving Starling messages over QUIC.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer sent bytes that break the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The peer answered with a typed error.
    #[error("peer refused ({code}): {message}")]
    Remote {
        /// The peer's error code.
        code: ErrorCode,
        /// The peer's explanation.
        message: String,
    },
    /// A certificate could not be made or parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (handshake refusals arrive here).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed (connection losses are reported as [`TransportError::Connection`]).
    #[error("write: {0}")]
    Write(quinn::WriteError),
    /// Reading from a stream failed (connection losses are reported as [`TransportError::Connection`]).
    #[error("read: {0}")]
    Read(quinn::ReadError),
    /// The stream was already closed.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// A socket could not be bound.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// An exchange did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A transport setting is out of range.
    #[error("invalid transport setting: {0}")]
    Config(String),
}

impl From<rcgen::Error> for TransportError {
    fn from(e: rcgen::Error) -> Self {
        TransportError::Certificate(e.to_string())
    }
}

// A connection lost mid-exchange is reported as the connection's error, whatever stream noticed it: in
// TLS 1.3 the client finishes its handshake before the server has checked the client's certificate, so a
// refused key surfaces on the first exchange, and should read the same as a refused handshake.
impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => TransportError::Connection(c),
            e => TransportError::Read(e),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => TransportError::Connection(c),
            e => TransportError::Write(e),
        }
    }
}

/// Connection limits and timers, shared by both ends.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Close a connection silent for this long (phones sleep; keep-alives keep live ones open).
    pub idle_timeout: Duration,
    /// Send a keep-alive when nothing was sent for this long (must be below `idle_timeout`).
    pub keep_alive: Duration,
    /// Concurrent bidirectional streams a peer may open (exchanges in flight per connection).
    pub max_streams: u32,
    /// Bytes a peer may have in flight on one stream.
    pub stream_window: u32,
    /// Bytes a peer may have in flight on the whole connection.
    pub connection_window: u32,
    /// Largest control frame accepted.
    pub max_frame: u32,
    /// Time allowed for one request-response exchange, bulk transfer included.
    pub exchange_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(15),
            max_streams: 8,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame: starling_protocol::MAX_FRAME_DEFAULT,
            exchange_timeout: Duration::from_secs(120),
        }
    }
}

impl Limits {
    /// quinn's transport configuration for these limits.
    pub fn transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        if self.keep_alive >= self.idle_timeout {
            return Err(TransportError::Config(
                "keep-alive must be shorter than the idle timeout".into(),
            ));
        }
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Config("idle timeout out of range".into()))?;
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(self.max_streams.into())
            .max_concurrent_uni_streams(0u8.into())
            .stream_receive_window(self.stream_window.into())
            .receive_window(self.connection_window.into())
            .send_window(u64::from(self.connection_window));
        Ok(t)
    }
}
