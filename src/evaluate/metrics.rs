//! Quality metrics over scored, labelled items: ROC-AUC and curves, confusion counts at a
//! threshold, and threshold fitting (best F1, or a target false-positive rate). Pure.

use serde::Serialize;

/// Area under the ROC curve (the probability that a random positive scores above a
/// random negative, ties counting half); `None` without both classes.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties (Mann-Whitney U).
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if positive[k] {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// ROC curve points (false-positive rate, true-positive rate), from (0,0) to (1,1).
pub fn roc_curve(scores: &[f32], positive: &[bool]) -> Vec<(f64, f64)> {
    let n_pos = positive.iter().filter(|&&p| p).count().max(1) as f64;
    let n_neg = positive.iter().filter(|&&p| !p).count().max(1) as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if positive[order[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        points.push((fp / n_neg, tp / n_pos));
    }
    points
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Confusion {
    /// Counts with "predicted positive" meaning `score > threshold`.
    pub fn at(scores: &[f32], positive: &[bool], threshold: f32) -> Self {
        let mut c = Confusion::default();
        for (&s, &p) in scores.iter().zip(positive) {
            match (s > threshold, p) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }

    fn ratio(a: usize, b: usize) -> f64 {
        if b == 0 {
            0.0
        } else {
            a as f64 / b as f64
        }
    }

    pub fn precision(&self) -> f64 {
        Self::ratio(self.tp, self.tp + self.fp)
    }

    pub fn recall(&self) -> f64 {
        Self::ratio(self.tp, self.tp + self.fn_)
    }

    pub fn f1(&self) -> f64 {
        Self::ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    pub fn false_positive_rate(&self) -> f64 {
        Self::ratio(self.fp, self.fp + self.tn)
    }
}

/// What `charter calibrate` aims a threshold at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The threshold with the best F1.
    F1,
    /// The lowest threshold whose false-positive rate is at most this.
    Fpr(f64),
    /// The highest threshold whose recall is at least this.
    Recall(f64),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "f1" {
            return Ok(Target::F1);
        }
        if let Some(v) = s.strip_prefix("fpr=") {
            let v: f64 = v.parse().map_err(|_| format!("bad rate in {s:?}"))?;
            if (0.0..1.0).contains(&v) {
                return Ok(Target::Fpr(v));
            }
        }
        if let Some(v) = s.strip_prefix("recall=") {
            let v: f64 = v.parse().map_err(|_| format!("bad rate in {s:?}"))?;
            if v > 0.0 && v <= 1.0 {
                return Ok(Target::Recall(v));
            }
        }
        Err(format!(
            "{s:?} is not f1, fpr=RATE (0 <= RATE < 1) or recall=RATE (0 < RATE <= 1)"
        ))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::F1 => write!(f, "f1"),
            Target::Fpr(v) => write!(f, "fpr={v}"),
            Target::Recall(v) => write!(f, "recall={v}"),
        }
    }
}

/// Fits a threshold: predicted positive is `score > threshold`. Candidates are the
/// midpoints between consecutive distinct scores. `None` without both classes.
pub fn fit_threshold(scores: &[f32], positive: &[bool], target: Target) -> Option<f32> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    // Walk thresholds from high to low; after consuming a run of equal scores, the
    // threshold just below that run predicts exactly the items seen so far.
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: Option<(f64, f32)> = None;
    let mut i = 0;
    // Predicting nothing: threshold just at the maximum.
    let top = scores[order[0]];
    if let Target::Fpr(_) = target {
        best = Some((0.0, top));
    }
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if positive[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let next = if i < order.len() {
            scores[order[i]]
        } else {
            s - 1.0
        };
        let threshold = (s + next) / 2.0;
        match target {
            Target::F1 => {
                let f1 = (2 * tp) as f64 / (2 * tp + fp + (n_pos - tp)) as f64;
                if best.is_none_or(|(b, _)| f1 > b) {
                    best = Some((f1, threshold));
                }
            }
            Target::Fpr(max) => {
                if fp as f64 / n_neg as f64 <= max {
                    best = Some((tp as f64, threshold));
                }
            }
            Target::Recall(min) => {
                if best.is_none() && tp as f64 / n_pos as f64 >= min {
                    best = Some((0.0, threshold));
                }
            }
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_perfect_random_and_ties() {
        assert_eq!(
            roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // One inversion out of four pairs.
        assert_eq!(
            roc_auc(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn curve_goes_from_origin_to_one() {
        let c = roc_curve(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true]);
        assert_eq!(c.first(), Some(&(0.0, 0.0)));
        assert_eq!(c.last(), Some(&(1.0, 1.0)));
    }

    #[test]
    fn confusion_counts() {
        let c = Confusion::at(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true], 0.55);
        assert_eq!(
            c,
            Confusion {
                tp: 1,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        assert_eq!(c.precision(), 0.5);
        assert_eq!(c.recall(), 0.5);
        assert_eq!(c.false_positive_rate(), 0.5);
    }

    #[test]
    fn thresholds_for_f1_and_fpr() {
        let s = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.35];
        let p = [false, false, false, false, true, true, true, true];
        let t = fit_threshold(&s, &p, Target::F1).unwrap();
        let c = Confusion::at(&s, &p, t);
        assert_eq!(
            (c.tp, c.fp),
            (4, 1),
            "best F1 takes the 0.35 positive with the 0.4 negative: {t}"
        );
        let t = fit_threshold(&s, &p, Target::Fpr(0.0)).unwrap();
        assert_eq!(Confusion::at(&s, &p, t).fp, 0);
        let t = fit_threshold(&s, &p, Target::Fpr(0.25)).unwrap();
        let c = Confusion::at(&s, &p, t);
        assert!(c.false_positive_rate() <= 0.25 && c.tp == 4);
        assert!("fpr=0.05".parse::<Target>().is_ok());
        assert!("fpr=2".parse::<Target>().is_err());
        let t = fit_threshold(&s, &p, Target::Recall(0.75)).unwrap();
        let c = Confusion::at(&s, &p, t);
        assert_eq!(
            (c.tp, c.fp),
            (3, 0),
            "highest threshold with recall >= 0.75: {t}"
        );
        assert_eq!("recall=0.82".parse::<Target>(), Ok(Target::Recall(0.82)));
        assert_eq!(Target::Recall(0.82).to_string(), "recall=0.82");
        assert!("auc".parse::<Target>().is_err());
    }
}
