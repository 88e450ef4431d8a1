//! How an edge aggregator reaches its root: over QUIC with mutual TLS (deployment), or by calling a root
//! coordinator in the same process (the simulator's `[topology]`, which runs real aggregators in front of
//! the real root on simulated time). Both give the aggregator the same typed answers — the root's own
//! request handler answers either way, so nothing the aggregator does differs between them.
//!
//! A local root may sit behind a simulated [`Uplink`]: a partial sum then reaches the root once its
//! transfer (latency + bytes / bandwidth, one sum at a time on the link) is over, when the driver calls
//! [`LocalRoot::deliver`]. The aggregator hears the link's ack at once; a real one hears the root's when
//! the sum arrives. The outcome is the same: a sum that arrives late is refused by the root, and a real
//! aggregator closes its round on that refusal as this one already did.
//!
//! What must never live here: what the aggregator asks or when (its module's), or protocol decoding.

use std::sync::Arc;

use starling_protocol::message::{
    Ack, BlobKind, Decline, EnrolFor, Forward, ManifestRequest, Message, ModelFetch, NoTask,
    Roster, RosterRequest, TaskRequest,
};
use starling_protocol::{Fingerprint, ModelVersion, ProtocolError, SignedManifest};
use starling_transport::client::{reply, Session, TaskReply};
use starling_transport::{Client, Handler, Request, Response, TransportError};

use crate::service::{Clock, Coordinator};

/// The way to the root.
pub enum Upstream {
    /// Over QUIC: the client (the aggregator's key, the root's pin) and the session it holds.
    Quic {
        /// The QUIC client.
        client: Box<Client>,
        /// The open session, if any.
        session: tokio::sync::Mutex<Option<Arc<Session>>>,
    },
    /// A root in this process, called as its transport server would call it for this aggregator's key.
    Local(Arc<LocalRoot>),
}

/// A root in this process, reached as its transport server would reach it for this aggregator's key.
pub struct LocalRoot {
    root: Arc<Coordinator>,
    me: Fingerprint,
    uplink: Option<Uplink>,
}

/// A simulated link from the aggregator to the root for partial sums.
pub struct Uplink {
    latency_ms: u64,
    bytes_per_ms: f64,
    clock: Clock,
    state: std::sync::Mutex<Transit>,
}

/// Partial sums on the link.
#[derive(Default)]
struct Transit {
    /// When the link has sent everything queued so far.
    busy_until: u64,
    /// (arrival time, header, body), in sending order.
    sums: Vec<(u64, Forward, Vec<u8>)>,
}

impl Uplink {
    /// Puts a partial sum on the link: it arrives after the sums queued before it are sent, its own
    /// bytes are sent, and the latency has passed. The link acknowledges it.
    fn send(&self, header: Forward, body: &[u8]) -> Ack {
        let now = self.clock.now();
        let mut t = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let sent = t.busy_until.max(now) + (body.len() as f64 / self.bytes_per_ms) as u64;
        t.busy_until = sent;
        let ack = Ack {
            update_id: header.update_id,
            duplicate: false,
        };
        t.sums.push((sent + self.latency_ms, header, body.to_vec()));
        ack
    }
}

impl LocalRoot {
    /// `root`, called for the aggregator whose key is `me` (enrolled there under the aggregator role).
    pub fn new(root: Arc<Coordinator>, me: Fingerprint) -> Self {
        Self {
            root,
            me,
            uplink: None,
        }
    }

    /// The same root behind a link of `latency_ms` and `mbps` for partial sums, timed on `clock`.
    pub fn with_uplink(mut self, latency_ms: u64, mbps: f64, clock: Clock) -> Self {
        self.uplink = Some(Uplink {
            latency_ms,
            bytes_per_ms: (mbps * 125.0).max(1e-9),
            clock,
            state: std::sync::Mutex::new(Transit::default()),
        });
        self
    }

    /// A request to this root, answered as its transport server would answer this aggregator.
    async fn call(&self, request: Request) -> Result<Message, TransportError> {
        local(self.root.handle(self.me, request).await)
    }

    /// Hands the root the partial sums whose transfer is over; returns the root's refusals (a sum that
    /// arrived after its round closed).
    pub async fn deliver(&self) -> Vec<String> {
        let Some(link) = &self.uplink else {
            return Vec::new();
        };
        let now = link.clock.now();
        let due: Vec<(u64, Forward, Vec<u8>)> = {
            let mut t = link.state.lock().unwrap_or_else(|p| p.into_inner());
            let (due, later) = std::mem::take(&mut t.sums)
                .into_iter()
                .partition(|(at, ..)| *at <= now);
            t.sums = later;
            due
        };
        let mut refused = Vec::new();
        for (_, header, body) in due {
            let request = Request::Forward {
                header: Box::new(header),
                body,
            };
            if let Err(e) = self.call(request).await.and_then(reply::ack) {
                refused.push(e.to_string());
            }
        }
        refused
    }
}

