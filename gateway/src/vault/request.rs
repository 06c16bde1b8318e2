//! What the vault reads of a request to a provider: the model it asks for, from the JSON body
//! (borrowed from the read buffer when it has no escapes) or, for Azure, from the deployment
//! in the path.

use std::borrow::Cow;

use serde::Deserialize;

/// Largest body read whole to find its model (a long chat history with images as URLs fits;
/// base64 images beyond it are refused, 413).
pub const MAX_JUDGED_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Deserialize)]
struct Limits {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// The output tokens a request allows itself (`max_tokens`, `max_completion_tokens`, or the
/// responses API's `max_output_tokens`).
pub fn max_output_tokens(body: &[u8]) -> Option<u64> {
    let l: Limits = serde_json::from_slice(body).ok()?;
    l.max_completion_tokens
        .or(l.max_tokens)
        .or(l.max_output_tokens)
}

#[derive(Deserialize)]
struct Probe<'a> {
    // Not `Option<Cow>`: serde borrows only a bare `Cow` (no copy unless escaped).
    #[serde(borrow, default)]
    model: Cow<'a, str>,
}

/// The `model` of a JSON request body, if it has one.
pub fn model_of(body: &[u8]) -> Option<Cow<'_, str>> {
    let model = serde_json::from_slice::<Probe>(body).ok()?.model;
    (!model.is_empty()).then_some(model)
}

/// The deployment of an Azure OpenAI path (`/openai/deployments/NAME/...`).
pub fn azure_deployment(path: &[u8]) -> Option<&str> {
    let path = std::str::from_utf8(path).ok()?;
    let rest = &path[path.find("/deployments/")? + "/deployments/".len()..];
    let name = rest.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_read_from_bodies_and_azure_paths() {
        assert_eq!(
            model_of(
                br#"{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini"}"#
            )
            .as_deref(),
            Some("gpt-4o-mini")
        );
        assert!(matches!(
            model_of(br#"{"model": "plain"}"#),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(
            model_of(br#"{"model": "esc\u0061ped"}"#).as_deref(),
            Some("escaped")
        );
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(br#"{"messages": []}"#), None);
        assert_eq!(
            azure_deployment(b"/openai/deployments/gpt4-prod/chat/completions"),
            Some("gpt4-prod")
        );
        assert_eq!(azure_deployment(b"/openai/models"), None);
    }
}
