//! Transport benchmark: upload throughput of f32 deltas (4 MB and 40 MB) through the full protocol over
//! loopback QUIC (frame, bulk transfer with its BLAKE3 digest, the update checked as the coordinator checks
//! it, ack) beside a raw quinn stream of the same size on the same TLS and transport settings, alternating;
//! handshakes per second (mutual TLS + Hello/Welcome); encode/decode/validate throughput of f32 and int8
//! updates; the bulk digest's speed (BLAKE3 beside SHA-256).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use super::peak_rss;
use starling_protocol::bulk::BulkHeader;
use starling_protocol::message::{Ack, Enrol, ErrorCode, ErrorReply, UpdateMetrics, Upload};
use starling_protocol::update::{decode_update, encode_update, validate_update};
use starling_protocol::{
    AdapterSchema, Encoding, Fingerprint, Message, ModelVersion, RoundId, SigningIdentity,
    TensorSpec, UpdateId, UpdateLimits,
};
use starling_transport::client::quic_client_config;
use starling_transport::server::EnrolmentLimits;
use starling_transport::tls::{self, ClientPolicy, EnrolledClientVerifier};
use starling_transport::{
    Access, Authorizer, Client, Handler, Limits, Request, Response, Server, TransportError,
};

/// Sizes and durations of the transport benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Delta sizes in MB of f32 (1 MB = 262,144 parameters).
    #[arg(long, value_delimiter = ',', default_value = "4,40")]
    pub sizes_mb: Vec<usize>,
    /// Timed uploads per size (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seconds spent opening connections for the handshake rate.
    #[arg(long, default_value_t = 2.0)]
    pub handshake_seconds: f64,
}

#[derive(Debug)]
struct Everyone;

impl Authorizer for Everyone {
    fn access(&self, _: &Fingerprint) -> Access {
        Access::Allowed
    }
}

/// Accepts f32/int8 updates for one schema: checks them as the coordinator does before storing them (every
/// check decoding makes, without producing the values) and acknowledges.
struct Sink {
    schema: AdapterSchema,
}

impl Handler for Sink {
    fn latest_model(&self) -> ModelVersion {
        ModelVersion(0)
    }
    fn max_upload_bytes(&self) -> u64 {
        1 << 30
    }
    async fn handle(&self, _: Fingerprint, request: Request) -> Response {
        match request {
            Request::Upload { header, body } => {
                match validate_update(&body, &self.schema, &UpdateLimits::default()) {
                    Ok(()) => Response::Message(Message::Ack(Ack {
                        update_id: header.update_id,
                        duplicate: false,
                    })),
                    Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
                }
            }
            _ => Response::error(ErrorCode::NotFound, "benchmark server"),
        }
    }
    async fn enrol(&self, _: Fingerprint, _: Enrol) -> Result<(), ErrorReply> {
        Ok(())
    }
}

fn schema_for(params: usize) -> AdapterSchema {
    AdapterSchema::new(vec![TensorSpec {
        name: "delta".into(),
        shape: vec![params as u64],
    }])
    .expect("valid schema")
}

fn bench_limits() -> Limits {
    Limits {
        exchange_timeout: Duration::from_secs(300),
        ..Limits::default()
    }
}

/// A plain quinn server on the same TLS and transport settings: reads a stream to its end, answers one byte.
fn raw_server(identity: &SigningIdentity) -> Result<quinn::Endpoint, TransportError> {
    let verifier = Arc::new(EnrolledClientVerifier::new(
        Arc::new(Everyone),
        ClientPolicy::EnrolledOnly,
    ));
    let tls = tls::server_tls(identity, verifier, tls::ALPN)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(bench_limits().transport_config()?));
    let ep = quinn::Endpoint::server(
        cfg,
        "127.0.0.1:0"
            .parse()
            .map_err(|_| TransportError::Config("addr".into()))?,
    )?;
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    if recv.read_to_end(1 << 30).await.is_ok() {
                        let _ = send.write_all(&[1]).await;
                        let _ = send.finish();
                    }
                }
            });
        }
    });
    Ok(ep)
}

/// A loopback server that decodes and acknowledges updates for `schema`, and a client of `device` for it.
fn sink_pair(
    server_id: &SigningIdentity,
    device: &SigningIdentity,
    schema: AdapterSchema,
) -> Result<(Server, Client), TransportError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = Server::bind(
        any,
        any,
        server_id,
        Arc::new(Everyone),
        Arc::new(Sink { schema }),
        bench_limits(),
        EnrolmentLimits::default(),
    )?;
    let client = Client::new(
        device,
        server.fingerprint(),
        server.local_addr()?,
        bench_limits(),
    )?;
    Ok((server, client))
}

fn line(v: serde_json::Value) {
    println!("{v}");
}

