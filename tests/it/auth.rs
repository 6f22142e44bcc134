//! The teacher dashboard is private: a bearer JWT naming that teacher, or
//! nothing. Tokens are minted here with test-only keys
//! (`tests/fixtures/jwt/`), and sent over HTTP to the API as a client would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use courseview::http::{DashboardAuth, JwtSettings};
use courseview::read_model::ReadModel;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::{event, Options, TestApp};

const RSA_PRIVATE: &[u8] = include_bytes!("../fixtures/jwt/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/jwt/rsa_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("../fixtures/jwt/ec_private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("../fixtures/jwt/ec_public.pem");
const JWKS: &str = include_str!("../fixtures/jwt/jwks.json");
const SECRET: &str = "a-test-secret-of-32-bytes-length";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn settings() -> JwtSettings {
    JwtSettings {
        teacher_claim: "sub".into(),
        leeway: Duration::from_secs(5),
        ..JwtSettings::default()
    }
}

/// An app whose dashboard is guarded by `jwt`, seeded with a draft of t1.
async fn guarded(jwt: JwtSettings) -> TestApp {
    let auth = DashboardAuth::from_settings(jwt, false).expect("keys");
    let app = TestApp::with(Options {
        dashboard: auth,
        ..Options::default()
    })
    .await;
    app.project_all(
        ReadModel::TeacherCourses,
        &[event(
            "CourseCreatedEvent",
            "d1",
            1,
            json!({"name": "Secret draft", "teacherId": "t1"}),
        )],
    )
    .await;
    app
}

async fn dashboard(app: &TestApp, teacher: &str, authorization: Option<&str>) -> (u16, Value, Option<String>) {
    let mut request = app.http.get(format!("{}/teachers/{teacher}/courses", app.base_url));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status != 200 {
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    (status, response.json().await.unwrap_or(Value::Null), challenge)
}

fn claims(sub: &str, exp_in: i64) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + exp_in})
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("token")
}

fn rs256(claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("rsa")).expect("token")
}

#[tokio::test]
async fn an_hs256_token_of_the_teacher_opens_the_dashboard_and_every_bad_token_is_refused() {
    let app = guarded(JwtSettings {
        hs256_secret: Some(SECRET.into()),
        ..settings()
    })
    .await;
    let valid = hs256(&claims("t1", 300), SECRET.as_bytes());
    let (status, body, _) = dashboard(&app, "t1", Some(&format!("Bearer {valid}"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"][0]["name"], "Secret draft");

    // Valid, but another teacher's.
    let (status, body, _) = dashboard(&app, "t2", Some(&format!("Bearer {valid}"))).await;
    assert_eq!((status, body["type"].as_str()), (403, Some("/problems/forbidden")));

    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let cases = [
        ("missing header", None),
        ("malformed header", Some("Token abc".to_owned())),
        ("not a JWT", Some("Bearer not.a.jwt".to_owned())),
        (
            "expired",
            Some(format!("Bearer {}", hs256(&claims("t1", -600), SECRET.as_bytes()))),
        ),
        (
            "wrong signature",
            Some(format!(
                "Bearer {}",
                hs256(&claims("t1", 300), b"another-secret-of-32-bytes-long!")
            )),
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims("t1", 300))
            )),
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                hs256(
                    &json!({"sub": "t1", "nbf": now() + 600, "exp": now() + 900}),
                    SECRET.as_bytes()
                )
            )),
        ),
        (
            "no exp",
            Some(format!("Bearer {}", hs256(&json!({"sub": "t1"}), SECRET.as_bytes()))),
        ),
    ];
    for (case, header) in cases {
        let (status, body, challenge) = dashboard(&app, "t1", header.as_deref()).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert!(
            challenge.as_deref().is_some_and(|c| c.starts_with("Bearer")),
            "{case}: WWW-Authenticate"
        );
        assert!(!body.to_string().contains("Secret draft"), "{case}: no data leaks");
    }
}

