//! Choose-upstream phase: which server of the route's upstream group gets the request.

use crate::{proxy::context::RequestContext, upstream::UpstreamGroup};

/// Picks a server of `group` (group number `group_index`) and records it in the context.
pub fn pick(group: &UpstreamGroup, group_index: usize, ctx: &mut RequestContext) -> usize {
    let server = group.pick();
    ctx.upstream = Some((group_index, server));
    server
}
