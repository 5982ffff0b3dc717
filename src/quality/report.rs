//! The `charter bench` report: ROC-AUC overall and per slice, the confusion at the
//! thresholds in force, the false-positive rate on safe-but-scary items, throughput. The
//! JSON written to `report.json` is this struct.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Item;
use crate::evaluate::metrics::{roc_auc, Confusion};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub data: DataInfo,
    pub constitution: String,
    pub version: String,
    pub model: String,
    /// `knn` (exemplar nearest neighbours) or `head` (learned head per rule).
    pub scorer: String,
    pub cross_validation: String,
    pub thresholds: String,
    /// ROC-AUC of the overall risk (violation against ok).
    pub auc: Auc,
    /// Verdict `fail` counted as predicting a violation.
    pub at_thresholds: AtThresholds,
    pub throughput: Throughput,
    pub date: String,
    pub machine: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    pub path: String,
    pub sha256: String,
    pub items: usize,
    pub violations: usize,
    pub ok: usize,
    pub scary: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Auc {
    pub overall: Option<f64>,
    pub by_lang: BTreeMap<String, Option<f64>>,
    pub by_kind: BTreeMap<String, Option<f64>>,
    /// Violations of one category against every ok item.
    pub by_category: BTreeMap<String, Option<f64>>,
    /// Within one source (`null` when the source has one label only).
    pub by_source: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    #[serde(flatten)]
    pub confusion: Confusion,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub false_positive_rate: f64,
}

