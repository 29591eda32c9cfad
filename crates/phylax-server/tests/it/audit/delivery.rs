//! Alerts and records leaving the server: signed webhook, syslog over TLS, config, detector.

use super::*;

/// A scripted scraping run raises an alert: recorded as an AuditEvent and
/// delivered to a webhook receiver over HTTPS with an HMAC signature, and
/// retried from the spool after the receiver first refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_signed_webhook_and_survive_a_refusal() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    // The receiver: HTTPS with its own CA; refuses the first delivery.
    let rdir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = receiver_tls(rdir.path());
    let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let got2 = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap, body: axum::body::Bytes| {
            let got = got2.clone();
            async move {
                let mut g = got.lock().unwrap();
                let status = if g.is_empty() { 503 } else { 200 };
                let sig = h
                    .get("x-phylax-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                g.push((status, sig, body.to_vec()));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = phylax_server::net::tls::server_config(&cert, &key).unwrap();
    tokio::spawn(phylax_server::net::tls::serve_tls(
        listener,
        tls,
        app,
        std::future::pending(),
    ));

    let secret = b"0123456789abcdef0123456789abcdef-test-secret";
    let secret_file = rdir.path().join("webhook.secret");
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.detect.scraping_patients = 3;
        c.detect.webhook_url = Some(format!("https://127.0.0.1:{}/hook", addr.port()));
        c.detect.webhook_ca_file = Some(ca.clone());
        c.detect.webhook_secret_file = Some(secret_file.clone());
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    use reqwest::Method as M;
    for i in 0..3 {
        let (st, p) = send(
            &s,
            &tok,
            M::POST,
            "/Patient",
            Some(&json!({"resourceType": "Patient", "gender": "other", "id": format!("x{i}")})),
        )
        .await;
        assert_eq!(st, 201);
        let id = p["id"].as_str().unwrap().to_owned();
        assert_eq!(
            send(&s, &tok, M::GET, &format!("/Patient/{id}"), None)
                .await
                .0,
            200
        );
    }
    // Delivered after one refusal and a retry.
    let mut ok = None;
    for _ in 0..100 {
        if let Some(x) = got.lock().unwrap().iter().find(|x| x.0 == 200).cloned() {
            ok = Some(x);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, sig, body) = ok.expect("the alert was delivered");
    assert!(
        got.lock().unwrap()[0].0 == 503,
        "the first attempt was refused"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let want = format!(
        "sha256={}",
        hex_encode(ring::hmac::sign(&key, &body).as_ref())
    );
    assert_eq!(sig, want, "signed with the shared secret");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["rule"].as_str(), v["severity"].as_str()),
        (Some("scraping"), Some("high"))
    );
    assert_eq!(v["auditEvent"]["resourceType"], "AuditEvent");
    // Spool emptied; the alert is in the audit log.
    for _ in 0..50 {
        let left = std::fs::read_dir(s.data_dir.join("alert-spool"))
            .map(|d| d.count())
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_dir(s.data_dir.join("alert-spool"))
            .unwrap()
            .count(),
        0
    );
    let rows = records_of(&s, "alert", 10).await;
    assert_eq!(rows.len(), 1, "one alert per window");
    let ev = s.state.audit.open_row(&rows[0]).unwrap();
    assert!(ev["outcomeDesc"]
        .as_str()
        .unwrap()
        .starts_with("scraping [high]"));
}

/// What the test receiver saw: (status it answered, signature, body).
type Delivery = (u16, String, Vec<u8>);

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Syslog over TLS: records produced while the collector is down arrive
/// once it is up (the database is the spool), as RFC 5424 messages in
/// RFC 5425 octet-counted frames, each carrying the exact leaf JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_tls_catches_up_after_an_outage() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    let rdir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = receiver_tls(rdir.path());
    // A port with nothing listening yet: the collector is down.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.audit.syslog_tls = Some(format!("localhost:{port}"));
        c.audit.syslog_ca_file = Some(ca.clone());
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    some_traffic(&s, &tok).await;
    let cp = s.state.audit.seal_pending().await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // The collector comes up.
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        phylax_server::net::tls::server_config(&cert, &key).unwrap(),
    );
    let got2 = got.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = Vec::new();
            let _ = tls.read_to_end(&mut buf).await;
            got2.lock().unwrap().extend(buf);
        }
    });
    let mut frames: Vec<String> = Vec::new();
    for _ in 0..100 {
        frames.clear();
        let data = got.lock().unwrap().clone();
        let mut rest = &data[..];
        while let Some(sp) = rest.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
            let msg = &rest[sp + 1..sp + 1 + len];
            frames.push(String::from_utf8(msg.to_vec()).unwrap());
            rest = &rest[sp + 1 + len..];
        }
        if frames.len() as u64 >= cp.size {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        frames.len() as u64,
        cp.size,
        "every sealed record arrived once"
    );
    let leaves: Vec<_> = frames
        .iter()
        .map(|f| {
            assert!(f.starts_with("<110>1 20"), "{f}");
            let json = &f[f.find("phylax - audit - ").unwrap() + "phylax - audit - ".len()..];
            phylax_audit::merkle::leaf_hash(json.as_bytes())
        })
        .collect();
    assert_eq!(phylax_audit::merkle::root(&leaves), cp.root);
}

/// A node starting with a configuration the instance has not run with
/// records it once; the same configuration on another node does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_are_recorded() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let count = || async { records_of(&s, "config", 10).await.len() };
    assert_eq!(count().await, 1);
    let (_, stop) = s.second_node().await;
    let _ = stop.send(());
    assert_eq!(count().await, 1, "same configuration, no new record");
    let mut cfg = phylax_server::base::config::Config::load(&s.data_dir).unwrap();
    cfg.http.default_page_size = 20;
    cfg.save(&s.data_dir).unwrap();
    let (_, stop) = s.second_node().await;
    let _ = stop.send(());
    assert_eq!(count().await, 2, "a changed configuration is recorded");
    let rows = records_of(&s, "config", 1).await;
    let ev = s.state.audit.open_row(&rows[0]).unwrap();
    assert!(ev["outcomeDesc"].as_str().unwrap().contains("sha256"));
}

/// Writes are shown to the detector too (their records commit with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_feed_the_detector() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.detect.scraping_patients = 2;
    })
    .await
    .unwrap();
    let tok = s.token(ALL).await;
    for _ in 0..2 {
        let (st, _) = send(
            &s,
            &tok,
            reqwest::Method::POST,
            "/Patient",
            Some(&json!({"resourceType": "Patient", "gender": "other"})),
        )
        .await;
        assert_eq!(st, 201);
    }
    let mut n = 0;
    for _ in 0..50 {
        n = records_of(&s, "alert", 10).await.len();
        if n > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1, "two creates for two patients crossed the threshold");
}

/// A receiver's TLS files (certificate, 0600 key, CA) from a fresh local CA.
fn receiver_tls(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let g = phylax_server::net::tls::generate(&[]).unwrap();
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &g.server_cert_pem).unwrap();
    phylax_server::net::tls::write_private(&key, g.server_key_pem.expose()).unwrap();
    std::fs::write(&ca, &g.ca_cert_pem).unwrap();
    (cert, key, ca)
}