#[tokio::test]
async fn rs256_es256_and_jwks_keys_verify_and_a_public_key_used_as_an_hmac_secret_is_refused() {
    let rsa = guarded(JwtSettings {
        public_key_pem: Some(RSA_PUBLIC.to_vec()),
        issuer: Some("https://id.example".into()),
        audience: Some("courseview".into()),
        ..settings()
    })
    .await;
    let good = json!({"sub": "t1", "exp": now() + 300, "iss": "https://id.example", "aud": "courseview"});
    let (status, _, _) = dashboard(&rsa, "t1", Some(&format!("Bearer {}", rs256(&good, None)))).await;
    assert_eq!(status, 200);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    let (status, _, _) = dashboard(&rsa, "t1", Some(&format!("Bearer {}", rs256(&wrong_aud, None)))).await;
    assert_eq!(status, 401, "wrong audience");
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let (status, _, _) = dashboard(&rsa, "t1", Some(&format!("Bearer {}", rs256(&wrong_iss, None)))).await;
    assert_eq!(status, 401, "wrong issuer");
    // A configured issuer or audience is a required claim: another
    // service's token for the same teacher, without them, opens nothing.
    for missing in [&["iss"][..], &["aud"][..], &["iss", "aud"][..]] {
        let mut token = good.clone();
        for claim in missing {
            token.as_object_mut().expect("claims").remove(*claim);
        }
        let (status, _, _) = dashboard(&rsa, "t1", Some(&format!("Bearer {}", rs256(&token, None)))).await;
        assert_eq!(status, 401, "a token without {missing:?}");
    }
    // The classic algorithm confusion: HS256 keyed with the RSA public key.
    let confused = hs256(&good, RSA_PUBLIC);
    let (status, _, _) = dashboard(&rsa, "t1", Some(&format!("Bearer {confused}"))).await;
    assert_eq!(status, 401, "an HMAC token keyed with the public key");

    let ec = guarded(JwtSettings {
        public_key_pem: Some(EC_PUBLIC.to_vec()),
        ..settings()
    })
    .await;
    let token = encode(
        &Header::new(Algorithm::ES256),
        &claims("t1", 300),
        &EncodingKey::from_ec_pem(EC_PRIVATE).expect("ec"),
    )
    .expect("token");
    let (status, _, _) = dashboard(&ec, "t1", Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "ES256");

    let jwks = guarded(JwtSettings {
        jwks_json: Some(JWKS.into()),
        ..settings()
    })
    .await;
    let (status, _, _) = dashboard(
        &jwks,
        "t1",
        Some(&format!("Bearer {}", rs256(&claims("t1", 300), Some("test-rsa")))),
    )
    .await;
    assert_eq!(status, 200, "JWKS key by kid");
    let (status, _, _) = dashboard(
        &jwks,
        "t1",
        Some(&format!("Bearer {}", rs256(&claims("t1", 300), Some("other")))),
    )
    .await;
    assert_eq!(status, 401, "unknown kid");
}

#[tokio::test]
async fn without_a_key_the_dashboard_is_off_and_says_how_to_turn_it_on() {
    let app = guarded(settings()).await;
    let (status, body, _) = dashboard(&app, "t1", None).await;
    assert_eq!((status, body["type"].as_str()), (404, Some("/problems/dashboard-off")));
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.contains("--jwt-hs256-secret")));
    // The student catalog stays public.
    assert_eq!(app.get_json("/catalog/courses").await.0, 200);
}

#[tokio::test]
async fn a_cached_dashboard_is_never_served_to_another_teacher() {
    let app = guarded(JwtSettings {
        hs256_secret: Some(SECRET.into()),
        ..settings()
    })
    .await;
    let t1 = format!("Bearer {}", hs256(&claims("t1", 300), SECRET.as_bytes()));
    let t2 = format!("Bearer {}", hs256(&claims("t2", 300), SECRET.as_bytes()));
    // t1's answer is now cached.
    assert_eq!(dashboard(&app, "t1", Some(&t1)).await.0, 200);
    assert_eq!(dashboard(&app, "t1", Some(&t1)).await.0, 200);
    let (status, body, _) = dashboard(&app, "t1", Some(&t2)).await;
    assert_eq!(status, 403);
    assert!(!body.to_string().contains("Secret draft"));
    let (status, body, _) = dashboard(&app, "t2", Some(&t2)).await;
    assert_eq!(status, 200);
    assert_eq!(body["items"], json!([]), "t2 has no courses");
}
