//! Labelled data for `charter bench` and `charter calibrate`: JSONL with `id`, `text`,
//! `label`, `lang`, `kind`, `category`, `source` (the format of ../shared/bench), read from
//! one or more files.
//!
//! Two roles of a file:
//! - **labelled** (`--data`): violations and ok items, hard cases; the first file's items
//!   give the report's headline figures, every further file its own slice;
//! - **ordinary** (`--ordinary`): everyday traffic, every item ok. Production traffic is
//!   mostly such text, and a guard that flags it is useless, so its false-alarm rate is
//!   reported on its own, per language, kind and source, and calibration can bound it.
//!   Ordinary items are negatives of the heads' fit, but a large file would swamp the fit
//!   (and its cost grows with the rows), so at most [`ORDINARY_FIT_PER_SOURCE`] items of
//!   each source are fitted on; the rest are scored only. Which ones is decided by a hash
//!   of the group, so it is stable across runs and machines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::QualityError;

/// Ordinary items of one source that the heads are fitted on, at most (the rest are
/// scored out of fold like every item, and count in the false-alarm figures).
pub const ORDINARY_FIT_PER_SOURCE: usize = 700;

/// One labelled item.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Item {
    pub id: String,
    pub text: String,
    /// `violation` or `ok`.
    pub label: String,
    #[serde(default)]
    pub lang: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub source: String,
    /// Marks an ok item as safe-but-scary (as XSTest and anti-bias items are by their id):
    /// it takes the scary weight in the heads' fit. Refusals are such texts: compliant,
    /// yet naming what they refuse.
    #[serde(default)]
    pub hard: bool,
    /// From an `--ordinary` file.
    #[serde(skip)]
    pub ordinary: bool,
    /// The stem of the file it came from.
    #[serde(skip)]
    pub set: String,
    /// Whether the heads may be fitted on it (outside its fold); every labelled item, and
    /// a stable sample of each ordinary source.
    #[serde(skip)]
    pub fit: bool,
}

impl Item {
    pub fn violation(&self) -> bool {
        self.label == "violation"
    }

    /// The group: items that share it are variants of one text (the id before `#`).
    pub fn group(&self) -> &str {
        group_of(&self.id)
    }

    /// Safe-but-scary: an ok item from XSTest (safe prompts, refusals, safe completions),
    /// an anti-bias comment, or one marked `hard`: the texts a guard most easily flags
    /// wrongly.
    pub fn scary(&self) -> bool {
        !self.violation()
            && (self.hard || self.id.contains("xstest") || self.id.contains("antibias"))
    }
}

pub fn group_of(id: &str) -> &str {
    id.split('#').next().unwrap_or(id)
}

/// The fold of a group: stable across runs and machines (sha256 of the group).
pub fn fold_of(group: &str, folds: usize) -> usize {
    (group_hash(group) as usize) % folds
}

