//! Body limit phase: a declared request body over the route's limit is refused before any of
//! it is read; the relay enforces the same limit on chunked bodies as they arrive.

use crate::{
    http::{request::RequestHead, BodyFraming},
    proxy::{answer::Answer, context::RequestContext},
    routing::Route,
};

pub fn check(route: &Route, req: &RequestHead, ctx: &mut RequestContext) -> Result<(), Answer> {
    ctx.facts.max_body_bytes = route.max_body_bytes;
    match (route.max_body_bytes, req.body) {
        (Some(limit), BodyFraming::Length(n)) if n > limit => Err(Answer::error_and_close(
            413,
            "request body exceeds the route's limit",
        )),
        _ => Ok(()),
    }
}
