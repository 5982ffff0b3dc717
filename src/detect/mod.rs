//! Detectors that do not guess: personal data and secrets found by pattern and confirmed
//! by checksum, range or context, plus a constitution's own regular expressions.
//!
//! An embedding cannot tell a card number from an order number; a Luhn check can. This
//! module owns the built-in detectors ([`Builtin`]: email, phone numbers, payment cards,
//! US SSNs, IBANs, Chinese identity and mobile numbers, IP addresses, private keys, API
//! keys and tokens, JWTs, password assignments), custom [`Pattern`]s, masking (each span
//! replaced by `[KIND]`) and the streaming hold-back ([`safe_prefix`]: how much of a text
//! arriving in pieces can be released without cutting an identifier in two). Spans here
//! are byte offsets; callers that answer in characters convert at their edge.
//!
//! Pure and on the ground floor: it imports nothing of the crate, runs no model and does
//! no I/O. Matching uses the `regex` crate (linear time, so a custom pattern cannot make
//! a request slow by backtracking).

mod builtin;
mod checksum;
#[cfg(test)]
mod tests;

use regex::Regex;

pub use builtin::Builtin;

/// One identifier found in a text (byte span `start..end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The built-in detector's name, or the custom pattern's.
    pub detector: String,
    /// The label it is masked with, e.g. `CARD`.
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// A constitution's own expression (`patterns = [{name, regex, kind}]`).
#[derive(Debug, Clone)]
pub struct Pattern {
    pub name: String,
    pub kind: String,
    pub regex: Regex,
}

/// The detectors a rule names: built-ins and custom patterns.
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    pub builtins: Vec<Builtin>,
    pub patterns: Vec<Pattern>,
}

impl Detectors {
    pub fn is_empty(&self) -> bool {
        self.builtins.is_empty() && self.patterns.is_empty()
    }

    /// Every identifier in `text`, in order, without overlaps ([`resolve`]).
    pub fn find(&self, text: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        self.find_into(text, &mut hits);
        resolve(hits)
    }

    /// Appends the raw hits (overlaps not resolved), built-ins in priority order first.
    pub fn find_into(&self, text: &str, out: &mut Vec<Hit>) {
        for b in Builtin::ALL {
            if self.builtins.contains(&b) {
                b.find(text, out);
            }
        }
        for p in &self.patterns {
            for m in p.regex.find_iter(text) {
                if m.start() < m.end() {
                    out.push(Hit {
                        detector: p.name.clone(),
                        kind: p.kind.clone(),
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
    }
}

/// Hits in text order with no two overlapping: at equal starts the longer wins, at equal
/// spans the one found first (built-ins in [`Builtin::ALL`] order); a hit overlapping one
/// kept is dropped. The sort is stable, so the result does not depend on anything else.
pub fn resolve(mut hits: Vec<Hit>) -> Vec<Hit> {
    hits.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut out: Vec<Hit> = Vec::with_capacity(hits.len());
    for h in hits {
        if out.last().is_none_or(|last| h.start >= last.end) {
            out.push(h);
        }
    }
    out
}

/// `text` with each hit's span replaced by `[KIND]`; `hits` as [`resolve`] returns them.
pub fn mask(text: &str, hits: &[Hit]) -> String {
    mask_range(text, hits, 0, text.len())
}

/// The masked form of `text[from..to]`: characters outside every hit as they are, and a
/// hit's `[KIND]` where the hit starts (a hit that starts before `from` leaves nothing
/// of itself in the range). Pieces of a text masked range by range join into the masked
/// text, which is how a stream releases deltas.
pub fn mask_range(text: &str, hits: &[Hit], from: usize, to: usize) -> String {
    let mut out = String::with_capacity(to.saturating_sub(from));
    let mut at = from;
    for h in hits {
        if h.end <= at || h.start >= to {
            if h.start >= to {
                break;
            }
            continue;
        }
        if h.start >= at {
            out.push_str(&text[at..h.start]);
            out.push('[');
            out.push_str(&h.kind);
            out.push(']');
        }
        at = h.end.min(to).max(at);
    }
    if at < to {
        out.push_str(&text[at..to]);
    }
    out
}

/// How many leading bytes of a text that is still arriving can be released now: what
/// follows could be the start of an identifier that later characters complete, so a
/// stream holds it back until more text (or the end) shows it is not.
///
/// Held back: an unterminated `-----BEGIN` block; the trailing run of printable ASCII
/// (emails, keys, tokens, addresses, a `password=` value and every digit group all are
/// one); and before it, run by run across one or two spaces, earlier runs while both
/// look like parts of one number (a digit in each, or a short upper-case group such as
/// an IBAN's `WEST`), so `4111 1111 1111 1111` arriving as `4111 1111 ` keeps all of it.
/// Identifiers a custom pattern matches across other characters are not covered.
pub fn safe_prefix(text: &str) -> usize {
    let mut cut = text.len();
    if let Some(begin) = text.rfind("-----BEGIN") {
        let closed = text[begin..]
            .find("-----END")
            .is_some_and(|e| text[begin + e + 8..].contains("-----"));
        if !closed {
            cut = begin;
        }
    }
    let bytes = text.as_bytes();
    let graphic = |b: u8| b.is_ascii_graphic();
    // The trailing run (empty when the text ends with a space).
    let mut start = text.len();
    while start > 0 && graphic(bytes[start - 1]) {
        start -= 1;
    }
    let mut current_idish = if start == text.len() {
        true // a trailing space may sit between two groups of one number
    } else {
        idish(&text[start..])
    };
    loop {
        // One or two spaces, then an earlier run.
        let mut sep = start;
        while sep > 0 && start - sep < 2 && bytes[sep - 1] == b' ' {
            sep -= 1;
        }
        if sep == start || sep == 0 || !graphic(bytes[sep - 1]) {
            break;
        }
        let mut prev = sep;
        while prev > 0 && graphic(bytes[prev - 1]) {
            prev -= 1;
        }
        let prev_idish = idish(&text[prev..sep]);
        if !(current_idish && prev_idish) {
            break;
        }
        start = prev;
        current_idish = prev_idish;
    }
    // A text ending in spaces after a word holds nothing back.
    if start < text.len() && text[start..].bytes().all(|b| b == b' ') {
        start = text.len();
    }
    cut.min(start)
}

/// Where a stream may cut `text` now: at most `wanted` bytes, no further than
/// [`safe_prefix`], and never inside one of `hits` (found in `text`), so each identifier is
/// released whole, masked.
pub fn release_point(text: &str, hits: &[Hit], wanted: usize) -> usize {
    let mut cut = wanted.min(safe_prefix(text));
    for h in hits {
        if h.start < cut && cut < h.end {
            cut = h.start;
        }
    }
    cut
}

/// A run that can be a group of a number: it holds a digit, or is 1-4 upper-case letters
/// and digits (IBAN groups, `DE89`).
fn idish(run: &str) -> bool {
    run.bytes().any(|b| b.is_ascii_digit())
        || (run.len() <= 4
            && !run.is_empty()
            && run
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
}
