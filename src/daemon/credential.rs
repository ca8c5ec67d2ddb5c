//! Where a request's credential is, for the front and the workers alike: the
//! `Authorization: Bearer <token>` header (scripts, the CLI), or else the `stoa_session`
//! cookie of a browser that logged in with `POST /login`.
//!
//! | where                        | CSRF protection                                                    |
//! |------------------------------|--------------------------------------------------------------------|
//! | `Authorization: Bearer`      | none needed: a browser never adds it by itself                     |
//! | `stoa_session` cookie        | `SameSite=Strict`, and every request that changes anything (not `GET`/`HEAD`/`OPTIONS`) carries `X-CSRF-Token` ([`csrf_token`] of the cookie); WebSocket upgrades carry an `Origin` of the same host |
#![forbid(unsafe_code)]

use axum::http::{header, HeaderMap, HeaderValue, Method};
use sha2::{Digest, Sha256};

use crate::wire::limits::MAX_CREDENTIAL_BYTES;

/// The log-in cookie's name.
pub const COOKIE: &str = "stoa_session";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Bearer,
    Cookie,
}

/// A credential as presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub value: String,
    pub source: Source,
}

/// The request's credential (`Ok(None)`: it shows none; `Err`: it shows a malformed one).
pub fn presented(headers: &HeaderMap) -> Result<Option<Presented>, &'static str> {
    presented_in(|name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    })
}

/// [`presented`] over any header lookup (`name` in lower case → its values).
pub fn presented_in<'a>(
    values: impl Fn(&str) -> Vec<&'a str>,
) -> Result<Option<Presented>, &'static str> {
    if let Some(v) = values("authorization").first() {
        let token = v
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_CREDENTIAL_BYTES)
            .ok_or("malformed Authorization header")?;
        return Ok(Some(Presented {
            value: token.to_string(),
            source: Source::Bearer,
        }));
    }
    let mut found = None;
    for line in values("cookie") {
        for pair in line.split(';') {
            let Some((name, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if name == COOKIE {
                if found.is_some() {
                    return Err("more than one stoa_session cookie");
                }
                let value = value.trim_matches('"');
                if value.is_empty() || value.len() > MAX_CREDENTIAL_BYTES {
                    return Err("malformed stoa_session cookie");
                }
                found = Some(value.to_string());
            }
        }
    }
    Ok(found.map(|value| Presented {
        value,
        source: Source::Cookie,
    }))
}

/// The CSRF token of a log-in: derived from its credential, so nothing more is stored, and
/// useless without the cookie it belongs to.
pub fn csrf_token(credential: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"stoa-csrf\0")
        .chain_update(credential.as_bytes())
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a request with `method` and `headers` may go on, as far as CSRF goes (see the
/// table above); `Err`: why not.
pub fn csrf_check(method: &Method, headers: &HeaderMap) -> Result<(), &'static str> {
    let Ok(Some(p)) = presented(headers) else {
        return Ok(());
    };
    if p.source != Source::Cookie {
        return Ok(());
    }
    let upgrade = headers.contains_key(header::UPGRADE);
    if upgrade {
        return same_origin(headers);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let want = csrf_token(&p.value);
    // Compared without an early exit.
    let same = sent.len() == want.len()
        && sent
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err("a change made with the log-in cookie must carry its X-CSRF-Token header (rule: csrf)")
    }
}

/// A cookie-authenticated WebSocket must come from a page of this same host.
pub fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    same_origin_in(
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    )
}

pub fn same_origin_in(origin: Option<&str>, host: Option<&str>) -> Result<(), &'static str> {
    let refused = "a WebSocket opened with the log-in cookie must come from this site's own page (rule: csrf)";
    let (Some(origin), Some(host)) = (origin, host) else {
        return Err(refused);
    };
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or(refused)?;
    if origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(refused)
    }
}

/// `Set-Cookie` for a new log-in.
pub fn set_cookie(credential: &str, max_age_secs: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={credential}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    ))
    .expect("a credential is a header-safe token")
}

/// `Set-Cookie` that removes the log-in cookie.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    ))
    .expect("static text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_wins_then_the_cookie_among_others() {
        let h = headers(&[
            ("authorization", "Bearer tok"),
            ("cookie", "stoa_session=c"),
        ]);
        assert_eq!(presented(&h).unwrap().unwrap().source, Source::Bearer);
        let h = headers(&[("cookie", "a=b; stoa_session=c1 ; x=y")]);
        let p = presented(&h).unwrap().unwrap();
        assert_eq!((p.value.as_str(), p.source), ("c1", Source::Cookie));
        assert_eq!(presented(&headers(&[("cookie", "a=b")])).unwrap(), None);
        assert!(presented(&headers(&[("authorization", "Basic x")])).is_err());
        // Two session cookies (one planted by a sibling site on the same host name): refused.
        let h = headers(&[("cookie", "stoa_session=a"), ("cookie", "stoa_session=b")]);
        assert!(presented(&h).is_err());
    }

    #[test]
    fn cookie_changes_need_the_token_and_sockets_the_same_origin() {
        let c = "stoa_login_abc";
        let cookie = format!("stoa_session={c}");
        let token = csrf_token(c);
        let post = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("cookie", cookie.as_str())];
            pairs.extend_from_slice(extra);
            csrf_check(&Method::POST, &headers(&pairs))
        };
        assert!(post(&[]).is_err());
        assert!(post(&[("x-csrf-token", "00")]).is_err());
        assert!(post(&[("x-csrf-token", &csrf_token("another"))]).is_err());
        assert!(post(&[("x-csrf-token", &token)]).is_ok());
        assert!(csrf_check(&Method::GET, &headers(&[("cookie", &cookie)])).is_ok());
        // A bearer token needs no CSRF token.
        assert!(csrf_check(&Method::POST, &headers(&[("authorization", "Bearer t")])).is_ok());
        let ws = |origin: Option<&str>| {
            let mut pairs = vec![
                ("cookie", cookie.as_str()),
                ("upgrade", "websocket"),
                ("host", "127.0.0.1:7433"),
            ];
            if let Some(o) = origin {
                pairs.push(("origin", o));
            }
            csrf_check(&Method::GET, &headers(&pairs))
        };
        assert!(ws(Some("http://127.0.0.1:7433")).is_ok());
        assert!(ws(Some("http://evil.example")).is_err());
        assert!(ws(Some("http://127.0.0.1:7433.evil.example")).is_err());
        assert!(ws(None).is_err());
    }
}
