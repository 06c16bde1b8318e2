//! Body limit phase: a declared request body over the route's limit is refused before any of
//! it is read; the relay enforces the same limit on chunked bodies as they arrive. A JSON body
//! the route's `request_json` rules rewrite must declare its length within their bound.

use crate::{
    http::{request::RequestHead, BodyFraming},
    proxy::{answer::Answer, context::RequestContext},
    routing::Route,
};

/// Whether the route's JSON rules rewrite this request's body: it has one, declared JSON.
pub fn rewrites_json(route: &Route, req: &RequestHead) -> bool {
    route.request_json.is_some()
        && req.has_body()
        && field(req, "content-type").is_some_and(crate::transform::json_body::is_json_media_type)
}

fn field<'r>(req: &RequestHead<'r, '_>, name: &str) -> Option<&'r [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.trim_ascii())
}

pub fn check(route: &Route, req: &RequestHead, ctx: &mut RequestContext) -> Result<(), Answer> {
    ctx.facts.max_body_bytes = route.max_body_bytes;
    match (route.max_body_bytes, req.body) {
        (Some(limit), BodyFraming::Length(n)) if n > limit => {
            return Err(Answer::error_and_close(
                413,
                "request body exceeds the route's limit",
            ))
        }
        _ => {}
    }
    if let (Some(rules), true) = (&route.request_json, rewrites_json(route, req)) {
        // An encoded JSON body cannot be rewritten, and passing it on would let a client skip
        // the rules by naming any coding.
        if field(req, "content-encoding")
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case(b"identity"))
        {
            return Err(Answer::error_and_close(
                415,
                "this route rewrites JSON request bodies: send them without a Content-Encoding",
            ));
        }
        match req.body {
            BodyFraming::Length(n) if n > rules.max_bytes as u64 => {
                return Err(Answer::error_and_close(
                    413,
                    "JSON request body exceeds the route's request_json.max_bytes",
                ))
            }
            BodyFraming::Length(_) => {}
            // The body is rewritten whole, and its new length leads it: it must be known.
            _ => {
                return Err(Answer::error_and_close(
                    411,
                    "a JSON body this route rewrites needs a Content-Length",
                ))
            }
        }
    }
    Ok(())
}
