//! The web page built into the binary: `GET /` and `GET /static/<path>` need no files and no
//! npm at run time. The config key `web_dir` replaces all of it with a directory's files.
//!
//! | path under `/static/`      | file in the repository           | what                      |
//! |----------------------------|----------------------------------|---------------------------|
//! | `app.js`, `app.css`        | `web/`                           | the page (`/` is `index.html`) |
//! | `vendor/xterm/xterm.js`, `xterm.css`, `LICENSE` | `web/vendor/xterm/` | `@xterm/xterm` 6.0.0 (MIT) |
//! | `vendor/addon-fit/addon-fit.js`, `LICENSE` | `web/vendor/addon-fit/` | `@xterm/addon-fit` 0.11.0 (MIT) |
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::front_main::FrontState;
use super::http::ApiError;

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// `(path under /static/, content type, bytes)`.
const FILES: &[(&str, &str, &[u8])] = &[
    ("app.js", JS, include_bytes!("../../web/app.js")),
    ("app.css", CSS, include_bytes!("../../web/app.css")),
    (
        "vendor/xterm/xterm.js",
        JS,
        include_bytes!("../../web/vendor/xterm/xterm.js"),
    ),
    (
        "vendor/xterm/xterm.css",
        CSS,
        include_bytes!("../../web/vendor/xterm/xterm.css"),
    ),
    (
        "vendor/xterm/LICENSE",
        TEXT,
        include_bytes!("../../web/vendor/xterm/LICENSE"),
    ),
    (
        "vendor/addon-fit/addon-fit.js",
        JS,
        include_bytes!("../../web/vendor/addon-fit/addon-fit.js"),
    ),
    (
        "vendor/addon-fit/LICENSE",
        TEXT,
        include_bytes!("../../web/vendor/addon-fit/LICENSE"),
    ),
];

const INDEX_HTML: &[u8] = include_bytes!("../../web/index.html");

/// The built-in file at `path` (under `/static/`), if there is one.
pub fn file(path: &str) -> Option<(&'static str, &'static [u8])> {
    FILES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, kind, bytes)| (*kind, *bytes))
}

fn respond(kind: &'static str, bytes: &'static [u8]) -> Response {
    // Revalidated on every load: a new binary's page must not run against an old script.
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response()
}

async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX_HTML)
}

async fn static_file(Path(path): Path<String>) -> Response {
    match file(&path) {
        Some((kind, bytes)) => respond(kind, bytes),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the built-in web page has no file /static/{path}"),
        )
        .into_response(),
    }
}

/// `GET /` and `GET /static/<path>` from the files above.
pub fn routes() -> Router<Arc<FrontState>> {
    Router::new()
        .route("/", get(index))
        .route("/static/{*path}", get(static_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every script and style the page names is built in, and nothing else is served.
    #[test]
    fn the_page_loads_only_built_in_files() {
        let html = std::str::from_utf8(INDEX_HTML).unwrap();
        let mut named = 0;
        for part in html.split("\"/static/").skip(1) {
            let path = &part[..part.find('"').unwrap()];
            assert!(
                file(path).is_some(),
                "index.html loads /static/{path}, which is not built in"
            );
            named += 1;
        }
        assert!(named >= 5, "index.html names {named} static files");
        assert!(file("../Cargo.toml").is_none());
        assert!(file("vendor/xterm").is_none());
        assert!(file("").is_none());
    }

    /// The vendored files are exactly the pinned releases' (`web/vendor/README.md`).
    #[test]
    fn vendored_xterm_is_the_pinned_release() {
        use sha2::{Digest, Sha256};
        for (path, sha256) in [
            (
                "vendor/xterm/xterm.js",
                "14903579ff54664cd72f8e8699e6961a6272c21863ec1c3b118cdc8af5d4a972",
            ),
            (
                "vendor/xterm/xterm.css",
                "854a7c0fb70e8b1a083c16797ab827299fb18744f5ad34f227b48337e33293c6",
            ),
            (
                "vendor/addon-fit/addon-fit.js",
                "ba3ea256ce0620a0992a197d6c9baea64823fc93d8da07a9e366ca9943c18527",
            ),
        ] {
            let digest = Sha256::digest(file(path).unwrap().1);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, sha256, "{path} is not the pinned release's file");
        }
        for licence in ["vendor/xterm/LICENSE", "vendor/addon-fit/LICENSE"] {
            let text = std::str::from_utf8(file(licence).unwrap().1).unwrap();
            assert!(
                text.contains("Permission is hereby granted"),
                "{licence} is not MIT's text"
            );
        }
    }
}
