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
    max_tokens: Option<f64>,
    max_completion_tokens: Option<f64>,
    max_output_tokens: Option<f64>,
    /// Choices asked for: each may use the whole output allowance.
    n: Option<f64>,
}

/// Why a body's output allowance cannot be read (the request is refused: it could not be
/// reserved for).
#[derive(Debug, PartialEq, Eq)]
pub struct UnreadableLimits;

/// The output tokens a request may use in all: the largest of `max_tokens`,
/// `max_completion_tokens` and the responses API's `max_output_tokens` (`default` when it
/// names none), times its `n` choices. An empty body allows `default`; a body that is not
/// a JSON object of these (a number written `64000.0` is read as 64000), or names a key
/// twice, is refused rather than guessed.
pub fn output_allowance(body: &[u8], default: u64) -> Result<u64, UnreadableLimits> {
    if body.is_empty() {
        return Ok(default);
    }
    let l: Limits = serde_json::from_slice(body).map_err(|_| UnreadableLimits)?;
    let tokens = |v: Option<f64>| {
        v.map(|t| {
            if t.is_finite() && t > 0.0 {
                t as u64
            } else {
                0
            }
        })
    };
    let allowance = [l.max_tokens, l.max_completion_tokens, l.max_output_tokens]
        .into_iter()
        .filter_map(tokens)
        .max()
        .unwrap_or(default);
    let choices = tokens(l.n).unwrap_or(1).max(1);
    Ok(allowance.saturating_mul(choices))
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
    fn output_allowances_take_the_largest_alias_times_the_choices() {
        assert_eq!(output_allowance(b"", 4096), Ok(4096));
        assert_eq!(output_allowance(br#"{"model": "m"}"#, 4096), Ok(4096));
        assert_eq!(
            output_allowance(br#"{"max_tokens": 10, "max_completion_tokens": 300}"#, 4096),
            Ok(300)
        );
        assert_eq!(
            output_allowance(br#"{"max_tokens": 64000.0, "n": 3}"#, 1),
            Ok(192_000)
        );
        assert_eq!(
            output_allowance(br#"{"max_tokens": 1, "max_tokens": 64000}"#, 1),
            Err(UnreadableLimits),
            "a key named twice is not guessed at"
        );
        assert_eq!(output_allowance(b"[1, 2]", 1), Err(UnreadableLimits));
    }

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
