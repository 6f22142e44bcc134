//! courseview's read models as pure code: given a course's current state and
//! an event, the next state; given a state, the document a read model shows.
//!
//! - [`event`]: decoded course events and their total order ([`Stamp`]).
//! - [`state`]: [`CourseState`], the convergent per-course state.
//! - [`packed`]: [`PackedState`], the compact form a state is stored in.
//! - [`catalog`], [`teacher_courses`]: the read models' views of that state.
//!
//! No I/O lives here, so every guarantee about convergence is tested in
//! memory (see `tests/convergence.rs`).

pub mod catalog;
pub mod event;
pub mod packed;
pub mod state;
pub mod teacher_courses;
pub mod time;

pub use catalog::{Catalog, CatalogCourse};
pub use event::{Changes, CourseEvent, Created, EventKind, Millis, Stamp, EVENT_TYPES};
pub use packed::PackedState;
pub use state::CourseState;
pub use teacher_courses::{Status, TeacherCourse, TeacherCourses};

/// A read model: which courses it lists and what it shows of each.
pub trait Projection: Send + Sync + 'static {
    /// What the API serves for one listed course.
    type View: serde::Serialize + Send;
    /// The projection's name: CLI argument, collection prefix, consumer group suffix.
    const NAME: &'static str;
    /// The document to serve, or `None` when the course is not listed.
    fn view(state: &CourseState) -> Option<Self::View>;
}

/// Applies events in order to a fresh state; handy for tests and rebuilds.
pub fn fold<'a>(course_id: &str, events: impl IntoIterator<Item = &'a CourseEvent>) -> CourseState {
    let mut state = CourseState::new(course_id);
    for event in events {
        state.apply(event);
    }
    state
}
