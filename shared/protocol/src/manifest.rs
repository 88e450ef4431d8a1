//! Signed model manifests: what a published model version is, signed with the coordinator's model-signing key.
//!
//! The manifest is encoded once into canonical bytes (bincode, fixed-width little-endian) and those exact
//! bytes travel as [`SignedManifest::body`] beside an Ed25519 signature over a domain tag plus the body, so
//! the signature covers exactly the bytes sent and nothing is re-encoded before verification. A client runs
//! [`ManifestVerifier`]: trusted signer, valid signature, well-formed body, version strictly newer than the
//! one held (no rollback or replay), parent equal to the held manifest when consecutive, and adapter bytes
//! whose SHA-256 equals the manifest's. What must never live here: fetching blobs, clocks, key storage.

use crate::identity::{verify_ed25519, Fingerprint, SigningIdentity};
use crate::update::AdapterSchema;
use crate::{codec, Digest, ModelVersion, ProtocolError, RoundId};

/// Domain tag prefixed to the body before signing, so no other signed Starling object can pass as a manifest.
const SIGNING_DOMAIN: &[u8] = b"starling-manifest/1\0";
/// Cap on a manifest body (it carries the adapter schema: hundreds of tensor names).
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// How the model's adapter was privatised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DpMode {
    /// No differential privacy.
    Off,
    /// Example-level DP-SGD on each device.
    ExampleLevel,
    /// User-level DP-FedAvg, noise added by the coordinator.
    UserCentral,
    /// User-level DP-FedAvg, noise split across a guaranteed number of clients.
    UserDistributed {
        /// Clients whose noise shares add up to the full noise.
        clients: u32,
    },
}

/// The privacy facts of a model version.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpRecord {
    /// Where the noise came from.
    pub mode: DpMode,
    /// Noise standard deviation over the clip bound.
    pub noise_multiplier: f64,
    /// L2 clip bound of one contribution.
    pub clip: f64,
    /// ε spent up to and including this version.
    pub epsilon_spent: f64,
    /// δ of that ε.
    pub delta: f64,
}

impl DpRecord {
    /// A version made without differential privacy.
    pub const OFF: DpRecord = DpRecord {
        mode: DpMode::Off,
        noise_multiplier: 0.0,
        clip: 0.0,
        epsilon_spent: 0.0,
        delta: 0.0,
    };
}

/// A published model version.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// This version (strictly increasing).
    pub version: ModelVersion,
    /// Digest of the previous version's manifest body (`None` for version 0).
    pub parent_digest: Option<Digest>,
    /// SHA-256 of the frozen base model container.
    pub base_digest: Digest,
    /// SHA-256 of the adapter blob.
    pub adapter_digest: Digest,
    /// Layout of the adapter and of update deltas for this version.
    pub adapter_schema: AdapterSchema,
    /// The round that produced it.
    pub round: RoundId,
    /// Name of the aggregation strategy.
    pub strategy: String,
    /// Privacy facts.
    pub dp: DpRecord,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_unix_ms: u64,
}

/// A manifest's canonical bytes, its signer and the signature — exactly what is sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedManifest {
    /// Canonical encoding of the [`Manifest`].
    pub body: Vec<u8>,
    /// Fingerprint of the signing key.
    pub signer: Fingerprint,
    /// Ed25519 signature over the signing domain and `body` (64 bytes).
    pub signature: Vec<u8>,
}

impl Manifest {
    /// Encodes and signs this manifest with the coordinator's model-signing key.
    pub fn sign(&self, key: &SigningIdentity) -> SignedManifest {
        let body = codec::encode(self);
        let signature = key.sign(&signed_bytes(&body)).to_vec();
        SignedManifest {
            body,
            signer: key.fingerprint(),
            signature,
        }
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        self.adapter_schema.validate()?;
        let d = &self.dp;
        let finite = [d.noise_multiplier, d.clip, d.epsilon_spent, d.delta]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0);
        if !finite || d.delta > 1.0 {
            return Err(ProtocolError::Malformed {
                what: "manifest",
                detail: "privacy figures must be finite and non-negative, δ ≤ 1".into(),
            });
        }
        // The record's mode and its figures must agree: "off" spends nothing and clips nothing, a
        // user-level mode has a clip bound.
        let contradiction = match d.mode {
            DpMode::Off if *d != DpRecord::OFF => {
                Some("privacy record says DP is off but carries a clip, noise or ε")
            }
            DpMode::UserCentral | DpMode::UserDistributed { .. } if d.clip <= 0.0 => {
                Some("privacy record of user-level DP has no clip bound")
            }
            _ => None,
        };
        if let Some(detail) = contradiction {
            return Err(ProtocolError::Malformed {
                what: "manifest",
                detail: detail.into(),
            });
        }
        if self.strategy.len() > 256 {
            return Err(ProtocolError::Malformed {
                what: "manifest",
                detail: "strategy name longer than 256 bytes".into(),
            });
        }
        Ok(())
    }
}

