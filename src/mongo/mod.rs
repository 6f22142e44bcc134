//! MongoDB: the only module that builds BSON queries. One file per job:
//! the generation `pointer`, `read_models` (writes and indexes),
//! `checkpoints`, `dead_letters`, the worker `registry` and the API's
//! `queries`; here, the connection, errors and the `update` command
//! they share.
//!
//! Every operation here is one real MongoDB has had for a decade (find,
//! the `update` command with several statements, `count`, `createIndexes`,
//! drop), so the test peer and docker-compose's `mongod` run the same code.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, rawdoc, Bson, Document, RawArrayBuf, RawBson, RawDocumentBuf};
use courseview_projections::{CourseState, PackedState};
use futures::TryStreamExt;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{ClientOptions, FindOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use tracing::instrument;

use crate::dead_letter::DeadLetter;
use crate::kafka::Gap;
use crate::read_model::ReadModel;

mod checkpoints;
mod dead_letters;
mod pointer;
mod queries;
mod read_models;
mod registry;

pub use checkpoints::{AlreadyNewer, Checkpoint};
pub use pointer::{PauseInfo, Pointer, RebuildProgress};
pub use queries::{ListQuery, Listing, Order, Page, PageItem, SortKey};
pub use read_models::{encoded_view, Conflicts, DocWrite, Stored};
pub use registry::WorkerEntry;

/// Pointer documents: which generation of each projection readers follow.
const POINTERS: &str = "projections";
const CHECKPOINTS: &str = "checkpoints";
const DEAD_LETTERS: &str = "dead_letters";
/// The Kafka topic id each stored offset was read under.
const TOPIC_IDS: &str = "topic_ids";
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

/// Statements a write command refused as duplicate keys, by index in
/// the statements given. What a refusal means is the caller's to say: a
/// revision that moved ([`Conflicts`]), an offset already newer
/// ([`AlreadyNewer`]), a document a concurrent upsert created first.
#[derive(Debug, Default, PartialEq, Eq)]
struct DuplicateKeys(Vec<usize>);

/// The write command a run of statements goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WriteCommand {
    /// `update` with upserts: each statement is counted in `n` (matched
    /// or upserted) or named by a write error.
    Update,
    /// `insert` of documents presumed new: each is counted in `n` or
    /// named by a write error (a duplicate key when its `_id` exists).
    Insert,
}

impl WriteCommand {
    fn name(self) -> &'static str {
        match self {
            WriteCommand::Update => "update",
            WriteCommand::Insert => "insert",
        }
    }

    /// The command's field that holds the statements.
    fn statements(self) -> &'static str {
        match self {
            WriteCommand::Update => "updates",
            WriteCommand::Insert => "documents",
        }
    }
}

