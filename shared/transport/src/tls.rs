//! Mutual TLS 1.3 for Starling's QUIC endpoints: certificates made from our Ed25519 identities, a server-side
//! verifier that asks the operator's registry (an [`Authorizer`]) whether a client key may connect, and a
//! client-side verifier that accepts exactly one pinned coordinator key.
//!
//! No web PKI is involved: keys are pinned by fingerprint (SHA-256 of the SubjectPublicKeyInfo), so
//! certificate names and validity dates carry no meaning and are not checked; what is checked is that the
//! peer's certificate holds the expected (or an enrolled) key and that the peer proves possession of it by
//! signing the TLS 1.3 handshake. Only Ed25519 is offered or accepted.
//! What must never live here: message handling or any decision about which keys are enrolled.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SignatureVerificationAlgorithm,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use starling_protocol::identity::ed25519_public_from_spki;
use starling_protocol::{Fingerprint, SigningIdentity};

use crate::TransportError;

/// The ALPN protocol id of Starling's protocol.
pub const ALPN: &[u8] = b"starling/1";
/// The ALPN protocol id of the enrolment endpoint (the one exchange an unenrolled key may make).
pub const ALPN_ENROL: &[u8] = b"starling-enrol/1";
/// The server name clients send (certificates are pinned, so it only has to be a valid name).
pub const SERVER_NAME: &str = "starling";

/// What the operator's registry says about a client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Enrolled and not revoked: may connect.
    Allowed,
    /// Never enrolled.
    NotEnrolled,
    /// Enrolled once, since revoked.
    Revoked,
}

/// The coordinator's registry of client keys, asked during every handshake.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    /// Whether the key with this fingerprint may connect.
    fn access(&self, client: &Fingerprint) -> Access;
}

/// A self-signed certificate for `identity`'s Ed25519 key and the key in the form rustls loads.
pub fn certificate(
    identity: &SigningIdentity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TransportError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(identity.pkcs8_der());
    let key_pair = rcgen::KeyPair::try_from(&pkcs8)?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    let cert = params.self_signed(&key_pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// The fingerprint of the Ed25519 key in a DER certificate; an error for other algorithms or bad DER.
pub fn certificate_fingerprint(cert: &CertificateDer<'_>) -> Result<Fingerprint, TransportError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TransportError::Certificate(format!("unparseable certificate: {e:?}")))?;
    let spki = parsed.subject_public_key_info();
    ed25519_public_from_spki(spki.as_ref())?;
    Ok(Fingerprint::of_spki(spki.as_ref()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Only Ed25519 handshake signatures (ring's verifier for that one scheme).
fn ed25519_algorithms() -> WebPkiSupportedAlgorithms {
    type Mapping = [(
        SignatureScheme,
        &'static [&'static dyn SignatureVerificationAlgorithm],
    )];
    static ONLY_ED25519: OnceLock<&'static Mapping> = OnceLock::new();
    let all = ring::default_provider().signature_verification_algorithms;
    let mapping = ONLY_ED25519.get_or_init(|| {
        let v: Vec<_> = all
            .mapping
            .iter()
            .filter(|(scheme, _)| *scheme == SignatureScheme::ED25519)
            .copied()
            .collect();
        // Built once per process: a few bytes, alive as long as the provider's own static tables.
        Vec::leak(v)
    });
    WebPkiSupportedAlgorithms {
        all: all.all,
        mapping,
    }
}

/// TLS 1.2 is never negotiated (QUIC and our configurations are TLS 1.3 only); both verifiers say so.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

fn refuse(e: CertificateError) -> rustls::Error {
    rustls::Error::InvalidCertificate(e)
}

/// Which keys a server endpoint lets finish the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPolicy {
    /// Only enrolled, unrevoked keys (the protocol endpoint).
    EnrolledOnly,
    /// Any Ed25519 key that is not revoked (the enrolment endpoint; it serves only the enrolment exchange).
    Enrolment,
}

/// Server-side verifier: requires a client certificate and asks the [`Authorizer`] about its key.
#[derive(Debug)]
pub struct EnrolledClientVerifier {
    authorizer: Arc<dyn Authorizer>,
    policy: ClientPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl EnrolledClientVerifier {
    /// A verifier consulting `authorizer` under `policy`.
    pub fn new(authorizer: Arc<dyn Authorizer>, policy: ClientPolicy) -> Self {
        Self {
            authorizer,
            policy,
            algorithms: ed25519_algorithms(),
        }
    }
}

impl ClientCertVerifier for EnrolledClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = certificate_fingerprint(end_entity)
            .map_err(|_| refuse(CertificateError::BadEncoding))?;
        match (self.authorizer.access(&fp), self.policy) {
            (Access::Allowed, _) | (Access::NotEnrolled, ClientPolicy::Enrolment) => {
                Ok(ClientCertVerified::assertion())
            }
            (Access::Revoked, _) => Err(refuse(CertificateError::Revoked)),
            (Access::NotEnrolled, ClientPolicy::EnrolledOnly) => {
                Err(refuse(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Client-side verifier: the coordinator must present the one pinned key (and prove possession of it).
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    /// Accepts only the key with fingerprint `pin`.
    pub fn new(pin: Fingerprint) -> Self {
        Self {
            pin,
            algorithms: ed25519_algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = certificate_fingerprint(end_entity)
            .map_err(|_| refuse(CertificateError::BadEncoding))?;
        if fp == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// rustls server configuration: TLS 1.3 only, our certificate, client certificates verified by `verifier`.
pub fn server_tls(
    identity: &SigningIdentity,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TransportError> {
    let (cert, key) = certificate(identity)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // No session resumption and no 0-RTT: a resumed session skips client-certificate verification, so a key
    // revoked after its first handshake could come back on a ticket (a test caught exactly that).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// rustls client configuration: TLS 1.3 only, the coordinator pinned, our certificate presented.
pub fn client_tls(
    identity: &SigningIdentity,
    pin: Fingerprint,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TransportError> {
    let (cert, key) = certificate(identity)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(pin)))
        .with_client_auth_cert(vec![cert], key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// A client configuration that presents no certificate (only to show in tests that the server refuses it).
pub fn client_tls_without_certificate(
    pin: Fingerprint,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TransportError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(pin)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let id = SigningIdentity::from_seed([4; 32]);
        let (cert, _) = certificate(&id).unwrap();
        assert_eq!(certificate_fingerprint(&cert).unwrap(), id.fingerprint());
        assert!(certificate_fingerprint(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