impl SignedManifest {
    /// The manifest's identity: SHA-256 of its body (what a child names as its parent).
    pub fn digest(&self) -> Digest {
        Digest::of(&self.body)
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, body].concat()
}

/// A client's view: which signing keys it trusts and which version it holds.
#[derive(Debug, Clone)]
pub struct ManifestVerifier {
    trusted: Vec<[u8; 32]>,
    held: Option<(ModelVersion, Digest)>,
}

impl ManifestVerifier {
    /// Trusts the given Ed25519 public keys; holds no version yet.
    pub fn new(trusted: Vec<[u8; 32]>) -> Self {
        Self {
            trusted,
            held: None,
        }
    }

    /// Resumes from a version already held (its number and manifest digest), e.g. after a restart.
    pub fn holding(mut self, version: ModelVersion, digest: Digest) -> Self {
        self.held = Some((version, digest));
        self
    }

    /// The version held, if any.
    pub fn held(&self) -> Option<(ModelVersion, Digest)> {
        self.held
    }

    /// Checks signer, signature, body, version order and parent; returns the manifest without accepting it.
    pub fn verify(&self, signed: &SignedManifest) -> Result<Manifest, ProtocolError> {
        if signed.body.len() > MAX_MANIFEST_BYTES {
            return Err(ProtocolError::PayloadTooLarge {
                len: signed.body.len() as u64,
                max: MAX_MANIFEST_BYTES as u64,
            });
        }
        let key = self
            .trusted
            .iter()
            .find(|k| Fingerprint::of_ed25519(k) == signed.signer)
            .ok_or(ProtocolError::UnknownKey(signed.signer))?;
        verify_ed25519(key, &signed_bytes(&signed.body), &signed.signature)?;
        let m: Manifest = codec::decode(&signed.body, "manifest")?;
        m.validate()?;
        if let Some((held, held_digest)) = self.held {
            if m.version <= held {
                return Err(ProtocolError::Rollback {
                    held: held.0,
                    got: m.version.0,
                });
            }
            if m.version.0 == held.0 + 1 && m.parent_digest != Some(held_digest) {
                return Err(ProtocolError::ParentMismatch {
                    held: held_digest,
                    got: m.parent_digest,
                });
            }
        }
        Ok(m)
    }

