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
/// prefix tokens). The first piece is always the whole text cut at `capacity`; windows
/// follow when `spec` is given and the text has more tokens than `spec.tokens`. The last
/// window is aligned to the end of the text so the tail is always covered.
pub fn plan_windows(
    offsets: &[(usize, usize)],
    text_len: usize,
    capacity: usize,
    spec: Option<WindowSpec>,
) -> Vec<PlannedPiece> {
    let n = offsets.len();
    let capacity = capacity.max(1);
    let whole_tokens = n.min(capacity);
    let whole_end = if n <= capacity {
        text_len
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
    let mut starts: Vec<usize> = (0..n - size).step_by(stride).collect();
    if starts.last() != Some(&(n - size)) {
        starts.push(n - size);
    }
    pieces.extend(starts.into_iter().map(|s| PlannedPiece {
        start: offsets[s].0,
        end: offsets[s + size - 1].1,
        tokens: size,
    }));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of one-byte tokens separated by spaces: "a b c ...".
    fn offsets(n: usize) -> Vec<(usize, usize)> {
        (0..n).map(|i| (2 * i, 2 * i + 1)).collect()
    }

    #[test]
    fn short_text_is_one_piece() {
        let p = plan_windows(
            &offsets(5),
            9,
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
                end: 9,
                tokens: 5
            }]
        );
    }

    #[test]
    fn whole_piece_is_cut_at_capacity() {
        let p = plan_windows(&offsets(10), 19, 4, None);
        assert_eq!(
            p,
            vec![PlannedPiece {
                start: 0,
                end: 7,
                tokens: 4
            }]
        );
    }

    #[test]
    fn windows_overlap_and_cover_the_tail() {
        let p = plan_windows(
            &offsets(10),
            19,
            100,
            Some(WindowSpec {
                tokens: 4,
                stride: 3,
            }),
        );
        let starts: Vec<usize> = p[1..].iter().map(|w| w.start / 2).collect();
        assert_eq!(starts, vec![0, 3, 6]);
        assert!(p[1..].iter().all(|w| w.tokens == 4));
        assert_eq!(p.last().unwrap().end, 19);
        // Every token is inside some window.
        for t in 0..10 {
            assert!(
                p[1..].iter().any(|w| w.start <= 2 * t && 2 * t < w.end),
                "token {t}"
            );
        }
    }

    #[test]
    fn window_never_exceeds_capacity() {
        let p = plan_windows(
            &offsets(50),
            99,
            8,
            Some(WindowSpec {
                tokens: 32,
                stride: 16,
            }),
        );
        assert!(p.iter().all(|w| w.tokens <= 8));
        assert_eq!(p.last().unwrap().end, 99);
    }

    #[test]
    fn empty_text_still_has_a_piece() {
        let p = plan_windows(
            &[],
            0,
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
