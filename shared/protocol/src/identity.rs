//! Who is who: ed25519 key pairs for devices and for the coordinator, their fingerprints, and one-time
//! enrolment tokens.
//!
//! A fingerprint is the SHA-256 of the key's DER `SubjectPublicKeyInfo` — the same bytes a TLS certificate made
//! from that key carries — so a fingerprint pinned at enrolment identifies the peer whatever certificate
//! wraps the key. Tokens are random, shown to the operator once, and stored only as their SHA-256.
//! What must never live here: certificates and TLS (the transport builds those from these keys).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::{from_hex, hex, Digest, ProtocolError};

/// DER prefix of an Ed25519 `SubjectPublicKeyInfo` (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (0 unused bits) } — followed by the 32-byte public key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410), followed by the 32-byte seed.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The SHA-256 of a public key's DER SubjectPublicKeyInfo: a device's client id, a coordinator's pin.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo (any algorithm).
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Digest::of(spki_der).0)
    }

    /// The fingerprint of a raw Ed25519 public key.
    pub fn of_ed25519(public: &[u8; 32]) -> Self {
        Self::of_spki(&ed25519_spki(public))
    }

    /// Parses the 64-character hex form operators copy around.
    pub fn from_hex(s: &str) -> Result<Self, ProtocolError> {
        let bytes = from_hex(s.trim())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| ProtocolError::InvalidKey {
                what: "fingerprint",
                detail: "expected 64 hex characters".into(),
            })?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(Self(out))
    }

    /// The 64-character hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// DER SubjectPublicKeyInfo of an Ed25519 public key.
pub fn ed25519_spki(public: &[u8; 32]) -> Vec<u8> {
    [&SPKI_PREFIX[..], public].concat()
}

/// The raw Ed25519 public key inside a DER SubjectPublicKeyInfo; an error for any other algorithm or form.
pub fn ed25519_public_from_spki(spki_der: &[u8]) -> Result<[u8; 32], ProtocolError> {
    match spki_der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(key) if key.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(key);
            Ok(out)
        }
        _ => Err(ProtocolError::InvalidKey {
            what: "public key",
            detail: "not an Ed25519 SubjectPublicKeyInfo".into(),
        }),
    }
}

/// Fills `buf` from the operating system's secure generator.
pub fn os_random(buf: &mut [u8]) -> Result<(), ProtocolError> {
    getrandom::fill(buf).map_err(|e| ProtocolError::Entropy(e.to_string()))
}

/// An Ed25519 key pair: a device's identity (its TLS client key) or the coordinator's TLS or model-signing key.
pub struct SigningIdentity {
    key: SigningKey,
}

impl std::fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "SigningIdentity({})", self.fingerprint())
    }
}

impl SigningIdentity {
    /// A fresh key pair from the operating system's secure generator.
    pub fn generate() -> Result<Self, ProtocolError> {
        let mut seed = [0u8; 32];
        os_random(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    /// The key pair of a 32-byte secret seed (as stored on disk; tests use fixed seeds).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads the PKCS#8 v1 DER form written by [`SigningIdentity::pkcs8_der`].
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, ProtocolError> {
        match der.strip_prefix(&PKCS8_PREFIX[..]) {
            Some(seed) if seed.len() == 32 => {
                let mut s = [0u8; 32];
                s.copy_from_slice(seed);
                Ok(Self::from_seed(s))
            }
            _ => Err(ProtocolError::InvalidKey {
                what: "private key",
                detail: "not an Ed25519 PKCS#8 v1 key".into(),
            }),
        }
    }

    /// The secret seed (store it with owner-only permissions).
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// PKCS#8 v1 DER of the private key, the form TLS libraries load.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        [&PKCS8_PREFIX[..], &self.key.to_bytes()].concat()
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// DER SubjectPublicKeyInfo of the public key.
    pub fn spki_der(&self) -> Vec<u8> {
        ed25519_spki(&self.public_key())
    }

    /// This key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_ed25519(&self.public_key())
    }

    /// An Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Verifies an Ed25519 signature strictly (no malleable or small-order forms).
pub fn verify_ed25519(
    public: &[u8; 32],
    message: &[u8],
    signature: &[u8],
) -> Result<(), ProtocolError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| ProtocolError::BadSignature)?;
    let sig =
        ed25519_dalek::Signature::from_slice(signature).map_err(|_| ProtocolError::BadSignature)?;
    key.verify_strict(message, &sig)
        .map_err(|_| ProtocolError::BadSignature)?;
    Ok(())
}

