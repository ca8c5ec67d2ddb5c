//! The outermost HTTP layer: the `Host` allow-list (DNS rebinding), the web security
//! headers on every response, the request's context (client address, who it authenticated
//! as), and ending a revoked user's event streams.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::auth::{RequestContext, REQUEST};
use super::front_main::FrontState;
use super::http::ApiError;
use super::serve::ConnInfo;

/// The page loads its scripts and styles from `/static` only; xterm.js sets inline
/// styles (hence `'unsafe-inline'` for styles, never for scripts); the socket and the API
/// are same-origin; nothing may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// The host part of a `Host` header, lower-cased, without the port or a trailing dot
/// (`[::1]` keeps its brackets).
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn ip_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("[{v6}]"),
        },
    }
}

/// Whether `host` (a `Host` header) names this daemon: localhost, the loopback addresses,
/// the listen address, the address the connection came in on (an IP literal: DNS
/// rebinding always uses a name), or `http.allowed_hosts`.
pub fn host_allowed(state: &FrontState, host: &str, local: Option<IpAddr>) -> bool {
    let name = host_name(host);
    if ["localhost", "127.0.0.1", "[::1]"].contains(&name.as_str()) {
        return true;
    }
    let listen = state
        .config
        .listen
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    if listen
        .into_iter()
        .chain(local)
        .any(|ip| ip_name(ip) == name)
    {
        return true;
    }
    state
        .config
        .http
        .allowed_hosts
        .iter()
        .any(|h| host_name(h) == name)
}

pub async fn layer(State(state): State<Arc<FrontState>>, request: Request, next: Next) -> Response {
    let conn = request.extensions().get::<ConnInfo>().copied();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let refusal = match host {
        None => Some("this request has no Host header (rule: http.allowed_hosts)".to_string()),
        Some(h) if !host_allowed(&state, h, conn.map(|c| c.local.ip())) => Some(format!(
            "Host {:?} is not one this daemon answers to (rule: http.allowed_hosts; \
             localhost, 127.0.0.1, [::1] and the listen address are always allowed)",
            h
        )),
        Some(_) => None,
    };
    // A request made with the log-in cookie that could come from another site's page.
    let csrf = super::credential::csrf_check(request.method(), request.headers()).err();
    let mut response = match (refusal, csrf) {
        (Some(message), _) => {
            tracing::warn!(peer = ?conn.map(|c| c.peer), "{message}");
            ApiError::new(StatusCode::MISDIRECTED_REQUEST, message).into_response()
        }
        (None, Some(message)) => {
            tracing::warn!(peer = ?conn.map(|c| c.peer), "{message}");
            ApiError::by_rule(StatusCode::FORBIDDEN, "csrf", message).into_response()
        }
        (None, None) => {
            let context = Arc::new(RequestContext {
                peer: conn.map(|c| c.peer.ip()),
                verified: Mutex::new(None),
            });
            let response = REQUEST.scope(context.clone(), next.run(request)).await;
            let verified = context.verified.lock().expect("request lock").take();
            end_on_revocation(&state.auth, verified, response)
        }
    };
    add_security_headers(response.headers_mut());
    response
}

/// The web security headers, where a response does not set its own.
pub fn add_security_headers(headers: &mut axum::http::HeaderMap) {
    for (name, value) in SECURITY_HEADERS {
        headers
            .entry(*name)
            .or_insert(HeaderValue::from_static(value));
    }
}

/// An event stream of `verified` ends at once when its user is revoked.
pub fn end_on_revocation(
    auth: &Arc<super::auth::Auth>,
    verified: Option<super::auth::Verified>,
    response: Response,
) -> Response {
    match verified {
        Some(v) if is_event_stream(&response) => {
            let revoked = auth.until_revoked(v);
            let (parts, body) = response.into_parts();
            let stream = body.into_data_stream().take_until(Box::pin(revoked));
            Response::from_parts(parts, Body::from_stream(stream))
        }
        _ => response,
    }
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn host_names() {
        assert_eq!(host_name("LocalHost:7433"), "localhost");
        assert_eq!(host_name("localhost."), "localhost");
        assert_eq!(host_name("[::1]:7433"), "[::1]");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.example:80"), "evil.example");
    }
}
