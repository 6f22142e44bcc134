//! Driver-level check of every MongoDB operation courseview relies on,
//! written once and run against both MongoDB peers: nx-27017 (the suite's,
//! MONGODB_URI) and secantusdb (WiredTiger-based, SECANTUS_URI), which
//! accepts what real MongoDB accepts where nx-27017 differs. It keeps the
//! choice of peers honest (docs/COMPATIBILITY.md) and flags a regression.
//! FerretDB 1.24.2 (FERRETDB_URI), a MongoDB-compatible server teams run,
//! answers an unordered `update` wrongly: its test pins that courseview
//! does not believe it.

use bson::{doc, Document};
use courseview::mongo::get_int;
use futures::TryStreamExt;
use mongodb::options::{FindOptions, IndexOptions};
use mongodb::{Client, IndexModel};

use crate::helpers::{mongodb_uri, unique};

fn secantus_uri() -> String {
    std::env::var("SECANTUS_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27018".into())
}

pub fn ferretdb_uri() -> String {
    std::env::var("FERRETDB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27019".into())
}

#[tokio::test]
async fn courseview_indexes_and_sorted_keyset_pages_work_on_ferretdb() {
    indexes_and_pages(&ferretdb_uri()).await;
}

/// Writes `a` with a current revision guard and `b` with a stale one, as a
/// worker does when another changed `b` under it. Both are stored at
/// revision 2 first, so both writes are guarded updates (a write at
/// revision 0 is an insert).
async fn guarded_batch(uri: &str) -> (courseview::mongo::Store, String, Vec<courseview::mongo::DocWrite>) {
    use courseview::mongo::{DocWrite, Store};
    use courseview::read_model::ReadModel;
    use courseview::worker::Applier;
    let store = Store::connect(uri, &unique("cvguard_"), std::time::Duration::from_secs(5))
        .await
        .expect("store");
    let collection = Store::collection_name("catalog", 1);
    for (version, kind) in [(1, "CourseCreatedEvent"), (2, "CourseUpdatedEvent")] {
        let events: Vec<_> = ["a", "b"]
            .iter()
            .map(|course| {
                let value = format!(
                    r#"{{"eventId":"{course}-{version}","eventType":"{kind}","courseId":"{course}","version":{version},"name":"N{version}","teacherId":"t"}}"#
                );
                let record = courseview::record::Record {
                    topic: kind.into(),
                    value: Some(value.into_bytes()),
                    ..Default::default()
                };
                courseview::decode::decode(&record).expect("event")
            })
            .collect();
        // A new applier each time: it reloads what the first one stored.
        Applier::new(ReadModel::Catalog, store.clone(), None, 1)
            .apply_events(&events)
            .await
            .expect("applied");
    }
    let stored = store
        .load_states(&collection, &["a".into(), "b".into()])
        .await
        .expect("loaded");
    let writes = vec![
        DocWrite::new(
            ReadModel::Catalog,
            "a".into(),
            stored["a"].rev,
            stored["a"].state.clone(),
        ),
        DocWrite::new(
            ReadModel::Catalog,
            "b".into(),
            stored["b"].rev - 1,
            stored["b"].state.clone(),
        ),
    ];
    (store, collection, writes)
}

#[tokio::test]
async fn a_stale_guard_in_a_batch_is_a_conflict_of_that_course_on_nx_27017() {
    let (store, collection, writes) = guarded_batch(&mongodb_uri()).await;
    let conflicts = store.write_states(&collection, &writes).await.expect("accounted");
    assert_eq!(conflicts.0, vec!["b".to_owned()]);
}

#[tokio::test]
async fn ferretdb_misreporting_a_guarded_batch_is_retried_then_stops_the_caller_naming_the_server() {
    let (store, collection, writes) = guarded_batch(&ferretdb_uri()).await;
    retried_then_stopped(&store, &collection, &writes).await;
}

/// A new course in the batch goes as an `insert`, which FerretDB answers
/// right: that must not clear the update's run of miscounted replies.
#[tokio::test]
async fn ferretdb_misreporting_a_guarded_batch_beside_new_courses_still_stops_the_caller() {
    use courseview::mongo::DocWrite;
    use courseview::read_model::ReadModel;
    let (store, collection, mut writes) = guarded_batch(&ferretdb_uri()).await;
    let mut state = writes[0].state.clone();
    state.course_id = "new".into();
    writes.push(DocWrite::new(ReadModel::Catalog, "new".into(), 0, state));
    retried_then_stopped(&store, &collection, &writes).await;
}

