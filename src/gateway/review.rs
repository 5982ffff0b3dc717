//! Evaluating gateway texts through the engine, and what a result means for the exchange.
//!
//! Owns: cutting long texts into chunks the engine queue accepts, the windows an output
//! is judged in (the same streamed or not), merging the chunks' (or windows') results
//! into one, the decision a result calls for (pass, flag,
//! block, revise: the strictest action among the violated rules). The audit record of
//! every evaluation is `Exchange::record`'s. Evaluation always goes through the engine's
//! queue; nothing here runs the model or blocks the async runtime.

use std::sync::Arc;
use std::time::Instant;

use crate::constitution::Action;
use crate::engine::Engine;
use crate::evaluate::{Index, TextResult, Verdict};

use super::error::GatewayError;
use super::Gateway;

/// Characters shared by consecutive chunks of a long text, so a passage cut by a chunk
/// boundary is still seen whole (the model's windows are ~500 characters).
const CHUNK_OVERLAP_CHARS: usize = 1000;

/// One evaluated text (possibly in chunks), merged.
#[derive(Clone)]
pub struct Checked {
    pub index: Arc<Index>,
    /// The model that scored (`first+second` for an ensemble).
    pub model: Arc<str>,
    pub result: TextResult,
    /// Characters evaluated.
    pub chars: usize,
    /// Engine texts it took (chunks).
    pub chunks: usize,
    pub latency_ms: f64,
}

/// What a result calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    Flag,
    /// Mask what the redact rules found; pass the rest.
    Redact,
    Revise,
    Block,
}

/// The strictest action among the violated rules: block > revise > redact > flag.
pub fn decide(result: &TextResult) -> Decision {
    let mut decision = Decision::Pass;
    for rule in result.violated() {
        let this = match rule.action {
            Action::Block => Decision::Block,
            Action::Revise => Decision::Revise,
            Action::Flag => Decision::Flag,
            Action::Redact => Decision::Redact,
        };
        decision = decision.max_by_strictness(this);
    }
    decision
}

impl Decision {
    fn rank(self) -> u8 {
        match self {
            Decision::Pass => 0,
            Decision::Flag => 1,
            Decision::Redact => 2,
            Decision::Revise => 3,
            Decision::Block => 4,
        }
    }

    fn max_by_strictness(self, other: Decision) -> Decision {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    /// A prompt cannot be revised: what would revise an output blocks a prompt.
    pub fn for_prompt(self) -> Decision {
        match self {
            Decision::Revise => Decision::Block,
            other => other,
        }
    }
}

/// The byte index of every character of `text`, and its length last: character `i` is
/// `text[bounds[i]..bounds[i + 1]]`.
fn char_bounds(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect()
}

/// Cuts `text` into chunks of at most `max_chars` characters overlapping by
/// [`CHUNK_OVERLAP_CHARS`] (fewer when `max_chars` is small).
pub fn chunks(text: &str, max_chars: usize) -> Vec<&str> {
    let max_chars = max_chars.max(1);
    let bounds = char_bounds(text);
    let n = bounds.len() - 1;
    if n <= max_chars {
        return vec![text];
    }
    let overlap = CHUNK_OVERLAP_CHARS.min(max_chars / 4);
    let step = max_chars - overlap;
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + max_chars).min(n);
        out.push(&text[bounds[start]..bounds[end]]);
        if end == n {
            return out;
        }
        start += step;
    }
}

/// The last `max_chars` characters of `text` (all of it when shorter).
pub fn tail(text: &str, max_chars: usize) -> &str {
    let count = text.chars().count();
    if count <= max_chars {
        return text;
    }
    let skip = count - max_chars;
    let (cut, _) = text.char_indices().nth(skip).unwrap_or((text.len(), ' '));
    &text[cut..]
}

/// One result for several evaluations of parts of one text: per rule the highest score
/// (with its evidence), violated if any part violated it.
pub fn merge(mut results: Vec<TextResult>) -> Option<TextResult> {
    let mut merged = results.pop()?;
    for other in results {
        merged = merge_two(merged, other);
    }
    Some(merged)
}

/// Merges `b` into `a`; both come from the same constitution index (same rule order).
pub fn merge_two(mut a: TextResult, b: TextResult) -> TextResult {
    for (ra, rb) in a.rules.iter_mut().zip(b.rules) {
        debug_assert_eq!(ra.id, rb.id);
        let violated = ra.violated || rb.violated;
        if rb.score > ra.score {
            *ra = rb;
        }
        ra.violated = violated;
    }
    a.risk = a.risk.max(b.risk);
    a.tokens += b.tokens;
    a.windows += b.windows;
    a.verdict = if a.rules.iter().any(|r| r.violated) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    a
}

