//! The API's reads: pages by keyset, single documents, counts.

use super::*;

/// Which list a page is of; only this module knows the fields behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// Posted courses, of one teacher or all, matching a text or not.
    Catalog {
        teacher: Option<String>,
        text: Option<String>,
    },
    /// Every non-deleted course of one teacher, drafts included.
    Teacher { teacher: String },
}

impl Listing {
    pub fn teacher(&self) -> Option<&str> {
        match self {
            Listing::Catalog { teacher, .. } => teacher.as_deref(),
            Listing::Teacher { teacher } => Some(teacher),
        }
    }
}

/// A page's order: newest first (posted in the catalog, registered on the
/// dashboard), or by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Newest,
    Name,
}

/// A sort value: a name, or a time in Unix milliseconds. Untagged, so a
/// cursor carries it as a plain JSON string or number.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SortKey {
    Text(String),
    Millis(i64),
}

/// A page request against a read model, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub listing: Listing,
    pub order: Order,
    /// Keyset position: the sort key and id of the last item served.
    pub after: Option<(SortKey, String)>,
    pub limit: i64,
}

impl ListQuery {
    /// The stored field the page is sorted on.
    fn sort_field(&self) -> &'static str {
        match (&self.listing, self.order) {
            (_, Order::Name) => "name",
            (Listing::Catalog { .. }, Order::Newest) => "postedAt",
            (Listing::Teacher { .. }, Order::Newest) => "registeredAt",
        }
    }

    /// The page's filter: listed documents, the listing's own clauses, and
    /// the keyset position.
    fn filter(&self) -> Document {
        let mut clauses = vec![doc! {"listed": true}];
        if let Some(teacher) = self.listing.teacher() {
            clauses.push(doc! {"teacherId": teacher});
        }
        if let Listing::Catalog { text: Some(text), .. } = &self.listing {
            clauses.push(text_clause(text, &["view.name", "view.description"]));
        }
        if let Some((key, id)) = &self.after {
            let field = self.sort_field();
            let cmp = if self.descending() { "$lt" } else { "$gt" };
            let value = match key {
                SortKey::Text(t) => Bson::String(t.clone()),
                SortKey::Millis(m) => Bson::Int64(*m),
            };
            clauses.push(doc! {"$or": [
                {field: {cmp: value.clone()}},
                {field: value, "sortId": {cmp: id}},
            ]});
        }
        doc! {"$and": clauses}
    }

    fn descending(&self) -> bool {
        self.order == Order::Newest
    }
}

/// One listed course: its served view and where it sits in the order.
#[derive(Debug, Clone, PartialEq)]
pub struct PageItem {
    pub view: serde_json::Value,
    pub key: SortKey,
    pub id: String,
}

/// One page, and whether more follow it.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<PageItem>,
    pub more: bool,
}

/// A served view as the API's JSON.
fn view_json(view: Document) -> serde_json::Value {
    Bson::Document(view).into_relaxed_extjson()
}

/// A case-insensitive substring match of `text` over `fields`, the text
/// taken literally (its regex metacharacters escaped).
fn text_clause(text: &str, fields: &[&'static str]) -> Document {
    let pattern = regex::escape(text);
    let any: Vec<Document> = fields
        .iter()
        .map(|f| doc! {*f: {"$regex": &pattern, "$options": "i"}})
        .collect();
    doc! {"$or": any}
}

impl Store {
    /// The served view of one listed course.
    #[instrument(skip_all, fields(collection))]
    pub async fn listed_view(&self, collection: &str, id: &str) -> Result<Option<serde_json::Value>> {
        let found = self
            .docs(collection)
            .find_one(doc! {"_id": id, "listed": true})
            .projection(doc! {"view": 1})
            .max_time(API_QUERY_TIME_LIMIT)
            .await?;
        Ok(found.and_then(|d| d.get_document("view").ok().cloned()).map(view_json))
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
    pub async fn page(&self, collection: &str, q: &ListQuery) -> Result<Page> {
        let field = q.sort_field();
        let dir = if q.descending() { -1 } else { 1 };
        let options = FindOptions::builder()
            .sort(doc! {field: dir, "sortId": dir})
            .limit(q.limit + 1)
            .projection(doc! {"view": 1, field: 1})
            .max_time(API_QUERY_TIME_LIMIT)
            .build();
        let mut cursor = self.docs(collection).find(q.filter()).with_options(options).await?;
        let mut items = Vec::new();
        while let Some(mut doc) = cursor.try_next().await? {
            let id = doc.get_str("_id").unwrap_or_default().to_owned();
            // Every listed document has its sort key (a listed view needs
            // a name and the time); one without was not written by us.
            let key = match doc.get(field) {
                Some(Bson::String(s)) => SortKey::Text(s.clone()),
                _ => SortKey::Millis(get_int(&doc, field).ok_or_else(|| {
                    StoreError::Failed(format!("{id} in {collection} is listed without its {field}"))
                })?),
            };
            let view = match doc.remove("view") {
                Some(Bson::Document(view)) => view,
                _ => Document::new(),
            };
            items.push(PageItem {
                view: view_json(view),
                key,
                id,
            });
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
        // Batches as large as the server sends (16 MiB), so few getMores:
        // nx-27017 drops a cursor whose connection closed and answers the
        // next getMore with an empty last batch, ending a read early
        // without an error (docs/COMPATIBILITY.md).
        let options = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .projection(doc! {"_rev": 0})
            .batch_size(i32::MAX as u32)
            .build();
        let cursor = self.docs(collection).find(doc! {}).with_options(options).await?;
        Ok(cursor.try_collect().await?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_text_is_matched_literally() {
        let clause = super::text_clause("a.b*(c)", &["name"]);
        let any = clause.get_array("$or").expect("an $or");
        let name = any[0]
            .as_document()
            .expect("a clause")
            .get_document("name")
            .expect("name");
        assert_eq!(name.get_str("$regex").expect("a pattern"), r"a\.b\*\(c\)");
    }
}