impl From<Confusion> for Rates {
    fn from(c: Confusion) -> Self {
        Self {
            precision: c.precision(),
            recall: c.recall(),
            f1: c.f1(),
            false_positive_rate: c.false_positive_rate(),
            confusion: c,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AtThresholds {
    #[serde(flatten)]
    pub overall: Rates,
    /// Share of safe-but-scary ok items (XSTest, anti-bias) that fail.
    pub scary_false_positive_rate: f64,
    pub by_lang: BTreeMap<String, Rates>,
    pub by_source: BTreeMap<String, Rates>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub texts: usize,
    /// Embedding every text (whole + sentence pieces of long ones) through the queue.
    pub embed_secs: f64,
    /// Scoring every text against the full index, as serving does.
    pub score_secs: f64,
    pub texts_per_sec: f64,
}

fn slice_auc<'a>(
    items: &'a [Item],
    risks: &[f32],
    key: impl Fn(&'a Item) -> &'a str,
) -> BTreeMap<String, Option<f64>> {
    by_slice(items, risks, key)
        .into_iter()
        .map(|(k, (s, p))| (k.to_string(), roc_auc(&s, &p)))
        .collect()
}

/// Risks and labels grouped by `key`, in key order.
fn by_slice<'a>(
    items: &'a [Item],
    risks: &[f32],
    key: impl Fn(&'a Item) -> &'a str,
) -> BTreeMap<&'a str, (Vec<f32>, Vec<bool>)> {
    let mut groups: BTreeMap<&str, (Vec<f32>, Vec<bool>)> = BTreeMap::new();
    for (item, &r) in items.iter().zip(risks) {
        let g = groups.entry(key(item)).or_default();
        g.0.push(r);
        g.1.push(item.violation());
    }
    groups
}

fn slice_rates<'a>(
    items: &'a [Item],
    risks: &[f32],
    key: impl Fn(&'a Item) -> &'a str,
) -> BTreeMap<String, Rates> {
    by_slice(items, risks, key)
        .into_iter()
        .map(|(k, (s, p))| (k.to_string(), Confusion::at(&s, &p, 0.0).into()))
        .collect()
}

/// The metrics of one run. `risks[i] > 0` exactly when item i's verdict is fail.
pub fn metrics(items: &[Item], risks: &[f32]) -> (Auc, AtThresholds) {
    let positive: Vec<bool> = items.iter().map(Item::violation).collect();
    let mut by_category = BTreeMap::new();
    let categories: std::collections::BTreeSet<&str> = items
        .iter()
        .filter(|i| i.violation())
        .map(|i| i.category.as_str())
        .collect();
    for c in categories {
        let (s, p): (Vec<f32>, Vec<bool>) = items
            .iter()
            .zip(risks)
            .filter(|(i, _)| !i.violation() || i.category == c)
            .map(|(i, &r)| (r, i.violation()))
            .unzip();
        by_category.insert(c.to_string(), roc_auc(&s, &p));
    }
    let auc = Auc {
        overall: roc_auc(risks, &positive),
        by_lang: slice_auc(items, risks, |i| &i.lang),
        by_kind: slice_auc(items, risks, |i| &i.kind),
        by_category,
        by_source: slice_auc(items, risks, |i| &i.source),
    };
    let scary: Vec<f32> = items
        .iter()
        .zip(risks)
        .filter(|(i, _)| i.scary())
        .map(|(_, &r)| r)
        .collect();
    let at = AtThresholds {
        overall: Confusion::at(risks, &positive, 0.0).into(),
        scary_false_positive_rate: scary.iter().filter(|&&r| r > 0.0).count() as f64
            / scary.len().max(1) as f64,
        by_lang: slice_rates(items, risks, |i| &i.lang),
        by_source: slice_rates(items, risks, |i| &i.source),
    };
    (auc, at)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

impl Report {
    /// A few lines for a person: the figures the acceptance targets name.
    pub fn summary(&self) -> String {
        let a = &self.at_thresholds;
        let mut out = format!(
            "{} items ({} violations, {} ok, {} safe-but-scary); constitution {} {} on {} ({} scorer)\n\
             {}; thresholds: {}\n\
             ROC-AUC  overall {}",
            self.data.items,
            self.data.violations,
            self.data.ok,
            self.data.scary,
            self.constitution,
            self.version,
            self.model,
            self.scorer,
            self.cross_validation,
            self.thresholds,
            fmt(self.auc.overall),
        );
        for (k, v) in &self.auc.by_lang {
            out += &format!("  {k} {}", fmt(*v));
        }
        for (k, v) in &self.auc.by_kind {
            out += &format!("  {k} {}", fmt(*v));
        }
        out += &format!(
            "\nat thresholds: precision {:.3}  recall {:.3}  F1 {:.3}  FPR {:.3}  scary FPR {:.3}\n",
            a.overall.precision,
            a.overall.recall,
            a.overall.f1,
            a.overall.false_positive_rate,
            a.scary_false_positive_rate
        );
        out += "per source: AUC, then F1 (or recall / FPR when the source has one label)";
        for (k, v) in &self.auc.by_source {
            let Some(r) = a.by_source.get(k) else {
                continue;
            };
            let c = &r.confusion;
            let at = if c.tp + c.fn_ == 0 {
                format!("FPR {:.3}", r.false_positive_rate)
            } else if c.fp + c.tn == 0 {
                format!("recall {:.3}", r.recall)
            } else {
                format!("F1 {:.3}", r.f1)
            };
            out += &format!("\n  {k:<24} {}  {at}", fmt(*v));
        }
        out += &format!(
            "\nthroughput: {} texts in {:.1} s ({:.1} texts/s)",
            self.throughput.texts,
            self.throughput.embed_secs + self.throughput.score_secs,
            self.throughput.texts_per_sec
        );
        out
    }
}

/// One line of `items.jsonl`: an item's cross-validated scores, so anyone can compute
/// their own metrics from the same figures as the report.
#[derive(Serialize)]
struct ItemLine<'a> {
    id: &'a str,
    label: &'a str,
    lang: &'a str,
    kind: &'a str,
    category: &'a str,
    source: &'a str,
    scary: bool,
    /// The fold the item was held out in (it saw no exemplars or fits of that fold).
    fold: usize,
    /// The largest margin: `> 0` exactly when the verdict is `fail`.
    risk: f32,
    verdict: &'static str,
    /// Per rule: score minus the threshold in force (an ensemble's mean margin minus the
    /// pair's threshold).
    margins: BTreeMap<&'a str, f32>,
    /// With an ensemble, each model's own margins per rule.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    models: BTreeMap<&'a str, BTreeMap<&'a str, f32>>,
}

/// The `items.jsonl` text: one line per item, in input order. `risks` are the items'
/// largest margins, as the report judged them; `models` each model's own margins, shown
/// when there are several.
pub fn item_lines(
    items: &[Item],
    rules: &[&str],
    margins: &[Vec<f32>],
    risks: &[f32],
    models: &[(&str, &[Vec<f32>])],
) -> serde_json::Result<String> {
    let by_rule = |m: &[f32]| rules.iter().copied().zip(m.iter().copied()).collect();
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let risk = risks[i];
        let line = ItemLine {
            id: &item.id,
            label: &item.label,
            lang: &item.lang,
            kind: &item.kind,
            category: &item.category,
            source: &item.source,
            scary: item.scary(),
            fold: super::fold_of(item.group(), super::FOLDS),
            risk,
            verdict: if risk > 0.0 { "fail" } else { "pass" },
            margins: by_rule(&margins[i]),
            models: if models.len() > 1 {
                models
                    .iter()
                    .map(|(model, m)| (*model, by_rule(&m[i])))
                    .collect()
            } else {
                BTreeMap::new()
            },
        };
        out.push_str(&serde_json::to_string(&line)?);
        out.push('\n');
    }
    Ok(out)
}
