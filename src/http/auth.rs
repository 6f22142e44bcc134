//! Who may read a teacher's dashboard: a bearer JWT whose teacher claim
//! (default `sub`) names that teacher. Verification is jsonwebtoken's;
//! this module only chooses keys and algorithms, so that a token can never
//! pick its own (no `alg: none`, no HMAC keyed with a public key).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::ApiError;

/// Verifier settings, as configured (`courseview serve --help`).
#[derive(Debug, Clone, Default)]
pub struct JwtSettings {
    /// HS256 shared secret.
    pub hs256_secret: Option<String>,
    /// A PEM public key (RSA for RS256, EC P-256 for ES256).
    pub public_key_pem: Option<Vec<u8>>,
    /// A JWKS document (`{"keys": […]}`), keys chosen by the token's `kid`.
    pub jwks_json: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that names the teacher.
    pub teacher_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Why the verifier could not be built from its settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT key configuration: {0}")]
pub struct AuthConfigError(String);

/// One key and the only algorithms it may verify.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies dashboard tokens.
pub struct JwtVerifier {
    keys: Vec<Key>,
    settings: JwtSettings,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("teacher_claim", &self.settings.teacher_claim)
            .finish()
    }
}

/// How the teacher dashboard is guarded.
#[derive(Debug, Clone, Default)]
pub enum DashboardAuth {
    /// No key configured: the dashboard is off (404 saying how to turn it on).
    #[default]
    Off,
    /// Anyone may read any dashboard (`--dashboard-public`, development only).
    Public,
    Jwt(Arc<JwtVerifier>),
}

impl DashboardAuth {
    /// Off without keys; public only when asked explicitly.
    pub fn from_settings(settings: JwtSettings, public: bool) -> Result<DashboardAuth, AuthConfigError> {
        if public {
            return Ok(DashboardAuth::Public);
        }
        Ok(JwtVerifier::new(settings)?.map_or(DashboardAuth::Off, |v| DashboardAuth::Jwt(Arc::new(v))))
    }

    /// Lets the request read `teacher_id`'s dashboard, or says why not.
    pub fn authorize(&self, headers: &HeaderMap, teacher_id: &str) -> Result<(), ApiError> {
        match self {
            DashboardAuth::Public => Ok(()),
            DashboardAuth::Off => Err(ApiError::DashboardOff),
            DashboardAuth::Jwt(verifier) => {
                let token = bearer(headers)?;
                let teacher = verifier.teacher(token)?;
                if teacher == teacher_id {
                    Ok(())
                } else {
                    Err(ApiError::Forbidden(
                        "the token names another teacher; a dashboard is readable by its teacher only".into(),
                    ))
                }
            }
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("an Authorization: Bearer token is required".into()))?;
    let text = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not text".into()))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be \"Bearer <token>\"".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be \"Bearer <token>\"".into(),
        ));
    }
    Ok(token.trim())
}

impl JwtVerifier {
    /// `None` when no key is configured.
    pub fn new(settings: JwtSettings) -> Result<Option<JwtVerifier>, AuthConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.hs256_secret {
            if secret.len() < 16 {
                return Err(AuthConfigError("the HS256 secret must be at least 16 bytes".into()));
            }
            keys.push(Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: vec![Algorithm::HS256],
            });
        }
        if let Some(pem) = &settings.public_key_pem {
            let key = if let Ok(rsa) = DecodingKey::from_rsa_pem(pem) {
                Key {
                    kid: None,
                    key: rsa,
                    algorithms: vec![Algorithm::RS256],
                }
            } else if let Ok(ec) = DecodingKey::from_ec_pem(pem) {
                Key {
                    kid: None,
                    key: ec,
                    algorithms: vec![Algorithm::ES256],
                }
            } else {
                return Err(AuthConfigError(
                    "the public key is neither an RSA nor an EC PEM public key".into(),
                ));
            };
            keys.push(key);
        }
        if let Some(json) = &settings.jwks_json {
            let set: JwkSet = serde_json::from_str(json).map_err(|e| AuthConfigError(format!("JWKS: {e}")))?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    // Symmetric or other keys in a public key set: refuse.
                    _ => return Err(AuthConfigError("JWKS keys must be RSA or EC public keys".into())),
                };
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key: DecodingKey::from_jwk(jwk).map_err(|e| AuthConfigError(format!("JWKS key: {e}")))?,
                    algorithms: vec![algorithm],
                });
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(JwtVerifier { keys, settings }))
    }

    /// The teacher a valid token names.
    pub fn teacher(&self, token: &str) -> Result<String, ApiError> {
        let invalid = |why: &str| ApiError::Unauthorized(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        // The key decides the algorithm, never the token: a token whose
        // `alg` no configured key allows is refused before any check.
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg) && (k.kid.is_none() || k.kid == header.kid));
        let mut last = invalid("no configured key accepts its algorithm");
        for key in candidates {
            let mut validation = Validation::new(header.alg);
            validation.algorithms.clone_from(&key.algorithms);
            validation.leeway = self.settings.leeway.as_secs();
            validation.validate_nbf = true;
            validation.validate_aud = self.settings.audience.is_some();
            if let Some(aud) = &self.settings.audience {
                validation.set_audience(&[aud]);
            }
            if let Some(iss) = &self.settings.issuer {
                validation.set_issuer(&[iss]);
            }
            // jsonwebtoken checks `iss`/`aud` only when the token has them:
            // a configured one must be there, or a token minted for another
            // service (no audience) would pass.
            let mut required = vec!["exp"];
            required.extend(self.settings.issuer.is_some().then_some("iss"));
            required.extend(self.settings.audience.is_some().then_some("aud"));
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation) {
                Ok(data) => {
                    return match data.claims.get(&self.settings.teacher_claim) {
                        Some(serde_json::Value::String(t)) if !t.is_empty() => Ok(t.clone()),
                        _ => Err(invalid(&format!("no {:?} claim", self.settings.teacher_claim))),
                    };
                }
                Err(e) => last = invalid(&describe(&e)),
            }
        }
        Err(last)
    }
}

/// A client-safe reason (no key material, no token).
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c:?}"),
        _ => "malformed".into(),
    }
}
