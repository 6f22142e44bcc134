//! Stored offsets per projection generation and partition.

use super::*;

/// A stored offset (the next one to read) and when it last moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub offset: i64,
    /// Unix milliseconds.
    pub updated_at: Option<i64>,
}

impl Store {
    pub(super) fn checkpoint_id(projection: &str, generation: u32, topic: &str, partition: i32) -> String {
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
    pub async fn store_offsets(
        &self,
        projection: &str,
        generation: u32,
        offsets: &[(String, i32, i64)],
    ) -> Result<AlreadyNewer> {
        let updates = Self::checkpoint_updates(projection, generation, offsets, Direction::ForwardOnly);
        // A duplicate key means a newer offset is already stored.
        let refused = self.update_many_statements(CHECKPOINTS, encoded(updates)?).await?;
        Ok(AlreadyNewer(refused.0.len()))
    }

    /// Sets these stored offsets as given, back or forth (`courseview
    /// offsets`, only while the projection is paused).
    #[instrument(skip_all, fields(projection, generation, partitions = offsets.len()))]
    pub async fn set_offsets(&self, projection: &str, generation: u32, offsets: &[(String, i32, i64)]) -> Result<()> {
        let updates = Self::checkpoint_updates(projection, generation, offsets, Direction::Either);
        let refused = self.update_many_statements(CHECKPOINTS, encoded(updates)?).await?;
        if refused.0.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Failed(format!("{} offsets were not set", refused.0.len())))
        }
    }

    /// The upserts that store `offsets`.
    fn checkpoint_updates(
        projection: &str,
        generation: u32,
        offsets: &[(String, i32, i64)],
        direction: Direction,
    ) -> Vec<Document> {
        // Epoch milliseconds rather than a BSON date: the test peer returns
        // dates as strings (COMPATIBILITY.md), and stall detection reads it.
        let now = chrono::Utc::now().timestamp_millis();
        offsets
            .iter()
            .map(|(topic, partition, offset)| {
                let mut q = doc! {"_id": Self::checkpoint_id(projection, generation, topic, *partition)};
                if direction == Direction::ForwardOnly {
                    q.insert("offset", doc! {"$lt": offset});
                }
                doc! {
                    "q": q,
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
            .collect()
    }
}

/// Which way a checkpoint write may move a stored offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// A worker's flush: never back.
    ForwardOnly,
    /// An operator's move while paused.
    Either,
}

impl Store {
    /// The Kafka topic id each (topic, partition) of this generation was
    /// last read under (none before its first assignment).
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn load_topic_ids(&self, projection: &str, generation: u32) -> Result<HashMap<(String, i32), String>> {
        let mut cursor = self
            .docs(TOPIC_IDS)
            .find(doc! {"projection": projection, "generation": i64::from(generation)})
            .await?;
        let mut ids = HashMap::new();
        while let Some(doc) = cursor.try_next().await? {
            if let (Ok(topic), Some(partition), Ok(id)) =
                (doc.get_str("topic"), get_int(&doc, "partition"), doc.get_str("topicId"))
            {
                ids.insert((topic.to_owned(), partition as i32), id.to_owned());
            }
        }
        Ok(ids)
    }

    /// Records the topic id a partition of this generation is read under,
    /// if the one stored is still `previous` (none: only if none is).
    #[instrument(skip_all, fields(projection, generation, topic, partition))]
    pub async fn record_topic_id(
        &self,
        projection: &str,
        generation: u32,
        (topic, partition): (&str, i32),
        previous: Option<&str>,
        id: &str,
    ) -> Result<()> {
        let _id = Self::checkpoint_id(projection, generation, topic, partition);
        let ids = self.docs(TOPIC_IDS);
        match previous {
            Some(previous) => {
                ids.update_one(doc! {"_id": &_id, "topicId": previous}, doc! {"$set": {"topicId": id}})
                    .await?;
            }
            None => {
                ids.update_one(
                    doc! {"_id": &_id},
                    doc! {"$setOnInsert": {
                        "projection": projection,
                        "generation": i64::from(generation),
                        "topic": topic,
                        "partition": i64::from(partition),
                        "topicId": id,
                    }},
                )
                .upsert(true)
                .await?;
            }
        }
        Ok(())
    }
}

/// How many offsets were not stored because the stored one was already
/// higher (another owner of the partition moved on): nothing to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use = "says how many offsets another owner had already moved past"]
pub struct AlreadyNewer(pub usize);
