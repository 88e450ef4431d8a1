//! Real QUIC on 127.0.0.1 (port 0), real TLS 1.3 with Ed25519 certificates, real signatures: the happy path
//! of a round's exchanges, every kind of refused peer, hostile bytes on an authenticated connection, and
//! enrolment rate limiting. After each failure a well-behaved client is served again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use starling_protocol::bulk::BulkHeader;
use starling_protocol::frame::encode_frame;
use starling_protocol::manifest::{DpMode, DpRecord, Manifest};
use starling_protocol::message::{
    Ack, BlobKind, DpTask, Enrol, ErrorCode, ErrorReply, Hello, LoraSpec, NoTask, Task,
    TaskRequest, TrainParams, UpdateMetrics, Upload, UserDp,
};
use starling_protocol::update::{decode_update, encode_update};
use starling_protocol::{
    AdapterSchema, Digest, Encoding, EnrolmentToken, Fingerprint, ManifestVerifier, Message,
    ModelVersion, RoundId, SignedManifest, SigningIdentity, TensorSpec, TokenHash, UpdateId,
    UpdateLimits,
};
use starling_transport::backoff::Backoff;
use starling_transport::client::{quic_client_config, TaskReply};
use starling_transport::server::EnrolmentLimits;
use starling_transport::tls::{self, client_tls, client_tls_without_certificate};
use starling_transport::{
    Access, Authorizer, Client, Handler, Limits, Request, Response, Server, TransportError,
};

/// The registry of keys: enrolled, revoked, and unused token hashes.
#[derive(Debug, Default)]
struct Registry {
    keys: Mutex<HashMap<Fingerprint, Access>>,
    tokens: Mutex<HashSet<TokenHash>>,
}

impl Authorizer for Registry {
    fn access(&self, client: &Fingerprint) -> Access {
        self.keys
            .lock()
            .unwrap()
            .get(client)
            .copied()
            .unwrap_or(Access::NotEnrolled)
    }
}

/// A small coordinator: one published version, one open round, updates kept by id.
struct App {
    registry: Arc<Registry>,
    schema: AdapterSchema,
    manifest: SignedManifest,
    adapter: Arc<[u8]>,
    updates: Mutex<HashMap<UpdateId, Vec<f32>>>,
}

impl Handler for App {
    fn latest_model(&self) -> ModelVersion {
        ModelVersion(1)
    }

    fn max_upload_bytes(&self) -> u64 {
        1 << 20
    }

    async fn handle(&self, _client: Fingerprint, request: Request) -> Response {
        match request {
            Request::Task(_) => Response::Message(Message::Task(Box::new(Task {
                round: RoundId(1),
                manifest: self.manifest.clone(),
                deadline_unix_ms: u64::MAX,
                params: TrainParams {
                    local_steps: 5,
                    batch_size: 4,
                    seq_len: 64,
                    learning_rate: 1e-3,
                    fedprox_mu: 0.0,
                    optimizer: Default::default(),
                },
                dp: DpTask {
                    user: Some(UserDp::Clip { clip: 1.0 }),
                    dp_sgd: None,
                },
                lora: LoraSpec {
                    rank: 4,
                    alpha: 8.0,
                    targets: vec!["q".into()],
                },
                encoding: Encoding::Int8 { block: 64 },
                max_update_bytes: 1 << 20,
                secagg: None,
            }))),
            Request::Manifest(_) => Response::Message(Message::Manifest(self.manifest.clone())),
            Request::Fetch(f) if f.version == ModelVersion(1) && f.kind == BlobKind::Adapter => {
                Response::Blob(self.adapter.clone())
            }
            Request::Fetch(_) => Response::error(ErrorCode::NotFound, "no such blob"),
            Request::Decline(_) => Response::Message(Message::NoTask(NoTask {
                retry_after_ms: 10,
                reason: "declined".into(),
            })),
            Request::SecAgg(_) => Response::error(ErrorCode::BadRequest, "no secure aggregation"),
            Request::Forward { .. } | Request::EnrolFor(_) | Request::Roster(_) => {
                Response::error(ErrorCode::BadRequest, "not an aggregators' root")
            }
            Request::Upload { header, body } => {
                if header.schema != self.schema.hash() {
                    return Response::error(ErrorCode::SchemaMismatch, "wrong adapter schema");
                }
                let delta = match decode_update(&body, &self.schema, &UpdateLimits::default()) {
                    Ok(d) => d,
                    Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
                };
                let mut updates = self.updates.lock().unwrap();
                let duplicate = updates.insert(header.update_id, delta).is_some();
                Response::Message(Message::Ack(Ack {
                    update_id: header.update_id,
                    duplicate,
                }))
            }
        }
    }