/// What a write command's reply (`ok: 1`) says of its statements: the
/// indexes (offset by `start`) refused as duplicate keys, or an error.
/// A `writeConcernError` makes the whole command transient: on a replica
/// set the writes may be rolled back (a primary stepping down while the
/// batch waited for majority), so the batch must be retried and nothing
/// after it (offsets, remembered states) may count on it.
///
/// Every statement courseview sends is an upsert or an insert, so each one
/// is either counted in `n` or named by a write error. A reply
/// that accounts for fewer (or names one twice, or out of range) cannot be
/// trusted about which statement failed: FerretDB 1.x stops an unordered
/// `update` at the first failure and names the wrong index, so taking it
/// at its word would remember a conflict as written and lose its events.
/// Such a reply is [`Reply::Miscounted`]: retry, remember nothing.
fn refused_statements(
    command: WriteCommand,
    collection: &str,
    start: usize,
    len: usize,
    reply: &Document,
) -> Result<Reply> {
    let command = command.name();
    if let Ok(concern) = reply.get_document("writeConcernError") {
        let code = concern.get_i32("code").unwrap_or_default();
        let message = concern.get_str("errmsg").unwrap_or("write concern not satisfied");
        return Err(StoreError::Unavailable(Box::new(MongoError::custom(format!(
            "{command} on {collection}: write concern error: {message} (code {code})"
        )))));
    }
    let mut duplicates = Vec::new();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for error in errors.iter().filter_map(Bson::as_document) {
            let code = error.get_i32("code").unwrap_or_default();
            let Some(index) = get_int(error, "index") else {
                return Ok(Reply::Miscounted("a write error without its statement's index".into()));
            };
            let message = error.get_str("errmsg").unwrap_or("unknown write error");
            if code == DUPLICATE_KEY {
                match usize::try_from(index) {
                    Ok(index) if index < len && !duplicates.contains(&(start + index)) => {
                        duplicates.push(start + index)
                    }
                    _ => {
                        return Ok(Reply::Miscounted(format!(
                            "write error index {index} of {len} statements"
                        )))
                    }
                }
            } else if is_transient_code(code) {
                return Err(StoreError::Unavailable(Box::new(MongoError::custom(format!(
                    "{command} on {collection}: {message} (code {code})"
                )))));
            } else {
                return Err(StoreError::Failed(format!(
                    "{command} on {collection}: {message} (code {code})"
                )));
            }
        }
    }
    let counted = get_int(reply, "n").and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    if counted + duplicates.len() != len {
        return Ok(Reply::Miscounted(format!(
            "n = {counted} and {} write errors for {len} statements",
            duplicates.len()
        )));
    }
    Ok(Reply::Accounted(duplicates))
}

/// What a write command's reply says of its statements.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Every statement is counted: these (offset) were duplicate keys.
    Accounted(Vec<usize>),
    /// The reply does not account for every statement (what it lacks).
    Miscounted(String),
}

/// Miscounted replies in a row after which a store is not trusted: the
/// server keeps answering writes wrongly, so the caller stops.
const MISCOUNTS_TOLERATED: u32 = 5;

