//! The worker registry: which process runs which projection generation.

use super::*;

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
    /// Partitions whose fetch keeps failing at one offset in this worker.
    #[serde(default)]
    pub stuck: Vec<crate::kafka::StuckPartition>,
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
            stuck: Vec::new(),
        }
    }
}

impl Store {
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
                stuck: d
                    .get("stuck")
                    .and_then(|s| bson::from_bson(s.clone()).ok())
                    .unwrap_or_default(),
            });
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }
}
