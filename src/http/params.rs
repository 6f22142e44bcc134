//! Query parameters, parsed into domain values with messages that name the
//! offending parameter ("parse, don't validate").

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::mongo::{Order, SortKey};

/// The query string of one request, checked against the parameters the
/// route accepts: an unknown or repeated parameter is a 400, because a typo
/// (`teacher_id=`) silently ignored returns a wrong answer that looks right.
#[derive(Debug, Default)]
pub struct Params(HashMap<String, String>);

impl Params {
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
            .map_err(|e| ApiError::bad("query", format!("malformed query string: {e}")))?;
        let mut map = HashMap::new();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad(
                    &name,
                    format!("unknown parameter; expected one of: {}", allowed.join(", ")),
                ));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(ApiError::bad(&name, "given more than once"));
            }
        }
        Ok(Params(map))
    }

    /// A text parameter; present but empty is an error, not "absent".
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name).map(String::as_str) {
            Some("") => Err(ApiError::bad(name, "must not be empty")),
            Some(v) if v.len() > 200 => Err(ApiError::bad(name, "is longer than 200 characters")),
            // MongoDB rejects NUL inside strings and regexes; control
            // characters are never part of a name or an id.
            Some(v) if v.chars().any(char::is_control) => {
                Err(ApiError::bad(name, "must not contain control characters"))
            }
            other => Ok(other),
        }
    }

    /// A positive integer no larger than `max` (larger values are capped).
    pub fn limit(&self, default: i64, max: i64) -> Result<i64, ApiError> {
        match self.0.get("limit") {
            None => Ok(default.min(max)),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 1 => Ok(n.min(max)),
                _ => Err(ApiError::bad(
                    "limit",
                    format!("must be a positive integer (at most {max} are returned), got {v:?}"),
                )),
            },
        }
    }

    /// An integer at least 0.
    pub fn version(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 0 => Ok(Some(n)),
                _ => Err(ApiError::bad(
                    name,
                    format!("must be a non-negative integer, got {v:?}"),
                )),
            },
        }
    }

    pub fn sort(&self) -> Result<Sort, ApiError> {
        match self.0.get("sort").map(String::as_str) {
            None | Some("newest") => Ok(Sort::Newest),
            Some("name") => Ok(Sort::Name),
            Some(other) => Err(ApiError::bad(
                "sort",
                format!("must be \"newest\" or \"name\", got {other:?}"),
            )),
        }
    }

    pub fn cursor(&self, sort: Sort) -> Result<Option<Cursor>, ApiError> {
        let Some(raw) = self.0.get("cursor") else {
            return Ok(None);
        };
        let cursor = Cursor::decode(raw).ok_or_else(|| ApiError::bad("cursor", "is not a cursor this API issued"))?;
        if cursor.sort != sort {
            return Err(ApiError::bad("cursor", "was issued for another sort order"));
        }
        Ok(Some(cursor))
    }

    /// The parameters in a canonical order: the cache key of a list answer.
    pub fn canonical(&self) -> String {
        let mut pairs: Vec<_> = self.0.iter().collect();
        pairs.sort();
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

/// List orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// Most recently posted (catalog) or registered (dashboard) first.
    Newest,
    /// By name, A to Z.
    Name,
}

impl From<Sort> for Order {
    fn from(sort: Sort) -> Order {
        match sort {
            Sort::Newest => Order::Newest,
            Sort::Name => Order::Name,
        }
    }
}

/// Keyset position: the sort key and id of the last item of a page. Opaque
/// to clients (base64url JSON), bound to the sort it was issued for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "s")]
    pub sort: Sort,
    /// Sort keys are strings (name) or integers (times); nothing else.
    #[serde(rename = "k")]
    pub key: SortKey,
    #[serde(rename = "i")]
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(raw: &str) -> Option<Cursor> {
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_parameter(e: ApiError) -> String {
        match e {
            ApiError::BadParameter { parameter, .. } => parameter,
            other => panic!("expected a bad parameter, got {other:?}"),
        }
    }

    #[test]
    fn unknown_and_repeated_parameters_are_rejected_by_name() {
        let e = Params::parse(Some("teacher_id=1"), &["teacherId"]).expect_err("unknown");
        assert_eq!(bad_parameter(e), "teacher_id");
        let e = Params::parse(Some("limit=1&limit=2"), &["limit"]).expect_err("repeated");
        assert_eq!(bad_parameter(e), "limit");
    }

    #[test]
    fn limit_is_capped_and_must_be_positive() {
        let p = Params::parse(Some("limit=1000"), &["limit"]).expect("parses");
        assert_eq!(p.limit(20, 100).expect("valid"), 100);
        for bad in ["0", "-1", "ten", ""] {
            let p = Params::parse(Some(&format!("limit={bad}")), &["limit"]).expect("parses");
            assert_eq!(bad_parameter(p.limit(20, 100).expect_err(bad)), "limit");
        }
    }

    #[test]
    fn cursors_round_trip_and_are_bound_to_their_sort() {
        let c = Cursor {
            sort: Sort::Name,
            key: SortKey::Text("Rust".into()),
            id: "c-1".into(),
        };
        let raw = c.encode();
        let p = Params::parse(Some(&format!("cursor={raw}")), &["cursor"]).expect("parses");
        assert_eq!(p.cursor(Sort::Name).expect("valid"), Some(c));
        assert_eq!(bad_parameter(p.cursor(Sort::Newest).expect_err("other sort")), "cursor");
        let p = Params::parse(Some("cursor=garbage"), &["cursor"]).expect("parses");
        assert_eq!(bad_parameter(p.cursor(Sort::Name).expect_err("garbage")), "cursor");
    }

    #[test]
    fn canonical_form_ignores_parameter_order() {
        let a = Params::parse(Some("q=x&limit=5"), &["q", "limit"]).expect("parses");
        let b = Params::parse(Some("limit=5&q=x"), &["q", "limit"]).expect("parses");
        assert_eq!(a.canonical(), b.canonical());
    }
}
