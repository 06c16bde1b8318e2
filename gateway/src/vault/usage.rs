//! Token usage read from a provider's response as it streams past, without buffering it: the
//! bytes are scanned for each `"usage": {...}` object (a JSON body, or the events of a
//! server-sent stream), which alone is copied (at most [`MAX_USAGE_BYTES`]) and parsed.
//! Providers report usage cumulatively (Anthropic's `message_start` then `message_delta`s,
//! OpenAI's final chunk), so each figure is the last one reported, never a sum.

use serde::Deserialize;

/// Longest usage object captured; a longer one is not usage as any provider writes it.
pub const MAX_USAGE_BYTES: usize = 4096;
const KEY: &[u8] = b"\"usage\"";

/// Tokens of one exchange, as far as the provider said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens not read from the provider's cache.
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for `"usage"`; the number of its bytes matched so far.
    Key(usize),
    /// After the key, before `:`.
    Colon,
    /// After `:`, before the value.
    Value,
    /// Inside the object: nesting depth, in a string, after a backslash in a string.
    Object {
        depth: u32,
        string: bool,
        escaped: bool,
    },
}

#[derive(Deserialize, Default)]
struct Details {
    cached_tokens: Option<u64>,
}

/// The fields of OpenAI's (chat and responses APIs) and Anthropic's usage objects.
#[derive(Deserialize, Default)]
struct Reported {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

/// Scans one response.
#[derive(Debug)]
pub struct UsageMeter {
    state: State,
    previous: u8,
    captured: Vec<u8>,
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    /// OpenAI counts cached tokens inside its prompt tokens; Anthropic apart from its input
    /// tokens.
    input_includes_cache_read: bool,
    /// The whole response was read (though maybe not delivered): the usage is final.
    complete: bool,
}

impl Default for UsageMeter {
    fn default() -> Self {
        UsageMeter {
            state: State::Key(0),
            previous: 0,
            captured: Vec::new(),
            input: None,
            output: None,
            cache_read: None,
            cache_write: None,
            input_includes_cache_read: false,
            complete: false,
        }
    }
}

impl UsageMeter {
    /// Scans the next bytes of the response body (after transfer decoding).
    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            self.step(b);
            self.previous = b;
        }
    }

    fn step(&mut self, b: u8) {
        self.state = match self.state {
            State::Key(matched) => {
                if b == KEY[matched] && (matched > 0 || self.previous != b'\\') {
                    if matched + 1 == KEY.len() {
                        State::Colon
                    } else {
                        State::Key(matched + 1)
                    }
                } else if b == b'"' && self.previous != b'\\' {
                    State::Key(1)
                } else {
                    State::Key(0)
                }
            }
            State::Colon => match b {
                b':' => State::Value,
                b' ' | b'\t' | b'\r' | b'\n' => State::Colon,
                _ => State::Key(0),
            },
            State::Value => match b {
                b'{' => {
                    self.captured.clear();
                    self.captured.push(b);
                    State::Object {
                        depth: 1,
                        string: false,
                        escaped: false,
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' => State::Value,
                // `null` and anything else: not a usage object.
                _ => State::Key(0),
            },
            State::Object {
                depth,
                string,
                escaped,
            } => {
                if self.captured.len() >= MAX_USAGE_BYTES {
                    self.captured.clear();
                    return self.state = State::Key(0);
                }
                self.captured.push(b);
                if string {
                    State::Object {
                        depth,
                        string: b != b'"' || escaped,
                        escaped: b == b'\\' && !escaped,
                    }
                } else {
                    match b {
                        b'"' => State::Object {
                            depth,
                            string: true,
                            escaped: false,
                        },
                        b'{' => State::Object {
                            depth: depth + 1,
                            string,
                            escaped,
                        },
                        b'}' if depth == 1 => {
                            self.take_captured();
                            State::Key(0)
                        }
                        b'}' => State::Object {
                            depth: depth - 1,
                            string,
                            escaped,
                        },
                        _ => State::Object {
                            depth,
                            string,
                            escaped,
                        },
                    }
                }
            }
        };
    }

    fn take_captured(&mut self) {
        let Ok(r) = serde_json::from_slice::<Reported>(&self.captured) else {
            return;
        };
        // The last figure reported wins: usage is cumulative.
        let set = |slot: &mut Option<u64>, value: Option<u64>| {
            if value.is_some() {
                *slot = value;
            }
        };
        set(&mut self.input, r.prompt_tokens.or(r.input_tokens));
        set(&mut self.output, r.completion_tokens.or(r.output_tokens));
        let cached = r
            .prompt_tokens_details
            .or(r.input_tokens_details)
            .and_then(|d| d.cached_tokens);
        if cached.is_some() {
            self.input_includes_cache_read = true;
        }
        set(&mut self.cache_read, r.cache_read_input_tokens.or(cached));
        set(&mut self.cache_write, r.cache_creation_input_tokens);
    }

    /// Says the whole response was read.
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// Whether the whole response was read.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// What the response reported, if it reported any usage.
    pub fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let cache_read = self.cache_read.unwrap_or(0);
        let input = self.input.unwrap_or(0);
        Some(Usage {
            input: match self.input_includes_cache_read {
                true => input.saturating_sub(cache_read),
                false => input,
            },
            output: self.output.unwrap_or(0),
            cache_read,
            cache_write: self.cache_write.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(chunks: &[&str]) -> Option<Usage> {
        let mut m = UsageMeter::default();
        for c in chunks {
            m.feed(c.as_bytes());
        }
        m.usage()
    }

    #[test]
    fn openai_json_and_stream_usage() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {\"prompt_tokens\": 999}"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        // Split at every position: the scan does not depend on where chunks end.
        for cut in 0..body.len() {
            let u = meter(&[&body[..cut], &body[cut..]]).unwrap();
            assert_eq!(
                u,
                Usage {
                    input: 8,
                    output: 30,
                    cache_read: 4,
                    cache_write: 0
                },
                "cut at {cut}: OpenAI's 12 prompt tokens hold the 4 cached"
            );
        }
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        assert_eq!(
            meter(&[stream]),
            Some(Usage {
                input: 7,
                output: 3,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn anthropic_cumulative_usage_is_counted_once() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n";
        assert_eq!(
            meter(&[stream]),
            Some(Usage {
                input: 25,
                output: 40,
                cache_read: 10,
                cache_write: 0
            })
        );
    }

    #[test]
    fn no_usage_and_oversized_objects_report_nothing() {
        assert_eq!(meter(&["{\"choices\":[]}"]), None);
        let huge = format!(
            "{{\"usage\":{{\"x\":\"{}\"}}}}",
            "a".repeat(MAX_USAGE_BYTES)
        );
        assert_eq!(meter(&[&huge]), None);
    }
}
