//! Bounded, escaped text for log lines and messages: whatever a caller sends, or names its process, reaches
//! a log line only as a short escaped prefix with counts, so no request can make the daemon write more than
//! a few KiB and nobody can forge a log line with a newline.

use std::fmt;

/// At most this many characters of one caller-supplied value are shown.
pub const SHOWN: usize = 200;

/// Displays a prefix of `text`, followed by `… (N bytes)` when cut. The prefix is at most `max` characters
/// once escaped (`str::escape_debug`, about what a log formatter's own escaping makes of it). With `escape`,
/// it is shown escaped (for text built into messages); without, raw (for log fields, which the formatter
/// escapes).
pub struct Clip<'a> {
    text: &'a str,
    max: usize,
    escape: bool,
}

/// [`Clip`] at [`SHOWN`] characters, raw: for a log field.
pub fn clip(text: &str) -> Clip<'_> {
    Clip {
        text,
        max: SHOWN,
        escape: false,
    }
}

/// [`Clip`] at `max` characters, raw: for a log field.
pub fn clip_at(text: &str, max: usize) -> Clip<'_> {
    Clip {
        text,
        max,
        escape: false,
    }
}

/// [`Clip`] at [`SHOWN`] characters, escaped: for a message.
pub fn clip_escaped(text: &str) -> Clip<'_> {
    Clip {
        text,
        max: SHOWN,
        escape: true,
    }
}

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut width = 0;
        for c in self.text.chars() {
            let escaped = c.escape_debug();
            width += escaped.len();
            if width > self.max {
                return write!(f, "… ({} bytes)", self.text.len());
            }
            if self.escape {
                write!(f, "{escaped}")?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// Our own message (`reason`) cut at `max` bytes on a character boundary, `… (N bytes)` appended when cut;
/// the caller-supplied parts inside it are already escaped and clipped.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// A list of caller-supplied values (scopes) for a log field: the first ones, raw and space-separated,
/// within [`SHOWN`] characters once escaped, then `… (N values, M bytes)` when cut.
pub struct ClipList<'a, S>(pub &'a [S]);

impl<S: AsRef<str>> fmt::Display for ClipList<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let joined = self
            .0
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<&str>>()
            .join(" ");
        let total: usize = self.0.iter().map(|s| s.as_ref().len()).sum();
        let mut width = 0;
        for c in joined.chars() {
            width += c.escape_debug().len();
            if width > SHOWN {
                return write!(f, "… ({} values, {total} bytes)", self.0.len());
            }
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_shown_whole() {
        assert_eq!(clip("a\nb").to_string(), "a\nb");
        assert_eq!(clip_escaped("a\nb").to_string(), "a\\nb");
        assert_eq!(ClipList(&["x", "y"]).to_string(), "x y");
    }

    #[test]
    fn long_and_hostile_text_is_cut_with_counts() {
        let hostile = "\u{1}".repeat(1000);
        let shown = clip_escaped(&hostile).to_string();
        assert!(shown.len() < SHOWN + 32, "{}", shown.len());
        assert!(shown.ends_with("… (1000 bytes)"), "{shown}");
        assert!(!shown.contains('\u{1}'));
        // Raw, its escaped form (what a log formatter writes) is as short.
        let raw = clip(&hostile).to_string();
        assert!(raw.escape_debug().to_string().len() < SHOWN + 32);
        let many: Vec<String> = (0..64).map(|_| hostile.clone()).collect();
        let shown = ClipList(&many).to_string();
        assert!(shown.escape_debug().to_string().len() < SHOWN + 48);
        assert!(shown.ends_with("… (64 values, 64000 bytes)"), "{shown}");
    }
}