/// Runs the transport benchmark on a multi-threaded runtime; prints one line per measurement.
pub fn run(args: &Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let server_id = SigningIdentity::from_seed([1; 32]);
    let device = SigningIdentity::from_seed([2; 32]);
    let any: SocketAddr = "127.0.0.1:0".parse()?;

    for &mb in &args.sizes_mb {
        let params = mb * (1 << 20) / 4;
        let schema = schema_for(params);
        let delta: Vec<f32> = (0..params)
            .map(|i| ((i % 1999) as f32 - 999.0) * 1e-5)
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);

        // Encode / decode throughput (MB of f32 delta per second).
        for (name, enc) in [
            ("f32", Encoding::F32),
            ("int8", Encoding::Int8 { block: 64 }),
        ] {
            let t = Instant::now();
            let bytes = encode_update(&schema, &delta, enc, &mut rng)?;
            let enc_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let back = decode_update(&bytes, &schema, &UpdateLimits::default())?;
            let dec_s = t.elapsed().as_secs_f64();
            assert_eq!(back.len(), params);
            let t = Instant::now();
            validate_update(&bytes, &schema, &UpdateLimits::default())?;
            let val_s = t.elapsed().as_secs_f64();
            let mbytes = (params * 4) as f64 / 1e6;
            line(serde_json::json!({
                "bench": "update_codec", "encoding": name, "params": params, "encoded_bytes": bytes.len(),
                "encode_mb_per_s": mbytes / enc_s, "decode_mb_per_s": mbytes / dec_s,
                "validate_mb_per_s": mbytes / val_s, "peak_rss_bytes": peak_rss(),
            }));
        }
        // The bulk digest both ends compute (BLAKE3 of the encoded f32 update), beside the SHA-256 it replaced.
        let bytes = encode_update(&schema, &delta, Encoding::F32, &mut rng)?;
        let t = Instant::now();
        let sha = starling_protocol::Digest::of(&bytes);
        let sha_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let blake = starling_protocol::BulkDigest::of(&bytes);
        let blake_s = t.elapsed().as_secs_f64();
        let mb = bytes.len() as f64 / 1e6;
        line(serde_json::json!({
            "bench": "bulk_digest", "bytes": bytes.len(), "blake3_mb_per_s": mb / blake_s,
            "sha256_mb_per_s": mb / sha_s, "blake3": blake.to_string(), "sha256": sha.to_hex(),
        }));

        // Full protocol uploads and raw quinn streams of the same size on the same TLS and transport
        // settings, alternating on two warm connections (neither path gets the cold first turn), best of
        // each; the ratio is of the two bests.
        let (server, client) = sink_pair(&server_id, &device, schema.clone())?;
        let session = client.connect().await?;
        let body = encode_update(&schema, &delta, Encoding::F32, &mut rng)?;
        let raw = raw_server(&server_id)?;
        let tls = tls::client_tls(&device, server_id.fingerprint(), tls::ALPN)?;
        let ep = quinn::Endpoint::client(any)?;
        let conn = ep
            .connect_with(
                quic_client_config(tls, &bench_limits())?,
                raw.local_addr()?,
                tls::SERVER_NAME,
            )?
            .await?;
        let (mut best, mut best_raw) = (f64::INFINITY, f64::INFINITY);
        for r in 0..args.repeats.max(1) {
            let t = Instant::now(); // the sender's BLAKE3 of the body is part of the cost
            let upload = Upload {
                update_id: UpdateId([r as u8; 16]),
                round: RoundId(1),
                model_version: ModelVersion(0),
                schema: schema.hash(),
                num_examples: 1,
                metrics: UpdateMetrics {
                    train_loss: 0.0,
                    steps: 1,
                    epsilon_spent: 0.0,
                },
                body: BulkHeader::describe(&body),
            };
            session.upload(upload, &body).await?;
            best = best.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&body).await?;
            send.finish()?;
            recv.read_to_end(16).await?;
            best_raw = best_raw.min(t.elapsed().as_secs_f64());
        }
        let mb = body.len() as f64 / 1e6;
        line(serde_json::json!({
            "bench": "upload", "path": "starling_protocol", "bytes": body.len(), "seconds": best,
            "mb_per_s": mb / best, "peak_rss_bytes": peak_rss(),
            "includes": "sender BLAKE3 + frame + bulk + receiver BLAKE3 + the f32 update checked as stored + ack",
        }));
        line(serde_json::json!({
            "bench": "upload", "path": "raw_quinn_stream", "bytes": body.len(), "seconds": best_raw,
            "mb_per_s": mb / best_raw, "peak_rss_bytes": peak_rss(),
        }));
        line(serde_json::json!({
            "bench": "upload_ratio", "bytes": body.len(), "protocol_over_raw": best_raw / best,
            "goal": 0.9, "repeats": args.repeats.max(1),
        }));
        drop(session);
        server.shutdown().await;
        conn.close(0u32.into(), b"done");
        raw.close(0u32.into(), b"done");
    }

    // Handshakes per second: a fresh connection each time (mutual TLS 1.3 + Hello/Welcome), sequential.
    let (server, client) = sink_pair(&server_id, &device, schema_for(1))?;
    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed().as_secs_f64() < args.handshake_seconds {
        let s = client.connect().await?;
        s.connection().close(0u32.into(), b"bench");
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    line(serde_json::json!({
        "bench": "handshake", "connections": n, "seconds": secs, "handshakes_per_s": f64::from(n) / secs,
        "mode": "sequential, mutual TLS 1.3 Ed25519 + Hello/Welcome", "peak_rss_bytes": peak_rss(),
    }));
    server.shutdown().await;
    Ok(())
}
