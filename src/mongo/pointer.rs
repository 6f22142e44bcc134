//! The generation pointer: which generation of a projection readers follow,
//! which is being built, the rebuild's handover, and an operator's pause.

use super::*;

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
    /// Set by `courseview pause`: every worker of the projection applies
    /// nothing until `courseview resume` clears it.
    pub paused: Option<PauseInfo>,
}

/// Who paused a projection, when and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseInfo {
    /// `user@host` of the `courseview pause` that set it.
    pub by: String,
    /// Unix milliseconds.
    pub at: i64,
    pub reason: Option<String>,
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
            paused: None,
        }
    }
}

impl Pointer {
    /// A stored pointer; a field that is there but not a generation number
    /// is an error (falling back to generation 1 would serve the wrong
    /// generation without a word).
    fn from_doc(d: &Document) -> Result<Pointer> {
        let field = |k: &str| -> Result<Option<u32>> {
            match d.get(k) {
                None | Some(Bson::Null) => Ok(None),
                Some(_) => get_int(d, k)
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        StoreError::Failed(format!(
                            "malformed generation pointer {d}: {k} is not a generation number"
                        ))
                    }),
            }
        };
        let generation = field("generation")?
            .ok_or_else(|| StoreError::Failed(format!("malformed generation pointer {d}: no generation")))?;
        Ok(Pointer {
            generation,
            building: field("building")?.filter(|b| *b > 0),
            highest: field("highest")?.unwrap_or(generation),
            rebuild: d
                .get_document("rebuild")
                .ok()
                .and_then(|r| bson::from_document(r.clone()).ok()),
            handover: field("handoverTo")?
                .filter(|to| *to > 0)
                .zip(get_int(d, "handoverUntil")),
            // Unreadable would resume a paused projection without a word.
            paused: match d.get("paused") {
                None | Some(Bson::Null) => None,
                Some(Bson::Document(p)) => Some(
                    bson::from_document(p.clone())
                        .map_err(|e| StoreError::Failed(format!("malformed generation pointer {d}: paused: {e}")))?,
                ),
                Some(other) => {
                    return Err(StoreError::Failed(format!(
                        "malformed generation pointer {d}: paused is {other}"
                    )))
                }
            },
        })
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

impl Store {
    /// The projection's generation pointer; created (generation 1) on first use.
    #[instrument(skip_all, fields(projection))]
    pub async fn pointer(&self, projection: &str) -> Result<Pointer> {
        let pointers = self.docs(POINTERS);
        if let Some(found) = pointers.find_one(doc! {"_id": projection}).await? {
            return Pointer::from_doc(&found);
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
        found.as_ref().map_or_else(|| Ok(Pointer::default()), Pointer::from_doc)
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

    /// Drops the generation a stopped rebuild left and clears it from the
    /// pointer, so the next rebuild replays anew; returns it, if any.
    /// Refused while that rebuild reported progress within `lease` (it may
    /// still be running: its worker would recreate what was dropped).
    #[instrument(skip_all, fields(projection))]
    pub async fn abandon_rebuild(&self, projection: &str, lease: Duration) -> Result<Option<u32>> {
        let current = self.pointer(projection).await?;
        let Some(building) = current.building else {
            return Ok(None);
        };
        let now = chrono::Utc::now().timestamp_millis();
        if let Some(progress) = current.rebuild.as_ref().filter(|p| p.generation == building) {
            let age = now - progress.updated_at;
            if age < i64::try_from(lease.as_millis()).unwrap_or(i64::MAX) {
                return Err(StoreError::Failed(format!(
                    "the rebuild of {projection} into generation {building} reported progress {:.1}s ago and may still be running; stop it first (or wait {}s)",
                    age as f64 / 1000.0,
                    lease.as_secs()
                )));
            }
        }
        // Dropped first: a crash before the pointer is cleared leaves an
        // empty generation that a plain rerun replays from offset 0.
        self.drop_generation(projection, building).await?;
        let reply = self
            .docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "building": i64::from(building)},
                doc! {"$set": {"building": 0_i64, "rebuild": Bson::Null, "handoverTo": 0_i64, "handoverUntil": 0_i64}},
            )
            .await?;
        if reply.matched_count == 0 {
            return Err(StoreError::Failed(format!(
                "the rebuild of {projection} into generation {building} moved on meanwhile (another rebuild is running?)"
            )));
        }
        Ok(Some(building))
    }

