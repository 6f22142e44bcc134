//! Convergence (DESIGN §2) as properties: any delivery order of a course's
//! history, with any duplicates, and with the state persisted and reloaded
//! at any point, gives the same state and the same read-model documents as
//! applying the history once in order.

use courseview_projections::{
    fold, Catalog, Changes, CourseEvent, CourseState, Created, EventKind, PackedState, Projection, TeacherCourses,
};
use proptest::prelude::*;

const COURSE: &str = "course-1";

fn kind() -> impl Strategy<Value = EventKind> {
    let text = "[a-z]{1,6}";
    prop_oneof![
        (
            text,
            proptest::option::of(text),
            proptest::option::of(text),
            "t[0-2]",
            0i64..1_000
        )
            .prop_map(|(name, thumbnail, description, teacher_id, registered_at)| {
                EventKind::Created(Created {
                    name,
                    thumbnail,
                    description,
                    teacher_id,
                    registered_at,
                })
            }),
        (
            proptest::option::of(text),
            proptest::option::of(text),
            proptest::option::of(text)
        )
            .prop_map(|(name, thumbnail, description)| {
                EventKind::Updated(Changes {
                    name,
                    thumbnail,
                    description,
                })
            }),
        Just(EventKind::Posted),
        Just(EventKind::Unposted),
        Just(EventKind::Posted),
        Just(EventKind::Deleted).prop_filter("deletes are rarer", |_| true),
    ]
}

/// A history with distinct, increasing versions (and times that need not be).
fn history(versioned: bool) -> impl Strategy<Value = Vec<CourseEvent>> {
    proptest::collection::vec((kind(), 0i64..50), 0..12).prop_map(move |items| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (kind, jitter))| CourseEvent {
                event_id: format!("e{i}"),
                course_id: COURSE.to_owned(),
                version: versioned.then_some(i as i64 + 1),
                // Unversioned histories are ordered by time alone, so keep it increasing.
                occurred_at: if versioned {
                    jitter * 1000
                } else {
                    i as i64 * 1000 + jitter
                },
                kind,
            })
            .collect()
    })
}

/// The history shuffled, with some events delivered more than once.
fn delivery(history: Vec<CourseEvent>) -> impl Strategy<Value = (Vec<CourseEvent>, Vec<CourseEvent>)> {
    let n = history.len();
    let dupes = proptest::collection::vec(0..n.max(1), 0..=n);
    (Just(history), dupes).prop_flat_map(|(history, dupes)| {
        let mut delivered = history.clone();
        if !history.is_empty() {
            delivered.extend(dupes.into_iter().map(|i| history[i].clone()));
        }
        (Just(history), Just(delivered).prop_shuffle())
    })
}

/// Applies the delivery, persisting and reloading the state every `every` events.
fn apply_with_reloads(events: &[CourseEvent], every: usize) -> CourseState {
    let mut state = CourseState::new(COURSE);
    for (i, event) in events.iter().enumerate() {
        state.apply(event);
        // Reloaded the way the store keeps it (packed), and now and then
        // in the plain form earlier releases stored.
        if every > 0 && i % every == 0 {
            state = if i % 2 == 0 {
                let json = serde_json::to_string(&PackedState::pack(&state)).expect("state packs");
                let packed: PackedState = serde_json::from_str(&json).expect("packed state deserializes");
                packed.unpack(COURSE).expect("packed state unpacks")
            } else {
                let json = serde_json::to_string(&state).expect("state serializes");
                serde_json::from_str(&json).expect("state deserializes")
            };
        }
    }
    state
}

fn assert_converges(history: &[CourseEvent], delivered: &[CourseEvent], every: usize) -> Result<(), TestCaseError> {
    let in_order = fold(COURSE, history);
    let any_order = apply_with_reloads(delivered, every);
    prop_assert_eq!(&any_order, &in_order);
    prop_assert_eq!(Catalog::view(&any_order), Catalog::view(&in_order));
    prop_assert_eq!(TeacherCourses::view(&any_order), TeacherCourses::view(&in_order));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn versioned_histories_converge_under_reordering_and_duplicates(
        (history, delivered) in history(true).prop_flat_map(delivery),
        every in 0usize..4,
    ) {
        assert_converges(&history, &delivered, every)?;
    }

    #[test]
    fn unversioned_histories_converge_by_occurred_at(
        (history, delivered) in history(false).prop_flat_map(delivery),
        every in 0usize..4,
    ) {
        assert_converges(&history, &delivered, every)?;
    }

    /// A fold in memory merged into the stored state later (a worker folding
    /// while behind) equals applying every event to the stored state, and
    /// says whether it changed anything.
    #[test]
    fn a_state_folded_apart_and_merged_equals_applying_every_event(
        (history, delivered) in history(true).prop_flat_map(delivery),
        split in 0usize..24,
        splits in 1usize..4,
    ) {
        let split = split.min(delivered.len());
        let (stored_part, rest) = delivered.split_at(split);
        let mut stored = apply_with_reloads(stored_part, 0);
        let before = stored.clone();
        // The rest folded in one to three separate states, merged in turn.
        let chunk = rest.len().div_ceil(splits).max(1);
        let mut changed = false;
        for part in rest.chunks(chunk) {
            changed |= stored.merge(&fold(COURSE, part));
        }
        prop_assert_eq!(&stored, &fold(COURSE, &history));
        prop_assert_eq!(changed, stored != before);
    }

    #[test]
    fn a_deleted_course_is_never_listed_again(
        (history, delivered) in history(true).prop_flat_map(delivery),
    ) {
        let state = apply_with_reloads(&delivered, 0);
        if history.iter().any(|e| matches!(e.kind, EventKind::Deleted)) {
            prop_assert!(state.is_deleted());
            prop_assert!(Catalog::view(&state).is_none());
            prop_assert!(TeacherCourses::view(&state).is_none());
        }
    }

    #[test]
    fn the_catalog_lists_exactly_the_created_posted_undeleted_courses(
        (history, delivered) in history(true).prop_flat_map(delivery),
    ) {
        let state = apply_with_reloads(&delivered, 0);
        let created = history.iter().any(|e| matches!(e.kind, EventKind::Created(_)));
        let deleted = history.iter().any(|e| matches!(e.kind, EventKind::Deleted));
        let last_posting = history.iter().rev().find_map(|e| match e.kind {
            EventKind::Posted => Some(true),
            EventKind::Unposted => Some(false),
            _ => None,
        });
        let expected = created && !deleted && last_posting == Some(true);
        prop_assert_eq!(Catalog::view(&state).is_some(), expected);
    }
}
