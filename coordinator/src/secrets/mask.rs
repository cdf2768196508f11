//! Secret values out of a script's output.
//!
//! The coordinator masks, not the agent: the agent runs inside the VM, where
//! the script (as root) can replace or bypass it, while the coordinator is
//! what stores and streams every byte, so masking there holds whatever the VM
//! does. Masking is a pure function of the byte stream, applied as chunks
//! arrive: bytes that may be the start of a secret are held back until the
//! bytes after them decide (see `app::agents` for how held-back bytes stay
//! durable and the agent's offsets stay exact).

/// What a secret value becomes in the log.
pub const MASK: &[u8] = b"***";
/// Shorter values are refused as secrets: masking every `ab` in a log would
/// mangle it, and a value this short is no secret anyway.
pub const MIN_SECRET_LEN: usize = 4;

/// A set of secret values to mask.
#[derive(Clone, Default)]
pub struct Masker {
    /// Longest first, so the longest value matching at a position wins.
    secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Masker({} secrets)", self.secrets.len())
    }
}

impl Masker {
    /// Masks every value of at least [`MIN_SECRET_LEN`] bytes (shorter ones
    /// are refused when saved; any that come from elsewhere are left alone).
    pub fn new<V: AsRef<[u8]>>(values: impl IntoIterator<Item = V>) -> Self {
        let mut secrets: Vec<Vec<u8>> =
            values.into_iter().map(|v| v.as_ref().to_vec()).filter(|v| v.len() >= MIN_SECRET_LEN).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Self { secrets }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Masks `data` and returns the output and how many bytes of `data` it
    /// covers. The rest, `data[covered..]`, may be the start of a secret:
    /// offer it again in front of the bytes that follow. With `end` (no byte
    /// follows) everything is covered.
    ///
    /// Offering a stream in any split gives the same output as offering it
    /// whole: the decision at a position needs only the bytes up to the
    /// longest secret's length after it, and a position is held back exactly
    /// when those are not all there yet.
    pub fn mask(&self, data: &[u8], end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let rest = &data[i..];
            if !end && self.secrets.iter().any(|s| s.len() > rest.len() && s.starts_with(rest)) {
                break;
            }
            match self.secrets.iter().find(|s| rest.starts_with(s)) {
                Some(s) => {
                    out.extend_from_slice(MASK);
                    i += s.len();
                }
                None => {
                    out.push(data[i]);
                    i += 1;
                }
            }
        }
        (out, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masks `input` offered in pieces split at `splits`, as the coordinator
    /// does chunk by chunk, and returns the concatenated output.
    fn masked_in_pieces(m: &Masker, input: &[u8], splits: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let mut last = 0;
        for &at in splits.iter().chain(std::iter::once(&input.len())) {
            pending.extend_from_slice(&input[last..at]);
            last = at;
            let (o, covered) = m.mask(&pending, false);
            out.extend_from_slice(&o);
            pending.drain(..covered);
        }
        out.extend_from_slice(&m.mask(&pending, true).0);
        out
    }

    // One case a line: secrets, the stream, what is stored.
    #[test]
    fn masks_every_occurrence() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["hunter2"], "pw=hunter2\n", "pw=***\n"),
            (&["hunter2"], "hunter2hunter2 hunter", "****** hunter"),
            (&["abcd", "abcdef"], "abcdefg abcdx", "***g ***x"),
            (&["abcd", "bcde"], "abcde", "***e"),
            (&["aaaa"], "aaaaaaaaa", "******a"),
            (&["abc"], "abc", "abc"), // shorter than MIN_SECRET_LEN: never a secret
            (&[], "plain output", "plain output"),
            (&["s3cr3t"], "s3cr3", "s3cr3"), // the stream ended inside a would-be secret
        ];
        for (secrets, input, want) in cases {
            let m = Masker::new(secrets.iter());
            let whole = m.mask(input.as_bytes(), true).0;
            assert_eq!(String::from_utf8_lossy(&whole), *want, "secrets {secrets:?} input {input:?}");
            // Every single split point, and every pair, gives the same bytes.
            for a in 0..=input.len() {
                assert_eq!(masked_in_pieces(&m, input.as_bytes(), &[a]), whole, "split at {a} of {input:?}");
                for b in a..=input.len() {
                    assert_eq!(masked_in_pieces(&m, input.as_bytes(), &[a, b]), whole, "splits {a},{b} of {input:?}");
                }
            }
        }
    }

    // Bytes that may begin a secret are held back, and nothing else is.
    #[test]
    fn holds_back_only_a_possible_start() {
        let m = Masker::new(["topsecret"]);
        assert_eq!(m.mask(b"log line top", false), (b"log line ".to_vec(), 9));
        assert_eq!(m.mask(b"log line tops", false).1, 9);
        assert_eq!(m.mask(b"log line topx", false), (b"log line topx".to_vec(), 13));
        assert_eq!(m.mask(b"log line top", true), (b"log line top".to_vec(), 12));
    }
}
