//! Line and column of a byte offset in a config file's text.
//!
//! Every located error needs one; a file with many errors (a generated
//! config gone wrong can have one per agent) must not rescan the text per
//! error, so the line starts are found once and each lookup is a binary
//! search plus a count of the characters before the offset on its line
//! (a subtraction when the line is ASCII).

/// The start of every line of one text.
pub(super) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of each line's first byte; `starts[0] == 0`.
    starts: Vec<usize>,
    /// Whether each line is ASCII (its columns are byte offsets).
    ascii: Vec<bool>,
}

impl<'a> LineIndex<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let ascii = starts
            .iter()
            .zip(starts.iter().skip(1).copied().chain([text.len()]))
            .map(|(&start, end)| text.as_bytes()[start..end].is_ascii())
            .collect();
        Self {
            text,
            starts,
            ascii,
        }
    }

    /// 1-based line and column (in characters) of a byte offset; an offset
    /// past the end is the end.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The last line starting at or before the offset.
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        let column = if self.ascii[line] {
            offset - start
        } else {
            // Inside a multi-byte character: count up to its start.
            let mut end = offset;
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            self.text[start..end].chars().count()
        };
        (line + 1, column + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious version: rescan the text before the offset.
    fn naive(text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        let mut end = offset;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &text[..end];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    #[test]
    fn agrees_with_a_rescan_at_every_offset() {
        for text in [
            "",
            "\n",
            "a\néé = 1\n",
            "[daemon]\nstate_dir = \"/var/lib/ké\"\n\n\nx = \"日本\"",
            "no newline at the end",
            "\n\n\r\nmixed\r\nendings\n",
        ] {
            let index = LineIndex::new(text);
            for offset in 0..=text.len() + 2 {
                assert_eq!(
                    index.line_col(offset),
                    naive(text, offset),
                    "{text:?} at {offset}"
                );
            }
        }
    }

    #[test]
    fn counts_characters_not_bytes() {
        let index = LineIndex::new("a\néé = 1\n");
        assert_eq!(index.line_col(0), (1, 1));
        assert_eq!(index.line_col(2), (2, 1));
        // After "éé " (5 bytes, 3 chars).
        assert_eq!(index.line_col(7), (2, 4));
    }
}