async fn retried_then_stopped(
    store: &courseview::mongo::Store,
    collection: &str,
    writes: &[courseview::mongo::DocWrite],
) {
    use courseview::mongo::StoreError;
    // FerretDB 1.24.2 answers `writeErrors: [{index: 0}]` and no `n`: taken
    // at its word, `a` would be remembered as a conflict and `b` as written.
    for attempt in 1..5 {
        match store.write_states(collection, writes).await {
            Err(e) if e.is_transient() => {}
            other => panic!("attempt {attempt}: a miscounted reply is retried, nothing counted: {other:?}"),
        }
    }
    match store.write_states(collection, writes).await {
        Err(StoreError::Failed(message)) => {
            let host = ferretdb_uri()
                .trim_start_matches("mongodb://")
                .trim_end_matches('/')
                .to_owned();
            assert!(message.contains(&host) && message.contains("FerretDB"), "{message}");
        }
        other => panic!("a server that keeps miscounting stops the caller: {other:?}"),
    }
}

/// Stores course `a`, then writes `a`, `c` and `d` as new (revision 0),
/// as a worker replaying from zero presumes: `a` must come back as the
/// one conflict, untouched, and `c` and `d` stored at revision 1.
async fn presumed_new_batch(uri: &str) -> Result<courseview::mongo::Conflicts, courseview::mongo::StoreError> {
    use courseview::mongo::DocWrite;
    use courseview::read_model::ReadModel;
    let (store, collection, stored) = guarded_batch(uri).await;
    let writes: Vec<DocWrite> = ["a", "c", "d"]
        .iter()
        .map(|id| {
            let mut state = stored[0].state.clone();
            state.course_id = (*id).into();
            DocWrite::new(ReadModel::Catalog, (*id).into(), 0, state)
        })
        .collect();
    let conflicts = store.write_states(&collection, &writes).await?;
    let now = store
        .load_states(&collection, &["a".into(), "c".into(), "d".into()])
        .await
        .expect("loaded");
    let revs: Vec<i64> = ["a", "c", "d"].iter().map(|id| now[*id].rev).collect();
    assert_eq!(revs, [stored[0].expected_rev, 1, 1], "a untouched, c and d new");
    Ok(conflicts)
}

#[tokio::test]
async fn a_course_presumed_new_but_stored_is_a_conflict_of_that_course_on_nx_27017() {
    let conflicts = presumed_new_batch(&mongodb_uri()).await.expect("accounted");
    assert_eq!(conflicts.0, vec!["a".to_owned()]);
}

#[tokio::test]
async fn a_course_presumed_new_but_stored_is_a_conflict_of_that_course_on_secantusdb() {
    let conflicts = presumed_new_batch(&secantus_uri()).await.expect("accounted");
    assert_eq!(conflicts.0, vec!["a".to_owned()]);
}

#[tokio::test]
async fn a_course_presumed_new_but_stored_is_a_conflict_of_that_course_on_ferretdb() {
    let conflicts = presumed_new_batch(&ferretdb_uri()).await.expect("accounted");
    assert_eq!(conflicts.0, vec!["a".to_owned()]);
}

#[tokio::test]
async fn the_operations_courseview_uses_work_on_nx_27017() {
    the_operations_courseview_uses(&mongodb_uri()).await;
}

#[tokio::test]
async fn the_operations_courseview_uses_work_on_secantusdb() {
    the_operations_courseview_uses(&secantus_uri()).await;
}

#[tokio::test]
async fn courseview_indexes_and_sorted_keyset_pages_work_on_nx_27017() {
    indexes_and_pages(&mongodb_uri()).await;
}

#[tokio::test]
async fn courseview_indexes_and_sorted_keyset_pages_work_on_secantusdb() {
    indexes_and_pages(&secantus_uri()).await;
}

