//! Read-model documents: revision-guarded writes, state loads, indexes.

use super::*;

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
    view: Option<RawDocumentBuf>,
}

impl DocWrite {
    /// The write of `state` as `model` serves it.
    pub fn new(model: ReadModel, id: String, expected_rev: i64, state: CourseState) -> Self {
        DocWrite {
            view: encoded_view(model, &state),
            id,
            expected_rev,
            state,
        }
    }
}

/// The document `model` serves for this course, as stored; `None` when the
/// course is not listed.
pub fn encoded_view(model: ReadModel, state: &CourseState) -> Option<RawDocumentBuf> {
    model.encode_view(state, EncodeBson)
}

/// Views straight to encoded BSON: a `Document` tree costs an order of
/// magnitude more memory and time, and the writer only sends bytes.
struct EncodeBson;

impl crate::read_model::EncodeView for EncodeBson {
    type Encoded = RawDocumentBuf;
    fn encode<V: serde::Serialize>(self, view: &V) -> Option<RawDocumentBuf> {
        bson::to_raw_document_buf(view).ok()
    }
}

/// Courses whose revision moved since they were read (another worker wrote
/// them): reload and reapply them, which is safe because applying is
/// idempotent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "conflicted courses were not written"]
pub struct Conflicts(pub Vec<String>);

impl Conflicts {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0.iter().any(|c| c == id)
    }
}

/// The document a write stores: what the API reads, the packed state and
/// the fields the catalog's indexes hold, at the write's next revision.
fn stored_document(w: &DocWrite) -> Result<RawDocumentBuf> {
    fn or_null<T: Into<RawBson>>(value: Option<T>) -> RawBson {
        value.map_or(RawBson::Null, Into::into)
    }
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
    // Packed (each stamp once, no course id): half the bytes.
    let state = serde_json::to_string(&PackedState::pack(s))
        .map_err(|e| StoreError::Failed(format!("unencodable state: {e}")))?;
    replacement.append("st", state);
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
    Ok(replacement)
}

impl Store {
    /// Loads the stored states of these courses.
    #[instrument(skip_all, fields(collection, courses = ids.len()))]
    pub async fn load_states(&self, collection: &str, ids: &[String]) -> Result<HashMap<String, Stored>> {
        let mut found = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(found);
        }
        // Room for every state in the first reply (one more than asked
        // for, or MongoDB keeps a cursor open on an exact fill), up to the
        // server's 16 MiB a reply: fewer getMores that a peer could answer
        // short (docs/COMPATIBILITY.md); a state missed would only come
        // back as a conflict and be loaded again.
        let room = u32::try_from(ids.len().saturating_add(1)).map_or(i32::MAX as u32, |n| n.min(i32::MAX as u32));
        let options = FindOptions::builder()
            .projection(doc! {"st": 1, "state": 1, "_rev": 1})
            .batch_size(room)
            .build();
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
            let Some(Bson::String(id)) = doc.get("_id").cloned() else {
                return Err(unreadable(&doc, "an _id that is not a string".into()));
            };
            let state: CourseState = match (doc.remove("st"), doc.remove("state")) {
                (Some(Bson::String(json)), _) => serde_json::from_str::<PackedState>(&json)
                    .map_err(|e| e.to_string())
                    .and_then(|packed| packed.unpack(id))
                    .map_err(|e| unreadable(&doc, e))?,
                // As earlier releases wrote it: the plain state as JSON,
                (None, Some(Bson::String(json))) => {
                    serde_json::from_str(&json).map_err(|e| unreadable(&doc, e.to_string()))?
                }
                // and before that as an embedded document.
                (None, Some(Bson::Document(state))) => {
                    bson::from_document(state).map_err(|e| unreadable(&doc, e.to_string()))?
                }
                (st, state) => return Err(unreadable(&doc, format!("unexpected st {st:?}, state {state:?}"))),
            };
            let rev = get_int(&doc, "_rev").unwrap_or_default();
            found.insert(state.course_id.clone(), Stored { state, rev });
        }
        Ok(found)
    }

    /// Writes documents guarded by their revision; the ones whose revision
    /// moved are not written and come back as [`Conflicts`].
    ///
    /// A write at revision 0 (a course presumed or found absent) is an
    /// `insert`: its guard is the `_id`'s uniqueness, so it is refused as a
    /// duplicate key exactly when the guarded upsert would be (a document
    /// exists, whatever its revision), without the upsert's lookup first.
    /// Replaying from zero, nearly every write is one: the peers take
    /// inserts 1.2 (nx-27017) and 3.3–3.8 (secantusdb) times as fast as upserts
    /// into the catalog's indexed collection (docs/PERFORMANCE.md).
    #[instrument(skip_all, fields(collection, docs = writes.len()))]
    pub async fn write_states(&self, collection: &str, writes: &[DocWrite]) -> Result<Conflicts> {
        let (new, stored): (Vec<&DocWrite>, Vec<&DocWrite>) = writes.iter().partition(|w| w.expected_rev == 0);
        let mut conflicts = Vec::new();
        for (command, writes) in [(WriteCommand::Insert, new), (WriteCommand::Update, stored)] {
            if writes.is_empty() {
                continue;
            }
            let statements = writes
                .iter()
                .map(|w| {
                    let document = stored_document(w)?;
                    Ok(match command {
                        WriteCommand::Insert => document,
                        WriteCommand::Update => {
                            let mut statement = RawDocumentBuf::new();
                            statement.append("q", rawdoc! {"_id": w.id.as_str(), "_rev": w.expected_rev});
                            statement.append("u", document);
                            statement.append("upsert", true);
                            statement
                        }
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let refused = self.write_statements(command, collection, statements).await?;
            conflicts.extend(
                refused
                    .0
                    .into_iter()
                    .filter_map(|i| writes.get(i))
                    .map(|w| w.id.clone()),
            );
        }
        Ok(Conflicts(conflicts))
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
}
