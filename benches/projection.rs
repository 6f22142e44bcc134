//! Projection CPU cost per event, in memory, as the worker spends it on a
//! batch: decode every record, group the events by course, apply them to
//! each course's state, and build each touched course's catalog document
//! once (the worker writes one document per course per batch). The stream
//! is realistic and mixed: per-type topics and outbox variants, 1,000
//! courses, every event type. Target: ≤ 2 µs per event.

use std::collections::HashMap;
use std::hint::black_box;

use courseview::decode::decode;
use courseview::mongo::encoded_view;
use courseview::read_model::ReadModel;
use courseview::record::Record;
use courseview_projections::{CourseEvent, CourseState};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

mod common;
use common::corpus;

/// The worker's default batch size.
const BATCH: usize = 1_000;

fn project(records: &[Record], states: &mut HashMap<String, CourseState>) {
    for batch in records.chunks(BATCH) {
        let events: Vec<CourseEvent> = batch.iter().map(|r| decode(r).expect("valid corpus")).collect();
        let mut by_course: HashMap<&str, Vec<&CourseEvent>> = HashMap::new();
        for event in &events {
            by_course.entry(event.course_id.as_str()).or_default().push(event);
        }
        for (course, events) in by_course {
            let state = states
                .entry(course.to_owned())
                .or_insert_with(|| CourseState::new(course));
            for event in events {
                state.apply(event);
            }
            black_box(encoded_view(ReadModel::Catalog, state));
        }
    }
}

fn decode_apply_view(c: &mut Criterion) {
    let records = corpus(1_000);
    let mut group = c.benchmark_group("projection");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("decode_apply_view_per_event", |b| {
        b.iter(|| {
            let mut states = HashMap::with_capacity(1_000);
            project(&records, &mut states);
            black_box(states.len())
        });
    });
    group.finish();
}

criterion_group!(benches, decode_apply_view);
criterion_main!(benches);