/// Creates every index courseview creates (equality fields, sort keys, the
/// `sortId` tie-break), writes courses through the store, and walks each
/// page query with its cursor, under a server-side time limit.
async fn indexes_and_pages(uri: &str) {
    use courseview::mongo::{ListQuery, Listing, Order, Store};
    use courseview::read_model::ReadModel;
    use courseview::worker::Applier;
    let store = Store::connect(uri, &unique("cvpages_"), std::time::Duration::from_secs(5))
        .await
        .expect("store");
    for model in ReadModel::ALL {
        let collection = Store::collection_name(model.name(), 1);
        store.ensure_indexes(&collection, model).await.expect("indexes");
        let mut events = Vec::new();
        for i in 0..7 {
            let course = format!("c{i}");
            for (version, kind, extra) in [
                (
                    1,
                    "CourseCreatedEvent",
                    format!(r#","name":"N{}","teacherId":"t{}""#, i % 3, i % 2),
                ),
                (2, "CoursePostedEvent", String::new()),
            ] {
                let value = format!(
                    r#"{{"eventId":"{course}-{version}","eventType":"{kind}","courseId":"{course}","version":{version},"occurredAt":"2026-11-2{i}T09:00:0{version}Z"{extra}}}"#
                );
                let record = courseview::record::Record {
                    topic: kind.into(),
                    value: Some(value.into_bytes()),
                    ..Default::default()
                };
                events.push(courseview::decode::decode(&record).expect("event"));
            }
        }
        Applier::new(model, store.clone(), None, 1)
            .apply_events(&events)
            .await
            .expect("applied");
        let (listing, expected) = match model {
            ReadModel::Catalog => (
                Listing::Catalog {
                    teacher: None,
                    text: None,
                },
                7,
            ),
            ReadModel::TeacherCourses => (Listing::Teacher { teacher: "t1".into() }, 3),
        };
        for order in [Order::Newest, Order::Name] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let q = ListQuery {
                    listing: listing.clone(),
                    order,
                    after: after.clone(),
                    limit: 2,
                };
                let page = store.page(&collection, &q).await.expect("page");
                for item in &page.items {
                    seen.push(item.id.clone());
                    after = Some((item.key.clone(), item.id.clone()));
                }
                if !page.more {
                    break;
                }
            }
            let unique: std::collections::HashSet<&String> = seen.iter().collect();
            assert_eq!(
                (seen.len(), unique.len()),
                (expected, expected),
                "{uri} {model:?} by {order:?}: {seen:?}"
            );
        }
    }
}

