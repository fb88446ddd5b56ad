//! Bearer-token authentication: static API tokens (stored as SHA-256
//! hashes) and JWTs (HS256 with a shared secret, RS256/ES256 with a PEM
//! public key or a JWKS file; expiry always, issuer and audience when
//! configured). Each principal carries scopes the API checks per route.

use std::collections::{BTreeSet, HashMap};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::settings::AuthSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    SessionsRead,
    SessionsWrite,
    EventsRead,
    /// The runner's reports that only a worker may make: its output
    /// (`POST /sessions/{id}/messages`) and the approvals it asks for.
    SessionsRun,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Self::SessionsRead,
        Self::SessionsWrite,
        Self::EventsRead,
        Self::SessionsRun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionsRead => "sessions:read",
            Self::SessionsWrite => "sessions:write",
            Self::EventsRead => "events:read",
            Self::SessionsRun => "sessions:run",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Who is calling and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub scopes: BTreeSet<Scope>,
}

impl Principal {
    /// Used when authentication is switched off.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            scopes: Scope::ALL.into_iter().collect(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth.tokens_json is not a list of {{subject, sha256, scopes}}: {0}")]
    Tokens(String),
    #[error("cannot read {0}: {1}")]
    File(String, std::io::Error),
    #[error("invalid key in {0}: {1}")]
    Key(String, String),
    #[error(
        "authentication is on but no tokens or JWT keys are configured; configure auth.tokens_json or a JWT key, or set APP__AUTH__ENABLED=false for local development"
    )]
    NothingConfigured,
}

#[derive(Debug, Deserialize)]
struct StaticToken {
    subject: String,
    /// Hex SHA-256 of the token (`agent-sessions hash-token`).
    sha256: String,
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

fn parse_scopes<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<Scope> {
    names.into_iter().filter_map(Scope::parse).collect()
}

/// Hex SHA-256 of a token, as stored in settings.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub struct Authenticator {
    static_tokens: HashMap<String, Principal>,
    /// Keys without a `kid`, tried in turn, each with its validation.
    keys: Vec<(DecodingKey, Validation)>,
    jwks: Option<(JwkSet, Validation)>,
}

