//! Router, shared state and middleware.
//!
//! Middleware, outermost first: request id (a fresh UUID per request, in the
//! `X-Request-Id` response header and every OperationOutcome) → access log
//! (route template, status, latency: never a query string or body) →
//! security headers → error normalisation (any bare error response becomes
//! an OperationOutcome) → CORS (only when origins are configured) → routes.
//! FHIR routes other than `metadata` and the SMART discovery document also
//! pass the bearer-token check.

use crate::base::error::Failure;
use crate::base::request::REQUEST_ID;
use crate::state::AppState;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use phylax_auth::policy::Principal;
use phylax_auth::ScopeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Build the application router.
pub fn router(st: Arc<AppState>) -> Router {
    use crate::authn::token as auth_api;
    use crate::rest::fhir;
    // The FHIR handlers get their part of the state only (`FhirState`:
    // no accounts, clients or token issuer); the token middleware, which
    // checks revocations and disabled clients, gets the whole.
    let protected = crate::rest::routes::fhir_routes()
        .route_layer(middleware::from_fn_with_state(st.clone(), require_token))
        .with_state(st.fhir.clone());
    // Sign-in and tokens get their own router and state: a sign-in handler
    // can only ask for `State<Authn>` (asking for the application state
    // does not compile), so no sign-in page can reach the repository.
    let authn = Router::new()
        .route(
            "/fhir/.well-known/smart-configuration",
            get(auth_api::smart_config),
        )
        .route(
            "/.well-known/smart-configuration",
            get(auth_api::smart_config),
        )
        .route("/auth/token", post(auth_api::token))
        .route("/auth/revoke", post(auth_api::revoke))
        .route("/auth/jwks", get(auth_api::jwks))
        .route(
            "/auth/.well-known/openid-configuration",
            get(auth_api::openid_config),
        )
        .route("/auth/introspect", post(auth_api::introspect))
        .route("/auth/authorize", get(crate::authn::signin::authorize))
        .route("/auth/login", post(crate::authn::signin::login))
        .route("/auth/mfa", post(crate::authn::signin::mfa))
        .route("/auth/mfa/enroll", post(crate::authn::signin::mfa_enroll))
        .route("/auth/mfa/passkey", post(crate::authn::signin::mfa_passkey))
        .route(
            "/auth/mfa/enroll-passkey",
            post(crate::authn::signin::mfa_enroll_passkey),
        )
        .route("/auth/passkey.js", get(crate::authn::signin::passkey_js))
        .route("/auth/account", get(crate::authn::signin::account))
        .route(
            "/auth/account/passkeys",
            post(crate::authn::signin::account_passkeys),
        )
        .route("/auth/continue", post(crate::authn::signin::proceed))
        .route("/auth/consent", post(crate::authn::signin::consent))
        .route("/auth/logout", post(crate::authn::signin::logout))
        .route(
            "/auth/enroll",
            get(crate::authn::signin::enroll_page).post(crate::authn::signin::enroll_submit),
        )
        .with_state(crate::state::Authn(st.authn.clone()));
    let metadata = Router::new()
        .route("/fhir/metadata", get(fhir::metadata))
        .with_state(st.fhir.clone());
    let ops = Router::new()
        .route("/metrics", get(crate::ops::metrics::metrics))
        .with_state(st.clone());
    let mut app = metadata
        .merge(protected)
        .merge(ops)
        .merge(authn)
        .fallback(|| async { Failure::UnknownType });
    if !st.config.http.cors_origins.is_empty() {
        app = app.layer(cors(&st.config.http.cors_origins));
    }
    app.layer(middleware::from_fn(crate::rest::error::normalize_errors))
        .layer(middleware::from_fn_with_state(
            st.blocks.clone(),
            refuse_blocked,
        ))
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::from_fn(access_log))
        .layer(middleware::from_fn(request_id))
}

fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            HeaderName::from_static("prefer"),
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::LAST_MODIFIED,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Refuse every request from an address an incident blocked
/// (`phylax incident contain --ip`), before any handler: the FHIR API,
/// sign-in pages and the token endpoint alike.
async fn refuse_blocked(
    State(blocks): State<crate::data::blocks::Blocks>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if peer.is_some_and(|ip| blocks.refuses(ip)) {
        tracing::debug!("request from a blocked address refused");
        return Failure::Forbidden.into_response();
    }
    next.run(req).await
}

async fn request_id(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    // The route template (`/fhir/{rtype}/{id}`), never the concrete path or
    // query string: search terms in a query can be PHI.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let rid = crate::base::request::request_id().unwrap_or_default();
    tracing::info!(
        target: "phylax::access",
        request_id = %rid,
        method = %method,
        route = route.as_deref().unwrap_or("(unmatched)"),
        status = resp.status().as_u16(),
        latency_us = start.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    set(
        h,
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    );
    set(h, "cache-control", "no-store");
    set(h, "pragma", "no-cache");
    set(h, "x-content-type-options", "nosniff");
    // Sign-in pages set their own policy (they need forms and a QR image).
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(
            h,
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        );
    }
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(h, "cross-origin-resource-policy", "same-origin");
    resp
}

