//! The audit query API: `GET /v1/evaluations` (filters, cursor pagination),
//! `GET /v1/evaluations/{id}` and `GET /v1/stats` (counts per verdict and rule, bucketed
//! by hour or day), and `GET /metrics`. Parses and validates query strings (422 naming
//! the parameter) and shapes the store's results; the SQL lives in `store`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::error::AppError;
use crate::audit::{RecordedRule, Source};
use crate::constitution::ConstitutionRef;
use crate::evaluate::{Kind, Verdict};
use crate::state::AppState;
use crate::store::query::{Bucket, Counts, Cursor, ListFilter, StatsBucket, StatsQuery};
use crate::store::record::{parse_time, rfc3339, StoredEvaluation};
use crate::store::Store;

/// Page size when `limit` is absent, and the largest accepted.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;
/// Most buckets one stats query may span (about 83 days by hour, 5 years by day).
pub const MAX_BUCKETS: i64 = 2000;

/// One evaluation as the API shows it.
#[derive(Serialize)]
pub struct EvaluationView {
    pub id: String,
    pub time: String,
    pub source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_id: Option<String>,
    pub constitution: ConstitutionRef,
    pub model: String,
    pub kind: Kind,
    pub verdict: Verdict,
    pub risk: f32,
    pub violated: Vec<String>,
    pub rules: Vec<RecordedRule>,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
}

impl From<StoredEvaluation> for EvaluationView {
    fn from(e: StoredEvaluation) -> Self {
        EvaluationView {
            violated: e.violated().map(str::to_string).collect(),
            id: e.id,
            time: rfc3339(e.time_ms),
            source: e.source,
            client_key_id: e.client_key_id,
            constitution: ConstitutionRef {
                id: e.constitution_id,
                version: e.constitution_version,
            },
            model: e.model,
            kind: e.kind,
            verdict: e.verdict,
            risk: e.risk,
            rules: e.rules,
            latency_ms: e.latency_ms,
            text: e.text,
            text_hash: e.text_hash,
            context: e.context,
        }
    }
}

#[derive(Serialize)]
pub struct ListResponse {
    pub items: Vec<EvaluationView>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize)]
pub struct StatsResponse {
    pub from: String,
    pub to: String,
    pub bucket: Bucket,
    pub totals: Counts,
    /// Buckets holding at least one evaluation, oldest first.
    pub buckets: Vec<StatsBucket>,
}

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Query parameters by name, each at most once and each one known.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(params: Params, known: &[&str]) -> Result<Self, AppError> {
        let Query(pairs) = params.map_err(|e| AppError::invalid("query", e.body_text()))?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                return Err(AppError::invalid(
                    name.clone(),
                    format!(
                        "unknown query parameter; expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(AppError::invalid(name.clone(), "given more than once"));
            }
        }
        Ok(QueryParams(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn time(&self, name: &'static str) -> Result<Option<i64>, AppError> {
        self.get(name)
            .map(|v| {
                parse_time(v).ok_or_else(|| {
                    AppError::invalid(name, "expected an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
                })
            })
            .transpose()
    }

    fn source(&self) -> Result<Option<Source>, AppError> {
        self.get("source")
            .map(|v| match v {
                "api" => Ok(Source::Api),
                "gateway" => Ok(Source::Gateway),
                _ => Err(AppError::invalid("source", "expected api or gateway")),
            })
            .transpose()
    }
}

fn store(state: &AppState) -> Result<&Store, AppError> {
    state.store().map(|s| s.as_ref()).ok_or(AppError::NotFound {
        field: None,
        message: "the audit store is disabled (audit.enabled = false)".into(),
    })
}

pub async fn list(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<ListResponse>, AppError> {
    let p = QueryParams::parse(
        params,
        &[
            "verdict",
            "rule",
            "constitution",
            "version",
            "source",
            "from",
            "to",
            "cursor",
            "limit",
        ],
    )?;
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                AppError::invalid(
                    "limit",
                    format!("expected an integer from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let filter = ListFilter {
        verdict: p
            .get("verdict")
            .map(|v| match v {
                "pass" => Ok(Verdict::Pass),
                "fail" => Ok(Verdict::Fail),
                _ => Err(AppError::invalid("verdict", "expected pass or fail")),
            })
            .transpose()?,
        rule: p.get("rule").map(str::to_string),
        constitution: p.get("constitution").map(str::to_string),
        version: p.get("version").map(str::to_string),
        source: p.source()?,
        from_ms: p.time("from")?,
        to_ms: p.time("to")?,
        cursor: p
            .get("cursor")
            .map(|c| {
                Cursor::decode(c)
                    .ok_or_else(|| AppError::invalid("cursor", "not a cursor returned by this API"))
            })
            .transpose()?,
        limit,
    };
    let page = store(&state)?.list(&filter).await?;
    Ok(Json(ListResponse {
        items: page.items.into_iter().map(EvaluationView::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EvaluationView>, AppError> {
    match store(&state)?.get(&id).await? {
        Some(e) => Ok(Json(e.into())),
        None => Err(AppError::NotFound {
            field: Some("id".into()),
            message: format!("no evaluation with id {id:?}"),
        }),
    }
}

pub async fn stats(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<StatsResponse>, AppError> {
    let p = QueryParams::parse(params, &["from", "to", "bucket", "constitution", "source"])?;
    let bucket = match p.get("bucket") {
        None | Some("hour") => Bucket::Hour,
        Some("day") => Bucket::Day,
        Some(_) => return Err(AppError::invalid("bucket", "expected hour or day")),
    };
    let to_ms = p
        .time("to")?
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let from_ms = p.time("from")?.unwrap_or(
        to_ms
            - match bucket {
                Bucket::Hour => 86_400_000,
                Bucket::Day => 30 * 86_400_000,
            },
    );
    if from_ms >= to_ms {
        return Err(AppError::invalid("from", "must be before to"));
    }
    if (to_ms - from_ms) / bucket.millis() > MAX_BUCKETS {
        return Err(AppError::invalid(
            "from",
            format!("the range spans more than {MAX_BUCKETS} buckets; narrow it or use bucket=day"),
        ));
    }
    let query = StatsQuery {
        from_ms,
        to_ms,
        bucket,
        constitution: p.get("constitution").map(str::to_string),
        source: p.source()?,
    };
    let stats = store(&state)?.stats(&query).await?;
    Ok(Json(StatsResponse {
        from: rfc3339(from_ms),
        to: rfc3339(to_ms),
        bucket,
        totals: stats.totals(),
        buckets: stats.buckets(),
    }))
}

/// Prometheus text exposition of the service's metrics.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = match state.store() {
        Some(store) => store.render_metrics(),
        None => "# the audit store is disabled (audit.enabled = false)\n".to_string(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
