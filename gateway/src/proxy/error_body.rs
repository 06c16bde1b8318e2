//! The JSON form of the gateway's own answers (`error_format = "json"`):
//! `{"status":404,"code":"not_found","message":"...","request_id":"..."}`, rendered into the
//! connection's answer buffer (kept from one answer to the next).

use serde::Serialize;

#[derive(Serialize)]
struct ErrorDocument<'a> {
    status: u16,
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// A machine-readable code for `status`: its reason phrase in snake case (`too_many_requests`).
fn write_code(status: u16, code: &mut [u8; 48]) -> &str {
    let reason = crate::http::encode::reason(status);
    let mut n = 0;
    for b in reason.bytes().take(code.len()) {
        code[n] = match b {
            b' ' | b'-' => b'_',
            b => b.to_ascii_lowercase(),
        };
        n += 1;
    }
    std::str::from_utf8(&code[..n]).unwrap_or("error")
}

/// Renders the JSON answer into `out` (cleared first).
pub fn render(out: &mut Vec<u8>, status: u16, message: &str, request_id: &[u8]) {
    out.clear();
    let mut code = [0u8; 48];
    let doc = ErrorDocument {
        status,
        code: write_code(status, &mut code),
        message,
        // The request id is the gateway's hex or a client id it checked as plain text.
        request_id: std::str::from_utf8(request_id).unwrap_or(""),
    };
    let _ = serde_json::to_writer(&mut *out, &doc);
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_status_code_message_and_id() {
        let mut out = Vec::new();
        super::render(&mut out, 429, "rate \"limit\" exceeded", b"0a1b");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"status":429,"code":"too_many_requests","message":"rate \"limit\" exceeded","request_id":"0a1b"}"#
        );
    }
}
