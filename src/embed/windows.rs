//! Cutting a tokenised text into the pieces the model embeds: the whole text (cut at the
//! model window) and, for texts longer than a window, overlapping token windows, so that a
//! violation after a long harmless preamble is embedded on its own instead of being
//! truncated away or drowned in the average.

use serde::{Deserialize, Serialize};

/// Window size and stride, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    pub tokens: usize,
    pub stride: usize,
}

/// A planned piece: byte range and token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedPiece {
    pub start: usize,
    pub end: usize,
    pub tokens: usize,
}

/// Plans the pieces of one text from its token byte offsets.
///
/// `capacity` is how many text tokens fit the model window (the window minus special and
/// prefix tokens). The first piece is always the whole text cut at `capacity`. When `spec`
/// is given and the text has more tokens than `spec.tokens`, sentence pieces follow: each
/// sentence on its own (a sentence ends at `.`, `!`, `?`, their CJK forms, `;` or a line
/// break), short ones joined with the next until they reach `MIN_SENTENCE_TOKENS`, and a
/// sentence longer than `spec.tokens` cut into overlapping windows of that size, `stride`
/// apart, the last one aligned to the sentence's end. A sentence is embedded alone so a
/// violation is not averaged away by the harmless text around it.
pub fn plan_windows(
    text: &str,
    offsets: &[(usize, usize)],
    capacity: usize,
    spec: Option<WindowSpec>,
) -> Vec<PlannedPiece> {
    let n = offsets.len();
    let capacity = capacity.max(1);
    let whole_tokens = n.min(capacity);
    let whole_end = if n <= capacity {
        text.len()
    } else {
        offsets[whole_tokens - 1].1
    };
    let mut pieces = vec![PlannedPiece {
        start: 0,
        end: whole_end,
        tokens: whole_tokens,
    }];
    let Some(spec) = spec else { return pieces };
    let size = spec.tokens.min(capacity).max(1);
    if n <= size {
        return pieces;
    }
    let stride = spec.stride.clamp(1, size);
    for (first, last) in sentences(text, offsets) {
        let len = last - first + 1;
        if len <= size {
            pieces.push(piece(offsets, first, last));
            continue;
        }
        let mut start = first;
        loop {
            let end = (start + size - 1).min(last);
            pieces.push(piece(offsets, start, end));
            if end == last {
                break;
            }
            start = if end + stride.min(size) > last {
                last + 1 - size
            } else {
                start + stride
            };
        }
    }
    pieces
}

/// Sentences shorter than this many tokens are joined with the next one.
pub const MIN_SENTENCE_TOKENS: usize = 6;

fn piece(offsets: &[(usize, usize)], first: usize, last: usize) -> PlannedPiece {
    PlannedPiece {
        start: offsets[first].0,
        end: offsets[last].1,
        tokens: last - first + 1,
    }
}