    /// Clears the progress a rebuild of `generation` published (it stopped).
    pub async fn clear_rebuild_progress(&self, projection: &str, generation: u32) -> Result<()> {
        self.docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "rebuild.generation": i64::from(generation)},
                doc! {"$set": {"rebuild": Bson::Null}},
            )
            .await?;
        Ok(())
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

    /// Pauses the projection (every worker, every generation) until
    /// [`Store::resume`]; returns the pause already in place instead, if
    /// there is one (it is kept: who paused first says why).
    #[instrument(skip_all, fields(projection))]
    pub async fn pause(&self, projection: &str, pause: &PauseInfo) -> Result<Option<PauseInfo>> {
        let current = self.pointer(projection).await?;
        if let Some(already) = current.paused {
            return Ok(Some(already));
        }
        let info = bson::to_document(pause).map_err(|e| StoreError::Failed(format!("unencodable pause: {e}")))?;
        self.docs(POINTERS)
            .update_one(
                doc! {"_id": projection, "paused": null},
                // `pausedAt` beside it: what `resume` matches on (the test
                // peer cannot match a whole embedded document).
                doc! {"$set": {"paused": info, "pausedAt": pause.at}},
            )
            .await?;
        // Read back: another pause may have come between the read and the
        // write, and a server that matched nothing must not pass for one
        // that paused.
        match self.pointer(projection).await?.paused {
            Some(now) if now == *pause => Ok(None),
            Some(other) => Ok(Some(other)),
            None => Err(StoreError::Failed(format!(
                "the pause of {projection} was not recorded (the server matched no pointer)"
            ))),
        }
    }

    /// Clears the projection's pause; returns the pause it cleared.
    #[instrument(skip_all, fields(projection))]
    pub async fn resume(&self, projection: &str) -> Result<Option<PauseInfo>> {
        let current = self.pointer(projection).await?;
        if let Some(paused) = &current.paused {
            // Only the pause read: one made since is not lifted unseen.
            let reply = self
                .docs(POINTERS)
                .update_one(
                    doc! {"_id": projection, "pausedAt": paused.at},
                    doc! {"$set": {"paused": null, "pausedAt": null}},
                )
                .await?;
            if reply.matched_count != 1 {
                return Err(StoreError::Failed(format!(
                    "the pause of {projection} changed while resuming it; run `courseview status` and resume again"
                )));
            }
        }
        Ok(current.paused)
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

    /// Drops a generation's collection, checkpoints and topic ids. Its dead
    /// letters stay: one may be the only copy left of a record retention
    /// has since removed from the log (`dlq replay` applies it to whatever
    /// generations serve and build then).
    #[instrument(skip_all, fields(projection, generation))]
    pub async fn drop_generation(&self, projection: &str, generation: u32) -> Result<()> {
        self.docs(&Self::collection_name(projection, generation)).drop().await?;
        let of_generation = doc! {"projection": projection, "generation": i64::from(generation)};
        self.docs(CHECKPOINTS).delete_many(of_generation.clone()).await?;
        self.docs(TOPIC_IDS).delete_many(of_generation).await?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_pointer_is_an_error_not_generation_one() {
        let good =
            Pointer::from_doc(&doc! {"_id": "catalog", "generation": 3_i32, "building": 0_i64, "highest": 4_i64});
        assert_eq!(
            good.map(|p| (p.generation, p.building, p.highest)).ok(),
            Some((3, None, 4))
        );
        for bad in [
            doc! {"_id": "catalog", "generation": "three"},
            doc! {"_id": "catalog", "generation": -1_i64},
            doc! {"_id": "catalog"},
            doc! {"_id": "catalog", "generation": 2_i64, "building": "soon"},
        ] {
            assert!(
                matches!(Pointer::from_doc(&bad), Err(StoreError::Failed(_))),
                "{bad} is refused"
            );
        }
    }
}