    async fn enrol(&self, client: Fingerprint, request: Enrol) -> Result<(), ErrorReply> {
        let bad = || ErrorReply {
            code: ErrorCode::BadToken,
            message: "unknown or used token".into(),
        };
        let token = EnrolmentToken::parse(&request.token).map_err(|_| bad())?;
        if !self.registry.tokens.lock().unwrap().remove(&token.hash()) {
            return Err(bad());
        }
        self.registry
            .keys
            .lock()
            .unwrap()
            .insert(client, Access::Allowed);
        Ok(())
    }
}

struct Fixture {
    server: Server,
    app: Arc<App>,
    signing: SigningIdentity,
}

fn schema() -> AdapterSchema {
    AdapterSchema::new(vec![
        TensorSpec {
            name: "q.lora_A".into(),
            shape: vec![4, 32],
        },
        TensorSpec {
            name: "q.lora_B".into(),
            shape: vec![32, 4],
        },
    ])
    .unwrap()
}

fn limits() -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(5),
        keep_alive: Duration::from_secs(1),
        exchange_timeout: Duration::from_secs(10),
        ..Limits::default()
    }
}

/// Enrolment limits that tests which enrol many devices from 127.0.0.1 do not hit.
const PERMISSIVE: EnrolmentLimits = EnrolmentLimits {
    host_burst: 1000,
    host_rate: 100.0,
    global_burst: 1000,
    global_rate: 100.0,
};

