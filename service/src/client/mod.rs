//! What every HTTP client of the API in this binary shares (the runner's
//! `ApiClient` and the `sessions` command line): the TLS provider, the base
//! URL and bearer token on every request, `Link: rel="next"` paging and the
//! problem document of an error answer.

use reqwest::header;

use crate::contract::Problem;

/// reqwest is built without a TLS provider; install ring's once.
pub fn install_tls_provider() {
    // Already installed (by an earlier call or another component) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The `rel="next"` target of a `Link` header, if any.
pub fn link_next(headers: &header::HeaderMap) -> Option<String> {
    let raw = headers.get(header::LINK)?.to_str().ok()?;
    raw.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim();
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

/// The problem document of an error answer's body; `None` when the body is
/// not one (a proxy's page, an empty body).
pub fn problem_of(body: &[u8]) -> Option<Problem> {
    serde_json::from_slice(body).ok()
}

/// One API service: a base URL and the token sent with every request.
#[derive(Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .finish()
    }
}

impl Endpoint {
    /// `http` should come from a builder this module's TLS provider serves
    /// (call [`install_tls_provider`] first).
    pub fn new(http: reqwest::Client, base: &str, token: Option<String>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// An absolute URL as is (a `Link` target may be one); a path under the base.
    pub fn url(&self, path_and_query: &str) -> String {
        if path_and_query.starts_with("http://") || path_and_query.starts_with("https://") {
            path_and_query.to_owned()
        } else {
            format!("{}{}", self.base, path_and_query)
        }
    }

    /// A request to `path` with the bearer token, if any.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_next_link() {
        let mut h = header::HeaderMap::new();
        h.insert(
            header::LINK,
            header::HeaderValue::from_static(
                "</sessions/?cursor=abc&limit=2>; rel=\"next\", </x>; rel=\"prev\"",
            ),
        );
        assert_eq!(
            link_next(&h).as_deref(),
            Some("/sessions/?cursor=abc&limit=2")
        );
        h.insert(
            header::LINK,
            header::HeaderValue::from_static("</x>; rel=\"prev\""),
        );
        assert_eq!(link_next(&h), None);
    }
}