/// What the caller must do about a failed MongoDB operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server is unreachable or overloaded: retry later, do not advance.
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(#[source] Box<MongoError>),
    /// Other writers kept changing these documents under ours, round after
    /// round: contention, transient by nature; retry later.
    #[error("{0} documents kept changing under us")]
    Contended(usize),
    /// Anything else (auth, bad command, corrupt document): stop and report.
    #[error("MongoDB operation failed: {0}")]
    Failed(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Contended(_))
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

/// Handle on the courseview database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
    /// Per command and collection: write replies in a row that did not
    /// account for every statement (another collection's good reply says
    /// nothing of it, nor does an `insert`'s of the `update`s).
    miscounts: Arc<std::sync::Mutex<HashMap<(WriteCommand, String), u32>>>,
    /// The hosts given (for messages that name the server).
    hosts: Arc<str>,
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
        let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
        let client = Client::with_options(options)?;
        Ok(Store {
            db: client.database(database),
            miscounts: Arc::default(),
            hosts: hosts.join(",").into(),
        })
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// The hosts this store talks to (for messages; no credentials).
    fn server(&self) -> &str {
        &self.hosts
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
    /// trips as the command size limit allows, and returns the statements
    /// that hit a duplicate key.
    async fn update_many_statements(&self, collection: &str, updates: Vec<RawDocumentBuf>) -> Result<DuplicateKeys> {
        self.write_statements(WriteCommand::Update, collection, updates).await
    }

    /// Runs `command` (unordered) with many statements, in as few round
    /// trips as the command size limit allows, and returns the statements
    /// that hit a duplicate key.
    async fn write_statements(
        &self,
        write: WriteCommand,
        collection: &str,
        all: Vec<RawDocumentBuf>,
    ) -> Result<DuplicateKeys> {
        let mut duplicates = Vec::new();
        let mut start = 0;
        for chunk in chunk_by_size(all, MAX_COMMAND_BYTES, MAX_COMMAND_STATEMENTS) {
            let len = chunk.len();
            let mut statements = RawArrayBuf::new();
            for statement in chunk {
                statements.push(statement);
            }
            // The command's name first: a command is named by its first field.
            let mut command = RawDocumentBuf::new();
            command.append(write.name(), collection);
            command.append(write.statements(), statements);
            command.append("ordered", false);
            let reply = self.db.run_raw_command(command).await?;
            match refused_statements(write, collection, start, len, &reply)? {
                Reply::Accounted(refused) => {
                    if let Ok(mut counts) = self.miscounts.lock() {
                        counts.remove(&(write, collection.to_owned()));
                    }
                    duplicates.extend(refused);
                }
                Reply::Miscounted(what) => {
                    let server = self.server();
                    let times = self.miscounts.lock().map_or(1, |mut counts| {
                        let times = counts.entry((write, collection.to_owned())).or_default();
                        *times += 1;
                        *times
                    });
                    if times >= MISCOUNTS_TOLERATED {
                        return Err(StoreError::Failed(format!(
                            "the MongoDB server at {server} answered {times} {command}s in a row without accounting for every statement \
                             (last: {what}), so which writes failed cannot be known; it is not MongoDB-compatible enough for courseview \
                             (FerretDB 1.x does this: README, \"MongoDB-compatible servers\")",
                            command = write.name()
                        )));
                    }
                    return Err(StoreError::Unavailable(Box::new(MongoError::custom(format!(
                        "{} on {collection}: the server at {server} answered {what}; retrying, nothing counted",
                        write.name()
                    )))));
                }
            }
            start += len;
        }
        Ok(DuplicateKeys(duplicates))
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
        match super::refused_statements(super::WriteCommand::Update, "catalog_g1", 0, 3, &reply) {
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
            super::refused_statements(super::WriteCommand::Update, "c", 0, 2, &both),
            Err(StoreError::Unavailable(_))
        ));
        // Without one: duplicates are refusals, offset by the chunk's start.
        let dups = doc! {"ok": 1, "n": 1, "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}]};
        assert_eq!(
            super::refused_statements(super::WriteCommand::Update, "c", 10, 2, &dups).expect("fine"),
            Reply::Accounted(vec![11])
        );
    }

    #[test]
    fn a_reply_that_does_not_account_for_every_statement_is_not_believed() {
        // FerretDB 1.24.2 on `[a: guard ok, b: stale guard]`, unordered.
        let ferretdb =
            doc! {"ok": 1.0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key error"}]};
        assert!(matches!(
            super::refused_statements(super::WriteCommand::Update, "c", 0, 2, &ferretdb),
            Ok(Reply::Miscounted(_))
        ));
        // MongoDB's answer to the same.
        let mongodb = doc! {"ok": 1, "n": 1, "nModified": 0, "upserted": [{"index": 0, "_id": "a"}], "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}]};
        assert_eq!(
            super::refused_statements(super::WriteCommand::Update, "c", 0, 2, &mongodb).expect("fine"),
            Reply::Accounted(vec![1])
        );
        // Stopped after the failure: the statements after it are unaccounted.
        let stopped = doc! {"ok": 1, "n": 1, "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}]};
        assert!(matches!(
            super::refused_statements(super::WriteCommand::Update, "c", 0, 3, &stopped),
            Ok(Reply::Miscounted(_))
        ));
        // An index out of range, or named twice.
        for errors in [
            vec![doc! {"index": 2, "code": 11000}],
            vec![doc! {"index": 0, "code": 11000}, doc! {"index": 0, "code": 11000}],
        ] {
            let reply = doc! {"ok": 1, "n": 0, "writeErrors": errors};
            assert!(matches!(
                super::refused_statements(super::WriteCommand::Update, "c", 0, 2, &reply),
                Ok(Reply::Miscounted(_))
            ));
        }
    }
}
