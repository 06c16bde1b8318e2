//! A strict, incremental decoder of the chunked transfer coding (RFC 9112 §7.1).
//!
//! It is sans-IO: feed it whatever bytes arrived and it says how many belong to the body, where
//! the chunk data lies inside them, and when the body ended. The gateway forwards the consumed
//! bytes verbatim once validated, so bytes after the body (a pipelined request) are never sent
//! upstream. Line ends must be CRLF; sizes are hex with overflow checks; extensions and
//! trailers are bounded.

use std::ops::Range;

/// Longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE_BYTES: usize = 1024;
/// Largest trailer section.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedError {
    /// The size line does not start with a hex digit or holds a byte it may not.
    InvalidSize,
    /// The size does not fit in 64 bits.
    SizeOverflow,
    /// The size line (with extensions) is longer than [`MAX_CHUNK_LINE_BYTES`].
    LineTooLong,
    /// A line ended in something other than CRLF, or chunk data was not followed by CRLF.
    InvalidLineEnd,
    /// A trailer field is malformed.
    InvalidTrailer,
    /// The trailer section is larger than [`MAX_TRAILER_BYTES`].
    TrailerTooLarge,
}

impl std::fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let s = match self {
            ChunkedError::InvalidSize => "invalid chunk size",
            ChunkedError::SizeOverflow => "chunk size overflows",
            ChunkedError::LineTooLong => "chunk size line too long",
            ChunkedError::InvalidLineEnd => "chunk line not ended by CRLF",
            ChunkedError::InvalidTrailer => "invalid trailer field",
            ChunkedError::TrailerTooLarge => "trailer section too large",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a size line.
    SizeStart,
    /// Inside the hex digits.
    Size,
    /// After the digits: whitespace, which only `;` may follow (BWS before an extension).
    SizeWhitespace,
    /// Inside chunk extensions, until CR.
    Extension,
    /// Saw CR at the end of a size line.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// After chunk data: expecting CR.
    DataCr,
    /// After chunk data: expecting LF.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// Saw CR at the end of a trailer line.
    TrailerLf,
    /// Saw CR of the final empty line.
    EndLf,
    Done,
}

/// Incremental chunked decoder.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of chunk data still expected in the current chunk.
    remaining: u64,
    /// Bytes of the current size line, for its bound.
    line_bytes: usize,
    trailer_bytes: usize,
    /// Total chunk data bytes seen.
    data_bytes: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one [`ChunkedDecoder::decode`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// How many input bytes belong to the chunked body.
    pub consumed: usize,
    /// True when the body (with its trailers) is complete.
    pub done: bool,
}

impl ChunkedDecoder {
    pub const fn new() -> Self {
        ChunkedDecoder {
            state: State::SizeStart,
            remaining: 0,
            line_bytes: 0,
            trailer_bytes: 0,
            data_bytes: 0,
        }
    }

