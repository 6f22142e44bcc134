//! `catalog`: the student course catalog — courses that are created, posted
//! and not deleted, with the fields a student needs.

use serde::Serialize;

use crate::event::Millis;
use crate::state::CourseState;
use crate::Projection;

/// One course as a student sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CatalogCourse {
    pub id: String,
    pub name: String,
    pub thumbnail: Option<String>,
    pub description: Option<String>,
    pub teacher_id: String,
    #[serde(serialize_with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub registered_at: Millis,
    #[serde(serialize_with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub posted_at: Millis,
    #[serde(serialize_with = "crate::time::rfc3339_opt")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub last_updated_at: Option<Millis>,
    pub version: Option<i64>,
}

/// The catalog projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Catalog;

impl Projection for Catalog {
    type View = CatalogCourse;
    const NAME: &'static str = "catalog";

    fn view(state: &CourseState) -> Option<CatalogCourse> {
        if !state.created || state.is_deleted() {
            return None;
        }
        Some(CatalogCourse {
            id: state.course_id.clone(),
            name: state.name.as_ref()?.value.clone(),
            thumbnail: state.thumbnail.as_ref().and_then(|t| t.value.clone()),
            description: state.description.as_ref().and_then(|d| d.value.clone()),
            teacher_id: state.teacher_id.as_ref()?.value.clone(),
            registered_at: state.registered_at.as_ref()?.value,
            posted_at: state.posted_at()?,
            last_updated_at: state.last_updated_at,
            version: state.version,
        })
    }
}