impl Authenticator {
    pub fn from_settings(s: &AuthSettings) -> Result<Self, AuthConfigError> {
        let tokens: Vec<StaticToken> = if s.tokens_json.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&s.tokens_json)
                .map_err(|e| AuthConfigError::Tokens(e.to_string()))?
        };
        let static_tokens = tokens
            .into_iter()
            .map(|t| {
                (
                    t.sha256.to_ascii_lowercase(),
                    Principal {
                        subject: t.subject,
                        scopes: parse_scopes(t.scopes.iter().map(String::as_str)),
                    },
                )
            })
            .collect();
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = 30;
            if !s.jwt_issuer.is_empty() {
                v.set_issuer(&[&s.jwt_issuer]);
                v.required_spec_claims.insert("iss".into());
            }
            if s.jwt_audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&[&s.jwt_audience]);
                v.required_spec_claims.insert("aud".into());
            }
            v
        };
        let mut keys = Vec::new();
        if !s.jwt_hs256_secret.is_empty() {
            keys.push((
                DecodingKey::from_secret(s.jwt_hs256_secret.as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if !s.jwt_public_key_file.is_empty() {
            let path = &s.jwt_public_key_file;
            let pem = std::fs::read(path).map_err(|e| AuthConfigError::File(path.clone(), e))?;
            let key = match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => (k, validation(Algorithm::RS256)),
                Err(_) => (
                    DecodingKey::from_ec_pem(&pem)
                        .map_err(|e| AuthConfigError::Key(path.clone(), e.to_string()))?,
                    validation(Algorithm::ES256),
                ),
            };
            keys.push(key);
        }
        let jwks = if s.jwks_file.is_empty() {
            None
        } else {
            let path = &s.jwks_file;
            let raw = std::fs::read(path).map_err(|e| AuthConfigError::File(path.clone(), e))?;
            let set: JwkSet = serde_json::from_slice(&raw)
                .map_err(|e| AuthConfigError::Key(path.clone(), e.to_string()))?;
            let mut v = validation(Algorithm::RS256);
            v.algorithms = vec![Algorithm::RS256, Algorithm::ES256];
            Some((set, v))
        };
        let auth = Self {
            static_tokens,
            keys,
            jwks,
        };
        if auth.static_tokens.is_empty() && auth.keys.is_empty() && auth.jwks.is_none() {
            return Err(AuthConfigError::NothingConfigured);
        }
        Ok(auth)
    }

    /// Verify the token of an `Authorization: Bearer …` header.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(p) = self.static_tokens.get(&hash_token(token)) {
            return Ok(p.clone());
        }
        if token.split('.').count() != 3 {
            return Err(AuthError::Invalid("unknown token".into()));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut last = AuthError::Invalid("no key accepts this token".into());
        let jwks_key = match (&self.jwks, &header.kid) {
            (Some((set, v)), Some(kid)) => set
                .find(kid)
                .and_then(|jwk| DecodingKey::from_jwk(jwk).ok())
                .map(|k| (k, v.clone())),
            _ => None,
        };
        for (key, validation) in jwks_key.iter().chain(self.keys.iter()) {
            if !validation.algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    let c = data.claims;
                    let scopes = match (&c.scope, &c.scp) {
                        (Some(s), _) => parse_scopes(s.split_whitespace()),
                        (None, Some(list)) => parse_scopes(list.iter().map(String::as_str)),
                        (None, None) => BTreeSet::new(),
                    };
                    return Ok(Principal {
                        subject: c.sub,
                        scopes,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                        _ => AuthError::Invalid(e.to_string()),
                    }
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn settings() -> AuthSettings {
        AuthSettings {
            enabled: true,
            metrics_public: true,
            docs_public: false,
            tokens_json: format!(
                r#"[{{"subject": "runner", "sha256": "{}", "scopes": ["sessions:read", "sessions:write"]}}]"#,
                hash_token("s3cret")
            ),
            jwt_hs256_secret: "jwt-secret".into(),
            jwt_public_key_file: String::new(),
            jwks_file: String::new(),
            jwt_issuer: "https://issuer.example".into(),
            jwt_audience: "agent-sessions".into(),
            rate_limit_per_second: 100,
            rate_limit_burst: 200,
        }
    }

    fn jwt(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn static_tokens_match_by_hash() {
        let a = Authenticator::from_settings(&settings()).unwrap();
        let p = a.verify("s3cret").unwrap();
        assert_eq!(p.subject, "runner");
        assert!(p.scopes.contains(&Scope::SessionsWrite) && !p.scopes.contains(&Scope::EventsRead));
        assert!(a.verify("wrong").is_err());
    }

    #[test]
    fn jwts_are_checked_for_signature_expiry_issuer_and_audience() {
        let a = Authenticator::from_settings(&settings()).unwrap();
        let good = json!({"sub": "svc", "exp": now() + 600, "iss": "https://issuer.example", "aud": "agent-sessions", "scope": "events:read sessions:read"});
        let p = a.verify(&jwt(good.clone(), "jwt-secret")).unwrap();
        assert_eq!(p.subject, "svc");
        assert_eq!(
            p.scopes,
            [Scope::SessionsRead, Scope::EventsRead]
                .into_iter()
                .collect()
        );
        assert!(matches!(
            a.verify(&jwt(good.clone(), "other")),
            Err(AuthError::Invalid(_))
        ));
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 3600);
        assert_eq!(
            a.verify(&jwt(expired, "jwt-secret")),
            Err(AuthError::Expired)
        );
        let mut aud = good.clone();
        aud["aud"] = json!("someone-else");
        assert!(a.verify(&jwt(aud, "jwt-secret")).is_err());
        let mut iss = good;
        iss["iss"] = json!("https://evil.example");
        assert!(a.verify(&jwt(iss, "jwt-secret")).is_err());
    }

    #[test]
    fn nothing_configured_is_refused_at_start_up() {
        let mut s = settings();
        s.tokens_json = String::new();
        s.jwt_hs256_secret = String::new();
        assert!(matches!(
            Authenticator::from_settings(&s),
            Err(AuthConfigError::NothingConfigured)
        ));
    }
}