fn group_hash(group: &str) -> u32 {
    let h = Sha256::digest(group.as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// One file read, as recorded in a calibration and a report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DataFile {
    pub path: PathBuf,
    pub sha256: String,
    pub items: usize,
    pub ordinary: bool,
}

/// Labelled data and ordinary traffic, with each file's sha256.
pub struct Data {
    pub files: Vec<DataFile>,
    pub items: Vec<Item>,
}

impl Data {
    /// Reads one labelled file.
    pub fn read(path: &Path) -> Result<Self, QualityError> {
        Self::read_all(&[path.to_path_buf()], &[], ORDINARY_FIT_PER_SOURCE)
    }

    /// Reads labelled files (at least one; the first gives the headline figures) and
    /// ordinary-traffic files (every item must be `ok`), of whose sources at most
    /// `fit_per_source` items each are fitted on.
    pub fn read_all(
        labelled: &[PathBuf],
        ordinary: &[PathBuf],
        fit_per_source: usize,
    ) -> Result<Self, QualityError> {
        let Some(first) = labelled.first() else {
            return Err(QualityError::Invalid("no labelled data file".into()));
        };
        let mut files = Vec::new();
        let mut items = Vec::new();
        let mut ids = HashSet::new();
        for (path, is_ordinary) in labelled
            .iter()
            .map(|p| (p, false))
            .chain(ordinary.iter().map(|p| (p, true)))
        {
            let (sha256, read) = read_file(path, is_ordinary)?;
            for item in &read {
                if !ids.insert(item.id.clone()) {
                    return Err(QualityError::Invalid(format!(
                        "{}: id {:?} appears in more than one item",
                        path.display(),
                        item.id
                    )));
                }
            }
            files.push(DataFile {
                path: path.clone(),
                sha256,
                items: read.len(),
                ordinary: is_ordinary,
            });
            items.extend(read);
        }
        let primary: Vec<&Item> = items
            .iter()
            .filter(|i| i.set == stem(first) && !i.ordinary)
            .collect();
        if !primary.iter().any(|i| i.violation()) || primary.iter().all(|i| i.violation()) {
            return Err(QualityError::Invalid(format!(
                "{} needs both violation and ok items",
                first.display()
            )));
        }
        choose_ordinary_fit(&mut items, fit_per_source);
        Ok(Self { files, items })
    }

    /// The stem of the first labelled file: the set of the headline figures.
    pub fn primary_set(&self) -> String {
        self.files
            .first()
            .map(|f| stem(&f.path))
            .unwrap_or_default()
    }

    /// Every file as `path sha256=…`, as recorded in a calibration file.
    pub fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| {
                format!(
                    "{}{} sha256={}",
                    if f.ordinary { "ordinary " } else { "" },
                    f.path.display(),
                    f.sha256
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn has_ordinary(&self) -> bool {
        self.items.iter().any(|i| i.ordinary)
    }

    /// Whether the heads are fitted on any ordinary item (not with `--ordinary-fit 0`).
    pub fn fits_ordinary(&self) -> bool {
        self.items.iter().any(|i| i.ordinary && i.fit)
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_file(path: &Path, ordinary: bool) -> Result<(String, Vec<Item>), QualityError> {
    let bytes = std::fs::read(path).map_err(|source| QualityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text = std::str::from_utf8(&bytes).map_err(|e| QualityError::Data {
        path: path.to_path_buf(),
        line: bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
        message: "not UTF-8".into(),
    })?;
    let set = stem(path);
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| QualityError::Data {
            path: path.to_path_buf(),
            line: n + 1,
            message,
        };
        let mut item: Item = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if item.label != "violation" && item.label != "ok" {
            return Err(err(format!(
                "label {:?} is neither \"violation\" nor \"ok\"",
                item.label
            )));
        }
        if ordinary && item.violation() {
            return Err(err(
                "an ordinary-traffic file holds ok items only (label \"ok\")".into(),
            ));
        }
        if item.text.trim().is_empty() {
            return Err(err("empty text".into()));
        }
        if item.id.is_empty() {
            return Err(err("empty id".into()));
        }
        item.ordinary = ordinary;
        item.set = set.clone();
        item.fit = true;
        items.push(item);
    }
    if items.is_empty() {
        return Err(QualityError::Invalid(format!(
            "{} holds no items",
            path.display()
        )));
    }
    Ok((sha256, items))
}

/// Marks at most `cap` ordinary items per source as fitted on: whole groups, in the order
/// of a hash of `fit\0<group>` (stable across runs, and independent of the folds' hash, so
/// every fold keeps about the same share of fitted items).
fn choose_ordinary_fit(items: &mut [Item], cap: usize) {
    let mut by_source: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        if item.ordinary {
            by_source
                .entry(format!("{}\0{}", item.set, item.source))
                .or_default()
                .push(i);
        }
    }
    for rows in by_source.values() {
        if rows.len() <= cap {
            continue;
        }
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for &i in rows {
            groups.entry(items[i].group()).or_default().push(i);
        }
        let mut order: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
        order.sort_by_key(|(g, _)| {
            (
                Sha256::digest(format!("fit\0{g}").as_bytes()),
                g.to_string(),
            )
        });
        let mut taken = 0;
        let mut unfit = Vec::new();
        for (_, members) in order {
            if taken + members.len() <= cap {
                taken += members.len();
            } else {
                unfit.extend(members);
            }
        }
        for i in unfit {
            items[i].fit = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }

    fn line(id: &str, label: &str, source: &str) -> String {
        format!(
            r#"{{"id":"{id}","text":"text {id}","label":"{label}","lang":"en","kind":"prompt","category":"none","source":"{source}"}}"#
        )
    }

    #[test]
    fn ordinary_files_hold_ok_items_and_large_sources_are_sampled_for_the_fit() {
        let dir = tempfile::tempdir().unwrap();
        let dev = write(
            dir.path(),
            "dev.jsonl",
            &[line("a", "violation", "x"), line("b", "ok", "x")],
        );
        let many: Vec<String> = (0..ORDINARY_FIT_PER_SOURCE + 300)
            .map(|n| line(&format!("o:{n}"), "ok", "big"))
            .collect();
        let ord = write(dir.path(), "ord.jsonl", &many);
        let data = Data::read_all(
            std::slice::from_ref(&dev),
            std::slice::from_ref(&ord),
            ORDINARY_FIT_PER_SOURCE,
        )
        .unwrap();
        assert_eq!(data.items.len(), ORDINARY_FIT_PER_SOURCE + 302);
        let fitted = data.items.iter().filter(|i| i.ordinary && i.fit).count();
        assert_eq!(fitted, ORDINARY_FIT_PER_SOURCE);
        assert!(data.items.iter().filter(|i| !i.ordinary).all(|i| i.fit));
        assert_eq!(data.primary_set(), "dev");
        assert!(data.describe().contains("ordinary "));
        // Stable: the same items again.
        let again =
            Data::read_all(std::slice::from_ref(&dev), &[ord], ORDINARY_FIT_PER_SOURCE).unwrap();
        let fit = |d: &Data| -> Vec<bool> { d.items.iter().map(|i| i.fit).collect() };
        assert_eq!(fit(&data), fit(&again));

        let bad = write(dir.path(), "bad.jsonl", &[line("v", "violation", "y")]);
        let err = Data::read_all(std::slice::from_ref(&dev), &[bad], 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("ok items only"), "{err}");
        let dup = write(dir.path(), "dup.jsonl", &[line("a", "ok", "y")]);
        let err = Data::read_all(&[dev], &[dup], 1).err().unwrap();
        assert!(err.to_string().contains("more than one item"), "{err}");
    }
}