    /// Total chunk data decoded so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes as much of `input` as belongs to the body. `on_data` is called with the range of
    /// each run of chunk data inside `input`.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<Progress, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take =
                    (input.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                on_data(i..i + take);
                i += take;
                self.remaining -= take as u64;
                self.data_bytes += take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
            if self.state == State::Done {
                return Ok(Progress {
                    consumed: i,
                    done: true,
                });
            }
        }
        Ok(Progress {
            consumed: i,
            done: self.state == State::Done,
        })
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkedError> {
        use State::*;
        match self.state {
            SizeStart | Size | SizeWhitespace | Extension => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_CHUNK_LINE_BYTES {
                    return Err(ChunkedError::LineTooLong);
                }
            }
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER_BYTES {
                    return Err(ChunkedError::TrailerTooLarge);
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (SizeStart | Size, _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).expect("checked hex digit") as u64;
                self.remaining = self
                    .remaining
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(digit))
                    .ok_or(ChunkedError::SizeOverflow)?;
                Size
            }
            (SizeStart, _) => return Err(ChunkedError::InvalidSize),
            (Size | SizeWhitespace, b' ' | b'\t') => SizeWhitespace,
            (Size | SizeWhitespace, b';') => Extension,
            (Size | Extension, b'\r') => SizeLf,
            (Size | SizeWhitespace, _) => return Err(ChunkedError::InvalidSize),
            // Extension bytes: visible characters, SP and HTAB; no other controls.
            (Extension, _) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => Extension,
            (Extension, _) => return Err(ChunkedError::InvalidSize),
            (SizeLf, b'\n') => {
                self.line_bytes = 0;
                if self.remaining == 0 {
                    TrailerStart
                } else {
                    Data
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataCr, _) => return Err(ChunkedError::InvalidLineEnd),
            (DataLf, b'\n') => SizeStart,
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart, b'\n') => return Err(ChunkedError::InvalidLineEnd),
            (EndLf, b'\n') => Done,
            // obs-fold (a line starting with whitespace) and empty names are refused.
            (TrailerStart, _) if super::is_token_byte(b) => TrailerName,
            (TrailerStart, _) => return Err(ChunkedError::InvalidTrailer),
            (TrailerName, b':') => TrailerValue,
            (TrailerName, _) if super::is_token_byte(b) => TrailerName,
            (TrailerName, _) => return Err(ChunkedError::InvalidTrailer),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => {
                TrailerValue
            }
            (TrailerValue, _) => return Err(ChunkedError::InvalidTrailer),
            (TrailerLf, b'\n') => TrailerStart,
            (SizeLf | DataLf | TrailerLf | EndLf, _) => return Err(ChunkedError::InvalidLineEnd),
            (Data | Done, _) => unreachable!("handled by decode()"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns (data, consumed) or the error.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut data = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(step) {
            let p = d.decode(piece, |r| data.extend_from_slice(&piece[r]))?;
            consumed += p.consumed;
            if p.done {
                return Ok((data, consumed, true));
            }
        }
        Ok((data, consumed, false))
    }

    #[test]
    fn decodes_whatever_the_split() {
        let body = b"5\r\nhello\r\n1 ;ext=\"v\"\r\n \r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n";
        for step in 1..body.len() {
            let (data, consumed, done) = decode_in_steps(body, step).unwrap();
            assert!(done);
            assert_eq!(data, b"hello ");
            assert_eq!(&body[consumed..], b"GET / HTTP/1.1\r\n", "step {step}");
        }
    }

    #[test]
    fn refuses_malformed_framing() {
        let cases: &[(&[u8], ChunkedError)] = &[
            (b"x\r\n", ChunkedError::InvalidSize),
            (b"-1\r\n", ChunkedError::InvalidSize),
            (b" 5\r\n", ChunkedError::InvalidSize),
            (b"0x5\r\n", ChunkedError::InvalidSize),
            (b"5\n", ChunkedError::InvalidSize),
            (b"5\rX", ChunkedError::InvalidLineEnd),
            (b"1\r\naXX", ChunkedError::InvalidLineEnd),
            (b"1\r\na\n", ChunkedError::InvalidLineEnd),
            (b"10000000000000000\r\n", ChunkedError::SizeOverflow),
            (b"1;a\x00b\r\n", ChunkedError::InvalidSize),
            (b"0\r\n X: 1\r\n\r\n", ChunkedError::InvalidTrailer),
            (b"0\r\n: 1\r\n\r\n", ChunkedError::InvalidTrailer),
            (b"0\r\nX : 1\r\n\r\n", ChunkedError::InvalidTrailer),
            (b"0\r\nX: a\x01\r\n\r\n", ChunkedError::InvalidTrailer),
            (b"0\r\n\n", ChunkedError::InvalidLineEnd),
            (b"5 \r\nhello\r\n", ChunkedError::InvalidSize),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_in_steps(input, 64).unwrap_err(),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn bounds_lines_and_trailers() {
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_LINE_BYTES + 10, b'a');
        assert_eq!(
            decode_in_steps(&long, 100).unwrap_err(),
            ChunkedError::LineTooLong
        );
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILER_BYTES + 100 {
            trailers.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(
            decode_in_steps(&trailers, 1000).unwrap_err(),
            ChunkedError::TrailerTooLarge
        );
        // Leading zeros are bounded by the line limit, not refused.
        assert!(
            decode_in_steps(b"0000000000000000000001\r\na\r\n0\r\n\r\n", 7)
                .unwrap()
                .2
        );
    }
}
