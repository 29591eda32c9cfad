//! A software WebAuthn authenticator for tests: ES256 (P-256) credentials,
//! `none` attestation, with knobs for hostile cases (another origin or RP
//! ID, no user verification, a counter that goes backwards, a clone).
//! Test support only: compiled with the `soft-authenticator` feature.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: panics are test failures

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::digest::{digest, SHA256};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde_json::{json, Value};

pub struct SoftAuthenticator {
    pkcs8: Vec<u8>,
    /// The credential id (set at registration).
    pub cred_id: Vec<u8>,
    pub user_handle: Vec<u8>,
    /// Origin written into the client data.
    pub origin: String,
    /// RP ID whose hash goes into the authenticator data (None: the one the
    /// options name).
    pub rp_id_override: Option<String>,
    /// Report user verification (PIN/biometric done).
    pub uv: bool,
    /// The signature counter; incremented before each assertion.
    pub counter: u32,
}

impl std::fmt::Debug for SoftAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftAuthenticator").finish_non_exhaustive()
    }
}

impl Clone for SoftAuthenticator {
    fn clone(&self) -> Self {
        SoftAuthenticator {
            pkcs8: self.pkcs8.clone(),
            cred_id: self.cred_id.clone(),
            user_handle: self.user_handle.clone(),
            origin: self.origin.clone(),
            rp_id_override: self.rp_id_override.clone(),
            uv: self.uv,
            counter: self.counter,
        }
    }
}

fn cbor_head(major: u8, len: u64) -> Vec<u8> {
    let m = major << 5;
    match len {
        0..=23 => vec![m | len as u8],
        24..=0xff => vec![m | 24, len as u8],
        0x100..=0xffff => {
            let mut v = vec![m | 25];
            v.extend_from_slice(&(len as u16).to_be_bytes());
            v
        }
        _ => {
            let mut v = vec![m | 26];
            v.extend_from_slice(&(len as u32).to_be_bytes());
            v
        }
    }
}

fn cbor_bytes(b: &[u8]) -> Vec<u8> {
    let mut v = cbor_head(2, b.len() as u64);
    v.extend_from_slice(b);
    v
}

fn cbor_text(s: &str) -> Vec<u8> {
    let mut v = cbor_head(3, s.len() as u64);
    v.extend_from_slice(s.as_bytes());
    v
}

fn cbor_int(i: i64) -> Vec<u8> {
    if i >= 0 {
        cbor_head(0, i as u64)
    } else {
        cbor_head(1, (-1 - i) as u64)
    }
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

impl SoftAuthenticator {
    pub fn new(origin: &str) -> SoftAuthenticator {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let cred_id = crate::passkey::soft::random16().to_vec();
        SoftAuthenticator {
            pkcs8,
            cred_id,
            user_handle: Vec::new(),
            origin: origin.to_owned(),
            rp_id_override: None,
            uv: true,
            counter: 0,
        }
    }

    fn pair(&self) -> EcdsaKeyPair {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &self.pkcs8,
            &SystemRandom::new(),
        )
        .unwrap()
    }

    fn flags(&self, attested: bool) -> u8 {
        let mut f = 0x01; // user present
        if self.uv {
            f |= 0x04;
        }
        if attested {
            f |= 0x40;
        }
        f
    }

    fn client_data(&self, kind: &str, challenge: &str) -> Vec<u8> {
        json!({"type": kind, "challenge": challenge, "origin": self.origin, "crossOrigin": false})
            .to_string()
            .into_bytes()
    }

    /// Answer `navigator.credentials.create(options)`: the response JSON.
    pub fn register(&mut self, options_json: &str) -> String {
        let o: Value = serde_json::from_str(options_json).unwrap();
        let rp_id = self
            .rp_id_override
            .clone()
            .unwrap_or_else(|| o["rp"]["id"].as_str().unwrap().to_owned());
        self.user_handle = URL_SAFE_NO_PAD
            .decode(o["user"]["id"].as_str().unwrap())
            .unwrap();
        let challenge = o["challenge"].as_str().unwrap();
        let cdata = self.client_data("webauthn.create", challenge);
        let pair = self.pair();
        let point = pair.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..65]);
        let mut cose = cbor_head(5, 5);
        cose.extend(cbor_int(1));
        cose.extend(cbor_int(2)); // kty: EC2
        cose.extend(cbor_int(3));
        cose.extend(cbor_int(-7)); // alg: ES256
        cose.extend(cbor_int(-1));
        cose.extend(cbor_int(1)); // crv: P-256
        cose.extend(cbor_int(-2));
        cose.extend(cbor_bytes(x));
        cose.extend(cbor_int(-3));
        cose.extend(cbor_bytes(y));
        let mut adata = digest(&SHA256, rp_id.as_bytes()).as_ref().to_vec();
        adata.push(self.flags(true));
        adata.extend_from_slice(&self.counter.to_be_bytes());
        adata.extend_from_slice(&[0u8; 16]); // AAGUID
        adata.extend_from_slice(&(self.cred_id.len() as u16).to_be_bytes());
        adata.extend_from_slice(&self.cred_id);
        adata.extend_from_slice(&cose);
        let mut att = cbor_head(5, 3);
        att.extend(cbor_text("fmt"));
        att.extend(cbor_text("none"));
        att.extend(cbor_text("attStmt"));
        att.extend(cbor_head(5, 0));
        att.extend(cbor_text("authData"));
        att.extend(cbor_bytes(&adata));
        // SubjectPublicKeyInfo for a P-256 key: fixed prefix + the point.
        let mut spki = hex_decode("3059301306072a8648ce3d020106082a8648ce3d030107034200");
        spki.extend_from_slice(point);
        json!({
            "id": b64(&self.cred_id),
            "rawId": b64(&self.cred_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(&cdata),
                "attestationObject": b64(&att),
                "authenticatorData": b64(&adata),
                "publicKey": b64(&spki),
                "publicKeyAlgorithm": -7,
                "transports": ["internal"],
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        })
        .to_string()
    }

    /// Answer `navigator.credentials.get(options)`: the response JSON.
    pub fn authenticate(&mut self, options_json: &str) -> String {
        let o: Value = serde_json::from_str(options_json).unwrap();
        let rp_id = self
            .rp_id_override
            .clone()
            .unwrap_or_else(|| o["rpId"].as_str().unwrap().to_owned());
        let challenge = o["challenge"].as_str().unwrap();
        self.counter = self.counter.wrapping_add(1);
        let cdata = self.client_data("webauthn.get", challenge);
        let mut adata = digest(&SHA256, rp_id.as_bytes()).as_ref().to_vec();
        adata.push(self.flags(false));
        adata.extend_from_slice(&self.counter.to_be_bytes());
        let mut signed = adata.clone();
        signed.extend_from_slice(digest(&SHA256, &cdata).as_ref());
        let sig = self
            .pair()
            .sign(&SystemRandom::new(), &signed)
            .unwrap()
            .as_ref()
            .to_vec();
        json!({
            "id": b64(&self.cred_id),
            "rawId": b64(&self.cred_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(&cdata),
                "authenticatorData": b64(&adata),
                "signature": b64(&sig),
                "userHandle": b64(&self.user_handle),
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        })
        .to_string()
    }
}

pub(crate) fn random16() -> [u8; 16] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).unwrap();
    b
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
