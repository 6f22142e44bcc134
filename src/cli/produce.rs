//! `courseview produce`: a demo stream of course events, one topic per event
//! type, so that `docker compose up` shows the whole pipeline working.

use std::time::Duration;

use clap::Args;
use courseview_projections::EVENT_TYPES as TYPES;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Global;
use crate::kafka::{create_topics, Outgoing, Producer};

const SUBJECTS: [&str; 8] = [
    "Rust",
    "Kafka",
    "MongoDB",
    "Redis",
    "CQRS",
    "Tokio",
    "SQL",
    "Networking",
];
const LEVELS: [&str; 4] = ["101", "in Practice", "Deep Dive", "for Teams"];

#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    /// Number of courses to create.
    #[arg(long, default_value_t = 100)]
    pub courses: usize,
    /// Events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Prepended to each event-type topic name (e.g. `demo.`).
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Partitions of topics created by this command.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
}

/// The demo history of one course: created, maybe renamed, posted, and
/// sometimes unposted or deleted. Versions increase per course.
pub fn demo_history(rng: &mut impl Rng, prefix: &str, index: usize) -> Vec<Outgoing> {
    let course = format!("course-{index:05}");
    let teacher = format!("teacher-{}", rng.gen_range(1..=10));
    let name = format!(
        "{} {}",
        SUBJECTS.choose(rng).unwrap_or(&"Rust"),
        LEVELS.choose(rng).unwrap_or(&"101")
    );
    let now = chrono::Utc::now();
    let mut kinds = vec![0, 2];
    if rng.gen_bool(0.5) {
        kinds.insert(1, 1);
    }
    match rng.gen_range(0..10) {
        0 => kinds.push(3),
        1 => kinds.push(4),
        _ => {}
    }
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let event_type = TYPES[kind];
            let at = (now + chrono::Duration::milliseconds(i as i64)).to_rfc3339();
            let mut value = json!({
                "eventId": format!("{course}-{}", i + 1),
                "eventType": event_type,
                "courseId": course,
                "version": i + 1,
                "occurredAt": at,
            });
            if kind == 0 {
                value["name"] = json!(name);
                value["thumbnail"] = json!(format!("https://img.example/{course}.png"));
                value["description"] = json!(format!("Learn {name} with hands-on exercises."));
                value["teacherId"] = json!(teacher);
                value["registeredAt"] = json!(at);
            } else if kind == 1 {
                value["description"] = json!(format!("{name}: updated syllabus."));
            }
            Outgoing {
                topic: format!("{prefix}{event_type}"),
                key: Some(course.clone()),
                value: Some(value.to_string()),
                ..Outgoing::default()
            }
        })
        .collect()
}

pub async fn run(global: Global, args: ProduceArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topics: Vec<String> = TYPES.iter().map(|t| format!("{}{t}", args.topic_prefix)).collect();
    let kafka = global.kafka()?;
    create_topics(&kafka, &topics, args.partitions).await?;
    let producer = Producer::new(&kafka)?;
    let pause = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    let mut sent = 0usize;
    // Unpaced, keep many sends in flight; a course's events still go in order
    // per topic-partition, and the projections do not need more.
    let mut in_flight = FuturesUnordered::new();
    for index in 0..args.courses {
        let history = demo_history(&mut rand::thread_rng(), &args.topic_prefix, index);
        for record in history {
            if shutdown.is_cancelled() {
                info!(sent, "Demo producer stopped.");
                return Ok(());
            }
            match pause {
                Some(pause) => {
                    producer.send(&record).await?;
                    tokio::time::sleep(pause).await;
                }
                None => {
                    let producer = producer.clone();
                    in_flight.push(async move { producer.send(&record).await });
                    if in_flight.len() >= 1000 {
                        in_flight.next().await.transpose()?;
                    }
                }
            }
            sent += 1;
        }
    }
    while let Some(result) = in_flight.next().await {
        result?;
    }
    info!(sent, courses = args.courses, "Demo events produced.");
    Ok(())
}
