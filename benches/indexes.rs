//! What the catalog's query indexes cost the worker's writes, peer by peer
//! (issue 24, item 2). Every course of a corpus in its final state is
//! written through the worker's own write path (`Store::write_states`:
//! revision-guarded upserts) into a fresh collection carrying the first
//! 4, 2 and 0 of `Store::index_keys(Catalog)`, twice each, alternated.
//! Beside it, the documents' bytes. It prints one Markdown table.
//!
//!   MONGODB_URI=mongodb://127.0.0.1:27017 cargo bench --bench indexes -- [--courses N]
//!
//! The peer's name for the table comes from `BENCH_PEER`.

use std::time::Instant;

use courseview::mongo::{DocWrite, Store};
use courseview::read_model::ReadModel;
use courseview_projections::CourseState;

mod common;

/// Docs/s of `writes` into a new collection holding the first `indexes`
/// of the catalog's index keys.
async fn rate(store: &Store, db: &mongodb::Database, collection: &str, indexes: usize, writes: &[DocWrite]) -> f64 {
    let keys: Vec<mongodb::IndexModel> = Store::index_keys(ReadModel::Catalog)
        .into_iter()
        .take(indexes)
        .map(|k| mongodb::IndexModel::builder().keys(k).build())
        .collect();
    let coll = db.collection::<bson::Document>(collection);
    if keys.is_empty() {
        db.create_collection(collection).await.expect("collection");
    } else {
        coll.create_indexes(keys).await.expect("indexes");
    }
    let started = Instant::now();
    for chunk in writes.chunks(1_000) {
        let refused = store.write_states(collection, chunk).await.expect("written");
        assert!(refused.is_empty(), "{collection} already held these courses");
    }
    let rate = writes.len() as f64 / started.elapsed().as_secs_f64();
    coll.drop().await.expect("dropped");
    rate
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && std::env::var_os("MONGODB_URI").is_none() {
        // `cargo bench` with no peer named: nothing to measure against.
        eprintln!("indexes: set MONGODB_URI to the peer to measure");
        return;
    }
    let courses: usize = args
        .iter()
        .position(|a| a == "--courses")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--courses N"))
        .unwrap_or(50_000);
    let uri = std::env::var("MONGODB_URI").expect("MONGODB_URI");
    let peer = std::env::var("BENCH_PEER").unwrap_or_else(|_| uri.clone());
    let database = format!("bench_indexes_{}", std::process::id());
    let store = Store::connect(&uri, &database, std::time::Duration::from_secs(5))
        .await
        .expect("store");
    let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
    let db = client.database(&database);

    let mut states: std::collections::BTreeMap<String, CourseState> = Default::default();
    for record in common::corpus(courses) {
        let event = courseview::decode::decode(&record).expect("corpus decodes");
        states
            .entry(event.course_id.clone())
            .or_insert_with(|| CourseState::new(event.course_id.as_str()))
            .apply(&event);
    }
    let writes: Vec<DocWrite> = states
        .into_iter()
        .map(|(id, state)| DocWrite::new(ReadModel::Catalog, id, 0, state))
        .collect();

    let counts = [4usize, 2, 0];
    let mut rates = vec![Vec::new(); counts.len()];
    for round in 0..2 {
        for (i, &n) in counts.iter().enumerate() {
            let r = rate(&store, &db, &format!("courses_{n}_{round}"), n, &writes).await;
            eprintln!("indexes: {n} indexes, round {round}: {r:.0} docs/s");
            rates[i].push(r);
        }
    }
    db.drop().await.expect("dropped");

    println!("Peer: {peer}. {} courses, each written once in its final state (revision-guarded upserts, 1,000 per command).\n", writes.len());
    println!("| catalog indexes on the collection | docs/s (two runs) | against no index |");
    println!("|---|---|---|");
    let bare = rates[2].iter().sum::<f64>() / 2.0;
    for (i, &n) in counts.iter().enumerate() {
        let mean = rates[i].iter().sum::<f64>() / 2.0;
        println!(
            "| {n} | {:.0} / {:.0} | {:.0} % |",
            rates[i][0],
            rates[i][1],
            mean / bare * 100.0
        );
    }
}
