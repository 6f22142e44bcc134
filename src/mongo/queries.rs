//! The API's reads: pages by keyset, single documents, counts.

use super::*;

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
            clauses.push(text_clause(text, fields));
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
