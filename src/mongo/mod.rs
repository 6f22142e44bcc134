//! MongoDB: read-model collections, checkpoints, dead letters and the
//! generation pointer. The only module that builds BSON queries.
//!
//! Every operation here is one real MongoDB has had for a decade (find,
//! the `update` command with several statements, `count`, `createIndexes`,
//! drop), so the test peer and docker-compose's `mongod` run the same code.

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, rawdoc, Bson, Document, RawArrayBuf, RawBson, RawDocumentBuf};
use courseview_projections::CourseState;
use futures::TryStreamExt;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{ClientOptions, FindOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use tracing::instrument;

use crate::dead_letter::DeadLetter;
use crate::kafka::Gap;
use crate::read_model::ReadModel;

/// Pointer documents: which generation of each projection readers follow.
const POINTERS: &str = "projections";
const CHECKPOINTS: &str = "checkpoints";
const DEAD_LETTERS: &str = "dead_letters";
const WORKERS: &str = "workers";
/// Server-side time limit (`maxTimeMS`) of every query the API makes.
pub const API_QUERY_TIME_LIMIT: Duration = Duration::from_secs(2);
/// Bytes of statements per `update` command: well under the 16 MiB a
/// command document may hold, whatever the batch.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// Statements per `update` command (MongoDB's maxWriteBatchSize is 100,000).
const MAX_COMMAND_STATEMENTS: usize = 10_000;
/// Server error codes that mean "try again": network trouble, a primary
/// stepping down or being elected, shutdown in progress.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    89,    // NetworkTimeout
    64,    // WriteConcernFailed (wtimeout: not yet replicated as asked)
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    50,    // MaxTimeMSExpired (a query over its time limit)
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// The server's error code, for command and write errors.
fn server_code(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Whether a server error code calls for a retry.
pub fn is_transient_code(code: i32) -> bool {
    TRANSIENT_CODES.contains(&code)
}
const DUPLICATE_KEY: i32 = 11000;

/// What an `update` command's reply (`ok: 1`) says of its statements: the
/// indexes (offset by `start`) refused as duplicate keys, or an error.
/// A `writeConcernError` makes the whole command transient: on a replica
/// set the writes may be rolled back (a primary stepping down while the
/// batch waited for majority), so the batch must be retried and nothing
/// after it (offsets, remembered states) may count on it.
fn refused_statements(collection: &str, start: usize, reply: &Document) -> Result<Vec<usize>> {
    if let Ok(concern) = reply.get_document("writeConcernError") {
        let code = concern.get_i32("code").unwrap_or_default();
        let message = concern.get_str("errmsg").unwrap_or("write concern not satisfied");
        return Err(StoreError::Unavailable(Box::new(MongoError::custom(format!(
            "update on {collection}: write concern error: {message} (code {code})"
        )))));
    }
    let mut duplicates = Vec::new();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for error in errors.iter().filter_map(Bson::as_document) {
            let code = error.get_i32("code").unwrap_or_default();
            let index = error.get_i32("index").unwrap_or_default();
            let message = error.get_str("errmsg").unwrap_or("unknown write error");
            if code == DUPLICATE_KEY {
                duplicates.push(start + usize::try_from(index).unwrap_or_default());
            } else if is_transient_code(code) {
                return Err(StoreError::Unavailable(Box::new(MongoError::custom(format!(
                    "update on {collection}: {message} (code {code})"
                )))));
            } else {
                return Err(StoreError::Failed(format!(
                    "update on {collection}: {message} (code {code})"
                )));
            }
        }
    }
    Ok(duplicates)
}

/// What the caller must do about a failed MongoDB operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server is unreachable or overloaded: retry later, do not advance.
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(#[source] Box<MongoError>),
    /// Anything else (auth, bad command, corrupt document): stop and report.
    #[error("MongoDB operation failed: {0}")]
    Failed(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<MongoError> for StoreError {
    fn from(e: MongoError) -> Self {
        let transient = e.contains_label("RetryableWriteError")
            || e.contains_label("TransientTransactionError")
            || server_code(&e).is_some_and(is_transient_code)
            || matches!(
                *e.kind,
                ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. }
            );
        if transient {
            StoreError::Unavailable(Box::new(e))
        } else {
            StoreError::Failed(e.to_string())
        }
    }
}

impl From<bson::ser::Error> for StoreError {
    fn from(e: bson::ser::Error) -> Self {
        StoreError::Failed(format!("cannot encode document: {e}"))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A course's stored state and the revision it was read at.
#[derive(Debug, Clone)]
pub struct Stored {
    pub state: CourseState,
    /// 0 when the document does not exist yet.
    pub rev: i64,
}

/// A read-model document to write if nobody else wrote it since `rev`.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub id: String,
    pub expected_rev: i64,
    pub state: CourseState,
    /// The API document, encoded; `None` when the course is not listed.
    pub view: Option<RawDocumentBuf>,
}

/// A stored offset (the next one to read) and when it last moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub offset: i64,
    /// Unix milliseconds.
    pub updated_at: Option<i64>,
}

/// Which generation of a projection readers follow, and which is being built.
#[derive(Debug, Clone, PartialEq)]
pub struct Pointer {
    pub generation: u32,
    pub building: Option<u32>,
    /// Highest generation number ever used (never reused, so a dropped
    /// generation's leftovers cannot mix into a new one).
    pub highest: u32,
    pub rebuild: Option<RebuildProgress>,
    /// A rebuild about to switch asks live workers of the serving
    /// generation to pause, so the serving generation stops moving while
    /// the new one reaches it: (generation handed to, deadline in Unix ms).
    /// Past the deadline (a rebuild that died) workers ignore it.
    pub handover: Option<(u32, i64)>,
}

impl Pointer {
    /// The generation a live handover hands to, if one is under way now.
    pub fn handing_over(&self, now_ms: i64) -> Option<u32> {
        self.handover.filter(|(_, until)| now_ms < *until).map(|(to, _)| to)
    }
}

impl Default for Pointer {
    fn default() -> Self {
        Pointer {
            generation: 1,
            building: None,
            highest: 1,
            rebuild: None,
            handover: None,
        }
    }
}

impl Pointer {
    fn from_doc(d: &Document) -> Pointer {
        let int = |k: &str| get_int(d, k).and_then(|v| u32::try_from(v).ok());
        Pointer {
            generation: int("generation").unwrap_or(1),
            building: int("building").filter(|b| *b > 0),
            highest: int("highest").unwrap_or(1),
            rebuild: d
                .get_document("rebuild")
                .ok()
                .and_then(|r| bson::from_document(r.clone()).ok()),
            handover: int("handoverTo").filter(|to| *to > 0).zip(get_int(d, "handoverUntil")),
        }
    }
}

/// How far a rebuild has come.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildProgress {
    pub generation: u32,
    pub done: i64,
    pub total: i64,
    /// Events per second over the rebuild so far.
    pub rate: f64,
    /// Unix milliseconds of this report.
    pub updated_at: i64,
}

/// A page request against a read-model collection, already validated.
#[derive(Debug, Clone)]
pub struct PageQuery {
    pub filter: Vec<(String, String)>,
    /// Case-insensitive substring over these fields.
    pub text: Option<(String, Vec<&'static str>)>,
    pub sort_field: &'static str,
    pub descending: bool,
    /// Keyset position: the sort value and id of the last item served.
    pub after: Option<(Bson, String)>,
    pub limit: i64,
}

/// One page: the views and, per view, its sort key (for the next cursor).
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<(Document, Bson, String)>,
    pub more: bool,
}

/// Handle on the courseview database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Connects lazily: the driver dials on first use, so a worker can start
    /// before MongoDB and retry.
    pub async fn connect(uri: &str, database: &str, timeout: Duration) -> Result<Store> {
        Store::with_options(ClientOptions::parse(uri).await?, database, timeout)
    }

    /// As [`Store::connect`], from driver options the caller has parsed
    /// and added to (command monitoring, say).
    pub fn with_options(mut options: ClientOptions, database: &str, timeout: Duration) -> Result<Store> {
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        options.app_name = Some("courseview".into());
        let client = Client::with_options(options)?;
        Ok(Store {
            db: client.database(database),
        })
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    #[instrument(skip_all)]
    pub async fn ping(&self) -> Result<()> {
        self.db.run_command(doc! {"ping": 1}).await?;
        Ok(())
    }

    fn docs(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }

    /// Runs the `update` command with many statements, in as few round
    /// trips as the command size limit allows, and returns the indexes of
    /// statements that hit a duplicate key.
    async fn update_many_statements(&self, collection: &str, updates: Vec<RawDocumentBuf>) -> Result<Vec<usize>> {
        let mut duplicates = Vec::new();
        let mut start = 0;
        for chunk in chunk_by_size(updates, MAX_COMMAND_BYTES, MAX_COMMAND_STATEMENTS) {
            let len = chunk.len();
            let mut statements = RawArrayBuf::new();
            for statement in chunk {
                statements.push(statement);
            }
            // `update` first: a command is named by its first field.
            let mut command = RawDocumentBuf::new();
            command.append("update", collection);
            command.append("updates", statements);
            command.append("ordered", false);
            let reply = self.db.run_raw_command(command).await?;
            duplicates.extend(refused_statements(collection, start, &reply)?);
            start += len;
        }
        Ok(duplicates)
    }

    // ---- generation pointer -------------------------------------------------

    /// The projection's generation pointer; created (generation 1) on first use.
    #[instrument(skip_all, fields(projection))]
    pub async fn pointer(&self, projection: &str) -> Result<Pointer> {
        let pointers = self.docs(POINTERS);
        if let Some(found) = pointers.find_one(doc! {"_id": projection}).await? {
            return Ok(Pointer::from_doc(&found));
        }
        // `$setOnInsert` never touches an existing pointer, so a concurrent
        // first start cannot reset a switched generation.
        self.update_many_statements(
            POINTERS,
            encoded(vec![doc! {
                "q": {"_id": projection},
                "u": {"$setOnInsert": {"generation": 1_i64, "building": 0_i64, "highest": 1_i64}},
                "upsert": true,
            }])?,
        )
        .await?;
        let found = pointers.find_one(doc! {"_id": projection}).await?;
        Ok(found.as_ref().map(Pointer::from_doc).unwrap_or_default())
    }

    /// The generation readers follow.
    pub async fn serving_generation(&self, projection: &str) -> Result<u32> {
        Ok(self.pointer(projection).await?.generation)
    }

    /// Starts (or resumes, if one was interrupted) building a new generation;
    /// returns the pointer with `building` set. Never touches the serving one.
    #[instrument(skip_all, fields(projection))]
    pub async fn begin_rebuild(&self, projection: &str) -> Result<Pointer> {
        let current = self.pointer(projection).await?;
        if current.building.is_some() {
            return Ok(current);
        }
        let next = current.highest.max(current.generation) + 1;
        let reply = self
            .docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "generation": i64::from(current.generation), "building": 0_i64},
                doc! {"$set": {"building": i64::from(next), "highest": i64::from(next), "rebuild": Bson::Null}},
            )
            .await?;
        if reply.matched_count == 0 {
            // Someone else started or switched meanwhile: take what is there now.
            return Box::pin(self.begin_rebuild(projection)).await;
        }
        self.pointer(projection).await
    }

    /// Publishes rebuild progress for `/projections` and `courseview status`.
    pub async fn record_rebuild_progress(&self, projection: &str, progress: &RebuildProgress) -> Result<()> {
        self.docs(POINTERS)
            .update_one(
                doc! {"_id": projection},
                doc! {"$set": {"rebuild": bson::to_document(progress)?}},
            )
            .await?;
        Ok(())
    }

    /// Asks live workers of `from` to pause until `until` (Unix ms) while
    /// the rebuild of `to` closes the gap. Returns whether it was set.
    #[instrument(skip_all, fields(projection, from, to))]
    pub async fn request_handover(&self, projection: &str, from: u32, to: u32, until: i64) -> Result<bool> {
        let reply = self
            .docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "generation": i64::from(from), "building": i64::from(to)},
                doc! {"$set": {"handoverTo": i64::from(to), "handoverUntil": until}},
            )
            .await?;
        Ok(reply.matched_count == 1)
    }

    /// Withdraws a handover request (the rebuild stopped before switching).
    pub async fn cancel_handover(&self, projection: &str) -> Result<()> {
        self.docs(POINTERS)
            .update_one(
                doc! {"_id": projection},
                doc! {"$set": {"handoverTo": 0_i64, "handoverUntil": 0_i64}},
            )
            .await?;
        Ok(())
    }

    /// Atomically points readers at `to` if `from` is still served and `to`
    /// is the generation being built. Returns whether it switched.
    #[instrument(skip_all, fields(projection, from, to))]
    pub async fn switch_generation(&self, projection: &str, from: u32, to: u32, latest: i64) -> Result<bool> {
        // Only while the handover is open, with a margin (`latest`): past it,
        // live workers may be applying to `from` again.
        if chrono::Utc::now().timestamp_millis() >= latest {
            return Ok(false);
        }
        let reply = self
            .docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "generation": i64::from(from), "building": i64::from(to), "handoverUntil": {"$gt": latest}},
                doc! {"$set": {"generation": i64::from(to), "building": 0_i64, "previous": i64::from(from), "switchedAt": bson::DateTime::now(), "handoverTo": 0_i64, "handoverUntil": 0_i64}},
            )
            .await?;
        Ok(reply.modified_count == 1)
    }

    /// Drops a generation's collection and checkpoints.
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn drop_generation(&self, projection: &str, generation: u32) -> Result<()> {
        self.docs(&Self::collection_name(projection, generation)).drop().await?;
        self.docs(CHECKPOINTS)
            .delete_many(doc! {"projection": projection, "generation": i64::from(generation)})
            .await?;
        Ok(())
    }

    /// Collection names of the database (to check what a rebuild dropped).
    pub async fn collection_names(&self) -> Result<Vec<String>> {
        Ok(self.db.list_collection_names().await?)
    }

    /// The collection holding `generation` of `projection`.
    pub fn collection_name(projection: &str, generation: u32) -> String {
        format!("{projection}_g{generation}")
    }

    // ---- read-model writes --------------------------------------------------

    /// Loads the stored states of these courses.
    #[instrument(skip_all, fields(collection, courses = ids.len()))]
    pub async fn load_states(&self, collection: &str, ids: &[String]) -> Result<HashMap<String, Stored>> {
        let mut found = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(found);
        }
        let options = FindOptions::builder().projection(doc! {"state": 1, "_rev": 1}).build();
        let mut cursor = self
            .docs(collection)
            .find(doc! {"_id": {"$in": ids}})
            .with_options(options)
            .await?;
        while let Some(mut doc) = cursor.try_next().await? {
            // A state that cannot be read stops the worker (Failed): skipping
            // it would throw away the stamps that make replays converge.
            let unreadable = |doc: &Document, what: String| {
                let id = doc.get("_id").map_or_else(|| "?".into(), ToString::to_string);
                StoreError::Failed(format!(
                    "state of {id} in {collection}: {what} (rebuild the projection to rewrite it)"
                ))
            };
            let state: CourseState = match doc.remove("state") {
                Some(Bson::String(json)) => serde_json::from_str(&json).map_err(|e| unreadable(&doc, e.to_string()))?,
                // As written before states were stored encoded.
                Some(Bson::Document(state)) => {
                    bson::from_document(state).map_err(|e| unreadable(&doc, e.to_string()))?
                }
                other => return Err(unreadable(&doc, format!("unexpected {other:?}"))),
            };
            let rev = get_int(&doc, "_rev").unwrap_or_default();
            found.insert(state.course_id.clone(), Stored { state, rev });
        }
        Ok(found)
    }

    /// Writes documents guarded by their revision. Returns the ids whose
    /// revision moved (another worker wrote them): the caller reloads and
    /// reapplies those, which is safe because applying is idempotent.
    #[instrument(skip_all, fields(collection, docs = writes.len()))]
    pub async fn write_states(&self, collection: &str, writes: &[DocWrite]) -> Result<Vec<String>> {
        fn or_null<T: Into<RawBson>>(value: Option<T>) -> RawBson {
            value.map_or(RawBson::Null, Into::into)
        }
        let mut updates = Vec::with_capacity(writes.len());
        for w in writes {
            let s = &w.state;
            // Built as encoded BSON: a batch of `Document` trees held
            // about 20 KiB per course at its peak (heaptrack).
            let mut replacement = RawDocumentBuf::new();
            replacement.append("_id", w.id.as_str());
            replacement.append("_rev", w.expected_rev + 1);
            // The state is the projector's private bookkeeping (a stamp per
            // field); nothing queries inside it, so it is stored as one
            // JSON string, which the store keeps without parsing ~30 nested
            // fields: the test peer writes such documents a third faster
            // (PERFORMANCE.md). A string rather than BSON binary: the peer
            // fails to report a duplicate key on a document holding binary.
            let state = serde_json::to_string(s).map_err(|e| StoreError::Failed(format!("unencodable state: {e}")))?;
            replacement.append("state", state);
            // Top-level copies of what the API filters and sorts on.
            replacement.append("listed", w.view.is_some());
            replacement.append("view", or_null(w.view.clone()));
            replacement.append("teacherId", or_null(s.teacher_id.as_ref().map(|t| t.value.as_str())));
            replacement.append("name", or_null(s.name.as_ref().map(|n| n.value.as_str())));
            replacement.append("postedAt", or_null(s.posted_at()));
            replacement.append("registeredAt", or_null(s.registered_at.as_ref().map(|r| r.value)));
            // Top-level so reading it needs no dotted projection (the
            // test peer flattens those; see COMPATIBILITY.md).
            replacement.append("version", or_null(s.version));
            // The pages' tie-break: a copy of `_id` that indexes may
            // hold (the test peer rejects `_id` in compound keys).
            replacement.append("sortId", w.id.as_str());
            let mut statement = RawDocumentBuf::new();
            statement.append("q", rawdoc! {"_id": w.id.as_str(), "_rev": w.expected_rev});
            statement.append("u", replacement);
            statement.append("upsert", true);
            updates.push(statement);
        }
        let conflicts = self.update_many_statements(collection, updates).await?;
        Ok(conflicts
            .into_iter()
            .filter_map(|i| writes.get(i))
            .map(|w| w.id.clone())
            .collect())
    }

    /// The indexes the API's queries on this read model need: for each page
    /// query, its equality fields first, then its sort keys in sort order
    /// with the `sortId` tie-break, so MongoDB walks the index in order and
    /// needs no in-memory sort (docs/COMPATIBILITY.md lists each query).
    pub fn index_keys(model: ReadModel) -> Vec<Document> {
        match model {
            ReadModel::Catalog => vec![
                doc! {"listed": 1, "postedAt": -1, "sortId": -1},
                doc! {"listed": 1, "name": 1, "sortId": 1},
                doc! {"listed": 1, "teacherId": 1, "postedAt": -1, "sortId": -1},
                doc! {"listed": 1, "teacherId": 1, "name": 1, "sortId": 1},
            ],
            ReadModel::TeacherCourses => vec![
                doc! {"listed": 1, "teacherId": 1, "registeredAt": -1, "sortId": -1},
                doc! {"listed": 1, "teacherId": 1, "name": 1, "sortId": 1},
            ],
        }
    }

    /// Creates [`Store::index_keys`] on a generation's collection.
    #[instrument(skip_all, fields(collection))]
    pub async fn ensure_indexes(&self, collection: &str, model: ReadModel) -> Result<()> {
        let models: Vec<IndexModel> = Self::index_keys(model)
            .into_iter()
            .map(|k| {
                IndexModel::builder()
                    .keys(k)
                    .options(IndexOptions::builder().build())
                    .build()
            })
            .collect();
        self.docs(collection).create_indexes(models).await?;
        Ok(())
    }

    // ---- checkpoints --------------------------------------------------------

    fn checkpoint_id(projection: &str, generation: u32, topic: &str, partition: i32) -> String {
        format!("{projection}/g{generation}/{topic}/{partition}")
    }

    /// The next offset to read per (topic, partition) of this projection generation.
    pub async fn load_offsets(&self, projection: &str, generation: u32) -> Result<HashMap<(String, i32), i64>> {
        let checkpoints = self.load_checkpoints(projection, generation).await?;
        Ok(checkpoints.into_iter().map(|(k, c)| (k, c.offset)).collect())
    }

    /// Stored offsets with the time each last moved.
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn load_checkpoints(
        &self,
        projection: &str,
        generation: u32,
    ) -> Result<HashMap<(String, i32), Checkpoint>> {
        let mut cursor = self
            .docs(CHECKPOINTS)
            .find(doc! {"projection": projection, "generation": i64::from(generation)})
            .await?;
        let mut checkpoints = HashMap::new();
        while let Some(doc) = cursor.try_next().await? {
            if let (Ok(topic), Some(partition), Some(offset)) = (
                doc.get_str("topic"),
                get_int(&doc, "partition"),
                get_int(&doc, "offset"),
            ) {
                let updated_at = get_int(&doc, "updatedAt");
                checkpoints.insert((topic.to_owned(), partition as i32), Checkpoint { offset, updated_at });
            }
        }
        Ok(checkpoints)
    }

    /// Stores next-offsets; an offset never moves backwards, so a worker that
    /// lost its partitions in a rebalance cannot rewind the new owner.
    #[instrument(skip_all, fields(projection, generation, partitions = offsets.len()))]
    pub async fn store_offsets(&self, projection: &str, generation: u32, offsets: &[(String, i32, i64)]) -> Result<()> {
        // Epoch milliseconds rather than a BSON date: the test peer returns
        // dates as strings (COMPATIBILITY.md), and stall detection reads it.
        let now = chrono::Utc::now().timestamp_millis();
        let updates = offsets
            .iter()
            .map(|(topic, partition, offset)| {
                doc! {
                    "q": {"_id": Self::checkpoint_id(projection, generation, topic, *partition), "offset": {"$lt": offset}},
                    "u": {"$set": {
                        "projection": projection,
                        "generation": i64::from(generation),
                        "topic": topic,
                        "partition": i64::from(*partition),
                        "offset": offset,
                        "updatedAt": now,
                    }},
                    "upsert": true,
                }
            })
            .collect();
        // A duplicate key means a newer offset is already stored: nothing to do.
        self.update_many_statements(CHECKPOINTS, encoded(updates)?).await?;
        Ok(())
    }

    // ---- dead letters -------------------------------------------------------

    #[instrument(skip_all, fields(count = letters.len()))]
    pub async fn put_dead_letters(&self, letters: &[DeadLetter]) -> Result<()> {
        let now = bson::DateTime::now();
        let mut updates = Vec::with_capacity(letters.len());
        for letter in letters {
            let mut body = bson::to_document(letter)?;
            body.insert("deadAt", now);
            updates.push(doc! {"q": {"_id": letter.id()}, "u": {"$set": body}, "upsert": true});
        }
        self.update_many_statements(DEAD_LETTERS, encoded(updates)?).await?;
        Ok(())
    }

    /// Dead letters of a projection (all when `None`), oldest first.
    #[instrument(skip_all)]
    pub async fn dead_letters(&self, projection: Option<&str>, limit: i64) -> Result<Vec<(String, DeadLetter)>> {
        let filter = projection.map_or_else(Document::new, |p| doc! {"projection": p});
        let options = FindOptions::builder()
            .sort(doc! {"deadAt": 1, "_id": 1})
            .limit(limit)
            .build();
        let mut cursor = self.docs(DEAD_LETTERS).find(filter).with_options(options).await?;
        let mut out = Vec::new();
        while let Some(doc) = cursor.try_next().await? {
            let id = doc.get_str("_id").unwrap_or_default().to_owned();
            let letter: DeadLetter = bson::from_document(doc)
                .map_err(|e| StoreError::Failed(format!("unreadable dead letter {id}: {e}")))?;
            out.push((id, letter));
        }
        Ok(out)
    }

    /// One dead letter by id.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let Some(doc) = self.docs(DEAD_LETTERS).find_one(doc! {"_id": id}).await? else {
            return Ok(None);
        };
        bson::from_document(doc)
            .map(Some)
            .map_err(|e| StoreError::Failed(format!("unreadable dead letter {id}: {e}")))
    }

    pub async fn remove_dead_letter(&self, id: &str) -> Result<()> {
        self.docs(DEAD_LETTERS).delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// Records a gap in the log once (a letter of its own kind, keyed by
    /// generation, partition and stored offset). With `rewind`, for a log
    /// reset the worker goes on from, it then moves the checkpoint back to
    /// the new log's start: a checkpoint goes back only here, never through
    /// `store_offsets`' guard.
    #[instrument(skip_all, fields(projection, generation, topic = %gap.topic, partition = gap.partition))]
    pub async fn record_gap(&self, projection: &str, generation: u32, gap: &Gap, rewind: bool) -> Result<()> {
        self.put_dead_letters(&[DeadLetter::gap(projection, generation, gap)])
            .await?;
        if rewind {
            let id = Self::checkpoint_id(projection, generation, &gap.topic, gap.partition);
            self.docs(CHECKPOINTS)
                .update_one(
                    doc! {"_id": &id, "offset": gap.stored},
                    doc! {"$set": {"offset": gap.resume_at(), "updatedAt": chrono::Utc::now().timestamp_millis()}},
                )
                .await?;
            tracing::warn!(
                checkpoint = %id,
                from = gap.stored,
                to = gap.resume_at(),
                "Checkpoint moved back to the start of the re-created log (log reset, COURSEVIEW_ON_GAP=continue)."
            );
        }
        Ok(())
    }

    /// Gaps recorded for a generation of a projection, oldest first.
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn gaps(&self, projection: &str, generation: u32) -> Result<Vec<DeadLetter>> {
        let filter = doc! {"projection": projection, "gap.generation": i64::from(generation)};
        // Without deadAt: the test peer returns dates as strings.
        let options = FindOptions::builder()
            .sort(doc! {"deadAt": 1, "_id": 1})
            .projection(doc! {"deadAt": 0})
            .limit(1_000)
            .build();
        let cursor = self.docs(DEAD_LETTERS).find(filter).with_options(options).await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        docs.into_iter()
            .map(|d| bson::from_document(d).map_err(|e| StoreError::Failed(format!("unreadable gap letter: {e}"))))
            .collect()
    }

    pub async fn count_dead_letters(&self, projection: &str) -> Result<u64> {
        Ok(self
            .docs(DEAD_LETTERS)
            .count_documents(doc! {"projection": projection})
            .await?)
    }

    // ---- worker registry ----------------------------------------------------

    /// Records (or refreshes) a worker's entry.
    pub async fn put_worker(&self, entry: &WorkerEntry) -> Result<()> {
        let mut body = bson::to_document(entry)?;
        body.remove("_id");
        self.update_many_statements(
            WORKERS,
            encoded(vec![
                doc! {"q": {"_id": &entry.id}, "u": {"$set": body}, "upsert": true},
            ])?,
        )
        .await?;
        Ok(())
    }

    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        self.docs(WORKERS).delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// Workers of a projection (all when `None`) whose heartbeat is fresh.
    pub async fn live_workers(&self, projection: Option<&str>) -> Result<Vec<WorkerEntry>> {
        let filter = projection.map_or_else(Document::new, |p| doc! {"projection": p});
        let mut cursor = self.docs(WORKERS).find(filter).await?;
        let now = chrono::Utc::now().timestamp_millis();
        let mut live = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            let (Some(heartbeat_at), Some(stale_after_ms), Some(generation), Some(pid)) = (
                get_int(&d, "heartbeatAt"),
                get_int(&d, "staleAfterMs"),
                get_int(&d, "generation"),
                get_int(&d, "pid"),
            ) else {
                continue;
            };
            if now - heartbeat_at > stale_after_ms {
                continue;
            }
            let text = |k: &str| d.get_str(k).unwrap_or_default().to_owned();
            live.push(WorkerEntry {
                id: text("_id"),
                projection: text("projection"),
                generation: u32::try_from(generation).unwrap_or_default(),
                applying: get_flag(&d, "applying"),
                paused_for: get_int(&d, "pausedFor"),
                metrics_addr: text("metricsAddr"),
                host: text("host"),
                pid: u32::try_from(pid).unwrap_or_default(),
                heartbeat_at,
                stale_after_ms,
                invalidates: d.get_str("invalidates").ok().map(str::to_owned),
            });
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    // ---- queries ------------------------------------------------------------

    /// The served view of one listed course.
    #[instrument(skip_all, fields(collection))]
    pub async fn listed_view(&self, collection: &str, id: &str) -> Result<Option<Document>> {
        let found = self
            .docs(collection)
            .find_one(doc! {"_id": id, "listed": true})
            .projection(doc! {"view": 1})
            .max_time(API_QUERY_TIME_LIMIT)
            .await?;
        Ok(found.and_then(|d| d.get_document("view").ok().cloned()))
    }

    /// The highest version applied to a course, listed or not.
    pub async fn applied_version(&self, collection: &str, id: &str) -> Result<Option<i64>> {
        let found = self
            .docs(collection)
            .find_one(doc! {"_id": id})
            .projection(doc! {"version": 1})
            .max_time(API_QUERY_TIME_LIMIT)
            .await?;
        Ok(found.and_then(|d| get_int(&d, "version")))
    }

    /// One page of listed views, keyset-paginated on (sort field, _id).
    #[instrument(skip_all, fields(collection))]
    pub async fn page(&self, collection: &str, q: &PageQuery) -> Result<Page> {
        let mut clauses = vec![doc! {"listed": true}];
        for (field, value) in &q.filter {
            clauses.push(doc! {field: value});
        }
        if let Some((text, fields)) = &q.text {
            let pattern = escape_regex(text);
            let any: Vec<Document> = fields
                .iter()
                .map(|f| doc! {*f: {"$regex": &pattern, "$options": "i"}})
                .collect();
            clauses.push(doc! {"$or": any});
        }
        let (cmp, dir) = if q.descending { ("$lt", -1) } else { ("$gt", 1) };
        if let Some((value, id)) = &q.after {
            clauses.push(doc! {"$or": [
                {q.sort_field: {cmp: value.clone()}},
                {q.sort_field: value.clone(), "sortId": {cmp: id}},
            ]});
        }
        let options = FindOptions::builder()
            .sort(doc! {q.sort_field: dir, "sortId": dir})
            .limit(q.limit + 1)
            .projection(doc! {"view": 1, q.sort_field: 1})
            .max_time(API_QUERY_TIME_LIMIT)
            .build();
        let mut cursor = self
            .docs(collection)
            .find(doc! {"$and": clauses})
            .with_options(options)
            .await?;
        let mut items = Vec::new();
        while let Some(doc) = cursor.try_next().await? {
            let id = doc.get_str("_id").unwrap_or_default().to_owned();
            let key = doc.get(q.sort_field).cloned().unwrap_or(Bson::Null);
            let view = doc.get_document("view").cloned().unwrap_or_default();
            items.push((view, key, id));
        }
        let more = items.len() as i64 > q.limit;
        items.truncate(usize::try_from(q.limit).unwrap_or_default());
        Ok(Page { items, more })
    }

    /// Number of documents in a collection (for status and tests).
    pub async fn count(&self, collection: &str, filter: Document) -> Result<u64> {
        Ok(self.docs(collection).count_documents(filter).await?)
    }

    /// All documents of a collection sorted by id, without revision numbers;
    /// what "the read model equals a clean replay" compares.
    pub async fn dump(&self, collection: &str) -> Result<Vec<Document>> {
        let options = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .projection(doc! {"_rev": 0})
            .build();
        let cursor = self.docs(collection).find(doc! {}).with_options(options).await?;
        Ok(cursor.try_collect().await?)
    }
}

/// Splits statements into runs of at most `max_bytes` (encoded) and
/// `max_count` statements; a single larger statement goes alone.
fn chunk_by_size(docs: Vec<RawDocumentBuf>, max_bytes: usize, max_count: usize) -> Vec<Vec<RawDocumentBuf>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for d in docs {
        let size = d.as_bytes().len();
        if !current.is_empty() && (bytes + size > max_bytes || current.len() == max_count) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(d);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A worker process's entry in the registry, per projection it runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerEntry {
    #[serde(rename = "_id")]
    pub id: String,
    pub projection: String,
    /// The generation it applies to (0 before it has started one).
    pub generation: u32,
    /// Whether it is consuming now (partitions assigned); false while it
    /// joins, or pauses for a rebuild's handover.
    pub applying: bool,
    /// Paused for the rebuild's handover request ending at this time (ms):
    /// it applies nothing until then. What the rebuild waits for, matched
    /// to its own request (`applying` is also false for an idle worker
    /// that may apply its next record).
    #[serde(default)]
    pub paused_for: Option<i64>,
    pub metrics_addr: String,
    pub host: String,
    pub pid: u32,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_at: i64,
    /// The entry is stale (a dead process) this long after its heartbeat.
    pub stale_after_ms: i64,
    /// The Redis key prefix whose cache it invalidates; `None`: none (run
    /// with `--no-cache-invalidation`). An API with another prefix serves
    /// answers this worker never invalidates, and says so on `/readyz`.
    #[serde(default)]
    pub invalidates: Option<String>,
}

impl WorkerEntry {
    pub fn new(projection: &str, metrics_addr: String, heartbeat_every: Duration) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let pid = std::process::id();
        WorkerEntry {
            id: format!("{host}/{pid}/{projection}"),
            projection: projection.to_owned(),
            generation: 0,
            applying: false,
            paused_for: None,
            metrics_addr,
            host,
            pid,
            heartbeat_at: 0,
            stale_after_ms: i64::try_from(heartbeat_every.as_millis() * 3)
                .unwrap_or(i64::MAX)
                .max(1_000),
            invalidates: None,
        }
    }
}

