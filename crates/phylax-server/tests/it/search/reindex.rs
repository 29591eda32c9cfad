//! Data stored before the search index is reindexed when the server starts.

use super::*;

/// Data written before the index existed gets indexed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_data_is_reindexed_at_start() {
    let s = TestServer::start(common::Backend::Sqlite).await.unwrap();
    let tok = s.token("system/*.cruds").await;
    let id = create(
        &s,
        &tok,
        json!({"resourceType":"Patient","name":[{"family":"Reindexson"}]}),
    )
    .await;
    {
        let c = rusqlite::Connection::open(s.data_dir.join("phylax.db")).unwrap();
        c.execute_batch(
            "DELETE FROM search_entries; DELETE FROM meta WHERE key = 'search_index_v1';",
        )
        .unwrap();
    }
    assert_eq!(
        ids(&s, &tok, "/Patient?family=reindex").await,
        Vec::<String>::new()
    );
    let inst = phylax_server::instance::Instance::open(&s.data_dir, None)
        .await
        .unwrap();
    // Starting the server builds the index...
    let st = phylax_server::state::AppState::new(inst).await.unwrap();
    drop(st);
    let inst = phylax_server::instance::Instance::open(&s.data_dir, None)
        .await
        .unwrap();
    let repo = phylax_server::data::repo::Repo::new(
        inst.store.clone(),
        inst.keys.clone(),
        inst.blind_key,
        s.fhir.clone(),
    );
    // ... once.
    assert_eq!(
        repo.reindex_if_needed().await.unwrap(),
        0,
        "done once, at start"
    );
    let q = phylax_store::SearchQuery {
        rtype: "Patient".into(),
        and: phylax_server::data::search::parse(
            &repo.blind_key(),
            &s.fhir,
            &phylax_fhir::ResourceType::parse("Patient").unwrap(),
            &[("family".into(), "reindex".into())],
        )
        .unwrap()
        .and,
        before_seq: None,
        limit: 10,
    };
    let found = repo.search_unconfined(&q).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id.as_str(), id);
}
