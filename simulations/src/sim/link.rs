//! How a virtual device reaches the coordinator: in memory (the coordinator's request handler called
//! directly, no sockets) or over real QUIC on loopback (the coordinator's transport server, one client
//! endpoint and mutual-TLS session per device). Both answer with the client session's own [`Event`]s, made
//! by the same mapping the device driver uses, so the simulated federation runs identical logic either way.
//!
//! What must never live here: protocol decisions (the session's and the round engine's).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use starling_client::driver::{disconnected, transport_event, transport_prepare_failure};
use starling_client::session::{Event, PendingUpdate, PrepareFailure};
use starling_coordinator::aggregator::Aggregator;
use starling_coordinator::service::Coordinator;
use starling_protocol::message::{
    BlobKind, Decline, Enrol, Message, ModelFetch, SecAggRequest, TaskRequest,
};
use starling_protocol::{EnrolmentToken, Fingerprint, ModelVersion, SigningIdentity};
use starling_transport::client::TaskReply;
use starling_transport::server::{EnrolmentLimits, Request, Response};
use starling_transport::{Access, Authorizer, Client, Handler, Limits, Server};

use super::SimError;

/// A request's outcome: the session event, and the bytes it moved (up, down).
pub struct Exchange {
    /// What the session is told.
    pub event: Event,
    /// Bytes sent by the device.
    pub up: u64,
    /// Bytes received by the device.
    pub down: u64,
}

impl Exchange {
    fn new(event: Event, up: u64, down: u64) -> Self {
        Self { event, up, down }
    }
}

/// A blob fetch's outcome.
pub enum Fetched {
    /// The bytes.
    Bytes(Vec<u8>),
    /// The session event for the failure.
    Failed(Event),
}

struct QuicLink {
    server: Server,
    pin: Fingerprint,
    clients: HashMap<usize, (Client, Option<starling_transport::Session>)>,
}

/// The path between the virtual devices and the coordinator.
pub struct Link {
    coord: Arc<Coordinator>,
    rt: tokio::runtime::Runtime,
    quic: Option<QuicLink>,
    /// Edge aggregators in front of the coordinator (`[topology]`, in memory): device `c` talks to
    /// `edges[c % edges.len()]`.
    edges: Vec<Arc<Aggregator>>,
}

fn size(m: &Message) -> u64 {
    m.encode().len() as u64
}

impl Link {
    /// The in-memory path.
    pub fn memory(coord: Arc<Coordinator>) -> Result<Self, SimError> {
        Ok(Self {
            coord,
            rt: runtime()?,
            quic: None,
            edges: Vec::new(),
        })
    }

