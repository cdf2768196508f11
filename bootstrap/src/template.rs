//! `@@NAME@@` placeholder substitution.

/// Replaces every `@@NAME@@` in `template` for which `value(NAME)` is `Some`,
/// in a single pass: substituted text is never scanned again, so a value that
/// itself contains `@@TOKEN@@` stays literal.
pub(crate) fn substitute(template: &str, value: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 2048);
    let mut rest = template;
    while let Some(start) = rest.find("@@") {
        let after = &rest[start + 2..];
        let name_len = after.find("@@").filter(|&n| is_name(&after[..n]));
        match name_len.and_then(|n| Some((n, value(&after[..n])?))) {
            Some((n, replacement)) => {
                out.push_str(&rest[..start]);
                out.push_str(&replacement);
                rest = &after[n + 2..];
            }
            None => {
                out.push_str(&rest[..start + 2]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}
