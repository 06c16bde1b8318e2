//! Request head phase: the head sent upstream, rebuilt from the client's with the route's path
//! rewrite, the caller's identity fields and X-Forwarded-* (see [`crate::proxy::upstream_head`]
//! for the rules), written once into the connection's head buffer for the chosen server.

use std::net::IpAddr;

use tracing::{debug, error};

use crate::{
    auth::CredentialSource,
    http::request::RequestHead,
    proxy::{
        answer::Answer,
        context::{Caller, RequestContext},
        snapshot::ConfigSnapshot,
        upstream_head::{
            write_upstream_request, Identity, ProviderAuth, UpstreamHeadError, UpstreamHost,
        },
    },
    routing::Route,
};

/// Writes the upstream head for `req` to `out` for `server` of `group` (its Host value).
#[allow(clippy::too_many_arguments)]
pub fn write_for_server(
    snapshot: &ConfigSnapshot,
    route: &Route,
    req: &RequestHead,
    peer: IpAddr,
    ctx: &RequestContext,
    strip: Option<CredentialSource>,
    group: &crate::upstream::UpstreamGroup,
    server: usize,
    out: &mut Vec<u8>,
) -> Result<u64, Answer> {
    let (value, fixed) = group.host_value(server);
    write(
        snapshot,
        route,
        req,
        peer,
        ctx,
        strip,
        UpstreamHost { value, fixed },
        out,
    )
}

/// Writes the upstream head for `req` to `out`; `host` is the chosen server's Host value.
/// Returns how many rendered rule values were dropped (they held CR, LF or NUL).
#[allow(clippy::too_many_arguments)]
pub fn write(
    snapshot: &ConfigSnapshot,
    route: &Route,
    req: &RequestHead,
    peer: IpAddr,
    ctx: &RequestContext,
    strip: Option<CredentialSource>,
    host: UpstreamHost,
    out: &mut Vec<u8>,
) -> Result<u64, Answer> {
    let mut identity = Identity {
        replaced_body_length: ctx.replaced_body().map(|(_, body)| body.len()),
        replaced: &snapshot.issuers.claim_header_names,
        strip,
        identity_headers: &snapshot.identity_headers,
        // Nor is a provider told the client certificate's subject.
        client_cert: ctx
            .client_cert
            .as_ref()
            .filter(|_| route.vault.is_none())
            .map(|c| (&*c.header, c.identity.header_value.as_str())),
        ..Identity::default()
    };
    match &ctx.caller {
        // A provider is not told who inside the organisation called.
        Some(Caller::Virtual(v)) => {
            let (header, prefix) = crate::vault::provider::upstream_credential(v.kind);
            let anthropic_version = route
                .vault
                .as_ref()
                .and_then(|p| snapshot.config.vault.as_ref()?.providers.get(p))
                .filter(|p| p.kind == crate::config::ProviderKind::Anthropic)
                .map(|p| p.anthropic_version.as_str());
            identity.provider = Some(ProviderAuth {
                header,
                prefix,
                secret: v.provider_key.expose(),
                anthropic_version,
            });
        }
        Some(caller) => {
            identity.consumer = Some(caller.identity(snapshot));
            if let Caller::Token(token) = caller {
                identity.claim_headers = &token.claim_headers;
            }
        }
        None => {}
    }
    out.clear();
    let render = ctx.render_context(snapshot, &route.id, req, peer);
    let written = write_upstream_request(
        out,
        req,
        route,
        &identity,
        &snapshot.config.auth,
        peer,
        if ctx.https { "https" } else { "http" },
        host,
        &ctx.correlation.upstream_fields,
        &render,
    );
    let dropped = match written {
        Ok(dropped) => dropped,
        Err(UpstreamHeadError::Field(e)) => {
            // A bug upstream of the encoder, never the client's doing: say which field.
            error!(route = %route.id, field = e.field, "{e}");
            return Err(Answer::error(
                500,
                "the gateway could not build the upstream request",
            ));
        }
        Err(UpstreamHeadError::Path(e)) => {
            debug!(route = %route.id, "{e}");
            return Err(Answer::error(
                400,
                "the route's rewrite of this request would make an unsafe path",
            ));
        }
    };
    // A body the gateway rewrote leaves with the head, in one write.
    if let Some((_, body)) = ctx.replaced_body() {
        out.extend_from_slice(body);
    }
    Ok(dropped)
}
