//! The connection layer: oversized bodies, slow and idle connections, rate limits, caps.

use super::*;
use std::sync::Arc;

/// A body sent without Content-Length (chunked) is cut off at the limit too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_oversized_body_is_413() {
    use tower::ServiceExt;
    let s = TestServer::start_with(common::Backend::Sqlite, |c| c.http.max_body_bytes = 4096)
        .await
        .unwrap();
    let tok = s.token(ALL).await;
    let app = phylax_server::http::router(s.state.clone());
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(b"{\"resourceType\":\"Patient\",\"id\":\"".to_vec()))
            .chain((0..100).map(|_| Ok(vec![b'a'; 100])))
            .chain(std::iter::once(Ok(b"\"}".to_vec())))
            .collect();
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    let req = axum::http::Request::post("/fhir/Patient")
        .header("authorization", format!("Bearer {tok}"))
        .header("content-type", FJ)
        .body(body)
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let small = axum::http::Request::post("/fhir/Patient")
        .header("authorization", format!("Bearer {tok}"))
        .header("content-type", FJ)
        .body(axum::body::Body::from_stream(futures_util::stream::iter(
            vec![
                Ok::<_, std::io::Error>(b"{\"resourceType\":".to_vec()),
                Ok(b"\"Patient\"}".to_vec()),
            ],
        )))
        .unwrap();
    let app = phylax_server::http::router(s.state.clone());
    assert_eq!(app.oneshot(small).await.unwrap().status(), 201);
}

/// A TLS client that trusts the instance's CA and speaks HTTP/1.1, for
/// tests that need the raw connection (slow and idle clients).
fn raw_tls(s: &TestServer) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn raw_connect(
    s: &TestServer,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = s.base.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tls.connect(name, tcp).await.unwrap()
}

/// Read until the server closes; what it sent, or None if it kept the
/// connection open past `secs`.
async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    secs: u64,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow and idle clients do not hold the server (slowloris): idle
/// connections, half-sent headers and trickled bodies are closed or
/// answered 408 within their timeouts; past `http.max_connections` new
/// connections wait, and the server keeps answering; memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.max_connections = 16;
        c.http.header_timeout_secs = 1;
        c.http.idle_timeout_secs = 1;
        c.http.body_timeout_secs = 2;
    })
    .await
    .unwrap();
    let tls = raw_tls(&s);
    // Idle after the handshake: closed.
    let mut idle = raw_connect(&s, &tls).await;
    assert!(
        read_until_closed(&mut idle, 5).await.is_some(),
        "idle connection kept"
    );
    // Headers half sent, then silence: closed.
    let mut half = raw_connect(&s, &tls).await;
    half.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut half, 5).await.is_some(),
        "slow headers kept"
    );
    // A body trickled in a byte at a time, keeping the bytes moving: 408
    // at the body deadline.
    let tok = s.token(ALL).await;
    let mut slow = raw_connect(&s, &tls).await;
    slow.write_all(
        format!(
            "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = tokio::io::split(slow);
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let answer = read_until_closed(&mut rd, 8).await;
    trickle.abort();
    let answer = answer.expect("slow body kept open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
    // Five times the connection cap, idle: the server still answers, and
    // drops them all; memory does not grow with them.
    let before = common::rss_kib();
    let mut held = Vec::new();
    for _ in 0..80 {
        let addr = s.base.trim_start_matches("https://").to_owned();
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.http.get(s.url("/metadata")).send(),
    )
    .await
    .expect("the server answers past the connection cap")
    .unwrap();
    assert_eq!(r.status(), 200);
    for mut c in held {
        assert!(read_until_closed(&mut c, 30).await.is_some());
    }
    let after = common::rss_kib();
    assert!(after < before + 64 * 1024, "RSS {before} -> {after} KiB");
}

/// A body over the limit answers 413 over HTTP/2 as over HTTP/1.1 (the
/// rest of it is read and dropped, so the client sees the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_over_http2_and_http1() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let tok = s.token(ALL).await;
    let ca = std::fs::read(s.data_dir.join("tls/ca.pem")).unwrap();
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"{}\"}}",
        "a".repeat(9 * 1024 * 1024)
    );
    for h2 in [true, false] {
        let b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        let client = if h2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        }
        .build()
        .unwrap();
        for _ in 0..3 {
            let r = client
                .post(s.url("/Patient"))
                .bearer_auth(&tok)
                .header("content-type", FJ)
                .body(big.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("h2={h2}: {e:?}"));
            assert_eq!(
                r.version(),
                if h2 {
                    reqwest::Version::HTTP_2
                } else {
                    reqwest::Version::HTTP_11
                }
            );
            assert_eq!(r.status(), 413, "h2={h2}");
        }
    }
}

/// Per-client and per-user rate limits (`[rate]`): past the burst, 429
/// with Retry-After and an OperationOutcome; other callers are not
/// affected. The token endpoint limits each address before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.rate.client_per_minute = 60;
        c.rate.client_burst = 5;
        c.rate.token_ip_per_minute = 60;
        c.rate.token_ip_burst = 4;
    })
    .await
    .unwrap();
    // Tokens minted in-process: the token endpoint's own limit is below.
    let mint = |id: &str| {
        let scopes = phylax_auth::ScopeSet::parse_lenient(ALL);
        s.state
            .authn
            .tokens
            .issue(id, &scopes, chrono::Utc::now().timestamp())
            .unwrap()
            .0
    };
    let (a, b) = (mint("client-a"), mint("client-b"));
    for i in 0..5 {
        let r = s
            .http
            .get(s.url("/Patient?_count=1"))
            .bearer_auth(&a)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["issue"][0]["code"], "throttled");
    let r = s
        .http
        .get(s.url("/Patient?_count=1"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another client has its own budget");
    // The token endpoint: four requests from this address, then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = s
            .http
            .post(s.token_url())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        statuses.push((
            r.status().as_u16(),
            r.headers().get("retry-after").is_some(),
        ));
    }
    assert_eq!(
        statuses[..4].iter().filter(|x| x.0 == 429).count(),
        0,
        "{statuses:?}"
    );
    assert_eq!(statuses[4], (429, true), "{statuses:?}");
    let m = s.state.metrics.exposition();
    assert!(
        m.contains("phylax_rate_limited_total{kind=\"fhir\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("phylax_rate_limited_total{kind=\"token\"} 1"),
        "{m}"
    );
}

/// One address may hold at most `http.max_connections_per_ip`
/// connections: more are closed at once, the first ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let s = TestServer::start_with(common::Backend::Sqlite, |c| {
        c.http.max_connections_per_ip = 3;
        c.http.header_timeout_secs = 30;
    })
    .await
    .unwrap();
    let addr = s.base.trim_start_matches("https://").to_owned();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        // Accepted in order: let the server count each one.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut over = held.split_off(3);
    for c in over.iter_mut() {
        assert!(
            read_until_closed(c, 3).await.is_some(),
            "a connection past the cap is closed at once"
        );
    }
    for c in held.iter_mut() {
        assert!(
            read_until_closed(c, 1).await.is_none(),
            "the first three stay open"
        );
    }
}
