//! The dead-letter store: records that could not be applied, and gaps.

use super::*;

impl Store {
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
            out.push((id, letter_from_doc(doc)?));
        }
        Ok(out)
    }

    /// One dead letter by id.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let Some(doc) = self.docs(DEAD_LETTERS).find_one(doc! {"_id": id}).await? else {
            return Ok(None);
        };
        letter_from_doc(doc).map(Some)
    }

    pub async fn remove_dead_letter(&self, id: &str) -> Result<()> {
        self.docs(DEAD_LETTERS).delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// Removes the letters with these ids (those that exist).
    pub async fn remove_dead_letters(&self, ids: &[String]) -> Result<()> {
        self.docs(DEAD_LETTERS).delete_many(doc! {"_id": {"$in": ids}}).await?;
        Ok(())
    }

    /// Records (not gaps) that `generation` of a projection dead-lettered,
    /// at most `limit`, by position.
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn record_letters_of(&self, projection: &str, generation: u32, limit: i64) -> Result<Vec<DeadLetter>> {
        let filter = doc! {"projection": projection, "generation": i64::from(generation)};
        // Only the position: a letter may hold 64 KiB of record.
        let options = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .projection(doc! {"key": 0, "value": 0, "headers": 0, "deadAt": 0})
            .limit(limit)
            .build();
        let cursor = self.docs(DEAD_LETTERS).find(filter).with_options(options).await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        let letters = docs.into_iter().map(letter_from_doc).collect::<Result<Vec<_>>>()?;
        Ok(letters.into_iter().filter(|l| l.gap.is_none()).collect())
    }

    /// Which of `ids` are stored letters.
    pub async fn existing_dead_letters(&self, ids: &[String]) -> Result<HashSet<String>> {
        let options = FindOptions::builder().projection(doc! {"_id": 1}).build();
        let cursor = self
            .docs(DEAD_LETTERS)
            .find(doc! {"_id": {"$in": ids}})
            .with_options(options)
            .await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
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
        docs.into_iter().map(letter_from_doc).collect()
    }

    pub async fn count_dead_letters(&self, projection: &str) -> Result<u64> {
        Ok(self
            .docs(DEAD_LETTERS)
            .count_documents(doc! {"projection": projection})
            .await?)
    }
}

/// A stored letter, with the time the store set on it.
fn letter_from_doc(mut doc: Document) -> Result<DeadLetter> {
    let dead_at = match doc.remove("deadAt") {
        Some(Bson::DateTime(at)) => Some(at.to_chrono()),
        // The test peer hands some dates back as strings.
        Some(Bson::String(at)) => chrono::DateTime::parse_from_rfc3339(&at)
            .ok()
            .map(|at| at.with_timezone(&chrono::Utc)),
        _ => None,
    };
    let id = doc.get_str("_id").unwrap_or_default().to_owned();
    let mut letter: DeadLetter =
        bson::from_document(doc).map_err(|e| StoreError::Failed(format!("unreadable dead letter {id}: {e}")))?;
    letter.dead_at = dead_at;
    Ok(letter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_gives_back_the_record_byte_for_byte_through_bson() {
        let record = crate::dead_letter::tests::poison();
        let letter = DeadLetter::new("catalog", &record, "bad");
        let mut stored = bson::to_document(&letter).expect("bson");
        let at = bson::DateTime::from_millis(1_700_000_000_123);
        stored.insert("deadAt", at);
        let back = letter_from_doc(stored).expect("back");
        assert_eq!(back.to_record(), Some(record));
        assert_eq!(back.dead_at, Some(at.to_chrono()));
    }
}
