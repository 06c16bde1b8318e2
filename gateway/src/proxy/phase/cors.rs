//! CORS phase: a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//! matched to the route of the method it asks for and answered here, before authentication,
//! without reaching the upstream; every other request of a CORS route gets the route's CORS
//! fields on whatever answers it (see [`crate::cors`]).

use crate::{
    cors::Preflight,
    http::request::RequestHead,
    proxy::{answer::Answer, context::RequestContext, snapshot::ConfigSnapshot},
};

fn field<'b>(req: &RequestHead<'b, '_>, name: &str) -> Option<&'b [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Answers a preflight for a route with a CORS policy: 204 with the allow fields, or 403.
/// A preflight for a route without one goes on as an ordinary `OPTIONS` request.
pub fn preflight(
    snapshot: &ConfigSnapshot,
    req: &RequestHead,
    ctx: &mut RequestContext,
) -> Result<(), Answer> {
    if req.method != "OPTIONS" {
        return Ok(());
    }
    let (Some(origin), Some(method)) = (
        field(req, "origin"),
        field(req, "access-control-request-method"),
    ) else {
        return Ok(());
    };
    let Some(route) = snapshot
        .routes
        .find(req.route_host, req.path, method.trim_ascii())
    else {
        return Ok(());
    };
    let Some(policy) = &route.cors else {
        return Ok(());
    };
    ctx.route = Some(route.index);
    let requested = field(req, "access-control-request-headers").unwrap_or(b"");
    match policy.judge_preflight(origin, method.trim_ascii(), requested) {
        Preflight::Allowed => {
            policy.write_preflight_fields(origin, requested, &mut ctx.correlation.response_fields);
            Err(Answer::Preflight)
        }
        Preflight::Refused => {
            ctx.correlation
                .response_fields
                .extend_from_slice(b"vary: origin\r\n");
            Err(Answer::error(
                403,
                "CORS preflight refused: origin, method or fields not allowed",
            ))
        }
    }
}

/// Adds the route's CORS fields to every answer of a request from an `Origin`.
pub fn add_fields(route: &crate::routing::Route, req: &RequestHead, ctx: &mut RequestContext) {
    let Some(policy) = &route.cors else {
        return;
    };
    if ctx.cors_fields_added {
        return;
    }
    ctx.cors_fields_added = true;
    policy.write_response_fields(field(req, "origin"), &mut ctx.correlation.response_fields);
}