/// Windows over one text block of an output: consecutive pieces of `window_chars`
/// characters, each with the `context_chars` characters before it, so a passage is
/// judged in a window of about its own size rather than diluted in a long text. Window
/// `k` covers characters `[k * window_chars - context_chars, (k + 1) * window_chars)`:
/// where the windows fall depends only on character offsets, never on how the text
/// arrived, so a stream can judge the same windows as its text comes (see
/// [`output_windows`]).
pub fn windows(text: &str, window_chars: usize, context_chars: usize) -> Vec<&str> {
    let window_chars = window_chars.max(1);
    let bounds = char_bounds(text);
    let n = bounds.len() - 1;
    let mut out = Vec::with_capacity(n / window_chars + 1);
    let mut start = 0;
    while start < n {
        let end = (start + window_chars).min(n);
        out.push(&text[bounds[start.saturating_sub(context_chars)]..bounds[end]]);
        start = end;
    }
    if out.is_empty() {
        out.push(text);
    }
    out
}

/// The windows an output is judged in, streamed or not: [`windows`] over each text block
/// on its own (context never reaches into an earlier block: a stream has released that
/// block whole when it ended), without the windows that hold nothing but white space.
/// The streaming guard (`stream/machine.rs`) judges exactly these windows, in this order,
/// whatever the sizes of upstream's deltas, so a stream's verdict is this one's.
pub fn output_windows<'a>(
    blocks: &[&'a str],
    window_chars: usize,
    context_chars: usize,
) -> Vec<&'a str> {
    blocks
        .iter()
        .flat_map(|block| windows(block, window_chars, context_chars))
        .filter(|w| !w.trim().is_empty())
        .collect()
}

/// Evaluates a prompt against `constitution`: whole (the engine adds token windows to
/// long texts), in chunks if longer than `limits.max_text_chars`.
pub async fn check(
    gw: &Gateway,
    engine: &Engine,
    text: &str,
    constitution: &str,
) -> Result<Checked, GatewayError> {
    let max_chars = gw.config().limits.max_text_chars;
    let parts = chunks(text, max_chars);
    check_parts(engine, text.chars().count(), parts, constitution).await
}

/// Evaluates a whole output (its text blocks) in the windows a stream of it is evaluated
/// in ([`output_windows`]): the streamed and the non-streamed verdict are the same.
pub async fn check_output(
    gw: &Gateway,
    engine: &Engine,
    blocks: &[&str],
    constitution: &str,
) -> Result<Checked, GatewayError> {
    let config = &gw.config().gateway;
    let parts = output_windows(blocks, config.hold_back_chars, config.context_chars);
    let chars = blocks.iter().map(|b| b.chars().count()).sum();
    check_parts(engine, chars, parts, constitution).await
}

/// Evaluates one of [`output_windows`] on its own, as a stream does once its last
/// character has come (the engine text [`check_output`] makes of it).
pub async fn check_window(
    engine: &Engine,
    window: &str,
    constitution: &str,
) -> Result<Checked, GatewayError> {
    check_parts(engine, window.chars().count(), vec![window], constitution).await
}

