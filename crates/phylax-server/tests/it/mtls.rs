//! Mutual TLS and certificate-bound access tokens (RFC 8705): a client
//! registered `--cert-bound` gets tokens only over a connection with a
//! certificate from `[tls] client_ca`, and its tokens work only over a
//! connection with that same certificate; clients without certificates
//! connect as before; a certificate from another CA is refused at the
//! handshake.

use crate::common;
use common::{Backend, TestServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA (PEM) and a client certificate it issued, with its key (PEM).
struct Pki {
    ca: String,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Pki {
            ca: ca_cert.pem(),
            ca_cert,
            ca_key,
        }
    }

    /// A client certificate and key, PEM, as reqwest's identity wants.
    fn client(&self, name: &str) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem()).into_bytes()
    }
}

/// An HTTPS client trusting the server's CA, presenting `identity`.
fn with_cert(s: &TestServer, identity: &[u8]) -> reqwest::Client {
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(identity).unwrap())
        .build()
        .unwrap()
}

async fn token_request(
    s: &TestServer,
    http: &reqwest::Client,
    id: &str,
    key: &[u8],
) -> (u16, serde_json::Value) {
    let assertion = s.assertion(id, key);
    match http
        .post(s.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.rs"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}

async fn search(s: &TestServer, http: &reqwest::Client, tok: &str) -> u16 {
    http.get(format!("{}/Patient", s.fhir))
        .bearer_auth(tok)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn mtls(backend: Backend) {
    let pki = Pki::new("Hospital client CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("client-ca.pem");
    std::fs::write(&ca_file, &pki.ca).unwrap();
    let Some(s) =
        TestServer::start_with(backend, |c| c.tls.client_ca = Some(ca_file.clone())).await
    else {
        return;
    };
    let mine = with_cert(&s, &pki.client("integration engine"));
    let other = with_cert(&s, &pki.client("another system"));
    // A cert-bound Backend Services client.
    let g = phylax_auth::client_key::generate().unwrap();
    let key = g.private_pem.expose().to_vec();
    let id = uuid::Uuid::new_v4().to_string();
    s.store
        .add_client(&phylax_store::ClientRecord {
            id: id.clone(),
            name: "bound".into(),
            scope: "system/Patient.rs".into(),
            jwks: g.jwks.clone(),
            disabled: false,
            created_at: 0,
            redirect_uris: vec![],
            public: false,
            first_party: false,
            cert_bound: true,
        })
        .await
        .unwrap();
    assert!(s.store.get_client(&id).await.unwrap().unwrap().cert_bound);
    // Without its certificate: no token.
    let (st, b) = token_request(&s, &s.http, &id, &key).await;
    assert_eq!(
        (st, b["error"].as_str()),
        (401, Some("invalid_client")),
        "{b}"
    );
    // With it: a token bound to it.
    let (st, b) = token_request(&s, &mine, &id, &key).await;
    assert_eq!(st, 200, "{b}");
    let tok = b["access_token"].as_str().unwrap().to_owned();
    let claims = s.state.authn.tokens.verify(&tok, common::now()).unwrap();
    let thumb = claims.cnf.as_ref().unwrap().x5t_s256.clone();
    assert_eq!(thumb.len(), 43, "SHA-256, base64url");
    assert_eq!(search(&s, &mine, &tok).await, 200);
    // The token alone (stolen from a log, a proxy) is useless: not on a
    // connection without a certificate, nor with another valid one.
    assert_eq!(search(&s, &s.http, &tok).await, 401);
    assert_eq!(search(&s, &other, &tok).await, 401);
    // A certificate from another CA does not even connect.
    let rogue = with_cert(&s, &Pki::new("Rogue CA").client("integration engine"));
    assert_eq!(search(&s, &rogue, &tok).await, 0);
    // Announced in the SMART configuration (RFC 8705 §3.3).
    let conf: serde_json::Value = s
        .http
        .get(format!("{}/.well-known/smart-configuration", s.fhir))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conf["tls_client_certificate_bound_access_tokens"], true);
    // Clients that are not bound work as before, certificate or not.
    let plain = s.token("system/Patient.rs").await;
    assert_eq!(search(&s, &s.http, &plain).await, 200);
    assert_eq!(search(&s, &mine, &plain).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_sqlite() {
    mtls(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_postgres() {
    mtls(Backend::Postgres).await;
}