/// Prefix of every enrolment token, so a token pasted in the wrong place is recognisable.
const TOKEN_PREFIX: &str = "stk1_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 24;

/// A one-time enrolment token as the operator hands it to a device: shown once, never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolmentToken(String);

impl std::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrolmentToken(…)")
    }
}

/// The stored form of an enrolment token: its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TokenHash(pub Digest);

impl EnrolmentToken {
    /// A fresh random token and the hash to store for it.
    pub fn generate() -> Result<(Self, TokenHash), ProtocolError> {
        let mut raw = [0u8; TOKEN_BYTES];
        os_random(&mut raw)?;
        let token = Self(format!("{TOKEN_PREFIX}{}", hex(&raw)));
        let hash = token.hash();
        Ok((token, hash))
    }

    /// Checks the form of a token typed or pasted by a person.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        let s = s.trim();
        let ok = s
            .strip_prefix(TOKEN_PREFIX)
            .and_then(from_hex)
            .is_some_and(|b| b.len() == TOKEN_BYTES);
        if !ok {
            return Err(ProtocolError::InvalidKey {
                what: "enrolment token",
                detail: format!(
                    "expected {TOKEN_PREFIX} followed by {} hex characters",
                    TOKEN_BYTES * 2
                ),
            });
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The hash the coordinator stores and compares.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Digest::of(self.0.as_bytes()))
    }

    /// The token text, to show once.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_der_and_fingerprints_are_spki_hashes() {
        let id = SigningIdentity::from_seed([7; 32]);
        let again = SigningIdentity::from_pkcs8_der(&id.pkcs8_der()).unwrap();
        assert_eq!(again.public_key(), id.public_key());
        assert_eq!(
            ed25519_public_from_spki(&id.spki_der()).unwrap(),
            id.public_key()
        );
        assert_eq!(id.fingerprint(), Fingerprint::of_spki(&id.spki_der()));
        assert_eq!(
            Fingerprint::from_hex(&id.fingerprint().to_hex()).unwrap(),
            id.fingerprint()
        );
        assert!(Fingerprint::from_hex("abcd").is_err());
        assert!(SigningIdentity::from_pkcs8_der(&[0; 48]).is_err());
        assert!(ed25519_public_from_spki(&id.spki_der()[1..]).is_err());
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let id = SigningIdentity::generate().unwrap();
        let sig = id.sign(b"model v3");
        verify_ed25519(&id.public_key(), b"model v3", &sig).unwrap();
        assert_eq!(
            verify_ed25519(&id.public_key(), b"model v4", &sig),
            Err(ProtocolError::BadSignature)
        );
        assert_eq!(
            verify_ed25519(&id.public_key(), b"model v3", &sig[..63]),
            Err(ProtocolError::BadSignature)
        );
        let other = SigningIdentity::generate().unwrap();
        assert_eq!(
            verify_ed25519(&other.public_key(), b"model v3", &sig),
            Err(ProtocolError::BadSignature)
        );
    }

    #[test]
    fn tokens_are_random_parse_back_and_hash_stably() {
        let (a, ha) = EnrolmentToken::generate().unwrap();
        let (b, _) = EnrolmentToken::generate().unwrap();
        assert_ne!(a, b);
        let parsed = EnrolmentToken::parse(&format!(
            "  {}\n",
            a.as_str().to_uppercase().replace("STK1_", "stk1_")
        ))
        .unwrap();
        assert_eq!(parsed.hash(), ha);
        assert!(EnrolmentToken::parse("stk1_zz").is_err());
        assert!(EnrolmentToken::parse(&a.as_str()[5..]).is_err());
        assert!(!format!("{a:?}").contains(&a.as_str()[5..]));
    }
}