    /// Verifies the manifest and the adapter bytes it names, then holds it as the current version.
    /// On any error the previously held version stays.
    pub fn accept(
        &mut self,
        signed: &SignedManifest,
        adapter: &[u8],
    ) -> Result<Manifest, ProtocolError> {
        let m = self.verify(signed)?;
        let actual = Digest::of(adapter);
        if actual != m.adapter_digest {
            return Err(ProtocolError::DigestMismatch {
                declared: m.adapter_digest,
                actual,
            });
        }
        self.held = Some((m.version, signed.digest()));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::TensorSpec;

    fn manifest(version: u64, parent: Option<Digest>, adapter: &[u8]) -> Manifest {
        Manifest {
            version: ModelVersion(version),
            parent_digest: parent,
            base_digest: Digest::of(b"base"),
            adapter_digest: Digest::of(adapter),
            adapter_schema: AdapterSchema::new(vec![TensorSpec {
                name: "a".into(),
                shape: vec![4, 2],
            }])
            .unwrap(),
            round: RoundId(version),
            strategy: "fedavg".into(),
            dp: DpRecord {
                mode: DpMode::UserCentral,
                noise_multiplier: 1.1,
                clip: 0.5,
                epsilon_spent: 0.7,
                delta: 1e-6,
            },
            created_at_unix_ms: 1_700_000_000_000 + version,
        }
    }

    #[test]
    fn a_chain_of_versions_is_accepted_in_order() {
        let key = SigningIdentity::from_seed([1; 32]);
        let mut v = ManifestVerifier::new(vec![key.public_key()]);
        let s0 = manifest(0, None, b"a0").sign(&key);
        assert_eq!(v.accept(&s0, b"a0").unwrap(), manifest(0, None, b"a0"));
        let s1 = manifest(1, Some(s0.digest()), b"a1").sign(&key);
        v.accept(&s1, b"a1").unwrap();
        // Versions may be skipped (a device offline for a while); the parent is then not checked.
        let s5 = manifest(5, Some(Digest::of(b"elsewhere")), b"a5").sign(&key);
        v.accept(&s5, b"a5").unwrap();
        assert_eq!(v.held(), Some((ModelVersion(5), s5.digest())));
        // Encoding is canonical: signing twice gives the same body.
        assert_eq!(
            manifest(5, Some(Digest::of(b"elsewhere")), b"a5")
                .sign(&key)
                .body,
            s5.body
        );
    }

    #[test]
    fn every_failure_is_typed_and_keeps_the_held_version() {
        let key = SigningIdentity::from_seed([1; 32]);
        let stranger = SigningIdentity::from_seed([2; 32]);
        let s0 = manifest(0, None, b"a0").sign(&key);
        let mut v = ManifestVerifier::new(vec![key.public_key()]);
        v.accept(&s0, b"a0").unwrap();
        let held = v.held();

        let s1 = manifest(1, Some(s0.digest()), b"a1").sign(&key);
        let mut flipped = s1.clone();
        flipped.body[10] ^= 1;
        assert_eq!(v.accept(&flipped, b"a1"), Err(ProtocolError::BadSignature));
        let mut short = s1.clone();
        short.signature.pop();
        assert_eq!(v.accept(&short, b"a1"), Err(ProtocolError::BadSignature));
        let foreign = manifest(1, Some(s0.digest()), b"a1").sign(&stranger);
        assert_eq!(
            v.accept(&foreign, b"a1"),
            Err(ProtocolError::UnknownKey(stranger.fingerprint()))
        );
        // A stranger's signature presented under the trusted fingerprint.
        let mut forged = foreign.clone();
        forged.signer = key.fingerprint();
        assert_eq!(v.accept(&forged, b"a1"), Err(ProtocolError::BadSignature));
        assert!(matches!(
            v.accept(&s1, b"tampered"),
            Err(ProtocolError::DigestMismatch { .. })
        ));
        assert_eq!(
            v.accept(&s0, b"a0"),
            Err(ProtocolError::Rollback { held: 0, got: 0 })
        );
        let orphan = manifest(1, Some(Digest::of(b"other")), b"a1").sign(&key);
        assert!(matches!(
            v.accept(&orphan, b"a1"),
            Err(ProtocolError::ParentMismatch { .. })
        ));
        let mut nan = manifest(1, Some(s0.digest()), b"a1");
        nan.dp.epsilon_spent = f64::NAN;
        assert!(matches!(
            v.accept(&nan.sign(&key), b"a1"),
            Err(ProtocolError::Malformed { .. })
        ));
        // Records whose mode and figures disagree: "off" with a spent ε, a user-level mode without a clip.
        let mut off_spent = manifest(1, Some(s0.digest()), b"a1");
        off_spent.dp = DpRecord {
            epsilon_spent: 2.0,
            ..DpRecord::OFF
        };
        let mut unclipped = manifest(1, Some(s0.digest()), b"a1");
        unclipped.dp.clip = 0.0;
        for m in [off_spent, unclipped] {
            assert!(matches!(
                v.accept(&m.sign(&key), b"a1"),
                Err(ProtocolError::Malformed { .. })
            ));
        }
        // A correctly signed body with trailing garbage is refused too.
        let mut trailing = s1.clone();
        trailing.body.push(0);
        trailing.signature = key.sign(&signed_bytes(&trailing.body)).to_vec();
        assert!(matches!(
            v.accept(&trailing, b"a1"),
            Err(ProtocolError::Malformed { .. })
        ));
        assert_eq!(v.held(), held);
        v.accept(&s1, b"a1").unwrap();
    }
}