/// Bearer-token authentication for FHIR routes.
async fn require_token(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return Failure::Unauthorized.into_response();
    };
    let claims = match st
        .authn
        .tokens
        .verify(token, crate::base::clock::now_secs())
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(reason = %e, "bearer token rejected");
            return Failure::Unauthorized.into_response();
        }
    };
    if st.disabled_clients.read().contains(&claims.client_id)
        || st.authn.revoked.read().refuses(&claims)
    {
        return Failure::Unauthorized.into_response();
    }
    // RFC 8705 §3: a certificate-bound token works only over a connection
    // that presented that certificate (a stolen token alone is useless).
    if let Some(cnf) = &claims.cnf {
        let presented = req.extensions().get::<crate::net::conn::ClientCert>();
        if presented.is_none_or(|c| c.0 != cnf.x5t_s256) {
            tracing::debug!("certificate-bound token without its certificate");
            return Failure::Unauthorized.into_response();
        }
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let scopes = ScopeSet::parse_lenient(&claims.scope);
    let family = claims.fam.clone();
    let principal = match claims.role {
        Some(role) => {
            // The role as defined now; a role that no longer exists grants
            // nothing (fail closed).
            let Some(def) = st.roles.get(&role) else {
                return Failure::Unauthorized.into_response();
            };
            let mfa_at = (claims.acr.as_deref() == Some(phylax_auth::token::ACR_MFA))
                .then_some(claims.auth_time)
                .flatten();
            Principal::User {
                user_id: claims.sub,
                role: def.clone(),
                client_id: claims.client_id,
                scopes,
                patient: claims.patient,
                token_id: claims.jti,
                mfa_at,
            }
        }
        None => Principal::Client {
            client_id: claims.client_id,
            scopes,
            token_id: claims.jti,
        },
    };
    // Per-user and per-client rate limits, before any work for the
    // request (`[rate]`).
    let (key, limit) = match &principal {
        Principal::User { user_id, .. } => (format!("u:{user_id}"), st.config.rate.user()),
        Principal::Client { client_id, .. } => (format!("c:{client_id}"), st.config.rate.client()),
    };
    if let Err(secs) = st
        .authn
        .rate
        .take(&key, limit, crate::base::clock::now_ms())
    {
        st.metrics.rate_limited("fhir");
        return Failure::TooManyRequests(secs).into_response();
    }
    // Which patients' data this request reaches; unknown means refused.
    let rid = crate::base::request::request_id().unwrap_or_default();
    let ctx = match crate::access::reach::establish(&st.gate, principal, peer, family, rid).await {
        Ok(ctx) => ctx,
        Err((e, refused)) => {
            tracing::warn!(reason = ?e.denied_by(), "access could not be established; request refused");
            // A policy refusal is recorded like any other (the caller
            // reaches nothing while it is recorded); a failure to look the
            // facts up is a 503 either way.
            if let Some(rule) = e.denied_by() {
                let status = e.status().as_u16();
                let refs = crate::access::ctx::AuditRefs::default();
                if let Err(a) = crate::rest::pipeline::record(
                    &st.fhir,
                    &refused,
                    "access",
                    refs,
                    status,
                    Some(rule),
                )
                .await
                {
                    return a.into_response();
                }
            }
            return e.into_response();
        }
    };
    req.extensions_mut().insert(ctx);
    next.run(req).await
}

/// Serve until `shutdown`: HTTPS normally, or plaintext HTTP only when the
/// caller passed `danger_plaintext` and the address is loopback.
pub async fn serve(
    st: Arc<AppState>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Refused before anything starts: a refused call must not take this
    // node's journal lock or start background work (a running server
    // asked to serve a second, bad listener once lost its journal lock to
    // it in a race).
    if tls.is_none() && !listener.local_addr()?.ip().is_loopback() {
        return Err(std::io::Error::other(
            "plaintext HTTP is only allowed on a loopback address",
        ));
    }
    // Reads' audit records go through this node's journal (recovering any
    // stopped node's first).
    st.audit
        .start_journal(&st.data_dir.join("audit-journal"))
        .await
        .map_err(|e| std::io::Error::other(format!("audit journal: {e}")))?;
    st.spawn_background();
    let app = router(st.clone());
    let served = serve_app(app, listener, tls, st.config.http.limits(), shutdown).await;
    // Everything acknowledged goes into the database before the node stops
    // (a crash instead leaves it for the next start).
    if let Err(e) = st.audit.flush().await {
        tracing::error!(error = %e, "audit journal not flushed at shutdown; the next start recovers it");
    }
    served
}

async fn serve_app(
    app: Router,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: crate::net::conn::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Plaintext is loopback only: checked by `serve` before anything started.
    crate::net::conn::serve(listener, tls, app, limits, shutdown).await
}
