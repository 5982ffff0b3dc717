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
    /// Further labelled files (by file stem): ROC-AUC and rates of each on its own.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub other_sets: BTreeMap<String, SetFigures>,
    /// False alarms on ordinary traffic (`--ordinary` files), when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordinary: Option<Ordinary>,
    pub throughput: Throughput,
    pub date: String,
    pub machine: String,
}

/// A further labelled file's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SetFigures {
    pub auc: Option<f64>,
    pub auc_by_lang: BTreeMap<String, Option<f64>>,
    #[serde(flatten)]
    pub rates: Rates,
}

/// False alarms on ordinary traffic: the share of its items whose verdict is fail.
#[derive(Debug, Clone, Serialize)]
pub struct Ordinary {
    pub items: usize,
    pub false_positive_rate: f64,
    pub by_lang: BTreeMap<String, Alarms>,
    pub by_kind: BTreeMap<String, Alarms>,
    /// `lang/kind`, e.g. `zh/response`.
    pub by_lang_kind: BTreeMap<String, Alarms>,
    pub by_source: BTreeMap<String, Alarms>,
    /// Which rules the false alarms failed (an item may fail several).
    pub by_rule: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Alarms {
    pub items: usize,
    pub failed: usize,
    pub false_positive_rate: f64,
}

impl Alarms {
    fn add(&mut self, failed: bool) {
        self.items += 1;
        self.failed += usize::from(failed);
        self.false_positive_rate = self.failed as f64 / self.items as f64;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    /// Every file read (labelled first, then ordinary).
    pub files: Vec<super::DataFile>,
    /// The first labelled file: the headline figures are its items'.
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

/// Everything a run measures: the headline figures over the first labelled file's
/// items, each further labelled file on its own, and the ordinary traffic's false alarms.
/// `margins[i]` are item i's per-rule margins (`rules` in order); `risks[i] > 0` exactly
/// when its verdict is fail.
pub fn all_metrics(
    items: &[Item],
    risks: &[f32],
    margins: &[Vec<f32>],
    rules: &[&str],
    primary: &str,
) -> (
    Auc,
    AtThresholds,
    BTreeMap<String, SetFigures>,
    Option<Ordinary>,
) {
    let pick = |keep: &dyn Fn(&Item) -> bool| -> (Vec<Item>, Vec<f32>) {
        items
            .iter()
            .zip(risks)
            .filter(|(i, _)| keep(i))
            .map(|(i, &r)| (i.clone(), r))
            .unzip()
    };
    let (main, main_risks) = pick(&|i| !i.ordinary && i.set == primary);
    let (auc, at) = metrics(&main, &main_risks);
    let sets: std::collections::BTreeSet<&str> = items
        .iter()
        .filter(|i| !i.ordinary && i.set != primary)
        .map(|i| i.set.as_str())
        .collect();
    let mut other_sets = BTreeMap::new();
    for set in sets {
        let (its, rs) = pick(&|i| !i.ordinary && i.set == set);
        let positive: Vec<bool> = its.iter().map(Item::violation).collect();
        other_sets.insert(
            set.to_string(),
            SetFigures {
                auc: roc_auc(&rs, &positive),
                auc_by_lang: slice_auc(&its, &rs, |i| &i.lang),
                rates: Confusion::at(&rs, &positive, 0.0).into(),
            },
        );
    }
    let mut ordinary: Option<Ordinary> = None;
    for ((item, &r), m) in items.iter().zip(risks).zip(margins) {
        if !item.ordinary {
            continue;
        }
        let o = ordinary.get_or_insert_with(|| Ordinary {
            items: 0,
            false_positive_rate: 0.0,
            by_lang: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            by_lang_kind: BTreeMap::new(),
            by_source: BTreeMap::new(),
            by_rule: BTreeMap::new(),
        });
        let failed = r > 0.0;
        o.by_lang.entry(item.lang.clone()).or_default().add(failed);
        o.by_kind.entry(item.kind.clone()).or_default().add(failed);
        o.by_lang_kind
            .entry(format!("{}/{}", item.lang, item.kind))
            .or_default()
            .add(failed);
        o.by_source
            .entry(item.source.clone())
            .or_default()
            .add(failed);
        o.items += 1;
        for (rule, &x) in rules.iter().zip(m) {
            if x > 0.0 {
                *o.by_rule.entry(rule.to_string()).or_default() += 1;
            }
        }
    }
    if let Some(o) = &mut ordinary {
        let failed: usize = o.by_lang.values().map(|a| a.failed).sum();
        o.false_positive_rate = failed as f64 / o.items.max(1) as f64;
    }
    (auc, at, other_sets, ordinary)
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
        for (set, f) in &self.other_sets {
            out += &format!(
                "\nset {set}: ROC-AUC {}{}  recall {:.3}  FPR {:.3}",
                fmt(f.auc),
                f.auc_by_lang
                    .iter()
                    .map(|(k, v)| format!("  {k} {}", fmt(*v)))
                    .collect::<String>(),
                f.rates.recall,
                f.rates.false_positive_rate
            );
        }
        if let Some(o) = &self.ordinary {
            out += &format!(
                "\nordinary traffic: {} items, false alarms {:.4} ({} failed)",
                o.items,
                o.false_positive_rate,
                o.by_lang.values().map(|a| a.failed).sum::<usize>()
            );
            for (name, slice) in [("lang/kind", &o.by_lang_kind), ("source", &o.by_source)] {
                out += &format!("\n  by {name}:");
                for (k, a) in slice {
                    out += &format!(
                        "\n    {k:<28} {:.4}  ({} of {})",
                        a.false_positive_rate, a.failed, a.items
                    );
                }
            }
            if !o.by_rule.is_empty() {
                out += "\n  failed rules:";
                for (k, n) in &o.by_rule {
                    out += &format!(" {k} {n}");
                }
            }
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
    /// The file the item came from (its stem).
    set: &'a str,
    scary: bool,
    /// From an ordinary-traffic file.
    ordinary: bool,
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
            set: &item.set,
            scary: item.scary(),
            ordinary: item.ordinary,
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