async fn the_operations_courseview_uses(uri: &str) {
    let client = Client::with_uri_str(uri).await.expect("client");
    let db = client.database(&unique("cvcompat_"));
    db.run_command(doc! {"ping": 1}).await.expect("ping");
    let coll = db.collection::<Document>("docs");

    // Multi-statement `update` with revision-guarded upserts: insert, guarded
    // replace, and a stale guard that must fail with a duplicate key.
    let upsert = |id: &str, rev: i64, name: &str| doc! {"q": {"_id": id, "_rev": rev}, "u": {"_id": id, "_rev": rev + 1, "name": name, "listed": true, "n": rev}, "upsert": true};
    let reply = db.run_command(doc! {"update": "docs", "updates": [upsert("a", 0, "A"), upsert("b", 0, "B"), upsert("c", 0, "C")], "ordered": false}).await.expect("bulk upsert");
    assert_eq!(reply.get_i32("n").ok(), Some(3), "{reply}");
    let reply = db
        .run_command(
            doc! {"update": "docs", "updates": [upsert("a", 1, "A2"), upsert("b", 0, "stale")], "ordered": false},
        )
        .await
        .expect("guarded");
    let errors = reply
        .get_array("writeErrors")
        .expect("a write error for the stale guard");
    let error = errors[0].as_document().expect("doc");
    assert_eq!(
        (error.get_i32("index").ok(), error.get_i32("code").ok()),
        (Some(1), Some(11000)),
        "{reply}"
    );
    let a = coll.find_one(doc! {"_id": "a"}).await.expect("find").expect("a exists");
    assert_eq!((a.get_str("name").ok(), get_int(&a, "_rev")), (Some("A2"), Some(2)));

    // Unordered multi-document `insert` (a course presumed new is written
    // at revision 0 this way): one that exists is refused as a duplicate
    // key at its index, the rest are inserted, and `n` counts them.
    let new = |id: &str| doc! {"_id": id, "_rev": 1_i64, "name": id, "listed": true};
    let reply = db
        .run_command(doc! {"insert": "docs", "documents": [new("d"), new("a"), new("e")], "ordered": false})
        .await
        .expect("unordered insert");
    let errors = reply
        .get_array("writeErrors")
        .expect("a write error for the existing _id");
    let error = errors[0].as_document().expect("doc");
    assert_eq!(
        (
            errors.len(),
            get_int(error, "index"),
            error.get_i32("code").ok(),
            get_int(&reply, "n")
        ),
        (1, Some(1), Some(11000), Some(2)),
        "{reply}"
    );
    let a = coll.find_one(doc! {"_id": "a"}).await.expect("find").expect("a exists");
    assert_eq!(a.get_str("name").ok(), Some("A2"), "an insert never overwrites");
    assert_eq!(
        coll.count_documents(doc! {"_id": {"$in": ["d", "e"]}})
            .await
            .expect("count"),
        2
    );
    coll.delete_many(doc! {"_id": {"$in": ["d", "e"]}})
        .await
        .expect("delete_many");

    // $set / $setOnInsert upserts and a `$lt`-guarded upsert (checkpoints).
    let cp = db.collection::<Document>("checkpoints");
    let store = |offset: i64| doc! {"q": {"_id": "p0", "offset": {"$lt": offset}}, "u": {"$set": {"offset": offset}}, "upsert": true};
    db.run_command(doc! {"update": "checkpoints", "updates": [store(10)]})
        .await
        .expect("first offset");
    let reply = db
        .run_command(doc! {"update": "checkpoints", "updates": [store(5)]})
        .await
        .expect("older offset");
    assert!(
        reply.get_array("writeErrors").is_ok(),
        "an older offset must not overwrite: {reply}"
    );
    db.run_command(doc! {"update": "checkpoints", "updates": [{"q": {"_id": "g"}, "u": {"$setOnInsert": {"generation": 1_i64}}, "upsert": true}]}).await.expect("setOnInsert");
    let p0 = cp.find_one(doc! {"_id": "p0"}).await.expect("find").expect("p0");
    assert_eq!(get_int(&p0, "offset"), Some(10));

    // find: $in, $and/$or keyset, case-insensitive $regex, sort, limit, projection.
    let ids: Vec<Document> = coll
        .find(doc! {"_id": {"$in": ["a", "c", "zz"]}})
        .await
        .expect("$in")
        .try_collect()
        .await
        .expect("cursor");
    assert_eq!(ids.len(), 2);
    // A find with a batch size past the default 101 answers everything in
    // its first reply, with no cursor left: reads that must be whole ask
    // for that, since nx-27017 may answer a getMore short (COMPATIBILITY.md).
    let many = db.collection::<Document>("many");
    many.insert_many((0..300).map(|i| doc! {"_id": format!("m{i:03}")}))
        .await
        .expect("insert 300");
    let whole = db
        .run_command(doc! {"find": "many", "filter": {}, "batchSize": 1000})
        .await
        .expect("find with batchSize");
    let cursor = whole.get_document("cursor").expect("a cursor");
    assert_eq!(
        cursor.get_array("firstBatch").expect("firstBatch").len(),
        300,
        "all in the first batch"
    );
    assert_eq!(get_int(cursor, "id"), Some(0), "no cursor left to read");
    let options = FindOptions::builder()
        .sort(doc! {"name": 1, "_id": 1})
        .limit(2)
        .projection(doc! {"name": 1})
        .build();
    let page: Vec<Document> = coll
        .find(doc! {"$and": [{"listed": true}, {"$or": [{"name": {"$gt": "A2"}}, {"name": "A2", "_id": {"$gt": "a"}}]}, {"$or": [{"name": {"$regex": "b|c", "$options": "i"}}]}]})
        .with_options(options)
        .await
        .expect("keyset find")
        .try_collect()
        .await
        .expect("cursor");
    let names: Vec<&str> = page.iter().filter_map(|d| d.get_str("name").ok()).collect();
    assert_eq!(names, ["B", "C"]);
    assert!(page.iter().all(|d| !d.contains_key("listed")), "projection applies");
    let nested = coll
        .find_one(doc! {"_id": "a"})
        .projection(doc! {"name": 1})
        .await
        .expect("find_one projection")
        .expect("a");
    assert!(nested.contains_key("name") && !nested.contains_key("n"));

    // Counting, indexes (no `_id` in compound keys: nx-27017 rejects it;
    // courseview indexes a copy, `sortId`, instead: see COMPATIBILITY.md).
    assert_eq!(coll.count_documents(doc! {"listed": true}).await.expect("count"), 3);
    coll.create_indexes([
        IndexModel::builder()
            .keys(doc! {"listed": 1, "name": 1})
            .options(IndexOptions::builder().build())
            .build(),
        IndexModel::builder()
            .keys(doc! {"listed": 1, "teacherId": 1, "postedAt": -1})
            .build(),
    ])
    .await
    .expect("create compound indexes");

    // delete_one, drop.
    coll.delete_one(doc! {"_id": "c"}).await.expect("delete");
    assert_eq!(coll.count_documents(doc! {}).await.expect("count"), 2);
    coll.drop().await.expect("drop");
    assert_eq!(coll.count_documents(doc! {}).await.expect("count after drop"), 0);
    db.drop().await.expect("drop database");
}