/// An open way to the root (a session, or the local root).
#[derive(Clone)]
pub enum Up {
    /// A QUIC session.
    Session(Arc<Session>),
    /// The local root.
    Local(Arc<LocalRoot>),
}

impl Upstream {
    /// The open way to the root and, when it was opened now, the root's latest model version.
    pub async fn open(&self) -> Result<(Up, Option<ModelVersion>), TransportError> {
        match self {
            Upstream::Quic { client, session } => {
                let mut held = session.lock().await;
                if let Some(s) = held.as_ref() {
                    if s.connection().close_reason().is_none() {
                        return Ok((Up::Session(s.clone()), None));
                    }
                }
                let s = Arc::new(client.connect().await?);
                let latest = s.welcome().latest_model;
                *held = Some(s.clone());
                Ok((Up::Session(s), Some(latest)))
            }
            Upstream::Local(l) => Ok((
                Up::Local(l.clone()),
                Some(Handler::latest_model(l.root.as_ref())),
            )),
        }
    }

    /// Forgets a session that failed (the next call reconnects).
    pub async fn reset(&self) {
        if let Upstream::Quic { session, .. } = self {
            *session.lock().await = None;
        }
    }

    /// Closes the QUIC endpoint (waits for the root to see the close).
    pub async fn close(&self) {
        if let Upstream::Quic { client, .. } = self {
            client.close().await;
        }
    }
}

/// The root's answer to a local request, as the message a session would have read (its typed reading,
/// an error reply included, is [`reply`]'s, as for a session).
fn local(answer: Response) -> Result<Message, TransportError> {
    match answer {
        Response::Message(m) => Ok(m),
        Response::Blob(_) => Err(ProtocolError::Unexpected {
            expected: "a message",
            got: "Blob",
        }
        .into()),
    }
}

impl Up {
    /// The root's task for the open round, or why there is none.
    pub async fn request_task(&self) -> Result<TaskReply, TransportError> {
        match self {
            Up::Session(s) => s.request_task(None).await,
            Up::Local(l) => {
                let req = Request::Task(TaskRequest { held_model: None });
                reply::task(l.call(req).await?)
            }
        }
    }

    /// The active devices, unless unchanged since `generation`.
    pub async fn roster(&self, generation: u64) -> Result<Roster, TransportError> {
        match self {
            Up::Session(s) => s.roster(generation).await,
            Up::Local(l) => {
                let req = Request::Roster(RosterRequest { generation });
                reply::roster(l.call(req).await?)
            }
        }
    }

    /// Forwards a partial sum; the ack means the root stored it (or, behind a simulated uplink, that
    /// the link took it).
    pub async fn forward(&self, header: Forward, body: &[u8]) -> Result<Ack, TransportError> {
        match self {
            Up::Session(s) => s.forward(header, body).await,
            Up::Local(l) => match &l.uplink {
                Some(link) => Ok(link.send(header, body)),
                None => {
                    let req = Request::Forward {
                        header: Box::new(header),
                        body: body.to_vec(),
                    };
                    reply::ack(l.call(req).await?)
                }
            },
        }
    }

    /// Declines the round.
    pub async fn decline(&self, decline: Decline) -> Result<NoTask, TransportError> {
        match self {
            Up::Session(s) => s.decline(decline).await,
            Up::Local(l) => reply::no_task(l.call(Request::Decline(decline)).await?),
        }
    }

    /// A signed manifest (`None`: the newest).
    pub async fn manifest(
        &self,
        version: Option<ModelVersion>,
    ) -> Result<SignedManifest, TransportError> {
        match self {
            Up::Session(s) => s.manifest(version).await,
            Up::Local(l) => {
                let req = Request::Manifest(ManifestRequest { version });
                reply::manifest(l.call(req).await?)
            }
        }
    }

    /// A blob of at most `max` bytes.
    pub async fn fetch(
        &self,
        version: ModelVersion,
        kind: BlobKind,
        max: u64,
    ) -> Result<Vec<u8>, TransportError> {
        match self {
            Up::Session(s) => s.fetch(version, kind, max).await,
            Up::Local(l) => {
                let req = Request::Fetch(ModelFetch { version, kind });
                match l.root.handle(l.me, req).await {
                    Response::Blob(b) if b.len() as u64 <= max => Ok(b.to_vec()),
                    Response::Blob(b) => Err(ProtocolError::PayloadTooLarge {
                        len: b.len() as u64,
                        max,
                    }
                    .into()),
                    Response::Message(m) => Err(reply::not_a_blob(&m)),
                }
            }
        }
    }

    /// Enrols a device at the root on its behalf.
    pub async fn enrol_for(&self, request: EnrolFor) -> Result<Fingerprint, TransportError> {
        match self {
            Up::Session(s) => s.enrol_for(request).await,
            Up::Local(l) => reply::enrolled(l.call(Request::EnrolFor(request)).await?),
        }
    }
}
