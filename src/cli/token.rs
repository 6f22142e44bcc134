//! `courseview token --teacher T`: mint an HS256 dashboard token with the
//! API's shared secret, for demos and development. Production tokens come
//! from the identity provider; the API verifies them with its keys.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::humantime_duration;

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The teacher the token names (its `sub`, or `--claim`).
    #[arg(long)]
    pub teacher: String,
    /// The shared secret the API verifies with.
    #[arg(long, env = "COURSEVIEW_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The claim that names the teacher.
    #[arg(long, env = "COURSEVIEW_JWT_TEACHER_CLAIM", default_value = "sub")]
    pub claim: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime_duration)]
    pub ttl: Duration,
}

pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    println!("{}", mint(args)?);
    Ok(())
}

fn mint(args: &TokenArgs) -> anyhow::Result<String> {
    if args.secret.len() < 16 {
        bail!("the secret must be at least 16 bytes, as the API requires");
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        args.claim.clone(): args.teacher,
        "iat": now,
        "exp": now + i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX / 2),
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(args.secret.as_bytes()),
    )
    .context("cannot sign the token")?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{JwtSettings, JwtVerifier};

    #[test]
    fn a_minted_token_names_its_teacher_to_the_api_verifier() {
        let args = TokenArgs {
            teacher: "t7".into(),
            secret: "0123456789abcdef0123".into(),
            claim: "sub".into(),
            ttl: Duration::from_secs(60),
        };
        let verifier = JwtVerifier::new(JwtSettings {
            hs256_secret: Some(args.secret.clone()),
            teacher_claim: "sub".into(),
            ..JwtSettings::default()
        })
        .expect("settings")
        .expect("a key");
        assert_eq!(verifier.teacher(&mint(&args).expect("minted")).expect("valid"), "t7");
    }
}