fn start(enrol_limits: EnrolmentLimits) -> Fixture {
    let signing = SigningIdentity::from_seed([42; 32]);
    let adapter: Arc<[u8]> = (0..5000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let manifest = Manifest {
        version: ModelVersion(1),
        parent_digest: None,
        base_digest: Digest::of(b"base"),
        adapter_digest: Digest::of(&adapter),
        adapter_schema: schema(),
        round: RoundId(0),
        strategy: "fedavg".into(),
        dp: DpRecord {
            mode: DpMode::Off,
            noise_multiplier: 0.0,
            clip: 0.0,
            epsilon_spent: 0.0,
            delta: 0.0,
        },
        created_at_unix_ms: 1,
    }
    .sign(&signing);
    let registry = Arc::new(Registry::default());
    let app = Arc::new(App {
        registry: registry.clone(),
        schema: schema(),
        manifest,
        adapter,
        updates: Mutex::default(),
    });
    let tls_id = SigningIdentity::from_seed([43; 32]);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(
        any,
        any,
        &tls_id,
        registry,
        app.clone(),
        limits(),
        enrol_limits,
    )
    .unwrap();
    Fixture {
        server,
        app,
        signing,
    }
}

impl Fixture {
    fn token(&self) -> EnrolmentToken {
        let (t, h) = EnrolmentToken::generate().unwrap();
        self.app.registry.tokens.lock().unwrap().insert(h);
        t
    }

    fn client(&self, id: &SigningIdentity) -> Client {
        Client::new(
            id,
            self.server.fingerprint(),
            self.server.local_addr().unwrap(),
            limits(),
        )
        .unwrap()
        .with_enrolment(self.server.enrol_addr().unwrap())
    }

    async fn enrolled_client(&self, seed: u8) -> (SigningIdentity, Client) {
        let id = SigningIdentity::from_seed([seed; 32]);
        let c = self.client(&id);
        assert_eq!(
            c.enrol(&self.token(), "device").await.unwrap(),
            id.fingerprint()
        );
        (id, c)
    }

    /// A fresh enrolled client completes a full task exchange: the server is still serving.
    async fn assert_still_serving(&self, seed: u8) {
        let (_, c) = self.enrolled_client(seed).await;
        let s = c.connect().await.unwrap();
        assert!(matches!(
            s.request_task(None).await.unwrap(),
            TaskReply::Task(_)
        ));
    }
}

fn upload_for(body: &[u8], id: u8) -> Upload {
    Upload {
        update_id: UpdateId([id; 16]),
        round: RoundId(1),
        model_version: ModelVersion(1),
        schema: schema().hash(),
        num_examples: 40,
        metrics: UpdateMetrics {
            train_loss: 2.0,
            steps: 5,
            epsilon_spent: 0.0,
        },
        body: BulkHeader::describe(body),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrols_fetches_verifies_trains_and_uploads() {
    let f = start(PERMISSIVE);
    let (_, client) = f.enrolled_client(1).await;
    let session = client.connect().await.unwrap();
    assert_eq!(
        session.welcome().version,
        starling_protocol::PROTOCOL_VERSION
    );
    assert_eq!(session.welcome().latest_model, ModelVersion(1));

    let TaskReply::Task(task) = session.request_task(None).await.unwrap() else {
        panic!("expected a task")
    };
    let adapter = session
        .fetch(ModelVersion(1), BlobKind::Adapter, 1 << 20)
        .await
        .unwrap();
    let mut verifier = ManifestVerifier::new(vec![f.signing.public_key()]);
    let manifest = verifier.accept(&task.manifest, &adapter).unwrap();
    assert_eq!(manifest.adapter_schema, schema());
    assert_eq!(session.manifest(None).await.unwrap(), task.manifest);

    let delta: Vec<f32> = (0..schema().num_params())
        .map(|i| (i as f32 - 128.0) * 1e-4)
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let body = encode_update(&schema(), &delta, task.encoding, &mut rng).unwrap();
    let ack = session.upload(upload_for(&body, 7), &body).await.unwrap();
    assert!(!ack.duplicate);
    // A retry of the same update (e.g. the ack was lost) is acknowledged again and stored once.
    let again = session.upload(upload_for(&body, 7), &body).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(f.app.updates.lock().unwrap().len(), 1);
    let stored = f.app.updates.lock().unwrap()[&UpdateId([7; 16])].clone();
    assert!(stored.iter().zip(&delta).all(|(a, b)| (a - b).abs() < 2e-4));

    // Missing blob: a typed error from the application, and the connection stays usable.
    let err = session
        .fetch(ModelVersion(9), BlobKind::Base, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Remote {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err}"
    );
    // A blob larger than the caller's cap is refused before reading it.
    let err = session
        .fetch(ModelVersion(1), BlobKind::Adapter, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Protocol(starling_protocol::ProtocolError::PayloadTooLarge { .. })
        ),
        "{err}"
    );

    // The connection survives a change of the client's address (migration).
    let session = client.connect().await.unwrap();
    client.rebind().unwrap();
    assert!(matches!(
        session.request_task(None).await.unwrap(),
        TaskReply::Task(_)
    ));
    session.goodbye("done").await.unwrap();
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_right_keys_are_refused_at_the_handshake() {
    let f = start(PERMISSIVE);
    let addr = f.server.local_addr().unwrap();

    // Never enrolled.
    let stranger = SigningIdentity::from_seed([9; 32]);
    let err = f.client(&stranger).connect().await.unwrap_err();
    assert!(matches!(err, TransportError::Connection(_)), "{err}");
    assert!(starling_transport::client::is_permanent(&err), "{err}");

    // No client certificate at all.
    let tls = client_tls_without_certificate(f.server.fingerprint(), tls::ALPN).unwrap();
    let c = Client::new(&stranger, f.server.fingerprint(), addr, limits())
        .unwrap()
        .with_config(quic_client_config(tls, &limits()).unwrap());
    assert!(matches!(
        c.connect().await.unwrap_err(),
        TransportError::Connection(_)
    ));

    // Enrolled, then revoked: refused on both endpoints.
    let (id, client) = f.enrolled_client(10).await;
    let live = client.connect().await.unwrap();
    f.app
        .registry
        .keys
        .lock()
        .unwrap()
        .insert(id.fingerprint(), Access::Revoked);
    // A live connection loses service at its next request; new handshakes are refused (no resumption).
    assert!(matches!(
        live.request_task(None).await.unwrap_err(),
        TransportError::Connection(_)
    ));
    assert!(matches!(
        client.connect().await.unwrap_err(),
        TransportError::Connection(_)
    ));
    assert!(client.enrol(&f.token(), "again").await.is_err());

    // Wrong ALPN.
    let (id, _) = f.enrolled_client(11).await;
    let tls = client_tls(&id, f.server.fingerprint(), b"http/3").unwrap();
    let c = Client::new(&id, f.server.fingerprint(), addr, limits())
        .unwrap()
        .with_config(quic_client_config(tls, &limits()).unwrap());
    let err = c.connect().await.unwrap_err();
    assert!(matches!(err, TransportError::Connection(_)), "{err:?}");

    // The client pins another coordinator key: it refuses the server.
    let wrong_pin = SigningIdentity::from_seed([99; 32]).fingerprint();
    let c = Client::new(&id, wrong_pin, addr, limits()).unwrap();
    let err = c.connect().await.unwrap_err();
    assert!(matches!(err, TransportError::Connection(_)), "{err}");

    // A used token and a malformed token are typed refusals.
    let token = f.token();
    f.client(&SigningIdentity::from_seed([12; 32]))
        .enrol(&token, "a")
        .await
        .unwrap();
    let err = f
        .client(&SigningIdentity::from_seed([13; 32]))
        .enrol(&token, "b")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Remote {
                code: ErrorCode::BadToken,
                ..
            }
        ),
        "{err}"
    );

    f.assert_still_serving(14).await;
    f.server.shutdown().await;
}

/// Sends raw bytes on a fresh stream of an authenticated, hello'd connection and returns the reply frame's
/// message (if any) and whether the server then closed the connection.
async fn raw(
    f: &Fixture,
    seed: u8,
    hello_first: bool,
    bytes: &[u8],
    finish: bool,
) -> (Option<Message>, bool) {
    let (_, client) = f.enrolled_client(seed).await;
    let session = client.connect().await.unwrap();
    let conn = session.connection().clone();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    if !hello_first {
        // A second connection, without Hello.
        let bare = client.handshake().await.unwrap();
        let (mut s2, mut r2) = bare.open_bi().await.unwrap();
        s2.write_all(bytes).await.unwrap();
        s2.finish().unwrap();
        let reply = starling_transport::framed::read_message(&mut r2, 1 << 20)
            .await
            .ok();
        let closed = tokio::time::timeout(Duration::from_secs(3), bare.closed())
            .await
            .is_ok();
        return (reply, closed);
    }
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let reply = starling_transport::framed::read_message(&mut recv, 1 << 20)
        .await
        .ok();
    let closed = tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .is_ok();
    (reply, closed)
}

fn code(m: &Option<Message>) -> Option<ErrorCode> {
    match m {
        Some(Message::Error(e)) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_close_that_connection_and_nobody_elses() {
    let f = start(PERMISSIVE);

    // A frame header claiming 2 GiB: refused from the 4 header bytes alone.
    let (reply, closed) = raw(&f, 20, true, &(2u32 << 30).to_le_bytes(), false).await;
    assert_eq!(code(&reply), Some(ErrorCode::TooLarge));
    assert!(closed);

    // A truncated frame: the header promises 100 bytes, 10 arrive, then the stream ends.
    let mut bytes = 100u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[1u8; 10]);
    let (reply, closed) = raw(&f, 21, true, &bytes, true).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest));
    assert!(closed);

    // Garbage inside a well-sized frame.
    let garbage = encode_frame(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], 1 << 20).unwrap();
    let (reply, closed) = raw(&f, 22, true, &garbage, true).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest));
    assert!(closed);

    // An upload whose bytes do not match the declared digest.
    let body = vec![5u8; 1000];
    let mut upload = upload_for(&body, 1);
    upload.body.digest = starling_protocol::BulkDigest::of(b"something else");
    let mut bytes = encode_frame(&Message::Upload(Box::new(upload)).encode(), 1 << 20).unwrap();
    bytes.extend_from_slice(&body);
    let (reply, closed) = raw(&f, 23, true, &bytes, true).await;
    assert_eq!(code(&reply), Some(ErrorCode::DigestMismatch));
    assert!(closed);

    // An upload that declares more than the server accepts: refused before the body is read.
    let mut upload = upload_for(&body, 2);
    upload.body.size = 1 << 40;
    let bytes = encode_frame(&Message::Upload(Box::new(upload)).encode(), 1 << 20).unwrap();
    let (reply, closed) = raw(&f, 24, true, &bytes, false).await;
    assert_eq!(code(&reply), Some(ErrorCode::TooLarge));
    assert!(closed);

    // An upload with more bytes than declared.
    let upload = upload_for(&body, 3);
    let mut bytes = encode_frame(&Message::Upload(Box::new(upload)).encode(), 1 << 20).unwrap();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"extra");
    let (reply, closed) = raw(&f, 25, true, &bytes, true).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest));
    assert!(closed);

    // A request before Hello.
    let request = encode_frame(
        &Message::TaskRequest(TaskRequest { held_model: None }).encode(),
        1 << 20,
    )
    .unwrap();
    let (reply, closed) = raw(&f, 26, false, &request, true).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest));
    assert!(closed);

    // An unknown protocol version in a Hello-only world.
    let mut hello = Message::Hello(Hello {
        versions: vec![77],
        software: "x".into(),
    })
    .encode();
    hello[0] = 77;
    let (reply, closed) = raw(&f, 27, false, &encode_frame(&hello, 1 << 20).unwrap(), true).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest));
    assert!(closed);

    assert!(
        f.app.updates.lock().unwrap().is_empty(),
        "nothing hostile was stored"
    );
    f.assert_still_serving(28).await;
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_is_rate_limited() {
    let f = start(EnrolmentLimits {
        host_burst: 3,
        host_rate: 0.001,
        global_burst: 100,
        global_rate: 1.0,
    });
    let mut outcomes = Vec::new();
    for seed in 30..36u8 {
        let c = f.client(&SigningIdentity::from_seed([seed; 32]));
        let r = c.enrol(&f.token(), "burst").await;
        // A refusal for the rate limit is recognisable as one (`enrol` waits and retries on it).
        outcomes.push(
            r.as_ref()
                .map_or_else(starling_transport::client::is_rate_limited, |_| true),
        );
        outcomes.push(r.is_ok());
    }
    assert_eq!(
        outcomes,
        [true, true, true, true, true, true, true, false, true, false, true, false]
    );
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_with_backoff_when_the_coordinator_comes_up_late() {
    // Reserve a port (bound on 127.0.0.1:0), free it, and start the coordinator there a little later.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tls_id = SigningIdentity::from_seed([43; 32]);
    let device = SigningIdentity::from_seed([50; 32]);
    let f = start(PERMISSIVE);
    f.app
        .registry
        .keys
        .lock()
        .unwrap()
        .insert(device.fingerprint(), Access::Allowed);
    let quick = Limits {
        idle_timeout: Duration::from_millis(300),
        keep_alive: Duration::from_millis(100),
        ..limits()
    };
    let client = Client::new(&device, tls_id.fingerprint(), addr, quick).unwrap();
    let registry = f.app.registry.clone();
    let app = f.app.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Server::bind(
            addr,
            any,
            &tls_id,
            registry,
            app,
            limits(),
            EnrolmentLimits::default(),
        )
        .unwrap()
    });
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400), 3);
    let session = client.connect_with_retry(&mut backoff, 20).await.unwrap();
    assert!(matches!(
        session.request_task(None).await.unwrap(),
        TaskReply::Task(_)
    ));
    late.await.unwrap().shutdown().await;
}
