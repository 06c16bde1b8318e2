//! Route phase: the route the normalised host, path and method select, or 404; a regex
//! route's captures are kept in the context for its templates.

use crate::{
    http::request::RequestHead,
    proxy::{answer::Answer, context::RequestContext, snapshot::ConfigSnapshot},
    routing::Route,
};

pub fn find<'s>(
    snapshot: &'s ConfigSnapshot,
    req: &RequestHead,
    ctx: &mut RequestContext,
) -> Result<&'s Route, Answer> {
    let route = snapshot
        .routes
        .find(req.route_host, req.path, req.method.as_bytes())
        .ok_or(Answer::error(404, "no route matches this request"))?;
    ctx.route = Some(route.index);
    if let Some(regex) = route.path_regex() {
        // The spans templates name; the path matched, so it has them.
        regex.captures(req.path, &mut ctx.captures);
    }
    Ok(route)
}
