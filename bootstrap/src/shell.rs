//! Shell quoting.

/// Quotes `value` as one POSIX shell word: inside single quotes nothing is
/// special, and each `'` becomes `'\''` (close, escaped quote, reopen).
pub(crate) fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}
