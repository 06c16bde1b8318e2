//! Request head phase: the head sent upstream, rebuilt from the client's with the route's path
//! rewrite, the caller's identity fields and X-Forwarded-* (see [`crate::proxy::upstream_head`]
//! for the rules), written once into the connection's head buffer for the chosen server.

use std::net::IpAddr;

use tracing::error;

use crate::{
    auth::CredentialSource,
    http::request::RequestHead,
    proxy::{
        answer::Answer,
        context::{Caller, RequestContext},
        snapshot::ConfigSnapshot,
        upstream_head::{write_upstream_request, Identity, ProviderAuth, UpstreamHost},
    },
    routing::Route,
};

/// Writes the upstream head for `req` to `out`; `host` is the chosen server's Host value.
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
) -> Result<(), Answer> {
    let mut identity = Identity {
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
                body_length: ctx
                    .vault
                    .as_ref()
                    .and_then(|r| r.upstream_body.as_ref())
                    .map(|(_, body)| body.len()),
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
    write_upstream_request(
        out,
        req,
        route,
        &identity,
        &snapshot.config.auth,
        peer,
        if ctx.https { "https" } else { "http" },
        host,
        &ctx.correlation.upstream_fields,
    )
    .map_err(|e| {
        // A bug upstream of the encoder, never the client's doing: say which field.
        error!(route = %route.id, field = e.field, "{e}");
        Answer::error(500, "the gateway could not build the upstream request")
    })?;
    // A body the gateway rewrote leaves with the head, in one write.
    if let Some((_, body)) = ctx.vault.as_ref().and_then(|r| r.upstream_body.as_ref()) {
        out.extend_from_slice(body);
    }
    Ok(())
}
