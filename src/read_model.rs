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

    /// The document the API serves for this course, or `None` if unlisted.
    /// Straight to BSON: it is stored as is, and served from the store.
    pub fn view(self, state: &CourseState) -> Option<bson::RawDocumentBuf> {
        // Straight to encoded BSON: a `Document` tree costs an order of
        // magnitude more memory and time, and the writer only sends bytes.
        fn document<P: Projection>(state: &CourseState) -> Option<bson::RawDocumentBuf> {
            P::view(state).and_then(|v| bson::to_raw_document_buf(&v).ok())
        }
        match self {
            ReadModel::Catalog => document::<Catalog>(state),
            ReadModel::TeacherCourses => document::<TeacherCourses>(state),
        }
    }
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