/// Token index ranges (inclusive) of the sentences of a text.
fn sentences(text: &str, offsets: &[(usize, usize)]) -> Vec<(usize, usize)> {
    const ENDS: &[char] = &['.', '!', '?', ';', '。', '！', '？', '；', '…'];
    let mut out = Vec::new();
    let mut first = 0;
    for i in 0..offsets.len() {
        let token = text.get(offsets[i].0..offsets[i].1).unwrap_or("");
        let gap_end = offsets.get(i + 1).map_or(text.len(), |o| o.0);
        let gap = text
            .get(offsets[i].1..gap_end.max(offsets[i].1))
            .unwrap_or("");
        let ends = token.trim_end().ends_with(ENDS) || gap.contains('\n') || i + 1 == offsets.len();
        if ends && (i + 1 - first >= MIN_SENTENCE_TOKENS || i + 1 == offsets.len()) {
            out.push((first, i));
            first = i + 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "w0 w1 w2 ..." with one-word tokens; `every` words end a sentence with '.'.
    fn text_and_offsets(n: usize, every: usize) -> (String, Vec<(usize, usize)>) {
        let mut text = String::new();
        let mut offsets = Vec::new();
        for i in 0..n {
            if i > 0 {
                text.push(' ');
            }
            let start = text.len();
            text.push_str(&format!("w{i}"));
            if every > 0 && (i + 1) % every == 0 {
                text.push('.');
            }
            offsets.push((start, text.len()));
        }
        (text, offsets)
    }

    #[test]
    fn short_text_is_one_piece() {
        let (text, offsets) = text_and_offsets(5, 0);
        let p = plan_windows(
            &text,
            &offsets,
            100,
            Some(WindowSpec {
                tokens: 8,
                stride: 4,
            }),
        );
        assert_eq!(
            p,
            vec![PlannedPiece {
                start: 0,
                end: text.len(),
                tokens: 5
            }]
        );
    }

    #[test]
    fn whole_piece_is_cut_at_capacity() {
        let (text, offsets) = text_and_offsets(10, 0);
        let p = plan_windows(&text, &offsets, 4, None);
        assert_eq!(
            p,
            vec![PlannedPiece {
                start: 0,
                end: offsets[3].1,
                tokens: 4
            }]
        );
    }

    #[test]
    fn each_sentence_is_a_piece() {
        let (text, offsets) = text_and_offsets(40, 8);
        let p = plan_windows(
            &text,
            &offsets,
            100,
            Some(WindowSpec {
                tokens: 16,
                stride: 8,
            }),
        );
        assert_eq!(p.len(), 1 + 5, "{p:?}");
        for (k, w) in p[1..].iter().enumerate() {
            assert_eq!(w.tokens, 8);
            assert!(text[w.start..w.end].starts_with(&format!("w{}", 8 * k)));
            assert!(text[w.start..w.end].ends_with('.'));
        }
    }

    #[test]
    fn short_sentences_are_joined() {
        // A sentence every 2 words: joined until at least MIN_SENTENCE_TOKENS.
        let (text, offsets) = text_and_offsets(24, 2);
        let p = plan_windows(
            &text,
            &offsets,
            100,
            Some(WindowSpec {
                tokens: 16,
                stride: 8,
            }),
        );
        assert!(
            p[1..].iter().all(|w| w.tokens >= MIN_SENTENCE_TOKENS),
            "{p:?}"
        );
        assert_eq!(
            p[1..].iter().map(|w| w.tokens).sum::<usize>(),
            24,
            "every token in one piece"
        );
    }

    #[test]
    fn long_sentences_are_windowed_and_the_tail_covered() {
        let (text, offsets) = text_and_offsets(30, 0);
        let p = plan_windows(
            &text,
            &offsets,
            100,
            Some(WindowSpec {
                tokens: 8,
                stride: 6,
            }),
        );
        assert!(p[1..].iter().all(|w| w.tokens == 8), "{p:?}");
        assert_eq!(p.last().unwrap().end, text.len());
        for (t, o) in offsets.iter().enumerate() {
            assert!(
                p[1..].iter().any(|w| w.start <= o.0 && o.1 <= w.end),
                "token {t}"
            );
        }
    }

    #[test]
    fn window_never_exceeds_capacity() {
        let (text, offsets) = text_and_offsets(50, 0);
        let p = plan_windows(
            &text,
            &offsets,
            8,
            Some(WindowSpec {
                tokens: 32,
                stride: 16,
            }),
        );
        assert!(p.iter().all(|w| w.tokens <= 8));
        assert_eq!(p.last().unwrap().end, text.len());
    }

    #[test]
    fn empty_text_still_has_a_piece() {
        let p = plan_windows(
            "",
            &[],
            8,
            Some(WindowSpec {
                tokens: 4,
                stride: 2,
            }),
        );
        assert_eq!(
            p,
            vec![PlannedPiece {
                start: 0,
                end: 0,
                tokens: 0
            }]
        );
    }
}