async fn check_parts(
    engine: &Engine,
    chars: usize,
    parts: Vec<&str>,
    constitution: &str,
) -> Result<Checked, GatewayError> {
    let started = Instant::now();
    let parts: Vec<String> = parts.into_iter().map(str::to_string).collect();
    let n = parts.len();
    let evaluation = engine.evaluate(Arc::new(parts), Some(constitution)).await?;
    let result = merge(evaluation.results)
        .ok_or_else(|| GatewayError::Internal("the engine returned no result".into()))?;
    Ok(Checked {
        index: evaluation.index,
        model: evaluation.model,
        result,
        chars,
        chunks: n,
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constitution::Severity;
    use crate::evaluate::{Evidence, RuleResult};

    fn rule(id: &str, action: Action, score: f32, threshold: f32) -> RuleResult {
        RuleResult {
            id: id.into(),
            category: "c".into(),
            severity: Severity::High,
            action,
            score,
            threshold,
            violated: score > threshold,
            evidence: Some(Evidence {
                exemplar: format!("{id} {score}"),
                similarity: score,
                compliant_exemplar: None,
                compliant_similarity: None,
                span: None,
            }),
            detections: 0,
        }
    }

    fn result(rules: Vec<RuleResult>) -> TextResult {
        let risk = rules
            .iter()
            .map(|r| r.score - r.threshold)
            .fold(f32::NEG_INFINITY, f32::max);
        TextResult {
            verdict: if rules.iter().any(|r| r.violated) {
                Verdict::Fail
            } else {
                Verdict::Pass
            },
            risk,
            tokens: 10,
            windows: 0,
            rules,
            detections: Vec::new(),
            redacted: None,
        }
    }

    #[test]
    fn the_strictest_violated_action_wins() {
        let r = |a: f32, b: f32, c: f32| {
            result(vec![
                rule("flag", Action::Flag, a, 0.0),
                rule("revise", Action::Revise, b, 0.0),
                rule("block", Action::Block, c, 0.0),
            ])
        };
        assert_eq!(decide(&r(-1.0, -1.0, -1.0)), Decision::Pass);
        assert_eq!(decide(&r(0.5, -1.0, -1.0)), Decision::Flag);
        assert_eq!(decide(&r(0.5, 0.5, -1.0)), Decision::Revise);
        assert_eq!(decide(&r(0.5, 0.5, 0.5)), Decision::Block);
        assert_eq!(decide(&r(-1.0, -1.0, 0.5)), Decision::Block);
        assert_eq!(Decision::Revise.for_prompt(), Decision::Block);
        assert_eq!(Decision::Flag.for_prompt(), Decision::Flag);
    }

    #[test]
    fn merging_keeps_each_rules_worst_part() {
        let a = result(vec![
            rule("x", Action::Block, 0.2, 0.0),
            rule("y", Action::Flag, -0.5, 0.0),
        ]);
        let b = result(vec![
            rule("x", Action::Block, 0.1, 0.0),
            rule("y", Action::Flag, -0.1, 0.0),
        ]);
        let m = merge(vec![a, b]).unwrap();
        assert_eq!(m.verdict, Verdict::Fail);
        assert_eq!(m.rules[0].score, 0.2);
        assert!(m.rules[0].violated);
        assert_eq!(m.rules[1].score, -0.1);
        assert_eq!(m.rules[1].evidence.as_ref().unwrap().exemplar, "y -0.1");
        assert!(!m.rules[1].violated);
        assert!((m.risk - 0.2).abs() < 1e-6);
        assert_eq!(m.tokens, 20);
        assert!(merge(vec![]).is_none());
    }

    #[test]
    fn chunks_cover_the_text_with_overlap() {
        assert_eq!(chunks("short", 10), vec!["short"]);
        let text: String = (0..50).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let parts = chunks(&text, 20);
        assert!(parts.iter().all(|p| p.chars().count() <= 20));
        assert_eq!(parts[0], &text[..20]);
        assert!(text.ends_with(parts.last().unwrap()));
        // Overlap: each chunk starts inside the previous one.
        assert_eq!(&parts[1][..5], &text[15..20]);
        let zh = "一二三四五六七八九十".repeat(3);
        let parts = chunks(&zh, 8);
        assert!(parts.iter().all(|p| p.chars().count() <= 8));
        assert!(zh.ends_with(parts.last().unwrap()));
    }

    #[test]
    fn windows_carry_context_and_cover_everything_once() {
        let text = "abcdefghij";
        assert_eq!(windows(text, 4, 2), vec!["abcd", "cdefgh", "ghij"]);
        assert_eq!(windows(text, 20, 5), vec![text]);
        assert_eq!(windows("", 4, 2), vec![""]);
        assert_eq!(windows("一二三四五", 2, 1), vec!["一二", "二三四", "四五"]);
    }

    #[test]
    fn output_windows_stay_in_their_block_and_skip_blank_ones() {
        assert_eq!(
            output_windows(&["abcdef", "", "  \n ", "ghi"], 4, 2),
            vec!["abcd", "cdef", "ghi"]
        );
        assert_eq!(output_windows(&["ab      ", "cd"], 2, 0), vec!["ab", "cd"]);
        assert!(output_windows(&[" ", ""], 4, 2).is_empty());
    }

    #[test]
    fn tail_counts_characters() {
        assert_eq!(tail("一二三四", 2), "三四");
        assert_eq!(tail("abc", 5), "abc");
    }
}
