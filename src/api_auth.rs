//! Who may do what on the HTTP API: the token a request carries gives it a
//! role, and the role decides whether the request may go on.
//!
//! Two tokens live in `node.toml`: `api.token`, the operator's, allows
//! everything; `api.read_token` allows what only reads (GET and HEAD). A
//! token travels in the `Authorization: Bearer` header; in the URL
//! (`access_token=`) it is accepted only on the event stream, because a
//! browser's `EventSource` cannot set headers and a URL ends up in logs and
//! histories. The decision is plain code over plain data ([`authorize`]),
//! tested without a server.

use crate::error::ApiError;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// GET and HEAD requests.
    ReadOnly,
    /// Every request.
    Operator,
}

/// The tokens a node accepts.
#[derive(Clone)]
pub struct Tokens {
    pub operator: String,
    pub read_only: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

/// The one path where a token in the URL is accepted.
pub const EVENT_STREAM: &str = "/api/events";

/// Whether `path` needs a token at all: the API (but its OpenAPI document)
/// and the metrics; the dashboard page itself is public.
pub fn needs_token(path: &str) -> bool {
    (path.starts_with("/api/") && path != "/api/openapi.json") || path == "/metrics"
}

/// Whether `method` only reads.
pub fn is_read(method: &str) -> bool {
    method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD")
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from
/// response times.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `access_token` of a query string, if any.
pub fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "access_token").then_some(v)
    })
}

/// Decides a request: `Ok(None)` when it needs no token, `Ok(Some(role))`
/// when its token allows it, else the 401 or 403 to answer. `bearer` is the
/// `Authorization: Bearer` token, `in_url` the `access_token` parameter.
pub fn authorize(
    tokens: &Tokens,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    in_url: Option<&str>,
) -> Result<Option<Role>, ApiError> {
    if !needs_token(path) {
        return Ok(None);
    }
    let presented = match (bearer, in_url) {
        (Some(t), _) => t.trim(),
        (None, Some(t)) if path == EVENT_STREAM => t,
        (None, Some(_)) => {
            return Err(ApiError::new(
                401,
                "unauthorized",
                format!(
                    "a token in the URL (access_token) is accepted only on {EVENT_STREAM}; \
                     send it as Authorization: Bearer <token>"
                ),
            ))
        }
        (None, None) => {
            return Err(ApiError::new(
                401,
                "unauthorized",
                "this API needs a token: Authorization: Bearer <token> \
                 (api.token, or api.read_token to read only, in the node's configuration)",
            ))
        }
    };
    let role = if same(presented.as_bytes(), tokens.operator.as_bytes()) {
        Role::Operator
    } else if tokens
        .read_only
        .as_deref()
        .is_some_and(|r| same(presented.as_bytes(), r.as_bytes()))
    {
        Role::ReadOnly
    } else {
        return Err(ApiError::new(
            401,
            "unauthorized",
            "the token is not one of this cluster's API tokens",
        ));
    };
    if role == Role::ReadOnly && !is_read(method) {
        return Err(ApiError::new(
            403,
            "forbidden",
            format!(
                "the read-only token cannot {} {path}: writes need the operator token (api.token)",
                method.to_ascii_uppercase()
            ),
        ));
    }
    Ok(Some(role))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            operator: "operator-token-0001".into(),
            read_only: Some("reader-token-00001".into()),
        }
    }

    fn code(r: Result<Option<Role>, ApiError>) -> Result<Option<Role>, (u16, String)> {
        r.map_err(|e| (e.status, e.code))
    }

    #[test]
    fn roles_follow_the_token_and_the_method() {
        let t = tokens();
        let op = Some("operator-token-0001");
        let ro = Some("reader-token-00001");
        assert_eq!(
            code(authorize(&t, "GET", "/api/vms", op, None)),
            Ok(Some(Role::Operator))
        );
        assert_eq!(
            code(authorize(&t, "POST", "/api/vms", op, None)),
            Ok(Some(Role::Operator))
        );
        assert_eq!(
            code(authorize(&t, "GET", "/api/vms", ro, None)),
            Ok(Some(Role::ReadOnly))
        );
        assert_eq!(
            code(authorize(&t, "GET", "/metrics", ro, None)),
            Ok(Some(Role::ReadOnly))
        );
        for method in ["POST", "PATCH", "PUT", "DELETE"] {
            assert_eq!(
                code(authorize(&t, method, "/api/vms/a", ro, None)),
                Err((403, "forbidden".into())),
                "{method}"
            );
        }
        assert_eq!(
            code(authorize(
                &t,
                "GET",
                "/api/vms",
                Some("operator-token-0002"),
                None
            )),
            Err((401, "unauthorized".into()))
        );
        assert_eq!(
            code(authorize(&t, "GET", "/api/vms", None, None)),
            Err((401, "unauthorized".into()))
        );
        // No read-only token configured: only the operator's works.
        let only_op = Tokens {
            read_only: None,
            ..t.clone()
        };
        assert_eq!(
            code(authorize(&only_op, "GET", "/api/vms", ro, None)),
            Err((401, "unauthorized".into()))
        );
        // The public pages need nothing.
        assert_eq!(code(authorize(&t, "GET", "/", None, None)), Ok(None));
        assert_eq!(
            code(authorize(&t, "GET", "/api/openapi.json", None, None)),
            Ok(None)
        );
    }

    #[test]
    fn a_token_in_the_url_counts_only_on_the_event_stream() {
        let t = tokens();
        assert_eq!(
            code(authorize(
                &t,
                "GET",
                EVENT_STREAM,
                None,
                Some("reader-token-00001")
            )),
            Ok(Some(Role::ReadOnly))
        );
        assert_eq!(
            code(authorize(
                &t,
                "GET",
                "/api/vms",
                None,
                Some("operator-token-0001")
            )),
            Err((401, "unauthorized".into()))
        );
        assert_eq!(query_token("migration=3&access_token=abc"), Some("abc"));
        assert_eq!(query_token("migration=3"), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
