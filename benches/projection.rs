//! Projection CPU cost: decode + apply + view per event, in memory, over a
//! realistic mixed stream (per-type topics and outbox variants, 1,000
//! courses, every event type). Target: ≤ 2 µs per event.

use std::collections::HashMap;
use std::hint::black_box;

use courseview::decode::decode;
use courseview::read_model::ReadModel;
use courseview_projections::CourseState;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

mod common;
use common::corpus;

fn decode_apply_view(c: &mut Criterion) {
    let records = corpus(1_000);
    let mut group = c.benchmark_group("projection");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("decode_apply_view_per_event", |b| {
        b.iter(|| {
            let mut states: HashMap<String, CourseState> = HashMap::with_capacity(1_000);
            for record in &records {
                let event = decode(record).expect("valid corpus");
                let state = states
                    .entry(event.course_id.clone())
                    .or_insert_with(|| CourseState::new(&event.course_id));
                state.apply(&event);
                black_box(ReadModel::Catalog.view(state));
            }
            black_box(states.len())
        });
    });
    group.finish();
}

criterion_group!(benches, decode_apply_view);
criterion_main!(benches);
