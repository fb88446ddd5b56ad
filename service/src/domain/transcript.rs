//! The CLI's transcript (JSONL, one JSON object per line): naming it for
//! another session, as the CLI's `--fork-session` does.

/// `transcript` with the top-level `"sessionId"` of every line that is a
/// JSON object set to `session_id`. Everything else of a line stays byte for
/// byte as it was (key order, spacing, numbers); lines that are not JSON
/// objects, or have no `sessionId`, are copied as they are.
pub fn rename_session(transcript: &[u8], session_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(transcript.len());
    for line in transcript.split_inclusive(|b| *b == b'\n') {
        let (body, end) = match line.strip_suffix(b"\n") {
            Some(b) => (b, &b"\n"[..]),
            None => (line, &b""[..]),
        };
        match session_id_span(body) {
            Some((from, to)) => {
                out.extend_from_slice(&body[..from]);
                out.push(b'"');
                out.extend_from_slice(session_id.as_bytes());
                out.push(b'"');
                out.extend_from_slice(&body[to..]);
            }
            None => out.extend_from_slice(body),
        }
        out.extend_from_slice(end);
    }
    out
}

/// Where the value of the top-level `sessionId` member of `line` is, when
/// `line` is a JSON object that has one.
fn session_id_span(line: &[u8]) -> Option<(usize, usize)> {
    if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line).is_err() {
        return None;
    }
    // A valid object: a plain scan of its top level is enough.
    let mut i = skip_ws(line, 0);
    if line.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(line, i);
        if line.get(i) != Some(&b'"') {
            return None; // `}`: an object without the member
        }
        let key_end = skip_string(line, i)?;
        let key = &line[i + 1..key_end - 1];
        i = skip_ws(line, key_end);
        if line.get(i) != Some(&b':') {
            return None;
        }
        let value = skip_ws(line, i + 1);
        let value_end = skip_value(line, value)?;
        if key == b"sessionId" {
            return Some((value, value_end));
        }
        i = skip_ws(line, value_end);
        match line.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while s.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// `s[i]` is `"`: the index just past the closing quote.
fn skip_string(s: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match s.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The index just past the value starting at `s[i]`.
fn skip_value(s: &[u8], mut i: usize) -> Option<usize> {
    match s.get(i)? {
        b'"' => skip_string(s, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match s.get(i)? {
                    b'"' => {
                        i = skip_string(s, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            while let Some(b) = s.get(i) {
                if matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace() {
                    break;
                }
                i += 1;
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_the_top_level_session_id_and_keeps_the_rest() {
        let t = concat!(
            "{\"type\":\"user\",\"sessionId\":\"old\",\"message\":{\"sessionId\":\"inner\"},\"n\":1.50}\n",
            "not json\n",
            "[1,2]\n",
            "{\"z\": 1, \"sessionId\" : \"old\" }\n",
            "{\"no\":\"id\"}\n",
            "{\"sessionId\":\"old\"}"
        );
        let out = String::from_utf8(rename_session(t.as_bytes(), "new")).unwrap();
        assert_eq!(
            out,
            concat!(
                "{\"type\":\"user\",\"sessionId\":\"new\",\"message\":{\"sessionId\":\"inner\"},\"n\":1.50}\n",
                "not json\n",
                "[1,2]\n",
                "{\"z\": 1, \"sessionId\" : \"new\" }\n",
                "{\"no\":\"id\"}\n",
                "{\"sessionId\":\"new\"}"
            )
        );
    }

    #[test]
    fn a_session_id_after_nested_values_is_found() {
        let t = b"{\"a\":[{\"b\":\"}\"}],\"c\":\"x\\\"y\",\"d\":true,\"sessionId\":\"s\"}\n";
        let out = String::from_utf8(rename_session(t, "n")).unwrap();
        assert_eq!(
            out,
            "{\"a\":[{\"b\":\"}\"}],\"c\":\"x\\\"y\",\"d\":true,\"sessionId\":\"n\"}\n"
        );
    }
}
