//! Authentication at the edge: a middleware that turns the bearer token into
//! a `Principal` (401 when missing or invalid; 429 past the per-token rate),
//! and `Authorized<S>`, the extractor with which each handler names the
//! scope it needs (403 without it).

use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{Error, FromRequest, HttpMessage, HttpRequest, ResponseError, web};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use crate::auth::{AuthError, Authenticator, Principal, Scope};
use crate::settings::AuthSettings;

/// Authentication state, as app data.
pub struct AuthState {
    /// `None` when authentication is switched off.
    authenticator: Option<Authenticator>,
    metrics_public: bool,
    docs_public: bool,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Who calls when authentication is off, and who calls an open route
    /// when it is on: built once, shared by every request.
    anonymous: Arc<Principal>,
    open: Arc<Principal>,
}

impl AuthState {
    pub fn from_settings(s: &AuthSettings) -> Result<Arc<Self>, crate::auth::AuthConfigError> {
        let authenticator = if s.enabled {
            Some(Authenticator::from_settings(s)?)
        } else {
            tracing::warn!(
                "authentication is OFF (auth.enabled=false): every caller may read and write every session"
            );
            None
        };
        let limiter = NonZeroU32::new(s.rate_limit_per_second)
            .filter(|_| s.enabled)
            .map(|rate| {
                let burst = NonZeroU32::new(s.rate_limit_burst).unwrap_or(rate);
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            });
        Ok(Arc::new(Self {
            authenticator,
            metrics_public: s.metrics_public,
            docs_public: s.docs_public,
            limiter,
            anonymous: Arc::new(Principal::anonymous()),
            open: Arc::new(Principal {
                subject: "anonymous".into(),
                scopes: Default::default(),
            }),
        }))
    }

    fn is_open(&self, path: &str) -> bool {
        let path = path.trim_end_matches('/');
        matches!(path, "/healthz" | "/readyz")
            || (self.metrics_public && path == "/metrics")
            || (self.docs_public
                && (path == "/openapi.json" || path == "/docs" || path.starts_with("/docs/")))
    }
}

fn bearer(req: &ServiceRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let Some(state) = req.app_data::<web::Data<Arc<AuthState>>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let principal = match (&state.authenticator, state.is_open(req.path())) {
        (None, _) => Ok(state.anonymous.clone()),
        (Some(_), true) => Ok(state.open.clone()),
        (Some(auth), false) => match bearer(&req) {
            None => Err(AuthError::Missing),
            Some(token) => auth.verify(token).map(Arc::new),
        },
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => {
            let res = ApiError::Unauthorized(e.to_string()).error_response();
            return Ok(req.into_response(res).map_into_right_body());
        }
    };
    if let Some(limiter) = &state.limiter
        && !state.is_open(req.path())
        && let Err(not_until) = limiter.check_key(&principal.subject)
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let res = ApiError::RateLimited(wait.as_secs().max(1)).error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    req.extensions_mut().insert(principal);
    Ok(next.call(req).await?.map_into_left_body())
}

/// A scope a handler requires.
pub trait RequiredScope {
    const SCOPE: Scope;
}

pub struct SessionsRead;
pub struct SessionsWrite;
pub struct EventsRead;
/// The runner's own writes: worker output, approval requests.
pub struct SessionsRun;

impl RequiredScope for SessionsRead {
    const SCOPE: Scope = Scope::SessionsRead;
}
impl RequiredScope for SessionsWrite {
    const SCOPE: Scope = Scope::SessionsWrite;
}
impl RequiredScope for EventsRead {
    const SCOPE: Scope = Scope::EventsRead;
}
impl RequiredScope for SessionsRun {
    const SCOPE: Scope = Scope::SessionsRun;
}

/// Present in a handler's arguments: the caller holds scope `S`.
pub struct Authorized<S: RequiredScope>(PhantomData<S>);

impl<S: RequiredScope> FromRequest for Authorized<S> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ok = req
            .extensions()
            .get::<Arc<Principal>>()
            .is_none_or(|p| p.scopes.contains(&S::SCOPE));
        std::future::ready(if ok {
            Ok(Self(PhantomData))
        } else {
            Err(ApiError::Forbidden(S::SCOPE.as_str()))
        })
    }
}
