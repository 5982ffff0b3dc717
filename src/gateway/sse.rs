//! Server-sent events as the Messages API uses them: an incremental, bounded parser for
//! upstream bytes and the writer for the events the gateway sends.
//!
//! Hand-written rather than a crate because the gateway needs two things the common SSE
//! crates lack: a hard bound on buffered bytes (a stream that never ends an event must not
//! grow memory without limit) and the original `data` text of each event, so events that
//! pass through are re-sent byte for byte. Lines end with `\n` or `\r\n` (a lone `\r`,
//! legal but unused by the API, is not supported).

use axum::body::Bytes;

/// One event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The event as it goes on the wire.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = String::with_capacity(self.data.len() + 32);
        if let Some(name) = &self.event {
            out.push_str("event: ");
            out.push_str(name);
            out.push('\n');
        }
        for line in self.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        Bytes::from(out)
    }
}

/// An event built by the gateway: `event: <type>` and the JSON as data.
pub fn event(data: &serde_json::Value) -> Bytes {
    let name = data["type"].as_str().unwrap_or("message").to_string();
    SseEvent {
        event: Some(name),
        data: data.to_string(),
    }
    .to_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an upstream event is larger than {0} bytes")]
    TooLarge(usize),
    #[error("upstream event data is not UTF-8")]
    NotUtf8,
}

/// Incremental parser: feed it chunks as they arrive, take complete events out.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the line not yet ended.
    partial: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    max_event_bytes: usize,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            partial: Vec::new(),
            event: None,
            data: None,
            max_event_bytes,
        }
    }

    /// Parses a chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            let line = if self.partial.is_empty() {
                self.line(line)?
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined)?
            };
            if let Some(event) = line {
                events.push(event);
            }
        }
        self.partial.extend_from_slice(rest);
        if self.buffered() > self.max_event_bytes {
            return Err(SseError::TooLarge(self.max_event_bytes));
        }
        Ok(events)
    }

    /// Bytes held for the event being read.
    fn buffered(&self) -> usize {
        self.partial.len()
            + self.data.as_ref().map_or(0, String::len)
            + self.event.as_ref().map_or(0, String::len)
    }

    /// Handles one line (without its `\n`); a blank line completes an event.
    fn line(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok(self.data.take().map(|data| SseEvent {
                event: self.event.take(),
                data,
            }));
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            // Comments (empty field name), `id`, `retry` and unknown fields carry nothing
            // the gateway uses.
            _ => {}
        }
        if self.buffered() > self.max_event_bytes {
            return Err(SseError::TooLarge(self.max_event_bytes));
        }
        Ok(None)
    }

    /// Whether bytes of an unfinished event are buffered (an upstream that closes here
    /// cut an event short).
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty() || self.data.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new(1 << 16);
        chunks
            .iter()
            .flat_map(|c| p.push(c).unwrap())
            .collect::<Vec<_>>()
    }

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let wire = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n: comment\nevent: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\ndata: a\ndata: b\n\n";
        let whole = parse_all(&[wire]);
        assert_eq!(
            whole,
            vec![
                SseEvent {
                    event: Some("message_start".into()),
                    data: "{\"type\":\"message_start\"}".into()
                },
                SseEvent {
                    event: Some("ping".into()),
                    data: "{\"type\": \"ping\"}".into()
                },
                SseEvent {
                    event: None,
                    data: "a\nb".into()
                },
            ]
        );
        for cut in 1..wire.len() {
            let (a, b) = wire.split_at(cut);
            assert_eq!(parse_all(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[test]
    fn multibyte_text_split_inside_a_character() {
        let wire = "event: content_block_delta\ndata: {\"text\":\"炸弹不行\"}\n\n".as_bytes();
        for cut in 1..wire.len() {
            let (a, b) = wire.split_at(cut);
            let events = parse_all(&[a, b]);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].data, "{\"text\":\"炸弹不行\"}");
        }
    }

    #[test]
    fn written_events_parse_back() {
        let e = SseEvent {
            event: Some("content_block_delta".into()),
            data: "line1\nline2".into(),
        };
        assert_eq!(parse_all(&[&e.to_bytes()]), vec![e]);
        let built = event(&serde_json::json!({"type": "message_stop"}));
        assert_eq!(
            &built[..],
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
    }

    #[test]
    fn unbounded_events_are_refused() {
        let mut p = SseParser::new(64);
        assert!(p.push(&[b'x'; 40]).is_ok());
        assert_eq!(p.push(&[b'x'; 40]), Err(SseError::TooLarge(64)));
        let mut p = SseParser::new(64);
        let mut err = None;
        for _ in 0..10 {
            if let Err(e) = p.push(b"data: 0123456789\n") {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(SseError::TooLarge(64)), "data lines add up");
    }

    #[test]
    fn partial_events_are_reported() {
        let mut p = SseParser::new(1024);
        p.push(b"event: x\ndata: {}\n").unwrap();
        assert!(p.has_partial());
        p.push(b"\n").unwrap();
        assert!(!p.has_partial());
    }
}