/// An integer field whatever its BSON width. The test peer hands back
/// int64 values that fit in 32 bits as int32; real MongoDB keeps the type.
/// Reading both is correct for either.
pub fn get_int(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key)? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

/// A boolean field, also when the store hands it back as an integer (the
/// test peer nx-27017 keeps booleans as 0/1: docs/COMPATIBILITY.md).
fn get_flag(doc: &Document, key: &str) -> bool {
    match doc.get(key) {
        Some(Bson::Boolean(b)) => *b,
        Some(_) => get_int(doc, key).is_some_and(|v| v != 0),
        None => false,
    }
}

/// Escapes regex metacharacters so user text matches literally.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\^$.|?*+()[]{}-/#".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Statements built as `Document`s, encoded for [`Store::update_many_statements`].
fn encoded(docs: Vec<Document>) -> Result<Vec<RawDocumentBuf>> {
    docs.iter()
        .map(|d| {
            RawDocumentBuf::from_document(d).map_err(|e| StoreError::Failed(format!("unencodable statement: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_split_so_no_command_nears_the_document_limit() {
        let big = "x".repeat(3 * 1024 * 1024);
        let docs = (0..7).map(|i| rawdoc! {"i": i, "pad": big.as_str()}).collect();
        let chunks = chunk_by_size(docs, MAX_COMMAND_BYTES, MAX_COMMAND_STATEMENTS);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2, 1]);
        let many = (0..25_001).map(|i| rawdoc! {"i": i}).collect();
        assert_eq!(chunk_by_size(many, MAX_COMMAND_BYTES, MAX_COMMAND_STATEMENTS).len(), 3);
    }

    #[test]
    fn election_and_shutdown_codes_are_transient_and_others_are_not() {
        for code in [10107, 11602, 13435, 189, 91] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in [2, 11000, 13, 121] {
            assert!(!is_transient_code(code), "{code}");
        }
    }

    #[test]
    fn a_write_concern_error_makes_an_acknowledged_update_transient() {
        // What a replica-set primary stepping down mid-batch answers: ok 1,
        // every statement applied locally, the majority never reached.
        let reply = doc! {
            "ok": 1, "n": 3, "nModified": 3,
            "writeConcernError": {"code": 189, "codeName": "PrimarySteppedDown", "errmsg": "stepped down while waiting for replication"},
        };
        match super::refused_statements("catalog_g1", 0, &reply) {
            Err(StoreError::Unavailable(e)) => {
                assert!(e.to_string().contains("PrimarySteppedDown") || e.to_string().contains("189"))
            }
            other => panic!("must be transient, not {other:?}"),
        }
        // Alongside duplicate keys too: the concern error decides.
        let both = doc! {
            "ok": 1, "n": 1,
            "writeErrors": [{"index": 0, "code": 11000, "errmsg": "dup"}],
            "writeConcernError": {"code": 91, "errmsg": "shutting down"},
        };
        assert!(matches!(
            super::refused_statements("c", 0, &both),
            Err(StoreError::Unavailable(_))
        ));
        // Without one: duplicates are refusals, offset by the chunk's start.
        let dups = doc! {"ok": 1, "n": 1, "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}]};
        assert_eq!(super::refused_statements("c", 10, &dups).expect("fine"), vec![11]);
    }

    #[test]
    fn user_text_is_matched_literally() {
        assert_eq!(super::escape_regex("a.b*(c)"), r"a\.b\*\(c\)");
    }
}
