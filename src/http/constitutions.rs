//! `GET /v1/constitutions` and `GET /v1/constitutions/{id}`: what is loaded, with versions.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use super::error::AppError;
use crate::constitution::{Action, Severity};
use crate::engine::Engine;
use crate::evaluate::Index;
use crate::state::AppState;

#[derive(Serialize)]
pub struct Summary {
    pub id: String,
    pub description: String,
    pub version: String,
    pub default: bool,
    pub rules: usize,
    pub exemplars: usize,
    /// Calibrated for the model that scores (with an ensemble: both models and the pair).
    pub calibrated: bool,
    /// Rules that can never be violated with the loaded model (no violating exemplars, or
    /// no learned head while the others have one).
    pub cannot_fire: Vec<String>,
}

#[derive(Serialize)]
pub struct RuleView {
    pub id: String,
    pub category: String,
    pub principle: std::collections::BTreeMap<String, String>,
    pub severity: Severity,
    pub action: Action,
    /// The threshold in force for the loaded model (with an ensemble: the pair's, on the
    /// mean margin).
    pub threshold: f32,
    pub violating_examples: usize,
    pub compliant_examples: usize,
    /// False when the rule can never be violated with the loaded model.
    pub can_fire: bool,
    /// Built-in detectors and custom pattern names the rule checks with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detectors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    pub critique: String,
    pub revision: String,
}

#[derive(Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub summary: Summary,
    pub model: String,
    pub shared_compliant_examples: usize,
    pub rules: Vec<RuleView>,
}

fn summary(engine: &Engine, index: &Index) -> Summary {
    let c = index.constitution();
    let default = engine.default_constitution();
    let calibrated = c.calibration(index.model()).is_some()
        && engine
            .partner_index(index)
            .is_none_or(|p| c.ensemble_threshold(index.model(), p.model()).is_some());
    Summary {
        id: c.id.clone(),
        description: c.description.clone(),
        version: c.version.clone(),
        default: c.id == default,
        rules: c.rules.len(),
        exemplars: index.len(),
        calibrated,
        cannot_fire: (0..index.rules().len())
            .filter(|&r| !index.can_fire(r))
            .map(|r| index.rules()[r].id.clone())
            .collect(),
    }
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Summary>>, AppError> {
    let engine = state.engine().ok_or(AppError::NotReady)?;
    Ok(Json(
        engine
            .constitutions()
            .iter()
            .map(|i| summary(&engine, i))
            .collect(),
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Detail>, AppError> {
    let engine = state.engine().ok_or(AppError::NotReady)?;
    let index = engine
        .constitution(Some(&id))
        .map_err(|_| AppError::NotFound {
            field: None,
            message: format!("no constitution with id {id:?}"),
        })?;
    let c = index.constitution();
    let pair = engine
        .partner_index(&index)
        .map(|p| crate::engine::ensemble_threshold(&index, &p));
    // The index holds the rules exemplars score; a detector-only rule is not in it.
    let rules = c
        .rules
        .iter()
        .map(|rule| {
            let r = index.rules().iter().position(|x| x.id == rule.id);
            (rule, r)
        })
        .map(|(rule, r)| RuleView {
            id: rule.id.clone(),
            category: rule.category.clone(),
            principle: rule.principle.clone(),
            severity: rule.severity,
            action: rule.action,
            threshold: match r {
                Some(r) => pair.unwrap_or(index.rules()[r].threshold),
                None => rule.threshold,
            },
            violating_examples: rule.violating.len(),
            compliant_examples: rule.compliant.len(),
            can_fire: r.is_none_or(|r| index.can_fire(r)) || !rule.detect.is_empty(),
            detectors: rule.detectors.clone(),
            patterns: rule.patterns.iter().map(|p| p.name.clone()).collect(),
            critique: rule.critique.clone(),
            revision: rule.revision.clone(),
        })
        .collect();
    Ok(Json(Detail {
        summary: summary(&engine, &index),
        model: engine.model().to_string(),
        shared_compliant_examples: c.shared_compliant.len(),
        rules,
    }))
}
