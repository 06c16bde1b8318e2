//! OpenAI streams that carry usage only because the gateway asked: `stream_options.include_usage`
//! added to a streamed chat or text completion whose client did not ask for it (so the request
//! is billed at what it used, not at its reservation), and the one event it adds, with empty
//! `choices` and the `usage`, withheld from that client, which did not expect it.

use serde::{de::IgnoredAny, Deserialize};

/// An event this large is no usage event: sent on whole without waiting for its end.
const MAX_HELD_EVENT_BYTES: usize = 64 * 1024;
/// What the gateway adds right after a body's opening brace.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// The body to send instead of `body`, written to `out`, when `body` asks for a stream without
/// usage: `stream` true and no `stream_options.include_usage` true. Nothing (`false`) for any
/// other body, one that is not a JSON object, or one with a field named twice (what the
/// provider would read of it is unclear).
pub fn add_include_usage(body: &[u8], out: &mut Vec<u8>) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: Option<bool>,
        /// Present (even `null`) or not.
        #[serde(default, deserialize_with = "present")]
        stream_options: Option<serde_json::Value>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<serde_json::Value>, D::Error> {
        serde_json::Value::deserialize(d).map(Some)
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(body) else {
        return false;
    };
    if probe.stream != Some(true) {
        return false;
    }
    out.clear();
    match probe.stream_options {
        Some(serde_json::Value::Object(o))
            if o.get("include_usage") == Some(&serde_json::Value::Bool(true)) =>
        {
            false
        }
        None => {
            // Inserted as the first member: the rest of the body is sent as the client wrote it.
            // An object: serde reads an array into a struct too.
            let Some(open) = body
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .filter(|&i| body[i] == b'{')
            else {
                return false;
            };
            // (The object holds `stream`, so a member follows the one inserted.)
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(INCLUDE_USAGE);
            out.extend_from_slice(&body[open + 1..]);
            true
        }
        // `stream_options` without it, with it false, or null: rebuilt with it true.
        Some(_) => {
            let Ok(serde_json::Value::Object(mut value)) = serde_json::from_slice(body) else {
                return false;
            };
            let options = value
                .entry("stream_options")
                .or_insert(serde_json::Value::Null);
            if !options.is_object() {
                *options = serde_json::Value::Object(Default::default());
            }
            if let Some(o) = options.as_object_mut() {
                o.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
            serde_json::to_writer(&mut *out, &value).is_ok()
        }
    }
}

/// Withholds the usage event from a stream's client, events passing whole and in order.
#[derive(Debug, Default)]
pub struct UsageEventFilter {
    /// The start of an event whose end has not arrived yet.
    held: Vec<u8>,
    /// The event being held is too large to be the usage event: passed on as it comes.
    passing: bool,
}

impl UsageEventFilter {
    /// Takes the next bytes of the body (transfer coding removed) and appends what the client
    /// receives of them to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.passing {
                // Until the end of the oversized event.
                match event_end(&self.held, data) {
                    Some(end) => {
                        out.extend_from_slice(&data[..end]);
                        data = &data[end..];
                        self.passing = false;
                        self.held.clear();
                    }
                    None => {
                        out.extend_from_slice(data);
                        self.keep_tail(data);
                        return;
                    }
                }
                continue;
            }
            match event_end(&self.held, data) {
                Some(end) => {
                    self.held.extend_from_slice(&data[..end]);
                    data = &data[end..];
                    if !is_usage_event(&self.held) {
                        out.extend_from_slice(&self.held);
                    }
                    self.held.clear();
                }
                None => {
                    self.held.extend_from_slice(data);
                    if self.held.len() > MAX_HELD_EVENT_BYTES {
                        out.extend_from_slice(&self.held);
                        self.passing = true;
                        let tail = self.held.len().saturating_sub(3);
                        self.held.drain(..tail);
                    }
                    return;
                }
            }
        }
    }

    /// The body ended: what is still held goes to the client.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.passing {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
        self.passing = false;
    }

    /// Keeps the last bytes seen (up to 3) so an event end split across reads is found.
    fn keep_tail(&mut self, data: &[u8]) {
        self.held.extend_from_slice(data);
        let tail = self.held.len().saturating_sub(3);
        self.held.drain(..tail);
    }
}

/// Where in `data` the current event ends (just past its blank line), given the `held` bytes
/// before it: `\n\n` or `\r\n\r\n`.
fn event_end(held: &[u8], data: &[u8]) -> Option<usize> {
    // The last bytes of `held` may begin the blank line.
    let carried = &held[held.len().saturating_sub(3)..];
    let at = |i: isize| -> Option<u8> {
        if i < 0 {
            carried
                .len()
                .checked_sub(i.unsigned_abs())
                .map(|j| carried[j])
        } else {
            data.get(i as usize).copied()
        }
    };
    for (i, b) in data.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        let i = i as isize;
        if at(i - 1) == Some(b'\n') || (at(i - 1) == Some(b'\r') && at(i - 2) == Some(b'\n')) {
            return Some(i as usize + 1);
        }
    }
    None
}

/// Whether `event` is the usage event: one `data:` line holding a JSON object with empty
/// `choices` and a `usage` object.
fn is_usage_event(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        choices: Vec<IgnoredAny>,
        usage: Option<IgnoredAny>,
    }
    let mut data = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            if data.is_some() {
                return false;
            }
            data = Some(value);
        }
    }
    let Some(data) = data else { return false };
    matches!(
        serde_json::from_slice::<Probe>(data),
        Ok(Probe { choices, usage: Some(_) }) if choices.is_empty()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(body: &str) -> Option<serde_json::Value> {
        let mut out = Vec::new();
        add_include_usage(body.as_bytes(), &mut out).then(|| serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn include_usage_is_added_only_to_streams_without_it() {
        let v = added(r#" {"model": "m", "stream": true}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let v = added(r#"{"stream": true, "stream_options": {"include_usage": false}}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(added(r#"{"stream": true, "stream_options": {"include_usage": true}}"#).is_none());
        assert!(added(r#"{"model": "m"}"#).is_none(), "not a stream");
        assert!(added(r#"{"stream": false}"#).is_none());
        assert!(
            added(r#"{"stream": true, "stream": true}"#).is_none(),
            "a field twice"
        );
        assert!(added("[1]").is_none());
        assert!(added("[true]").is_none(), "an array is no request");
        let v = added(r#"{"stream": true, "stream_options": null}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    fn filtered(parts: &[&str]) -> String {
        let mut f = UsageEventFilter::default();
        let mut out = Vec::new();
        for p in parts {
            f.feed(p.as_bytes(), &mut out);
        }
        f.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_event_is_withheld_and_the_rest_passes_whole() {
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let done = "data: [DONE]\n\n";
        let stream = format!("{content}{usage}{done}");
        assert_eq!(filtered(&[&stream]), format!("{content}{done}"));
        // Split at every byte, and with CRLF line ends.
        let parts: Vec<String> = stream.chars().map(String::from).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert_eq!(filtered(&parts), format!("{content}{done}"));
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(
            filtered(&[&crlf]),
            format!("{content}{done}").replace('\n', "\r\n")
        );
        // An error body without events passes at the end.
        assert_eq!(filtered(&["{\"error\": {}}"]), "{\"error\": {}}");
        // An oversized event passes as it comes.
        let big = format!("data: {}\n\n", "x".repeat(MAX_HELD_EVENT_BYTES + 10));
        assert_eq!(filtered(&[&big[..1000], &big[1000..], usage]), big);
    }
}
