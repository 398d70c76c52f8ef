//! The web page: files of the web directory (and its `pkg/`, the wasm package) by URL path.
//! Only plain path segments are accepted, so a request cannot leave the directory.

use super::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;
use std::sync::Arc;

fn content_type(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The file a URL path names inside `root`, or None for anything but plain segments.
pub fn resolve(root: &std::path::Path, url_path: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for seg in url_path.split('/').filter(|s| !s.is_empty()) {
        let plain = seg.len() <= 255
            && !seg.starts_with('.')
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !plain {
            return None;
        }
        out.push(seg);
    }
    if out.is_dir() {
        out.push("index.html");
    }
    Some(out)
}

pub async fn serve(State(st): State<Arc<AppState>>, method: Method, uri: Uri) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") || path == "/api" {
        return super::api::not_found().await.into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Some(root) = &st.web_dir else {
        return (
            StatusCode::NOT_FOUND,
            "no web directory (use --web-dir DIR)",
        )
            .into_response();
    };
    let Some(file_path) = resolve(root, path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(file) = tokio::fs::File::open(&file_path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let headers = [
        (header::CONTENT_TYPE, content_type(&file_path).to_string()),
        (header::CONTENT_LENGTH, len.to_string()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
    ];
    if method == Method::HEAD {
        return (headers, Body::empty()).into_response();
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
    (headers, body).into_response()
}
