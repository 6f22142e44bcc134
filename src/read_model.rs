//! The read models courseview runs, by name: the bridge between the pure
//! projections (`courseview-projections`) and the worker, store and API.

use courseview_projections::{Catalog, CourseState, Projection, TeacherCourses};

/// One runnable projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ReadModel {
    Catalog,
    TeacherCourses,
}

impl ReadModel {
    pub const ALL: [ReadModel; 2] = [ReadModel::Catalog, ReadModel::TeacherCourses];

    pub fn name(self) -> &'static str {
        match self {
            ReadModel::Catalog => Catalog::NAME,
            ReadModel::TeacherCourses => TeacherCourses::NAME,
        }
    }

    /// The document the API serves for this course, encoded by `encoder`
    /// (each projection's view is its own type), or `None` if unlisted.
    pub fn encode_view<E: EncodeView>(self, state: &CourseState, encoder: E) -> Option<E::Encoded> {
        fn view<P: Projection, E: EncodeView>(state: &CourseState, encoder: E) -> Option<E::Encoded> {
            P::view(state).and_then(|v| encoder.encode(&v))
        }
        match self {
            ReadModel::Catalog => view::<Catalog, E>(state, encoder),
            ReadModel::TeacherCourses => view::<TeacherCourses, E>(state, encoder),
        }
    }
}

/// Turns a view, whatever projection's, into what the store keeps: the
/// store's format stays the store's business.
pub trait EncodeView {
    type Encoded;
    fn encode<V: serde::Serialize>(self, view: &V) -> Option<Self::Encoded>;
}

impl std::fmt::Display for ReadModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReadModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ReadModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown projection {s:?} (expected catalog or teacher_courses)"))
    }
}
