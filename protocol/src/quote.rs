//! Quoting user input in error messages, at most [`MAX_QUOTED`] characters of
//! it, so a 1 MB name is not echoed back in full.

/// The most characters of one input an error message repeats.
pub const MAX_QUOTED: usize = 200;

/// `input` in double quotes (escaped as Rust's `{:?}` does), cut after
/// [`MAX_QUOTED`] characters with a note of its full length.
pub fn quote(input: &str) -> String {
    match cut(input) {
        None => format!("{input:?}"),
        Some(head) => format!("{head:?}… ({} bytes in all)", input.len()),
    }
}

/// A message from elsewhere (serde, the HTTP framework) that may quote the
/// input between backticks or double quotes: each quoted run longer than
/// [`MAX_QUOTED`] characters is cut, and so is an unquoted tail.
pub fn clip(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(4 * MAX_QUOTED));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let delim = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        let close = body.find(delim).unwrap_or(body.len());
        match cut(&body[..close]) {
            None => out.push_str(&body[..close]),
            Some(head) => {
                out.push_str(head);
                out.push_str(&format!("… ({} bytes in all)", close));
            }
        }
        rest = &body[close..];
        if let Some(after) = rest.strip_prefix(delim) {
            out.push(delim);
            rest = after;
        }
    }
    match cut(rest) {
        None => out.push_str(rest),
        Some(head) => {
            out.push_str(head);
            out.push('…');
        }
    }
    out
}

/// The first [`MAX_QUOTED`] characters of `s`, when it has more.
fn cut(s: &str) -> Option<&str> {
    s.char_indices().nth(MAX_QUOTED).map(|(end, _)| &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Short input is quoted whole; long input is cut at 200 characters.
    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quote("web"), "\"web\"");
        let long = "é".repeat(1_000_000);
        let q = quote(&long);
        assert_eq!(q.matches('é').count(), MAX_QUOTED);
        assert!(q.ends_with("(2000000 bytes in all)"), "{q}");
    }

    // Quoted runs inside a framework's message are cut, the words around them kept.
    #[test]
    fn clipped_messages_keep_their_words() {
        let long = "x".repeat(5000);
        let m = clip(&format!("unknown variant `{long}`, expected one of `qemu`, `ec2`"));
        assert!(m.starts_with("unknown variant `xxx"), "{m}");
        assert!(m.ends_with("(5000 bytes in all)`, expected one of `qemu`, `ec2`"), "{m}");
        assert_eq!(m.matches("x").count(), MAX_QUOTED + 1, "200 of the input, 1 of \"expected\"");
        assert_eq!(clip("invalid type: string \"ab\", expected u32"), "invalid type: string \"ab\", expected u32");
        assert_eq!(clip(&long).len(), MAX_QUOTED + '…'.len_utf8());
    }
}
