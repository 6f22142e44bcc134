//! `teacher_courses`: a teacher's dashboard — every non-deleted course of the
//! teacher, posted or not, with its status.

use serde::Serialize;

use crate::event::Millis;
use crate::state::CourseState;
use crate::Projection;

/// Where a course stands for its teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Draft,
    Posted,
}

/// One course on the teacher's dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TeacherCourse {
    pub id: String,
    pub name: String,
    pub thumbnail: Option<String>,
    pub description: Option<String>,
    pub teacher_id: String,
    pub status: Status,
    #[serde(serialize_with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub registered_at: Millis,
    #[serde(serialize_with = "crate::time::rfc3339_opt")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub posted_at: Option<Millis>,
    #[serde(serialize_with = "crate::time::rfc3339_opt")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub last_updated_at: Option<Millis>,
    pub version: Option<i64>,
}

/// The teacher dashboard projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct TeacherCourses;

impl Projection for TeacherCourses {
    type View = TeacherCourse;
    const NAME: &'static str = "teacher_courses";

    fn view(state: &CourseState) -> Option<TeacherCourse> {
        if !state.created || state.is_deleted() {
            return None;
        }
        Some(TeacherCourse {
            id: state.course_id.clone(),
            name: state.name.as_ref()?.value.clone(),
            thumbnail: state.thumbnail.as_ref().and_then(|t| t.value.clone()),
            description: state.description.as_ref().and_then(|d| d.value.clone()),
            teacher_id: state.teacher_id.as_ref()?.value.clone(),
            status: if state.is_posted() {
                Status::Posted
            } else {
                Status::Draft
            },
            registered_at: state.registered_at.as_ref()?.value,
            posted_at: state.posted_at(),
            last_updated_at: state.last_updated_at,
            version: state.version,
        })
    }
}
