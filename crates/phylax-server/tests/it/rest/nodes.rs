//! Two nodes sharing one PostgreSQL database.

use super::*;

/// Two nodes over one PostgreSQL database: tokens issued by one are honoured
/// by the other, writes on one are read on the other, and concurrent updates
/// through both nodes never lose or duplicate a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_postgres() {
    let Some(a) = TestServer::start(common::Backend::Postgres).await else {
        return;
    };
    let (b_fhir, _stop) = a.second_node().await;
    let tok = a.token(ALL).await;
    let r = a
        .http
        .post(a.url("/Patient"))
        .bearer_auth(&tok)
        .header("content-type", FJ)
        .body(json!({"resourceType":"Patient","gender":"other"}).to_string())
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = a
        .http
        .get(format!("{b_fhir}/Patient/{id}"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "node B reads node A's write with node A's token"
    );
    let body: Value = r.json().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            a.url(&format!("/Patient/{id}"))
        } else {
            format!("{b_fhir}/Patient/{id}")
        };
        let (http, tok, mut body) = (a.http.clone(), tok.clone(), body.clone());
        body["gender"] = json!(if i % 3 == 0 { "male" } else { "female" });
        tasks.push(tokio::spawn(async move {
            http.put(url)
                .bearer_auth(tok)
                .header("content-type", FJ)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            409 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    let h: Value = a
        .http
        .get(format!("{b_fhir}/Patient/{id}/_history?_count=100"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<String> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        versions.len(),
        ok + 1,
        "every acknowledged update is a version, and only those"
    );
    let expect: Vec<String> = (1..=ok + 1).rev().map(|v| v.to_string()).collect();
    assert_eq!(versions, expect, "versions are consecutive");
}