    /// The QUIC path: binds the coordinator's transport server on 127.0.0.1 (port 0) with its TLS key.
    pub fn quic(coord: Arc<Coordinator>, tls: &SigningIdentity) -> Result<Self, SimError> {
        let rt = runtime()?;
        let server = {
            let _g = rt.enter();
            Server::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                SocketAddr::from(([127, 0, 0, 1], 0)),
                tls,
                coord.clone(),
                coord.clone(),
                Limits::default(),
                // Every virtual device enrols from 127.0.0.1 at once: the per-address limit that protects
                // a real coordinator from token guessing would refuse all but the first few.
                EnrolmentLimits {
                    host_burst: u32::MAX,
                    host_rate: 1e9,
                    global_burst: u32::MAX,
                    global_rate: 1e9,
                },
            )?
        };
        Ok(Self {
            coord,
            rt,
            edges: Vec::new(),
            quic: Some(QuicLink {
                server,
                pin: tls.fingerprint(),
                clients: HashMap::new(),
            }),
        })
    }

    /// Enrols an edge aggregator's key at the coordinator under the aggregator role (a token issued for
    /// that role, spent as `aggregator init` spends it).
    pub fn enrol_aggregator(&self, id: &SigningIdentity, name: &str) -> Result<(), SimError> {
        let (token, hash) = EnrolmentToken::generate()?;
        self.coord.store().add_token_for(
            hash,
            &starling_coordinator::store::PendingToken {
                name: name.to_string(),
                created_at: super::run::EPOCH_MS,
            },
            starling_coordinator::store::ClientRole::Aggregator,
        )?;
        self.rt
            .block_on(self.coord.enrol(
                id.fingerprint(),
                Enrol {
                    token: token.as_str().to_string(),
                    name: name.to_string(),
                },
            ))
            .map_err(|e| SimError::Enrolment(e.message))
    }

    /// Puts `edges` between the devices and the coordinator (the in-memory path only).
    pub fn set_edges(&mut self, edges: Vec<Arc<Aggregator>>) -> Result<(), SimError> {
        if self.quic.is_some() && !edges.is_empty() {
            return Err(SimError::Scenario(
                "[topology] aggregators run on the in-memory transport (--transport memory)".into(),
            ));
        }
        self.edges = edges;
        Ok(())
    }

    /// Every edge aggregator: the partial sums whose transfer to the coordinator is over arrive, then
    /// one pass of its work towards the coordinator (its serving loop's step). Returns the partial sums
    /// the coordinator refused on arrival (too late for their round).
    pub fn poll_edges(&self) -> Result<usize, SimError> {
        let mut refused = 0;
        for e in &self.edges {
            refused += self.rt.block_on(e.deliver()).len();
            self.rt.block_on(e.poll())?;
        }
        Ok(refused)
    }

    /// The edge aggregator device `c` talks to, if there are any.
    fn edge(&self, c: usize) -> Option<&Arc<Aggregator>> {
        (!self.edges.is_empty()).then(|| &self.edges[c % self.edges.len()])
    }

    /// Whether this is the QUIC path.
    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// Enrols device `c` (key `id`) with a one-time token the coordinator issued.
    pub fn enrol(
        &mut self,
        c: usize,
        id: &SigningIdentity,
        token: &EnrolmentToken,
    ) -> Result<(), SimError> {
        let name = format!("sim-{c}");
        let enrol = Enrol {
            token: token.as_str().to_string(),
            name: name.clone(),
        };
        match &mut self.quic {
            // Behind an aggregator the device enrols there (its token is spent at the root).
            None => match self.edge(c) {
                Some(edge) => self.rt.block_on(edge.enrol(id.fingerprint(), enrol)),
                None => self.rt.block_on(self.coord.enrol(id.fingerprint(), enrol)),
            }
            .map_err(|e| SimError::Enrolment(e.message)),
            Some(q) => {
                let addrs = q
                    .server
                    .local_addr()
                    .and_then(|a| Ok((a, q.server.enrol_addr()?)));
                let (addr, enrol_addr) = addrs?;
                let _g = self.rt.enter();
                let client = Client::new(id, q.pin, addr, Limits::default())?
                    .with_enrolment(enrol_addr)
                    .with_software("starling-sim");
                self.rt.block_on(client.enrol(token, &name))?;
                q.clients.insert(c, (client, None));
                Ok(())
            }
        }
    }

    /// Opens a session for device `c` (`fp` is its key's fingerprint).
    pub fn connect(&mut self, c: usize, fp: Fingerprint) -> Exchange {
        match &mut self.quic {
            None => match self
                .edge(c)
                .map_or_else(|| self.coord.access(&fp), |e| e.access(&fp))
            {
                Access::Allowed => Exchange::new(Event::Connected { client_id: fp }, 0, 0),
                other => {
                    let refusal = match other {
                        Access::Revoked => starling_transport::client::Refusal::Revoked,
                        _ => starling_transport::client::Refusal::NotEnrolled,
                    };
                    Exchange::new(
                        Event::Disconnected {
                            error: format!("{other:?}"),
                            refusal: Some(refusal),
                        },
                        0,
                        0,
                    )
                }
            },
            Some(q) => {
                let Some((client, conn)) = q.clients.get_mut(&c) else {
                    return Exchange::new(
                        Event::Disconnected {
                            error: "device not enrolled over QUIC".into(),
                            refusal: None,
                        },
                        0,
                        0,
                    );
                };
                if let Some(s) = conn.as_ref() {
                    let id = s.welcome().client_id;
                    return Exchange::new(Event::Connected { client_id: id }, 0, 0);
                }
                match self.rt.block_on(client.connect()) {
                    Ok(s) => {
                        let id = s.welcome().client_id;
                        *conn = Some(s);
                        Exchange::new(Event::Connected { client_id: id }, 0, 0)
                    }
                    Err(e) => Exchange::new(disconnected(&e), 0, 0),
                }
            }
        }
    }

    fn memory_request(&self, c: usize, fp: Fingerprint, req: Request) -> Response {
        match self.edge(c) {
            Some(e) => self.rt.block_on(e.handle(fp, req)),
            None => self.rt.block_on(self.coord.handle(fp, req)),
        }
    }

    fn session(&self, c: usize) -> Result<&starling_transport::Session, Event> {
        self.quic
            .as_ref()
            .and_then(|q| q.clients.get(&c))
            .and_then(|(_, s)| s.as_ref())
            .ok_or(Event::Disconnected {
                error: "not connected".into(),
                refusal: None,
            })
    }

    fn drop_session(&mut self, c: usize, ev: &Event) {
        if let (Some(q), Event::Disconnected { .. }) = (&mut self.quic, ev) {
            if let Some((_, s)) = q.clients.get_mut(&c) {
                *s = None;
            }
        }
    }

    /// Asks for a task; `local_minute` is the device's local time of day.
    pub fn request_task(
        &mut self,
        c: usize,
        fp: Fingerprint,
        held: Option<ModelVersion>,
        local_minute: u16,
    ) -> Exchange {
        let req = Message::TaskRequest(TaskRequest { held_model: held });
        let up = size(&req);
        if self.quic.is_none() {
            let reply = self.memory_request(c, fp, Request::Task(TaskRequest { held_model: held }));
            return match reply {
                Response::Message(Message::Task(task)) => {
                    let down = size(&Message::Task(task.clone()));
                    Exchange::new(Event::TaskOffered { task, local_minute }, up, down)
                }
                other => memory_reply(up, other),
            };
        }
        let reply = match self.session(c) {
            Err(ev) => return Exchange::new(ev, up, 0),
            Ok(s) => self.rt.block_on(s.request_task(held)),
        };
        match reply {
            Ok(TaskReply::Task(task)) => {
                let down = size(&Message::Task(task.clone()));
                Exchange::new(Event::TaskOffered { task, local_minute }, up, down)
            }
            Ok(TaskReply::NoTask(n)) => self.quic_reply(c, up, Ok(Message::NoTask(n))),
            Err(e) => self.quic_reply(c, up, Err(e)),
        }
    }

    /// Fetches a blob (at most `max` bytes) for device `c`.
    pub fn fetch(
        &mut self,
        c: usize,
        fp: Fingerprint,
        version: ModelVersion,
        kind: BlobKind,
        max: u64,
    ) -> Fetched {
        if self.quic.is_none() {
            return match self.memory_request(c, fp, Request::Fetch(ModelFetch { version, kind })) {
                Response::Blob(b) if b.len() as u64 <= max => Fetched::Bytes(b.to_vec()),
                Response::Blob(b) => Fetched::Failed(Event::PrepareFailed {
                    error: format!("blob of {} bytes exceeds {max}", b.len()),
                    kind: PrepareFailure::Local,
                }),
                // A typed refusal becomes the event the device's transport gives it.
                Response::Message(Message::Error(e)) => Fetched::Failed(transport_prepare_failure(
                    &starling_transport::TransportError::Remote {
                        code: e.code,
                        message: e.message,
                    },
                )),
                Response::Message(m) => Fetched::Failed(unexpected(&format!("{m:?}"))),
            };
        }
        let ev = match self.session(c) {
            Err(ev) => ev,
            Ok(s) => match self.rt.block_on(s.fetch(version, kind, max)) {
                Ok(b) => return Fetched::Bytes(b),
                Err(e) => transport_prepare_failure(&e),
            },
        };
        self.drop_session(c, &ev);
        Fetched::Failed(ev)
    }

    /// Uploads a pending update with its body.
    pub fn upload(
        &mut self,
        c: usize,
        fp: Fingerprint,
        p: &PendingUpdate,
        body: &[u8],
    ) -> Exchange {
        let Some(header) = p.upload_header(body) else {
            return Exchange::new(
                Event::Refused {
                    code: starling_protocol::ErrorCode::BadRequest,
                    message: "pending update metadata is malformed".into(),
                },
                0,
                0,
            );
        };
        let up = size(&Message::Upload(Box::new(header.clone()))) + body.len() as u64;
        if self.quic.is_none() {
            let reply = self.memory_request(
                c,
                fp,
                Request::Upload {
                    header: Box::new(header),
                    body: body.to_vec(),
                },
            );
            return memory_reply(up, reply);
        }
        let reply = match self.session(c) {
            Err(ev) => return Exchange::new(ev, up, 0),
            Ok(s) => self.rt.block_on(s.upload(header, body)).map(Message::Ack),
        };
        self.quic_reply(c, up, reply)
    }

    /// Sends a secure-aggregation step.
    pub fn secagg(&mut self, c: usize, fp: Fingerprint, r: SecAggRequest) -> Exchange {
        let up = size(&Message::SecAgg(Box::new(r.clone())));
        if self.quic.is_none() {
            return memory_reply(up, self.memory_request(c, fp, Request::SecAgg(Box::new(r))));
        }
        let reply = match self.session(c) {
            Err(ev) => return Exchange::new(ev, up, 0),
            Ok(s) => self
                .rt
                .block_on(s.secagg(r))
                .map(|r| Message::SecAggReply(Box::new(r))),
        };
        self.quic_reply(c, up, reply)
    }

    /// Declines a round's task.
    pub fn decline(&mut self, c: usize, fp: Fingerprint, d: Decline) -> Exchange {
        let up = size(&Message::Decline(d.clone()));
        if self.quic.is_none() {
            return memory_reply(up, self.memory_request(c, fp, Request::Decline(d)));
        }
        let reply = match self.session(c) {
            Err(ev) => return Exchange::new(ev, up, 0),
            Ok(s) => self.rt.block_on(s.decline(d)).map(Message::NoTask),
        };
        self.quic_reply(c, up, reply)
    }

    /// The exchange for a QUIC reply: the session event of the coordinator's message, or of the failure
    /// (a lost connection is dropped, to be reopened by the session's next `Connect`).
    fn quic_reply(
        &mut self,
        c: usize,
        up: u64,
        reply: Result<Message, starling_transport::TransportError>,
    ) -> Exchange {
        match reply {
            Ok(m) => Exchange::new(message_event(&m), up, size(&m)),
            Err(e) => {
                let ev = transport_event(&e);
                self.drop_session(c, &ev);
                Exchange::new(ev, up, 0)
            }
        }
    }

    /// Closes every QUIC session and the server.
    pub fn shutdown(mut self) {
        if let Some(q) = self.quic.take() {
            let QuicLink {
                server, clients, ..
            } = q;
            self.rt.block_on(async move {
                for (_, (client, s)) in clients {
                    if let Some(s) = s {
                        let _ = s.goodbye("simulation over").await;
                    }
                    client.close().await;
                }
                server.shutdown().await;
            });
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, SimError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| SimError::Io {
            path: "the QUIC path's runtime".into(),
            source,
        })
}

/// The exchange for an in-memory answer that is a message (a blob here is a coordinator bug).
fn memory_reply(up: u64, reply: Response) -> Exchange {
    match reply {
        Response::Message(m) => Exchange::new(message_event(&m), up, size(&m)),
        Response::Blob(_) => Exchange::new(unexpected("a blob"), up, 0),
    }
}

fn unexpected(what: &str) -> Event {
    Event::Disconnected {
        error: format!("the coordinator answered with {what}"),
        refusal: None,
    }
}

/// The session event for a coordinator message (what the device's transport turns it into).
fn message_event(m: &Message) -> Event {
    match m {
        Message::NoTask(n) => Event::NoTask {
            retry_after_ms: n.retry_after_ms,
        },
        Message::Ack(a) => Event::Acked {
            update_id: a.update_id,
        },
        Message::SecAggReply(r) => Event::SecAgg((**r).clone()),
        Message::Error(e) => transport_event(&starling_transport::TransportError::Remote {
            code: e.code,
            message: e.message.clone(),
        }),
        other => unexpected(&format!("{other:?}")),
    }
}
